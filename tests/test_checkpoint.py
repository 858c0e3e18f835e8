"""Checkpoint and resume with Orbax (``gradtx.contrib.orbax``): exact, checked, atomic.

* Every registered optimizer and every wrapper (Lookahead, schedule-free, SAM, injected
  hyperparameters, ``apply_if_finite``, ``partition``/``masked``, ``reduce_on_plateau``,
  gradient accumulation, 8-bit states): training resumed from a checkpoint of step k
  reproduces the uninterrupted run bit for bit, parameters and state, with the same types
  (so the compiled step is reused).
* Restoring into another optimizer or other parameters raises a ``ValueError`` naming the
  first differing path and both sides.
* A process killed (SIGKILL) while saving leaves the previous checkpoint usable (slow).
* Restores take the target's shardings (8 simulated devices, in a subprocess), also
  ``gradtx.zero1``'s: a plain optimizer's checkpoint restores into ZeRO-1 sharded state, and
  8-bit moments (codes and scales) into their placed targets.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from registry import ALL

import gradtx
from gradtx.contrib import orbax as checkpoint

pytest.importorskip("orbax.checkpoint")

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "checkpoint_worker.py")
STEPS, SAVE_AT = 6, 3


def initial_params() -> dict:
    return {
        "dense": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "bias": jnp.array([0.3, -0.2, 0.1])},
        "scale": jnp.array([[1.5, -0.5], [0.25, 2.0]]),
    }


def loss(params) -> jax.Array:
    # A shifted quadratic plus a ripple: gradients change from step to step and per leaf.
    return sum(jnp.sum((w - 0.5) ** 2 + 0.1 * jnp.sin(3.0 * w)) for w in jax.tree.leaves(params))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], gradtx.GradientTransformation]
    # Changes the freshly initialized state (e.g. an injected hyperparameter set by hand).
    edit_state: Callable[[Any], Any] = staticmethod(lambda state: state)
    poison_step: int | None = None  # the step whose gradient is made non-finite

    def __str__(self):
        return self.name


def _set_weight_decay(state):
    return state._replace(hyperparams={**state.hyperparams, "weight_decay": jnp.float32(0.05)})


LABELS = {"dense": {"kernel": "adam", "bias": "sgd"}, "scale": "adam"}
MASK = {"dense": {"kernel": True, "bias": False}, "scale": True}
WRAPPERS = (
    Case("lookahead_wrapper(adam)", lambda: gradtx.lookahead_wrapper(gradtx.adam(0.05), sync_period=2)),
    Case("sam(sgd)", lambda: gradtx.sam(gradtx.sgd(0.05, momentum=0.9), rho=0.05)),
    Case(
        "inject_hyperparams(adamw)",
        lambda: gradtx.inject_hyperparams(gradtx.adamw)(learning_rate=gradtx.linear_schedule(0.1, 0.01, 5), weight_decay=0.01),
        edit_state=_set_weight_decay,
    ),
    Case("apply_if_finite(adam)", lambda: gradtx.apply_if_finite(gradtx.adam(0.05), max_consecutive_errors=3), poison_step=1),
    Case("partition", lambda: gradtx.partition({"adam": gradtx.adam(0.05), "sgd": gradtx.sgd(0.05, momentum=0.9)}, LABELS)),
    Case("masked(adam)", lambda: gradtx.masked(gradtx.adam(0.05), MASK)),
    Case("reduce_on_plateau", lambda: gradtx.chain(gradtx.adam(0.05), gradtx.reduce_on_plateau(factor=0.5, patience=1))),
    Case("accumulate_gradients(lamb)", lambda: gradtx.accumulate_gradients(gradtx.lamb(0.05), every_k_schedule=2)),
)
# 8-bit states: small blocks so that these small parameters are quantized too (codes uint8, scales float32).
_8BIT = gradtx.Quantized8bit(block_size=4, min_size=4)
WRAPPERS += (
    Case("adamw(8-bit states)", lambda: gradtx.adamw(0.05, state_dtype=_8BIT)),
    Case("sgd(momentum, 8-bit)", lambda: gradtx.sgd(0.05, momentum=0.9, state_dtype=_8BIT)),
    Case("lion(8-bit)", lambda: gradtx.lion(0.01, state_dtype=_8BIT)),
)
CASES = tuple(Case(entry.name, entry.make) for entry in ALL) + WRAPPERS


def _step_fn(tx):
    @jax.jit
    def step(params, state, grad_scale):
        value, grads = jax.value_and_grad(loss)(params)
        grads = jax.tree.map(lambda g: g * grad_scale, grads)  # inf poisons a step for apply_if_finite
        extras = {"value": value, "obj_fn": loss, "grad_fn": jax.grad(loss)}
        updates, state = tx.update(grads, state, params, **extras)
        return gradtx.apply_updates(params, updates), state

    return step


def _grad_scale(case: Case, t: int) -> jax.Array:
    return jnp.float32(jnp.inf if t == case.poison_step else 1.0)


def _assert_identical(actual, expected, what: str) -> None:
    actual_leaves = jax.tree_util.tree_flatten_with_path(actual)[0]
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for (path, a), b in zip(actual_leaves, jax.tree.leaves(expected)):
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert jax.typeof(a) == jax.typeof(b), f"{name}: {jax.typeof(a)} != {jax.typeof(b)}"
        assert getattr(a, "committed", None) == getattr(b, "committed", None), f"{name}: committed to a device or not"
        assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True), f"{name} differs"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(case, tmp_path):
    tx = case.make()
    step = _step_fn(tx)
    run = lambda params, state, t: step(params, state, _grad_scale(case, t))
    params = initial_params()
    state = case.edit_state(tx.init(params))
    for t in range(SAVE_AT):
        params, state = run(params, state, t)
    checkpoint.save(tmp_path, SAVE_AT, {"params": params, "opt_state": state})
    saved = (params, state)
    for t in range(SAVE_AT, STEPS):
        params, state = run(params, state, t)
    uninterrupted = (params, state)
    compiled_programs = step._cache_size()

    fresh_params = initial_params()
    target = {"params": fresh_params, "opt_state": tx.init(fresh_params)}
    restored = checkpoint.restore(tmp_path, target)
    _assert_identical((restored["params"], restored["opt_state"]), saved, f"{case}: restored")
    params, state = restored["params"], restored["opt_state"]
    for t in range(SAVE_AT, STEPS):
        params, state = run(params, state, t)
    _assert_identical((params, state), uninterrupted, f"{case}: resumed")
    assert step._cache_size() == compiled_programs, f"{case}: the restored state recompiled the step"


def test_restored_injected_hyperparameters_and_counters_keep_their_values_and_dtypes(tmp_path):
    tx = gradtx.inject_hyperparams(gradtx.adamw)(learning_rate=1e-3, weight_decay=0.01)
    params = initial_params()
    state = _set_weight_decay(tx.init(params))
    state = jax.jit(tx.update)(params, state, params)[1]
    checkpoint.save(tmp_path, 1, state)
    restored = checkpoint.restore(tmp_path, tx.init(params))
    assert restored.hyperparams["weight_decay"] == np.float32(0.05)
    assert restored.count.dtype == jnp.int32 and int(restored.count) == 1
    assert restored.inner_state[0].count.dtype == jnp.int32


def _error(tmp_path, saved, target) -> str:
    checkpoint.save(tmp_path, 1, saved)
    with pytest.raises(ValueError) as info:
        checkpoint.restore(tmp_path, target)
    return str(info.value)


def test_restoring_into_another_optimizer_names_the_first_difference(tmp_path):
    params = initial_params()
    adam_state = gradtx.adam(0.1).init(params)
    message = _error(tmp_path / "sgd", adam_state, gradtx.sgd(0.1, momentum=0.9).init(params))
    assert (
        "gradtx.contrib.orbax.restore" in message
        and "at [0]: the checkpoint has ScaleByAdamState, the target has TraceState" in message
    )
    message = _error(tmp_path / "adamw", adam_state, gradtx.adamw(0.1).init(params))
    assert "at [1]: the checkpoint has EmptyState, the target has AddDecayedWeightsState" in message
    message = _error(tmp_path / "ranger", gradtx.ranger(0.1).init(params), adam_state)
    assert "at (the root): the checkpoint has LookaheadState, the target has tuple" in message
    big = {"w": jnp.ones((8, 8))}
    eight_bit = gradtx.adam(0.1, state_dtype=gradtx.Quantized8bit(block_size=16, min_size=16)).init(big)
    message = _error(tmp_path / "8bit", eight_bit, gradtx.adam(0.1).init(big))
    assert "at [0].mu['w']: the checkpoint has QuantizedArray, the target has float32[8,8]" in message
    injected = gradtx.inject_hyperparams(gradtx.adam)(learning_rate=0.1).init(params)
    message = _error(
        tmp_path / "injected",
        injected,
        gradtx.inject_hyperparams(gradtx.adamw)(learning_rate=0.1, weight_decay=0.01).init(params),
    )
    assert "target.hyperparams['weight_decay'] (float32[]) is not in the checkpoint" in message


def test_restoring_into_other_parameters_names_the_path_and_both_shapes_or_dtypes(tmp_path):
    params = initial_params()
    tx = gradtx.adam(0.1)
    saved = (params, tx.init(params))
    wider = {**params, "scale": jnp.ones((2, 3))}
    message = _error(tmp_path / "shape", saved, (wider, tx.init(wider)))
    assert "at [0]['scale']: the checkpoint has float32[2,2], the target has float32[2,3]" in message
    half = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    message = _error(tmp_path / "dtype", saved, (half, tx.init(half)))
    assert "at [0]['dense']['bias']: the checkpoint has float32[3], the target has bfloat16[3]" in message
    extra = {**params, "head": jnp.zeros(5)}
    message = _error(tmp_path / "extra", saved, (extra, tx.init(extra)))
    assert "target[0]['head'] (float32[5]) is not in the checkpoint" in message
    fewer = {"dense": params["dense"]}
    message = _error(tmp_path / "fewer", saved, (fewer, tx.init(fewer)))
    assert "checkpoint[0]['scale'] (float32[2,2]) has no counterpart in the target" in message


def test_restoring_into_another_packed_layout_names_the_packed_node(tmp_path):
    # Same buffer (float32[10]), other arrays in it: only the static layout tells them apart.
    saved = gradtx.pack({"a": jnp.ones((2, 3)), "b": jnp.zeros(4)})
    target = gradtx.pack({"a": jnp.ones(4), "b": jnp.zeros((2, 3))})
    assert [b.shape for b in saved.buffers] == [b.shape for b in target.buffers]
    message = _error(tmp_path, {"params": saved}, {"params": target})
    assert "at ['params']: the static (non-array) data of the Packed node differ" in message


def test_packed_params_and_state_resume_bit_for_bit(tmp_path):
    tx = gradtx.lamb(0.05)  # per-array trust ratios over the packed runs
    step = _step_fn(tx)
    packed_params = gradtx.pack(initial_params())
    params, state = packed_params, tx.init(packed_params)
    one = jnp.float32(1.0)
    for _ in range(2):
        params, state = step(params, state, one)
    checkpoint.save(tmp_path, 2, (params, state))
    expected = step(params, state, one)
    restored = checkpoint.restore(tmp_path, (packed_params, tx.init(packed_params)))
    assert restored[0].layout == packed_params.layout
    _assert_identical(step(*restored, one), expected, "packed: resumed")


def test_flax_nnx_optimizer_state_round_trip(tmp_path):
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, gradtx.adam(0.1), wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    checkpoint.save(tmp_path, 1, nnx.state((model, optimizer)))
    saved = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state((model, optimizer))))

    fresh_model = nnx.Linear(3, 2, rngs=nnx.Rngs(1))
    fresh_optimizer = nnx.Optimizer(fresh_model, gradtx.adam(0.1), wrt=nnx.Param)
    nnx.update((fresh_model, fresh_optimizer), checkpoint.restore(tmp_path, nnx.state((fresh_model, fresh_optimizer))))
    restored = nnx.to_pure_dict(nnx.state((fresh_model, fresh_optimizer)))
    jax.tree.map(np.testing.assert_array_equal, restored, saved)
    assert int(fresh_optimizer.opt_state[0].count[...]) == 1


def test_latest_step_step_selection_and_bad_arguments(tmp_path):
    assert checkpoint.latest_step(tmp_path / "missing") is None
    assert checkpoint.latest_step(tmp_path) is None
    tree = {"w": jnp.zeros(2), "count": jnp.zeros([], jnp.int32), "epoch": 0, "lr": np.float32(0.5)}
    checkpoint.save(tmp_path, 1, tree)
    later = {"w": jnp.ones(2), "count": jnp.ones([], jnp.int32), "epoch": 3, "lr": np.float32(0.25)}
    path = checkpoint.save(tmp_path, 5, later)
    assert path == tmp_path / "5" and path.is_dir()
    assert checkpoint.latest_step(tmp_path) == 5
    latest, first = checkpoint.restore(tmp_path, tree), checkpoint.restore(tmp_path, tree, step=1)
    assert latest["epoch"] == 3 and type(latest["epoch"]) is int and first["epoch"] == 0
    assert latest["lr"] == np.float32(0.25) and isinstance(latest["lr"], np.float32)
    np.testing.assert_array_equal(latest["w"], later["w"])
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint of step 3 in .*; saved steps: \[1, 5\]"):
        checkpoint.restore(tmp_path, tree, step=3)
    with pytest.raises(ValueError, match="step must be larger than the latest saved step 5"):
        checkpoint.save(tmp_path, 5, tree)
    with pytest.raises(ValueError, match="step must be a non-negative int, got -1"):
        checkpoint.save(tmp_path, -1, tree)
    with pytest.raises(TypeError, match=r"tree\['name'\] is a str, which cannot be checkpointed"):
        checkpoint.save(tmp_path, 6, {"name": "adam"})
    with pytest.raises(TypeError, match=r"tree\['rng'\] is a typed PRNG key array .*jax.random.key_data"):
        checkpoint.save(tmp_path, 6, {"rng": jax.random.key(0)})


def test_stateless_optimizers_round_trip(tmp_path):
    state = gradtx.sgd(0.1).init(initial_params())
    checkpoint.save(tmp_path, 1, state)
    assert checkpoint.restore(tmp_path, state) == state


def test_max_to_keep_deletes_older_checkpoints_after_the_new_one_is_complete(tmp_path):
    for step in range(1, 5):
        checkpoint.save(tmp_path, step, {"w": jnp.full(2, float(step))}, max_to_keep=2)
    assert sorted(int(name) for name in os.listdir(tmp_path) if name.isdigit()) == [3, 4]


def test_public_functions_are_documented():
    for name in checkpoint.__all__:
        doc = inspect.getdoc(getattr(checkpoint, name))
        for section in ("Args:", "Returns:", "Example:", "References:"):
            assert section in doc, f"gradtx.contrib.orbax.{name} lacks {section}"


def _worker_env(devices: int = 1) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    return env


def test_restore_takes_the_targets_shardings_on_eight_devices_also_zero1(tmp_path):
    result = subprocess.run(
        [sys.executable, WORKER, "sharded", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_worker_env(8),
    )
    assert result.returncode == 0, f"checkpoint_worker.py sharded failed:\n{result.stderr[-4000:]}"
    # mu["kernel"] (64, 128): model parallel P(None, "model") on a 2x4 mesh, then ZeRO-1's P("data", "model").
    assert "with the target's shardings; mu['kernel'] shards [[(64, 32)], [(32, 32)]]" in result.stdout
    # 8-bit: codes (64, 128) like the kernel, scales (32,) (blocks of two rows) replicated over "model";
    # under ZeRO-1 both also split over "data".
    assert "8-bit: restored with the target's shardings; codes and scales shards [[(64, 32)], [(32,)]]" in result.stdout
    assert "8-bit zero1: restored with the target's shardings; codes and scales shards [[(32, 32)], [(16,)]]" in result.stdout


MEGABYTES = 32  # parameters; Adam's two moments double it: each save writes ~100 MB, a window of ~1 s to kill in


def _wait_for(condition, timeout: float, proc, what: str, log) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"checkpoint_worker.py exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.001)
    proc.kill()
    pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{log.read_text()[-4000:]}")


def _bytes_under(path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # renamed or deleted while we look
                pass
    return total


def _partial_save(directory, step: int, at_least: int) -> list[str]:
    """The temporary directories of an unfinished save of ``step`` holding ``at_least`` bytes."""
    temporary = re.compile(rf"^{step}\.orbax-checkpoint-tmp")
    names = [name for name in os.listdir(directory) if temporary.match(name)]
    return [name for name in names if _bytes_under(directory / name) >= at_least]


@pytest.mark.slow
def test_a_process_killed_while_saving_leaves_the_previous_checkpoint_usable(tmp_path):
    import checkpoint_worker

    directory, out, log = tmp_path / "checkpoints", tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as stdout, open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, WORKER, "save-loop", "--dir", str(directory), "--megabytes", str(MEGABYTES)],
            stdout=stdout,
            stderr=stderr,
            env=_worker_env(),
        )
    try:
        _wait_for(lambda: "saved 1\n" in out.read_text(), 120, proc, "the first complete save", log)
        # Kill once the second save has written a first MiB of array data into its temporary directory.
        partial = _wait_for(lambda: _partial_save(directory, step=2, at_least=2**20), 60, proc, "the second save to start", log)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert "saved 2" not in out.read_text(), "the kill came too late: the second save completed"
    names = sorted(os.listdir(directory))
    assert "2" not in names and os.path.isdir(directory / partial[0]), names  # killed mid-save: only the temporary directory

    assert checkpoint.latest_step(directory) == 1
    expected = checkpoint_worker.train(MEGABYTES, steps=1)
    target = checkpoint_worker.train(MEGABYTES, steps=0)
    _assert_identical(checkpoint.restore(directory, target), expected, "step 1")
    # The debris of the killed save does not stand in the way of the next save of that step.
    checkpoint.save(directory, 2, expected)
    assert checkpoint.latest_step(directory) == 2
