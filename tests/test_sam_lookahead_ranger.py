"""SAM/ASAM, Lookahead and Ranger: parity with the authors' code (fixtures), the wrappers' contracts, composition, validation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import tree_grads, tree_params
from reference_problem import assert_matches_fixture, jax_problem, load_fixture, trajectory

import gradtx
from gradtx import tree
from gradtx.combine import chain, masked, partition
from gradtx.optimizers.adam import adam, adamw
from gradtx.optimizers.ranger import _rectification, ranger, scale_by_ranger_radam
from gradtx.optimizers.sgd import sgd
from gradtx.transforms.decay import add_decayed_weights
from gradtx.transforms.scaling import centralize
from gradtx.wrappers.inject import inject_hyperparams
from gradtx.wrappers.lookahead import LookaheadState, lookahead_slow_params, lookahead_wrapper
from gradtx.wrappers.sam import sam, sam_perturb, sam_train_step


def torch_sgd(lr, momentum, weight_decay=0.0):
    # torch.optim.SGD's coupled decay is added to the gradient before the momentum buffer.
    return chain(add_decayed_weights(weight_decay), sgd(lr, momentum=momentum))


def _sam_from(hp):
    return sam(torch_sgd(hp["lr"], hp["momentum"], hp["weight_decay"]), hp["rho"], adaptive=hp["adaptive"])


def _lookahead_from(hp):
    if hp["inner"] == "torch.optim.SGD":
        inner = torch_sgd(hp["lr"], hp["momentum"], hp["weight_decay"])
    else:
        inner = adam(hp["lr"], *hp["betas"], eps=hp["eps"])
    return lookahead_wrapper(inner, sync_period=hp["k"], slow_step_size=hp["alpha"])


def _ranger_from(hp):
    b1, b2 = hp.get("betas", (0.95, 0.999))
    explicit = {"b1": b1, "b2": b2, "eps": hp.get("eps"), "sync_period": hp.get("k"), "slow_step_size": hp.get("alpha"),
                "threshold": hp.get("N_sma_threshhold")}
    # Only what the fixture sets is passed: the others are gradtx's defaults, which must be the reference's.
    given = {k: v for k, v in explicit.items() if v is not None and (k not in ("b1", "b2") or "betas" in hp)}
    return ranger(learning_rate=hp["lr"], weight_decay=hp.get("weight_decay", 0.0), use_gc=hp.get("use_gc", False), **given)


BUILDERS = {
    "sam": _sam_from,
    "asam": _sam_from,
    "lookahead_sgd": _lookahead_from,
    "lookahead_adam": _lookahead_from,
    "ranger": _ranger_from,
    "ranger_pytorch_ranger": _ranger_from,
    "ranger2020": _ranger_from,
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_matches_the_authors_reference(name):
    fixture = load_fixture(name)
    _, loss = jax_problem()
    # SAM's second gradient comes through update's extra arguments, inside the jitted step.
    extra_args = {"grad_fn": jax.grad(loss)} if name in ("sam", "asam") else {}
    ours = trajectory(BUILDERS[name](fixture["hyperparameters"]), fixture["steps"], **extra_args)
    assert_matches_fixture(ours, fixture, rtol=1e-5)


# SAM / ASAM


def test_sam_perturb_is_the_papers_ascent_step():
    params = tree_params()
    grads = tree_grads(params)
    rho = 0.3
    e_sam, _ = sam_perturb(rho).update(grads, None, params)
    norm = math.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)))
    jax.tree.map(lambda e, g: np.testing.assert_allclose(e, rho * g / norm, rtol=1e-5), e_sam, grads)
    assert float(tree.global_norm(e_sam)) == pytest.approx(rho, rel=1e-5)

    e_asam, _ = sam_perturb(rho, adaptive=True).update(grads, None, params)
    pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(params))
    adaptive_norm = math.sqrt(sum(float(jnp.sum((jnp.abs(w) * g) ** 2)) for g, w in pairs))
    jax.tree.map(lambda e, g, w: np.testing.assert_allclose(e, rho * w**2 * g / adaptive_norm, rtol=1e-5), e_asam, grads, params)
    # ASAM's radius is measured after undoing T_w = |w|: ||e / |w||| = rho.
    assert float(tree.global_norm(jax.tree.map(lambda e, w: e / jnp.abs(w), e_asam, params))) == pytest.approx(rho, rel=1e-5)


def test_sam_perturb_skips_missing_gradients_and_needs_params_when_adaptive():
    grads = {"w": jnp.array([3.0, 4.0]), "frozen": None}
    perturbation, _ = sam_perturb(0.5).update(grads, None)
    assert perturbation["frozen"] is None
    np.testing.assert_allclose(perturbation["w"], [0.3, 0.4], rtol=1e-6)
    with pytest.raises(ValueError, match="sam_perturb: adaptive=True needs params"):
        sam_perturb(0.5, adaptive=True).update(grads, None)


def test_sam_under_jit_evaluates_grad_fn_at_the_perturbed_point():
    params, loss = jax_problem()
    base = torch_sgd(0.1, 0.9)
    tx = sam(base, rho=0.2)
    grads = jax.grad(loss)(params)
    updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=jax.grad(loss)))(grads, tx.init(params), params)

    norm = tree.global_norm(grads)
    perturbed = jax.tree.map(lambda w, g: w + 0.2 * g / norm, params, grads)
    expected, expected_state = base.update(jax.grad(loss)(perturbed), base.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), updates, expected)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), state.inner_state, expected_state)
    assert not np.allclose(updates["kernel"], base.update(grads, base.init(params), params)[0]["kernel"])


def test_sam_needs_grad_fn_and_params():
    params, loss = jax_problem()
    tx = sam(sgd(0.1))
    grads = jax.grad(loss)(params)
    with pytest.raises(ValueError, match="sam: update needs grad_fn"):
        tx.update(grads, tx.init(params), params)
    with pytest.raises(ValueError, match="sam: update needs params"):
        tx.update(grads, tx.init(params), grad_fn=jax.grad(loss))


def test_sam_train_step_returns_the_unperturbed_loss_and_the_first_pass_aux():
    params, loss = jax_problem()
    calls = []

    def loss_with_aux(p, scale):
        calls.append(None)
        value = scale * loss(p)
        return value, {"first_kernel": p["kernel"]}

    tx = sam(torch_sgd(0.05, 0.9), rho=0.1)
    step = jax.jit(sam_train_step(loss_with_aux, tx, has_aux=True))
    new_params, _, (value, aux) = step(params, tx.init(params), 2.0)
    assert float(value) == pytest.approx(2.0 * float(loss(params)), rel=1e-6)
    np.testing.assert_array_equal(aux["first_kernel"], params["kernel"])  # not the perturbed kernel
    reference = trajectory(tx, 1, grad_fn=jax.grad(lambda p: 2.0 * loss(p)))[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_params, reference)


def test_sam_train_step_with_an_optimizer_without_sam_is_an_ordinary_step():
    params, loss = jax_problem()
    tx = sgd(0.1)
    new_params, _, value = sam_train_step(loss, tx)(params, tx.init(params))
    expected = jax.tree.map(lambda w, g: w - 0.1 * g, params, jax.grad(loss)(params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_params, expected)
    assert float(value) == pytest.approx(float(loss(params)))


# Lookahead


def test_lookahead_keeps_slow_weights_and_synchronizes_every_k_steps():
    params, loss = jax_problem()
    tx = lookahead_wrapper(sgd(0.1), sync_period=3, slow_step_size=0.25)
    state = tx.init(params)
    np.testing.assert_array_equal(lookahead_slow_params(state, params)["kernel"], params["kernel"])
    update = jax.jit(tx.update)
    fast = params
    for t in range(1, 8):
        updates, state = update(jax.grad(loss)(fast), state, fast)
        fast = gradtx.apply_updates(fast, updates)
        if t == 6:  # after a synchronization the fast weights restart from the slow ones
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), fast, lookahead_slow_params(state, fast))
    # Algorithm 1 by hand.
    phi, theta = params, params
    for t in range(1, 8):
        theta = jax.tree.map(lambda w, g: w - 0.1 * g, theta, jax.grad(loss)(theta))
        if t % 3 == 0:
            phi = jax.tree.map(lambda p, w: p + 0.25 * (w - p), phi, theta)
            theta = phi
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), fast, theta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), lookahead_slow_params(state, fast), phi)
    assert int(state.count) == 7 and not np.allclose(phi["kernel"], theta["kernel"])


def test_slow_params_accessor_finds_the_state_anywhere_and_rejects_ambiguity():
    params, loss = jax_problem()
    grads = jax.grad(loss)(params)
    tx = chain(optax.clip_by_global_norm(10.0), lookahead_wrapper(sgd(0.1), sync_period=2, slow_step_size=0.5))
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
        params = gradtx.apply_updates(params, updates)
    slow = lookahead_slow_params(state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), slow, state[1].slow_params)
    with pytest.raises(ValueError, match="exactly one LookaheadState, found 0"):
        lookahead_slow_params(sgd(0.1).init(params), params)
    two = (state[1], state[1])
    with pytest.raises(ValueError, match="found 2"):
        lookahead_slow_params(two, params)


def test_lookahead_reset_state_reinitializes_the_inner_state_on_sync_only():
    params, loss = jax_problem()
    grads = jax.grad(loss)(params)
    tx = lookahead_wrapper(adam(0.01), sync_period=2, slow_step_size=0.5, reset_state=True)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    assert int(state.inner_state[0].count) == 1
    _, state = tx.update(grads, state, params)
    assert int(state.inner_state[0].count) == 0 and float(jnp.abs(state.inner_state[0].mu["kernel"]).max()) == 0.0


def test_lookahead_init_accepts_abstract_params_and_keeps_bfloat16():
    params = tree_params(jnp.bfloat16)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx = lookahead_wrapper(adam(0.01), sync_period=1)
    assert jax.tree.map(jax.typeof, tx.init(abstract)) == jax.tree.map(jax.typeof, tx.init(params))
    updates, state = jax.jit(tx.update)(tree_grads(params), tx.init(params), params)
    assert jax.tree.map(lambda x: x.dtype, updates) == jax.tree.map(lambda x: x.dtype, params)
    assert jax.tree.map(lambda x: x.dtype, state.slow_params) == jax.tree.map(lambda x: x.dtype, params)


# Composition


def test_lookahead_over_sam_over_adamw_decreases_the_loss():
    params, loss = jax_problem()
    tx = lookahead_wrapper(sam(adamw(0.02, weight_decay=1e-3), rho=0.05), sync_period=5, slow_step_size=0.5)
    step = jax.jit(sam_train_step(loss, tx))
    state = tx.init(params)
    losses = []
    for _ in range(60):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert isinstance(state, LookaheadState)
    assert losses[-1] < 0.6 * losses[0]
    assert float(loss(lookahead_slow_params(state, params))) < 0.6 * losses[0]


def assert_same_trajectory(ours, theirs, steps, **extra_args):
    for a, b in zip(trajectory(ours, steps, **extra_args), trajectory(theirs, steps, **extra_args)):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_sam_over_lookahead_over_partition_equals_partition_of_lookaheads():
    # Lookahead acts leaf by leaf with one step counter, so wrapping the partition or each of
    # its members must give the same trajectory; SAM sees the whole tree either way.
    _, loss = jax_problem()
    labels = {"kernel": "adam", "bias": "sgd"}
    outside = lookahead_wrapper(partition({"adam": adam(0.02), "sgd": sgd(0.1)}, labels), 3, 0.5)
    inside = partition({"adam": lookahead_wrapper(adam(0.02), 3, 0.5), "sgd": lookahead_wrapper(sgd(0.1), 3, 0.5)}, labels)
    assert_same_trajectory(sam(outside, rho=0.05), sam(inside, rho=0.05), 10, grad_fn=jax.grad(loss))


def test_lookahead_over_masked_equals_masked_lookaheads_and_masked_leaves_pass_through():
    params, loss = jax_problem()
    kernel_only, bias_only = {"kernel": True, "bias": False}, {"kernel": False, "bias": True}
    over_masked = lookahead_wrapper(chain(masked(adam(0.02), kernel_only), masked(sgd(0.1), bias_only)), 4, 0.5)
    masked_lookaheads = chain(
        masked(lookahead_wrapper(adam(0.02), 4, 0.5), kernel_only), masked(lookahead_wrapper(sgd(0.1), 4, 0.5), bias_only)
    )
    assert_same_trajectory(over_masked, masked_lookaheads, 10)

    tx = masked(lookahead_wrapper(adam(0.02), 4, 0.5), kernel_only)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(10):
        grads = jax.grad(loss)(params)
        updates, state = update(grads, state, params)
        np.testing.assert_array_equal(updates["bias"], grads["bias"])  # masked out: passes through
        params = gradtx.apply_updates(params, updates)
    slow = lookahead_slow_params(state, params)
    np.testing.assert_array_equal(slow["bias"], params["bias"])
    np.testing.assert_array_equal(slow["kernel"], state.inner_state.slow_params["kernel"])


def test_inject_hyperparams_over_ranger_matches_ranger():
    injected = inject_hyperparams(ranger, static_args=("sync_period",))(learning_rate=0.02, weight_decay=0.01, sync_period=4)
    plain = ranger(learning_rate=0.02, weight_decay=0.01, sync_period=4)
    for a, b in zip(trajectory(injected, 12), trajectory(plain, 12)):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)


# Ranger


def test_rectification_matches_the_references_float64_step_size():
    def reference(t, b1, b2, threshold):
        b2_t = b2**t
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - 2 * t * b2_t / (1 - b2_t)
        if rho > threshold:
            ratio = (rho - 4) / (rho_inf - 4) * (rho - 2) / rho * rho_inf / (rho_inf - 2)
            return True, math.sqrt((1 - b2_t) * ratio) / (1 - b1**t)
        return False, 1 / (1 - b1**t)

    steps = np.unique(np.concatenate([np.arange(1, 1200), np.geomspace(1200, 2e9, 60).astype(np.int64)])).astype(np.int32)
    for b1, b2, threshold in [(0.95, 0.999, 5.0), (0.9, 0.99, 4.0), (0.9, 0.99999, 5.0)]:
        rectified, step_size = jax.jit(jax.vmap(lambda c: _rectification(c, b1, b2, threshold)))(jnp.asarray(steps))
        expected = [reference(int(t), b1, b2, threshold) for t in steps]
        np.testing.assert_array_equal(rectified, [r for r, _ in expected])
        np.testing.assert_allclose(step_size, [s for _, s in expected], rtol=1e-6)


def test_centralize_averages_over_the_fan_in_like_the_torch_reference():
    kernel = jax.random.normal(jax.random.key(0), (4, 3))  # Flax (in, out)
    torch_weight = kernel.T  # torch (out, in): Ranger subtracts the mean over dims 1.. per output row
    expected = (torch_weight - torch_weight.mean(axis=1, keepdims=True)).T
    centralized, _ = centralize().update(kernel, None)
    np.testing.assert_allclose(centralized, expected, rtol=1e-6, atol=1e-7)


def test_ranger_is_lookahead_over_its_radam_step():
    params = tree_params()
    grads = tree_grads(params)
    tx = ranger(learning_rate=0.01, use_gc=False)
    state = tx.init(params)
    assert isinstance(state, LookaheadState)
    updates, state = tx.update(grads, state, params)
    radam_updates, _ = scale_by_ranger_radam().update(grads, scale_by_ranger_radam().init(params))
    jax.tree.map(lambda u, r: np.testing.assert_allclose(u, -0.01 * r, rtol=1e-6), updates, radam_updates)


def lookahead_over_sgd(**kwargs):
    return lookahead_wrapper(sgd(0.1), **kwargs)


@pytest.mark.parametrize(
    "factory, kwargs, message",
    [
        (sam_perturb, {"rho": 0.0}, r"sam_perturb: rho must be > 0, got 0.0"),
        (sam_perturb, {"rho": -0.1}, r"sam_perturb: rho must be > 0"),
        (lambda **kw: sam(sgd(0.1), **kw), {"rho": 0.0}, r"sam: rho must be > 0, got 0.0"),
        (lookahead_over_sgd, {"sync_period": 0}, r"lookahead_wrapper: sync_period must be an integer >= 1, got 0"),
        (lookahead_over_sgd, {"slow_step_size": 0.0}, r"lookahead_wrapper: slow_step_size must be in \(0, 1\], got 0.0"),
        (lookahead_over_sgd, {"slow_step_size": 1.5}, r"lookahead_wrapper: slow_step_size must be in \(0, 1\], got 1.5"),
        (ranger, {"sync_period": 0}, r"ranger: sync_period must be an integer >= 1"),
        (ranger, {"slow_step_size": 1.01}, r"ranger: slow_step_size must be in \(0, 1\]"),
        (ranger, {"b2": 1.0}, r"ranger: b2 must be in \(0, 1\), got 1.0"),
        (ranger, {"learning_rate": -1.0}, r"ranger: learning_rate must be >= 0"),
        (ranger, {"weight_decay": -1.0}, r"ranger: weight_decay must be >= 0"),
        (scale_by_ranger_radam, {"eps": 0.0}, r"scale_by_ranger_radam: eps must be > 0"),
    ],
)
def test_invalid_hyperparameters_are_rejected(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


def test_wrappers_reject_non_transformations():
    with pytest.raises(TypeError, match="sam: base_optimizer must be a gradient transformation"):
        sam(0.1)
    with pytest.raises(TypeError, match="lookahead_wrapper: inner must be a gradient transformation"):
        lookahead_wrapper("sgd")
