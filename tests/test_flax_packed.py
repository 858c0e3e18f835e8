"""The packed Flax NNX step on a tower of layers: same numbers as the per-array step, state sync, compiled structure."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gradtx
from gradtx.bench.e2e import _tower
from gradtx.contrib.flax import make_train_step
from gradtx.packed import slice_offsets

RTOL = ATOL = 1e-6  # the same arithmetic; per-array reductions may be summed in another order (test_packed.py)


class Tower(nnx.Module):
    """Runs of equal shapes (three 16x16 kernels, four 16-biases) between arrays of other shapes."""

    def __init__(self, rngs):
        self.first = nnx.Linear(4, 16, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(3)])
        self.last = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        x = jnp.tanh(self.first(x))
        for block in self.blocks:
            x = jnp.tanh(block(x))
        return self.last(x)


def mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@pytest.fixture(scope="module")
def batch():
    x = jax.random.normal(jax.random.key(1), (16, 4))
    return x, jnp.cos(x).sum(axis=1, keepdims=True)


def _run(tx_factory, batch, packed, steps, sync_after=()):
    model = Tower(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx_factory(), wrt=nnx.Param)
    step = make_train_step(mse, packed=packed)
    losses = []
    for i in range(steps):
        losses.append(float(step(model, optimizer, *batch)))
        if packed and i + 1 in sync_after:
            step.sync()
    if packed:
        step.sync()
    return losses, model, optimizer, step


def _assert_close_trees(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


OPTIMIZERS = {
    "adamw": lambda: gradtx.adamw(1e-2, weight_decay=0.1),
    "lion": lambda: gradtx.lion(1e-3, weight_decay=0.1),
    "sgd_nesterov": lambda: gradtx.sgd(0.05, momentum=0.9, nesterov=True),
    "lamb": lambda: gradtx.lamb(1e-2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tower_variables_equal_the_per_array_step(batch, name):
    losses, model, optimizer, _ = _run(OPTIMIZERS[name], batch, packed=False, steps=5)
    packed_losses, packed_model, packed_optimizer, step = _run(OPTIMIZERS[name], batch, packed=True, steps=5)
    np.testing.assert_allclose(packed_losses, losses, rtol=RTOL)
    assert losses[-1] < losses[0]  # it trained, so the comparison compares moving values
    _assert_close_trees(nnx.state(packed_model), nnx.state(model))
    _assert_close_trees(nnx.as_pure(packed_optimizer.opt_state), nnx.as_pure(optimizer.opt_state))
    assert int(packed_optimizer.step[...]) == 5
    assert step._jitted._cache_size() == 1  # no recompilation after the first step


def test_sync_mid_training_leaves_the_trajectory_unchanged(batch):
    adamw = OPTIMIZERS["adamw"]
    losses, model, optimizer, _ = _run(adamw, batch, packed=False, steps=5)
    synced_losses, synced_model, synced_optimizer, step = _run(adamw, batch, packed=True, steps=5, sync_after=(2, 3))
    np.testing.assert_allclose(synced_losses, losses, rtol=RTOL)
    _assert_close_trees(nnx.state(synced_model), nnx.state(model))
    # The last sync wrote the state of step 5, not the one of the earlier syncs.
    _assert_close_trees(nnx.as_pure(synced_optimizer.opt_state), nnx.as_pure(optimizer.opt_state))
    # sync() hands out a copy: the step still owns its packed state and keeps training.
    before = jax.tree.leaves(nnx.as_pure(synced_optimizer.opt_state))
    step(synced_model, synced_optimizer, *batch)
    assert all(not a.is_deleted() for a in before if isinstance(a, jax.Array))


def test_sync_before_the_first_step_changes_nothing(batch):
    model = Tower(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, gradtx.adam(1e-2), wrt=nnx.Param)
    initial = [np.asarray(a) for a in jax.tree.leaves(nnx.as_pure(optimizer.opt_state))]
    step = make_train_step(mse, packed=True)
    step.sync()
    for a, b in zip(jax.tree.leaves(nnx.as_pure(optimizer.opt_state)), initial, strict=True):
        np.testing.assert_array_equal(a, b)


def test_offsets_live_on_the_device(batch):
    model = Tower(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, gradtx.adam(1e-2), wrt=nnx.Param)
    step = make_train_step(mse, packed=True)
    step(model, optimizer, *batch)
    # NumPy offsets would be transferred to the device at every call (one transfer per array).
    assert len(step._offsets) == step._binding.layout.num_arrays == 10
    assert all(isinstance(offset, jax.Array) and offset.dtype == jnp.int32 for offset in step._offsets)
    expected = [slot.offset for slot in step._binding.layout.slots]
    assert [int(offset) for offset in step._offsets] == expected


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_compiled_packed_step_copies_no_parameter_buffer(batch, name):
    # Lion's parameter step reads the old moment that its moment step overwrites in place:
    # without gradtx.compiler_options() XLA:CPU copies the whole moment first.
    model = Tower(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, OPTIMIZERS[name](), wrt=nnx.Param)
    step = make_train_step(mse, packed=True)
    text = step.compile(model, optimizer, *batch).as_text()
    size = step._binding.layout.buffer_sizes[0]
    assert re.search(rf"= f32\[{size}\]\S* concatenate\(", text)  # the gradients are packed in the step
    assert not re.search(rf"= f32\[{size}\]\S* copy\(", text)
    step(model, optimizer, *batch)  # the ahead-of-time executable runs


def test_unpack_at_offsets_equals_static_unpack():
    tree = {
        "w": jnp.arange(12.0).reshape(3, 4),
        "b": jnp.arange(4.0),
        "v": jnp.arange(4.0) + 10,
        "h": jnp.ones((2, 2), jnp.bfloat16),
        "i": jnp.arange(3, dtype=jnp.int32),
        "s": jnp.float32(7.0),
        "z": jnp.zeros((0, 3)),
    }
    packed = gradtx.pack(tree)
    offsets = [jnp.int32(o) for o in slice_offsets(packed.layout)]
    at_offsets = jax.jit(gradtx.unpack)(packed, offsets)
    static = gradtx.unpack(packed)
    for key in tree:
        assert at_offsets[key].dtype == static[key].dtype == tree[key].dtype
        np.testing.assert_array_equal(at_offsets[key], static[key])
        np.testing.assert_array_equal(at_offsets[key], tree[key])


def test_gradients_are_written_into_carried_buffers_not_temporaries():
    # A tower whose parameters dwarf its activations: were the per-array gradients
    # temporaries, they would all be alive at the concatenate (XLA:CPU allocates temporaries
    # at every call, and maps large ones anew: page faults at every step).
    model = _tower(8, 0, width=64)
    optimizer = nnx.Optimizer(model, gradtx.adamw(1e-3), wrt=nnx.Param)
    step = make_train_step(lambda m, x: jnp.mean(m(x) ** 2), packed=True)
    x = jnp.ones((2, 64))
    memory = step.compile(model, optimizer, x).memory_analysis()
    param_bytes = 4 * sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert memory.temp_size_in_bytes < param_bytes / 4
    per_array, packed = step._grads
    before = [np.asarray(g) for g in per_array]
    step(model, optimizer, x)
    per_array, packed = step._grads
    np.testing.assert_array_equal(gradtx.unpack(packed)["layers"][0]["kernel"], per_array[1])  # bias, kernel order
    assert any(not np.array_equal(a, b) for a, b in zip(before, per_array))  # this step's gradients
