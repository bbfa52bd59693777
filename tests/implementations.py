"""The fused implementations that the conformance suite (tests/test_backends.py) checks, and the
routing problems (Case) it runs them on.

An implementation is a set of kernels behind the backend contract's routing and shared_routing
(capsnet_fused/backends/__init__.py): the cpp backend's CPU kernels; the Triton backend, under
its interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1) and on CUDA where there
is a GPU; the cpp backend's CUDA kernels (csrc/routing_cuda.cu) run on the CPU under the
emulation of the CUDA execution model (tests/cuda_emulation.py) and, where there is a GPU,
compiled by nvcc. IMPLEMENTATIONS describes each once: how it is called, how a test sets it up
(every buffer its kernels must write starts as NaN, so an element left unwritten fails; it skips
with the reason where it cannot run), its float64 tolerance, and whether it is the slow Triton
interpreter, which runs shorter case lists.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from capsnet_fused import dynamic_routing
from capsnet_fused.ops import unavailable_reason
from capsnet_fused.reference import SQUASH_EPS
from tests import cuda_emulation
from tests.helpers import Options, Shape, Variant, make_bias, make_inputs, reference64

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPE_IDS = {F16: "f16", BF16: "bf16", F32: "f32", F64: "f64"}
FLOAT32_TOL = 1e-5


# ----------------------------------------------------------------------- the implementations


def skip_if(reason: str | None) -> None:
    if reason is not None:
        pytest.skip(reason)


def setup_cpp(device: str, monkeypatch) -> None:
    skip_if(unavailable_reason("cpp", device))
    # Every buffer the kernels must write, workspace included, starts as NaN (read by
    # csrc/routing_common.h).
    monkeypatch.setenv("CAPSNET_FUSED_POISON_OUTPUTS", "1")


def require_triton(device: str) -> None:
    """Skip unless the Triton kernels can run on `device` here (CUDA, or the interpreter)."""
    skip_if(unavailable_reason("triton", device))


def triton_routing(u, weight, prior=None, **kwargs):
    """dynamic_routing with backend="triton"."""
    return dynamic_routing(u, weight, prior=prior, backend="triton", **kwargs)


def setup_triton(device: str, monkeypatch) -> None:
    require_triton(device)
    from capsnet_fused.backends.triton import launch

    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


def setup_cuda_emulated(device: str, monkeypatch) -> None:
    cuda_emulation.load_or_skip()
    # The tiles the planner picks, threads in order between barriers.
    monkeypatch.delenv("CAPSNET_FUSED_CUDA_TILES", raising=False)
    monkeypatch.delenv("CUDA_EMU_SCHEDULE", raising=False)
    monkeypatch.setenv("CAPSNET_FUSED_POISON_OUTPUTS", "1")


def dispatched(backend, u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky,
               squash_eps, shared_logits=None):  # fmt: skip
    """The contract's routing (and, given shared_logits, shared_routing) of a registered backend,
    reached as users reach it: through dynamic_routing's checks and dispatch."""
    return dynamic_routing(
        u, weight, iterations, prior=prior, bias=bias, softmax_over=softmax_over,
        detach_inner=detach_inner, leaky=leaky, squash_eps=squash_eps,
        shared_logits=shared_logits, backend=backend,
    )  # fmt: skip


@dataclass(frozen=True)
class Implementation:
    """One implementation of the routing op: its kernels' torch ops are
    capsnet_fused::<name>_routing_fwd / _bwd and <name>_shared_routing_fwd / _bwd."""

    name: str
    device: str
    routing: Callable  # routing(u, weight, prior, bias, iterations, softmax_over, ...) -> v
    shared_routing: Callable  # shared_routing(..., squash_eps, shared_logits) -> v
    setup: Callable  # setup(device, monkeypatch): skip with the reason, or prepare
    tol64: float  # float64 relative error bound (float32: FLOAT32_TOL)
    # The Triton interpreter (seconds a case): its own shorter case lists, gradcheck in fast mode.
    interpreted: bool = False
    compile_backend: str = "aot_eager"

    @property
    def id(self) -> str:
        return f"{self.name}-{self.device}"

    def tol(self, dtype: torch.dtype) -> float:
        return self.tol64 if dtype == F64 else FLOAT32_TOL

    def op(self, direction: str, shared_logits: str | None):
        """The forward ("fwd") or backward ("bwd") torch op."""
        infix = "_shared" if shared_logits is not None else ""
        return getattr(torch.ops.capsnet_fused, f"{self.name}{infix}_routing_{direction}").default

    def __call__(self, u, weight, prior=None, bias=None, *, iterations, softmax_over="out_caps",
                 detach_inner=False, leaky=False, squash_eps=SQUASH_EPS,
                 shared_logits=None):  # fmt: skip
        args = (u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps)
        if shared_logits is None:
            return self.routing(*args)
        return self.shared_routing(*args, shared_logits)


CPP = functools.partial(dispatched, "cpp")
TRITON = functools.partial(dispatched, "triton")
EMULATED = (cuda_emulation.routing, cuda_emulation.shared_routing)
IMPLEMENTATIONS = [
    Implementation("cpp", "cpu", CPP, CPP, setup_cpp, 1e-11, compile_backend="inductor"),
    Implementation("triton", "cpu", TRITON, TRITON, setup_triton, 1e-12, interpreted=True),
    Implementation("cuda_emulated", "cpu", *EMULATED, setup_cuda_emulated, 1e-11),
    Implementation("cpp", "cuda", CPP, CPP, setup_cpp, 1e-11, compile_backend="inductor"),
    Implementation("triton", "cuda", TRITON, TRITON, setup_triton, 1e-12),
]


def for_each(cases, interpreter_cases=None, ids=lambda case: case.id):
    """Parametrize (impl, case) over every implementation with its cases (the Triton interpreter:
    interpreter_cases where given), case by case so that consecutive tests share a reference."""
    params = []
    for case in list(dict.fromkeys(cases + (interpreter_cases or []))):
        for implementation in IMPLEMENTATIONS:
            own = cases
            if implementation.interpreted and interpreter_cases is not None:
                own = interpreter_cases
            if case in own:
                params.append(
                    pytest.param(implementation, case, id=f"{implementation.id}-{ids(case)}")
                )
    return pytest.mark.parametrize("impl, case", params, indirect=["impl"])


# ------------------------------------------------------------------- the routing problems


@dataclass(frozen=True)
class Case:
    """A routing problem: shape, variant (logits per sample or shared), options, dtype."""

    shape: Shape
    variant: Variant
    options: Options = Options()
    dtype: torch.dtype = F64

    @property
    def id(self) -> str:
        options = [] if self.options == Options() else [self.options.id]
        return "-".join([self.shape.id, self.variant.id, *options, DTYPE_IDS[self.dtype]])

    def kwargs(self) -> dict:
        v = self.variant
        return dict(
            iterations=self.shape.R, softmax_over=v.softmax_over, detach_inner=v.detach_inner,
            shared_logits=v.shared_logits, **self.options.kwargs(),
        )  # fmt: skip

    def flags(self) -> tuple:
        """The torch ops' arguments after the tensors (batch_mean last with shared logits)."""
        v, o = self.variant, self.options
        flags = (self.shape.R, v.softmax_over == "in_caps", v.detach_inner, o.leaky, o.squash_eps)
        return flags if v.shared_logits is None else (*flags, v.shared_logits == "mean")


def case_inputs(case: Case, device: str, dtype: torch.dtype | None = None) -> tuple:
    """u, weight, prior or None, bias or None, grad, in `dtype` (the case's) on device. With the
    batch sum u is scaled by 1/sqrt(B): at unit scale the sum of B agreements saturates the
    softmax once B is about 13, and the prior's gradient then loses 2-6% to cancellation in
    float32 even in the reference."""
    u, weight, prior, grad = make_inputs(case.shape, case.variant.prior)
    if case.variant.shared_logits == "sum":
        u = u * max(case.shape.B, 1) ** -0.5
    bias = make_bias(case.shape, case.options)
    to = dict(device=device, dtype=dtype or case.dtype)
    return tuple(None if t is None else t.to(**to) for t in (u, weight, prior, bias, grad))


@functools.lru_cache(maxsize=8)
def inputs_and_reference(case: Case, device: str):
    """(case_inputs, the float64 reference's (v, grads)), once for every implementation."""
    u, weight, prior, bias, grad = inputs = case_inputs(case, device)
    return inputs, reference64(u, weight, prior, grad, bias=bias, **case.kwargs())
