"""LAMB (You et al., 2020): Adam's direction with decoupled decay, rescaled per layer by a trust ratio."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradtx import _checks
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import chain
from gradtx.optimizers.adam import _check_adam, scale_by_adam
from gradtx.transforms.decay import add_decayed_weights
from gradtx.transforms.scaling import scale_by_learning_rate, scale_by_trust_ratio


def lamb(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any | Callable[[Any], Any] | None = None,
    *,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""The LAMB optimizer: layer-wise adaptive large-batch Adam.

    For every parameter array (layer) :math:`p`:

    .. math::

        r_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon} + \lambda_t p_t, \qquad
        p_{t+1} = p_t - \eta_t \frac{\lVert p_t \rVert}{\lVert r_t \rVert} r_t,

    with :math:`\hat m_t, \hat v_t` Adam's bias-corrected moments (:func:`gradtx.scale_by_adam`).
    The trust ratio is 1 where either norm is zero.

    Args:
        learning_rate: a float ``>= 0`` or a schedule ``count -> lr``.
        b1, b2, eps, eps_root: see :func:`gradtx.scale_by_adam` (LAMB's default ``eps`` is 1e-6).
        weight_decay: :math:`\lambda`, a float ``>= 0`` or a schedule.
        mask: a pytree of booleans (or a callable ``params -> pytree``) selecting the
            parameters to decay; ``None`` decays all of them.
        state_dtype: storage of Adam's two moments, e.g. ``gradtx.Quantized8bit()`` (see
            :func:`gradtx.scale_by_adam`).

    Returns:
        A ``GradientTransformation``:
        ``chain(scale_by_adam, add_decayed_weights, scale_by_trust_ratio, scale_by_learning_rate)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.lamb(learning_rate=1e-3, weight_decay=1e-2)

    References:
        You et al., 2020. Large Batch Optimization for Deep Learning: Training BERT in 76 minutes,
        https://arxiv.org/abs/1904.00962
    """
    _checks.learning_rate("lamb", learning_rate)
    _checks.mask("lamb", "mask", mask)
    _check_adam("lamb", b1, b2, eps, eps_root, state_dtype=state_dtype)
    _checks.non_negative("lamb", "weight_decay", weight_decay, schedule_ok=True)
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, state_dtype=state_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_trust_ratio(),
        scale_by_learning_rate(learning_rate),
    )
