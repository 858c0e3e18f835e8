"""Parity with Optax: the same 100 float32 steps from the same start agree to 1e-5 (relative)."""

from __future__ import annotations

import optax
import pytest
from problems import assert_relative_close, mlp_regression, run
from registry import OPTIMIZERS

import gradtx

STEPS = 100

CASES = [
    pytest.param(entry, kwargs, id=f"{entry.name}-{i}")
    for entry in OPTIMIZERS
    if entry.optax_name
    for i, kwargs in enumerate(entry.parity_kwargs)
]


def run_both(gradtx_tx, optax_tx):
    params, loss = mlp_regression()
    ours, our_losses = run(gradtx_tx, params, loss, STEPS, gradtx.apply_updates)
    theirs, their_losses = run(optax_tx, params, loss, STEPS, optax.apply_updates)
    assert float(our_losses[-1]) < float(our_losses[0]), "the optimizer did not reduce the loss"
    return ours, theirs


@pytest.mark.parametrize("entry, kwargs", CASES)
def test_alias_matches_optax(entry, kwargs):
    ours, theirs = run_both(getattr(gradtx, entry.name)(**kwargs), getattr(optax, entry.optax_name)(**kwargs))
    assert_relative_close(ours, theirs)


def test_composed_chain_matches_optax():
    def build(lib):
        schedule = lib.warmup_cosine_decay_schedule(0.0, 0.02, warmup_steps=10, decay_steps=STEPS, end_value=1e-3)
        return lib.chain(lib.clip_by_global_norm(0.5), lib.adamw(schedule, weight_decay=0.05))

    ours, theirs = run_both(build(gradtx), build(optax))
    assert_relative_close(ours, theirs)


def test_scheduled_weight_decay_matches_optax():
    def build(lib):
        return lib.adamw(lib.linear_schedule(0.02, 0.0, STEPS), weight_decay=lib.linear_schedule(0.1, 0.0, STEPS))

    ours, theirs = run_both(build(gradtx), build(optax))
    assert_relative_close(ours, theirs)
