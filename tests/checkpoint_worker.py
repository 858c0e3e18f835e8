"""Subprocess side of ``tests/test_checkpoint.py``: checkpoints that must survive a SIGKILL, and sharded restores.

``save-loop``: trains Adam on a large quadratic (``--megabytes`` of parameters, twice that in
moments) and saves ``(params, state)`` after every step with ``gradtx.contrib.orbax.save``,
printing ``saved <step>`` once each save is complete. The test kills it with SIGKILL while a
save is in progress and checks that the previous checkpoint restores exactly; it recomputes
the expected values with :func:`train`, which is deterministic.

``sharded``: needs 8 devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``); saves an
Adam state created on one device, restores it into a target sharded over a 2x4 mesh and
checks that every restored array has the target's sharding, dtype and values. Exits non-zero
with a message naming the leaf otherwise.
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


def sharded(directory: str) -> None:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if jax.device_count() != 8:
        raise SystemExit(f"sharded: needs 8 devices, found {jax.device_count()}")
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    params = {"kernel": jnp.arange(64 * 128, dtype=jnp.float32).reshape(64, 128) / 1e3, "bias": jnp.ones(128)}
    tx = gradtx.adamw(1e-2)
    state = tx.init(params)
    _, state = tx.update(params, state, params)  # non-trivial moments and count
    checkpoint.save(directory, 1, (params, state))
    placements = {"kernel": NamedSharding(mesh, P("data", "model")), "bias": NamedSharding(mesh, P("model"))}
    target_params = jax.device_put(params, placements)
    target = jax.eval_shape(lambda p: (p, tx.init(p)), target_params)
    # eval_shape keeps the parameters' shardings; give the moments their parameter's sharding.
    shardings = (placements, jax.tree.map(lambda x: x.sharding, jax.jit(tx.init)(target_params)))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
    restored = checkpoint.restore(directory, target)
    flat_restored = jax.tree_util.tree_flatten_with_path(restored)[0]
    for (path, got), want, expected in zip(flat_restored, jax.tree.leaves(target), jax.tree.leaves((params, state))):
        name = jax.tree_util.keystr(path)
        if got.sharding != want.sharding:
            raise SystemExit(f"sharded: {name} restored with sharding {got.sharding}, target {want.sharding}")
        if got.dtype != want.dtype or got.shape != want.shape:
            raise SystemExit(f"sharded: {name} restored as {got.dtype}{got.shape}, target {want.dtype}{want.shape}")
        if not np.array_equal(np.asarray(got), np.asarray(expected)):
            raise SystemExit(f"sharded: {name} restored values differ from the saved ones")
    kernel_moment = restored[1][0].mu["kernel"]
    shard_shapes = sorted({shard.data.shape for shard in kernel_moment.addressable_shards})
    print(f"restored {len(flat_restored)} arrays with the target's shardings; mu['kernel'] shards {shard_shapes}")


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
