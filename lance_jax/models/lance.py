"""Lance: the language model plus the generation adapters, the training forward and its loss.

The forward consumes a *stream batch* (see `lance_jax/packing.py`): every packed sequence laid out
und tokens first (text, special tokens, ViT tokens; capacity Cu) then gen tokens (VAE latents in
packing order; capacity Cg). Latent tokens enter as `vae2llm(x_t) + time_embedder(t) +
latent_pos_embed[id]` with x_t = (1 - t) x0 + t eps (10-backbone §4).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lance_jax.config import ModelConfig
from lance_jax.layers.masking import MaskTokens
from lance_jax.layers.linear import dense
from lance_jax.layers.rotary import inv_frequencies, rotary_cos_sin
from lance_jax.models.backbone import KVCache, LanguageModel, Streams


def shifted_timesteps(logits, shift: float):
    """Raw logits (-inf = clean condition) -> flow time t = s*sigmoid(x) / (1 + (s-1)*sigmoid(x)) in [0, 1]."""
    sig = jax.nn.sigmoid(logits.astype(jnp.float32))
    return shift * sig / (1.0 + (shift - 1.0) * sig)


def timestep_frequencies(dim: int, max_period: float = 10000.0) -> np.ndarray:
    """(dim/2,) float32 exp(-ln(max_period) k / half), computed in fp32 like the reference."""
    half = dim // 2
    return np.exp(np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half))


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(len(positions), dim) float64 [sin(p w), cos(p w)] (sin first), w_k = 1e4^(-k/(dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def latent_axis_tables(hidden: int, max_frames: int, max_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-axis blocks of the fixed 3-D sin-cos table (10-backbone §3.4), float64 -> float32.

    Row f*S^2 + y*S + x of the reference table is concat(t[f], h[y], w[x]); keeping the three small
    blocks instead of the (Tmax*S^2, H) table (1 GB for the video model) gives identical values.
    """
    d = (hidden // 3) // 2 * 2
    return (
        sincos_1d(d, np.arange(max_frames)).astype(np.float32),
        sincos_1d(d, np.arange(max_size)).astype(np.float32),
        sincos_1d(hidden - 2 * d, np.arange(max_size)).astype(np.float32),
    )


def latent_position_table(cfg: ModelConfig, max_latent_frames: int | None = None) -> np.ndarray:
    """The full (Tmax*S^2, H) float32 table, as the reference stores it (for conversion and tests).

    Tmax defaults to cfg.max_latent_frames; checkpoints store tables of other depths (the image one has 1).
    """
    frames = cfg.max_latent_frames if max_latent_frames is None else max_latent_frames
    t, h, w = latent_axis_tables(cfg.hidden_size, frames, cfg.max_latent_size)
    s = cfg.max_latent_size
    f, y, x = np.meshgrid(np.arange(len(t)), np.arange(s), np.arange(s), indexing="ij")
    return np.concatenate([t[f.ravel()], h[y.ravel()], w[x.ravel()]], axis=1)


def latent_position_embedding(cfg: ModelConfig, ids):
    """(B, Cg) ids t*S^2 + h*S + w -> (B, Cg, H) float32 rows of the fixed table."""
    s = cfg.max_latent_size
    t_tab, h_tab, w_tab = (jnp.asarray(a) for a in latent_axis_tables(cfg.hidden_size, cfg.max_latent_frames, s))
    f, y, x = ids // (s * s), (ids // s) % s, ids % s
    return jnp.concatenate([t_tab[f], h_tab[y], w_tab[x]], axis=-1)


class TimestepEmbedder(nn.Module):
    """t (B, Cg) in [0, 1] (not x1000) -> (B, Cg, H): [cos, sin] sinusoid (fp32) -> Linear -> SiLU -> Linear."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, t):
        cfg = self.cfg
        kw = dict(use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        args = t.astype(jnp.float32)[..., None] * timestep_frequencies(cfg.timestep_embed_dim)
        emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
        h = dense(cfg.hidden_size, ("time_freq", "embed"), name="mlp_0", **kw)(emb)
        return dense(cfg.hidden_size, ("mlp", "embed"), name="mlp_2", **kw)(nn.silu(h))


def cross_entropy_per_token(logits, labels):
    """logits (..., V) float32, labels (...) with ignored labels outside [0, V) -> (...) CE, 0 where ignored."""
    valid = (labels >= 0) & (labels < logits.shape[-1])
    safe = jnp.where(valid, labels, 0)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)


class Lance(nn.Module):
    """The unified model. `__call__(batch)` is the training forward; see `packing.StreamBatch` for keys."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        kw = dict(use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.language_model = LanguageModel(cfg)
        self.time_embedder = TimestepEmbedder(cfg)
        self.vae2llm = dense(cfg.hidden_size, ("latent", "embed"), **kw)
        self.llm2vae = dense(cfg.patch_latent_dim, ("embed", "latent"), **kw)

    def und_embeddings(self, ids, vit_slot, vit_embeds):
        """Token embeddings, with ViT rows (vit_slot >= 0) taken from vit_embeds (B, Kv, H)."""
        emb = self.language_model.embed(ids)
        if vit_embeds is None or vit_embeds.shape[1] == 0:
            return emb
        vit = jnp.take_along_axis(vit_embeds, jnp.maximum(vit_slot, 0)[..., None], axis=1)
        return jnp.where((vit_slot >= 0)[..., None], vit.astype(emb.dtype), emb)

    def gen_embeddings(self, x_t, t, latent_pos_ids):
        """Latent tokens (B, Cg, P) at flow time t (B, Cg) -> (B, Cg, H) and its parts for parity."""
        time_embed = self.time_embedder(t)
        pos_embed = latent_position_embedding(self.cfg, latent_pos_ids)
        emb = self.vae2llm(x_t) + time_embed + pos_embed.astype(time_embed.dtype)
        return emb.astype(jnp.dtype(self.cfg.dtype)), time_embed, pos_embed

    def rotary(self, position_ids):
        cfg = self.cfg
        inv = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_bf16_inv_freq)
        return rotary_cos_sin(position_ids, inv, cfg.mrope_section, jnp.dtype(cfg.dtype))

    def extend(self, batch: dict, cache: KVCache, *, latents=None, timesteps=None, commit: bool = True):
        """Inference: one chunk (a stream batch) attending to `cache` and to itself.

        latents (B, Cg, P) and timesteps (B, Cg) override the plan's clean latents / logits (the sampler's
        current state). Returns (final-normed hidden Streams, input embedding Streams, cache).
        """
        x = batch["latents"] if latents is None else latents
        t = chunk_timesteps(batch, self.cfg, timesteps)
        und = self.und_embeddings(batch["und_ids"], batch["und_vit_slot"], batch.get("vit_embeds"))
        gen = self.gen_embeddings(x.astype(jnp.float32), t, batch["latent_pos_ids"])[0]
        tokens = MaskTokens(batch["order"], batch["sample"], batch["split"], batch["mode"])
        cos, sin = self.rotary(batch["position_ids"])
        hidden, cache = self.language_model.extend(Streams(und, gen), cos, sin, tokens, cache, commit)
        return hidden, Streams(und, gen), cache

    def velocity(self, hidden_gen):
        """(B, Cg, H) gen hidden states -> (B, Cg, P) float32 velocities."""
        return self.llm2vae(hidden_gen).astype(jnp.float32)

    def logits(self, hidden_und):
        """(B, K, H) -> (B, K, V) float32 (all rows; callers mask ids >= vocab_size_eff)."""
        return self.language_model.logits(hidden_und)

    def __call__(self, batch: dict, *, noise=None):
        """Training forward. Returns a dict: losses, per-token terms and the intermediates parity reads.

        batch: a stream batch (`lance_jax.packing`); its optional gen_loss_weight (B, Cg) / ce_loss_weight (B, Kce)
          scale each token's MSE / CE term.
        noise: (B, Cg, P) flow-matching noise; drawn from the 'noise' rng when None.
        """
        cfg = self.cfg
        x0 = batch["latents"].astype(jnp.float32)
        t = shifted_timesteps(batch["timestep_logits"], cfg.timestep_shift)
        if noise is None:
            noise = jax.random.normal(self.make_rng("noise"), x0.shape, jnp.float32)
        x_t = (1.0 - t[..., None]) * x0 + t[..., None] * noise
        und = self.und_embeddings(batch["und_ids"], batch["und_vit_slot"], batch.get("vit_embeds"))
        gen, time_embed, pos_embed = self.gen_embeddings(x_t, t, batch["latent_pos_ids"])
        tokens = MaskTokens(batch["order"], batch["sample"], batch["split"], batch["mode"])
        cos, sin = self.rotary(batch["position_ids"])
        inputs = Streams(und, gen)
        hidden = self.language_model(inputs, cos, sin, tokens)

        h_ce = jnp.take_along_axis(hidden.und, batch["ce_rows"][..., None], axis=1)
        ce_logits = self.language_model.logits(h_ce)[..., : cfg.vocab_size_eff]
        ce = cross_entropy_per_token(ce_logits, batch["ce_labels"])
        # optional per-token factors (a data group's loss_weight); the denominators stay the reference's
        # token counts, so a factor scales that token's share of the gradient
        ce_w = batch.get("ce_loss_weight", 1.0)
        gen_w = batch.get("gen_loss_weight", 1.0)
        ce_count = jnp.sum(batch["ce_valid"])
        ce_loss = jnp.sum(jnp.where(batch["ce_valid"], ce * ce_w, 0.0)) / jnp.maximum(ce_count, 1)

        v_pred = self.llm2vae(hidden.gen).astype(jnp.float32)
        mse_mask = t > 0  # the reference supervises exactly the latents with t > 0
        mse = jnp.square(v_pred - (noise - x0))
        mse_count = jnp.sum(mse_mask)
        mse_loss = jnp.sum(jnp.where(mse_mask, jnp.mean(mse, axis=-1) * gen_w, 0.0)) / jnp.maximum(mse_count, 1)
        return dict(
            loss=cfg.ce_weight * ce_loss + cfg.mse_weight * mse_loss,
            ce_loss=ce_loss,
            mse_loss=mse_loss,
            ce_logits=ce_logits,
            ce_per_token=ce,
            v_pred=v_pred,
            mse_per_elem=mse,
            mse_mask=mse_mask,
            x_t=x_t,
            timesteps=t,
            time_embed=time_embed,
            latent_pos_embed=pos_embed,
            input_embeds=inputs,
            hidden=hidden,
        )


def chunk_timesteps(batch: dict, cfg: ModelConfig, timesteps=None):
    """Flow time of every gen row of an inference chunk: given (B, Cg), else from the plan's logits."""
    return shifted_timesteps(batch["timestep_logits"], cfg.timestep_shift) if timesteps is None else timesteps


def init_params(cfg: ModelConfig, rng, batch: dict):
    """Boxed (logically partitioned) params for `cfg`, initialised on `batch`'s shapes."""
    model = Lance(cfg)
    return model.init({"params": rng, "noise": rng}, batch)["params"]


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters, from shapes only (no allocation)."""
    from lance_jax.packing import dummy_stream_batch

    abstract = jax.eval_shape(lambda r: init_params(cfg, r, dummy_stream_batch(cfg)), jax.random.PRNGKey(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(abstract)))
