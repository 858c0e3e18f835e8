"""``gradtx bench --e2e``: the end-to-end Flax NNX training step, forward + backward alone and with the update.

A tower of ``layers`` ``nnx.Linear(128, 128)`` layers (two arrays each) on a batch of 32. The
step with the update is :func:`gradtx.contrib.flax.make_train_step` (compiled ahead of time,
model and optimizer donated) with gradtx's and with Optax's AdamW; forward + backward alone is
the same loss's ``value_and_grad`` over the model's pure state. All three are timed in the same
rounds; the update's added step time and added compile time are the differences.
"""

from __future__ import annotations

import gc
import re
import time

import jax
import jax.numpy as jnp

from gradtx.bench import registry, timing

WIDTH = 128
BATCH = 32


def _tower(layers: int, seed: int, width: int = WIDTH):
    # ``layers`` Linear(width, width) layers, each followed by tanh: 2 * layers parameter arrays.
    from flax import nnx

    class Tower(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(layers)])

        def __call__(self, x):
            for layer in self.layers:
                x = jnp.tanh(layer(x))
            return x

    return Tower(nnx.Rngs(seed))


def _copies(hlo_text: str) -> int:
    """How many ``copy`` instructions the compiled step runs (XLA:CPU's are single-threaded: ~20 ms per 64 MiB)."""
    return sum(1 for line in hlo_text.splitlines() if re.search(r"= \S+ copy\(", line))


def _loss(model, x):
    return jnp.mean(model(x) ** 2)


def _forward_backward_case(model, x) -> timing.JaxCase:
    from flax import nnx

    graphdef, state = nnx.split(model)

    def forward_backward(state, x):
        return jax.value_and_grad(lambda s: _loss(nnx.merge(graphdef, s), x))(state)

    return timing.JaxCase(forward_backward, (), (state, x))


class _TrainStepCase:
    """The helper's step on a fresh model and ``nnx.Optimizer``; compile time from ``step.compile``."""

    def __init__(self, tx, layers: int, seed: int, x, *, packed: bool = False):
        from flax import nnx

        from gradtx.contrib.flax import make_train_step

        self.model = _tower(layers, seed)
        self.optimizer = nnx.Optimizer(self.model, tx, wrt=nnx.Param)
        self.step = make_train_step(_loss, packed=packed)
        self.x = x
        start = time.perf_counter()
        compiled = self.step.compile(self.model, self.optimizer, x)
        self.compile_s = time.perf_counter() - start
        self.copies = _copies(compiled.as_text())
        self.samples: list[float] = []

    def run(self) -> float:
        start = time.perf_counter()
        jax.block_until_ready(self.step(self.model, self.optimizer, self.x))
        return time.perf_counter() - start


def run_e2e(leaves: int, *, calls: int, optimizer: str = "adamw", seed: int = 0) -> dict:
    """Forward + backward alone vs. with gradtx's and Optax's update, for a tower with ``leaves`` arrays."""
    import optax

    layers = leaves // 2
    entry = registry.BENCH[optimizer]
    x = jax.random.normal(jax.random.key(seed), (BATCH, WIDTH), jnp.float32)
    cases = {
        "forward_backward": _forward_backward_case(_tower(layers, seed), x),
        "gradtx": _TrainStepCase(registry.resolve(optimizer)(**entry.kwargs), layers, seed, x),
        "gradtx_packed": _TrainStepCase(registry.resolve(optimizer)(**entry.kwargs), layers, seed, x, packed=True),
        "optax": _TrainStepCase(getattr(optax, optimizer)(**entry.kwargs), layers, seed, x),
    }
    timing.time_interleaved(list(cases.values()), calls)
    base_ms, base_compile = timing.median_ms(cases["forward_backward"]), cases["forward_backward"].compile_s
    row = {
        "optimizer": optimizer,
        "leaves": leaves,
        "layers": layers,
        "params": layers * (WIDTH * WIDTH + WIDTH),
        "forward_backward": {"ms_per_step": base_ms, "compile_s": base_compile},
    }
    for name in ("gradtx", "gradtx_packed", "optax"):
        ms, compile_s = timing.median_ms(cases[name]), cases[name].compile_s
        row[name] = {
            "ms_per_step": ms,
            "compile_s": compile_s,
            "added_ms": ms - base_ms,
            "added_compile_s": compile_s - base_compile,
            "copies": cases[name].copies,
        }
    optax_added, optax_added_compile = row["optax"]["added_ms"], row["optax"]["added_compile_s"]
    for name in ("gradtx", "gradtx_packed"):
        added, added_compile = row[name]["added_ms"], row[name]["added_compile_s"]
        row[f"{name}_over_optax_added_time"] = added / optax_added if optax_added > 0 else None
        row[f"{name}_over_optax_added_compile"] = added_compile / optax_added_compile if optax_added_compile > 0 else None
    del cases
    gc.collect()
    return row
