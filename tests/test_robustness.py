"""Reliability: structure errors, non-trainable and complex leaves, non-finite steps, saturating counters, load.

Every registered optimizer (registry.py) is enrolled: skipped non-finite steps leave the
parameters and every state array bit-identical, counters near the int32 maximum saturate,
and 100,000 float32 steps on a quadratic stay finite. A hyperparameter sweep vmapped over
1,000 learning rates matches separate runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import parabola, tree_loss
from registry import ALL, BY_NAME

import gradtx

INT32_MAX = int(jnp.iinfo(jnp.int32).max)


def bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def small_params():
    return {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.array([0.5, -0.0, 0.0])}


def small_grads(scale=1.0):
    return {"w": scale * jnp.linspace(0.3, -0.7, 12).reshape(4, 3), "b": scale * jnp.array([0.1, -0.2, 0.3])}


# ---------------------------------------------------------------- structure errors


@pytest.mark.parametrize(
    "updates, path",
    [
        ({"w": jnp.ones((4, 3)), "c": jnp.ones(3)}, r"updates\['c'\] against params\['b'\]"),
        ({"w": jnp.ones((4, 3))}, r"params\['b'\] has no counterpart in updates"),
        ([jnp.ones(3), jnp.ones((4, 3))], r"updates\[0\] against params\['b'\]"),
        ({"w": {"k": jnp.ones((4, 3))}, "b": jnp.ones(3)}, r"updates\['w'\]\['k'\] against params\['w'\]"),
    ],
    ids=["renamed", "missing", "list", "deeper"],
)
def test_chain_names_the_first_differing_path(updates, path):
    tx = gradtx.adam(1e-3)
    params = small_params()
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"chain: updates and params must have the same tree structure; first difference: " + path):
        tx.update(updates, state, params)
    with pytest.raises(ValueError, match=r"apply_updates: params and updates must have the same tree structure; first difference: params"):
        gradtx.apply_updates(params, updates)


def test_state_from_other_params_is_named():
    tx = gradtx.adam(1e-3)
    state = tx.init({"a": jnp.ones(2), "b": {"c": jnp.ones(3)}})
    with pytest.raises(ValueError, match=r"(?s)chain: transforms\[0\] could not match the updates with its state.*\['b'\]"):
        jax.jit(tx.update)({"a": jnp.ones(2), "b": {"d": jnp.ones(3)}}, state)


def test_structure_check_is_trace_time_only():
    tx = gradtx.adam(1e-3)
    params = small_params()
    step = jax.jit(tx.update)
    state = tx.init(params)
    _, state = step(small_grads(), state, params)
    _, state = step(small_grads(), state, params)
    assert step._cache_size() == 1
    hlo = step.lower(small_grads(), state, params).as_text()
    assert "callback" not in hlo


def test_none_updates_and_params_pass_through():
    params = {"w": jnp.ones(2), "frozen": None}
    assert gradtx.apply_updates(params, {"w": jnp.ones(2), "frozen": jnp.ones(3)})["frozen"] is None
    assert bits(gradtx.apply_updates(params, {"w": None, "frozen": None})["w"]) == bits(params["w"])


def test_integer_and_boolean_parameters_pass_through_untouched():
    params = {"w": jnp.ones(3), "step": jnp.arange(3, dtype=jnp.int32), "active": jnp.array([True, False])}
    labels = {"w": "train", "step": "frozen", "active": "frozen"}
    tx = gradtx.partition({"train": gradtx.adam(0.1), "frozen": gradtx.set_to_zero()}, labels)
    state = tx.init(params)
    grads = {"w": jnp.ones(3), "step": jnp.zeros(3, jnp.int32), "active": jnp.zeros(2, bool)}
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = gradtx.apply_updates(params, updates)
    assert bits(new["step"]) == bits(params["step"]) and bits(new["active"]) == bits(params["active"])
    assert new["step"].dtype == jnp.int32 and new["active"].dtype == jnp.bool_
    assert not np.allclose(new["w"], params["w"])
    # By design (documented in apply_updates): even a non-zero update leaves them untouched.
    forced = gradtx.apply_updates(params, {"w": jnp.zeros(3), "step": jnp.full(3, 0.7), "active": jnp.ones(2)})
    assert bits(forced["step"]) == bits(params["step"]) and bits(forced["active"]) == bits(params["active"])


@pytest.mark.parametrize("name", ["lion", "sophia_h", "scale_by_lion", "scale_by_sophia", "sophia"])
def test_real_only_optimizers_reject_complex_parameters_at_init(name):
    tx = BY_NAME[name].make() if name in BY_NAME else getattr(gradtx, name)()
    params = {"real": jnp.ones(2), "z": jnp.ones(2, jnp.complex64)}
    with pytest.raises(TypeError, match=r"params\['z'\] has dtype complex64, but \w+ supports only real parameters"):
        tx.init(params)
    tx.init({"real": jnp.ones(2)})


def test_complex_optimizers_flag_matches_behaviour():
    for entry in ALL:
        params = jnp.ones(3, jnp.complex64)
        if entry.complex_ok:
            tx = entry.make()
            updates, _ = tx.update(params, tx.init(params), params, **entry.extra_args(lambda p: jnp.sum(jnp.abs(p) ** 2)))
            assert updates.dtype == jnp.complex64 and bool(jnp.all(jnp.isfinite(updates))), entry.name
        else:
            with pytest.raises(TypeError, match="supports only real parameters"):
                entry.make().init(params)


# ---------------------------------------------------------------- non-finite protection


@pytest.mark.parametrize("entry", ALL, ids=str)
def test_apply_if_finite_skips_bit_for_bit(entry):
    tx = gradtx.apply_if_finite(entry.make(), max_consecutive_errors=1_000)
    params = small_params()
    extra = entry.extra_args(tree_loss)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))
    state = tx.init(params)
    updates, state = step(small_grads(), state, params)
    params = gradtx.apply_updates(params, updates)
    for count, bad_value in enumerate([jnp.nan, jnp.inf, -jnp.inf], start=1):
        bad = small_grads()
        bad["w"] = bad["w"].at[1, 2].set(bad_value)
        updates, skipped = step(bad, state, params)
        assert bits(gradtx.apply_updates(params, updates)) == bits(params)
        assert bits(skipped.inner_state) == bits(state.inner_state)
        assert jax.tree.structure(skipped) == jax.tree.structure(state)
        assert int(skipped.notfinite_count) == count and int(skipped.total_notfinite) == count
        state = skipped
    updates, recovered = step(small_grads(), state, params)
    assert int(recovered.notfinite_count) == 0 and bool(recovered.last_finite)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def _counters(state):
    return [x for x in jax.tree.leaves(state) if jnp.shape(x) == () and jnp.result_type(x) == jnp.int32]


@pytest.mark.parametrize("entry", ALL, ids=str)
def test_step_counters_saturate_at_int32_max(entry):
    tx = entry.make()
    params = small_params()
    extra = entry.extra_args(tree_loss)
    state = tx.init(params)
    near_max = jax.tree.map(
        lambda x: jnp.int32(INT32_MAX - 1) if (jnp.shape(x) == () and jnp.result_type(x) == jnp.int32) else x, state
    )
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))
    for _ in range(3):
        updates, near_max = step(small_grads(), near_max, params)
        assert all(int(c) >= 0 for c in _counters(near_max)), f"{entry.name}: a counter wrapped around"
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates)), entry.name


def test_adam_count_saturates_exactly():
    tx = gradtx.scale_by_adam()
    params = small_params()
    state = tx.init(params)._replace(count=jnp.int32(INT32_MAX - 1))
    _, state = tx.update(small_grads(), state)
    assert int(state.count) == INT32_MAX
    updates, state = tx.update(small_grads(), state)
    assert int(state.count) == INT32_MAX
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_schedule_counters_saturate_and_schedules_stay_finite():
    schedule = gradtx.warmup_cosine_decay_schedule(0.0, 1.0, 10, 1000)
    tx = gradtx.scale_by_schedule(schedule)
    state = tx.init(small_params())._replace(count=jnp.int32(INT32_MAX))
    updates, state = tx.update(small_grads(), state)
    assert int(state.count) == INT32_MAX
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    sgd = gradtx.sgd(schedule)  # momentum-free SGD: the only counter is the schedule's
    counters = _counters(sgd.init(small_params()))
    assert counters
    for name in ("constant_schedule", "cosine_decay_schedule", "exponential_decay", "inverse_sqrt_schedule",
                 "warmup_cosine_decay_schedule", "linear_onecycle_schedule", "cosine_warm_restarts_schedule"):
        factory = getattr(gradtx, name)
        made = {
            "constant_schedule": lambda: factory(0.5),
            "cosine_decay_schedule": lambda: factory(1.0, 100),
            "exponential_decay": lambda: factory(1.0, 10, 0.5),
            "inverse_sqrt_schedule": lambda: factory(1.0, 10),
            "warmup_cosine_decay_schedule": lambda: factory(0.0, 1.0, 10, 100),
            "linear_onecycle_schedule": lambda: factory(100, 1.0),
            "cosine_warm_restarts_schedule": lambda: factory(1.0, 10, 2.0),
        }[name]()
        value = made(jnp.int32(INT32_MAX))
        assert bool(jnp.isfinite(value)), name


# ---------------------------------------------------------------- robustness under load


@pytest.mark.parametrize("name", ["adam", "sgd", "lion"])
def test_vmapped_sweep_over_1000_learning_rates_matches_separate_runs(name):
    entry = BY_NAME[name]
    start, _, loss = parabola(jnp.float32)
    learning_rates = jnp.logspace(-4, -1, 1000, dtype=jnp.float32)

    def run_one(learning_rate):
        tx = entry.make(learning_rate=learning_rate)

        def step(carry, _):
            params, state = carry
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return (gradtx.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (start, tx.init(start)), length=50)
        return params

    swept = jax.jit(jax.vmap(run_one))(learning_rates)
    assert swept.shape == (1000, 3) and bool(jnp.all(jnp.isfinite(swept)))
    single = jax.jit(run_one)
    for index in (0, 1, 499, 800, 999):
        np.testing.assert_allclose(swept[index], single(learning_rates[index]), rtol=1e-5, atol=1e-6)
    # The sweep is a sweep: different learning rates reach different points.
    assert float(jnp.abs(swept[0] - swept[999]).max()) > 1e-3


@pytest.mark.parametrize("entry", ALL, ids=str)
def test_100_000_float32_steps_stay_finite(entry):
    start, _, loss = parabola(jnp.float32)
    tx = entry.make()
    extra = entry.extra_args(loss)

    def step(carry, _):
        params, state = carry
        updates, state = tx.update(jax.grad(loss)(params), state, params, **extra)
        return (gradtx.apply_updates(params, updates), state), None

    final, state = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=100_000)[0])(start)
    assert bool(jnp.all(jnp.isfinite(final))), entry.name
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            assert bool(jnp.all(jnp.isfinite(leaf))), entry.name
    assert float(loss(final)) < float(loss(start))


def test_mask_whose_structure_cannot_match_is_named():
    tx = gradtx.masked(gradtx.adam(1e-3), {"w": True, "typo": False})
    with pytest.raises(ValueError, match=r"masked: mask must have the tree structure of the parameters \(or a prefix of it\)"):
        tx.init(small_params())
    prefix = gradtx.masked(gradtx.adam(1e-3), {"w": True, "b": False})
    prefix.init({"w": {"k": jnp.ones(2)}, "b": [jnp.ones(3)]})
