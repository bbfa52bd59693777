"""The machines of the traffic model and the einsum reference's side of it: a MODEL, not a
measurement (see bench/traffic.py, which models the Triton routing beside it).

The reference's aten ops are counted by a TorchDispatchMode on meta tensors: every op that moves
data is a kernel reading its inputs and writing its output. torch.compile of the reference is
modelled under the stated assumption that compilation fuses every pointwise and reduction op into
its neighbours, so that only the ops touching a tensor of u_hat's size (B x I x J x M) remain,
each reading or writing those large tensors once and nothing else.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from capsnet_fused import reference_routing

US = 1e-6


@dataclass(frozen=True)
class Machine:
    name: str
    hbm_bytes_per_s: float
    flops_per_s: float = 60e12
    launch_s: float = 3 * US

    @property
    def l2_bytes_per_s(self) -> float:
        return 2.5 * self.hbm_bytes_per_s


MACHINES = (Machine("H100", 3.35e12), Machine("H200", 4.8e12))


@dataclass(frozen=True)
class Variant:
    softmax_over: str = "out_caps"
    prior: bool = False
    detach_inner: bool = False

    @classmethod
    def parse(cls, text: str) -> Variant:
        words = {w for w in text.split(",") if w}
        unknown = words - {"out_caps", "in_caps", "prior", "detach"}
        if unknown:
            raise ValueError(f"unknown variant words {sorted(unknown)}")
        return cls("in_caps" if "in_caps" in words else "out_caps", "prior" in words,
                   "detach" in words)  # fmt: skip

    @property
    def label(self) -> str:
        return (
            self.softmax_over
            + ("+prior" if self.prior else "")
            + ("+detach" if self.detach_inner else "")
        )


def make_inputs(shape, variant: Variant, device: str):
    batch, in_caps, out_caps, in_d, out_d, _ = shape
    gen = torch.Generator().manual_seed(0)
    u = (0.6 * torch.randn(batch, in_caps, in_d, generator=gen)).to(device)
    weight = (torch.randn(in_caps, out_caps, in_d, out_d, generator=gen) / in_d**0.5).to(device)
    prior = torch.randn(in_caps, out_caps, generator=gen).to(device) if variant.prior else None
    grad = torch.randn(batch, out_caps, out_d, generator=gen).to(device)
    return u, weight, prior, grad


# aten ops that move no data (views and metadata) are not kernels.
_NO_KERNEL = {
    "view", "_unsafe_view", "expand", "permute", "t", "transpose", "unsqueeze", "squeeze",
    "detach", "alias", "as_strided", "select", "slice", "reshape", "split", "unbind",
    "lift_fresh", "_reshape_alias", "empty", "empty_like", "empty_strided", "new_empty",
}  # fmt: skip
_MATMUL = {"bmm", "mm", "addmm", "baddbmm"}


def _tensors_of(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_of(v)]
    return []


def _nbytes(t: torch.Tensor) -> int:
    # An expanded (broadcast) view reads its storage, not its logical size.
    return min(t.numel(), t.untyped_storage().nbytes() // t.element_size()) * t.element_size()


class _AtenCounter(TorchDispatchMode):
    """Records every aten op that moves data: bytes read and written, FLOPs, largest operand."""

    def __init__(self):
        super().__init__()
        self.ops: list[dict] = []
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _NO_KERNEL:
            return out
        inputs = _tensors_of(args) + _tensors_of(list((kwargs or {}).values()))
        outputs = _tensors_of(out)
        if name in _MATMUL:
            a, b = inputs[-2], inputs[-1]
            flops = 2.0 * a.numel() * b.shape[-1]
        else:
            flops = float(max([t.numel() for t in inputs + outputs] or [0]))
        self.ops.append(
            {
                "name": name,
                "phase": self.phase,
                "read": sum(_nbytes(t) for t in inputs),
                "written": sum(_nbytes(t) for t in outputs),
                "largest": max([t.numel() for t in inputs + outputs] or [0]),
                "flops": flops,
            }
        )
        return out


def count_reference(shape, variant: Variant) -> list[dict]:
    u, weight, prior, grad = (
        None if t is None else t.to("meta") for t in make_inputs(shape, variant, "cpu")
    )
    leaves = [t.requires_grad_() for t in (u, weight, prior) if t is not None]
    mode = _AtenCounter()
    with mode:
        v = reference_routing(u, weight, shape[5], prior=prior, softmax_over=variant.softmax_over,
                              detach_inner=variant.detach_inner)  # fmt: skip
        mode.phase = "backward"
        torch.autograd.grad(v, leaves, grad)
    return mode.ops


def model_reference(ops: list[dict], machine: Machine, u_hat_numel: int, compiled: bool):
    """Modelled seconds per phase and kernel counts, eager or 'compiled' (see module doc)."""
    seconds: dict[str, float] = defaultdict(float)
    kernels: dict[str, int] = defaultdict(int)
    moved: dict[str, float] = defaultdict(float)
    for op in ops:
        if compiled:
            if op["largest"] < u_hat_numel:
                continue
            big = u_hat_numel * 4
            data = big * (op["read"] >= big) + big * (op["written"] >= big)
        else:
            data = op["read"] + op["written"]
        seconds[op["phase"]] += machine.launch_s + max(
            op["flops"] / machine.flops_per_s, data / machine.hbm_bytes_per_s
        )
        kernels[op["phase"]] += 1
        moved[op["phase"]] += data
    return seconds, kernels, moved
