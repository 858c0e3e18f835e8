"""Lookahead (Zhang et al. 2019) over any optimizer, on the ordinary parameter tree.

Lookahead keeps a second copy of the weights, the slow weights ``phi``. The inner optimizer
takes ``k`` fast steps from ``phi``; then the slow weights move a fraction ``alpha`` of the way
to the fast weights and the fast weights restart from there. Optax's ``lookahead`` stores both
copies in the parameters (``LookaheadParams``), which every training loop then has to know
about; here the slow weights live in the optimizer state, the parameters stay an ordinary
pytree, and :func:`lookahead_slow_params` reads the slow weights for evaluation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation
from gradtx.combine import MaskedNode
from gradtx.state.quantize import check_storage


class LookaheadState(NamedTuple):
    """State of :func:`lookahead_wrapper`: the inner optimizer's state, the slow weights and the step counter."""

    inner_state: Any
    slow_params: Any
    count: jax.Array


def lookahead_wrapper(
    inner: GradientTransformation,
    sync_period: int = 6,
    slow_step_size: float = 0.5,
    *,
    reset_state: bool = False,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Lookahead around any optimizer, with the slow weights kept in the state.

    Algorithm 1 of the paper, with :math:`k` = ``sync_period`` and :math:`\alpha` =
    ``slow_step_size``: the inner optimizer :math:`A` updates the fast weights every step,

    .. math::

        \theta_t = \theta_{t-1} + A(g_t), \qquad\text{and when } t \equiv 0 \pmod k: \quad
        \phi \leftarrow \phi + \alpha (\theta_t - \phi), \quad \theta_t \leftarrow \phi.

    Since a transformation returns updates rather than parameters, the update on a
    synchronization step is :math:`\phi_{new} - w_t` (so that ``apply_updates`` lands on the
    new slow weights, to rounding), and the inner update otherwise. The updates must therefore
    be applied unchanged. The slow weights start as the parameters passed to the first
    ``update`` (so ``init`` works on ``jax.ShapeDtypeStruct`` parameters too); they are stored
    in the parameters' dtype unless ``state_dtype`` says otherwise, and computed on in at
    least float32. The inner state carries over a synchronization, as in the paper and in
    the Ranger reference, unless ``reset_state``.

    Args:
        inner: the fast optimizer :math:`A`.
        sync_period: :math:`k`, the number of fast steps between synchronizations (``>= 1``).
        slow_step_size: :math:`\alpha`, in ``(0, 1]`` (``1`` recovers the inner optimizer).
        reset_state: re-initialize the inner state after each synchronization (as Optax's
            ``reset_state``).
        state_dtype: storage of the slow weights: a floating dtype or ``gradtx.Quantized8bit()``;
            ``None`` means the parameters' dtype. 8-bit slow weights round the weights
            themselves (to ~1% of each block's largest weight): measure before using it.

    Returns:
        A ``GradientTransformation`` whose state is :class:`LookaheadState`.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> tx = gradtx.lookahead_wrapper(gradtx.sgd(0.1), sync_period=2, slow_step_size=0.5)
        >>> params = jnp.array([1.0, -2.0])
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update(params, state, params)  # gradient of |p|^2 / 2
        ...     params = gradtx.apply_updates(params, updates)
        >>> params  # (1 + 0.81) / 2 of the way: phi + 0.5 * (0.81 phi - phi)
        Array([ 0.905, -1.81 ], dtype=float32)

    References:
        Zhang et al., 2019. Lookahead Optimizer: k steps forward, 1 step back, https://arxiv.org/abs/1907.08610
    """
    owner = "lookahead_wrapper"
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise TypeError(f"{owner}: inner must be a gradient transformation with init and update, got {inner!r}")
    _checks.positive_int(owner, "sync_period", sync_period)
    _checks.number(owner, "slow_step_size", slow_step_size, low=0.0, high=1.0, low_open=True)
    _checks.one_of(owner, "reset_state", reset_state, (False, True))
    check_storage(owner, "state_dtype", state_dtype)

    def init(params):
        slow_params = tree.moment_zeros_like(params, state_dtype, signed=True)
        return LookaheadState(inner_state=inner.init(params), slow_params=slow_params, count=tree.zero_count())

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(f"{owner}: update needs params (the fast weights), got params=None")
        fast_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        count = tree.safe_increment(state.count)
        synchronize = count % sync_period == 0
        first_update = state.count == 0

        def slow_weights(w, stored):
            return jnp.where(first_update, tree.at_least_float32(w), tree.load(stored))

        def next_slow_weights(u, w, phi):
            fast = (w + u).astype(w.dtype)
            return jnp.where(synchronize, phi + slow_step_size * (fast - phi), phi)

        def lookahead_update(u, w, phi):
            return jnp.where(synchronize, phi - w, u).astype(u.dtype)

        slow = jax.tree.map(slow_weights, params, state.slow_params)
        slow = jax.tree.map(next_slow_weights, fast_updates, params, slow)
        updates = jax.tree.map(lookahead_update, fast_updates, params, slow)
        if reset_state:
            inner_state = jax.tree.map(lambda fresh, old: jnp.where(synchronize, fresh, old), inner.init(params), inner_state)
        # Between synchronizations the stored slow weights are kept as they are, not re-stored:
        # re-quantizing an 8-bit block whose absmax is negative would drift (the code has no -1).
        changed = synchronize | first_update
        slow = jax.tree.map(lambda phi, stored: _keep_unless(changed, tree.store(phi, stored), stored), slow, state.slow_params)
        return updates, LookaheadState(inner_state=inner_state, slow_params=slow, count=count)

    return GradientTransformation(init, update)


def _keep_unless(condition: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


def lookahead_slow_params(state: Any, params: Any) -> Any:
    r"""The slow weights :math:`\phi` of a Lookahead optimizer: the parameters to evaluate with.

    ``state`` is the optimizer state containing exactly one :class:`LookaheadState` (at its
    top, as for :func:`lookahead_wrapper` and ``ranger``, or nested, e.g. under
    ``inject_hyperparams``, ``chain`` or ``masked``). ``params`` are the current (fast)
    parameters: before the first update the slow weights are these, and leaves that a
    ``masked`` Lookahead does not see are taken from them.

    Args:
        state: the optimizer state.
        params: the current parameters.

    Returns:
        A tree like ``params`` holding the slow weights.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.ranger(learning_rate=1e-2)
        >>> params = {"w": jnp.ones((2, 2))}
        >>> state = tx.init(params)
        >>> gradtx.lookahead_slow_params(state, params)["w"].shape
        (2, 2)

    References:
        Zhang et al., 2019. Lookahead Optimizer: k steps forward, 1 step back, https://arxiv.org/abs/1907.08610
    """
    found = [
        node
        for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, LookaheadState))
        if isinstance(node, LookaheadState)
    ]
    if len(found) != 1:
        raise ValueError(f"lookahead_slow_params: state must contain exactly one LookaheadState, found {len(found)}")
    lookahead = found[0]
    return jax.tree.map(
        lambda phi, w: w if isinstance(phi, MaskedNode) else jnp.where(lookahead.count == 0, w, tree.load(phi).astype(w.dtype)),
        lookahead.slow_params,
        params,
        is_leaf=lambda x: isinstance(x, MaskedNode) or tree.is_quantized(x),
    )
