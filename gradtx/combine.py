"""Combinators: build one transformation out of several.

``chain`` runs transformations in sequence, ``named_chain`` does the same with named
states, ``masked`` applies a transformation to a subset of leaves, ``partition`` routes
each leaf to the transformation of its label, and ``apply_updates`` adds updates to
parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import jax

from gradtx import _checks, packed, tree
from gradtx.base import GradientTransformation


def _accepts_extra_args(tx) -> bool:
    # Optax's plain GradientTransformation.update takes no **extra_args; calling it with
    # some raises. Decided once, when the chain is built, never per step.
    try:
        parameters = inspect.signature(tx.update).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _forwarding_update(tx) -> Callable:
    if _accepts_extra_args(tx):
        return tx.update
    return lambda updates, state, params=None, **extra_args: tx.update(updates, state, params)


def _check_transformation(owner: str, name: str, tx) -> None:
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(f"{owner}: {name} must be a gradient transformation with init and update, got {tx!r}")


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations one after another: ``u = f_n(... f_2(f_1(g)))``.

    The state is the tuple of the inner states. Extra keyword arguments of ``update``
    are forwarded to every transformation that accepts them (Optax transformations that
    take none are called without them).

    Args:
        *transforms: the transformations, applied in order.

    Returns:
        A ``GradientTransformation`` whose state is ``tuple(inner states)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.chain(gradtx.clip_by_global_norm(1.0), gradtx.scale_by_adam(), gradtx.scale(-1e-3))

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    for i, tx in enumerate(transforms):
        _check_transformation("chain", f"transforms[{i}]", tx)
    updates_fns = tuple(_forwarding_update(tx) for tx in transforms)

    def init(params):
        return tuple(tx.init(params) for tx in transforms)

    def update(updates, state, params=None, **extra_args):
        if len(state) != len(transforms):
            raise ValueError(f"chain: state has {len(state)} entries but the chain has {len(transforms)} transformations")
        if params is not None:
            tree.check_same_structure("chain", "updates", updates, "params", params)
        new_state = []
        for index, (update_fn, inner_state) in enumerate(zip(updates_fns, state)):
            try:
                updates, inner_state = update_fn(updates, inner_state, params, **extra_args)
            except ValueError as error:
                if "pytree structure" not in str(error) and "mismatch" not in str(error):
                    raise
                # Only reached while tracing (or running eagerly): zero cost inside jit.
                raise ValueError(
                    f"chain: transforms[{index}] could not match the updates with its state; was the state "
                    f"built by init from parameters with another tree structure? {error}"
                ) from error
            new_state.append(inner_state)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def named_chain(*transforms: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Like :func:`chain`, with each inner state stored under a name: ``state[name]``.

    Args:
        *transforms: ``(name, transformation)`` pairs, applied in order; names must be unique.

    Returns:
        A ``GradientTransformation`` whose state is a ``dict`` from name to inner state.

    Example:
        >>> import gradtx
        >>> tx = gradtx.named_chain(("clip", gradtx.clip(1.0)), ("adam", gradtx.scale_by_adam()))

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    for index, item in enumerate(transforms):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                f"named_chain: transforms[{index}] must be a (name, transformation) pair with a str name, got {item!r}"
            )
    names = [name for name, _ in transforms]
    if len(set(names)) != len(names):
        raise ValueError(f"named_chain: names must be unique, got {names}")
    for name, tx in transforms:
        _check_transformation("named_chain", f"transform {name!r}", tx)
    inner = chain(*(tx for _, tx in transforms))

    def init(params):
        return dict(zip(names, inner.init(params)))

    def update(updates, state, params=None, **extra_args):
        updates, new_states = inner.update(updates, tuple(state[name] for name in names), params, **extra_args)
        return updates, dict(zip(names, new_states))

    return GradientTransformation(init, update)


class MaskedNode(NamedTuple):
    """Placeholder that a masked-out leaf becomes inside a masked transformation (an empty pytree)."""


class MaskedState(NamedTuple):
    """State of :func:`masked`: the inner transformation's state over the unmasked leaves."""

    inner_state: Any


def _mask_tree(mask, tree) -> Any:
    return mask(tree) if callable(mask) else mask


def _keep_selected(mask_tree, tree) -> Any:
    try:
        return jax.tree.map(lambda keep, x: x if keep else MaskedNode(), mask_tree, tree)
    except ValueError as error:
        raise ValueError(f"masked: mask must have the tree structure of the parameters (or a prefix of it); {error}") from error


def masked(inner: GradientTransformation, mask: Any) -> GradientTransformation:
    """Apply ``inner`` only to the leaves where ``mask`` is true; the others pass through unchanged.

    ``u_i = inner(g)_i`` where ``mask_i`` else ``g_i``. The inner transformation sees a tree in
    which masked-out leaves are :class:`MaskedNode` (empty), so it keeps no state for them.

    Args:
        inner: the transformation to apply to the selected leaves.
        mask: a pytree of booleans with the structure of the parameters (or a prefix of it),
            or a callable ``params -> such a pytree``.

    Returns:
        A ``GradientTransformation`` whose state is :class:`MaskedState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
        >>> decay_matrices = gradtx.masked(gradtx.add_decayed_weights(1e-2), lambda p: {"w": True, "b": False})

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    _check_transformation("masked", "inner", inner)
    _checks.mask("masked", "mask", mask)
    inner_update = _forwarding_update(inner)

    def init(params):
        if packed.is_packed(params):
            return MaskedState(inner_state=inner.init(packed.select(params, _packed_flags(mask, params))))
        mask_tree = _mask_tree(mask, params)
        return MaskedState(inner_state=inner.init(_keep_selected(mask_tree, params)))

    def update(updates, state, params=None, **extra_args):
        if packed.is_packed(updates):
            return _packed_update(inner_update, mask, updates, state, params, **extra_args)
        mask_tree = _mask_tree(mask, updates)
        selected_params = None if params is None else _keep_selected(mask_tree, params)
        new_selected, inner_state = inner_update(
            _keep_selected(mask_tree, updates), state.inner_state, selected_params, **extra_args
        )
        updates = jax.tree.map(lambda keep, new, old: new if keep else old, mask_tree, new_selected, updates)
        return updates, MaskedState(inner_state=inner_state)

    return GradientTransformation(init, update)


def _packed_flags(mask, packed_tree) -> tuple:
    # The mask (or the labels) speak of the original tree: a callable sees its shapes.
    layout = packed_tree.layout
    mask_tree = mask(layout.shapes()) if callable(mask) else mask
    try:
        return packed.selection_flags(layout, mask_tree)
    except ValueError as error:
        raise ValueError(
            f"masked: mask must have the tree structure of the packed parameters (or a prefix of it); {error}"
        ) from error


def _packed_update(inner_update, mask, updates, state, params, **extra_args):
    # The selected arrays are packed on their own (contiguous spans: usually a few slices), so
    # the inner transformation keeps per-array semantics and state only for them.
    keep = _packed_flags(mask, updates)
    selected_params = None if params is None else packed.select(params, keep)
    new_selected, inner_state = inner_update(packed.select(updates, keep), state.inner_state, selected_params, **extra_args)
    return packed.merge(updates, new_selected, keep), MaskedState(inner_state=inner_state)


class PartitionState(NamedTuple):
    """State of :func:`partition`: one :class:`MaskedState` per label."""

    inner_states: dict


def partition(transforms: Mapping[Hashable, GradientTransformation], param_labels: Any) -> GradientTransformation:
    """Route every leaf to the transformation of its label (Optax's ``multi_transform``).

    ``u_i = transforms[label_i](g)_i``: each transformation sees only the leaves with its label.

    Args:
        transforms: a mapping from label to transformation.
        param_labels: a pytree of labels with the structure of the parameters (or a prefix),
            or a callable ``params -> such a pytree``. Every label must be a key of ``transforms``.

    Returns:
        A ``GradientTransformation`` whose state is :class:`PartitionState`.

    Example:
        >>> import gradtx
        >>> tx = gradtx.partition({"adam": gradtx.adam(1e-3), "frozen": gradtx.set_to_zero()},
        ...                       lambda p: {"w": "adam", "b": "frozen"})

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise ValueError(f"partition: transforms must be a non-empty mapping from label to transformation, got {transforms!r}")
    for label, tx in transforms.items():
        _check_transformation("partition", f"transforms[{label!r}]", tx)

    def labels_of(tree):
        if packed.is_packed(tree):
            tree = tree.layout.shapes()  # labels name the arrays of the original tree
        labels = param_labels(tree) if callable(param_labels) else param_labels
        unknown = set(jax.tree.leaves(labels)) - set(transforms)
        if unknown:
            raise ValueError(
                f"partition: param_labels uses labels {sorted(map(str, unknown))} missing from transforms (known: {sorted(map(str, transforms))})"
            )
        return labels

    def masked_for(label, labels):
        return masked(transforms[label], jax.tree.map(lambda lab: lab == label, labels))

    def init(params):
        labels = labels_of(params)
        return PartitionState({label: masked_for(label, labels).init(params) for label in transforms})

    def update(updates, state, params=None, **extra_args):
        labels = labels_of(updates)
        new_states = {}
        for label in transforms:
            updates, new_states[label] = masked_for(label, labels).update(
                updates, state.inner_states[label], params, **extra_args
            )
        return updates, PartitionState(new_states)

    return GradientTransformation(init, update)


def apply_updates(params: Any, updates: Any) -> Any:
    """Add updates to parameters, keeping every parameter's dtype: ``p_{t+1} = p_t + u_t``.

    The sum is cast back to the parameter's dtype, so bfloat16 parameters stay bfloat16
    even when the updates are float32. ``None`` parameters stay ``None``, and a ``None``
    update leaves its parameter unchanged.

    Integer and boolean parameters (step counters, masks, embeddings' index tables kept in
    the parameter tree) are not trainable: by design they are returned untouched, bit for
    bit, whatever their update. The optimizers themselves expect floating (or complex)
    leaves, so route such leaves to ``set_to_zero()`` with :func:`partition` or mask them
    out with :func:`masked`. Trees whose structures differ raise a ``ValueError`` naming
    the first differing path. Non-finite updates are added as they are (a NaN gradient
    makes NaN parameters); wrap the optimizer in :func:`apply_if_finite` to skip such steps.

    Args:
        params: the current parameters.
        updates: updates with the structure of ``params``.

    Returns:
        The new parameters.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> gradtx.apply_updates({"w": jnp.ones(2)}, {"w": jnp.full(2, -0.5)})
        {'w': Array([0.5, 0.5], dtype=float32)}

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    tree.check_same_structure("apply_updates", "params", params, "updates", updates)

    def per_leaf(p, u):
        if p is None or u is None or not jax.numpy.issubdtype(jax.numpy.result_type(p), jax.numpy.inexact):
            return p
        return (p + u).astype(jax.numpy.result_type(p))

    return jax.tree.map(per_leaf, params, updates, is_leaf=lambda x: x is None)
