"""Dual-stream (MoT) Qwen2 decoder: und weights for text/ViT tokens, `*_moe_gen` weights for VAE latents.

Routing without waste (design §3): the host lays every packed sequence out stream-sorted, all und
tokens first (capacity Cu) and all gen tokens after (capacity Cg), each token carrying its original
index for causality. So a layer runs each weight set as one dense matmul over its own slice, and
attention is joint over the concatenation with a mask predicate over per-token ints. Layers are
scanned (`LanguageModel`); every param has logical axis names.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lance_jax.config import ModelConfig
from lance_jax.layers.attention import attention
from lance_jax.layers.context_parallel import context_parallel_attention, context_parallel_fits
from lance_jax.layers.masking import MaskTokens
from lance_jax.layers.linear import dense
from lance_jax.layers.mlp import MLP
from lance_jax.layers.norms import RMSNorm
from lance_jax.layers.rotary import apply_rotary

GEN = "_moe_gen"


class Streams(NamedTuple):
    """The residual stream split by weight set: und (B, Cu, H) and gen (B, Cg, H)."""

    und: jax.Array
    gen: jax.Array


class KVCache(NamedTuple):
    """Fixed-size key/value buffers of every layer plus the mask ints of the cached rows.

    k, v: (NL, B, L, Nkv, Dh), stored post-norm and post-rotary; tokens: MaskTokens of (B, L), with
    sample = -1 on rows not (yet) filled, so they are never attended; length: rows used so far (int32).
    """

    k: jax.Array
    v: jax.Array
    tokens: MaskTokens
    length: jax.Array

    @staticmethod
    def empty(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        ints = jnp.zeros((batch, max_len), jnp.int32)
        tokens = MaskTokens(ints, ints - 1, ints - 1, ints)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), tokens, jnp.zeros((), jnp.int32))

    def append(self, k_new, v_new, tokens: MaskTokens) -> "KVCache":
        """Write a chunk's k/v (NL, B, q, Nkv, Dh) and mask ints (B, q) at rows [length, length + q)."""
        at = self.length
        k = jax.lax.dynamic_update_slice(self.k, k_new.astype(self.k.dtype), (0, 0, at, 0, 0))
        v = jax.lax.dynamic_update_slice(self.v, v_new.astype(self.v.dtype), (0, 0, at, 0, 0))
        toks = MaskTokens(*(jax.lax.dynamic_update_slice(old, new.astype(jnp.int32), (0, at))
                            for old, new in zip(self.tokens, tokens)))
        return KVCache(k, v, toks, at + k_new.shape[2])


def _per_stream(cfg: ModelConfig, fn, x: Streams) -> Streams:
    """Apply `fn(suffix, array)` with the und weights to x.und and the gen weights to x.gen."""
    if cfg.dual_stream:
        return Streams(fn("", x.und), fn(GEN, x.gen))
    n_und = x.und.shape[1]
    joint = fn("", jnp.concatenate([x.und, x.gen], axis=1))
    return Streams(joint[:, :n_und], joint[:, n_und:])


def _dtype(name: str):
    return jnp.dtype(name)


class Attention(nn.Module):
    """Joint GQA attention with per-stream q/k/v/o projections and per-head q/k RMSNorm before rotary."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Streams, cos, sin, tokens: MaskTokens, past_kv=None, past_tokens=None):
        """Returns (output Streams, this chunk's (k, v) post-rotary). With `past_kv` = (k, v) of
        (B, L, Nkv, Dh) and their mask ints, the queries also attend to those cached rows."""
        cfg = self.cfg
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        nh, nkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=dt, param_dtype=pdt)
        qk_norm = {"": cfg.qk_norm_und, GEN: cfg.qk_norm_gen}

        def project(suffix, h):
            q = dense((nh, dh), ("embed", "q_heads", "head_dim"), use_bias=True, name="q_proj" + suffix, **kw)(h)
            k = dense((nkv, dh), ("embed", "kv_heads", "head_dim"), use_bias=True, name="k_proj" + suffix, **kw)(h)
            v = dense((nkv, dh), ("embed", "kv_heads", "head_dim"), use_bias=True, name="v_proj" + suffix, **kw)(h)
            if qk_norm[suffix]:
                q = RMSNorm(cfg.rms_norm_eps, pdt, "head_dim", name="q_norm" + suffix)(q)
                k = RMSNorm(cfg.rms_norm_eps, pdt, "head_dim", name="k_norm" + suffix)(k)
            flat = lambda a, heads: a.reshape(*a.shape[:2], heads * dh)  # noqa: E731  (explicit: streams may be empty)
            return jnp.concatenate([flat(q, nh), flat(k, nkv), flat(v, nkv)], -1)

        qkv = _per_stream(cfg, project, x)
        n_und, n_gen = x.und.shape[1], x.gen.shape[1]

        def heads(flat, cos, sin):
            """(B, n, (nh + 2 nkv) dh) -> q (B, n, nh, dh), k / v (B, n, nkv, dh), post-rotary, constrained."""
            q, k, v = jnp.split(flat, [nh * dh, (nh + nkv) * dh], axis=-1)
            q = q.reshape(*q.shape[:2], nh, dh)
            k = k.reshape(*k.shape[:2], nkv, dh)
            v = v.reshape(*v.shape[:2], nkv, dh)
            q = nn.with_logical_constraint(apply_rotary(q, cos, sin), ("activation_batch", "activation_length", "activation_heads", None))
            k = nn.with_logical_constraint(apply_rotary(k, cos, sin), ("activation_batch", "activation_length", "activation_kv_heads", None))
            return q, k, v

        attn_kw = dict(impl=cfg.attention_impl, block_q=cfg.attention_block_size, block_k=cfg.attention_block_size,
                       dense_max_len=cfg.dense_attention_max_len, skip_empty_tiles=cfg.attention_skip_empty_tiles)
        if context_parallel_fits((n_und, n_gen)):
            # Context parallelism (mesh context > 1): each stream stays split over `context` as the residual is;
            # the attention core runs under shard_map with local queries and all-gathered K/V (context_parallel.py).
            # Per stream, so no concatenate-and-reshard of the whole sequence; the key order is the single-device one.
            (qu, ku, vu), (qg, kg, vg) = (heads(flat, cos[:, sl], sin[:, sl]) for flat, sl in (
                (qkv.und, slice(0, n_und)), (qkv.gen, slice(n_und, n_und + n_gen))))
            past = None
            if past_kv is not None:
                past = (past_kv[0], past_kv[1], past_tokens)
            pieces = [MaskTokens(*(a[:, :n_und] for a in tokens)), MaskTokens(*(a[:, n_und:] for a in tokens))]
            out = Streams(*context_parallel_attention((qu, qg), (ku, kg), (vu, vg), pieces, past=past, **attn_kw))
            k, v = jnp.concatenate([ku, kg], axis=1), jnp.concatenate([vu, vg], axis=1)  # for the cache (extend only)
        else:
            q, k, v = heads(jnp.concatenate([qkv.und, qkv.gen], axis=1), cos, sin)
            keys, values, key_tokens = k, v, tokens
            if past_kv is not None:
                keys = jnp.concatenate([past_kv[0].astype(k.dtype), k], axis=1)
                values = jnp.concatenate([past_kv[1].astype(v.dtype), v], axis=1)
                key_tokens = MaskTokens(*(jnp.concatenate([a, b], axis=1) for a, b in zip(past_tokens, tokens)))
            # Without a context axis (or with stream lengths it does not divide, e.g. one decoded token): plain
            # attention; activation_kv_length is replicated, so under a context mesh GSPMD all-gathers K/V (exact, but
            # GSPMD does not keep the blockwise kernel's query blocks split: no memory saving on that fallback).
            kv_axes = ("activation_batch", "activation_kv_length", "activation_kv_heads", None)
            keys = nn.with_logical_constraint(keys, kv_axes)
            values = nn.with_logical_constraint(values, kv_axes)
            key_tokens = MaskTokens(*(nn.with_logical_constraint(a, ("activation_batch", "activation_kv_length"))
                                      for a in key_tokens))
            out = attention(q, keys, values, tokens, key_tokens, **attn_kw)
            out = Streams(out[:, :n_und], out[:, n_und:])

        def o_proj(suffix, h):
            return dense(cfg.hidden_size, ("q_heads", "head_dim", "embed"), use_bias=False, axis=(-2, -1),
                         name="o_proj" + suffix, **kw)(h)

        return _per_stream(cfg, o_proj, out), (k, v)


class DecoderLayer(nn.Module):
    """One MoT layer (10-backbone §2.4): pre-norm attention and SwiGLU MLP, each with per-stream weights.

    Returns (x, kv) so the layer is its own `nn.scan` body: kv is this chunk's post-rotary (k, v) when a
    cache is given (`past_kv`), else None. The layer output is sown into `intermediates/output` for
    parity runs (a no-op unless that collection is mutable).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Streams, cos, sin, tokens: MaskTokens, past_kv=None, past_tokens=None):
        cfg = self.cfg
        pdt = _dtype(cfg.param_dtype)

        def norm(name):
            return lambda suffix, h: RMSNorm(cfg.rms_norm_eps, pdt, "norm", name=name + suffix)(h)

        h = _per_stream(cfg, norm("input_layernorm"), x)
        a, kv = Attention(cfg, name="self_attn")(h, cos, sin, tokens, past_kv, past_tokens)
        x = Streams(x.und + a.und, x.gen + a.gen)
        h = _per_stream(cfg, norm("post_attention_layernorm"), x)

        def mlp(suffix, hh):
            return MLP(cfg.intermediate_size, _dtype(cfg.dtype), pdt, name="mlp" + suffix)(hh)

        m = _per_stream(cfg, mlp, h)
        x = Streams(x.und + m.und, x.gen + m.gen)
        x = Streams(*(nn.with_logical_constraint(s, ("activation_batch", "activation_length", "activation_embed")) for s in x))
        self.sow("intermediates", "output", x)
        return x, (kv if past_kv is not None else None)


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LanguageModel(nn.Module):
    """The Qwen2 language model of Lance: embed_tokens, the scanned MoT layers, two final norms, lm_head.

    `__call__`: embedded Streams (B, Cu, H) / (B, Cg, H), cos/sin (B, Cu+Cg, Dh), MaskTokens of (B, Cu+Cg)
    -> final-normed Streams (und rows: `norm`, gen rows: `norm_moe_gen`).
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        pdt = _dtype(cfg.param_dtype)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=_dtype(cfg.dtype), param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        body = DecoderLayer
        if cfg.remat_policy != "none":
            body = nn.remat(body, policy=_REMAT[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                body,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg)
        else:
            self.layers = [body(cfg) for _ in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, pdt, "norm")
        if cfg.dual_stream:
            self.norm_moe_gen = RMSNorm(cfg.rms_norm_eps, pdt, "norm")
        self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=_dtype(cfg.dtype), param_dtype=pdt)

    def embed(self, ids):
        """(B, N) int -> (B, N, H)."""
        return self.embed_tokens(ids)

    def logits(self, h):
        """(B, K, H) -> (B, K, V) float32."""
        return self.lm_head(h).astype(jnp.float32)

    def __call__(self, x: Streams, cos, sin, tokens: MaskTokens) -> Streams:
        x, _ = self._layers(x, cos, sin, tokens, None, None)
        return self._final_norm(x)

    def extend(self, x: Streams, cos, sin, tokens: MaskTokens, cache: KVCache, commit: bool):
        """A chunk attending to the cache and to itself (mask predicate over both).

        Returns (final-normed Streams, cache with the chunk's rows appended if `commit`, else unchanged).
        """
        x, (k, v) = self._layers(x, cos, sin, tokens, (cache.k, cache.v), cache.tokens)
        return self._final_norm(x), (cache.append(k, v, tokens) if commit else cache)

    def _layers(self, x, cos, sin, tokens, past_kv, past_tokens):
        if self.cfg.scan_layers:
            return self.layers(x, cos, sin, tokens, past_kv, past_tokens)
        kvs = []
        for i, layer in enumerate(self.layers):
            layer_kv = None if past_kv is None else (past_kv[0][i], past_kv[1][i])
            x, kv = layer(x, cos, sin, tokens, layer_kv, past_tokens)
            kvs.append(kv)
        return x, (None if past_kv is None else jax.tree.map(lambda *a: jnp.stack(a), *kvs))

    def _final_norm(self, x: Streams) -> Streams:
        if self.cfg.dual_stream:
            return Streams(self.norm(x.und), self.norm_moe_gen(x.gen))
        return _per_stream(self.cfg, lambda _, h: self.norm(h), x)
