"""ZeRO-1: optimizer state sharded over the data-parallel axis while parameters stay replicated.

In data parallelism every device holds the whole parameters and, with a plain optimizer,
the whole optimizer state: Adam's two moments cost twice the parameters on every device.
ZeRO stage 1 (Rajbhandari et al., 2020) keeps on each of the ``N`` data-parallel devices only
``1/N`` of the state, updates only that slice, and gathers the updates. Here XLA's SPMD
partitioner does the work: sharding constraints say where each array lives, XLA inserts the
collectives (a reduce-scatter of the gradients where it can, an all-gather of the updates).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental.shard_alike import shard_alike
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gradtx.base import GradientTransformation


def zero1_dim(shape: tuple[int, ...], axis_size: int) -> int | None:
    """The dimension that :func:`zero1` shards an array of ``shape`` along, over ``axis_size`` devices.

    The leading dimension when ``axis_size`` divides it, else the largest dimension it divides
    (the first of equals), else ``None``: the array is left where it is (scalars, step
    counters, and arrays no dimension of which divides evenly keep their parameter's sharding).

    Args:
        shape: the array's shape.
        axis_size: the number of devices along the data-parallel axis.

    Returns:
        A dimension index, or ``None``.

    Example:
        >>> import gradtx
        >>> gradtx.zero1_dim((6, 16), 4), gradtx.zero1_dim((8, 16), 4), gradtx.zero1_dim((3,), 4)
        (1, 0, None)

    References:
        Rajbhandari et al., 2020. ZeRO: Memory Optimizations Toward Training Trillion Parameter Models,
        https://arxiv.org/abs/1910.02054
    """
    divisible = [d for d, n in enumerate(shape) if n > 0 and n % axis_size == 0]
    if not divisible:
        return None
    if divisible[0] == 0:
        return 0
    return max(divisible, key=lambda d: (shape[d], -d))


def _check(owner: str, inner: Any, mesh: Any, axis: Any) -> None:
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise TypeError(f"{owner}: inner must be a gradient transformation with init and update, got {inner!r}")
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{owner}: mesh must be a jax.sharding.Mesh, got {mesh!r}")
    if axis not in mesh.axis_names:
        raise ValueError(f"{owner}: axis must be one of the mesh's axis names {tuple(mesh.axis_names)}, got {axis!r}")
    if mesh.axis_types[mesh.axis_names.index(axis)] == jax.sharding.AxisType.Explicit:
        raise ValueError(
            f"{owner}: axis {axis!r} of mesh must be an Auto (or Manual) axis, got an Explicit one; build the mesh "
            f"with jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) * n) or jax.sharding.Mesh(devices, names)"
        )


def _concrete_spec(x: jax.Array, mesh: Mesh, axis: str, dim: int) -> P:
    # Keep the array's own sharding on the other dimensions (model parallelism), as the
    # unconstrained dimensions of the traced case let XLA do.
    entries = [None] * x.ndim
    sharding = x.sharding
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
        entries = list(sharding.spec) + [None] * (x.ndim - len(sharding.spec))
    entries = [None if e == axis or (isinstance(e, tuple) and axis in e) else e for e in entries]
    entries[dim] = axis
    return P(*entries)


def zero1(inner: GradientTransformation, mesh: Mesh, axis: str = "data") -> GradientTransformation:
    r"""Shard ``inner``'s state over the data-parallel mesh axis ``axis`` (ZeRO stage 1).

    With :math:`N` devices along ``axis``, every state array is split along one dimension
    (:func:`zero1_dim`: the leading one, else the largest that :math:`N` divides) so that each
    device stores and updates :math:`1/N` of it:

    .. math::

        g^{(i)} = \text{slice}_i(g), \quad (u^{(i)}, s^{(i)}_{t}) = \text{inner.update}(g^{(i)}, s^{(i)}_{t-1}, p^{(i)}),
        \quad u = \text{all\_gather}_i(u^{(i)}).

    The partitioning is XLA's: ``init`` and ``update`` put sharding constraints on the
    state, the incoming gradients and parameters (sliced locally), and the outgoing updates
    (placed like the parameters, or like the gradients without ``params``: an all-gather).
    Per-layer reductions of ``inner`` (LAMB's trust ratio, global-norm clipping, Adafactor's
    factored moments) become partial reductions plus an all-reduce of scalars or vectors;
    the numbers agree with the unsharded run to rounding. The state has the same structure
    as ``inner``'s, so it checkpoints and restores alike. Use inside ``jax.jit`` with the
    parameters replicated over ``axis`` (they may be sharded over other mesh axes on other
    dimensions); an array no dimension of which divides :math:`N` keeps its parameter's
    sharding.

    Args:
        inner: the optimizer whose state to shard.
        mesh: the device mesh; ``axis`` must be an ``Auto`` axis (the default of
            ``jax.sharding.Mesh``).
        axis: the name of the data-parallel mesh axis.

    Returns:
        A ``GradientTransformation`` with ``inner``'s state structure.

    Example:
        >>> import jax, numpy as np, jax.numpy as jnp, gradtx
        >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
        >>> tx = gradtx.zero1(gradtx.adamw(1e-3), mesh, axis="data")
        >>> params = {"w": jnp.ones((8, 4))}
        >>> state = jax.jit(tx.init)(params)
        >>> updates, state = jax.jit(tx.update)(params, state, params)

    References:
        Rajbhandari et al., 2020. ZeRO: Memory Optimizations Toward Training Trillion Parameter Models,
        https://arxiv.org/abs/1910.02054

        Xu et al., 2020. Automatic Cross-Replica Sharding of Weight Update in Data-Parallel Training,
        https://arxiv.org/abs/2004.13336
    """
    owner = "zero1"
    _check(owner, inner, mesh, axis)
    axis_size = mesh.shape[axis]

    def shard(x):
        dim = zero1_dim(x.shape, axis_size)
        if dim is None:
            return x
        if isinstance(x, jax.core.Tracer):
            # Unconstrained elsewhere: a model-parallel sharding of the other dimensions stays.
            spec = [P.UNCONSTRAINED] * x.ndim
            spec[dim] = axis
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))
        return jax.device_put(x, NamedSharding(mesh, _concrete_spec(x, mesh, axis, dim)))

    def gather_like(x, reference):
        if x is None:  # a frozen parameter's update
            return None
        if isinstance(x, jax.core.Tracer) or isinstance(reference, jax.core.Tracer):
            return shard_alike(reference, x)[1]
        return jax.device_put(x, reference.sharding)

    def init(params):
        return jax.tree.map(shard, inner.init(params))

    def update(updates, state, params=None, **extra_args):
        local_updates = jax.tree.map(shard, updates)
        local_params = None if params is None else jax.tree.map(shard, params)
        new_updates, state = inner.update(local_updates, state, local_params, **extra_args)
        reference = updates if params is None else params
        new_updates = jax.tree.map(gather_like, new_updates, reference, is_leaf=lambda x: x is None)
        return new_updates, jax.tree.map(shard, state)

    return GradientTransformation(init, update)
