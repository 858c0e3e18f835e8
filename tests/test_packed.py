"""The packed layout: pack/unpack round trips, and every optimizer giving the per-array numbers on packed trees.

Tolerance of the packed-vs-per-array comparisons: ``rtol = atol = 1e-6`` in float32. The two
paths run the same per-array arithmetic; only reductions (norms, means) may be evaluated in
another order by XLA (a run of equal shapes is reduced as one ``(count, *shape)`` array), which
changes the last bit or two of a float32 sum (relative 1e-7) and a few steps of training
amplify that at most tenfold. Global structure errors (a norm over the whole buffer instead
of per array) change the numbers by orders of magnitude more, as the
``test_per_array_quantities_would_differ_over_the_whole_buffer`` guard shows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from tests.registry import ALL

RTOL = ATOL = 1e-6


def _tree(key):
    keys = jax.random.split(key, 7)
    # Arrays of different shapes and scales (per-array norms differ by 30x), two of one shape
    # (a run of two), a 3-d array, and one large enough for Adafactor to factor (>= 128).
    return {
        "dense": {"kernel": jax.random.normal(keys[0], (3, 4)), "bias": 0.1 * jax.random.normal(keys[1], (4,))},
        "layers": [3.0 * jax.random.normal(keys[2], (3, 4)), jax.random.normal(keys[3], (2, 3, 5))],
        "scale": jax.random.normal(keys[4], ()),
        "embedding": jax.random.normal(keys[5], (130, 129)),
        "half": jax.random.normal(keys[6], (6,)).astype(jnp.bfloat16),
    }


def _loss(params):
    return sum(jnp.sum(jnp.sin(x.astype(jnp.float32)) * x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(params))


def _packed_loss(packed):
    return _loss(gradtx.unpack(packed))


def _run(tx, params, steps, obj_fn, packed):
    state = tx.init(params)
    step = jax.jit(lambda p, s: _step(tx, p, s, obj_fn, packed))
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def _step(tx, params, state, obj_fn, packed):
    if packed:
        grads = gradtx.pack(jax.grad(_loss)(gradtx.unpack(params)), params.layout)
    else:
        grads = jax.grad(_loss)(params)
    updates, state = tx.update(grads, state, params, **obj_fn)
    return gradtx.apply_updates(params, updates), state


def _assert_trees_close(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("entry", ALL, ids=str)
def test_every_optimizer_gives_the_per_array_numbers_packed(entry):
    params = _tree(jax.random.key(0))
    steps = 12 if entry.needs_obj_fn else 4  # Sophia refreshes its Hessian estimate at step 11
    tx = entry.make()
    expected, state = _run(tx, params, steps, entry.extra_args(_loss), packed=False)
    packed_params, packed_state = _run(tx, gradtx.pack(params), steps, entry.extra_args(_packed_loss), packed=True)
    _assert_trees_close(gradtx.unpack(packed_params), expected)
    assert gradtx.state_bytes(packed_state) == gradtx.state_bytes(state)
    assert len(jax.tree.leaves(packed_params)) == 2  # one float32 and one bfloat16 buffer


def test_pack_unpack_round_trip_keeps_structure_dtypes_and_odd_leaves():
    tree = {
        "w": jnp.arange(6.0).reshape(2, 3),
        "empty": jnp.zeros((0, 4)),
        "scalar": jnp.float32(2.5),
        "none": None,
        "ints": jnp.arange(3, dtype=jnp.int32),
        "half": jnp.ones(2, jnp.bfloat16),
        "same": [jnp.ones((2, 3)), 2 * jnp.ones((2, 3))],
    }
    packed = gradtx.pack(tree)
    assert packed.layout.buffer_dtypes == ("bfloat16", "float32", "int32")
    assert packed.layout.buffer_sizes == (2, 1 + 6 * 3, 3)
    back = gradtx.unpack(packed)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_empty_tree_packs_to_no_buffers():
    packed = gradtx.pack({})
    assert packed.buffers == () and gradtx.unpack(packed) == {}
    tx = gradtx.adam(1e-3)
    updates, _ = tx.update(packed, tx.init(packed), packed)
    assert updates.buffers == ()


def test_equal_shapes_share_a_run_in_any_tree_order():
    tree = [jnp.ones(4), jnp.ones((2, 2)), jnp.ones(4), jnp.ones((2, 2)), jnp.ones(3)]
    layout = gradtx.packed_layout(tree)
    assert [(run.count, run.shape) for run in layout.runs] == [(1, (3,)), (2, (2, 2)), (2, (4,))]


def test_pack_rejects_a_layout_of_another_tree():
    layout = gradtx.packed_layout({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="pack: tree structure"):
        gradtx.pack({"b": jnp.ones(2)}, layout)


def test_map_arrays_rejects_packed_arguments_of_different_layouts():
    a, b = gradtx.pack([jnp.ones(2), jnp.ones(3)]), gradtx.pack([jnp.ones(3), jnp.ones(3)])
    with pytest.raises(ValueError, match="different layouts"):
        gradtx.map_arrays(lambda x, y: x + y, a, b)


def test_per_array_quantities_would_differ_over_the_whole_buffer():
    # The guard that makes the parity tests meaningful: on this tree a trust ratio computed over
    # the whole buffer is far from the per-array ones.
    params = _tree(jax.random.key(0))
    grads = jax.grad(_loss)(params)
    packed_params, packed_grads = gradtx.pack(params), gradtx.pack(grads)
    tx = gradtx.scale_by_trust_ratio()
    per_array = gradtx.unpack(tx.update(packed_grads, tx.init(packed_params), packed_params)[0])
    whole = [jnp.linalg.norm(b.astype(jnp.float32)) for b in packed_params.buffers]
    whole_grads = [jnp.linalg.norm(b.astype(jnp.float32)) for b in packed_grads.buffers]
    global_ratio = whole[1] / whole_grads[1]
    for g, p, u in zip(jax.tree.leaves(grads), jax.tree.leaves(params), jax.tree.leaves(per_array)):
        if p.dtype != jnp.float32:
            continue
        ratio = jnp.linalg.norm(p) / jnp.linalg.norm(g)
        np.testing.assert_allclose(u, g * ratio, rtol=RTOL, atol=ATOL)
    ratios = [jnp.linalg.norm(p) / jnp.linalg.norm(g) for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params))]
    assert max(abs(float(r / global_ratio) - 1) for r in ratios) > 0.5


def test_novograd_keeps_one_layer_norm_per_array_when_packed():
    params = _tree(jax.random.key(1))
    grads = jax.grad(_loss)(params)
    tx = gradtx.scale_by_novograd()
    packed_params = gradtx.pack(params)
    _, state = tx.update(gradtx.pack(grads), tx.init(packed_params), packed_params)
    layout = packed_params.layout
    nu = {}
    for run, stacked in zip(layout.runs, state.nu.arrays):
        assert stacked.shape == (run.count,)
        nu.update(zip(run.leaf_indices, stacked))
    for index, g in enumerate(jax.tree.leaves(grads)):
        expected = jnp.sum(jnp.square(g.astype(jnp.float32))).astype(nu[index].dtype)  # stored in the array's dtype
        np.testing.assert_allclose(np.float32(nu[index]), np.float32(expected), rtol=RTOL)


def test_per_element_repeats_each_arrays_value_over_its_elements():
    # Runs of two shapes in one buffer, another dtype in a second buffer, and a plain leaf beside.
    tree = [1.0 * jnp.ones((2, 3)), 2.0 * jnp.ones((4,)), 3.0 * jnp.ones((2, 3)), 4.0 * jnp.ones((5,), jnp.bfloat16)]
    packed = gradtx.pack(tree)
    values = gradtx.map_arrays(lambda x: jnp.max(x.astype(jnp.float32)), packed, kinds=("stacked",))
    expanded = gradtx.packed.per_element(values, packed)
    for got, want in zip(gradtx.unpack(expanded), tree, strict=True):
        np.testing.assert_array_equal(got, want.astype(jnp.float32))
    mixed = {"packed": packed, "plain": jnp.ones(3)}
    same = gradtx.packed.per_element({"packed": values, "plain": jnp.float32(7.0)}, mixed)
    assert float(same["plain"]) == 7.0 and gradtx.packed.is_packed(same["packed"])


def test_adafactor_factors_each_array_when_packed():
    params = {"a": jnp.ones((130, 129)), "b": 2 * jnp.ones((130, 129)), "c": jnp.ones((3, 5))}
    grads = jax.tree.map(lambda p: p * jnp.arange(p.shape[1]), params)
    tx = gradtx.factored_second_moment()
    _, per_array = tx.update(grads, tx.init(params), params)
    packed_params = gradtx.pack(params)
    _, state = tx.update(gradtx.pack(grads), tx.init(packed_params), packed_params)
    # The two (130, 129) arrays form one run: their row factors are stacked, one row per array.
    run = next(r for r, run in enumerate(packed_params.layout.runs) if run.shape == (130, 129))
    np.testing.assert_allclose(state.v_row.arrays[run], jnp.stack([per_array.v_row["a"], per_array.v_row["b"]]), rtol=RTOL)
    np.testing.assert_allclose(state.v_col.arrays[run], jnp.stack([per_array.v_col["a"], per_array.v_col["b"]]), rtol=RTOL)


@pytest.mark.parametrize(
    "make",
    [
        lambda: gradtx.adamw(1e-2, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
        lambda: gradtx.masked(
            gradtx.lamb(1e-2), {"dense": True, "layers": [False, True], "scale": False, "embedding": True, "half": False}
        ),
        lambda: gradtx.partition(
            {"lamb": gradtx.lamb(1e-2), "adam": gradtx.adam(1e-2), "frozen": gradtx.set_to_zero()},
            lambda p: {"dense": "lamb", "layers": ["adam", "frozen"], "scale": "adam", "embedding": "lamb", "half": "frozen"},
        ),
        lambda: gradtx.lars(0.1, weight_decay=1e-3, trust_ratio_mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    ],
    ids=["adamw-mask", "masked-lamb", "partition", "lars-mask"],
)
def test_masks_and_labels_name_arrays_of_the_original_tree(make):
    params = _tree(jax.random.key(2))
    tx = make()
    expected, state = _run(tx, params, 3, {}, packed=False)
    packed_params, packed_state = _run(tx, gradtx.pack(params), 3, {}, packed=True)
    _assert_trees_close(gradtx.unpack(packed_params), expected)
    assert gradtx.state_bytes(packed_state) == gradtx.state_bytes(state)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's copy insertion")
@pytest.mark.parametrize("name", ["novograd", "lamb", "lars", "adafactor"])
def test_packed_per_array_optimizers_copy_no_parameter_sized_buffer(name):
    # Structural (the compiled HLO), not timed: packed NovoGrad once computed its momentum on
    # the runs' reshaped views, and XLA then copied the parameters and the momentum (3x slower).
    params = gradtx.pack([jnp.full((64, 64), 0.5 + k) for k in range(16)])
    tx = getattr(gradtx, name)(1e-3)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return gradtx.apply_updates(params, updates), state

    jitted = jax.jit(step, donate_argnums=(0, 1), compiler_options=gradtx.compiler_options())
    text = jitted.lower(params, tx.init(params), params).compile().as_text()
    size = params.buffers[0].size
    copies = [line for line in text.splitlines() if " copy(" in line and str(size) in line.split("copy(")[0]]
    assert copies == []


def test_packed_step_does_not_recompile():
    params = gradtx.pack(_tree(jax.random.key(3)))
    tx = gradtx.lamb(1e-3)
    step = jax.jit(lambda p, s: _step(tx, p, s, {}, True))
    state = tx.init(params)
    params, state = step(params, state)
    params, state = step(params, state)
    assert step._cache_size() == 1
