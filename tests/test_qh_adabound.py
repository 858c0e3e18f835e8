"""QHM, QHAdam(W), AdaBound and AMSBound: parity with the authors' code (fixtures), the paper's identities, validation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference_problem import assert_matches_fixture, load_fixture, trajectory

from gradtx.optimizers.adabound import adabound, amsbound, scale_by_adabound
from gradtx.optimizers.adam import adam
from gradtx.optimizers.qhadam import qhadam, qhadamw, scale_by_qhadam
from gradtx.optimizers.qhm import qhm, scale_by_qhm


def _qhadam_from(hp, factory):
    (b1, b2), (nu1, nu2) = hp["betas"], hp["nus"]
    return factory(hp["lr"], b1, b2, nu1, nu2, hp["eps"], hp["weight_decay"])


def _adabound_from(hp, learning_rate=None):
    b1, b2 = hp["betas"]
    return adabound(
        hp["lr"] if learning_rate is None else learning_rate,
        b1, b2, hp["final_lr"], hp["gamma"], hp["eps"], hp["weight_decay"],
        amsbound=hp.get("amsbound", False),
    )


def _scheduled_adabound(fixture):
    schedule = fixture["schedule"]
    return _adabound_from(fixture["hyperparameters"], lambda count: schedule["init_value"] * schedule["decay_rate"] ** count)


BUILDERS = {
    "qhadam": lambda f: _qhadam_from(f["hyperparameters"], qhadam),
    "qhadamw": lambda f: _qhadam_from(f["hyperparameters"], qhadamw),
    "qhm": lambda f: qhm(**{("learning_rate" if k == "lr" else k): v for k, v in f["hyperparameters"].items()}),
    "adabound": lambda f: _adabound_from(f["hyperparameters"]),
    "amsbound": lambda f: _adabound_from(f["hyperparameters"]),
    "adabound_schedule": _scheduled_adabound,
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_matches_the_authors_reference(name):
    fixture = load_fixture(name)
    ours = trajectory(BUILDERS[name](fixture), fixture["steps"])
    assert_matches_fixture(ours, fixture, rtol=1e-5)


def test_amsbound_alias_is_adabound_with_the_flag():
    fixture = load_fixture("amsbound")
    hp = fixture["hyperparameters"]
    b1, b2 = hp["betas"]
    alias = amsbound(hp["lr"], b1, b2, hp["final_lr"], hp["gamma"], hp["eps"], hp["weight_decay"])
    assert_matches_fixture(trajectory(alias, fixture["steps"]), fixture, rtol=1e-5)
    # The running maximum matters on this problem, so the AMSBound fixture tests it.
    plain = load_fixture("adabound")["trajectory"][-1]["kernel"]
    assert np.max(np.abs(np.subtract(plain, fixture["trajectory"][-1]["kernel"]))) > 1e-3 * np.max(np.abs(plain))


def _assert_same(ours, theirs, rtol, steps=40):
    """Same trajectory on the reference problem: every step, ``max|a - b| <= rtol * max|b|`` per leaf."""
    for mine, expected in zip(trajectory(ours, steps), trajectory(theirs, steps)):
        for key in expected:
            assert np.max(np.abs(mine[key] - expected[key])) <= rtol * np.max(np.abs(expected[key])), key


def test_qhm_identities_from_the_paper():
    # nu = 1: SGD with dampened momentum, i.e. undampened momentum with lr * (1 - beta).
    _assert_same(qhm(0.5, momentum=0.9, nu=1.0), optax.sgd(0.05, momentum=0.9), 1e-5)
    # nu = 0: plain SGD; the momentum buffer is not used.
    _assert_same(qhm(0.05, momentum=0.9, nu=0.0), optax.sgd(0.05), 1e-6)


def test_qhadam_with_unit_discounts_is_adam():
    _assert_same(qhadam(0.01, b1=0.8, b2=0.99, nu1=1.0, nu2=1.0), adam(0.01, b1=0.8, b2=0.99), 1e-6)


def test_qhadam_first_step_mixes_gradient_and_moment():
    g = jnp.array([0.5, -2.0])
    tx = scale_by_qhadam(b1=0.9, b2=0.999, nu1=0.3, nu2=0.6, eps=1e-12)
    state = tx.init(jnp.zeros(2))
    first, state = tx.update(g, state)
    # At t = 1 both bias-corrected moments equal g and g^2, so the update is sign(g) (up to
    # the float32 rounding of 1 - b2).
    np.testing.assert_allclose(first, jnp.sign(g), rtol=1e-5)
    second, _ = tx.update(-g, state)
    m_hat = (0.9 * 0.1 * g + 0.1 * -g) / (1 - 0.9**2)
    v_hat = (0.999 * 0.001 * g**2 + 0.001 * g**2) / (1 - 0.999**2)
    expected = (0.7 * -g + 0.3 * m_hat) / jnp.sqrt(0.4 * g**2 + 0.6 * v_hat)
    np.testing.assert_allclose(second, expected, rtol=1e-5)


def test_qhm_state_is_the_dampened_momentum():
    tx = scale_by_qhm(momentum=0.9, nu=0.7)
    state = tx.init(jnp.zeros(2))
    for g in (jnp.array([1.0, 2.0]), jnp.array([-1.0, 4.0])):
        updates, state = tx.update(g, state)
    np.testing.assert_allclose(state.trace, 0.9 * 0.1 * jnp.array([1.0, 2.0]) + 0.1 * jnp.array([-1.0, 4.0]), rtol=1e-6)
    np.testing.assert_allclose(updates, 0.3 * jnp.array([-1.0, 4.0]) + 0.7 * state.trace, rtol=1e-6)


def test_adabound_with_wide_bounds_is_adam_without_eps():
    # gamma -> 0 opens the bounds to (0, inf); with eps = 0 the reference's step equals Adam's.
    _assert_same(adabound(0.01, final_lr=0.1, gamma=1e-9, eps=0.0), optax.adam(0.01, eps=0.0), 1e-5, steps=20)


def test_adabound_late_steps_are_sgd_with_final_lr():
    tx = scale_by_adabound(learning_rate=1e-3, final_lr=0.05, gamma=0.1, eps=1e-8)
    g = jnp.array([1e-4, -3.0, 200.0])
    state = tx.init(g)._replace(count=jnp.asarray(10**8, jnp.int32))
    updates, state = tx.update(g, state)
    # After many steps both bounds are final_lr, whatever Adam's own step size would be.
    np.testing.assert_allclose(updates, -0.05 * state.mu, rtol=1e-6)


def test_adabound_bounds_follow_the_schedule_and_base_learning_rate():
    g = jnp.array([1e-4, 200.0])

    def late_update(**kwargs):
        tx = scale_by_adabound(final_lr=0.05, gamma=0.1, **kwargs)
        state = tx.init(g)._replace(count=jnp.asarray(10**8, jnp.int32))
        updates, state = tx.update(g, state)
        return updates / -state.mu

    np.testing.assert_allclose(late_update(learning_rate=lambda count: jnp.where(count < 10, 1e-3, 5e-4)), 0.025, rtol=1e-6)
    ramp = lambda count: 1e-3 * count / 10**8  # noqa: E731 - starts at 0, so it needs base_learning_rate
    np.testing.assert_allclose(late_update(learning_rate=ramp, base_learning_rate=2e-3), 0.025, rtol=1e-6)


def test_amsbound_keeps_the_running_maximum():
    tx = scale_by_adabound(amsbound=True)
    state = tx.init(jnp.zeros(2))
    _, state = tx.update(jnp.array([3.0, 0.0]), state)
    peak = state.nu_max
    _, state = tx.update(jnp.array([0.0, 1.0]), state)
    np.testing.assert_array_equal(state.nu_max, jnp.maximum(peak, state.nu))
    assert float(state.nu_max[0]) == float(peak[0]) > float(state.nu[0])


def test_masked_weight_decay():
    params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    grads = {"w": jnp.zeros(2), "b": jnp.zeros(2)}
    for factory in (qhm, qhadamw):
        tx = factory(0.1, weight_decay=0.5, mask={"w": True, "b": False})
        updates, _ = tx.update(grads, tx.init(params), params)
        assert float(jnp.max(jnp.abs(updates["b"]))) == 0.0 and float(jnp.min(jnp.abs(updates["w"]))) > 0.0


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: scale_by_qhm(nu=1.5), r"scale_by_qhm: nu must be in \[0, 1\], got 1.5"),
        (lambda: qhm(0.1, momentum=1.0), r"qhm: momentum must be in \[0, 1\), got 1.0"),
        (lambda: qhm(-0.1), r"qhm: learning_rate must be >= 0, got -0.1"),
        (lambda: scale_by_qhadam(nu1=-0.1), r"scale_by_qhadam: nu1 must be in \[0, 1\], got -0.1"),
        (lambda: scale_by_qhadam(eps=0.0), r"scale_by_qhadam: eps must be > 0, got 0.0"),
        (lambda: qhadam(0.1, nu2=2.0), r"qhadam: nu2 must be in \[0, 1\], got 2.0"),
        (lambda: qhadamw(0.1, b1=1.0), r"qhadamw: b1 must be in \[0, 1\), got 1.0"),
        (lambda: qhadamw(0.1, weight_decay=-1.0), r"qhadamw: weight_decay must be >= 0, got -1.0"),
        (lambda: adabound(final_lr=0.0), r"adabound: final_lr must be > 0, got 0.0"),
        (lambda: adabound(gamma=0.0), r"adabound: gamma must be in \(0, 1\), got 0.0"),
        (lambda: amsbound(gamma=1.0), r"amsbound: gamma must be in \(0, 1\), got 1.0"),
        (lambda: amsbound(b2=1.0), r"amsbound: b2 must be in \[0, 1\), got 1.0"),
        (lambda: adabound(learning_rate=0.0), r"adabound: learning_rate must be > 0, got 0.0"),
        (lambda: scale_by_adabound(eps=-1.0), r"scale_by_adabound: eps must be >= 0, got -1.0"),
        (lambda: adabound(lambda count: 1e-3 * count), r"adabound: learning_rate\(0\) must be > 0 .* base_learning_rate"),
        (lambda: adabound(lambda count: 1e-3, base_learning_rate=0.0), r"adabound: base_learning_rate must be > 0, got 0.0"),
    ],
)
def test_invalid_hyperparameters_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()
