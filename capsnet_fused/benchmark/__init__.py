"""Routing and end-to-end benchmarks: every backend against the reference and torch.compile.

Routing benchmark: for every case (shape, batch B, iterations R, dtype, variant, mode) the
backends "reference" (eager einsum), "compiled" (torch.compile of the reference, compiled once
per case and warmed up) and every fused backend that capsnet_fused.available_backends() lists
for the device (except "triton" on CPU: the interpreter is not a speed path) are

1. checked against the float64 reference: output v [B, J, M] and, in forward+backward mode,
   the gradients to u [B, I, N], weight [I, J, N, M] and prior [I, J]. The relative error
   ||x - x64|| / ||x64|| must stay below max(floor(dtype), 2 * the error of the eager
   reference run in the same dtype). A backend that fails is reported as "failed" with its
   error, and no time or memory is reported for it;
2. timed after a warm-up: median, interquartile range, min and max of `repeats` measurements
   (CPU: perf_counter over enough calls to last min_measure_s, in the process's thread
   setting; CUDA: triton.testing.do_bench, which flushes the L2 cache before each run, or CUDA
   events when triton is absent);
3. measured for peak memory: CUDA max_memory_allocated above the inputs' allocation; CPU the
   rise of the peak resident set size of a fresh subprocess over a baseline taken after
   imports, input allocation and one warm-up call (the peak is reset through
   /proc/self/clear_refs where Linux allows, else the baseline is taken before the first call).

Speed-ups and memory savings against the reference and the compiled reference come from the
same run. Results go to a terminal table and to <out_dir>/<device>.csv, .json and .png
(out_dir: ./bench-results unless --out-dir is given; the PNG only with matplotlib).

End-to-end benchmark (--end-to-end): a CapsNet training step (forward, margin + reconstruction
loss, backward, Adam step) and an inference forward at batch 128, images per second, with the
reference router and every fused backend; results go to <out_dir>/<device>-end-to-end.*.

Run: python -m capsnet_fused.benchmark [--full] [--end-to-end] [...]; --help lists the flags.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import dataclasses
import datetime
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import capsnet_fused
from capsnet_fused import available_backends, dynamic_routing, reference_routing
from capsnet_fused._checks import resolve_device
from capsnet_fused.ops import BACKENDS, unavailable_reason
from capsnet_fused.testing import random_routing_inputs, rel_error

# I, J, N, M of each named routing problem.
# mnist: the paper's DigitCaps (32 primary capsule types on a 6x6 grid from 28x28 images).
# cifar10: the same network on 32x32 images (32 types on an 8x8 grid), 10 classes.
# smallnorb: 5 classes on 28x28 crops of the downsampled images, so I stays at the MNIST 1152;
# with 32x32 crops I would be 2048, the cifar10 shape with J = 5.
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "mnist": (1152, 10, 8, 16),
    "cifar10": (2048, 10, 8, 16),
    "smallnorb": (1152, 5, 8, 16),
}
MODES = ("forward", "forward+backward")
_MODE_ALIASES = {"fwd": "forward", "fwd+bwd": "forward+backward", "fwdbwd": "forward+backward"}
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
# Benchmarked backends besides the fused ones: eager reference and torch.compile(reference).
BASELINES = ("reference", "compiled")
# Relative error floors; the tolerance is max(floor, 2 x the eager reference's own error in
# that dtype), the factor 2 following flash-attention's rule for low-precision kernels.
ERROR_FLOORS = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}
TENSOR_NAMES = ("v", "du", "dweight", "dprior")
DEFAULT_BATCHES = (1, 8, 32, 128)
FULL_ITERATIONS = (1, 3, 5)
E2E_BATCH = 128
_REPO_ROOT = Path(__file__).resolve().parents[2]
# Fixing glibc's mmap threshold keeps large buffers mmapped, so a freed tensor leaves the
# resident set and the measured call's tensors show up in the peak (the default dynamic
# threshold would recycle the warm-up call's heap memory invisibly).
_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


@dataclass(frozen=True)
class Variant:
    """A routing variant: softmax_over, a prior [I, J] or not, detach_inner, and the logits
    per sample (shared_logits None) or shared by the batch ("mean" or "sum")."""

    softmax_over: str = "out_caps"
    prior: bool = False
    detach_inner: bool = False
    shared_logits: str | None = None

    @property
    def id(self) -> str:
        return (
            f"{self.softmax_over}{'-prior' if self.prior else ''}"
            + ("-detach" if self.detach_inner else "")
            + (f"-shared_{self.shared_logits}" if self.shared_logits else "")
        )


# "all": the eight variants with logits per sample (add -shared_mean or -shared_sum to a
# variant for the logits shared by the batch).
ALL_VARIANTS = tuple(
    Variant(s, p, d) for s in ("out_caps", "in_caps") for p in (False, True) for d in (False, True)
)
_SHARED_FLAGS = {"shared_mean": "mean", "shared_sum": "sum"}


@dataclass(frozen=True)
class Case:
    """One routing problem: u [B, I, N], weight [I, J, N, M], R iterations, in one mode."""

    shape: str
    B: int
    I: int  # noqa: E741
    J: int
    N: int
    M: int
    R: int
    dtype: str
    variant: Variant
    mode: str
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.shape} B={self.B} R={self.R} {self.dtype} {self.variant.id} {self.mode}"


@dataclass
class BenchConfig:
    """What to run. Empty tuples mean: the defaults (or the --full grid when full=True)."""

    shapes: Sequence[str] = ()
    batches: Sequence[int] = ()
    iterations: Sequence[int] = ()
    modes: Sequence[str] = MODES
    backends: Sequence[str] = ()
    dtypes: Sequence[str] = ()
    variants: Sequence[Variant] = ()
    full: bool = False
    device: str | None = None
    repeats: int = 5
    warmup: int = 1
    # A CPU measurement repeats the call until it lasts this long (timer overhead, clock ticks).
    min_measure_s: float = 0.02
    memory: bool = True
    seed: int = 0
    rtol: float | None = None
    # Only the end-to-end benchmark reads these.
    e2e_batch: int = E2E_BATCH
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # Autocast (--amp) and channels-last settings to time; every combination is run.
    e2e_amp: Sequence[bool] = (False,)
    e2e_channels_last: Sequence[bool] = (False,)


# ---------------------------------------------------------------------------------------------
# Grid


def parse_shape(name: str) -> tuple[str, tuple[int, int, int, int]]:
    """A shape name from SHAPES, or "IxJxNxM" (e.g. "64x4x4x8"), -> (name, (I, J, N, M))."""
    if name in SHAPES:
        return name, SHAPES[name]
    parts = name.lower().split("x")
    if len(parts) == 4 and all(p.isdigit() and int(p) >= 1 for p in parts):
        return name.lower(), tuple(int(p) for p in parts)  # type: ignore[return-value]
    raise ValueError(f"unknown shape {name!r}: expected one of {sorted(SHAPES)} or IxJxNxM")


def parse_variant(text: str) -> Variant:
    """Parse a variant id: out_caps or in_caps, optionally followed by -prior, -detach and one
    of -shared_mean / -shared_sum (routing logits shared by the batch)."""
    parts = text.split("-")
    softmax_over, flags = parts[0], set(parts[1:])
    shared = flags & set(_SHARED_FLAGS)
    valid = softmax_over in ("out_caps", "in_caps") and len(shared) <= 1
    if not valid or not flags <= {"prior", "detach", *_SHARED_FLAGS}:
        raise ValueError(
            f"unknown variant {text!r}: expected out_caps or in_caps, optionally followed by "
            f"-prior, -detach and one of -shared_mean, -shared_sum (e.g. "
            f"in_caps-prior-detach, out_caps-shared_mean), or 'all'"
        )
    mode = _SHARED_FLAGS[shared.pop()] if shared else None
    return Variant(softmax_over, "prior" in flags, "detach" in flags, mode)


def _device(config: BenchConfig) -> torch.device:
    return resolve_device(config.device)


def build_cases(config: BenchConfig) -> list[Case]:
    """The grid's cases, ordered by shape, dtype, variant, R, mode, then batch (fastest)."""
    on_cuda = _device(config).type == "cuda"
    shapes = config.shapes or (tuple(SHAPES) if config.full else ("mnist",))
    batches = config.batches or (DEFAULT_BATCHES + ((512,) if on_cuda and config.full else ()))
    iterations = config.iterations or (FULL_ITERATIONS if config.full else (3,))
    dtypes = config.dtypes or (("float32", "bfloat16") if config.full and on_cuda else ("float32",))
    variants = config.variants or (Variant(),)
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    for mode in config.modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")
    for value, what in [(b, "batch") for b in batches] + [(r, "iterations") for r in iterations]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    cases = []
    for shape_name in shapes:
        name, dims = parse_shape(shape_name)
        grid = itertools.product(dtypes, variants, iterations, config.modes, batches)
        for dtype, variant, iters, mode, batch in grid:
            cases.append(Case(name, batch, *dims, iters, dtype, variant, mode, config.seed))
    return cases


def benchmark_backends(config: BenchConfig, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends to run: the requested ones, or the baselines and every available fused one."""
    fused = [
        name
        for name in available_backends(device, dtype)
        if name != "reference" and not (name == "triton" and device.type == "cpu")
    ]
    if not config.backends:
        return [*BASELINES, *fused]
    known = (*BASELINES, *BACKENDS)
    for name in config.backends:
        if name not in known:
            raise ValueError(f"unknown backend {name!r}: expected some of {known}")
    return list(dict.fromkeys(config.backends))


# ---------------------------------------------------------------------------------------------
# One case: inputs, callables, correctness


def make_case_inputs(case: Case, device: torch.device) -> dict[str, torch.Tensor | None]:
    """u [B, I, N], weight [I, J, N, M], prior [I, J] or None and upstream grad [B, J, M].

    Drawn in float64 on the CPU from the case's seed (identical in every process), then cast to
    the case's dtype and device.
    """
    tensors = random_routing_inputs(
        case.B, case.I, case.J, case.N, case.M, case.variant.prior, case.seed
    )
    dtype = DTYPES[case.dtype]
    u, weight, prior, grad = (
        None if t is None else t.to(device=device, dtype=dtype) for t in tensors
    )
    return {"u": u, "weight": weight, "prior": prior, "grad": grad}


def routing_function(backend: str) -> Callable[..., torch.Tensor]:
    """fn(u, weight, iterations, prior=, softmax_over=, detach_inner=) -> v for a backend.

    "compiled" is compiled afresh (torch._dynamo.reset()) so that each case gets its own
    static-shape graph and no earlier case can exhaust dynamo's recompile limit.
    """
    if backend == "reference":
        return reference_routing
    if backend == "compiled":
        torch._dynamo.reset()
        return torch.compile(reference_routing, dynamic=False)

    def fused(u, weight, iterations, **kwargs):
        return dynamic_routing(u, weight, iterations, backend=backend, **kwargs)

    return fused


def make_runner(case: Case, fn: Callable[..., torch.Tensor], inputs: dict) -> Callable[[], tuple]:
    """A no-argument call of one benchmarked step -> (v [B, J, M], [du, dweight, dprior]).

    forward: under torch.no_grad, no gradients. forward+backward: torch.autograd.grad of v with
    the fixed upstream gradient to u, weight and (when present) prior; dprior is None without
    a prior.
    """
    kwargs = {"softmax_over": case.variant.softmax_over, "detach_inner": case.variant.detach_inner}
    if case.variant.shared_logits is not None:
        kwargs["shared_logits"] = case.variant.shared_logits
    if case.mode == "forward":

        def forward() -> tuple:
            with torch.no_grad():
                v = fn(inputs["u"], inputs["weight"], case.R, prior=inputs["prior"], **kwargs)
            return v, []

        return forward
    leaves = [
        inputs["u"].detach().requires_grad_(True),
        inputs["weight"].detach().requires_grad_(True),
    ]
    prior = inputs["prior"]
    if prior is not None:
        prior = prior.detach().requires_grad_(True)
        leaves.append(prior)
    grad = inputs["grad"]

    def forward_backward() -> tuple:
        v = fn(leaves[0], leaves[1], case.R, prior=prior, **kwargs)
        grads = list(torch.autograd.grad(v, leaves, grad.to(v.dtype)))
        return v.detach(), grads + ([None] if prior is None else [])

    return forward_backward


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """rel_error, or inf when out is not finite."""
    return rel_error(out, ref) if torch.isfinite(out).all() else math.inf


def compare(outputs: tuple, reference: tuple) -> dict[str, float]:
    """Relative error of each tensor of (v, grads) against reference's; raises on a mismatch."""
    (v, grads), (v_ref, grads_ref) = outputs, reference
    errors = {}
    for name, got, want in zip(TENSOR_NAMES, [v, *grads], [v_ref, *grads_ref], strict=False):
        if want is None:
            continue
        if got is None:
            raise ValueError(f"{name}: missing")
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        errors[name] = _rel_error(got, want)
    return errors


def check_errors(errors: dict[str, float], tolerances: dict[str, float]) -> str | None:
    """None when every error is below its tolerance, else a message naming the bad tensors."""
    bad = [
        f"{name}: relative error {err:.3g} > tolerance {tolerances[name]:.3g}"
        for name, err in errors.items()
        if not err <= tolerances[name]
    ]
    return "; ".join(bad) or None


def tolerances_for(dtype: torch.dtype, drift: dict[str, float], rtol: float | None) -> dict:
    """Per-tensor tolerance: max(floor, 2 x drift), the floor being rtol or ERROR_FLOORS[dtype]."""
    floor = rtol if rtol is not None else ERROR_FLOORS.get(dtype, 1e-2)
    return {name: max(floor, 2.0 * err) for name, err in drift.items()}


# ---------------------------------------------------------------------------------------------
# Timing and memory


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
    estimate = math.inf
    for _ in range(max(1, warmup)):
        start = time.perf_counter()
        fn()
        _sync(device)
        estimate = min(estimate, time.perf_counter() - start)
    if device.type == "cuda":
        return _summary([t / 1e3 for t in _cuda_times_ms(fn, repeats, estimate * 1e3)])
    number = max(1, math.ceil(min_measure_s / max(estimate, 1e-9)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return _summary(times)


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
    """Collect garbage and hand freed heap memory back to the OS (glibc), before a baseline."""
    gc.collect()
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
    code = "import sys; from capsnet_fused.benchmark import memory_worker as w; w(sys.argv[1])"
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


# ---------------------------------------------------------------------------------------------
# The routing benchmark


def _failure(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


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


def case_reference(case: Case, device: torch.device, rtol: float | None = None) -> tuple:
    """(inputs, float64 reference (v, grads), drift, tolerances) of a case.

    drift: relative errors of the eager reference run in the case's dtype, which set the
    tolerances (tolerances_for); both are dicts keyed by TENSOR_NAMES.
    """
    inputs = make_case_inputs(case, device)
    inputs64 = {k: None if t is None else t.double() for k, t in inputs.items()}
    reference64 = make_runner(case, reference_routing, inputs64)()
    del inputs64
    drift = compare(make_runner(case, reference_routing, inputs)(), reference64)
    return inputs, reference64, drift, tolerances_for(DTYPES[case.dtype], drift, rtol)


def run_case(
    case: Case, backends: Sequence[str], config: BenchConfig, device: torch.device
) -> list[dict[str, Any]]:
    """Check, time and measure every backend on one case; one result row per backend."""
    dtype = DTYPES[case.dtype]
    inputs, reference64, drift, tolerances = case_reference(case, device, config.rtol)
    rows = []
    for backend in backends:
        row = _row(case, backend, device)
        rows.append(row)
        if backend not in BASELINES:
            reason = unavailable_reason(backend, device, dtype)
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
        row["rel_errors"], row["tolerances"] = errors, tolerances
        problem = check_errors(errors, tolerances)
        if problem is not None:
            row.update(status="failed", error=f"wrong result, not timed: {problem}")
            continue
        try:
            row.update(
                time_call(runner, device, config.repeats, config.warmup, config.min_measure_s)
            )
            if config.memory and device.type == "cuda":
                row["peak_bytes"] = cuda_peak_memory(runner, device)
                row["memory_method"] = "cuda max_memory_allocated above the inputs"
        except Exception as exc:  # noqa: BLE001
            row.update(status="failed", error=_failure(exc), median_ms=None, peak_bytes=None)
        del runner
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


# ---------------------------------------------------------------------------------------------
# The end-to-end benchmark


def _e2e_inputs(model: torch.nn.Module, batch: int, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, *model.image_shape, generator=gen).to(device)
    labels = torch.randint(0, model.num_classes, (batch,), generator=gen).to(device)
    return images, labels


def _cpu_kernel_fields(device: torch.device) -> dict[str, Any]:
    """Which clone of the C++ CPU kernels runs and the L2 they read: the CPU's name alone does
    not say (a virtual machine reports "AMD EPYC" for Zen 1 to Zen 5). Empty off the CPU or
    without capsnet_fused._C."""
    if device.type != "cpu":
        return {}
    try:
        info = json.loads(torch.ops.capsnet_fused.cpp_kernel_info())
    except (AttributeError, RuntimeError, ValueError):  # not built, or a refused setting
        return {}
    return {
        "cpp_clone": info["clone"],
        "cpu_l2_bytes_per_core": info["l2_bytes_per_core"],
        # CAPSNET_FUSED_UHAT_CACHE as set (auto, on, off) and what auto decides at B = 128, MNIST.
        "cpp_u_hat_cache": info["u_hat_cache"],
        "cpp_u_hat_path_mnist": info["u_hat_cache_mnist"]["path"],
    }


def autocast_dtype(device: torch.device) -> torch.dtype:
    """The --amp dtype, as training uses it: bfloat16 on CPU, float16 (with GradScaler) on CUDA."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


@dataclass(frozen=True)
class E2ESetting:
    """How the end-to-end model runs: autocast (--amp) or float32, channels-last convolutions
    or the default layout."""

    amp: bool = False
    channels_last: bool = False

    def label(self, device: torch.device) -> str:
        precision = str(autocast_dtype(device)).removeprefix("torch.") if self.amp else "float32"
        return f"{precision} {'channels_last' if self.channels_last else 'contiguous'}"


def e2e_settings(config: BenchConfig) -> list[E2ESetting]:
    """Every combination of the config's autocast and layout choices, plain first."""
    return [E2ESetting(a, c) for a in config.e2e_amp for c in config.e2e_channels_last]


def run_end_to_end(
    config: BenchConfig, echo: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """CapsNet training step and inference throughput, reference router vs each fused backend,
    in every setting (autocast or not, channels-last or not) the config asks for.

    echo (e.g. print) receives a progress line per row; format_e2e_table prints the rows.

    Each backend gets a model with identical initial weights. Before timing, its forward
    output (capsule lengths [B, J]) and gradients (digit weight [I, J, N, M], conv1 weight) on
    one batch are checked against the float32 reference model's in the default layout; a
    mismatch marks the row failed. The tolerance is the relative error floor (--rtol, default
    1e-3), and under autocast at least twice the reference router's own error in that setting.
    Training step: forward, margin + reconstruction loss, backward, Adam step.
    """
    from capsnet_fused.losses import CapsNetLoss
    from capsnet_fused.models import CapsNet

    device = _device(config)
    wanted = [b for b in benchmark_backends(config, device, torch.float32) if b != "compiled"]
    criterion = CapsNetLoss()  # the training loss, as `capsnet-fused train` computes it
    names = ("lengths", "d_digit_weight", "d_conv1_weight")

    def build(backend: str, setting: E2ESetting) -> torch.nn.Module:
        torch.manual_seed(config.seed)
        model = CapsNet(backend=backend, channels_last=setting.channels_last, **config.model_kwargs)
        return model.to(device)

    def autocast(setting: E2ESetting):
        return torch.autocast(device.type, dtype=autocast_dtype(device), enabled=setting.amp)

    def loss_of(model, images, labels, setting):
        with autocast(setting):
            out = model(images, labels)
            loss, _margin, _recon = criterion(out, images, labels)
        return loss, out

    def check_pass(model, images, labels, setting):
        model.zero_grad(set_to_none=True)
        loss, out = loss_of(model, images, labels, setting)
        loss.backward()
        grads = [model.digit.weight.grad, model.conv1[0].weight.grad]
        return [out.lengths.detach().float()] + [g.detach().float().clone() for g in grads]

    def errors_of(got):
        return {n: _rel_error(g, w) for n, g, w in zip(names, got, expected, strict=True)}

    cpu_kernel_fields = _cpu_kernel_fields(device)
    plain = E2ESetting()
    images, labels = _e2e_inputs(build("reference", plain), config.e2e_batch, device, config.seed)
    expected = check_pass(build("reference", plain), images, labels, plain)
    floor = config.rtol if config.rtol is not None else 1e-3
    rows = []
    timed: dict[tuple[E2ESetting, str], tuple[dict[str, Any], Callable, Callable]] = {}
    for setting in e2e_settings(config):
        reference_model = build("reference", setting)
        tolerances = dict.fromkeys(names, floor)
        if setting.amp:
            drift = errors_of(check_pass(reference_model, images, labels, setting))
            tolerances = {n: max(floor, 2 * drift[n]) for n in names}
        for backend in wanted:
            row: dict[str, Any] = {
                "backend": backend,
                "device": device.type,
                "batch": config.e2e_batch,
                "amp": setting.amp,
                "autocast_dtype": str(autocast_dtype(device)) if setting.amp else None,
                "channels_last": setting.channels_last,
                "setting": setting.label(device),
                **cpu_kernel_fields,
                "status": "ok",
                "error": "",
                "rel_errors": {},
                "tolerances": {},
                "train_median_ms": None,
                "train_iqr_ms": None,
                "train_images_per_s": None,
                "infer_median_ms": None,
                "infer_iqr_ms": None,
                "infer_images_per_s": None,
                "train_speedup_vs_reference": None,
                "infer_speedup_vs_reference": None,
                "train_speedup_vs_plain": None,
                "infer_speedup_vs_plain": None,
            }
            rows.append(row)
            if backend not in BASELINES and unavailable_reason(backend, device) is not None:
                row.update(status="skipped", error=unavailable_reason(backend, device))
                continue
            try:
                model = reference_model if backend == "reference" else build(backend, setting)
                errors = errors_of(check_pass(model, images, labels, setting))
                row["rel_errors"], row["tolerances"] = errors, tolerances
                problem = check_errors(errors, tolerances)
                if problem is not None:
                    row.update(status="failed", error=f"wrong result, not timed: {problem}")
                    continue
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
                scaler = torch.amp.GradScaler(
                    device.type, enabled=setting.amp and device.type == "cuda"
                )

                def train_step(model=model, optimizer=optimizer, scaler=scaler, setting=setting):
                    model.train()
                    optimizer.zero_grad(set_to_none=True)
                    loss, _ = loss_of(model, images, labels, setting)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    return loss

                def infer(model=model, setting=setting):
                    model.eval()
                    with torch.no_grad(), autocast(setting):
                        return model(images)

                train_step()
                infer()
            except Exception as exc:  # noqa: BLE001
                row.update(status="failed", error=_failure(exc))
                continue
            timed[setting, backend] = (row, train_step, infer)

    # Every (setting, backend) takes its turn within every round, so that a drift of the
    # machine's speed (other load, frequency) hits all of them alike; a step lasts seconds on
    # CPU, so one call per measurement is enough.
    samples = {key: ([], []) for key in timed}
    for round_ in range(max(1, config.warmup) + config.repeats):
        for key, (_, train_step, infer) in timed.items():
            for fn, times in zip((train_step, infer), samples[key], strict=True):
                start = time.perf_counter()
                fn()
                _sync(device)
                if round_ >= max(1, config.warmup):
                    times.append(time.perf_counter() - start)
    for key, (row, _, _) in timed.items():
        train, infer_stats = (_summary(times) for times in samples[key])
        row.update(
            train_median_ms=train["median_ms"],
            train_iqr_ms=train["iqr_ms"],
            train_images_per_s=config.e2e_batch / (train["median_ms"] / 1e3),
            infer_median_ms=infer_stats["median_ms"],
            infer_iqr_ms=infer_stats["iqr_ms"],
            infer_images_per_s=config.e2e_batch / (infer_stats["median_ms"] / 1e3),
        )
        if echo is not None:
            echo(
                f"end-to-end {row['backend']} ({row['setting']}): train step "
                f"{row['train_median_ms']:.1f} ms, inference {row['infer_median_ms']:.1f} ms "
                f"at batch {config.e2e_batch}"
            )
    ok = {(r["backend"], r["amp"], r["channels_last"]): r for r in rows if r["status"] == "ok"}
    for (backend, amp, channels_last), row in ok.items():
        # Speed-ups over the reference router in the same setting, and over the same backend
        # in float32 with the default layout.
        bases = {
            "reference": ok.get(("reference", amp, channels_last)),
            "plain": ok.get((backend, False, False)),
        }
        for base_name, base in bases.items():
            for mode in ("train", "infer"):
                if base is not None:
                    row[f"{mode}_speedup_vs_{base_name}"] = (
                        base[f"{mode}_median_ms"] / row[f"{mode}_median_ms"]
                    )
    return rows


# ---------------------------------------------------------------------------------------------
# Environment, tables, files, plot


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The /proc/cpuinfo flags that decide which kernel clone runs and what --amp gains.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16")


def _cpu_isa() -> str:
    """CPU family, model and the vector instruction sets that matter here, e.g.
    "family 25 model 1: avx2 fma": the model name alone does not tell (a virtual machine
    reports "AMD EPYC" for Zen 1 to Zen 5). Empty where /proc/cpuinfo is missing."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return ""
    flags = set(fields.get("flags", "").split())
    isa = " ".join(f for f in _ISA_FLAGS if f in flags) or "no avx2"
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}: {isa}"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(_REPO_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def device_name(device: torch.device) -> str:
    """The accelerator's or the CPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def device_slug(device: torch.device) -> str:
    """File stem for a device: "cpu", or e.g. "nvidia-h100" from "NVIDIA H100 80GB HBM3"."""
    if device.type != "cuda":
        return device.type
    words = device_name(device).split()[:2]
    return re.sub(r"[^a-z0-9]+", "-", " ".join(words).lower()).strip("-") or "cuda"


def environment_info(device: torch.device) -> dict[str, Any]:
    """Machine, versions, git revision and date of a run."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_model": _cpu_model(),
        "cpu_isa": _cpu_isa(),
        **_cpu_kernel_fields(device),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other processes on the machine inflate CPU timings; the load says how busy it was.
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "capsnet_fused": capsnet_fused.__version__,
        "cuda": torch.version.cuda,
        "cuda_capability": (
            ".".join(map(str, torch.cuda.get_device_capability(device)))
            if device.type == "cuda"
            else None
        ),
        "git_revision": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "available_backends": available_backends(device),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


# (header, row key, width, format) of the routing table.
_COLUMNS = [
    ("shape", "shape", 9, "{}"),
    ("B", "B", 4, "{}"),
    ("R", "R", 2, "{}"),
    ("dtype", "dtype", 8, "{}"),
    ("variant", "variant", 9, "{}"),
    ("mode", "mode", 16, "{}"),
    ("backend", "backend", 9, "{}"),
    ("median ms", "median_ms", 10, "{:.3f}"),
    ("IQR ms", "iqr_ms", 8, "{:.3f}"),
    ("peak MiB", "peak_bytes", 9, "{:.1f}"),
    ("x ref", "speedup_vs_reference", 6, "{:.2f}"),
    ("x comp", "speedup_vs_compiled", 6, "{:.2f}"),
    ("mem x ref", "mem_saving_vs_reference", 9, "{:.2f}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "peak_bytes":
        value = value / 2**20
    return fmt.format(value)


def format_table(
    rows: list[dict],
    header: bool = True,
    header_only: bool = False,
    widths: dict[str, int] | None = None,
) -> str:
    """Fixed-width text table of routing rows; failed and skipped rows show their reason.

    widths: column widths by row key, for columns wider than the defaults (long variant ids).
    """
    columns = [(h, k, max(w, (widths or {}).get(k, 0)), f) for h, k, w, f in _COLUMNS]
    lines = []
    if header or header_only:
        lines.append(" ".join(f"{h:>{w}}" for h, _, w, _ in columns) + "  status")
        if header_only:
            return lines[0]
    for row in rows:
        cells = " ".join(f"{_cell(row, k, f):>{w}}" for _, k, w, f in columns)
        status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row['error']}"
        lines.append(f"{cells}  {status}")
    return "\n".join(lines)


def format_e2e_table(rows: list[dict]) -> str:
    """Text table of end-to-end rows; failed and skipped rows show their reason."""
    lines = [
        f"{'backend':>9} {'setting':>24} {'batch':>5} {'train ms':>9} {'train img/s':>11} "
        f"{'x ref':>6} {'x plain':>7} {'infer ms':>9} {'infer img/s':>11} {'x ref':>6} "
        f"{'x plain':>7}  status"
    ]
    for row in rows:

        def cell(key: str, fmt: str, row=row) -> str:
            return "-" if row.get(key) is None else fmt.format(row[key])

        status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row['error']}"
        lines.append(
            f"{row['backend']:>9} {row.get('setting', 'float32 contiguous'):>24} "
            f"{row['batch']:>5} {cell('train_median_ms', '{:.1f}'):>9} "
            f"{cell('train_images_per_s', '{:.1f}'):>11} "
            f"{cell('train_speedup_vs_reference', '{:.2f}'):>6} "
            f"{cell('train_speedup_vs_plain', '{:.2f}'):>7} "
            f"{cell('infer_median_ms', '{:.1f}'):>9} {cell('infer_images_per_s', '{:.1f}'):>11} "
            f"{cell('infer_speedup_vs_reference', '{:.2f}'):>6} "
            f"{cell('infer_speedup_vs_plain', '{:.2f}'):>7}  {status}"
        )
    return "\n".join(lines)


# Environment fields repeated on every CSV row, so that a CSV file stands on its own.
_CSV_ENV_FIELDS = (
    "date",
    "device_name",
    "cpu_model",
    "cpu_isa",
    "cpu_l2_bytes_per_core",
    "cpp_clone",
    "cpp_u_hat_cache",
    "cpu_cores",
    "torch_threads",
    "torch",
    "triton",
    "capsnet_fused",
    "git_revision",
)


def write_results(
    rows: list[dict], env: dict, out_dir: Path | str, stem: str, config: BenchConfig | None = None
) -> dict[str, Path]:
    """Write <stem>.json ({"environment", "config", "rows"}) and <stem>.csv; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    config_dict = (
        None if config is None else json.loads(json.dumps(dataclasses.asdict(config), default=str))
    )
    json_path.write_text(
        json.dumps({"environment": env, "config": config_dict, "rows": rows}, indent=1, default=str)
        + "\n"
    )
    flat = []
    for row in rows:
        out = {k: v for k, v in row.items() if not isinstance(v, dict)}
        if "rel_errors" in row:
            errors, tols = row["rel_errors"], row.get("tolerances", {})
            worst = max(errors, key=lambda n: errors[n] / tols.get(n, 1.0), default=None)
            out["max_rel_error"] = None if worst is None else errors[worst]
            out["worst_tensor"] = worst or ""
            out["tolerance"] = tols.get(worst) if worst else None
        out.update({k: env.get(k) for k in _CSV_ENV_FIELDS})
        flat.append(out)
    fields = list(dict.fromkeys(k for out in flat for k in out))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)
    return {"json": json_path, "csv": csv_path}


def plot_results(rows: list[dict], path: Path | str, title: str = "") -> Path | None:
    """PNG: median time vs batch size per backend (and shape), log-log, one panel per mode.

    The plotted slice is one (R, dtype, variant): R = 3 when present, else the first of each;
    the others stay in the CSV. Bars span the interquartile range. None when nothing is ok.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in rows if r["status"] == "ok" and r["median_ms"] is not None]
    if not ok:
        return None
    iters = 3 if any(r["R"] == 3 for r in ok) else ok[0]["R"]
    dtype, variant = ok[0]["dtype"], ok[0]["variant"]
    ok = [r for r in ok if r["R"] == iters and r["dtype"] == dtype and r["variant"] == variant]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for b_index, backend in enumerate(backends):
            for s_index, shape in enumerate(shapes):
                pts = sorted(
                    (r["B"], r["median_ms"], r["iqr_ms"])
                    for r in ok
                    if r["mode"] == mode and r["backend"] == backend and r["shape"] == shape
                )
                if not pts:
                    continue
                xs, ys, iqrs = zip(*pts, strict=True)
                label = backend if len(shapes) == 1 else f"{backend} {shape}"
                ax.errorbar(
                    xs,
                    ys,
                    yerr=[[i / 2 for i in iqrs], [i / 2 for i in iqrs]],
                    color=f"C{b_index}",
                    linestyle=styles[s_index % len(styles)],
                    marker="o",
                    capsize=3,
                    label=label,
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        # Label the measured batch sizes themselves rather than powers of two.
        batches = sorted({r["B"] for r in ok if r["mode"] == mode})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("batch size B")
        ax.set_ylabel("median time per call (ms), bars: IQR")
        ax.set_title(f"{mode}, R={iters}, {dtype}, {variant}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Command line


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
    e2e = parser.add_argument_group("end-to-end")
    e2e.add_argument(
        "--end-to-end",
        action="store_true",
        help="benchmark a CapsNet training step and inference instead of routing",
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
