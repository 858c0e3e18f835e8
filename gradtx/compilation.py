"""XLA compiler options under which donated optimizer updates stream.

An update that reads the *old* value of a donated state buffer in one loop and overwrites that
buffer in place in another (Lion: the parameter step reads the old moment, the moment step
rewrites it; any moment stored narrower than float32 is another case) is legal to run in place
once the reader runs first. XLA:CPU's default copy insertion does not see that and copies the
old buffer first, with a single-threaded ``copy`` that takes ~20 ms for 64 MiB on a 2-core CPU
(measured, JAX 0.10.2): Lion on one 16M-parameter array spends two thirds of its step there.
With ``xla_cpu_copy_insertion_use_region_analysis`` the copy is proven unnecessary and dropped.

Loops that compute more than they move (8-bit moments: decode, update, re-encode) are bound by
the latency of one long chain of dependent vector instructions per iteration, which XLA:CPU
does not unroll; with ``xla_cpu_prefer_vector_width=512`` each iteration handles 16 float32
elements instead of 8 on CPUs with AVX-512 (a preference: CPUs without it keep their width).

Neither option changes arithmetic: results are bit-identical (checked for AdamW, LAMB, Lion,
Adafactor, NovoGrad, clipped Adam and 8-bit AdamW/LAMB), compile time unchanged.
"""

from __future__ import annotations

from typing import Any

import jax

# Per backend; only XLA:CPU needs help today (GPU copy insertion already reasons this way).
_OPTIONS = {"cpu": {"xla_cpu_copy_insertion_use_region_analysis": True, "xla_cpu_prefer_vector_width": 512}}


def compiler_options(backend: str | None = None) -> dict[str, Any]:
    """The XLA compiler options gradtx recommends for a jitted training or update step on ``backend``.

    Pass them to ``jax.jit(step, donate_argnums=..., compiler_options=gradtx.compiler_options())``
    (``gradtx.contrib.flax.make_train_step`` and ``gradtx bench`` do so). On CPU:

    * ``xla_cpu_copy_insertion_use_region_analysis=True``: XLA updates a donated state buffer in
      place even when another loop of the step reads its old value, instead of first copying it
      with a slow single-threaded copy. Measured on one 16M-parameter float32 array (2-core
      Intel Xeon, JAX 0.10.2): Lion's donated step 34 ms -> 12 ms (Optax's Lion alike), AdamW
      with bfloat16 moments 40 ms -> 20 ms and no parameter-sized temporary left; AdamW and SGD
      unchanged (they never needed the copy).
    * ``xla_cpu_prefer_vector_width=512``: 16 float32 lanes per loop iteration where the CPU has
      AVX-512. Measured (same machine, AVX-512): AdamW with 8-bit moments (the default power
      code) 54 -> 44 ms; the float32 updates of ``gradtx bench`` (memory-bound) unchanged
      within noise; 8-bit moments with ``Quantized8bit(code="dynamic")`` slower, 72 -> 82 ms
      (compile those with the first option alone).

    Results are bit-identical with and without. Without ``jax.jit`` access (e.g. a step jitted
    by a framework) set ``XLA_FLAGS="--xla_cpu_copy_insertion_use_region_analysis=true
    --xla_cpu_prefer_vector_width=512"`` before importing JAX.

    Args:
        backend: ``"cpu"``, ``"gpu"``, ``"tpu"`` …; ``None`` means ``jax.default_backend()``.

    Returns:
        A new dict of option names to values, empty where none is needed.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> gradtx.compiler_options("cpu")
        {'xla_cpu_copy_insertion_use_region_analysis': True, 'xla_cpu_prefer_vector_width': 512}
        >>> tx = gradtx.lion(1e-4)
        >>> def step(params, state, grads):
        ...     updates, state = tx.update(grads, state, params)
        ...     return gradtx.apply_updates(params, updates), state
        >>> step = jax.jit(step, donate_argnums=(0, 1), compiler_options=gradtx.compiler_options())

    References:
        XLA copy insertion, https://github.com/openxla/xla/blob/main/xla/service/copy_insertion.h
    """
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"compiler_options: backend must be a backend name such as 'cpu' or None, got {backend!r}")
    name = jax.default_backend() if backend is None else backend.lower()
    return dict(_OPTIONS.get(name, {}))
