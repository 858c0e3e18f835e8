"""Compose an optimizer from building blocks, train a tiny regression with it, and compare with ready aliases."""

import jax
import jax.numpy as jnp

import gradtx


def main():
    x = jax.random.normal(jax.random.key(0), (256, 8))
    y = jnp.sin(x @ jnp.linspace(-1.0, 1.0, 8))
    init = {"w1": 0.3 * jax.random.normal(jax.random.key(1), (8, 32)), "w2": 0.3 * jax.random.normal(jax.random.key(2), (32,))}

    def loss(params):
        return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)

    custom = gradtx.chain(gradtx.clip_by_global_norm(1.0), gradtx.scale_by_adam(), gradtx.scale_by_learning_rate(1e-2))
    candidates = {
        "custom clip+adam": custom,
        "sgd(momentum=0.9)": gradtx.sgd(0.05, momentum=0.9),
        "adamw": gradtx.adamw(1e-2, weight_decay=1e-4),
        "lamb": gradtx.lamb(1e-2),
        "lion": gradtx.lion(1e-3),
    }
    print(f"{'optimizer':<20} {'initial loss':>12} {'final loss':>12}")
    for name, tx in candidates.items():

        @jax.jit
        def train(params, tx=tx):
            def step(carry, _):
                params, state = carry
                value, grads = jax.value_and_grad(loss)(params)
                updates, state = tx.update(grads, state, params)
                return (gradtx.apply_updates(params, updates), state), value

            return jax.lax.scan(step, (params, tx.init(params)), length=300)[1]

        losses = train(init)
        print(f"{name:<20} {float(losses[0]):>12.4f} {float(losses[-1]):>12.4f}")


if __name__ == "__main__":
    main()
