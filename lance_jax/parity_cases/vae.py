"""Parity case `vae`: the Wan 2.2 VAE (tiny widths) encode, sampling and decode, streamed as the reference.

Items are discovered from the npz keys (`<item>_x` inputs: `video`, `image`, ...); all sizes come from
the golden's own `vae/vae_config.json` and weights (`vae/*.safetensors`). Per item:
`encode(x)` -> `mu_raw`, `mu`, `logvar`; `sample_latent(mu, logvar, golden eps)` ->
`latent_sampled_thwc`; `decode(golden mu)` before / after clamp -> `recon_preclamp`, `recon`;
`decode(golden sampled latent)` -> `recon_of_sampled`. Decode is fed the golden latents so that
encode and decode are checked independently. Inputs (`*_x`, `*_eps`) are consumed, every other
array must be compared (an unknown array is a FAIL row).
"""
from __future__ import annotations

import os

import numpy as np

from lance_jax.parity import TOL_MODULE, CaseResult, Golden, Row, compare, time_jitted

CASE = "vae"

_INPUT_SUFFIXES = ("_x", "_eps")


def run(golden: Golden, benchmark: int) -> CaseResult:
    import jax
    import jax.numpy as jnp

    from lance_jax.models import vae as V

    vae_dir = os.path.join(golden.root, "vae")
    cfg = V.load_vae_config(os.path.join(vae_dir, "vae_config.json"))
    params = jax.tree.map(jnp.asarray, V.load_vae_params(vae_dir, cfg))
    z = golden.arrays(CASE)
    items = sorted((k[: -len("_x")] for k in z if k.endswith("_x")), key=lambda s: (s != "video", s))
    rows: list[Row] = []
    covered: set[str] = set()

    def row(name, ours):
        if name in z:
            rows.append(compare(CASE, name, np.asarray(ours), z[name], TOL_MODULE))
            covered.add(name)

    timings: dict[str, float] = {}
    for item in items:
        x = z[f"{item}_x"]
        covered.update(f"{item}{s}" for s in _INPUT_SUFFIXES if f"{item}{s}" in z)
        enc = V.encode(params, x, cfg)
        row(f"{item}_mu_raw", enc.mu_raw)
        row(f"{item}_mu", enc.mu)
        row(f"{item}_logvar", enc.logvar)
        if f"{item}_eps" in z:
            row(f"{item}_latent_sampled_thwc", V.sample_latent(enc.mu, enc.logvar, z[f"{item}_eps"]))
        # decode input: the golden normalised mean, (C, t, h, w) -> Lance's channel-last (t, h, w, C)
        mu_thwc = np.moveaxis(z[f"{item}_mu"] if f"{item}_mu" in z else np.asarray(enc.mu), 0, -1)
        if f"{item}_mu" in z:
            row(f"{item}_recon_preclamp", V.decode(params, mu_thwc, cfg, clamp=False))
            row(f"{item}_recon", V.decode(params, mu_thwc, cfg, clamp=True))
        if f"{item}_latent_sampled_thwc" in z:
            row(f"{item}_recon_of_sampled", V.decode(params, z[f"{item}_latent_sampled_thwc"], cfg, clamp=True))
        if benchmark:
            enc_fn = jax.jit(lambda p, v: V.encode(p, v, cfg))
            dec_fn = jax.jit(lambda p, lat: V.decode(p, lat, cfg))
            for name, fn, arg in (("encode", enc_fn, jnp.asarray(x)), ("decode", dec_fn, jnp.asarray(mu_thwc))):
                t = time_jitted(fn, params, arg, repeats=benchmark)
                timings[f"{name}_{item}"] = t["median_s"]
                timings[f"{name}_{item}_compile"] = t["compile_s"]
    if "latents_mean48" in z:
        row("latents_mean48", V.LATENT_MEAN)
    if "latents_inv_std48" in z:
        row("latents_inv_std48", V.LATENT_INV_STD)
    for name in sorted(set(z) - covered):
        rows.append(Row(CASE, name, np.inf, np.inf, TOL_MODULE, False, "golden array not compared by this runner"))
    if not items:
        rows.append(Row(CASE, "<items>", np.inf, np.inf, TOL_MODULE, False, "no '<item>_x' inputs in vae.npz"))
    return CaseResult(rows, timings)
