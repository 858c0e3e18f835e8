"""Where optimizer state lives: the shardings of a state, its abstract form, and its bytes per device.

Every state array is created by :func:`gradtx.tree.zeros_like`, which places it like the
array it tracks, so ``jax.jit(tx.init)(params)`` yields a state sharded like ``params`` on
any mesh (also with ``Auto`` axes, where Optax's init puts every moment whole on device 0).
The helpers here read that placement without creating the state: from a compiled but never
run ``init`` on abstract parameters.
"""

from __future__ import annotations

from typing import Any

import jax

from gradtx.base import GradientTransformation


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    # An uncommitted array (created without a device) may go anywhere: it constrains nothing.
    sharding = getattr(x, "sharding", None) if getattr(x, "committed", True) else None
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if isinstance(sharding, jax.sharding.Sharding) else None)


def _check_transformation(owner: str, tx: Any) -> None:
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(f"{owner}: tx must be a gradient transformation with init and update, got {tx!r}")


def state_shardings(tx: GradientTransformation, params: Any) -> Any:
    """The sharding of every array of ``tx.init(params)``, computed without creating the state.

    ``init`` is traced and compiled (never run) on abstract parameters that carry the
    shardings of ``params``; XLA's sharding propagation then gives each state array the
    sharding of the parameter it tracks, and scalars (step counters) are replicated.

    Args:
        tx: a gradient transformation.
        params: the parameters: arrays, or ``jax.ShapeDtypeStruct`` with a ``sharding``.

    Returns:
        A tree shaped like the state, of ``jax.sharding.Sharding``.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> shardings = gradtx.state_shardings(gradtx.adam(1e-3), {"w": jnp.zeros((4, 2))})
        >>> shardings[0].mu["w"].is_fully_replicated
        True

    References:
        JAX documentation, Distributed arrays and automatic parallelization,
        https://docs.jax.dev/en/latest/notebooks/Distributed_arrays_and_automatic_parallelization.html
    """
    _check_transformation("state_shardings", tx)
    abstract = jax.tree.map(_abstract, params)
    return jax.jit(tx.init).trace(abstract).lower().compile().output_shardings


def abstract_state(tx: GradientTransformation, params: Any) -> Any:
    """``tx.init(params)`` as ``jax.ShapeDtypeStruct`` leaves with shape, dtype and sharding, no array created.

    A restore target for checkpointing (Orbax restores each array straight into its
    sharding) and an ``out_shardings`` for a jitted ``init``.

    Args:
        tx: a gradient transformation.
        params: the parameters: arrays, or ``jax.ShapeDtypeStruct`` with a ``sharding``.

    Returns:
        A tree shaped like the state, of ``jax.ShapeDtypeStruct`` with ``sharding`` set.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> params = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32)}
        >>> gradtx.abstract_state(gradtx.adam(1e-3), params)[0].mu["w"].shape
        (4, 2)

    References:
        JAX documentation, jax.eval_shape, https://docs.jax.dev/en/latest/_autosummary/jax.eval_shape.html
    """
    _check_transformation("abstract_state", tx)
    shapes = jax.eval_shape(tx.init, jax.tree.map(_abstract, params))
    return jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes, state_shardings(tx, params)
    )


def device_bytes(tree: Any, device: jax.Device | None = None) -> int:
    """Bytes of the arrays of ``tree`` held on ``device`` (default: the first device of the first array).

    Counts each array's shards addressable on that device, so a state sharded over ``N``
    devices counts about ``1/N`` of its replicated size.

    Args:
        tree: a pytree of ``jax.Array``.
        device: the device to count; ``None`` means the first device of the first leaf.

    Returns:
        The number of bytes, an ``int``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> gradtx.device_bytes({"w": jnp.zeros((4, 2))})
        32

    References:
        JAX documentation, jax.Array.addressable_shards, https://docs.jax.dev/en/latest/_autosummary/jax.Array.html
    """
    arrays = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    if not arrays:
        return 0
    if device is None:
        device = arrays[0].addressable_shards[0].device
    return sum(shard.data.nbytes for x in arrays for shard in x.addressable_shards if shard.device == device)
