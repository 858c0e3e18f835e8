"""Reference trajectories of Ranger from lessw2020's code (RAdam + Lookahead + gradient centralization).

Writes three fixtures:

- ``fixtures/ranger.json``: ``ranger.Ranger`` of lessw2020/Ranger-Deep-Learning-Optimizer
  (``ranger/ranger.py``, version 20.4.11, the class its package exports) with gradient
  centralization and weight decay on, and every other hyperparameter away from its default
  (Lookahead's k and alpha, betas, eps, the SMA threshold);
- ``fixtures/ranger_pytorch_ranger.json``: ``pytorch_ranger.Ranger`` (PyPI ``pytorch_ranger``
  0.1.1, version 9.3.19, which has no gradient centralization) with its defaults, a learning
  rate and weight decay: it pins gradtx's defaults and ``use_gc=False``;
- ``fixtures/ranger2020.json``: ``ranger.ranger2020.Ranger`` (version 20.9.4, the newest) with
  its defaults and no weight decay, where it agrees with 20.4.11 (its weight decay differs,
  see ``gradtx.ranger``).

The repository is not on PyPI: clone it and give its directory in ``RANGER_REFERENCE_PATH``.
Run from the project root::

    pip install torch==2.13.0 pytorch_ranger==0.1.1
    git clone https://github.com/lessw2020/Ranger-Deep-Learning-Optimizer /tmp/ranger-reference
    git -C /tmp/ranger-reference checkout c82a30460684c7301086d84185a1927b1c256afa
    RANGER_REFERENCE_PATH=/tmp/ranger-reference python tests/reference/ranger_reference.py

The reference still calls the deprecated ``Tensor.add_(scalar, tensor)`` overloads; torch 2.13
accepts them with a warning, so no compatibility shim is needed.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytorch_ranger
from common import run_torch, torch_problem, write_fixture

COMMIT = "c82a30460684c7301086d84185a1927b1c256afa"
RANGER = {
    "lr": 0.03, "alpha": 0.6, "k": 5, "N_sma_threshhold": 4, "betas": (0.9, 0.99), "eps": 1e-6,
    "weight_decay": 0.02, "use_gc": True,
}
PYTORCH_RANGER = {"lr": 0.02, "weight_decay": 0.01}
RANGER2020 = {"lr": 0.02, "use_gc": True}


def repository_classes():
    path = os.environ.get("RANGER_REFERENCE_PATH")
    if not path:
        sys.exit("set RANGER_REFERENCE_PATH to a clone of lessw2020/Ranger-Deep-Learning-Optimizer (see this script's docstring)")
    sys.path.insert(0, path)
    from ranger import Ranger
    from ranger.ranger2020 import Ranger as Ranger2020

    return Ranger, Ranger2020


def run(name, optimizer_class, hyperparameters, reference):
    params, loss_fn = torch_problem()
    trajectory = run_torch(optimizer_class(params, **hyperparameters), params, loss_fn)
    print(write_fixture(name, reference, hyperparameters, trajectory))


def main():
    warnings.filterwarnings("ignore", message="This overload of add")
    ranger, ranger2020 = repository_classes()
    repository = f"lessw2020/Ranger-Deep-Learning-Optimizer (commit {COMMIT})"
    run("ranger", ranger, RANGER, f"ranger.Ranger 20.4.11, {repository}")
    packaged = f"pytorch_ranger.Ranger (pytorch_ranger {pytorch_ranger.__version__})"
    run("ranger_pytorch_ranger", pytorch_ranger.Ranger, PYTORCH_RANGER, packaged)
    run("ranger2020", ranger2020, RANGER2020, f"ranger.ranger2020.Ranger 20.9.4, {repository}")


if __name__ == "__main__":
    main()
