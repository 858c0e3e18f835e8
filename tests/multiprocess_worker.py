"""Data-parallel training with gradtx across JAX processes: one worker of ``tests/test_multiprocess.py``.

Run one process per rank::

    python tests/multiprocess_worker.py --out rank0.npz --num-processes 2 --process-id 0 --port 12345 &
    python tests/multiprocess_worker.py --out rank1.npz --num-processes 2 --process-id 1 --port 12345

or, as the single-process reference, ``--num-processes 1`` (with as many local devices as
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` gives). Every process holds its own
slice of each global batch (``jax.make_array_from_process_local_data``); the parameters and
the optimizer state are replicated over a one-axis ``data`` mesh spanning every device of
every process. Two styles of data parallelism are trained, each for a few steps with several
gradtx optimizers:

* ``jit``: the loss is the mean over the global batch; XLA's SPMD partitioner inserts the
  gradient all-reduce (across processes: Gloo over TCP on CPU).
* ``shard_map``: each device computes the gradient of its local mean loss at its own
  (``pcast`` to device-varying) copy of the parameters, and the gradients are averaged
  explicitly with ``jax.lax.pmean``.

With ``--checkpoint-dir`` the ``jit`` runs are interrupted after ``SAVE_AT`` steps: every
process saves ``(params, state)`` with ``gradtx.contrib.orbax`` into the same directory,
restores it into freshly initialized replicated arrays, and trains on from there; the test
compares those resumed runs with uninterrupted ones.

The final parameters, optimizer state and per-step losses seen by this process are written
to ``--out`` (``.npz``), so that the test can compare processes and runs leaf by leaf.
"""

from __future__ import annotations

import argparse
import os
import sys

STEPS = 5
SAVE_AT = 2
GLOBAL_BATCH = 16
FEATURES, HIDDEN = 6, 8
OPTIMIZERS = {
    "adam": lambda gradtx: gradtx.adam(1e-2),
    # Per-layer trust ratios: a norm of every parameter, after the gradient all-reduce.
    "lamb": lambda gradtx: gradtx.lamb(1e-2, weight_decay=1e-2),
    # A wrapper with its own arrays (slow weights) around a chain.
    "ranger": lambda gradtx: gradtx.ranger(1e-2, sync_period=2),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write this process's results (.npz)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, help="the coordinator's port on localhost (with --num-processes > 1)")
    parser.add_argument("--timeout", type=int, default=60, help="seconds to wait for the other processes to join")
    parser.add_argument("--checkpoint-dir", help="interrupt the jit runs: save, restore and resume (shared by all processes)")
    return parser.parse_args(argv)


def global_data():
    import numpy as np

    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((STEPS, GLOBAL_BATCH, FEATURES)).astype(np.float32)
    targets = np.sin(inputs.sum(-1, keepdims=True)).astype(np.float32)
    return inputs, targets


def init_params(key):
    import jax

    k1, k2 = jax.random.split(key)
    return {
        "hidden": {"kernel": jax.random.normal(k1, (FEATURES, HIDDEN)) / FEATURES**0.5, "bias": jax.numpy.zeros(HIDDEN)},
        "out": {"kernel": jax.random.normal(k2, (HIDDEN, 1)) / HIDDEN**0.5, "bias": jax.numpy.zeros(1)},
    }


def loss_fn(params, x, y):
    import jax.numpy as jnp

    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    prediction = h @ params["out"]["kernel"] + params["out"]["bias"]
    return jnp.mean((prediction - y) ** 2)


def make_steps(tx, mesh):
    """The jitted training step in both styles: ``step(params, state, x, y) -> (params, state, loss)``."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import gradtx

    def apply(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return gradtx.apply_updates(params, updates), state

    def spmd_step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return *apply(params, state, grads), loss

    def per_shard_step(params, state, x, y):
        # Differentiating at the replicated params would let autodiff sum the per-device
        # gradients itself (the transpose of an implicit pcast is a psum); at device-varying
        # copies each device gets its own gradient, averaged explicitly below.
        local_params = jax.lax.pcast(params, "data", to="varying")
        loss, grads = jax.value_and_grad(loss_fn)(local_params, x, y)
        loss, grads = jax.lax.pmean((loss, grads), "data")
        return *apply(params, state, grads), loss

    replicated = NamedSharding(mesh, P())
    shard_mapped = jax.shard_map(per_shard_step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=P())
    return {
        "jit": jax.jit(spmd_step, out_shardings=replicated),
        "shard_map": jax.jit(shard_mapped, out_shardings=replicated),
    }


def local(array):
    """This process's copy of a replicated global array, as numpy."""
    import numpy as np

    return np.asarray(array.addressable_data(0))


def save_and_restore(directory: str, step: int, params, state, fresh):
    """Checkpoint ``(params, state)`` and read it back into the structure and shardings of ``fresh()``."""
    from gradtx.contrib import orbax as checkpoint

    checkpoint.save(directory, step, (params, state))
    return checkpoint.restore(directory, fresh())


def train(process_id: int, num_processes: int, checkpoint_dir: str | None = None) -> dict:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import gradtx

    mesh = jax.make_mesh((jax.device_count(),), ("data",), devices=jax.devices())
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    inputs, targets = global_data()
    rows = GLOBAL_BATCH // num_processes
    mine = slice(process_id * rows, (process_id + 1) * rows)
    results = {}
    for name, make in OPTIMIZERS.items():
        tx = make(gradtx)
        for style, step in make_steps(tx, mesh).items():

            def fresh(tx=tx):
                params = jax.jit(init_params, out_shardings=replicated)(jax.random.key(0))
                return params, jax.jit(tx.init, out_shardings=replicated)(params)

            params, state = fresh()
            losses = []
            for t in range(STEPS):
                if checkpoint_dir and style == "jit" and t == SAVE_AT:
                    params, state = save_and_restore(os.path.join(checkpoint_dir, name), t, params, state, fresh)
                x = jax.make_array_from_process_local_data(batch_sharding, inputs[t, mine])
                y = jax.make_array_from_process_local_data(batch_sharding, targets[t, mine])
                params, state, loss = step(params, state, x, y)
                losses.append(local(loss))
            prefix = f"{style}/{name}"
            results[f"{prefix}/loss"] = np.stack(losses)
            for kind, tree in (("params", params), ("state", state)):
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                    results[f"{prefix}/{kind}{jax.tree_util.keystr(path)}"] = local(leaf)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np

    if args.num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"localhost:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=args.timeout,
        )
    if GLOBAL_BATCH % jax.device_count():
        raise SystemExit(f"multiprocess_worker: the global batch {GLOBAL_BATCH} must divide over {jax.device_count()} devices")
    print(
        f"process {jax.process_index()} of {jax.process_count()}: devices {jax.devices()}, local {jax.local_devices()}",
        file=sys.stderr,
    )
    results = train(args.process_id, args.num_processes, args.checkpoint_dir)
    np.savez(args.out, **results)
    if args.num_processes > 1:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
