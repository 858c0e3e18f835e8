"""RMSProp (Hinton, 2012) and its centered variant (Graves, 2013), with optional momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule, identity
from gradtx.combine import chain
from gradtx.state import recompute
from gradtx.state.quantize import check_storage
from gradtx.transforms.momentum import trace
from gradtx.transforms.scaling import scale_by_learning_rate


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`: the int32 step counter and the moving average of squared gradients."""

    count: jax.Array
    nu: Any


class ScaleByRStdDevState(NamedTuple):
    """State of :func:`scale_by_stddev`: the int32 step counter and the moving averages of the gradients and their squares."""

    count: jax.Array
    mu: Any
    nu: Any


def _check_rms(owner: str, decay, eps, initial_scale, eps_in_sqrt, bias_correction, state_dtype) -> None:
    check_storage(owner, "state_dtype", state_dtype)
    _checks.decay_rate(owner, "decay", decay)
    _checks.non_negative(owner, "eps", eps)
    _checks.non_negative(owner, "initial_scale", initial_scale)
    _checks.one_of(owner, "eps_in_sqrt", eps_in_sqrt, (False, True))
    _checks.one_of(owner, "bias_correction", bias_correction, (False, True))


def _inverse_rms(mean_square: jax.Array, eps, eps_in_sqrt: bool) -> jax.Array:
    """``1 / sqrt(v + eps)`` (``eps_in_sqrt``, Optax's default) or ``1 / (sqrt(v) + eps)`` (PyTorch's)."""
    return jax.lax.rsqrt(mean_square + eps) if eps_in_sqrt else 1 / (jnp.sqrt(mean_square) + eps)


def scale_by_rms(
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Rescale updates by the root of a moving average of squared gradients (RMSProp).

    .. math::

        v_t = \rho \, v_{t-1} + (1 - \rho) |g_t|^2, \quad v_0 = v_{init}, \qquad
        u_t = \frac{g_t}{\sqrt{\hat v_t + \epsilon}} \ \text{or} \ \frac{g_t}{\sqrt{\hat v_t} + \epsilon}

    with :math:`\hat v_t = v_t / (1 - \rho^t)` if ``bias_correction`` else :math:`v_t`. With
    ``eps_in_sqrt=False, bias_correction=True`` this is Adam with ``b1 = 0``.

    The state always holds a step counter (Optax's holds one only with ``bias_correction``),
    so that its structure does not depend on a flag.

    Args:
        decay: :math:`\rho`, in ``[0, 1)``.
        eps: :math:`\epsilon` (``>= 0``).
        initial_scale: :math:`v_{init}` (``>= 0``); PyTorch uses 0, TensorFlow 1 uses 1.
        eps_in_sqrt: add :math:`\epsilon` inside the square root (Optax's default) rather
            than outside it (PyTorch's).
        bias_correction: divide :math:`v_t` by :math:`1 - \rho^t`.
        state_dtype: storage of the moments: a floating dtype or ``gradtx.Quantized8bit()``;
            ``None`` means the parameter's dtype.

    Returns:
        A ``GradientTransformation`` whose state is :class:`ScaleByRmsState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_rms(eps=0.0, bias_correction=True)
        >>> tx.update(jnp.array([2.0, -0.5]), tx.init(jnp.zeros(2)))[0].round(4)
        Array([ 1., -1.], dtype=float32)

    References:
        Hinton, 2012. Neural Networks for Machine Learning, Lecture 6e,
        https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf
    """
    _check_rms("scale_by_rms", decay, eps, initial_scale, eps_in_sqrt, bias_correction, state_dtype)

    def init(params):
        return ScaleByRmsState(
            count=tree.zero_count(), nu=tree.moment_full_like(params, initial_scale, state_dtype, signed=False)
        )

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        count = tree.safe_increment(state.count)
        correction = tree.bias_correction(decay, count)

        def per_leaf(g, v_prev):
            g_wide = tree.at_least_float32(g)
            v = (1 - decay) * tree.abs_sq(g_wide) + decay * jnp.real(tree.load(v_prev))
            v_hat = v / correction if bias_correction else v
            return (_inverse_rms(v_hat, eps, eps_in_sqrt) * g_wide).astype(g.dtype), tree.store(v, v_prev)

        updates, nu = tree.unzip(recompute.map_moments(per_leaf, updates, state.nu), updates, 2)
        return updates, ScaleByRmsState(count=count, nu=nu)

    return GradientTransformation(init, update)


def scale_by_stddev(
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Rescale updates by a moving estimate of the gradients' standard deviation (centered RMSProp).

    .. math::

        m_t = \rho \, m_{t-1} + (1 - \rho) g_t, \qquad
        v_t = \rho \, v_{t-1} + (1 - \rho) |g_t|^2, \qquad
        u_t = \frac{g_t}{\sqrt{\hat v_t - |\hat m_t|^2 + \epsilon}}

    (or :math:`g_t / (\sqrt{\hat v_t - |\hat m_t|^2} + \epsilon)`), the hats denoting the
    optional bias correction; see :func:`scale_by_rms` for the arguments and the state's
    counter.

    Args:
        decay, eps, initial_scale, eps_in_sqrt, bias_correction, state_dtype: see :func:`scale_by_rms`
            (``initial_scale`` initialises :math:`v` only; :math:`m_0 = 0`).

    Returns:
        A ``GradientTransformation`` whose state is :class:`ScaleByRStdDevState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_stddev()
        >>> updates, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))

    References:
        Graves, 2013. Generating Sequences With Recurrent Neural Networks, https://arxiv.org/abs/1308.0850
    """
    _check_rms("scale_by_stddev", decay, eps, initial_scale, eps_in_sqrt, bias_correction, state_dtype)

    def init(params):
        mu = tree.moment_zeros_like(params, state_dtype, signed=True)
        return ScaleByRStdDevState(
            count=tree.zero_count(), mu=mu, nu=tree.moment_full_like(params, initial_scale, state_dtype, signed=False)
        )

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        count = tree.safe_increment(state.count)
        correction = tree.bias_correction(decay, count)

        def per_leaf(g, m_prev, v_prev):
            g_wide = tree.at_least_float32(g)
            m = (1 - decay) * g_wide + decay * tree.load(m_prev)
            v = (1 - decay) * tree.abs_sq(g_wide) + decay * jnp.real(tree.load(v_prev))
            m_hat, v_hat = (m / correction, v / correction) if bias_correction else (m, v)
            u = _inverse_rms(v_hat - tree.abs_sq(m_hat), eps, eps_in_sqrt) * g_wide
            return u.astype(g.dtype), tree.store(m, m_prev), tree.store(v, v_prev)

        updates, mu, nu = tree.unzip(recompute.map_moments(per_leaf, updates, state.mu, state.nu), updates, 3)
        return updates, ScaleByRStdDevState(count=count, mu=mu, nu=nu)

    return GradientTransformation(init, update)


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    *,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""The RMSProp optimizer, plain or centered, with optional (Nesterov) momentum.

    .. math::

        p_{t+1} = p_t - \eta_t \frac{g_t}{\sqrt{\hat v_t + \epsilon}}

    with :math:`\hat v_t` the moving average of squared gradients of :func:`scale_by_rms`, or
    its variance :math:`\hat v_t - |\hat m_t|^2` (:func:`scale_by_stddev`) when ``centered``.
    With ``momentum`` the learning-rate-scaled step goes through :func:`gradtx.trace`.

    Args:
        learning_rate: :math:`\eta`, a float ``>= 0`` or a schedule ``count -> lr``.
        decay, eps, initial_scale, eps_in_sqrt, bias_correction: see :func:`scale_by_rms`.
        centered: divide by the standard deviation rather than the root mean square.
        momentum: momentum in ``[0, 1]`` applied after the learning rate, or ``None``.
        nesterov: use Nesterov's look-ahead momentum (ignored when ``momentum is None``).
        state_dtype: storage of every moment (mean square, mean, momentum): a floating dtype or
            ``gradtx.Quantized8bit()``; ``None`` means the parameter's dtype.

    Returns:
        A ``GradientTransformation``:
        ``chain(scale_by_rms or scale_by_stddev, scale_by_learning_rate, trace or identity)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.rmsprop(learning_rate=1e-3, centered=True, momentum=0.9)

    References:
        Hinton, 2012. Neural Networks for Machine Learning, Lecture 6e,
        https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf

        Graves, 2013. Generating Sequences With Recurrent Neural Networks, https://arxiv.org/abs/1308.0850
    """
    owner = "rmsprop"
    _checks.learning_rate(owner, learning_rate)
    _check_rms(owner, decay, eps, initial_scale, eps_in_sqrt, bias_correction, state_dtype)
    _checks.one_of(owner, "centered", centered, (False, True))
    if momentum is not None:
        _checks.number(owner, "momentum", momentum, low=0.0, high=1.0)
    _checks.one_of(owner, "nesterov", nesterov, (False, True))
    normalize = scale_by_stddev if centered else scale_by_rms
    return chain(
        normalize(decay, eps, initial_scale, eps_in_sqrt, bias_correction, state_dtype=state_dtype),
        scale_by_learning_rate(learning_rate),
        identity() if momentum is None else trace(momentum, nesterov, state_dtype),
    )
