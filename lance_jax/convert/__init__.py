"""Weights between the reference PyTorch layout and lance-jax param trees.

`keys` holds the rule type and strict checks, `safetensors_io` the torch-free file access, and one
`*_keys` module per component holds its declarative table.
"""
from lance_jax.convert.keys import CheckpointMismatchError, KeyRule
from lance_jax.convert.lance_keys import (
    DROPPED_KEYS,
    GEN,
    VIT_PREFIX,
    key_table,
    load_reference_params,
    param_shapes,
    reference_tensors,
)
from lance_jax.convert.safetensors_io import read_tensors, safetensors_header, write_safetensors

__all__ = [
    "CheckpointMismatchError", "KeyRule", "DROPPED_KEYS", "GEN", "VIT_PREFIX", "key_table", "load_reference_params",
    "param_shapes", "reference_tensors", "read_tensors", "safetensors_header", "write_safetensors",
]
