"""Momentum building blocks: a heavy-ball trace and an exponential moving average of the updates.

Both accumulate in at least float32 and store the accumulator in its state dtype (a float dtype
or ``gradtx.Quantized8bit()``), so that a bfloat16 accumulator does not lose the small increments;
the updates keep the gradient's dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from gradtx import _checks, tree
from gradtx.base import GradientTransformation
from gradtx.state import recompute
from gradtx.state.quantize import check_storage


class TraceState(NamedTuple):
    """State of :func:`trace`: the momentum buffer, one array per parameter."""

    trace: Any


def trace(decay: float, nesterov: bool = False, accumulator_dtype: Any = None) -> GradientTransformation:
    r"""Heavy-ball momentum: accumulate a decaying sum of past updates.

    .. math::

        m_t = g_t + \mu \, m_{t-1}, \qquad
        u_t = \begin{cases} m_t & \text{(heavy ball)} \\ g_t + \mu \, m_t & \text{(Nesterov)} \end{cases}

    Unlike :func:`ema`, the gradient is not scaled by :math:`1 - \mu`: in steady state the
    trace is :math:`1 / (1 - \mu)` times the gradient.

    Args:
        decay: :math:`\mu`, the momentum, in ``[0, 1]``.
        nesterov: use Nesterov's look-ahead form.
        accumulator_dtype: storage of :math:`m`: a floating dtype or ``gradtx.Quantized8bit()``;
            ``None`` means the parameter's dtype.

    Returns:
        A ``GradientTransformation`` whose state is :class:`TraceState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.trace(decay=0.5)
        >>> state = tx.init(jnp.zeros(2))
        >>> updates, state = tx.update(jnp.ones(2), state)
        >>> tx.update(jnp.ones(2), state)[0]
        Array([1.5, 1.5], dtype=float32)

    References:
        Polyak, 1964. Some methods of speeding up the convergence of iteration methods,
        https://doi.org/10.1016/0041-5553(64)90137-5

        Sutskever et al., 2013. On the importance of initialization and momentum in deep learning,
        http://proceedings.mlr.press/v28/sutskever13.pdf
    """
    _checks.number("trace", "decay", decay, low=0.0, high=1.0)
    _checks.one_of("trace", "nesterov", nesterov, (False, True))
    check_storage("trace", "accumulator_dtype", accumulator_dtype)

    def init(params):
        return TraceState(trace=tree.moment_zeros_like(params, accumulator_dtype, signed=True))

    def update(updates, state, params=None, **extra_args):
        del params, extra_args

        def per_leaf(g, m_prev):
            g_wide = tree.at_least_float32(g)
            m = g_wide + decay * tree.load(m_prev)
            u = g_wide + decay * m if nesterov else m
            return u.astype(g.dtype), tree.store(m, m_prev)

        updates, momentum = tree.unzip(recompute.map_moments(per_leaf, updates, state.trace), updates, 2)
        return updates, TraceState(trace=momentum)

    return GradientTransformation(init, update)


class EmaState(NamedTuple):
    """State of :func:`ema`: the int32 step counter and the moving average, one array per parameter."""

    count: jax.Array
    ema: Any


def ema(decay: float, debias: bool = True, accumulator_dtype: Any = None) -> GradientTransformation:
    r"""Exponential moving average of the updates, optionally debiased.

    .. math::

        m_t = \mu \, m_{t-1} + (1 - \mu) \, g_t, \qquad
        u_t = \begin{cases} m_t / (1 - \mu^t) & \text{(debias)} \\ m_t & \text{otherwise} \end{cases}

    Debiasing removes the bias towards the zero initialisation (Adam's bias correction).

    Args:
        decay: :math:`\mu`, in ``[0, 1)``.
        debias: divide by :math:`1 - \mu^t`.
        accumulator_dtype: storage of :math:`m`: a floating dtype or ``gradtx.Quantized8bit()``;
            ``None`` means the parameter's dtype.

    Returns:
        A ``GradientTransformation`` whose state is :class:`EmaState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.ema(decay=0.5)
        >>> tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))[0]
        Array([1., 1.], dtype=float32)

    References:
        Kingma & Ba, 2015. Adam: A Method for Stochastic Optimization, https://arxiv.org/abs/1412.6980
    """
    _checks.decay_rate("ema", "decay", decay)
    _checks.one_of("ema", "debias", debias, (False, True))
    check_storage("ema", "accumulator_dtype", accumulator_dtype)

    def init(params):
        return EmaState(count=tree.zero_count(), ema=tree.moment_zeros_like(params, accumulator_dtype, signed=True))

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        count = tree.safe_increment(state.count)
        correction = tree.bias_correction(decay, count)

        def per_leaf(g, m_prev):
            m = (1 - decay) * tree.at_least_float32(g) + decay * tree.load(m_prev)
            u = m / correction if debias else m
            return u.astype(g.dtype), tree.store(m, m_prev)

        updates, average = tree.unzip(recompute.map_moments(per_leaf, updates, state.ema), updates, 2)
        return updates, EmaState(count=count, ema=average)

    return GradientTransformation(init, update)
