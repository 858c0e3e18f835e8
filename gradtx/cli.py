"""The ``gradtx`` command-line tool: ``gradtx compare`` and ``gradtx bench``.

``main(argv)`` parses, validates and dispatches; the measuring lives in :mod:`gradtx.bench`.
Usage errors print one line and return 2; an interrupted run writes what it has measured and
returns 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence

DEFAULT_OUT = "gradtx-results"
BENCH_PARAMS = 16 * 2**20
BENCH_LEAVES = (1, 64, 1024, 4096)
QUICK_PARAMS = 4 * 2**20
QUICK_LEAVES = (1, 256)
E2E_LEAVES = (32, 512, 2048)
QUICK_E2E_LEAVES = (32, 256)
MIN_CALLS = 10
INTERRUPTED = 130


class UsageError(Exception):
    """A bad command line: reported in one line with exit code 2."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')", self.prog)


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of positive integers, got {text!r}")
    return tuple(_positive_int(part) for part in parts)


def _names(text: str, table: dict, option: str = "--optimizers") -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError(f"{option} needs at least one name; valid names: {', '.join(sorted(table))}")
    unknown = [name for name in names if name not in table]
    if unknown:
        raise UsageError(f"unknown optimizer {', '.join(map(repr, unknown))}; valid names: {', '.join(sorted(table))}")
    return list(dict.fromkeys(names))


def _require(modules: Sequence[str], command: str) -> None:
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"{command} needs {', '.join(missing)}; install them with: pip install 'gradtx[bench]'")


def _prepare_out(directory: str) -> str:
    from gradtx.bench.report import check_writable

    reason = check_writable(directory)
    if reason is not None:
        raise UsageError(f"cannot write to --out {directory!r}: {reason}")
    return directory


def _available(names: Sequence[str], build) -> list[str]:
    """The names whose gradtx optimizer exists here; a message on stderr for each that does not."""
    from gradtx.bench.registry import Unavailable

    kept = []
    for name in names:
        try:
            build(name)
        except Unavailable as missing:
            print(f"skipping {name}: {missing}", file=sys.stderr)
            continue
        kept.append(name)
    return kept


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults shown (unless None or False); description and epilog kept as written (see :func:`_paragraph`)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _paragraph(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), width=88)


def _shared_options(parser, table: dict, default: Sequence[str], outputs: str) -> None:
    parser.add_argument(
        "--optimizers", default=",".join(default), help=f"comma-separated optimizer names, from: {', '.join(table)}"
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"directory for {outputs} (created if missing)")


def build_parser() -> argparse.ArgumentParser:
    from gradtx.bench import registry

    parser = _Parser(
        prog="gradtx",
        description="gradtx: compare optimizers on a real dataset, and benchmark optimizer updates against Optax.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    formatter = _Formatter

    compare = commands.add_parser(
        "compare",
        help="train a small Flax NNX MLP on the bundled UCI digits with several optimizers",
        description=_paragraph(
            "Train one MLP (64-128-128-10, Flax NNX) on the UCI handwritten digits bundled with gradtx "
            "(1,500 training and 297 fixed held-out images, CC BY 4.0) with each chosen optimizer, from the same "
            "initial weights and batches. Reports final training loss, held-out accuracy, milliseconds per step "
            "(jit-compiled, buffers donated; the first, compiling step excluded) and optimizer-state bytes per "
            "parameter; writes compare.json (after each optimizer) and compare_loss.png, compare_accuracy.png."
        ),
        epilog="optimizers:\n" + "\n".join(f"  {e.name:<20} {e.description}" for e in registry.COMPARE.values()),
        formatter_class=formatter,
    )
    _shared_options(compare, registry.COMPARE, registry.COMPARE_DEFAULT, "compare.json and the PNG plots")
    compare.add_argument("--steps", type=_positive_int, default=600, help="training steps per optimizer")
    compare.add_argument("--batch-size", type=_positive_int, default=64, help="examples per step (at most 1500)")
    compare.add_argument("--eval-every", type=_positive_int, default=25, help="evaluate held-out accuracy every N steps")
    compare.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the initial weights and batch order")
    compare.set_defaults(run=_compare)

    bench = commands.add_parser(
        "bench",
        help="time jit-compiled, donated optimizer updates, gradtx side by side with Optax",
        description=_paragraph(
            "Time one jit-compiled, buffer-donated update step of each optimizer, gradtx and Optax (and "
            "torch.optim.AdamW(fused=True) for adamw when torch is installed) interleaved in the same rounds with "
            "the donated-triad memory roofline (a = a * s + b, 12 bytes per element), over the same number of "
            "float32 parameters split into 1 to thousands of arrays. Reports median ms per step over the timed "
            "calls, effective GB/s (bytes-per-parameter model of PERF.md), fraction of the roofline, compile time "
            "(lower().compile(), timed apart), state bytes, and the gradtx/Optax ratio. Writes bench.json (after "
            "each row) and bench.png (bench_e2e.png with --e2e)."
        ),
        epilog="optimizers (the same keyword arguments to gradtx and Optax; bytes moved per parameter):\n"
        + "\n".join(f"  {e.name:<10} {e.kwargs}; {e.bytes_per_parameter or '12 + 2 x state'} B" for e in registry.BENCH.values()),
        formatter_class=formatter,
    )
    _shared_options(bench, registry.BENCH, registry.BENCH_DEFAULT, "bench.json and the PNG plots")
    bench.add_argument(
        "--params",
        type=_positive_int,
        default=None,
        help=f"total float32 parameters (default {BENCH_PARAMS}; --quick: {QUICK_PARAMS})",
    )
    bench.add_argument(
        "--leaves",
        type=_int_list,
        default=None,
        help="comma-separated numbers of equal arrays the parameters are split into; each must divide --params "
        f"(default {','.join(map(str, BENCH_LEAVES))}; --quick: {','.join(map(str, QUICK_LEAVES))})",
    )
    bench.add_argument(
        "--calls", type=_positive_int, default=MIN_CALLS, help=f"timed calls per case after one warm-up (>= {MIN_CALLS})"
    )
    bench.add_argument("--quick", action="store_true", help="a smaller run that finishes in about a minute on a 2-core CPU")
    bench.add_argument("--no-torch", action="store_true", help="leave out the torch.optim.AdamW(fused=True) column")
    bench.add_argument(
        "--e2e",
        action="store_true",
        help="also time the end-to-end Flax NNX train step (Linear 128x128 layers, batch 32, AdamW): forward+backward "
        "alone vs. with gradtx's and Optax's update (added step and compile time)",
    )
    bench.add_argument("--e2e-only", action="store_true", help="run only the end-to-end benchmark (implies --e2e)")
    bench.add_argument(
        "--e2e-leaves",
        type=_int_list,
        default=None,
        help="comma-separated even numbers of parameter arrays of the end-to-end model "
        f"(default {','.join(map(str, E2E_LEAVES))}; --quick: {','.join(map(str, QUICK_E2E_LEAVES))})",
    )
    bench.add_argument(
        "--optax-max-leaves",
        type=_positive_int,
        default=None,
        help="time Optax (and gradtx per array) only up to this many arrays; rows above it record the skip "
        "(Optax compiles LAMB over 4096 arrays for ~8 minutes)",
    )
    bench.add_argument(
        "--xla-defaults",
        action="store_true",
        help="compile the update rows with XLA's default options instead of gradtx.compiler_options() (for every "
        "library alike; on CPU the default copies a donated moment that is read after being overwritten, e.g. Lion's)",
    )
    bench.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the random parameters and gradients")
    bench.set_defaults(run=_bench)
    return parser


def _compare(args) -> int:
    from gradtx.bench import registry

    names = _names(args.optimizers, registry.COMPARE)
    if args.batch_size > 1500:
        raise UsageError(f"--batch-size must be at most 1500 (the training set), got {args.batch_size}")
    _require(("flax", "tqdm", "matplotlib"), "gradtx compare")
    out = _prepare_out(args.out)
    names = _available(names, lambda name: registry.COMPARE[name].build(args.steps))
    if not names:
        raise UsageError("none of the chosen optimizers is available in this installation")

    from tqdm.auto import tqdm

    from gradtx.bench import compare, report

    data = compare.load_digits()
    payload = {
        "command": "compare",
        "config": {"steps": args.steps, "batch_size": args.batch_size, "eval_every": args.eval_every, "seed": args.seed},
        "dataset": compare.dataset_info(data),
        "machine": report.machine_info(),
        "optimizers": names,
        "results": {},
        "complete": False,
    }
    json_path = os.path.join(out, "compare.json")
    report.write_json(json_path, payload)
    interrupted = False
    try:
        for name in names:
            with tqdm(total=args.steps, desc=f"{name:>10}", unit="step", dynamic_ncols=True, file=sys.stderr) as bar:

                def on_step(step, info, bar=bar):
                    bar.update(1)
                    if info:
                        bar.set_postfix(loss=f"{info['loss']:.3f}", acc=f"{100 * info['acc']:.1f}%", refresh=False)

                payload["results"][name] = compare.train_one(
                    registry.COMPARE[name],
                    data,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    eval_every=args.eval_every,
                    on_step=on_step,
                )
            report.write_json(json_path, payload)
    except KeyboardInterrupt:
        interrupted = True
    payload["complete"] = not interrupted
    payload["interrupted"] = interrupted
    results = payload["results"]
    if results:
        title = f"UCI digits MLP, {args.steps} steps, batch {args.batch_size}"
        payload["plots"] = report.plot_compare(results, out, title)
    report.write_json(json_path, payload)
    rows = [
        (
            name,
            r["final_train_loss"],
            100 * r["held_out_accuracy"],
            r["ms_per_step"],
            r["state_bytes_per_parameter"],
            r["first_step_s"],
        )
        for name, r in results.items()
    ]
    headers = ("optimizer", "final train loss", "held-out acc %", "ms/step", "state B/param", "first step s")
    print(report.table(headers, rows))
    print(f"results: {json_path}" + "".join(f"\nplot: {path}" for path in payload.get("plots", [])))
    if interrupted:
        print(f"gradtx compare: interrupted; partial results kept in {json_path}", file=sys.stderr)
        return INTERRUPTED
    return 0


def _bench_plan(args):
    if args.quick:
        params = args.params or QUICK_PARAMS
        leaves = args.leaves or QUICK_LEAVES
        e2e_leaves = args.e2e_leaves or QUICK_E2E_LEAVES
    else:
        params = args.params or BENCH_PARAMS
        leaves = args.leaves or BENCH_LEAVES
        e2e_leaves = args.e2e_leaves or E2E_LEAVES
    if args.calls < MIN_CALLS:
        raise UsageError(f"--calls must be at least {MIN_CALLS} (medians of fewer calls are noise), got {args.calls}")
    for count in leaves:
        if params % count:
            raise UsageError(f"--params {params} is not divisible by the leaf count {count}")
    for count in e2e_leaves:
        if count % 2:
            raise UsageError(f"--e2e-leaves must be even (a Linear layer has two arrays), got {count}")
    return params, leaves, e2e_leaves


def _bench(args) -> int:
    from gradtx.bench import registry
    from gradtx.compilation import compiler_options as gradtx_compiler_options

    names = _names(args.optimizers, registry.BENCH)
    params, leaf_counts, e2e_leaves = _bench_plan(args)
    e2e = args.e2e or args.e2e_only
    _require(("optax", "tqdm", "matplotlib") + (("flax",) if e2e else ()), "gradtx bench")
    out = _prepare_out(args.out)
    if args.e2e_only:
        names = []
    else:
        names = _available(names, registry.resolve)
        if not names:
            raise UsageError("none of the chosen optimizers is available in this installation")
    if e2e and not _available(["adamw"], registry.resolve):
        e2e = False

    from tqdm.auto import tqdm

    from gradtx.bench import report, runner

    configs = list(runner.update_configs(names, params, leaf_counts))
    payload = {
        "command": "bench",
        "config": {
            "params": params,
            "leaves": list(leaf_counts),
            "calls": args.calls,
            "optimizers": names,
            "dtype": "float32",
            "e2e_leaves": list(e2e_leaves) if e2e else [],
            "seed": args.seed,
            "optax_max_leaves": args.optax_max_leaves,
            "compiler_options": {} if args.xla_defaults else gradtx_compiler_options(),
        },
        "machine": report.machine_info(),
        "method": "median of the timed calls after one warm-up; gradtx, Optax, torch and the donated triad interleaved in "
        "the same rounds; compile time from jit(step).lower(...).compile()",
        "update": [],
        "e2e": [],
        "complete": False,
    }
    json_path = os.path.join(out, "bench.json")
    report.write_json(json_path, payload)
    total = len(configs) + (len(e2e_leaves) if e2e else 0)
    interrupted = False
    try:
        with tqdm(total=total, unit="case", dynamic_ncols=True, file=sys.stderr) as bar:
            for config in configs:
                bar.set_description(f"{config.optimizer} x{config.leaves}")
                per_array = args.optax_max_leaves is None or config.leaves <= args.optax_max_leaves
                row = runner.run_update(
                    config,
                    calls=args.calls,
                    use_torch=not args.no_torch,
                    seed=args.seed,
                    with_optax=per_array,
                    with_per_array=per_array,
                    compiler_options={} if args.xla_defaults else None,
                )
                payload["update"].append(row)
                report.write_json(json_path, payload)
                bar.update(1)
            if e2e:
                from gradtx.bench import e2e as e2e_bench

                for count in e2e_leaves:
                    bar.set_description(f"e2e x{count}")
                    payload["e2e"].append(e2e_bench.run_e2e(count, calls=args.calls, seed=args.seed))
                    report.write_json(json_path, payload)
                    bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
    payload["complete"] = not interrupted
    payload["interrupted"] = interrupted
    _bench_outputs(payload, out, params)
    report.write_json(json_path, payload)
    print(f"results: {json_path}" + "".join(f"\nplot: {path}" for path in payload.get("plots", [])))
    if interrupted:
        print(f"gradtx bench: interrupted; partial results kept in {json_path}", file=sys.stderr)
        return INTERRUPTED
    return 0


def _bench_outputs(payload: dict, out: str, params: int) -> None:
    from gradtx.bench import report

    machine = payload["machine"]
    where = f"{machine['backend']} ({machine['device']}, {machine['cpu_count']} CPUs)"
    payload["plots"] = []
    rows = payload["update"]
    if rows:
        print(f"\nOptimizer update, {params} float32 parameters, on {where}; triad roofline measured in the same rounds")
        headers = (
            "optimizer", "arrays", "gradtx ms", "packed ms", "optax ms", "gradtx/optax", "packed/optax", "gradtx roofline",
            "packed roofline", "optax roofline", "gradtx compile s", "packed compile s", "optax compile s",
            "state B/p (packed, optax)", "torch ms",
        )  # fmt: skip

        def figure(r, library, key):
            return r[library][key] if r.get(library) else None

        table_rows = [
            (
                r["optimizer"], r["leaves"], figure(r, "gradtx", "ms_per_step"), figure(r, "gradtx_packed", "ms_per_step"),
                figure(r, "optax", "ms_per_step"), r["gradtx_over_optax_time"], r["gradtx_packed_over_optax_time"],
                figure(r, "gradtx", "roofline_ratio"), figure(r, "gradtx_packed", "roofline_ratio"),
                figure(r, "optax", "roofline_ratio"), figure(r, "gradtx", "compile_s"), figure(r, "gradtx_packed", "compile_s"),
                figure(r, "optax", "compile_s"),
                ", ".join(_bytes(figure(r, library, "state_bytes_per_parameter")) for library in ("gradtx_packed", "optax")),
                (r.get("torch_adamw_fused") or {}).get("ms_per_step"),
            )
            for r in rows
        ]  # fmt: skip
        print(report.table(headers, table_rows))
        triad = sorted(r["triad_gb_per_s"] for r in rows)
        print(f"donated triad: {triad[len(triad) // 2]:.1f} GB/s (median over rows; min {triad[0]:.1f}, max {triad[-1]:.1f})")
        title = f"Optimizer update, {params / 2**20:g}M float32 params, {where}"
        payload["plots"].append(report.plot_bench(rows, os.path.join(out, "bench.png"), title))
    if payload["e2e"]:
        print(f"\nEnd-to-end Flax NNX step (Linear 128x128 layers, batch 32, adamw) on {where}")
        headers = (
            "arrays", "fwd+bwd ms", "gradtx added ms", "packed added ms", "optax added ms", "added gradtx/optax",
            "added packed/optax", "fwd+bwd compile s", "gradtx added compile s", "packed added compile s",
            "optax added compile s", "added compile gradtx/optax", "added compile packed/optax",
        )  # fmt: skip
        table_rows = [
            (
                r["leaves"], r["forward_backward"]["ms_per_step"], r["gradtx"]["added_ms"], r["gradtx_packed"]["added_ms"],
                r["optax"]["added_ms"], r["gradtx_over_optax_added_time"], r["gradtx_packed_over_optax_added_time"],
                r["forward_backward"]["compile_s"], r["gradtx"]["added_compile_s"], r["gradtx_packed"]["added_compile_s"],
                r["optax"]["added_compile_s"], r["gradtx_over_optax_added_compile"], r["gradtx_packed_over_optax_added_compile"],
            )
            for r in payload["e2e"]
        ]  # fmt: skip
        print(report.table(headers, table_rows))
        title = f"End-to-end Flax NNX train step (AdamW), {where}"
        payload["plots"].append(report.plot_e2e(payload["e2e"], os.path.join(out, "bench_e2e.png"), title))


def _bytes(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _fail(prog: str, error: UsageError) -> int:
    print(f"{error.prog or prog}: error: {error}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help and --version print and stop
        return exit_request.code if isinstance(exit_request.code, int) else 0
    except UsageError as error:
        return _fail("gradtx", error)
    try:
        return args.run(args)
    except UsageError as error:
        return _fail(f"gradtx {args.command}", error)
    except KeyboardInterrupt:
        print(f"gradtx {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
