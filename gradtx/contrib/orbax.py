"""Checkpoint and resume optimizer state (and anything else in a pytree) with Orbax, exactly.

``save(directory, step, tree)`` writes one checkpoint per step under ``directory``;
``restore(directory, target)`` reads one back into the structure, dtypes and shardings of
``target``; ``latest_step(directory)`` finds the newest complete one. ``tree`` is any pytree
of arrays: an optimizer state, ``(params, opt_state)``, a dict with the step's data-loader
position, a Flax ``TrainState`` or ``nnx.state(optimizer)``.

What it guarantees:

* **Bit-exact resume.** Array bytes are stored as they are (TensorStore), so training resumed
  from step k reproduces the uninterrupted run bit for bit.
* **Checked restore.** Every checkpoint records its tree's layout: each node's path and type
  (``ScaleByAdamState``, ``EmptyState``, ``dict`` ...), each array's dtype and shape, and the
  static data of custom pytree nodes (a packed layout, a quantized array's code and block size).
  Restoring into a target whose layout differs (another optimizer, other parameters, another
  shape or dtype) raises a ``ValueError`` naming the first differing path, before any array is
  read; Orbax alone would silently hand back arrays of the saved shape.
* **The target's types.** Restored arrays have the target's dtypes (int32 step counters stay
  int32) and placement: committed ``jax.Array`` leaves and ``jax.ShapeDtypeStruct`` leaves with
  a sharding give their sharding (Orbax reshards on read); uncommitted arrays (plain ``jnp``
  arrays, outputs of ``jit``) and unsharded abstract leaves come back uncommitted on the
  default device. So the compiled training step is reused, not recompiled. NumPy leaves come
  back as NumPy arrays and Python scalars as Python scalars.
* **Atomic saves.** Orbax writes a step into ``<step>.orbax-checkpoint-tmp-<time>`` and renames
  it to ``<step>`` once complete; a process killed while saving leaves only that temporary
  directory, which :func:`latest_step` and :func:`restore` ignore.

Orbax is an optional dependency (``pip install gradtx[checkpoint]``); it is imported on first use.
In a multi-process run, every process calls :func:`save` and :func:`restore` with the same
arguments, as Orbax requires.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["latest_step", "restore", "save"]

FORMAT = "gradtx.contrib.orbax/1"
_SCALARS = (bool, int, float, complex)


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("gradtx.contrib.orbax needs Orbax: pip install 'gradtx[checkpoint]' (or orbax-checkpoint)") from error
    return ocp


def _manager(directory, *, create: bool, max_to_keep: int | None = None):
    ocp = _orbax()
    # Synchronous: save returns once the step is renamed into place. (read_only would be apt for
    # reading, but it logs warnings at every call; without create nothing is written either.)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.fspath(directory), options=options)


def _is_array_leaf(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct, *_SCALARS))


def _dtype(x: Any) -> np.dtype:
    return np.asarray(x).dtype if isinstance(x, _SCALARS) else np.dtype(x.dtype)


def _describe_leaf(x: Any) -> str:
    """``float32[3,4]``: the dtype and shape a leaf is stored with."""
    return f"{_dtype(x).name}[{','.join(map(str, np.shape(x)))}]"


_BUILTIN_CONTAINERS = (dict, list, tuple)  # their static data are their keys, already in the paths


def _static_data(node: Any, treedef) -> str:
    """A fingerprint of a custom node's static (aux) data, e.g. a packed layout or a quantized array's code; "" if none.

    Short reprs are kept as they are (readable in errors), long ones (a packed layout lists
    every array) as a digest. Reprs that show memory addresses change from run to run and are
    not recorded.
    """
    aux = treedef.node_data()[1]
    if aux is None or isinstance(node, _BUILTIN_CONTAINERS):
        return ""
    text = repr(aux)
    if " at 0x" in text:
        return ""
    return text if len(text) <= 120 else "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _layout(owner: str, tree: Any) -> list[tuple[str, str, str]]:
    """Every node of ``tree`` in traversal order: ``(path, description, static data)``.

    Containers are described by their type name, arrays by dtype and shape; custom pytree
    nodes also by their static data (see :func:`_static_data`).
    """
    entries: list[tuple[str, str, str]] = []

    def visit(path: str, node: Any) -> None:
        if node is None:
            entries.append((path, "None", ""))
            return
        if _is_array_leaf(node):
            if jax.dtypes.issubdtype(getattr(node, "dtype", None), jax.dtypes.prng_key):
                raise TypeError(
                    f"{owner}: tree{path or ' (the root)'} is a typed PRNG key array ({node.dtype}), which Orbax does not "
                    f"store; checkpoint jax.random.key_data(key) and rebuild it with jax.random.wrap_key_data"
                )
            entries.append((path, _describe_leaf(node), ""))
            return
        children, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda child: child is not node)
        if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # not a pytree container (empty ones have no leaves)
            raise TypeError(
                f"{owner}: tree{path or ' (the root)'} is a {type(node).__name__}, which cannot be checkpointed; "
                f"expected arrays, Python scalars, None or pytree containers"
            )
        entries.append((path, type(node).__name__, _static_data(node, treedef)))
        for key_path, child in children:
            visit(path + jax.tree_util.keystr(key_path), child)

    visit("", tree)
    return entries


def _first_mismatch(saved: list, target: list) -> str | None:
    """The first difference between two layouts: paths and descriptions first (the most precise), then static data."""
    saved_at = {path: rest for path, *rest in saved}
    target_at = {path: rest for path, *rest in target}
    for path, wanted, _ in target:
        if path not in saved_at:
            return f"target{path} ({wanted}) is not in the checkpoint"
        if saved_at[path][0] != wanted:
            return f"at {path or '(the root)'}: the checkpoint has {saved_at[path][0]}, the target has {wanted}"
    for path, found, _ in saved:
        if path not in target_at:
            return f"checkpoint{path} ({found}) has no counterpart in the target"
    for path, kind, wanted in target:
        if saved_at[path][1] != wanted:
            return (
                f"at {path or '(the root)'}: the static (non-array) data of the {kind} node differ: "
                f"the checkpoint has {saved_at[path][1] or '(none)'}, the target has {wanted or '(none)'}"
            )
    return None


def _stored(leaf: Any) -> Any:
    return np.asarray(leaf) if isinstance(leaf, (*_SCALARS, np.generic)) else leaf


def _placed(leaf: Any) -> bool:
    """Whether ``leaf`` asks for an explicit placement (a committed or sharded array), not the default device."""
    if isinstance(leaf, jax.Array):
        return leaf.committed
    return isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is not None


def _abstract(leaf: Any) -> Any:
    """What Orbax should read a leaf back as: the target's dtype, shape and, for placed arrays, sharding."""
    if _placed(leaf):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    # A host template (np.empty: pages untouched until Orbax fills them); placed like the target afterwards.
    return np.empty(np.shape(leaf), _dtype(leaf))


def _like_target(restored: Any, leaf: Any) -> Any:
    if isinstance(leaf, _SCALARS):
        return type(leaf)(np.asarray(restored).item())
    if isinstance(leaf, np.generic):
        return leaf.dtype.type(restored)
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) and not _placed(leaf):
        # Uncommitted, like the target (jnp arrays, jit outputs): an array committed to a device
        # would be a new argument signature for jit and recompile the training step.
        return jnp.asarray(restored)
    return restored


def _keys(n: int) -> list[str]:
    return [f"{i:06d}" for i in range(n)]


def save(directory: str | os.PathLike, step: int, tree: Any, *, max_to_keep: int | None = None) -> pathlib.Path:
    """Save ``tree`` as the checkpoint of ``step`` under ``directory``, atomically.

    The checkpoint holds every array of ``tree`` (bytes as they are) and its layout (each
    node's path and type, each array's dtype and shape), which :func:`restore` checks.
    Orbax writes into a temporary directory and renames it to ``directory/<step>`` when
    complete, so an interrupted save never replaces or damages an earlier checkpoint.

    Args:
        directory: the checkpoint root (created if missing); one subdirectory per step.
        step: a non-negative int, larger than every step already saved there.
        tree: a pytree of arrays (``jax.Array``, NumPy, Python scalars), e.g. an optimizer
            state or ``(params, opt_state)``.
        max_to_keep: keep only this many newest checkpoints (``None``: keep all); older ones
            are deleted after the new one is complete.

    Returns:
        The path of the finalized checkpoint directory.

    Example:
        >>> import tempfile, jax.numpy as jnp, gradtx
        >>> from gradtx.contrib import orbax as checkpoint
        >>> tx = gradtx.adam(1e-3)
        >>> params = {"w": jnp.ones(3)}
        >>> directory = tempfile.mkdtemp()
        >>> path = checkpoint.save(directory, 10, (params, tx.init(params)))
        >>> checkpoint.latest_step(directory)
        10

    References:
        Orbax checkpointing, https://orbax.readthedocs.io/en/latest/guides/checkpoint/checkpoint_manager.html
    """
    owner = "gradtx.contrib.orbax.save"
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"{owner}: step must be a non-negative int, got {step!r}")
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1):
        raise ValueError(f"{owner}: max_to_keep must be None or an int >= 1, got {max_to_keep!r}")
    ocp = _orbax()
    layout = _layout(owner, tree)
    leaves = jax.tree.leaves(tree)
    items = {"layout": ocp.args.JsonSave({"format": FORMAT, "layout": layout})}
    if leaves:  # Orbax refuses an empty item (a stateless optimizer's state)
        items["arrays"] = ocp.args.StandardSave(dict(zip(_keys(len(leaves)), map(_stored, leaves))))
    with _manager(directory, create=True, max_to_keep=max_to_keep) as manager:
        latest = manager.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(f"{owner}: step must be larger than the latest saved step {latest} in {directory}, got {step}")
        if not manager.save(int(step), args=ocp.args.Composite(**items)):
            raise RuntimeError(f"{owner}: Orbax declined to save step {step} in {directory}")
        manager.wait_until_finished()
    return pathlib.Path(directory) / str(int(step))


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete checkpoint's step under ``directory``, or ``None`` if there is none.

    Temporary directories of interrupted saves are not checkpoints and are ignored.

    Args:
        directory: the checkpoint root given to :func:`save`.

    Returns:
        An int, or ``None`` when ``directory`` is missing or holds no complete checkpoint.

    Example:
        >>> import tempfile
        >>> from gradtx.contrib import orbax as checkpoint
        >>> checkpoint.latest_step(tempfile.mkdtemp()) is None
        True

    References:
        Orbax checkpointing, https://orbax.readthedocs.io/en/latest/guides/checkpoint/checkpoint_manager.html
    """
    if not os.path.isdir(directory):
        return None
    with _manager(directory, create=False) as manager:
        return manager.latest_step()


def restore(directory: str | os.PathLike, target: Any, step: int | None = None) -> Any:
    """Read the checkpoint of ``step`` (default: the latest) into a tree shaped like ``target``.

    ``target`` gives the structure, dtypes and placement: typically ``tx.init(params)`` (or
    ``(params, tx.init(params))``, matching what was saved), or its abstract form from
    ``jax.eval_shape`` with ``jax.ShapeDtypeStruct(..., sharding=...)`` leaves, so that
    nothing is materialized twice. Its values are not used. The checkpoint's recorded layout
    must equal ``target``'s: same paths, same container types (a different optimizer has
    differently named states), same array dtypes and shapes.

    Args:
        directory: the checkpoint root given to :func:`save`.
        target: a pytree like the saved one; committed ``jax.Array`` leaves and
            ``jax.ShapeDtypeStruct`` leaves with a sharding give the restored arrays'
            shardings; uncommitted arrays and unsharded abstract leaves are restored
            uncommitted on the default device; NumPy leaves as NumPy, Python scalars as such.
        step: which checkpoint; ``None`` for the latest complete one.

    Returns:
        A pytree with ``target``'s structure holding the saved values.

    Raises:
        FileNotFoundError: no (such) complete checkpoint under ``directory``.
        ValueError: the checkpoint's layout differs from ``target``'s; the message names the
            first differing path and both sides (type, or dtype and shape).

    Example:
        >>> import tempfile, jax.numpy as jnp, gradtx
        >>> from gradtx.contrib import orbax as checkpoint
        >>> tx = gradtx.adam(1e-3)
        >>> params = {"w": jnp.ones(3)}
        >>> directory = tempfile.mkdtemp()
        >>> path = checkpoint.save(directory, 1, tx.init(params))
        >>> state = checkpoint.restore(directory, tx.init(params))
        >>> int(state[0].count)
        0

    References:
        Orbax checkpointing, https://orbax.readthedocs.io/en/latest/guides/checkpoint/checkpoint_manager.html
    """
    owner = "gradtx.contrib.orbax.restore"
    ocp = _orbax()
    wanted = _layout(owner, target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{owner}: no checkpoint directory {directory}")
    with _manager(directory, create=False) as manager:
        steps = manager.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"{owner}: no complete checkpoint in {directory}")
            step = max(steps)
        elif step not in steps:
            raise FileNotFoundError(
                f"{owner}: no complete checkpoint of step {step} in {directory}; saved steps: {sorted(steps)}"
            )
        header = manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore())).layout
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"{owner}: {directory}/{step} was not written by gradtx.contrib.orbax.save")
        mismatch = _first_mismatch(header["layout"], wanted)
        if mismatch is not None:
            raise ValueError(
                f"{owner}: the checkpoint {directory}/{step} does not match the target; first difference: {mismatch}"
            )
        leaves, treedef = jax.tree.flatten(target)
        if not leaves:
            return target
        abstract = dict(zip(_keys(len(leaves)), map(_abstract, leaves)))
        arrays = manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract))).arrays
    return jax.tree.unflatten(treedef, [_like_target(arrays[key], leaf) for key, leaf in zip(_keys(len(leaves)), leaves)])
