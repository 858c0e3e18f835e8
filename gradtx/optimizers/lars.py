"""LARS (You et al., 2017): SGD with momentum and a layer-wise trust ratio, for large batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradtx import _checks
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import chain, masked
from gradtx.state.quantize import check_storage
from gradtx.transforms.decay import add_decayed_weights
from gradtx.transforms.momentum import trace
from gradtx.transforms.scaling import scale_by_learning_rate, scale_by_trust_ratio


def lars(
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_decay_mask: Any | Callable[[Any], Any] = True,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    trust_ratio_mask: Any | Callable[[Any], Any] = True,
    momentum: float = 0.9,
    nesterov: bool = False,
    *,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""The LARS optimizer: layer-wise adaptive rate scaling of SGD with momentum.

    For every parameter array (layer) :math:`p`:

    .. math::

        d_t = g_t + \lambda_t p_t, \qquad
        r_t = c \, \frac{\|p_t\|}{\|d_t\| + \epsilon}, \qquad
        m_t = \mu \, m_{t-1} + \eta_t \, r_t \, d_t, \qquad
        p_{t+1} = p_t - m_t

    (the momentum accumulates the learning-rate-scaled step, as in the paper's Algorithm 1;
    :math:`r_t = 1` where either norm is zero).

    Args:
        learning_rate: :math:`\eta`, a float ``>= 0`` or a schedule ``count -> lr``.
        weight_decay: :math:`\lambda`, a float ``>= 0`` or a schedule.
        weight_decay_mask: a pytree of booleans (or a callable ``params -> pytree``)
            selecting the parameters to decay; ``True`` decays all of them.
        trust_coefficient: :math:`c`, LARS's trust coefficient :math:`\eta` in the paper.
        eps: :math:`\epsilon`, added to the update norm (``>= 0``).
        trust_ratio_mask: selects the parameters rescaled by the trust ratio, like
            ``weight_decay_mask`` (biases and norm scales are commonly excluded).
        momentum: :math:`\mu`, in ``[0, 1]``.
        nesterov: use Nesterov's look-ahead momentum.
        state_dtype: storage of the momentum :math:`m` (LARS's one moment): a floating dtype or
            ``gradtx.Quantized8bit()`` (signed 8-bit code); ``None`` means the parameter's dtype.
            Computed on in at least float32 (see ``docs/memory.md``).

    Returns:
        A ``GradientTransformation``: ``chain(add_decayed_weights, masked(scale_by_trust_ratio),
        scale_by_learning_rate, trace)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.lars(learning_rate=0.1, weight_decay=1e-4)

    References:
        You et al., 2017. Large Batch Training of Convolutional Networks, https://arxiv.org/abs/1708.03888
    """
    owner = "lars"
    _checks.learning_rate(owner, learning_rate)
    _checks.mask(owner, "trust_ratio_mask", trust_ratio_mask)
    _checks.mask(owner, "weight_decay_mask", weight_decay_mask)
    _checks.non_negative(owner, "weight_decay", weight_decay, schedule_ok=True)
    _checks.non_negative(owner, "trust_coefficient", trust_coefficient)
    _checks.non_negative(owner, "eps", eps)
    _checks.number(owner, "momentum", momentum, low=0.0, high=1.0)
    _checks.one_of(owner, "nesterov", nesterov, (False, True))
    check_storage(owner, "state_dtype", state_dtype)
    return chain(
        add_decayed_weights(weight_decay, mask=weight_decay_mask),
        masked(scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps), trust_ratio_mask),
        scale_by_learning_rate(learning_rate),
        trace(momentum, nesterov, accumulator_dtype=state_dtype),
    )
