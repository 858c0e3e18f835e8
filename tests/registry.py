"""The registry of every optimizer: registering one enrolls it in every contract test.

Each entry names a public gradtx alias, the keyword arguments that make it converge on the
contract problems (10,000 steps, as in Optax's own alias tests), and, where Optax has the
same optimizer, the Optax alias and the keyword arguments used for the parity test. The
same keywords are passed to both libraries: the parity test thereby also proves that
migrating from Optax is a rename.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gradtx


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    converge_kwargs: dict[str, Any]
    optax_name: str | None = None
    parity_kwargs: tuple[dict[str, Any], ...] = ()
    complex_ok: bool = True
    needs_obj_fn: bool = False
    # Overrides for training a small neural network (the contract problems' rates can be too large).
    network_kwargs: tuple[tuple[str, Any], ...] = ()

    def extra_args(self, loss) -> dict[str, Any]:
        """The keyword arguments ``update`` needs on a problem with objective ``loss``."""
        return {"obj_fn": loss} if self.needs_obj_fn else {}

    def make(self, **overrides):
        return getattr(gradtx, self.name)(**{**self.converge_kwargs, **overrides})

    def __str__(self):
        return self.name


def _both(name, converge_kwargs, *parity_kwargs, **options):
    return Entry(name, converge_kwargs, optax_name=name, parity_kwargs=parity_kwargs or (converge_kwargs,), **options)


OPTIMIZERS: tuple[Entry, ...] = (
    _both("sgd", {"learning_rate": 1e-3, "momentum": 0.9},
          {"learning_rate": 0.05}, {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}),
    _both("adagrad", {"learning_rate": 1.0}, {"learning_rate": 0.1, "initial_accumulator_value": 0.2, "eps": 1e-6}),
    _both("rmsprop", {"learning_rate": 5e-3, "momentum": 0.9},
          {"learning_rate": 0.01}, {"learning_rate": 0.01, "centered": True, "momentum": 0.9, "nesterov": True},
          {"learning_rate": 0.01, "eps_in_sqrt": False, "bias_correction": True, "initial_scale": 0.1}),
    _both("adam", {"learning_rate": 1e-1}, {"learning_rate": 0.01}, {"learning_rate": 0.01, "b1": 0.8, "eps_root": 1e-8}),
    _both("adamw", {"learning_rate": 1e-1}, {"learning_rate": 0.01, "weight_decay": 0.1}),
    _both("nadam", {"learning_rate": 1e-2}, {"learning_rate": 0.01}),
    _both("nadamw", {"learning_rate": 1e-2}, {"learning_rate": 0.01, "weight_decay": 0.05}),
    _both("amsgrad", {"learning_rate": 1e-1}, {"learning_rate": 0.01}),
    _both("radam", {"learning_rate": 5e-3}, {"learning_rate": 0.01}, {"learning_rate": 0.01, "threshold": 6.0}),
    _both("adamax", {"learning_rate": 1e-1}, {"learning_rate": 0.01}),
    _both("adamaxw", {"learning_rate": 1e-1}, {"learning_rate": 0.01, "weight_decay": 0.1}),
    _both("lamb", {"learning_rate": 1e-3}, {"learning_rate": 0.01, "weight_decay": 0.01}),
    _both("lars", {"learning_rate": 1.0}, {"learning_rate": 0.1, "weight_decay": 1e-3}, network_kwargs=(("learning_rate", 0.1),)),
    _both("lion", {"learning_rate": 1e-2, "weight_decay": 1e-4}, {"learning_rate": 1e-3, "weight_decay": 0.01}, complex_ok=False),
    _both("novograd", {"learning_rate": 1e-3}, {"learning_rate": 0.01, "weight_decay": 1e-3}),
    _both("adafactor", {"learning_rate": 5e-3}, {"learning_rate": 0.01}, {"learning_rate": 0.01, "momentum": 0.9, "weight_decay_rate": 1e-3}),
    _both("adabelief", {"learning_rate": 1e-2}, {"learning_rate": 0.01}),
    _both("yogi", {"learning_rate": 1e-1}, {"learning_rate": 0.01}),
)

# Optimizers that Optax lacks: checked against their authors' reference implementations
# (tests/reference/) and enrolled here in every contract test.
BEYOND_OPTAX: tuple[Entry, ...] = (
    Entry("qhadam", {"learning_rate": 1e-2}),
    Entry("qhadamw", {"learning_rate": 1e-2}),
    Entry("qhm", {"learning_rate": 1e-3}),
    Entry("adabound", {"learning_rate": 1e-2, "final_lr": 1e-3}),
    Entry("amsbound", {"learning_rate": 1e-2, "final_lr": 1e-3}),
    Entry("ranger", {"learning_rate": 1e-2}),
    Entry("schedule_free_adamw", {"learning_rate": 1e-2}),
    Entry("schedule_free_sgd", {"learning_rate": 1.5e-3, "b1": 0.5}),
    Entry("sophia_h", {"learning_rate": 5e-3, "weight_decay": 0.0}, complex_ok=False, needs_obj_fn=True),
)

ALL = OPTIMIZERS + BEYOND_OPTAX
BY_NAME = {entry.name: entry for entry in ALL}
