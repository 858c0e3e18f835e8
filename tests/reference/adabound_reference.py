"""Reference trajectories of AdaBound and AMSBound from the authors' code (Luolc/AdaBound, ``adabound``).

Writes three fixtures, all with coupled weight decay and a large ``gamma`` so that the
dynamic bounds close in within the 60 steps: on this problem about 40% of the per-parameter
step sizes are raised to the lower bound and 17% cut to the upper bound over the run, so the
clipping is exercised on both sides:

- ``fixtures/adabound.json``: AdaBound with a constant learning rate;
- ``fixtures/amsbound.json``: AMSBound (``amsbound=True``);
- ``fixtures/adabound_schedule.json``: AdaBound whose ``param_group['lr']`` is set before
  every step from the schedule ``lr_k = lr_0 * decay**k`` (k = 0, 1, ...), the reference's
  way of following a scheduler: it rescales ``final_lr`` by ``lr / base_lr`` where
  ``base_lr`` is the learning rate at construction, ``lr_0``.

Run from the project root::

    pip install torch==2.13.0 adabound==0.0.5
    python tests/reference/adabound_reference.py

``adabound`` still calls the deprecated ``Tensor.add(scalar, tensor)`` overloads; torch 2.13
accepts them with a warning, so no compatibility shim is needed.
"""

from __future__ import annotations

import warnings

from adabound import AdaBound
from common import STEPS, run_torch, torch_problem, write_fixture

REFERENCE = "adabound.AdaBound (adabound 0.0.5, Luolc/AdaBound)"
BASE = {"lr": 0.02, "betas": (0.9, 0.99), "final_lr": 0.3, "gamma": 0.05, "eps": 1e-8, "weight_decay": 0.01}
SCHEDULE = {"init_value": 0.02, "decay_rate": 0.97}


def schedule(step: int) -> float:
    return SCHEDULE["init_value"] * SCHEDULE["decay_rate"] ** step


def constant(name: str, hyperparameters: dict) -> None:
    params, loss_fn = torch_problem()
    trajectory = run_torch(AdaBound(params, **hyperparameters), params, loss_fn)
    print(write_fixture(name, REFERENCE, hyperparameters, trajectory))


def scheduled() -> None:
    params, loss_fn = torch_problem()
    hyperparameters = {**BASE, "lr": schedule(0)}
    optimizer = AdaBound(params, **hyperparameters)
    steps_taken = []

    def set_learning_rate():
        optimizer.param_groups[0]["lr"] = schedule(len(steps_taken))
        steps_taken.append(None)

    trajectory = run_torch(optimizer, params, loss_fn, STEPS, before_step=set_learning_rate)
    print(write_fixture("adabound_schedule", REFERENCE, hyperparameters, trajectory, schedule=SCHEDULE))


def main():
    warnings.filterwarnings("ignore", message="This overload of add")
    constant("adabound", BASE)
    constant("amsbound", {**BASE, "amsbound": True})
    scheduled()


if __name__ == "__main__":
    main()
