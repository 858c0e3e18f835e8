"""Interoperability: gradtx inside Optax and Flax NNX, Optax inside gradtx."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from problems import mlp_regression, run
from registry import ALL

import gradtx


def test_gradtx_inside_optax_chain_matches_pure_optax():
    params, loss = mlp_regression()
    mixed = optax.chain(gradtx.clip_by_global_norm(1.0), gradtx.scale_by_adam(), optax.scale(-1e-2))
    pure = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale(-1e-2))
    ours, _ = run(mixed, params, loss, 30, optax.apply_updates)
    theirs, _ = run(pure, params, loss, 30, optax.apply_updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ours, theirs)


def test_optax_inside_gradtx_chain_receives_no_unknown_extra_args():
    params, loss = mlp_regression()
    mixed = gradtx.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), gradtx.scale(-1e-2))
    pure = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale(-1e-2))
    ours, _ = run(mixed, params, loss, 30, gradtx.apply_updates, some_extra_argument=1.0)
    theirs, _ = run(pure, params, loss, 30, optax.apply_updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ours, theirs)


class Regressor(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 16, rngs=rngs)
        self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


@pytest.mark.parametrize("entry", ALL, ids=str)
def test_flax_nnx_optimizer(entry):
    model = Regressor(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, entry.make(**dict(entry.network_kwargs)), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (32, 4))
    y = jnp.sin(x.sum(axis=1, keepdims=True))

    @nnx.jit
    def train_step(model, optimizer):
        def loss_of(m):
            return jnp.mean((m(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_of)(model)
        extra = {}
        if entry.needs_obj_fn:
            graphdef, _ = nnx.split(model, nnx.Param)
            extra = {"obj_fn": lambda params: loss_of(nnx.merge(graphdef, params))}
        optimizer.update(model, grads, **extra)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(30)]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]
    assert model.hidden.kernel[...].dtype == jnp.float32


def test_flax_linen_train_state():
    from flax import linen
    from flax.training import train_state

    class Linear(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(1)(jnp.tanh(linen.Dense(16)(x)))

    model = Linear()
    x = jax.random.normal(jax.random.key(1), (32, 4))
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    state = train_state.TrainState.create(apply_fn=model.apply, params=model.init(jax.random.key(0), x), tx=gradtx.lamb(5e-2))

    @jax.jit
    def step(state):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((state.apply_fn(p, x) - y) ** 2))(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for _ in range(60):
        state, loss = step(state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 60
