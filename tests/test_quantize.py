"""The memory engine: block-wise 8-bit moments and the state dtype policy.

* The two codes, ``"power"`` (default) and ``"dynamic"`` (bitsandbytes' ``create_dynamic_map``):
  their structure, and that each closed-form encoder picks the nearest code (brute force over
  the 256 values).
* Quantize/dequantize round trips stay within the code's bound for random, tiny, huge,
  all-zero and mixed-sign blocks, any size, with either code; arrays below ``min_size`` stay
  float32.
* 8-bit states keep their structure and dtypes across ``update`` and do not recompile.
* 8-bit AdamW tracks float32 AdamW over 200 steps of the MLP problem.
* bfloat16/float16 storage keeps arithmetic in float32.
* Every moment-based alias accepts ``state_dtype`` (enumerated from the registry).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import mlp_regression, run
from registry import ALL

import gradtx
from gradtx.state import quantize as Q

EIGHT_BIT = gradtx.Quantized8bit()


def _nearest_distance(table: np.ndarray, normalized: np.ndarray) -> np.ndarray:
    """Distance from each value to its nearest code (brute force, float64)."""
    return np.min(np.abs(table[None, :].astype(np.float64) - normalized[:, None].astype(np.float64)), axis=1)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_code_structure(signed):
    table = Q.dynamic_code(signed)
    assert table.shape == (256,) and table.dtype == np.float32
    assert np.all(np.diff(table) > 0), "sorted, distinct"
    assert table[-1] == 1.0 and 0.0 in table
    positive = table[(table > 0) & (table < 1)]
    assert positive.size == (127 if signed else 254)
    # Decade d = 0..6 holds 2^d (signed) or 2^(d+1) (unsigned) bin midpoints of [10^(d-7), 10^(d-6)].
    for d in range(7):
        inside = positive[(positive > 10.0 ** (d - 7)) & (positive < 10.0 ** (d - 6))]
        bins = 2**d if signed else 2 ** (d + 1)
        assert inside.size == bins
        np.testing.assert_allclose(np.diff(inside), 0.9 * 10.0 ** (d - 6) / bins, rtol=1e-4)
    if signed:
        np.testing.assert_array_equal(table[table < 0], -positive[::-1])


@pytest.mark.parametrize("signed", [True, False])
def test_power_code_structure(signed):
    table = Q.power_code(signed)
    assert table.shape == (256,) and table.dtype == np.float32
    assert np.all(np.diff(table) > 0), "sorted, distinct"
    steps = 127 if signed else 255
    k = np.arange(256) - (127 if signed else 0)
    np.testing.assert_allclose(table, np.sign(k) * (np.abs(k) / steps) ** (2 if signed else 4), rtol=1e-6)
    # 0 and 1 are codes, at the same index as in the dynamic code for 0; -1 too (signed).
    assert table[Q.SIGNED_ZERO if signed else Q.UNSIGNED_ZERO] == 0 and table[Q.top_code("power", signed)] == 1.0
    assert np.flatnonzero(Q.dynamic_code(signed) == 0)[0] == np.flatnonzero(table == 0)[0]
    if signed:
        assert table[0] == -1.0 and table[255] > 1  # index 255 is never produced


@pytest.mark.parametrize("code", Q.CODES)
def test_decoding_is_the_code_table_times_the_scale(code):
    # Every stored index decodes to its table value times the block's scale (both signed-nesses).
    for signed in (True, False):
        codes = jnp.arange(256, dtype=jnp.uint8)
        q = gradtx.QuantizedArray(codes, jnp.array([3.0]), (256,), signed, 256, code)
        # Up to the float32 rounding of decoding's few multiplications (the power code's square / fourth power).
        np.testing.assert_allclose(np.asarray(gradtx.dequantize_blockwise(q)), 3.0 * Q.code_table(code, signed), rtol=6e-7)
        # A block's absmax (the code value 1) decodes exactly.
        top = jnp.full((256,), Q.top_code(code, signed), jnp.uint8)
        scale = jnp.array([0.1234567], jnp.float32)
        q = gradtx.QuantizedArray(top, scale, (256,), signed, 256, code)
        np.testing.assert_array_equal(np.asarray(gradtx.dequantize_blockwise(q)), np.full(256, scale[0]))


@pytest.mark.parametrize("code", Q.CODES)
@pytest.mark.parametrize("signed", [True, False])
def test_encoder_picks_the_nearest_code(signed, code):
    table = Q.code_table(code, signed)
    rng = np.random.default_rng(0)
    low = -1.0 if signed else 0.0
    values = np.concatenate(
        [
            rng.uniform(low, 1.0, 20000),
            10.0 ** rng.uniform(-9, 0, 20000) * (rng.choice([-1.0, 1.0], 20000) if signed else 1.0),
            table,
            (table[1:] + table[:-1]) / 2,  # exact ties: either neighbour is nearest
        ]
    ).astype(np.float32)
    values = values[np.abs(values) <= 1]  # the signed power code's unused index 255 is above 1
    # One block whose absmax is exactly 1, so that the normalized values are the values.
    x = np.concatenate([values, [1.0]]).astype(np.float32)
    q = gradtx.quantize_blockwise(jnp.asarray(x), signed=signed, block_size=x.size, code=code)
    # The chosen code's value (from the table, not decoded: decoding's own float32 rounding is
    # checked by test_decoding_is_the_code_table_times_the_scale).
    codes = np.asarray(q.codes)[:-1].astype(np.int64)
    error = np.abs(table[codes].astype(np.float64) - values)
    best = _nearest_distance(table, values)
    # Two float32 ulps of slack: at an exact midpoint either neighbour is a nearest code.
    assert np.all(error <= best + 2 * np.spacing(np.abs(values).astype(np.float32)) + 1e-12)


@pytest.mark.parametrize("decades", [1, 2, 4])
def test_the_default_code_gives_the_more_accurate_adam_direction(decades):
    # Why "power" is the default, on synthetic moments: gradient scales spread over `decades`
    # decades inside each block (second moments over twice as many), first moments below them.
    # The error Adam sees is that of m / (sqrt(v) + eps) from the decoded moments; the measured
    # case on real moments is benchmarks/code_accuracy.py (RESULTS.md).
    rng = np.random.default_rng(decades)
    sigma = 10.0 ** rng.uniform(-decades, 0, 256 * 64)
    v = (sigma**2).astype(np.float32)
    m = (sigma * rng.normal(size=sigma.size) * 0.3).astype(np.float32)
    direction = m / (np.sqrt(v) + 1e-8)
    errors = {}
    for code in Q.CODES:
        decoded = [_round_trip(x, signed, code=code)[1] for x, signed in ((m, True), (v, False))]
        quantized = decoded[0] / (np.sqrt(decoded[1]) + 1e-8)
        errors[code] = np.linalg.norm(quantized - direction) / np.linalg.norm(direction)
    assert errors[Q.DEFAULT_CODE] < 0.9 * errors["dynamic"], errors


def _round_trip(x: np.ndarray, signed: bool, block_size: int = 256, code: str = Q.DEFAULT_CODE):
    q = gradtx.quantize_blockwise(jnp.asarray(x), signed=signed, block_size=block_size, code=code)
    return q, np.asarray(gradtx.dequantize_blockwise(q))


def _assert_within_code_bound(
    x: np.ndarray, decoded: np.ndarray, signed: bool, block_size: int = 256, code: str = Q.DEFAULT_CODE
):
    """Each element's error is at most its nearest-code distance times its block's absmax (plus float rounding)."""
    table = Q.code_table(code, signed)
    flat, out = x.reshape(-1).astype(np.float64), decoded.reshape(-1).astype(np.float64)
    for start in range(0, flat.size, block_size):
        block, got = flat[start : start + block_size], out[start : start + block_size]
        scale = np.max(np.abs(block)) if signed else max(np.max(block), 0.0)
        if scale == 0:
            np.testing.assert_array_equal(got, 0.0)
            continue
        target = block if signed else np.maximum(block, 0.0)
        bound = _nearest_distance(table, target / scale) * scale + 4e-7 * scale
        assert np.all(np.abs(got - target) <= bound)


BLOCKS = {
    "random": lambda rng, n: rng.normal(size=n),
    "tiny": lambda rng, n: rng.normal(size=n) * 1e-30,
    "huge": lambda rng, n: rng.normal(size=n) * 1e30,
    "all_zero": lambda rng, n: np.zeros(n),
    "mixed_sign_and_scales": lambda rng, n: rng.normal(size=n) * 10.0 ** rng.integers(-8, 3, size=n),
    "one_outlier": lambda rng, n: np.where(np.arange(n) == 7, 1e4, rng.normal(size=n)),
}


@pytest.mark.parametrize("code", Q.CODES)
@pytest.mark.parametrize("kind", sorted(BLOCKS))
@pytest.mark.parametrize("size", [256, 4096, 1000, 4097, 3])
@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_within_the_code_bound(kind, size, signed, code):
    rng = np.random.default_rng(size)
    x = BLOCKS[kind](rng, size).astype(np.float32)
    if not signed:
        x = np.abs(x)
    q, decoded = _round_trip(x, signed, code=code)
    assert q.code == code
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (size,)
    assert q.scales.dtype == jnp.float32 and q.scales.shape == (-(-size // 256),)
    assert decoded.shape == x.shape and decoded.dtype == np.float32
    _assert_within_code_bound(x, decoded, signed, code=code)
    # Relative error of the block maxima: the top of the code is fine.
    assert np.max(np.abs(decoded)) <= np.max(np.abs(x)) * (1 + 1e-6)


def test_round_trip_keeps_shape_and_block_size():
    x = np.random.default_rng(1).normal(size=(33, 70)).astype(np.float32)
    q, decoded = _round_trip(x, signed=True, block_size=64)
    assert q.shape == (33, 70) and q.scales.shape == (-(-33 * 70 // 64),)
    _assert_within_code_bound(x, decoded, signed=True, block_size=64)


# Layout: codes shaped like the array and scales like its leading dimensions when blocks tile the
# trailing dimensions (so both can be sharded like the parameter); flat otherwise.
LAYOUTS = {
    (64, 128): ((64, 128), (32,)),  # 128 divides 256: blocks of two rows
    (64, 1024): ((64, 1024), (64, 4)),  # four blocks per row
    (3, 3, 64, 128): ((3, 3, 64, 128), (3, 3, 32)),  # a conv kernel: blocks of two rows
    (64, 4, 16): ((64, 4, 16), (16,)),  # blocks of four 4x16 slices
    (4096,): ((4096,), (16,)),
    (1000,): ((1000,), (4,)),  # 1-D: flat is the array's shape, a partial last block
    (3, 384): ((1152,), (5,)),  # blocks straddle rows: flat
    (768, 50257): ((768 * 50257,), (768 * 50257 // 256,)),  # rows of an odd length: flat
    (): ((1,), (1,)),
}


@pytest.mark.parametrize("shape", list(LAYOUTS), ids=str)
def test_storage_shapes_follow_the_array_where_blocks_tile_its_trailing_dimensions(shape):
    assert Q.storage_shapes(shape, 256) == LAYOUTS[shape]
    assert Q.full(shape, 0.0, signed=True, block_size=256, code=Q.DEFAULT_CODE).codes.shape == LAYOUTS[shape][0]


@pytest.mark.parametrize("shape", [s for s in LAYOUTS if np.prod(s) < 10**6], ids=str)
@pytest.mark.parametrize("signed", [True, False])
def test_every_layout_stores_the_numbers_of_the_flat_layout(shape, signed):
    # The same blocks of 256 row-major elements whatever the layout: codes and scales are the flat
    # layout's, reshaped, and decode to the same array.
    rng = np.random.default_rng(3)
    x = (rng.normal(size=shape) * 10.0 ** rng.integers(-6, 3, size=shape)).astype(np.float32)
    q = gradtx.quantize_blockwise(jnp.asarray(x), signed=signed)
    flat = gradtx.quantize_blockwise(jnp.asarray(x).reshape(-1), signed=signed)
    assert (q.codes.shape, q.scales.shape) == LAYOUTS[shape]
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), np.asarray(flat.codes))
    np.testing.assert_array_equal(np.asarray(q.scales).reshape(-1), np.asarray(flat.scales))
    np.testing.assert_array_equal(
        np.asarray(gradtx.dequantize_blockwise(q)), np.asarray(gradtx.dequantize_blockwise(flat)).reshape(shape)
    )
    _assert_within_code_bound(x, np.asarray(gradtx.dequantize_blockwise(q)), signed)


@pytest.mark.parametrize("code", Q.CODES)
@pytest.mark.parametrize("shape", [(64, 128), (64, 1024), (3, 384), (1000,)], ids=str)
@pytest.mark.parametrize("value", [0.0, 0.1])
@pytest.mark.parametrize("signed", [True, False])
def test_full_is_the_quantized_filled_array(shape, value, signed, code):
    full = Q.full(shape, value, signed=signed, block_size=256, code=code)
    quantized = gradtx.quantize_blockwise(jnp.full(shape, value, jnp.float32), signed=signed, code=code)
    for a, b in ((full.codes, quantized.codes), (full.scales, quantized.scales)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    placed = gradtx.tree.moment_full_like(
        jax.ShapeDtypeStruct(shape, jnp.float32), value, gradtx.Quantized8bit(min_size=0, code=code), signed=signed
    )
    assert jax.tree.structure(placed) == jax.tree.structure(full)
    np.testing.assert_array_equal(np.asarray(gradtx.dequantize_blockwise(placed)), np.full(shape, value, np.float32))


@pytest.mark.parametrize("code", Q.CODES)
def test_unsigned_code_rounds_negative_values_to_zero(code):
    x = jnp.array([-1.0, 0.5, 2.0, -3.0])
    decoded = gradtx.dequantize_blockwise(gradtx.quantize_blockwise(x, signed=False, block_size=4, code=code))
    assert decoded[0] == 0 and decoded[3] == 0 and decoded[2] == 2.0


def _adam_params():
    return {"big": jnp.ones((64, 128)), "small": jnp.ones((100,)), "odd": jnp.ones((4097,))}


def test_min_size_decides_what_is_quantized():
    params = _adam_params()
    state = gradtx.adamw(1e-3, state_dtype=EIGHT_BIT).init(params)[0]
    for moment in (state.mu, state.nu):
        assert isinstance(moment["big"], gradtx.QuantizedArray) and isinstance(moment["odd"], gradtx.QuantizedArray)
        assert moment["small"].dtype == jnp.float32 and moment["small"].shape == (100,)
    assert state.mu["big"].signed and not state.nu["big"].signed
    everything = gradtx.adamw(1e-3, state_dtype=gradtx.Quantized8bit(min_size=0)).init(params)[0]
    assert isinstance(everything.mu["small"], gradtx.QuantizedArray)
    nothing = gradtx.adamw(1e-3, state_dtype=gradtx.Quantized8bit(min_size=10**6)).init(params)[0]
    assert not any(isinstance(x, gradtx.QuantizedArray) for x in jax.tree.leaves(nothing, is_leaf=gradtx.tree.is_quantized))


def test_bfloat16_params_small_leaves_stay_float32_under_8bit():
    params = {"w": jnp.ones((8,), jnp.bfloat16), "big": jnp.ones((8192,), jnp.bfloat16)}
    state = gradtx.adam(1e-3, state_dtype=EIGHT_BIT).init(params)[0]
    assert state.mu["w"].dtype == jnp.float32
    assert isinstance(state.mu["big"], gradtx.QuantizedArray)


def test_specific_dtype_argument_wins_over_state_dtype():
    state = gradtx.adam(1e-3, mu_dtype=jnp.bfloat16, state_dtype=EIGHT_BIT).init({"w": jnp.ones(8192)})[0]
    assert state.mu["w"].dtype == jnp.bfloat16
    assert isinstance(state.nu["w"], gradtx.QuantizedArray)


def _types(tree):
    return [(x.shape, x.dtype) for x in jax.tree.leaves(tree)], jax.tree.structure(tree)


def test_8bit_state_is_stable_across_updates_and_does_not_recompile():
    params = _adam_params()
    tx = gradtx.adamw(1e-2, state_dtype=EIGHT_BIT)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.tree.map(lambda p: jnp.sin(p) + 0.1, params)
        updates, state = tx.update(grads, state, params)
        return gradtx.apply_updates(params, updates), state

    before = _types(state)
    params, state = step(params, state)
    assert _types(state) == before
    params, state = step(params, state)
    assert _types(state) == before
    assert step._cache_size() == 1


def test_8bit_adamw_tracks_float32_adamw_on_the_mlp():
    params, loss = mlp_regression()
    # The MLP's arrays are small (<= 1024 elements): quantize them all, in 64-element blocks.
    policy = gradtx.Quantized8bit(block_size=64, min_size=0)
    _, losses_32 = run(gradtx.adamw(1e-2), params, loss, 200, gradtx.apply_updates)
    final_8, losses_8 = run(gradtx.adamw(1e-2, state_dtype=policy), params, loss, 200, gradtx.apply_updates)
    losses_32, losses_8 = np.asarray(losses_32), np.asarray(losses_8)
    assert losses_32[-1] < 1e-2 * losses_32[0], "the float32 run must train"
    # Stated tolerance: the two loss curves agree to 0.2% of the initial loss at every step
    # (measured: 0.08%; bfloat16 moments: 0.01%), and 8-bit ends no worse than 1.25x float32's
    # final loss (the loss falls 1000-fold, so its last digits are rounding noise either way).
    np.testing.assert_allclose(losses_8, losses_32, rtol=0, atol=2e-3 * losses_32[0])
    assert losses_8[-1] <= 1.25 * losses_32[-1]
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final_8))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_storage_keeps_arithmetic_in_float32(dtype):
    # One Adam step from a given narrow state: the update must be the float32 formula applied to
    # the stored (narrow) values; narrow arithmetic would be off by ~1e-3 relative.
    b1, b2, eps = 0.9, 0.999, 1e-8
    tx = gradtx.scale_by_adam(b1, b2, eps, state_dtype=dtype)
    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.normal(size=512), jnp.float32)
    state = tx.init(g)
    mu = jnp.asarray(rng.normal(size=512) * 0.1, dtype)
    nu = jnp.asarray(rng.uniform(0.5, 2.0, size=512), dtype)
    state = state._replace(count=jnp.asarray(4, jnp.int32), mu=mu, nu=nu)
    updates, new_state = tx.update(g, state)
    m = (1 - b1) * g + b1 * mu.astype(jnp.float32)
    v = (1 - b2) * g * g + b2 * nu.astype(jnp.float32)
    step = jnp.asarray(5, jnp.int32)
    expected = (m / (1 - jnp.float32(b1) ** step)) / (jnp.sqrt(v / (1 - jnp.float32(b2) ** step)) + eps)
    np.testing.assert_allclose(np.asarray(updates), np.asarray(expected), rtol=2e-6)
    assert new_state.mu.dtype == dtype and new_state.nu.dtype == dtype
    np.testing.assert_array_equal(np.asarray(new_state.mu), np.asarray(m.astype(dtype)))
    assert updates.dtype == jnp.float32


# Every alias whose optimizer keeps moments takes state_dtype and runs with 8-bit moments. The one
# exception keeps no moment: schedule-free SGD's only state is its iterate z, which takes
# state_dtype as a float dtype but is never 8-bit (tests/test_state_dtype_policy.py checks both).
WITHOUT_STATE_DTYPE = {"schedule_free_sgd"}
MOMENT_BASED = sorted(entry.name for entry in ALL if entry.name not in WITHOUT_STATE_DTYPE)


def test_every_moment_based_alias_takes_state_dtype():
    missing = [name for name in MOMENT_BASED if "state_dtype" not in inspect.signature(getattr(gradtx, name)).parameters]
    assert not missing


@pytest.mark.parametrize("name", MOMENT_BASED)
def test_every_moment_based_alias_runs_with_8bit_states(name):
    entry = next(entry for entry in ALL if entry.name == name)
    kwargs = dict(entry.converge_kwargs)
    if name in ("sgd", "rmsprop"):
        kwargs["momentum"] = 0.9
    tx = entry.make(**kwargs, state_dtype=EIGHT_BIT)
    params = {"w": jnp.linspace(-1.0, 1.0, 8192).reshape(64, 128), "b": jnp.zeros(16)}
    state = tx.init(params)
    quantized = [x for x in jax.tree.leaves(state, is_leaf=gradtx.tree.is_quantized) if gradtx.tree.is_quantized(x)]
    assert quantized, f"{name}: no 8-bit moment in the state"

    @jax.jit
    def step(params, state):
        grads = jax.tree.map(lambda p: 2 * (p - 0.3), params)
        updates, state = tx.update(grads, state, params, **entry.extra_args(lambda p: 0.0))
        return gradtx.apply_updates(params, updates), state

    before = _types(state)
    for _ in range(3):
        params, state = step(params, state)
    assert _types(state) == before
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    assert step._cache_size() == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda s: gradtx.trace(0.9, accumulator_dtype=s),
        lambda s: gradtx.ema(0.9, accumulator_dtype=s),
        lambda s: gradtx.scale_by_rms(state_dtype=s),
        lambda s: gradtx.scale_by_stddev(state_dtype=s),
        lambda s: gradtx.scale_by_lion(state_dtype=s),
        lambda s: gradtx.scale_by_amsgrad(state_dtype=s),
        lambda s: gradtx.scale_by_radam(state_dtype=s),
        lambda s: gradtx.lookahead_wrapper(gradtx.sgd(0.1), sync_period=3, state_dtype=s),
    ],
    ids=["trace", "ema", "scale_by_rms", "scale_by_stddev", "scale_by_lion", "scale_by_amsgrad", "scale_by_radam", "lookahead"],
)
def test_building_blocks_take_the_8bit_policy_and_follow_float32(make):
    params = jnp.linspace(-1.0, 1.0, 4096)
    results = []
    for storage in (None, EIGHT_BIT):
        tx = make(storage)
        p, state = params, tx.init(params)
        for _ in range(7):
            updates, state = tx.update(2 * (p - 0.3), state, p)
            p = gradtx.apply_updates(p, updates)
        results.append(np.asarray(p))
    # Block-wise 8-bit moments: within a few percent of the float32 run's displacement.
    np.testing.assert_allclose(results[1], results[0], atol=0.05 * np.max(np.abs(results[0] - np.asarray(params))))


def test_lookahead_8bit_slow_weights_do_not_drift_between_synchronizations():
    tx = gradtx.lookahead_wrapper(gradtx.sgd(0.0), sync_period=1000, state_dtype=gradtx.Quantized8bit(min_size=0))
    params = -jnp.linspace(0.1, 1.0, 512)  # the block's absmax is negative: -1 is not a code
    state = tx.init(params)
    first = None
    for _ in range(5):
        _, state = tx.update(jnp.zeros_like(params), state, params)
        codes = np.asarray(state.slow_params.codes)
        first = codes if first is None else first
        np.testing.assert_array_equal(codes, first)


def test_quantized8bit_validates_its_arguments():
    with pytest.raises(ValueError, match=r"Quantized8bit: block_size must be an int >= 1, got 0"):
        gradtx.Quantized8bit(block_size=0)
    with pytest.raises(ValueError, match=r"Quantized8bit: min_size must be an int >= 0, got -1"):
        gradtx.Quantized8bit(min_size=-1)
    with pytest.raises(ValueError, match=r"Quantized8bit: code must be one of \('power', 'dynamic'\), got 'linear'"):
        gradtx.Quantized8bit(code="linear")
    with pytest.raises(ValueError, match=r"quantize_blockwise: code must be one of \('power', 'dynamic'\), got 'lin'"):
        gradtx.quantize_blockwise(jnp.ones(4), signed=True, code="lin")
    with pytest.raises(ValueError, match=r"QuantizedArray: code must be one of \('power', 'dynamic'\), got 'dyn'"):
        gradtx.QuantizedArray(jnp.zeros(4, jnp.uint8), jnp.ones(1), (4,), True, 256, "dyn")
    with pytest.raises(
        ValueError,
        match=r"adamw: state_dtype must be None or a floating dtype .*, got 'int8'; for 8-bit storage pass gradtx.Quantized8bit",
    ):
        gradtx.adamw(1e-3, state_dtype="int8")


def test_state_bytes_counts_quantized_states():
    params = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
    per_parameter = {}
    for label, storage in (("float32", None), ("bfloat16", jnp.bfloat16), ("8bit", EIGHT_BIT)):
        state = jax.eval_shape(gradtx.adamw(1e-3, state_dtype=storage).init, params)
        per_parameter[label] = gradtx.state_bytes_per_parameter(state, params)
    assert per_parameter["float32"] == pytest.approx(8.0, abs=1e-5)
    assert per_parameter["bfloat16"] == pytest.approx(4.0, abs=1e-5)
    # Two moments of 1 byte each plus one float32 scale per 256 elements each: 2 + 8/256.
    assert per_parameter["8bit"] == pytest.approx(2 + 8 / 256, abs=1e-5)


def test_quantized_state_survives_a_jit_boundary_and_donation():
    tx = gradtx.adam(1e-2, state_dtype=EIGHT_BIT)
    params = jnp.linspace(-1.0, 1.0, 8192)
    state = tx.init(params)
    step = jax.jit(lambda g, s: tx.update(g, s), donate_argnums=(1,))
    updates, state = step(params, state)
    updates, state = step(params, state)
    assert isinstance(state[0].mu, gradtx.QuantizedArray)
    assert np.all(np.isfinite(np.asarray(updates)))


@pytest.mark.parametrize(
    "make",
    [
        lambda s: gradtx.adamw(1e-2, state_dtype=s),
        lambda s: gradtx.rmsprop(1e-3, initial_scale=0.1, momentum=0.9, state_dtype=s),
        lambda s: gradtx.yogi(1e-2, state_dtype=s),
    ],
    ids=["adamw", "rmsprop", "yogi"],
)
def test_8bit_states_work_with_flax_nnx_optimizer_and_the_train_step_helper(make):
    nnx = pytest.importorskip("flax.nnx")
    from gradtx.contrib.flax import make_train_step

    x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 128)), jnp.float32)
    y = jnp.ones((32, 64))
    losses = {}
    for label, storage in (("float32", None), ("8-bit", EIGHT_BIT)):
        model = nnx.Linear(128, 64, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, make(storage), wrt=nnx.Param)
        step = make_train_step(lambda m, x, y: jnp.mean((m(x) - y) ** 2))
        for _ in range(20):
            loss = step(model, optimizer, x, y)
        losses[label] = float(loss)
        # Every Variable holds one array: the 8-bit kernel moments are boxed as codes and scales.
        moments = jax.tree.leaves(nnx.as_pure(optimizer.opt_state), is_leaf=gradtx.tree.is_quantized)
        assert any(isinstance(x, gradtx.QuantizedArray) for x in moments) == (storage is not None)
    assert losses["8-bit"] == pytest.approx(losses["float32"], rel=0.05)
