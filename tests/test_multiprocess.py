"""Data-parallel training across two JAX processes on localhost gives the single-process results.

``tests/multiprocess_worker.py`` trains a small MLP for a few steps with several gradtx
optimizers, in two data-parallel styles (``jit`` over a global mesh, and ``shard_map`` with an
explicit ``pmean``), each process holding half of every batch; CPU collectives across
processes go through Gloo (JAX's default CPU implementation). The same script runs as one
process with two local devices, and as one process with one device.

What "identical" means here, and why:

* two processes against one process with two devices: **bit-identical** (every leaf of the
  parameters, the optimizer state and the losses), also when the two processes save their
  state with ``gradtx.contrib.orbax`` half way, restore it and train on (the ``jit`` runs). Both compile the same SPMD program over a
  two-device mesh; only the transport of the all-reduce differs, and an all-reduce of two
  operands is one addition, which is commutative.
* against one process with one device: the gradient's batch mean is summed in another order
  (two half-batch partial sums, then their sum), so results agree to float32 rounding,
  not bitwise. Measured (relative to each leaf's largest magnitude): losses 1.3e-7,
  parameters 3.9e-7, optimizer state 2.5e-6 — the worst is the first moment of the
  one-element output bias, whose gradient (the mean residual) cancels, so its rounding error
  is large relative to it. The test bounds parameters and losses by 1e-6 and the state by 1e-5.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multiprocess_worker.py")
TIMEOUT_S = 180

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(HERE), env.get("PYTHONPATH")]))
    return env


def _tail(path, lines=40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _run_together(tmp_path, name: str, commands: list[list[str]], devices: int) -> None:
    """Start every command at once, wait for all; on a failure or timeout kill the others and report every stderr."""
    procs, logs = [], []
    for rank, args in enumerate(commands):
        log = tmp_path / f"{name}-{rank}.stderr"
        logs.append(log)
        with open(log, "w") as err:
            procs.append(
                subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.DEVNULL, stderr=err, env=_env(devices))
            )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if None not in codes or any(code not in (None, 0) for code in codes):
                break  # all done, or one rank died: the others would wait for it until their own timeout
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if any(code != 0 for code in codes):
        timed_out = time.monotonic() >= deadline
        report = "\n".join(
            f"--- rank {rank} (exit {code}) stderr:\n{_tail(log)}" for rank, (code, log) in enumerate(zip(codes, logs))
        )
        why = f"timed out after {TIMEOUT_S} s" if timed_out else "failed"
        pytest.fail(f"{name}: worker processes {why}; exit codes {codes}\n{report}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("multiprocess")
    port = _free_port()
    resume = ["--checkpoint-dir", str(tmp_path / "checkpoints")]  # the jit runs of the two processes resume from Orbax
    ranks = [
        ["--out", str(tmp_path / f"rank{i}.npz"), "--num-processes", "2", "--process-id", str(i), "--port", str(port), *resume]
        for i in range(2)
    ]
    _run_together(tmp_path, "two processes", ranks, devices=1)
    _run_together(tmp_path, "one process, two devices", [["--out", str(tmp_path / "two_devices.npz")]], devices=2)
    _run_together(tmp_path, "one process, one device", [["--out", str(tmp_path / "one_device.npz")]], devices=1)
    names = ["rank0", "rank1", "two_devices", "one_device"]
    results = {name: dict(np.load(tmp_path / f"{name}.npz")) for name in names}
    results["checkpoints"] = sorted(os.listdir(tmp_path / "checkpoints"))
    results["checkpoint_steps"] = sorted(os.listdir(tmp_path / "checkpoints" / "adam"))
    return results


def test_both_processes_hold_the_same_replicated_results(runs):
    rank0, rank1 = runs["rank0"], runs["rank1"]
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)


def test_two_processes_equal_one_process_on_two_devices_bit_for_bit(runs):
    # The two-process jit runs were saved, restored and resumed half way; the reference was not.
    assert runs["checkpoints"] == ["adam", "lamb", "ranger"] and runs["checkpoint_steps"] == ["2"]
    distributed, local = runs["rank0"], runs["two_devices"]
    assert distributed.keys() == local.keys()
    for key in distributed:
        assert distributed[key].dtype == local[key].dtype, key
        np.testing.assert_array_equal(distributed[key], local[key], err_msg=key)


def test_two_processes_match_one_device_to_float32_summation_rounding(runs):
    distributed, single = runs["rank0"], runs["one_device"]
    assert distributed.keys() == single.keys()
    for key in distributed:
        a, b = distributed[key], single[key]
        assert a.dtype == b.dtype, key
        if not np.issubdtype(a.dtype, np.floating):
            np.testing.assert_array_equal(a, b, err_msg=key)  # step counters
            continue
        # Relative to the leaf's largest magnitude: near-zero elements make elementwise ratios meaningless.
        rtol = 1e-5 if "/state" in key else 1e-6
        np.testing.assert_array_less(np.max(np.abs(a - b)), rtol * np.max(np.abs(b)) + 1e-12, err_msg=key)


def test_every_run_trained(runs):
    losses = {key: value for key, value in runs["rank0"].items() if key.endswith("/loss")}
    assert len(losses) == 6  # three optimizers, two styles
    for key, loss in losses.items():
        assert np.all(np.isfinite(loss)) and loss[-1] < loss[0], (key, loss)
