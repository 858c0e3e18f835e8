"""The JAX side of the reference problem (see tests/reference/common.py) and the fixture loader."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "reference"))
from common import FIXTURES, data  # noqa: E402


def load_fixture(name: str) -> dict:
    with open(os.path.join(FIXTURES, f"{name}.json")) as f:
        return json.load(f)


def jax_problem(dtype=jnp.float32):
    """``(params {"kernel": (in, out), "bias"}, loss(params))`` in JAX, the same function as the PyTorch side."""
    x, y, kernel, bias = data()
    x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    params = {"kernel": jnp.asarray(kernel, dtype), "bias": jnp.asarray(bias, dtype)}

    def loss(p):
        return jnp.mean((jnp.tanh(x @ p["kernel"] + p["bias"]) - y) ** 2) + 0.01 * jnp.sum(p["kernel"] ** 2)

    return params, loss


def trajectory(tx, steps, dtype=jnp.float32, apply=None, **extra_args):
    """Params after each of ``steps`` gradtx steps on the reference problem, as float64 NumPy arrays."""
    import gradtx

    params, loss = jax_problem(dtype)
    apply = apply or gradtx.apply_updates

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params, **extra_args)
        return apply(params, updates), state

    state = tx.init(params)
    out = []
    for _ in range(steps):
        params, state = step(params, state)
        out.append(jax.tree.map(lambda x: np.asarray(x, np.float64), params))
    return out


def assert_matches_fixture(ours: list, fixture: dict, rtol: float = 1e-5) -> None:
    """Each step's params agree with the reference's to ``max|a-b| <= rtol * max|b|`` per leaf."""
    assert len(ours) >= fixture["steps"] >= 50
    for step, (mine, reference) in enumerate(zip(ours, fixture["trajectory"])):
        for key, expected in reference.items():
            expected = np.asarray(expected)
            difference = np.max(np.abs(mine[key] - expected)) / max(np.max(np.abs(expected)), 1e-12)
            assert difference <= rtol, f"{fixture['name']}: step {step + 1}, {key}: relative difference {difference:.2e} > {rtol:g}"
