"""AdaBound and AMSBound: Adam whose per-parameter step size is clipped to bounds that converge to SGD's.

The step size is clipped in absolute terms, so :func:`scale_by_adabound` takes the learning
rate itself and returns the final (descent) update: it cannot be followed by a separate
``scale_by_learning_rate``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import chain
from gradtx.state import recompute
from gradtx.state.quantize import check_storage
from gradtx.transforms.decay import add_decayed_weights


class ScaleByAdaBoundState(NamedTuple):
    """State of :func:`scale_by_adabound`: step counter, moment EMAs and the running max of ``nu`` (AMSBound)."""

    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any


def _check_adabound(owner: str, learning_rate, b1, b2, final_lr, gamma, eps, base_learning_rate, mu_dtype, state_dtype) -> Any:
    """Validate the hyperparameters and return the base learning rate ``alpha_0``."""
    _checks.learning_rate(owner, learning_rate)
    _checks.decay_rate(owner, "b1", b1)
    _checks.decay_rate(owner, "b2", b2)
    _checks.positive(owner, "final_lr", final_lr)
    _checks.number(owner, "gamma", gamma, low=0.0, high=1.0, low_open=True, high_open=True)
    _checks.non_negative(owner, "eps", eps)
    check_storage(owner, "mu_dtype", mu_dtype)
    check_storage(owner, "state_dtype", state_dtype)
    return _base_learning_rate(owner, learning_rate, base_learning_rate)


def _base_learning_rate(owner: str, learning_rate: ScalarOrSchedule, base_learning_rate: Any) -> Any:
    # The bounds follow a schedule through lr_t / lr_0, so lr_0 must be positive.
    if base_learning_rate is not None:
        _checks.positive(owner, "base_learning_rate", base_learning_rate)
        value = base_learning_rate
    elif callable(learning_rate):
        value = learning_rate(0)
        if not isinstance(value, jax.core.Tracer) and not float(value) > 0:
            raise ValueError(
                f"{owner}: learning_rate(0) must be > 0 (the bounds are scaled by lr_t / lr_0), got {float(value)!r};"
                " pass base_learning_rate for a schedule that starts at 0"
            )
    else:
        _checks.positive(owner, "learning_rate", learning_rate)
        value = learning_rate
    # Under inject_hyperparams the value is traced; otherwise keep a Python float, never an array.
    return value if isinstance(value, jax.core.Tracer) else float(value)


def scale_by_adabound(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    final_lr: float = 0.1,
    gamma: float = 1e-3,
    eps: float = 1e-8,
    *,
    amsbound: bool = False,
    base_learning_rate: float | None = None,
    mu_dtype=None,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""The AdaBound step: Adam's per-parameter step size, clipped to dynamic bounds (returns ``-step``).

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \quad
        (\text{AMSBound: } v_t \leftarrow \max(v_{t-1}^{\max}, v_t))

        \eta^*_t = \mathrm{final\_lr} \cdot \alpha_t / \alpha_0, \quad
        \eta_l(t) = \eta^*_t \left(1 - \frac{1}{\gamma t + 1}\right), \quad
        \eta_u(t) = \eta^*_t \left(1 + \frac{1}{\gamma t}\right)

        u_t = -\,\mathrm{clip}\!\left(\frac{\alpha_t \sqrt{1 - \beta_2^t}}{(1 - \beta_1^t)(\sqrt{v_t} + \epsilon)},
        \eta_l(t), \eta_u(t)\right) m_t

    This is the authors' code (Luolc/AdaBound) exactly: both bias corrections sit *inside*
    the clipped step size, which then multiplies the raw first moment ``m_t``; ``eps`` is
    added to ``sqrt(v_t)`` before the bias correction; the upper bound has ``gamma * t`` (not
    ``gamma * t + 1``) in its denominator. The bounds follow a learning-rate schedule
    through ``alpha_t / alpha_0``, as the reference rescales ``final_lr`` by
    ``group['lr'] / base_lr``.

    Unlike most ``scale_by_*`` blocks this one takes the learning rate and returns the final
    update (already negated): the clipping acts on the absolute step size, so a learning
    rate applied afterwards would move the bounds.

    Args:
        learning_rate: Adam's learning rate ``alpha``, a float ``> 0`` or a schedule.
        b1: decay of the first moment EMA, in ``[0, 1)``.
        b2: decay of the second moment EMA, in ``[0, 1)``.
        final_lr: the SGD learning rate both bounds converge to, ``> 0``.
        gamma: the convergence speed of the bounds, in ``(0, 1)``.
        eps: added to ``sqrt(v_t)``, ``>= 0``.
        amsbound: use the running maximum of ``v_t`` (AMSBound). ``nu_max`` is in the state
            either way (left at zero without ``amsbound``) so that its structure never
            depends on this flag.
        base_learning_rate: ``alpha_0``; defaults to ``learning_rate(0)`` for a schedule (the
            reference's ``base_lr``) and to ``learning_rate`` for a float. Give it for a
            schedule that starts at 0 (warmup), and under ``inject_hyperparams``, which
            passes the scheduled value rather than the schedule.
        mu_dtype: dtype of the first moment; ``None`` means the parameter's dtype.
        state_dtype: storage of every moment whose own ``mu_dtype`` is ``None``: a floating dtype
            or ``gradtx.Quantized8bit()``; ``None`` means the parameter dtype (see ``docs/memory.md``).

    Returns:
        A ``GradientTransformation`` whose state is :class:`ScaleByAdaBoundState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_adabound(learning_rate=1e-3, final_lr=0.1)
        >>> updates, state = tx.update(jnp.ones(2), tx.init(jnp.ones(2)))

    References:
        Luo, Xiong, Liu & Sun, 2019. Adaptive Gradient Methods with Dynamic Bound of Learning Rate, https://arxiv.org/abs/1902.09843
    """
    _checks.one_of("scale_by_adabound", "amsbound", amsbound, (False, True))
    base_lr = _check_adabound(
        "scale_by_adabound", learning_rate, b1, b2, final_lr, gamma, eps, base_learning_rate, mu_dtype, state_dtype
    )

    def init(params):
        return ScaleByAdaBoundState(
            count=tree.zero_count(),
            mu=tree.moment_zeros_like(params, tree.resolve_storage(mu_dtype, state_dtype), signed=True),
            nu=tree.moment_zeros_like(params, state_dtype, signed=False),
            nu_max=tree.moment_zeros_like(params, state_dtype, signed=False),
        )

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        learning_rate_now = tree.resolve(learning_rate, state.count)
        count = tree.safe_increment(state.count)
        t = count.astype(jnp.float32)
        adam_step_size = learning_rate_now * jnp.sqrt(1 - b2**count) / (1 - b1**count)
        sgd_learning_rate = final_lr * learning_rate_now / base_lr
        lower = sgd_learning_rate * (1 - 1 / (gamma * t + 1))
        upper = sgd_learning_rate * (1 + 1 / (gamma * t))

        def per_leaf(g, m_prev, v_prev, v_max_prev):
            g_wide = tree.at_least_float32(g)
            m = b1 * tree.load(m_prev) + (1 - b1) * g_wide
            v = b2 * jnp.real(tree.load(v_prev)) + (1 - b2) * tree.abs_sq(g_wide)
            v_max = jnp.maximum(jnp.real(tree.load(v_max_prev)), v) if amsbound else None
            step_size = jnp.clip(adam_step_size / (jnp.sqrt(v_max if amsbound else v) + eps), lower, upper)
            u = -step_size * m
            # Without amsbound nu_max stays at zero, untouched (not even re-quantized).
            nu_max = tree.store(v_max, v_max_prev) if amsbound else v_max_prev
            return u.astype(g.dtype), tree.store(m, m_prev), tree.store(v, v_prev), nu_max

        per_leaf_results = recompute.map_moments(per_leaf, updates, state.mu, state.nu, state.nu_max)
        updates, mu, nu, nu_max = tree.unzip(per_leaf_results, updates, 4)
        return updates, ScaleByAdaBoundState(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return GradientTransformation(init, update)


def adabound(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    final_lr: float = 0.1,
    gamma: float = 1e-3,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    amsbound: bool = False,
    base_learning_rate: float | None = None,
    mu_dtype=None,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""AdaBound (or AMSBound): Adam that turns into SGD, as in the authors' ``AdaBound``.

    .. math::

        g_t \leftarrow g_t + \lambda \theta_{t-1}, \qquad \theta_t = \theta_{t-1} + u_t(g_t)

    with :math:`u_t` from :func:`scale_by_adabound`. Weight decay is *coupled* (an L2 term
    added to the gradient before the moments), as in the reference.

    Args:
        learning_rate: Adam's learning rate ``alpha``, a float ``> 0`` or a schedule; the
            bounds follow it (see :func:`scale_by_adabound`).
        b1, b2, final_lr, gamma, eps: see :func:`scale_by_adabound`.
        weight_decay: the coupled L2 coefficient ``lambda >= 0`` (float or schedule).
        mask: which parameters to decay: a pytree of booleans or a callable ``params -> pytree``.
        amsbound: use AMSBound's running maximum of the second moment.
        base_learning_rate: ``alpha_0``, see :func:`scale_by_adabound`.
        mu_dtype: dtype of the first moment; ``None`` means the parameter's dtype.
        state_dtype: storage of every moment whose own ``mu_dtype`` is ``None``: a floating dtype
            or ``gradtx.Quantized8bit()``; ``None`` means the parameter dtype (see ``docs/memory.md``).

    Returns:
        A ``GradientTransformation``: ``chain(add_decayed_weights, scale_by_adabound)``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.adabound(learning_rate=1e-3, final_lr=0.1)
        >>> params = {"w": jnp.ones(3)}
        >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)

    References:
        Luo, Xiong, Liu & Sun, 2019. Adaptive Gradient Methods with Dynamic Bound of Learning Rate, https://arxiv.org/abs/1902.09843
    """
    _checks.one_of("adabound", "amsbound", amsbound, (False, True))
    hyperparameters = (learning_rate, b1, b2, final_lr, gamma, eps, weight_decay, mask)
    return _adabound("adabound", *hyperparameters, amsbound, base_learning_rate, mu_dtype, state_dtype)


def amsbound(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    final_lr: float = 0.1,
    gamma: float = 1e-3,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    base_learning_rate: float | None = None,
    mu_dtype=None,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""AMSBound: :func:`adabound` with ``amsbound=True`` (the second moment is its running maximum).

    .. math::

        v^{\max}_t = \max(v^{\max}_{t-1}, v_t)

    replaces :math:`v_t` in the step size of :func:`scale_by_adabound`.

    Args:
        learning_rate, b1, b2, final_lr, gamma, eps, weight_decay, mask, base_learning_rate, mu_dtype,
            state_dtype: see :func:`adabound`.

    Returns:
        A ``GradientTransformation``: ``adabound(..., amsbound=True)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.amsbound(learning_rate=1e-3, final_lr=0.1)

    References:
        Luo, Xiong, Liu & Sun, 2019. Adaptive Gradient Methods with Dynamic Bound of Learning Rate, https://arxiv.org/abs/1902.09843
    """
    hyperparameters = (learning_rate, b1, b2, final_lr, gamma, eps, weight_decay, mask)
    return _adabound("amsbound", *hyperparameters, True, base_learning_rate, mu_dtype, state_dtype)


def _adabound(
    owner, learning_rate, b1, b2, final_lr, gamma, eps, weight_decay, mask, amsbound, base_learning_rate, mu_dtype, state_dtype
):
    # Validated under the alias's name, so that errors name the function the user called.
    _check_adabound(owner, learning_rate, b1, b2, final_lr, gamma, eps, base_learning_rate, mu_dtype, state_dtype)
    _checks.mask(owner, "mask", mask)
    _checks.non_negative(owner, "weight_decay", weight_decay, schedule_ok=True)
    return chain(
        add_decayed_weights(weight_decay, mask),
        scale_by_adabound(
            learning_rate,
            b1,
            b2,
            final_lr,
            gamma,
            eps,
            amsbound=amsbound,
            base_learning_rate=base_learning_rate,
            mu_dtype=mu_dtype,
            state_dtype=state_dtype,
        ),
    )
