"""Property-based tests (hypothesis) over random pytrees, for every registered optimizer.

Trees are nested dicts, lists and tuples of scalars, zero-size arrays and arrays up to rank
4, in float32, bfloat16 and float16 (float64 with x64 on). Shapes come from a small fixed
set and updates run eagerly, so that examples reuse compiled kernels instead of compiling a
new program per tree: the file stays fast with a few examples per property (EXAMPLES).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from problems import tree_loss
from registry import ALL

import gradtx

EXAMPLES = 15
PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

SHAPES = [(), (0,), (3,), (2, 3), (1, 2, 0), (2, 1, 2, 3)]
LOW_PRECISION = [jnp.float32, jnp.bfloat16, jnp.float16]


def _leaf(shape, dtype, seed):
    values = np.random.default_rng(seed).normal(size=shape)
    return jnp.asarray(values, dtype)


def leaves(dtypes):
    return st.builds(_leaf, st.sampled_from(SHAPES), st.sampled_from(dtypes), st.integers(0, 2**16))


def pytrees(dtypes=tuple(LOW_PRECISION)):
    return st.recursive(
        leaves(dtypes),
        lambda children: st.one_of(
            st.dictionaries(st.sampled_from("abcd"), children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple),
        ),
        max_leaves=5,
    )


def gradients_like(params, seed=1):
    flat, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in flat])


def bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def shapes_and_dtypes(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32) if x.dtype != jnp.float64 else x)))
               for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact))


@contextlib.contextmanager
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def _two_steps(entry, params, grads):
    tx = entry.make()
    extra = entry.extra_args(tree_loss)
    state = tx.init(params)
    updates, new_state = tx.update(grads, state, params, **extra)
    updates, newer_state = tx.update(grads, new_state, gradtx.apply_updates(params, updates), **extra)
    return state, updates, newer_state


# ---------------------------------------------------------------- every registered optimizer


# Optimizers that need an objective differentiate it eagerly on every new tree: fewer examples.
EAGER = [entry for entry in ALL if not entry.needs_obj_fn]
WITH_OBJECTIVE = [entry for entry in ALL if entry.needs_obj_fn]
FEWER = settings(PROPERTY, max_examples=5)


def keeps_shapes_dtypes_and_structure(entry, params):
    grads = gradients_like(params)
    state, updates, new_state = _two_steps(entry, params, grads)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert shapes_and_dtypes(updates) == shapes_and_dtypes(params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert shapes_and_dtypes(new_state) == shapes_and_dtypes(state)
    assert shapes_and_dtypes(gradtx.apply_updates(params, updates)) == shapes_and_dtypes(params)


def zero_gradients_are_finite(entry, params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    _, updates, state = _two_steps(entry, params, zeros)
    assert all_finite(updates), entry.name
    assert all_finite(state), entry.name


@pytest.mark.parametrize("entry", EAGER, ids=str)
@PROPERTY
@given(params=pytrees())
def test_init_and_update_keep_shapes_dtypes_and_structure(entry, params):
    keeps_shapes_dtypes_and_structure(entry, params)


@pytest.mark.parametrize("entry", EAGER, ids=str)
@PROPERTY
@given(params=pytrees())
def test_zero_gradients_never_produce_nan(entry, params):
    zero_gradients_are_finite(entry, params)


@pytest.mark.parametrize("entry", WITH_OBJECTIVE, ids=str)
@FEWER
@given(params=pytrees())
def test_optimizers_with_objective_keep_structure_and_stay_finite_on_zero_gradients(entry, params):
    keeps_shapes_dtypes_and_structure(entry, params)
    zero_gradients_are_finite(entry, params)


@pytest.mark.parametrize("entry", EAGER, ids=str)
@settings(PROPERTY, max_examples=5)
@given(params=pytrees(dtypes=(jnp.float32, jnp.float16)))
def test_float64_parameters_keep_their_dtype_under_x64(entry, params):
    with x64():
        params = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, params)
        grads = gradients_like(params)
        state, updates, new_state = _two_steps(entry, params, grads)
        assert shapes_and_dtypes(updates) == shapes_and_dtypes(params)
        assert shapes_and_dtypes(new_state) == shapes_and_dtypes(state)
        assert all_finite(updates)


# ---------------------------------------------------------------- combinators

BLOCKS = {
    "scale_by_adam": gradtx.scale_by_adam,
    "clip_by_global_norm": lambda: gradtx.clip_by_global_norm(1.0),
    "scale": lambda: gradtx.scale(-0.1),
    "trace": lambda: gradtx.trace(0.9, nesterov=True),
    "add_decayed_weights": lambda: gradtx.add_decayed_weights(1e-2),
    "scale_by_rms": gradtx.scale_by_rms,
    "centralize": gradtx.centralize,
    "clip": lambda: gradtx.clip(0.5),
    "scale_by_trust_ratio": gradtx.scale_by_trust_ratio,
}


@PROPERTY
@given(names=st.tuples(*[st.sampled_from(sorted(BLOCKS))] * 3), params=pytrees(dtypes=(jnp.float32,)))
def test_chain_is_associative(names, params):
    a, b, c = (BLOCKS[name]() for name in names)
    left = gradtx.chain(gradtx.chain(a, b), c)
    right = gradtx.chain(a, gradtx.chain(b, c))
    flat = gradtx.chain(a, b, c)
    grads = gradients_like(params)
    results = []
    for tx in (left, right, flat):
        state = tx.init(params)
        for _ in range(2):
            updates, state = tx.update(grads, state, params)
        results.append(updates)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), results[0], results[1])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), results[0], results[2])


MASKABLE = [entry for entry in ALL if not entry.needs_obj_fn]


@PROPERTY
@given(entry=st.sampled_from(MASKABLE), params=pytrees(), data=st.data())
def test_masked_leaves_are_untouched_bit_for_bit(entry, params, data):
    flat, treedef = jax.tree.flatten(params)
    keep = data.draw(st.lists(st.booleans(), min_size=len(flat), max_size=len(flat)))
    mask = jax.tree.unflatten(treedef, keep)
    tx = gradtx.masked(entry.make(), mask)
    grads = gradients_like(params)
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
        for selected, g, u in zip(keep, jax.tree.leaves(grads), jax.tree.leaves(updates)):
            if not selected:
                assert np.asarray(u).tobytes() == np.asarray(g).tobytes()
            assert u.dtype == g.dtype and u.shape == g.shape


FACTORS = {"two": 2.0, "three": 3.0, "five": 5.0}


@PROPERTY
@given(params=pytrees(dtypes=(jnp.float32,)), data=st.data())
def test_partition_routes_each_leaf_to_exactly_one_transformation(params, data):
    flat, treedef = jax.tree.flatten(params)
    labels = data.draw(st.lists(st.sampled_from(sorted(FACTORS)), min_size=len(flat), max_size=len(flat)))
    tx = gradtx.partition({label: gradtx.scale(factor) for label, factor in FACTORS.items()}, jax.tree.unflatten(treedef, labels))
    grads = gradients_like(params)
    updates, state = tx.update(grads, tx.init(params), params)
    # Products of distinct primes identify the set of transformations applied to a leaf.
    for label, g, u in zip(labels, jax.tree.leaves(grads), jax.tree.leaves(updates)):
        np.testing.assert_array_equal(u, g * FACTORS[label])
    assert set(state.inner_states) == set(FACTORS)


# ---------------------------------------------------------------- schedules

COUNTS = jnp.concatenate([jnp.arange(0, 400, dtype=jnp.int32), jnp.array([10_000, 2**31 - 1], jnp.int32)])


def _decays():
    positive = st.floats(1e-3, 10.0)
    fraction = st.floats(0.0, 1.0)
    steps = st.integers(1, 200)
    warmup = st.integers(0, 100)
    return st.one_of(
        st.builds(lambda v, n, a: (0, gradtx.cosine_decay_schedule(v, n, a)), positive, steps, fraction),
        st.builds(lambda v, n, r, b, s: (0, gradtx.exponential_decay(v, n, r, b, s)), positive, steps, st.floats(0.01, 1.0), warmup, st.booleans()),
        st.builds(lambda v, f, p, n: (0, gradtx.polynomial_schedule(v, v * f, p, n)), positive, fraction, st.floats(0.1, 4.0), steps),
        st.builds(lambda v, f, n, b: (0, gradtx.linear_schedule(v, v * f, n, b)), positive, fraction, steps, warmup),
        st.builds(lambda v, r, n, s: (0, gradtx.inverse_time_decay(v, r, n, s)), positive, st.floats(0.0, 5.0, exclude_min=True), steps, st.booleans()),
        st.builds(lambda p, w: (w, gradtx.inverse_sqrt_schedule(p, w)), positive, st.integers(1, 100)),
        st.builds(lambda i, p, w, n, f: (w, gradtx.warmup_cosine_decay_schedule(i * p, p, w, w + n, p * f)), fraction, positive, warmup, steps, fraction),
        st.builds(lambda i, p, w, n, r: (w, gradtx.warmup_exponential_decay_schedule(i * p, p, w, n, r)), fraction, positive, warmup, steps, st.floats(0.01, 1.0)),
        st.builds(lambda v, n, p: (int(n * p), gradtx.cosine_onecycle_schedule(n, v, p)), positive, st.integers(10, 300), st.floats(0.05, 0.95)),
        st.builds(lambda v, s: (0, gradtx.piecewise_constant_schedule(v, {b: s for b in (10, 50, 120)})), positive, fraction),
    )


@PROPERTY
@given(warmup_and_schedule=_decays())
def test_decay_schedules_are_finite_and_non_increasing_after_warmup(warmup_and_schedule):
    warmup, schedule = warmup_and_schedule
    values = np.asarray(jax.vmap(schedule)(COUNTS), np.float64)
    assert np.all(np.isfinite(values))
    after = values[COUNTS >= warmup]
    assert np.all(np.diff(after) <= 1e-6 * np.maximum(np.abs(after[:-1]), 1.0)), after
