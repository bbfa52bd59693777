"""The correctness gate: a backend's outputs and gradients against the float64 reference.

The relative error ||x - x64|| / ||x64|| of each tensor must stay below max(floor(dtype),
2 x the error of the eager reference run in the same dtype); a backend that fails is reported
as failed, with its error, and is not timed. Also the one-line text of a failure.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from capsnet_fused import reference_routing
from capsnet_fused.benchmark.cases import DTYPES, Case, make_case_inputs, make_runner
from capsnet_fused.testing import rel_error

# Relative error floors; the tolerance is max(floor, 2 x the eager reference's own error in
# that dtype), the factor 2 following flash-attention's rule for low-precision kernels.
ERROR_FLOORS = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}
TENSOR_NAMES = ("v", "du", "dweight", "dprior")


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


def passes_check(
    row: dict[str, Any], errors: dict[str, float], tolerances: dict[str, float]
) -> bool:
    """Record a backend's errors and tolerances on its result row; False, with the row marked
    failed (and so not timed), when some error is above its tolerance."""
    row["rel_errors"], row["tolerances"] = errors, tolerances
    problem = check_errors(errors, tolerances)
    if problem is not None:
        row.update(status="failed", error=f"wrong result, not timed: {problem}")
    return problem is None


def _failure(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."
