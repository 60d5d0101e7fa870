"""Key table of the Wan 2.2 VAE (`Wan2.2_VAE.pth`, 40-vae-and-vit §A.10-A.11).

Param paths mirror the reference keys (`name.<i>` -> `name_<i>`, `weight` -> `kernel`); conv kernels
become channel-last (kt, kh, kw, I, O), 1x1 convs (I, O), gammas (C,).
"""
from __future__ import annotations

from lance_jax.convert.keys import KeyRule


_RULE_KINDS = {
    "conv3d": dict(perm=(2, 3, 4, 1, 0)),  # (O, I, kt, kh, kw) -> (kt, kh, kw, I, O)
    "conv2d": dict(perm=(2, 3, 1, 0)),  # (O, I, kh, kw) -> (kh, kw, I, O)
    "dense3d": dict(transpose=True, trailing_ones=3),  # (O, I, 1, 1, 1) -> (I, O)
    "dense2d": dict(transpose=True, trailing_ones=2),  # (O, I, 1, 1) -> (I, O)
    "gamma3d": dict(trailing_ones=3),  # (C, 1, 1, 1) -> (C,)
    "gamma2d": dict(trailing_ones=2),  # (C, 1, 1) -> (C,)
    "bias": dict(),
}


def param_path(ref_key: str) -> tuple[str, ...]:
    """Reference key -> our param path: `name.<i>` becomes `name_<i>`, `weight` becomes `kernel`, e.g.
    encoder.downsamples.1.downsamples.2.time_conv.weight -> encoder/downsamples_1/downsamples_2/time_conv/kernel."""
    path: list[str] = []
    for tok in ref_key.split("."):
        if tok.isdigit():
            path[-1] = f"{path[-1]}_{tok}"
        else:
            path.append(tok)
    if path[-1] == "weight":
        path[-1] = "kernel"
    return tuple(path)


def _reference_layout(cfg) -> list[tuple[str, str]]:
    """(reference key, kind) for every tensor of `WanVAE_` built with `cfg`, in module order."""
    out: list[tuple[str, str]] = []

    def conv(prefix, kind="conv3d"):
        out.extend([(f"{prefix}.weight", kind), (f"{prefix}.bias", "bias")])

    def residual(prefix, cin, cout):
        out.append((f"{prefix}.residual.0.gamma", "gamma3d"))
        conv(f"{prefix}.residual.2")
        out.append((f"{prefix}.residual.3.gamma", "gamma3d"))
        conv(f"{prefix}.residual.6")
        if cin != cout:
            conv(f"{prefix}.shortcut", "dense3d")

    def middle(prefix, c):
        residual(f"{prefix}.middle.0", c, c)
        out.append((f"{prefix}.middle.1.norm.gamma", "gamma2d"))
        conv(f"{prefix}.middle.1.to_qkv", "dense2d")
        conv(f"{prefix}.middle.1.proj", "dense2d")
        residual(f"{prefix}.middle.2", c, c)

    def head(prefix):
        out.append((f"{prefix}.head.0.gamma", "gamma3d"))
        conv(f"{prefix}.head.2")

    n_stages, nres = len(cfg.dim_mult), cfg.num_res_blocks
    dims = cfg.encoder_dims
    conv("encoder.conv1")
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        stage = f"encoder.downsamples.{i}.downsamples"
        for j in range(nres):
            residual(f"{stage}.{j}", cin if j == 0 else cout, cout)
        if i != n_stages - 1:
            conv(f"{stage}.{nres}.resample.1", "conv2d")
            if i < len(cfg.temperal_downsample) and cfg.temperal_downsample[i]:
                conv(f"{stage}.{nres}.time_conv")
    middle("encoder", dims[-1])
    head("encoder")
    conv("conv1", "dense3d")
    conv("conv2", "dense3d")
    dims = cfg.decoder_dims
    conv("decoder.conv1")
    middle("decoder", dims[0])
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        stage = f"decoder.upsamples.{i}.upsamples"
        for j in range(nres + 1):
            residual(f"{stage}.{j}", cin if j == 0 else cout, cout)
        if i != n_stages - 1:
            if i < len(cfg.temperal_upsample) and cfg.temperal_upsample[i]:
                conv(f"{stage}.{nres + 1}.time_conv")
            conv(f"{stage}.{nres + 1}.resample.1", "conv2d")
    head("decoder")
    return out


def vae_key_table(cfg) -> list[KeyRule]:
    """One rule per tensor of the reference `Wan2.2_VAE.pth` (196 for the released structure)."""
    return [KeyRule(ref, param_path(ref), **_RULE_KINDS[kind]) for ref, kind in _reference_layout(cfg)]
