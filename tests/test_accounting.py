"""Optimizer-state memory accounting: bytes of any state pytree, per parameter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx.state.accounting import state_bytes, state_bytes_per_parameter

PARAMS = {"w": jnp.zeros((256, 128)), "b": jnp.zeros((128,), jnp.bfloat16)}


def test_counts_every_array_leaf_by_its_dtype():
    state = {"m": jnp.zeros((3, 4), jnp.float32), "v": jnp.zeros((5,), jnp.bfloat16), "count": jnp.zeros([], jnp.int32)}
    assert state_bytes(state) == 12 * 4 + 5 * 2 + 4
    assert state_bytes({"numpy": np.zeros(10, np.int8), "none": None, "python": 0.5}) == 10  # non-arrays hold no memory


def test_shape_dtype_structs_count_like_arrays():
    adam = gradtx.adam(1e-3)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
    assert state_bytes(jax.eval_shape(adam.init, shapes)) == state_bytes(adam.init(PARAMS))


@pytest.mark.parametrize("name, kwargs, moments", [("sgd", {"momentum": 0.9}, 1), ("adam", {}, 2), ("lion", {}, 1)])
def test_bytes_per_parameter_of_common_optimizers(name, kwargs, moments):
    tx = getattr(gradtx, name)(1e-3, **kwargs)
    float32_only = {"w": PARAMS["w"]}
    assert state_bytes_per_parameter(tx.init(float32_only), float32_only) == pytest.approx(4 * moments, abs=1e-3)
    # Moments follow the parameter's dtype: the bfloat16 bias's take 2 bytes per element.
    expected = moments * (4 * 256 * 128 + 2 * 128) / (256 * 128 + 128)
    assert state_bytes_per_parameter(tx.init(PARAMS), PARAMS) == pytest.approx(expected, abs=1e-3)


def test_empty_params_are_rejected():
    with pytest.raises(ValueError, match="state_bytes_per_parameter: params must have at least one element, got 0"):
        state_bytes_per_parameter({}, {})
