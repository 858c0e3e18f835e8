"""How much memory an optimizer state takes.

Counts the bytes of every array leaf of a state pytree: ``x.size * x.dtype.itemsize``. It works
on real arrays and on ``jax.ShapeDtypeStruct`` leaves, so the state of a model too large to
allocate can be measured from ``jax.eval_shape(tx.init, params)``. Leaves that are not arrays
(``None``, Python numbers kept as static hyperparameters) hold no device memory and count zero.
An 8-bit moment (``gradtx.QuantizedArray``) is a pytree of its uint8 codes and float32 block
scales, so it counts ``1 + 4 / block_size`` bytes per element, its true size.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _leaf_bytes(leaf: Any) -> int:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        return 0
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _leaf_size(leaf: Any) -> int:
    shape = getattr(leaf, "shape", None)
    return 0 if shape is None else int(np.prod(shape, dtype=np.int64))


def state_bytes(state: Any) -> int:
    r"""The memory held by the array leaves of a pytree, in bytes: :math:`\sum_x |x| \cdot \mathrm{itemsize}(x)`.

    Args:
        state: any pytree, typically ``tx.init(params)`` or ``jax.eval_shape(tx.init, params)``
            (``jax.ShapeDtypeStruct`` leaves); Flax NNX ``Variable`` leaves are unwrapped.

    Returns:
        The total number of bytes as a Python ``int`` (step counters included).

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> params = {"w": jax.ShapeDtypeStruct((1000, 1000), jnp.float32)}
        >>> gradtx.state_bytes(jax.eval_shape(gradtx.adam(1e-3).init, params))
        8000004

    References:
        Dettmers et al., 2022. 8-bit Optimizers via Block-wise Quantization, https://arxiv.org/abs/2110.02861
    """
    return sum(_leaf_bytes(leaf) for leaf in jax.tree.leaves(state))


def state_bytes_per_parameter(state: Any, params: Any) -> float:
    r"""Optimizer-state bytes per parameter element: ``state_bytes(state) / (number of elements of params)``.

    Adam keeps two moments, so in float32 it needs about 8 bytes per parameter; SGD with
    momentum and Lion about 4; Adafactor's factored second moment about :math:`4 (n + m) / (nm)`
    per :math:`n \times m` matrix.

    Args:
        state: the optimizer state (arrays or ``jax.ShapeDtypeStruct``).
        params: the parameters it was built for (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
        A float; raises ``ValueError`` if ``params`` has no elements.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> params = {"w": jnp.zeros((1000, 1000))}
        >>> round(gradtx.state_bytes_per_parameter(gradtx.adam(1e-3).init(params), params), 3)
        8.0

    References:
        Dettmers et al., 2022. 8-bit Optimizers via Block-wise Quantization, https://arxiv.org/abs/2110.02861
    """
    count = sum(_leaf_size(leaf) for leaf in jax.tree.leaves(params))
    if count == 0:
        raise ValueError("state_bytes_per_parameter: params must have at least one element, got 0")
    return state_bytes(state) / count
