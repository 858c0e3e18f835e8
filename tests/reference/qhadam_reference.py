"""Reference trajectories of QHAdam and QHAdamW from the authors' code (qhoptim, facebookresearch/qhoptim).

Writes ``fixtures/qhadam.json`` (coupled weight decay, qhoptim's default) and
``fixtures/qhadamw.json`` (``QHAdamW``: decoupled decay, ``p *= 1 - lr * weight_decay``),
both with immediate discounts away from their defaults so that every quasi-hyperbolic term
is exercised. Run from the project root::

    pip install torch==2.13.0 qhoptim==1.1.0
    python tests/reference/qhadam_reference.py

qhoptim still calls the deprecated ``Tensor.add_(scalar, tensor)`` overloads; torch 2.13
accepts them with a warning, so no compatibility shim is needed.
"""

from __future__ import annotations

import warnings

import qhoptim
from common import run_torch, torch_problem, write_fixture
from qhoptim.pyt import QHAdam, QHAdamW

CASES = {
    "qhadam": (QHAdam, {"lr": 0.02, "betas": (0.95, 0.99), "nus": (0.6, 0.8), "eps": 1e-6, "weight_decay": 0.05}),
    "qhadamw": (QHAdamW, {"lr": 0.02, "betas": (0.9, 0.995), "nus": (0.7, 0.9), "eps": 1e-8, "weight_decay": 0.1}),
}


def main():
    warnings.filterwarnings("ignore", message="This overload of add")
    for name, (optimizer_class, hyperparameters) in CASES.items():
        params, loss_fn = torch_problem()
        trajectory = run_torch(optimizer_class(params, **hyperparameters), params, loss_fn)
        reference = f"qhoptim.pyt.{optimizer_class.__name__} (qhoptim {qhoptim.__version__})"
        print(write_fixture(name, reference, hyperparameters, trajectory))


if __name__ == "__main__":
    main()
