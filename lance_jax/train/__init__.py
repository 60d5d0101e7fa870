"""Training: optimizer, freeze masks, EMA, the jitted train step, checkpoints, metrics, the loop.

Modules (one concept each):
  optimizer.py   AdamW (b1 0.9, b2 0.95, eps 1e-15, no decay), warm-up + constant LR, clip 1.0 (+1e-6)
  freeze.py      which params are trainable (embed/lm_head, und stream, regexes)
  ema.py         EMA of the params (first applied update overwrites, then decay)
  state.py       TrainState, init (random or reference weights), shardings over a mesh
  step.py        the train step (state, batch, rng) -> (state, metrics), timesteps, noise, skip non-finite
  checkpoint.py  orbax CheckpointManager: state (params, opt, EMA, step, rng) + data iterator state
  metrics.py     console + TensorBoard (tensorboardX) writer
  loop.py        the loop `train.py` runs (resume, logging, saving)
"""
