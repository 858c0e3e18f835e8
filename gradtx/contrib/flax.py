"""Flax NNX training and evaluation steps: jit-compiled, buffer-donating, and cheap to call.

The fast way to train with ``nnx.Optimizer`` (see ``PERF.md``) is one compiled program per step
that donates the buffers of the model and the optimizer state, so that XLA updates them in
place instead of allocating a fresh copy of every parameter and moment at each call. A second
cost hides in Python: ``nnx.jit`` walks the model's object graph at every call (split, then
update), which takes tens of milliseconds per step for models with thousands of variables.
:func:`make_train_step` walks the graph once, on the first call with a given model and
optimizer, keeps the list of their ``Variable`` objects, and afterwards only reads and writes
those variables' arrays around the compiled step.

Caveat of that cache: if you change the *structure* of the model or the optimizer after the
first call (add, remove or replace a ``Variable`` or a sub-module), call ``step.reset()``.
Changing values (``nnx.update``, checkpoint restore, ``variable[...] = x``) needs nothing.

Hooks for optimizers that need more than the gradient:

* ``extra_args(context) -> dict`` (in :func:`make_train_step`): keyword arguments for
  ``optimizer.update``, computed inside the compiled step from a :class:`StepContext`, which
  offers the loss value, the batch, the gradient at any parameters (``grad_fn``, for SAM's
  second gradient) and any function of the model at any parameters (``evaluate``, e.g. a
  ``logits_fn`` for Sophia's Hessian estimate). For example
  ``extra_args=lambda ctx: {"grad_fn": ctx.grad_fn}`` with ``gradtx.sam(...)`` and
  ``extra_args=lambda ctx: {"value": ctx.value}`` with ``gradtx.reduce_on_plateau``.
* ``eval_params(opt_state, params) -> params`` (in :func:`make_eval_step`): the parameters to
  evaluate with when they differ from the ones trained, e.g. ``gradtx.schedule_free_eval_params``
  (schedule-free's averaged sequence ``x``) or ``gradtx.lookahead_slow_params`` (Lookahead's and
  Ranger's slow weights).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
from flax import nnx

from gradtx import _checks
from gradtx import packed as packing
from gradtx.combine import apply_updates
from gradtx.compilation import compiler_options


class StepContext(NamedTuple):
    """What the compiled step knows when it calls ``optimizer.update``: the argument of the ``extra_args`` hook.

    ``value`` is the loss at the current parameters and ``aux`` the auxiliary output of the loss
    (``None`` without ``has_aux``); ``batch`` the step's batch arguments; ``grad_fn(params)`` the
    gradient of the loss at other parameters (a tree like ``nnx.state(model, optimizer.wrt)``, pure
    arrays); ``evaluate(params, fn)`` returns ``fn(model_at_params, *batch)``. Side effects of
    ``grad_fn`` and ``evaluate`` on the model (batch statistics, RNG counters) are discarded.
    """

    value: Any
    aux: Any
    batch: tuple
    grad_fn: Callable[[Any], Any]
    evaluate: Callable[[Any, Callable[..., Any]], Any]


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _is_plain(variables: list, arrays: list) -> bool:
    return all(isinstance(a, jax.Array) and not v.get_metadata().get("hijax") for a, v in zip(arrays, variables))


def _store(variables: list, arrays: list, plain: bool) -> None:
    if not (plain and variables):
        for variable, array in zip(variables, arrays):
            variable.set_raw_value(array)
        return
    # set_raw_value checks the trace context at every call, ~2 us each: 14 ms per step for the
    # 6,000 Variables of a 2,048-array model under Adam. Check once, then store directly, as
    # Flax's own nnx.jit_partial does.
    variables[0].set_raw_value(arrays[0])
    for variable, array in zip(variables[1:], arrays[1:]):
        object.__setattr__(variable, "_raw_value", array)


class _Binding(NamedTuple):
    """The graph walk of one set of nodes, done once: their Variables, in the order of their pure state."""

    nodes: tuple
    graphdef: Any
    treedef: Any
    variables: list
    plain: bool  # only plain (not hijax, not array-ref) Variables: their arrays can be stored directly

    @classmethod
    def of(cls, nodes: tuple) -> _Binding:
        graphdef, state = nnx.split(nodes)
        variables = jax.tree.leaves(state, is_leaf=_is_variable)
        arrays, treedef = jax.tree.flatten(nnx.as_pure(state))
        if len(arrays) != len(variables) or any(a is not v.get_raw_value() for a, v in zip(arrays, variables)):
            raise TypeError("gradtx.contrib.flax: every Variable of the model and optimizer must hold exactly one array")
        return cls(nodes, graphdef, treedef, variables, _is_plain(variables, arrays))

    def read(self) -> list:
        return [variable.get_raw_value() for variable in self.variables]

    def write(self, arrays: list) -> None:
        _store(self.variables, arrays, self.plain)

    def merge(self, arrays: list) -> tuple:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, arrays))


class _CachedStep:
    """A step over a fixed tuple of graph nodes whose graph walk and compiled program are kept between calls."""

    def __init__(self, donate: bool):
        self._donate = donate
        self._binding: _Binding | None = None
        self._jitted: Callable | None = None
        self._compiled: Callable | None = None  # the jitted function, or an ahead-of-time executable

    def reset(self) -> None:
        """Forget the cached graph walk and compiled program (after changing the model's structure)."""
        self._binding = None
        self._jitted = None
        self._compiled = None

    def _bind(self, nodes: tuple) -> tuple[_Binding, Callable]:
        binding = self._binding
        if binding is None or len(binding.nodes) != len(nodes) or any(a is not b for a, b in zip(binding.nodes, nodes)):
            binding = _Binding.of(nodes)
            pure = lambda arrays, *batch: self._pure(binding, arrays, *batch)  # noqa: E731
            self._binding = binding
            self._jitted = jax.jit(pure, donate_argnums=(0,) if self._donate else (), compiler_options=compiler_options())
            self._compiled = self._jitted
        return binding, self._compiled

    def _pure(self, binding: _Binding, arrays: list, *batch):
        raise NotImplementedError

    def _lower(self, nodes: tuple, *batch) -> jax.stages.Lowered:
        binding, _ = self._bind(nodes)
        return self._jitted.lower(binding.read(), *batch)

    def _compile(self, nodes: tuple, *batch) -> jax.stages.Compiled:
        compiled = self._lower(nodes, *batch).compile()
        self._compiled = compiled
        return compiled


class TrainStep(_CachedStep):
    """``step(model, optimizer, *batch) -> loss``: one compiled, donated training step (see :func:`make_train_step`)."""

    def __init__(self, loss_fn, has_aux: bool, donate: bool, extra_args):
        super().__init__(donate)
        self._loss_fn = loss_fn
        self._has_aux = has_aux
        self._extra_args = extra_args

    def __call__(self, model, optimizer, *batch):
        binding, compiled = self._bind((model, optimizer))
        arrays, output = compiled(binding.read(), *batch)
        binding.write(arrays)
        return output

    def lower(self, model, optimizer, *batch) -> jax.stages.Lowered:
        """The lowered step for these arguments (to read its HLO or compile it separately)."""
        return self._lower((model, optimizer), *batch)

    def compile(self, model, optimizer, *batch) -> jax.stages.Compiled:
        """Compile ahead of time for these arguments' shapes; later calls reuse this executable.

        Returns the ``jax.stages.Compiled`` (its ``memory_analysis()`` gives the step's peak
        memory). Later calls must pass batches of the same shapes and dtypes.
        """
        return self._compile((model, optimizer), *batch)

    def _pure(self, binding: _Binding, arrays: list, *batch):
        model, optimizer = binding.merge(arrays)
        grad = nnx.value_and_grad(self._loss_fn, argnums=nnx.DiffState(0, optimizer.wrt), has_aux=self._has_aux)
        output, grads = grad(model, *batch)
        kwargs = {} if self._extra_args is None else dict(self._extra_args(self._context(model, output, batch)))
        optimizer.update(model, grads, **kwargs)
        new_arrays = jax.tree.leaves(nnx.as_pure(nnx.state((model, optimizer))))
        return new_arrays, output

    def _context(self, model, output, batch) -> StepContext:
        value, aux = output if self._has_aux else (output, None)

        def evaluate(params, fn):
            at_params = nnx.clone(model)
            nnx.update(at_params, params)
            return fn(at_params, *batch)

        def loss_at(params):
            output = evaluate(params, self._loss_fn)
            return output[0] if self._has_aux else output

        return StepContext(value=value, aux=aux, batch=batch, grad_fn=jax.grad(loss_at), evaluate=evaluate)


class _VariableGroup(NamedTuple):
    """Variables whose arrays travel together through the packed step (read, then written back)."""

    variables: list
    treedef: Any
    plain: bool

    @classmethod
    def of(cls, state) -> _VariableGroup:
        variables = jax.tree.leaves(state, is_leaf=_is_variable)
        arrays, treedef = jax.tree.flatten(nnx.as_pure(state))
        if len(arrays) != len(variables):
            raise TypeError("gradtx.contrib.flax: every Variable of the model and optimizer must hold exactly one array")
        return cls(variables, treedef, _is_plain(variables, arrays))

    def read(self) -> list:
        return [variable.get_raw_value() for variable in self.variables]

    def write(self, arrays: list) -> None:
        _store(self.variables, arrays, self.plain)


class _PackedBinding(NamedTuple):
    model: Any
    optimizer: Any
    graphdef: Any
    params: _VariableGroup
    rest: _VariableGroup
    opt_state: _VariableGroup
    layout: packing.PackedLayout


class PackedTrainStep:
    """``step(model, optimizer, *batch) -> loss`` on packed parameters (see :func:`make_train_step` with ``packed=True``).

    On the first call with a model and optimizer the step packs the parameters selected by
    ``optimizer.wrt`` into one buffer per dtype (:func:`gradtx.pack`) and converts the
    optimizer state to that layout (:func:`gradtx.pack_state`); the step then holds both. Each
    call computes the loss and the per-array gradients on views of the packed parameters,
    packs the gradients, runs ``optimizer.tx`` on the packed buffers (a few fused kernels) and
    writes the new parameters back into the model, so the model is current after every step.

    The optimizer's own ``opt_state`` arrays are released when the step takes over (reading
    them raises "Array has been deleted"); ``step.sync()`` writes the step's state back into
    ``optimizer.opt_state`` (before a checkpoint or an evaluation with ``eval_params``).
    After changing the model's structure or restoring the optimizer, call ``step.reset()``.
    """

    def __init__(self, loss_fn, has_aux: bool, donate: bool, extra_args):
        self._loss_fn = loss_fn
        self._has_aux = has_aux
        self._donate = donate
        self._extra_args = extra_args
        self._binding: _PackedBinding | None = None
        self._compiled: Callable | None = None
        self._jitted: Callable | None = None
        self.packed_params = None
        self.opt_state = None
        self._offsets: list = []
        self._written: list | None = None
        self._grads = None

    def reset(self) -> None:
        """Forget the packed copy and the compiled program; the next call packs the model and optimizer again."""
        if self._binding is not None and any(a.is_deleted() for a in self._binding.opt_state.read() if isinstance(a, jax.Array)):
            self.sync()  # the optimizer holds no valid state of its own: give it the step's
        self._binding = self._compiled = self._jitted = None
        self.packed_params = self.opt_state = self._grads = None

    def sync(self) -> None:
        """Write the step's optimizer state back into ``optimizer.opt_state`` (per array, as ``nnx.Optimizer`` keeps it)."""
        if self._binding is None:
            return
        per_array = jax.jit(packing.unpack_state)(self.opt_state)
        self._binding.opt_state.write(jax.tree.leaves(per_array))

    def __call__(self, model, optimizer, *batch):
        binding, compiled = self._bind(model, optimizer)
        params = self._current_params(binding)
        carry = (self.packed_params, self.opt_state, binding.rest.read(), optimizer.step.get_raw_value(), params, self._grads)
        (self.packed_params, self.opt_state, rest, count, params, self._grads), output = compiled(*carry, self._offsets, *batch)
        binding.params.write(params)
        self._written = params
        binding.rest.write(rest)
        optimizer.step.set_raw_value(count)
        return output

    def lower(self, model, optimizer, *batch) -> jax.stages.Lowered:
        """The lowered step for these arguments (to read its HLO or compile it separately)."""
        binding, _ = self._bind(model, optimizer)
        carry = (self.packed_params, self.opt_state, binding.rest.read(), optimizer.step.get_raw_value(), binding.params.read())
        return self._jitted.lower(*carry, self._grads, self._offsets, *batch)

    def _current_params(self, binding: _PackedBinding) -> list:
        params = binding.params.read()
        if self._written is not None and any(a is not b for a, b in zip(params, self._written)):
            # The model's parameters were changed between steps (nnx.update, a restored
            # checkpoint): pack them again, so the update starts from what the model holds.
            self.packed_params = jax.jit(packing.pack, static_argnums=1)(
                jax.tree.unflatten(binding.params.treedef, params), binding.layout
            )
        return params

    def compile(self, model, optimizer, *batch) -> jax.stages.Compiled:
        """Compile ahead of time for these arguments' shapes; later calls reuse this executable."""
        self._compiled = self.lower(model, optimizer, *batch).compile()
        return self._compiled

    def _bind(self, model, optimizer) -> tuple[_PackedBinding, Callable]:
        binding = self._binding
        if binding is not None and binding.model is model and binding.optimizer is optimizer:
            return binding, self._compiled
        if binding is not None:
            self.reset()
        graphdef, params_state, rest_state = nnx.split(model, optimizer.wrt, ...)
        params_pure = nnx.as_pure(params_state)
        layout = packing.packed_layout(params_pure)
        binding = _PackedBinding(
            model, optimizer, graphdef, _VariableGroup.of(params_state), _VariableGroup.of(rest_state),
            _VariableGroup.of(optimizer.opt_state), layout,
        )  # fmt: skip
        opt_arrays = binding.opt_state.read()
        self.packed_params = jax.jit(packing.pack, static_argnums=1)(params_pure, layout)
        self.opt_state = jax.jit(lambda state: packing.pack_state(optimizer.tx, state, layout))(nnx.as_pure(optimizer.opt_state))
        # The step owns the state now; free the per-array copy (never an array the model shares).
        model_arrays = {id(a) for a in binding.params.read() + binding.rest.read()}
        for array in opt_arrays:
            if isinstance(array, jax.Array) and id(array) not in model_arrays:
                array.delete()
        pure = lambda *args: self._pure(binding, optimizer.tx, *args)  # noqa: E731
        # Device-resident: 2,048 NumPy scalars would be copied to the device at every call (~3 ms).
        self._offsets = [jax.device_put(offset) for offset in packing.slice_offsets(layout)]
        self._written = None
        # The gradients, per array and packed, are carried from step to step (donated) only so
        # that XLA writes them into memory that is already mapped. As temporaries they would be
        # a fresh allocation at every call (XLA:CPU allocates its temporaries per execution;
        # glibc maps anything over 32 MiB anew): 10,000 page faults, ~11 ms per step for 2,048
        # arrays of 64 KiB, measured, which the per-array step never pays (its update consumes
        # each gradient as soon as it is computed).
        per_array_grads = [jax.numpy.zeros_like(array) for array in binding.params.read()]
        self._grads = (per_array_grads, jax.tree.map(jax.numpy.zeros_like, self.packed_params))
        # Donated: the packed carry and the model's arrays (their buffers take the new values).
        donated = (0, 1, 2, 3, 4, 5) if self._donate else ()
        self._binding = binding
        self._jitted = self._compiled = jax.jit(
            pure, donate_argnums=donated, keep_unused=True, compiler_options=compiler_options()
        )
        return binding, self._compiled

    def _pure(self, binding: _PackedBinding, tx, packed_params, opt_state, rest, count, params, grads, offsets, *batch):
        del grads  # only its buffer is reused
        layout = binding.layout
        # The forward pass reads the model's own arrays (equal to the packed ones: _current_params
        # re-packs if they were changed), so no slice of the buffer is copied for it.
        params_pure = jax.tree.unflatten(binding.params.treedef, params)
        model = nnx.merge(binding.graphdef, params_pure, jax.tree.unflatten(binding.rest.treedef, rest))
        wrt = binding.optimizer.wrt
        grad = nnx.value_and_grad(self._loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=self._has_aux)
        output, grads = grad(model, *batch)
        grad_leaves = jax.tree.leaves(nnx.as_pure(grads))
        packed_grads = packing.pack(nnx.as_pure(grads), layout)
        kwargs = {} if self._extra_args is None else dict(self._extra_args(self._context(model, output, batch, layout)))
        updates, opt_state = tx.update(packed_grads, opt_state, packed_params, **kwargs)
        packed_params = apply_updates(packed_params, updates)
        _, _, rest_state = nnx.split(model, wrt, ...)
        new_params = jax.tree.leaves(packing.unpack(packed_params, offsets))
        rest = jax.tree.leaves(nnx.as_pure(rest_state))
        return (packed_params, opt_state, rest, count + 1, new_params, (grad_leaves, packed_grads)), output

    def _context(self, model, output, batch, layout) -> StepContext:
        value, aux = output if self._has_aux else (output, None)

        def evaluate(params, fn):
            at_params = nnx.clone(model)
            nnx.update(at_params, packing.unpack(params) if packing.is_packed(params) else params)
            return fn(at_params, *batch)

        def loss_at(params):
            output = evaluate(params, self._loss_fn)
            return output[0] if self._has_aux else output

        def grad_fn(params):
            if not packing.is_packed(params):
                return jax.grad(loss_at)(params)
            return packing.pack(jax.grad(loss_at)(packing.unpack(params)), layout)

        return StepContext(value=value, aux=aux, batch=batch, grad_fn=grad_fn, evaluate=evaluate)


class EvalStep(_CachedStep):
    """``step(model, optimizer, *batch) -> fn(model_at_eval_params, *batch)`` (see :func:`make_eval_step`)."""

    def __init__(self, fn, eval_params):
        super().__init__(donate=False)
        self._fn = fn
        self._eval_params = eval_params

    def __call__(self, model, optimizer=None, *batch):
        nodes = (model,) if optimizer is None else (model, optimizer)
        binding, compiled = self._bind(nodes)
        return compiled(binding.read(), *batch)

    def _pure(self, binding: _Binding, arrays: list, *batch):
        nodes = binding.merge(arrays)
        model = nodes[0]
        if self._eval_params is not None:
            if len(nodes) < 2:
                raise ValueError("make_eval_step: with eval_params, call step(model, optimizer, *batch) with the optimizer")
            optimizer = nodes[1]
            params = nnx.as_pure(nnx.state(model, optimizer.wrt))
            nnx.update(model, self._eval_params(nnx.as_pure(optimizer.opt_state), params))
        return self._fn(model, *batch)


def make_train_step(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    donate: bool = True,
    extra_args: Callable[[StepContext], Mapping[str, Any]] | None = None,
    packed: bool = False,
) -> TrainStep:
    r"""Build a jit-compiled, buffer-donating training step for a Flax NNX model and ``nnx.Optimizer``.

    .. math::

        \ell_t, g_t = L(w_t; \text{batch}), \nabla_w L(w_t; \text{batch}); \qquad
        (u_t, s_t) = \mathrm{tx}(g_t, s_{t-1}, w_t; \ \text{extra\_args}); \qquad w_{t+1} = w_t + u_t

    The gradient is taken with respect to ``optimizer.wrt``. The model and the optimizer are
    updated in place (their arrays are donated to the compiled step), exactly as
    ``optimizer.update(model, grads)`` inside ``nnx.jit`` would, but without walking the
    object graph at every call; see the module docstring for the cache and its caveat. The step
    is compiled with :func:`gradtx.compiler_options` (on CPU: donated state updated in place
    without XLA's single-threaded defensive copies; the arithmetic is unchanged).

    Args:
        loss_fn: ``loss_fn(model, *batch) -> loss`` (a scalar), or ``(loss, aux)`` with ``has_aux``.
        has_aux: whether ``loss_fn`` returns ``(loss, aux)``; the step then returns both.
        donate: donate the model's and the optimizer's buffers (in-place update): an array read
            out of the model before a step (``model.kernel[...]``) is deleted by the step. Turn
            off only to keep such references alive.
        extra_args: optional hook ``extra_args(context) -> dict`` giving the keyword arguments
            passed to ``optimizer.update``, from a :class:`StepContext` (loss value, batch,
            gradient at other parameters, model evaluated at other parameters). SAM:
            ``lambda ctx: {"grad_fn": ctx.grad_fn}``.
        packed: keep the parameters, gradients and optimizer state in one buffer per dtype
            (:func:`gradtx.pack`), so that the update is a few fused kernels and compiles in
            time independent of the number of arrays (see :class:`PackedTrainStep` and
            ``docs/performance.md``). Same numbers as the per-array step; the optimizer's
            ``opt_state`` is then held by the step (``step.sync()`` writes it back).

    Returns:
        A :class:`TrainStep`: ``step(model, optimizer, *batch) -> loss`` (or ``(loss, aux)``);
        ``step.compile(model, optimizer, *batch)`` compiles ahead of time (to time compilation
        or read the memory analysis) and keeps the executable for later calls;
        ``step.lower(...)`` gives the lowered program; ``step.reset()`` forgets the cache.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> from flax import nnx
        >>> from gradtx.contrib.flax import make_train_step
        >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
        >>> optimizer = nnx.Optimizer(model, gradtx.adam(1e-2), wrt=nnx.Param)
        >>> step = make_train_step(lambda m, x, y: jnp.mean((m(x) - y) ** 2))
        >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
        >>> first = step(model, optimizer, x, y)
        >>> bool(step(model, optimizer, x, y) < first)
        True

    References:
        Heek et al., 2024. Flax: A neural network library and ecosystem for JAX, https://github.com/google/flax
    """
    owner = "make_train_step"
    if not callable(loss_fn):
        raise TypeError(f"{owner}: loss_fn must be callable, got {loss_fn!r}")
    if extra_args is not None and not callable(extra_args):
        raise TypeError(f"{owner}: extra_args must be None or callable, got {extra_args!r}")
    _checks.one_of(owner, "has_aux", has_aux, (False, True))
    _checks.one_of(owner, "donate", donate, (False, True))
    _checks.one_of(owner, "packed", packed, (False, True))
    if packed:
        return PackedTrainStep(loss_fn, bool(has_aux), bool(donate), extra_args)
    return TrainStep(loss_fn, bool(has_aux), bool(donate), extra_args)


def make_eval_step(fn: Callable[..., Any], *, eval_params: Callable[[Any, Any], Any] | None = None) -> EvalStep:
    r"""Build a jit-compiled evaluation step, optionally at parameters derived from the optimizer state.

    .. math::

        y = f(\tilde w; \text{batch}), \qquad \tilde w = \begin{cases} w & \text{without eval\_params} \\
        \mathrm{eval\_params}(s, w) & \text{otherwise} \end{cases}

    Nothing is modified: the model is evaluated on a copy inside the compiled function, so
    training continues from its own parameters.

    Args:
        fn: ``fn(model, *batch) -> anything`` (loss, logits, accuracy ...).
        eval_params: optional ``eval_params(opt_state, params) -> params``, e.g.
            ``gradtx.schedule_free_eval_params`` or ``gradtx.lookahead_slow_params``; it
            receives the optimizer state and ``nnx.state(model, optimizer.wrt)`` as pure arrays.

    Returns:
        An :class:`EvalStep`: ``step(model, optimizer, *batch)`` (``optimizer`` may be ``None``
        without ``eval_params``).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> from flax import nnx
        >>> from gradtx.contrib.flax import make_eval_step
        >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
        >>> optimizer = nnx.Optimizer(model, gradtx.schedule_free_sgd(0.1), wrt=nnx.Param)
        >>> evaluate = make_eval_step(lambda m, x: m(x), eval_params=gradtx.schedule_free_eval_params)
        >>> evaluate(model, optimizer, jnp.ones((2, 3))).shape
        (2, 1)

    References:
        Defazio et al., 2024. The Road Less Scheduled, https://arxiv.org/abs/2405.15682
    """
    owner = "make_eval_step"
    if not callable(fn):
        raise TypeError(f"{owner}: fn must be callable, got {fn!r}")
    if eval_params is not None and not callable(eval_params):
        raise TypeError(f"{owner}: eval_params must be None or callable, got {eval_params!r}")
    return EvalStep(fn, eval_params)
