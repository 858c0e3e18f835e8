"""Sophia: clipped momentum preconditioned by a lazily refreshed diagonal Hessian estimate.

Sophia (Liu et al., 2023) keeps an EMA ``m`` of the gradients and an EMA ``h`` of a diagonal
Hessian estimate that is refreshed only every ``k`` steps, and steps along
``clip(m / max(rho * h, eps), -1, 1)``. The estimate comes from an *estimator*
``(params, key, **extra_args) -> tree``, evaluated inside ``jax.lax.cond`` so that its cost is
paid on refresh steps only. Two estimators are provided: Gauss-Newton-Bartlett
(:func:`gnb_hessian_estimate`, SophiaG, needs ``logits_fn=`` in ``update``) and Hutchinson
(:func:`hutchinson_hessian_estimate`, Sophia-H, needs ``obj_fn=``).

The parameterization follows the authors' SophiaG (``Liuhong99/Sophia``, packaged as
``sophia_opt``) rather than Optax's contrib ``sophia``; see :func:`scale_by_sophia`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, packed, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import chain
from gradtx.state import recompute
from gradtx.state.quantize import check_storage
from gradtx.transforms.decay import add_decayed_weights
from gradtx.transforms.scaling import scale_by_learning_rate

HessianEstimator = Callable[..., Any]


def gnb_hessian_estimate(
    params: Any, key: jax.Array, *, logits_fn: Callable[[Any], jax.Array] | None = None, **extra_args: Any
) -> Any:
    """The Gauss-Newton-Bartlett estimate of the Hessian diagonal of a softmax cross-entropy loss.

    .. math::

        \\hat y_b \\sim \\mathrm{softmax}(f(\\theta, x_b)), \\quad
        \\hat L(\\theta) = \\frac{1}{B} \\sum_{b=1}^{B} \\mathrm{CE}(f(\\theta, x_b), \\hat y_b), \\quad
        \\hat h = B \\cdot \\nabla \\hat L(\\theta) \\odot \\nabla \\hat L(\\theta)

    Labels are sampled from the model itself, so ``E[h_hat]`` is the diagonal of the
    Gauss-Newton matrix whatever the true labels. ``B`` counts every position that carries
    logits (batch times sequence length), as the reference's ``bs = total_bs * block_size``.
    The gradient is taken with one forward pass (``jax.vjp``), using
    ``dL_hat / dlogits = (softmax - onehot(y_hat)) / B``.

    Args:
        params: the parameters at which to estimate.
        key: a PRNG key for the label sampling.
        logits_fn: ``params -> logits`` of shape ``(..., num_classes)`` on the current batch.
        **extra_args: ignored, so this can serve as ``scale_by_sophia``'s ``hessian_estimator``.

    Returns:
        A tree like ``params`` holding ``h_hat`` (non-negative).

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> x = jnp.ones((4, 3))
        >>> params = jnp.zeros((3, 5))
        >>> h = gradtx.gnb_hessian_estimate(params, jax.random.key(0), logits_fn=lambda w: x @ w)
        >>> h.shape
        (3, 5)

    References:
        Liu et al., 2023. Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
        Pre-training, https://arxiv.org/abs/2305.14342
    """
    del extra_args
    if logits_fn is None:
        raise ValueError("gnb_hessian_estimate: needs logits_fn=, a function params -> logits on the current batch, got None")
    logits, pullback = jax.vjp(logits_fn, params)
    labels = jax.random.categorical(key, jax.lax.stop_gradient(logits))
    positions = logits.size // logits.shape[-1]
    probabilities = jax.nn.softmax(logits.astype(jnp.float32))
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    sampled_loss_grad = pullback(((probabilities - onehot) / positions).astype(logits.dtype))[0]
    return jax.tree.map(lambda g: positions * g * g, sampled_loss_grad)


def hutchinson_hessian_estimate(
    params: Any, key: jax.Array, *, obj_fn: Callable[[Any], jax.Array] | None = None, **extra_args: Any
) -> Any:
    """Hutchinson's unbiased estimate of the Hessian diagonal: ``u * (H u)`` with Rademacher ``u``.

    .. math::

        u_i \\sim \\mathrm{Uniform}\\{-1, +1\\}, \\quad \\hat h = u \\odot (\\nabla^2 L(\\theta)\\, u)

    ``H u`` is a Hessian-vector product (forward-over-reverse), never the Hessian. The estimate
    can be negative where the Hessian is not diagonally dominant.

    Args:
        params: the parameters at which to estimate.
        key: a PRNG key for the probe ``u``.
        obj_fn: the loss ``params -> scalar`` on the current batch (Optax's extra-argument name).
        **extra_args: ignored, so this can serve as ``scale_by_sophia``'s ``hessian_estimator``.

    Returns:
        A tree like ``params`` holding ``h_hat``.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> obj_fn = lambda p: jnp.sum(jnp.array([1.0, 2.0, 3.0]) * p ** 2)
        >>> gradtx.hutchinson_hessian_estimate(jnp.ones(3), jax.random.key(0), obj_fn=obj_fn)
        Array([2., 4., 6.], dtype=float32)

    References:
        Hutchinson, 1989. A stochastic estimator of the trace of the influence matrix for Laplacian
        smoothing splines, https://doi.org/10.1080/03610918908812806
        Liu et al., 2023. Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
        Pre-training, https://arxiv.org/abs/2305.14342
    """
    del extra_args
    if obj_fn is None:
        raise ValueError("hutchinson_hessian_estimate: needs obj_fn=, the loss params -> scalar on the current batch, got None")
    # One key per array of the original tree, also when params are packed (gradtx.pack).
    probes = packed.per_array_random(
        lambda k, p: jax.random.rademacher(k, jnp.shape(p), jnp.float32).astype(p.dtype), key, params
    )
    hessian_probe = jax.jvp(jax.grad(obj_fn), (params,), (probes,))[1]
    return jax.tree.map(lambda u, hu: u * hu, probes, hessian_probe)


class ScaleBySophiaState(NamedTuple):
    """State of :func:`scale_by_sophia`: step counter, gradient EMA, Hessian-estimate EMA, estimator PRNG key."""

    count: jax.Array
    mu: Any
    hessian: Any
    key: jax.Array


def scale_by_sophia(
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.04,
    eps: float = 1e-15,
    *,
    update_interval: int = 10,
    hessian_estimator: HessianEstimator = gnb_hessian_estimate,
    seed: int = 0,
    mu_dtype=None,
    state_dtype=None,
) -> GradientTransformation:
    """Rescale updates by Sophia: clipped momentum over a lazily refreshed diagonal Hessian.

    .. math::

        m_t = \\beta_1 m_{t-1} + (1 - \\beta_1) g_t

        h_t = \\beta_2 h_{t-1} + (1 - \\beta_2) \\hat h(\\theta_t) \\ \\text{if } t \\bmod k = 0,
        \\ t > 0; \\quad h_t = h_{t-1} \\text{ otherwise}

        u_t = \\mathrm{clip}\\!\\left(\\frac{m_t}{\\max(\\rho h_t, \\epsilon)}, -1, 1\\right)

    with ``t`` the 0-based step count. As in the authors' training loop, the estimate is
    refreshed after every ``k``-th step (at the parameters the next step starts from), so the
    first ``k`` steps run with ``h = 0``, i.e. as sign-momentum steps; the paper's Algorithm 3
    also refreshes at the very first step. The estimator is only *executed* on refresh steps
    (``jax.lax.cond``), though it is traced every step; it receives ``params``, a fresh PRNG
    key split from the state, and every extra keyword argument of ``update``.

    Parameterization (the authors' ``SophiaG``, not Optax's contrib ``sophia``): the
    reference clips ``|m| / (rho * bs * h_ref + 1e-15)`` where ``h_ref`` is an EMA of the
    squared sampled-label gradient and ``bs`` the number of label positions; here the factor
    ``B`` is part of the Gauss-Newton-Bartlett estimate (the paper's Algorithm 2), so ``h`` is
    the paper's ``h`` and ``rho`` is both the reference's ``rho`` and the paper's ``gamma``. The
    denominator is the paper's ``max(rho * h, eps)``: for the non-negative GNB estimate it equals
    the reference's ``rho * h + eps`` up to ``eps = 1e-15``, and it keeps negative Hutchinson
    estimates from reversing the step. Unlike Optax, ``m`` is not bias-corrected (neither the
    paper nor the reference does).

    Args:
        b1: EMA decay of the gradients, in ``[0, 1)``.
        b2: EMA decay of the Hessian estimates, in ``[0, 1)`` (applied once per refresh).
        rho: the scale ``gamma`` of the Hessian in the denominator, ``> 0``.
        eps: the floor of the denominator, ``> 0``.
        update_interval: ``k``, the number of steps between refreshes of the estimate.
        hessian_estimator: ``(params, key, **extra_args) -> tree`` of diagonal estimates, e.g.
            :func:`gnb_hessian_estimate` (default) or :func:`hutchinson_hessian_estimate`.
        seed: the seed of the PRNG key kept in the state for the estimator.
        mu_dtype: storage of ``m``: a floating dtype or ``gradtx.Quantized8bit()``; ``None``
            means ``state_dtype``.
        state_dtype: storage of ``h`` and (when ``mu_dtype`` is ``None``) of ``m``: a floating
            dtype or ``gradtx.Quantized8bit()``; ``None`` means the parameter's dtype (see
            ``docs/memory.md``). Arithmetic is in at least float32. Under 8 bits ``m`` uses the
            signed code and ``h`` the unsigned one (for arrays of at least ``min_size``
            elements): a negative ``h`` (possible with Hutchinson's estimator) is stored as 0.
            That leaves the step unchanged, since the denominator ``max(rho * h, eps)`` is ``eps``
            for any ``h <= 0``, but the EMA forgets the negative curvature instead of carrying it.

    Returns:
        A ``GradientTransformation`` whose state is :class:`ScaleBySophiaState`; its ``update``
        needs ``params`` and the estimator's extra arguments.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> x = jnp.ones((4, 3))
        >>> tx = gradtx.scale_by_sophia()
        >>> params = jnp.zeros((3, 5))
        >>> state = tx.init(params)
        >>> updates, state = tx.update(jnp.ones((3, 5)), state, params, logits_fn=lambda w: x @ w)

    References:
        Liu et al., 2023. Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
        Pre-training, https://arxiv.org/abs/2305.14342
    """
    owner = "scale_by_sophia"
    _check_sophia(owner, b1, b2, rho, eps, update_interval, hessian_estimator, seed, mu_dtype, state_dtype)
    mu_storage = tree.resolve_storage(mu_dtype, state_dtype)

    def init(params):
        tree.check_real_params(owner, params)
        return ScaleBySophiaState(
            count=tree.zero_count(),
            mu=tree.moment_zeros_like(params, mu_storage, signed=True),
            hessian=tree.moment_zeros_like(params, state_dtype, signed=False),
            key=jax.random.PRNGKey(seed),
        )

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(f"{owner}: update needs params (the Hessian is estimated at them), got params=None")

        def refresh(hessian, key):
            key, estimator_key = jax.random.split(key)
            estimate = hessian_estimator(params, estimator_key, **extra_args)
            return jax.tree.map(refresh_leaf, estimate, hessian), key

        def refresh_leaf(estimate, h_prev):
            return tree.store(tree.ema_update(tree.at_least_float32(estimate), tree.load(h_prev), b2), h_prev)

        due = (state.count > 0) & (state.count % update_interval == 0)
        hessian, key = jax.lax.cond(due, refresh, lambda hessian, key: (hessian, key), state.hessian, state.key)

        def per_leaf(g, m_prev, h):
            m = tree.ema_update(tree.at_least_float32(g), tree.load(m_prev), b1)
            # In float16 the default eps (1e-15) rounds to 0, and a zero gradient gave 0 / 0.
            ratio = m / jnp.maximum(rho * tree.load(h), eps)
            return jnp.clip(ratio, -1, 1).astype(g.dtype), tree.store(m, m_prev)

        updates, mu = tree.unzip(recompute.map_moments(per_leaf, updates, state.mu, hessian), updates, 2)
        new_state = ScaleBySophiaState(count=tree.safe_increment(state.count), mu=mu, hessian=hessian, key=key)
        return updates, new_state

    return GradientTransformation(init, update)


def sophia(
    learning_rate: ScalarOrSchedule = 1e-4,
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.04,
    weight_decay: ScalarOrSchedule = 0.1,
    mask: Any = None,
    *,
    eps: float = 1e-15,
    update_interval: int = 10,
    hessian_estimator: HessianEstimator = gnb_hessian_estimate,
    seed: int = 0,
    mu_dtype=None,
    state_dtype=None,
) -> GradientTransformation:
    """SophiaG: Sophia with the Gauss-Newton-Bartlett estimator and decoupled weight decay.

    .. math::

        \\theta_{t+1} = \\theta_t - \\eta_t \\left(u_t + \\lambda \\theta_t\\right)

    with ``u_t`` from :func:`scale_by_sophia` and ``h_hat`` from :func:`gnb_hessian_estimate`,
    so ``update`` needs ``logits_fn=``, a function ``params -> logits`` on the current batch.
    Weight decay is decoupled and scaled by the learning rate, as the reference's
    ``param.mul_(1 - lr * weight_decay)``. Defaults are those of the reference ``SophiaG``
    (the authors' GPT-2 runs use ``rho = 0.03 .. 0.05``, ``b1 = 0.965``, ``weight_decay = 0.2``);
    ``learning_rate * rho * B`` should be about half the AdamW learning rate where B counts
    the sampled label positions.

    Args:
        learning_rate: ``eta``, a float or a schedule.
        b1: EMA decay of the gradients.
        b2: EMA decay of the Hessian estimates.
        rho: the Hessian scale (the paper's ``gamma``); see :func:`scale_by_sophia`.
        weight_decay: ``lambda >= 0``, a float or a schedule.
        mask: which parameters to decay: a pytree of booleans or a callable ``params -> pytree``.
        eps: the floor of the denominator.
        update_interval: ``k``, steps between Hessian refreshes.
        hessian_estimator: the estimator, :func:`gnb_hessian_estimate` by default (see
            :func:`scale_by_sophia`); :func:`sophia_h` is this with Hutchinson's.
        seed: seed of the estimator's PRNG key.
        mu_dtype: storage of the gradient EMA; see :func:`scale_by_sophia`.
        state_dtype: storage of both EMAs (``m`` unless ``mu_dtype`` is given, and ``h``): a
            floating dtype or ``gradtx.Quantized8bit()``; see :func:`scale_by_sophia`.

    Returns:
        A ``GradientTransformation``: ``chain(scale_by_sophia, add_decayed_weights, scale_by_learning_rate)``.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> x, labels = jnp.ones((4, 3)), jnp.array([0, 1, 2, 3])
        >>> logits_fn = lambda w: x @ w
        >>> loss = lambda w: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits_fn(w)), labels[:, None], -1))
        >>> tx = gradtx.sophia(learning_rate=1e-3)
        >>> params = jnp.zeros((3, 5))
        >>> state = tx.init(params)
        >>> updates, state = tx.update(jax.grad(loss)(params), state, params, logits_fn=logits_fn)

    References:
        Liu et al., 2023. Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
        Pre-training, https://arxiv.org/abs/2305.14342
    """
    return _sophia(
        "sophia",
        hessian_estimator,
        learning_rate,
        b1,
        b2,
        rho,
        weight_decay,
        mask,
        eps,
        update_interval,
        seed,
        mu_dtype,
        state_dtype,
    )


def sophia_h(
    learning_rate: ScalarOrSchedule = 1e-4,
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.01,
    weight_decay: ScalarOrSchedule = 0.1,
    mask: Any = None,
    *,
    eps: float = 1e-15,
    update_interval: int = 10,
    seed: int = 0,
    mu_dtype=None,
    state_dtype=None,
) -> GradientTransformation:
    """Sophia-H: :func:`sophia` with Hutchinson's estimator; ``update`` needs ``obj_fn=``, the loss ``params -> scalar``.

    The estimate :func:`hutchinson_hessian_estimate` has no batch-size factor, so ``rho`` is
    directly the paper's ``gamma``; its default 0.01 is the value Levanter and Optax use for
    Sophia-H. The authors published no PyTorch Sophia-H; everything else is as in :func:`sophia`.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> loss = lambda p: jnp.sum((p - 1.0) ** 2)
        >>> tx = gradtx.sophia_h(learning_rate=0.1, weight_decay=0.0)
        >>> params = jnp.zeros(3)
        >>> state = tx.init(params)
        >>> updates, state = tx.update(jax.grad(loss)(params), state, params, obj_fn=loss)

    References:
        Liu et al., 2023. Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
        Pre-training, https://arxiv.org/abs/2305.14342
    """
    estimator = hutchinson_hessian_estimate
    return _sophia(
        "sophia_h", estimator, learning_rate, b1, b2, rho, weight_decay, mask, eps, update_interval, seed, mu_dtype, state_dtype
    )


def _sophia(owner, estimator, learning_rate, b1, b2, rho, weight_decay, mask, eps, update_interval, seed, mu_dtype, state_dtype):
    _checks.learning_rate(owner, learning_rate)
    _checks.mask(owner, "mask", mask)
    _checks.non_negative(owner, "weight_decay", weight_decay, schedule_ok=True)
    _check_sophia(owner, b1, b2, rho, eps, update_interval, estimator, seed, mu_dtype, state_dtype)
    return chain(
        scale_by_sophia(
            b1,
            b2,
            rho,
            eps,
            update_interval=update_interval,
            hessian_estimator=estimator,
            seed=seed,
            mu_dtype=mu_dtype,
            state_dtype=state_dtype,
        ),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def _check_sophia(owner, b1, b2, rho, eps, update_interval, hessian_estimator, seed, mu_dtype, state_dtype):
    _checks.decay_rate(owner, "b1", b1)
    _checks.decay_rate(owner, "b2", b2)
    _checks.positive(owner, "rho", rho)
    _checks.positive(owner, "eps", eps)
    _checks.positive_int(owner, "update_interval", update_interval)
    if not callable(hessian_estimator):
        raise TypeError(
            f"{owner}: hessian_estimator must be callable (params, key, **extra_args) -> tree, got {hessian_estimator!r}"
        )
    _checks.non_negative_int(owner, "seed", seed)
    check_storage(owner, "mu_dtype", mu_dtype)
    check_storage(owner, "state_dtype", state_dtype)
