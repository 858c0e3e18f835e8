"""Construction-time validation shared by every public factory.

Errors name the function, the argument, the value and the accepted range, e.g.
``ValueError("adam: b1 must be in [0, 1), got 1.5")``. A hyperparameter given as a
schedule (any callable) is accepted without range checks: its values are only known
at run time.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def _interval(low, high, low_open, high_open) -> str:
    if low is None and high is None:
        return "finite"
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    schedule_ok: bool = False,
) -> None:
    """Check that ``value`` is a real number in the given interval (or a schedule, if allowed)."""
    if schedule_ok and callable(value):
        return
    if _is_traced(value):
        return  # a value injected at run time (inject_hyperparams): its range is the caller's contract
    kind = "a real number or a schedule" if schedule_ok else "a real number"
    if isinstance(value, bool) or not _is_real_scalar(value):
        raise TypeError(f"{owner}: {name} must be {kind}, got {value!r} of type {type(value).__name__}")
    value = float(value)
    accepted = _interval(low, high, low_open, high_open)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    unbounded_but_infinite = low is None and high is None and math.isinf(value)
    if math.isnan(value) or too_low or too_high or unbounded_but_infinite:
        raise ValueError(f"{owner}: {name} must be {accepted}, got {value!r}")


def _is_traced(value: Any) -> bool:
    import jax

    return isinstance(value, jax.core.Tracer)


def _is_real_scalar(value: Any) -> bool:
    if isinstance(value, numbers.Real):
        return True
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape != () or dtype is None:
        return False
    try:
        float(value)
    except Exception:  # noqa: BLE001 - tracers and non-numeric arrays are not concrete real scalars
        return False
    return getattr(dtype, "kind", "") in "fiu"


def learning_rate(owner: str, value: Any, name: str = "learning_rate") -> None:
    """A learning rate: a float ``>= 0`` or a schedule."""
    number(owner, name, value, low=0.0, schedule_ok=True)


def decay_rate(owner: str, name: str, value: Any, *, schedule_ok: bool = False) -> None:
    """A moving-average decay such as ``b1``, ``b2`` or ``momentum``: in ``[0, 1)``."""
    number(owner, name, value, low=0.0, high=1.0, high_open=True, schedule_ok=schedule_ok)


def positive(owner: str, name: str, value: Any, *, schedule_ok: bool = False) -> None:
    """A strictly positive float such as ``eps``."""
    number(owner, name, value, low=0.0, low_open=True, schedule_ok=schedule_ok)


def non_negative(owner: str, name: str, value: Any, *, schedule_ok: bool = False) -> None:
    """A float ``>= 0`` such as ``weight_decay`` or ``eps_root``."""
    number(owner, name, value, low=0.0, schedule_ok=schedule_ok)


def positive_int(owner: str, name: str, value: Any) -> None:
    """A strictly positive integer such as a schedule length or a period."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r}")


def non_negative_int(owner: str, name: str, value: Any) -> None:
    """An integer ``>= 0`` such as a step offset."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{owner}: {name} must be an integer >= 0, got {value!r}")


def one_of(owner: str, name: str, value: Any, accepted: tuple) -> None:
    """A value from a fixed set of choices."""
    if value not in accepted:
        raise ValueError(f"{owner}: {name} must be one of {accepted}, got {value!r}")


def boolean(owner: str, name: str, value: Any) -> None:
    """A flag: ``True`` or ``False`` (not merely truthy, so that a misplaced argument is caught)."""
    one_of(owner, name, value, (False, True))


def _is_mask_leaf(leaf: Any) -> bool:
    if isinstance(leaf, bool):
        return True
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and getattr(dtype, "kind", "") == "b"


def mask(owner: str, name: str, value: Any) -> None:
    """A mask: ``None``, a callable ``params -> pytree of bools``, or a pytree of booleans."""
    if value is None or callable(value):
        return
    import jax

    bad = [leaf for leaf in jax.tree.leaves(value) if not _is_mask_leaf(leaf)]
    if bad:
        raise TypeError(
            f"{owner}: {name} must be None, a pytree of booleans or a callable params -> pytree of booleans, "
            f"got {value!r} (non-boolean leaf {bad[0]!r})"
        )


def dtype(owner: str, name: str, value: Any) -> None:
    """A floating state dtype, or ``None`` for the parameter's dtype."""
    if value is None:
        return
    import jax.numpy as jnp

    try:
        ok = jnp.issubdtype(jnp.dtype(value), jnp.inexact)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{owner}: {name} must be None or a floating dtype (float32, bfloat16, float16, float64), got {value!r}")
