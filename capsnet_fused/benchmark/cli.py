"""The command line: `capsnet-fused bench` and `python -m capsnet_fused.benchmark` (flags in
add_arguments, the BenchConfig they describe in config_from_args, run prints the tables and
writes the result files).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from capsnet_fused.benchmark.cases import (
    ALL_VARIANTS,
    DTYPES,
    E2E_BATCH,
    MODES,
    SHAPES,
    BenchConfig,
    Variant,
    _device,
    benchmark_backends,
    build_cases,
    parse_shape,
    parse_variant,
)
from capsnet_fused.benchmark.end_to_end import run_end_to_end
from capsnet_fused.benchmark.environment import device_slug, environment_info
from capsnet_fused.benchmark.report import (
    format_e2e_table,
    plot_results,
    write_results,
)
from capsnet_fused.benchmark.routing import run_routing_benchmark

# Short names --modes accepts.
_MODE_ALIASES = {"fwd": "forward", "fwd+bwd": "forward+backward", "fwdbwd": "forward+backward"}


def _csv_list(cast: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [cast(item) for item in text.split(",") if item]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def _mode(text: str) -> str:
    mode = _MODE_ALIASES.get(text, text)
    if mode not in MODES:
        raise ValueError(f"unknown mode {text!r}: expected forward or forward+backward")
    return mode


def _variants(text: str) -> list[Variant]:
    if text == "all":
        return list(ALL_VARIANTS)
    return [parse_variant(item) for item in text.split(",") if item]


def _shape_name(text: str) -> str:
    parse_shape(text)
    return text


# Results go under the working directory unless --out-dir says otherwise: never into the
# package's folder (site-packages once installed) or a checkout's tracked bench/results, which
# is refreshed on purpose with --out-dir bench/results.
DEFAULT_OUT_DIR = Path("bench-results")
PLOTS_HINT = "pip install capsnet-fused[plots]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Define the benchmark's flags on parser (the `capsnet-fused bench` subcommand)."""
    _add_grid_arguments(parser)
    _add_measurement_arguments(parser)
    _add_end_to_end_arguments(parser)


def _add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_argument_group("grid (lists are comma-separated)")
    grid.add_argument(
        "--full",
        action="store_true",
        help="whole grid: every shape, B 1,8,32,128 (+512 on CUDA), R 1,3,5, "
        "float32 (+bfloat16 on CUDA); explicit flags still override",
    )
    grid.add_argument(
        "--shapes",
        type=_csv_list(_shape_name),
        default=None,
        help=f"named shapes {','.join(SHAPES)} or IxJxNxM (default mnist)",
    )
    grid.add_argument(
        "--batches", type=_csv_list(int), default=None, help="batch sizes (default 1,8,32,128)"
    )
    grid.add_argument(
        "--iterations", type=_csv_list(int), default=None, help="routing iterations R (default 3)"
    )
    grid.add_argument(
        "--modes",
        type=_csv_list(_mode),
        default=None,
        help="forward and/or forward+backward (default both)",
    )
    grid.add_argument(
        "--backends",
        type=_csv_list(str),
        default=None,
        help="some of reference,compiled,cpp,triton (default: reference, "
        "compiled and every fused backend available on the device)",
    )
    grid.add_argument(
        "--dtypes",
        type=_csv_list(str),
        default=None,
        help=f"some of {','.join(DTYPES)} (default float32)",
    )
    grid.add_argument(
        "--variants",
        type=_variants,
        default=None,
        help="out_caps|in_caps[-prior][-detach][-shared_mean|-shared_sum], or all (the eight "
        "without shared logits; default out_caps)",
    )


def _add_measurement_arguments(parser: argparse.ArgumentParser) -> None:
    run_group = parser.add_argument_group("measurement and output")
    run_group.add_argument("--device", default=None, help="cpu or cuda (default: cuda if any)")
    run_group.add_argument(
        "--repeats", type=int, default=5, help="timed measurements per backend (default 5)"
    )
    run_group.add_argument("--warmup", type=int, default=1, help="warm-up calls (default 1)")
    run_group.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="relative error floor of the correctness check "
        "(default by dtype: float32 1e-4, bfloat16 8e-3)",
    )
    run_group.add_argument("--no-memory", action="store_true", help="skip peak memory")
    run_group.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    run_group.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help=f"where the CSV, JSON and PNG go (default ./{DEFAULT_OUT_DIR})",
    )
    run_group.add_argument(
        "--name", default=None, help="file stem (default: the device, e.g. cpu or nvidia-h100)"
    )
    run_group.add_argument("--seed", type=int, default=0, help="input seed (default 0)")


def _add_end_to_end_arguments(parser: argparse.ArgumentParser) -> None:
    e2e = parser.add_argument_group("end-to-end")
    e2e.add_argument(
        "--end-to-end",
        action="store_true",
        help="benchmark a CapsNet training step and inference instead of routing, in float32 "
        "and in what `capsnet-fused train` uses here by default (marked *)",
    )
    e2e.add_argument(
        "--e2e-batch",
        type=int,
        default=E2E_BATCH,
        help=f"end-to-end batch size (default {E2E_BATCH})",
    )
    e2e.add_argument(
        "--amp",
        action="store_true",
        help="also time the model under autocast (bfloat16 on CPU, float16 with GradScaler on "
        "CUDA: what train --amp does), next to float32",
    )
    e2e.add_argument(
        "--channels-last",
        action="store_true",
        help="also time channels-last convolutions (train --channels-last), next to the "
        "default layout",
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The BenchConfig that the parsed flags describe."""
    if args.repeats < 1 or args.warmup < 0 or args.e2e_batch < 1:
        raise ValueError("--repeats and --e2e-batch must be >= 1 and --warmup >= 0")
    return BenchConfig(
        shapes=tuple(args.shapes or ()),
        batches=tuple(args.batches or ()),
        iterations=tuple(args.iterations or ()),
        modes=tuple(args.modes or MODES),
        backends=tuple(args.backends or ()),
        dtypes=tuple(args.dtypes or ()),
        variants=tuple(args.variants or ()),
        full=args.full,
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        memory=not args.no_memory,
        seed=args.seed,
        rtol=args.rtol,
        e2e_batch=args.e2e_batch,
        e2e_amp=(False, True) if args.amp else (False,),
        e2e_channels_last=(False, True) if args.channels_last else (False,),
        e2e_train_default=True,
    )


def _cpu_line(env: dict) -> str:
    """The CPU's part of the header line: its ISA, L2 per core, the cpp clone and u_hat cache
    setting ("" off the CPU)."""
    if not env.get("cpu_isa"):
        return ""
    parts = [env["cpu_isa"]]
    if env.get("cpu_l2_bytes_per_core"):
        parts.append(f"L2 {env['cpu_l2_bytes_per_core'] // 1024} KiB per core")
    if env.get("cpp_clone"):
        parts.append(f"cpp clone {env['cpp_clone']}, u_hat cache {env['cpp_u_hat_cache']}")
    return "; " + ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe, print the table and write the result files.

    Returns 0 when every benchmarked backend passed its check, 1 when some row failed, 2
    (with the reason on stderr) when the flags describe no valid benchmark.
    """
    try:
        config = config_from_args(args)
        device = _device(config)
        build_cases(config)
        benchmark_backends(config, device, torch.float32)
    except ValueError as exc:
        print(f"capsnet-fused bench: error: {exc}", file=sys.stderr)
        return 2
    env = environment_info(device)
    out_dir = args.out_dir if args.out_dir is not None else DEFAULT_OUT_DIR
    stem = args.name or device_slug(device)
    print(
        f"# {env['device_name']} ({env['cpu_cores']} cores, {env['torch_threads']} threads"
        f"{_cpu_line(env)}), "
        f"torch {env['torch']}, triton {env['triton']}, capsnet_fused {env['capsnet_fused']}, "
        f"git {(env['git_revision'] or 'unknown')[:12]}, "
        f"load average {(env['load_average'] or ['?'])[0]}",
        flush=True,
    )
    echo = lambda text: print(text, flush=True)  # noqa: E731
    started = time.perf_counter()
    if args.end_to_end:
        rows = run_end_to_end(config, echo=echo)
        stem = f"{stem}-end-to-end"
        print(format_e2e_table(rows))
    else:
        rows = run_routing_benchmark(config, echo=echo)
    env["duration_s"] = round(time.perf_counter() - started, 1)
    paths = write_results(rows, env, out_dir, stem, config)
    if not args.end_to_end and not args.no_plot:
        try:
            plot = plot_results(
                rows, out_dir / f"{stem}.png", title=f"{env['device_name']}, torch {env['torch']}"
            )
        except ImportError:
            # The results are written; only the picture is missing (matplotlib is optional).
            plot = None
            print(f"no plot: it needs matplotlib ({PLOTS_HINT})", file=sys.stderr)
        if plot is not None:
            paths["png"] = plot
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        print(f"{len(failed)} row(s) FAILED their correctness check or run", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """python -m capsnet_fused.benchmark [flags]"""
    parser = argparse.ArgumentParser(
        prog="python -m capsnet_fused.benchmark",
        description="Benchmark dynamic routing backends against the reference and "
        "torch.compile(reference); or a CapsNet end to end (--end-to-end).",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
