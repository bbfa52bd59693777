"""Timing and peak memory of one benchmarked call.

Timing (time_call): a warm-up, then the median, interquartile range, min and max of `repeats`
measurements (CPU: perf_counter over enough calls to last min_measure_s, in the process's
thread setting; CUDA: triton.testing.do_bench, which flushes the L2 cache before each run, or
CUDA events when triton is absent). time_calls_interleaved times the backends of one case
with their CPU measurements in alternation.

Peak memory: CUDA max_memory_allocated above the inputs' allocation (cuda_peak_memory); CPU
the rise of the peak resident set size of a fresh subprocess (memory_worker, started by
cpu_peak_memory as `python -c` importing capsnet_fused.benchmark.measure) over a baseline taken
after imports, input allocation and one warm-up call.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from capsnet_fused.benchmark.cases import (
    Case,
    Variant,
    make_case_inputs,
    make_runner,
    routing_function,
)
from capsnet_fused.benchmark.check import _failure

# The folder that holds the capsnet_fused package: the memory worker imports it from there.
_REPO_ROOT = Path(__file__).resolve().parents[2]
# Fixing glibc's mmap threshold keeps large buffers mmapped, so a freed tensor leaves the
# resident set and the measured call's tensors show up in the peak (the default dynamic
# threshold would recycle the warm-up call's heap memory invisibly).
_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _summary(times_s: list[float]) -> dict[str, float | int]:
    """median, IQR (q3 - q1), min and max in milliseconds of per-call times in seconds."""
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {
        "median_ms": statistics.median(ms),
        "iqr_ms": q3 - q1,
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "runs": len(ms),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_number(fn: Callable[[], Any], warmup: int, min_measure_s: float) -> int:
    """Warm fn up; the calls per measurement that last at least min_measure_s (at least 1)."""
    estimate = math.inf
    for _ in range(max(1, warmup)):
        start = time.perf_counter()
        fn()
        estimate = min(estimate, time.perf_counter() - start)
    return max(1, math.ceil(min_measure_s / max(estimate, 1e-9)))


def _cpu_measurement(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def time_calls_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int,
    warmup: int,
    min_measure_s: float = 0.02,
) -> dict[str, dict[str, float | int] | Exception]:
    """time_call of several functions, as a dict by name; a function that raises gets its
    exception instead and is not called again, the others are timed on.

    CPU: the measurements alternate between the functions (round r measures each once), so
    that a drift of the machine's speed - a shared 2-core VM here ran the same kernel at times
    1.5x slower from one minute to the next - reaches every function alike and the ratios
    between them stay side by side. CUDA: one function after the other (time_call).
    """
    results: dict[str, dict[str, float | int] | Exception] = {}
    if device.type == "cuda":
        for name, fn in fns.items():
            try:
                results[name] = time_call(fn, device, repeats, warmup, min_measure_s)
            except Exception as exc:  # noqa: BLE001 - reported per function
                results[name] = exc
        return results
    numbers: dict[str, int] = {}
    for name, fn in fns.items():
        try:
            numbers[name] = _cpu_number(fn, warmup, min_measure_s)
        except Exception as exc:  # noqa: BLE001
            results[name] = exc
    times: dict[str, list[float]] = {name: [] for name in numbers}
    for _ in range(repeats):
        for name in list(times):
            try:
                times[name].append(_cpu_measurement(fns[name], numbers[name]))
            except Exception as exc:  # noqa: BLE001
                results[name] = exc
                del times[name]
    results.update({name: _summary(samples) for name, samples in times.items()})
    return {name: results[name] for name in fns}


def time_call(
    fn: Callable[[], Any],
    device: torch.device,
    repeats: int,
    warmup: int,
    min_measure_s: float = 0.02,
) -> dict[str, float | int]:
    """Warm up, then time `repeats` measurements of fn; per-call median/IQR/min/max in ms.

    CPU: each measurement is a perf_counter interval over enough calls to last min_measure_s
    (at least one call), in the process's thread setting. (torch.utils.benchmark's
    Timer.timeit would add at least two untimed warm-up calls to every measurement, tripling
    the cost of the slow cases.) CUDA: triton.testing.do_bench with at least `repeats` runs,
    else CUDA events.
    """
    if device.type == "cuda":
        estimate = math.inf
        for _ in range(max(1, warmup)):
            start = time.perf_counter()
            fn()
            _sync(device)
            estimate = min(estimate, time.perf_counter() - start)
        return _summary([t / 1e3 for t in _cuda_times_ms(fn, repeats, estimate * 1e3)])
    number = _cpu_number(fn, warmup, min_measure_s)
    return _summary([_cpu_measurement(fn, number) for _ in range(repeats)])


def _cuda_times_ms(fn: Callable[[], Any], repeats: int, estimate_ms: float) -> list[float]:
    """Per-run times in ms on CUDA: do_bench (L2 flushed before each run) or CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        # do_bench runs rep / its own estimate times: ask for at least `repeats` runs and at
        # least 100 ms of them (its default), enough for sub-millisecond kernels.
        rep_ms = max(100.0, 1.2 * repeats * estimate_ms)
        return list(do_bench(fn, warmup=25, rep=rep_ms, return_mode="all"))
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def cuda_peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes that fn's call allocated at its peak above what was allocated before it."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return int(peak)


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM where Linux has it, else ru_maxrss.

    VmHWM is the mark that /proc/self/clear_refs resets; ru_maxrss also keeps the peak of
    threads that have exited (OpenMP, compile workers), which a reset does not lower.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _release_freed_memory() -> None:
    """Collect garbage, free the scratch blocks the cpp kernels keep between calls (so that the
    measured call allocates them again and its peak counts them) and hand freed heap memory
    back to the OS (glibc), before a baseline."""
    gc.collect()
    release_scratch = getattr(torch.ops.capsnet_fused, "cpp_release_scratch", None)
    if release_scratch is not None:
        release_scratch()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def memory_worker(spec_json: str) -> None:
    """Entry point of the CPU memory subprocess: prints {"peaks": {backend: bytes or error
    text}, "method": text} as JSON.

    spec: {"case": Case as dict, "backends": [names], "threads": int}. For each backend in
    turn: its inputs, one warm-up call (which compiles "compiled"), freed memory released, the
    peak mark reset to the current RSS (the baseline), then one measured call whose peak
    rise is the result. Where Linux refuses the reset, the single backend asked for is measured
    from a baseline taken before its first call, so one-time initialisation (and for
    "compiled" the compilation) is counted too; "method" says which.
    """
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    case_dict = dict(spec["case"])
    case_dict["variant"] = Variant(**case_dict["variant"])
    case = Case(**case_dict)
    device = torch.device("cpu")
    resettable = _reset_peak_rss()
    backends = spec["backends"] if resettable else spec["backends"][:1]
    peaks: dict[str, int | str] = {}
    for backend in backends:
        try:
            inputs = make_case_inputs(case, device)
            runner = make_runner(case, routing_function(backend), inputs)
            if resettable:
                runner()
                _release_freed_memory()
                _reset_peak_rss()
            base = _peak_rss_bytes()
            result = runner()
            peaks[backend] = int(_peak_rss_bytes() - base)
            del result, runner, inputs
        except Exception as exc:  # noqa: BLE001 - reported to the parent per backend
            peaks[backend] = _failure(exc)
        _release_freed_memory()
    method = (
        "peak RSS rise of one call over a warmed-up baseline (clear_refs)"
        if resettable
        else "peak RSS rise over the first call (includes one-time initialisation)"
    )
    print(json.dumps({"peaks": peaks, "method": method}))


def cpu_peak_memory(
    case: Case, backends: Sequence[str], timeout_s: float = 900.0
) -> tuple[dict[str, int | str], str]:
    """({backend: peak bytes, or error text}, method) for one case, from a fresh subprocess.

    One subprocess per case measures each backend after its own warm-up and peak reset (see
    memory_worker); where the peak cannot be reset, one fresh subprocess per backend.
    """
    peaks: dict[str, int | str] = {}
    method = ""
    pending = list(backends)
    while pending:
        result = _run_memory_worker(case, pending, timeout_s)
        method = result["method"]
        peaks.update(result["peaks"])
        pending = [b for b in pending if b not in result["peaks"]]
    return peaks, method


def _run_memory_worker(case: Case, backends: Sequence[str], timeout_s: float) -> dict:
    spec = {
        "case": dataclasses.asdict(case),
        "backends": list(backends),
        "threads": torch.get_num_threads(),
    }
    env = dict(os.environ, **_WORKER_ENV)
    # The worker imports this package from the same place as this process (works uninstalled).
    env["PYTHONPATH"] = os.pathsep.join(
        [str(_REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    code = (
        "import sys; from capsnet_fused.benchmark.measure import memory_worker as w; w(sys.argv[1])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory subprocess failed ({proc.returncode}): {tail[0]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["peaks"]:
        raise RuntimeError("memory subprocess measured nothing")
    return result
