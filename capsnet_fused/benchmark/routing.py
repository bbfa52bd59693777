"""The routing benchmark: every case of the grid, each backend checked against the float64
reference (check.py), then timed and measured (measure.py); one result row per backend and
case, with speed-ups and memory savings against the reference and the compiled reference.
"""

from __future__ import annotations

import gc
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import torch

from capsnet_fused.benchmark.cases import (
    BASELINES,
    DTYPES,
    BenchConfig,
    Case,
    _device,
    benchmark_backends,
    build_cases,
    make_runner,
    routing_function,
    skip_reason,
)
from capsnet_fused.benchmark.check import _failure, case_reference, compare, passes_check
from capsnet_fused.benchmark.measure import (
    cpu_peak_memory,
    cuda_peak_memory,
    time_calls_interleaved,
)
from capsnet_fused.benchmark.report import format_table


def _row(case: Case, backend: str, device: torch.device) -> dict[str, Any]:
    return {
        "shape": case.shape,
        "B": case.B,
        "I": case.I,
        "J": case.J,
        "N": case.N,
        "M": case.M,
        "R": case.R,
        "dtype": case.dtype,
        "variant": case.variant.id,
        "softmax_over": case.variant.softmax_over,
        "prior": case.variant.prior,
        "detach_inner": case.variant.detach_inner,
        "shared_logits": case.variant.shared_logits or "",
        "mode": case.mode,
        "backend": backend,
        "device": device.type,
        "status": "ok",
        "error": "",
        "rel_errors": {},
        "tolerances": {},
        "median_ms": None,
        "iqr_ms": None,
        "min_ms": None,
        "max_ms": None,
        "runs": 0,
        "peak_bytes": None,
        "memory_method": "",
        "speedup_vs_reference": None,
        "speedup_vs_compiled": None,
        "mem_saving_vs_reference": None,
        "mem_saving_vs_compiled": None,
    }


def run_case(
    case: Case, backends: Sequence[str], config: BenchConfig, device: torch.device
) -> list[dict[str, Any]]:
    """Check, time and measure every backend on one case; one result row per backend.

    Every backend is checked first; those that pass are then timed together, their CPU
    measurements in alternation (time_calls_interleaved), so that the ratios between them are
    measured side by side.
    """
    dtype = DTYPES[case.dtype]
    inputs, reference64, drift, tolerances = case_reference(case, device, config.rtol)
    rows = []
    runners: dict[str, Callable[[], tuple]] = {}
    for backend in backends:
        row = _row(case, backend, device)
        rows.append(row)
        reason = skip_reason(backend, device, dtype)
        if reason is not None:
            row.update(status="skipped", error=reason)
            continue
        try:
            runner = make_runner(case, routing_function(backend), inputs)
            # The eager reference was just checked (drift); for the others the first call
            # also compiles "compiled" and warms the backend up.
            errors = drift if backend == "reference" else compare(runner(), reference64)
        except Exception as exc:  # noqa: BLE001 - any failure of a backend is reported as such
            row.update(status="failed", error=_failure(exc))
            continue
        if passes_check(row, errors, tolerances):
            runners[backend] = runner
    by_backend = {row["backend"]: row for row in rows}
    timings = time_calls_interleaved(
        runners, device, config.repeats, config.warmup, config.min_measure_s
    )
    for backend, runner in runners.items():
        row, timing = by_backend[backend], timings[backend]
        if isinstance(timing, Exception):
            row.update(status="failed", error=_failure(timing), median_ms=None, peak_bytes=None)
            continue
        row.update(timing)
        if config.memory and device.type == "cuda":
            try:
                row["peak_bytes"] = cuda_peak_memory(runner, device)
                row["memory_method"] = "cuda max_memory_allocated above the inputs"
            except Exception as exc:  # noqa: BLE001
                row.update(status="failed", error=_failure(exc), median_ms=None, peak_bytes=None)
    del runners
    gc.collect()
    if config.memory and device.type == "cpu":
        _add_cpu_memory(case, rows)
    _add_ratios(rows)
    return rows


def _add_cpu_memory(case: Case, rows: list[dict[str, Any]]) -> None:
    """Fill peak_bytes of the rows that passed, from a fresh subprocess (cpu_peak_memory)."""
    passed = {row["backend"]: row for row in rows if row["status"] == "ok"}
    if not passed:
        return
    try:
        peaks, method = cpu_peak_memory(case, list(passed))
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
        peaks, method = dict.fromkeys(passed, _failure(exc)), ""
    for backend, row in passed.items():
        peak = peaks.get(backend, "not measured")
        if isinstance(peak, int):
            row["peak_bytes"], row["memory_method"] = peak, method
        else:
            row["memory_method"] = f"memory measurement failed: {peak}"


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up (baseline time / time) and memory saving (baseline bytes / bytes), > 1 = better."""
    by_backend = {row["backend"]: row for row in rows if row["status"] == "ok"}
    for row in rows:
        if row["status"] != "ok":
            continue
        for base_name in BASELINES:
            base = by_backend.get(base_name)
            if base is None:
                continue
            row[f"speedup_vs_{base_name}"] = base["median_ms"] / row["median_ms"]
            if row["peak_bytes"] and base["peak_bytes"] is not None:
                row[f"mem_saving_vs_{base_name}"] = base["peak_bytes"] / row["peak_bytes"]


def run_routing_benchmark(
    config: BenchConfig, echo: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Run every case of the config's grid; echo (e.g. print) receives the table as it grows."""
    device = _device(config)
    cases = build_cases(config)
    rows: list[dict[str, Any]] = []
    # Every case is known up front, so the streamed table can keep its columns aligned.
    widths = {
        "shape": max(len(c.shape) for c in cases),
        "variant": max(len(c.variant.id) for c in cases),
    }
    if echo is not None:
        echo(format_table([], header_only=True, widths=widths))
    for case in cases:
        backends = benchmark_backends(config, device, DTYPES[case.dtype])
        case_rows = run_case(case, backends, config, device)
        rows.extend(case_rows)
        if echo is not None:
            echo(format_table(case_rows, header=False, widths=widths))
    return rows
