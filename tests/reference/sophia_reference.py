"""Reference trajectory of SophiaG from the authors' code (Liuhong99/Sophia, packaged as ``sophia_opt``).

Writes ``fixtures/sophia.json``. The training loop is the authors' (README "General Usage" and
``train_sophiag.py``): every step is ``loss.backward(); optimizer.step(bs=bs)``, and after every
``k``-th step (``iter_num % k == k - 1``) the Hessian EMA is refreshed with
``optimizer.update_hessian()``, which folds ``p.grad * p.grad`` into it.

What is fed to ``update_hessian()``: the authors back-propagate a cross-entropy loss on labels
sampled from the model (the Gauss-Newton-Bartlett estimator); the shared problem is a
regression and sampling would make the two sides incomparable, so here ``p.grad`` is the
gradient of the problem's own loss at the refresh point (the parameters after the ``k``-th
step), a deterministic stand-in. The JAX side feeds its ``hessian_estimator`` the same
quantity, scaled by ``bs`` because gradtx puts the batch factor ``B`` into the estimate
(``h_hat = B * g * g``, the paper's Algorithm 2) where the reference multiplies the EMA by
``bs`` in ``step``: the trajectories are then the same function of the same numbers.

Hyperparameters are chosen so that the fraction of unclipped coordinates ("win rate") grows
from 0 to about 2/3 within the 60 steps, exercising both branches of the clipping, with
decoupled weight decay on and a refresh interval ``k = 5`` (not the default 10).

Run from the project root::

    pip install torch==2.13.0 sophia_opt==0.2.2
    python tests/reference/sophia_reference.py
"""

from __future__ import annotations

from importlib.metadata import version

from common import STEPS, snapshot, torch_problem, write_fixture
from sophia_opt import SophiaG

HYPERPARAMETERS = {"lr": 0.02, "betas": (0.9, 0.9), "rho": 0.5, "weight_decay": 0.2}
BATCH_SIZE = 16  # the problem's number of examples: the reference's ``bs``
INTERVAL = 5  # the reference loop's ``k``


def main():
    params, loss_fn = torch_problem()
    optimizer = SophiaG(params, **HYPERPARAMETERS)
    trajectory = []
    for iter_num in range(STEPS):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step(bs=BATCH_SIZE)
        trajectory.append(snapshot(params))
        if iter_num % INTERVAL == INTERVAL - 1:
            optimizer.zero_grad()
            loss_fn().backward()
            optimizer.update_hessian()
            optimizer.zero_grad()
    reference = f"sophia_opt.SophiaG (sophia_opt {version('sophia_opt')}, Liuhong99/Sophia)"
    hyperparameters = {**HYPERPARAMETERS, "bs": BATCH_SIZE, "k": INTERVAL}
    hessian_feed = "p.grad = grad of the loss at the refresh point; gradtx estimate = bs * grad ** 2"
    print(write_fixture("sophia", reference, hyperparameters, trajectory, hessian_feed=hessian_feed))


if __name__ == "__main__":
    main()
