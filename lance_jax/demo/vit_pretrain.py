"""A short pretraining of the demo's tiny ViT: the stand-in for Qwen's pretrained (then frozen) tower.

A random frozen tower keeps the pixels' information but entangles it. The real tower arrives pretrained and its
tokens say what is in their patch; this gives the tiny tower that start in a few minutes on 2 CPU cores. Per
merged token it learns to report, through a linear read-out that is then thrown away, the mean colour of its
region in each of the two frames of its temporal patch, the share of the region the object covers in each, and
the object's motion between the two frames (its velocity where it covers the region) -- low-level targets of any
scene or clip, not the demo's questions. Scenes use the training (shape, colour) pairs only, so the held-out
pairs stay unseen by every trained part. Measured on the demo (benchmarks/results.md): colour and share (session
6) took seeds 0 and 1 from x2t_image 0.60 / 1.00 to 1.00 / 1.00 and edit colour 0.70 / 0.80 to 0.80 / 0.95;
motion (session 14) is what the video questions' direction answers need -- the backbone cannot compare the
object's place across frames through rotary offsets at this size (session 6), but it pools a per-token motion
as it pools colour.

Motion is learned only at a low learning rate (3e-4: read-out R² ~0.35-0.85; 1e-3: 0.1-0.5; 3e-3 and the
earlier 1e-2: 0.00): it is a product of the two frames' edges, a small part of each patch next to its colours.
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

TARGETS = 10  # mean RGB x 2 frames, object share x 2 frames, object motion (dy, dx)


def token_targets(frames: np.ndarray, masks: np.ndarray, side: int,
                  velocity: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """(T', n, n, TARGETS) float32 per merged token of a ViT input `side` (n = side / (14 px patch x 2 merge) per
    side, T' = F' / 2).

    frames uint8 (F, S, S, 3), masks bool (F, S, S) of the object; an odd F is padded by repeating the last frame,
    as the ViT's preprocessing does (an image is one frame, so both frames of its patch are the image).
    velocity: the object's motion (dy, dx) in scene pixels per frame. The motion target of a token is the velocity
    times the share of its region the object covers in either frame of the pair -- zero off the object, on
    stills and on a padded last pair (one frame twice: nothing moves inside it).
    """
    moving = np.ones(-(-len(frames) // 2), np.float32)
    if len(frames) % 2:
        frames, masks = np.concatenate([frames, frames[-1:]]), np.concatenate([masks, masks[-1:]])
        moving[-1] = 0.0
    f, s = frames.shape[:2]
    n = side // (vision.PATCH * vision.MERGE)
    if s % n:
        raise ValueError(f"scene side {s} is not a multiple of the {n} merged tokens per side of a {side} px ViT input")
    c = s // n
    colour = (frames.astype(np.float32) / 255.0).reshape(f, n, c, n, c, 3).mean((2, 4))
    share = masks.astype(np.float32).reshape(f, n, c, n, c).mean((2, 4))
    a, b = slice(0, None, 2), slice(1, None, 2)
    covered = (masks[a] | masks[b]).astype(np.float32).reshape(f // 2, n, c, n, c).mean((2, 4))
    motion = covered[..., None] * np.asarray(velocity, np.float32) * moving[:, None, None, None]
    return np.concatenate([colour[a], colour[b], share[a][..., None], share[b][..., None], motion], -1)


def clip(rng: np.random.Generator, size: int, video: bool) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(frames uint8 (F, S, S, 3), object masks (F, S, S), velocity (dy, dx) in scene pixels per frame): a random
    training-pair scene, still or moving."""
    pair = SY.TRAIN_PAIRS[int(rng.integers(len(SY.TRAIN_PAIRS)))]
    if not video:
        scene = SY.random_scene(rng, pair, size)
        return SY.render(scene, size)[None], SY.object_mask(scene, size)[None], (0.0, 0.0)
    direction = str(rng.choice(SY.DIRECTIONS))
    speed = float(rng.uniform(*SY.VIDEO_SPEED) * size / SY.BASE)
    scene = SY.random_scene(rng, pair, size, direction=direction, speed=speed)
    dy, dx = SY.STEP[direction]
    return (*SY.render_video(scene, direction, SY.FRAMES, size, speed), (dy * speed, dx * speed))


def batch(rng: np.random.Generator, n: int, side: int, video: bool, *, size: int):
    """(patches (N, patch_dim), grid_thw (n, 3), targets (one row per merged token, TARGETS)) of n packed clips."""
    patches, grids, targets = [], [], []
    for _ in range(n):
        frames, masks, velocity = clip(rng, size, video)
        p, g = vision.vit_inputs(frames, side)
        patches.append(p)
        grids.append(np.asarray(g).reshape(3))
        targets.append(token_targets(frames, masks, side, velocity).reshape(-1, TARGETS))
    return np.concatenate(patches), np.stack(grids).astype(np.int32), np.concatenate(targets)


MOTION = slice(8, 10)  # the motion columns of the targets
_GROUPS = (("colour", slice(0, 6)), ("share", slice(6, 8)), ("motion", MOTION))


def pretrain(cfg: VitConfig, params: dict, *, size: int, steps: int, seed: int = 0, batch_size: int = 8,
             lr: float = 3e-4, motion_steps: int = 0, console=print,
             kinds: tuple[tuple[int, bool], ...] = ((112, True), (112, True), (112, False), (224, False)),
             ) -> tuple[dict, dict]:
    """(pretrained ViT params, report) after `steps` Adam steps, cycling over `kinds` (ViT side, video?) batches.

    The first `motion_steps` of them read clips (the first video kind) for the motion target alone: learned
    beside the colours from the start, motion stays weak (read-out R² of a linear probe ~0.5, a clip's pooled
    direction right 0.86); after 300 motion-only steps 0.7-0.8 and 1.00, colour and share as good (session 14).
    report: seconds, first / last loss per kind and the read-out's R² on a fresh batch per kind.
    """
    model = VisionTransformer(cfg)
    # a random (not zero) read-out: motion's sign is symmetric (a clip and its mirror image), so at a zero
    # read-out neither it nor the tower gets a gradient towards motion (measured: motion R² 0.00 from a zero
    # read-out at any step count; 0.3-0.4 from a random one)
    head = dict(w=jax.random.normal(jax.random.PRNGKey(seed), (cfg.out_hidden_size, TARGETS), jnp.float32)
                / np.sqrt(cfg.out_hidden_size), b=jnp.zeros((TARGETS,), jnp.float32))
    state = dict(vit=jax.tree.map(jnp.asarray, params), head=head)
    opt = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.05))
    opt_state = opt.init(state)

    rng = np.random.default_rng(seed)
    # every target in units of its spread: the object's share is zero on most tokens, and a plain MSE is met by
    # the colours alone (measured: colour R² 0.95, share ~0 after 60 steps)
    scale = jnp.asarray(np.maximum(np.concatenate([batch(rng, batch_size, *k, size=size)[2] for k in kinds]).std(0),
                                   0.05), jnp.float32)

    def loss_fn(s, patches, plan, targets, weights):
        tokens = model.apply({"params": s["vit"]}, patches, plan)
        err = (tokens.astype(jnp.float32) @ s["head"]["w"] + s["head"]["b"] - targets) / scale
        return jnp.mean(weights * err ** 2)

    @jax.jit
    def step(s, o, patches, plan, targets, weights):
        loss, grads = jax.value_and_grad(loss_fn)(s, patches, plan, targets, weights)
        updates, o = opt.update(grads, o, s)
        return optax.apply_updates(s, updates), o, loss

    clips = next((k for k in kinds if k[1]), None)
    if motion_steps and clips is None:
        raise ValueError(f"motion_steps={motion_steps} needs a video kind among {kinds}")
    all_targets, motion_only = jnp.ones((TARGETS,), jnp.float32), jnp.zeros((TARGETS,), jnp.float32).at[8:].set(1.0)
    t0, losses = time.time(), {k: [] for k in kinds}
    for i in range(steps):
        first_phase = i < motion_steps
        kind = clips if first_phase else kinds[i % len(kinds)]
        patches, grid, targets = batch(rng, batch_size, *kind, size=size)
        state, opt_state, loss = step(state, opt_state, patches, vit_plan(grid, cfg), targets,
                                      motion_only if first_phase else all_targets)
        if not first_phase:
            losses[kind].append(float(loss))
    report = dict(seconds=round(time.time() - t0, 1), steps=steps, motion_steps=motion_steps, kinds={})
    for kind in kinds:
        patches, grid, targets = batch(rng, batch_size, *kind, size=size)
        pred = np.asarray(model.apply({"params": state["vit"]}, patches, vit_plan(grid, cfg)) @ state["head"]["w"]
                          + state["head"]["b"])
        spread = ((targets - targets.mean(0)) ** 2).sum(0)
        # None where the target does not vary (motion on stills)
        r2 = np.where(spread > 1e-9, 1.0 - ((pred - targets) ** 2).sum(0) / np.maximum(spread, 1e-9), np.nan)
        name = f"{'video' if kind[1] else 'image'}@{kind[0]}"
        report["kinds"][name] = dict(first_loss=losses[kind][0] if losses[kind] else None,
                                     last_loss=losses[kind][-1] if losses[kind] else None,
                                     r2=[None if np.isnan(x) else round(float(x), 3) for x in r2])
    console(f"pretrained the demo ViT: {steps} steps in {report['seconds']} s; read-out R² " +
            "; ".join(f"{k} " + " ".join(f"{name} {np.mean(v['r2'][sl]):.2f}" for name, sl in _GROUPS
                                         if None not in v["r2"][sl])
                      for k, v in report["kinds"].items()))
    return jax.tree.map(np.asarray, state["vit"]), report


def token_spread(cfg: VitConfig, params: dict, *, size: int, seed: int = 0, batch_size: int = 8,
                 kinds: tuple[tuple[int, bool], ...] = ((112, True), (112, False), (224, False))) -> float:
    """Mean over channels of the standard deviation of the tower's output tokens (fresh scenes of `kinds`)."""
    model, rng = VisionTransformer(cfg), np.random.default_rng(seed + 7)
    tokens = []
    for kind in kinds:
        patches, grid, _ = batch(rng, batch_size, *kind, size=size)
        tokens.append(np.asarray(model.apply({"params": params}, patches, vit_plan(grid, cfg))))
    return float(np.concatenate(tokens).std(0).mean())


def with_token_spread(cfg: VitConfig, params: dict, spread: float, *, size: int, seed: int = 0) -> tuple[dict, float]:
    """(params whose output tokens have a mean per-channel std of `spread`, the factor applied): the merger's last
    projection scaled. The read-out only fixes the tokens' directions; their scale is free, and it decides how much
    of an image token's state in the backbone's residual stream is the picture rather than what the layers add."""
    factor = spread / token_spread(cfg, params, size=size, seed=seed)
    out = jax.tree.map(np.asarray, params)
    out["merger"]["mlp_2"] = {k: v * np.float32(factor) for k, v in out["merger"]["mlp_2"].items()}
    return out, float(factor)
