"""Sharpness-Aware Minimization (SAM, Foret et al. 2021) and its adaptive variant (ASAM, Kwon et al. 2021).

SAM descends on the gradient taken at the worst point of a small neighbourhood of the
parameters instead of at the parameters themselves. One SAM step needs two gradients: the
ordinary one, which gives the ascent direction, and one at the perturbed parameters
``w + e(w)``, which is handed to any base optimizer. This module offers the perturbation as a
building block (:func:`sam_perturb`), a wrapper transformation that takes the gradient function
through ``update``'s extra arguments (:func:`sam`), and a training-step helper that computes
both gradients (:func:`sam_train_step`).

The formulas follow davda54/sam (the reference both papers' users rely on): the norm is global
over the whole tree, ``1e-12`` is added to the norm (outside the square root), the adaptive
variant uses ``T_w = |w|`` (ASAM's operator with ``eta = 0``), the perturbation is a constant
for differentiation (it is computed under ``torch.no_grad``; here under ``stop_gradient``), and
the base optimizer updates the unperturbed parameters (davda54/sam restores them before its
``base_optimizer.step()``).

Batch statistics caveat: with BatchNorm, the second forward pass (at ``w + e``) would update the
running statistics a second time, at parameters that are never kept. Compute the running
statistics in the first pass only: :func:`sam_train_step` with ``has_aux=True`` returns the aux
output (e.g. the new batch statistics) of the first pass and discards that of the second; when
writing your own ``grad_fn``, run the model in a mode that does not update the statistics (Flax:
``mutable=False`` / evaluation mode for the statistics), as davda54/sam's README recommends
(``disable_running_stats`` before the second pass, or BatchNorm momentum 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import EmptyState, GradientTransformation
from gradtx.combine import apply_updates


def sam_perturb(rho: float = 0.05, *, adaptive: bool = False, eps: float = 1e-12) -> GradientTransformation:
    r"""The ascent perturbation of SAM / ASAM: maps gradients ``g`` to ``e(w)``.

    .. math::

        e(w) = \rho \, \frac{T_w^2 \, g}{\lVert T_w \, g \rVert_2 + \epsilon},

    with :math:`T_w = 1` for SAM and :math:`T_w = |w|` for ASAM (``adaptive=True``). The norm
    is one global norm over all leaves; ``eps`` is added to the norm, as in davda54/sam.
    ``None`` leaves (no gradient) get no perturbation. The result is meant to be added to the
    parameters (``w + e``), not applied as an update.

    Args:
        rho: the neighbourhood radius :math:`\rho` (``> 0``); ASAM's authors suggest about
            ten times SAM's (davda54/sam uses 0.05 for SAM and 2.0 for ASAM).
        adaptive: use ASAM's element-wise normalization :math:`T_w = |w|` (needs ``params``).
        eps: added to the norm, ``>= 0``.

    Returns:
        A stateless ``GradientTransformation`` whose ``update(grads, state, params)`` returns
        :math:`e(w)` in each gradient's dtype.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.sam_perturb(rho=0.5)
        >>> tx.update(jnp.array([3.0, 4.0]), tx.init(None))[0]
        Array([0.3, 0.4], dtype=float32)

    References:
        Foret et al., 2021. Sharpness-Aware Minimization for Efficiently Improving Generalization, https://arxiv.org/abs/2010.01412

        Kwon et al., 2021. ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks, https://arxiv.org/abs/2102.11600
    """
    owner = "sam_perturb"
    _checks.positive(owner, "rho", rho)
    _checks.one_of(owner, "adaptive", adaptive, (False, True))
    _checks.non_negative(owner, "eps", eps)

    def normalizer(w):
        return jnp.abs(w) if adaptive else 1.0

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if adaptive and params is None:
            raise ValueError(f"{owner}: adaptive=True needs params (T_w = |w|), got params=None")
        weights = params if adaptive else jax.tree.map(lambda g: 1.0, updates)
        norm = tree.global_norm(_map_gradients(lambda g, w: normalizer(w) * g, updates, weights))
        step = rho / (norm + eps)
        perturbation = _map_gradients(lambda g, w: (jnp.square(normalizer(w)) * g * step).astype(g.dtype), updates, weights)
        return perturbation, state

    return GradientTransformation(init, update)


def _map_gradients(fn, updates, params):
    """``fn(g, w)`` on every leaf that has a gradient; ``None`` gradients stay ``None``."""
    return jax.tree.map(lambda g, w: None if g is None else fn(g, w), updates, params, is_leaf=lambda x: x is None)


class SAMState(NamedTuple):
    """State of :func:`sam`: the base optimizer's state."""

    inner_state: Any


def sam(base_optimizer: GradientTransformation, rho: float = 0.05, *, adaptive: bool = False) -> GradientTransformation:
    r"""Sharpness-Aware Minimization around any base optimizer (ASAM with ``adaptive=True``).

    .. math::

        e_t = \rho \, \frac{T_{w_t}^2 \, g_t}{\lVert T_{w_t} g_t \rVert_2 + 10^{-12}}, \qquad
        \tilde g_t = \nabla L(w_t + e_t), \qquad
        (u_t, s_t) = \mathrm{base}(\tilde g_t, s_{t-1}, w_t)

    ``update(grads, state, params, grad_fn=...)`` takes the ordinary gradient ``g_t`` at
    ``params`` and, through the extra argument ``grad_fn`` (``params -> grads``, usually
    ``lambda p: jax.grad(loss)(p, batch)``), evaluates the gradient at the perturbed point;
    the base optimizer then updates the unperturbed ``params`` with it, as in davda54/sam. It
    works under ``jax.jit`` (``grad_fn`` is traced with the step). Other extra arguments are
    forwarded to the base optimizer; ``grad_fn`` is consumed here.

    ``grad_fn`` receives a tree with the structure of ``params``: use ``sam`` outside
    ``masked``/``partition`` (put those inside ``base_optimizer``); ``lookahead_wrapper`` may
    wrap it. Transformations chained before ``sam`` change only the ascent direction. See the
    module docstring for the BatchNorm caveat, and :func:`sam_train_step` for a ready step.

    Args:
        base_optimizer: the optimizer that takes the sharpness-aware gradient (e.g. SGD with
            momentum, as in both papers).
        rho: the neighbourhood radius, ``> 0`` (see :func:`sam_perturb`).
        adaptive: ASAM's normalization :math:`T_w = |w|`.

    Returns:
        A ``GradientTransformation`` whose state is :class:`SAMState`.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> loss = lambda p: jnp.sum(p ** 2)
        >>> tx = gradtx.sam(gradtx.sgd(0.1, momentum=0.9), rho=0.05)
        >>> params = jnp.array([1.0, -2.0])
        >>> state = tx.init(params)
        >>> updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss))

    References:
        Foret et al., 2021. Sharpness-Aware Minimization for Efficiently Improving Generalization, https://arxiv.org/abs/2010.01412

        Kwon et al., 2021. ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks, https://arxiv.org/abs/2102.11600
    """
    owner = "sam"
    if not (callable(getattr(base_optimizer, "init", None)) and callable(getattr(base_optimizer, "update", None))):
        raise TypeError(f"{owner}: base_optimizer must be a gradient transformation with init and update, got {base_optimizer!r}")
    _checks.positive(owner, "rho", rho)
    _checks.boolean(owner, "adaptive", adaptive)
    perturb = sam_perturb(rho, adaptive=adaptive)

    def init(params):
        return SAMState(inner_state=base_optimizer.init(params))

    def update(updates, state, params=None, *, grad_fn: Callable[[Any], Any] | None = None, **extra_args):
        if params is None:
            raise ValueError(f"{owner}: update needs params, got params=None")
        if not callable(grad_fn):
            raise ValueError(f"{owner}: update needs grad_fn=<params -> grads> (the gradient at w + e), got {grad_fn!r}")
        perturbation, _ = perturb.update(updates, EmptyState(), params)
        # The perturbation is a constant of the second gradient (davda54/sam computes it under
        # torch.no_grad); leaves without a gradient are left where they are.
        perturbed = jax.tree.map(
            lambda e, w: w if e is None else (w + jax.lax.stop_gradient(e)).astype(w.dtype),
            perturbation,
            params,
            is_leaf=lambda x: x is None,
        )
        sharpness_aware_grads = grad_fn(perturbed)
        updates, inner_state = base_optimizer.update(sharpness_aware_grads, state.inner_state, params, **extra_args)
        return updates, SAMState(inner_state=inner_state)

    return GradientTransformation(init, update)


def sam_train_step(loss_fn: Callable[..., Any], optimizer: GradientTransformation, *, has_aux: bool = False) -> Callable:
    r"""A training step that computes both SAM gradients: ``step(params, state, *batch) -> (params, state, loss)``.

    .. math::

        \ell_t, g_t = L(w_t), \nabla L(w_t); \qquad
        (u_t, s_t) = \mathrm{optimizer}(g_t, s_{t-1}, w_t; \; \mathrm{grad\_fn} = \nabla L); \qquad
        w_{t+1} = w_t + u_t

    The step passes ``grad_fn=lambda p: grad(loss_fn)(p, *batch)`` to ``optimizer.update``, so
    any optimizer with a :func:`sam` inside (``lookahead_wrapper(sam(adamw(...)))``, ...) gets
    its second gradient; an optimizer without one ignores it. The returned loss is the one at
    the unperturbed parameters (the one to log). The step is pure: wrap it in ``jax.jit``
    (donating ``params`` and ``state`` if you like).

    BatchNorm: with ``has_aux=True``, ``loss_fn`` returns ``(loss, aux)`` and the step returns
    ``(params, state, (loss, aux))`` with the aux of the first pass only, so put the updated
    batch statistics in ``aux`` and the second pass will not count them twice.

    Args:
        loss_fn: ``loss_fn(params, *batch) -> loss`` (or ``(loss, aux)`` with ``has_aux``).
        optimizer: the transformation, typically built with :func:`sam`.
        has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
        ``step(params, opt_state, *batch) -> (new_params, new_opt_state, loss_or_loss_and_aux)``.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> loss = lambda p, x: jnp.mean((x @ p) ** 2)
        >>> tx = gradtx.sam(gradtx.sgd(0.1), rho=0.05)
        >>> step = jax.jit(gradtx.sam_train_step(loss, tx))
        >>> params = jnp.ones(2)
        >>> state = tx.init(params)
        >>> params, state, value = step(params, state, jnp.ones((4, 2)))

    References:
        Foret et al., 2021. Sharpness-Aware Minimization for Efficiently Improving Generalization, https://arxiv.org/abs/2010.01412
    """
    owner = "sam_train_step"
    if not callable(loss_fn):
        raise TypeError(f"{owner}: loss_fn must be callable, got {loss_fn!r}")
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"{owner}: optimizer must be a gradient transformation with init and update, got {optimizer!r}")
    _checks.one_of(owner, "has_aux", has_aux, (False, True))

    def step(params, opt_state, *batch):
        value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *batch)

        def grad_fn(perturbed):
            # The second pass's aux (e.g. batch statistics at w + e) is discarded on purpose.
            second = jax.grad(loss_fn, has_aux=has_aux)(perturbed, *batch)
            return second[0] if has_aux else second

        updates, opt_state = optimizer.update(grads, opt_state, params, grad_fn=grad_fn)
        return apply_updates(params, updates), opt_state, value

    return step
