"""The transformation protocol.

A gradient transformation is a pair of pure functions::

    state = init(params)
    updates, state = update(updates, state, params=None, **extra_args)

held in a ``NamedTuple`` so that it is structurally identical to Optax's
``GradientTransformation``: a gradtx transformation can be used inside
``optax.chain`` or ``flax.nnx.Optimizer``, and an Optax transformation inside
``gradtx.chain``. A transformation holds only Python callables and scalars,
never arrays, so Flax can keep it as a static attribute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax

Params = Any
Updates = Any
OptState = Any
Schedule = Callable[[jax.Array], jax.Array]
ScalarOrSchedule = float | jax.Array | Schedule


class InitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class UpdateFn(Protocol):
    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pure ``(init, update)`` pair: the unit every gradtx optimizer is built from.

    ``init(params) -> state`` builds the state (a pytree of arrays whose structure never
    depends on a flag's value). ``update(updates, state, params=None, **extra_args) ->
    (updates, state)`` maps incoming gradients to outgoing updates; the new parameters are
    ``apply_updates(params, updates)``, i.e. ``p_{t+1} = p_t + u_t``. Every update accepts
    and ignores extra keyword arguments it does not use.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.sgd(learning_rate=0.1)
        >>> params = {"w": jnp.ones(3)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params)

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """

    init: InitFn
    update: UpdateFn


class EmptyState(NamedTuple):
    """The state of a stateless transformation: an empty pytree.

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """


def identity() -> GradientTransformation:
    """The transformation that returns its updates unchanged: ``u_t = g_t``.

    Returns:
        A stateless ``GradientTransformation``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.identity()
        >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0]
        Array([1., 1.], dtype=float32)

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        return updates, state

    return GradientTransformation(init, update)


def set_to_zero() -> GradientTransformation:
    """The transformation that zeroes every update: ``u_t = 0`` (freezes parameters when used in ``partition``).

    Returns:
        A stateless ``GradientTransformation``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.set_to_zero()
        >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0]
        Array([0., 0.], dtype=float32)

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    return elementwise("set_to_zero", jax.numpy.zeros_like)


def elementwise(
    owner: str, per_leaf: Callable[..., jax.Array], *, needs_params: bool = False, tree_map: Callable[..., Any] = jax.tree.map
) -> GradientTransformation:
    """Lift a per-leaf function ``u -> f(u)`` (or ``(u, p) -> f(u, p)``) to a stateless transformation.

    Internal: the elementwise building blocks share it, so their math is written once per
    array and lifted to pytrees here. ``None`` leaves (masked-out updates) pass through.
    ``owner`` names the public function in error messages. ``tree_map`` lifts ``per_leaf``
    (``gradtx.packed.per_array`` passes one that keeps per-array reductions on packed trees).
    """

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if not needs_params:
            return tree_map(per_leaf, updates), state
        if params is None:
            raise ValueError(f"{owner}: update needs params, got params=None")
        return tree_map(per_leaf, updates, params), state

    return GradientTransformation(init, update)
