"""Schedule combinators: functions from schedules to schedules.

Each takes schedules (any callable ``count -> value``, Optax schedules included) and
returns a schedule that is again jit- and vmap-safe and returns float32. Lengths and
boundaries are static Python integers validated at construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from gradtx import _checks
from gradtx.base import Schedule


def _float32(value: Any) -> jax.Array:
    return jnp.asarray(value, jnp.float32)


def _check_schedule(owner: str, name: str, value: Any) -> None:
    if not callable(value):
        raise TypeError(f"{owner}: {name} must be a schedule (a callable count -> value), got {value!r}")


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run schedules one after another, each restarted from 0 at its boundary.

    .. math::
        s(t) = s_i(t - b_i) \\quad \\text{for } b_i \\le t < b_{i+1}, \\qquad b_0 = 0.

    Same semantics as ``optax.join_schedules``, except that the boundaries must be
    non-negative, strictly increasing integers (Optax accepts any sequence, so a misordered
    boundary silently hides a schedule).

    Args:
        schedules: ``n >= 1`` schedules.
        boundaries: ``n - 1`` strictly increasing integers ``>= 0``: the steps where the next
            schedule starts.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.join_schedules(
        ...     [gradtx.constant_schedule(1.0), gradtx.linear_schedule(0.5, 0.0, 4)], [2])
        >>> print(schedule(jnp.arange(7)))
        [1.    1.    0.5   0.375 0.25  0.125 0.   ]

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    owner = "join_schedules"
    for name, value in (("schedules", schedules), ("boundaries", boundaries)):
        if not isinstance(value, Sequence):
            raise TypeError(f"{owner}: {name} must be a sequence (list or tuple), got {value!r}")
    schedules, boundaries = list(schedules), list(boundaries)
    if not schedules:
        raise ValueError(f"{owner}: schedules must hold at least one schedule, got {schedules!r}")
    for index, schedule in enumerate(schedules):
        _check_schedule(owner, f"schedules[{index}]", schedule)
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"{owner}: boundaries must hold len(schedules) - 1 = {len(schedules) - 1} integers, got {boundaries!r}"
        )
    for index, boundary in enumerate(boundaries):
        _checks.non_negative_int(owner, f"boundaries[{index}]", boundary)
    if any(later <= earlier for earlier, later in zip(boundaries, boundaries[1:])):
        raise ValueError(f"{owner}: boundaries must be strictly increasing, got {boundaries!r}")

    def joined(count):
        count = jnp.asarray(count)
        value = schedules[0](count)
        for boundary, schedule in zip(boundaries, schedules[1:]):
            value = jnp.where(count < boundary, value, schedule(count - boundary))
        return _float32(value)

    return joined


def with_warmup(schedule: Schedule, warmup_steps: int, init_value: float = 0.0) -> Schedule:
    """Prepend a linear warmup from ``init_value`` to ``schedule(0)``, then run ``schedule`` shifted.

    .. math::
        s_w(t) = \\begin{cases} v_0 + (s(0) - v_0)\\, t / W & t < W \\\\ s(t - W) & t \\ge W \\end{cases}

    Args:
        schedule: the schedule to warm up into.
        warmup_steps: ``W``, an integer ``>= 0``; ``0`` returns ``schedule`` unchanged (as float32).
        init_value: ``v_0``, the value at step 0.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.with_warmup(gradtx.exponential_decay(1.0, 1, 0.5), warmup_steps=4)
        >>> print(schedule(jnp.arange(7)))
        [0.   0.25 0.5  0.75 1.   0.5  0.25]

    References:
        Goyal et al., 2017. Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour, https://arxiv.org/abs/1706.02677
    """
    owner = "with_warmup"
    _check_schedule(owner, "schedule", schedule)
    _checks.non_negative_int(owner, "warmup_steps", warmup_steps)
    _checks.number(owner, "init_value", init_value)
    if warmup_steps == 0:
        return lambda count: _float32(schedule(count))

    def warmed_up(count):
        count = jnp.asarray(count)
        target = schedule(jnp.zeros_like(count))
        remaining = (warmup_steps - jnp.clip(count, 0, warmup_steps)) / warmup_steps
        ramp = (init_value - target) * remaining + target
        return _float32(jnp.where(count < warmup_steps, ramp, schedule(count - warmup_steps)))

    return warmed_up


def repeat_schedule(schedule: Schedule, period: int) -> Schedule:
    """Restart ``schedule`` every ``period`` steps: ``s_r(t) = s(t mod P)``.

    Args:
        schedule: the schedule to repeat.
        period: ``P``, an integer ``>= 1``.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.repeat_schedule(gradtx.linear_schedule(1.0, 0.0, 4), period=4)
        >>> print(schedule(jnp.arange(6)))
        [1.   0.75 0.5  0.25 1.   0.75]

    References:
        Loshchilov & Hutter, 2017. SGDR: Stochastic Gradient Descent with Warm Restarts, https://arxiv.org/abs/1608.03983
    """
    _check_schedule("repeat_schedule", "schedule", schedule)
    _checks.positive_int("repeat_schedule", "period", period)
    return lambda count: _float32(schedule(jnp.remainder(jnp.asarray(count), period)))


def scale_schedule(schedule: Schedule, factor: float) -> Schedule:
    """Multiply a schedule by a constant: ``s_c(t) = c \\cdot s(t)``.

    Args:
        schedule: the schedule to scale.
        factor: ``c``, any real number.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import gradtx
        >>> schedule = gradtx.scale_schedule(gradtx.constant_schedule(0.5), 4.0)
        >>> schedule(0)
        Array(2., dtype=float32)

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    _check_schedule("scale_schedule", "schedule", schedule)
    _checks.number("scale_schedule", "factor", factor)
    return lambda count: _float32(factor * schedule(count))


def clamp_schedule(schedule: Schedule, min_value: float | None = None, max_value: float | None = None) -> Schedule:
    """Clip a schedule to ``[min_value, max_value]``: ``s_c(t) = min(max(s(t), lo), hi)``.

    Args:
        schedule: the schedule to clamp.
        min_value: the lower bound, or ``None`` for none.
        max_value: the upper bound, or ``None`` for none; must be ``>= min_value``.

    Returns:
        A schedule ``count -> float32``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> schedule = gradtx.clamp_schedule(gradtx.linear_schedule(1.0, 0.0, 4), min_value=0.3)
        >>> print(schedule(jnp.arange(5)))
        [1.   0.75 0.5  0.3  0.3 ]

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    owner = "clamp_schedule"
    _check_schedule(owner, "schedule", schedule)
    if min_value is not None:
        _checks.number(owner, "min_value", min_value)
    if max_value is not None:
        low = None if min_value is None or isinstance(min_value, jax.core.Tracer) else float(min_value)
        _checks.number(owner, "max_value", max_value, low=low)
    return lambda count: _float32(jnp.clip(schedule(count), min_value, max_value))
