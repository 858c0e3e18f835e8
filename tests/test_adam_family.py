"""The Adam family (Adam/NAdam/AdamW, AMSGrad, RAdam, Adamax, LAMB, AdaBelief, Yogi) against Optax."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradtx.optimizers.adabelief import adabelief, scale_by_belief
from gradtx.optimizers.adam import adam, adamw, nadam, nadamw, scale_by_adam
from gradtx.optimizers.adamax import adamax, adamaxw, scale_by_adamax
from gradtx.optimizers.amsgrad import amsgrad, scale_by_amsgrad
from gradtx.optimizers.lamb import lamb
from gradtx.optimizers.radam import radam, scale_by_radam
from gradtx.optimizers.yogi import scale_by_yogi, yogi

STEPS = 50
RTOL = 1e-5

OURS = {
    f.__name__: f
    for f in (
        scale_by_adam, adam, adamw, nadam, nadamw, scale_by_amsgrad, amsgrad, scale_by_radam, radam,
        scale_by_adamax, adamax, adamaxw, lamb, scale_by_belief, adabelief, scale_by_yogi, yogi,
    )
}


def problem(dtype=jnp.float32):
    """Parameters of a few shapes and ``STEPS`` fixed random gradients (stacked on a leading axis)."""
    rng = np.random.default_rng(0)
    shapes = {"w": (4, 3), "b": (3,), "s": ()}

    def draw(shape):
        x = rng.normal(size=shape)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            x = x + 1j * rng.normal(size=shape)
        return jnp.asarray(x, dtype)

    params = {k: draw(s) for k, s in shapes.items()}
    grads = {k: draw((STEPS, *s)) for k, s in shapes.items()}
    return params, grads


def trajectories(params, grads, *txs):
    """For each transformation, ``STEPS`` steps applying the updates: (stacked updates, final params, final state).

    All of them run in one jitted program (one compilation per test).
    """

    def run(tx, params):
        def step(carry, g):
            p, s = carry
            u, s = tx.update(g, s, p)
            return (jax.tree.map(lambda a, b: (a + b).astype(a.dtype), p, u), s), u

        (params, state), updates = jax.lax.scan(step, (params, tx.init(params)), grads)
        return updates, params, state

    return jax.jit(lambda p: [run(tx, p) for tx in txs])(params)


def assert_relative_close(actual, expected, rtol=RTOL):
    """Leaf by leaf: max |a - b| <= rtol * max |b|."""
    actual, expected = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        assert a.shape == b.shape
        a, b = np.asarray(a, np.complex128), np.asarray(b, np.complex128)
        difference = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
        assert difference <= rtol, f"relative difference {difference:.2e} > {rtol:.0e}"


def _wd_mask(params):
    return jax.tree.map(lambda x: jnp.ndim(x) > 1, params)


BUILDING_BLOCKS = [
    ("scale_by_adam", {}),
    ("scale_by_adam", {"b1": 0.8, "b2": 0.99, "eps_root": 1e-8}),
    ("scale_by_adam", {"nesterov": True}),
    ("scale_by_amsgrad", {}),
    ("scale_by_amsgrad", {"eps_root": 1e-8, "bias_correction_mu": False, "bias_correction_nu": False}),
    ("scale_by_radam", {}),
    ("scale_by_radam", {"threshold": 6.0, "eps_root": 1e-8, "nesterov": True}),
    ("scale_by_adamax", {"b2": 0.99}),
    ("scale_by_belief", {}),
    ("scale_by_belief", {"b1": 0.8, "eps": 1e-8, "nesterov": True}),
    ("scale_by_yogi", {}),
    ("scale_by_yogi", {"eps_root": 1e-8, "initial_accumulator_value": 0.1}),
]

ALIASES = [
    ("adam", {"learning_rate": 0.01}),
    ("adam", {"learning_rate": optax.linear_schedule(0.02, 0.001, STEPS), "eps_root": 1e-8, "nesterov": True}),
    ("adamw", {"learning_rate": 0.01, "weight_decay": 0.1, "mask": _wd_mask}),
    ("adamw", {"learning_rate": optax.linear_schedule(0.02, 0.0, STEPS), "weight_decay": optax.linear_schedule(0.1, 0.0, STEPS)}),
    ("adamw", {"learning_rate": 0.01, "weight_decay": 0.1, "mask": {"w": True, "b": False, "s": False}, "nesterov": True}),
    ("nadam", {"learning_rate": 0.01, "b1": 0.8}),
    ("nadamw", {"learning_rate": 0.01, "weight_decay": 0.05, "mask": _wd_mask}),
    ("amsgrad", {"learning_rate": optax.linear_schedule(0.02, 0.001, STEPS)}),
    ("radam", {"learning_rate": 0.01, "threshold": 4.5}),
    ("adamax", {"learning_rate": 0.01}),
    ("adamaxw", {"learning_rate": 0.01, "weight_decay": 0.1, "mask": _wd_mask}),
    ("lamb", {"learning_rate": 0.01}),
    ("lamb", {"learning_rate": optax.linear_schedule(0.02, 0.001, STEPS), "weight_decay": 0.01, "mask": _wd_mask}),
    ("adabelief", {"learning_rate": 0.01, "nesterov": True}),
    ("yogi", {"learning_rate": 0.01, "b2": 0.99}),
]


def _case_id(case):
    name, kwargs = case
    return name + "".join(f"-{k}" for k in kwargs if k != "learning_rate")


@pytest.mark.parametrize("case", BUILDING_BLOCKS, ids=_case_id)
def test_building_block_matches_optax(case):
    name, kwargs = case
    ours, theirs = trajectories(*problem(), OURS[name](**kwargs), getattr(optax, name)(**kwargs))
    assert_relative_close(ours[0], theirs[0])
    assert_relative_close(ours[1], theirs[1])
    assert_relative_close(ours[2], theirs[2])  # same field order: count, mu, nu(, nu_max)


@pytest.mark.parametrize("case", ALIASES, ids=_case_id)
def test_alias_matches_optax(case):
    name, kwargs = case
    ours, theirs = trajectories(*problem(), OURS[name](**kwargs), getattr(optax, name)(**kwargs))
    assert_relative_close(ours[0], theirs[0])
    assert_relative_close(ours[1], theirs[1])


@pytest.mark.parametrize("name", ["scale_by_adam", "scale_by_belief", "scale_by_yogi"])
def test_complex_parameters_match_optax(name):
    (updates, _, state), (theirs, _, _) = trajectories(*problem(jnp.complex64), OURS[name](), getattr(optax, name)())
    assert_relative_close(updates, theirs)
    assert all(x.dtype == jnp.complex64 for x in jax.tree.leaves((updates, state.mu, state.nu)))


def test_signatures_match_optax():
    """Same names, order, defaults and keyword-only-ness as Optax 0.2.8, plus gradtx's ``nu_dtype`` and ``state_dtype``."""
    for name, ours in OURS.items():
        theirs = inspect.signature(getattr(optax, name)).parameters
        # Optax's nadam/nadamw are functools.partial(..., nesterov=True): the flag is fixed, not an option.
        theirs = [(p.name, p.kind, p.default) for p in theirs.values() if not (name.startswith("nadam") and p.name == "nesterov")]
        mine = [(p.name, p.kind, p.default) for p in inspect.signature(ours).parameters.values() if p.name not in ("nu_dtype", "state_dtype")]
        assert mine == theirs, name


def test_narrow_moment_dtypes():
    """``mu_dtype`` / ``nu_dtype`` set the storage of each moment; updates keep the gradient's dtype."""
    params, grads = problem()
    cases = {
        (jnp.bfloat16, jnp.float32): scale_by_adam(mu_dtype=jnp.bfloat16),
        (jnp.float32, jnp.bfloat16): scale_by_adam(nu_dtype=jnp.bfloat16),
        (jnp.bfloat16, jnp.bfloat16): scale_by_adam(mu_dtype="bfloat16", nu_dtype=jnp.bfloat16),
    }
    reference, *runs = trajectories(params, grads, scale_by_adam(), *cases.values())
    for (mu_dtype, nu_dtype), tx, (updates, _, state) in zip(cases, cases.values(), runs):
        for moments in (tx.init(params), state):
            assert all(x.dtype == mu_dtype for x in jax.tree.leaves(moments.mu))
            assert all(x.dtype == nu_dtype for x in jax.tree.leaves(moments.nu))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(updates))
        # Narrow storage costs ~3 significant digits of the moments, not the direction of the step.
        assert_relative_close(updates, reference[0], rtol=3e-2)


def test_narrow_first_moment_is_updated_in_float32():
    """Optax multiplies a bfloat16 ``mu`` by ``b1`` in bfloat16; gradtx upcasts it first, so it tracks float32 Adam closer."""
    reference, ours, theirs = trajectories(
        *problem(), scale_by_adam(), scale_by_adam(mu_dtype=jnp.bfloat16), optax.scale_by_adam(mu_dtype=jnp.bfloat16)
    )

    def error(run):
        return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(run[0]), jax.tree.leaves(reference[0])))

    assert error(ours) < error(theirs)


@pytest.mark.parametrize("name", ["adam", "amsgrad"])
def test_alias_mu_dtype_matches_optax_loosely(name):
    kwargs = {"learning_rate": 0.01, "mu_dtype": jnp.bfloat16}
    ours, theirs = trajectories(*problem(), OURS[name](**kwargs), getattr(optax, name)(**kwargs))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ours[2][0].mu))
    assert_relative_close(ours[0], theirs[0], rtol=3e-2)


def test_bfloat16_parameters_keep_their_dtype_and_are_computed_in_float32():
    params, grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), problem())
    [(updates, new_params, state)] = trajectories(params, grads, scale_by_adam())
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((updates, new_params, state.mu, state.nu)))
    [(reference, _, _)] = trajectories(*jax.tree.map(lambda x: x.astype(jnp.float32), (params, grads)), scale_by_adam())
    assert_relative_close(updates, reference, rtol=3e-2)


def test_radam_threshold_below_four_never_yields_nan():
    """Optax's RAdam returns NaN where threshold <= rho_t < 4 (step 4 for b2 = 0.999); gradtx takes the momentum step."""
    (updates, _, _), (default, _, _), (theirs, _, _) = trajectories(
        *problem(), scale_by_radam(threshold=3.0), scale_by_radam(), optax.scale_by_radam(threshold=3.0)
    )
    assert bool(jnp.isnan(theirs["w"][3]).all())
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(updates))
    # Steps 1-4 (rho_t < 4) are bias-corrected momentum, as with the default threshold.
    assert_relative_close(jax.tree.map(lambda x: x[:4], updates), jax.tree.map(lambda x: x[:4], default))


def test_none_leaves_pass_through_and_abstract_params_initialise():
    params = {"w": jnp.ones((2, 3)), "frozen": None}
    grads = {"w": jnp.full((2, 3), 0.5), "frozen": None}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    for tx in (adamw(0.1), amsgrad(0.1), radam(0.1), adamax(0.1), lamb(0.1), adabelief(0.1), yogi(0.1)):
        updates, _ = tx.update(grads, tx.init(params), params)
        assert updates["frozen"] is None and updates["w"].shape == (2, 3)
        assert jax.tree.structure(tx.init(abstract)) == jax.tree.structure(tx.init(params))


def test_extra_arguments_are_accepted():
    params, grads = problem()
    grads = jax.tree.map(lambda g: g[0], grads)
    for name, kwargs in BUILDING_BLOCKS:
        tx = OURS[name](**kwargs)
        updates, _ = tx.update(grads, tx.init(params), params, loss=1.0)
        assert jax.tree.structure(updates) == jax.tree.structure(params)


@pytest.mark.parametrize(
    "name, kwargs, error, message",
    [
        ("adam", {"learning_rate": 0.1, "b1": 1.0}, ValueError, r"adam: b1 must be in \[0, 1\), got 1.0"),
        ("adam", {"learning_rate": 0.1, "b2": -0.1}, ValueError, r"adam: b2 must be in \[0, 1\), got -0.1"),
        ("adam", {"learning_rate": 0.1, "eps": 0.0}, ValueError, r"adam: eps must be > 0, got 0.0"),
        ("adam", {"learning_rate": -0.1}, ValueError, r"adam: learning_rate must be >= 0, got -0.1"),
        ("adam", {"learning_rate": "fast"}, TypeError, r"adam: learning_rate must be a real number or a schedule"),
        ("adam", {"learning_rate": 0.1, "mu_dtype": jnp.int32}, ValueError, r"adam: mu_dtype must be None or a floating dtype"),
        ("adam", {"learning_rate": 0.1, "eps_root": -1e-8}, ValueError, r"adam: eps_root must be >= 0"),
        ("scale_by_adam", {"nu_dtype": "int8"}, ValueError, r"scale_by_adam: nu_dtype must be None or a floating dtype"),
        ("scale_by_adam", {"nesterov": "yes"}, ValueError, r"scale_by_adam: nesterov must be one of"),
        ("adamw", {"learning_rate": 0.1, "weight_decay": -1e-4}, ValueError, r"adamw: weight_decay must be >= 0, got -0.0001"),
        ("nadam", {"learning_rate": 0.1, "b1": 1.0}, ValueError, r"nadam: b1 must be in \[0, 1\)"),
        ("nadamw", {"learning_rate": 0.1, "weight_decay": -1.0}, ValueError, r"nadamw: weight_decay must be >= 0"),
        ("amsgrad", {"learning_rate": 0.1, "eps": 0.0}, ValueError, r"amsgrad: eps must be > 0"),
        ("scale_by_amsgrad", {"b2": 1.0}, ValueError, r"scale_by_amsgrad: b2 must be in \[0, 1\)"),
        ("radam", {"learning_rate": -1.0}, ValueError, r"radam: learning_rate must be >= 0"),
        ("scale_by_radam", {"threshold": float("nan")}, ValueError, r"scale_by_radam: threshold must be finite"),
        ("adamax", {"learning_rate": 0.1, "b1": 1.0}, ValueError, r"adamax: b1 must be in \[0, 1\)"),
        ("adamaxw", {"learning_rate": 0.1, "weight_decay": -0.1}, ValueError, r"adamaxw: weight_decay must be >= 0"),
        ("lamb", {"learning_rate": 0.1, "weight_decay": -0.1}, ValueError, r"lamb: weight_decay must be >= 0"),
        ("lamb", {"learning_rate": 0.1, "b2": -0.1}, ValueError, r"lamb: b2 must be in \[0, 1\)"),
        ("adabelief", {"learning_rate": 0.1, "eps": 0.0}, ValueError, r"adabelief: eps must be > 0"),
        ("scale_by_belief", {"eps_root": -1.0}, ValueError, r"scale_by_belief: eps_root must be >= 0"),
        ("yogi", {"learning_rate": 0.1, "b1": 1.0}, ValueError, r"yogi: b1 must be in \[0, 1\)"),
        ("scale_by_yogi", {"initial_accumulator_value": -1.0}, ValueError,
         r"scale_by_yogi: initial_accumulator_value must be >= 0"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.isidentifier() else None,
)
def test_invalid_hyperparameters_are_rejected(name, kwargs, error, message):
    with pytest.raises(error, match=message):
        OURS[name](**kwargs)


def test_schedules_are_accepted_without_range_checks():
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    for alias in (adamw, nadamw, adamaxw, lamb):
        tx = alias(schedule, weight_decay=schedule)
        params = {"w": jnp.ones(3)}
        updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
        assert bool(jnp.all(updates["w"] < 0))
