"""Scaling building blocks: multiply updates by a constant, a learning rate or a schedule."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, packed, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule, elementwise


def scale(step_size: float) -> GradientTransformation:
    """Multiply every update by a constant: ``u_t = step_size * g_t``.

    Args:
        step_size: the factor (any real number; negative values turn ascent into descent).

    Returns:
        A stateless ``GradientTransformation``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale(-0.5)
        >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0]
        Array([-0.5, -0.5], dtype=float32)

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    _checks.number("scale", "step_size", step_size)
    return elementwise("scale", lambda g: (step_size * g).astype(g.dtype))


class ScaleByScheduleState(NamedTuple):
    """State of a scheduled scaling: the int32 step counter."""

    count: jax.Array


def scale_by_schedule(step_size_fn) -> GradientTransformation:
    """Multiply updates by a schedule evaluated at the step count: ``u_t = s(t) * g_t``.

    Args:
        step_size_fn: a schedule, ``count -> factor``.

    Returns:
        A ``GradientTransformation`` whose state is the step counter.

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    if not callable(step_size_fn):
        raise TypeError(f"scale_by_schedule: step_size_fn must be callable, got {step_size_fn!r}")

    def init(params):
        del params
        return ScaleByScheduleState(count=tree.zero_count())

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        factor = step_size_fn(state.count)
        updates = jax.tree.map(lambda g: (jnp.asarray(factor, jnp.float32) * g).astype(g.dtype), updates)
        return updates, ScaleByScheduleState(count=tree.safe_increment(state.count))

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Scale by a learning rate (float or schedule), descending by default: ``u_t = -lr_t * g_t``.

    Args:
        learning_rate: a float ``>= 0`` or a schedule ``count -> lr``.
        flip_sign: when ``True`` (default) the result is ``-lr * g`` so that adding it descends.

    Returns:
        A ``GradientTransformation`` (stateless for a float, holding a counter for a schedule).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_learning_rate(0.1)
        >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0]
        Array([-0.1, -0.1], dtype=float32)

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    _checks.learning_rate("scale_by_learning_rate", learning_rate)
    _checks.boolean("scale_by_learning_rate", "flip_sign", flip_sign)
    sign = -1 if flip_sign else 1
    if callable(learning_rate):
        return scale_by_schedule(lambda count: sign * learning_rate(count))
    return scale(sign * learning_rate)


def scale_by_trust_ratio(min_norm: float = 0.0, trust_coefficient: float = 1.0, eps: float = 0.0) -> GradientTransformation:
    r"""Rescale each leaf by its layer-wise trust ratio (LARS, LAMB).

    .. math::

        r = c \, \frac{\max(\|p\|, n_{min})}{\max(\|u\|, n_{min}) + \epsilon}, \qquad
        u \leftarrow r \, u

    per leaf (one ratio per parameter array), with :math:`r = 1` where either norm is zero so
    that a zero-initialised layer or a zero update is not frozen. Norms are computed in at
    least float32; the updates keep their dtype.

    Args:
        min_norm: :math:`n_{min}`, a lower bound on both norms (``>= 0``).
        trust_coefficient: :math:`c`, a multiplier of the ratio.
        eps: :math:`\epsilon`, added to the update norm in the denominator (``>= 0``).

    Returns:
        A stateless ``GradientTransformation``. Its ``update`` needs ``params``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_trust_ratio()
        >>> params = jnp.array([3.0, 4.0])
        >>> tx.update(jnp.array([0.0, 0.5]), tx.init(params), params)[0]
        Array([0., 5.], dtype=float32)

    References:
        You et al., 2017. Large Batch Training of Convolutional Networks (LARS), https://arxiv.org/abs/1708.03888

        You et al., 2020. Large Batch Optimization for Deep Learning: Training BERT in 76 minutes (LAMB),
        https://arxiv.org/abs/1904.00962
    """
    owner = "scale_by_trust_ratio"
    _checks.non_negative(owner, "min_norm", min_norm)
    _checks.non_negative(owner, "trust_coefficient", trust_coefficient)
    _checks.non_negative(owner, "eps", eps)

    def per_leaf(u, p):
        param_norm = _norm_at_least(p, min_norm)
        update_norm = _norm_at_least(u, min_norm)
        trust_ratio = trust_coefficient * param_norm / (update_norm + eps)
        trust_ratio = jnp.where((param_norm == 0.0) | (update_norm == 0.0), 1.0, trust_ratio)
        return (u * trust_ratio).astype(u.dtype)

    # One ratio per array also when the updates are packed: map_arrays vmaps over equal shapes.
    return packed.per_array(owner, per_leaf, needs_params=True)


def _norm_at_least(x: jax.Array, min_norm) -> jax.Array:
    """``max(||x||_2, min_norm)`` in at least float32, with finite derivatives at ``x = 0``."""
    norm = _norm(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
    return jnp.where(norm <= min_norm, min_norm, norm)


@jax.custom_jvp
def _norm(x: jax.Array) -> jax.Array:
    return jnp.linalg.norm(x)


@_norm.defjvp
def _norm_jvp(primals, tangents):
    # d||x||/dx = x / ||x|| is 0/0 at x = 0, and jnp.where would not stop that NaN flowing back
    # through the update (meta-learning): define it as 0 there. A rule on the scalar, not a
    # stand-in array of ones, so computing the norm costs one pass over x, not two.
    (x,), (dx,) = primals, tangents
    norm = _norm(x)
    positive = norm > 0
    return norm, jnp.where(positive, jnp.sum(jnp.real(jnp.conj(x) * dx)) / jnp.where(positive, norm, 1.0), 0.0)


def scale_by_sign() -> GradientTransformation:
    r"""Replace every update by its sign: :math:`u_t = \operatorname{sign}(g_t)`.

    For complex updates the sign is :math:`g / |g|` (and ``0`` at ``0``).

    Returns:
        A stateless ``GradientTransformation``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_sign()
        >>> tx.update(jnp.array([-3.0, 0.0, 0.2]), tx.init(jnp.zeros(3)))[0]
        Array([-1.,  0.,  1.], dtype=float32)

    References:
        Bernstein et al., 2018. signSGD: Compressed Optimisation for Non-Convex Problems, https://arxiv.org/abs/1802.04434
    """
    return elementwise("scale_by_sign", jnp.sign)


def centralize() -> GradientTransformation:
    r"""Gradient centralization: remove from each weight its mean over the fan-in axes.

    For every leaf with at least two dimensions, laid out as ``(..., out_features)``,

    .. math::

        u_{\ldots, j} = g_{\ldots, j} - \operatorname{mean}_{\ldots}(g_{\ldots, j}),

    i.e. the mean over all axes except the **last** is subtracted, so each output unit's
    incoming weight gradient has zero mean. Leaves with fewer than two dimensions (biases,
    scales) pass through unchanged.

    Layout: Flax kernels keep the output features last (``Dense``: ``(in, out)``, ``Conv``:
    ``(h, w, in, out)``), which is what this follows. The paper and its PyTorch code keep
    output channels first (``(out, in, h, w)``) and average over the trailing axes, as does
    ``optax.centralize``; on a transposed layout the two agree.

    Returns:
        A stateless ``GradientTransformation``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.centralize()
        >>> g = jnp.array([[1.0, 4.0], [3.0, 8.0]])
        >>> tx.update(g, tx.init(g))[0]
        Array([[-1., -2.],
               [ 1.,  2.]], dtype=float32)

    References:
        Yong et al., 2020. Gradient Centralization: A New Optimization Technique for Deep Neural Networks,
        https://arxiv.org/abs/2004.01461
    """

    def per_leaf(g):
        if g.ndim < 2:
            return g
        fan_in_axes = tuple(range(g.ndim - 1))
        return g - jnp.mean(g, axis=fan_in_axes, keepdims=True)

    return packed.per_array("centralize", per_leaf)
