r"""Clipping building blocks: bound the updates element-wise, per block, or globally.

Complex updates are treated as pairs of real numbers: norms use :math:`|g|^2 = g \bar g`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradtx import _checks, packed, tree
from gradtx.base import EmptyState, GradientTransformation, elementwise


def clip(max_delta: float) -> GradientTransformation:
    r"""Clip every element of the updates to :math:`[-\delta, \delta]`.

    .. math::

        u_t = \min(\max(g_t, -\delta), \delta)

    Complex updates have their real and imaginary parts clipped separately (Optax raises).

    Args:
        max_delta: :math:`\delta`, the largest absolute value of an element (``>= 0``).

    Returns:
        A stateless ``GradientTransformation``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.clip(1.0)
        >>> tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(jnp.zeros(3)))[0]
        Array([-1. ,  0.5,  1. ], dtype=float32)

    References:
        Pascanu et al., 2013. On the difficulty of training Recurrent Neural Networks, https://arxiv.org/abs/1211.5063
    """
    _checks.non_negative("clip", "max_delta", max_delta)

    def per_leaf(g):
        if jnp.iscomplexobj(g):
            real, imag = jnp.clip(g.real, -max_delta, max_delta), jnp.clip(g.imag, -max_delta, max_delta)
            return jax.lax.complex(real, imag).astype(g.dtype)
        return jnp.clip(g, -max_delta, max_delta).astype(g.dtype)

    return elementwise("clip", per_leaf)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    r"""Rescale all updates together so that their global norm is at most ``max_norm``.

    .. math::

        \|g\| = \sqrt{\textstyle\sum_i \|g_i\|_2^2}, \qquad
        u_t = \begin{cases} g_t & \|g\| < c \\ c \, g_t / \|g\| & \text{otherwise} \end{cases}

    The direction of the whole update is kept; only its length is bounded.

    Args:
        max_norm: :math:`c`, the largest global norm (``> 0``).

    Returns:
        A stateless ``GradientTransformation``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.clip_by_global_norm(1.0)
        >>> tx.update({"a": jnp.array([3.0]), "b": jnp.array([4.0])}, tx.init(None))[0]
        {'a': Array([0.6], dtype=float32), 'b': Array([0.8], dtype=float32)}

    References:
        Pascanu et al., 2013. On the difficulty of training Recurrent Neural Networks, https://arxiv.org/abs/1211.5063
    """
    _checks.positive("clip_by_global_norm", "max_norm", max_norm)

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        norm = tree.global_norm(updates)
        # A select between g and c * g / norm (Optax's form), so that values and derivatives
        # through the update (meta-gradients) are Optax's.
        keep = norm < max_norm

        def per_leaf(g):
            return jnp.where(keep, g, (g / norm.astype(g.dtype)) * max_norm).astype(g.dtype)

        return jax.tree.map(per_leaf, updates), state

    return GradientTransformation(init, update)


def clip_by_block_rms(threshold: float) -> GradientTransformation:
    r"""Rescale each parameter block (leaf) so that its root mean square is at most ``threshold``.

    .. math::

        u = \frac{g}{\max\left(1, \sqrt{\operatorname{mean}(|g|^2)} / d\right)}

    per leaf; Adafactor's update clipping (Shazeer & Stern, 2018, Section 6).

    Args:
        threshold: :math:`d`, the largest RMS of a block (``> 0``).

    Returns:
        A stateless ``GradientTransformation``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.clip_by_block_rms(1.0)
        >>> tx.update(jnp.array([2.0, -2.0]), tx.init(jnp.zeros(2)))[0]
        Array([ 1., -1.], dtype=float32)

    References:
        Shazeer & Stern, 2018. Adafactor: Adaptive Learning Rates with Sublinear Memory Cost, https://arxiv.org/abs/1804.04235
    """
    _checks.positive("clip_by_block_rms", "threshold", threshold)

    def per_leaf(g):
        rms = jnp.sqrt(jnp.mean(tree.abs_sq(g)))
        return (g / jnp.maximum(1.0, rms / threshold)).astype(g.dtype)

    return packed.per_array("clip_by_block_rms", per_leaf)
