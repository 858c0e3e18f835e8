"""The packed layout: every parameter array of a pytree in one contiguous 1-D buffer per dtype.

An optimizer update is memory-bound, but with thousands of parameter arrays it pays a fixed
cost per array (one kernel, one loop, one compile-time fusion decision each) that dominates
the time and makes compilation grow super-linearly (``PERF.md``). :func:`pack` removes that
cost: a :class:`Packed` tree has one leaf per dtype, so every elementwise gradtx
transformation, mapped with ``jax.tree.map``, sees a few large leaves and compiles to a few
fused kernels, whatever the number of arrays.

Per-array semantics stay exact. :class:`PackedLayout` (static, hashable: the tree structure
and, for each array, its path, shape, dtype, buffer and offset) orders each buffer by
``(size, shape)``, so arrays of one shape lie side by side in *runs*. A building block that
reduces per array (trust ratios, NovoGrad's layer norm, block RMS, centralization, factored
second moments) lifts its per-array function with :func:`map_arrays`, which ``vmap``\\ s it over
each run seen as a ``(count, *shape)`` array: one kernel per distinct shape instead of one per
array, and the same per-array numbers. Per-array state that is not shaped like its parameter
(a scalar norm, a row of factored moments) is kept per run in a :class:`Stacked` node. An 8-bit
moment (``gradtx.Quantized8bit``) is a :class:`QuantizedBuffer` per buffer: the per-array
``QuantizedArray``\\ s of each run, joined end to end into one ``QuantizedArray`` where each array's
blocks tile it (several such runs merged into one flat group in buffers of many shapes), else
stacked; no block straddles two arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import tree as tree_lib
from gradtx.base import elementwise
from gradtx.state import quantize as quantize_lib
from gradtx.state import recompute


@dataclasses.dataclass(frozen=True)
class LeafSlot:
    """Where one array of the original tree lives: its buffer, offset and size (all static)."""

    path: str
    shape: tuple
    dtype: str
    buffer: int
    offset: int
    size: int


@dataclasses.dataclass(frozen=True)
class Run:
    """Consecutive arrays of one shape in one buffer: ``buffer[offset : offset + count * size]`` is ``(count, *shape)``."""

    buffer: int
    offset: int
    count: int
    shape: tuple
    leaf_indices: tuple  # indices into PackedLayout.slots, in buffer order

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True, eq=False)
class PackedLayout:
    """The static description of a packed tree (hashable: it is the aux data of :class:`Packed`).

    ``slots`` follow the original tree's leaf order; ``runs`` follow buffer order. Equality is
    structural; identical layouts compare by identity first, so that tree-structure checks of
    models with thousands of arrays stay cheap.
    """

    treedef: Any
    slots: tuple
    buffer_dtypes: tuple
    buffer_sizes: tuple
    runs: tuple

    def _key(self) -> tuple:
        return (self.treedef, self.slots, self.buffer_dtypes)

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, PackedLayout) and self._key() == other._key())

    def __hash__(self) -> int:
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash(self._key())

    @property
    def num_arrays(self) -> int:
        return len(self.slots)

    def shapes(self) -> Any:
        """The original tree with a ``jax.ShapeDtypeStruct`` per array (what a ``mask`` callable sees)."""
        return jax.tree.unflatten(self.treedef, [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in self.slots])


def _sort_key(index: int, leaf) -> tuple:
    shape = tuple(int(d) for d in np.shape(leaf))
    return (jnp.dtype(leaf.dtype).name, int(np.prod(shape, dtype=np.int64)), shape, index)


def packed_layout(tree: Any) -> PackedLayout:
    """The :class:`PackedLayout` of ``tree`` (arrays or ``jax.ShapeDtypeStruct`` leaves; ``None`` leaves are empty).

    Args:
        tree: a pytree of arrays of any dtypes and shapes (zero-size and 0-d arrays included).

    Returns:
        The static layout: one buffer per dtype (in order of dtype name), each ordered by
        ``(size, shape, position in the tree)``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> layout = gradtx.packed_layout({"w": jnp.ones((2, 3)), "b": jnp.ones(3)})
        >>> layout.buffer_sizes
        (9,)

    References:
        Rasley et al., 2020. DeepSpeed: System Optimizations Enable Training Deep Learning Models with
        Over 100 Billion Parameters (flattened parameter buffers), https://doi.org/10.1145/3394486.3406703
    """
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    order = sorted(range(len(with_paths)), key=lambda i: _sort_key(i, with_paths[i][1]))
    dtypes = tuple(sorted({jnp.dtype(leaf.dtype).name for _, leaf in with_paths}))
    slots: list = [None] * len(with_paths)
    sizes = [0] * len(dtypes)
    runs: list = []
    for index in order:
        path, leaf = with_paths[index]
        dtype, size, shape, _ = _sort_key(index, leaf)
        buffer = dtypes.index(dtype)
        slots[index] = LeafSlot(jax.tree_util.keystr(path), shape, dtype, buffer, sizes[buffer], size)
        last = runs[-1] if runs else None
        if last is not None and last.buffer == buffer and last.shape == shape:
            runs[-1] = dataclasses.replace(last, count=last.count + 1, leaf_indices=(*last.leaf_indices, index))
        else:
            runs.append(Run(buffer, sizes[buffer], 1, shape, (index,)))
        sizes[buffer] += size
    return PackedLayout(treedef, tuple(slots), dtypes, tuple(sizes), tuple(runs))


@jax.tree_util.register_pytree_with_keys_class
class Packed:
    """A pytree node holding one 1-D buffer per dtype (its children) and the static :class:`PackedLayout` (its aux data).

    ``jax.tree.map`` over a ``Packed`` maps over its few buffers, so elementwise transformations
    fuse into a few kernels. Build one with :func:`pack`, read the arrays back with :func:`unpack`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> packed = gradtx.pack({"w": jnp.ones((2, 2)), "b": jnp.zeros(2)})
        >>> [buffer.shape for buffer in packed.buffers]
        [(6,)]

    References:
        Rasley et al., 2020. DeepSpeed: System Optimizations Enable Training Deep Learning Models with
        Over 100 Billion Parameters (flattened parameter buffers), https://doi.org/10.1145/3394486.3406703
    """

    def __init__(self, buffers: Sequence[Any], layout: PackedLayout):
        self.buffers = tuple(buffers)
        self.layout = layout

    def tree_flatten_with_keys(self):
        keys = [jax.tree_util.GetAttrKey(f"buffer_{name}") for name in self.layout.buffer_dtypes]
        return list(zip(keys, self.buffers)), self.layout

    @classmethod
    def tree_unflatten(cls, layout, buffers):
        return cls(buffers, layout)

    def __repr__(self) -> str:
        return (
            f"Packed({self.layout.num_arrays} arrays in buffers {dict(zip(self.layout.buffer_dtypes, self.layout.buffer_sizes))})"
        )


@jax.tree_util.register_pytree_with_keys_class
class Stacked:
    """Per-array values that are not shaped like their array (a norm, a factored moment), one stacked array per run.

    ``arrays[r]`` has shape ``(run.count, *value_shape)`` for run ``r`` of the layout: the same
    bytes as one value per array, in as many arrays as the layout has distinct shapes.

    References:
        Rasley et al., 2020. DeepSpeed: System Optimizations Enable Training Deep Learning Models with
        Over 100 Billion Parameters (flattened parameter buffers), https://doi.org/10.1145/3394486.3406703
    """

    def __init__(self, arrays: Sequence[Any], layout: PackedLayout):
        self.arrays = tuple(arrays)
        self.layout = layout

    def tree_flatten_with_keys(self):
        return [(jax.tree_util.SequenceKey(i), a) for i, a in enumerate(self.arrays)], self.layout

    @classmethod
    def tree_unflatten(cls, layout, arrays):
        return cls(arrays, layout)

    def __repr__(self) -> str:
        return f"Stacked({len(self.arrays)} runs of {self.layout.num_arrays} arrays)"


def is_packed(x: Any) -> bool:
    """Whether ``x`` is a :class:`Packed` node."""
    return isinstance(x, Packed)


def contains_packed(tree: Any) -> bool:
    """Whether any node of ``tree`` is :class:`Packed` (runs on the structure only: free under ``jit``)."""
    return any(is_packed(x) for x in jax.tree.leaves(tree, is_leaf=is_packed))


def pack(tree: Any, layout: PackedLayout | None = None) -> Packed:
    """Pack the arrays of ``tree`` into one 1-D buffer per dtype: ``buffer = concatenate([ravel(x) for x in run order])``.

    Args:
        tree: a pytree of arrays (``None`` leaves are empty and stay ``None`` after :func:`unpack`).
        layout: a layout from :func:`packed_layout` to reuse (it must describe ``tree``);
            ``None`` computes it.

    Returns:
        A :class:`Packed` node. Packing copies every array once: keep trees packed across steps
        (the Flax helper's ``packed=True`` does) rather than packing at every step.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> packed = gradtx.pack({"w": jnp.ones((2, 2)), "b": jnp.zeros(2)})
        >>> gradtx.unpack(packed)["w"].shape
        (2, 2)

    References:
        Rasley et al., 2020. DeepSpeed: System Optimizations Enable Training Deep Learning Models with
        Over 100 Billion Parameters (flattened parameter buffers), https://doi.org/10.1145/3394486.3406703
    """
    if layout is None:
        layout = packed_layout(tree)
    leaves, treedef = jax.tree.flatten(tree)
    if treedef != layout.treedef:
        raise ValueError(f"pack: tree structure {treedef} differs from the layout's {layout.treedef}")
    buffers = []
    for buffer, dtype in enumerate(layout.buffer_dtypes):
        pieces = [jnp.ravel(leaves[i]) for run in layout.runs if run.buffer == buffer for i in run.leaf_indices]
        buffers.append(jnp.concatenate(pieces) if pieces else jnp.zeros([0], dtype))
    return Packed(buffers, layout)


def unpack(packed: Packed, offsets: Sequence[Any] | None = None) -> Any:
    """The original tree of a :class:`Packed` node: each array a static slice of its buffer, reshaped.

    Args:
        packed: a :class:`Packed` node (its buffers may have another dtype than the packed
            arrays, e.g. a bfloat16 moment; the arrays keep the buffers' dtype).
        offsets: optional int32 scalars, one per array (:func:`slice_offsets`), passed into
            ``jit`` as *arguments*: each slice is then the same program with another offset,
            which XLA compiles once instead of once per array (CPU: ~10 ms per distinct
            slice, i.e. 20 s for 2,048 arrays, against 0.3 s with offsets as arguments).

    Returns:
        The tree with the structure, shapes and order of the tree that was packed.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> gradtx.unpack(gradtx.pack([jnp.arange(3.0), jnp.ones((1, 2))]))[0]
        Array([0., 1., 2.], dtype=float32)

    References:
        Rasley et al., 2020. DeepSpeed: System Optimizations Enable Training Deep Learning Models with
        Over 100 Billion Parameters (flattened parameter buffers), https://doi.org/10.1145/3394486.3406703
    """
    if not is_packed(packed):
        raise TypeError(f"unpack: expected a Packed node (from gradtx.pack), got {type(packed).__name__}")
    layout = packed.layout
    if offsets is None:
        leaves = [jax.lax.slice_in_dim(packed.buffers[s.buffer], s.offset, s.offset + s.size) for s in layout.slots]
    else:
        # Offsets are never negative: no wrap-around select per slice (XLA:CPU compiles 2,048
        # slices in half the time without it).
        buffers = packed.buffers
        leaves = [
            jax.lax.dynamic_slice_in_dim(buffers[s.buffer], o, s.size, allow_negative_indices=False)
            for s, o in zip(layout.slots, offsets)
        ]
    return jax.tree.unflatten(layout.treedef, [x.reshape(s.shape) for x, s in zip(leaves, layout.slots)])


def slice_offsets(layout: PackedLayout) -> list:
    """The offset of every array in its buffer as int32 scalars, to pass to a jitted step for :func:`unpack`."""
    return [np.int32(s.offset) for s in layout.slots]


# Lifting per-array functions onto packed buffers.


def _run_view(x: Any, layout: PackedLayout, run_index: int) -> Any:
    run = layout.runs[run_index]
    if is_packed(x):
        if x.layout != layout:
            raise ValueError("map_arrays: Packed arguments have different layouts (were they packed from different trees?)")
        buffer = x.buffers[run.buffer]
        if isinstance(buffer, QuantizedBuffer):
            raise TypeError(
                "map_arrays: an 8-bit packed moment (QuantizedBuffer) has no per-array view; map over its float32 "
                "value (gradtx.tree.load over the moment, is_leaf=gradtx.tree.is_quantized) and store the result back"
            )
        view = jax.lax.slice_in_dim(buffer, run.offset, run.offset + run.count * run.size).reshape((run.count, *run.shape))
        if jax.default_backend() != "cpu" or jnp.dtype(buffer.dtype).itemsize < 4:
            # Narrow buffers (bfloat16) are left to fuse with what produced them: XLA may then
            # skip a rounding to the narrow dtype, as it does on the per-array path.
            return view
        # On CPU, the barrier keeps XLA from moving the reshape past fn's element-wise operations
        # (its reshape mover): a per-array reduction of a reshaped 1-D computation is a library
        # call (YNNPACK) ~6x slower than the same reduction of an N-D one (19 vs 3 ms for 4,096
        # sums of 4,096 squares; benchmarks/RESULTS.md). The view of a whole buffer is the
        # buffer itself: no copy.
        return jax.lax.optimization_barrier(view)
    if isinstance(x, Stacked):
        return x.arrays[run_index]
    raise TypeError(f"map_arrays: a Packed argument must be matched by Packed or Stacked arguments, got {type(x).__name__}")


def _assemble(outputs: list, kind: str, layout: PackedLayout, owner: str) -> Any:
    if kind == "stacked":
        return Stacked(outputs, layout)
    buffers = []
    for buffer in range(len(layout.buffer_dtypes)):
        pieces = []
        for run, out in zip(layout.runs, outputs):
            if run.buffer != buffer:
                continue
            if tuple(out.shape) != (run.count, *run.shape):
                raise ValueError(f"{owner}: a per-array output of shape {out.shape[1:]} is not shaped like its array {run.shape}")
            pieces.append(out.reshape(-1))
        buffers.append(jnp.concatenate(pieces) if len(pieces) != 1 else pieces[0])
    return Packed(buffers, layout)


def _map_run(fn: Callable, views: list) -> Any:
    if views[0].shape[0] != 1:
        return jax.vmap(fn)(*views)
    # A run of one array: call fn on the array itself. XLA:CPU reduces a (1, n) view along
    # its rows ~15x slower than the same n elements as one array (50 ms vs 3 ms for 16M).
    # A view may be a pytree (a run of 8-bit moments: a QuantizedArray batched along the run).
    return jax.tree.map(lambda out: out[None], fn(*(jax.tree.map(lambda x: x[0], view) for view in views)))


def _map_packed(fn: Callable, n_out: int | None, kinds: tuple, owner: str, first: Packed, *rest) -> Any:
    layout = first.layout
    per_run = [_map_run(fn, [_run_view(x, layout, r) for x in (first, *rest)]) for r in range(len(layout.runs))]
    if n_out is None:
        return _assemble(per_run, kinds[0], layout, owner)
    return tuple(_assemble([out[j] for out in per_run], kinds[j], layout, owner) for j in range(n_out))


def map_arrays(
    fn: Callable, *trees: Any, n_out: int | None = None, kinds: Sequence[str] | None = None, owner: str = "map_arrays"
):
    """Apply a per-array function ``fn`` to every array of ``trees``, packed or not, with per-array semantics.

    On ordinary trees this is ``jax.tree.map(fn, *trees)`` (unzipped into ``n_out`` trees when
    ``fn`` returns an ``n_out``-tuple). Where the first tree is :class:`Packed`, ``fn`` is
    ``vmap``-ed over each run of equal-shape arrays (a static ``(count, *shape)`` view of the
    buffer) and the outputs are reassembled: as a :class:`Packed` buffer (kind ``"packed"``,
    the output must be shaped like its array) or one stacked array per run (kind ``"stacked"``).
    The other trees, at that position, are :class:`Packed` with the same layout or :class:`Stacked`.

    Args:
        fn: the per-array function, written for one array as if nothing were packed.
        *trees: the trees to map over (the first decides where the arrays are).
        n_out: ``None`` if ``fn`` returns one array, else the length of the tuple it returns.
        kinds: per output, ``"packed"`` or ``"stacked"`` (default: all ``"packed"``).
        owner: the public function named in errors.

    Returns:
        One tree, or a tuple of ``n_out`` trees.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> packed = gradtx.pack([jnp.ones(2), 2 * jnp.ones(2)])
        >>> norms = gradtx.map_arrays(jnp.linalg.norm, packed, kinds=("stacked",))
        >>> norms.arrays[0].round(3)
        Array([1.414, 2.828], dtype=float32)

    References:
        Bradbury et al., 2018. JAX: composable transformations of Python+NumPy programs (vmap), https://github.com/jax-ml/jax
    """
    kinds = tuple(kinds) if kinds is not None else ("packed",) * (n_out or 1)
    if len(kinds) != (n_out or 1) or any(k not in ("packed", "stacked") for k in kinds):
        raise ValueError(f"{owner}: kinds must hold one of 'packed', 'stacked' per output, got {kinds!r}")
    if not contains_packed(trees[0]):
        mapped = jax.tree.map(fn, *trees)
        return mapped if n_out is None else tree_lib.unzip(mapped, trees[0], n_out)

    def at_leaf(x, *rest):
        if is_packed(x):
            return _map_packed(fn, n_out, kinds, owner, x, *rest)
        return fn(x, *rest)

    mapped = jax.tree.map(at_leaf, *trees, is_leaf=is_packed)
    return mapped if n_out is None else tree_lib.unzip(mapped, trees[0], n_out, is_leaf=is_packed)


def map_shapes(fn: Callable, tree: Any, n_out: int | None = None) -> Any:
    """Per-array state shapes: ``fn(leaf) -> jax.ShapeDtypeStruct`` (or an ``n_out``-tuple of them) for every array.

    On ordinary trees this is ``jax.tree.map(fn, tree)`` (unzipped). For a :class:`Packed`
    tree ``fn`` is called once per run on a ``jax.ShapeDtypeStruct`` of the run's arrays and
    its shapes are stacked into :class:`Stacked` shapes ``(count, *shape)``; feed the result
    to ``gradtx.tree.zeros_like``.

    Args:
        fn: ``leaf -> jax.ShapeDtypeStruct`` (or tuple), reading only ``leaf.shape`` and ``leaf.dtype``.
        tree: the parameters (packed or not).
        n_out: ``None`` if ``fn`` returns one struct, else the length of the tuple it returns.

    Returns:
        A tree (or ``n_out`` trees) of ``jax.ShapeDtypeStruct``.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> scalar = lambda p: jax.ShapeDtypeStruct((), p.dtype)
        >>> gradtx.map_shapes(scalar, gradtx.pack([jnp.ones(2), jnp.ones(2)])).arrays[0].shape
        (2,)

    References:
        Bradbury et al., 2018. JAX: composable transformations of Python+NumPy programs (vmap), https://github.com/jax-ml/jax
    """

    def stack(x: Packed):
        outputs = []
        for run in x.layout.runs:
            out = fn(jax.ShapeDtypeStruct(run.shape, x.buffers[run.buffer].dtype))
            structs = out if n_out is not None else (out,)
            outputs.append(tuple(jax.ShapeDtypeStruct((run.count, *s.shape), s.dtype) for s in structs))
        stacked = tuple(Stacked([o[j] for o in outputs], x.layout) for j in range(n_out or 1))
        return stacked if n_out is not None else stacked[0]

    mapped = jax.tree.map(lambda x: stack(x) if is_packed(x) else fn(x), tree, is_leaf=is_packed)
    return mapped if n_out is None else tree_lib.unzip(mapped, tree, n_out, is_leaf=is_packed)


def per_element(values: Any, like: Any) -> Any:
    """Each array's value repeated over its elements: a :class:`Packed` tree shaped like ``like`` where ``like`` is packed.

    ``values`` holds one value per array of ``like``: a :class:`Stacked` of ``(count,)``
    arrays where ``like`` is :class:`Packed` (as :func:`map_arrays` with kind ``"stacked"``
    returns for a per-array scalar), a scalar where it is an ordinary array (returned as is:
    it broadcasts). Element-wise work with per-array scalars can then run on the whole 1-D
    buffers: a run's ``(count, *shape)`` view that both feeds a state output and is reshaped
    back made XLA:CPU copy the parameters and the state (NovoGrad, 3x slower).
    """

    def expand(x: Any, value: Any) -> Any:
        if not is_packed(x):
            return value
        runs = x.layout.runs
        repeated = [
            jnp.broadcast_to(v.reshape(-1, *(1,) * len(r.shape)), (r.count, *r.shape)) for r, v in zip(runs, value.arrays)
        ]
        return _assemble(repeated, "packed", x.layout, "per_element")

    return jax.tree.map(expand, like, values, is_leaf=is_packed)


def per_array(owner: str, per_leaf: Callable[..., jax.Array], *, needs_params: bool = False):
    """Lift a per-array function that reduces over its array (a norm, a mean) to a stateless transformation.

    Internal: like ``gradtx.base.elementwise``, but through :func:`map_arrays`, so that on
    :class:`Packed` updates each array keeps its own reduction (one kernel per distinct shape).
    """
    return elementwise(owner, per_leaf, needs_params=needs_params, tree_map=functools.partial(map_arrays, owner=owner))


# Subsets of a packed tree (masked / partition): the selected arrays as a packed tree of their own.


def _spans(layout: PackedLayout, buffer: int, keep: Sequence[bool]) -> list:
    """``(selected, start, stop)`` spans of consecutive arrays of ``buffer`` that are all selected or all not."""
    spans: list = []
    for run in layout.runs:
        if run.buffer != buffer:
            continue
        for index in run.leaf_indices:
            slot = layout.slots[index]
            if spans and spans[-1][0] == keep[index]:
                spans[-1][2] = slot.offset + slot.size
            else:
                spans.append([keep[index], slot.offset, slot.offset + slot.size])
    return spans


def selection_flags(layout: PackedLayout, mask_tree: Any) -> tuple:
    """One boolean per array of ``layout`` from a mask with the original tree's structure (or a prefix of it)."""
    shapes = layout.shapes()
    full = jax.tree.map(lambda keep, sub: jax.tree.map(lambda _: bool(keep), sub), mask_tree, shapes)
    return tuple(layout.treedef.flatten_up_to(full))


@functools.lru_cache(maxsize=256)
def sub_layout(layout: PackedLayout, keep: tuple) -> PackedLayout:
    """The layout of the selected arrays alone (unselected ones become empty ``MaskedNode`` leaves)."""
    from gradtx.combine import MaskedNode

    shapes = [jax.ShapeDtypeStruct(s.shape, s.dtype) if k else MaskedNode() for s, k in zip(layout.slots, keep)]
    return packed_layout(jax.tree.unflatten(layout.treedef, shapes))


def select(x: Packed, keep: tuple) -> Packed:
    """The selected arrays of ``x`` packed on their own (a copy of contiguous spans; no copy if all are selected)."""
    if all(keep):
        return x
    layout = sub_layout(x.layout, keep)
    buffers = []
    for dtype in layout.buffer_dtypes:
        parent = x.layout.buffer_dtypes.index(dtype)
        pieces = [jax.lax.slice_in_dim(x.buffers[parent], a, b) for k, a, b in _spans(x.layout, parent, keep) if k]
        buffers.append(pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces))
    return Packed(buffers, layout)


def merge(x: Packed, selected: Packed, keep: tuple) -> Packed:
    """``x`` with its selected arrays replaced by those of ``selected`` (from :func:`select`'s layout)."""
    if all(keep):
        return selected
    buffers = []
    for parent, dtype in enumerate(x.layout.buffer_dtypes):
        if dtype not in selected.layout.buffer_dtypes:
            buffers.append(x.buffers[parent])
            continue
        source = selected.buffers[selected.layout.buffer_dtypes.index(dtype)]
        pieces, position = [], 0
        for k, a, b in _spans(x.layout, parent, keep):
            if k:
                pieces.append(jax.lax.slice_in_dim(source, position, position + b - a).astype(x.buffers[parent].dtype))
                position += b - a
            else:
                pieces.append(jax.lax.slice_in_dim(x.buffers[parent], a, b))
        buffers.append(pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces))
    return Packed(buffers, x.layout)


def per_array_random(fn: Callable, key: jax.Array, tree: Any) -> Any:
    """``fn(key_i, leaf_i)`` with one key per array of the original tree, packed back if ``tree`` is :class:`Packed`.

    Random probes (Hutchinson's estimator) then draw the same numbers packed or not: the keys
    are split per array of the original tree, not per buffer.
    """
    original = tree.layout.shapes() if is_packed(tree) else tree
    leaves, treedef = jax.tree.flatten(original)
    keys = jax.random.split(key, len(leaves))
    drawn = treedef.unflatten([fn(k, leaf) for k, leaf in zip(keys, leaves)])
    return pack(drawn, tree.layout) if is_packed(tree) else drawn


# Converting optimizer states between the per-array and the packed layout.


def _is_node(x: Any) -> bool:
    return isinstance(x, (Packed, Stacked))


def _stacked(trees: Sequence[Any]) -> Any:
    # Equal-structure trees (arrays, QuantizedArrays) stacked leaf by leaf along a new first axis.
    return jax.tree.map(lambda *values: jnp.stack(values), *trees)


def _entry(tree: Any, position: int) -> Any:
    # The inverse of _stacked: entry ``position`` of every leaf.
    return jax.tree.map(lambda x: x[position], tree)


def _joined(pieces: list, dtype) -> jax.Array:
    # 1-D pieces end to end (none: an empty array of ``dtype``).
    if not pieces:
        return jnp.zeros([0], dtype)
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)


def _joined_shape(run: Run, block_size: int) -> tuple | None:
    """The shape an 8-bit run is stored in when joined (:class:`QuantizedBuffer`), or ``None`` (stacked).

    A run of arrays in the block layout (codes shaped like the array) is stored as their
    concatenation along the first axis, ``(count * shape[0], *shape[1:])``: that shape has the
    same block layout, whose blocks are the per-array blocks in order.
    """
    if not quantize_lib.block_dims(run.shape, block_size):
        return None
    return (run.count * run.shape[0], *run.shape[1:])


# A packed buffer's 8-bit moment is stored as entries (QuantizedBuffer.quantized): tuples of
# consecutive run indices, each stored as one QuantizedArray: one run joined or stacked, or
# several runs of the block layout merged into one flat group.


def _entry_span(layout: PackedLayout, entry: tuple) -> tuple[int, int]:
    """The elements ``[start, stop)`` of the buffer that an entry's runs cover."""
    last = layout.runs[entry[-1]]
    return layout.runs[entry[0]].offset, last.offset + last.count * last.size


def _stored_shape(layout: PackedLayout, entry: tuple, block_size: int) -> tuple | None:
    """The shape of an entry's ``QuantizedArray`` when it covers its span as one array; ``None`` for a stacked run.

    A flat group of runs is 1-D; a single run in the block layout is joined (:func:`_joined_shape`).
    """
    if len(entry) > 1:
        start, stop = _entry_span(layout, entry)
        return (stop - start,)
    return _joined_shape(layout.runs[entry[0]], block_size)


def _direct_arrays(q: Any, layout: PackedLayout, entry: tuple) -> dict:
    """``{slot index: its per-array QuantizedArray}`` for an entry stored as one array (joined run or flat group)."""
    codes, scales = q.codes.reshape(-1), q.scales.reshape(-1)
    arrays, at, blocks_at = {}, 0, 0
    for r in entry:
        run = layout.runs[r]
        codes_shape, scales_shape = quantize_lib.storage_shapes(run.shape, q.block_size)
        blocks = run.size // q.block_size
        for index in run.leaf_indices:
            array_codes = jax.lax.slice_in_dim(codes, at, at + run.size).reshape(codes_shape)
            array_scales = jax.lax.slice_in_dim(scales, blocks_at, blocks_at + blocks).reshape(scales_shape)
            arrays[index] = quantize_lib.QuantizedArray(array_codes, array_scales, tuple(run.shape), **q.format)
            at, blocks_at = at + run.size, blocks_at + blocks
    return arrays


def _entries(layout: PackedLayout, buffer: int, runs: tuple, block_size: int) -> tuple:
    """How the quantized ``runs`` of a buffer are stored: one entry per run, unless that makes more segments than XLA:CPU fuses.

    With more than :data:`_FUSED_CONCATENATION` segments (distinct quantized shapes, and
    unquantized arrays between them), consecutive runs in the block layout are merged into
    flat groups, so that the update of the buffer is assembled from fewer pieces
    (:func:`_written_end_to_end`).
    """
    entries = tuple((r,) for r in runs)
    if len(_plan(layout, buffer, entries)[0]) <= _FUSED_CONCATENATION:
        return entries
    mergeable = {r for r in runs if _joined_shape(layout.runs[r], block_size) is not None}
    in_buffer = [r for r, run in enumerate(layout.runs) if run.buffer == buffer]
    merged: list = []
    for r in runs:
        previous = merged[-1][-1] if merged else None
        adjacent = previous is not None and in_buffer.index(r) == in_buffer.index(previous) + 1
        if adjacent and r in mergeable and previous in mergeable:
            merged[-1] = (*merged[-1], r)
        else:
            merged.append((r,))
    return tuple(merged)


def _stack_runs(per_leaf: list, layout: PackedLayout) -> Stacked:
    return Stacked([_stacked([per_leaf[i] for i in run.leaf_indices]) for run in layout.runs], layout)


def _unstack_runs(stacked: Stacked) -> Any:
    layout = stacked.layout
    per_leaf: list = [None] * layout.num_arrays
    for run, values in zip(layout.runs, stacked.arrays):
        for position, index in enumerate(run.leaf_indices):
            per_leaf[index] = _entry(values, position)
    return jax.tree.unflatten(layout.treedef, per_leaf)


def pack_state(tx: Any, state: Any, layout: PackedLayout) -> Any:
    """Convert ``state`` (``tx``'s state over per-array parameters) into ``tx``'s state over packed ones.

    Every state entry that ``tx.init`` keeps per parameter (moments, per-array norms, factored
    rows) is packed with ``layout`` (or stacked per run); counters and other scalars are kept.
    The values are copied, so a run can switch to the packed layout mid-training.

    Args:
        tx: the gradient transformation whose state this is.
        state: ``tx``'s state for the per-array parameters described by ``layout``.
        layout: the :func:`packed_layout` of the parameters.

    Returns:
        The state that ``tx.init(pack(params))`` would build, holding the values of ``state``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
        >>> tx = gradtx.adam(1e-3)
        >>> packed_state = gradtx.pack_state(tx, tx.init(params), gradtx.packed_layout(params))
        >>> packed_state[0].mu
        Packed(2 arrays in buffers {'float32': 6})

    References:
        Rasley et al., 2020. DeepSpeed: System Optimizations Enable Training Deep Learning Models with
        Over 100 Billion Parameters (flattened parameter buffers), https://doi.org/10.1145/3394486.3406703
    """
    shapes = Packed([jax.ShapeDtypeStruct((n,), d) for n, d in zip(layout.buffer_sizes, layout.buffer_dtypes)], layout)
    template = jax.eval_shape(tx.init, shapes)

    def convert(node, values):
        if is_packed(node) and any(isinstance(b, QuantizedBuffer) for b in node.buffers):
            return _pack_quantized(node, node.layout.treedef.flatten_up_to(values))
        if is_packed(node):
            return pack(values, node.layout)
        if isinstance(node, Stacked):
            return _stack_runs(node.layout.treedef.flatten_up_to(values), node.layout)
        return values

    try:
        return jax.tree.map(convert, template, state, is_leaf=_is_node)
    except ValueError as error:
        raise ValueError(f"pack_state: state does not have the structure of tx.init(params) for this layout; {error}") from error


def unpack_state(state: Any) -> Any:
    """The per-array form of a packed state: every :class:`Packed` unpacked and every :class:`Stacked` split per array.

    Args:
        state: a state built on packed parameters (or any tree holding packed nodes).

    Returns:
        The state ``tx.init(params)`` would build on the unpacked parameters, with these values.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> packed = gradtx.pack({"w": jnp.ones(2)})
        >>> gradtx.unpack_state(gradtx.adam(1e-3).init(packed))[0].mu
        {'w': Array([0., 0.], dtype=float32)}

    References:
        Rasley et al., 2020. DeepSpeed: System Optimizations Enable Training Deep Learning Models with
        Over 100 Billion Parameters (flattened parameter buffers), https://doi.org/10.1145/3394486.3406703
    """

    def convert(x):
        if is_packed(x) and any(isinstance(b, QuantizedBuffer) for b in x.buffers):
            per_leaf = {index: value for b in x.buffers for index, value in b.per_array().items()}
            return jax.tree.unflatten(x.layout.treedef, [per_leaf[i] for i in range(x.layout.num_arrays)])
        return unpack(x) if is_packed(x) else _unstack_runs(x) if isinstance(x, Stacked) else x

    return jax.tree.map(convert, state, is_leaf=_is_node)


# 8-bit moments of packed buffers: quantized array by array, never across arrays.


@functools.lru_cache(maxsize=256)
def _plan(layout: PackedLayout, buffer: int, quantized: tuple) -> tuple[tuple, dict]:
    """The buffer's segments in order, and the position in ``rest`` of each unquantized array.

    ``quantized`` are the entries (tuples of run indices, :func:`_entries`). Segments are
    ``("rest", start, stop, at)`` (consecutive unquantized arrays, at ``at`` in ``rest``; the
    layout sorts by size, so they are usually one prefix) and ``("run", k)`` (entry ``k``).
    """
    segments: list = []
    positions: dict = {}
    entry_of = {r: k for k, entry in enumerate(quantized) for r in entry}
    for r, run in enumerate(layout.runs):
        if run.buffer != buffer:
            continue
        if r in entry_of:
            if quantized[entry_of[r]][0] == r:
                segments.append(("run", entry_of[r]))
            continue
        at = sum(s[2] - s[1] for s in segments if s[0] == "rest")
        positions.update({i: at + layout.slots[i].offset - run.offset for i in run.leaf_indices})
        stop = run.offset + run.count * run.size
        if segments and segments[-1][0] == "rest":
            segments[-1] = ("rest", segments[-1][1], stop, segments[-1][3])
        else:
            segments.append(("rest", run.offset, stop, at))
    return tuple(segments), positions


@jax.tree_util.register_pytree_with_keys_class
class QuantizedBuffer:
    r"""The 8-bit moment of one packed buffer, quantized array by array: the per-array ``QuantizedArray``\ s of each run, joined or stacked.

    Under ``gradtx.Quantized8bit`` a moment of a :class:`Packed` tree holds one
    ``QuantizedBuffer`` per buffer. Blocks never straddle two arrays: each run of equal-shape
    arrays that the policy quantizes holds exactly the per-array codes and scales, as one
    ``QuantizedArray``:

    - *joined* where the arrays have the block layout (codes shaped like the array,
      :func:`gradtx.state.quantize.storage_shapes`: most weight matrices): the arrays
      concatenated along their first axis, one ``QuantizedArray`` of shape
      ``(count * shape[0], *shape[1:])`` whose blocks are the per-array blocks in order;
    - otherwise *stacked*: batched along the run (codes ``(count, *codes_shape)``, scales
      ``(count, *scales_shape)``, the array's shape as metadata), re-quantized with ``vmap``;
    - where one entry per run would split the buffer into more segments than XLA:CPU fuses
      into one concatenation (8), consecutive runs in the block layout are merged into one
      *flat group*: a 1-D ``QuantizedArray`` over their stretch of the buffer, whose blocks are
      still the per-array blocks (every array's size is a multiple of the block size).

    ``quantized`` lists the entries, each a tuple of run indices. The arrays the policy leaves unquantized (under ``min_size``) are one 1-D ``rest`` array
    in at least float32. Loading gives the whole buffer in float32, so element-wise building
    blocks update it as one array. The numbers and the bytes are those of the per-array
    state, and :func:`pack_state` / :func:`unpack_state` convert exactly.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> params = gradtx.pack({"w": jnp.zeros((64, 128)), "b": jnp.zeros(128), "e": jnp.zeros((50, 100))})
        >>> tx = gradtx.adam(1e-3, state_dtype=gradtx.Quantized8bit())
        >>> mu = tx.init(params)[0].mu.buffers[0]
        >>> mu.rest.shape, [(q.codes.shape, q.scales.shape) for q in mu.runs]
        ((128,), [((1, 5000), (1, 20)), ((64, 128), (32,))])

    References:
        Dettmers et al., 2022. 8-bit Optimizers via Block-wise Quantization, https://arxiv.org/abs/2110.02861
    """

    def __init__(self, rest: Any, runs: Sequence[Any], layout: PackedLayout, buffer: int, quantized: tuple):
        self.rest = rest
        self.runs = tuple(runs)
        self.layout = layout
        self.buffer = buffer
        self.quantized = quantized  # entries: tuples of indices into layout.runs, one per QuantizedArray in runs

    def tree_flatten_with_keys(self):
        children = [(jax.tree_util.GetAttrKey("rest"), self.rest)]
        keys = [f"run_{e[0]}" if len(e) == 1 else f"runs_{e[0]}_to_{e[-1]}" for e in self.quantized]
        children += [(jax.tree_util.GetAttrKey(key), q) for key, q in zip(keys, self.runs)]
        return children, (self.layout, self.buffer, self.quantized)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], children[1:], *aux)

    def __repr__(self) -> str:
        return f"QuantizedBuffer({len(self.runs)} quantized runs, rest {tuple(getattr(self.rest, 'shape', ()))})"

    @classmethod
    def full(cls, like: Any, layout: PackedLayout, buffer: int, value: float, storage: Any, signed: bool) -> QuantizedBuffer:
        """Buffer ``buffer``'s moment (``like`` is the buffer or its struct) filled with ``value >= 0``, exactly as per array."""
        dtype = jnp.dtype(like.dtype)
        runs_8bit = tuple(
            r
            for r, run in enumerate(layout.runs)
            if run.buffer == buffer and storage.applies_to(jax.ShapeDtypeStruct(run.shape, dtype))
        )
        quantized = _entries(layout, buffer, runs_8bit, storage.block_size)
        fill = functools.partial(quantize_lib.full, value=value, signed=signed, block_size=storage.block_size, code=storage.code)
        runs = []
        for entry in quantized:
            shape = _stored_shape(layout, entry, storage.block_size)
            if shape is not None:
                runs.append(fill(shape))
            else:
                run = layout.runs[entry[0]]
                runs.append(jax.tree.map(lambda x, n=run.count: jnp.broadcast_to(x, (n, *x.shape)), fill(run.shape)))
        rest_size = sum(s[2] - s[1] for s in _plan(layout, buffer, quantized)[0] if s[0] == "rest")
        rest = jnp.full((rest_size,), value, jnp.promote_types(dtype, jnp.float32))
        return cls(rest, runs, layout, buffer, quantized)

    def dequantize(self, salt: Any = None) -> jax.Array:
        """The whole buffer's moment as one 1-D array in at least float32 (``salt``: see ``gradtx.state.recompute``)."""
        decode = functools.partial(quantize_lib.QuantizedArray.dequantize, salt=salt)
        pieces = []
        for segment in _plan(self.layout, self.buffer, self.quantized)[0]:
            if segment[0] == "rest":
                _, start, stop, at = segment
                pieces.append(jax.lax.slice_in_dim(self.rest, at, at + stop - start))
            else:
                # The recomputation (salt given) vmaps also over a run of one array: XLA:CPU then
                # vectorizes its loops, which it did not with the array taken out of the run
                # (measured 94 vs 20 ms for one 16M-element encoding).
                q = self.runs[segment[1]]
                if self._entry_view(segment[1])[2]:
                    values = decode(q)
                else:
                    values = _map_run(decode, [q]) if salt is None else jax.vmap(decode)(q)
                pieces.append(values.reshape(-1).astype(self.rest.dtype))
        return _joined(pieces, self.rest.dtype)

    def _entry_view(self, k: int) -> tuple[int, int, bool, tuple]:
        """Entry ``k``'s span ``(start, stop)`` of the buffer, whether it is stored as one array (not stacked), and its values' shape."""
        entry, q = self.quantized[k], self.runs[k]
        direct = _stored_shape(self.layout, entry, q.block_size) is not None
        run = self.layout.runs[entry[0]]
        return (*_entry_span(self.layout, entry), direct, q.shape if direct else (run.count, *run.shape))

    def _run_views(self, value: jax.Array) -> list:
        # (its old QuantizedArray, whether it is one array (not stacked), value's elements of it in its stored shape), per entry.
        views = []
        for k, old in enumerate(self.runs):
            start, stop, direct, shape = self._entry_view(k)
            views.append((old, direct, jax.lax.slice_in_dim(value, start, stop).reshape(shape)))
        return views

    def block_scales(self, value: jax.Array) -> tuple:
        """The scales each quantized run of ``value`` (the whole buffer's moment, 1-D) gets, fused with its computation."""
        scales = []
        for old, joined, view in self._run_views(value):
            of = functools.partial(quantize_lib.block_scales, signed=old.signed, block_size=old.block_size, fused=True)
            scales.append(of(view) if joined else jax.vmap(of)(view))
        return tuple(scales)

    def requantize(self, value: jax.Array, scales: tuple | None = None) -> QuantizedBuffer:
        """``value`` (the whole buffer's moment, 1-D) stored like this moment: each run re-quantized on its own blocks.

        ``scales`` (from :meth:`block_scales`) are used instead of computing them again.
        """
        runs = []
        for k, (old, joined, view) in enumerate(self._run_views(value)):
            if scales is None:
                encode = functools.partial(quantize_lib.quantize_blockwise, **old.format)
                runs.append(encode(view) if joined else _map_run(encode, [view]))
                continue
            encode = functools.partial(quantize_lib.encode_with_scales, **old.format)
            codes = encode(view, scales[k]) if joined else jax.vmap(encode)(view, scales[k])
            runs.append(quantize_lib.QuantizedArray(codes, scales[k], old.shape, **old.format))
        rest = [
            jax.lax.slice_in_dim(value, segment[1], segment[2])
            for segment in _plan(self.layout, self.buffer, self.quantized)[0]
            if segment[0] == "rest"
        ]
        rest = _joined(rest, self.rest.dtype)
        return QuantizedBuffer(rest.astype(self.rest.dtype), runs, self.layout, self.buffer, self.quantized)

    def per_array(self) -> dict:
        """``{slot index: the array's moment}``, a ``QuantizedArray`` or an unquantized array, as ``tx.init`` builds per array."""
        segments, positions = _plan(self.layout, self.buffer, self.quantized)
        arrays = {}
        for entry, q in zip(self.quantized, self.runs):
            if _stored_shape(self.layout, entry, q.block_size) is not None:
                arrays.update(_direct_arrays(q, self.layout, entry))
                continue
            for position, index in enumerate(self.layout.runs[entry[0]].leaf_indices):
                arrays[index] = _entry(q, position)
        for index, at in positions.items():
            slot = self.layout.slots[index]
            arrays[index] = jax.lax.slice_in_dim(self.rest, at, at + slot.size).reshape(slot.shape)
        return arrays


def map_segments(step: Callable, leaves: tuple) -> Any:
    """``step(*leaves)`` segment by segment of the packed 8-bit moments among ``leaves``, or ``None``.

    For an element-wise ``step`` (each output element depends on the same element of each
    input) whose leaves are one buffer's arrays and :class:`QuantizedBuffer` moments of one
    segmentation (``None`` otherwise, or when nothing is quantized): ``step`` is called on
    each segment on its own, the unquantized arrays' stretch with plain slices, a joined run
    with its ``QuantizedArray`` and a stacked run ``vmap``-ped over its arrays, as the
    per-array path does. Outputs that a run returns as ``QuantizedArray`` are reassembled into
    a ``QuantizedBuffer``, the others into one 1-D buffer. The whole-buffer form decodes every
    segment into one concatenated float32 moment, which XLA writes out (4 bytes per parameter
    per moment) once more than one segment reads it.
    """
    moments = [x for x in leaves if isinstance(x, QuantizedBuffer)]
    first = moments[0] if moments else None
    if first is None or not first.runs:
        return None

    def segmentation(m):
        return m.layout, m.buffer, m.quantized, tuple(q.block_size for q in m.runs)

    if any(segmentation(m) != segmentation(first) for m in moments):
        return None
    layout, results = first.layout, []
    plain = [x for x in leaves if not isinstance(x, QuantizedBuffer)]
    if any(jnp.shape(x) != (layout.buffer_sizes[first.buffer],) for x in plain):
        return None
    # An int32 0 XLA cannot fold, from the first plain leaf's first element.
    zero = recompute.hidden_zero(plain[0], 0).astype(jnp.int32) if plain else 0

    def segment_of(x, start, stop):
        # A dynamic slice at an offset XLA cannot fold: where x is a concatenation (the packed
        # gradients of a training step), XLA rewrites a static slice at its operands' boundaries
        # into a second concatenation of those operands, written out (4 bytes per element).
        return jax.lax.dynamic_slice_in_dim(x, start + zero, stop - start)

    for segment in _plan(layout, first.buffer, first.quantized)[0]:
        if segment[0] == "rest":
            _, start, stop, at = segment
            pieces = [
                jax.lax.slice_in_dim(x.rest, at, at + stop - start)
                if isinstance(x, QuantizedBuffer)
                else segment_of(x, start, stop)
                for x in leaves
            ]
            results.append((segment, step(*pieces)))
            continue
        k = segment[1]
        start, stop, direct, shape = first._entry_view(k)
        pieces = [x.runs[k] if isinstance(x, QuantizedBuffer) else segment_of(x, start, stop).reshape(shape) for x in leaves]
        results.append((segment, step(*pieces) if direct else jax.vmap(step)(*pieces)))
    single = not isinstance(results[0][1], tuple)
    outputs = [(segment, (out,) if single else tuple(out)) for segment, out in results]
    assembled = []
    for j in range(len(outputs[0][1])):
        entries = [(segment, out[j]) for segment, out in outputs]
        if any(isinstance(value, quantize_lib.QuantizedArray) for segment, value in entries if segment[0] == "run"):
            rest = [value for segment, value in entries if segment[0] == "rest"]
            rest = _joined(rest, rest[0].dtype if rest else first.rest.dtype)
            runs = [value for segment, value in entries if segment[0] == "run"]
            assembled.append(QuantizedBuffer(rest, runs, layout, first.buffer, first.quantized))
        else:
            assembled.append(_written_end_to_end([jnp.reshape(value, (-1,)) for _, value in entries]))
    return assembled[0] if single else recompute.tuple_like(results[0][1], assembled)


_FUSED_CONCATENATION = 8  # XLA:CPU fuses a concatenation of at most this many pieces into its consumer


def _written_end_to_end(pieces: list) -> jax.Array:
    """The 1-D ``pieces`` end to end, as XLA:CPU best fuses them with their producers and consumers.

    Up to 8 pieces, one ``concatenate``, which XLA:CPU fuses into its consumer: nothing is
    written out. Beyond 8 it does not fuse a concatenation (it would look each element's operand
    up in a tree), so it would write out every piece and then the concatenation (8 bytes per
    element); each piece is instead written in place into one buffer (4 bytes per element).
    Measured on a buffer of 17 segments (24.7M parameters, 8-bit AdamW, 2-core CPU): 96 instead
    of 189 MiB of temporaries, 97 instead of 134 ms per step.
    """
    if len(pieces) <= _FUSED_CONCATENATION:
        return _joined(pieces, pieces[0].dtype)
    out, at = jnp.empty((sum(x.shape[0] for x in pieces),), pieces[0].dtype), 0
    for piece in pieces:
        out = jax.lax.dynamic_update_slice_in_dim(out, piece, at, 0)
        at += piece.shape[0]
    return out


def quantized_moment_full(x: Packed, value: float, storage: Any, *, signed: bool) -> Packed:
    """An 8-bit moment of the packed parameters ``x`` holding ``value >= 0``: one :class:`QuantizedBuffer` per buffer.

    Internal: ``gradtx.tree.moment_full_like`` calls it for :class:`Packed` parameters under
    ``gradtx.Quantized8bit``, so every moment-based building block gets per-array blocks.
    """
    buffers = [QuantizedBuffer.full(b, x.layout, i, value, storage, signed) for i, b in enumerate(x.buffers)]
    return Packed(buffers, x.layout)


def _pack_quantized(template: Packed, per_leaf: list) -> Packed:
    """The packed 8-bit moment (shaped like ``template``) holding the per-array moments ``per_leaf`` (slot order)."""
    layout = template.layout
    buffers = []
    for like in template.buffers:
        positions = _plan(layout, like.buffer, like.quantized)[1]
        runs = []
        for entry, like_run in zip(like.quantized, like.runs):
            indices = [i for r in entry for i in layout.runs[r].leaf_indices]
            arrays = [_checked_quantized(layout.slots[i], per_leaf[i], like_run) for i in indices]
            if _stored_shape(layout, entry, like_run.block_size) is None:
                runs.append(_stacked(arrays))
                continue
            codes, scales = (jnp.concatenate([jnp.ravel(x) for x in xs]) for xs in zip(*((a.codes, a.scales) for a in arrays)))
            codes, scales = codes.reshape(like_run.codes.shape), scales.reshape(like_run.scales.shape)
            runs.append(quantize_lib.QuantizedArray(codes, scales, like_run.shape, **like_run.format))
        rest = [jnp.ravel(_checked_plain(layout.slots[i], per_leaf[i], like.rest)) for i in sorted(positions, key=positions.get)]
        rest = _joined(rest, like.rest.dtype)
        buffers.append(QuantizedBuffer(rest, runs, layout, like.buffer, like.quantized))
    return Packed(buffers, layout)


def _checked_quantized(slot: LeafSlot, value: Any, template: Any) -> Any:
    # ``template``: the run's QuantizedArray in the packed state tx.init builds (joined or stacked).
    def signature(q):
        return (q.shape, q.signed, q.block_size, q.code, *((tuple(x.shape), jnp.dtype(x.dtype)) for x in (q.codes, q.scales)))

    codes_shape, scales_shape = quantize_lib.storage_shapes(slot.shape, template.block_size)
    expected = (slot.shape, template.signed, template.block_size, template.code)
    expected += ((codes_shape, jnp.dtype(jnp.uint8)), (scales_shape, jnp.dtype(jnp.float32)))
    if not isinstance(value, quantize_lib.QuantizedArray) or signature(value) != expected:
        raise ValueError(
            f"the moment of params{slot.path} must be a QuantizedArray of shape {slot.shape} "
            f"(signed={template.signed}, block_size={template.block_size}, code={template.code!r}) as tx.init builds it, got {_describe(value)}"
        )
    return value


def _checked_plain(slot: LeafSlot, value: Any, rest: Any) -> Any:
    # No silent cast: an unquantized moment is in the dtype tx.init gives it (at least float32).
    found = None if isinstance(value, quantize_lib.QuantizedArray) else (tuple(jnp.shape(value)), jnp.dtype(value.dtype))
    if found != (slot.shape, jnp.dtype(rest.dtype)):
        raise ValueError(
            f"the moment of params{slot.path} must be an unquantized {jnp.dtype(rest.dtype).name} array "
            f"of shape {slot.shape} (under the policy's min_size) as tx.init builds it, got {_describe(value)}"
        )
    return value


def _describe(value: Any) -> str:
    if isinstance(value, quantize_lib.QuantizedArray):
        return repr(value)
    return f"{type(value).__name__} of shape {tuple(jnp.shape(value))} and dtype {jnp.result_type(value).name}"
