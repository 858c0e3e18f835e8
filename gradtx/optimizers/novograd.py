"""NovoGrad (Ginsburg et al., 2019): Adam-like steps with one second moment per layer."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, packed, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import chain
from gradtx.state.quantize import check_storage
from gradtx.transforms.scaling import scale_by_learning_rate


class ScaleByNovogradState(NamedTuple):
    """State of :func:`scale_by_novograd`: the step counter, the momentum, and the second moment (one scalar per layer)."""

    count: jax.Array
    mu: Any
    nu: Any


def _check_novograd(owner: str, b1, b2, eps, eps_root, weight_decay, state_dtype) -> None:
    _checks.decay_rate(owner, "b1", b1)
    _checks.decay_rate(owner, "b2", b2)
    _checks.non_negative(owner, "eps", eps)
    _checks.non_negative(owner, "eps_root", eps_root)
    _checks.non_negative(owner, "weight_decay", weight_decay, schedule_ok=True)
    check_storage(owner, "state_dtype", state_dtype)


def _per_layer_scalars(params: Any, state_dtype: Any) -> Any:
    # One scalar per layer is a negligible share of memory: under an explicit policy it stays in
    # at least float32 (never 8-bit, never narrowed); by default in the parameter dtype, as in Optax.
    def scalar(p):
        dtype = p.dtype if state_dtype is None else jnp.promote_types(p.dtype, jnp.float32)
        return jax.ShapeDtypeStruct((), dtype)

    return tree.zeros_like(packed.map_shapes(scalar, params))


def scale_by_novograd(
    b1: float = 0.9,
    b2: float = 0.25,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mu_dtype: Any = None,
    *,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Rescale updates by NovoGrad's layer-wise normalised momentum.

    For every parameter array (layer) :math:`p` with gradient :math:`g`:

    .. math::

        v_t = \beta_2 v_{t-1} + (1 - \beta_2) \|g_t\|^2 \quad (v_1 = \|g_1\|^2), \qquad
        d_t = \frac{g_t}{\sqrt{v_t + \epsilon_{root}} + \epsilon} + \lambda_t p_t,

        m_t = \beta_1 m_{t-1} + d_t \quad (m_1 = d_1), \qquad u_t = m_t

    :math:`v` is one scalar per layer, so the optimizer state is about half of Adam's.

    Args:
        b1: :math:`\beta_1`, the momentum, in ``[0, 1)``.
        b2: :math:`\beta_2`, the decay of the per-layer second moment, in ``[0, 1)``.
        eps: :math:`\epsilon`, added outside the square root (``>= 0``).
        eps_root: :math:`\epsilon_{root}`, added inside it (``>= 0``).
        weight_decay: :math:`\lambda`, a float ``>= 0`` or a schedule (a gradtx addition:
            Optax accepts only a float here).
        mu_dtype: storage of :math:`m`: a floating dtype or ``gradtx.Quantized8bit()``;
            ``None`` means ``state_dtype``.
        state_dtype: storage policy of the state (see ``docs/memory.md``): a floating dtype or
            ``gradtx.Quantized8bit()`` for the parameter-sized momentum :math:`m` (when
            ``mu_dtype`` is ``None``); ``None`` means the parameter's dtype. The second moment
            :math:`v` is one scalar per layer, a negligible share of memory: under any policy
            it stays in at least float32 (by default, in the parameter's dtype, as in Optax).
            Arithmetic is in at least float32 either way.

    Returns:
        A ``GradientTransformation`` whose state is :class:`ScaleByNovogradState`. Its
        ``update`` needs ``params``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_novograd(eps=0.0)
        >>> params = jnp.zeros(2)
        >>> tx.update(jnp.array([3.0, -4.0]), tx.init(params), params)[0]
        Array([ 0.6, -0.8], dtype=float32)

    References:
        Ginsburg et al., 2019. Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of Deep Networks,
        https://arxiv.org/abs/1905.11286
    """
    owner = "scale_by_novograd"
    _check_novograd(owner, b1, b2, eps, eps_root, weight_decay, state_dtype)
    check_storage(owner, "mu_dtype", mu_dtype)
    mu_storage = tree.resolve_storage(mu_dtype, state_dtype)

    def init(params):
        mu = tree.moment_zeros_like(params, mu_storage, signed=True)
        return ScaleByNovogradState(count=tree.zero_count(), mu=mu, nu=_per_layer_scalars(params, state_dtype))

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(f"{owner}: update needs params, got params=None")
        count = tree.safe_increment(state.count)
        first_step = count == 1
        decay = tree.resolve(weight_decay, state.count)

        # The layer norms and second moments per array (on packed updates one Stacked array per
        # run); the momentum element-wise, on whole buffers where the updates are packed
        # (gradtx.packed.per_element). m is loaded (dequantized) and stored outside both maps: a
        # packed 8-bit moment (a QuantizedBuffer of per-run codes and scales) has no per-array view.
        def second_moment(g, v_prev):
            squared_norm = jnp.linalg.norm(tree.at_least_float32(g)) ** 2
            return jnp.where(first_step, squared_norm, (1 - b2) * squared_norm + b2 * tree.real_at_least_float32(v_prev))

        v = packed.map_arrays(second_moment, updates, state.nu, kinds=("stacked",), owner=owner)
        denominator = packed.per_element(jax.tree.map(lambda v: jnp.sqrt(v + eps_root) + eps, v), updates)

        def momentum(g, m_prev, p, denominator):
            d = tree.at_least_float32(g) / denominator + decay * tree.at_least_float32(p)
            m = jnp.where(first_step, d, b1 * m_prev + d)
            return m.astype(g.dtype), m

        mu_wide = jax.tree.map(tree.load, state.mu, is_leaf=tree.is_quantized)
        updates, mu = tree.unzip(jax.tree.map(momentum, updates, mu_wide, params, denominator), updates, 2)
        mu = jax.tree.map(tree.store, mu, state.mu)
        nu = jax.tree.map(lambda v, v_prev: v.astype(v_prev.dtype), v, state.nu)
        return updates, ScaleByNovogradState(count=count, mu=mu, nu=nu)

    return GradientTransformation(init, update)


def novograd(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.25,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    *,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""The NovoGrad optimizer: :func:`scale_by_novograd` followed by the (negative) learning rate.

    .. math::

        p_{t+1} = p_t - \eta_t m_t

    with :math:`m_t` the layer-wise normalised momentum of :func:`scale_by_novograd` (whose
    weight decay is inside the momentum, as in the paper). Robust to the initial learning
    rate; works without warm-up for large batches.

    Args:
        learning_rate: :math:`\eta`, a float ``>= 0`` or a schedule ``count -> lr``.
        b1, b2, eps, eps_root, weight_decay, state_dtype: see :func:`scale_by_novograd`
            (NovoGrad's default ``eps`` is 1e-6; ``state_dtype`` stores the momentum, while the
            per-layer second moment stays in at least float32).

    Returns:
        A ``GradientTransformation``: ``chain(scale_by_novograd, scale_by_learning_rate)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.novograd(learning_rate=1e-2, weight_decay=1e-3)

    References:
        Ginsburg et al., 2019. Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of Deep Networks,
        https://arxiv.org/abs/1905.11286

        Li et al., 2019. Jasper: An End-to-End Convolutional Neural Acoustic Model, https://arxiv.org/abs/1904.03288
    """
    _checks.learning_rate("novograd", learning_rate)
    _check_novograd("novograd", b1, b2, eps, eps_root, weight_decay, state_dtype)
    return chain(
        scale_by_novograd(b1, b2, eps, eps_root, weight_decay, state_dtype=state_dtype), scale_by_learning_rate(learning_rate)
    )
