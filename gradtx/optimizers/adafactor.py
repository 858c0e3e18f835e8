"""Adafactor (Shazeer & Stern, 2018): a second moment stored as row and column factors, with update clipping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import _checks, packed, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule, identity
from gradtx.combine import chain
from gradtx.state import quantize
from gradtx.transforms.clipping import clip_by_block_rms
from gradtx.transforms.decay import add_decayed_weights
from gradtx.transforms.momentum import ema
from gradtx.transforms.scaling import scale, scale_by_learning_rate

_PLACEHOLDER_SHAPE = (1,)


class FactoredState(NamedTuple):
    """State of :func:`factored_second_moment`: the step counter, the row and column factors, and the unfactored second moments."""

    count: jax.Array
    v_row: Any
    v_col: Any
    v: Any


def _power_decay(step: jax.Array, exponent) -> jax.Array:
    """Adafactor's second-moment decay :math:`\\hat\\beta_{2,t} = 1 - t^{-c}` at ``t = step + 1``."""
    # Add in float32: ``step + 1`` in int32 wraps to -2**31 at a saturated counter (NaN decay).
    t = jnp.asarray(step, jnp.float32) + 1.0
    return 1.0 - t ** (-exponent)


def _factored_dims(shape: tuple, factored: bool, min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """The (second largest, largest) axes of ``shape``, or ``None`` if the leaf is kept unfactored."""
    if not factored or len(shape) < 2:
        return None
    by_size = np.argsort(shape)
    if shape[by_size[-2]] < min_dim_size_to_factor:
        return None
    return int(by_size[-2]), int(by_size[-1])


def _without(shape: tuple, axis: int) -> tuple:
    return tuple(size for i, size in enumerate(shape) if i != axis)


def factored_second_moment(
    factored: bool = True,
    decay_rate: float = 0.8,
    step_offset: int = 0,
    min_dim_size_to_factor: int = 128,
    epsilon: float = 1e-30,
    decay_rate_fn: Callable[[jax.Array, float], jax.Array] = _power_decay,
    *,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Rescale updates by a factored estimate of the root mean square gradient (Adafactor's core).

    For a matrix gradient :math:`G \in \mathbb{R}^{n \times m}` (in general: along its two
    largest axes), only row and column averages of the squared gradient are kept:

    .. math::

        \hat\beta_t = 1 - t^{-c}, \qquad
        R_t = \hat\beta_t R_{t-1} + (1 - \hat\beta_t) \operatorname{mean}_{cols}(G_t^2 + \epsilon_1), \qquad
        C_t = \hat\beta_t C_{t-1} + (1 - \hat\beta_t) \operatorname{mean}_{rows}(G_t^2 + \epsilon_1),

        \hat V_t = \frac{R_t C_t^\top}{\operatorname{mean}(R_t)}, \qquad U_t = G_t / \sqrt{\hat V_t}

    (Shazeer & Stern, 2018, Algorithm 4 with means in place of sums: the same :math:`\hat V_t`).
    A leaf with fewer than two axes of at least ``min_dim_size_to_factor`` elements keeps a
    full second moment :math:`V_t = \hat\beta_t V_{t-1} + (1 - \hat\beta_t)(G_t^2 + \epsilon_1)`.
    Memory is :math:`O(n + m)` instead of :math:`O(nm)` for a factored leaf.

    This is Optax's ``scale_by_factored_rms`` under a name that says what it estimates; the
    arguments and the state's fields are the same. ``v_row`` averages over the largest axis and
    ``v_col`` over the second largest (for an ``(n, m)`` matrix with ``n < m``, :math:`R` and
    :math:`C` above). Unused factors are stored as shape-``(1,)`` placeholders, so every leaf
    has the three fields.

    Args:
        factored: factor the second moment of leaves that qualify; ``False`` keeps it full everywhere.
        decay_rate: :math:`c`, the exponent of the decay schedule (``>= 0``).
        step_offset: subtracted from the step counter before the schedule: the step at which a
            fine-tuning phase starts, its counter restored from the pre-training checkpoint
            (with the default schedule, a counter below the offset gives NaN, as in Optax).
        min_dim_size_to_factor: factor only if two axes have at least this many elements.
        epsilon: :math:`\epsilon_1`, added to the squared gradient (``> 0``).
        decay_rate_fn: ``(step, decay_rate) -> beta``, the decay schedule; the default is the
            paper's :math:`1 - (step + 1)^{-c}`. A capped one (Zhai et al., 2021) keeps the
            estimate from freezing.
        state_dtype: storage of the unfactored second moments :math:`V`: a floating dtype or
            ``gradtx.Quantized8bit()`` (unsigned 8-bit code, for arrays of at least its
            ``min_size`` elements); ``None`` means the parameter's dtype. The factors :math:`R, C`
            are :math:`O(n + m)` bytes: under any policy they stay in at least float32 (by
            default, in the parameter's dtype, as in Optax). See ``docs/memory.md``.

    Returns:
        A ``GradientTransformation`` whose state is :class:`FactoredState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.factored_second_moment(min_dim_size_to_factor=2)
        >>> state = tx.init(jnp.zeros((3, 4)))
        >>> state.v_row.shape, state.v_col.shape
        ((3,), (4,))

    References:
        Shazeer & Stern, 2018. Adafactor: Adaptive Learning Rates with Sublinear Memory Cost, https://arxiv.org/abs/1804.04235

        Zhai et al., 2021. Scaling Vision Transformers, https://arxiv.org/abs/2106.04560
    """
    owner = "factored_second_moment"
    _check_factored(owner, factored, decay_rate, step_offset, min_dim_size_to_factor, epsilon, "step_offset", "epsilon")
    if not callable(decay_rate_fn):
        raise TypeError(f"{owner}: decay_rate_fn must be callable (step, decay_rate) -> beta, got {decay_rate_fn!r}")
    quantize.check_storage(owner, "state_dtype", state_dtype)

    def state_shapes(p):
        dims = _factored_dims(p.shape, factored, min_dim_size_to_factor)
        if dims is None:
            row_shape, col_shape, full_shape = _PLACEHOLDER_SHAPE, _PLACEHOLDER_SHAPE, p.shape
        else:
            second, largest = dims
            row_shape, col_shape, full_shape = _without(p.shape, largest), _without(p.shape, second), _PLACEHOLDER_SHAPE
        # The O(n + m) factors are never narrowed by a policy: only V follows state_dtype.
        factor_dtype = p.dtype if state_dtype is None else jnp.promote_types(p.dtype, jnp.float32)
        row, col = (jax.ShapeDtypeStruct(shape, factor_dtype) for shape in (row_shape, col_shape))
        return row, col, jax.ShapeDtypeStruct(full_shape, p.dtype)

    def init(params):
        # Packed params: one stacked (count, ...) state array per run of equal shapes.
        v_row, v_col, v = packed.map_shapes(state_shapes, params, n_out=3)
        # Placed like each parameter (or its row/column slice), so a sharded model's statistics are sharded too.
        v_row, v_col = (tree.zeros_like_derived(shapes, params) for shapes in (v_row, v_col))
        return FactoredState(count=tree.zero_count(), v_row=v_row, v_col=v_col, v=_second_moments(v, params, state_dtype))

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        beta = decay_rate_fn(state.count - step_offset, decay_rate)

        def per_leaf(g, row_prev, col_prev, v_prev):
            g_wide = tree.at_least_float32(g)
            g_squared = tree.abs_sq(g_wide) + epsilon
            dims = _factored_dims(g.shape, factored, min_dim_size_to_factor)
            if dims is None:
                v = beta * jnp.real(tree.load(v_prev)) + (1.0 - beta) * g_squared
                u = g_wide * v**-0.5
                return u.astype(g.dtype), row_prev, col_prev, tree.store(v, v_prev)
            second, largest = dims
            row = beta * tree.real_at_least_float32(row_prev) + (1.0 - beta) * jnp.mean(g_squared, axis=largest)
            col = beta * tree.real_at_least_float32(col_prev) + (1.0 - beta) * jnp.mean(g_squared, axis=second)
            second_in_row = second - 1 if second > largest else second
            row_factor = (row / jnp.mean(row, axis=second_in_row, keepdims=True)) ** -0.5
            col_factor = col**-0.5
            u = g_wide * jnp.expand_dims(row_factor, largest) * jnp.expand_dims(col_factor, second)
            return u.astype(g.dtype), row.astype(row_prev.dtype), col.astype(col_prev.dtype), v_prev

        kinds = ("packed", "stacked", "stacked", "stacked")
        updates, v_row, v_col, v = packed.map_arrays(
            per_leaf, updates, state.v_row, state.v_col, state.v, n_out=4, kinds=kinds, owner="factored_second_moment"
        )
        return updates, FactoredState(count=tree.safe_increment(state.count), v_row=v_row, v_col=v_col, v=v)

    return GradientTransformation(init, update)


def _second_moments(shapes: Any, params: Any, storage: Any) -> Any:
    """Zero unfactored second moments of ``shapes`` (a leaf's shape, or a ``(1,)`` placeholder) stored as ``storage``.

    Under ``Quantized8bit`` on packed parameters, a run's ``(count, *shape)`` moments are
    quantized array by array (a batch of ``QuantizedArray``, mapped over by ``vmap``), so that
    blocks never straddle two arrays and the numbers are those of the per-array layout.
    """
    if not isinstance(storage, quantize.Quantized8bit):
        return tree.zeros_like_derived(shapes, params, storage)
    if jax.tree.structure(shapes) == jax.tree.structure(params):
        # Per-array: a full-shape moment is created from its parameter, so it is placed like it (sharded models).
        # A boxed parameter (Flax NNX Variable) is passed whole, so codes and scales are boxed apart.
        def per_leaf(shape, p):
            same = tuple(jnp.shape(tree.unboxed(p))) == tuple(shape.shape)
            return tree.moment_zeros_like(p if same else shape, storage, signed=False)

        return jax.tree.map(per_leaf, shapes, params, is_leaf=tree.is_box)

    def per_node(node):
        if not isinstance(node, packed.Stacked):
            return tree.moment_zeros_like(node, storage, signed=False)
        return packed.Stacked([_stacked_moment_zeros(s, storage) for s in node.arrays], node.layout)

    return jax.tree.map(per_node, shapes, is_leaf=lambda x: isinstance(x, packed.Stacked))


def _stacked_moment_zeros(stacked: jax.ShapeDtypeStruct, storage: Any) -> Any:
    one = tree.moment_zeros_like(jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype), storage, signed=False)
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (stacked.shape[0], *x.shape)), one)


def _check_factored(owner, factored, decay_rate, step_offset, min_dim_size_to_factor, epsilon, offset_name, eps_name) -> None:
    _checks.one_of(owner, "factored", factored, (False, True))
    _checks.non_negative(owner, "decay_rate", decay_rate)
    _checks.non_negative_int(owner, offset_name, step_offset)
    _checks.positive_int(owner, "min_dim_size_to_factor", min_dim_size_to_factor)
    _checks.positive(owner, eps_name, epsilon)


def _scale_by_param_block_rms(min_scale: float = 1e-3) -> GradientTransformation:
    """Multiply each leaf's update by the RMS of its parameter, at least ``min_scale`` (Adafactor's relative step size)."""

    def per_leaf(u, p):
        mean_square = jnp.mean(tree.abs_sq(tree.at_least_float32(p)))
        too_small = jnp.sqrt(mean_square) <= min_scale
        # The root of 1 on the discarded branch keeps the derivative finite at p = 0
        # (meta-gradients) without a second pass over p.
        safe_rms = jnp.sqrt(jnp.where(too_small, 1.0, mean_square))
        return (u * jnp.where(too_small, min_scale, safe_rms)).astype(u.dtype)

    return packed.per_array("adafactor", per_leaf, needs_params=True)


def adafactor(
    learning_rate: ScalarOrSchedule | None = None,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    momentum: float | None = None,
    dtype_momentum: Any = jnp.float32,
    weight_decay_rate: ScalarOrSchedule | None = None,
    eps: float = 1e-30,
    factored: bool = True,
    weight_decay_mask: Any | Callable[[Any], Any] | None = None,
    *,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""The Adafactor optimizer: factored second moment, update clipping, relative step size.

    .. math::

        U_t = \frac{G_t}{\sqrt{\hat V_t}}, \qquad
        \tilde U_t = \frac{U_t}{\max(1, \operatorname{RMS}(U_t) / d)}, \qquad
        p_{t+1} = p_t - \eta_t \max(\operatorname{RMS}(p_t), 10^{-3}) \, \tilde U_t

    with :math:`\hat V_t` from :func:`factored_second_moment`, :math:`d` the clipping
    threshold and the RMS taken per leaf; optionally followed by a (non-debiased) momentum
    and decoupled weight decay. Adafactor's natural learning rate differs from Adam's (no
    :math:`1/\sqrt{d_{model}}` correction for attention models).

    Every optional stage occupies its place in the chain (as ``identity`` when disabled), so
    the state's layout does not depend on which options are on; Optax drops disabled stages.

    Args:
        learning_rate: :math:`\eta`, a float ``>= 0``, a schedule, or ``None`` for a step
            size of 1 (the relative step size then comes from the parameter scale only).
        min_dim_size_to_factor, decay_rate, factored: see :func:`factored_second_moment`.
        decay_offset: ``step_offset`` of :func:`factored_second_moment`.
        multiply_by_parameter_scale: multiply the step by :math:`\max(\operatorname{RMS}(p), 10^{-3})`.
        clipping_threshold: :math:`d` (``> 0``; the paper uses 1), or ``None`` to disable clipping.
        momentum: decay of an exponential moving average of the updates in ``[0, 1)``, or
            ``None`` (no momentum, no extra memory).
        dtype_momentum: storage of the momentum: a floating dtype or ``gradtx.Quantized8bit()``.
            Its default, float32 (Optax's), gives way to ``state_dtype`` when that is given;
            any other value wins over ``state_dtype``.
        weight_decay_rate: decoupled weight decay (a float ``>= 0`` or a schedule; not scaled
            by the learning rate), or ``None``.
        eps: ``epsilon`` of :func:`factored_second_moment`.
        weight_decay_mask: a pytree of booleans (or a callable ``params -> pytree``) selecting
            the parameters to decay; ``None`` decays all of them.
        state_dtype: storage policy of the state (see ``docs/memory.md``): a floating dtype or
            ``gradtx.Quantized8bit()`` for the momentum (when on) and for the unfactored second
            moments of vectors and small arrays (8-bit only from ``min_size`` elements); the
            :math:`O(n + m)` row and column factors stay in at least float32. ``None`` keeps
            Optax's storage: second moments in the parameter's dtype, momentum in ``dtype_momentum``.

    Returns:
        A ``GradientTransformation``: ``chain(factored_second_moment, clip_by_block_rms,
        scale_by_learning_rate, parameter scale, ema, add_decayed_weights, scale(-1))``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.adafactor(learning_rate=1e-2)

    References:
        Shazeer & Stern, 2018. Adafactor: Adaptive Learning Rates with Sublinear Memory Cost, https://arxiv.org/abs/1804.04235
    """
    owner = "adafactor"
    _checks.mask(owner, "weight_decay_mask", weight_decay_mask)
    if learning_rate is not None:
        _checks.learning_rate(owner, learning_rate)
    _check_factored(owner, factored, decay_rate, decay_offset, min_dim_size_to_factor, eps, "decay_offset", "eps")
    _checks.one_of(owner, "multiply_by_parameter_scale", multiply_by_parameter_scale, (False, True))
    if clipping_threshold is not None:
        _checks.positive(owner, "clipping_threshold", clipping_threshold)
    if momentum is not None:
        _checks.decay_rate(owner, "momentum", momentum)
    quantize.check_storage(owner, "dtype_momentum", dtype_momentum)
    quantize.check_storage(owner, "state_dtype", state_dtype)
    if weight_decay_rate is not None:
        _checks.non_negative(owner, "weight_decay_rate", weight_decay_rate, schedule_ok=True)
    momentum_storage = _momentum_storage(dtype_momentum, state_dtype)

    def optional(enabled, make):
        return make() if enabled else identity()

    return chain(
        factored_second_moment(factored, decay_rate, decay_offset, min_dim_size_to_factor, eps, state_dtype=state_dtype),
        optional(clipping_threshold is not None, lambda: clip_by_block_rms(clipping_threshold)),
        optional(learning_rate is not None, lambda: scale_by_learning_rate(learning_rate, flip_sign=False)),
        optional(multiply_by_parameter_scale, _scale_by_param_block_rms),
        optional(momentum is not None, lambda: ema(momentum, debias=False, accumulator_dtype=momentum_storage)),
        optional(weight_decay_rate is not None, lambda: add_decayed_weights(weight_decay_rate, mask=weight_decay_mask)),
        scale(-1),
    )


def _momentum_storage(dtype_momentum: Any, state_dtype: Any) -> Any:
    """``dtype_momentum``, unless it is Optax's default float32 and a ``state_dtype`` policy is given."""
    # An explicit float32 cannot be told from the default: it yields to the policy too (documented).
    is_default = dtype_momentum is not None and not isinstance(dtype_momentum, quantize.Quantized8bit)
    is_default = is_default and jnp.dtype(dtype_momentum) == jnp.float32
    return state_dtype if state_dtype is not None and is_default else dtype_momentum
