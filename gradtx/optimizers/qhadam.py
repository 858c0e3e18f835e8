"""QHAdam: Adam with both moments replaced by quasi-hyperbolic averages (Ma & Yarats, 2019).

``nu1 = nu2 = 1`` recovers Adam exactly; other settings recover NAdam (approximately) and
other adaptive methods. The quasi-hyperbolic average is shared with QHM
(:func:`gradtx.optimizers.qhm.quasi_hyperbolic_average`).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import chain
from gradtx.optimizers.adam import ScaleByAdamState, _check_adam
from gradtx.optimizers.qhm import quasi_hyperbolic_average
from gradtx.state import recompute
from gradtx.transforms.decay import add_decayed_weights
from gradtx.transforms.scaling import scale_by_learning_rate


def _check_qhadam(owner: str, b1, b2, nu1, nu2, eps, mu_dtype, state_dtype) -> None:
    _check_adam(owner, b1, b2, eps, 0.0, mu_dtype, state_dtype=state_dtype)
    _checks.number(owner, "nu1", nu1, low=0.0, high=1.0)
    _checks.number(owner, "nu2", nu2, low=0.0, high=1.0)


def _check_qhadam_alias(owner: str, learning_rate, b1, b2, nu1, nu2, eps, weight_decay, mu_dtype, state_dtype) -> None:
    _checks.learning_rate(owner, learning_rate)
    _check_qhadam(owner, b1, b2, nu1, nu2, eps, mu_dtype, state_dtype)
    _checks.non_negative(owner, "weight_decay", weight_decay, schedule_ok=True)


def scale_by_qhadam(
    b1: float = 0.9,
    b2: float = 0.999,
    nu1: float = 0.7,
    nu2: float = 1.0,
    eps: float = 1e-8,
    *,
    mu_dtype=None,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Rescale updates by quasi-hyperbolic Adam.

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad
        \hat m_t = \frac{m_t}{1 - \beta_1^t}, \quad \hat v_t = \frac{v_t}{1 - \beta_2^t}

        u_t = \frac{(1 - \nu_1) g_t + \nu_1 \hat m_t}{\sqrt{(1 - \nu_2) g_t^2 + \nu_2 \hat v_t} + \epsilon}

    ``eps`` is added outside the square root, as in qhoptim. qhoptim stores the
    bias-corrected averages directly (``beta_adj = 1 - 1 / sum_i beta^i``); that is the same
    quantity as Adam's ``m_t / (1 - beta^t)``, kept here as Adam's moments (and state) so
    that ``nu1 = nu2 = 1`` gives exactly :func:`scale_by_adam`'s updates.

    Defaults: ``b1``, ``b2`` and ``eps`` are qhoptim's; ``nu1 = 0.7, nu2 = 1.0`` are the
    values the authors recommend (qhoptim's code defaults ``nus=(1.0, 1.0)`` are plain Adam).

    Args:
        b1: decay of the first moment EMA, in ``[0, 1)``.
        b2: decay of the second moment EMA, in ``[0, 1)``.
        nu1: immediate discount of the first moment, in ``[0, 1]``.
        nu2: immediate discount of the second moment, in ``[0, 1]``.
        eps: added to the denominator, ``> 0`` (as for :func:`scale_by_adam`; qhoptim also accepts 0).
        mu_dtype: dtype of the first moment; ``None`` means the parameter's dtype.
        state_dtype: storage of every moment whose own ``mu_dtype`` is ``None``: a floating dtype
            or ``gradtx.Quantized8bit()``; ``None`` means the parameter dtype (see ``docs/memory.md``).

    Returns:
        A ``GradientTransformation`` whose state is Adam's, :class:`ScaleByAdamState`: QHAdam
        keeps the same moments and only combines them differently.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_qhadam(nu1=0.7, nu2=1.0)
        >>> updates, state = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
        >>> updates.round(4)
        Array([ 1., -1.], dtype=float32)

    References:
        Ma & Yarats, 2019. Quasi-hyperbolic momentum and Adam for deep learning, https://arxiv.org/abs/1810.06801
    """
    _check_qhadam("scale_by_qhadam", b1, b2, nu1, nu2, eps, mu_dtype, state_dtype)

    def init(params):
        mu = tree.moment_zeros_like(params, tree.resolve_storage(mu_dtype, state_dtype), signed=True)
        return ScaleByAdamState(count=tree.zero_count(), mu=mu, nu=tree.moment_zeros_like(params, state_dtype, signed=False))

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        count = tree.safe_increment(state.count)

        def per_leaf(g, m_prev, v_prev):
            g_wide = tree.at_least_float32(g)
            m = b1 * tree.load(m_prev) + (1 - b1) * g_wide
            v = b2 * jnp.real(tree.load(v_prev)) + (1 - b2) * tree.abs_sq(g_wide)
            numerator = quasi_hyperbolic_average(g_wide, tree.debias(m, b1, count), nu1)
            denominator = jnp.sqrt(quasi_hyperbolic_average(tree.abs_sq(g_wide), tree.debias(v, b2, count), nu2)) + eps
            return (numerator / denominator).astype(g.dtype), tree.store(m, m_prev), tree.store(v, v_prev)

        updates, mu, nu = tree.unzip(recompute.map_moments(per_leaf, updates, state.mu, state.nu), updates, 3)
        return updates, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return GradientTransformation(init, update)


def qhadam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    nu1: float = 0.7,
    nu2: float = 1.0,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    mu_dtype=None,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Quasi-hyperbolic Adam (QHAdam), as in qhoptim's ``QHAdam``.

    .. math::

        g_t \leftarrow g_t + \lambda \theta_{t-1}, \qquad
        \theta_t = \theta_{t-1} - \alpha_t \, u_t(g_t)

    with :math:`u_t` from :func:`scale_by_qhadam`. Weight decay is *coupled* (an L2 term added
    to the gradient before the moments), qhoptim's default ``decouple_weight_decay=False``;
    :func:`qhadamw` decouples it.

    Args:
        learning_rate: ``alpha``, a float or a schedule.
        b1, b2, nu1, nu2, eps: see :func:`scale_by_qhadam`.
        weight_decay: the coupled L2 coefficient ``lambda >= 0`` (float or schedule).
        mask: which parameters to decay: a pytree of booleans or a callable ``params -> pytree``.
        mu_dtype: dtype of the first moment; ``None`` means the parameter's dtype.
        state_dtype: storage of every moment whose own ``mu_dtype`` is ``None``: a floating dtype
            or ``gradtx.Quantized8bit()``; ``None`` means the parameter dtype (see ``docs/memory.md``).

    Returns:
        A ``GradientTransformation``: ``chain(add_decayed_weights, scale_by_qhadam, scale_by_learning_rate)``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.qhadam(learning_rate=1e-3, b1=0.995, nu1=0.7)
        >>> params = {"w": jnp.ones(3)}
        >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)

    References:
        Ma & Yarats, 2019. Quasi-hyperbolic momentum and Adam for deep learning, https://arxiv.org/abs/1810.06801
    """
    _check_qhadam_alias("qhadam", learning_rate, b1, b2, nu1, nu2, eps, weight_decay, mu_dtype, state_dtype)
    _checks.mask("qhadam", "mask", mask)
    return chain(
        add_decayed_weights(weight_decay, mask),
        scale_by_qhadam(b1, b2, nu1, nu2, eps, mu_dtype=mu_dtype, state_dtype=state_dtype),
        scale_by_learning_rate(learning_rate),
    )


def qhadamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    nu1: float = 0.7,
    nu2: float = 1.0,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    mu_dtype=None,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""QHAdam with decoupled weight decay, as qhoptim's ``QHAdamW``; see :func:`qhadam`.

    .. math::

        \theta_t = \theta_{t-1} - \alpha_t \left(u_t(g_t) + \lambda \theta_{t-1}\right)

    The decay is multiplied by the learning rate, as in qhoptim (``p *= 1 - lr * weight_decay``)
    and Optax's ``adamw``. The default ``weight_decay = 1e-4`` is ``adamw``'s (qhoptim's is 0).

    Args:
        learning_rate, b1, b2, nu1, nu2, eps, mask, mu_dtype, state_dtype: see :func:`qhadam`.
        weight_decay: the decoupled decay ``lambda >= 0`` (float or schedule).

    Returns:
        A ``GradientTransformation``: ``chain(scale_by_qhadam, add_decayed_weights, scale_by_learning_rate)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.qhadamw(learning_rate=1e-3, weight_decay=1e-2)

    References:
        Ma & Yarats, 2019. Quasi-hyperbolic momentum and Adam for deep learning, https://arxiv.org/abs/1810.06801

        Loshchilov & Hutter, 2019. Decoupled weight decay regularization, https://arxiv.org/abs/1711.05101
    """
    _check_qhadam_alias("qhadamw", learning_rate, b1, b2, nu1, nu2, eps, weight_decay, mu_dtype, state_dtype)
    _checks.mask("qhadamw", "mask", mask)
    return chain(
        scale_by_qhadam(b1, b2, nu1, nu2, eps, mu_dtype=mu_dtype, state_dtype=state_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
