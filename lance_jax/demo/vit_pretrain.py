"""A short pretraining of the demo's tiny ViT: the stand-in for Qwen's pretrained (then frozen) tower.

A random frozen tower keeps the pixels' information but entangles it. The real tower arrives pretrained and its
tokens say what is in their patch; this gives the tiny tower that start in about a minute on 2 CPU cores. Per
merged token it learns to report, through a linear read-out that is then thrown away, the mean colour of its
region in each of the two frames of its temporal patch and the share of the region the object covers in each --
low-level targets of any scene, not the demo's questions. Scenes use the training (shape, colour) pairs only, so
the held-out pairs stay unseen by every trained part. Measured on the demo (benchmarks/results.md, session 6):
seeds 0 and 1, x2t_image 0.60 / 1.00 -> 1.00 / 1.00 and edit colour 0.70 / 0.80 -> 0.80 / 0.95.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lance_jax import vision
from lance_jax.data import synthetic as SY
from lance_jax.models.vit import VisionTransformer, VitConfig, vit_plan

TARGETS = 8  # mean RGB x 2 frames, object share x 2 frames


def token_targets(frames: np.ndarray, masks: np.ndarray, side: int) -> np.ndarray:
    """(T', n, n, TARGETS) float32 per merged token of a ViT input `side` (n = side / (14 px patch x 2 merge) per
    side, T' = F' / 2).

    frames uint8 (F, S, S, 3), masks bool (F, S, S) of the object; an odd F is padded by repeating the last frame,
    as the ViT's preprocessing does (an image is one frame, so both frames of its patch are the image).
    """
    if len(frames) % 2:
        frames, masks = np.concatenate([frames, frames[-1:]]), np.concatenate([masks, masks[-1:]])
    f, s = frames.shape[:2]
    n = side // (vision.PATCH * vision.MERGE)
    if s % n:
        raise ValueError(f"scene side {s} is not a multiple of the {n} merged tokens per side of a {side} px ViT input")
    c = s // n
    colour = (frames.astype(np.float32) / 255.0).reshape(f, n, c, n, c, 3).mean((2, 4))
    share = masks.astype(np.float32).reshape(f, n, c, n, c).mean((2, 4))
    a, b = slice(0, None, 2), slice(1, None, 2)
    return np.concatenate([colour[a], colour[b], share[a][..., None], share[b][..., None]], -1)


def clip(rng: np.random.Generator, size: int, video: bool) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 (F, S, S, 3), object masks (F, S, S)): a random training-pair scene, still or moving."""
    pair = SY.TRAIN_PAIRS[int(rng.integers(len(SY.TRAIN_PAIRS)))]
    if not video:
        scene = SY.random_scene(rng, pair, size)
        return SY.render(scene, size)[None], SY.object_mask(scene, size)[None]
    direction = str(rng.choice(SY.DIRECTIONS))
    speed = float(rng.uniform(*SY.VIDEO_SPEED) * size / SY.BASE)
    scene = SY.random_scene(rng, pair, size, direction=direction, speed=speed)
    return SY.render_video(scene, direction, SY.FRAMES, size, speed)


def batch(rng: np.random.Generator, n: int, side: int, video: bool, *, size: int):
    """(patches (N, patch_dim), grid_thw (n, 3), targets (one row per merged token, TARGETS)) of n packed clips."""
    patches, grids, targets = [], [], []
    for _ in range(n):
        frames, masks = clip(rng, size, video)
        p, g = vision.vit_inputs(frames, side)
        patches.append(p)
        grids.append(np.asarray(g).reshape(3))
        targets.append(token_targets(frames, masks, side).reshape(-1, TARGETS))
    return np.concatenate(patches), np.stack(grids).astype(np.int32), np.concatenate(targets)


_GROUPS = (("colour", slice(0, 6)), ("share", slice(6, 8)))


def pretrain(cfg: VitConfig, params: dict, *, size: int, steps: int, seed: int = 0, batch_size: int = 8,
             lr: float = 3e-3, kinds: tuple[tuple[int, bool], ...] = ((112, True), (112, False), (224, False)),
             console=print) -> tuple[dict, dict]:
    """(pretrained ViT params, report) after `steps` Adam steps, cycling over `kinds` (ViT side, video?) batches.

    report: seconds, first / last loss per kind and the read-out's R² on a fresh batch per kind.
    """
    model = VisionTransformer(cfg)
    head = dict(w=jnp.zeros((cfg.out_hidden_size, TARGETS), jnp.float32), b=jnp.zeros((TARGETS,), jnp.float32))
    state = dict(vit=jax.tree.map(jnp.asarray, params), head=head)
    opt = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.05))
    opt_state = opt.init(state)

    rng = np.random.default_rng(seed)
    # every target in units of its spread: the object's share is zero on most tokens, and a plain MSE is met by
    # the colours alone (measured: colour R² 0.95, share ~0 after 60 steps)
    scale = jnp.asarray(np.maximum(np.concatenate([batch(rng, batch_size, *k, size=size)[2] for k in kinds]).std(0),
                                   0.05), jnp.float32)

    def loss_fn(s, patches, plan, targets):
        tokens = model.apply({"params": s["vit"]}, patches, plan)
        return jnp.mean(((tokens.astype(jnp.float32) @ s["head"]["w"] + s["head"]["b"] - targets) / scale) ** 2)

    @jax.jit
    def step(s, o, patches, plan, targets):
        loss, grads = jax.value_and_grad(loss_fn)(s, patches, plan, targets)
        updates, o = opt.update(grads, o, s)
        return optax.apply_updates(s, updates), o, loss

    t0, losses = time.time(), {k: [] for k in kinds}
    for i in range(steps):
        kind = kinds[i % len(kinds)]
        patches, grid, targets = batch(rng, batch_size, *kind, size=size)
        state, opt_state, loss = step(state, opt_state, patches, vit_plan(grid, cfg), targets)
        losses[kind].append(float(loss))
    report = dict(seconds=round(time.time() - t0, 1), steps=steps, kinds={})
    for kind in kinds:
        patches, grid, targets = batch(rng, batch_size, *kind, size=size)
        pred = np.asarray(model.apply({"params": state["vit"]}, patches, vit_plan(grid, cfg)) @ state["head"]["w"]
                          + state["head"]["b"])
        r2 = 1.0 - ((pred - targets) ** 2).sum(0) / np.maximum(((targets - targets.mean(0)) ** 2).sum(0), 1e-9)
        name = f"{'video' if kind[1] else 'image'}@{kind[0]}"
        report["kinds"][name] = dict(first_loss=losses[kind][0] if losses[kind] else None,
                                     last_loss=losses[kind][-1] if losses[kind] else None,
                                     r2=[round(float(x), 3) for x in r2])
    console(f"pretrained the demo ViT: {steps} steps in {report['seconds']} s; read-out R² " +
            "; ".join(f"{k} " + " ".join(f"{name} {np.mean(v['r2'][sl]):.2f}" for name, sl in _GROUPS)
                      for k, v in report["kinds"].items()))
    return jax.tree.map(np.asarray, state["vit"]), report
