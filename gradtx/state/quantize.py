"""Block-wise 8-bit storage of optimizer moments (Dettmers et al., 2022).

An array is cut, in row-major order, into blocks of ``block_size`` (256) consecutive elements; each
block keeps one float32 scale, its largest magnitude (absmax), and one byte per element: the
index of the nearest value of a 256-entry code to ``x / absmax``. Two codes (``CODES``):

* ``"power"`` (the default): a uniform grid in a power of the value. First moments (signed):
  ``sign(k) (k / 127)^2`` for ``k = -127..127``; second moments (unsigned): ``(k / 255)^4`` for
  ``k = 0..255``. The relative step is ``2 / |k|`` (``4 / k``): 1.6% at the block's absmax,
  16% at 1/100 of it (signed), 5% at 1/100 and 16% at 1/10,000 of it (unsigned); values down
  to ``3.1e-5`` (``1.2e-10``) of the absmax stay non-zero. Encoding is exact nearest-code
  rounding in closed form (one (two) square roots and a ``floor``, :func:`_power_index`);
  decoding is arithmetic (a square), no table look-up.
* ``"dynamic"``: the dynamic code of bitsandbytes' ``create_dynamic_map`` (re-derived here, not
  copied): 7 decades ``[10^(d-7), 10^(d-6)]``, ``d = 0..6``, each cut into equal bins whose
  midpoints are the code values, with more bins in the upper decades, plus 0 and 1 (signed:
  ``2^d`` bins in decade ``d`` and their negatives, 0, 1; unsigned: ``2^(d+1)`` bins, 0, 1).
  Finest near the absmax (1.4% / 0.7% of it in the top decade) but coarse in the lower decades
  (up to 28% / 14% relative steps one decade down). Encoding is closed-form (7 threshold
  comparisons and one ``floor``, exact nearest-code rounding); decoding is a table look-up.

Why ``"power"`` is the default (``benchmarks/code_accuracy.py``, ``benchmarks/RESULTS.md``): on
the first and second moments of real training runs (the character-level LM and the digits MLP
of ``benchmarks/memory_quality.py``) it gives a smaller error in the Adam direction
``m / sqrt(v)`` than the dynamic code (the second moments of a block spread over many decades,
where the dynamic code's lower decades are coarse, and it rounds more small second moments to
zero: the "zero-point problem" of second moments, Li et al., 2023), the same final losses as
float32 moments, and a faster step: its decoding is arithmetic, so XLA writes the new codes in
place of the old ones instead of copying them.

References: Dettmers et al., 2022, 8-bit Optimizers via Block-wise Quantization,
https://arxiv.org/abs/2110.02861; Li et al., 2023, Memory Efficient Optimizers with 4-bit
States, https://arxiv.org/abs/2309.01507.

Stored codes are indices into the ascending code table (:func:`code_table`), as in
bitsandbytes: 0 has the same index (127 signed, 0 unsigned) in both codes.

Layout (what makes 8-bit moments shardable): when blocks tile the trailing dimensions of the
array (its last dimension is a multiple of ``block_size``, or divides it with whole groups of
rows; :func:`block_dims`), the codes keep the array's shape and the scales are shaped like its
leading dimensions (``(64, 1024) -> (64, 4)``, ``(64, 128) -> (32,)``), so both can be sharded
like the parameter. Other shapes (scalars, blocks straddling rows) keep a flat layout: codes of
``prod(shape)`` and ``ceil(prod(shape) / block_size)`` scales. The blocks, hence the numbers and
the bytes, are the same in both layouts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.shard_alike import shard_alike

from gradtx import _checks

DECADES = 7


def _decade_bins(signed: bool) -> list[int]:
    """Number of code values in each decade ``d = 0..6`` (the smallest decade first)."""
    return [2**d if signed else 2 ** (d + 1) for d in range(DECADES)]


def _positive_codes(signed: bool) -> np.ndarray:
    """The positive code values, ascending, 1.0 excluded: the bin midpoints of every decade (float64)."""
    values = []
    for d, bins in enumerate(_decade_bins(signed)):
        edges = np.linspace(0.1, 1.0, bins + 1)
        values.append(10.0 ** (d - (DECADES - 1)) * (edges[:-1] + edges[1:]) / 2)
    return np.concatenate(values)


def dynamic_code(signed: bool) -> np.ndarray:
    """The 256 values of the dynamic code, ascending, as float32 (bitsandbytes' ``create_dynamic_map``)."""
    positive = _positive_codes(signed)
    negative = -positive[::-1] if signed else np.zeros(0)
    table = np.concatenate([negative, [0.0], positive, [1.0]])
    assert table.size == 256
    return table.astype(np.float32)


SIGNED_CODE = dynamic_code(signed=True)
UNSIGNED_CODE = dynamic_code(signed=False)
# Index of 0 in each table (the same in both codes): a zero-initialised moment stores these codes.
SIGNED_ZERO = int(np.flatnonzero(SIGNED_CODE == 0)[0])
UNSIGNED_ZERO = int(np.flatnonzero(UNSIGNED_CODE == 0)[0])

CODES = ("power", "dynamic")
DEFAULT_CODE = "power"
# The power code's grid: k / 127 (signed, k = -127..127, stored as k + 127) or k / 255 (unsigned).
_POWER_STEPS = {True: 127, False: 255}


def check_code(owner: str, code: Any) -> None:
    """Raise ``ValueError`` naming ``owner`` unless ``code`` is one of ``CODES``."""
    if code not in CODES:
        raise ValueError(f"{owner}: code must be one of {CODES}, got {code!r}")


def power_code(signed: bool) -> np.ndarray:
    """The 256 values of the power code, ascending, as float32: ``sign(k) (k/127)^2`` at index ``k + 127``, or ``(k/255)^4``.

    The signed code's last index (255, ``k = 128``, above 1) is never produced by encoding.
    """
    if signed:
        k = np.arange(256, dtype=np.float64) - SIGNED_ZERO
        return (np.sign(k) * (k / _POWER_STEPS[True]) ** 2).astype(np.float32)
    return ((np.arange(256, dtype=np.float64) / _POWER_STEPS[False]) ** 4).astype(np.float32)


def code_table(code: str, signed: bool) -> np.ndarray:
    """The 256 values, ascending (float32), that the stored indices of ``code`` (one of ``CODES``) stand for."""
    return power_code(signed) if code == "power" else dynamic_code(signed)


def top_code(code: str, signed: bool) -> int:
    """The stored index of the code value 1 (a block's absmax)."""
    return SIGNED_ZERO + _POWER_STEPS[True] if code == "power" and signed else 255


def _encoder_constants(signed: bool) -> list[tuple[float, float, float, int]]:
    """Per decade: (decision threshold below it, multiplier, offset, rank of its first code).

    Inside decade ``d`` (``b`` bins) the bin of a magnitude ``a`` is ``floor(a * multiplier - offset)``
    with ``multiplier = b / (0.9 * 10^(d-6))`` and ``offset = 0.1 b / 0.9``. The threshold is the
    midpoint between the previous decade's last code (or 0) and this decade's first code, so
    choosing the decade by threshold keeps nearest-code rounding across decade boundaries.
    """
    positive = _positive_codes(signed)
    constants, rank, previous = [], 1, 0.0
    for d, bins in enumerate(_decade_bins(signed)):
        scale = 10.0 ** (d - (DECADES - 1))
        first = positive[rank - 1]
        constants.append(((previous + first) / 2, bins / (0.9 * scale), 0.1 * bins / 0.9, rank))
        rank += bins
        previous = positive[rank - 2]
    return constants


_SIGNED_CONSTANTS = _encoder_constants(signed=True)
_UNSIGNED_CONSTANTS = _encoder_constants(signed=False)
# Between the largest code below 1 and 1 itself.
_SIGNED_ONE_THRESHOLD = (float(_positive_codes(True)[-1]) + 1.0) / 2
_UNSIGNED_ONE_THRESHOLD = (float(_positive_codes(False)[-1]) + 1.0) / 2


def _magnitude_rank(a: jax.Array, signed: bool) -> jax.Array:
    """Rank of the code nearest to ``a`` in ``[0, 1]`` among ``0, positive codes..., 1`` (int32)."""
    constants = _SIGNED_CONSTANTS if signed else _UNSIGNED_CONSTANTS
    # The decade's constants by a chain of compares: measured as fast on CPU as a look-up in a
    # 32K-entry table keyed by the float's top bits, and exact by construction.
    multiplier, offset, first = jnp.float32(0), jnp.float32(0), jnp.int32(0)
    for threshold, decade_multiplier, decade_offset, decade_first in constants:
        inside = a >= jnp.float32(threshold)
        multiplier = jnp.where(inside, jnp.float32(decade_multiplier), multiplier)
        offset = jnp.where(inside, jnp.float32(decade_offset), offset)
        first = jnp.where(inside, jnp.int32(decade_first), first)
    # A decade's bin count equals its first rank (signed) or first rank + 1 (unsigned).
    last_bin = first - 1 if signed else first
    in_decade = jnp.clip(jnp.floor(a * multiplier - offset).astype(jnp.int32), 0, last_bin)
    rank = jnp.where(first > 0, first + in_decade, 0)
    one_rank = 128 if signed else 255
    return jnp.where(a >= jnp.float32(_SIGNED_ONE_THRESHOLD if signed else _UNSIGNED_ONE_THRESHOLD), one_rank, rank)


def _power_index(a: jax.Array, signed: bool) -> jax.Array:
    """The grid index ``k`` (float32) of the power-code value nearest to ``a`` in ``[0, 1]``.

    With ``x = a * steps^p``, the nearest ``k^p`` is ``k`` with ``g(k - 1/2) <= x < g(k + 1/2)``,
    where ``g(y) = ((y - 1/2)^p + (y + 1/2)^p) / 2`` is the midpoint between two neighbouring
    codes; so ``k = floor(g^-1(x) + 1/2)``, in closed form: ``g^-1(x) = sqrt(x - 1/4)`` for
    squares, ``sqrt(sqrt(x + 1/2) - 3/4)`` for fourth powers (``g(y) = y^4 + 3y^2/2 + 1/16``).
    Exact nearest-value rounding (up to float32 rounding at ties) at the cost of the roots alone:
    a floor of the root followed by a comparison with the midpoint gives the same codes, but its
    longer chain of dependent instructions made the encoding loop ~20% slower on CPU.
    """
    steps = _POWER_STEPS[signed]
    x = a * jnp.float32(steps**2 if signed else steps**4)
    y = jnp.sqrt(_positive_part(x - 0.25 if signed else jnp.sqrt(x + 0.5) - 0.75))
    k = jnp.floor(y + 0.5)
    return jnp.where(k < steps, k, jnp.float32(steps))


def _positive_part(x: jax.Array) -> jax.Array:
    # A compare and a select: XLA:CPU lowers ``jnp.maximum`` to a NaN-propagating maximum, several
    # instructions per vector on x86 (a NaN gives 0 here; its block's scale is NaN anyway).
    return jnp.where(x > 0, x, 0.0)


@dataclasses.dataclass(frozen=True)
class Quantized8bit:
    """The 8-bit block-quantized storage policy for optimizer moments; pass it as a state dtype.

    Anywhere gradtx accepts a moment's storage dtype (``mu_dtype``, ``nu_dtype``,
    ``accumulator_dtype``, ``state_dtype``), ``gradtx.Quantized8bit()`` stores that moment in
    8 bits per element plus one float32 scale per block of ``block_size`` elements (first moments
    with the signed code, second moments with the unsigned one). Arithmetic stays in
    float32: each step dequantizes, updates, and re-quantizes. The code is the ``"power"`` code
    (square / fourth-power grid, the default) or bitsandbytes' ``"dynamic"`` map (module
    docstring of ``gradtx.state.quantize``; the default was chosen by measured accuracy on real
    moments and speed, ``benchmarks/RESULTS.md``). Arrays with fewer than
    ``min_size`` elements (biases, norms) and complex arrays are stored unquantized in at least
    float32: they are a negligible share of memory and the most sensitive to rounding. Where the
    blocks tile a parameter's trailing dimensions (its last dimension a multiple of
    ``block_size``, or dividing it), the codes keep the parameter's shape and the scales its
    leading dimensions' (:func:`storage_shapes`), so 8-bit moments are sharded like their
    parameter on a device mesh.

    Args:
        block_size: elements per block sharing one scale, a positive int (256 as in bitsandbytes).
        min_size: arrays with fewer elements stay in float32, a non-negative int (4096).
        code: ``"power"`` (default) or ``"dynamic"``. The code is part of the state's structure:
            a checkpoint restores into a state built with the code it was saved with (8-bit
            states saved before ``"power"`` became the default hold ``"dynamic"`` codes).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.adamw(1e-3, state_dtype=gradtx.Quantized8bit())
        >>> state = tx.init({"w": jnp.zeros((256, 256))})
        >>> round(gradtx.state_bytes_per_parameter(state, {"w": jnp.zeros((256, 256))}), 3)
        2.031

    References:
        Dettmers et al., 2022. 8-bit Optimizers via Block-wise Quantization, https://arxiv.org/abs/2110.02861
    """

    block_size: int = 256
    min_size: int = 4096
    code: str = DEFAULT_CODE

    def __post_init__(self):
        for name, low in (("block_size", 1), ("min_size", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Quantized8bit: {name} must be an int >= {low}, got {value!r}")
        check_code("Quantized8bit", self.code)

    def applies_to(self, leaf: Any) -> bool:
        """Whether a parameter leaf (array or ``ShapeDtypeStruct``) gets 8-bit storage under this policy."""
        size = math.prod(jnp.shape(leaf))
        return size >= max(self.min_size, 1) and jnp.issubdtype(leaf.dtype, jnp.floating)


@jax.tree_util.register_pytree_node_class
class QuantizedArray:
    """A block-quantized array: ``codes`` (uint8, one per element) and ``scales`` (float32, one per block).

    A pytree whose children are the two arrays and whose static metadata is the original
    ``shape``, the ``signed``-ness of the code and the ``block_size``; so it passes through
    ``jit``, ``jax.tree.map`` over a state, donation, and checkpointing (Orbax) like any other
    state, and :func:`gradtx.state_bytes` counts its true size.

    The arrays are shaped by :func:`storage_shapes`: ``codes`` like the array and ``scales``
    like its leading dimensions when blocks tile its trailing ones (so both can be sharded like
    the parameter), else flat.

    Args:
        codes: uint8 array of indices into the code table, of shape ``shape`` or ``(prod(shape),)``.
        scales: float32 array of the block absmax values, one per block of ``block_size`` row-major elements.
        shape: the shape of the array it stands for.
        signed: whether the signed (first-moment) or unsigned (second-moment) code is used.
        block_size: elements per block.
        code: the code the indices refer to, one of ``CODES`` (``"power"``).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> q = gradtx.quantize_blockwise(jnp.linspace(-1.0, 1.0, 512), signed=True)
        >>> q.codes.dtype, q.scales.shape
        (dtype('uint8'), (2,))
        >>> gradtx.quantize_blockwise(jnp.ones((3, 1024)), signed=False)
        QuantizedArray(shape=(3, 1024), unsigned power code, block_size=256, codes (3, 1024), scales (3, 4))

    References:
        Dettmers et al., 2022. 8-bit Optimizers via Block-wise Quantization, https://arxiv.org/abs/2110.02861
    """

    def __init__(self, codes, scales, shape: tuple[int, ...], signed: bool, block_size: int, code: str = DEFAULT_CODE):
        check_code("QuantizedArray", code)
        self.codes = codes
        self.scales = scales
        self.shape = tuple(shape)
        self.signed = signed
        self.block_size = block_size
        self.code = code

    @property
    def dtype(self):
        """The dtype the array decodes to: float32."""
        return jnp.dtype(jnp.float32)

    def dequantize(self, salt: Any = None) -> jax.Array:
        """The float32 array this stands for (:func:`dequantize_blockwise`).

        ``salt``, a traced zero, offsets the code table so that XLA keeps this decoding apart
        from the others of the step (``gradtx.state.recompute``).
        """
        if salt is None:
            return dequantize_blockwise(self)
        return _decode(self.codes, self.scales, **self.format, shape=self.shape, salt=salt)

    @property
    def format(self) -> dict:
        """``signed``, ``block_size`` and ``code``: the keyword arguments that quantize a value like this array."""
        return {"signed": self.signed, "block_size": self.block_size, "code": self.code}

    def block_scales(self, value: jax.Array) -> jax.Array:
        """The scales ``value`` gets with this array's code and blocks, computed fused with ``value``, placed like its scales."""
        return placed_alike(self.scales, block_scales(value, signed=self.signed, block_size=self.block_size, fused=True))

    def requantize(self, value: jax.Array, scales: jax.Array | None = None) -> QuantizedArray:
        """``value`` quantized like this array (same code and blocks) and placed like it.

        ``scales`` (from :meth:`block_scales`) are used instead of computing them again.
        Under ``jit`` the new codes and scales are put in one sharding group with the old ones
        (block maxima of a flat layout, or of blocks spanning a sharded dimension, would
        otherwise be placed anew by XLA, and the next step would recompile).
        """
        if scales is None:
            new = quantize_blockwise(value, **self.format)
            codes, scales = new.codes, placed_alike(self.scales, new.scales)
        else:
            codes = encode_with_scales(value, scales, **self.format)
        return QuantizedArray(placed_alike(self.codes, codes), scales, self.shape, **self.format)

    def tree_flatten(self):
        return (self.codes, self.scales), (self.shape, self.signed, self.block_size, self.code)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def __repr__(self):
        kind = "signed" if self.signed else "unsigned"
        codes, scales = (tuple(getattr(x, "shape", ())) for x in (self.codes, self.scales))
        return f"QuantizedArray(shape={self.shape}, {kind} {self.code} code, block_size={self.block_size}, codes {codes}, scales {scales})"


# Layout. A block is always ``block_size`` consecutive elements in row-major order (so the
# numbers and the bytes per element never depend on the layout); the layout only decides how
# ``codes`` and ``scales`` are shaped. When blocks tile the trailing dimensions, ``codes`` keeps
# the array's shape and ``scales`` the shape of its leading dimensions, so both can be sharded
# like the array (and element-wise code on a sharded moment needs no data movement).


def block_dims(shape: tuple[int, ...], block_size: int) -> int:
    """How many trailing dimensions of ``shape`` one block spans, ``k >= 1``; 0 for the flat layout.

    ``k`` is the smallest count such that ``prod(shape[-k+1:])`` divides ``block_size`` and
    ``block_size`` divides ``prod(shape[-k:])``: blocks never straddle an index of the leading
    ``ndim - k`` dimensions. ``k = 1`` when the last dimension is a multiple of ``block_size``
    (blocks inside rows); ``k = 2`` when it divides ``block_size`` and the rows group evenly
    (a block is ``block_size / shape[-1]`` whole rows). Scalars, and shapes whose blocks straddle
    rows (``(3, 384)`` or ``(768, 50257)`` with 256), have none: they keep the flat layout.
    """
    inner = 1  # the product of the trailing k - 1 dimensions
    for k in range(1, len(shape) + 1):
        if block_size % inner:
            return 0
        if (shape[-k] * inner) % block_size == 0:
            return k
        inner *= shape[-k]
    return 0


def grouped_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """``shape`` with dimension ``-k`` split into (blocks along it, its part of one block), ``k = block_dims(...) >= 1``.

    A block is then one index of the first ``ndim - k + 1`` dimensions of this view, and the
    scales have exactly that shape.
    """
    shape = tuple(shape)
    d = len(shape) - block_dims(shape, block_size)
    group = block_size // math.prod(shape[d + 1 :])
    return shape[:d] + (shape[d] // group, group) + shape[d + 1 :]


def storage_shapes(shape: tuple[int, ...], block_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of ``codes`` and ``scales`` for an array of ``shape``.

    With ``k = block_dims(shape, block_size) >= 1``: ``shape`` and ``shape[:-k]`` plus the number
    of blocks along dimension ``-k``, e.g. ``(64, 1024) -> (64, 4)``, ``(64, 128) -> (32,)``.
    Otherwise flat: ``(prod(shape),)`` and ``(ceil(prod(shape) / block_size),)``.
    """
    shape = tuple(shape)
    k = block_dims(shape, block_size)
    if k:
        return shape, grouped_shape(shape, block_size)[: len(shape) - k + 1]
    size = math.prod(shape)
    return (size,), (-(-size // block_size),)


def _reduce_blocks(blocks: jax.Array, axes: tuple[int, ...], signed: bool, fused: bool = False) -> jax.Array:
    if not fused:
        # max and -min, not max(|x|): XLA CPU vectorizes plain max/min reductions, not max(abs).
        largest = jnp.max(blocks, axis=axes)
        return jnp.maximum(largest, -jnp.min(blocks, axis=axes)) if signed else jnp.maximum(largest, 0.0)
    # One variadic reduction of (max, min) (signed) or (max, max) (unsigned): XLA on CPU hands a
    # single max reduction to a library call that needs its input written out (a float32
    # temporary of the moment when the input is a freshly updated moment), while a variadic one
    # is a loop with the element-wise producer fused in (and as fast). Partitioned across
    # devices it all-gathers partial maxima where the plain form all-reduces them, so only the
    # one-device recomputation path (gradtx.state.recompute) uses it.
    low = jnp.array(-jnp.inf, blocks.dtype)
    second = jnp.minimum if signed else jnp.maximum
    largest, other = jax.lax.reduce(
        (blocks, blocks),
        (low, -low if signed else low),
        lambda x, y: (jnp.maximum(x[0], y[0]), second(x[1], y[1])),
        axes,
    )
    return jnp.maximum(largest, -other) if signed else jnp.maximum(jnp.maximum(largest, other), 0.0)


def _block_absmax(values: jax.Array, block_size: int, signed: bool, fused: bool = False) -> jax.Array:
    """One float32 scale per block: the largest magnitude (signed) or the largest value, at least 0 (unsigned).

    ``values`` is the array (a block layout) or its flattening (the flat layout).
    """
    k = block_dims(values.shape, block_size)
    if k:
        grouped = grouped_shape(values.shape, block_size)
        return _reduce_blocks(values.reshape(grouped), tuple(range(len(grouped) - k, len(grouped))), signed, fused)
    size = values.shape[0]
    full = size - size % block_size
    parts = [_reduce_blocks(values[:full].reshape(-1, block_size), (1,), signed, fused)] if full else []
    if full < size:
        parts.append(_reduce_blocks(values[full:].reshape(1, -1), (1,), signed, fused))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _per_element(per_block: jax.Array, shape: tuple[int, ...], block_size: int) -> jax.Array:
    """Each block's value repeated over its elements, in the layout's element shape (``shape`` or flat)."""
    # A repeat written as broadcast-then-merge fuses into the surrounding element-wise loop; a
    # (blocks, 256) view of the values does not.
    if block_dims(shape, block_size):
        grouped = grouped_shape(shape, block_size)
        trailing = len(grouped) - per_block.ndim
        return jnp.broadcast_to(per_block.reshape(per_block.shape + (1,) * trailing), grouped).reshape(shape)
    size = math.prod(shape)
    blocks = per_block.shape[0]
    if blocks == 1:  # one (partial) block: a plain broadcast, no padded repeat to slice (and reshard)
        return jnp.broadcast_to(per_block, (size,))
    return jnp.broadcast_to(per_block[:, None], (blocks, block_size)).reshape(blocks * block_size)[:size]


def quantize_blockwise(x: jax.Array, *, signed: bool, block_size: int = 256, code: str = DEFAULT_CODE) -> QuantizedArray:
    r"""Quantize ``x`` to 8 bits per element with one float32 absmax scale per block of ``block_size``.

    .. math::

        s_b = \max_{i \in b} |x_i|, \qquad c_i = \arg\min_k |q_k - x_i / s_b|

    with :math:`q` the signed or unsigned table of ``code`` (see the module docstring). With
    ``signed=False`` negative values are rounded to 0. A block is ``block_size`` consecutive
    elements in row-major order; the codes keep ``x``'s shape and the scales are shaped like
    its leading dimensions when blocks tile its trailing ones (:func:`storage_shapes`), so a
    sharded ``x`` gives codes and scales sharded alike; other shapes are stored flat.

    Args:
        x: a real array of any shape (computed in float32).
        signed: use the signed code (first moments) or the unsigned one (second moments).
        block_size: elements per block, a positive int.
        code: ``"power"`` (default) or ``"dynamic"`` (bitsandbytes' map).

    Returns:
        A :class:`QuantizedArray`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> x = jnp.array([0.5, -1.0, 0.01, 0.0])
        >>> q = gradtx.quantize_blockwise(x, signed=True, block_size=4)
        >>> [round(v, 4) for v in gradtx.dequantize_blockwise(q).tolist()]
        [0.5022, -1.0, 0.0105, 0.0]
        >>> q = gradtx.quantize_blockwise(jnp.ones((64, 128)), signed=True)
        >>> q.codes.shape, q.scales.shape  # blocks of two rows
        ((64, 128), (32,))

    References:
        Dettmers et al., 2022. 8-bit Optimizers via Block-wise Quantization, https://arxiv.org/abs/2110.02861
    """
    check_code("quantize_blockwise", code)
    shape = tuple(jnp.shape(x))
    encode = functools.partial(_encode, signed=signed, block_size=block_size, code=code)
    specs = _explicit_specs(x, block_size)
    if specs is not None:
        # Sharding in types (Explicit axes): the blocked view's reshapes have no typed sharding
        # when blocks span shards, so XLA partitions the codec (as on Auto axes) and the
        # results are typed with the layout's shardings.
        encode = jax.sharding.auto_axes(encode, out_sharding=specs)
    codes, scales = encode(jnp.asarray(x, jnp.float32))
    return QuantizedArray(codes, scales, shape, signed, block_size, code)


def _encode(x: jax.Array, *, signed: bool, block_size: int, code: str) -> tuple[jax.Array, jax.Array]:
    scales = block_scales(x, signed=signed, block_size=block_size)
    return encode_with_scales(x, scales, signed=signed, block_size=block_size, code=code), scales


def _layout_values(x: jax.Array, block_size: int) -> jax.Array:
    # The array itself (block layout) or its flattening (flat layout).
    return x if storage_shapes(x.shape, block_size)[0] == x.shape else x.reshape(-1)


def block_scales(x: jax.Array, *, signed: bool, block_size: int, fused: bool = False) -> jax.Array:
    """The scales :func:`quantize_blockwise` gives ``x`` (float32): each block's absmax (signed) or max, at least 0.

    ``fused=True`` computes them with one variadic reduction that XLA on CPU fuses with the
    computation of ``x`` (no float32 copy of ``x``); same numbers, for one device.
    """
    return _block_absmax(_layout_values(jnp.asarray(x, jnp.float32), block_size), block_size, signed, fused)


def encode_with_scales(x: jax.Array, scales: jax.Array, *, signed: bool, block_size: int, code: str) -> jax.Array:
    """The codes of ``x`` (uint8, shaped like the layout's codes) given its block ``scales``: nearest-code rounding of ``x / scale``."""
    values = _layout_values(jnp.asarray(x, jnp.float32), block_size)
    inverse = jnp.where(scales > 0, 1 / jnp.where(scales > 0, scales, 1), 0.0)
    normalized = values * _per_element(inverse, values.shape, block_size)
    magnitude = jnp.abs(normalized) if signed else _positive_part(normalized)
    if code == "power":
        k = _power_index(magnitude, signed)
        index = jnp.float32(SIGNED_ZERO) + jnp.where(normalized < 0, -k, k) if signed else k
        return index.astype(jnp.uint8)
    rank = _magnitude_rank(magnitude, signed)
    if signed:
        # The table is [negatives descending..., 0, positives..., 1]: 0 sits at index 127 and -1 is absent.
        codes = jnp.where(normalized < 0, SIGNED_ZERO - jnp.minimum(rank, SIGNED_ZERO), SIGNED_ZERO + rank)
    else:
        codes = rank
    return codes.astype(jnp.uint8)


def dequantize_blockwise(q: QuantizedArray) -> jax.Array:
    r"""The float32 array a :class:`QuantizedArray` stands for: :math:`x_i = q_{c_i} s_b` (:math:`q` its code's table).

    Args:
        q: a :class:`QuantizedArray`.

    Returns:
        A float32 array of shape ``q.shape``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> q = gradtx.quantize_blockwise(jnp.array([4.0, 2.0]), signed=False, block_size=2)
        >>> [round(v, 4) for v in gradtx.dequantize_blockwise(q).tolist()]
        [4.0, 1.9841]
        >>> q = gradtx.quantize_blockwise(jnp.array([4.0, 2.0]), signed=False, block_size=2, code="dynamic")
        >>> [round(v, 4) for v in gradtx.dequantize_blockwise(q).tolist()]
        [4.0, 1.9891]

    References:
        Dettmers et al., 2022. 8-bit Optimizers via Block-wise Quantization, https://arxiv.org/abs/2110.02861
    """
    decode = functools.partial(_decode, **q.format, shape=q.shape)
    specs = _explicit_specs(jax.ShapeDtypeStruct(q.shape, jnp.float32, sharding=typed_sharding(q.codes)), q.block_size)
    if specs is not None and q.codes.shape == q.shape:
        decode = jax.sharding.auto_axes(decode, out_sharding=specs[0])
    return decode(q.codes, q.scales)


def _decode(
    codes: jax.Array, scales: jax.Array, *, signed: bool, block_size: int, code: str, shape: tuple[int, ...], salt: Any = None
) -> jax.Array:
    # ``salt``, a traced zero, keeps XLA from merging this decoding with another (gradtx.state.recompute).
    if code == "power":
        # Arithmetic, so that XLA can write the new codes over the old ones (it copies codes read by a gather).
        steps = _POWER_STEPS[signed]
        # One addition per element: the salt is 0 and the codes integers, so it is exact.
        offset = (0.0 if salt is None else salt) - (SIGNED_ZERO if signed else 0)
        k = codes.astype(jnp.float32) + offset
        if signed:
            normalized = k * jnp.abs(k) * jnp.float32(1 / steps**2)  # exactly 1 at k = 127
        else:
            k = k * jnp.float32(1 / steps)
            normalized = (k * k) * (k * k)  # exactly 1 at 255
    else:
        table = jnp.asarray(SIGNED_CODE if signed else UNSIGNED_CODE)
        if salt is not None:
            table = table + salt
        normalized = table[codes.astype(jnp.int32)]
    return (normalized * _per_element(scales, codes.shape, block_size)).reshape(shape)


def placed_alike(reference: Any, x: jax.Array) -> jax.Array:
    """``x`` in one sharding group with ``reference`` under ``jit`` (same shape), else ``x`` unchanged."""
    if isinstance(x, jax.core.Tracer) and isinstance(reference, jax.core.Tracer) and reference.shape == x.shape:
        return shard_alike(reference, x)[1]
    return x


def storage_specs(spec: Any, axis_sizes: Any, shape: tuple[int, ...], block_size: int) -> tuple[Any, Any]:
    """The partition specs of ``codes`` and ``scales`` for an array of ``shape`` partitioned by ``spec``.

    ``axis_sizes`` maps mesh axis names to sizes. Codes shaped like the array take ``spec``;
    scales take its entries on the leading dimensions and, on the dimension the blocks run
    along, its entry when every shard holds whole blocks; the mesh axes of the dimensions inside
    a block are dropped (each device then holds a part of every block, and block maxima are
    combined across them). The flat layout's arrays are replicated.
    """
    P = jax.sharding.PartitionSpec
    entries = list(spec) + [None] * (len(shape) - len(spec))
    codes_shape, _ = storage_shapes(shape, block_size)
    k = block_dims(shape, block_size)
    if not k:
        return (P(*entries) if codes_shape == tuple(shape) else P()), P()
    along = len(shape) - k
    entry = entries[along]
    axes = () if entry is None or entry is P.UNCONSTRAINED else (entry,) if isinstance(entry, str) else tuple(entry)
    if not axes or grouped_shape(shape, block_size)[along] % math.prod(axis_sizes[a] for a in axes):
        entry = None
    return P(*entries), P(*entries[:along], entry)


def typed_sharding(x: Any) -> Any:
    """The ``NamedSharding`` in ``x``'s type on a mesh with ``Explicit`` axes, else ``None``."""
    try:
        sharding = jax.typeof(x).sharding
    except TypeError:
        return None
    mesh = getattr(sharding, "mesh", None)
    return sharding if mesh is not None and not mesh.empty and mesh.explicit_axes else None


def _explicit_specs(x: Any, block_size: int) -> Any:
    # Codes' and scales' NamedShardings when x is sharded in its type (Explicit axes), else None.
    sharding = x.sharding if isinstance(x, jax.ShapeDtypeStruct) else typed_sharding(x)
    if sharding is None or all(e is None for e in sharding.spec):
        return None
    return storage_shardings(sharding, tuple(jnp.shape(x)), block_size)


def storage_shardings(sharding: Any, shape: tuple[int, ...], block_size: int) -> tuple[Any, Any]:
    """The ``NamedSharding`` objects of ``codes`` and ``scales`` for an array of ``shape`` with ``NamedSharding`` ``sharding``."""
    specs = storage_specs(sharding.spec, dict(sharding.mesh.shape), shape, block_size)
    return tuple(jax.sharding.NamedSharding(sharding.mesh, spec) for spec in specs)


def fill_code(value: float, signed: bool, code: str) -> int:
    """The code of every element of a block filled with ``value >= 0`` and scaled by ``value``: 1, or 0."""
    return top_code(code, signed) if value > 0 else (SIGNED_ZERO if signed else UNSIGNED_ZERO)


def full(shape: tuple[int, ...], value: float, *, signed: bool, block_size: int, code: str) -> QuantizedArray:
    """A :class:`QuantizedArray` holding ``value >= 0`` everywhere, exactly: code 1 (or 0) times scale ``value``.

    Codes and scales have the shapes of :func:`storage_shapes`; they are unplaced constants
    (``gradtx.tree.moment_full_like`` places them like a parameter).
    """
    codes_shape, scales_shape = storage_shapes(shape, block_size)
    codes = jnp.full(codes_shape, fill_code(value, signed, code), jnp.uint8)
    return QuantizedArray(codes, jnp.full(scales_shape, value, jnp.float32), shape, signed, block_size, code)


def check_storage(owner: str, name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a moment storage: ``None``, a floating dtype, or :class:`Quantized8bit`."""
    if isinstance(value, Quantized8bit):
        return
    try:
        _checks.dtype(owner, name, value)
    except ValueError as error:
        raise ValueError(f"{error}; for 8-bit storage pass gradtx.Quantized8bit(...)") from None
