"""The ``gradtx`` command-line tool, run in-process through ``cli.main``: help, errors, tiny runs."""

from __future__ import annotations

import json
import os

import pytest

from gradtx import cli
from gradtx.bench import compare, registry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_png(path):
    with open(path, "rb") as file:
        assert file.read(8) == PNG_MAGIC
    assert os.path.getsize(path) > 10_000  # a real figure, not an empty canvas


@pytest.mark.parametrize(
    "command, options",
    [
        ((), ("compare", "bench")),
        (("compare",), ("--optimizers", "--steps", "--batch-size", "--eval-every", "--seed", "--out")),
        (
            ("bench",),
            ("--optimizers", "--params", "--leaves", "--calls", "--quick", "--no-torch", "--e2e", "--e2e-leaves", "--out"),
        ),
    ],
)
def test_help_explains_every_option(capsys, command, options):
    code, out, _ = _run(capsys, *command, "--help")
    assert code == 0
    for option in options:
        assert option in out


@pytest.mark.parametrize("command, table", [("compare", registry.COMPARE), ("bench", registry.BENCH)])
def test_unknown_optimizer_lists_valid_names(capsys, tmp_path, command, table):
    code, _, err = _run(capsys, command, "--optimizers", "adam,not_an_optimizer", "--out", str(tmp_path))
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "'not_an_optimizer'" in err
    assert all(name in err for name in table)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (("compare", "--steps", "0"), "--steps: must be a positive integer, got '0'"),
        (("compare", "--steps", "-5"), "--steps: must be a positive integer"),
        (("compare", "--batch-size", "ten"), "--batch-size: must be a positive integer, got 'ten'"),
        (("compare", "--batch-size", "5000"), "--batch-size must be at most 1500"),
        (("compare", "--eval-every", "0"), "--eval-every: must be a positive integer"),
        (("compare", "--seed", "-1"), "--seed: must be a non-negative integer"),
        (("bench", "--params", "0"), "--params: must be a positive integer"),
        (("bench", "--params", "1000", "--leaves", "3"), "not divisible by the leaf count 3"),
        (("bench", "--leaves", "1,,x"), "--leaves: must be a positive integer, got 'x'"),
        (("bench", "--calls", "3"), "--calls must be at least 10"),
        (("bench", "--e2e", "--e2e-leaves", "5"), "--e2e-leaves must be even"),
    ],
)
def test_bad_numbers_are_rejected_in_one_line(capsys, tmp_path, argv, fragment):
    code, _, err = _run(capsys, *argv, "--out", str(tmp_path))
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert fragment in err


@pytest.mark.parametrize("command", ["compare", "bench"])
def test_unwritable_output_path_is_rejected(capsys, tmp_path, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, _, err = _run(capsys, command, "--out", str(blocker / "results"))
    assert code == 2
    assert err.startswith(f"gradtx {command}: error: cannot write to --out")
    assert err.count("\n") == 1


def test_tiny_compare_writes_json_and_plots(capsys, tmp_path):
    code, out, err = _run(
        capsys, "compare", "--steps", "20", "--eval-every", "5", "--optimizers", "sgd,adam", "--out", str(tmp_path)
    )
    assert code == 0, err
    assert "held-out acc" in out and "sgd" in out and "adam" in out
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert payload["complete"] is True
    assert payload["dataset"]["train_examples"] == 1500 and payload["dataset"]["held_out_examples"] == 297
    assert set(payload["results"]) == {"sgd", "adam"}
    for name, result in payload["results"].items():
        for key in ("final_train_loss", "held_out_accuracy", "ms_per_step", "state_bytes", "state_bytes_per_parameter"):
            assert key in result, (name, key)
        assert len(result["loss_curve"]) == 20
        assert result["eval_steps"] == [5, 10, 15, 20]
        assert result["loss_curve"][-1] < result["loss_curve"][0]
        assert result["held_out_accuracy"] > 0.3  # far above chance (0.1) after 20 steps
    assert payload["results"]["sgd"]["state_bytes_per_parameter"] == pytest.approx(4.0, abs=1e-3)  # one momentum buffer
    assert payload["results"]["adam"]["state_bytes_per_parameter"] == pytest.approx(8.0, abs=1e-3)  # two moments
    assert len(payload["plots"]) == 2
    for path in payload["plots"]:
        _assert_png(path)


def test_interrupted_compare_keeps_finished_results(capsys, tmp_path, monkeypatch):
    real_train_one = compare.train_one

    def interrupt_second(entry, *args, **kwargs):
        if entry.name == "adam":
            raise KeyboardInterrupt
        return real_train_one(entry, *args, **kwargs)

    monkeypatch.setattr(compare, "train_one", interrupt_second)
    code, _, err = _run(capsys, "compare", "--steps", "5", "--optimizers", "sgd,adam", "--out", str(tmp_path))
    assert code == 130
    assert "partial results kept" in err
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert payload["complete"] is False and payload["interrupted"] is True
    assert list(payload["results"]) == ["sgd"]


def test_unavailable_optimizer_is_skipped_with_a_message(capsys, tmp_path, monkeypatch):
    def missing(steps):
        raise registry.Unavailable("gradtx.lion is not available in this installation")

    monkeypatch.setitem(registry.COMPARE, "lion", registry.CompareEntry("lion", "Lion", missing))
    code, _, err = _run(capsys, "compare", "--steps", "3", "--optimizers", "lion,sgd", "--out", str(tmp_path))
    assert code == 0
    assert "skipping lion: gradtx.lion is not available" in err
    assert list(json.loads((tmp_path / "compare.json").read_text())["results"]) == ["sgd"]


def test_tiny_bench_reports_gradtx_and_optax_side_by_side(capsys, tmp_path):
    argv = (
        "bench",
        "--params",
        "4096",
        "--leaves",
        "1,4",
        "--optimizers",
        "sgd,adamw",
        "--no-torch",
        "--e2e",
        "--e2e-leaves",
        "4",
    )
    code, out, err = _run(capsys, *argv, "--out", str(tmp_path))
    assert code == 0, err
    assert "gradtx/optax" in out
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["complete"] is True
    assert payload["machine"]["versions"]["optax"]
    rows = payload["update"]
    assert [(r["optimizer"], r["leaves"]) for r in rows] == [("sgd", 1), ("sgd", 4), ("adamw", 1), ("adamw", 4)]
    for row in rows:
        assert row["triad_ms"] > 0
        assert row["bytes_per_parameter_model"] == {"sgd": 20, "adamw": 28}[row["optimizer"]]
        for library in ("gradtx", "gradtx_packed", "optax"):
            figures = row[library]
            assert figures["calls"] >= 10
            for key in ("ms_per_step", "gb_per_s", "roofline_ratio", "compile_s", "state_bytes"):
                assert figures[key] > 0, (library, key)
        assert row["gradtx"]["state_bytes_per_parameter"] == pytest.approx(row["optax"]["state_bytes_per_parameter"], rel=0.01)
        assert row["gradtx_packed"]["state_bytes"] == row["gradtx"]["state_bytes"]
        assert row["gradtx_over_optax_time"] == pytest.approx(row["gradtx"]["ms_per_step"] / row["optax"]["ms_per_step"])
        assert row["gradtx_packed_over_optax_time"] == pytest.approx(
            row["gradtx_packed"]["ms_per_step"] / row["optax"]["ms_per_step"]
        )
        assert row["skipped"] == []
    (e2e,) = payload["e2e"]
    assert e2e["leaves"] == 4 and e2e["layers"] == 2
    for library in ("gradtx", "gradtx_packed", "optax"):
        assert {"added_ms", "added_compile_s"} <= set(e2e[library])
    for path in payload["plots"]:
        _assert_png(path)
    assert [os.path.basename(p) for p in payload["plots"]] == ["bench.png", "bench_e2e.png"]


def test_python_dash_m_runs_the_tool():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "gradtx", "bench", "--calls", "1"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr == "gradtx bench: error: --calls must be at least 10 (medians of fewer calls are noise), got 1\n"


def test_every_registered_optimizer_builds_and_has_its_optax_counterpart():
    import jax.numpy as jnp
    import optax

    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    for name, entry in registry.COMPARE.items():
        tx = entry.build(100)
        assert tx.init(params) is not None, name
        if entry.eval_params:
            assert callable(registry.resolve(entry.eval_params)), name
    for name, entry in registry.BENCH.items():
        registry.resolve(name)(**entry.kwargs).init(params)
        getattr(optax, name)(**entry.kwargs).init(params)
    assert set(registry.COMPARE_DEFAULT) <= set(registry.COMPARE) and set(registry.BENCH_DEFAULT) <= set(registry.BENCH)


def test_bench_can_skip_the_slow_per_array_cases_and_says_so(capsys, tmp_path):
    argv = ("bench", "--params", "4096", "--leaves", "1,4", "--optimizers", "sgd", "--no-torch", "--optax-max-leaves", "1")
    code, out, err = _run(capsys, *argv, "--out", str(tmp_path))
    assert code == 0, err
    one, four = json.loads((tmp_path / "bench.json").read_text())["update"]
    assert one["skipped"] == [] and one["optax"] is not None
    assert four["skipped"] == ["gradtx", "optax"] and four["optax"] is None and four["gradtx"] is None
    assert four["gradtx_packed"]["ms_per_step"] > 0 and four["gradtx_packed_over_optax_time"] is None
