"""Speed and memory of 8-bit optimizer states: one AdamW step on one 16M-parameter array, donated.

Times, in the same rounds (interleaved, PERF.md): the donated triad (roofline), Optax ``adamw``,
gradtx ``adamw`` with float32, bfloat16 and 8-bit (``gradtx.Quantized8bit()``, the power code;
and ``code="dynamic"``, bitsandbytes' map) states. Reports
median ms per step, ratios to gradtx float32, the state bytes per parameter, and the compiled
program's memory analysis (arguments, outputs, aliased (donated) bytes and temporaries): a
temporary of ``4 * n`` bytes is one parameter-sized float32 copy.

With ``--packed-arrays 1 1024 4096`` it also times float32 and 8-bit AdamW on that many equal
arrays packed into one buffer (``gradtx.pack``, the fast path of ``make_train_step(packed=True)``).

    python benchmarks/memory_speed.py [--size 16777216] [--calls 15] [--packed-arrays 1 1024 4096]
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp
import optax

import gradtx
from gradtx.bench.timing import JaxCase, median_ms, time_interleaved, triad_case


def adamw_case(tx, size: int, packed_arrays: int = 0) -> tuple[JaxCase, dict]:
    """The donated step of ``tx`` on ``size`` parameters: one array, or ``packed_arrays`` equal arrays packed (``gradtx.pack``)."""
    params = jnp.linspace(-1.0, 1.0, size, dtype=jnp.float32)
    grads = jnp.sin(params * 7.0)
    if packed_arrays:
        grads = gradtx.pack(list(grads.reshape(packed_arrays, -1)))
        params = gradtx.pack(list(params.reshape(packed_arrays, -1)), grads.layout)
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    case = JaxCase(step, (params, state), (grads,))
    memory = case.executable.memory_analysis()
    info = {
        "state_bytes_per_parameter": gradtx.state_bytes(state) / size,
        "argument_mb": memory.argument_size_in_bytes / 2**20,
        "output_mb": memory.output_size_in_bytes / 2**20,
        "alias_mb": memory.alias_size_in_bytes / 2**20,
        "temp_mb": memory.temp_size_in_bytes / 2**20,
        "temp_parameter_copies": memory.temp_size_in_bytes / (4 * size),
        "compile_s": case.compile_s,
    }
    return case, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16 * 2**20)
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument(
        "--packed-arrays",
        type=int,
        nargs="*",
        default=[],
        help="also time float32 and 8-bit AdamW on this many equal arrays packed (gradtx.pack), e.g. 1 1024 4096",
    )
    args = parser.parse_args()

    builders = {
        "optax adamw float32": lambda: optax.adamw(1e-3),
        "gradtx adamw float32": lambda: gradtx.adamw(1e-3),
        "gradtx adamw bfloat16": lambda: gradtx.adamw(1e-3, state_dtype=jnp.bfloat16),
        "gradtx adamw 8-bit": lambda: gradtx.adamw(1e-3, state_dtype=gradtx.Quantized8bit()),
        "gradtx adamw 8-bit, dynamic code": lambda: gradtx.adamw(1e-3, state_dtype=gradtx.Quantized8bit(code="dynamic")),
    }
    cases, infos = {"triad": triad_case(args.size)}, {}
    for name, build in builders.items():
        cases[name], infos[name] = adamw_case(build(), args.size)
    for arrays in args.packed_arrays:
        for name in ("gradtx adamw float32", "gradtx adamw 8-bit", "gradtx adamw 8-bit, dynamic code"):
            label = f"{name}, {arrays} arrays packed"
            cases[label], infos[label] = adamw_case(builders[name](), args.size, packed_arrays=arrays)
    time_interleaved(list(cases.values()), args.calls)

    baseline = median_ms(cases["gradtx adamw float32"])
    rows = {}
    for name, case in cases.items():
        row = {"median_ms": round(median_ms(case), 2), "over_gradtx_float32": round(median_ms(case) / baseline, 3)}
        row.update({key: round(value, 3) for key, value in infos.get(name, {}).items()})
        rows[name] = row
    report = {
        "size": args.size,
        "calls": args.calls,
        "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "rows": rows,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
