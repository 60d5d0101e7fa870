"""Dual-stream (MoT) vs single-stream decoder layer: forward+backward wall time at equal token count.

Design goal (../shared/spec/00-design.md §3): a dual-stream layer on a 50/50 und/gen token mix costs
no more than ~1.15x a single-stream layer of the same size.

Both layers are `lance_jax.models.backbone.DecoderLayer` at the same size; only `cfg.dual_stream`
differs. The dual layer gets the stream-sorted layout the host produces (Streams(und=(B,Cu,H),
gen=(B,Cg,H)), Cg = round(gen_fraction * N)); the single-stream baseline is a plain Qwen2 layer on
all N tokens (Streams(und=(B,N,H), gen=(B,0,H)), so its concat/split are no-ops). Both see the same
packed-sample causal/full mask ints and rotary tables. The timed function is

    loss = sum(out.und**2) + sum(out.gen**2);  (loss, d loss/d params, d loss/d inputs)

jitted and compiled ahead of time (compile time reported separately), warmed up, then timed
`--repeats` times with dual and single runs interleaved (so machine noise hits both alike).

    python benchmarks/dual_stream.py                       # default config, prints a report
    python benchmarks/dual_stream.py --out benchmarks/results.md   # ... and appends it there
    python benchmarks/dual_stream.py --breakdown           # also time the layer's sub-parts

Not a test: nothing here asserts on timings.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lance_jax.config import ModelConfig  # noqa: E402
from lance_jax.layers.attention import attention  # noqa: E402
from lance_jax.layers.masking import MaskTokens, mask_tokens_from_splits  # noqa: E402
from lance_jax.layers.linear import dense  # noqa: E402
from lance_jax.layers.mlp import MLP  # noqa: E402
from lance_jax.layers.norms import RMSNorm  # noqa: E402
from lance_jax.layers.rotary import apply_rotary, inv_frequencies, rotary_cos_sin  # noqa: E402
from lance_jax.models.backbone import DecoderLayer, Streams, _per_stream  # noqa: E402

GOAL = 1.15
INFO_FRACTIONS = (0.1, 0.9)


# ----------------------------------------------------------------------------------------------
# Config and inputs
# ----------------------------------------------------------------------------------------------


def mrope_for(head_dim: int) -> tuple[int, int, int]:
    """The released (16, 24, 24) split of 64 frequencies, scaled to head_dim/2."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return (t, h, half - t - h)


def layer_config(args, dual: bool) -> ModelConfig:
    head_dim = args.hidden // args.heads
    return ModelConfig(
        hidden_size=args.hidden,
        num_layers=1,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=1,
        vocab_size_eff=1,
        mrope_section=mrope_for(head_dim),
        dual_stream=dual,
        dtype=args.dtype,
        param_dtype="float32",
        attention_impl=args.attention,
        attention_block_size=args.block,
        scan_layers=False,
    )


def split_counts(n: int, gen_fraction: float) -> tuple[int, int]:
    n_gen = int(round(n * gen_fraction))
    return n - n_gen, n_gen


def packed_layout(n_tokens: int, gen_fraction: float, samples: int):
    """A realistic packed sequence in host (stream-sorted) layout.

    `samples` packed samples, each [text prompt: und, causal split][latents: gen, full split] in
    reference order, the und/gen shares set by gen_fraction. Returns (n_und, n_gen, MaskTokens of
    (1, N) in stream-sorted order, position_ids (1, 3, N)).
    """
    n_und, n_gen = split_counts(n_tokens, gen_fraction)
    und_per = np.diff(np.linspace(0, n_und, samples + 1).round().astype(int))
    gen_per = np.diff(np.linspace(0, n_gen, samples + 1).round().astype(int))
    split_lens, modes, is_gen, pos = [], [], [], []
    for u, g in zip(und_per, gen_per):
        split_lens += [u, g]
        modes += ["causal", "full"]
        is_gen += [np.zeros(u, bool), np.ones(g, bool)]
        # MaPE-like ids: text 0..u-1 on all three rows, latents a (1, h, w) grid starting after the text.
        text = np.broadcast_to(np.arange(u), (3, u))
        side = max(1, int(np.ceil(np.sqrt(max(g, 1)))))
        idx = np.arange(g)
        lat = np.stack([np.full(g, u), u + idx // side, u + idx % side])
        pos += [text, lat]
    ints = mask_tokens_from_splits([u + g for u, g in zip(und_per, gen_per)], split_lens, modes)
    is_gen = np.concatenate(is_gen)
    pos = np.concatenate(pos, axis=1).astype(np.int32)
    perm = np.concatenate([np.flatnonzero(~is_gen), np.flatnonzero(is_gen)])  # und first, then gen
    tokens = MaskTokens(*(jnp.asarray(ints[k][perm][None]) for k in ("order", "sample", "split", "mode")))
    return n_und, n_gen, tokens, jnp.asarray(pos[:, perm][None])


def make_inputs(cfg: ModelConfig, n_und: int, n_gen: int, tokens, pos, seed: int):
    dt = jnp.dtype(cfg.dtype)
    ku, kg = jax.random.split(jax.random.PRNGKey(seed + 1))
    x = Streams(
        jax.random.normal(ku, (1, n_und, cfg.hidden_size), jnp.float32).astype(dt),
        jax.random.normal(kg, (1, n_gen, cfg.hidden_size), jnp.float32).astype(dt),
    )
    inv = inv_frequencies(cfg.head_dim, cfg.rope_theta)
    cos, sin = rotary_cos_sin(pos, inv, cfg.mrope_section, dt)
    return x, cos, sin, tokens


# ----------------------------------------------------------------------------------------------
# Timing machinery
# ----------------------------------------------------------------------------------------------


def sq_loss(out) -> jax.Array:
    return sum(jnp.sum(jnp.square(a.astype(jnp.float32))) for a in jax.tree.leaves(out))


class Case:
    """A flax module + its inputs, compiled as jit(value_and_grad(loss) wrt (params, x))."""

    def __init__(self, name: str, module: nn.Module, x, *rest, seed: int = 0):
        self.name = name
        params = module.init(jax.random.PRNGKey(seed), x, *rest).get("params", {})
        self.params = nn.unbox(params)
        self.args = (self.params, x, rest)

        def step(p, xx, rr):
            def loss(p_, x_):
                return sq_loss(module.apply({"params": p_}, x_, *rr))

            return jax.value_and_grad(loss, argnums=(0, 1))(p, xx)

        t0 = time.perf_counter()
        lowered = jax.jit(step).lower(*self.args)
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU seconds (all threads) per call
        try:
            ca = self.compiled.cost_analysis()
            ca = ca[0] if isinstance(ca, (list, tuple)) else ca
            self.flops = float(ca.get("flops", float("nan")))
            self.bytes = float(ca.get("bytes accessed", float("nan")))
        except Exception:  # cost analysis is best-effort and backend dependent
            self.flops = self.bytes = float("nan")

    def run_once(self) -> float:
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(self.compiled(*self.args))
        dt = time.perf_counter() - t0
        self.times.append(dt)
        self.cpu_times.append(time.process_time() - c0)
        return dt

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)


def time_interleaved(cases: list[Case], warmup: int, repeats: int) -> None:
    for c in cases:
        for _ in range(warmup):
            jax.block_until_ready(c.compiled(*c.args))
    for i in range(repeats):
        # rotate the order each round so no case always runs first
        for c in cases[i % len(cases):] + cases[: i % len(cases)]:
            c.run_once()


# ----------------------------------------------------------------------------------------------
# Sub-part modules (--breakdown): the layer cut at its natural seams, same code paths as backbone.py
# ----------------------------------------------------------------------------------------------


class NormPart(nn.Module):
    """input_layernorm per stream."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Streams, cos, sin, tokens):
        cfg = self.cfg
        return _per_stream(cfg, lambda s, h: RMSNorm(cfg.rms_norm_eps, jnp.float32, "norm", name="ln" + s)(h), x)


class QKVPart(nn.Module):
    """q/k/v projections + q/k norm per stream, then the joint concat (what feeds rotary+attention)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Streams, cos, sin, tokens):
        cfg = self.cfg
        nh, nkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32)

        def project(suffix, h):
            q = dense((nh, dh), ("embed", "q_heads", "head_dim"), use_bias=True, name="q_proj" + suffix, **kw)(h)
            k = dense((nkv, dh), ("embed", "kv_heads", "head_dim"), use_bias=True, name="k_proj" + suffix, **kw)(h)
            v = dense((nkv, dh), ("embed", "kv_heads", "head_dim"), use_bias=True, name="v_proj" + suffix, **kw)(h)
            q = RMSNorm(cfg.rms_norm_eps, jnp.float32, "head_dim", name="q_norm" + suffix)(q)
            k = RMSNorm(cfg.rms_norm_eps, jnp.float32, "head_dim", name="k_norm" + suffix)(k)
            return jnp.concatenate([a.reshape(*a.shape[:2], -1) for a in (q, k, v)], -1)

        qkv = _per_stream(cfg, project, x)
        return jnp.concatenate([qkv.und, qkv.gen], axis=1)


class AttnCorePart(nn.Module):
    """rotary + joint masked attention on (B, N, nh+2nkv, dh) — identical for both layers."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, qkv, cos, sin, tokens):
        cfg = self.cfg
        nh, nkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = jnp.split(qkv, [nh * dh, (nh + nkv) * dh], axis=-1)
        q = apply_rotary(q.reshape(*q.shape[:2], nh, dh), cos, sin)
        k = apply_rotary(k.reshape(*k.shape[:2], nkv, dh), cos, sin)
        v = v.reshape(*v.shape[:2], nkv, dh)
        return attention(q, k, v, tokens, tokens, impl=cfg.attention_impl, block_q=cfg.attention_block_size,
                         block_k=cfg.attention_block_size, dense_max_len=cfg.dense_attention_max_len)


class OProjPart(nn.Module):
    """split of the attention output by stream + o_proj per stream. Input: (B, N, nh, dh) and n_und."""

    cfg: ModelConfig
    n_und: int

    @nn.compact
    def __call__(self, out, cos, sin, tokens):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32)
        s = Streams(out[:, : self.n_und], out[:, self.n_und:])
        return _per_stream(cfg, lambda sfx, h: dense(cfg.hidden_size, ("q_heads", "head_dim", "embed"), use_bias=False,
                                                     axis=(-2, -1), name="o_proj" + sfx, **kw)(h), s)


class MLPPart(nn.Module):
    """post_attention_layernorm + SwiGLU MLP per stream."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Streams, cos, sin, tokens):
        cfg = self.cfg

        def f(sfx, h):
            h = RMSNorm(cfg.rms_norm_eps, jnp.float32, "norm", name="ln" + sfx)(h)
            return MLP(cfg.intermediate_size, jnp.dtype(cfg.dtype), jnp.float32, name="mlp" + sfx)(h)

        return _per_stream(cfg, f, x)


def breakdown(args, n_und: int, n_gen: int, tokens, pos) -> list[dict]:
    """Time each sub-part fwd+bwd for dual (stream-sorted mix) vs single (all tokens, one slice)."""
    rows = []
    cfg_d, cfg_s = layer_config(args, True), layer_config(args, False)
    n = n_und + n_gen
    dt = jnp.dtype(args.dtype)
    x_d, cos, sin, _ = make_inputs(cfg_d, n_und, n_gen, tokens, pos, args.seed)
    x_s = Streams(jnp.concatenate([x_d.und, x_d.gen], 1), x_d.gen[:, :0])
    nh, nkv, dh = cfg_d.num_heads, cfg_d.num_kv_heads, cfg_d.head_dim
    key = jax.random.PRNGKey(args.seed + 7)
    qkv = jax.random.normal(key, (1, n, (nh + 2 * nkv) * dh), jnp.float32).astype(dt)
    attn_out = jax.random.normal(key, (1, n, nh, dh), jnp.float32).astype(dt)
    parts = [
        ("input norm", lambda c: NormPart(c), lambda dual: x_d if dual else x_s),
        ("q/k/v proj + qk-norm + concat", lambda c: QKVPart(c), lambda dual: x_d if dual else x_s),
        ("rotary + attention (shared)", lambda c: AttnCorePart(c), lambda dual: qkv),
        ("split + o_proj", None, lambda dual: attn_out),
        ("post norm + MLP", lambda c: MLPPart(c), lambda dual: x_d if dual else x_s),
    ]
    for name, make, inp in parts:
        cases = []
        for dual, cfg in ((True, cfg_d), (False, cfg_s)):
            mod = OProjPart(cfg, n_und if dual else n) if make is None else make(cfg)
            cases.append(Case(f"{name} [{'dual' if dual else 'single'}]", mod, inp(dual), cos, sin, tokens, seed=args.seed))
        time_interleaved(cases, args.warmup, args.repeats)
        d, s = cases
        rows.append(dict(part=name, dual_med=d.median, single_med=s.median, dual_min=d.min, single_min=s.min,
                         dual_flops=d.flops, single_flops=s.flops))
        print(f"  {name:32s} dual {d.median * 1e3:8.2f} ms  single {s.median * 1e3:8.2f} ms  "
              f"ratio {d.median / s.median:5.2f}  (+{(d.median - s.median) * 1e3:6.2f} ms)", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        arch = subprocess.run(["uname", "-m"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        arch = platform.machine()
    dev = jax.devices()[0]
    return dict(arch=arch, cpu=cpu, cores=os.cpu_count(), affinity=len(os.sched_getaffinity(0)),
                jax=jax.__version__, backend=jax.default_backend(), device=getattr(dev, "device_kind", str(dev)))


def ms(t: float) -> str:
    return f"{t * 1e3:.2f}" if t < 0.1 else f"{t * 1e3:.1f}"


def gflop(f: float) -> str:
    return "n/a" if f != f else f"{f / 1e9:.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--tokens", type=int, default=2048, help="total tokens N = und + gen (batch 1)")
    p.add_argument("--gen-fraction", type=float, default=0.5)
    p.add_argument("--samples", type=int, default=2, help="packed samples in the sequence")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attention", default="dense", choices=("dense", "blockwise"))
    p.add_argument("--block", type=int, default=512, help="blockwise attention block size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-info", action="store_true", help="skip the gen-fraction 0.1 / 0.9 informational runs")
    p.add_argument("--breakdown", action="store_true", help="also time the layer's sub-parts (dual vs single)")
    p.add_argument("--verbose", action="store_true", help="print every repeat's time (to judge machine noise)")
    p.add_argument("--out", default=None, help="append a dated markdown entry to this file")
    args = p.parse_args(argv)

    info = machine_info()
    load_before = os.getloadavg()
    print(f"machine: {info}", flush=True)
    print(f"config: {vars(args)}", flush=True)
    cfg_d, cfg_s = layer_config(args, True), layer_config(args, False)

    # single-stream baseline: all N tokens in one slice (a plain Qwen2 layer; concat/split are no-ops)
    _, _, tokens, pos = packed_layout(args.tokens, args.gen_fraction, args.samples)
    xs, cos, sin, _ = make_inputs(cfg_s, args.tokens, 0, tokens, pos, args.seed)
    single = Case("single", DecoderLayer(cfg_s), xs, cos, sin, tokens, seed=args.seed)
    print(f"compiled single in {single.compile_s:.1f}s", flush=True)

    fractions = [args.gen_fraction] + ([] if args.no_info else [f for f in INFO_FRACTIONS if f != args.gen_fraction])
    duals = {}
    layouts = {}
    for f in fractions:
        n_und, n_gen, tok_f, pos_f = packed_layout(args.tokens, f, args.samples)
        layouts[f] = (n_und, n_gen, tok_f, pos_f)
        x, cos_f, sin_f, _ = make_inputs(cfg_d, n_und, n_gen, tok_f, pos_f, args.seed)
        duals[f] = Case(f"dual@{f}", DecoderLayer(cfg_d), x, cos_f, sin_f, tok_f, seed=args.seed)
        print(f"compiled dual (gen {f}: und {n_und}, gen {n_gen}) in {duals[f].compile_s:.1f}s", flush=True)

    main_dual = duals[args.gen_fraction]
    # each dual is compared with the single-stream runs interleaved with it
    base = {}
    time_interleaved([main_dual, single], args.warmup, args.repeats)
    base[args.gen_fraction] = (single.median, single.min, list(single.times), single.cpu_median)
    main_single = (list(single.times), list(single.cpu_times))
    for f in fractions[1:]:
        single.times, single.cpu_times = [], []
        time_interleaved([duals[f], single], args.warmup, max(3, args.repeats // 2))
        base[f] = (single.median, single.min, list(single.times), single.cpu_median)
    single.times, single.cpu_times = main_single

    def paired(f):  # median over rounds of dual_i / single_i (adjacent runs): robust to slow drift
        return statistics.median(d / s for d, s in zip(duals[f].times, base[f][2]))

    if args.verbose:
        for c in [single] + [duals[f] for f in fractions]:
            print(f"{c.name:12s} ms: {[round(t * 1e3, 1) for t in c.times]}")
        print("(single's times above are those interleaved with the main dual run)")

    load_after = os.getloadavg()
    n_params_d = sum(a.size for a in jax.tree.leaves(main_dual.params))
    n_params_s = sum(a.size for a in jax.tree.leaves(single.params))
    ratio_med = main_dual.median / single.median
    ratio_min = main_dual.min / single.min
    ratio_pair = paired(args.gen_fraction)
    ratio_cpu = main_dual.cpu_median / single.cpu_median
    verdict = "PASS" if ratio_med <= GOAL else "ABOVE GOAL"

    lines = []
    lines.append("| layer | gen fraction (und/gen tokens) | compile s | median ms | min ms "
                 "| ratio dual/single: median, min, paired | CPU ms (median) | CPU-time ratio | XLA GFLOP |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    lines.append(f"| single-stream | - ({args.tokens}/0) | {single.compile_s:.1f} | {ms(single.median)} | {ms(single.min)} "
                 f"| 1 | {ms(single.cpu_median)} | 1 | {gflop(single.flops)} |")
    for f in fractions:
        c = duals[f]
        nu, ng = layouts[f][:2]
        lines.append(f"| dual-stream | {f} ({nu}/{ng}) | {c.compile_s:.1f} | {ms(c.median)} | {ms(c.min)} | "
                     f"{c.median / base[f][0]:.3f}, {c.min / base[f][1]:.3f}, {paired(f):.3f} | {ms(c.cpu_median)} | {c.cpu_median / base[f][3]:.3f} | {gflop(c.flops)} |")
    table = "\n".join(lines)
    print()
    print(table)
    print(f"\nratio at gen fraction {args.gen_fraction}: median {ratio_med:.3f}, min {ratio_min:.3f}, paired {ratio_pair:.3f}, "
          f"CPU time {ratio_cpu:.3f} "
          f"(goal <= {GOAL}) -> {verdict}")

    parts_rows = None
    if args.breakdown:
        print("\nbreakdown (fwd+bwd of each sub-part, gen fraction %s):" % args.gen_fraction, flush=True)
        n_und, n_gen, tok_b, pos_b = layouts[args.gen_fraction]
        parts_rows = breakdown(args, n_und, n_gen, tok_b, pos_b)

    if args.out:
        now = datetime.datetime.now().astimezone()
        cmd = "python benchmarks/dual_stream.py " + " ".join(sys.argv[1:] if argv is None else argv)
        entry = [
            f"\n## dual_stream — {now:%Y-%m-%d %H:%M %Z}\n",
            f"- command: `{cmd.strip()}`",
            f"- machine: {info['arch']}, {info['cpu']}, {info['cores']} cores ({info['affinity']} usable); "
            f"jax {info['jax']}, backend {info['backend']} ({info['device']}); 1-min load average "
            f"{load_before[0]:.2f} before, {load_after[0]:.2f} after timing (other processes share these cores)",
            f"- config: hidden {args.hidden}, heads {args.heads}, kv heads {args.kv_heads} (head_dim {cfg_d.head_dim}), "
            f"intermediate {args.intermediate}, tokens {args.tokens} (batch 1, {args.samples} packed samples: "
            f"causal text split [und] + full latent split [gen] each), dtype {args.dtype}, attention {args.attention}"
            + (f" (block {args.block})" if args.attention == "blockwise" else "")
            + f", qk-norm on both streams; params: dual {n_params_d:,}, single {n_params_s:,}",
            f"- timed: jit(value_and_grad(sum(out**2)) wrt params and inputs), {args.warmup} warm-up, "
            f"{args.repeats} repeats at the main fraction ({max(3, args.repeats // 2)} at the others), dual/single interleaved; "
            "each ratio is against the single-stream runs interleaved with that dual run (single row: main run); "
            "'paired' = median over rounds of dual_i/single_i of adjacent runs; "
            "CPU ms = process CPU time per call, all threads (less sensitive to other processes than wall time); "
            "GFLOP from XLA cost analysis of the compiled step",
            "",
            table,
            "",
            f"**Ratio dual/single at gen fraction {args.gen_fraction}: {ratio_med:.3f} (median), {ratio_min:.3f} (min), "
            f"{ratio_pair:.3f} (paired median); CPU-time ratio {ratio_cpu:.3f}; "
            f"goal <= {GOAL}: {verdict}.**",
        ]
        if parts_rows:
            entry += ["", "Breakdown (each sub-part alone, fwd+bwd, median ms):", "",
                      "| part | dual | single | dual - single | ratio |", "|---|---|---|---|---|"]
            for r in parts_rows:
                entry.append(f"| {r['part']} | {ms(r['dual_med'])} | {ms(r['single_med'])} | "
                             f"{(r['dual_med'] - r['single_med']) * 1e3:+.2f} | {r['dual_med'] / r['single_med']:.2f} |")
        out = Path(args.out)
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("# Benchmark results\n\nAppended by the scripts in this folder (`--out`); newest last. "
                           "See README.md for what each benchmark measures.\n")
        with out.open("a") as fh:
            fh.write("\n".join(entry) + "\n")
        print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
