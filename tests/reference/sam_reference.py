"""Reference trajectories of SAM and ASAM from davda54/sam (Foret et al. 2021; Kwon et al. 2021).

Writes ``fixtures/sam.json`` (SAM) and ``fixtures/asam.json`` (``adaptive=True``, with the
larger radius the ASAM authors recommend), both around ``torch.optim.SGD`` with momentum 0.9
and coupled weight decay, so that the test also checks that the base optimizer sees the
unperturbed weights. Each step is the two-pass usage of davda54/sam's README
(``first_step`` / ``second_step``).

davda54/sam is not on PyPI: clone it and give its directory in ``SAM_REFERENCE_PATH``. Run from
the project root::

    pip install torch==2.13.0
    git clone https://github.com/davda54/sam /tmp/davda54-sam
    git -C /tmp/davda54-sam checkout 3c3afdbd71cff2462ec91c734b3d1170bd0f3707
    SAM_REFERENCE_PATH=/tmp/davda54-sam python tests/reference/sam_reference.py

The committed fixtures were generated at that commit (the newest as of writing).
"""

from __future__ import annotations

import os
import sys

import torch
from common import STEPS, snapshot, torch_problem, write_fixture

COMMIT = "3c3afdbd71cff2462ec91c734b3d1170bd0f3707"
BASE = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
CASES = {
    "sam": {"rho": 0.1, "adaptive": False},
    "asam": {"rho": 0.5, "adaptive": True},
}


def reference_sam_class():
    path = os.environ.get("SAM_REFERENCE_PATH")
    if not path:
        sys.exit("set SAM_REFERENCE_PATH to a clone of https://github.com/davda54/sam (see this script's docstring)")
    sys.path.insert(0, path)
    from sam import SAM

    return SAM


def main():
    sam_class = reference_sam_class()
    for name, sam_options in CASES.items():
        params, loss_fn = torch_problem()
        optimizer = sam_class(params, torch.optim.SGD, **sam_options, **BASE)
        trajectory = []
        for _ in range(STEPS):
            loss_fn().backward()
            optimizer.first_step(zero_grad=True)
            loss_fn().backward()
            optimizer.second_step(zero_grad=True)
            trajectory.append(snapshot(params))
        hyperparameters = {**sam_options, **BASE, "base_optimizer": "torch.optim.SGD"}
        print(write_fixture(name, f"davda54/sam sam.SAM (commit {COMMIT})", hyperparameters, trajectory))


if __name__ == "__main__":
    main()
