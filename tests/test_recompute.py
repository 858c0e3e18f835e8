"""8-bit moments stored by recomputation (gradtx.state.recompute): no float32 copy of a moment, same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx.bench.e2e import _tower
from gradtx.state import recompute

SIZE = 1 << 20  # one array of 1M elements: a float32 copy of it is 4 MiB

OPTIMIZERS = {
    "adamw": lambda: gradtx.adamw(1e-3, state_dtype=gradtx.Quantized8bit()),
    "lion": lambda: gradtx.lion(1e-4, state_dtype=gradtx.Quantized8bit()),
    "sgd_momentum": lambda: gradtx.sgd(1e-2, momentum=0.9, state_dtype=gradtx.Quantized8bit()),
    "rmsprop": lambda: gradtx.rmsprop(1e-3, state_dtype=gradtx.Quantized8bit()),
    "lamb": lambda: gradtx.lamb(1e-3, state_dtype=gradtx.Quantized8bit()),
}

DYNAMIC = {
    "adamw": lambda: gradtx.adamw(1e-3, state_dtype=gradtx.Quantized8bit(code="dynamic")),
    "lion": lambda: gradtx.lion(1e-4, state_dtype=gradtx.Quantized8bit(code="dynamic")),
}

FLOAT32 = {
    "adamw": lambda: gradtx.adamw(1e-3),
    "lion": lambda: gradtx.lion(1e-4),
    "sgd_momentum": lambda: gradtx.sgd(1e-2, momentum=0.9),
    "rmsprop": lambda: gradtx.rmsprop(1e-3),
    "lamb": lambda: gradtx.lamb(1e-3),
}


def _problem(shape=(SIZE // 1024, 1024)):
    params = jax.random.normal(jax.random.key(0), shape)
    grads = [jax.random.normal(jax.random.key(i + 1), shape) * 0.1 for i in range(3)]
    return params, grads


def _step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return gradtx.apply_updates(params, updates), state

    return step


def _temporaries(tx, params, grads):
    compiled = jax.jit(_step(tx), donate_argnums=(0, 1), compiler_options=gradtx.compiler_options())
    return compiled.lower(params, tx.init(params), grads).compile().memory_analysis().temp_size_in_bytes


def _mixed_arrays(shape):
    # Blocks that tile each array (a run of three), blocks that do not ((250, 300): the flat
    # layout, a stacked run of two), and biases under min_size (unquantized).
    key = jax.random.key(sum(shape))
    arrays = [jax.random.normal(jax.random.fold_in(key, i), (256, 1024)) for i in range(3)]
    arrays += [jax.random.normal(jax.random.fold_in(key, 3 + i), (250, 300)) for i in range(2)]
    return arrays + [jax.random.normal(jax.random.fold_in(key, 5 + i), (64,)) for i in range(8)]


LAYOUTS = {
    # one array whose blocks tile its rows
    "per_array": lambda: (_problem()[0], _problem()[1][0]),
    # one array in the flat layout (rows of 1000: blocks straddle rows)
    "per_array_flat": lambda: (_problem((1000, 1000))[0], _problem((1000, 1000))[1][0]),
    # four arrays in one packed buffer: one joined run per moment
    "packed": lambda: (gradtx.pack(list(_problem()[0].reshape(4, -1, 1024))), list(_problem()[1][0].reshape(4, -1, 1024))),
    # a joined run, a stacked run and unquantized biases in one packed buffer
    "packed_mixed": lambda: (gradtx.pack(_mixed_arrays((0,))), _mixed_arrays((1,))),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_donated_8bit_step_holds_no_float32_copy_of_a_moment(name, layout):
    params, grads = LAYOUTS[layout]()
    if isinstance(params, gradtx.Packed):
        grads = gradtx.pack(grads, params.layout)
    size = sum(x.size for x in jax.tree.leaves(params))
    extra = _temporaries(OPTIMIZERS[name](), params, grads) - _temporaries(FLOAT32[name](), params, grads)
    # The plain path wrote every new moment out in float32 (4 bytes per element each) on top of
    # what the float32 optimizer needs (LAMB: its update, for the trust ratio), and a packed
    # buffer of several segments its whole decoded moment. With the power code (the default) the
    # decoding is arithmetic and the codes are read and written in one shape, so XLA writes the
    # new codes over the old ones: no copy of the codes either, only scale-sized temporaries
    # (measured 0.08 bytes per parameter). The dynamic code's look-up still makes XLA copy the
    # codes, as reshapes between a flat-layout array's codes and its shape, or between a packed
    # buffer and its runs, did (1.03-2.08 bytes per parameter; a mixed buffer also wrote out its
    # decoded moments, 8.07).
    assert extra < 0.25 * size, f"{extra / size:.2f} bytes per parameter of temporaries beyond float32 states'"


def test_a_packed_nnx_training_step_holds_no_float32_copy_of_a_moment():
    # The whole donated step of make_train_step(packed=True) (forward, backward, update): it
    # concatenates the gradients, and XLA rewrote a run's slice of that buffer into a second
    # concatenation of the run's gradients, written out (4 bytes per parameter). (The per-array
    # step holds 0.89 bytes per parameter more than float32's here: no copy, but gradients that
    # the backward pass produces stay alive until their moments' last phase reads them.)
    from flax import nnx

    from gradtx.contrib.flax import make_train_step

    def loss(model, x):
        return jnp.mean(model(x) ** 2)

    x = jax.random.normal(jax.random.key(0), (32, 256))
    temporaries = {}
    for name, tx in (("8-bit", OPTIMIZERS["adamw"]()), ("float32", FLOAT32["adamw"]())):
        model = _tower(8, 0, width=256)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        compiled = make_train_step(loss, packed=True).compile(model, optimizer, x)
        temporaries[name] = compiled.memory_analysis().temp_size_in_bytes
    size = 8 * (256 * 256 + 256)
    extra = temporaries["8-bit"] - temporaries["float32"]
    assert extra < 0.25 * size, f"{extra / size:.2f} bytes per parameter of temporaries beyond float32 states'"


@pytest.mark.parametrize("interleaved", [False, True], ids=["merged", "interleaved"])
def test_a_packed_buffer_of_many_segments(interleaved):
    # Twelve runs of distinct shapes: more pieces than XLA:CPU fuses into one concatenation (8).
    # In the block layout, consecutive runs are stored as one flat group: no temporaries. With a
    # flat-layout run between each (nothing merges), the update is written out once, in place
    # piece by piece (4 bytes per parameter). Before: 8.05 (pieces, then their concatenation)
    # and, before the segments, 19.
    shapes = [(128 + 8 * i, 256) for i in range(12)]
    if interleaved:
        shapes += [(110 + 7 * i, 300) for i in range(12)]  # flat layout, sizes between those of the others
    arrays = [jnp.full(shape, 0.5) for shape in shapes for _ in range(2)]
    params = gradtx.pack(arrays)
    grads = gradtx.pack([x * 0.1 for x in arrays], params.layout)
    size = sum(x.size for x in arrays)
    extra = _temporaries(OPTIMIZERS["adamw"](), params, grads) - _temporaries(FLOAT32["adamw"](), params, grads)
    bound = 4.25 if interleaved else 0.25
    assert extra < bound * size, f"{extra / size:.2f} bytes per parameter of temporaries beyond float32 states'"


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_the_dynamic_code_keeps_the_float32_copies_away_too(name):
    params, grads = _problem()
    dynamic = DYNAMIC[name]()
    extra = _temporaries(dynamic, params, grads[0]) - _temporaries(FLOAT32[name](), params, grads[0])
    assert extra < 4 * SIZE, f"{extra / SIZE:.2f} bytes per parameter of temporaries beyond float32 states'"


@pytest.mark.parametrize("shape", [(64, 1024), (48, 1000)], ids=["blocks_tile_rows", "flat_layout"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_recomputed_step_gives_the_numbers_of_the_plain_step(name, shape):
    # Eagerly, store() takes the plain path (quantize the materialized moment); under jit the
    # three-phase one. From the same state, the same numbers up to the last float32 bit (and a
    # code step where a value sits on a rounding boundary).
    tx = OPTIMIZERS[name]()
    params, grads = _problem(shape)
    state = tx.init(params)
    jitted = jax.jit(_step(tx))
    for g in grads:
        eager_params, eager_state = _step(tx)(params, state, g)
        jit_params, jit_state = jitted(params, state, g)
        np.testing.assert_allclose(np.asarray(jit_params), np.asarray(eager_params), rtol=1e-6, atol=1e-7)
        assert jax.tree.structure(jit_state) == jax.tree.structure(eager_state)
        for x, y in zip(jax.tree.leaves(jit_state), jax.tree.leaves(eager_state), strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            if x.dtype == jnp.uint8:
                steps = np.abs(np.asarray(x, np.int32) - np.asarray(y, np.int32))
                assert steps.max() <= 1 and (steps > 0).mean() < 1e-3
            else:
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
        params, state = eager_params, eager_state


def test_phases_run_only_for_traced_8bit_moments():
    calls = []

    def per_leaf(g, m):
        calls.append(recompute.current() and recompute.current().name)
        return g, gradtx.tree.store(gradtx.tree.load(m) + g, m)

    quantized = gradtx.quantize_blockwise(jnp.zeros(4096), signed=True)
    recompute.map_moments(per_leaf, jnp.ones(4096), quantized)  # eager: one plain call
    assert calls == [None]
    calls.clear()
    jax.jit(lambda g, m: recompute.map_moments(per_leaf, g, m))(jnp.ones(4096), quantized)
    assert calls == ["scales", "values", "codes"]
    calls.clear()
    jax.jit(lambda g, m: recompute.map_moments(per_leaf, g, m))(jnp.ones(4096), jnp.zeros(4096))
    assert calls == [None]


def test_a_nan_gradient_stays_in_its_block():
    # The phases' hidden zeros come from the block maxima; a NaN there must not reach other blocks.
    tx = gradtx.adam(1e-3, state_dtype=gradtx.Quantized8bit())
    params = jnp.ones(8192)
    grads = jnp.full(8192, 0.5).at[0].set(jnp.nan)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    finite = np.isfinite(np.asarray(updates))
    assert not finite[0] and finite[256:].all()
    assert np.isfinite(np.asarray(state[0].mu.scales)[1:]).all()
