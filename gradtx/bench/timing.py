"""Timing primitives shared by the benchmarks: compiled, donated steps timed interleaved in rounds.

Every case is a step whose outputs feed its next call (``carry``), so donated buffers are
reused in place, as in a training loop. Cases that are compared are timed in the same rounds,
one call each per round, in alternating order, so that noise from a shared machine falls on
all of them alike; the median over rounds is reported (PERF.md).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from gradtx import compilation


class JaxCase:
    """``carry = step(*carry, *constants)``, jit-compiled with the carry donated; compile time measured apart.

    With an empty ``carry`` the step's outputs are discarded (nothing is threaded or donated).

    ``compile_s`` is the wall time of ``jax.jit(step).lower(...).compile()``, tracing included.
    ``compiler_options`` (``None``: :func:`gradtx.compiler_options`, ``{}``: XLA's defaults) are
    the same for every library compared in a run.
    """

    def __init__(
        self, step: Callable, carry: tuple, constants: tuple = (), *, donate: bool = True, compiler_options: dict | None = None
    ):
        donated = tuple(range(len(carry))) if donate else ()
        options = compilation.compiler_options() if compiler_options is None else compiler_options
        start = time.perf_counter()
        self.executable = jax.jit(step, donate_argnums=donated, compiler_options=options).lower(*carry, *constants).compile()
        self.compile_s = time.perf_counter() - start
        self.carry = carry
        self.constants = constants
        self.samples: list[float] = []

    def run(self) -> float:
        start = time.perf_counter()
        carry = self.executable(*self.carry, *self.constants)
        jax.block_until_ready(carry)
        elapsed = time.perf_counter() - start
        if self.carry:  # a step without carry (forward + backward alone) discards its outputs
            self.carry = carry if isinstance(carry, tuple) else (carry,)
        return elapsed


class CallableCase:
    """A step that is any Python callable (e.g. a ``torch.optim`` step); ``sync`` waits for its work."""

    def __init__(self, step: Callable[[], Any], sync: Callable[[], None] = lambda: None):
        self.step = step
        self.sync = sync
        self.compile_s = None
        self.samples: list[float] = []

    def run(self) -> float:
        start = time.perf_counter()
        self.step()
        self.sync()
        return time.perf_counter() - start


def time_interleaved(cases: Sequence[Any], calls: int) -> None:
    """One warm-up call per case, then ``calls`` rounds of one timed call per case (order alternating)."""
    for case in cases:
        case.run()
    for round_index in range(calls):
        ordered = cases if round_index % 2 == 0 else list(reversed(cases))
        for case in ordered:
            case.samples.append(case.run())


def median_ms(case: Any) -> float:
    return 1e3 * statistics.median(case.samples)


def triad_case(size: int) -> JaxCase:
    """PERF.md's roofline: ``a = a * s + b`` over float32 arrays of ``size`` elements, ``a`` donated (12 bytes/element)."""
    import jax.numpy as jnp

    a = jnp.ones((size,), jnp.float32)
    b = jnp.full((size,), 1e-3, jnp.float32)
    s = jnp.asarray(0.999, jnp.float32)
    return JaxCase(lambda a, b, s: (a * s + b,), (a,), (b, s))


TRIAD_BYTES_PER_ELEMENT = 12
