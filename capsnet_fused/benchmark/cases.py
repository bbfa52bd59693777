"""The benchmark's grid: named shapes, routing variants, modes, dtypes, a Case and the
BenchConfig that describes a run; build_cases turns a config into its cases.

The grid is plain data (SHAPES, ALL_VARIANTS, MODES, DTYPES, DEFAULT_BATCHES,
FULL_ITERATIONS): importing this module runs nothing, so tests can share the benchmark's
shapes and variants. make_case_inputs and make_runner give one case's inputs and the call that
the benchmark checks, times and measures.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from capsnet_fused import available_backends, dynamic_routing, reference_routing
from capsnet_fused._checks import resolve_device
from capsnet_fused.ops import BACKENDS, unavailable_reason
from capsnet_fused.testing import random_routing_inputs

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
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
# Benchmarked backends besides the fused ones: eager reference and torch.compile(reference).
BASELINES = ("reference", "compiled")
DEFAULT_BATCHES = (1, 8, 32, 128)
FULL_ITERATIONS = (1, 3, 5)
E2E_BATCH = 128


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
    # Also time what `capsnet-fused train` picks on this device when --amp and --channels-last
    # are not given (the CLI sets this; see train.model.resolve_auto_settings).
    e2e_train_default: bool = False


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


def skip_reason(
    backend: str, device: torch.device, dtype: torch.dtype = torch.float32
) -> str | None:
    """Why a benchmarked backend cannot run on device with dtype; None for the baselines,
    which always run, and for a fused backend that can."""
    return None if backend in BASELINES else unavailable_reason(backend, device, dtype)


# ---------------------------------------------------------------------------------------------
# One case: inputs and the benchmarked call


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
