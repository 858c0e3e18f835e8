"""Small pytree helpers that the building blocks share.

Each helper is written per array and lifted to pytrees with ``jax.tree.map``; ``None``
leaves (masked-out updates) are empty subtrees and pass through untouched. State arrays
are created only through :func:`zeros_like` so that placement (sharding) and storage
dtype policy live in one place.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.shard_alike import shard_alike

from gradtx.base import ScalarOrSchedule
from gradtx.state import quantize as _quantize
from gradtx.state import recompute as _recompute

INT32_MAX = jnp.iinfo(jnp.int32).max


def zero_count() -> jax.Array:
    """A fresh int32 step counter, ``0``."""
    return jnp.zeros([], jnp.int32)


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1`` for an int32 step counter, saturating at the int32 maximum instead of wrapping."""
    return jnp.where(count < INT32_MAX, count + 1, INT32_MAX).astype(jnp.int32)


def resolve(value: ScalarOrSchedule, count: jax.Array) -> Any:
    """The value of a hyperparameter at step ``count``: ``value(count)`` for a schedule, else ``value``."""
    return value(count) if callable(value) else value


def canonical_dtype(dtype) -> Any:
    """``None`` stays ``None`` (meaning: the parameter's dtype); anything else becomes a numpy dtype."""
    return None if dtype is None else jax.dtypes.canonicalize_dtype(dtype)


def zeros_like(tree: Any, dtype=None) -> Any:
    """Zeros shaped like every leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``), in ``dtype`` or the leaf's dtype.

    The zeros are placed like their leaf (see :func:`placed_zeros`): sharded like a sharded
    parameter, also under ``jit`` on a mesh with ``Auto`` axes.
    """
    dtype = canonical_dtype(dtype)
    return jax.tree.map(lambda x: placed_zeros(x, dtype or x.dtype), tree)


def cast(tree: Any, dtype) -> Any:
    """Cast every leaf to ``dtype``; ``dtype=None`` returns ``tree`` unchanged."""
    dtype = canonical_dtype(dtype)
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def cast_like(tree: Any, reference: Any) -> Any:
    """Cast every leaf of ``tree`` to the dtype of the matching leaf of ``reference``."""
    return jax.tree.map(lambda x, r: x.astype(r.dtype), tree, reference)


def update_moment(updates: Any, moments: Any, decay: Any, order: int) -> Any:
    """Exponential moving average of ``g ** order``: ``m = (1 - decay) * g**order + decay * m``."""
    return jax.tree.map(lambda g, m: (1 - decay) * (g**order) + decay * m, updates, moments)


def leaves(tree: Any) -> list:
    """The array leaves of ``tree`` (``None`` leaves dropped)."""
    return jax.tree.leaves(tree)


def global_norm(tree: Any) -> jax.Array:
    """The l2 norm of all leaves of ``tree`` taken together: ``sqrt(sum_i ||x_i||^2)``."""
    squares = [jnp.sum(jnp.real(x * jnp.conj(x))) if jnp.iscomplexobj(x) else jnp.sum(jnp.square(x)) for x in leaves(tree)]
    return jnp.sqrt(sum(squares, jnp.zeros([], jnp.float32)))


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every leaf is finite (a scalar boolean)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in leaves(tree)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


# Per-leaf arithmetic shared by the moment-based building blocks.


def at_least_float32(x: jax.Array) -> jax.Array:
    # bfloat16/float16 moments lose the small (1 - b) * g increments when updated in place.
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def real_at_least_float32(x: jax.Array) -> jax.Array:
    # Second moments are real; Optax keeps them in the (possibly complex) parameter dtype.
    return at_least_float32(jnp.real(x))


# Moment storage policy: a moment is stored in a dtype or 8-bit block-quantized, and always
# computed on in at least float32 (load, update, store).


def resolve_storage(specific: Any, state_dtype: Any) -> Any:
    """The storage of one moment: its own argument (``mu_dtype`` …) when given, else ``state_dtype``."""
    return state_dtype if specific is None else specific


def moment_zeros_like(params: Any, storage: Any = None, *, signed: bool = True) -> Any:
    """Zero moments for ``params`` stored as ``storage``: ``None`` (the parameter dtype), a dtype, or ``Quantized8bit``.

    Under ``Quantized8bit`` each real leaf with at least ``min_size`` elements becomes a
    ``QuantizedArray`` (``signed`` code for first moments, unsigned for second moments); the
    other leaves are plain zeros in at least float32.
    """
    return moment_full_like(params, 0.0, storage, signed=signed)


def moment_full_like(params: Any, value: float, storage: Any = None, *, signed: bool = True) -> Any:
    """Moments filled with ``value >= 0`` (an initial accumulator), stored as ``storage`` (see :func:`moment_zeros_like`)."""
    if not isinstance(storage, _quantize.Quantized8bit):
        zeros = zeros_like(params, storage)
        return zeros if value == 0 else jax.tree.map(lambda z: store(load(z) + value, z), zeros)

    def per_leaf(x):
        if isinstance(x, _packed().Packed):  # per-array blocks: never one block across two arrays
            return _packed().quantized_moment_full(x, value, storage, signed=signed)
        array = unboxed(x)
        if not storage.applies_to(array):
            zeros = zeros_like(x, jnp.promote_types(array.dtype, jnp.float32))
            return zeros if value == 0 else jax.tree.map(lambda z: z + value, zeros)
        full = placed_quantized_full(array, value, signed=signed, block_size=storage.block_size, code=storage.code)
        if array is x:
            return full
        # A boxed parameter (a Flax NNX Variable): box codes and scales apart, so that every box
        # holds one array (nnx.Optimizer and nnx.jit expect a Variable to hold an array).
        box = type(x)
        return _quantize.QuantizedArray(box(full.codes), box(full.scales), full.shape, **full.format)

    return jax.tree.map(per_leaf, params, is_leaf=lambda x: is_box(x) or isinstance(x, _packed().Packed))


def _packed():
    # gradtx.packed imports this module: import it where first needed.
    from gradtx import packed

    return packed


def is_box(x: Any) -> bool:
    """Whether ``x`` is a boxed array (a Flax NNX ``Variable``, duck-typed: gradtx does not import Flax)."""
    return hasattr(x, "get_raw_value") and hasattr(x, "get_metadata")


def unboxed(x: Any) -> Any:
    """The array inside a box (see :func:`is_box`), or ``x`` itself."""
    return x.get_raw_value() if is_box(x) else x


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a block-quantized moment (a ``QuantizedArray``, or a packed buffer's ``QuantizedBuffer``)."""
    return isinstance(x, (_quantize.QuantizedArray, _packed().QuantizedBuffer))


def load(stored: Any) -> jax.Array:
    """A stored moment as an array in at least float32 (dequantized if 8-bit)."""
    if is_quantized(stored):
        phase = _recompute.current()
        return stored.dequantize(phase.salt if phase is not None and _recompute.takes_this_path(stored) else None)
    return at_least_float32(stored)


def store(value: jax.Array, like: Any) -> Any:
    """``value`` stored the way ``like`` is (same dtype, or re-quantized with the same code and blocks).

    The state's structure and dtypes therefore never change across ``update``, nor, under
    ``jit``, the placement of an 8-bit moment (``QuantizedArray.requantize``). Inside
    ``gradtx.state.recompute.map_moments`` an 8-bit moment is stored in phases: its block maxima
    are recorded first and its codes computed with them two phases later.
    """
    if not is_quantized(like):
        return value.astype(like.dtype)
    phase = _recompute.current()
    if phase is None or not _recompute.takes_this_path(like):
        return like.requantize(value)
    if phase.name == "scales":
        phase.scales.append(like.block_scales(value))
    return like.requantize(value, phase.next_scales()) if phase.name == "codes" else _recompute.PENDING


def ema_update(value: jax.Array, previous: jax.Array, decay) -> jax.Array:
    """The moving average ``decay * previous + (1 - decay) * value``, in at least float32."""
    # Optax's operand order: XLA contracts a*b + c*d into a fused multiply-add, and which
    # product it fuses changes the last bit, which training amplifies past 1e-5 parity.
    return (1 - decay) * value + decay * at_least_float32(previous)


def abs_sq(g: jax.Array) -> jax.Array:
    """``|g|^2``, real also for complex ``g``."""
    return jnp.real(g * jnp.conj(g)) if jnp.iscomplexobj(g) else g * g


def bias_correction(decay, count: jax.Array) -> jax.Array:
    """Adam's bias-correction divisor ``1 - decay^t``, a float32 scalar (never in a narrow moment dtype, where it rounds to 0).

    Compute it once per step, outside the per-leaf function, as Optax does: a ``pow`` written
    per leaf is fused into every leaf's kernel and evaluated there to a different last bit,
    and 100 training steps amplify that beyond the 1e-5 parity with Optax.
    """
    return 1 - decay**count


def debias(moment: jax.Array, decay, count: jax.Array) -> jax.Array:
    """Adam's bias correction ``moment / (1 - decay^t)`` (prefer dividing by a precomputed :func:`bias_correction`)."""
    return moment / bias_correction(decay, count).astype(moment.dtype)


def unzip(per_leaf_tuples: Any, like: Any, n: int, *, is_leaf=None) -> tuple:
    """Turn a tree of ``n``-tuples (one per leaf of ``like``) into ``n`` trees shaped like ``like``.

    ``is_leaf`` decides what counts as a leaf of ``like`` (``gradtx.packed`` passes one that
    stops at ``Packed`` nodes, whose per-leaf results are tuples of ``Packed``/``Stacked``).
    """
    outer = jax.tree.structure(like, is_leaf=is_leaf)
    if outer.num_leaves == 0:
        # Every leaf masked out: nothing to transpose (and jax.tree.transpose cannot infer an empty one).
        return (jax.tree.unflatten(outer, []),) * n
    # Up to ``like``'s leaves, not a full transpose: a tuple entry may be a subtree (an 8-bit QuantizedArray).
    per_leaf = outer.flatten_up_to(per_leaf_tuples)
    return tuple(jax.tree.unflatten(outer, [entry[i] for entry in per_leaf]) for i in range(n))


def _is_none(x: Any) -> bool:
    return x is None


def _first_difference(a: Any, b: Any) -> tuple[str | None, str | None]:
    paths_a = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(a, is_leaf=_is_none)[0]]
    paths_b = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(b, is_leaf=_is_none)[0]]
    only_a = [path for path in paths_a if path not in set(paths_b)]
    only_b = [path for path in paths_b if path not in set(paths_a)]
    if only_a or only_b:
        return (only_a[0] if only_a else None), (only_b[0] if only_b else None)
    # Same leaf paths, different containers (a list against a tuple, a dict against a NamedTuple).
    return str(jax.tree.structure(a, is_leaf=_is_none)), str(jax.tree.structure(b, is_leaf=_is_none))


def check_same_structure(owner: str, name_a: str, a: Any, name_b: str, b: Any) -> None:
    """Raise a ``ValueError`` naming the first differing path if trees ``a`` and ``b`` differ.

    ``None`` on either side matches anything (a masked-out update, a missing parameter).
    Runs in Python on the tree structures only: under ``jit`` it costs nothing at run time.
    """
    if jax.tree.structure(a, is_leaf=_is_none) == jax.tree.structure(b, is_leaf=_is_none):
        return
    mismatched = []

    def leaf_against_subtree(path, x, y):
        if x is not None and y is not None and jax.tree.leaves(y, is_leaf=_is_none) != [y]:
            mismatched.append(path)

    try:
        jax.tree_util.tree_map_with_path(leaf_against_subtree, a, b, is_leaf=_is_none)
    except (ValueError, TypeError):
        mismatched.append(None)
    if not mismatched:
        return
    at_a, at_b = _first_difference(a, b)
    if at_a is None:
        difference = f"{name_b}{at_b} has no counterpart in {name_a}"
    elif at_b is None:
        difference = f"{name_a}{at_a} has no counterpart in {name_b}"
    else:
        difference = f"{name_a}{at_a or ' (the root)'} against {name_b}{at_b or ' (the root)'}"
    raise ValueError(f"{owner}: {name_a} and {name_b} must have the same tree structure; first difference: {difference}")


def check_real_params(owner: str, params: Any) -> None:
    """Raise a ``TypeError`` naming the first complex leaf of ``params`` (for optimizers defined only on real numbers)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if jnp.issubdtype(jnp.result_type(leaf.dtype), jnp.complexfloating):
            raise TypeError(
                f"{owner}: params{jax.tree_util.keystr(path)} has dtype {leaf.dtype}, but {owner} supports only real "
                f"parameters (it takes signs or clips ratios, undefined for complex numbers); "
                f"optimize the real and imaginary parts as separate real leaves"
            )


# Placement: state follows the sharding of the array it tracks.


def placed_zeros(x: Any, dtype) -> jax.Array:
    """Zeros of ``x``'s shape in ``dtype``, sharded like ``x`` (:func:`placed_full` with 0)."""
    return placed_full(x, 0, dtype)


def placed_full(x: Any, value: Any, dtype) -> jax.Array:
    """An array of ``x``'s shape in ``dtype`` filled with ``value``, sharded like ``x``.

    A concrete array or a ``ShapeDtypeStruct`` with a sharding lends its sharding directly.
    Under ``jit`` a traced leaf carries its sharding in its type only for ``Explicit`` mesh
    axes; with ``Auto`` axes the zeros (which do not depend on ``x``'s values) would be left
    for XLA to place, and it puts them whole on one device. ``shard_alike`` puts them in one
    sharding group with ``x``, so XLA's propagation gives them ``x``'s sharding. The
    optimization barrier keeps the grouped zeros from being constant-folded into whatever the
    caller computes from them (``zeros + initial_value`` would otherwise lose the group).
    """
    zeros = jax.lax.full_like(x, value, dtype)
    if not isinstance(zeros, jax.core.Tracer):
        return zeros
    zeros = jax.lax.optimization_barrier(zeros)
    if isinstance(x, jax.core.Tracer):
        return shard_alike(x, zeros)[1]
    if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding):
        # A ShapeDtypeStruct with a sharding, closed over by a jitted init.
        return jax.lax.with_sharding_constraint(zeros, x.sharding)
    return zeros


def zeros_like_derived(shapes: Any, params: Any, dtype=None) -> Any:
    """Zeros for state whose shapes are derived from the parameters' (e.g. factored moments), placed like them.

    ``shapes`` is a tree of ``jax.ShapeDtypeStruct`` with the structure of ``params``. A leaf
    with its parameter's shape is placed like the parameter; a leaf with one dimension of
    the parameter dropped (a row or column statistic) like the parameter's slice along that
    dimension, i.e. sharded over the axes of the remaining dimensions. Other leaves (and
    trees whose structure differs from ``params``) get :func:`zeros_like`'s placement.
    """
    if jax.tree.structure(shapes) != jax.tree.structure(params):
        return zeros_like(shapes, dtype)
    dtype = canonical_dtype(dtype)

    def per_leaf(shape, p):
        reference = _derived_reference(p, shape.shape)
        return placed_zeros(shape if reference is None else reference, dtype or shape.dtype)

    return jax.tree.map(per_leaf, shapes, params)


def _derived_reference(p: Any, shape: tuple) -> Any:
    # An array (or traced value) of ``shape`` whose sharding XLA derives from ``p``'s: only its
    # placement is used, and the slice is dead code once the zeros' sharding is decided.
    if tuple(p.shape) == tuple(shape):
        return p
    for dim in range(p.ndim):
        if p.shape[:dim] + p.shape[dim + 1 :] == tuple(shape):
            if isinstance(p, jax.ShapeDtypeStruct):
                return _dropped_dim_struct(p, dim)
            return jax.lax.index_in_dim(p, 0, dim, keepdims=False)
    return None


def _dropped_dim_struct(p: jax.ShapeDtypeStruct, dim: int) -> jax.ShapeDtypeStruct:
    shape = p.shape[:dim] + p.shape[dim + 1 :]
    sharding = p.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = list(sharding.spec) + [None] * (p.ndim - len(sharding.spec))
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*(spec[:dim] + spec[dim + 1 :])))
    elif sharding is not None and not sharding.is_fully_replicated:
        sharding = None
    return jax.ShapeDtypeStruct(shape, p.dtype, sharding=sharding)


def placed_quantized_full(x: Any, value: float, *, signed: bool, block_size: int, code: str) -> _quantize.QuantizedArray:
    """An 8-bit moment for parameter ``x`` holding ``value >= 0``, its codes and scales placed like ``x``.

    In the block layouts (``gradtx.state.quantize.storage_shapes``) the codes have ``x``'s
    shape and are placed like it, and the scales (shaped like ``x``'s leading dimensions, one
    per block) like the matching slice of ``x``: sharded over the mesh axes of those
    dimensions, replicated over the axes of the dimensions a block spans
    (``gradtx.state.quantize.storage_specs``). Under ``jit`` on ``Auto`` axes XLA derives that
    from ``x`` (a dead slice of ``x`` is the scales' reference); for a concrete array, a
    ``ShapeDtypeStruct`` or a traced array sharded in its type (``Explicit`` axes) the
    shardings are computed from its ``NamedSharding``. The flat layout's codes and scales
    follow ``x``'s flattening under ``jit`` on ``Auto`` axes and are replicated otherwise.
    """
    if isinstance(x, jax.core.Tracer):
        typed = _quantize.typed_sharding(x)
        if typed is not None:  # Explicit axes: the sharding is in the type
            x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=typed)
    elif not isinstance(x, jax.ShapeDtypeStruct):
        # Concrete: create codes and scales straight in their shardings (no parameter-sized copy).
        sharding = getattr(x, "sharding", None) if getattr(x, "committed", True) else None
        x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    codes_reference, scales_reference = _quantized_references(x, block_size)
    codes = placed_full(codes_reference, _quantize.fill_code(value, signed, code), jnp.uint8)
    scales = placed_full(scales_reference, value, jnp.float32)
    return _quantize.QuantizedArray(codes, scales, tuple(x.shape), signed, block_size, code)


def _quantized_references(x: Any, block_size: int) -> tuple[Any, Any]:
    # Arrays (or structs) of the codes' and scales' shapes whose placement is the one to give them.
    shape = tuple(x.shape)
    codes_shape, scales_shape = _quantize.storage_shapes(shape, block_size)
    if isinstance(x, jax.ShapeDtypeStruct):
        codes_sharding, scales_sharding = _storage_shardings(x.sharding, shape, block_size)
        return (
            jax.ShapeDtypeStruct(codes_shape, jnp.uint8, sharding=codes_sharding),
            jax.ShapeDtypeStruct(scales_shape, jnp.float32, sharding=scales_sharding),
        )
    k = _quantize.block_dims(shape, block_size)
    if k:
        # Index 0 of every within-block dimension of the blocked view: one element per block.
        return x, x.reshape(_quantize.grouped_shape(shape, block_size))[(Ellipsis,) + (0,) * k]
    flat = x.reshape(-1)
    return flat, flat[::block_size]


def _storage_shardings(sharding: Any, shape: tuple, block_size: int) -> tuple[Any, Any]:
    if isinstance(sharding, jax.sharding.NamedSharding):
        return _quantize.storage_shardings(sharding, shape, block_size)
    # Another kind of sharding: kept where it is whole on every device (one device), else left to JAX.
    kept = sharding if sharding is None or sharding.is_fully_replicated else None
    return (sharding if _quantize.storage_shapes(shape, block_size)[0] == shape else kept), kept
