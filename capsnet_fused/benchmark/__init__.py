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

Where things are:
  cases.py        the grid: SHAPES, ALL_VARIANTS, Variant, Case, BenchConfig, build_cases;
                  one case's inputs and benchmarked call
  check.py        the correctness gate: errors against float64, tolerances
  measure.py      timing and peak memory (CPU: the memory worker subprocess)
  routing.py      the routing benchmark: run_case, run_routing_benchmark
  end_to_end.py   the end-to-end benchmark: run_end_to_end
  environment.py  machine, versions and git revision of a run
  report.py       text tables, CSV and JSON files, the PNG plot
  cli.py          the flags and run (`capsnet-fused bench`), main
"""

from capsnet_fused.benchmark.cases import (
    ALL_VARIANTS,
    BASELINES,
    DEFAULT_BATCHES,
    DTYPES,
    E2E_BATCH,
    FULL_ITERATIONS,
    MODES,
    SHAPES,
    BenchConfig,
    Case,
    Variant,
    benchmark_backends,
    build_cases,
    make_case_inputs,
    make_runner,
    parse_shape,
    parse_variant,
    routing_function,
)
from capsnet_fused.benchmark.check import (
    ERROR_FLOORS,
    TENSOR_NAMES,
    case_reference,
    check_errors,
    compare,
    tolerances_for,
)
from capsnet_fused.benchmark.cli import (
    DEFAULT_OUT_DIR,
    PLOTS_HINT,
    add_arguments,
    config_from_args,
    main,
    run,
)
from capsnet_fused.benchmark.end_to_end import (
    E2ESetting,
    autocast_dtype,
    e2e_settings,
    run_end_to_end,
)
from capsnet_fused.benchmark.environment import device_name, device_slug, environment_info
from capsnet_fused.benchmark.measure import (
    cpu_peak_memory,
    cuda_peak_memory,
    memory_worker,
    time_call,
)
from capsnet_fused.benchmark.report import (
    format_e2e_table,
    format_table,
    plot_results,
    write_results,
)
from capsnet_fused.benchmark.routing import run_case, run_routing_benchmark

__all__ = [
    "ALL_VARIANTS",
    "BASELINES",
    "DEFAULT_BATCHES",
    "DEFAULT_OUT_DIR",
    "DTYPES",
    "E2E_BATCH",
    "ERROR_FLOORS",
    "FULL_ITERATIONS",
    "MODES",
    "PLOTS_HINT",
    "SHAPES",
    "TENSOR_NAMES",
    "BenchConfig",
    "Case",
    "E2ESetting",
    "Variant",
    "add_arguments",
    "autocast_dtype",
    "benchmark_backends",
    "build_cases",
    "case_reference",
    "check_errors",
    "compare",
    "config_from_args",
    "cpu_peak_memory",
    "cuda_peak_memory",
    "device_name",
    "device_slug",
    "e2e_settings",
    "environment_info",
    "format_e2e_table",
    "format_table",
    "main",
    "make_case_inputs",
    "make_runner",
    "memory_worker",
    "parse_shape",
    "parse_variant",
    "plot_results",
    "routing_function",
    "run",
    "run_case",
    "run_end_to_end",
    "run_routing_benchmark",
    "time_call",
    "tolerances_for",
    "write_results",
]
