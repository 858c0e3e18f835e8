"""One 8-bit moment update without a float32 copy of the moment: compute it three times instead.

Storing an updated moment in 8 bits needs its block maxima before a single element can be
encoded, and the step's update needs the float32 moment too. Written plainly,
``m = decay * load(m_prev) + ...; u = f(m); store(m, m_prev)``, XLA on CPU writes ``m`` out in
float32 (one parameter-sized temporary per moment) and reads it back three times, because it
does not repeat a table look-up (the decoding) in each of the loops that consume it.

:func:`map_moments` runs the per-leaf function instead in three phases, each a loop that reads
the gradient and the 8-bit codes again and recomputes the moments in registers:

1. ``scales``: every :func:`gradtx.tree.store` of an 8-bit moment records the block maxima of
   the new value (one fused reduction per moment) and nothing else is kept;
2. ``values``: the function's other outputs (the update) are kept;
3. ``codes``: each 8-bit moment is encoded with the maxima of phase 1.

The later phases decode through a code table offset by a zero that XLA cannot prove zero (taken
from the block maxima of phase 1), a different expression in each, so common-subexpression
elimination cannot merge the phases back into one shared float32 temporary. Measured on one
16M-element AdamW step (2-core CPU, ``benchmarks/RESULTS.md``): 128 MiB of temporaries -> 17
MiB, and faster. The numbers are those of the plain path up to float rounding of the
recomputation (the encoded moments stay nearest-code roundings of the same values).

Only traced 8-bit moments (under ``jit``, per array or packed) in a process with one device take
this path; eager calls and every moment when JAX sees several devices take the plain one. On a
mesh the phases would communicate differently from the plain path (the fused block maxima
all-gather partial maxima where the plain ones all-reduce them, and the hidden zeros read one
element of a sharded array), which has not been measured there yet.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gradtx.state import quantize as _quantize

_local = threading.local()


class _Pending:
    """What :func:`gradtx.tree.store` returns for an 8-bit moment before the ``codes`` phase."""

    def __repr__(self):
        return "<8-bit moment encoded in the codes phase>"


PENDING = _Pending()


class Phase:
    """The phase in progress: its name, the table offset its decodes use, the recorded block maxima."""

    def __init__(self, name: str, salt: Any = None, scales: list | None = None):
        self.name = name
        self.salt = salt
        self.scales = [] if scales is None else scales
        self.used = 0

    def next_scales(self) -> jax.Array:
        scales = self.scales[self.used]
        self.used += 1
        return scales


def current() -> Phase | None:
    """The phase of the :func:`map_moments` call being traced, or ``None``."""
    return getattr(_local, "phase", None)


@contextlib.contextmanager
def _running(phase: Phase):
    previous, _local.phase = current(), phase
    try:
        yield phase
    finally:
        _local.phase = previous


def takes_this_path(x: Any) -> bool:
    """Whether ``x`` is an 8-bit moment stored by recomputation: traced, with one device.

    A ``QuantizedArray``, or a packed buffer's ``QuantizedBuffer`` with at least one quantized run.
    """
    from gradtx.packed import QuantizedBuffer  # gradtx.packed imports gradtx.tree, which imports this module

    if isinstance(x, QuantizedBuffer):
        codes = [q.codes for q in x.runs]
    elif isinstance(x, _quantize.QuantizedArray):
        codes = [x.codes]
    else:
        return False
    return bool(codes) and all(isinstance(c, jax.core.Tracer) for c in codes) and jax.device_count() == 1


def hidden_zero(x: jax.Array, index: int) -> jax.Array:
    """A float32 scalar 0 computed from element ``index`` of ``x`` (0 also for NaN or infinity), which XLA cannot fold."""
    element = jnp.asarray(x, jnp.float32).reshape(-1)[index]
    return jnp.where(jnp.isnan(element), 0.0, jnp.minimum(jnp.abs(element), 0.0))


def tuple_like(template: tuple, values: Any) -> tuple:
    """``values`` as a tuple of ``template``'s type (a named tuple or a plain one)."""
    return type(template)(*values) if hasattr(template, "_fields") else tuple(values)


def _merged(values: Any, codes: Any) -> Any:
    if values is PENDING:
        return codes
    if isinstance(values, tuple):
        return tuple_like(values, [_merged(v, c) for v, c in zip(values, codes)])
    return values


def _map_flattened(step: Callable, leaves: tuple) -> Any:
    """``step(*leaves)`` on the flattened leaves when the 8-bit moments among them have the flat layout, else ``None``.

    An array whose blocks do not tile its trailing dimensions keeps 1-D codes
    (:func:`gradtx.state.quantize.storage_shapes`); decoding them into the array's shape and
    encoding the flattened result put two reshapes between the old codes and the new ones, and
    XLA then copied both moments' codes (2 bytes per parameter). ``step`` is element-wise, so it
    runs on 1-D views instead and its outputs are given the array's shape back.
    """
    moments = [x for x in leaves if isinstance(x, _quantize.QuantizedArray)]
    shape = moments[0].shape if moments else ()
    if len(shape) < 2 or any(q.shape != shape or jnp.ndim(q.codes) != 1 for q in moments):
        return None
    if any(not isinstance(x, _quantize.QuantizedArray) and jnp.shape(x) != shape for x in leaves):
        return None

    def flat(x):
        if isinstance(x, _quantize.QuantizedArray):
            return _quantize.QuantizedArray(x.codes, x.scales, (x.codes.shape[0],), **x.format)
        return jnp.reshape(x, (-1,))

    def restored(x):
        if isinstance(x, _quantize.QuantizedArray):
            return _quantize.QuantizedArray(x.codes, x.scales, shape, **x.format)
        return jnp.reshape(x, shape)

    out = step(*map(flat, leaves))
    return tuple_like(out, map(restored, out)) if isinstance(out, tuple) else restored(out)


def _per_leaf(fn: Callable, *leaves: Any) -> Any:
    if not any(takes_this_path(x) for x in leaves):
        return fn(*leaves)
    from gradtx.packed import map_segments  # gradtx.packed imports gradtx.tree, which imports this module

    by_segment = map_segments(lambda *pieces: _per_leaf(fn, *pieces), leaves)
    if by_segment is not None:
        return by_segment
    flattened = _map_flattened(lambda *flat: _per_leaf(fn, *flat), leaves)
    if flattened is not None:
        return flattened
    with _running(Phase("scales")) as first:
        fn(*leaves)
    if not first.scales:  # fn stored nothing 8-bit
        return fn(*leaves)
    # Zeros from two different elements of the first block maxima: distinct expressions, so the
    # phases' decodings are not merged. (Not from the update: reading it would write it out.)
    reference = jax.tree.leaves(first.scales)[0]  # a QuantizedBuffer records a tuple of scales
    with _running(Phase("values", salt=hidden_zero(reference, 0))):
        values = fn(*leaves)
    with _running(Phase("codes", salt=hidden_zero(reference, -1), scales=first.scales)):
        codes = fn(*leaves)
    return _merged(values, codes)


def map_moments(fn: Callable, tree: Any, *rest: Any) -> Any:
    """``jax.tree.map(fn, tree, *rest)`` for a per-leaf step that loads and stores moments.

    ``fn`` must be pure, element-wise (each output element depends only on the same element
    of each input) and use :func:`gradtx.tree.load` / :func:`gradtx.tree.store` for its
    moments; it returns one output or a tuple. Leaves with 8-bit moments under ``jit`` are
    computed in three phases (module docstring); others with one call. Being element-wise lets
    the phases run on views whose codes keep one shape from the old state to the new one, so
    that XLA updates them in place: a packed buffer segment by segment
    (:func:`gradtx.packed.map_segments`), an array in the flat layout on its flattening.
    """
    return jax.tree.map(lambda *leaves: _per_leaf(fn, *leaves), tree, *rest)
