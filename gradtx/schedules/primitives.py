"""Learning-rate schedules: pure functions ``count -> value``.

A schedule maps the int32 step count ``t`` to a float32 scalar. Every schedule here is
written with ``jnp`` operations only, never Python branching on the count, so it can be
evaluated under ``jit``, ``vmap`` and ``scan``; given an array of counts it applies
elementwise. Lengths (``transition_steps``, ``decay_steps``, ``warmup_steps`` ...) are static
Python integers; values (``init_value``, ``peak_value`` ...) are real numbers, or traced
scalars (unchecked) when a schedule is built inside ``jit``/``vmap``, e.g. in a sweep over
peak values.

Names, argument names, order and defaults follow Optax wherever Optax has the schedule,
and the values agree with Optax's. Deliberate differences, each repeated where it applies:

* Invalid lengths and rates raise ``ValueError`` at construction (naming function,
  argument, value and accepted range) where Optax logs and silently returns a constant
  (``transition_steps <= 0``, ``decay_rate == 0``) or clamps (``transition_begin < 0``).
* Every schedule returns float32, even for integer ``init_value``.
* The polynomial schedule's remaining fraction is ``(T - t) / T``, exactly 0 at the end
  even compiled (XLA divides by multiplying with a reciprocal); Optax's ``1 - t / T`` can
  round below 0 there, so with a fractional power it is NaN under ``jit``, ours is not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import _checks
from gradtx.base import Schedule
from gradtx.schedules.combinators import _float32, join_schedules

_INT32_MAX = int(np.iinfo(np.int32).max)
# Restart steps of cosine_warm_restarts_schedule are tabulated up to the largest int32
# count; this bounds the table (and the constant it puts in the compiled program).
_MAX_RESTARTS = 2**16


def _cosine_curve(fraction: jax.Array) -> jax.Array:
    """Half a cosine period from 1 (``fraction = 0``) down to 0 (``fraction = 1``)."""
    return 0.5 * (1 + jnp.cos(jnp.pi * fraction))


def _polynomial(init_value, end_value, power, transition_steps: int, transition_begin: int) -> Schedule:
    def schedule(count):
        elapsed = jnp.clip(jnp.asarray(count) - transition_begin, 0, transition_steps)
        # Not 1 - elapsed / T: compiled, XLA divides by multiplying with 1 / T, so that can
        # round to -1e-7 at the end, where a fractional power is NaN (as in Optax under jit).
        remaining = (transition_steps - elapsed) / transition_steps
        return _float32((init_value - end_value) * remaining**power + end_value)

    return schedule


def _exponential(init_value, transition_steps: int, decay_rate, transition_begin: int, staircase: bool, end_value):
    def schedule(count):
        elapsed = jnp.maximum(jnp.asarray(count) - transition_begin, 0)
        # Integer division keeps the staircase exact for every int32 count.
        periods = elapsed // transition_steps if staircase else elapsed / transition_steps
        value = init_value * jnp.power(decay_rate, periods)
        if end_value is not None:
            value = jnp.where(decay_rate < 1, jnp.maximum(value, end_value), jnp.minimum(value, end_value))
        return _float32(value)

    return schedule


def _cosine(init_value, end_value, decay_steps: int, exponent) -> Schedule:
    def schedule(count):
        fraction = jnp.minimum(jnp.asarray(count), decay_steps) / decay_steps
        return _float32(end_value + (init_value - end_value) * _cosine_curve(fraction) ** exponent)

    return schedule


def _linear_blend(start, end, fraction):
    return (end - start) * fraction + start


def _cosine_blend(start, end, fraction):
    return end + (start - end) * _cosine_curve(fraction)


def _interpolate(kind: str, boundaries: list[int], values: list) -> Schedule:
    """``values[i]`` at ``boundaries[i]`` (``boundaries[0] = 0``), interpolated between, held after the last."""
    blend = _linear_blend if kind == "linear" else _cosine_blend

    def schedule(count):
        count = jnp.asarray(count)
        value = values[-1]
        # From the last segment back, so that the earliest segment not yet finished wins.
        for i in reversed(range(len(boundaries) - 1)):
            start, end = boundaries[i], boundaries[i + 1]
            if end > start:
                fraction = (count - start) / (end - start)
                value = jnp.where(count < end, blend(values[i], values[i + 1], fraction), value)
        return _float32(jnp.broadcast_to(value, jnp.shape(count)))

    return schedule


def _check_boundaries_and_scales(owner: str, boundaries_and_scales: Mapping[int, float] | None) -> list[tuple[int, float]]:
    if boundaries_and_scales is None:
        return []
    if not isinstance(boundaries_and_scales, Mapping):
        raise TypeError(f"{owner}: boundaries_and_scales must be a dict {{step: scale}} or None, got {boundaries_and_scales!r}")
    for boundary, scale in boundaries_and_scales.items():
        _checks.non_negative_int(owner, "every step in boundaries_and_scales", boundary)
        _checks.number(owner, f"boundaries_and_scales[{boundary}]", scale, low=0.0)
    return sorted(boundaries_and_scales.items())


def constant_schedule(value: float) -> Schedule:
    """A constant: ``s(t) = v``.

    Args:
        value: ``v``, the value at every step.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import gradtx
        >>> gradtx.constant_schedule(5)(100)
        Array(5., dtype=float32)

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    _checks.number("constant_schedule", "value", value)
    return lambda count: jnp.full(jnp.shape(count), value, jnp.float32)


def polynomial_schedule(
    init_value: float, end_value: float, power: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """Polynomial transition from ``init_value`` to ``end_value`` over ``transition_steps`` steps.

    .. math::
        s(t) = (v_0 - v_1) \\left(1 - \\frac{\\min(\\max(t - B, 0), T)}{T}\\right)^p + v_1

    Unlike Optax, ``transition_steps <= 0`` (a constant in Optax), ``transition_begin < 0``
    (clamped to 0 in Optax) and ``power <= 0`` raise ``ValueError``, and a fractional power
    gives ``v_1`` at the end of the transition under ``jit`` (Optax can give NaN there).

    Args:
        init_value: ``v_0``, held until step ``B``.
        end_value: ``v_1``, reached at step ``B + T`` and held after.
        power: ``p > 0``; 1 is linear.
        transition_steps: ``T``, an integer ``>= 1``.
        transition_begin: ``B``, an integer ``>= 0``.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.polynomial_schedule(1.0, 0.0, power=2, transition_steps=4)
        >>> print(schedule(jnp.arange(5)))
        [1.     0.5625 0.25   0.0625 0.    ]

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    owner = "polynomial_schedule"
    _checks.number(owner, "init_value", init_value)
    _checks.number(owner, "end_value", end_value)
    _checks.number(owner, "power", power, low=0.0, low_open=True)
    _checks.positive_int(owner, "transition_steps", transition_steps)
    _checks.non_negative_int(owner, "transition_begin", transition_begin)
    return _polynomial(init_value, end_value, power, transition_steps, transition_begin)


def linear_schedule(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """Linear transition from ``init_value`` to ``end_value``: :func:`polynomial_schedule` with ``power=1``.

    .. math::
        s(t) = v_0 + (v_1 - v_0) \\frac{\\min(\\max(t - B, 0), T)}{T}

    Args:
        init_value: ``v_0``, held until step ``B``.
        end_value: ``v_1``, reached at step ``B + T`` and held after.
        transition_steps: ``T``, an integer ``>= 1`` (Optax turns ``<= 0`` into a constant; we raise).
        transition_begin: ``B``, an integer ``>= 0``.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.linear_schedule(1.0, 0.0, transition_steps=4, transition_begin=1)
        >>> print(schedule(jnp.arange(6)))
        [1.   1.   0.75 0.5  0.25 0.  ]

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    owner = "linear_schedule"
    _checks.number(owner, "init_value", init_value)
    _checks.number(owner, "end_value", end_value)
    _checks.positive_int(owner, "transition_steps", transition_steps)
    _checks.non_negative_int(owner, "transition_begin", transition_begin)
    return _polynomial(init_value, end_value, 1, transition_steps, transition_begin)


def _check_exponential(owner: str, transition_steps, decay_rate, transition_begin, staircase, end_value) -> None:
    _checks.positive_int(owner, "transition_steps", transition_steps)
    _checks.number(owner, "decay_rate", decay_rate, low=0.0, low_open=True)
    _checks.non_negative_int(owner, "transition_begin", transition_begin)
    _checks.one_of(owner, "staircase", staircase, (False, True))
    if end_value is not None:
        _checks.number(owner, "end_value", end_value)


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """Exponential decay, continuous or in steps (step decay with ``staircase=True``).

    .. math::
        s(t) = v_0 \\, r^{\\max(t - B, 0) / T}
        \\quad (\\text{exponent } \\lfloor \\max(t - B, 0) / T \\rfloor \\text{ with staircase})

    then bounded by ``end_value``: from below when ``r < 1``, from above otherwise.
    Unlike Optax, ``transition_steps <= 0`` and ``decay_rate == 0`` (constants in Optax),
    ``decay_rate < 0`` (NaN in Optax) and ``transition_begin < 0`` raise ``ValueError``.

    Args:
        init_value: ``v_0``, held until step ``B``.
        transition_steps: ``T``, an integer ``>= 1``: the steps over which the value is multiplied by ``r``.
        decay_rate: ``r > 0``; ``r > 1`` grows.
        transition_begin: ``B``, an integer ``>= 0``.
        staircase: if ``True``, decay at discrete intervals of ``T`` steps.
        end_value: a bound on the value, or ``None``.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.exponential_decay(1.0, transition_steps=2, decay_rate=0.5, staircase=True)
        >>> print(schedule(jnp.arange(6)))
        [1.   1.   0.5  0.5  0.25 0.25]

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    _checks.number("exponential_decay", "init_value", init_value)
    _check_exponential("exponential_decay", transition_steps, decay_rate, transition_begin, staircase, end_value)
    return _exponential(init_value, transition_steps, decay_rate, transition_begin, staircase, end_value)


def piecewise_constant_schedule(init_value: float, boundaries_and_scales: Mapping[int, float] | None = None) -> Schedule:
    """Step decay at milestones: ``init_value`` times every scale whose step has been reached.

    .. math::
        s(t) = v_0 \\prod_{i \\,:\\, b_i \\le t} c_i

    Args:
        init_value: ``v_0``.
        boundaries_and_scales: ``{b_i: c_i}``, steps (integers ``>= 0``) and scales (``>= 0``), or ``None``.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.piecewise_constant_schedule(1.0, {2: 0.5, 4: 0.5})
        >>> print(schedule(jnp.arange(6)))
        [1.   1.   0.5  0.5  0.25 0.25]

    References:
        He et al., 2016. Deep Residual Learning for Image Recognition, https://arxiv.org/abs/1512.03385
    """
    owner = "piecewise_constant_schedule"
    _checks.number(owner, "init_value", init_value)
    milestones = _check_boundaries_and_scales(owner, boundaries_and_scales)

    def schedule(count):
        count = jnp.asarray(count)
        value = jnp.full(jnp.shape(count), init_value, jnp.float32)
        for boundary, scale in milestones:
            value = jnp.where(count >= boundary, value * scale, value)
        return value

    return schedule


def piecewise_interpolate_schedule(
    interpolate_type: str, init_value: float, boundaries_and_scales: Mapping[int, float] | None = None
) -> Schedule:
    """Interpolate, linearly or along a half cosine, between the accumulated values at milestones.

    With steps ``b_1 < b_2 < ...`` and accumulated values ``v_k = v_0 \\prod_{i \\le k} c_i``
    (``b_0 = 0``), for ``b_k \\le t < b_{k+1}`` and ``f = (t - b_k) / (b_{k+1} - b_k)``:

    .. math::
        s(t) = v_k + (v_{k+1} - v_k) f \\quad\\text{or}\\quad
        s(t) = v_{k+1} + (v_k - v_{k+1}) \\tfrac{1}{2}(1 + \\cos \\pi f),

    and ``s(t)`` is the last accumulated value after the last step.

    Args:
        interpolate_type: ``'linear'`` or ``'cosine'``.
        init_value: ``v_0``.
        boundaries_and_scales: ``{b_i: c_i}``, steps (integers ``>= 0``) and scales (``>= 0``), or ``None``.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.piecewise_interpolate_schedule("linear", 1.0, {4: 0.5})
        >>> print(schedule(jnp.arange(6)))
        [1.    0.875 0.75  0.625 0.5   0.5  ]

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    owner = "piecewise_interpolate_schedule"
    _checks.one_of(owner, "interpolate_type", interpolate_type, ("linear", "cosine"))
    _checks.number(owner, "init_value", init_value)
    milestones = _check_boundaries_and_scales(owner, boundaries_and_scales)
    boundaries, values = [0], [init_value]
    for boundary, scale in milestones:
        boundaries.append(boundary)
        values.append(values[-1] * scale)
    return _interpolate(interpolate_type, boundaries, values)


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps`` steps.

    .. math::
        s(t) = v_0 \\left[\\alpha + (1 - \\alpha)
               \\left(\\tfrac{1}{2}\\left(1 + \\cos \\frac{\\pi \\min(t, T)}{T}\\right)\\right)^p\\right]

    ``exponent <= 0`` raises ``ValueError`` (Optax accepts it).

    Args:
        init_value: ``v_0``.
        decay_steps: ``T``, an integer ``>= 1``.
        alpha: the final value as a fraction of ``init_value``.
        exponent: ``p > 0``.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.cosine_decay_schedule(1.0, decay_steps=4)
        >>> [round(value, 3) for value in schedule(jnp.arange(6)).tolist()]
        [1.0, 0.854, 0.5, 0.146, 0.0, 0.0]

    References:
        Loshchilov & Hutter, 2017. SGDR: Stochastic Gradient Descent with Warm Restarts, https://arxiv.org/abs/1608.03983
    """
    owner = "cosine_decay_schedule"
    _checks.number(owner, "init_value", init_value)
    _checks.positive_int(owner, "decay_steps", decay_steps)
    _checks.number(owner, "alpha", alpha)
    _checks.number(owner, "exponent", exponent, low=0.0, low_open=True)
    return _cosine(init_value, alpha * init_value, decay_steps, exponent)


def warmup_constant_schedule(init_value: float, peak_value: float, warmup_steps: int) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value``, then constant.

    .. math::
        s(t) = v_0 + (v_{peak} - v_0) \\min(t, W) / W

    ``warmup_steps=0`` means no warmup: the constant ``peak_value`` (Optax returns the
    constant ``init_value`` there).

    Args:
        init_value: ``v_0``.
        peak_value: ``v_peak``, reached at step ``W``.
        warmup_steps: ``W``, an integer ``>= 0``.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.warmup_constant_schedule(0.0, 1.0, warmup_steps=4)
        >>> print(schedule(jnp.arange(6)))
        [0.   0.25 0.5  0.75 1.   1.  ]

    References:
        Goyal et al., 2017. Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour, https://arxiv.org/abs/1706.02677
    """
    owner = "warmup_constant_schedule"
    _checks.number(owner, "init_value", init_value)
    _checks.number(owner, "peak_value", peak_value)
    _checks.non_negative_int(owner, "warmup_steps", warmup_steps)
    if warmup_steps == 0:
        return constant_schedule(peak_value)
    return _polynomial(init_value, peak_value, 1, warmup_steps, 0)


def _with_linear_warmup(init_value, peak_value, warmup_steps: int, schedule: Schedule) -> Schedule:
    if warmup_steps == 0:
        return schedule
    return join_schedules([_polynomial(init_value, peak_value, 1, warmup_steps, 0), schedule], [warmup_steps])


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup to ``peak_value``, then cosine decay to ``end_value``.

    .. math::
        s(t) = \\begin{cases} v_0 + (v_{peak} - v_0)\\, t / W & t < W \\\\
        v_{end} + (v_{peak} - v_{end})
        \\left(\\tfrac{1}{2}\\left(1 + \\cos \\frac{\\pi \\min(t - W, T - W)}{T - W}\\right)\\right)^p & t \\ge W \\end{cases}

    See :func:`cosine_decay_schedule`. With ``peak_value = 0`` the decay still goes to
    ``end_value`` (Optax then stays at 0).

    Args:
        init_value: ``v_0``.
        peak_value: ``v_peak``, reached at step ``W``.
        warmup_steps: ``W``, an integer ``>= 0`` (0: start at the peak).
        decay_steps: ``T``, an integer ``> W``: the total length, warmup included.
        end_value: ``v_end``, reached at step ``T``.
        exponent: ``p > 0``.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=4)
        >>> [round(value, 3) for value in schedule(jnp.arange(6)).tolist()]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]

    References:
        Loshchilov & Hutter, 2017. SGDR: Stochastic Gradient Descent with Warm Restarts, https://arxiv.org/abs/1608.03983
    """
    owner = "warmup_cosine_decay_schedule"
    _checks.number(owner, "init_value", init_value)
    _checks.number(owner, "peak_value", peak_value)
    _checks.non_negative_int(owner, "warmup_steps", warmup_steps)
    _checks.positive_int(owner, "decay_steps", decay_steps)
    if decay_steps <= warmup_steps:
        raise ValueError(f"{owner}: decay_steps must be an integer > warmup_steps = {warmup_steps}, got {decay_steps!r}")
    _checks.number(owner, "end_value", end_value)
    _checks.number(owner, "exponent", exponent, low=0.0, low_open=True)
    decay = _cosine(peak_value, end_value, decay_steps - warmup_steps, exponent)
    return _with_linear_warmup(init_value, peak_value, warmup_steps, decay)


def warmup_exponential_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """Linear warmup to ``peak_value``, then :func:`exponential_decay` from ``peak_value``.

    .. math::
        s(t) = \\begin{cases} v_0 + (v_{peak} - v_0)\\, t / W & t < W \\\\
        v_{peak} \\, r^{\\max(t - W - B, 0) / T} & t \\ge W \\end{cases}

    Args:
        init_value: ``v_0``.
        peak_value: ``v_peak``, reached at step ``W``.
        warmup_steps: ``W``, an integer ``>= 0`` (0: start at the peak).
        transition_steps: ``T``, an integer ``>= 1``.
        decay_rate: ``r > 0``.
        transition_begin: ``B``, an integer ``>= 0``: steps held at the peak after the warmup.
        staircase: if ``True``, decay at discrete intervals of ``T`` steps.
        end_value: a bound on the value, or ``None``.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.warmup_exponential_decay_schedule(0.0, 1.0, 2, 1, 0.5)
        >>> print(schedule(jnp.arange(6)))
        [0.    0.5   1.    0.5   0.25  0.125]

    References:
        Goyal et al., 2017. Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour, https://arxiv.org/abs/1706.02677
    """
    owner = "warmup_exponential_decay_schedule"
    _checks.number(owner, "init_value", init_value)
    _checks.number(owner, "peak_value", peak_value)
    _checks.non_negative_int(owner, "warmup_steps", warmup_steps)
    _check_exponential(owner, transition_steps, decay_rate, transition_begin, staircase, end_value)
    decay = _exponential(peak_value, transition_steps, decay_rate, transition_begin, staircase, end_value)
    return _with_linear_warmup(init_value, peak_value, warmup_steps, decay)


def _check_onecycle(owner: str, transition_steps, peak_value, pct_start, div_factor, final_div_factor) -> None:
    _checks.positive_int(owner, "transition_steps", transition_steps)
    _checks.number(owner, "peak_value", peak_value)
    _checks.number(owner, "pct_start", pct_start, low=0.0, high=1.0, low_open=True, high_open=True)
    _checks.positive(owner, "div_factor", div_factor)
    _checks.positive(owner, "final_div_factor", final_div_factor)


def linear_onecycle_schedule(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    pct_final: float = 0.85,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """One-cycle policy with three linear phases: up to the peak, back down, then annealing.

    With ``v_0 = v_{peak} / d`` and ``T`` steps, linear interpolation between the points
    ``(0, v_0)``, ``(\\lfloor a T \\rfloor, v_{peak})``, ``(\\lfloor b T \\rfloor, v_0)``,
    ``(T, v_0 / d_f)``, constant after ``T``. Optax gives the same values, except for tiny
    ``T`` where two phase boundaries round to the same step (Optax's dict of boundaries
    then drops a phase).

    Args:
        transition_steps: ``T``, an integer ``>= 1``.
        peak_value: ``v_peak``, reached at step ``floor(pct_start * T)``.
        pct_start: ``a`` in ``(0, 1)``: the fraction of ``T`` spent increasing.
        pct_final: ``b`` in ``(a, 1]``: the fraction of ``T`` at which the value is back to ``v_0``.
        div_factor: ``d > 0``: ``v_0 = v_peak / d``.
        final_div_factor: ``d_f > 0``: the final value is ``v_0 / d_f``.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.linear_onecycle_schedule(10, 1.0, 0.2, 0.6, div_factor=2.0, final_div_factor=5.0)
        >>> print(schedule(jnp.array([0, 1, 2, 4, 6, 8, 10])))
        [0.5  0.75 1.   0.75 0.5  0.3  0.1 ]

    References:
        Smith & Topin, 2017. Super-Convergence: Very Fast Training of Neural Networks Using Large Learning Rates,
        https://arxiv.org/abs/1708.07120
    """
    owner = "linear_onecycle_schedule"
    _check_onecycle(owner, transition_steps, peak_value, pct_start, div_factor, final_div_factor)
    _checks.number(owner, "pct_final", pct_final, low=pct_start, high=1.0, low_open=True)
    init_value = peak_value / div_factor
    return _interpolate(
        "linear",
        [0, int(pct_start * transition_steps), int(pct_final * transition_steps), transition_steps],
        [init_value, peak_value, init_value, init_value / final_div_factor],
    )


def cosine_onecycle_schedule(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """One-cycle policy with two half-cosine phases: up to the peak, then down to the final value.

    With ``v_0 = v_{peak} / d`` and ``T`` steps, half-cosine interpolation between the points
    ``(0, v_0)``, ``(\\lfloor a T \\rfloor, v_{peak})``, ``(T, v_0 / d_f)``, constant after ``T``.
    See :func:`linear_onecycle_schedule`.

    Args:
        transition_steps: ``T``, an integer ``>= 1``.
        peak_value: ``v_peak``, reached at step ``floor(pct_start * T)``.
        pct_start: ``a`` in ``(0, 1)``: the fraction of ``T`` spent increasing.
        div_factor: ``d > 0``: ``v_0 = v_peak / d``.
        final_div_factor: ``d_f > 0``: the final value is ``v_0 / d_f``.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.cosine_onecycle_schedule(8, 1.0, 0.25, div_factor=2.0, final_div_factor=5.0)
        >>> [round(value, 3) for value in schedule(jnp.array([0, 1, 2, 5, 8])).tolist()]
        [0.5, 0.75, 1.0, 0.55, 0.1]

    References:
        Smith & Topin, 2017. Super-Convergence: Very Fast Training of Neural Networks Using Large Learning Rates,
        https://arxiv.org/abs/1708.07120
    """
    owner = "cosine_onecycle_schedule"
    _check_onecycle(owner, transition_steps, peak_value, pct_start, div_factor, final_div_factor)
    init_value = peak_value / div_factor
    return _interpolate(
        "cosine",
        [0, int(pct_start * transition_steps), transition_steps],
        [init_value, peak_value, init_value / final_div_factor],
    )


def inverse_time_decay(init_value: float, decay_rate: float, transition_steps: int = 1, staircase: bool = False) -> Schedule:
    """Inverse-time decay, ``1 / t`` asymptotically (Keras/TensorFlow ``InverseTimeDecay``).

    .. math::
        s(t) = \\frac{v_0}{1 + r \\, t / T} \\quad (t / T \\text{ rounded down with staircase})

    Optax has no such schedule.

    Args:
        init_value: ``v_0``, the value at step 0.
        decay_rate: ``r > 0``.
        transition_steps: ``T``, an integer ``>= 1``: the time unit of the decay.
        staircase: if ``True``, decay at discrete intervals of ``T`` steps.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.inverse_time_decay(1.0, decay_rate=1.0, transition_steps=2)
        >>> print(schedule(jnp.array([0, 2, 6])))
        [1.   0.5  0.25]

    References:
        Bottou, 2012. Stochastic Gradient Descent Tricks, https://leon.bottou.org/publications/pdf/tricks-2012.pdf
    """
    owner = "inverse_time_decay"
    _checks.number(owner, "init_value", init_value)
    _checks.number(owner, "decay_rate", decay_rate, low=0.0, low_open=True)
    _checks.positive_int(owner, "transition_steps", transition_steps)
    _checks.one_of(owner, "staircase", staircase, (False, True))

    def schedule(count):
        elapsed = jnp.maximum(jnp.asarray(count), 0)
        periods = elapsed // transition_steps if staircase else elapsed / transition_steps
        return _float32(init_value / (1 + decay_rate * periods))

    return schedule


def inverse_sqrt_schedule(peak_value: float, warmup_steps: int, init_value: float = 0.0) -> Schedule:
    """Linear warmup to ``peak_value``, then decay as the inverse square root of the step.

    .. math::
        s(t) = \\begin{cases} v_0 + (v_{peak} - v_0)\\, t / W & t < W \\\\ v_{peak} \\sqrt{W / t} & t \\ge W \\end{cases}

    With ``init_value = 0`` this is ``v_peak \\min(t / W, \\sqrt{W / t})``, the Transformer
    schedule ``d^{-1/2} \\min(t^{-1/2}, t W^{-3/2})`` with ``v_{peak} = (d W)^{-1/2}``; it is 0
    at ``t = 0``. Optax has no such schedule.

    Args:
        peak_value: ``v_peak``, reached at step ``W``.
        warmup_steps: ``W``, an integer ``>= 1``.
        init_value: ``v_0``, the value at step 0 (a nonzero value wastes no step, as in fairseq).

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.inverse_sqrt_schedule(1.0, warmup_steps=4)
        >>> print(schedule(jnp.array([0, 2, 4, 16, 64])))
        [0.   0.5  1.   0.5  0.25]

    References:
        Vaswani et al., 2017. Attention Is All You Need, https://arxiv.org/abs/1706.03762
    """
    owner = "inverse_sqrt_schedule"
    _checks.number(owner, "peak_value", peak_value)
    _checks.positive_int(owner, "warmup_steps", warmup_steps)
    _checks.number(owner, "init_value", init_value)

    def schedule(count):
        count = jnp.asarray(count)
        warmup = init_value + (peak_value - init_value) * (jnp.maximum(count, 0) / warmup_steps)
        # max(t, 1): the unselected branch at t = 0 must stay finite.
        decay = peak_value * jnp.sqrt(warmup_steps / jnp.maximum(count, 1))
        return _float32(jnp.where(count < warmup_steps, warmup, decay))

    return schedule


def _restart_steps(owner: str, first_period: int, t_mult: float) -> np.ndarray:
    """The steps ``round(T_0 (m^i - 1) / (m - 1))``, ``i = 0, 1, ...``, up to the first beyond int32."""
    starts = [0]
    cycle = 1
    while starts[-1] <= _INT32_MAX:
        if cycle > _MAX_RESTARTS:
            raise ValueError(
                f"{owner}: t_mult must be 1 or give at most {_MAX_RESTARTS} restarts before step 2**31 - 1 "
                f"with first_period = {first_period}, got {t_mult!r}"
            )
        starts.append(math.floor(first_period * (t_mult**cycle - 1) / (t_mult - 1) + 0.5))
        cycle += 1
    return np.asarray(starts, np.int64)


def cosine_warm_restarts_schedule(
    init_value: float, first_period: int, t_mult: float = 1.0, alpha: float = 0.0, m_mult: float = 1.0
) -> Schedule:
    """Cosine annealing with warm restarts (SGDR), each period ``t_mult`` times longer than the last.

    Cycle ``i`` starts at step ``R_i = round(T_0 (m^i - 1) / (m - 1))`` (``R_i = i T_0`` for
    ``m = 1``) and lasts ``T_i = R_{i+1} - R_i`` steps; within it, with ``t_i = t - R_i``,

    .. math::
        s(t) = v_0 \\, \\mu^i \\left[\\alpha + (1 - \\alpha) \\tfrac{1}{2}\\left(1 + \\cos \\frac{\\pi t_i}{T_i}\\right)\\right].

    For integer ``T_0`` and ``m`` the restarts are exact: with ``m = 2`` at ``T_0, 3 T_0,
    7 T_0, ...``. They are computed without Python branching on the count: for ``m = 1`` by
    integer division, otherwise by a binary search (``jnp.searchsorted``) in the restart steps
    tabulated at construction up to the largest int32 count (at most 65,536 restarts; a
    ``t_mult`` so close to 1 that more are needed raises ``ValueError``). Optax's
    :func:`sgdr_schedule` instead takes one dict of arguments per cycle.

    Args:
        init_value: ``v_0``, the value at step 0 and at every restart (times ``m_mult^i``).
        first_period: ``T_0``, an integer ``>= 1``: the length of the first cycle.
        t_mult: ``m >= 1``, the factor by which each cycle is longer than the previous one
            (PyTorch's ``T_mult``).
        alpha: the value at the end of each cycle as a fraction of its value at the start
            (``eta_min / eta_max`` in the paper).
        m_mult: ``mu > 0``, the factor applied to the value at each restart (TensorFlow's ``m_mul``).

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.cosine_warm_restarts_schedule(1.0, first_period=2, t_mult=2.0)
        >>> [round(value, 3) for value in schedule(jnp.arange(8)).tolist()]  # restarts at 2 and 6
        [1.0, 0.5, 1.0, 0.854, 0.5, 0.146, 1.0, 0.962]

    References:
        Loshchilov & Hutter, 2017. SGDR: Stochastic Gradient Descent with Warm Restarts, https://arxiv.org/abs/1608.03983
    """
    owner = "cosine_warm_restarts_schedule"
    _checks.number(owner, "init_value", init_value)
    _checks.positive_int(owner, "first_period", first_period)
    _checks.number(owner, "t_mult", t_mult, low=1.0)
    _checks.number(owner, "alpha", alpha)
    _checks.number(owner, "m_mult", m_mult, low=0.0, low_open=True)

    if t_mult == 1:

        def locate(count):
            return count // first_period, count % first_period, first_period

    else:
        restarts = _restart_steps(owner, first_period, t_mult)
        # The last start lies beyond int32: it only bounds the last cycle's length.
        starts = restarts[:-1].astype(np.int32)
        periods = np.diff(restarts).astype(np.float32)

        def locate(count):
            cycle = jnp.searchsorted(starts[1:], count, side="right")
            return cycle, count - jnp.asarray(starts)[cycle], jnp.asarray(periods)[cycle]

    def schedule(count):
        cycle, elapsed, period = locate(jnp.maximum(jnp.asarray(count, jnp.int32), 0))
        restart_value = init_value * jnp.power(m_mult, cycle.astype(jnp.float32))
        return _float32(restart_value * (alpha + (1 - alpha) * _cosine_curve(elapsed / period)))

    return schedule


def sgdr_schedule(cosine_kwargs: Iterable[Mapping[str, Any]]) -> Schedule:
    """Optax's SGDR: :func:`warmup_cosine_decay_schedule` cycles joined end to end.

    Cycle ``k`` is ``warmup_cosine_decay_schedule(**cosine_kwargs[k])`` and lasts its
    ``decay_steps``. Kept for migration from Optax; :func:`cosine_warm_restarts_schedule`
    is the closed form for periods growing by a constant factor.

    Args:
        cosine_kwargs: one or more dicts of :func:`warmup_cosine_decay_schedule` arguments.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> cycle = dict(init_value=1.0, peak_value=1.0, warmup_steps=0, decay_steps=2)
        >>> [round(value, 3) for value in gradtx.sgdr_schedule([cycle, cycle])(jnp.arange(5)).tolist()]
        [1.0, 0.5, 1.0, 0.5, 0.0]

    References:
        Loshchilov & Hutter, 2017. SGDR: Stochastic Gradient Descent with Warm Restarts, https://arxiv.org/abs/1608.03983
    """
    owner = "sgdr_schedule"
    if isinstance(cosine_kwargs, Mapping) or not isinstance(cosine_kwargs, Iterable):
        raise TypeError(f"{owner}: cosine_kwargs must be a sequence of dicts of warmup_cosine_decay_schedule arguments, got {cosine_kwargs!r}")
    cosine_kwargs = list(cosine_kwargs)
    if not cosine_kwargs:
        raise ValueError(f"{owner}: cosine_kwargs must hold at least one dict, got {cosine_kwargs!r}")
    for index, kwargs in enumerate(cosine_kwargs):
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"{owner}: cosine_kwargs[{index}] must be a dict of warmup_cosine_decay_schedule arguments, got {kwargs!r}")
    schedules, boundaries = [], []
    for index, kwargs in enumerate(cosine_kwargs):
        try:
            schedules.append(warmup_cosine_decay_schedule(**kwargs))
        except (TypeError, ValueError) as error:
            raise type(error)(f"{owner}: cosine_kwargs[{index}]: {error}") from error
        boundaries.append(boundaries[-1] + kwargs["decay_steps"] if boundaries else kwargs["decay_steps"])
    return join_schedules(schedules, boundaries[:-1])
