"""Reference trajectories of schedule-free AdamW and SGD from the authors' code (facebookresearch/schedule_free).

Writes two fixtures with the reference's in-place ``y`` optimizers (``schedulefree.AdamWScheduleFree``
and ``schedulefree.SGDScheduleFree``, not the ``...Reference`` variants), both with warmup and
weight decay on:

- ``fixtures/schedule_free_adamw.json``: ``r = 0``, the default ``weight_lr_power = 2``;
- ``fixtures/schedule_free_sgd.json``: polynomial weighting ``r = 1`` and ``weight_lr_power = 1``.

``trajectory`` holds the training params ``y`` after each step; ``eval_trajectory`` holds the
evaluation params ``x`` after each step, computed exactly as ``optimizer.eval()`` would
(``torch.lerp(y, z, 1 - 1 / beta1)``) but out of place, so that the training sequence is not
perturbed by an ``eval()``/``train()`` round trip.

Run from the project root::

    pip install torch==2.13.0 schedulefree==1.4.1
    python tests/reference/schedule_free_reference.py
"""

from __future__ import annotations

from importlib.metadata import version

import torch
from common import STEPS, snapshot, torch_problem, write_fixture
from schedulefree import AdamWScheduleFree, SGDScheduleFree

ADAMW = {
    "lr": 0.05, "betas": (0.85, 0.99), "eps": 1e-6, "weight_decay": 0.05, "warmup_steps": 10, "r": 0.0, "weight_lr_power": 2.0
}
SGD = {"lr": 0.3, "momentum": 0.8, "weight_decay": 0.02, "warmup_steps": 5, "r": 1.0, "weight_lr_power": 1.0}


def run(name: str, optimizer_class, hyperparameters: dict, b1: float) -> None:
    params, loss_fn = torch_problem()
    optimizer = optimizer_class(params, **hyperparameters)
    optimizer.train()
    trajectory, eval_trajectory = [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
        trajectory.append(snapshot(params))
        with torch.no_grad():
            eval_trajectory.append(snapshot([torch.lerp(p, optimizer.state[p]["z"], 1 - 1 / b1) for p in params]))
    package = f"schedulefree {version('schedulefree')}, facebookresearch/schedule_free"
    reference = f"schedulefree.{optimizer_class.__name__} ({package})"
    print(write_fixture(name, reference, hyperparameters, trajectory, eval_trajectory=eval_trajectory))


def main():
    run("schedule_free_adamw", AdamWScheduleFree, ADAMW, ADAMW["betas"][0])
    run("schedule_free_sgd", SGDScheduleFree, SGD, SGD["momentum"])


if __name__ == "__main__":
    main()
