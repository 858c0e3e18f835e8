"""Schedule-free learning: replace momentum and the decaying schedule by interpolation and averaging.

Schedule-free (Defazio et al., 2024) keeps three sequences: ``z`` takes the base optimizer's
steps, ``x`` is a weighted running average of ``z`` (the point to *evaluate* at), and ``y``,
an interpolation of the two, is where gradients are taken. The parameters the user holds are
``y``; the state keeps ``z``; ``x`` is recovered from both by
:func:`schedule_free_eval_params`. The wrapper matches facebookresearch/schedule_free's
``AdamWScheduleFree`` and ``SGDScheduleFree`` (the in-place ``y`` variants).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import _check_transformation, _forwarding_update, chain
from gradtx.optimizers.rmsprop import scale_by_rms
from gradtx.state.quantize import Quantized8bit, check_storage
from gradtx.transforms.decay import add_decayed_weights
from gradtx.transforms.scaling import scale_by_learning_rate


class ScheduleFreeState(NamedTuple):
    """State of :func:`schedule_free`: ``b1``, step counter, averaging weights, largest lr, base state and ``z``."""

    b1: jax.Array
    count: jax.Array
    weight_sum: jax.Array
    max_lr: jax.Array
    base_optimizer_state: Any
    z: Any


def _z_storage(owner: str, z_dtype: Any, state_dtype: Any) -> Any:
    """The storage of ``z``: ``z_dtype``, else ``state_dtype``'s floating dtype, else the parameters' dtype."""
    _check_z_dtype(owner, "z_dtype", z_dtype)
    if z_dtype is not None:
        return z_dtype
    # Under the 8-bit policy only the moments are quantized; z, an iterate, keeps the parameters' dtype.
    return None if isinstance(state_dtype, Quantized8bit) else state_dtype


def _check_z_dtype(owner: str, name: str, value: Any) -> None:
    if isinstance(value, Quantized8bit):
        raise ValueError(
            f"{owner}: {name} must be None or a floating dtype (float32, bfloat16, float16, float64), got {value!r}: "
            f"z is an iterate (the sequence the base optimizer steps), not a moment, and 8-bit rounding (to ~1% of "
            f"its block's largest value) would swallow every step smaller than that; 8-bit storage applies to moments only"
        )
    _checks.dtype(owner, name, value)


def _copy(params: Any, dtype) -> Any:
    # A copy, never an alias, so params and state can both be donated to a jitted step;
    # abstract params (ShapeDtypeStruct) have no values, so z gets zeros of the right type.
    def per_leaf(zeros, p):
        return zeros if isinstance(p, jax.ShapeDtypeStruct) else zeros + p.astype(zeros.dtype)

    return jax.tree.map(per_leaf, tree.zeros_like(params, dtype), params)


def schedule_free(
    base_optimizer: GradientTransformation,
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    weight_lr_power: float = 2.0,
    r: float = 0.0,
    *,
    state_dtype=None,
) -> GradientTransformation:
    """Make ``base_optimizer`` schedule-free: it steps ``z``; gradients are taken at ``y``; evaluate at ``x``.

    .. math::

        y_t = (1 - \\beta_1) z_t + \\beta_1 x_t, \\quad
        z_{t+1} = z_t + \\Delta_t, \\quad
        x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}

        c_{t+1} = \\frac{w_t}{\\sum_{i \\le t} w_i}, \\quad
        w_t = (t + 1)^r \\left(\\max_{i \\le t} \\gamma_i\\right)^{p}

    where ``Delta_t`` is the base optimizer's update computed from the gradient at ``y_t``
    (for SGD, ``-gamma_t * grad f(y_t)``), ``gamma_t`` the learning rate and ``p`` the
    ``weight_lr_power``; ``t`` counts from 0 and ``x_0 = z_0 = y_0`` are the initial params.
    The returned update is ``y_{t+1} - y_t`` in the closed form the reference uses,
    ``c (z_t - y_t) + (1 - beta_1 (1 - c)) Delta_t``, so ``x`` is never stored:
    ``x_t = y_t + (1 - 1 / beta_1)(z_t - y_t)`` (:func:`schedule_free_eval_params`).

    The base optimizer must have no momentum of its own and must apply the learning rate
    itself; ``learning_rate`` here only weighs the average, and is evaluated at the same
    0-based step count as the base optimizer's. Deliberate difference from Optax's contrib
    ``schedule_free``: Optax evaluates the averaging schedule one step ahead of the base
    optimizer's; here they agree, as in the reference, and the ``r`` of the reference's
    polynomial weighting is supported.

    Args:
        base_optimizer: the transformation producing ``Delta_t``, lr included (e.g.
            ``scale_by_learning_rate(lr)`` for SGD).
        learning_rate: ``gamma_t``, a float or a schedule (the one the base optimizer uses).
        b1: the interpolation ``beta_1`` in ``(0, 1)``.
        weight_lr_power: ``p >= 0``; weighs the average by the learning rate reached so far,
            so that warmup steps count little.
        r: ``r >= 0``, the polynomial weighting ``(t + 1)^r`` of the average.
        state_dtype: storage dtype of ``z`` (the wrapper's only per-parameter state; the base
            optimizer's moments follow its own arguments): a floating dtype, ``None`` for the
            parameter's dtype. ``z`` is an iterate, not a moment: ``gradtx.Quantized8bit()`` is
            refused (8-bit rounding would swallow the steps), and a dtype narrower than the
            parameters' rounds away steps below its precision (bfloat16: 2^-8 relative).

    Returns:
        A ``GradientTransformation`` whose state is :class:`ScheduleFreeState`; its ``update``
        needs ``params`` (the current ``y``).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.schedule_free(gradtx.scale_by_learning_rate(0.1), learning_rate=0.1)
        >>> params = jnp.ones(3)
        >>> state = tx.init(params)
        >>> updates, state = tx.update(2 * params, state, params)
        >>> params = gradtx.apply_updates(params, updates)
        >>> eval_params = gradtx.schedule_free_eval_params(state, params)

    References:
        Defazio et al., 2024. The Road Less Scheduled, https://arxiv.org/abs/2405.15682
    """
    owner = "schedule_free"
    _check_transformation(owner, "base_optimizer", base_optimizer)
    _checks.learning_rate(owner, learning_rate)
    _check_common(owner, b1, weight_lr_power, r)
    _check_z_dtype(owner, "state_dtype", state_dtype)
    base_update = _forwarding_update(base_optimizer)

    def init(params):
        return ScheduleFreeState(
            b1=jnp.asarray(b1, jnp.float32),
            count=tree.zero_count(),
            weight_sum=jnp.zeros([], jnp.float32),
            max_lr=jnp.zeros([], jnp.float32),
            base_optimizer_state=base_optimizer.init(params),
            z=_copy(params, state_dtype),
        )

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(f"{owner}: update needs params (the current y), got params=None")
        lr = jnp.asarray(tree.resolve(learning_rate, state.count), jnp.float32)
        max_lr = jnp.maximum(state.max_lr, lr)
        weight = (state.count.astype(jnp.float32) + 1) ** r * max_lr**weight_lr_power
        weight_sum = state.weight_sum + weight
        # With a zero learning rate so far there is nothing to average yet (the reference's ZeroDivisionError case).
        c = jnp.where(weight_sum > 0, weight / jnp.where(weight_sum > 0, weight_sum, 1), 0.0)
        base_updates, base_state = base_update(updates, state.base_optimizer_state, params, **extra_args)

        def per_leaf(y_prev, z_prev, delta_prev):
            # In at least float32: a bfloat16 z or y would round c * (z - y) before it is added.
            y, z, delta = (tree.at_least_float32(x) for x in (y_prev, z_prev, delta_prev))
            y_update = c * (z - y) + (1 - b1 * (1 - c)) * delta
            return y_update.astype(y_prev.dtype), (z + delta).astype(z_prev.dtype)

        y_updates, z = tree.unzip(jax.tree.map(per_leaf, params, state.z, base_updates), params, 2)
        new_state = ScheduleFreeState(
            b1=state.b1,
            count=tree.safe_increment(state.count),
            weight_sum=weight_sum,
            max_lr=max_lr,
            base_optimizer_state=base_state,
            z=z,
        )
        return y_updates, new_state

    return GradientTransformation(init, update)


def schedule_free_eval_params(state: ScheduleFreeState, params: Any) -> Any:
    """The parameters to evaluate with, ``x``, from a :func:`schedule_free` state and the training params ``y``.

    .. math::

        x_t = \\frac{y_t - (1 - \\beta_1) z_t}{\\beta_1} = y_t + \\left(1 - \\frac{1}{\\beta_1}\\right)(z_t - y_t)

    computed in the second form, as the reference's ``optimizer.eval()`` does. Nothing is
    modified: training continues from ``params``.

    Args:
        state: the :class:`ScheduleFreeState` (the whole state of a schedule-free optimizer).
        params: the current training params ``y``.

    Returns:
        ``x``, a tree like ``params`` in the same dtypes.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.schedule_free_sgd(learning_rate=0.1)
        >>> params = jnp.ones(2)
        >>> gradtx.schedule_free_eval_params(tx.init(params), params)
        Array([1., 1.], dtype=float32)

    References:
        Defazio et al., 2024. The Road Less Scheduled, https://arxiv.org/abs/2405.15682
    """
    if not isinstance(state, ScheduleFreeState):
        raise TypeError(f"schedule_free_eval_params: state must be a ScheduleFreeState, got {type(state).__name__}")
    towards_z = 1 - 1 / state.b1
    return jax.tree.map(lambda y, z: (y + towards_z * (z - y)).astype(y.dtype), params, state.z)


def schedule_free_adamw(
    learning_rate: ScalarOrSchedule = 0.0025,
    warmup_steps: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule | None = 0.0,
    weight_lr_power: float = 2.0,
    r: float = 0.0,
    *,
    state_dtype=None,
    z_dtype=None,
) -> GradientTransformation:
    """Schedule-free AdamW, as the reference ``AdamWScheduleFree``: :func:`schedule_free` over momentum-free AdamW.

    .. math::

        v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2, \\quad
        \\Delta_t = -\\gamma_t \\left(\\frac{g_t}{\\sqrt{v_t / (1 - \\beta_2^{t+1})} + \\epsilon} + \\lambda y_t\\right),
        \\quad \\gamma_t = \\gamma \\min\\!\\left(1, \\frac{t + 1}{T_{warmup}}\\right)

    ``eps`` is added outside the square root and the weight decay is evaluated at ``y`` and
    scaled by the learning rate, as in the reference. Warmup is the reference's linear ramp
    ``(t + 1) / warmup_steps`` (Optax's contrib version starts the base optimizer at lr 0, one
    step behind). ``b1`` is the interpolation of :func:`schedule_free`, not a momentum.

    Args:
        learning_rate: the peak ``gamma``, a float or a schedule (multiplied by the warmup ramp).
        warmup_steps: ``T_warmup``; ``None`` or 0 means no warmup.
        b1: the interpolation ``beta_1`` in ``(0, 1)``.
        b2: EMA decay of the squared gradients, in ``[0, 1)``.
        eps: added to the root of the second moment, ``>= 0``.
        weight_decay: ``lambda >= 0`` (``None`` means 0), a float or a schedule.
        weight_lr_power: see :func:`schedule_free`.
        r: see :func:`schedule_free`.
        state_dtype: storage policy of the state (see ``docs/memory.md``): the second moment
            ``v`` takes it whole (a floating dtype or ``gradtx.Quantized8bit()``, unsigned code);
            ``z`` takes its floating dtypes but stays in the parameters' dtype under
            ``Quantized8bit`` (an iterate, not a moment: see :func:`schedule_free`). ``None``
            means the parameters' dtype for both. Arithmetic is in at least float32.
        z_dtype: storage dtype of ``z``, winning over ``state_dtype`` (e.g.
            ``state_dtype=jnp.bfloat16, z_dtype=jnp.float32`` narrows ``v`` only); a floating
            dtype or ``None``.

    Returns:
        A ``GradientTransformation`` (see :func:`schedule_free`).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.schedule_free_adamw(learning_rate=1e-2, warmup_steps=100, weight_decay=1e-4)
        >>> params = jnp.ones(3)
        >>> updates, state = tx.update(jnp.ones(3), tx.init(params), params)

    References:
        Defazio et al., 2024. The Road Less Scheduled, https://arxiv.org/abs/2405.15682
    """
    owner = "schedule_free_adamw"
    _checks.decay_rate(owner, "b2", b2)
    _checks.non_negative(owner, "eps", eps)
    learning_rate, weight_decay = _check_alias(owner, learning_rate, warmup_steps, weight_decay)
    _check_common(owner, b1, weight_lr_power, r)
    check_storage(owner, "state_dtype", state_dtype)
    z_storage = _z_storage(owner, z_dtype, state_dtype)
    base_optimizer = chain(
        scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True, state_dtype=state_dtype),
        add_decayed_weights(weight_decay),
        scale_by_learning_rate(learning_rate),
    )
    return schedule_free(base_optimizer, learning_rate, b1, weight_lr_power, r, state_dtype=z_storage)


def schedule_free_sgd(
    learning_rate: ScalarOrSchedule = 1.0,
    warmup_steps: int | None = None,
    b1: float = 0.9,
    weight_decay: ScalarOrSchedule | None = None,
    weight_lr_power: float = 2.0,
    r: float = 0.0,
    *,
    state_dtype=None,
    z_dtype=None,
) -> GradientTransformation:
    """Schedule-free SGD, as the reference ``SGDScheduleFree``: :func:`schedule_free` over plain SGD.

    ``Delta_t = -gamma_t (g_t + lambda y_t)``: L2 weight decay added to the gradient at ``y``,
    with the linear warmup of :func:`schedule_free_adamw`. ``b1`` is the reference's
    ``momentum`` (Optax's name is kept); ``learning_rate`` defaults to the reference's 1.0.

    Its only per-parameter state is the iterate ``z``: ``state_dtype`` and ``z_dtype`` (which
    wins) are its storage dtype, a floating dtype or ``None`` (the parameters' dtype). There is
    no moment to quantize, so ``gradtx.Quantized8bit()`` is refused with an error rather than
    silently ignored (see :func:`schedule_free`). The other arguments are those of
    :func:`schedule_free_adamw`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.schedule_free_sgd(learning_rate=0.1, warmup_steps=10)
        >>> params = jnp.ones(3)
        >>> updates, state = tx.update(jnp.ones(3), tx.init(params), params)

    References:
        Defazio et al., 2024. The Road Less Scheduled, https://arxiv.org/abs/2405.15682
    """
    owner = "schedule_free_sgd"
    learning_rate, weight_decay = _check_alias(owner, learning_rate, warmup_steps, weight_decay)
    _check_common(owner, b1, weight_lr_power, r)
    _check_z_dtype(owner, "state_dtype", state_dtype)
    z_storage = _z_storage(owner, z_dtype, state_dtype)
    base_optimizer = chain(add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))
    return schedule_free(base_optimizer, learning_rate, b1, weight_lr_power, r, state_dtype=z_storage)


def _check_common(owner, b1, weight_lr_power, r):
    # b1 = 0 would make x = y / b1 undefined; b1 = 1 leaves z out of y altogether.
    _checks.number(owner, "b1", b1, low=0.0, high=1.0, low_open=True, high_open=True)
    _checks.non_negative(owner, "weight_lr_power", weight_lr_power)
    _checks.non_negative(owner, "r", r)


def _check_alias(owner, learning_rate, warmup_steps, weight_decay):
    """Validate the alias-only arguments; return the warmed-up learning rate and the weight decay."""
    _checks.learning_rate(owner, learning_rate)
    if warmup_steps is not None:
        _checks.non_negative_int(owner, "warmup_steps", warmup_steps)
    weight_decay = 0.0 if weight_decay is None else weight_decay
    _checks.non_negative(owner, "weight_decay", weight_decay, schedule_ok=True)
    return _linear_warmup(learning_rate, warmup_steps), weight_decay


def _linear_warmup(learning_rate: ScalarOrSchedule, warmup_steps: int | None) -> ScalarOrSchedule:
    """The reference's warmup: ``lr_t = lr * min(1, (t + 1) / warmup_steps)`` for the 0-based step ``t``."""
    if not warmup_steps:
        return learning_rate

    def schedule(count):
        ramp = jnp.minimum(1.0, (count + 1) / warmup_steps)
        return tree.resolve(learning_rate, count) * ramp

    return schedule
