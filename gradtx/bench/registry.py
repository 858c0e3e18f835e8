"""The optimizers the command-line tool knows, by name.

Two tables: :data:`COMPARE` (what ``gradtx compare`` trains the digits classifier with, each
with a learning rate or schedule suited to that task) and :data:`BENCH` (what ``gradtx bench``
times, with the keyword arguments given identically to gradtx and to Optax, since gradtx keeps
Optax's names). Names are resolved lazily (:func:`resolve`), so the tables import even when an
optimizer is missing from this installation; the tool then skips it and says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


class Unavailable(LookupError):
    """A registered name that this installation of gradtx (or Optax) does not provide."""


def resolve(name: str) -> Callable[..., Any]:
    """``gradtx.<name>``, looked up when needed; raises :class:`Unavailable` if this installation lacks it."""
    import gradtx

    found = getattr(gradtx, name, None)
    if found is None:
        raise Unavailable(f"gradtx.{name} is not available in this installation")
    return found


@dataclasses.dataclass(frozen=True)
class CompareEntry:
    """One optimizer of ``gradtx compare``: ``build(steps)`` makes the transformation for a run of ``steps`` steps."""

    name: str
    description: str
    build: Callable[[int], Any]
    eval_params: str | None = None  # gradtx function giving the parameters to evaluate with
    needs_grad_fn: bool = False  # SAM: the train step passes grad_fn to update


def _warmup_cosine(peak: float, steps: int):
    return resolve("warmup_cosine_decay_schedule")(
        init_value=0.0, peak_value=peak, warmup_steps=max(1, steps // 10), decay_steps=steps, end_value=peak / 100
    )


_COMPARE_ENTRIES = (
    CompareEntry("sgd", "SGD, heavy-ball momentum 0.9, lr 0.05", lambda steps: resolve("sgd")(0.05, momentum=0.9)),
    CompareEntry("adam", "Adam, lr 2e-3", lambda steps: resolve("adam")(2e-3)),
    CompareEntry(
        "adamw",
        "AdamW, warmup-cosine to peak lr 5e-3 (10% warmup), weight decay 1e-4",
        lambda steps: resolve("adamw")(_warmup_cosine(5e-3, steps), weight_decay=1e-4),
    ),
    CompareEntry("lamb", "LAMB, lr 3e-3, weight decay 1e-4", lambda steps: resolve("lamb")(3e-3, weight_decay=1e-4)),
    CompareEntry("lion", "Lion, lr 3e-4, weight decay 1e-3", lambda steps: resolve("lion")(3e-4)),
    CompareEntry(
        "ranger",
        "Ranger (Lookahead k=6 over RAdam + centralization), lr 1e-2; evaluated at the slow weights",
        lambda steps: resolve("ranger")(learning_rate=1e-2),
        eval_params="lookahead_slow_params",
    ),
    CompareEntry("radam", "RAdam, lr 2e-3", lambda steps: resolve("radam")(2e-3)),
    CompareEntry("nadam", "NAdam, lr 2e-3", lambda steps: resolve("nadam")(2e-3)),
    CompareEntry("adabelief", "AdaBelief, lr 2e-3", lambda steps: resolve("adabelief")(2e-3)),
    CompareEntry("adafactor", "Adafactor, lr 1e-2", lambda steps: resolve("adafactor")(1e-2)),
    CompareEntry("rmsprop", "RMSProp, lr 1e-3", lambda steps: resolve("rmsprop")(1e-3)),
    CompareEntry("adagrad", "Adagrad, lr 5e-2", lambda steps: resolve("adagrad")(5e-2)),
    CompareEntry(
        "schedule_free_adamw",
        "Schedule-free AdamW, lr 5e-3, 10% warmup; evaluated at the averaged sequence",
        lambda steps: resolve("schedule_free_adamw")(5e-3, warmup_steps=max(1, steps // 10)),
        eval_params="schedule_free_eval_params",
    ),
    CompareEntry(
        "sam",
        "SAM (rho 0.05) over SGD with momentum 0.9, lr 0.05: two gradients per step",
        lambda steps: resolve("sam")(resolve("sgd")(0.05, momentum=0.9), rho=0.05),
        needs_grad_fn=True,
    ),
)

COMPARE: dict[str, CompareEntry] = {entry.name: entry for entry in _COMPARE_ENTRIES}
COMPARE_DEFAULT = ("sgd", "adam", "adamw", "lamb", "lion", "ranger")


@dataclasses.dataclass(frozen=True)
class BenchEntry:
    """One optimizer of ``gradtx bench``: the same keyword arguments go to ``gradtx.<name>`` and ``optax.<name>``.

    ``bytes_per_parameter`` is PERF.md's traffic model of one fused, in-place update (read
    ``p, g`` and the state, write ``p`` and the state); ``None`` means ``12 + 2 *`` the state
    bytes per parameter of Optax's state, i.e. the same model computed from the layout.
    """

    name: str
    kwargs: dict
    bytes_per_parameter: float | None


_BENCH_ENTRIES = (
    BenchEntry("sgd", {"learning_rate": 1e-3, "momentum": 0.9}, 20),
    BenchEntry("adam", {"learning_rate": 1e-3}, 28),
    BenchEntry("adamw", {"learning_rate": 1e-3}, 28),
    BenchEntry("lion", {"learning_rate": 1e-4}, 20),
    BenchEntry("lamb", {"learning_rate": 1e-3}, 28),
    BenchEntry("adafactor", {"learning_rate": 1e-3}, None),
    BenchEntry("nadam", {"learning_rate": 1e-3}, 28),
    BenchEntry("radam", {"learning_rate": 1e-3}, 28),
    BenchEntry("adabelief", {"learning_rate": 1e-3}, 28),
    BenchEntry("amsgrad", {"learning_rate": 1e-3}, None),
    BenchEntry("rmsprop", {"learning_rate": 1e-3}, 20),
    BenchEntry("adagrad", {"learning_rate": 1e-3}, 20),
    BenchEntry("lars", {"learning_rate": 1e-3}, None),
    BenchEntry("novograd", {"learning_rate": 1e-3}, None),
)

BENCH: dict[str, BenchEntry] = {entry.name: entry for entry in _BENCH_ENTRIES}
BENCH_DEFAULT = ("sgd", "adamw", "lion", "lamb", "adafactor")
