"""Reference trajectories of Lookahead: Algorithm 1 of Zhang et al. (2019), written literally around torch optimizers.

The Lookahead authors publish no reference package, so this script is the paper's algorithm,
line by line, around ``torch.optim.SGD`` and ``torch.optim.Adam`` (the inner optimizer ``A``
keeps its state across synchronizations, as in the paper's experiments)::

    phi <- theta_0
    for t = 1, 2, ...:
        theta <- theta + A(L, theta)                       (one inner step per minibatch)
        if t % k == 0:  phi <- phi + alpha (theta - phi);  theta <- phi

Writes ``fixtures/lookahead_sgd.json`` (SGD with momentum and coupled weight decay, k = 5,
alpha = 0.8) and ``fixtures/lookahead_adam.json`` (Adam, k = 4, alpha = 0.6). The Lookahead
inside the Ranger reference (``ranger_reference.py``) is the second check. Run from the
project root::

    pip install torch==2.13.0
    python tests/reference/lookahead_reference.py
"""

from __future__ import annotations

import torch
from common import STEPS, snapshot, torch_problem, write_fixture

CASES = {
    "lookahead_sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, {"k": 5, "alpha": 0.8}),
    "lookahead_adam": (torch.optim.Adam, {"lr": 0.02, "betas": (0.9, 0.99), "eps": 1e-8}, {"k": 4, "alpha": 0.6}),
}


def lookahead(optimizer_class, inner_hyperparameters, k, alpha):
    params, loss_fn = torch_problem()
    inner = optimizer_class(params, **inner_hyperparameters)
    slow = [p.detach().clone() for p in params]
    trajectory = []
    for t in range(1, STEPS + 1):
        inner.zero_grad()
        loss_fn().backward()
        inner.step()
        if t % k == 0:
            with torch.no_grad():
                for phi, theta in zip(slow, params):
                    phi.add_(theta - phi, alpha=alpha)
                    theta.copy_(phi)
        trajectory.append(snapshot(params))
    return trajectory


def main():
    for name, (optimizer_class, inner_hyperparameters, lookahead_hyperparameters) in CASES.items():
        trajectory = lookahead(optimizer_class, inner_hyperparameters, **lookahead_hyperparameters)
        inner = f"torch.optim.{optimizer_class.__name__}"
        hyperparameters = {**lookahead_hyperparameters, "inner": inner, **inner_hyperparameters}
        reference = f"Zhang et al. 2019, Algorithm 1, around {inner}"
        print(write_fixture(name, reference, hyperparameters, trajectory))


if __name__ == "__main__":
    main()
