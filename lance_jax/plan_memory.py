"""Ahead-of-time memory / FLOP plans: compile a step for a mesh from abstract shapes only (nothing allocated).

    python -m lance_jax.plan_memory --model configs/models/lance_3b_video.py --mesh configs/mesh/h100x8.py \
        --task train [--tokens-per-device 65536] [--step-time 10]
    python -m lance_jax.plan_memory --model configs/models/lance_3b_video.py --mesh configs/mesh/h100x8.py:infer \
        --task t2v [--frames 121 --height 480 --width 832 --text-len 512]

Every input is a `jax.ShapeDtypeStruct` carrying its `NamedSharding`; `jit(...).lower(...).compile()`
partitions the program for the mesh and XLA reports per-device memory (`memory_analysis()`) and
FLOPs (`cost_analysis()`). When fewer devices are visible than the mesh needs, the plan is compiled on
fake CPU devices (the command re-executes itself with XLA_FLAGS=--xla_force_host_platform_device_count).

Caveats printed with every plan:
  * XLA:CPU memory numbers are not GPU/TPU numbers: the CPU compiler schedules, fuses and rematerialises
    differently (no GPU latency-hiding scheduler, different fusion and buffer assignment); take them as
    an estimate of the order (args + outputs + temps), not a guarantee. Re-run on the target platform
    for the real figure.
  * XLA's cost analysis counts a `while` body (the scanned layers, the blockwise-attention loops) once
    on some backends; the analytic model FLOPs below are the ones to use for MFU.

tasks:
  train  Lance train step (forward + backward with the model's remat policy + AdamW + EMA), rows =
         data x fsdp, each row tokens_per_device x context tokens (half und, half gen capacity).
  t2v    one Euler denoise step (`sampling.denoise_step`): the noise split (vision start/end + latents of
         frames x height x width) against a prefilled text context, both CFG branches batched.
  t2i    the same for one image (frames = 1).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

CPU_NOTE = ("XLA:CPU memory analysis (fake CPU devices): buffer assignment and fusion differ from GPU/TPU; "
            "treat as an estimate, re-run on the target platform")


@dataclasses.dataclass
class Plan:
    task: str
    model: str
    mesh: str
    mesh_shape: dict
    num_devices: int
    platform: str
    num_layers: int
    shapes: dict
    params: int
    argument_gb: float
    output_gb: float
    alias_gb: float
    temp_gb: float
    peak_gb: float
    xla_flops_per_device: float
    model_flops_per_step: float
    hardware_flops_per_step: float
    compile_s: float
    extrapolated_from: list | None = None
    device_memory_gb: float = 80.0
    peak_tflops: float = 989.0

    @property
    def fits(self) -> bool:
        return self.peak_gb <= self.device_memory_gb

    def mfu(self, step_time_s: float) -> float:
        return self.model_flops_per_step / (step_time_s * self.num_devices * self.peak_tflops * 1e12)


# ----------------------------------------------------------------------------------------------
# Analytic FLOPs
# ----------------------------------------------------------------------------------------------


def layer_matmul_params(cfg) -> int:
    """Weights one token multiplies with in one layer (one stream: und OR gen)."""
    h, nh, nkv, dh, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    return h * (nh + 2 * nkv) * dh + nh * dh * h + 3 * h * f


def forward_flops(cfg, rows: int, n_query: int, n_key: int, n_logit_rows: int = 0, n_layers: int | None = None) -> float:
    """Model FLOPs of one forward: 2 x weights x tokens + 4 x Nq x Nk x heads x Dh (QK^T, PV; dense tiles,
    the blockwise kernel does not skip masked tiles) + lm_head on the CE rows."""
    nl = cfg.num_layers if n_layers is None else n_layers
    mm = 2 * layer_matmul_params(cfg) * n_query * nl
    attn = 4 * n_query * n_key * cfg.num_heads * cfg.head_dim * nl
    head = 2 * cfg.hidden_size * cfg.vocab_size * n_logit_rows
    return float(rows * (mm + attn + head))


# ----------------------------------------------------------------------------------------------
# Abstract inputs
# ----------------------------------------------------------------------------------------------


def _sds(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _batch_abstract(cfg, mesh, rows, caps):
    import numpy as np
    from lance_jax import packing, sharding as S

    proto = packing.dummy_stream_batch(cfg, 1, caps)  # tiny numpy proto: only shapes and dtypes are used
    out = {}
    for k, v in proto.items():
        shape = (rows,) + v.shape[1:]
        out[k] = _sds(shape, np.dtype(v.dtype), S.batch_sharding(mesh, len(shape), rows))
    return out


def compile_train(cfg, mesh, tokens_per_device: int, *, ema: bool = True, ce_capacity: int = 4096,
                  vit_capacity: int = 16384):
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    import ml_collections
    from lance_jax import packing, sharding as S
    from lance_jax.models.lance import Lance
    from lance_jax.train import freeze, optimizer, state as st, step as stp

    s = mesh.shape
    rows = s["data"] * s["fsdp"]
    n = tokens_per_device * s["context"]
    caps = packing.Capacities(n // 2, n - n // 2, ce_capacity, vit_capacity)
    S.validate_mesh(mesh, cfg, batch=rows, seq_lens={"und capacity": caps.und, "gen capacity": caps.gen})
    boxed, p_sh = S.param_plan(cfg, mesh)
    params_abs = nn.unbox(boxed)
    mask = freeze.trainable_mask(params_abs, ml_collections.ConfigDict(dict(vit=True, vae=True, embed_and_head=True,
                                                                          und=False, patterns=[])))
    opt_cfg = ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=500, b1=0.9, b2=0.95, eps=1e-15, clip_norm=1.0))
    tx, schedule = optimizer.make_optimizer(opt_cfg, mask)

    def build(params):
        return st.TrainState(step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), ema_params=params if ema else None,
                             rng=jax.random.PRNGKey(0))

    abstract_state = jax.eval_shape(build, params_abs)
    shardings = st.state_shardings(abstract_state, boxed, tx, mesh)
    state_abs = jax.tree.map(lambda a, sh: _sds(a.shape, a.dtype, sh), abstract_state, shardings)
    batch_abs = _batch_abstract(cfg, mesh, rows, caps)
    batch_abs["noise"] = _sds(batch_abs["latents"].shape, jnp.float32, batch_abs["latents"].sharding)
    step = stp.train_step_fn(Lance(cfg), tx, schedule, mask, ema_decay=0.9999 if ema else None)
    rng_abs = _sds((2,), jnp.uint32, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    t0 = time.perf_counter()
    with S.use_mesh(mesh):
        fn = stp.jit_train_step(step, mesh, shardings, batch_abs)
        compiled = fn.lower(state_abs, batch_abs, rng_abs).compile()
    dt = time.perf_counter() - t0
    fwd = forward_flops(cfg, rows, n, n, ce_capacity)
    shapes = dict(rows=rows, tokens_per_row=n, tokens_per_device=rows * n // (rows * s["context"]),
                  und_capacity=caps.und, gen_capacity=caps.gen, ce_capacity=ce_capacity, vit_capacity=vit_capacity,
                  ema=ema, remat=cfg.remat_policy, dtype=cfg.dtype)
    # model FLOPs: forward + backward (2x); hardware adds the remat re-forward (full remat) -> 4x
    remat_extra = 1.0 if cfg.remat_policy != "none" else 0.0
    return compiled, dt, shapes, 3 * fwd, (3 + remat_extra) * fwd


def compile_denoise(cfg, mesh, *, frames: int, height: int, width: int, text_len: int, guided: bool = True):
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as PS
    from lance_jax import packing, sharding as S
    from lance_jax.models.lance import Lance
    from lance_jax.sampling import CFGConfig, denoise_step

    down, tdown = 16, 4  # Wan2.2 VAE (48 channels): 16x spatial, 4x temporal; latent patch (1, 1, 1)
    t_lat = (frames - 1) // tdown + 1
    n_lat = t_lat * (height // down) * (width // down)
    rows = 2 if guided else 1
    ctx_multiple = mesh.shape["context"] * 8
    cg = packing.round_up(n_lat, ctx_multiple)
    cu = ctx_multiple  # vision start / end tokens, padded to the context multiple
    L = packing.round_up(text_len, 8)
    S.validate_mesh(mesh, cfg, seq_lens={"query und capacity": cu, "query gen capacity": cg})
    boxed, p_sh = S.param_plan(cfg, mesh)
    params_abs = S.sharded_abstract(boxed, p_sh)
    queries = _batch_abstract(cfg, mesh, rows, packing.Capacities(cu, cg, 8, 8))
    for k in ("ce_rows", "ce_labels", "ce_valid", "vit_embeds"):
        queries.pop(k)
    queries["gen_index"] = _sds((rows, cg), np.int32, S.batch_sharding(mesh, 2, rows))
    bs = lambda nd, lead=1: NamedSharding(mesh, PS(*([None] * lead), *S.batch_sharding(mesh, 1, rows).spec,  # noqa: E731
                                                    *([None] * (nd - lead - 1))))
    from lance_jax.layers.masking import MaskTokens
    from lance_jax.models.backbone import KVCache
    kv_shape = (cfg.num_layers, rows, L, cfg.num_kv_heads, cfg.head_dim)
    caches = KVCache(_sds(kv_shape, jnp.dtype(cfg.dtype), bs(5)), _sds(kv_shape, jnp.dtype(cfg.dtype), bs(5)),
                     MaskTokens(*(_sds((rows, L), np.int32, bs(2, 0)) for _ in range(4))),
                     _sds((), np.int32, NamedSharding(mesh, PS())))
    rep = NamedSharding(mesh, PS())
    x = _sds((cg, cfg.patch_latent_dim), np.float32, rep)
    scalar = _sds((), np.float32, rep)
    noisy = _sds((cg,), np.bool_, rep)
    t0 = time.perf_counter()
    with S.use_mesh(mesh):
        compiled = denoise_step.lower(Lance(cfg), params_abs, queries, caches, x, scalar, scalar, noisy,
                                      cfg=CFGConfig(), guided=guided).compile()
    dt = time.perf_counter() - t0
    fwd = forward_flops(cfg, rows, cu + cg, L + cu + cg)
    shapes = dict(rows=rows, latent_grid=[t_lat, height // down, width // down], latent_tokens=n_lat,
                  query_und=cu, query_gen=cg, context_len=L, dtype=cfg.dtype)
    return compiled, dt, shapes, fwd, fwd


def _analyses(compiled):
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    gb = 1024 ** 3
    arg, out, alias, temp = (getattr(mem, f"{k}_size_in_bytes", 0) / gb for k in ("argument", "output", "alias", "temp"))
    return dict(argument_gb=arg, output_gb=out, alias_gb=alias, temp_gb=temp, peak_gb=arg + out - alias + temp,
                xla_flops_per_device=float((cost or {}).get("flops", float("nan"))))


def mesh_config(args):
    """The preset named by `--mesh`, its axis sizes replaced by `--mesh-shape` (e.g. 'fsdp=2,context=4') when given.

    The override keeps the preset's device count, memory and peak FLOPs; unnamed axes are 1, one axis may be -1.
    """
    from lance_jax import sharding as S

    mesh_cfg = S.load_mesh_config(args.mesh)
    spec = getattr(args, "mesh_shape", "")
    if spec:
        shape = {}
        for part in spec.split(","):
            name, _, size = part.partition("=")
            shape[name.strip()] = int(size)
        mesh_cfg.shape = S.resolve_mesh_shape(shape, mesh_cfg.num_devices)
        mesh_cfg.name = f"{mesh_cfg.name}[{spec}]"
    return mesh_cfg


def make_plan(args, num_layers: int | None = None) -> Plan:
    import jax
    from lance_jax import sharding as S
    from lance_jax.config import config_dict_from_file, model_config_from_dict
    from lance_jax.models.lance import count_params

    mcfg = config_dict_from_file(args.model).model
    if num_layers:
        mcfg.num_layers = num_layers
    if args.attention_block:
        mcfg.attention_block_size = args.attention_block
    cfg = model_config_from_dict(mcfg)
    if args.task == "t2i" and cfg.max_num_frames > 1:
        cfg = cfg.replace(max_num_frames=cfg.max_num_frames)
    mesh_cfg = mesh_config(args)
    mesh = S.mesh_from_config(mesh_cfg, jax.devices()[: mesh_cfg.num_devices])
    if args.task == "train":
        compiled, dt, shapes, mf, hf = compile_train(cfg, mesh, args.tokens_per_device, ema=not args.no_ema)
    else:
        frames = 1 if args.task == "t2i" else args.frames
        h = args.height or (1024 if args.task == "t2i" else 480)
        w = args.width or (1024 if args.task == "t2i" else 832)
        compiled, dt, shapes, mf, hf = compile_denoise(cfg, mesh, frames=frames, height=h, width=w,
                                                       text_len=args.text_len, guided=not args.no_cfg)
    a = _analyses(compiled)
    return Plan(task=args.task, model=os.path.basename(args.model), mesh=mesh_cfg.name, mesh_shape=dict(mesh.shape),
                num_devices=mesh.size, platform=jax.devices()[0].platform, num_layers=cfg.num_layers, shapes=shapes,
                params=count_params(cfg), compile_s=dt, model_flops_per_step=mf, hardware_flops_per_step=hf,
                device_memory_gb=mesh_cfg.get("device_memory_gb", 80.0) or 80.0,
                peak_tflops=mesh_cfg.get("peak_tflops_bf16", 989.0) or 989.0, **a)


def extrapolate(p1: Plan, p2: Plan, layers: int, params: int, mf: float, hf: float) -> Plan:
    """Linear per-layer extrapolation of the memory figures from two layer counts."""
    def lin(a, b):
        return a + (b - a) * (layers - p1.num_layers) / (p2.num_layers - p1.num_layers)

    out = dataclasses.replace(p2, num_layers=layers, params=params, model_flops_per_step=mf, hardware_flops_per_step=hf,
                              extrapolated_from=[p1.num_layers, p2.num_layers], compile_s=p1.compile_s + p2.compile_s)
    for k in ("argument_gb", "output_gb", "alias_gb", "temp_gb", "peak_gb", "xla_flops_per_device"):
        setattr(out, k, lin(getattr(p1, k), getattr(p2, k)))
    return out


def format_plan(p: Plan, step_time: float | None) -> str:
    lines = [
        f"AOT plan: task={p.task} model={p.model} layers={p.num_layers} params={p.params / 1e9:.2f}B "
        f"mesh={p.mesh} {p.mesh_shape} ({p.num_devices} devices, compiled on {p.platform})",
        f"  shapes: {json.dumps(p.shapes)}",
        f"  per-device memory: arguments {p.argument_gb:.2f} GB + outputs {p.output_gb:.2f} GB - aliased "
        f"{p.alias_gb:.2f} GB + temporaries {p.temp_gb:.2f} GB = {p.peak_gb:.2f} GB "
        f"-> {'fits' if p.fits else 'does NOT fit'} {p.device_memory_gb:.0f} GB",
        f"  FLOPs per step (analytic): model {p.model_flops_per_step:.3e} "
        f"({'fwd+bwd' if p.task == 'train' else 'forward'}), hardware {p.hardware_flops_per_step:.3e}"
        f"{' (incl. remat)' if p.task == 'train' else ''}; "
        f"XLA cost_analysis per device: {p.xla_flops_per_device:.3e} (loop bodies may be counted once)",
        f"  MFU(t) = {p.model_flops_per_step:.3e} / (t x {p.num_devices} x {p.peak_tflops:.0f}e12)"
        + (f" = {100 * p.mfu(step_time):.1f}% at t = {step_time} s" if step_time else ""),
        f"  compile {p.compile_s:.0f} s",
    ]
    if p.extrapolated_from:
        lines.append(f"  NOTE: memory extrapolated linearly per layer from compiles at {p.extrapolated_from} layers")
    if p.platform == "cpu":
        lines.append(f"  NOTE: {CPU_NOTE}")
    return "\n".join(lines)


def results_row(p: Plan, step_time: float | None) -> str:
    extra = f"extrapolated from {p.extrapolated_from[0]},{p.extrapolated_from[1]} layers" if p.extrapolated_from else "full compile"
    mfu = f"{100 * p.mfu(step_time):.1f}% @ {step_time}s" if step_time else "-"
    return (f"| {p.task} | {p.model} L={p.num_layers} | {p.mesh} {p.mesh_shape} | {json.dumps(p.shapes)} | "
            f"{p.peak_gb:.1f} (args {p.argument_gb:.1f}, temp {p.temp_gb:.1f}) | "
            f"{'yes' if p.fits else 'NO'} | {p.model_flops_per_step:.2e} | {mfu} | {p.platform}, {extra} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--mesh", required=True, help="configs/mesh/NAME.py[:variant] or NAME[:variant]")
    ap.add_argument("--mesh-shape", default="", help="override the preset's axis sizes, e.g. 'fsdp=2,context=4' "
                    "(same device count)")
    ap.add_argument("--task", choices=("train", "t2v", "t2i"), required=True)
    ap.add_argument("--tokens-per-device", type=int, default=65536)
    ap.add_argument("--frames", type=int, default=121)
    ap.add_argument("--height", type=int, default=0)
    ap.add_argument("--width", type=int, default=0)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--no-cfg", action="store_true")
    ap.add_argument("--no-ema", action="store_true")
    ap.add_argument("--attention-block", type=int, default=0)
    ap.add_argument("--num-layers", type=int, default=0, help="override the model's layer count")
    ap.add_argument("--extrapolate", default="", help="'A,B': compile at A and B layers, extrapolate to the model's")
    ap.add_argument("--step-time", type=float, default=None, help="seconds per step for the MFU figure")
    ap.add_argument("--json", default="", help="write the plan as JSON here")
    ap.add_argument("--results", default="", help="append a markdown row to this file")
    args = ap.parse_args(argv)

    # Enough (fake CPU) devices for the mesh: re-exec before jax initialises its backends.
    from lance_jax import sharding as S  # imports jax but does not initialise a backend

    need = S.load_mesh_config(args.mesh).num_devices
    flag = f"--xla_force_host_platform_device_count={need}"
    if os.environ.get("LANCE_PLAN_CHILD") != "1":
        import jax
        if len(jax.devices()) < need:
            env = dict(os.environ, LANCE_PLAN_CHILD="1", JAX_PLATFORMS="cpu",
                       XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flag).strip())
            return subprocess.call([sys.executable, "-m", "lance_jax.plan_memory", *(argv or sys.argv[1:])], env=env)

    if args.extrapolate:
        from lance_jax.config import config_dict_from_file, model_config_from_dict
        from lance_jax.models.lance import count_params

        a, b = (int(x) for x in args.extrapolate.split(","))
        p1, p2 = make_plan(args, a), make_plan(args, b)
        full = model_config_from_dict(config_dict_from_file(args.model).model)
        per_layer = [(p2.model_flops_per_step - p1.model_flops_per_step) / (b - a),
                     (p2.hardware_flops_per_step - p1.hardware_flops_per_step) / (b - a)]
        plan = extrapolate(p1, p2, full.num_layers, count_params(full),
                           p2.model_flops_per_step + per_layer[0] * (full.num_layers - b),
                           p2.hardware_flops_per_step + per_layer[1] * (full.num_layers - b))
    else:
        plan = make_plan(args, args.num_layers or None)
    print(format_plan(plan, args.step_time), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(plan) | {"fits": plan.fits}, f, indent=1)
    if args.results:
        with open(args.results, "a") as f:
            f.write(results_row(plan, args.step_time) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
