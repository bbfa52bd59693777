"""pytest-benchmark view of the routing benchmark: pytest bench --benchmark-only

Not part of the default test run (pyproject's testpaths is ["tests"]). Every backend that the
routing benchmark would run (reference, compiled, and the fused backends available on the
device, triton on CUDA only) at the MNIST DigitCaps shape, R = 3, float32, both modes. Each
test checks the result against the float64 reference first and fails instead of timing a
wrong result. Compare runs with --benchmark-autosave / --benchmark-compare.
"""

from __future__ import annotations

import pytest
import torch

from capsnet_fused import benchmark as bm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = bm.benchmark_backends(bm.BenchConfig(device=DEVICE.type), DEVICE, torch.float32)
CASES = [
    bm.Case("mnist", batch, *bm.SHAPES["mnist"], 3, "float32", bm.Variant(), mode)
    for mode in bm.MODES
    for batch in (8, 32)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.mode}-B{c.B}" for c in CASES])
def test_routing(benchmark, case: bm.Case, backend: str) -> None:
    inputs, reference64, _, tolerances = bm.case_reference(case, DEVICE)
    runner = bm.make_runner(case, bm.routing_function(backend), inputs)
    errors = bm.compare(runner(), reference64)
    problem = bm.check_errors(errors, tolerances)
    if problem is not None:
        pytest.fail(f"{backend} on {case.label}: wrong result, not timed: {problem}")
    benchmark.group = case.label
    benchmark.extra_info.update(backend=backend, rel_errors=errors, device=DEVICE.type)

    def call() -> None:
        runner()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark(call)
