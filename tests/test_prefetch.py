"""Batch prefetching (data/prefetch.py): same batches and resumable states as the plain iterator, errors
reach the consumer, the thread stops on close; `loop.run` with prefetch saves the consumed batches' state and
resumes bit-exactly."""
import json
import os
import shutil
import time

import jax
import numpy as np
import pytest

from lance_jax.config import config_dict_from_file
from lance_jax.data import pipeline as PL
from lance_jax.data import prefetch as PF

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train", "tiny_synthetic.py")
N = 6


def _tiny(**data):
    c = config_dict_from_file(TINY)
    c.data.update(data)
    return c


def _iterator(c):
    from lance_jax.config import model_config_from_dict

    return PL.make_iterator(c.data, model_config_from_dict(c.model))


def _same_batch(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("drop_overflow", [True, False])  # False: a record carried into the next pack
def test_same_batches_and_resumable_states(drop_overflow):
    c = _tiny(drop_overflow=drop_overflow)
    plain = _iterator(c)
    want, want_states = [], []
    for _ in range(N + 1):
        want.append(next(plain))
        want_states.append(plain.get_state())
    fresh = _iterator(c).get_state()
    with PF.Prefetcher(_iterator(c), depth=2) as pf:
        assert pf.get_state() == fresh  # nothing consumed yet: the wrapped iterator's initial state
        got, states = [], []
        for _ in range(N):
            got.append(next(pf))
            states.append(pf.get_state())
    assert all(_same_batch(a, b) for a, b in zip(got, want))
    assert states == want_states[:N]  # the consumed batches' state, not the (ahead) live iterator's
    for k in (0, 2, N - 1):  # the state returned with batch k continues with batch k + 1
        it = _iterator(c)
        it.set_state(states[k])
        assert _same_batch(next(it), want[k + 1]), k


class _Flaky:
    """Checkpointable iterator of ints 0, 1, ... that raises at `fail_at` (None: never) or stops at `stop_at`."""

    def __init__(self, fail_at=None, stop_at=None):
        self.i, self.fail_at, self.stop_at = 0, fail_at, stop_at

    def __next__(self):
        if self.i == self.fail_at:
            raise ValueError(f"corrupt record at {self.i}")
        if self.i == self.stop_at:
            raise StopIteration
        self.i += 1
        return self.i - 1

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def test_error_in_thread_reaches_consumer():
    with PF.Prefetcher(_Flaky(fail_at=3), depth=2) as pf:
        assert [next(pf) for _ in range(3)] == [0, 1, 2]
        assert pf.get_state() == {"i": 3}
        for _ in range(2):  # and keeps being raised: the stream is over
            with pytest.raises(ValueError, match="corrupt record at 3"):
                next(pf)
        assert not pf._thread.is_alive()


def test_exhausted_iterator_stops():
    with PF.Prefetcher(_Flaky(stop_at=4), depth=3) as pf:
        assert list(pf) == [0, 1, 2, 3]
        assert pf.get_state() == {"i": 4}


def test_close_stops_blocked_thread():
    pf = PF.Prefetcher(_Flaky(), depth=1)
    assert next(pf) == 0
    time.sleep(0.3)  # the thread has filled the queue and waits to put the next batch
    t0 = time.monotonic()
    pf.close()
    assert time.monotonic() - t0 < 5 and not pf._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        next(pf)


def test_consumer_error_closes_thread():
    """An exception in the training loop leaves the `with` block: the thread is stopped, not left running."""
    with pytest.raises(KeyError):
        with PF.prefetch(_Flaky(), 2) as pf:
            next(pf)
            raise KeyError("step failed")
    assert not pf._thread.is_alive()


def test_depth_zero_is_the_iterator():
    it = _Flaky()
    with PF.prefetch(it, 0) as src:
        assert src is it and next(src) == 0


def _data_state(workdir, step):
    d = os.path.join(workdir, "checkpoints", str(step), "data")
    (name,) = [n for n in os.listdir(d) if n.startswith("process_")]
    return json.load(open(os.path.join(d, name)))


def _params(workdir, step):
    from lance_jax.train import checkpoint as C

    ck = C.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        state, _, _ = ck.restore(None, step)
    finally:
        ck.close()
    return jax.tree.leaves(state["params"] if isinstance(state, dict) else state.params)


def test_run_with_prefetch_saves_consumed_state_and_resumes(tmp_path):
    """loop.run (prefetch 2) for 4 steps saves at 2 and 4 the plain iterator's state after 2 and 4 batches
    (not the live one, which is ahead); resuming the step-2 checkpoint reaches the same step-4 params."""
    from lance_jax import sharding as S
    from lance_jax.train import loop as L

    c = _tiny()
    assert c.data.prefetch == 2  # the default every config gets from configs/train/_common.py
    c.train.update(dict(steps=4, save_every=2, log_every=2, keep=3))
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    mesh = S.make_mesh({"fsdp": 1}, jax.devices()[:1])
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    L.run(c, straight, progress=False, console=lambda s: None, mesh=mesh)

    plain = _iterator(c)
    want = {}
    for s in range(1, 5):
        next(plain)
        want[s] = json.loads(json.dumps(plain.get_state()))
    assert _data_state(straight, 2) == want[2] and _data_state(straight, 4) == want[4]

    shutil.copytree(os.path.join(straight, "checkpoints", "2"), os.path.join(resumed, "checkpoints", "2"))
    logs = []
    L.run(c, resumed, progress=False, console=logs.append, mesh=mesh)
    assert "resumed from step 2" in logs
    assert _data_state(resumed, 4) == want[4]
    a, b = _params(straight, 4), _params(resumed, 4)
    assert len(a) == len(b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b))
