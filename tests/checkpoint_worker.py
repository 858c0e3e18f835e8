"""Subprocess side of ``tests/test_checkpoint.py``: checkpoints that must survive a SIGKILL, and sharded restores.

``save-loop``: trains Adam on a large quadratic (``--megabytes`` of parameters, twice that in
moments) and saves ``(params, state)`` after every step with ``gradtx.contrib.orbax.save``,
printing ``saved <step>`` once each save is complete. The test kills it with SIGKILL while a
save is in progress and checks that the previous checkpoint restores exactly; it recomputes
the expected values with :func:`train`, which is deterministic.

``sharded``: needs 8 devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``); saves an
AdamW state (float32, then 8-bit) created on one device, restores it into ``gradtx.abstract_state``
targets on a 2x4 mesh, model-parallel and with ``gradtx.zero1`` over the data axis, and checks that every
restored array has the target's sharding, dtype and values. Exits non-zero with a message
naming the leaf otherwise.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import gradtx
from gradtx.contrib import orbax as checkpoint

LEAVES = 4


def initial_params(megabytes: int) -> dict:
    rng = np.random.default_rng(0)
    rows = max(1, megabytes * 2**20 // (4 * LEAVES * 1024))
    return {f"w{i}": jnp.asarray(rng.standard_normal((rows, 1024), dtype=np.float32)) for i in range(LEAVES)}


OPTIMIZER = gradtx.adam(1e-2)


@jax.jit
def step(params, state):
    grads = params  # the gradient of 0.5 * ||w||^2
    updates, state = OPTIMIZER.update(grads, state, params)
    return gradtx.apply_updates(params, updates), state


def train(megabytes: int, steps: int):
    """``(params, state)`` after ``steps`` Adam steps from :func:`initial_params`."""
    params = initial_params(megabytes)
    state = OPTIMIZER.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def save_loop(directory: str, megabytes: int, steps: int) -> None:
    params = initial_params(megabytes)
    state = OPTIMIZER.init(params)
    for t in range(1, steps + 1):
        params, state = step(params, state)
        checkpoint.save(directory, t, (params, state))
        print(f"saved {t}", flush=True)


def _check_restored(what: str, restored, target, expected) -> None:
    """Exit with a message naming the leaf unless every restored array has the target's sharding, dtype and shape, and the saved values."""
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    for (path, got), want, value in zip(flat, jax.tree.leaves(target), jax.tree.leaves(expected)):
        name = f"{what}{jax.tree_util.keystr(path)}"
        if got.sharding != want.sharding:
            raise SystemExit(f"sharded: {name} restored with sharding {got.sharding}, target {want.sharding}")
        if got.dtype != want.dtype or got.shape != want.shape:
            raise SystemExit(f"sharded: {name} restored as {got.dtype}{got.shape}, target {want.dtype}{want.shape}")
        if not np.array_equal(np.asarray(got), np.asarray(value)):
            raise SystemExit(f"sharded: {name} restored values differ from the saved ones")


def sharded(directory: str) -> None:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if jax.device_count() != 8:
        raise SystemExit(f"sharded: needs 8 devices, found {jax.device_count()}")
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)  # zero1 needs Auto
    params = {"kernel": jnp.arange(64 * 128, dtype=jnp.float32).reshape(64, 128) / 1e3, "bias": jnp.ones(128)}
    tx = gradtx.adamw(1e-2)
    state = tx.init(params)
    _, state = tx.update(params, state, params)  # non-trivial moments and count
    checkpoint.save(directory, 1, (params, state))  # written from one device

    # Model parallel over "model", replicated over "data": the moments follow their parameter.
    placements = {"kernel": NamedSharding(mesh, P(None, "model")), "bias": NamedSharding(mesh, P("model"))}
    abstract_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, placements)
    target = (abstract_params, gradtx.abstract_state(tx, abstract_params))
    restored = checkpoint.restore(directory, target)
    _check_restored("", restored, target, (params, state))
    # ZeRO-1 keeps the inner state's tree: the same checkpoint restores into state sharded over "data" too.
    zero_target = (abstract_params, gradtx.abstract_state(gradtx.zero1(tx, mesh, axis="data"), abstract_params))
    zero_restored = checkpoint.restore(directory, zero_target)
    _check_restored("zero1", zero_restored, zero_target, (params, state))
    shard_shapes = [
        sorted({s.data.shape for s in tree[1][0].mu["kernel"].addressable_shards}) for tree in (restored, zero_restored)
    ]
    print(f"restored {len(jax.tree.leaves(restored))} arrays with the target's shardings; mu['kernel'] shards {shard_shapes}")

    # 8-bit moments: codes shaped like the kernel, scales like its row groups; both restore into
    # their placed targets (codes like the kernel, scales replicated over "model"; ZeRO-1 over "data").
    tx8 = gradtx.adamw(1e-2, state_dtype=gradtx.Quantized8bit())
    state8 = tx8.init(params)
    _, state8 = tx8.update(params, state8, params)
    checkpoint.save(directory, 2, (params, state8))
    for what, opt in (("8-bit", tx8), ("8-bit zero1", gradtx.zero1(tx8, mesh, axis="data"))):
        target8 = (abstract_params, gradtx.abstract_state(opt, abstract_params))
        restored8 = checkpoint.restore(directory, target8, step=2)
        _check_restored(what, restored8, target8, (params, state8))
        mu = restored8[1][0].mu["kernel"]
        shards = [sorted({s.data.shape for s in x.addressable_shards}) for x in (mu.codes, mu.scales)]
        print(f"{what}: restored with the target's shardings; codes and scales shards {shards}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["save-loop", "sharded"])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.command == "save-loop":
        save_loop(args.dir, args.megabytes, args.steps)
    else:
        sharded(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
