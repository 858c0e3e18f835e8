"""Stochastic gradient descent, with optional heavy-ball or Nesterov momentum."""

from __future__ import annotations

from typing import Any

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule, identity
from gradtx.combine import chain
from gradtx.state.quantize import check_storage
from gradtx.transforms.momentum import trace
from gradtx.transforms.scaling import scale_by_learning_rate


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
    *,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Stochastic gradient descent, optionally with momentum.

    .. math::

        m_t = g_t + \mu \, m_{t-1}, \qquad
        p_{t+1} = p_t - \eta_t \begin{cases} g_t & \text{no momentum} \\ m_t & \text{heavy ball} \\
        g_t + \mu \, m_t & \text{Nesterov} \end{cases}

    Args:
        learning_rate: :math:`\eta`, a float ``>= 0`` or a schedule ``count -> lr``.
        momentum: :math:`\mu` in ``[0, 1]``, or ``None`` for plain SGD (no momentum buffer).
        nesterov: use Nesterov's look-ahead momentum (ignored when ``momentum is None``, as in Optax).
        accumulator_dtype: storage of the momentum buffer: a floating dtype or
            ``gradtx.Quantized8bit()``; ``None`` means the parameter's dtype.
        state_dtype: the same, for every moment (SGD has one): used when ``accumulator_dtype`` is ``None``.

    Returns:
        A ``GradientTransformation``: ``chain(trace, scale_by_learning_rate)`` (``identity``
        in place of ``trace`` when ``momentum is None``).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.sgd(learning_rate=0.1, momentum=0.9)
        >>> params = {"w": jnp.array([1.0, -1.0])}
        >>> updates, state = tx.update({"w": jnp.array([1.0, -1.0])}, tx.init(params), params)
        >>> gradtx.apply_updates(params, updates)["w"]
        Array([ 0.9, -0.9], dtype=float32)

    References:
        Robbins & Monro, 1951. A Stochastic Approximation Method, https://doi.org/10.1214/aoms/1177729586

        Sutskever et al., 2013. On the importance of initialization and momentum in deep learning,
        http://proceedings.mlr.press/v28/sutskever13.pdf
    """
    _checks.learning_rate("sgd", learning_rate)
    if momentum is not None:
        _checks.number("sgd", "momentum", momentum, low=0.0, high=1.0)
    _checks.one_of("sgd", "nesterov", nesterov, (False, True))
    check_storage("sgd", "accumulator_dtype", accumulator_dtype)
    check_storage("sgd", "state_dtype", state_dtype)
    storage = tree.resolve_storage(accumulator_dtype, state_dtype)
    accelerate = identity() if momentum is None else trace(momentum, nesterov, storage)
    return chain(accelerate, scale_by_learning_rate(learning_rate))
