"""Combinators: chain, named_chain, masked, partition, apply_updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradtx


@pytest.fixture
def params():
    return {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3), "nested": {"c": jnp.full(2, 2.0)}}


def test_identity_and_set_to_zero(params):
    updates, state = gradtx.identity().update(params, gradtx.EmptyState())
    assert updates is params and state == gradtx.EmptyState()
    zeros, _ = gradtx.set_to_zero().update(params, gradtx.EmptyState())
    assert all(not jnp.any(x) for x in jax.tree.leaves(zeros))


def test_chain_applies_in_order(params):
    tx = gradtx.chain(gradtx.scale(2.0), optax.add_decayed_weights(1.0), gradtx.scale(-1.0))
    updates, state = tx.update(params, tx.init(params), params)
    jax.tree.map(lambda u, p: np.testing.assert_allclose(u, -(2 * p + p)), updates, params)
    assert isinstance(state, tuple) and len(state) == 3


def test_named_chain_keys_state_by_name(params):
    tx = gradtx.named_chain(("momentum", optax.trace(0.9)), ("lr", gradtx.scale(-0.1)))
    state = tx.init(params)
    assert list(state) == ["momentum", "lr"]
    updates, state = tx.update(params, state, params)
    np.testing.assert_allclose(updates["b"], -0.1 * params["b"])
    with pytest.raises(ValueError, match="named_chain: names must be unique"):
        gradtx.named_chain(("a", gradtx.identity()), ("a", gradtx.identity()))


def test_chain_rejects_non_transformations():
    with pytest.raises(TypeError, match=r"chain: transforms\[1\] must be a gradient transformation"):
        gradtx.chain(gradtx.identity(), 3.0)


@pytest.mark.parametrize("as_callable", [False, True])
def test_masked_leaves_pass_through_bit_for_bit(params, as_callable):
    mask = {"w": True, "b": False, "nested": {"c": True}}
    tx = gradtx.masked(optax.adam(0.1), (lambda p: mask) if as_callable else mask)
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(params, state, params)
    reference, _ = optax.adam(0.1).update(params, optax.adam(0.1).init(params))
    np.testing.assert_array_equal(updates["b"], params["b"])
    np.testing.assert_allclose(updates["w"], reference["w"])
    np.testing.assert_allclose(updates["nested"]["c"], reference["nested"]["c"])


def test_masked_accepts_a_prefix_mask(params):
    tx = gradtx.masked(gradtx.scale(0.0), {"w": False, "b": False, "nested": True})
    updates, _ = tx.update(params, tx.init(params))
    np.testing.assert_array_equal(updates["w"], params["w"])
    np.testing.assert_array_equal(updates["nested"]["c"], 0.0)


def test_partition_routes_each_leaf_to_its_label(params):
    labels = {"w": "adam", "b": "frozen", "nested": {"c": "sgd"}}
    tx = gradtx.partition({"adam": optax.adam(0.1), "sgd": gradtx.scale(-0.5), "frozen": gradtx.set_to_zero()}, labels)
    updates, state = tx.update(params, tx.init(params), params)
    np.testing.assert_array_equal(updates["b"], 0.0)
    np.testing.assert_allclose(updates["nested"]["c"], -0.5 * params["nested"]["c"])
    np.testing.assert_allclose(updates["w"], -0.1 * jnp.sign(params["w"]), atol=1e-6)
    assert set(state.inner_states) == {"adam", "sgd", "frozen"}


def test_partition_matches_optax_multi_transform(params):
    labels = lambda p: {"w": "a", "b": "b", "nested": {"c": "a"}}  # noqa: E731
    ours = gradtx.partition({"a": optax.adam(0.1), "b": optax.sgd(0.3, momentum=0.9)}, labels)
    theirs = optax.multi_transform({"a": optax.adam(0.1), "b": optax.sgd(0.3, momentum=0.9)}, labels)
    our_state, their_state = ours.init(params), theirs.init(params)
    for _ in range(3):
        our_updates, our_state = ours.update(params, our_state, params)
        their_updates, their_state = theirs.update(params, their_state, params)
        jax.tree.map(np.testing.assert_allclose, our_updates, their_updates)


def test_partition_names_unknown_labels(params):
    tx = gradtx.partition({"a": gradtx.identity()}, {"w": "a", "b": "typo", "nested": {"c": "a"}})
    with pytest.raises(ValueError, match=r"partition: param_labels uses labels \['typo'\]"):
        tx.init(params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_apply_updates_keeps_parameter_dtype(dtype):
    params = {"w": jnp.ones(3, dtype), "skip": None}
    new = gradtx.apply_updates(params, {"w": jnp.full(3, 0.5, jnp.float32), "skip": None})
    assert new["w"].dtype == dtype and new["skip"] is None
    np.testing.assert_allclose(new["w"].astype(jnp.float32), 1.5)
