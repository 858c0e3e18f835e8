"""Optimizer state on device meshes: placement that follows the parameters, and ZeRO-1.

The multi-device checks live in tests/sharding_checks.py and run here in a subprocess on 8
simulated CPU devices (``XLA_FLAGS`` must be set before JAX is imported, and this process
imported it with one device). A failure of the subprocess fails this test with its output.
The tests below it run in-process on one device.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import gradtx

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_sharding_checks_on_8_simulated_devices():
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()}
    env["JAX_PLATFORMS"] = "cpu"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:xdist",
        "-o",
        "addopts=",
        "-q",
        "-s",
        "-p",
        "no:cacheprovider",
        os.path.join(TESTS, "sharding_checks.py"),
    ]
    result = subprocess.run(command, cwd=os.path.dirname(TESTS), env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"sharding checks failed (exit {result.returncode}):\n{output[-8000:]}"
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) >= 60, output[-3000:]
    print("\n".join(re.findall(r"FIGURE .*", output)))


def _one_device_mesh():
    return Mesh(np.array(jax.devices()[:1]), ("data",))


@pytest.mark.parametrize(
    "shape, expected",
    [((8, 3), 0), ((3, 16), 1), ((6, 16, 8), 1), ((3, 5), None), ((), None), ((0, 8), 1), ((10, 16, 16), 1), ((12, 16, 16), 0)],
)
def test_zero1_dim_prefers_the_leading_then_the_largest_divisible_dimension(shape, expected):
    assert gradtx.zero1_dim(shape, 4) == expected


def test_zero1_on_one_device_is_the_inner_optimizer():
    params = {"w": jnp.linspace(-1.0, 1.0, 24).reshape(8, 3), "b": jnp.ones(3)}
    grads = jax.tree.map(jnp.cos, params)
    inner = gradtx.lamb(1e-2)
    tx = gradtx.zero1(inner, _one_device_mesh())
    expected_updates, expected_state = inner.update(grads, inner.init(params), params)
    updates, state = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    assert jax.tree.structure(state) == jax.tree.structure(expected_state)
    for a, b in zip(jax.tree.leaves((expected_updates, expected_state)), jax.tree.leaves((updates, state)), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6)


def test_zero1_rejects_bad_arguments():
    mesh = _one_device_mesh()
    with pytest.raises(TypeError, match=r"zero1: inner must be a gradient transformation"):
        gradtx.zero1(gradtx.adam, mesh)
    with pytest.raises(TypeError, match=r"zero1: mesh must be a jax.sharding.Mesh, got 'data'"):
        gradtx.zero1(gradtx.adam(1e-3), "data")
    with pytest.raises(ValueError, match=r"zero1: axis must be one of the mesh's axis names \('data',\), got 'batch'"):
        gradtx.zero1(gradtx.adam(1e-3), mesh, axis="batch")
    explicit = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with pytest.raises(ValueError, match=r"zero1: axis 'data' of mesh must be an Auto"):
        gradtx.zero1(gradtx.adam(1e-3), explicit)


def test_state_shardings_and_abstract_state_describe_the_state_without_creating_it():
    tx = gradtx.inject_hyperparams(gradtx.adamw)(learning_rate=1e-3)
    params = {"w": jax.ShapeDtypeStruct((4, 2), jnp.bfloat16), "b": jax.ShapeDtypeStruct((2,), jnp.float32)}
    state = tx.init(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params))
    abstract = gradtx.abstract_state(tx, params)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
        assert (a.shape, a.dtype) == (x.shape, x.dtype) and a.sharding.is_fully_replicated
    shardings = gradtx.state_shardings(tx, params)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    with pytest.raises(TypeError, match="state_shardings: tx must be a gradient transformation"):
        gradtx.state_shardings(gradtx.adamw, params)


def test_zeros_like_keeps_shape_dtype_and_strong_type():
    zeros = gradtx.tree.zeros_like({"a": jnp.asarray(1.0), "b": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16)}, None)
    traced = jax.jit(gradtx.tree.zeros_like, static_argnums=1)(jnp.ones((2, 3)), jnp.bfloat16)
    assert zeros["a"].shape == () and not zeros["a"].weak_type and zeros["b"].dtype == jnp.bfloat16
    assert traced.dtype == jnp.bfloat16 and not traced.weak_type and float(jnp.abs(traced).sum()) == 0.0


def test_device_bytes_counts_what_one_device_holds():
    assert gradtx.device_bytes({"w": jnp.zeros((4, 2)), "n": jnp.zeros([], jnp.int32), "none": None}) == 36
    assert gradtx.device_bytes({}) == 0


def test_zeros_like_derived_shapes_dtypes_and_fallback():
    params = {"w": jnp.ones((4, 6)), "b": jnp.ones(6)}
    shapes = {"w": jax.ShapeDtypeStruct((6,), jnp.bfloat16), "b": jax.ShapeDtypeStruct((1,), jnp.float32)}
    derived = jax.jit(lambda p: gradtx.tree.zeros_like_derived(shapes, p))(params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), derived) == jax.tree.map(lambda s: (s.shape, s.dtype), shapes)
    # Another structure than the parameters' (e.g. stacked shapes of a packed layout): plain zeros_like.
    other = [jax.ShapeDtypeStruct((2, 3), jnp.float32)]
    assert gradtx.tree.zeros_like_derived(other, params)[0].shape == (2, 3)


def test_zero1_passes_none_updates_through():
    params = {"w": jnp.ones((8, 2)), "frozen": jnp.ones(3)}
    tx = gradtx.zero1(gradtx.sgd(0.1), _one_device_mesh())
    updates, _ = jax.jit(tx.update)({"w": jnp.ones((8, 2)), "frozen": None}, tx.init(params), params)
    assert updates["frozen"] is None and updates["w"].shape == (8, 2)
