"""``gradtx compare``: train one small Flax NNX classifier on real data with several optimizers.

The data are the UCI optical handwritten digits (8x8 images, 1,797 examples, 10 classes,
CC BY 4.0), bundled in ``gradtx/data/digits.npz``. The held-out split is fixed (it does not
depend on ``--seed``): 297 examples held out, 1,500 for training. Every optimizer starts from the
same initial weights and sees the same batches; each step is compiled with the model and the
optimizer state donated (:func:`gradtx.contrib.flax.make_train_step`).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradtx.bench import registry
from gradtx.state.accounting import state_bytes, state_bytes_per_parameter

HELD_OUT = 297
SPLIT_SEED = 20250101
HIDDEN = (128, 128)
CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Digits:
    """The digits split: inputs scaled to [0, 1] and flattened to 64 features, integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits() -> Digits:
    """The bundled UCI digits with the fixed train / held-out split."""
    with importlib.resources.files("gradtx").joinpath("data/digits.npz").open("rb") as file:
        with np.load(file) as data:
            images, labels = data["images"], data["labels"]
    x = images.reshape(len(images), -1).astype(np.float32) / 16.0
    y = labels.astype(np.int32)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    train, test = order[:-HELD_OUT], order[-HELD_OUT:]
    return Digits(x[train], y[train], x[test], y[test])


def _mlp(seed: int):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            widths = (64, *HIDDEN, CLASSES)
            self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = nnx.relu(layer(x))
            return self.layers[-1](x)

    return MLP(nnx.Rngs(seed))


def cross_entropy(model, x, y):
    log_probs = jax.nn.log_softmax(model(x))
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def _metrics(model, x, y):
    logits = model(x)
    log_probs = jax.nn.log_softmax(logits)
    loss = -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))
    return loss, jnp.mean(jnp.argmax(logits, axis=1) == y)


def batch_indices(train_size: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """``steps`` batches of indices, shuffled without replacement within each epoch (the same for every optimizer)."""
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // train_size)
    stream = np.concatenate([rng.permutation(train_size) for _ in range(epochs)])
    return stream[: steps * batch_size].reshape(steps, batch_size)


def train_one(
    entry: registry.CompareEntry,
    data: Digits,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    eval_every: int,
    on_step: Callable[[int, dict], None] = lambda step, info: None,
) -> dict:
    """Train the MLP with one optimizer; returns its curves and summary figures."""
    from flax import nnx

    from gradtx.contrib.flax import make_eval_step, make_train_step

    tx = entry.build(steps)
    model = _mlp(seed)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    opt_state = nnx.as_pure(optimizer.opt_state)
    extra_args = (lambda context: {"grad_fn": context.grad_fn}) if entry.needs_grad_fn else None
    train_step = make_train_step(cross_entropy, extra_args=extra_args)
    eval_params = registry.resolve(entry.eval_params) if entry.eval_params else None
    evaluate = make_eval_step(_metrics, eval_params=eval_params)

    indices = batch_indices(len(data.x_train), steps, batch_size, seed)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    losses, eval_steps, accuracies, test_losses = [], [], [], []
    train_seconds, first_step_s = 0.0, 0.0
    for step in range(steps):
        xb, yb = data.x_train[indices[step]], data.y_train[indices[step]]
        start = time.perf_counter()
        loss = train_step(model, optimizer, xb, yb)
        if step == 0 or step == steps - 1 or (step + 1) % eval_every == 0:
            loss.block_until_ready()
        elapsed = time.perf_counter() - start
        if step == 0:
            first_step_s = elapsed  # tracing and compiling: reported apart from the step time
        else:
            train_seconds += elapsed
        losses.append(loss)
        info = {}
        if (step + 1) % eval_every == 0 or step == steps - 1:
            test_loss, accuracy = evaluate(model, optimizer, x_test, y_test)
            eval_steps.append(step + 1)
            accuracies.append(float(accuracy))
            test_losses.append(float(test_loss))
            info = {"loss": float(loss), "acc": accuracies[-1]}
        on_step(step, info)

    final_train_loss, train_accuracy = evaluate(model, optimizer, x_train, y_train)
    return {
        "description": entry.description,
        "final_train_loss": float(final_train_loss),
        "train_accuracy": float(train_accuracy),
        "held_out_accuracy": accuracies[-1],
        "held_out_loss": test_losses[-1],
        "ms_per_step": 1e3 * train_seconds / max(steps - 1, 1),
        "first_step_s": first_step_s,
        "state_bytes": state_bytes(opt_state),
        "state_bytes_per_parameter": state_bytes_per_parameter(opt_state, params),
        "parameters": int(sum(np.size(p) for p in jax.tree.leaves(params))),
        "loss_curve": [float(x) for x in jax.device_get(losses)],
        "eval_steps": eval_steps,
        "held_out_accuracy_curve": accuracies,
        "held_out_loss_curve": test_losses,
    }


def dataset_info(data: Digits) -> dict[str, Any]:
    return {
        "name": "UCI optical recognition of handwritten digits (8x8)",
        "license": "CC BY 4.0",
        "train_examples": int(len(data.x_train)),
        "held_out_examples": int(len(data.x_test)),
        "split_seed": SPLIT_SEED,
        "model": f"MLP 64-{'-'.join(map(str, HIDDEN))}-{CLASSES}, ReLU, Flax NNX",
    }
