"""The state dtype policy on LARS, NovoGrad, Adafactor, Sophia and schedule-free.

Each optimizer stores its parameter-sized moments as ``state_dtype`` asks (float32, bfloat16,
or 8-bit block-quantized), keeps what is not a moment or is negligible in size in at least
float32 (NovoGrad's per-layer second moment, Adafactor's row and column factors, the
schedule-free iterate ``z`` under 8 bits), and keeps the state's types across jitted updates.
The tables below name, per optimizer, which state fields follow the policy and which do not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx.optimizers.adafactor import FactoredState
from gradtx.optimizers.novograd import ScaleByNovogradState
from gradtx.optimizers.rmsprop import ScaleByRmsState
from gradtx.optimizers.sophia import ScaleBySophiaState
from gradtx.transforms.momentum import EmaState, TraceState
from gradtx.wrappers.schedule_free import ScheduleFreeState

EIGHT_BIT = gradtx.Quantized8bit()


def _loss(params):
    return sum(jnp.sum(jnp.sin(x.astype(jnp.float32)) * x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(params))


def _params(dtype=jnp.float32):
    # A matrix Adafactor factors (both axes >= 128), one it keeps whole (64 < 128), a vector
    # large enough for 8 bits (>= 4096 elements) and a bias too small for them.
    return {
        "factored": jnp.linspace(-1.0, 1.0, 128 * 256, dtype=dtype).reshape(128, 256),
        "whole": jnp.linspace(-0.5, 2.0, 64 * 128, dtype=dtype).reshape(64, 128),
        "vector": jnp.linspace(0.1, 1.0, 4096, dtype=dtype),
        "bias": jnp.linspace(-0.2, 0.2, 16, dtype=dtype),
    }


def _find(state: Any, cls: type) -> Any:
    """The one sub-state of type ``cls`` inside a (chained, wrapped) state."""
    found = []

    def visit(node):
        if isinstance(node, cls):
            found.append(node)
        elif isinstance(node, tuple):
            for child in node:
                visit(child)

    visit(state)
    assert len(found) == 1, f"{len(found)} states of type {cls.__name__}"
    return found[0]


@dataclasses.dataclass(frozen=True)
class Case:
    make: Callable[..., gradtx.GradientTransformation]
    # Parameter-sized state that follows the policy, and per-layer/factored state that stays >= float32.
    moments: Callable[[Any], list]
    kept: Callable[[Any], list] = lambda state: []
    needs_obj_fn: bool = False

    def extra_args(self):
        return {"obj_fn": _loss} if self.needs_obj_fn else {}


def _sf(state):
    return _find(state, ScheduleFreeState)


CASES = {
    "lars": Case(lambda **kw: gradtx.lars(0.1, weight_decay=1e-3, **kw), lambda s: [_find(s, TraceState).trace]),
    "novograd": Case(
        lambda **kw: gradtx.novograd(0.01, weight_decay=1e-3, **kw),
        lambda s: [_find(s, ScaleByNovogradState).mu],
        lambda s: [_find(s, ScaleByNovogradState).nu],
    ),
    "adafactor": Case(
        lambda **kw: gradtx.adafactor(0.01, momentum=0.9, **kw),
        # v of the factored matrix is a (1,) placeholder: only the unfactored leaves' v are moments.
        lambda s: [{k: v for k, v in _find(s, FactoredState).v.items() if k != "factored"}, _find(s, EmaState).ema],
        lambda s: [_find(s, FactoredState).v_row["factored"], _find(s, FactoredState).v_col["factored"]],
    ),
    "sophia_h": Case(
        # Refreshed every step, with h large enough that most ratios m / (rho h) are not clipped.
        lambda **kw: gradtx.sophia_h(0.01, b2=0.5, rho=1.0, weight_decay=0.0, update_interval=1, **kw),
        lambda s: [_find(s, ScaleBySophiaState).mu, _find(s, ScaleBySophiaState).hessian],
        needs_obj_fn=True,
    ),
    "schedule_free_adamw": Case(
        lambda **kw: gradtx.schedule_free_adamw(0.01, **kw),
        lambda s: [_sf(s).z, _find(_sf(s).base_optimizer_state, ScaleByRmsState).nu],
    ),
    "schedule_free_sgd": Case(lambda **kw: gradtx.schedule_free_sgd(0.1, **kw), lambda s: [_sf(s).z]),
}
EIGHT_BIT_CASES = sorted(set(CASES) - {"schedule_free_sgd"})  # no moment: refused, see below


def _types(tree):
    return [(x.shape, x.dtype) for x in jax.tree.leaves(tree)], jax.tree.structure(tree)


def _dtypes(trees: list) -> set:
    return {x.dtype for x in jax.tree.leaves(trees)}


def _jitted_run(case: Case, tx, params, steps: int):
    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(_loss)(params), state, params, **case.extra_args())
        return gradtx.apply_updates(params, updates), state

    state = tx.init(params)
    before = _types(state)
    for _ in range(steps):
        params, state = step(params, state)
    assert _types(state) == before, "the state's structure or dtypes changed across update"
    assert step._cache_size() == 1, "the second step recompiled"
    return params, state


@pytest.mark.parametrize("name", sorted(CASES))
def test_bfloat16_policy_stores_the_moments_in_bfloat16_and_keeps_them(name):
    case = CASES[name]
    params, state = _jitted_run(case, case.make(state_dtype=jnp.bfloat16), _params(), steps=3)
    assert _dtypes(case.moments(state)) == {jnp.dtype(jnp.bfloat16)}
    assert _dtypes(case.kept(state)) <= {jnp.dtype(jnp.float32)}
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_policy_is_bit_equal_to_the_default(name):
    case = CASES[name]
    default_params, default_state = _jitted_run(case, case.make(), _params(), steps=4)
    params, state = _jitted_run(case, case.make(state_dtype=jnp.float32), _params(), steps=4)
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves((default_params, default_state)), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", EIGHT_BIT_CASES)
def test_8bit_policy_quantizes_the_large_moments_runs_finite_and_follows_float32(name):
    case = CASES[name]
    params, state = _jitted_run(case, case.make(state_dtype=EIGHT_BIT), _params(), steps=3)
    moments = case.moments(state)
    if name == "schedule_free_adamw":
        z, nu = moments
        assert _dtypes(z) == {jnp.dtype(jnp.float32)}  # the iterate keeps the parameters' dtype
        moments = [nu]
    for moment in moments:
        for key, leaf in moment.items():
            size = np.prod(np.shape(_params()[key]))
            assert gradtx.tree.is_quantized(leaf) == (size >= EIGHT_BIT.min_size), (key, leaf)
    assert _dtypes(case.kept(state)) <= {jnp.dtype(jnp.float32)}
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    # Block-wise 8-bit moments follow the float32 run: the same loss decrease to 2%, and each
    # array's displacement to 5% of its largest, except where the gradient crosses zero (a
    # squared gradient below ~3e-7 of its block's largest rounds to 0: docs/memory.md).
    reference, _ = _jitted_run(case, case.make(), _params(), steps=3)
    start = _loss(_params())
    np.testing.assert_allclose(start - _loss(params), start - _loss(reference), rtol=0.02)
    for p, r, p0 in zip(jax.tree.leaves(params), jax.tree.leaves(reference), jax.tree.leaves(_params())):
        off = np.abs(np.asarray(p - r)) > 0.05 * float(jnp.max(jnp.abs(r - p0))) + 1e-7
        assert np.mean(off) <= 1e-3, f"{np.sum(off)} of {off.size} elements off"


def test_8bit_moments_are_signed_for_first_moments_and_unsigned_for_second_moments():
    params = _params()
    signedness = {
        "lars": [_find(gradtx.lars(0.1, state_dtype=EIGHT_BIT).init(params), TraceState).trace["vector"]],
        "novograd": [_find(gradtx.novograd(0.1, state_dtype=EIGHT_BIT).init(params), ScaleByNovogradState).mu["vector"]],
        "adafactor": [_find(gradtx.adafactor(0.1, momentum=0.9, state_dtype=EIGHT_BIT).init(params), EmaState).ema["vector"]],
    }
    assert all(q.signed for qs in signedness.values() for q in qs)
    adafactor_v = _find(gradtx.adafactor(0.1, state_dtype=EIGHT_BIT).init(params), FactoredState).v["vector"]
    sophia = _find(gradtx.sophia_h(0.1, state_dtype=EIGHT_BIT).init(params), ScaleBySophiaState)
    sf = gradtx.schedule_free_adamw(0.1, state_dtype=EIGHT_BIT).init(params)
    sf_nu = _find(sf.base_optimizer_state, ScaleByRmsState).nu["vector"]
    assert sophia.mu["vector"].signed
    assert not adafactor_v.signed and not sophia.hessian["vector"].signed and not sf_nu.signed


# Specific arguments win over state_dtype.


def test_specific_arguments_win_over_state_dtype():
    params = _params()
    novograd = _find(gradtx.scale_by_novograd(mu_dtype=jnp.float32, state_dtype=jnp.bfloat16).init(params), ScaleByNovogradState)
    assert _dtypes(novograd.mu) == {jnp.dtype(jnp.float32)}
    sophia = _find(gradtx.sophia_h(mu_dtype=jnp.float32, state_dtype=EIGHT_BIT).init(params), ScaleBySophiaState)
    assert _dtypes(sophia.mu) == {jnp.dtype(jnp.float32)} and gradtx.tree.is_quantized(sophia.hessian["vector"])
    sf = gradtx.schedule_free_adamw(state_dtype=jnp.bfloat16, z_dtype=jnp.float32).init(params)
    assert _dtypes(sf.z) == {jnp.dtype(jnp.float32)}
    assert _dtypes(_find(sf.base_optimizer_state, ScaleByRmsState).nu) == {jnp.dtype(jnp.bfloat16)}
    sf_sgd = gradtx.schedule_free_sgd(state_dtype=jnp.float32, z_dtype=jnp.bfloat16).init(params)
    assert _dtypes(sf_sgd.z) == {jnp.dtype(jnp.bfloat16)}
    sf_8bit = gradtx.schedule_free_adamw(state_dtype=EIGHT_BIT, z_dtype=jnp.bfloat16).init(params)
    assert _dtypes(sf_8bit.z) == {jnp.dtype(jnp.bfloat16)}


def test_adafactor_dtype_momentum_wins_unless_it_is_optaxs_default():
    params = _params()

    def momentum(**kwargs):
        return _find(gradtx.adafactor(0.1, momentum=0.9, **kwargs).init(params), EmaState).ema

    assert _dtypes(momentum()) == {jnp.dtype(jnp.float32)}  # Optax's default storage
    assert _dtypes(momentum(state_dtype=jnp.bfloat16)) == {jnp.dtype(jnp.bfloat16)}
    assert _dtypes(momentum(dtype_momentum=jnp.float16, state_dtype=jnp.bfloat16)) == {jnp.dtype(jnp.float16)}
    assert gradtx.tree.is_quantized(momentum(dtype_momentum=EIGHT_BIT)["vector"])
    assert _dtypes(momentum(dtype_momentum=EIGHT_BIT, state_dtype=jnp.bfloat16)["bias"]) == {jnp.dtype(jnp.float32)}
    # Optax's default keeps the momentum in float32 also for bfloat16 parameters.
    bf16 = _find(gradtx.adafactor(0.1, momentum=0.9).init(_params(jnp.bfloat16)), EmaState).ema
    assert _dtypes(bf16) == {jnp.dtype(jnp.float32)}


# What stays in float32, and why.


def test_per_layer_and_factored_statistics_keep_parameter_dtype_by_default_and_float32_under_a_policy():
    params = _params(jnp.bfloat16)
    for storage in (jnp.bfloat16, jnp.float16, EIGHT_BIT):
        novograd = _find(gradtx.novograd(0.1, state_dtype=storage).init(params), ScaleByNovogradState)
        factored = _find(gradtx.adafactor(0.1, state_dtype=storage).init(params), FactoredState)
        assert _dtypes(novograd.nu) == {jnp.dtype(jnp.float32)}
        assert _dtypes([factored.v_row["factored"], factored.v_col["factored"]]) == {jnp.dtype(jnp.float32)}
    # The default (None: the parameters' dtype) is Optax's storage.
    novograd = _find(gradtx.novograd(0.1).init(params), ScaleByNovogradState)
    factored = _find(gradtx.adafactor(0.1).init(params), FactoredState)
    assert _dtypes(novograd.nu) == {jnp.dtype(jnp.bfloat16)}
    assert _dtypes([factored.v_row["factored"], factored.v_col["factored"], factored.v["vector"]]) == {jnp.dtype(jnp.bfloat16)}


def test_schedule_free_refuses_8bit_iterates_at_build_time():
    accepted = r"must be None or a floating dtype \(float32, bfloat16, float16, float64\), got Quantized8bit\(.*iterate"
    with pytest.raises(ValueError, match="schedule_free_adamw: z_dtype " + accepted):
        gradtx.schedule_free_adamw(z_dtype=EIGHT_BIT)
    with pytest.raises(ValueError, match="schedule_free_sgd: state_dtype " + accepted):
        gradtx.schedule_free_sgd(state_dtype=EIGHT_BIT)
    with pytest.raises(ValueError, match="schedule_free_sgd: z_dtype " + accepted):
        gradtx.schedule_free_sgd(z_dtype=EIGHT_BIT)
    with pytest.raises(ValueError, match="schedule_free: state_dtype " + accepted):
        gradtx.schedule_free(gradtx.scale_by_learning_rate(0.1), 0.1, state_dtype=EIGHT_BIT)


def test_schedule_free_bfloat16_z_is_updated_in_float32():
    # A bfloat16 z: the interpolation c (z - y) is computed in float32 and only z's storage rounds.
    tx = gradtx.schedule_free_sgd(0.1, state_dtype=jnp.bfloat16)
    params = {"w": jnp.full(8, 1.0 + 2.0**-10)}  # not a bfloat16 value: z rounds, y does not
    state = tx.init(params)
    assert state.z["w"].dtype == jnp.bfloat16
    updates, state = tx.update({"w": jnp.ones(8)}, state, params)
    z0 = jnp.asarray(jnp.bfloat16(1.0 + 2.0**-10), jnp.float32)
    c = 1.0  # the first step's averaging weight
    expected = c * (z0 - params["w"]) + (1 - 0.9 * (1 - c)) * -0.1
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)


def test_sophia_8bit_hessian_stores_negative_curvature_as_zero_without_changing_the_step():
    # Hutchinson's estimate of a diagonal Hessian is exact: -2 everywhere (negative curvature).
    def concave(params):
        return -jnp.sum(params["w"] ** 2) + jnp.sum(params["w"])

    params = {"w": jnp.linspace(-1.0, 1.0, 4096)}
    runs = {}
    for storage in (None, EIGHT_BIT):
        estimator = gradtx.hutchinson_hessian_estimate
        tx = gradtx.scale_by_sophia(update_interval=1, hessian_estimator=estimator, mu_dtype=jnp.float32, state_dtype=storage)
        state, steps = tx.init(params), []
        for _ in range(3):
            updates, state = tx.update(jax.grad(concave)(params), state, params, obj_fn=concave)
            steps.append(updates["w"])
        runs[storage] = (steps, state)
    assert float(jnp.max(runs[None][1].hessian["w"])) < 0
    assert float(jnp.max(jnp.abs(gradtx.dequantize_blockwise(runs[EIGHT_BIT][1].hessian["w"])))) == 0.0
    for a, b in zip(*(runs[s][0] for s in (None, EIGHT_BIT))):
        np.testing.assert_array_equal(a, b)


# The packed layout keeps the per-array numbers.


@pytest.mark.parametrize("storage", [jnp.bfloat16, gradtx.Quantized8bit(min_size=100)], ids=["bfloat16", "8bit"])
def test_adafactor_policy_gives_the_per_array_numbers_packed(storage):
    # Two arrays of one shape form a run; their 8-bit second moments are quantized array by array.
    params = {
        "a": jnp.linspace(-1.0, 1.0, 300 * 50).reshape(300, 50),
        "b": jnp.linspace(-2.0, 1.0, 300 * 50).reshape(300, 50),
        "c": jnp.linspace(0.0, 1.0, 333),
        "factored": jnp.linspace(-1.0, 1.0, 130 * 129).reshape(130, 129),
    }
    tx = gradtx.adafactor(0.01, state_dtype=storage)

    def run(params, packed):
        def step(params, state):
            grads = jax.grad(_loss)(gradtx.unpack(params) if packed else params)
            grads = gradtx.pack(grads, params.layout) if packed else grads
            updates, state = tx.update(grads, state, params)
            return gradtx.apply_updates(params, updates), state

        step = jax.jit(step)
        state = tx.init(params)
        for _ in range(3):
            params, state = step(params, state)
        return params, state

    expected, state = run(params, packed=False)
    packed_params, packed_state = run(gradtx.pack(params), packed=True)
    for key, value in gradtx.unpack(packed_params).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-6, atol=1e-6)
    assert gradtx.state_bytes(packed_state) == gradtx.state_bytes(state)
    unpacked = _find(gradtx.unpack_state(packed_state), FactoredState)
    for key in ("a", "b", "c"):
        v, v_packed = _find(state, FactoredState).v[key], unpacked.v[key]
        assert _types(v) == _types(v_packed)
        if gradtx.tree.is_quantized(v):
            # Blocks of one array, not straddling two: the same scales, and the same codes but
            # where the last-bit differences of the parameter scale's reduction cross a tie.
            np.testing.assert_allclose(v.scales, v_packed.scales, rtol=1e-5)
            code_steps = np.abs(np.asarray(v.codes, np.int32) - np.asarray(v_packed.codes, np.int32))
            assert code_steps.max() <= 1 and np.mean(code_steps > 0) < 1e-3
    round_trip = gradtx.unpack_state(gradtx.pack_state(tx, state, packed_params.layout))
    for a, b in zip(jax.tree.leaves(round_trip), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


# Bad values.


@pytest.mark.parametrize(
    "factory, argument",
    [
        (lambda **kw: gradtx.lars(0.1, **kw), "state_dtype"),
        (lambda **kw: gradtx.novograd(0.1, **kw), "state_dtype"),
        (lambda **kw: gradtx.scale_by_novograd(**kw), "state_dtype"),
        (lambda **kw: gradtx.adafactor(0.1, **kw), "state_dtype"),
        (lambda **kw: gradtx.factored_second_moment(**kw), "state_dtype"),
        (lambda **kw: gradtx.sophia(**kw), "state_dtype"),
        (lambda **kw: gradtx.sophia_h(**kw), "state_dtype"),
        (lambda **kw: gradtx.scale_by_sophia(**kw), "state_dtype"),
        (lambda **kw: gradtx.schedule_free_adamw(**kw), "state_dtype"),
        (lambda **kw: gradtx.schedule_free_adamw(**kw), "z_dtype"),
        (lambda **kw: gradtx.schedule_free_sgd(**kw), "state_dtype"),
    ],
)
@pytest.mark.parametrize("bad", ["int8", jnp.int32])
def test_bad_storage_is_rejected_at_build_time(factory, argument, bad):
    with pytest.raises(ValueError, match=rf"{argument} must be None or a floating dtype .*got {bad!r}"):
        factory(**{argument: bad})


def test_sophia_gnb_alias_takes_the_policy_too():
    x = jnp.linspace(-1.0, 1.0, 8 * 64).reshape(8, 64)
    params = {"w": jnp.linspace(-0.1, 0.1, 64 * 128).reshape(64, 128)}

    def logits_fn(p):
        return x @ p["w"]

    def loss(p):
        return -jnp.mean(jax.nn.log_softmax(logits_fn(p))[:, 0])

    tx = gradtx.sophia(1e-2, update_interval=1, state_dtype=EIGHT_BIT)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params, logits_fn=logits_fn)
        return gradtx.apply_updates(params, updates), state

    state = tx.init(params)
    before = _types(state)
    for _ in range(3):
        params, state = step(params, state)
    sophia = _find(state, ScaleBySophiaState)
    assert _types(state) == before and step._cache_size() == 1
    assert sophia.mu["w"].signed and not sophia.hessian["w"].signed
    # The Gauss-Newton-Bartlett estimate is non-negative: refreshed twice, h is positive somewhere.
    assert float(jnp.max(gradtx.dequantize_blockwise(sophia.hessian["w"]))) > 0
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(params))


@pytest.mark.parametrize("factored", [False, True])
def test_adafactor_8bit_moments_train_through_flax_nnx(factored):
    # Unfactored 8-bit second moments are created from the boxed parameter, so their codes and
    # scales are boxed apart (one array per nnx Variable, which nnx.Optimizer and the helper need).
    nnx = pytest.importorskip("flax.nnx")
    from gradtx.contrib.flax import make_train_step

    model = nnx.Linear(128, 128, rngs=nnx.Rngs(0))
    tx = gradtx.adafactor(1e-2, factored=factored, momentum=0.9, state_dtype=gradtx.Quantized8bit(min_size=16))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    assert any(
        gradtx.tree.is_quantized(x) for x in jax.tree.leaves(nnx.as_pure(optimizer.opt_state), is_leaf=gradtx.tree.is_quantized)
    )
    step = make_train_step(lambda m, x: jnp.mean(m(x) ** 2))
    x = jnp.linspace(-1.0, 1.0, 4 * 128).reshape(4, 128)
    losses = [float(step(model, optimizer, x)) for _ in range(5)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
