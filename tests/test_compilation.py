"""``gradtx.compiler_options``: what it returns, and that on CPU it removes the defensive copy of a
donated moment without changing a single bit of the results (nor does its vector width, 8-bit
moments and reductions included).

The copy is structural (visible in the compiled HLO and in ``memory_analysis``), so it is checked
here; its cost in time is measured by ``gradtx bench`` (benchmarks/RESULTS.md), not by a unit test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx

OPTION = "xla_cpu_copy_insertion_use_region_analysis"
CPU_OPTIONS = {OPTION: True, "xla_cpu_prefer_vector_width": 512}
SIZE = 1 << 16

requires_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the option is an XLA:CPU one")


def test_options_per_backend():
    assert gradtx.compiler_options("cpu") == CPU_OPTIONS
    assert gradtx.compiler_options("CPU") == CPU_OPTIONS
    assert gradtx.compiler_options("gpu") == {}
    assert gradtx.compiler_options("tpu") == {}
    assert gradtx.compiler_options() == gradtx.compiler_options(jax.default_backend())


def test_options_are_a_fresh_dict_each_call():
    options = gradtx.compiler_options("cpu")
    options[OPTION] = False
    assert gradtx.compiler_options("cpu") == CPU_OPTIONS


def test_bad_backend_names_the_function_and_argument():
    with pytest.raises(TypeError, match=r"compiler_options: backend must be .* got 3"):
        gradtx.compiler_options(3)


def _compiled_step(tx, options):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return gradtx.apply_updates(params, updates), state

    params = jnp.linspace(-1.0, 1.0, SIZE)
    grads = jnp.cos(jnp.arange(SIZE, dtype=jnp.float32))
    compiled = jax.jit(step, donate_argnums=(0, 1), compiler_options=options).lower(params, tx.init(params), grads).compile()
    return compiled, params, grads


def _run(tx, options, steps=5):
    compiled, params, grads = _compiled_step(tx, options)
    state = tx.init(params)
    for _ in range(steps):
        params, state = compiled(params, state, grads * 0.5 + params)
    return params, state


def _parameter_sized_copies(compiled) -> int:
    text = compiled.as_text()
    return sum(1 for line in text.splitlines() if " copy(" in line and f"[{SIZE}]" in line.split("copy(")[0])


CASES = {
    "lion": lambda: gradtx.lion(1e-3),
    "adamw bfloat16 moments": lambda: gradtx.adamw(1e-3, state_dtype=jnp.bfloat16),
    "adamw": lambda: gradtx.adamw(1e-3),
    "sgd momentum": lambda: gradtx.sgd(1e-2, momentum=0.9),
}
# Where the vector width could matter: compute-bound 8-bit loops, reductions (norms, RMS).
WIDTH_CASES = {
    "adamw 8-bit": lambda: gradtx.adamw(1e-3, state_dtype=gradtx.Quantized8bit()),
    "lamb 8-bit": lambda: gradtx.lamb(1e-3, state_dtype=gradtx.Quantized8bit()),
    "adafactor": lambda: gradtx.adafactor(1e-2),
    "clipped adam": lambda: gradtx.chain(gradtx.clip_by_global_norm(1e-3), gradtx.adam(1e-3)),
}


@requires_cpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_recommended_options_leave_no_parameter_sized_copy_or_temporary(name):
    compiled, _, _ = _compiled_step(CASES[name](), gradtx.compiler_options())
    assert _parameter_sized_copies(compiled) == 0
    assert compiled.memory_analysis().temp_size_in_bytes < SIZE  # scalars only, no moment-sized buffer


@requires_cpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_recommended_options_change_no_bit_of_the_results(name):
    with_options = _run(CASES[name](), gradtx.compiler_options())
    defaults = _run(CASES[name](), {})
    for a, b in zip(jax.tree.leaves(with_options), jax.tree.leaves(defaults)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@requires_cpu
@pytest.mark.parametrize("name", sorted(WIDTH_CASES))
def test_the_vector_width_changes_no_bit_of_the_results(name):
    with_options = _run(WIDTH_CASES[name](), gradtx.compiler_options())
    narrow = _run(WIDTH_CASES[name](), {OPTION: True})
    for a, b in zip(jax.tree.leaves(with_options), jax.tree.leaves(narrow)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@requires_cpu
def test_flax_train_step_is_compiled_with_the_recommended_options():
    nnx = pytest.importorskip("flax.nnx")
    from gradtx.contrib.flax import make_train_step

    model = nnx.Linear(256, 256, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, gradtx.lion(1e-3), wrt=nnx.Param)
    step = make_train_step(lambda m, x: jnp.mean(m(x) ** 2))
    compiled = step.compile(model, optimizer, jnp.ones((4, 256)))
    # Lion reads the old moment after its in-place update; under XLA's defaults this compiles a (256, 256) copy.
    assert not [line for line in compiled.as_text().splitlines() if " copy(" in line and "[256,256]" in line.split("copy(")[0]]
