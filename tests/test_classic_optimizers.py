"""Classic optimizers (SGD, AdaGrad, RMSProp, LARS, Lion, NovoGrad, Adafactor) and their building blocks against Optax."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_transforms import assert_relative_close, trajectories

from gradtx.optimizers.adafactor import FactoredState, adafactor, factored_second_moment
from gradtx.optimizers.adagrad import adagrad, scale_by_rss
from gradtx.optimizers.lars import lars
from gradtx.optimizers.lion import lion, scale_by_lion
from gradtx.optimizers.novograd import novograd, scale_by_novograd
from gradtx.optimizers.rmsprop import ScaleByRmsState, rmsprop, scale_by_rms, scale_by_stddev
from gradtx.optimizers.sgd import sgd

STEPS = 30

OURS = {
    f.__name__: f
    for f in (sgd, scale_by_rss, adagrad, scale_by_rms, scale_by_stddev, rmsprop, lars, scale_by_lion, lion,
              scale_by_novograd, novograd, factored_second_moment, adafactor)
}  # fmt: skip
OPTAX_NAME = {"factored_second_moment": "scale_by_factored_rms"}


def optax_fn(name):
    return getattr(optax, OPTAX_NAME.get(name, name))


def problem(dtype=jnp.float32):
    """Parameters of mixed shapes and ``STEPS`` fixed random gradients stacked on a leading axis.

    ``matrix`` and ``kernel`` (along its two largest axes) are factored by Adafactor; ``small``
    has two axes but is too small to be; ``vector`` and ``scalar`` are never factored.
    """
    rng = np.random.default_rng(0)
    shapes = {"matrix": (256, 160), "kernel": (3, 130, 129), "small": (4, 3), "vector": (160,), "scalar": ()}

    def draw(shape):
        x = rng.normal(size=shape)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            x = x + 1j * rng.normal(size=shape)
        return jnp.asarray(x, dtype)

    params = {k: draw(s) for k, s in shapes.items()}
    grads = {k: draw((STEPS, *s)) for k, s in shapes.items()}
    return params, grads


def _no_bias(params):
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


_schedule = optax.linear_schedule(0.02, 0.002, STEPS)

PARITY = {
    "sgd": [
        {"learning_rate": 0.05},
        {"learning_rate": _schedule, "momentum": 0.9},
        {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True, "accumulator_dtype": jnp.float32},
    ],
    "scale_by_rss": [{}, {"initial_accumulator_value": 0.0, "eps": 0.0}],
    "adagrad": [{"learning_rate": 0.1, "initial_accumulator_value": 0.2, "eps": 1e-6}],
    "scale_by_rms": [{}, {"decay": 0.99, "eps": 1e-3, "initial_scale": 1.0, "eps_in_sqrt": False, "bias_correction": True}],
    "scale_by_stddev": [{}, {"decay": 0.95, "eps": 1e-4, "initial_scale": 0.5, "bias_correction": True}],
    "rmsprop": [
        {"learning_rate": 0.01},
        {"learning_rate": _schedule, "centered": True, "momentum": 0.9, "nesterov": True},
        {"learning_rate": 0.01, "eps_in_sqrt": False, "bias_correction": True, "initial_scale": 0.1, "momentum": 0.5},
    ],
    "lars": [
        {"learning_rate": 0.1, "weight_decay": 1e-3},
        {"learning_rate": _schedule, "weight_decay": optax.linear_schedule(1e-2, 0.0, STEPS), "weight_decay_mask": _no_bias,
         "trust_coefficient": 0.01, "eps": 1e-4, "trust_ratio_mask": _no_bias, "momentum": 0.8, "nesterov": True},
    ],  # fmt: skip
    "scale_by_lion": [{}, {"b1": 0.8, "b2": 0.9, "mode": "smooth", "smooth_beta": 2.0}, {"mode": "refined"}],
    "lion": [
        {"learning_rate": 1e-3, "weight_decay": 0.01},
        {"learning_rate": _schedule, "b1": 0.95, "b2": 0.98, "weight_decay": optax.linear_schedule(0.1, 0.0, STEPS),
         "mask": _no_bias},
    ],  # fmt: skip
    "scale_by_novograd": [{}, {"b1": 0.95, "b2": 0.5, "eps": 1e-6, "eps_root": 1e-8, "weight_decay": 1e-2}],
    "novograd": [{"learning_rate": 0.01, "weight_decay": 1e-3}, {"learning_rate": _schedule}],
    "factored_second_moment": [{}, {"factored": False}, {"decay_rate": 0.5, "min_dim_size_to_factor": 2, "epsilon": 1e-20}],
    "adafactor": [
        {"learning_rate": 0.01},
        {"learning_rate": _schedule, "momentum": 0.9, "weight_decay_rate": 1e-3, "weight_decay_mask": _no_bias},
        {"factored": False, "clipping_threshold": None, "multiply_by_parameter_scale": False, "min_dim_size_to_factor": 64},
        {"learning_rate": 0.1, "momentum": 0.5, "weight_decay_rate": _schedule, "eps": 1e-20},
    ],
}


@pytest.mark.parametrize("name", sorted(PARITY))
def test_matches_optax(name):
    params, grads = problem()
    ours = [OURS[name](**kwargs) for kwargs in PARITY[name]]
    theirs = [optax_fn(name)(**kwargs) for kwargs in PARITY[name]]
    results = trajectories(params, grads, *ours, *theirs)
    for mine, reference in zip(results[: len(ours)], results[len(ours) :]):
        assert_relative_close(mine, reference)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rmsprop", "lars", "novograd", "adafactor"])
def test_complex_parameters_match_optax(name):
    params, grads = problem(jnp.complex64)
    kwargs = PARITY[name][0]
    mine, reference = trajectories(params, grads, OURS[name](**kwargs), optax_fn(name)(**kwargs))
    assert_relative_close(mine, reference)


@pytest.mark.parametrize("name", sorted(OURS))
def test_signature_matches_optax(name):
    ours, theirs = inspect.signature(OURS[name]).parameters, inspect.signature(optax_fn(name)).parameters
    # gradtx's one addition: the keyword-only state dtype policy (docs/memory.md), default None.
    if "state_dtype" in ours:
        assert (ours["state_dtype"].kind, ours["state_dtype"].default) == (inspect.Parameter.KEYWORD_ONLY, None)
    ours = {name: p for name, p in ours.items() if name != "state_dtype"}
    assert [(p.name, p.kind) for p in ours.values()] == [(p.name, p.kind) for p in theirs.values()]
    defaults = [(p.name, p.default) for p in ours.values() if not callable(p.default)]
    assert defaults == [(p.name, p.default) for p in theirs.values() if not callable(p.default)]


def test_default_adafactor_decay_schedule_is_the_papers():
    decay_rate_fn = inspect.signature(factored_second_moment).parameters["decay_rate_fn"].default
    steps = jnp.arange(10)
    np.testing.assert_allclose(decay_rate_fn(steps, 0.8), 1.0 - (steps + 1.0) ** -0.8, rtol=1e-6)


# Adafactor's state layout


def test_step_offset_matches_optax_when_fine_tuning():
    """The offset is subtracted from a restored step counter (a fresh one would start below it)."""
    params, grads = problem()
    grads = jax.tree.map(lambda g: g[0], grads)
    ours, theirs = factored_second_moment(step_offset=3), optax.scale_by_factored_rms(step_offset=3)
    restored = jnp.asarray(10, jnp.int32)
    mine, state = jax.jit(ours.update)(grads, ours.init(params)._replace(count=restored), params)
    reference, _ = jax.jit(theirs.update)(grads, theirs.init(params)._replace(count=restored), params)
    assert_relative_close(mine, reference)
    assert state.count == 11


def test_factored_state_shapes():
    params, _ = problem()
    state = factored_second_moment().init(params)
    assert isinstance(state, FactoredState)
    shapes = jax.tree.map(jnp.shape, {"v_row": state.v_row, "v_col": state.v_col, "v": state.v})
    # matrix (256, 160): rows average over the largest axis (0), columns over the second largest (1).
    assert (shapes["v_row"]["matrix"], shapes["v_col"]["matrix"], shapes["v"]["matrix"]) == ((160,), (256,), (1,))
    # kernel (3, 130, 129): factored along axes 1 (largest) and 2.
    assert (shapes["v_row"]["kernel"], shapes["v_col"]["kernel"], shapes["v"]["kernel"]) == ((3, 129), (3, 130), (1,))
    for name, shape in (("small", (4, 3)), ("vector", (160,)), ("scalar", ())):
        assert (shapes["v_row"][name], shapes["v_col"][name], shapes["v"][name]) == ((1,), (1,), shape)
    unfactored = factored_second_moment(factored=False).init(params)
    assert jax.tree.map(jnp.shape, unfactored.v) == jax.tree.map(jnp.shape, params)


def test_adafactor_chain_layout_does_not_depend_on_options():
    params, _ = problem()
    bare = adafactor(learning_rate=None, clipping_threshold=None, multiply_by_parameter_scale=False).init(params)
    full = adafactor(learning_rate=lambda count: 0.1, momentum=0.9, weight_decay_rate=1e-3).init(params)
    assert len(bare) == len(full) == 7
    assert jax.tree.structure(bare[0]) == jax.tree.structure(full[0])


def test_adafactor_init_accepts_shape_dtype_structs():
    params, _ = problem()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx = adafactor(learning_rate=0.1, momentum=0.9)
    assert jax.tree.map(jax.typeof, tx.init(abstract)) == jax.tree.map(jax.typeof, tx.init(params))


# Per-algorithm behaviour


def test_novograd_second_moment_is_one_scalar_per_layer():
    params, grads = problem()
    tx = scale_by_novograd()
    state = tx.init(params)
    assert all(v.shape == () for v in jax.tree.leaves(state.nu))
    first = jax.tree.map(lambda g: g[0], grads)
    _, state = tx.update(first, state, params)
    expected = jax.tree.map(lambda g: jnp.sum(g * g), first)  # the first step takes ||g||^2 without decay
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), state.nu, expected)
    with pytest.raises(ValueError, match="scale_by_novograd: update needs params"):
        tx.update(first, state)


def test_rms_state_always_has_a_counter():
    params = {"w": jnp.ones(3)}
    plain, corrected = scale_by_rms().init(params), scale_by_rms(bias_correction=True).init(params)
    assert isinstance(plain, ScaleByRmsState)
    assert jax.tree.structure(plain) == jax.tree.structure(corrected)


def test_lion_updates_are_signs():
    params, grads = problem()
    (updates,) = trajectories(params, grads, scale_by_lion())
    assert set(np.unique(np.concatenate([np.ravel(u) for u in jax.tree.leaves(updates)]))) <= {-1.0, 0.0, 1.0}


def test_sgd_without_momentum_keeps_no_buffer():
    params, _ = problem()
    assert jax.tree.leaves(sgd(0.1).init(params)) == []
    assert len(jax.tree.leaves(sgd(0.1, momentum=0.9).init(params))) == len(jax.tree.leaves(params))


def test_bfloat16_parameters_keep_their_dtype_and_state_types():
    params, grads = problem(jnp.bfloat16)
    txs = [sgd(0.1, momentum=0.9), adagrad(0.1), rmsprop(0.01, centered=True, momentum=0.9), lars(0.1, weight_decay=1e-3),
           lion(1e-3), novograd(0.01, weight_decay=1e-3), adafactor(0.01, momentum=0.9)]  # fmt: skip
    first = jax.tree.map(lambda g: g[0], grads)
    one_step = jax.jit(lambda: [(tx.init(params), tx.update(first, tx.init(params), params)[1]) for tx in txs])()
    for updates, (state, new_state) in zip(trajectories(params, grads, *txs), one_step):
        assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)
        assert all(bool(jnp.all(jnp.isfinite(u.astype(jnp.float32)))) for u in jax.tree.leaves(updates))
        assert jax.tree.map(jax.typeof, new_state) == jax.tree.map(jax.typeof, state)


# Validation


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: sgd(-0.1), ValueError, r"sgd: learning_rate must be >= 0, got -0.1"),
        (lambda: sgd(0.1, momentum=1.5), ValueError, r"sgd: momentum must be in \[0, 1\], got 1.5"),
        (lambda: sgd(0.1, accumulator_dtype=jnp.int8), ValueError, r"sgd: accumulator_dtype must be None or a floating dtype"),
        (lambda: scale_by_rss(initial_accumulator_value=-1.0), ValueError, r"scale_by_rss: initial_accumulator_value must be >= 0, got -1.0"),
        (lambda: adagrad(0.1, eps=-1e-7), ValueError, r"adagrad: eps must be >= 0, got -1e-07"),
        (lambda: scale_by_rms(decay=1.0), ValueError, r"scale_by_rms: decay must be in \[0, 1\), got 1.0"),
        (lambda: scale_by_stddev(initial_scale=-0.5), ValueError, r"scale_by_stddev: initial_scale must be >= 0, got -0.5"),
        (lambda: rmsprop(0.1, centered="yes"), ValueError, r"rmsprop: centered must be one of \(False, True\), got 'yes'"),
        (lambda: rmsprop(0.1, momentum=-0.1), ValueError, r"rmsprop: momentum must be in \[0, 1\], got -0.1"),
        (lambda: lars(0.1, weight_decay=-1.0), ValueError, r"lars: weight_decay must be >= 0, got -1.0"),
        (lambda: lars(0.1, trust_coefficient=-0.001), ValueError, r"lars: trust_coefficient must be >= 0, got -0.001"),
        (lambda: scale_by_lion(b1=1.5), ValueError, r"scale_by_lion: b1 must be in \[0, 1\], got 1.5"),
        (lambda: scale_by_lion(mode="soft"), ValueError, r"scale_by_lion: mode must be one of \('hard', 'smooth', 'refined'\), got 'soft'"),
        (lambda: lion(1e-3, b2=1.0), ValueError, r"lion: b2 must be in \[0, 1\), got 1.0"),
        (lambda: lion("fast"), TypeError, r"lion: learning_rate must be a real number or a schedule, got 'fast'"),
        (lambda: scale_by_novograd(b2=-0.25), ValueError, r"scale_by_novograd: b2 must be in \[0, 1\), got -0.25"),
        (lambda: novograd(0.1, eps_root=-1.0), ValueError, r"novograd: eps_root must be >= 0, got -1.0"),
        (lambda: factored_second_moment(min_dim_size_to_factor=0), ValueError, r"factored_second_moment: min_dim_size_to_factor must be an integer >= 1, got 0"),
        (lambda: factored_second_moment(epsilon=0.0), ValueError, r"factored_second_moment: epsilon must be > 0, got 0.0"),
        (lambda: factored_second_moment(decay_rate_fn=0.8), TypeError, r"factored_second_moment: decay_rate_fn must be callable"),
        (lambda: adafactor(decay_offset=-1), ValueError, r"adafactor: decay_offset must be an integer >= 0, got -1"),
        (lambda: adafactor(clipping_threshold=0.0), ValueError, r"adafactor: clipping_threshold must be > 0, got 0.0"),
        (lambda: adafactor(momentum=1.0), ValueError, r"adafactor: momentum must be in \[0, 1\), got 1.0"),
        (lambda: adafactor(weight_decay_rate=-1e-3), ValueError, r"adafactor: weight_decay_rate must be >= 0, got -0.001"),
        (lambda: adafactor(dtype_momentum=jnp.int32), ValueError, r"adafactor: dtype_momentum must be None or a floating dtype"),
    ],
)  # fmt: skip
def test_validation(make, error, message):
    with pytest.raises(error, match=message):
        make()
