"""Quasi-hyperbolic momentum (QHM): an average of the plain gradient and a dampened momentum.

QHM (Ma & Yarats, 2019) steps along ``(1 - nu) * g + nu * m``: ``nu = 0`` is plain SGD,
``nu = 1`` is SGD with dampened momentum. The same quasi-hyperbolic average, applied to
both of Adam's moments, gives QHAdam (``gradtx/optimizers/qhadam.py``), which reuses
:func:`quasi_hyperbolic_average` from here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import chain
from gradtx.state import recompute
from gradtx.state.quantize import check_storage
from gradtx.transforms.decay import add_decayed_weights
from gradtx.transforms.scaling import scale_by_learning_rate


def quasi_hyperbolic_average(current: jax.Array, average: jax.Array, nu: Any) -> jax.Array:
    """The quasi-hyperbolic average of one array: ``(1 - nu) * current + nu * average``.

    Args:
        current: this step's value (the gradient, or its square for QHAdam's second moment).
        average: its exponential moving average.
        nu: the immediate discount factor in ``[0, 1]``; ``nu = 1`` keeps only the average.

    Returns:
        The interpolated array.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradtx.optimizers.qhm import quasi_hyperbolic_average
        >>> quasi_hyperbolic_average(jnp.ones(2), jnp.zeros(2), 0.7)
        Array([0.3, 0.3], dtype=float32)

    References:
        Ma & Yarats, 2019. Quasi-hyperbolic momentum and Adam for deep learning, https://arxiv.org/abs/1810.06801
    """
    return (1 - nu) * current + nu * average


def _check_qhm(owner: str, momentum, nu, accumulator_dtype, state_dtype=None) -> None:
    _checks.decay_rate(owner, "momentum", momentum)
    _checks.number(owner, "nu", nu, low=0.0, high=1.0)
    check_storage(owner, "accumulator_dtype", accumulator_dtype)
    check_storage(owner, "state_dtype", state_dtype)


class ScaleByQHMState(NamedTuple):
    """State of :func:`scale_by_qhm`: the dampened momentum buffer (an EMA of the gradients)."""

    trace: Any


def scale_by_qhm(
    momentum: float = 0.999, nu: float = 0.7, *, accumulator_dtype=None, state_dtype: Any = None
) -> GradientTransformation:
    r"""Rescale updates by quasi-hyperbolic momentum.

    .. math::

        m_t = \beta m_{t-1} + (1 - \beta) g_t, \qquad u_t = (1 - \nu) g_t + \nu m_t

    The momentum buffer is *dampened* (an exponential moving average, as in qhoptim's
    ``QHM``) and not bias-corrected, as in the reference.

    Args:
        momentum: the momentum decay ``beta`` in ``[0, 1)``.
        nu: the immediate discount factor in ``[0, 1]``: ``0`` is plain SGD, ``1`` dampened momentum.
        accumulator_dtype: dtype of the momentum buffer; ``None`` means the parameter's dtype.
        state_dtype: storage of the momentum buffer when ``accumulator_dtype`` is ``None``: a
            floating dtype or ``gradtx.Quantized8bit()`` (see ``docs/memory.md``).

    Returns:
        A ``GradientTransformation`` whose state is :class:`ScaleByQHMState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_qhm(momentum=0.9, nu=0.7)
        >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0]
        Array([0.37, 0.37], dtype=float32)

    References:
        Ma & Yarats, 2019. Quasi-hyperbolic momentum and Adam for deep learning, https://arxiv.org/abs/1810.06801
    """
    _check_qhm("scale_by_qhm", momentum, nu, accumulator_dtype, state_dtype)
    storage = tree.resolve_storage(accumulator_dtype, state_dtype)

    def init(params):
        return ScaleByQHMState(trace=tree.moment_zeros_like(params, storage, signed=True))

    def per_leaf(g, m_prev):
        g_wide = tree.at_least_float32(g)
        m = momentum * tree.load(m_prev) + (1 - momentum) * g_wide
        return quasi_hyperbolic_average(g_wide, m, nu).astype(g.dtype), tree.store(m, m_prev)

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        updates, trace = tree.unzip(recompute.map_moments(per_leaf, updates, state.trace), updates, 2)
        return updates, ScaleByQHMState(trace=trace)

    return GradientTransformation(init, update)


def qhm(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.999,
    nu: float = 0.7,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    accumulator_dtype=None,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Quasi-hyperbolic momentum (QHM), as in qhoptim's ``QHM``.

    .. math::

        g_t \leftarrow g_t + \lambda \theta_{t-1}, \quad
        m_t = \beta m_{t-1} + (1 - \beta) g_t, \quad
        \theta_t = \theta_{t-1} - \alpha_t \left[(1 - \nu) g_t + \nu m_t\right]

    Weight decay is *coupled* (added to the gradient before the momentum), qhoptim's default
    ``weight_decay_type="grad"``. Because the momentum is dampened, a learning rate ``alpha``
    here corresponds to ``alpha * (1 - beta)`` in undampened ``sgd(momentum=beta)``. The
    defaults ``momentum = 0.999, nu = 0.7`` are the authors' suggested start (qhoptim requires
    both), e.g. ``learning_rate = 1.0`` where SGD used 0.1 with momentum 0.9.

    Args:
        learning_rate: ``alpha``, a float or a schedule.
        momentum: the momentum decay ``beta`` in ``[0, 1)``.
        nu: the immediate discount factor in ``[0, 1]``.
        weight_decay: the coupled L2 coefficient ``lambda >= 0`` (float or schedule).
        mask: which parameters to decay: a pytree of booleans or a callable ``params -> pytree``.
        accumulator_dtype: dtype of the momentum buffer; ``None`` means the parameter's dtype.
        state_dtype: storage of the momentum buffer when ``accumulator_dtype`` is ``None``: a
            floating dtype or ``gradtx.Quantized8bit()`` (see ``docs/memory.md``).

    Returns:
        A ``GradientTransformation``: ``chain(add_decayed_weights, scale_by_qhm, scale_by_learning_rate)``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.qhm(learning_rate=1.0, momentum=0.999, nu=0.7)
        >>> params = {"w": jnp.ones(3)}
        >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)

    References:
        Ma & Yarats, 2019. Quasi-hyperbolic momentum and Adam for deep learning, https://arxiv.org/abs/1810.06801
    """
    _checks.learning_rate("qhm", learning_rate)
    _checks.mask("qhm", "mask", mask)
    _check_qhm("qhm", momentum, nu, accumulator_dtype, state_dtype)
    _checks.non_negative("qhm", "weight_decay", weight_decay, schedule_ok=True)
    return chain(
        add_decayed_weights(weight_decay, mask),
        scale_by_qhm(momentum, nu, accumulator_dtype=accumulator_dtype, state_dtype=state_dtype),
        scale_by_learning_rate(learning_rate),
    )
