"""``gradtx bench``: optimizer-update benchmarks, gradtx side by side with Optax in the same process.

For each optimizer and each leaf count, the same number of float32 parameters is split into
that many equal 2-D arrays, and one donated, jit-compiled update step
``params, state = apply_updates(params, tx.update(grads, state, params))`` is timed for gradtx
and for Optax (and ``torch.optim.AdamW(fused=True)`` for AdamW when torch is importable),
interleaved with the donated-triad roofline in the same rounds (see PERF.md and
:mod:`gradtx.bench.timing`).
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradtx.bench import registry, timing
from gradtx.state.accounting import state_bytes, state_bytes_per_parameter


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """One row of the update benchmark: an optimizer over ``params`` float32 parameters in ``leaves`` arrays."""

    optimizer: str
    params: int
    leaves: int


def leaf_shape(size: int) -> tuple[int, int]:
    """A 2-D shape of ``size`` elements, as square as powers of two allow (so Adafactor can factor it)."""
    columns = 1 << (size.bit_length() // 2)
    while size % columns:
        columns //= 2
    return size // columns, columns


def _make_tree(key, params: int, leaves: int) -> list:
    shape = leaf_shape(params // leaves)
    keys = jax.random.split(key, leaves)
    return [jax.random.normal(k, shape, jnp.float32) * 0.02 for k in keys]


def _update_step(tx) -> Callable:
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
        return params, state

    return step


def _torch_adamw_case(params: list, grads: list, kwargs: dict):
    """``torch.optim.AdamW(fused=True)`` on copies of the same arrays, or ``None`` without torch."""
    try:
        import torch
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = [torch.tensor(np.asarray(p), device=device, requires_grad=True) for p in params]
    for tensor, grad in zip(tensors, grads):
        tensor.grad = torch.tensor(np.asarray(grad), device=device)
    try:
        optimizer = torch.optim.AdamW(tensors, lr=kwargs.get("learning_rate", 1e-3), fused=True)
    except (RuntimeError, ValueError, TypeError):  # a build without fused kernels for this device
        return None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return timing.CallableCase(optimizer.step, sync)


def bytes_per_parameter(entry: registry.BenchEntry, optax_state: Any, params: list) -> float:
    """PERF.md's traffic model; for optimizers without a fixed figure, ``12 + 2 *`` state bytes per parameter."""
    if entry.bytes_per_parameter is not None:
        return float(entry.bytes_per_parameter)
    return 12.0 + 2.0 * state_bytes_per_parameter(optax_state, params)


def _summary(case, params: int, model_bytes: float, triad_ms: float, state_of=None, param_tree=None) -> dict:
    ms = timing.median_ms(case)
    result = {
        "ms_per_step": ms,
        "min_ms": 1e3 * min(case.samples),
        "calls": len(case.samples),
        "gb_per_s": model_bytes * params / (ms * 1e-3) / 1e9,
        "roofline_ratio": triad_ms * model_bytes / (ms * timing.TRIAD_BYTES_PER_ELEMENT),
        "compile_s": case.compile_s,
    }
    if state_of is not None:
        result["state_bytes"] = state_bytes(state_of)
        result["state_bytes_per_parameter"] = state_bytes_per_parameter(state_of, param_tree)
    return result


LIBRARIES = ("gradtx", "gradtx_packed", "optax")


def run_update(
    config: UpdateConfig,
    *,
    calls: int,
    use_torch: bool,
    seed: int = 0,
    with_optax: bool = True,
    with_per_array: bool = True,
    compiler_options: dict | None = None,
) -> dict:
    """Time one row: triad, gradtx per array, gradtx packed, Optax (and torch for AdamW) in the same rounds.

    ``gradtx_packed`` is the same transformation on :func:`gradtx.pack`-ed parameters, gradients
    and state (one buffer per dtype: what the Flax helper's ``packed=True`` step updates).
    ``with_optax=False`` leaves Optax out of the row (its compile time at thousands of arrays
    is minutes) and ``with_per_array=False`` gradtx's per-array case; their entries are then
    ``None``, and the row says so. ``compiler_options`` apply to every case alike (``None``:
    :func:`gradtx.compiler_options`; ``{}``: XLA's defaults).
    """
    import optax

    import gradtx

    entry = registry.BENCH[config.optimizer]
    gradtx_tx = registry.resolve(config.optimizer)(**entry.kwargs)
    optax_tx = getattr(optax, config.optimizer)(**entry.kwargs)
    params_key, grads_key = jax.random.split(jax.random.key(seed))
    shape = leaf_shape(config.params // config.leaves)
    grads = _make_tree(grads_key, config.params, config.leaves)
    packed_grads = gradtx.pack(grads)

    cases: dict[str, Any] = {"triad": timing.triad_case(config.params)}
    states = {}
    libraries = [("gradtx", gradtx_tx, False)] if with_per_array else []
    libraries.append(("gradtx_packed", gradtx_tx, True))
    if with_optax:
        libraries.append(("optax", optax_tx, False))
    for name, tx, packed in libraries:
        params = _make_tree(params_key, config.params, config.leaves)
        params = gradtx.pack(params, packed_grads.layout) if packed else params
        states[name] = jax.eval_shape(tx.init, params)
        cases[name] = timing.JaxCase(
            _update_step(tx),
            (params, tx.init(params)),
            (packed_grads if packed else grads,),
            compiler_options=compiler_options,
        )
    if not with_optax:
        states["optax"] = jax.eval_shape(optax_tx.init, [jax.ShapeDtypeStruct(shape, jnp.float32)] * config.leaves)
    if use_torch and config.optimizer == "adamw":
        torch_case = _torch_adamw_case(_make_tree(params_key, config.params, config.leaves), grads, entry.kwargs)
        if torch_case is not None:
            cases["torch_adamw_fused"] = torch_case

    timing.time_interleaved(list(cases.values()), calls)

    param_shapes = [jax.ShapeDtypeStruct(shape, jnp.float32)] * config.leaves
    model_bytes = bytes_per_parameter(entry, states["optax"], param_shapes)
    triad_ms = timing.median_ms(cases["triad"])
    row = {
        "optimizer": config.optimizer,
        "params": config.params,
        "leaves": config.leaves,
        "leaf_shape": list(shape),
        "bytes_per_parameter_model": model_bytes,
        "triad_ms": triad_ms,
        "triad_gb_per_s": timing.TRIAD_BYTES_PER_ELEMENT * config.params / (triad_ms * 1e-3) / 1e9,
    }
    for name in LIBRARIES:
        row[name] = (
            _summary(cases[name], config.params, model_bytes, triad_ms, states[name], param_shapes) if name in cases else None
        )
    if "torch_adamw_fused" in cases:
        row["torch_adamw_fused"] = _summary(cases["torch_adamw_fused"], config.params, model_bytes, triad_ms)
    row["skipped"] = [name for name in LIBRARIES if name not in cases]
    for name in ("gradtx", "gradtx_packed"):
        for key, figure in (("time", "ms_per_step"), ("compile", "compile_s")):
            both = row[name] is not None and row["optax"] is not None
            row[f"{name}_over_optax_{key}"] = row[name][figure] / row["optax"][figure] if both else None
    del cases, states
    gc.collect()
    return row


def update_configs(optimizers, params: int, leaf_counts) -> Iterator[UpdateConfig]:
    for optimizer in optimizers:
        for leaves in leaf_counts:
            yield UpdateConfig(optimizer, params, leaves)
