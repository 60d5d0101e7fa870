"""Flow-matching sampling with text CFG, and text decoding, over KV-cached contexts (30-inference §2-3, §6).

Generation: the contexts (conditional and caption-free) are prefilled once; every Euler step runs
only the noise split as the query against them, both CFG branches in one batched call. The state
is the target latent rows; clean rows (i2v frame 0) carry t = 0 and are never updated.
Decoding: a `lax.while_loop` of single-token steps that append to the cache.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lance_jax.models.backbone import KVCache
from lance_jax.models.lance import Lance

RENORM_TYPES = ("global", "channel", "none")


def schedule(num_steps: int, shift: float) -> np.ndarray:
    """(num_steps + 1,) float32 shifted times t_i = s u / (1 + (s - 1) u), u = linspace(1, 0): t_0 = 1, t_N = 0."""
    u = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)
    s = np.float32(shift)
    return (s * u / (np.float32(1.0) + (s - np.float32(1.0)) * u)).astype(np.float32)


def cfg_active(t: np.ndarray, interval=(0.4, 1.0), scale: float = 4.0) -> np.ndarray:
    """Guided steps: lo < t <= hi (strict lower bound, float32) and a scale above 1."""
    t = np.asarray(t, np.float32)
    return (np.float32(interval[0]) < t) & (t <= np.float32(interval[1])) & (scale > 1.0)


def cfg_combine(v_cond, v_uncond, scale: float, renorm: str = "global", renorm_min: float = 0.0, rows=None):
    """v = v_u + s (v_c - v_u), then shrunk towards ||v_c|| (30 §3.3). v_*: (N, P); rows: (N,) bool norm mask."""
    if renorm not in RENORM_TYPES:
        raise ValueError(f"cfg renorm {renorm!r} not in {RENORM_TYPES}")
    guided = v_uncond + scale * (v_cond - v_uncond)
    if renorm == "none":
        return guided
    mask = jnp.ones(v_cond.shape[:1], bool) if rows is None else rows
    vc, vg = jnp.where(mask[:, None], v_cond, 0.0), jnp.where(mask[:, None], guided, 0.0)
    axis = None if renorm == "global" else -1
    ratio = jnp.linalg.norm(vc, axis=axis, keepdims=True) / (jnp.linalg.norm(vg, axis=axis, keepdims=True) + 1e-8)
    return guided * jnp.clip(ratio, renorm_min, 1.0)


@dataclasses.dataclass(frozen=True)
class CFGConfig:
    scale: float = 4.0
    interval: tuple[float, float] = (0.4, 1.0)
    renorm: str = "global"
    renorm_min: float = 0.0


@functools.partial(jax.jit, static_argnames=("model", "cfg", "guided"))
def denoise_step(model: Lance, params, queries: dict, caches: KVCache, x, t, dt, noisy, *, cfg: CFGConfig,
                 guided: bool):
    """One Euler step. queries/caches: batch row 0 = conditional, row 1 = caption-free (used when `guided`).

    x: (Cg, P) state of the query's gen rows; noisy: (Cg,) rows that move (others keep t = 0).
    Returns (x_next, dict(v_cond, v_uncond, v, hidden, inputs)); hidden/inputs are the query Streams.
    """
    rows = 2 if guided else 1
    batch = jax.tree.map(lambda a: a[:rows], queries)
    cache = KVCache(*jax.tree.map(lambda a: a[:, :rows] if a.ndim == 5 else a, (caches.k, caches.v)),
                    jax.tree.map(lambda a: a[:rows], caches.tokens), caches.length)
    times = jnp.where(noisy, t, 0.0)[None].repeat(rows, 0)
    latents = x[None].repeat(rows, 0)
    hidden, inputs, _ = model.apply({"params": params}, batch, cache, latents=latents, timesteps=times,
                                    commit=False, method=Lance.extend)
    v = model.apply({"params": params}, hidden.gen, method=Lance.velocity)
    real = queries["gen_index"][0] >= 0
    v_cond = v[0]
    v_applied = cfg_combine(v_cond, v[1], cfg.scale, cfg.renorm, cfg.renorm_min, real) if guided else v_cond
    x_next = jnp.where((noisy & real)[:, None], x - v_applied * dt, x)
    return x_next, dict(v_cond=v_cond, v_uncond=v[1] if guided else jnp.full_like(v_cond, jnp.nan), v=v_applied,
                        hidden=hidden, inputs=inputs)


def denoise(model: Lance, params, queries: dict, caches: KVCache, x0, noisy, times: np.ndarray, cfg: CFGConfig,
            *, record: bool = False, progress: bool = True):
    """Run every Euler step of `times` (schedule()); returns (final state, per-step records if `record`)."""
    active = cfg_active(times[:-1], cfg.interval, cfg.scale)
    x, records = jnp.asarray(x0), []
    for i in tqdm(range(len(times) - 1), desc="denoise", disable=not progress, unit="step"):
        dt = np.float32(times[i] - times[i + 1])
        x_next, info = denoise_step(model, params, queries, caches, x, np.float32(times[i]), dt, noisy,
                                    cfg=cfg, guided=bool(active[i]))
        if record:
            records.append(dict(x=x, active=bool(active[i]), **info))
        x = x_next
    return x, records


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "vocab_eff", "eos_id", "greedy",
                                             "record_logits"))
def decode(model: Lance, params, cache: KVCache, first_token, positions, order0, split_id, key, *,
           max_new_tokens: int, vocab_eff: int, eos_id: int, temperature: float = 1.0, top_p: float = 1.0,
           greedy: bool = True, record_logits: bool = False):
    """Generate up to max_new_tokens ids after a prefilled context (batch 1).

    first_token: the last context id (fed first, as the reference does); positions: (3, max_new_tokens)
    MaPE ids of the fed tokens; order0 / split_id: mask ints of the first fed token. Stops after eos.
    Returns (ids (max_new_tokens,) padded with -1 after the stop, number generated, logits or None).
    """
    p_dim = model.cfg.patch_latent_dim

    def step(state):
        i, token, cache, done, ids, logits_rec, key = state
        ints = jnp.full((1, 1), 0, jnp.int32)
        batch = dict(und_ids=token.reshape(1, 1), und_vit_slot=ints - 1,
                     latents=jnp.zeros((1, 0, p_dim)), latent_pos_ids=jnp.zeros((1, 0), jnp.int32),
                     timestep_logits=jnp.zeros((1, 0)), position_ids=jax.lax.dynamic_slice_in_dim(
                         positions, i, 1, axis=1)[None], order=(order0 + i).reshape(1, 1), sample=ints,
                     split=(split_id + i).reshape(1, 1), mode=ints)
        hidden, _, cache = model.apply({"params": params}, batch, cache, commit=True, method=Lance.extend)
        logits = model.apply({"params": params}, hidden.und, method=Lance.logits)[0, 0]
        masked = jnp.where(jnp.arange(logits.shape[-1]) < vocab_eff, logits, -jnp.inf)
        key, sub = jax.random.split(key)
        nxt = jnp.argmax(masked) if greedy else _sample_top_p(masked, sub, temperature, top_p)
        ids = ids.at[i].set(jnp.where(done, -1, nxt))
        if record_logits:
            logits_rec = logits_rec.at[i].set(logits)
        return i + 1, nxt.astype(jnp.int32), cache, done | (nxt == eos_id), ids, logits_rec, key

    def running(state):
        i, _, _, done, *_ = state
        return (i < max_new_tokens) & ~done

    vocab = model.cfg.vocab_size
    rec = jnp.zeros((max_new_tokens, vocab) if record_logits else (0,), jnp.float32)
    init = (jnp.int32(0), jnp.asarray(first_token, jnp.int32), cache, jnp.bool_(False),
            jnp.full((max_new_tokens,), -1, jnp.int32), rec, key)
    n, _, _, _, ids, logits_rec, _ = jax.lax.while_loop(running, step, init)
    return ids, n, (logits_rec if record_logits else None)


def _sample_top_p(logits, key, temperature: float, top_p: float):
    """Nucleus sampling over temperature-scaled logits."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)
    probs = jax.nn.softmax(scaled[order])
    keep = jnp.cumsum(probs) - probs < top_p  # always keeps the top token
    choice = jax.random.categorical(key, jnp.where(keep, scaled[order], -jnp.inf))
    return order[choice]
