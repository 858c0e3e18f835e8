"""Small optimization problems shared by the contract and parity tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def abs_sq(x):
    return jnp.real(x * jnp.conj(x))


def parabola(dtype):
    """A separable quadratic with its minimum at (1, -1, 1) (times 1 + 1j for complex dtypes)."""
    start = jnp.array([-1.0, 10.0, 1.0], dtype=dtype)
    target = jnp.array([1.0, -1.0, 1.0], dtype=dtype)
    if jnp.iscomplexobj(target):
        target = target * (1 + 1j)
    return start, target, lambda p: jnp.sum(abs_sq(p - target))


def rosenbrock(dtype):
    """Rosenbrock's banana valley with its minimum at (a, a^2), a = 1 (or 1 + 1j)."""
    a = 1.0 + 1j if jnp.issubdtype(dtype, jnp.complexfloating) else 1.0
    start = jnp.zeros(2, dtype)
    target = jnp.array([a, a**2], dtype=dtype)
    return start, target, lambda p: abs_sq(a - p[0]) + 100.0 * abs_sq(p[1] - p[0] ** 2)


def tree_params(dtype=jnp.float32):
    """A nested parameter tree of mixed shapes (matrix large enough to be factored, vector, list)."""
    rng = np.random.default_rng(0)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(160, 130)), dtype), "bias": jnp.asarray(rng.normal(size=(130,)), dtype)},
        "scale": [jnp.asarray(rng.normal(size=(3,)), dtype)],
    }


def tree_loss(params):
    """A quadratic over every leaf of a parameter tree (for optimizers that need an objective)."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(params))


def tree_grads(params, seed=1):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) for k, x in zip(keys, leaves)])


def mlp_regression():
    """A 4-32-32-1 tanh MLP regression on fixed data: (params, loss(params))."""
    rng = np.random.default_rng(42)
    x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
    y = jnp.sin(x @ jnp.asarray([1.0, -2.0, 0.5, 1.5])) [:, None]
    sizes = [4, 32, 32, 1]
    params = [
        {"kernel": jnp.asarray(rng.normal(size=(m, n)) / np.sqrt(m), jnp.float32), "bias": jnp.zeros(n, jnp.float32)}
        for m, n in zip(sizes[:-1], sizes[1:])
    ]

    def loss(params):
        h = x
        for layer in params[:-1]:
            h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
        out = h @ params[-1]["kernel"] + params[-1]["bias"]
        return jnp.mean((out - y) ** 2)

    return params, loss


def run(tx, params, loss, steps, apply_updates, **extra_args):
    """Run ``steps`` jitted optimizer steps in one ``lax.scan``; returns the final params and the losses."""

    def step(carry, _):
        params, state = carry
        value, grads = jax.value_and_grad(loss)(params)
        grads = jax.tree.map(jnp.conj, grads)
        updates, state = tx.update(grads, state, params, **extra_args)
        return (apply_updates(params, updates), state), value

    (params, _), losses = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=steps))(params)
    return params, losses


def assert_relative_close(actual, expected, tolerance=1e-5):
    """Every leaf: ``max |a - b| <= tolerance * max |b|`` (relative to the leaf's scale)."""

    def check(path, a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(np.max(np.abs(b)), 1e-12)
        difference = np.max(np.abs(a - b)) / scale
        assert difference <= tolerance, f"{jax.tree_util.keystr(path)}: relative difference {difference:.2e} > {tolerance:g}"

    jax.tree_util.tree_map_with_path(check, actual, expected)
