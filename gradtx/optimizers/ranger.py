"""Ranger (Wright, 2019-2020): Lookahead over Rectified Adam with gradient centralization.

``ranger = lookahead_wrapper(chain(centralize(), scale_by_ranger_radam(), add_decayed_weights(),
scale_by_learning_rate()))``, with the defaults and conventions of lessw2020's reference
(Ranger-Deep-Learning-Optimizer). Its RAdam step differs from Optax's ``scale_by_radam`` (and
gradtx's), which is why it has its own building block, :func:`scale_by_ranger_radam`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule, identity
from gradtx.combine import chain
from gradtx.state import recompute
from gradtx.state.quantize import check_storage
from gradtx.transforms.decay import add_decayed_weights
from gradtx.transforms.scaling import centralize, scale_by_learning_rate
from gradtx.wrappers.lookahead import lookahead_wrapper


class ScaleByRangerRAdamState(NamedTuple):
    """State of :func:`scale_by_ranger_radam`: the step counter and the two moment estimates."""

    count: jax.Array
    mu: Any
    nu: Any


def _log(x):
    # For a Python float, log(b) is taken in float64: b2 = 0.999 rounded to float32 moves
    # rho_t by 0.03, i.e. the first rectified steps by 1%. An injected (array) b stays an array.
    if isinstance(x, numbers.Real):
        return math.log(x) if x > 0 else -math.inf
    return jnp.log(x)


def _sma_length(t: jax.Array, decay_rate, rho_inf) -> jax.Array:
    """RAdam's ``rho_t = rho_inf - 2 t b2^t / (1 - b2^t)``, with ``b2 = exp(-decay_rate)``, accurate in float32."""
    x = decay_rate * t
    small, large = jnp.minimum(x, 1.0), jnp.maximum(x, 1.0)  # each branch only sees its own range
    # rho_t = rho_inf - (2 / s) x / (e^x - 1), s = decay_rate. While x < 1 both terms are close to
    # rho_inf and cancel (float32 would keep ~1e-4 of rho_t ~ 5); the series
    # x / (e^x - 1) = 1 - x / 2 + x^2 / 12 - x^4 / 720 + ... lets the large terms cancel exactly.
    tail = small**2 / 12 - small**4 / 720 + small**6 / 30240 - small**8 / 1209600
    near = (rho_inf - 2 / decay_rate) + t - (2 / decay_rate) * tail
    far = rho_inf - (2 / decay_rate) * large / jnp.expm1(large)
    return jnp.where(x < 1.0, near, far)


def _rectification(count: jax.Array, b1, b2, threshold) -> tuple[jax.Array, jax.Array]:
    """Whether step ``count`` is rectified (``rho_t > threshold``) and the Ranger reference's ``step_size``."""
    t = count.astype(jnp.float32)
    decay_rate = -_log(b2)  # b2^t = exp(-decay_rate * t)
    rho_inf = 2 / (1 - b2) - 1
    rho = _sma_length(t, decay_rate, rho_inf)
    # rho_t <= 4 has no rectification term (the reference fails there if threshold < 4): momentum step.
    rectified = (rho > threshold) & (rho > 4)
    first_correction = -jnp.expm1(_log(b1) * t)  # 1 - b1^t
    second_correction = -jnp.expm1(-decay_rate * t)  # 1 - b2^t
    ratio = (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)
    rectified_step = jnp.sqrt(second_correction * jnp.maximum(ratio, 0.0)) / first_correction
    return rectified, jnp.where(rectified, rectified_step, 1 / first_correction)


def _check_ranger_radam(owner: str, b1, b2, eps, threshold, state_dtype) -> None:
    check_storage(owner, "state_dtype", state_dtype)
    _checks.decay_rate(owner, "b1", b1)
    _checks.number(owner, "b2", b2, low=0.0, high=1.0, low_open=True, high_open=True)
    _checks.positive(owner, "eps", eps)
    _checks.number(owner, "threshold", threshold)


def scale_by_ranger_radam(
    b1: float = 0.95, b2: float = 0.999, eps: float = 1e-5, threshold: float = 5.0, *, state_dtype: Any = None
) -> GradientTransformation:
    r"""Rectified Adam as the Ranger reference computes it (the step inside :func:`ranger`).

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2,

        \rho_\infty = \frac{2}{1 - \beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t}, \qquad
        r_t = \frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t},

        u_t = \begin{cases}
            \dfrac{\sqrt{(1 - \beta_2^t)\, r_t}}{1 - \beta_1^t} \, \dfrac{m_t}{\sqrt{v_t} + \epsilon}
                & \rho_t > \text{threshold} \\[2ex]
            \dfrac{m_t}{1 - \beta_1^t} & \text{otherwise}
        \end{cases}

    Conventions of lessw2020's Ranger (and of Liu et al.'s RAdam code it comes from), which
    differ from Optax's ``scale_by_radam``: :math:`\epsilon` is added to :math:`\sqrt{v_t}`
    before the bias correction, i.e. it is :math:`\epsilon / \sqrt{1 - \beta_2^t}` on Optax's
    :math:`\sqrt{\hat v_t}` scale (large in the first rectified steps); the rectified branch
    needs :math:`\rho_t` strictly above the threshold (Optax: ``>=``); there is no
    ``eps_root``. The fallback is the same (bias-corrected momentum, no :math:`\epsilon`), and
    is also taken where :math:`\rho_t \le 4` (no rectification term exists there; the
    reference raises a math domain error if ``threshold < 4``).
    The scalar :math:`\rho_t` is computed so that float32 keeps it to ~1e-6 where it crosses
    the threshold (the reference computes it in float64); a float ``b2`` enters through
    :math:`\log \beta_2` taken in float64.

    Args:
        b1: decay of the first-moment EMA, in ``[0, 1)`` (Ranger's default 0.95).
        b2: decay of the second-moment EMA, in ``(0, 1)``.
        eps: added to :math:`\sqrt{v_t}`, ``> 0`` (Ranger's default 1e-5).
        threshold: the reference's ``N_sma_threshhold``; rectified steps need :math:`\rho_t` above it.
        state_dtype: storage of every moment: a floating dtype or ``gradtx.Quantized8bit()``;
            ``None`` means the parameter dtype (see ``docs/memory.md``).

    Returns:
        A ``GradientTransformation`` whose state is :class:`ScaleByRangerRAdamState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_ranger_radam()
        >>> updates, state = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
        >>> updates.round(4)  # rho_1 = 1: the first steps are bias-corrected momentum
        Array([ 0.5, -2. ], dtype=float32)

    References:
        Liu et al., 2020. On the Variance of the Adaptive Learning Rate and Beyond, https://arxiv.org/abs/1908.03265

        Wright, 2019. Ranger - a synergistic optimizer, https://github.com/lessw2020/Ranger-Deep-Learning-Optimizer
    """
    owner = "scale_by_ranger_radam"
    _check_ranger_radam(owner, b1, b2, eps, threshold, state_dtype)

    def init(params):
        mu = tree.moment_zeros_like(params, state_dtype, signed=True)
        return ScaleByRangerRAdamState(
            count=tree.zero_count(), mu=mu, nu=tree.moment_zeros_like(params, state_dtype, signed=False)
        )

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        count = tree.safe_increment(state.count)
        rectified, step_size = _rectification(count, b1, b2, threshold)

        def per_leaf(g, m_prev, v_prev):
            g_wide = tree.at_least_float32(g)
            m = b1 * tree.load(m_prev) + (1 - b1) * g_wide
            v = b2 * jnp.real(tree.load(v_prev)) + (1 - b2) * tree.abs_sq(g_wide)
            direction = jnp.where(rectified, m / (jnp.sqrt(v) + eps), m)
            u = step_size.astype(direction.real.dtype) * direction
            return u.astype(g.dtype), tree.store(m, m_prev), tree.store(v, v_prev)

        updates, mu, nu = tree.unzip(recompute.map_moments(per_leaf, updates, state.mu, state.nu), updates, 3)
        return updates, ScaleByRangerRAdamState(count=count, mu=mu, nu=nu)

    return GradientTransformation(init, update)


def ranger(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.95,
    b2: float = 0.999,
    eps: float = 1e-5,
    weight_decay: ScalarOrSchedule = 0.0,
    sync_period: int = 6,
    slow_step_size: float = 0.5,
    threshold: float = 5.0,
    use_gc: bool = True,
    *,
    mask: Any | Callable[[Any], Any] | None = None,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Ranger: Lookahead over Ranger's Rectified Adam, with gradient centralization and weight decay.

    .. math::

        \tilde g_t = g_t - \operatorname{mean}_{\text{fan-in}}(g_t) \text{ (GC, for arrays of rank} \ge 2),
        \qquad \theta_t = \theta_{t-1} - \eta_t \bigl(u_t(\tilde g) + \lambda_t \theta_{t-1}\bigr),

    with :math:`u_t` from :func:`scale_by_ranger_radam`, and every ``sync_period`` steps
    Lookahead's :math:`\phi \leftarrow \phi + \alpha(\theta_t - \phi),\ \theta_t \leftarrow \phi`
    (see :func:`gradtx.lookahead_wrapper`).

    Conventions, from lessw2020's Ranger (``ranger/ranger.py``, version 20.4.11, the class the
    repository's package exports; the decay also as in ``pytorch_ranger.Ranger`` 0.1.1): the
    gradient is centralized before it enters the moments (GC, Yong et al. 2020, on every array
    of rank >= 2: torch averages a ``(out, in, ...)`` weight over all axes but the first, gradtx's
    :func:`gradtx.centralize` a Flax ``(..., in, out)`` kernel over all axes but the last, i.e.
    both over the fan-in); weight decay is decoupled, :math:`\theta \leftarrow \theta - \eta\lambda
    \theta`, applied in both RAdam branches and not scaled by RAdam's step size. The later
    ``ranger2020.py`` (20.9.4) instead adds :math:`\lambda\theta` to the direction before
    multiplying by the step size, and in its momentum branch adds it into the stored
    :math:`m_t` in place; gradtx does not follow it there (with ``weight_decay=0`` the two agree).
    The defaults are the reference's: :math:`k = 6, \alpha = 0.5, \beta = (0.95, 0.999),
    \epsilon = 10^{-5}`, threshold 5. Evaluate with :func:`gradtx.lookahead_slow_params`.

    Args:
        learning_rate: :math:`\eta`, a float ``>= 0`` or a schedule.
        b1, b2, eps, threshold: see :func:`scale_by_ranger_radam`.
        weight_decay: :math:`\lambda`, a float ``>= 0`` or a schedule.
        sync_period, slow_step_size: Lookahead's :math:`k` and :math:`\alpha` (see
            :func:`gradtx.lookahead_wrapper`).
        use_gc: centralize the gradients (the reference's ``use_gc``; with ``False`` this is
            ``pytorch_ranger.Ranger``).
        mask: a pytree of booleans (or a callable ``params -> pytree``) selecting the
            parameters to decay; ``None`` decays all of them.
        state_dtype: storage of RAdam's two moments (see :func:`scale_by_ranger_radam`); the
            slow weights stay in the parameters' dtype (they are weights, not statistics).

    Returns:
        A ``GradientTransformation`` whose state is :class:`gradtx.LookaheadState` around
        ``(centralize, scale_by_ranger_radam, add_decayed_weights, scale_by_learning_rate)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.ranger(learning_rate=1e-3, weight_decay=1e-4)

    References:
        Wright, 2019. Ranger - a synergistic optimizer, https://github.com/lessw2020/Ranger-Deep-Learning-Optimizer

        Liu et al., 2020. On the Variance of the Adaptive Learning Rate and Beyond, https://arxiv.org/abs/1908.03265

        Zhang et al., 2019. Lookahead Optimizer: k steps forward, 1 step back, https://arxiv.org/abs/1907.08610

        Yong et al., 2020. Gradient Centralization: A New Optimization Technique for Deep Neural Networks, https://arxiv.org/abs/2004.01461
    """
    owner = "ranger"
    _checks.learning_rate(owner, learning_rate)
    _checks.mask("ranger", "mask", mask)
    _check_ranger_radam(owner, b1, b2, eps, threshold, state_dtype)
    _checks.non_negative(owner, "weight_decay", weight_decay, schedule_ok=True)
    _checks.positive_int(owner, "sync_period", sync_period)
    _checks.number(owner, "slow_step_size", slow_step_size, low=0.0, high=1.0, low_open=True)
    _checks.one_of(owner, "use_gc", use_gc, (False, True))
    fast = chain(
        centralize() if use_gc else identity(),
        scale_by_ranger_radam(b1, b2, eps, threshold, state_dtype=state_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
    return lookahead_wrapper(fast, sync_period, slow_step_size)
