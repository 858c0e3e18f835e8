"""Reference trajectory of QHM from the authors' code (qhoptim, facebookresearch/qhoptim).

Writes ``fixtures/qhm.json``: dampened momentum, ``nu`` away from 0 and 1, and coupled
weight decay (qhoptim's default ``weight_decay_type="grad"``). Run from the project root::

    pip install torch==2.13.0 qhoptim==1.1.0
    python tests/reference/qhm_reference.py

qhoptim still calls the deprecated ``Tensor.add_(scalar, tensor)`` overloads; torch 2.13
accepts them with a warning, so no compatibility shim is needed.
"""

from __future__ import annotations

import warnings

import qhoptim
from common import run_torch, torch_problem, write_fixture
from qhoptim.pyt import QHM

HYPERPARAMETERS = {"lr": 0.5, "momentum": 0.95, "nu": 0.6, "weight_decay": 0.02}


def main():
    warnings.filterwarnings("ignore", message="This overload of add")
    params, loss_fn = torch_problem()
    trajectory = run_torch(QHM(params, **HYPERPARAMETERS), params, loss_fn)
    print(write_fixture("qhm", f"qhoptim.pyt.QHM (qhoptim {qhoptim.__version__})", HYPERPARAMETERS, trajectory))


if __name__ == "__main__":
    main()
