"""Accuracy of the 8-bit codes on real optimizer moments: ``"power"`` against bitsandbytes' ``"dynamic"``.

Trains the two tasks of ``benchmarks/memory_quality.py`` with float32 AdamW, takes the moments
``m`` and ``v`` of every array that ``gradtx.Quantized8bit()`` quantizes (>= 4,096 elements) at
several steps, quantizes them with each code (``gradtx.quantize_blockwise``, blocks of 256) and
reports, per task and step:

* ``direction_error``: ``||d_q - d|| / ||d||`` over all quantized arrays, where
  ``d = m_hat / (sqrt(v_hat) + eps)`` is Adam's update direction (bias-corrected, ``eps = 1e-8``)
  and ``d_q`` the same from the decoded moments: the error the optimizer sees;
* ``v_median_relative_error``: median of ``|v_q - v| / v`` over positive ``v``;
* ``v_flushed_to_zero``: the fraction of positive ``v`` decoded as 0 (where the update becomes
  ``m / eps``);
* ``m_relative_rms_error``: ``||m_q - m|| / ||m||``.

    python benchmarks/code_accuracy.py [--lm-steps 1500] [--digits-seeds 2]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import memory_quality
import numpy as np

import gradtx
from gradtx.state import quantize

EPS = 1e-8
B1, B2 = 0.9, 0.999


def lm_moments(steps: int, snapshots: tuple[int, ...]) -> dict:
    """``{(task, step): [(m, v), ...]}`` of float32 AdamW on the character-level LM (same setup as memory_quality)."""
    tokens, vocab = memory_quality.load_text()
    train = tokens[: int(0.9 * len(tokens))]
    batch_size, context = 128, memory_quality.CONTEXT
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(train) - context - 1, size=(steps, batch_size))
    xs, ys = memory_quality.windows_at(train, starts.reshape(-1))
    xs, ys = xs.reshape(steps, batch_size, context), ys.reshape(steps, batch_size)
    params = memory_quality.init_lm(jax.random.key(0), vocab)
    tx = gradtx.adamw(gradtx.warmup_cosine_decay_schedule(0.0, 2e-3, steps // 10, steps, 2e-5), weight_decay=1e-4)

    @jax.jit
    def run(params, state, xs, ys):
        def step(carry, batch):
            params, state = carry
            grads = jax.grad(lambda p: memory_quality.lm_metrics(p, *batch)[0])(params)
            updates, state = tx.update(grads, state, params)
            return (gradtx.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), (xs, ys))[0]

    state, done, out = tx.init(params), 0, {}
    for stop in snapshots:
        params, state = run(params, state, jnp.asarray(xs[done:stop]), jnp.asarray(ys[done:stop]))
        done = stop
        out[("char-LM", stop)] = _large_moments(state[0].mu, state[0].nu)
    return out


def digits_moments(seeds: int, steps: int, snapshots: tuple[int, ...]) -> dict:
    """The same for the ``gradtx compare`` digits MLP (Flax NNX, AdamW with warmup-cosine), one entry per seed."""
    from flax import nnx

    from gradtx.bench import compare, registry
    from gradtx.contrib.flax import make_train_step

    data = compare.load_digits()
    out = {}
    for seed in range(seeds):
        model = compare._mlp(seed)
        optimizer = nnx.Optimizer(model, gradtx.adamw(registry._warmup_cosine(5e-3, steps), weight_decay=1e-4), wrt=nnx.Param)
        train_step = make_train_step(compare.cross_entropy)
        indices = compare.batch_indices(len(data.x_train), steps, 64, seed)
        for step in range(1, steps + 1):
            train_step(model, optimizer, data.x_train[indices[step - 1]], data.y_train[indices[step - 1]])
            if step in snapshots:
                state = nnx.as_pure(optimizer.opt_state)[0]
                out[(f"digits MLP, seed {seed}", step)] = _large_moments(state.mu, state.nu)
    return out


def _large_moments(mu, nu) -> list:
    policy = gradtx.Quantized8bit()
    return [(np.asarray(m), np.asarray(v)) for m, v in zip(jax.tree.leaves(mu), jax.tree.leaves(nu)) if policy.applies_to(m)]


def _decoded(x: np.ndarray, signed: bool, code: str) -> np.ndarray:
    q = gradtx.quantize_blockwise(jnp.asarray(x), signed=signed, code=code)
    return np.asarray(gradtx.dequantize_blockwise(q), np.float64)


def errors(moments: list, step: int, code: str) -> dict:
    """The four figures of the module docstring for one snapshot's moments under one code."""
    c1, c2 = 1 - B1**step, 1 - B2**step
    d_err = d_norm = m_err = m_norm = 0.0
    v_relative, flushed, positive = [], 0, 0
    for m, v in moments:
        m64, v64 = m.astype(np.float64), v.astype(np.float64)
        mq, vq = _decoded(m, True, code), _decoded(v, False, code)
        d = (m64 / c1) / (np.sqrt(v64 / c2) + EPS)
        dq = (mq / c1) / (np.sqrt(np.maximum(vq, 0.0) / c2) + EPS)
        d_err += np.sum((dq - d) ** 2)
        d_norm += np.sum(d**2)
        m_err += np.sum((mq - m64) ** 2)
        m_norm += np.sum(m64**2)
        above = v64 > 0
        v_relative.append(np.abs(vq[above] - v64[above]) / v64[above])
        flushed += int(np.sum(vq[above] == 0))
        positive += int(np.sum(above))
    return {
        "direction_error": float(np.sqrt(d_err / d_norm)),
        "v_median_relative_error": float(np.median(np.concatenate(v_relative))),
        "v_flushed_to_zero": flushed / positive,
        "m_relative_rms_error": float(np.sqrt(m_err / m_norm)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-steps", type=int, default=1500)
    parser.add_argument("--digits-steps", type=int, default=600)
    parser.add_argument("--digits-seeds", type=int, default=2)
    args = parser.parse_args()
    lm_snapshots = tuple(s for s in (20, 100, 500, args.lm_steps) if s <= args.lm_steps)
    digits_snapshots = tuple(s for s in (20, 100, 300, args.digits_steps) if s <= args.digits_steps)
    snapshots = {
        **lm_moments(args.lm_steps, lm_snapshots),
        **digits_moments(args.digits_seeds, args.digits_steps, digits_snapshots),
    }
    rows = []
    print(f"{'task':<22} {'step':>5} {'code':<8} {'direction':>10} {'v median rel':>13} {'v -> 0':>9} {'m rel rms':>10}")
    for (task, step), moments in snapshots.items():
        for code in quantize.CODES:
            row = {"task": task, "step": step, "code": code, **errors(moments, step, code)}
            rows.append(row)
            print(
                f"{task:<22} {step:>5} {code:<8} {row['direction_error']:>10.4f} {row['v_median_relative_error']:>13.4f}"
                f" {row['v_flushed_to_zero']:>9.1e} {row['m_relative_rms_error']:>10.4f}"
            )
    print(json.dumps({"jax": jax.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
