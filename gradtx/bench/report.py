"""Output of the command-line tool: machine description, tables, JSON written as results arrive, and PNG plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
from collections.abc import Sequence
from importlib import metadata
from typing import Any


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where and when the figures were taken: CPU, backend and device, package versions, UTC date."""
    import jax

    device = jax.devices()[0]
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("jax", "jaxlib", "optax", "flax", "gradtx", "torch")},
    }


def check_writable(directory: str) -> str | None:
    """Create ``directory`` if needed and probe that a file can be written there; the reason if not."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".gradtx-probe-"):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


def write_json(path: str, payload: Any) -> None:
    """Write atomically (temporary file, then rename), so an interrupted run never leaves half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".gradtx-", suffix=".json", delete=False) as file:
        json.dump(payload, file, indent=2)
        file.write("\n")
    os.replace(file.name, path)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; numbers right-aligned."""

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: Sequence[float], window: int) -> list[float]:
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(values) < window:
        return values.tolist()
    kernel = np.ones(window) / window
    head = [values[: i + 1].mean() for i in range(window - 1)]
    return head + np.convolve(values, kernel, mode="valid").tolist()


def plot_compare(results: dict[str, dict], directory: str, title: str) -> list[str]:
    """Two PNGs: training-loss curves (moving average, log scale) and held-out accuracy vs step."""
    plt = _pyplot()
    paths = []
    steps = max((len(r["loss_curve"]) for r in results.values()), default=1)
    window = max(1, steps // 50)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for name, result in results.items():
        curve = result["loss_curve"]
        ax.plot(range(1, len(curve) + 1), _smooth(curve, window), label=name, linewidth=1.6)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (cross-entropy, moving average over {window} steps)")
    ax.set_title(f"{title}: training loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(directory, "compare_loss.png"))
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 5), dpi=120)
    lowest = 100.0
    for name, result in results.items():
        accuracy = [100 * a for a in result["held_out_accuracy_curve"]]
        for ax in (full, zoom):
            ax.plot(result["eval_steps"], accuracy, marker="o", markersize=3, label=name, linewidth=1.6)
        lowest = min([lowest, *(a for a, step in zip(accuracy, result["eval_steps"]) if step >= steps / 2)])
    # The right panel shows the second half of training, where the optimizers differ by a few points.
    zoom.set_xlim(steps / 2, steps * 1.02)
    zoom.set_ylim(max(0.0, lowest - 1.0), 100.2)
    for ax, name in ((full, "held-out accuracy"), (zoom, "held-out accuracy, second half of training")):
        ax.set_xlabel("step")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    full.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(os.path.join(directory, "compare_accuracy.png"))
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def _leaf_axis(ax, leaves: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(leaves))
    ax.set_xticklabels([str(count) for count in leaves])
    ax.minorticks_off()


def _log_axis(ax) -> None:
    """A log scale labelled 1, 2, 5, 10, 20 ... in plain numbers (not 2 x 10^1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_bench(rows: list[dict], path: str, title: str) -> str:
    """Step time, fraction of the triad roofline and compile time vs leaf count, gradtx solid and Optax dashed."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    optimizers = list(dict.fromkeys(row["optimizer"] for row in rows))
    panels = (
        ("ms_per_step", "median step time (ms)", True),
        ("roofline_ratio", "fraction of donated-triad roofline", False),
        ("compile_s", "compile time (s)", True),
    )
    for ax, (key, label, log) in zip(axes, panels):
        for index, optimizer in enumerate(optimizers):
            selected = sorted((r for r in rows if r["optimizer"] == optimizer), key=lambda r: r["leaves"])
            color = colors[index % len(colors)]
            for library, style, marker in (("gradtx", "-", "o"), ("gradtx_packed", "-.", "D"), ("optax", "--", "s")):
                measured = [(r["leaves"], r[library][key]) for r in selected if r.get(library)]
                if measured:
                    ax.plot(*zip(*measured), style, marker=marker, color=color, label=f"{optimizer} ({library})")
            if key != "compile_s":
                torch_rows = [r for r in selected if "torch_adamw_fused" in r]
                if torch_rows:
                    ax.plot(
                        [r["leaves"] for r in torch_rows],
                        [r["torch_adamw_fused"][key] for r in torch_rows],
                        ":",
                        marker="^",
                        color=color,
                        label="adamw (torch fused)",
                    )
        _leaf_axis(ax, sorted({r["leaves"] for r in rows}))
        if log:
            _log_axis(ax)
        else:
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_ylim(bottom=0)
        ax.set_xlabel("number of parameter arrays (same total size)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.87, 0.95))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_e2e(rows: list[dict], path: str, title: str) -> str:
    """Added step time and added compile time of the update over forward + backward, gradtx vs Optax."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    rows = sorted(rows, key=lambda r: r["leaves"])
    leaves = [r["leaves"] for r in rows]
    for ax, (key, label) in zip(
        axes, (("added_ms", "update's added step time (ms)"), ("added_compile_s", "update's added compile time (s)"))
    ):
        for library, style, marker in (("gradtx", "-", "o"), ("gradtx_packed", "-.", "D"), ("optax", "--", "s")):
            ax.plot(leaves, [r[library][key] for r in rows], style, marker=marker, label=library)
        _leaf_axis(ax, leaves)
        ax.set_xlabel("parameter arrays in the model (Linear 128x128 layers x 2)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
