"""Sharding checks on 8 simulated CPU devices (run by tests/test_sharding.py in a subprocess).

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX is imported,
and the main test process has already imported it with one device; test_sharding.py runs
``pytest tests/sharding_checks.py`` in a fresh process with the flag. Every mesh here is
built with ``jax.sharding.Mesh`` (``Auto`` axes, JAX's sharding propagation decides), except
where ``Explicit`` axes are the point.

Layouts on a 2x4 ``("data", "model")`` mesh: data-parallel (parameters split along ``data``,
FSDP-style), model-parallel (along ``model``) and mixed (both axes, plus a replicated leaf
whose shape divides nothing).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from registry import ALL, BY_NAME

import gradtx

if jax.device_count() != 8:
    raise RuntimeError(
        f"tests/sharding_checks.py needs 8 devices, got {jax.device_count()}: run it with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_sharding.py does)"
    )

MESH = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
DATA_MESH = Mesh(np.array(jax.devices()), ("data",))
LAYOUTS = {
    "data_parallel": {"w": P("data", None), "b": P(), "odd": P()},
    "model_parallel": {"w": P(None, "model"), "b": P("model"), "odd": P()},
    "mixed": {"w": P("data", "model"), "b": P("model"), "odd": P()},
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")


def _loss(params):
    return sum(jnp.sum(jnp.cos(x) * x**2) for x in jax.tree.leaves(params))


def _params():
    return {
        "w": jnp.linspace(-1.0, 1.0, 64 * 128, dtype=jnp.float32).reshape(64, 128),
        "b": jnp.linspace(-0.5, 0.3, 128, dtype=jnp.float32),
        "odd": jnp.linspace(0.1, 0.9, 15, dtype=jnp.float32).reshape(3, 5),
    }


def _place(tree, layout, mesh=MESH):
    return {k: jax.device_put(v, NamedSharding(mesh, LAYOUTS[layout][k])) for k, v in tree.items()}


def _grads(params):
    return jax.grad(_loss)(params)


# The wrappers, each around an optimizer whose state they extend.
WRAPPERS = {
    "lookahead": lambda: gradtx.lookahead_wrapper(gradtx.adam(1e-2), sync_period=2, slow_step_size=0.5),
    "lookahead_reset": lambda: gradtx.lookahead_wrapper(gradtx.adam(1e-2), sync_period=2, slow_step_size=0.5, reset_state=True),
    "schedule_free": lambda: gradtx.schedule_free(gradtx.sgd(1.0), learning_rate=1e-2),
    "sam": lambda: gradtx.sam(gradtx.sgd(1e-2, momentum=0.9)),
    "inject_hyperparams": lambda: gradtx.inject_hyperparams(gradtx.adamw)(learning_rate=1e-2, weight_decay=1e-2),
    "accumulate_gradients": lambda: gradtx.accumulate_gradients(gradtx.adam(1e-2), 2),
    "clip_by_global_norm+adam": lambda: gradtx.chain(gradtx.clip_by_global_norm(0.1), gradtx.adam(1e-2)),
    "adafactor_factored": lambda: gradtx.adafactor(1e-2, min_dim_size_to_factor=8),
    "adam_8bit": lambda: gradtx.adam(1e-2, state_dtype=gradtx.Quantized8bit(min_size=16)),
    # Unfactored 8-bit second moments (factoring off): created from the parameter, so placed like it.
    "adafactor_8bit": lambda: gradtx.adafactor(1e-2, factored=False, state_dtype=gradtx.Quantized8bit(min_size=16)),
}
FACTORIES = {**{e.name: e.make for e in ALL}, **WRAPPERS}


def _extra_args(name):
    if name == "sam":
        return {"grad_fn": _grads}
    if name in BY_NAME:
        return BY_NAME[name].extra_args(_loss)
    return {}


# 8-bit moments whose blocks span a sharded dimension: each device takes the maxima of its part
# of every block, and an all-reduce (or all-gather) of block maxima, never of the moment, combines them.
BLOCK_REDUCED = {"adam_8bit", "adafactor_8bit"}
# Optimizers with per-layer reductions (norms, means, factored moments); the others are elementwise.
PER_LAYER = {
    "lamb",
    "lars",
    "novograd",
    "ranger",
    "sam",
    "clip_by_global_norm+adam",
    "adafactor_factored",
    "adafactor",
    "adafactor_8bit",
}


def _param_of(path, params):
    """The parameter a state leaf tracks: its path ends with the parameter's key, shapes equal."""
    key = jax.tree_util.keystr(path)
    for name, p in params.items():
        if key.endswith(f"['{name}']"):
            return p
    return None


def _spread_over_mesh(x, mesh):
    return isinstance(x.sharding, NamedSharding) and set(x.sharding.device_set) == set(mesh.devices.flat)


def _check_follows(state, params, mesh=MESH, *, eager=False):
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        where = f"state{jax.tree_util.keystr(path)}"
        if eager and leaf.ndim == 0 and not leaf.committed:
            continue  # an eager scalar is uncommitted: jit places it with the other arguments
        assert _spread_over_mesh(leaf, mesh), f"{where}: {leaf.sharding} is not on the mesh"
        p = _param_of(path, params)
        if p is not None and p.shape == leaf.shape:
            assert leaf.sharding.is_equivalent_to(p.sharding, leaf.ndim), f"{where}: {leaf.sharding} != {p.sharding}"
        elif leaf.ndim == 0:
            assert leaf.sharding.is_fully_replicated, f"{where}: scalar {leaf.sharding} is not replicated"


def _types(tree):
    """The tree structure and every leaf's ``jax.typeof`` (pytree nodes such as 8-bit moments compare by structure)."""
    return jax.tree.structure(tree), [jax.typeof(x) for x in jax.tree.leaves(tree)]


def _collectives(compiled_text):
    return {c: len(re.findall(rf"\b{c}(?:-start)?\(", compiled_text)) for c in COLLECTIVES}


def _collective_elements(compiled_text):
    """For each collective of the compiled program, the element count of its largest result array."""
    sizes = {c: [] for c in COLLECTIVES}
    for line in compiled_text.splitlines():
        for c in COLLECTIVES:
            found = re.search(rf"=\s*(.*?)\s{c}(?:-start)?\(", line)
            if found:
                shapes = re.findall(r"\w+\[([\d,]*)\]", found.group(1))
                sizes[c].append(max(int(np.prod([int(n) for n in s.split(",") if n])) for s in shapes))
    return sizes


def _scales(state):
    return [x.scales for x in jax.tree.leaves(state, is_leaf=gradtx.tree.is_quantized) if gradtx.tree.is_quantized(x)]


def _update_step(name):
    tx = FACTORIES[name]()
    return jax.jit(lambda g, s, p: tx.update(g, s, p, **_extra_args(name)))


# 1. State follows its parameter's sharding.


@pytest.mark.parametrize("name", list(FACTORIES))
def test_jitted_init_state_follows_params_and_update_keeps_it(name):
    params = _place(_params(), "mixed")
    state = jax.jit(FACTORIES[name]().init)(params)
    _check_follows(state, params)
    step = _update_step(name).lower(_grads(params), state, params).compile()
    updates, new_state = step(_grads(params), state, params)
    assert _types(new_state) == _types(state)
    for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True):
        assert after.sharding.is_equivalent_to(before.sharding, after.ndim), (before.sharding, after.sharding)
    for p, u in zip(jax.tree.leaves(params), jax.tree.leaves(updates), strict=True):
        assert u.sharding.is_equivalent_to(p.sharding, u.ndim)
    counts = _collectives(step.as_text())
    if name in BLOCK_REDUCED:
        # Mixed layout: w's blocks (two rows) span its "model" shards, b's one block all of b.
        largest = max(x.size for x in _scales(state))
        sizes = _collective_elements(step.as_text())
        assert counts["all-reduce"] > 0 and counts["all-gather"] == 0, counts
        assert all(n <= largest for c in COLLECTIVES for n in sizes[c]), (sizes, largest)
    elif name in PER_LAYER:
        # Per-layer reductions: partial sums and an all-reduce, never an all-gather of a whole array.
        assert counts["all-reduce"] > 0 and counts["all-gather"] == 0, counts
    else:
        # Elementwise: the sharded update needs no communication at all.
        assert not any(counts.values()), counts


@pytest.mark.parametrize("layout", ["data_parallel", "model_parallel"])
@pytest.mark.parametrize("name", ["adam", "lamb", "schedule_free_adamw"])
def test_state_follows_params_in_every_layout(name, layout):
    params = _place(_params(), layout)
    state = jax.jit(FACTORIES[name]().init)(params)
    _check_follows(state, params)
    _, new_state = _update_step(name)(_grads(params), state, params)
    _check_follows(new_state, params)


def test_optax_init_puts_the_moments_on_one_device_gradtx_shards_them():
    param = jax.device_put(jnp.ones((64, 128)), NamedSharding(MESH, P("data", "model")))
    optax_mu = jax.jit(optax.adam(1e-3).init)(param)[0].mu
    gradtx_mu = jax.jit(gradtx.adam(1e-3).init)(param)[0].mu
    assert len(optax_mu.sharding.device_set) == 1  # Optax 0.2.8: the whole (64, 128) moment on device 0
    assert gradtx_mu.sharding.is_equivalent_to(param.sharding, 2)
    assert gradtx.device_bytes(gradtx_mu) == 64 * 128 * 4 // 8


def test_eager_init_follows_concrete_shardings():
    params = _place(_params(), "mixed")
    _check_follows(gradtx.adamw(1e-2).init(params), params, eager=True)


@pytest.mark.parametrize(
    "name", ["adam", "lamb", "novograd", "adafactor", "lookahead", "schedule_free", "inject_hyperparams", "adam_8bit"]
)
def test_state_from_shape_dtype_structs(name):
    params = _place(_params(), "mixed")
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    tx = FACTORIES[name]()
    reference = jax.jit(tx.init)(params)
    # The abstract state: shapes, dtypes and shardings, nothing allocated.
    abstract = gradtx.abstract_state(tx, abstract_params)
    assert jax.tree.structure(abstract) == jax.tree.structure(reference)
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(reference), strict=True):
        assert (a.shape, a.dtype) == (r.shape, r.dtype)
        assert a.sharding.is_equivalent_to(r.sharding, r.ndim)
    # The state created from abstract parameters, which are never materialised.
    state = jax.jit(lambda: tx.init(abstract_params))()
    _check_follows(state, params)


def test_explicit_axes_carry_the_sharding_in_the_type():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    param = jax.device_put(jnp.ones((64, 128)), NamedSharding(mesh, P("data", "model")))
    with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else jax.set_mesh(mesh):
        tx = gradtx.scale_by_adam()
        state = jax.jit(tx.init)(param)
        _, new_state = jax.jit(tx.update)(param, state, param)
    assert jax.typeof(state.mu) == jax.typeof(param)
    assert jax.typeof(new_state.mu) == jax.typeof(state.mu)


@pytest.mark.parametrize("name", sorted(PER_LAYER - {"adafactor"}))
def test_per_layer_reductions_match_one_device(name):
    params = _params()
    sharded = _place(params, "mixed")
    tx = FACTORIES[name]()
    single_state, sharded_state = tx.init(params), jax.jit(tx.init)(sharded)
    single_step = jax.jit(lambda g, s, p: tx.update(g, s, p, **_extra_args(name)))
    sharded_step = _update_step(name)
    for _ in range(3):
        u1, single_state = single_step(_grads(params), single_state, params)
        u8, sharded_state = sharded_step(_grads(sharded), sharded_state, sharded)
        params, sharded = gradtx.apply_updates(params, u1), gradtx.apply_updates(sharded, u8)
    for a, b in zip(jax.tree.leaves((params, single_state)), jax.tree.leaves((sharded, sharded_state)), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


# 8-bit moments: codes placed like the parameter, scales like its leading dimensions.

EIGHT_BIT = {
    # (shape, layout): the scales' expected spec. (64, 128): blocks of two 128-element rows,
    # scales (32,); (256, 512): two blocks per row, scales (256, 2). The mesh axes of the
    # dimensions a block spans are dropped (their shards hold parts of every block).
    ((64, 128), "data_parallel"): P("data"),
    ((64, 128), "model_parallel"): P(),
    ((64, 128), "mixed"): P("data"),
    ((256, 512), "data_parallel"): P("data", None),
    ((256, 512), "model_parallel"): P(),  # 128-column shards, 256-element blocks
    ((256, 512), "mixed"): P("data", None),
}


def _8bit_adam():
    return gradtx.adam(1e-2, state_dtype=gradtx.Quantized8bit())


@pytest.mark.parametrize("shape, layout", list(EIGHT_BIT))
def test_8bit_moments_are_placed_like_their_parameter(shape, layout):
    param = jax.device_put(jnp.linspace(-1.0, 1.0, np.prod(shape)).reshape(shape), NamedSharding(MESH, LAYOUTS[layout]["w"]))
    abstract = jax.ShapeDtypeStruct(shape, param.dtype, sharding=param.sharding)
    tx = _8bit_adam()
    states = {
        "jit": jax.jit(tx.init)(param),
        "eager": tx.init(param),
        "abstract": jax.jit(lambda: tx.init(abstract))(),
    }
    expected = NamedSharding(MESH, EIGHT_BIT[shape, layout])
    for how, state in states.items():
        for moment in (state[0].mu, state[0].nu):
            assert moment.codes.shape == shape and moment.codes.dtype == jnp.uint8, how
            assert moment.codes.sharding.is_equivalent_to(param.sharding, 2), (how, moment.codes.sharding)
            assert moment.scales.sharding.is_equivalent_to(expected, moment.scales.ndim), (how, moment.scales.sharding)
    abstract_state = gradtx.abstract_state(tx, abstract)
    assert abstract_state[0].mu.scales.sharding.is_equivalent_to(expected, abstract_state[0].mu.scales.ndim)

    # The update keeps every placement and type (also from the eagerly created state), and communicates
    # block maxima only: no collective moves more elements than a moment has blocks.
    grads = jnp.cos(param)
    step = jax.jit(tx.update)
    for state in states.values():
        _, new_state = step(grads, state, param)
        moments = lambda s: (s[0].mu, s[0].nu)  # noqa: E731 (an eager step counter is uncommitted: jit places it)
        assert _types(moments(new_state)) == _types(moments(state))
        for before, after in zip(jax.tree.leaves(moments(state)), jax.tree.leaves(moments(new_state)), strict=True):
            assert after.sharding.is_equivalent_to(before.sharding, after.ndim), (before.sharding, after.sharding)
    compiled = step.lower(grads, states["jit"], param).compile().as_text()
    sizes = _collective_elements(compiled)
    blocks = np.prod(shape) // 256
    assert all(n <= blocks for c in COLLECTIVES for n in sizes[c]), sizes
    print(
        f"FIGURE 8-bit adam {shape} {layout}: collectives {_collectives(compiled)}, largest {max(sum(sizes.values(), [0]))} elements"
    )

    # The numbers are those of one device (the max of a block's shards is the block's max).
    single_state = tx.init(np.asarray(param))
    single_updates, single_state = jax.jit(tx.update)(np.asarray(grads), single_state, np.asarray(param))
    updates, new_state = step(grads, states["jit"], param)
    np.testing.assert_array_equal(np.asarray(updates), np.asarray(single_updates))
    for a, b in zip(jax.tree.leaves(single_state), jax.tree.leaves(new_state), strict=True):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


@pytest.mark.parametrize("shape, layout", list(EIGHT_BIT))
def test_8bit_moments_on_explicit_axes_carry_their_sharding_in_the_type(shape, layout):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    spec = LAYOUTS[layout]["w"]
    param = jax.device_put(jnp.linspace(-1.0, 1.0, np.prod(shape)).reshape(shape), NamedSharding(mesh, spec))
    tx = _8bit_adam()
    with jax.set_mesh(mesh):
        grads = jnp.cos(param)
        state = jax.jit(tx.init)(param)
        step = jax.jit(tx.update)
        updates, new_state = step(grads, state, param)
        compiled = step.lower(grads, state, param).compile().as_text()
    mu = state[0].mu
    assert jax.typeof(mu.codes).sharding.spec == jax.typeof(param).sharding.spec
    assert mu.scales.sharding.is_equivalent_to(NamedSharding(mesh, EIGHT_BIT[shape, layout]), mu.scales.ndim)
    assert _types(new_state) == _types(state) and jax.typeof(updates) == jax.typeof(param)
    sizes = _collective_elements(compiled)
    assert all(n <= np.prod(shape) // 256 for c in COLLECTIVES for n in sizes[c]), sizes
    single = jax.jit(tx.update)(np.asarray(grads), tx.init(np.asarray(param)), np.asarray(param))
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves((updates, new_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_8bit_per_device_bytes_on_a_2x4_mesh():
    params = {"big": jnp.ones((256, 512)), "small": jnp.ones((64, 128))}
    figures = {}
    for layout in ("data_parallel", "model_parallel", "mixed"):
        placed = {k: jax.device_put(v, NamedSharding(MESH, LAYOUTS[layout]["w"])) for k, v in params.items()}
        eight_bit = jax.jit(_8bit_adam().init)(placed)
        float32 = jax.jit(gradtx.adam(1e-2).init)(placed)
        scales = _scales(eight_bit)
        scale_bytes = sum(s.addressable_shards[0].data.nbytes for s in scales)
        ways = {"data_parallel": 2, "model_parallel": 4, "mixed": 8}[layout]
        codes_bytes = 2 * sum(p.size for p in params.values()) // ways  # two moments, a byte per element
        assert gradtx.device_bytes(eight_bit) == codes_bytes + scale_bytes + 4  # + the step counter
        assert gradtx.device_bytes(float32) == 4 * codes_bytes + 4
        figures[layout] = (gradtx.device_bytes(eight_bit), gradtx.device_bytes(float32))
    # Scales replicated over "model" (blocks span its shards), split over "data" where it shards rows.
    assert [s.size for s in _scales(eight_bit)] == [512, 32, 512, 32]
    assert figures["data_parallel"][0] > figures["model_parallel"][0] > figures["mixed"][0]
    total = {
        k: sum(x.nbytes for x in jax.tree.leaves(jax.jit(f().init)(params)))
        for k, f in (("8bit", _8bit_adam), ("f32", lambda: gradtx.adam(1e-2)))
    }
    for layout, (eight, f32) in figures.items():
        print(
            f"FIGURE 8-bit adam per-device state bytes on 2x4, {layout}, (256, 512) + (64, 128): {eight} "
            f"(float32 adam {f32}; unsharded 8-bit {total['8bit']}, float32 {total['f32']}; 8-bit/float32 {eight / f32:.4f})"
        )


def test_8bit_flat_layout_stays_on_the_mesh_and_keeps_its_placement():
    # (24, 48) with 256-element blocks: 1152 elements, 4.5 blocks straddling rows: the flat layout.
    param = jax.device_put(jnp.linspace(-1.0, 1.0, 24 * 48).reshape(24, 48), NamedSharding(MESH, P("data", "model")))
    tx = gradtx.adam(1e-2, state_dtype=gradtx.Quantized8bit(min_size=16))
    for jitted in (True, False):
        state = jax.jit(tx.init)(param) if jitted else tx.init(param)
        assert state[0].mu.codes.shape == (24 * 48,) and state[0].mu.scales.shape == (5,)
        assert all(_spread_over_mesh(x, MESH) for x in jax.tree.leaves((state[0].mu, state[0].nu)))
        step = jax.jit(lambda g, s, p: tx.update(g, s, p))
        _, new_state = step(jnp.cos(param), state, param)
        _, newer_state = step(jnp.cos(param), new_state, param)
        moments = [(s[0].mu, s[0].nu) for s in (state, newer_state)]
        for before, after in zip(*map(jax.tree.leaves, moments), strict=True):
            assert after.sharding.is_equivalent_to(before.sharding, after.ndim), (before.sharding, after.sharding)
        # One program (an eager state's uncommitted step counter is placed by the first step: two).
        assert step._cache_size() == (1 if jitted else 2)


# 2. ZeRO-1: state sharded over the data axis, parameters replicated.


def _model(widths=(16, 64, 10)):
    keys = jax.random.split(jax.random.key(0), len(widths))
    params = {f"w{i}": jax.random.normal(keys[i], (a, b)) / np.sqrt(a) for i, (a, b) in enumerate(zip(widths, widths[1:]))}
    params.update({f"b{i}": jnp.zeros(b) for i, b in enumerate(widths[1:])})
    params["odd"] = jnp.full((3, 5), 0.1, jnp.float32)  # no dimension divides 8: stays replicated
    return params


def _batch_loss(params, x, y):
    h = x
    for i in range(2):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        h = jnp.tanh(h) if i < 1 else h
    return jnp.mean((h + jnp.sum(params["odd"]) - y) ** 2)


def _train(tx, params, x, y, steps=3):
    state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, state, x, y):
        updates, state = tx.update(jax.grad(_batch_loss)(params, x, y), state, params)
        return gradtx.apply_updates(params, updates), state

    types = _types(state)
    shardings = [x.sharding for x in jax.tree.leaves(state)]
    for _ in range(steps):
        params, state = step(params, state, x, y)
    assert _types(state) == types
    assert all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(jax.tree.leaves(state), shardings, strict=True))
    assert step._cache_size() == 1  # the state's placement is a fixed point: no recompilation
    return params, state


ZERO1 = {
    "adamw": lambda: gradtx.adamw(1e-2, weight_decay=0.1),
    "lamb": lambda: gradtx.lamb(1e-2, weight_decay=0.01),
    "adafactor": lambda: gradtx.adafactor(1e-2, min_dim_size_to_factor=8),
    "lookahead(adam)": lambda: gradtx.lookahead_wrapper(gradtx.adam(1e-2), sync_period=2, slow_step_size=0.5),
    # 64-element blocks so that the small model's matrices are quantized: w0 (16, 64) in one-row
    # blocks, w1 (64, 10) in the flat layout (its 10-element rows straddle blocks).
    "adamw_8bit": lambda: gradtx.adamw(1e-2, weight_decay=0.1, state_dtype=gradtx.Quantized8bit(block_size=64, min_size=256)),
}


def _expected_bytes(state, axis_size):
    return sum(
        x.nbytes // axis_size if gradtx.zero1_dim(x.shape, axis_size) is not None else x.nbytes for x in jax.tree.leaves(state)
    )


def _max_relative_difference(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / max(np.max(np.abs(np.asarray(x))), 1e-30))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        if np.size(x)
    )


@pytest.mark.parametrize("name", list(ZERO1))
def test_zero1_shards_the_state_and_matches_the_unsharded_run(name):
    replicated = NamedSharding(DATA_MESH, P())
    params = jax.device_put(_model(), replicated)
    x = jax.device_put(jax.random.normal(jax.random.key(1), (64, 16)), NamedSharding(DATA_MESH, P("data")))
    y = jax.device_put(jax.random.normal(jax.random.key(2), (64, 10)), NamedSharding(DATA_MESH, P("data")))
    plain_params, plain_state = _train(ZERO1[name](), params, x, y)
    zero_params, zero_state = _train(gradtx.zero1(ZERO1[name](), DATA_MESH, axis="data"), params, x, y)
    assert jax.tree.structure(zero_state) == jax.tree.structure(plain_state)
    assert all(p.sharding.is_fully_replicated for p in jax.tree.leaves(zero_params))
    plain_bytes, zero_bytes = gradtx.device_bytes(plain_state), gradtx.device_bytes(zero_state)
    assert plain_bytes == sum(x.nbytes for x in jax.tree.leaves(plain_state))  # replicated: all of it on each device
    assert zero_bytes == _expected_bytes(plain_state, 8)
    difference = _max_relative_difference((plain_params, plain_state), (zero_params, zero_state))
    print(
        f"FIGURE zero1 {name}: per-device state bytes {zero_bytes} vs {plain_bytes} "
        f"(ratio {zero_bytes / plain_bytes:.4f}), max relative difference {difference:.2e}"
    )
    assert difference <= 1e-6


@pytest.mark.parametrize("name", list(ZERO1))
def test_zero1_per_device_bytes_approach_one_eighth(name):
    shapes = {"w": (1024, 512), "v": (512, 1024), "b": (512,)}
    params = jax.device_put({k: jnp.ones(shape) for k, shape in shapes.items()}, NamedSharding(DATA_MESH, P()))
    plain = jax.jit(ZERO1[name]().init)(params)
    sharded = jax.jit(gradtx.zero1(ZERO1[name](), DATA_MESH).init)(params)
    ratio = gradtx.device_bytes(sharded) / gradtx.device_bytes(plain)
    print(
        f"FIGURE zero1 {name}, 1.05M parameters: per-device state bytes {gradtx.device_bytes(sharded)} "
        f"vs {gradtx.device_bytes(plain)}, ratio {ratio:.4f}"
    )
    # Only scalars (step counters) and Adafactor's (1,) placeholders stay whole on every device.
    assert ratio <= 1 / 8 + 0.002


def test_zero1_composes_with_model_parallelism():
    # Parameters split along "model" on dimension 1; ZeRO-1 adds "data" on dimension 0.
    params = _place(_params(), "model_parallel")
    tx = gradtx.zero1(gradtx.scale_by_adam(), MESH, axis="data")
    state = jax.jit(tx.init)(params)
    assert state.mu["w"].sharding.is_equivalent_to(NamedSharding(MESH, P("data", "model")), 2)
    updates, new_state = jax.jit(tx.update)(_grads(params), state, params)
    assert new_state.mu["w"].sharding.is_equivalent_to(state.mu["w"].sharding, 2)
    assert updates["w"].sharding.is_equivalent_to(params["w"].sharding, 2)
    expected, _ = gradtx.scale_by_adam().update(_grads(_params()), gradtx.scale_by_adam().init(_params()))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(updates), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


def test_zero1_eager_init_shards_concrete_state():
    params = jax.device_put(_model(), NamedSharding(DATA_MESH, P()))
    state = gradtx.zero1(gradtx.scale_by_adam(), DATA_MESH).init(params)
    assert state.mu["w0"].sharding.is_equivalent_to(NamedSharding(DATA_MESH, P("data")), 2)
    assert state.mu["odd"].sharding.is_fully_replicated and state.count.sharding.is_fully_replicated


def test_zeros_like_derived_places_row_and_column_statistics_like_their_parameter():
    params = _place(_params(), "mixed")  # w: P("data", "model")
    rows = {"w": jax.ShapeDtypeStruct((128,), jnp.float32), "b": jax.ShapeDtypeStruct((128,), jnp.float32),
            "odd": jax.ShapeDtypeStruct((1,), jnp.float32)}  # fmt: skip
    columns = {**rows, "w": jax.ShapeDtypeStruct((64,), jnp.bfloat16)}
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    for derived in (
        jax.jit(lambda p: gradtx.tree.zeros_like_derived(rows, p))(params),
        gradtx.tree.zeros_like_derived(rows, params),
        jax.jit(lambda: gradtx.tree.zeros_like_derived(rows, abstract_params))(),
    ):
        assert derived["w"].sharding.is_equivalent_to(NamedSharding(MESH, P("model")), 1)  # w without its rows
        assert derived["b"].sharding.is_equivalent_to(params["b"].sharding, 1)  # same shape: like b
    derived = jax.jit(lambda p: gradtx.tree.zeros_like_derived(columns, p))(params)
    assert derived["w"].sharding.is_equivalent_to(NamedSharding(MESH, P("data")), 1) and derived["w"].dtype == jnp.bfloat16
    assert all(float(jnp.abs(x.astype(jnp.float32)).sum()) == 0.0 for x in jax.tree.leaves(derived))


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_zero1_update_is_computed_shard_wise(name):
    # One all-gather per split parameter (its update); gathering the state instead would add more.
    params = jax.device_put(_model(), NamedSharding(DATA_MESH, P()))
    tx = gradtx.zero1(ZERO1[name](), DATA_MESH)
    state = jax.jit(tx.init)(params)
    grads = jax.tree.map(jnp.cos, params)
    counts = _collectives(jax.jit(tx.update).lower(grads, state, params).compile().as_text())
    split = sum(gradtx.zero1_dim(p.shape, 8) is not None for p in jax.tree.leaves(params))
    assert counts["all-gather"] == split, counts


def test_zero1_8bit_update_is_computed_shard_wise():
    # Block layouts only (one-row and four-row blocks of 64): the update all-gathers each split
    # parameter's update and nothing else; ZeRO-1 slices of the rows hold whole blocks.
    params = jax.device_put({"w": jnp.ones((64, 256)), "v": jnp.ones((32, 16))}, NamedSharding(DATA_MESH, P()))
    tx = gradtx.zero1(gradtx.adamw(1e-2, state_dtype=gradtx.Quantized8bit(block_size=64, min_size=256)), DATA_MESH)
    state = jax.jit(tx.init)(params)
    assert [s.shape for s in _scales(state)] == [(8,), (64, 4), (8,), (64, 4)]
    assert all(x.sharding.is_equivalent_to(NamedSharding(DATA_MESH, P("data")), x.ndim) for x in _scales(state))
    grads = jax.tree.map(jnp.cos, params)
    sizes = _collective_elements(jax.jit(tx.update).lower(grads, state, params).compile().as_text())
    assert sorted(sizes["all-gather"]) == [32 * 16, 64 * 256] and not any(sizes[c] for c in COLLECTIVES if c != "all-gather"), (
        sizes
    )
    # Every array (codes and scales) split 8 ways; the step counters whole on every device.
    arrays, scalars = [x for x in jax.tree.leaves(state) if x.ndim], [x for x in jax.tree.leaves(state) if not x.ndim]
    assert gradtx.device_bytes(state) == sum(x.nbytes for x in arrays) // 8 + sum(x.nbytes for x in scalars)
