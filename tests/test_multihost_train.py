"""Multi-host training: 2 CPU processes on 127.0.0.1 (2 fake devices each, one 4-device global mesh) run
`train.py` on the tiny synthetic config through `jax.distributed` (LANCE_* variables), save, restore in fresh
processes and continue.

Checks: (a) every step's loss equals a single process on the same 4-device mesh fed the same global batches
(both processes' data slices concatenated, process-major as `make_array_from_process_local_data` lays them
out); (b) restoring the 2-process checkpoint in 2 new processes continues bit-exactly like the straight run
(losses and the final params / optimizer / EMA / rng); (c) the checkpoint holds one data-iterator state per
process, each equal to what that process's own iterator had, and the restored processes each continue
from their own (their final saved states are again each process's own).
"""
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lance_jax import sharding as S
from lance_jax.config import config_dict_from_file
from lance_jax.data import pipeline as PL
from lance_jax.train import checkpoint as C
from lance_jax.train import loop as L
from lance_jax.train import step as Sp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train", "tiny_synthetic.py")
NPROC, LOCAL_DEVICES = 2, 2
# The straight run saves at 3 and 5; the resumed run restores 3 and runs 4..5. Step 3: the two processes'
# data states differ there (not after step 2: both happened to read 29 records), so a mix-up would show.
STEPS, SAVE_AT = 5, 3
BATCH = 4  # global rows: 2 per process, 1 per device on the 4-device fsdp mesh
OVERRIDES = dict(steps=STEPS, save_every=SAVE_AT, log_every=1, keep=3)

needs4 = pytest.mark.skipif(jax.device_count() < NPROC * LOCAL_DEVICES, reason="needs 4 devices (conftest: 8)")


def _config():
    c = config_dict_from_file(TINY)
    c.train.update(OVERRIDES)
    c.data.batch_size = BATCH
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    return c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, cache_dir) -> list[tuple[subprocess.Popen, str, str]]:
    """Start `train.py` on NPROC processes sharing `workdir` (one jax.distributed job on 127.0.0.1);
    -> (process, stdout file, stderr file) each. Output goes to files: a full pipe would block a child.

    cache_dir: JAX's persistent compilation cache, shared by the launches: the resumed launch loads the
    executables the straight one compiled (same programs) instead of compiling them again."""
    port = _free_port()
    flags = [f"--config={TINY}", f"--workdir={workdir}", "--noprogress", f"--config.data.batch_size={BATCH}",
             "--config.matmul_precision=highest"] + [f"--config.train.{k}={v}" for k, v in OVERRIDES.items()]
    procs = []
    for pid in range(NPROC):
        env = dict(os.environ, LANCE_COORDINATOR=f"127.0.0.1:{port}", LANCE_NUM_PROCESSES=str(NPROC),
                   LANCE_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
                   JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        out, err = f"{workdir}.p{pid}.stdout", f"{workdir}.p{pid}.stderr"
        with open(out, "w") as fo, open(err, "w") as fe:
            procs.append((subprocess.Popen([sys.executable, os.path.join(REPO, "train.py")] + flags, env=env,
                                           cwd=REPO, stdout=fo, stderr=fe), out, err))
    return procs


def _wait(procs, timeout=420) -> list[str]:
    """Each process's stdout once all have exited 0. A process that fails or outlives `timeout` fails the
    test with every process's stdout / stderr tail; its peers are killed (they would wait at a barrier)."""
    deadline = time.monotonic() + timeout
    failed = False
    while not failed and time.monotonic() < deadline and any(p.poll() is None for p, _, _ in procs):
        failed = any(p.poll() not in (None, 0) for p, _, _ in procs)
        time.sleep(0.2)
    hung = [] if failed else [i for i, (p, _, _) in enumerate(procs) if p.poll() is None]
    for p, _, _ in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    outs = [(open(o).read(), open(e).read()) for _, o, e in procs]
    report = "".join(f"\n=== process {i} exit {p.returncode}\n--- stdout\n{o[-2000:]}\n--- stderr\n{e[-5000:]}"
                     for i, ((p, _, _), (o, e)) in enumerate(zip(procs, outs)))
    assert not hung, f"processes {hung} still running after {timeout} s{report}"
    assert all(p.returncode == 0 for p, _, _ in procs), report
    return [o for o, _ in outs]


def _tb_losses(logdir) -> dict[int, list[float]]:
    """step -> every `train/loss` scalar in the TensorBoard event files under `logdir` (TFRecord framing:
    u64 length, u32 crc, payload, u32 crc). Scalars are float32, the loss is float32: exact at log_every=1."""
    from tensorboardX.proto import event_pb2

    out: dict[int, list[float]] = {}
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                if v.tag == "train/loss":
                    out.setdefault(int(ev.step), []).append(float(v.simple_value))
    return out


def _data_states(ckpt_dir, step) -> dict[str, dict]:
    d = os.path.join(ckpt_dir, str(step), "data")
    return {n: json.load(open(os.path.join(d, n))) for n in sorted(os.listdir(d)) if n.startswith("process_")}


def _jsonable(x):
    return json.loads(json.dumps(x))


def _reference():
    """Single process, same 4-device fsdp mesh, fed both processes' slices: per-step losses, data states
    of each process's iterator after SAVE_AT and STEPS steps, final state, and the restore target."""
    c = _config()
    mesh = S.make_mesh({"fsdp": NPROC * LOCAL_DEVICES}, jax.devices()[:NPROC * LOCAL_DEVICES])
    b = L.build(c, mesh=mesh)
    its = [PL.make_iterator(L.data_config(c), b["cfg"], process_index=i, process_count=NPROC) for i in range(NPROC)]
    b_sh = Sp.batch_shardings(mesh, b["batch_abstract"])
    abstract = C.abstract_like(b["state"], b["shardings"])
    state, losses, data = b["state"], [], {}
    with S.use_mesh(mesh):
        for s in range(1, STEPS + 1):
            parts = [next(it) for it in its]
            batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            state, m = b["step"](state, L.global_batch(batch, mesh, b_sh), Sp.step_rng(state))
            losses.append(float(m["loss"]))
            if s in (SAVE_AT, STEPS):
                data[s] = {C.process_file(i, NPROC): _jsonable(it.get_state()) for i, it in enumerate(its)}
    return dict(losses=losses, data=data, state=jax.device_get(state), abstract=abstract)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight 2-process run of STEPS steps (the single-process reference is computed meanwhile: its
    compile overlaps theirs), then 2 fresh processes resuming a copy of its SAVE_AT checkpoint."""
    root = tmp_path_factory.mktemp("multihost")
    straight, resumed = root / "straight", root / "resumed"
    procs = _start(straight, root / "jax_cache")
    try:
        reference = _reference()
    finally:  # the children are waited for (and killed on timeout) even if the reference fails
        out_straight = _wait(procs)
    # the resumed workdir holds only the step-SAVE_AT checkpoint (step dirs are self-contained)
    os.makedirs(resumed / "checkpoints")
    shutil.copytree(straight / "checkpoints" / str(SAVE_AT), resumed / "checkpoints" / str(SAVE_AT))
    out_resumed = _wait(_start(resumed, root / "jax_cache"))
    return dict(straight=straight, resumed=resumed, out_straight=out_straight, out_resumed=out_resumed,
                reference=reference)


def _restore(ckpt_dir, step, abstract):
    """The state of a 2-process checkpoint restored in this (single) process; the data item is per process
    and is read from the files directly (`_data_states`)."""
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(str(ckpt_dir), item_names=("state",))
    try:
        return jax.device_get(mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"])
    finally:
        mgr.close()


def _trees_equal(a, b) -> list[str]:
    """Paths of leaves that differ (empty = bit-identical)."""
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
    assert len(la) == len(lb)
    return [jax.tree_util.keystr(p) for (p, x), y in zip(la, lb) if not np.array_equal(x, y)]


@needs4
def test_two_process_train_save_restore(runs):
    reference = runs["reference"]
    straight_tb, resumed_tb = _tb_losses(runs["straight"] / "tb"), _tb_losses(runs["resumed"] / "tb")
    # process 0 alone writes TensorBoard: one scalar per step (two writers would duplicate or corrupt them)
    assert sorted(straight_tb) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in straight_tb.values())
    assert sorted(resumed_tb) == list(range(SAVE_AT + 1, STEPS + 1)) and all(len(v) == 1 for v in resumed_tb.values())
    assert all("resumed from step" not in o for o in runs["out_straight"])
    assert all(f"resumed from step {SAVE_AT}" in o for o in runs["out_resumed"])

    # (a) 2 processes == 1 process over the same global batches. Same mesh shape, same program, same params
    # (the init is sharding-independent), same threefry draws (partitionable); what may differ is the order
    # of the cross-process reductions (gloo vs in-process all-reduce): fp32 noise. Measured: 1 ulp (7e-8
    # relative) on one step's loss, 6e-8 on the params after 4 steps. A wrong or shuffled batch changes the
    # loss by ~1e-2 relative (the losses of consecutive steps differ by that much) and, through Adam at lr
    # 1e-3, every trained param by ~1e-3: the bounds below sit ~20x above the noise, far below either.
    got = [straight_tb[s][0] for s in range(1, STEPS + 1)]
    np.testing.assert_allclose(got, reference["losses"], rtol=2e-6)
    final = _restore(runs["straight"] / "checkpoints", STEPS, reference["abstract"])
    assert int(final.step) == STEPS
    for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(final.params)[0], jax.tree.leaves(reference["state"].params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(p))

    # (b) save on 2 processes + restore on 2 new processes == the straight run, bit for bit
    assert [resumed_tb[s][0] for s in range(SAVE_AT + 1, STEPS + 1)] == got[SAVE_AT:]
    resumed_final = _restore(runs["resumed"] / "checkpoints", STEPS, reference["abstract"])
    for field in ("params", "opt_state", "ema_params", "rng", "step", "skipped"):
        assert not _trees_equal(getattr(final, field), getattr(resumed_final, field)), field

    # (c) one data state per process, each that process's own iterator state (they differ: a mix-up shows)
    want = reference["data"]
    saved = _data_states(runs["straight"] / "checkpoints", SAVE_AT)
    assert sorted(saved) == [C.process_file(i, NPROC) for i in range(NPROC)]
    for s in (SAVE_AT, STEPS):
        assert want[s][C.process_file(0, NPROC)] != want[s][C.process_file(1, NPROC)], s
    assert saved == want[SAVE_AT]
    # restore gave each process its own state: after STEPS - SAVE_AT more steps each saved its own again
    assert _data_states(runs["resumed"] / "checkpoints", STEPS) == want[STEPS]
    assert _data_states(runs["straight"] / "checkpoints", STEPS) == want[STEPS]


def test_data_state_is_per_process(tmp_path, monkeypatch):
    """The data item is one file per (process index, count): simulated processes 0 and 1 of 2 write into one
    directory and each reads back its own; a count mismatch on restore is an error naming the saved files
    (the records a process reads depend on both). Then a real single-process Checkpointer round trip."""
    h, d = C.PerProcessJsonHandler(), tmp_path / "data"
    d.mkdir()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for i in range(2):
        monkeypatch.setattr(jax, "process_index", lambda i=i: i)
        h.save(d, C.PerProcessJsonSave({"pos": 10 + i}))
    assert sorted(os.listdir(d)) == [C.process_file(0, 2), C.process_file(1, 2)]
    for i in range(2):
        monkeypatch.setattr(jax, "process_index", lambda i=i: i)
        assert h.restore(d, C.PerProcessJsonRestore()) == {"pos": 10 + i}
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    with pytest.raises(FileNotFoundError, match=r"process_0-of-2\.json', 'process_1-of-2\.json"):
        h.restore(d, C.PerProcessJsonRestore())
    monkeypatch.undo()

    ck = C.Checkpointer(str(tmp_path / "ck"))
    ck.save(1, {"w": np.arange(3.0)}, {"pos": 7}, force=True)
    ck.wait()
    assert [n for n in os.listdir(tmp_path / "ck" / "1" / "data") if n.endswith(".json")] == [C.process_file(0, 1)]
    state, data, step = ck.restore(None)
    ck.close()
    assert data == {"pos": 7} and step == 1 and np.array_equal(state["w"], np.arange(3.0))
