"""The fixed problem every reference script runs, on the PyTorch side, and the fixture writer.

The problem: a one-layer tanh regression with an L2 term,
``loss(W, b) = mean((tanh(X W^T + b) - Y)^2) + 0.01 * sum(W^2)``, with ``W`` of shape
(out=3, in=4) as in ``torch.nn.Linear`` and fixed data from a NumPy seed. The JAX side
(``tests/reference_problem.py``) stores the kernel transposed, (in, out), as Flax does; fixtures
are written in the JAX layout, so tests compare without knowing about PyTorch.

Run a script from the project root, e.g. ``python tests/reference/qhadam_reference.py``; it
needs ``pip install torch==2.13.0`` and the reference package named in the script.
"""

from __future__ import annotations

import json
import os
import platform

import numpy as np

STEPS = 60
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def data():
    rng = np.random.default_rng(1234)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.normal(size=(16, 3)).astype(np.float32)
    kernel = (0.5 * rng.normal(size=(4, 3))).astype(np.float32)
    bias = (0.1 * rng.normal(size=(3,))).astype(np.float32)
    return x, y, kernel, bias


def torch_problem(dtype=None):
    """``(params [W (out, in), b], loss_fn)`` as PyTorch tensors."""
    import torch

    dtype = dtype or torch.float32
    x, y, kernel, bias = data()
    x, y = torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)
    weight = torch.nn.Parameter(torch.tensor(kernel.T.copy(), dtype=dtype))
    b = torch.nn.Parameter(torch.tensor(bias, dtype=dtype))

    def loss_fn():
        return torch.mean((torch.tanh(x @ weight.T + b) - y) ** 2) + 0.01 * torch.sum(weight**2)

    return [weight, b], loss_fn


def snapshot(params) -> dict:
    """Torch params -> JAX layout lists: kernel (in, out), bias."""
    weight, bias = params
    return {"kernel": weight.detach().double().numpy().T.tolist(), "bias": bias.detach().double().numpy().tolist()}


def run_torch(optimizer, params, loss_fn, steps=STEPS, closure_step=False, before_step=None):
    """Run ``steps`` optimizer steps and return the trajectory of params after each step."""
    trajectory = []
    for _ in range(steps):
        if closure_step:
            optimizer.step(loss_fn)
        else:
            optimizer.zero_grad()
            loss_fn().backward()
            if before_step is not None:
                before_step()
            optimizer.step()
        trajectory.append(snapshot(params))
    return trajectory


def write_fixture(name: str, reference: str, hyperparameters: dict, trajectory: list, **extra) -> str:
    import torch

    path = os.path.join(FIXTURES, f"{name}.json")
    x, y, kernel, bias = data()
    record = {
        "name": name,
        "reference": reference,
        "generated_with": {"torch": torch.__version__, "python": platform.python_version()},
        "hyperparameters": hyperparameters,
        "steps": len(trajectory),
        "initial": {"kernel": kernel.astype(np.float64).tolist(), "bias": bias.astype(np.float64).tolist()},
        "trajectory": trajectory,
        **extra,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=None, separators=(",", ":"))
        f.write("\n")
    return path
