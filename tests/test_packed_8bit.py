"""8-bit moments on the packed layout: per-array blocks, the per-array numbers, exact state conversions.

A packed 8-bit moment (``gradtx.packed.QuantizedBuffer``) stores each run of equal-shape arrays
as the per-array ``QuantizedArray``\\ s joined along their first axis (arrays whose blocks tile
them) or stacked along the run (the others), and the arrays under ``min_size`` unquantized, so
its codes and scales are those of the per-array state.

What is compared, and why so. Given the same parameters, gradients and state, one packed update
gives the per-array updates to ``rtol = atol = 1e-6`` (as on the float32 packed path,
``test_packed.py``: XLA may compile the same element-wise expression into other instructions in
a program with one leaf per array and in one with a few buffers, or sum a run's reduction in
another order, which changes the last bit), and the per-array state: bit for bit for SGD
momentum, otherwise up to that last bit, so a code may differ by one step where its
value lies on a rounding boundary. Over a free-running trajectory a last-bit difference in the
parameters can so move a moment by one code step (up to 1.6% of the block's absmax), which Adam
amplifies where a second moment rounds to zero; trajectories are therefore compared step by step
from the same inputs (the packed state converted from the per-array one), and free-running only
for SGD momentum and Lion.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gradtx
from gradtx.contrib.flax import make_train_step
from gradtx.packed import QuantizedBuffer

RTOL = ATOL = 1e-6
BF16_ULP = 2.0**-7  # spacing of bfloat16 values relative to the smallest value of their binade
POLICY = gradtx.Quantized8bit(min_size=1000)

OPTIMIZERS = {
    "adamw": lambda: gradtx.adamw(1e-2, weight_decay=0.1, state_dtype=POLICY),
    "lion": lambda: gradtx.lion(1e-3, state_dtype=POLICY),
    "sgd": lambda: gradtx.sgd(1e-2, momentum=0.9, state_dtype=POLICY),
    "lamb": lambda: gradtx.lamb(1e-2, state_dtype=POLICY),
    "lars": lambda: gradtx.lars(1e-2, state_dtype=POLICY),
    "novograd": lambda: gradtx.novograd(1e-2, state_dtype=POLICY),
    "adafactor": lambda: gradtx.adafactor(1e-2, momentum=0.9, min_dim_size_to_factor=128, state_dtype=POLICY),
}


def _tree(key):
    # Blocks that tile (two rows of 128, rows of 256, a vector of 512; a run of two (64, 128)),
    # blocks that do not ((3, 384) twice, a run; (1000,) twice, a run with a partial last block
    # in each array), arrays under min_size, a scalar, and a bfloat16 array in a buffer of its own.
    shapes = {"a": (64, 128), "b": (32, 256), "c": (512,), "d0": (3, 384), "d1": (3, 384), "e0": (1000,), "e1": (1000,)}
    shapes["f"] = (64, 128)
    shapes.update({"bias": (7,), "small": (10, 10), "scale": ()})
    keys = jax.random.split(key, len(shapes) + 1)
    tree = {name: jax.random.normal(k, shape) for k, (name, shape) in zip(keys, shapes.items())}
    tree["half"] = jax.random.normal(keys[-1], (40, 64)).astype(jnp.bfloat16)
    return tree


def _loss(params):
    return sum(jnp.sum(jnp.sin(x.astype(jnp.float32)) * x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(params))


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        # One bfloat16 unit in the last place where a bfloat16 value was rounded from float32
        # values that differ in their last bit.
        rtol = BF16_ULP if x.dtype == jnp.bfloat16 else RTOL
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=ATOL)


# Bit for bit: SGD's momentum is a multiply-add of the gradient and the old moment. Lion's is too,
# but the per-array 8-bit path computes it in three loops (gradtx.state.recompute: block maxima,
# update, codes) and XLA may contract the multiply-add in one of them and not in the packed program,
# so a block maximum may differ in its last float32 bit. In the others, XLA may compile an element-wise expression of the same inputs into other instructions
# in the two programs (which product a fused multiply-add contracts, a division by a scalar
# rewritten as a multiplication by its reciprocal) or reduce a run as one (count, *shape) array
# (NovoGrad's layer norm, Adafactor's statistics before its momentum): the last float32 bit of a
# value may differ, and an 8-bit code then by one step where that value lies on a rounding
# boundary (for a bfloat16 array, whose updates are rounded to bfloat16, at more elements).
BIT_EXACT = ("sgd",)


def _assert_equal_up_to_rounding(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        if x.dtype == jnp.uint8:
            assert np.max(np.abs(np.asarray(x, np.int32) - np.asarray(y, np.int32))) <= 1
        else:
            # The moments of the bfloat16 array are sums of updates rounded to bfloat16 (a chain
            # keeps the updates' dtype): a last-bit difference before that rounding is one
            # bfloat16 step after it, and a block maximum (a float32 scale) moves with it.
            rtol = BF16_ULP if "'half'" in jax.tree_util.keystr(path) else RTOL
            np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=ATOL)


def _quantized(state):
    return [
        x
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, gradtx.QuantizedArray))
        if isinstance(x, gradtx.QuantizedArray)
    ]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_packed_update_gives_the_per_array_numbers(name):
    tx = OPTIMIZERS[name]()
    params = _tree(jax.random.key(0))
    layout = gradtx.packed_layout(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    state = tx.init(params)
    assert _quantized(state), "the policy must quantize some arrays for this test to mean anything"
    for _ in range(5):  # along the per-array trajectory: codes and scales of every kind of block
        grads = jax.grad(_loss)(params)
        updates, new_state = update(grads, state, params)
        packed = gradtx.pack(params, layout)
        packed_updates, packed_state = update(gradtx.pack(grads, layout), gradtx.pack_state(tx, state, layout), packed)
        _assert_close(gradtx.unpack(packed_updates), updates)
        if name in BIT_EXACT:
            _assert_identical(gradtx.unpack_state(packed_state), new_state)
        else:
            _assert_equal_up_to_rounding(gradtx.unpack_state(packed_state), new_state)
        params, state = gradtx.apply_updates(params, updates), new_state


def _many_shapes(key, interleaved):
    # Twelve quantized shapes, and biases under min_size. Consecutive: all in the block layout
    # (an even number of 128-rows), merged into one flat group. Interleaved: every other one in
    # the flat layout (an odd number of rows), so nothing merges and the segments stay 13.
    rows = [8 + i for i in range(12)] if interleaved else [8 + 2 * i for i in range(12)]
    keys = jax.random.split(key, 24)
    params = {f"w{i:02d}": jax.random.normal(keys[i], (r, 128)) for i, r in enumerate(rows)}
    params.update({f"b{i:02d}": jax.random.normal(keys[12 + i], (r,)) for i, r in enumerate(rows)})
    return params


@pytest.mark.parametrize("interleaved", [False, True], ids=["merged", "interleaved"])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_a_buffer_of_many_segments_gives_the_per_array_numbers(name, interleaved):
    # More segments (runs of distinct shapes, unquantized arrays between them) than XLA:CPU
    # fuses into one concatenation: consecutive block-layout runs are stored as one flat group,
    # and where they cannot be, the update is assembled piece by piece in place.
    tx = OPTIMIZERS[name]()
    params = _many_shapes(jax.random.key(3), interleaved)
    layout = gradtx.packed_layout(params)
    grads = jax.grad(_loss)(params)
    state = tx.init(params)
    moment = [x for x in jax.tree.leaves(tx.init(gradtx.pack(params)), is_leaf=_is_buffer) if _is_buffer(x)][0]
    kinds = ["stacked" if q.codes.shape != q.shape else "joined" if q.codes.ndim > 1 else "flat group" for q in moment.runs]
    assert kinds == (["joined", "stacked"] * 6 if interleaved else ["flat group"]), kinds
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    packed_updates, packed_state = jax.jit(tx.update)(
        gradtx.pack(grads, layout), gradtx.pack_state(tx, state, layout), gradtx.pack(params, layout)
    )
    _assert_close(gradtx.unpack(packed_updates), updates)
    _assert_equal_up_to_rounding(gradtx.unpack_state(packed_state), new_state)
    # Exact conversions both ways, through the flat group too.
    _assert_identical(gradtx.unpack_state(gradtx.pack_state(tx, new_state, layout)), new_state)


def test_runs_in_the_block_layout_are_joined_and_the_others_stacked():
    # A run whose arrays' codes keep their shape is stored as their concatenation along the first
    # axis (its codes read and written in one shape, so a donated step updates them in place,
    # tests/test_recompute.py); the others are stacked along the run.
    mu = gradtx.adam(1e-3, state_dtype=POLICY).init(gradtx.pack(_tree(jax.random.key(2))))[0].mu
    stored = {tuple(q.codes.shape): (tuple(q.shape), tuple(q.scales.shape)) for b in mu.buffers for q in b.runs}
    assert stored == {
        (128, 128): ((128, 128), (64,)),  # "a" and "f", (64, 128) each: blocks of two rows
        (32, 256): ((32, 256), (32, 1)),  # "b"
        (40, 64): ((40, 64), (10,)),  # "half", in its bfloat16 buffer
        (2, 1152): ((3, 384), (2, 5)),  # "d0" and "d1": flat layout, blocks straddle rows
        (2, 1000): ((1000,), (2, 4)),  # "e0" and "e1": flat layout, a partial last block each
    }


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_packed_init_is_the_per_array_state_in_the_same_bytes(name):
    tx = OPTIMIZERS[name]()
    params = _tree(jax.random.key(1))
    packed = gradtx.pack(params)
    state, packed_state = tx.init(params), tx.init(packed)
    _assert_identical(gradtx.unpack_state(packed_state), state)
    assert gradtx.state_bytes(packed_state) == gradtx.state_bytes(state)
    buffers = [b for b in jax.tree.leaves(packed_state, is_leaf=_is_buffer) if _is_buffer(b)]
    assert buffers and all(q.codes.dtype == jnp.uint8 for b in buffers for q in b.runs)


@pytest.mark.parametrize("name", ["adamw", "novograd", "adafactor"])
def test_pack_state_and_unpack_state_convert_exactly_both_ways(name):
    tx = OPTIMIZERS[name]()
    params = _tree(jax.random.key(2))
    step = jax.jit(lambda p, s: _step(tx, p, s))
    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state)
    layout = gradtx.packed_layout(params)
    packed_state = jax.jit(lambda s: gradtx.pack_state(tx, s, layout))(state)
    _assert_identical(jax.jit(gradtx.unpack_state)(packed_state), state)
    _assert_identical(gradtx.pack_state(tx, gradtx.unpack_state(packed_state), layout), packed_state)
    assert gradtx.state_bytes(packed_state) == gradtx.state_bytes(state)


def _step(tx, params, state):
    updates, state = tx.update(jax.grad(_loss)(params), state, params)
    return gradtx.apply_updates(params, updates), state


def test_blocks_never_straddle_two_arrays():
    params = _tree(jax.random.key(3))
    packed = gradtx.pack(params)
    tx = OPTIMIZERS["sgd"]()
    momentum = jax.jit(lambda p, s: tx.update(p, s, p)[1])  # first step: the momentum is the gradient
    packed_state, state = momentum(packed, tx.init(packed)), momentum(params, tx.init(params))
    _assert_identical(gradtx.unpack_state(packed_state), state)
    # Guard: the whole buffer quantized in blocks of 256 (some of them across two arrays: the
    # (3, 384) arrays start at an offset that is not a multiple of 256) gives other numbers.
    buffer = packed.layout.buffer_dtypes.index("float32")
    moment = next(b for b in jax.tree.leaves(packed_state, is_leaf=_is_buffer) if _is_buffer(b) and b.buffer == buffer)
    slot = next(s for s in packed.layout.slots if s.path == "['d0']")
    assert slot.offset % 256
    whole = gradtx.dequantize_blockwise(gradtx.quantize_blockwise(packed.buffers[buffer], signed=True))
    d0 = slice(slot.offset, slot.offset + slot.size)
    np.testing.assert_array_equal(moment.dequantize()[d0], gradtx.dequantize_blockwise(_d0(state)).ravel())
    assert not np.array_equal(whole[d0], moment.dequantize()[d0])


def _is_buffer(x):
    return isinstance(x, QuantizedBuffer)


def _d0(state):
    return next(x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, dict)) if isinstance(x, dict))["d0"]


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_packed_8bit_step_compiles_once(name):
    tx = OPTIMIZERS[name]()
    packed = gradtx.pack(_tree(jax.random.key(4)))
    step = jax.jit(lambda p, s: _packed_step(tx, p, s), donate_argnums=(1,))
    state = tx.init(packed)
    for _ in range(3):
        packed, state = step(packed, state)
    assert step._cache_size() == 1


def _packed_step(tx, packed, state):
    grads = gradtx.pack(jax.grad(_loss)(gradtx.unpack(packed)), packed.layout)
    updates, state = tx.update(grads, state, packed)
    return gradtx.apply_updates(packed, updates), state


# The Flax NNX fast path: make_train_step(packed=True) with an 8-bit optimizer.


class Net(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(64, 128, rngs=rngs)  # kernel (64, 128): blocks of two rows
        self.b = nnx.Linear(128, 128, rngs=rngs)  # (128, 128): a run of one with the same blocks
        self.c = nnx.Linear(128, 384, rngs=rngs)  # (128, 384): blocks straddle rows (flat layout)
        self.d = nnx.Linear(384, 3, rngs=rngs)  # (384, 3) flat; biases under min_size

    def __call__(self, x):
        return self.d(jnp.tanh(self.c(jnp.tanh(self.b(jnp.tanh(self.a(x)))))))


def _mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@pytest.fixture(scope="module")
def batch():
    x = jax.random.normal(jax.random.key(5), (32, 64))
    return x, jnp.cos(x[:, :3])


def _model_and_optimizer(name):
    model = Net(nnx.Rngs(0))
    return model, nnx.Optimizer(model, OPTIMIZERS[name](), wrt=nnx.Param)


def _copy(node, like):
    # A deep copy of node's arrays into like (donating steps must not share buffers).
    nnx.update(like, jax.tree.map(jnp.copy, nnx.state(node)))


@pytest.mark.parametrize("name", ["adamw", "lamb", "lion"])
def test_flax_packed_step_gives_the_per_array_step_from_the_same_state(batch, name):
    model, optimizer = _model_and_optimizer(name)
    ref_model, ref_optimizer = _model_and_optimizer(name)
    step, ref_step = make_train_step(_mse, packed=True), make_train_step(_mse)
    for _ in range(5):
        _copy(model, ref_model)
        if step.opt_state is not None:
            step.sync()
        _copy(optimizer, ref_optimizer)
        loss, ref_loss = step(model, optimizer, *batch), ref_step(ref_model, ref_optimizer, *batch)
        np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
        _assert_close(nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param))
        step.sync()
        _assert_identical(nnx.as_pure(nnx.state(optimizer.opt_state)), nnx.as_pure(nnx.state(ref_optimizer.opt_state)))
    assert step._jitted._cache_size() == 1
    assert gradtx.state_bytes(step.opt_state) == gradtx.state_bytes(nnx.as_pure(ref_optimizer.opt_state))


@pytest.mark.parametrize("name", ["sgd", "lion"])
def test_flax_packed_step_follows_the_per_array_trajectory(batch, name):
    runs = []
    for packed in (False, True):
        model, optimizer = _model_and_optimizer(name)
        step = make_train_step(_mse, packed=packed)
        losses = [float(step(model, optimizer, *batch)) for _ in range(5)]
        if packed:
            step.sync()
        runs.append((losses, nnx.state(model, nnx.Param), nnx.as_pure(nnx.state(optimizer.opt_state))))
    (losses, params, state), (packed_losses, packed_params, packed_state) = runs
    np.testing.assert_allclose(packed_losses, losses, rtol=RTOL)
    _assert_close(packed_params, params)
    _assert_close(packed_state, state)


def test_a_per_array_checkpoint_restores_into_a_packed_run(batch):
    # The per-array state (what nnx.Optimizer checkpoints) goes into a packed step unchanged.
    model, optimizer = _model_and_optimizer("adamw")
    step = make_train_step(_mse)
    for _ in range(2):
        step(model, optimizer, *batch)
    saved_model, saved_optimizer = copy.deepcopy(nnx.state(model)), copy.deepcopy(nnx.state(optimizer))
    restored_model, restored_optimizer = _model_and_optimizer("adamw")
    nnx.update(restored_model, saved_model)
    nnx.update(restored_optimizer, saved_optimizer)
    packed_step = make_train_step(_mse, packed=True)
    packed_step(restored_model, restored_optimizer, *batch)
    step(model, optimizer, *batch)
    _assert_close(nnx.state(restored_model, nnx.Param), nnx.state(model, nnx.Param))
    packed_step.sync()
    _assert_identical(nnx.as_pure(nnx.state(restored_optimizer.opt_state)), nnx.as_pure(nnx.state(optimizer.opt_state)))


def test_pack_state_names_the_array_whose_moment_does_not_fit():
    params = _tree(jax.random.key(6))
    layout = gradtx.packed_layout(params)
    tx = OPTIMIZERS["adamw"]()
    unquantized = gradtx.adamw(1e-2, weight_decay=0.1, state_dtype=gradtx.Quantized8bit(min_size=10**6)).init(params)
    with pytest.raises(ValueError, match=r"pack_state: .* params\['half'\] must be a QuantizedArray of shape \(40, 64\)"):
        gradtx.pack_state(tx, unquantized, layout)

    def narrowed(x):  # the unquantized moments in bfloat16, the 8-bit ones kept
        return x.astype(jnp.bfloat16) if not isinstance(x, gradtx.QuantizedArray) and x.ndim else x

    narrow = jax.tree.map(narrowed, tx.init(params), is_leaf=lambda x: isinstance(x, gradtx.QuantizedArray))
    with pytest.raises(ValueError, match=r"params\['bias'\] must be an unquantized float32 array of shape \(7,\)"):
        gradtx.pack_state(tx, narrow, layout)


def test_map_arrays_refuses_an_8bit_packed_moment_with_a_way_out():
    packed = gradtx.pack(_tree(jax.random.key(7)))
    moment = OPTIMIZERS["adamw"]().init(packed)[0].mu
    with pytest.raises(TypeError, match=r"map_arrays: an 8-bit packed moment .*gradtx\.tree\.load"):
        gradtx.map_arrays(lambda p, m: p + m, packed, moment)
    loaded = jax.tree.map(gradtx.tree.load, moment, is_leaf=gradtx.tree.is_quantized)
    total = gradtx.map_arrays(lambda p, m: (p + m).astype(p.dtype), packed, loaded)  # the moment is zero
    _assert_identical(gradtx.unpack(total), gradtx.unpack(packed))
