"""Background batch prefetching: build the next batches on a host thread while the device runs a step.

`Prefetcher(it, depth)` wraps a checkpointable batch iterator (`next`, `get_state`, `set_state`). A daemon
thread pulls `next(it)` and takes `it.get_state()` right after each batch, so every queued batch travels with
the state that resumes *after* it. The live iterator runs up to depth + 1 batches ahead of the consumer, so
its own state is not the one to checkpoint: `Prefetcher.get_state()` is the state after the last batch the
consumer took (the state the iterator had at construction before any). Restore the iterator (`set_state`)
before wrapping it; from then on only the thread touches it.

An exception in the thread (a corrupt shard with `fail_on_bad_shard`, an encoder error) is raised from the
consumer's next `next()`; `close()` (or leaving the `with` block) stops the thread.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading

log = logging.getLogger("lance_jax.data")

_POLL_S = 0.1  # how often a blocked producer / consumer re-checks for close() or a dead thread


class _End:
    """Queue item: the wrapped iterator is exhausted (StopIteration) or raised `error`."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class Prefetcher:
    """Iterator over the batches of `iterator`, built `depth` ahead in a daemon thread; a context manager."""

    def __init__(self, iterator, depth: int = 2, *, join_timeout: float = 30.0):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1 (use the iterator itself for 0), got {depth}")
        self._it, self._join_timeout = iterator, join_timeout
        self._state = iterator.get_state()  # taken before the thread starts: nothing else reads `iterator` now
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._end: _End | None = None
        self._thread = threading.Thread(target=self._produce, name="batch-prefetch", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- producer (the thread)

    def _produce(self):
        try:
            while not self._stop.is_set():
                batch = next(self._it)
                if not self._put((batch, self._it.get_state())):
                    return
        except StopIteration:
            self._put(_End())
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_End(e))

    def _put(self, item) -> bool:
        """Queue `item`, waiting for room; False when close() came first (the item is dropped)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    # ---------------------------------------------------------------- consumer

    def __iter__(self):
        return self

    def __next__(self):
        if self._end is None and self._stop.is_set():
            raise RuntimeError("Prefetcher is closed")
        item = self._end or self._get()
        if isinstance(item, _End):
            self._end = item  # sticky: every later next() ends the same way
            if item.error is not None:
                raise item.error
            raise StopIteration
        batch, self._state = item
        return batch

    def _get(self):
        """The next queue item; fails instead of waiting forever if the thread died without leaving one."""
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive():
                    try:
                        return self._queue.get_nowait()  # it may have put its last item just before exiting
                    except queue.Empty:
                        raise RuntimeError("batch prefetch thread exited without a batch") from None

    def get_state(self):
        """The wrapped iterator's state after the last batch returned by next() (what a checkpoint saves)."""
        return self._state

    # ---------------------------------------------------------------- shutdown

    def close(self):
        """Stop the thread: it finishes the batch it is building (up to `join_timeout` s), then exits."""
        self._stop.set()
        while True:  # free the queue so a producer blocked on put() sees the stop promptly
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(self._join_timeout)
        if self._thread.is_alive():  # a daemon thread: it cannot keep the process alive
            log.warning("batch prefetch thread still busy %.0f s after close(); leaving it", self._join_timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def prefetch(iterator, depth: int):
    """Context manager yielding the batch source for a training loop: a `Prefetcher` for depth >= 1, the
    iterator itself for 0 (synchronous, the iterator's own state)."""
    return Prefetcher(iterator, depth) if depth > 0 else contextlib.nullcontext(iterator)
