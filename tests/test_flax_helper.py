"""The Flax NNX train-step helper: trains, matches ``nnx.jit`` exactly, donates, and its hooks work."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gradtx
from gradtx.contrib.flax import StepContext, make_eval_step, make_train_step


class MLP(nnx.Module):
    def __init__(self, rngs, norm: bool = False):
        self.hidden = nnx.Linear(4, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, rngs=rngs) if norm else None
        self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        h = self.hidden(x)
        if self.norm is not None:
            h = self.norm(h)
        return self.out(nnx.relu(h))


def mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@pytest.fixture(scope="module")
def batch():
    x = jax.random.normal(jax.random.key(0), (32, 4))
    return x, jnp.sum(jnp.sin(x), axis=1, keepdims=True)


def _model_and_optimizer(tx, norm=False):
    model = MLP(nnx.Rngs(0), norm=norm)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def _arrays(*nodes):
    return jax.tree.leaves(nnx.as_pure(nnx.state(nodes)))


def test_trains_and_matches_a_plain_nnx_jit_step(batch):
    adam = gradtx.adam
    model, optimizer = _model_and_optimizer(adam(1e-2))
    ref_model, ref_optimizer = _model_and_optimizer(adam(1e-2))

    @nnx.jit
    def plain_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(mse)(model, x, y)
        optimizer.update(model, grads)
        return loss

    step = make_train_step(mse)
    losses, ref_losses = [], []
    for _ in range(25):
        losses.append(float(step(model, optimizer, *batch)))
        ref_losses.append(float(plain_step(ref_model, ref_optimizer, *batch)))
    assert losses[-1] < 0.5 * losses[0]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for ours, reference in zip(_arrays(model, optimizer), _arrays(ref_model, ref_optimizer)):
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-7)
    assert int(optimizer.step[...]) == 25


@pytest.mark.parametrize("donate", [True, False])
def test_buffers_are_donated_only_when_asked(batch, donate):
    model, optimizer = _model_and_optimizer(gradtx.sgd(0.1, momentum=0.9))
    step = make_train_step(mse, donate=donate)
    step(model, optimizer, *batch)  # the first call's inputs are the initial arrays
    before = model.hidden.kernel.get_raw_value()
    step(model, optimizer, *batch)
    assert before.is_deleted() is donate
    assert model.hidden.kernel.get_raw_value() is not before


def test_non_parameter_state_is_written_back(batch):
    model, optimizer = _model_and_optimizer(gradtx.adam(1e-2), norm=True)
    mean_before = np.asarray(model.norm.mean[...])
    make_train_step(mse)(model, optimizer, *batch)
    assert not np.allclose(model.norm.mean[...], mean_before)  # BatchNorm statistics updated in place


def test_has_aux_returns_loss_and_aux(batch):
    model, optimizer = _model_and_optimizer(gradtx.adam(1e-2))

    def loss_with_prediction_mean(model, x, y):
        prediction = model(x)
        return jnp.mean((prediction - y) ** 2), jnp.mean(prediction)

    loss, aux = make_train_step(loss_with_prediction_mean, has_aux=True)(model, optimizer, *batch)
    assert loss.shape == () and aux.shape == ()


def test_ahead_of_time_compile_is_reused_and_reset_rebinds(batch):
    model, optimizer = _model_and_optimizer(gradtx.adam(1e-2))
    step = make_train_step(mse)
    compiled = step.compile(model, optimizer, *batch)
    assert isinstance(compiled, jax.stages.Compiled)
    first = step(model, optimizer, *batch)
    assert float(step(model, optimizer, *batch)) < float(first)
    other_model, other_optimizer = _model_and_optimizer(gradtx.adam(1e-2))
    step.reset()
    assert float(step(other_model, other_optimizer, *batch)) == pytest.approx(float(first), rel=1e-6)


def test_sam_hook_matches_the_functional_sam_train_step(batch):
    tx = gradtx.sam(gradtx.sgd(0.05, momentum=0.9), rho=0.05)
    model, optimizer = _model_and_optimizer(tx)
    graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)

    def pure_loss(params, x, y):
        return mse(nnx.merge(graphdef, params), x, y)

    reference = jax.jit(gradtx.sam_train_step(pure_loss, tx))
    state = tx.init(params)
    seen = []

    def extra_args(context: StepContext):
        seen.append(context)
        return {"grad_fn": context.grad_fn}

    step = make_train_step(mse, extra_args=extra_args)
    for _ in range(3):
        loss = step(model, optimizer, *batch)
        params, state, reference_loss = reference(params, state, *batch)
        np.testing.assert_allclose(loss, reference_loss, rtol=1e-6)
    for ours, theirs in zip(jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param))), jax.tree.leaves(params)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    assert len(seen) == 1 and isinstance(seen[0].value, jax.core.Tracer)  # the hook runs once, while tracing


def test_eval_step_uses_eval_params_and_leaves_the_model_alone(batch):
    eval_params = gradtx.schedule_free_eval_params
    model, optimizer = _model_and_optimizer(gradtx.schedule_free_sgd(0.05))
    step = make_train_step(mse)
    for _ in range(5):
        step(model, optimizer, *batch)
    trained = [np.asarray(a) for a in _arrays(model)]
    evaluate = make_eval_step(mse, eval_params=eval_params)
    evaluated = evaluate(model, optimizer, *batch)

    params = nnx.as_pure(nnx.state(model, nnx.Param))
    expected_model = nnx.clone(model)
    nnx.update(expected_model, eval_params(nnx.as_pure(optimizer.opt_state), params))
    np.testing.assert_allclose(evaluated, mse(expected_model, *batch), rtol=1e-6)
    assert not np.isclose(float(evaluated), float(mse(model, *batch)))  # x differs from the trained y
    for after, before in zip(_arrays(model), trained):
        np.testing.assert_array_equal(after, before)
    assert float(make_eval_step(mse)(model, None, *batch)) == pytest.approx(float(mse(model, *batch)), rel=1e-6)


def test_arguments_are_validated():
    with pytest.raises(TypeError, match="make_train_step: loss_fn must be callable, got 3"):
        make_train_step(3)
    with pytest.raises(ValueError, match=r"make_train_step: has_aux must be one of \(False, True\), got 2"):
        make_train_step(mse, has_aux=2)
    with pytest.raises(TypeError, match="make_train_step: extra_args must be None or callable"):
        make_train_step(mse, extra_args={"grad_fn": None})
    with pytest.raises(TypeError, match="make_eval_step: eval_params must be None or callable"):
        make_eval_step(mse, eval_params="x")


# The packed fast path (make_train_step(..., packed=True)): same numbers as the per-array step.

PACKED_RTOL = PACKED_ATOL = 1e-6  # the same arithmetic; reductions may run in another order (see test_packed.py)


def _trajectory(tx_factory, batch, packed, steps=4, norm=False):
    model, optimizer = _model_and_optimizer(tx_factory(), norm=norm)
    step = make_train_step(mse, packed=packed)
    losses = [float(step(model, optimizer, *batch)) for _ in range(steps)]
    if packed:
        step.sync()
    return losses, model, optimizer, step


@pytest.mark.parametrize(
    "tx_factory",
    [lambda: gradtx.adamw(1e-2, weight_decay=0.1), lambda: gradtx.lamb(1e-2), lambda: gradtx.novograd(1e-2),
     lambda: gradtx.adafactor(1e-2, min_dim_size_to_factor=4)],
    ids=["adamw", "lamb", "novograd", "adafactor"],
)  # fmt: skip
def test_packed_step_follows_the_per_array_trajectory(batch, tx_factory):
    losses, model, optimizer, _ = _trajectory(tx_factory, batch, packed=False)
    packed_losses, packed_model, packed_optimizer, step = _trajectory(tx_factory, batch, packed=True)
    np.testing.assert_allclose(packed_losses, losses, rtol=PACKED_RTOL)
    for a, b in zip(jax.tree.leaves(nnx.state(packed_model)), jax.tree.leaves(nnx.state(model)), strict=True):
        np.testing.assert_allclose(a, b, rtol=PACKED_RTOL, atol=PACKED_ATOL)
    # sync() gives the optimizer back its per-array state, equal to the per-array run's.
    for a, b in zip(
        jax.tree.leaves(nnx.as_pure(packed_optimizer.opt_state)), jax.tree.leaves(nnx.as_pure(optimizer.opt_state)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=PACKED_RTOL, atol=PACKED_ATOL)
    assert int(packed_optimizer.step[...]) == int(optimizer.step[...]) == 4
    assert step._jitted._cache_size() == 1  # no recompilation after the first step


def test_packed_step_writes_back_batch_statistics(batch):
    # SGD: with BatchNorm the hidden bias gets a gradient of rounding noise, which Adam would
    # normalise to +-1 steps; SGD keeps such noise at its size, so the runs stay comparable.
    losses, model, _, _ = _trajectory(lambda: gradtx.sgd(0.1, momentum=0.9), batch, packed=False, norm=True)
    packed_losses, packed_model, _, _ = _trajectory(lambda: gradtx.sgd(0.1, momentum=0.9), batch, packed=True, norm=True)
    np.testing.assert_allclose(packed_losses, losses, rtol=PACKED_RTOL)
    np.testing.assert_allclose(packed_model.norm.mean[...], model.norm.mean[...], rtol=PACKED_RTOL, atol=PACKED_ATOL)
    assert float(jnp.max(jnp.abs(packed_model.norm.mean[...]))) > 0  # the statistics did move


def test_packed_step_holds_the_state_and_repacks_a_changed_model(batch):
    model, optimizer = _model_and_optimizer(gradtx.adam(1e-2))
    step = make_train_step(mse, packed=True)
    step(model, optimizer, *batch)
    assert all(isinstance(x, gradtx.Packed) for x in (step.opt_state[0].mu, step.packed_params))
    with pytest.raises(RuntimeError, match="deleted"):
        np.asarray(optimizer.opt_state[0].mu["hidden"]["kernel"][...])  # the step owns the state now
    # Changing the model between steps: the next step starts from the model's new values.
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    nnx.update(model, zeros)
    step(model, optimizer, *batch)
    hidden = gradtx.unpack(step.packed_params)["hidden"]["kernel"]
    np.testing.assert_array_equal(hidden, model.hidden.kernel[...])
    assert float(jnp.max(jnp.abs(hidden))) < 0.1  # one Adam step (lr 1e-2) from zero, not from the old weights
    expected = gradtx.unpack_state(step.opt_state)[0].mu["hidden"]["kernel"]
    step.reset()  # gives the optimizer its state back before forgetting
    np.testing.assert_array_equal(optimizer.opt_state[0].mu["hidden"]["kernel"][...], expected)
    step(model, optimizer, *batch)
    assert int(optimizer.step[...]) == 3
