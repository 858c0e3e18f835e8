"""Generic building blocks (decay, scaling, momentum, clipping) against Optax, plus their own behaviour."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradtx.combine import masked
from gradtx.transforms.clipping import clip, clip_by_block_rms, clip_by_global_norm
from gradtx.transforms.decay import AddDecayedWeightsState, add_decayed_weights
from gradtx.transforms.momentum import EmaState, TraceState, ema, trace
from gradtx.transforms.scaling import centralize, scale_by_sign, scale_by_trust_ratio

STEPS = 20
RTOL = 1e-5


def problem(dtype=jnp.float32):
    """Parameters of mixed shapes (one of them zero) and ``STEPS`` fixed random gradients stacked on a leading axis."""
    rng = np.random.default_rng(0)
    shapes = {"matrix": (256, 160), "kernel": (3, 3, 4, 5), "vector": (160,), "scalar": ()}

    def draw(shape, scale=1.0):
        x = scale * rng.normal(size=shape)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            x = x + 1j * scale * rng.normal(size=shape)
        return jnp.asarray(x, dtype)

    params = {k: draw(s) for k, s in shapes.items()}
    params["zero"] = jnp.zeros((7,), dtype)
    # Gradients of very different sizes per leaf, so that clipping and trust ratios bite.
    grads = {k: draw((STEPS, *jnp.shape(p)), scale=3.0 if k == "vector" else 0.05) for k, p in params.items()}
    return params, grads


def trajectories(params, grads, *txs):
    """``STEPS`` steps of each transformation, applying its updates: the stacked updates of each, in one jitted program."""

    def run(tx):
        def step(carry, g):
            p, s = carry
            u, s = tx.update(g, s, p)
            return (jax.tree.map(lambda a, b: (a + b).astype(a.dtype), p, u), s), u

        return jax.lax.scan(step, (params, tx.init(params)), grads)[1]

    return jax.jit(lambda: [run(tx) for tx in txs])()


def assert_relative_close(actual, expected, rtol=RTOL):
    """Leaf by leaf: ``max |a - b| <= rtol * max |b|``."""
    actual, expected = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        assert a.shape == b.shape and a.dtype == b.dtype
        a, b = np.asarray(a, np.complex128), np.asarray(b, np.complex128)
        difference = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
        assert difference <= rtol, f"relative difference {difference:.2e} > {rtol:.0e}"


def _matrices_only(params):
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


PARITY = {
    "add_decayed_weights": [
        {"weight_decay": 0.1},
        {"weight_decay": optax.linear_schedule(0.2, 0.0, STEPS)},
        {"weight_decay": 0.1, "mask": _matrices_only},
    ],
    "scale_by_trust_ratio": [{}, {"min_norm": 0.5, "trust_coefficient": 0.01, "eps": 1e-3}],
    "scale_by_sign": [{}],
    "trace": [{"decay": 0.9}, {"decay": 0.8, "nesterov": True}],
    "ema": [{"decay": 0.9}, {"decay": 0.7, "debias": False}],
    "clip": [{"max_delta": 0.05}],
    "clip_by_global_norm": [{"max_norm": 1.0}, {"max_norm": 1e3}],
    "clip_by_block_rms": [{"threshold": 0.1}],
}
OURS = {
    f.__name__: f
    for f in (add_decayed_weights, scale_by_trust_ratio, scale_by_sign, trace, ema, clip, clip_by_global_norm, clip_by_block_rms,
              centralize)
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PARITY))
def test_matches_optax(name):
    params, grads = problem()
    ours = [OURS[name](**kwargs) for kwargs in PARITY[name]]
    theirs = [getattr(optax, name)(**kwargs) for kwargs in PARITY[name]]
    results = trajectories(params, grads, *ours, *theirs)
    for mine, reference in zip(results[: len(ours)], results[len(ours) :]):
        assert_relative_close(mine, reference)


@pytest.mark.parametrize("name", sorted(OURS))
def test_signature_matches_optax(name):
    ours, theirs = inspect.signature(OURS[name]).parameters, inspect.signature(getattr(optax, name)).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [(p.name, p.kind, p.default) for p in theirs.values()]


def test_complex_updates_match_optax():
    params, grads = problem(jnp.complex64)
    del params["zero"], grads["zero"]
    ours = [trace(0.9, nesterov=True), ema(0.9), clip_by_global_norm(1.0), clip_by_block_rms(0.1), scale_by_trust_ratio(),
            add_decayed_weights(0.1)]  # fmt: skip
    theirs = [optax.trace(0.9, nesterov=True), optax.ema(0.9), optax.clip_by_global_norm(1.0), optax.clip_by_block_rms(0.1),
              optax.scale_by_trust_ratio(), optax.add_decayed_weights(0.1)]  # fmt: skip
    results = trajectories(params, grads, *ours, *theirs)
    for mine, reference in zip(results[: len(ours)], results[len(ours) :]):
        assert_relative_close(mine, reference)


def test_clip_complex_clips_real_and_imaginary_parts():
    tx = clip(1.0)
    updates, _ = tx.update(jnp.array([3.0 - 0.5j, -2.0 + 4.0j]), tx.init(None))
    np.testing.assert_array_equal(updates, jnp.array([1.0 - 0.5j, -1.0 + 1.0j], jnp.complex64))


# add_decayed_weights


def test_decay_state_structure_does_not_depend_on_schedule():
    params = {"w": jnp.ones(3)}
    constant, scheduled = add_decayed_weights(0.1), add_decayed_weights(lambda count: 0.1 * count)
    assert isinstance(constant.init(params), AddDecayedWeightsState)
    assert jax.tree.structure(constant.init(params)) == jax.tree.structure(scheduled.init(params))
    state = scheduled.init(params)
    for count in range(3):
        updates, state = scheduled.update({"w": jnp.zeros(3)}, state, params)
        np.testing.assert_allclose(updates["w"], 0.1 * count)


def test_decay_mask_leaves_unselected_leaves_alone():
    params = {"w": jnp.full((2, 2), 2.0), "b": jnp.full(2, 2.0)}
    tx = add_decayed_weights(0.5, mask={"w": True, "b": False})
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    np.testing.assert_array_equal(updates["w"], 2.0)
    np.testing.assert_array_equal(updates["b"], 1.0)


def test_decay_none_updates_pass_through_and_params_are_required():
    params = {"w": jnp.ones(2), "frozen": None}
    tx = add_decayed_weights(0.5)
    updates, _ = tx.update({"w": jnp.ones(2), "frozen": None}, tx.init(params), params)
    assert updates["frozen"] is None
    np.testing.assert_array_equal(updates["w"], 1.5)
    with pytest.raises(ValueError, match="add_decayed_weights: update needs params"):
        tx.update({"w": jnp.ones(2)}, tx.init(params))


def test_decay_keeps_gradient_dtype():
    params = {"w": jnp.ones(3, jnp.float32)}
    tx = add_decayed_weights(lambda count: 0.1)
    updates, _ = tx.update({"w": jnp.ones(3, jnp.bfloat16)}, tx.init(params), params)
    assert updates["w"].dtype == jnp.bfloat16


# scale_by_trust_ratio, scale_by_sign, centralize


def test_trust_ratio_is_one_where_a_norm_is_zero():
    tx = scale_by_trust_ratio()
    params = {"zero_param": jnp.zeros(3), "zero_update": jnp.ones(3), "both": jnp.full(2, 3.0)}
    grads = {"zero_param": jnp.array([1.0, 2.0, 3.0]), "zero_update": jnp.zeros(3), "both": jnp.array([0.0, 0.5])}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["zero_param"], grads["zero_param"])
    np.testing.assert_array_equal(updates["zero_update"], 0.0)
    np.testing.assert_allclose(updates["both"], jnp.array([0.0, np.sqrt(18.0)]), rtol=1e-6)


def test_trust_ratio_derivative_is_finite_at_zero():
    tx = scale_by_trust_ratio()

    def through_update(scale):
        updates, _ = tx.update(scale * jnp.ones(3), tx.init(None), jnp.zeros(3))
        return jnp.sum(updates)

    assert np.isfinite(jax.grad(through_update)(0.0))


def test_trust_ratio_needs_params():
    with pytest.raises(ValueError, match="scale_by_trust_ratio: update needs params"):
        scale_by_trust_ratio().update(jnp.ones(2), ())


def test_sign():
    tx = scale_by_sign()
    updates, _ = tx.update({"a": jnp.array([-2.0, 0.0, 0.3]), "b": None}, tx.init(None))
    np.testing.assert_array_equal(updates["a"], jnp.array([-1.0, 0.0, 1.0]))
    assert updates["b"] is None


def test_centralize_removes_the_mean_over_all_axes_but_the_last():
    params, grads = problem()
    tx = centralize()
    updates, _ = tx.update(jax.tree.map(lambda g: g[0], grads), tx.init(params))
    for name in ("matrix", "kernel"):
        u = updates[name]
        np.testing.assert_allclose(jnp.mean(u, axis=tuple(range(u.ndim - 1))), 0.0, atol=1e-7)
    np.testing.assert_array_equal(updates["vector"], grads["vector"][0])
    np.testing.assert_array_equal(updates["scalar"], grads["scalar"][0])


def test_centralize_is_optax_on_the_output_first_layout():
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 5))  # Flax Conv: (h, w, in, out)
    ours, _ = centralize().update(kernel, ())
    output_first = jnp.moveaxis(kernel, -1, 0)  # PyTorch: (out, h, w, in)
    theirs, _ = optax.centralize().update(output_first, optax.EmptyState())
    np.testing.assert_allclose(ours, jnp.moveaxis(theirs, 0, -1), rtol=1e-6, atol=1e-7)


# trace, ema


def test_accumulator_dtype_is_kept_and_updates_keep_gradient_dtype():
    params = {"w": jnp.ones((3, 2), jnp.float32)}
    grads = {"w": jnp.ones((3, 2), jnp.bfloat16)}
    for tx, field in ((trace(0.9, accumulator_dtype=jnp.bfloat16), "trace"), (ema(0.9, accumulator_dtype=jnp.bfloat16), "ema")):
        state = tx.init(params)
        updates, new_state = tx.update(grads, state, params)
        assert getattr(new_state, field)["w"].dtype == jnp.bfloat16
        assert updates["w"].dtype == jnp.bfloat16
        assert jax.tree.map(jax.typeof, new_state) == jax.tree.map(jax.typeof, state)


def test_trace_and_ema_states():
    params = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    assert isinstance(trace(0.9).init(params), TraceState)
    state = ema(0.5).init(params)
    assert isinstance(state, EmaState) and state.count.dtype == jnp.int32
    tx = ema(0.5)
    state = tx.init({"w": jnp.zeros(4)})
    for _ in range(3):
        updates, state = tx.update({"w": jnp.full(4, 2.0)}, state)
    np.testing.assert_allclose(updates["w"], 2.0, rtol=1e-6)  # debiasing removes the zero-init bias


def test_masked_trace_keeps_no_state_for_masked_leaves():
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    tx = masked(trace(0.9), {"w": True, "b": False})
    state = tx.init(params)
    assert len(jax.tree.leaves(state)) == 1
    updates, _ = tx.update(params, state, params)
    np.testing.assert_array_equal(updates["b"], params["b"])


# clipping


def test_clip_by_global_norm_bounds_the_norm_and_keeps_small_updates():
    tx = clip_by_global_norm(1.0)
    big = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
    updates, _ = tx.update(big, tx.init(big))
    np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-6)
    small = jax.tree.map(lambda x: x / 10, big)
    updates, _ = tx.update(small, tx.init(small))
    jax.tree.map(np.testing.assert_array_equal, updates, small)


def test_clip_by_block_rms_clips_each_block_separately():
    tx = clip_by_block_rms(1.0)
    updates, _ = tx.update({"big": jnp.full(4, 3.0), "small": jnp.full(4, 0.5)}, tx.init(None))
    np.testing.assert_allclose(updates["big"], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["small"], 0.5)


# validation


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: add_decayed_weights(-0.1), r"add_decayed_weights: weight_decay must be >= 0, got -0.1"),
        (lambda: scale_by_trust_ratio(min_norm=-1.0), r"scale_by_trust_ratio: min_norm must be >= 0, got -1.0"),
        (lambda: scale_by_trust_ratio(eps=-1.0), r"scale_by_trust_ratio: eps must be >= 0, got -1.0"),
        (lambda: trace(1.5), r"trace: decay must be in \[0, 1\], got 1.5"),
        (lambda: trace(0.9, nesterov="yes"), r"trace: nesterov must be one of \(False, True\), got 'yes'"),
        (lambda: trace(0.9, accumulator_dtype=jnp.int32), r"trace: accumulator_dtype must be None or a floating dtype"),
        (lambda: ema(1.0), r"ema: decay must be in \[0, 1\), got 1.0"),
        (lambda: clip(-1.0), r"clip: max_delta must be >= 0, got -1.0"),
        (lambda: clip_by_global_norm(0.0), r"clip_by_global_norm: max_norm must be > 0, got 0.0"),
        (lambda: clip_by_block_rms(-2.0), r"clip_by_block_rms: threshold must be > 0, got -2.0"),
    ],
)
def test_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_non_numbers_are_rejected():
    with pytest.raises(TypeError, match="add_decayed_weights: weight_decay must be a real number or a schedule"):
        add_decayed_weights("0.1")
    with pytest.raises(TypeError, match="trace: decay must be a real number"):
        trace(None)
