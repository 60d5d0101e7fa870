"""Dense projections whose params carry logical axis names (one name per kernel dimension)."""
from __future__ import annotations

import flax.linen as nn

KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def dense(features, kernel_axes: tuple[str, ...], *, use_bias: bool, axis=-1, name=None, dtype=None, param_dtype=None,
          kernel_init=KERNEL_INIT):
    """nn.DenseGeneral with logically partitioned kernel (in..., out...) and bias (out...)."""
    n_out = len(features) if isinstance(features, tuple) else 1
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, kernel_axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, kernel_axes[-n_out:]),
        name=name,
    )
