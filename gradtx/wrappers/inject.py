"""Hyperparameters as state: change them at run time, read them back."""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation


class InjectHyperparamsState(NamedTuple):
    """State of :func:`inject_hyperparams`: step counter, current hyperparameter values (float32), inner state."""

    count: jax.Array
    hyperparams: dict
    inner_state: Any


def _is_numeric(value) -> bool:
    return isinstance(value, (numbers.Real, jax.Array)) and not isinstance(value, bool)


def inject_hyperparams(
    inner_factory: Callable[..., GradientTransformation],
    static_args: str | Iterable[str] = (),
    hyperparam_dtype=jnp.float32,
) -> Callable[..., GradientTransformation]:
    """Wrap an optimizer factory so its numeric hyperparameters live in the state.

    ``inject_hyperparams(gradtx.adamw)(learning_rate=sched, weight_decay=1e-2)`` builds an
    optimizer whose ``state.hyperparams`` holds every numeric argument as a float32 array (or
    ``hyperparam_dtype``): scheduled ones are re-evaluated at each step (``h_t = s(t)``), the
    others can be read, or replaced between steps
    (``state.hyperparams["learning_rate"] = jnp.float32(1e-4)``) without recompiling — assign
    an array of the same dtype (``jnp.asarray(1e-4)`` is weakly typed and recompiles once). On every
    update the inner optimizer is rebuilt from the current values, so its math is unchanged.
    Arguments in ``static_args`` and non-numeric ones (masks, dtypes, flags, callables that
    are not schedules of the step) are passed through as they are.

    Deliberate difference from Optax: ``hyperparam_dtype`` defaults to float32, so
    hyperparameters stay float32 even when the parameters are bfloat16.

    Args:
        inner_factory: an optimizer factory such as ``gradtx.adamw`` or ``gradtx.ranger``.
        static_args: names of numeric arguments to keep static (e.g. integer periods).
        hyperparam_dtype: the dtype of the injected hyperparameters.

    Returns:
        A factory with ``inner_factory``'s signature returning a ``GradientTransformation``
        whose state is :class:`InjectHyperparamsState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.inject_hyperparams(gradtx.adam)(learning_rate=1e-3)
        >>> state = tx.init({"w": jnp.ones(2)})
        >>> state.hyperparams["learning_rate"] = jnp.float32(1e-4)

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax ``inject_hyperparams``), https://github.com/google-deepmind/optax
    """
    if not callable(inner_factory):
        raise TypeError(f"inject_hyperparams: inner_factory must be callable, got {inner_factory!r}")
    if not isinstance(static_args, (str, Iterable)) or not all(isinstance(name, str) for name in ([static_args] if isinstance(static_args, str) else static_args)):
        raise TypeError(f"inject_hyperparams: static_args must be an argument name or an iterable of argument names, got {static_args!r}")
    static = {static_args} if isinstance(static_args, str) else set(static_args)
    _checks.dtype("inject_hyperparams", "hyperparam_dtype", hyperparam_dtype)
    signature = inspect.signature(inner_factory)

    def factory(*args, **kwargs) -> GradientTransformation:
        bound = signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        inner_factory(**arguments)  # validates the hyperparameters now, at construction
        fixed = {k: v for k, v in arguments.items() if k in static or not (_is_numeric(v) or callable(v))}
        scheduled = {k: v for k, v in arguments.items() if k not in fixed and callable(v)}
        numeric = {k: v for k, v in arguments.items() if k not in fixed and k not in scheduled}

        def current(count, stored):
            values = {k: jnp.asarray(v(count), hyperparam_dtype) for k, v in scheduled.items()}
            return {**stored, **values}

        def init(params):
            count = tree.zero_count()
            hyperparams = current(count, {k: jnp.asarray(v, hyperparam_dtype) for k, v in numeric.items()})
            return InjectHyperparamsState(count, hyperparams, inner_factory(**fixed, **hyperparams).init(params))

        def update(updates, state, params=None, **extra_args):
            hyperparams = current(state.count, state.hyperparams)
            inner = inner_factory(**fixed, **hyperparams)
            updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
            return updates, InjectHyperparamsState(tree.safe_increment(state.count), hyperparams, inner_state)

        return GradientTransformation(init, update)

    return factory
