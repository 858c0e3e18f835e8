"""Quality of 8-bit optimizer states: 8-bit AdamW against float32 AdamW after the same steps.

Two tasks, each trained with the same initial weights, batches and hyperparameters, once with
float32 moments and once with ``state_dtype=gradtx.Quantized8bit()`` (bfloat16 moments as a
third point of reference):

1. The ``gradtx compare`` task (digits MLP 64-128-128-10, Flax NNX, AdamW with warmup-cosine),
   through ``gradtx.bench.compare.train_one`` (Flax NNX, donated train step): final training
   loss (on the whole training set) and held-out accuracy, for several seeds.
2. A character-level language model on the bundled public-domain text
   (``gradtx/data/shakespeare.txt``): embedding (61 x 64) -> 3 tanh layers of 256 over a
   32-character context -> next-character softmax, 676K parameters, trained in pure JAX. Reported: the final
   training loss over a fixed set of 8,192 training windows, and held-out loss and accuracy
   on the last 10% of the text.

Targets (issue 6): final training loss within 1% relative of float32's, held-out accuracy within
0.5 points on the comparison task.

    python benchmarks/memory_quality.py [--seeds 3] [--lm-steps 1500]
"""

from __future__ import annotations

import argparse
import importlib.resources
import json

import jax
import jax.numpy as jnp
import numpy as np

import gradtx
from gradtx.bench import compare, registry

POLICIES = {"float32": None, "bfloat16": jnp.bfloat16, "8-bit": gradtx.Quantized8bit()}


def compare_task(seeds: int, steps: int) -> dict:
    data = compare.load_digits()
    rows = {}
    for label, storage in POLICIES.items():
        # The comparison's AdamW entry (warmup-cosine to 5e-3, 10% warmup, weight decay 1e-4) with a state dtype.
        entry = registry.CompareEntry(
            f"adamw ({label} moments)",
            f"AdamW, warmup-cosine to peak lr 5e-3 (10% warmup), weight decay 1e-4, {label} moments",
            lambda steps, storage=storage: gradtx.adamw(
                registry._warmup_cosine(5e-3, steps), weight_decay=1e-4, state_dtype=storage
            ),
        )
        runs = [compare.train_one(entry, data, steps=steps, batch_size=64, seed=seed, eval_every=steps) for seed in range(seeds)]
        rows[label] = {key: [r[key] for r in runs] for key in ("final_train_loss", "held_out_accuracy", "ms_per_step")}
        rows[label]["state_bytes_per_parameter"] = runs[0]["state_bytes_per_parameter"]
    return rows


# The character-level language model.
CONTEXT, EMBED, HIDDEN = 32, 64, 256


def load_text() -> tuple[np.ndarray, int]:
    text = importlib.resources.files("gradtx").joinpath("data/shakespeare.txt").read_text(encoding="utf-8")
    alphabet = sorted(set(text))
    lookup = {c: i for i, c in enumerate(alphabet)}
    return np.asarray([lookup[c] for c in text], np.int32), len(alphabet)


def init_lm(key: jax.Array, vocab: int) -> dict:
    keys = jax.random.split(key, 5)

    def dense(k, m, n):
        return {"kernel": jax.random.normal(k, (m, n)) / np.sqrt(m), "bias": jnp.zeros(n)}

    return {
        "embed": jax.random.normal(keys[0], (vocab, EMBED)) * 0.1,
        "h1": dense(keys[1], CONTEXT * EMBED, HIDDEN),
        "h2": dense(keys[2], HIDDEN, HIDDEN),
        "h3": dense(keys[3], HIDDEN, HIDDEN),
        "out": dense(keys[4], HIDDEN, vocab),
    }


def lm_logits(params: dict, windows: jax.Array) -> jax.Array:
    h = params["embed"][windows].reshape(windows.shape[0], -1)
    for name in ("h1", "h2", "h3"):
        h = jnp.tanh(h @ params[name]["kernel"] + params[name]["bias"])
    return h @ params["out"]["kernel"] + params["out"]["bias"]


def lm_metrics(params: dict, windows: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = lm_logits(params, windows)
    log_probs = jax.nn.log_softmax(logits)
    loss = -jnp.mean(jnp.take_along_axis(log_probs, targets[:, None], axis=1))
    return loss, jnp.mean(jnp.argmax(logits, axis=1) == targets)


def windows_at(tokens: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return tokens[starts[:, None] + np.arange(CONTEXT)], tokens[starts + CONTEXT]


def lm_task(steps: int, batch_size: int = 128, seed: int = 0) -> dict:
    tokens, vocab = load_text()
    split = int(0.9 * len(tokens))
    train, held_out = tokens[:split], tokens[split:]
    rng = np.random.default_rng(seed)
    batch_starts = rng.integers(0, len(train) - CONTEXT - 1, size=(steps, batch_size))
    xs, ys = windows_at(train, batch_starts.reshape(-1))
    xs, ys = xs.reshape(steps, batch_size, CONTEXT), ys.reshape(steps, batch_size)
    eval_train = windows_at(train, rng.integers(0, len(train) - CONTEXT - 1, size=8192))
    eval_held_out = windows_at(held_out, np.arange(0, len(held_out) - CONTEXT - 1, 2))
    params0 = init_lm(jax.random.key(seed), vocab)
    schedule = gradtx.warmup_cosine_decay_schedule(0.0, 2e-3, steps // 10, steps, 2e-5)
    rows = {}
    for label, storage in POLICIES.items():
        tx = gradtx.adamw(schedule, weight_decay=1e-4, state_dtype=storage)

        def step(carry, batch, tx=tx):
            params, state = carry
            loss, grads = jax.value_and_grad(lambda p: lm_metrics(p, *batch)[0])(params)
            updates, state = tx.update(grads, state, params)
            return (gradtx.apply_updates(params, updates), state), loss

        @jax.jit
        def train(params, xs, ys, tx=tx, step=step):
            (params, state), losses = jax.lax.scan(step, (params, tx.init(params)), (xs, ys))
            return params, state, losses

        params, state, losses = train(params0, jnp.asarray(xs), jnp.asarray(ys))
        train_loss, train_accuracy = lm_metrics(params, *map(jnp.asarray, eval_train))
        held_loss, held_accuracy = lm_metrics(params, *map(jnp.asarray, eval_held_out))
        rows[label] = {
            "final_train_loss": float(train_loss),
            "train_accuracy": float(train_accuracy),
            "held_out_loss": float(held_loss),
            "held_out_accuracy": float(held_accuracy),
            "last_100_batch_loss": float(jnp.mean(losses[-100:])),
            "state_bytes_per_parameter": gradtx.state_bytes_per_parameter(state, params),
        }
    rows["parameters"] = int(sum(np.size(x) for x in jax.tree.leaves(params0)))
    return rows


def _relative(rows: dict, key: str, label: str) -> float:
    a, b = np.mean(rows[label][key]), np.mean(rows["float32"][key])
    return float((a - b) / b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the comparison task")
    parser.add_argument("--compare-steps", type=int, default=600)
    parser.add_argument("--lm-steps", type=int, default=1500)
    args = parser.parse_args()
    report = {"jax": jax.__version__}
    rows = compare_task(args.seeds, args.compare_steps)
    report["compare"] = rows
    report["compare_summary"] = {
        label: {
            "train_loss_relative_to_float32": _relative(rows, "final_train_loss", label),
            "held_out_accuracy_points_vs_float32": 100
            * float(np.mean(rows[label]["held_out_accuracy"]) - np.mean(rows["float32"]["held_out_accuracy"])),
        }
        for label in POLICIES
    }
    print(json.dumps({"compare": report["compare_summary"]}, indent=1), flush=True)
    lm = lm_task(args.lm_steps)
    report["char_lm"] = lm
    report["char_lm_summary"] = {
        label: {
            "train_loss_relative_to_float32": _relative(lm, "final_train_loss", label),
            "held_out_accuracy_points_vs_float32": 100 * (lm[label]["held_out_accuracy"] - lm["float32"]["held_out_accuracy"]),
        }
        for label in POLICIES
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
