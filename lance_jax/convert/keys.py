"""Declarative key rules: one reference tensor <-> one param leaf, and the strict checks around them.

Every component (language model and glue, ViT, VAE) describes its state dict as a list of
`KeyRule`s; loading, checking and the reverse direction derive from those tables.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One reference tensor <-> one param leaf (or one layer slice of a scanned leaf).

    transpose: a Linear weight (out, in) <-> kernel (in_1..in_k, out_1..out_m) with k = in_dims.
    perm:      a same-rank axis permutation, param = ref.transpose(perm) (e.g. conv (O, I, kt, kh, kw) ->
               (kt, kh, kw, I, O) is perm (2, 3, 4, 1, 0)).
    ref_ndim:  for copied tensors, the reference rank (trailing param dims are merged into it).
    trailing_ones: extra singleton dims at the end of the reference tensor (a VAE gamma (C, 1, 1, 1)
               <- (C,), a 1x1x1 conv weight (O, I, 1, 1, 1) <- kernel (I, O)).
    layer:     the layer index for per-layer tensors.
    stacked:   the param leaf stacks all layers (scanned layers): this rule is its slice `layer`.
    """

    ref: str
    path: tuple[str, ...]
    transpose: bool = False
    in_dims: int = 1
    perm: tuple[int, ...] | None = None
    trailing_ones: int = 0
    ref_ndim: int = 1
    layer: int | None = None
    stacked: bool = False

    def ref_shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape the reference tensor must have, given our (per-layer) param shape."""
        return self._core_shape(param_shape) + (1,) * self.trailing_ones

    def _core_shape(self, param_shape):
        if self.transpose:
            return (math.prod(param_shape[self.in_dims:]), math.prod(param_shape[: self.in_dims]))
        if self.perm is not None:
            return tuple(param_shape[self.perm.index(i)] for i in range(len(self.perm)))
        keep = param_shape[: self.ref_ndim - 1]
        return tuple(keep) + (math.prod(param_shape[self.ref_ndim - 1:]),)

    def to_param(self, ref: np.ndarray, param_shape: tuple[int, ...]) -> np.ndarray:
        ref = np.asarray(ref)
        ref = ref.reshape(ref.shape[: ref.ndim - self.trailing_ones])
        if self.perm is not None:
            return ref.transpose(self.perm).reshape(param_shape)
        return (ref.T if self.transpose else ref).reshape(param_shape)

    def to_ref(self, param: np.ndarray) -> np.ndarray:
        core = self._core_shape(param.shape)
        if self.transpose:
            out = np.ascontiguousarray(param.reshape(core[::-1]).T)
        elif self.perm is not None:
            out = np.ascontiguousarray(param.transpose(np.argsort(self.perm)))
        else:
            out = param.reshape(core)
        return out.reshape(self.ref_shape(param.shape))


class CheckpointMismatchError(ValueError):
    """Raised once with every missing, unexpected and mis-shaped key listed."""


def get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def check_reference_keys(header: dict[str, dict], rules: list[KeyRule], shapes: dict, *, ignore_prefixes=(),
                         dropped=()) -> None:
    """Raise CheckpointMismatchError listing all missing / unexpected / mis-shaped reference keys."""
    missing, misshaped = [], []
    for rule in rules:
        if rule.ref not in header:
            missing.append(rule.ref)
            continue
        shape = get_path(shapes, rule.path)
        shape = shape[1:] if rule.stacked else shape
        want = rule.ref_shape(shape)
        got = tuple(header[rule.ref]["shape"])
        if got != want:
            misshaped.append(f"{rule.ref}: checkpoint {got}, model expects {want}")
    known = {r.ref for r in rules} | set(dropped)
    unexpected = sorted(k for k in header if k not in known and not k.startswith(tuple(ignore_prefixes)))
    if missing or unexpected or misshaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"{len(items)} {title} key(s):\n  " + "\n  ".join(items))
        raise CheckpointMismatchError("checkpoint does not match the model config:\n" + "\n".join(parts))


def params_from_tensors(tensors: Iterable[tuple[str, np.ndarray]], rules: list[KeyRule], shapes: dict, dtype) -> dict:
    """Build a param tree (NumPy, `dtype`) from (reference key, array) pairs; stacked rules fill layer slices."""
    by_key = {r.ref: r for r in rules}
    params: dict = {}
    for key, tensor in tensors:
        rule = by_key[key]
        full_shape = get_path(shapes, rule.path)
        if rule.stacked:
            try:
                stacked = get_path(params, rule.path)
            except KeyError:
                stacked = np.zeros(full_shape, dtype)
                set_path(params, rule.path, stacked)
            stacked[rule.layer] = rule.to_param(tensor, full_shape[1:]).astype(dtype)
        else:
            set_path(params, rule.path, rule.to_param(tensor, full_shape).astype(dtype))
    return params


def tensors_from_params(params: dict, rules: list[KeyRule]) -> Iterator[tuple[str, np.ndarray]]:
    """The inverse direction: (reference key, array) for every rule, from a param tree."""
    for rule in rules:
        leaf = np.asarray(get_path(params, rule.path))
        if rule.stacked:
            leaf = leaf[rule.layer]
        yield rule.ref, rule.to_ref(leaf)
