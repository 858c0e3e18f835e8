"""Schedules and schedule combinators: parity with Optax, closed forms, validation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradtx import schedules as gs

STEPS = 160
COUNTS = np.arange(STEPS)
INT32_MAX = int(np.iinfo(np.int32).max)

SGDR_CYCLES = [
    dict(init_value=0.0, peak_value=1.0, warmup_steps=5, decay_steps=30),
    dict(init_value=0.1, peak_value=0.5, warmup_steps=0, decay_steps=40, end_value=0.01),
    dict(init_value=0.0, peak_value=0.3, warmup_steps=10, decay_steps=50, exponent=2.0),
]


def _join_case(lib):
    parts = [lib.linear_schedule(1.0, 0.5, 20), lib.cosine_decay_schedule(0.5, 50), lib.constant_schedule(0.1)]
    return lib.join_schedules(parts, [20, 70])


# name -> (arguments, or a callable building the schedule from a library); the same call on
# gradtx and on Optax must give the same values.
PARITY = {
    "constant_schedule": [(5,), (0.1,)],
    "linear_schedule": [(1.0, 0.1, 100), (0.5, 2.0, 50, 20), (3, 0, 7)],
    "polynomial_schedule": [(1.0, 0.01, 2, 100), (1.0, 0.0, 0.5, 60, 30), (0.1, 1.0, 3, 40, 5)],
    "exponential_decay": [
        (1.0, 10, 0.9),
        (1.0, 7, 0.5, 20, True),
        (0.5, 5, 0.8, 0, False, 0.1),
        (0.01, 10, 1.5, 5, True, 0.1),
    ],
    "piecewise_constant_schedule": [(1.0, {30: 0.1, 60: 0.1}), (0.5, None), (2.0, {0: 0.5, 100: 2.0, 50: 0.3})],
    "piecewise_interpolate_schedule": [
        ("linear", 1.0, {40: 0.1, 80: 0.01}),
        ("cosine", 2.0, {10: 3.0, 90: 0.1}),
        ("linear", 1.0, None),
    ],
    "cosine_decay_schedule": [(1.0, 100), (0.5, 80, 0.1), (1.0, 60, 0.2, 2.0), (2, 90, 0.0, 0.5)],
    "warmup_constant_schedule": [(0.0, 1.0, 25), (0.5, 0.1, 10)],
    "warmup_cosine_decay_schedule": [
        (0.0, 1.0, 10, 100),
        (0.1, 1.0, 20, 100, 0.05),
        (0.0, 0.5, 0, 50, 0.01, 2.0),
        (1e-3, 3e-3, 15, 90, 1e-4, 0.7),
    ],
    "warmup_exponential_decay_schedule": [(0.0, 1.0, 10, 10, 0.9), (0.1, 1.0, 20, 7, 0.5, 10, True, 0.05)],
    "linear_onecycle_schedule": [(100, 1.0), (120, 0.01, 0.25, 0.7, 10.0, 100.0)],
    "cosine_onecycle_schedule": [(100, 1.0), (150, 0.3, 0.4, 5.0, 50.0)],
    "sgdr_schedule": [(SGDR_CYCLES,)],
    "join_schedules": [_join_case],
}
PARITY_CASES = [
    (f"{name}{index}", name, args) for name, calls in PARITY.items() for index, args in enumerate(calls)
]


def _build(lib, name, args):
    return args(lib) if callable(args) else getattr(lib, name)(*args)


# Schedules Optax lacks, with the step after which they must not increase.
OWN = {
    "inverse_time_decay": (gs.inverse_time_decay(0.5, 0.3, 10), 0),
    "inverse_time_decay_staircase": (gs.inverse_time_decay(0.5, 2.0, 7, staircase=True), 0),
    "inverse_sqrt_schedule": (gs.inverse_sqrt_schedule(2.0, 10), 10),
    "inverse_sqrt_schedule_init": (gs.inverse_sqrt_schedule(2.0, 16, init_value=0.5), 16),
    "cosine_warm_restarts_t2": (gs.cosine_warm_restarts_schedule(1.0, 10, t_mult=2.0), None),
    "cosine_warm_restarts_t1": (gs.cosine_warm_restarts_schedule(0.5, 12, alpha=0.1), None),
    "cosine_warm_restarts_t15": (gs.cosine_warm_restarts_schedule(1.0, 10, t_mult=1.5), None),
    "cosine_warm_restarts_m": (gs.cosine_warm_restarts_schedule(2.0, 10, 2.0, alpha=0.1, m_mult=0.5), None),
    "with_warmup": (gs.with_warmup(gs.exponential_decay(1.0, 5, 0.5), 10, init_value=0.1), 10),
    "repeat_schedule": (gs.repeat_schedule(gs.linear_schedule(1.0, 0.0, 10), 10), None),
    "scale_schedule": (gs.scale_schedule(gs.cosine_decay_schedule(1.0, 100), 3.0), 0),
    "clamp_schedule": (gs.clamp_schedule(gs.linear_schedule(1.0, 0.0, 100), 0.2, 0.7), 0),
}

# Where each Optax-parity schedule has finished warming up (None: not monotone).
MONOTONE_AFTER = {
    "linear_schedule0": 0, "linear_schedule2": 0, "polynomial_schedule0": 0, "polynomial_schedule1": 0,
    "exponential_decay0": 0, "exponential_decay1": 0, "exponential_decay2": 0, "piecewise_constant_schedule0": 0,
    "piecewise_interpolate_schedule0": 0, "cosine_decay_schedule0": 0, "cosine_decay_schedule1": 0,
    "cosine_decay_schedule2": 0, "cosine_decay_schedule3": 0, "warmup_cosine_decay_schedule0": 10,
    "warmup_cosine_decay_schedule1": 20, "warmup_cosine_decay_schedule2": 0, "warmup_cosine_decay_schedule3": 15,
    "warmup_exponential_decay_schedule0": 10, "warmup_exponential_decay_schedule1": 20,
    "linear_onecycle_schedule0": 30, "linear_onecycle_schedule1": 30, "cosine_onecycle_schedule0": 30,
    "cosine_onecycle_schedule1": 60,
}


def _evaluate(schedules):
    """Every schedule at every count, in one compilation: a ``(len(schedules), STEPS)`` array."""
    evaluate_all = jax.jit(lambda c: jnp.stack([jnp.asarray(jax.vmap(s)(c), jnp.float32) for s in schedules]))
    return np.asarray(evaluate_all(COUNTS))


@pytest.fixture(scope="module")
def parity_values():
    ours = [_build(gs, name, args) for _, name, args in PARITY_CASES]
    theirs = [_build(optax, name, args) for _, name, args in PARITY_CASES]
    ids = [case_id for case_id, _, _ in PARITY_CASES]
    return dict(zip(ids, _evaluate(ours))), dict(zip(ids, _evaluate(theirs)))


@pytest.fixture(scope="module")
def own_values():
    return dict(zip(OWN, _evaluate([schedule for schedule, _ in OWN.values()])))


@pytest.mark.parametrize("case_id", [case_id for case_id, _, _ in PARITY_CASES])
def test_parity_with_optax(parity_values, case_id):
    ours, theirs = parity_values
    ours, theirs = ours[case_id], theirs[case_id]
    assert np.all(np.isfinite(ours))
    # Compiled, Optax's polynomial with a fractional power is NaN at the end (see polynomial_schedule).
    finite = np.isfinite(theirs)
    # Near the end of a decay both values are differences of numbers of the order of the
    # peak, exact only to a float32 ulp of the peak: hence the absolute part.
    atol = 2e-7 * np.max(np.abs(theirs[finite]))
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=atol)


ALL_SCHEDULES = [(case_id, name, args) for case_id, name, args in PARITY_CASES] + [(n, None, None) for n in OWN]


@pytest.mark.parametrize("case_id,name,args", ALL_SCHEDULES, ids=[case[0] for case in ALL_SCHEDULES])
def test_float32_scalar_and_finite_everywhere(case_id, name, args):
    schedule = OWN[case_id][0] if name is None else _build(gs, name, args)
    for count in (0, 3, jnp.int32(INT32_MAX)):
        value = schedule(count)
        assert isinstance(value, jax.Array) and value.dtype == jnp.float32 and value.shape == ()
        assert np.isfinite(value)
    assert schedule(jnp.arange(4)).shape == (4,)


def test_decays_do_not_increase_after_warmup(parity_values, own_values):
    ours, _ = parity_values
    curves = {case_id: (ours[case_id], start) for case_id, start in MONOTONE_AFTER.items()}
    curves.update({name: (own_values[name], start) for name, (_, start) in OWN.items() if start is not None})
    for case_id, (values, start) in curves.items():
        assert np.all(np.diff(values[start:]) <= 0), case_id
        assert values[start] > values[-1], case_id


def test_inverse_time_decay_closed_form(own_values):
    t = COUNTS.astype(np.float64)
    np.testing.assert_allclose(own_values["inverse_time_decay"], 0.5 / (1 + 0.3 * t / 10), rtol=1e-6)
    np.testing.assert_allclose(own_values["inverse_time_decay_staircase"], 0.5 / (1 + 2.0 * (t // 7)), rtol=1e-6)


def test_inverse_sqrt_closed_form(own_values):
    t = COUNTS.astype(np.float64)
    vaswani = 2.0 * np.minimum(t / 10, np.sqrt(10 / np.maximum(t, 1)))
    np.testing.assert_allclose(own_values["inverse_sqrt_schedule"], vaswani, rtol=1e-6)
    assert own_values["inverse_sqrt_schedule"][0] == 0 and own_values["inverse_sqrt_schedule"][10] == 2.0
    fairseq = np.where(t < 16, 0.5 + 1.5 * t / 16, 2.0 * np.sqrt(16 / np.maximum(t, 1)))
    np.testing.assert_allclose(own_values["inverse_sqrt_schedule_init"], fairseq, rtol=1e-6)


def _restarts_reference(init_value, starts, alpha=0.0, m_mult=1.0):
    """SGDR in float64 from an explicit list of restart steps."""
    values = []
    for t in COUNTS:
        cycle = max(i for i, start in enumerate(starts) if start <= t)
        fraction = (t - starts[cycle]) / (starts[cycle + 1] - starts[cycle])
        values.append(init_value * m_mult**cycle * (alpha + (1 - alpha) * 0.5 * (1 + math.cos(math.pi * fraction))))
    return np.array(values)


def _jumps(values):
    return list(np.flatnonzero(np.diff(values) > 0) + 1)


def test_cosine_warm_restarts_doubling_periods(own_values):
    values = own_values["cosine_warm_restarts_t2"]
    # Restarts at T0, T0 + 2 T0, T0 + 2 T0 + 4 T0, ...: steps 10, 30, 70, 150.
    assert _jumps(values) == [10, 30, 70, 150]
    assert np.all(values[[0, 10, 30, 70, 150]] == 1.0)
    assert np.all(values[[9, 29, 69, 149]] < 0.03)
    np.testing.assert_allclose(values, _restarts_reference(1.0, [0, 10, 30, 70, 150, 310]), rtol=1e-5, atol=1e-6)
    # Within the cycle of length 40 from step 30, the value is half a cosine.
    k = np.arange(40)
    np.testing.assert_allclose(values[30:70], 0.5 * (1 + np.cos(np.pi * k / 40)), rtol=1e-5, atol=1e-6)


def test_cosine_warm_restarts_non_integer_multiplier_rounds_restart_steps(own_values):
    # round(10 (1.5^i - 1) / 0.5): 10, 25, 47.5 -> 48, 81.25 -> 81, 131.875 -> 132.
    values = own_values["cosine_warm_restarts_t15"]
    assert _jumps(values) == [10, 25, 48, 81, 132]
    np.testing.assert_allclose(values, _restarts_reference(1.0, [0, 10, 25, 48, 81, 132, 208]), rtol=1e-5, atol=1e-6)


def test_cosine_warm_restarts_peak_decay(own_values):
    values = own_values["cosine_warm_restarts_m"]
    np.testing.assert_allclose(values[[0, 10, 30, 70, 150]], 2.0 * 0.5 ** np.arange(5), rtol=1e-6)
    reference = _restarts_reference(2.0, [0, 10, 30, 70, 150, 310], alpha=0.1, m_mult=0.5)
    np.testing.assert_allclose(values, reference, rtol=1e-5)


def test_cosine_warm_restarts_constant_period_is_a_periodic_cosine(own_values):
    periodic = gs.repeat_schedule(gs.cosine_decay_schedule(0.5, 12, alpha=0.1), 12)
    values = own_values["cosine_warm_restarts_t1"]
    np.testing.assert_allclose(values, np.asarray(jax.vmap(periodic)(COUNTS)), rtol=1e-6)
    np.testing.assert_allclose(values, _restarts_reference(0.5, list(range(0, 200, 12)), alpha=0.1), rtol=1e-5)
    assert _jumps(values) == list(range(12, STEPS, 12))


def test_cosine_warm_restarts_at_the_largest_counts():
    schedule = gs.cosine_warm_restarts_schedule(1.0, 2**30, t_mult=2.0)
    counts = jnp.array([0, 2**30 - 1, 2**30, INT32_MAX], jnp.int32)
    np.testing.assert_allclose(jax.jit(schedule)(counts), [1.0, 0.0, 1.0, 0.5], atol=1e-6)


def test_join_schedules_restarts_each_schedule_at_its_boundary():
    joined = gs.join_schedules([gs.linear_schedule(1.0, 0.0, 10), gs.linear_schedule(2.0, 1.0, 10)], [5])
    values = np.asarray(joined(jnp.arange(20)))
    np.testing.assert_allclose(values[:5], 1.0 - np.arange(5) / 10, rtol=1e-6)
    np.testing.assert_allclose(values[5:15], 2.0 - np.arange(10) / 10, rtol=1e-6)
    np.testing.assert_allclose(values[15:], 1.0)


def test_join_schedules_accepts_optax_schedules():
    joined = gs.join_schedules([optax.constant_schedule(1), optax.linear_schedule(0.5, 0.0, 5)], [3])
    values = joined(jnp.arange(6))
    assert values.dtype == jnp.float32
    np.testing.assert_allclose(values, [1.0, 1.0, 1.0, 0.5, 0.4, 0.3], rtol=1e-6)


def test_with_warmup_ramps_to_the_first_value_then_shifts(own_values):
    t = COUNTS.astype(np.float64)
    expected = np.where(t < 10, 0.1 + 0.9 * t / 10, 0.5 ** ((t - 10) / 5))
    np.testing.assert_allclose(own_values["with_warmup"], expected, rtol=1e-6)
    cosine = gs.cosine_decay_schedule(1.0, 30, alpha=0.05)
    np.testing.assert_allclose(gs.with_warmup(cosine, 0)(jnp.arange(40)), cosine(jnp.arange(40)))
    # With the peak as the schedule's first value, warmup + cosine is warmup_cosine_decay_schedule.
    warmed = gs.with_warmup(cosine, 10, init_value=0.2)(jnp.arange(60))
    expected = gs.warmup_cosine_decay_schedule(0.2, 1.0, 10, 40, 0.05)(jnp.arange(60))
    np.testing.assert_allclose(warmed, expected, rtol=1e-6)


def test_repeat_scale_and_clamp(own_values):
    t = COUNTS.astype(np.float64)
    np.testing.assert_allclose(own_values["repeat_schedule"], 1.0 - (t % 10) / 10, rtol=1e-6, atol=1e-7)
    cosine = np.asarray(jax.vmap(gs.cosine_decay_schedule(1.0, 100))(COUNTS))
    np.testing.assert_allclose(own_values["scale_schedule"], 3.0 * cosine, rtol=1e-6, atol=1e-6)
    clamped = np.clip(1.0 - np.minimum(t, 100) / 100, 0.2, 0.7)
    np.testing.assert_allclose(own_values["clamp_schedule"], clamped, rtol=1e-6)


def test_traced_values_build_schedules_inside_vmap():
    peaks = jnp.array([1.0, 2.0, 4.0])
    values = jax.vmap(lambda peak: gs.warmup_cosine_decay_schedule(0.0, peak, 10, 100)(5))(peaks)
    np.testing.assert_allclose(values, 0.5 * peaks, rtol=1e-6)
    values = jax.vmap(lambda peak: gs.cosine_warm_restarts_schedule(peak, 10, 2.0)(30))(peaks)
    np.testing.assert_allclose(values, peaks, rtol=1e-6)


ONE = gs.constant_schedule(1.0)
NO_DECAY_STEPS = dict(init_value=0.0, peak_value=1.0, warmup_steps=0, decay_steps=0)

# (function, positional arguments, error, message after "function: ").
VALIDATION = [
    ("constant_schedule", ("1",), TypeError, "value must be a real number"),
    ("linear_schedule", (1.0, 0.0, 0), ValueError, "transition_steps must be an integer >= 1, got 0"),
    ("linear_schedule", (1.0, 0.0, 10, -1), ValueError, "transition_begin must be an integer >= 0, got -1"),
    ("polynomial_schedule", (1.0, 0.0, 0.0, 10), ValueError, "power must be > 0, got 0.0"),
    ("polynomial_schedule", (1.0, 0.0, 1.0, 2.5), ValueError, "transition_steps must be an integer >= 1, got 2.5"),
    ("exponential_decay", (1.0, 10, 0.0), ValueError, "decay_rate must be > 0, got 0.0"),
    ("exponential_decay", (1.0, -5, 0.5), ValueError, "transition_steps must be an integer >= 1, got -5"),
    ("exponential_decay", (1.0, 5, 0.5, 0, "yes"), ValueError, "staircase must be one of"),
    ("piecewise_constant_schedule", (1.0, {10: -0.1}), ValueError, r"boundaries_and_scales\[10\] must be >= 0, got -0.1"),
    ("piecewise_constant_schedule", (1.0, {-3: 0.1}), ValueError, "every step in boundaries_and_scales must be an integer >= 0"),
    ("piecewise_constant_schedule", (1.0, [(10, 0.1)]), TypeError, "boundaries_and_scales must be a dict"),
    ("piecewise_interpolate_schedule", ("cubic", 1.0), ValueError, r"interpolate_type must be one of \('linear', 'cosine'\)"),
    ("cosine_decay_schedule", (1.0, 0), ValueError, "decay_steps must be an integer >= 1, got 0"),
    ("cosine_decay_schedule", (1.0, 10, 0.0, -1.0), ValueError, "exponent must be > 0, got -1.0"),
    ("warmup_constant_schedule", (0.0, 1.0, -1), ValueError, "warmup_steps must be an integer >= 0, got -1"),
    ("warmup_cosine_decay_schedule", (0.0, 1.0, 10, 10), ValueError, "decay_steps must be an integer > warmup_steps = 10, got 1"),
    ("warmup_exponential_decay_schedule", (0.0, 1.0, 10, 10, -0.5), ValueError, "decay_rate must be > 0, got -0.5"),
    ("linear_onecycle_schedule", (0, 1.0), ValueError, "transition_steps must be an integer >= 1, got 0"),
    ("linear_onecycle_schedule", (100, 1.0, 1.0), ValueError, r"pct_start must be in \(0, 1\), got 1.0"),
    ("linear_onecycle_schedule", (100, 1.0, 0.5, 0.4), ValueError, r"pct_final must be in \(0.5, 1\], got 0.4"),
    ("cosine_onecycle_schedule", (100, 1.0, 0.0), ValueError, r"pct_start must be in \(0, 1\), got 0.0"),
    ("cosine_onecycle_schedule", (100, 1.0, 0.3, 0.0), ValueError, "div_factor must be > 0, got 0.0"),
    ("inverse_time_decay", (1.0, 0.0), ValueError, "decay_rate must be > 0, got 0.0"),
    ("inverse_time_decay", (1.0, 0.5, 0), ValueError, "transition_steps must be an integer >= 1, got 0"),
    ("inverse_sqrt_schedule", (1.0, 0), ValueError, "warmup_steps must be an integer >= 1, got 0"),
    ("cosine_warm_restarts_schedule", (1.0, 10, 0.5), ValueError, "t_mult must be >= 1, got 0.5"),
    ("cosine_warm_restarts_schedule", (1.0, 0), ValueError, "first_period must be an integer >= 1, got 0"),
    ("cosine_warm_restarts_schedule", (1.0, 10, 2.0, 0.0, 0.0), ValueError, "m_mult must be > 0, got 0.0"),
    ("cosine_warm_restarts_schedule", (1.0, 10, 1.00001), ValueError, "t_mult must be 1 or give at most 65536 restarts"),
    ("sgdr_schedule", ([],), ValueError, "cosine_kwargs must hold at least one dict"),
    (
        "sgdr_schedule",
        ([NO_DECAY_STEPS],),
        ValueError,
        r"cosine_kwargs\[0\]: warmup_cosine_decay_schedule: decay_steps must be an integer >= 1",
    ),
    ("join_schedules", ([ONE, ONE], []), ValueError, r"boundaries must hold len\(schedules\) - 1 = 1 integers, got \[\]"),
    ("join_schedules", ([ONE, ONE, ONE], [10, 5]), ValueError, r"boundaries must be strictly increasing, got \[10, 5\]"),
    ("join_schedules", ([ONE, 0.5], [10]), TypeError, r"schedules\[1\] must be a schedule"),
    ("join_schedules", ([], []), ValueError, "schedules must hold at least one schedule"),
    ("with_warmup", (ONE, -2), ValueError, "warmup_steps must be an integer >= 0, got -2"),
    ("repeat_schedule", (ONE, 0), ValueError, "period must be an integer >= 1, got 0"),
    ("scale_schedule", (1.0, 2.0), TypeError, "schedule must be a schedule"),
    ("clamp_schedule", (ONE, 0.5, 0.1), ValueError, "max_value must be >= 0.5, got 0.1"),
]


@pytest.mark.parametrize("name,args,error,message", VALIDATION, ids=[f"{case[0]}{i}" for i, case in enumerate(VALIDATION)])
def test_validation_names_function_argument_and_range(name, args, error, message):
    with pytest.raises(error, match=f"^{name}: {message}"):
        getattr(gs, name)(*args)


def test_public_names_are_documented_with_a_reference():
    for name in gs.__all__:
        doc = getattr(gs, name).__doc__
        assert "Returns:" in doc and "References:" in doc and ">>> " in doc, name
