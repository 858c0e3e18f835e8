"""Contract tests run over every registered optimizer (see registry.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import parabola, rosenbrock, run, tree_grads, tree_loss, tree_params
from registry import ALL

import gradtx

pytestmark = pytest.mark.parametrize("entry", ALL, ids=str)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64], ids=["float32", "complex64"])
@pytest.mark.parametrize("problem", [parabola, rosenbrock], ids=["parabola", "rosenbrock"])
def test_converges(entry, problem, dtype):
    if jnp.issubdtype(dtype, jnp.complexfloating) and not entry.complex_ok:
        pytest.skip(f"{entry.name} does not support complex parameters")
    start, target, loss = problem(dtype)
    final, _ = run(entry.make(), start, loss, 10_000, gradtx.apply_updates, **entry.extra_args(loss))
    np.testing.assert_allclose(final, target, rtol=3e-2, atol=3e-2)


def test_no_recompilation_on_second_update(entry):
    tx = entry.make()
    params = tree_params()
    grads = tree_grads(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, **entry.extra_args(tree_loss)))
    state = tx.init(params)
    _, state = step(grads, state, params)
    _, state = step(grads, state, params)
    assert step._cache_size() == 1


def test_unknown_extra_args_are_accepted(entry):
    tx = entry.make()
    params = tree_params()
    updates, _ = tx.update(tree_grads(params), tx.init(params), params, unknown_argument=1.0, another=None, **entry.extra_args(tree_loss))
    assert jax.tree.structure(updates) == jax.tree.structure(params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_parameter_dtype_is_kept(entry, dtype):
    tx = entry.make()
    params = tree_params(dtype)
    state = tx.init(params)
    updates, new_state = jax.jit(lambda g, s, p: tx.update(g, s, p, **entry.extra_args(tree_loss)))(tree_grads(params), state, params)
    new_params = gradtx.apply_updates(params, updates)
    assert jax.tree.map(lambda x: x.dtype, updates) == jax.tree.map(lambda x: x.dtype, params)
    assert jax.tree.map(lambda x: x.dtype, new_params) == jax.tree.map(lambda x: x.dtype, params)
    assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree.leaves(new_params))


def test_state_types_are_stable_and_update_works_in_cond(entry):
    tx = entry.make()
    params = tree_params()
    grads = tree_grads(params)
    state = tx.init(params)
    extra = entry.extra_args(tree_loss)
    _, new_state = tx.update(grads, state, params, **extra)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert jax.tree.map(jax.typeof, new_state) == jax.tree.map(jax.typeof, state)

    @jax.jit
    def maybe_update(flag, state):
        return jax.lax.cond(flag, lambda s: tx.update(grads, s, params, **extra)[1], lambda s: s, state)

    skipped = maybe_update(False, state)
    taken = maybe_update(True, state)
    jax.tree.map(np.testing.assert_array_equal, skipped, state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), taken, new_state)


def test_jit_and_vmap_agree_with_separate_runs(entry):
    tx = entry.make()
    start, _, loss = parabola(jnp.float32)
    starts = jnp.stack([start, 2 * start, -start])

    def run_one(p):
        return run(tx, p, loss, 20, gradtx.apply_updates, **entry.extra_args(loss))[0]

    batched = jax.jit(jax.vmap(run_one))(starts)
    separate = jnp.stack([run_one(p) for p in starts])
    np.testing.assert_allclose(batched, separate, rtol=1e-5, atol=1e-6)


def test_init_accepts_shape_dtype_structs(entry):
    tx = entry.make()
    params = tree_params()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    concrete_state = tx.init(params)
    direct_state = tx.init(abstract)
    shaped_state = jax.eval_shape(tx.init, abstract)
    assert jax.tree.map(jax.typeof, direct_state) == jax.tree.map(jax.typeof, concrete_state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), shaped_state) == jax.tree.map(lambda x: (x.shape, x.dtype), concrete_state)
