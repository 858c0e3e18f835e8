"""Schedule-free AdamW/SGD and Sophia (SophiaG, Sophia-H): parity with the authors' code, estimators, refresh, validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import mlp_regression, run
from reference_problem import assert_matches_fixture, jax_problem, load_fixture

from gradtx.combine import apply_updates
from gradtx.optimizers.sophia import (
    ScaleBySophiaState,
    gnb_hessian_estimate,
    hutchinson_hessian_estimate,
    scale_by_sophia,
    sophia,
    sophia_h,
)
from gradtx.transforms.scaling import scale_by_learning_rate
from gradtx.wrappers.schedule_free import (
    ScheduleFreeState,
    schedule_free,
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_sgd,
)

FIXTURE_NAMES = ("schedule_free_adamw", "schedule_free_sgd", "sophia")


def _trajectories(tx, steps, eval_fn=None, **extra_args):
    """``(y, x)`` after each of ``steps`` steps on the reference problem, one compilation, as float64 NumPy."""
    params, loss = jax_problem()

    def step(carry, _):
        params, state = carry
        updates, state = tx.update(jax.grad(loss)(params), state, params, **extra_args)
        params = apply_updates(params, updates)
        return (params, state), (params, params if eval_fn is None else eval_fn(state, params))

    _, (ys, xs) = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=steps))(params)

    def unstack(stacked):
        return [jax.tree.map(lambda leaf: np.asarray(leaf[i], np.float64), stacked) for i in range(steps)]

    return unstack(ys), unstack(xs)


# ---------------------------------------------------------------- fixtures


def _schedule_free_from(fixture):
    hp = fixture["hyperparameters"]
    common = {
        "learning_rate": hp["lr"],
        "warmup_steps": hp["warmup_steps"],
        "weight_decay": hp["weight_decay"],
        "r": hp["r"],
        "weight_lr_power": hp["weight_lr_power"],
    }
    if fixture["name"] == "schedule_free_adamw":
        b1, b2 = hp["betas"]
        return schedule_free_adamw(b1=b1, b2=b2, eps=hp["eps"], **common)
    return schedule_free_sgd(b1=hp["momentum"], **common)


@pytest.mark.parametrize("name", ["schedule_free_adamw", "schedule_free_sgd"])
def test_schedule_free_matches_reference_at_y_and_x(name):
    fixture = load_fixture(name)
    ys, xs = _trajectories(_schedule_free_from(fixture), fixture["steps"], schedule_free_eval_params)
    assert_matches_fixture(ys, fixture, rtol=1e-5)
    assert_matches_fixture(xs, {**fixture, "trajectory": fixture["eval_trajectory"]}, rtol=1e-5)
    # x and y really are different sequences, so comparing both checks two things.
    assert np.max(np.abs(ys[-1]["bias"] - xs[-1]["bias"])) > 1e-2


def _squared_gradient_estimator(batch_size):
    """The quantity sophia_reference.py feeds ``update_hessian()``, with gradtx's batch factor."""
    _, loss = jax_problem()

    def estimator(params, key, **extra_args):
        del key, extra_args
        return jax.tree.map(lambda g: batch_size * g * g, jax.grad(loss)(params))

    return estimator


def test_sophia_matches_reference():
    fixture = load_fixture("sophia")
    hp = fixture["hyperparameters"]
    b1, b2 = hp["betas"]
    tx = sophia(
        hp["lr"], b1, b2, hp["rho"], hp["weight_decay"],
        update_interval=hp["k"], hessian_estimator=_squared_gradient_estimator(hp["bs"]),
    )
    ys, _ = _trajectories(tx, fixture["steps"])
    assert_matches_fixture(ys, fixture, rtol=1e-5)


# ---------------------------------------------------------------- schedule-free


def test_schedule_free_adamw_matches_optax_without_warmup():
    # Without warmup the learning rate is constant, so Optax's one-step offset of the
    # averaging schedule does not matter and both must agree.
    kwargs = {"learning_rate": 0.01, "b1": 0.9, "b2": 0.99, "eps": 1e-7, "weight_decay": 0.01}
    params, loss = mlp_regression()
    ours, our_losses = run(schedule_free_adamw(**kwargs), params, loss, 100, apply_updates)
    theirs, _ = run(optax.contrib.schedule_free_adamw(**kwargs), params, loss, 100, optax.apply_updates)
    assert float(our_losses[-1]) < float(our_losses[0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b)))), ours, theirs)


def test_schedule_free_wraps_any_base_optimizer():
    # schedule_free_sgd is exactly the wrapper over "descend by lr" (optax's sgd, an Optax transformation).
    fixture = load_fixture("schedule_free_sgd")
    hp = fixture["hyperparameters"]
    lr = hp["lr"]
    base = optax.chain(optax.add_decayed_weights(hp["weight_decay"]), optax.sgd(lr))
    wrapped = schedule_free(base, lr, hp["momentum"], hp["weight_lr_power"], hp["r"])
    alias = schedule_free_sgd(lr, None, hp["momentum"], hp["weight_decay"], hp["weight_lr_power"], hp["r"])
    (wrapped_y, _), (alias_y, _) = _trajectories(wrapped, 20), _trajectories(alias, 20)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), wrapped_y, alias_y)
    # A plain Optax transformation (no **extra_args) is called without the extra arguments.
    plain = schedule_free(optax.scale(-0.1), 0.1)
    updates, _ = plain.update(jnp.ones(2), plain.init(jnp.zeros(2)), jnp.zeros(2), unknown_argument=1.0)
    np.testing.assert_allclose(updates, [-0.1, -0.1], rtol=1e-6)


def test_schedule_free_first_step_and_eval_params():
    tx = schedule_free_sgd(learning_rate=0.1, b1=0.8)
    params = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(params)
    assert isinstance(state, ScheduleFreeState)
    # x_0 = y_0 = z_0, and the initial z is a copy, not the params themselves.
    np.testing.assert_array_equal(schedule_free_eval_params(state, params)["w"], params["w"])
    assert state.z["w"] is not params["w"]
    grads = {"w": jnp.array([1.0, 1.0])}
    updates, state = tx.update(grads, state, params)
    y = apply_updates(params, updates)
    # The first average weight is c = 1, so x_1 = z_1 = z_0 - lr * g and y_1 = z_1 too.
    np.testing.assert_allclose(state.z["w"], [0.9, -2.1], rtol=1e-6)
    np.testing.assert_allclose(schedule_free_eval_params(state, y)["w"], [0.9, -2.1], rtol=1e-6)
    np.testing.assert_allclose(y["w"], [0.9, -2.1], rtol=1e-6)


def test_schedule_free_with_zero_learning_rate_stays_put_and_finite():
    tx = schedule_free_adamw(learning_rate=0.0)
    params = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update({"w": jnp.ones(2)}, state, params)
        params = apply_updates(params, updates)
    np.testing.assert_array_equal(params["w"], [1.0, -2.0])
    np.testing.assert_array_equal(schedule_free_eval_params(state, params)["w"], [1.0, -2.0])


def test_schedule_free_keeps_bfloat16_params_with_float32_z():
    tx = schedule_free_adamw(learning_rate=0.01, state_dtype=jnp.float32)
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    state = tx.init(params)
    updates, state = jax.jit(tx.update)({"w": jnp.ones(3, jnp.bfloat16)}, state, params)
    assert updates["w"].dtype == jnp.bfloat16 and state.z["w"].dtype == jnp.float32
    assert schedule_free_eval_params(state, params)["w"].dtype == jnp.bfloat16


def test_schedule_free_init_accepts_shape_dtype_structs():
    tx = schedule_free_sgd(learning_rate=0.1)
    abstract = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}
    state = tx.init(abstract)
    assert state.z["w"].shape == (2, 3) and state.z["w"].dtype == jnp.float32


# ---------------------------------------------------------------- Sophia


def test_sophia_refreshes_the_hessian_exactly_every_k_steps():
    calls = []

    def recording_estimator(params, key, *, step, **extra_args):
        jax.debug.callback(lambda s: calls.append(int(s)), step, ordered=True)
        return jax.tree.map(jnp.ones_like, params)

    tx = scale_by_sophia(hessian_estimator=recording_estimator)
    params = {"w": jnp.zeros(2)}

    @jax.jit
    def step(state, i):
        return tx.update({"w": jnp.ones(2)}, state, params, step=i)[1]

    state = tx.init(params)
    hessians = []
    for i in range(25):
        state = step(state, jnp.int32(i))
        hessians.append(float(state.hessian["w"][0]))
    jax.effects_barrier()
    assert calls == [10, 20]
    assert step._cache_size() == 1
    # The EMA moves on refresh steps only: 0 until step 10, 1 - b2 after it, then constant.
    changed = [i for i in range(1, 25) if hessians[i] != hessians[i - 1]]
    assert changed == [10, 20] and hessians[9] == 0.0
    np.testing.assert_allclose(hessians[10], 1 - 0.99, rtol=1e-6)


def test_sophia_update_is_clipped_momentum_over_the_hessian():
    # One refresh with a known estimate, then the update rule by hand.
    h = jnp.array([1.0, 100.0, 0.0, 2.0])
    tx = scale_by_sophia(b1=0.5, b2=0.5, rho=0.1, update_interval=1, hessian_estimator=lambda params, key, **_: h)
    params = jnp.zeros(4)
    g = jnp.array([0.2, 0.2, -0.2, -0.01])
    state = tx.init(params)
    _, state = tx.update(g, state, params)  # count 0: no refresh, m = g / 2
    updates, state = tx.update(g, state, params)  # count 1: refresh, h = h / 2, m = 3 g / 4
    m, hessian = 0.75 * g, 0.5 * h
    expected = jnp.clip(m / jnp.maximum(0.1 * hessian, 1e-15), -1, 1)
    np.testing.assert_allclose(updates, expected, rtol=1e-6)
    np.testing.assert_allclose(updates, [1.0, 0.03, -1.0, -0.075], rtol=1e-6)


def test_sophia_weight_decay_is_decoupled_and_masked():
    zero_hessian = lambda params, key, **_: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    tx = sophia(learning_rate=0.1, weight_decay=0.5, mask={"w": True, "b": False}, hessian_estimator=zero_hessian)
    params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([1.0, 1.0])}
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.05, 0.1], rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], [0.0, 0.0])


def _softmax_problem():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
    return params, lambda p: x @ p["w"] + p["b"], x


def test_gnb_estimate_is_batch_size_times_squared_sampled_label_gradient():
    params, logits_fn, _ = _softmax_problem()
    key = jax.random.key(7)
    labels = jax.random.categorical(key, logits_fn(params))

    def sampled_loss(p):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits_fn(p)), labels[:, None], axis=-1))

    expected = jax.tree.map(lambda g: 4 * g * g, jax.grad(sampled_loss)(params))
    ours = gnb_hessian_estimate(params, key, logits_fn=logits_fn)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ours, expected)


def test_gnb_estimate_is_unbiased_for_the_gauss_newton_diagonal():
    params, logits_fn, x = _softmax_problem()
    probabilities = jax.nn.softmax(logits_fn(params))
    curvature = probabilities * (1 - probabilities)  # diagonal of softmax CE's Hessian in the logits
    exact = {"w": jnp.mean(x[:, :, None] ** 2 * curvature[:, None, :], axis=0), "b": jnp.mean(curvature, axis=0)}
    keys = jax.random.split(jax.random.key(0), 20_000)
    estimates = jax.jit(jax.vmap(lambda k: gnb_hessian_estimate(params, k, logits_fn=logits_fn)))(keys)
    mean = jax.tree.map(lambda e: jnp.mean(e, axis=0), estimates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0.1, atol=2e-3), mean, exact)


def test_hutchinson_estimate():
    diagonal = jnp.array([1.0, -2.0, 3.0])
    exact = hutchinson_hessian_estimate(jnp.ones(3), jax.random.key(1), obj_fn=lambda p: 0.5 * jnp.sum(diagonal * p**2))
    np.testing.assert_allclose(exact, diagonal, rtol=1e-6)  # exact for a diagonal Hessian
    a = jnp.array([[2.0, 1.0, -0.5], [1.0, 3.0, 0.2], [-0.5, 0.2, 1.0]])
    keys = jax.random.split(jax.random.key(2), 4_000)
    quadratic = lambda p: 0.5 * p["p"] @ a @ p["p"]  # noqa: E731
    estimates = jax.jit(jax.vmap(lambda k: hutchinson_hessian_estimate({"p": jnp.ones(3)}, k, obj_fn=quadratic)["p"]))(keys)
    np.testing.assert_allclose(jnp.mean(estimates, axis=0), jnp.diag(a), atol=0.08)


def test_sophia_and_sophia_h_jit_with_extra_args():
    # The estimator's inputs are closures over the batch, built inside the jitted step.
    params, _, x = _softmax_problem()
    labels = jnp.array([0, 1, 2, 3])

    def logits(p, batch):
        return batch @ p["w"] + p["b"]

    def loss(p, batch):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits(p, batch)), labels[:, None], axis=-1))

    for tx, extra in [
        (sophia(learning_rate=0.01, update_interval=2), lambda batch: {"logits_fn": lambda p: logits(p, batch)}),
        (sophia_h(learning_rate=0.01, update_interval=2), lambda batch: {"obj_fn": lambda p: loss(p, batch)}),
    ]:

        @jax.jit
        def train_step(params, state, batch):
            updates, state = tx.update(jax.grad(loss)(params, batch), state, params, **extra(batch))
            return apply_updates(params, updates), state

        new_params, state = params, tx.init(params)
        for _ in range(4):
            new_params, state = train_step(new_params, state, x)
        assert train_step._cache_size() == 1
        sophia_state = state[0]
        assert isinstance(sophia_state, ScaleBySophiaState) and int(sophia_state.count) == 4
        assert float(jnp.sum(jnp.abs(sophia_state.hessian["w"]))) > 0.0
        assert float(loss(new_params, x)) < float(loss(params, x))


def test_sophia_needs_its_extra_argument():
    params = {"w": jnp.zeros(2)}
    with pytest.raises(ValueError, match="gnb_hessian_estimate: needs logits_fn="):
        sophia().update({"w": jnp.ones(2)}, sophia().init(params), params)
    with pytest.raises(ValueError, match="hutchinson_hessian_estimate: needs obj_fn="):
        sophia_h().update({"w": jnp.ones(2)}, sophia_h().init(params), params)
    with pytest.raises(ValueError, match="scale_by_sophia: update needs params"):
        scale_by_sophia().update({"w": jnp.ones(2)}, scale_by_sophia().init(params))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "factory, kwargs, error, message",
    [
        (schedule_free_adamw, {"b1": 0.0}, ValueError, r"schedule_free_adamw: b1 must be in \(0, 1\), got 0.0"),
        (schedule_free_adamw, {"b1": 1.0}, ValueError, r"schedule_free_adamw: b1 must be in \(0, 1\), got 1.0"),
        (schedule_free_adamw, {"b2": 1.0}, ValueError, r"schedule_free_adamw: b2 must be in \[0, 1\), got 1.0"),
        (schedule_free_adamw, {"warmup_steps": -1}, ValueError, r"schedule_free_adamw: warmup_steps must be an integer >= 0"),
        (schedule_free_adamw, {"weight_decay": -0.1}, ValueError, r"schedule_free_adamw: weight_decay must be >= 0, got -0.1"),
        (schedule_free_adamw, {"state_dtype": jnp.int32}, ValueError, r"schedule_free_adamw: state_dtype must be None"),
        (schedule_free_sgd, {"learning_rate": -1.0}, ValueError, r"schedule_free_sgd: learning_rate must be >= 0, got -1.0"),
        (schedule_free_sgd, {"r": -1.0}, ValueError, r"schedule_free_sgd: r must be >= 0, got -1.0"),
        (schedule_free_sgd, {"weight_lr_power": -2.0}, ValueError, r"schedule_free_sgd: weight_lr_power must be >= 0, got -2.0"),
        (sophia, {"rho": 0.0}, ValueError, r"sophia: rho must be > 0, got 0.0"),
        (sophia, {"b2": 1.0}, ValueError, r"sophia: b2 must be in \[0, 1\), got 1.0"),
        (sophia, {"update_interval": 0}, ValueError, r"sophia: update_interval must be an integer >= 1, got 0"),
        (sophia, {"weight_decay": -1.0}, ValueError, r"sophia: weight_decay must be >= 0, got -1.0"),
        (sophia, {"hessian_estimator": 3}, TypeError, r"sophia: hessian_estimator must be callable"),
        (sophia_h, {"eps": 0.0}, ValueError, r"sophia_h: eps must be > 0, got 0.0"),
        (scale_by_sophia, {"b1": 1.5}, ValueError, r"scale_by_sophia: b1 must be in \[0, 1\), got 1.5"),
        (scale_by_sophia, {"mu_dtype": "int8"}, ValueError, r"scale_by_sophia: mu_dtype must be None or a floating dtype"),
    ],
)
def test_validation(factory, kwargs, error, message):
    with pytest.raises(error, match=message):
        factory(**kwargs)


def test_schedule_free_validation():
    with pytest.raises(TypeError, match="schedule_free: base_optimizer must be a gradient transformation"):
        schedule_free(lambda g: g, 0.1)
    with pytest.raises(ValueError, match=r"schedule_free: b1 must be in \(0, 1\), got 0.0"):
        schedule_free(scale_by_learning_rate(0.1), 0.1, b1=0.0)
    tx = schedule_free_sgd(0.1)
    with pytest.raises(ValueError, match=r"schedule_free: update needs params \(the current y\)"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
    with pytest.raises(TypeError, match="schedule_free_eval_params: state must be a ScheduleFreeState"):
        schedule_free_eval_params((tx.init(jnp.ones(2)),), jnp.ones(2))
