"""Launchers for the fused routing kernels: plain functions, tensors in and tensors out.

Shapes: u [B, I, N], weight [I, J, N, M], prior [I, J] or None, v [B, J, M]; R iterations.
Saved for the backward: s^t and V^{t-1} [B, R, J, M] and, with the softmax over input capsules,
the log-sum-exp of the logits over i [B, R, J]. The backward keeps c^t and dlogit^t as
[B, R, I, J] scalars; nothing of size B x I x J x M is allocated anywhere.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from capsnet_fused._op_glue import state_dtype
from capsnet_fused.reference import SQUASH_EPS
from capsnet_fused.triton.kernels import (
    routing_bwd_grads_kernel,
    routing_bwd_sweep_kernel,
    routing_fwd_kernel,
)

# True when the kernels were decorated with TRITON_INTERPRET=1 (they then run on CPU tensors).
INTERPRETED = isinstance(routing_fwd_kernel, InterpretedFunction)

# Tests set this to fill every buffer a kernel should write with NaN first, so that an element
# the kernel forgets to write shows up as a NaN in the result.
POISON_OUTPUTS = False

# GPU tiles (checked for spills by tests/test_triton_compile.py for sm_80 and sm_90): a sweep
# tile [BLOCK_I, BLOCK_J, BLOCK_M] of 2048 elements at 8 warps is 8 per thread per tile. The
# static loop over n is unrolled and keeps N W-slices in flight (memory-level parallelism: one
# program per sample means one CTA per SM at B = 128 on an H100), so the budget halves for each
# doubling of N past 8. At I=1152, J=10, N=8, M=16 this is BLOCK_I = 8 at 16 warps (register
# cap 128, see max_registers): 96-125 registers in the forward, 108-128 in the backward sweep
# over float32/float16/bfloat16 on sm_80 and sm_90, no local memory or stack (ptxas of
# triton 3.9).
_GPU_SWEEP_TILE = 2048
# Gradient tiles [BLOCK_I, BLOCK_J, BLOCK_N * BLOCK_M]: four of them live (W, du_hat, the dW
# accumulator, a product); BLOCK_I = 1 at the MNIST shape, 72-103 registers at 16 warps.
_GPU_GRADS_TILE = 2048
_GPU_ELEMENTS_PER_THREAD = 4
_GPU_MAX_WARPS = 16
# 32-bit registers per SM on sm_80 and sm_90, and ptxas's per-thread maximum.
_GPU_REGISTER_FILE = 65536
_GPU_MAX_REGISTERS = 255
# The interpreter costs milliseconds per loop iteration whatever the tile size: large tiles.
_INTERP_SWEEP_TILE = 1 << 16
_INTERP_GRADS_TILE = 1 << 17


@dataclass(frozen=True)
class RoutingConfig:
    """Tile sizes and warps chosen for one problem size (J, N, M padded to powers of two)."""

    block_j: int
    block_n: int
    block_m: int
    sweep_block_i: int  # BLOCK_I of the forward and backward-sweep kernels
    sweep_warps: int
    grads_block_i: int  # BLOCK_I of the gradient kernel
    grads_warps: int


def _warps(elements: int) -> int:
    return max(1, min(_GPU_MAX_WARPS, elements // (32 * _GPU_ELEMENTS_PER_THREAD)))


def max_registers(num_warps: int) -> int:
    """Per-thread register cap (PTX .maxnreg) for a kernel launched with `num_warps` warps.

    Every launch has one CTA per program and one program per sample (or input block), so one
    CTA may use the whole register file. Without an explicit cap, ptxas (triton 3.9, which runs
    it with --regAllocOptLevel=2) aims at 64 registers for some of these kernels to fit several
    CTAs per SM, and puts the values that do not fit on the stack (e.g. the bfloat16 backward
    sweep at the MNIST tiles: 64 registers and 24 B of stack on sm_80; 108 registers and no
    stack with this cap). The ahead-of-time compile check uses the same cap.
    """
    return min(_GPU_MAX_REGISTERS, _GPU_REGISTER_FILE // (32 * num_warps))


def choose_config(
    in_caps: int, out_caps: int, in_d: int, out_d: int, interpreted: bool = INTERPRETED
) -> RoutingConfig:
    """The tiles and warps the launchers use for I, J, N, M (GPU choice unless `interpreted`)."""
    block_j = triton.next_power_of_2(out_caps)
    block_n = triton.next_power_of_2(in_d)
    block_m = triton.next_power_of_2(out_d)
    if interpreted:
        sweep_tile, grads_tile = _INTERP_SWEEP_TILE, _INTERP_GRADS_TILE
    else:
        sweep_tile = _GPU_SWEEP_TILE * 8 // max(8, block_n)
        grads_tile = _GPU_GRADS_TILE
    max_block_i = triton.next_power_of_2(in_caps)
    sweep_block_i = max(1, min(max_block_i, 64, sweep_tile // (block_j * block_m)))
    grads_block_i = max(1, min(max_block_i, 64, grads_tile // (block_j * block_n * block_m)))
    return RoutingConfig(
        block_j,
        block_n,
        block_m,
        sweep_block_i,
        _warps(sweep_block_i * block_j * block_m),
        grads_block_i,
        _warps(grads_block_i * block_j * block_n * block_m),
    )


@dataclass
class KernelLaunch:
    """One kernel launch as a launcher issues it: runtime args by name, constexprs, warps."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int

    @property
    def maxnreg(self) -> int:
        """The register cap this launch compiles with (see max_registers)."""
        return max_registers(self.num_warps)

    def __call__(self) -> None:
        # The interpreter ignores maxnreg (it drops launch options that are not arguments).
        self.kernel[self.grid](
            **self.args, **self.constexprs, num_warps=self.num_warps, maxnreg=self.maxnreg
        )


def _run(launch: KernelLaunch, record: list[KernelLaunch] | None) -> None:
    if record is None:
        launch()
    else:
        record.append(launch)


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _new(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer that a kernel fills completely (NaN-filled under POISON_OUTPUTS)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _refuse_new_options(bias: torch.Tensor | None, leaky: bool, squash_eps: float) -> None:
    """The options of issue 15 are not in these kernels yet."""
    if bias is not None or leaky or squash_eps != SQUASH_EPS:
        raise NotImplementedError(
            "the Triton backend does not implement bias, leaky or a squash_eps other than "
            f"{SQUASH_EPS} yet (the lead's Triton change); use backend='reference' or 'cpp'"
        )


def _zeros_or_new(batch: int, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A batch-summed gradient buffer: zeros when there is no sample to sum over."""
    if batch == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    return _new(shape, dtype, device)


def routing_forward(
    u: torch.Tensor,
    weight: torch.Tensor,
    prior: torch.Tensor | None,
    iterations: int,
    softmax_in: bool,
    record: list[KernelLaunch] | None = None,
    *,
    bias: torch.Tensor | None = None,
    leaky: bool = False,
    squash_eps: float = SQUASH_EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One kernel launch: v [B, J, M] (u's dtype) and the state saved for the backward.

    Returns (v, s [B, R, J, M], v_prev [B, R, J, M], lse [B, R, J] or [B, 0, J] when the
    softmax is over output capsules); saved tensors are float32 (float64 for float64 inputs).
    With `record`, the launch is appended there instead of run (meta tensors work).
    bias [J, M], leaky and squash_eps (see reference_routing): not implemented yet.
    """
    _refuse_new_options(bias, leaky, squash_eps)
    u, weight = u.contiguous(), weight.contiguous()
    prior = None if prior is None else prior.contiguous()
    batch, in_caps, in_d = u.shape
    _, out_caps, _, out_d = weight.shape
    acc = state_dtype(u.dtype)
    state_shape = (batch, iterations, out_caps, out_d)
    v = _new((batch, out_caps, out_d), u.dtype, u.device)
    s = _new(state_shape, acc, u.device)
    v_prev = _new(state_shape, acc, u.device)
    lse = _new((batch, iterations if softmax_in else 0, out_caps), acc, u.device)
    if batch == 0:
        return v, s, v_prev, lse
    cfg = choose_config(in_caps, out_caps, in_d, out_d)
    launch = KernelLaunch(
        routing_fwd_kernel,
        (batch,),
        dict(
            u_ptr=u,
            w_ptr=weight,
            # An unused pointer still needs a tensor; HAS_PRIOR=False never reads it.
            prior_ptr=u if prior is None else prior,
            v_ptr=v,
            s_ptr=s,
            vprev_ptr=v_prev,
            lse_ptr=lse if softmax_in else s,
            I=in_caps,
            J=out_caps,
            M=out_d,
            R=iterations,
        ),
        dict(
            N=in_d,
            BLOCK_I=cfg.sweep_block_i,
            BLOCK_J=cfg.block_j,
            BLOCK_M=cfg.block_m,
            HAS_PRIOR=prior is not None,
            SOFTMAX_IN=softmax_in,
            ACC=_tl_acc(u.dtype),
        ),
        cfg.sweep_warps,
    )
    _run(launch, record)
    return v, s, v_prev, lse


def routing_backward(
    grad_v: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    prior: torch.Tensor | None,
    s: torch.Tensor,
    v_prev: torch.Tensor,
    lse: torch.Tensor,
    iterations: int,
    softmax_in: bool,
    detach_inner: bool,
    need_du: bool,
    need_dweight: bool,
    need_dprior: bool,
    record: list[KernelLaunch] | None = None,
    *,
    bias: torch.Tensor | None = None,
    leaky: bool = False,
    squash_eps: float = SQUASH_EPS,
    need_dbias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact gradients in two launches: (du [B, I, N], dweight [I, J, N, M], dprior [I, J],
    dbias [J, M]).

    A gradient that is not needed comes back as an empty tensor of shape [0]; dprior is only
    computed when prior is given. grad_v [B, J, M]; s, v_prev, lse as routing_forward returned.
    Scratch: ds [B, R, J, M] and the couplings and logit gradients [B, R, I, J].
    bias, leaky and squash_eps: not implemented yet (so dbias is always [0] here).
    """
    _refuse_new_options(bias, leaky, squash_eps)
    u, weight, grad_v = u.contiguous(), weight.contiguous(), grad_v.contiguous()
    s, v_prev, lse = s.contiguous(), v_prev.contiguous(), lse.contiguous()
    prior = None if prior is None else prior.contiguous()
    need_dprior = need_dprior and prior is not None
    batch, in_caps, in_d = u.shape
    _, out_caps, _, out_d = weight.shape
    device = u.device
    # Each gradient has its input's dtype, also when it is not needed and comes back empty.
    prior_dtype = u.dtype if prior is None else prior.dtype
    du = _new(u.shape if need_du else (0,), u.dtype, device)
    # dW and dprior are sums over the batch: zero (not garbage) when B = 0.
    if need_dweight:
        dweight = _zeros_or_new(batch, weight.shape, weight.dtype, device)
    else:
        dweight = torch.empty(0, dtype=weight.dtype, device=device)
    if need_dprior:
        dprior = _zeros_or_new(batch, prior.shape, prior.dtype, device)
    else:
        dprior = torch.empty(0, dtype=prior_dtype, device=device)
    dbias = torch.empty(0, dtype=u.dtype, device=device)
    if batch == 0 or not (need_du or need_dweight or need_dprior):
        return du, dweight, dprior, dbias

    cfg = choose_config(in_caps, out_caps, in_d, out_d)
    acc = state_dtype(u.dtype)
    ds = _new(s.shape, acc, device)
    alpha = _new((batch, iterations, in_caps, out_caps), acc, device)
    beta = _new((batch, iterations, in_caps, out_caps), acc, device)
    # With detach_inner, du_hat needs only the last sweep's couplings; the earlier sweeps
    # matter only for the prior's gradient.
    t_stop = iterations if detach_inner and not need_dprior else 1
    sweep = KernelLaunch(
        routing_bwd_sweep_kernel,
        (batch,),
        dict(
            u_ptr=u,
            w_ptr=weight,
            prior_ptr=u if prior is None else prior,
            grad_v_ptr=grad_v,
            s_ptr=s,
            vprev_ptr=v_prev,
            lse_ptr=lse if softmax_in else s,
            ds_ptr=ds,
            alpha_ptr=alpha,
            beta_ptr=beta,
            I=in_caps,
            J=out_caps,
            M=out_d,
            R=iterations,
            T_STOP=t_stop,
        ),
        dict(
            N=in_d,
            BLOCK_I=cfg.sweep_block_i,
            BLOCK_J=cfg.block_j,
            BLOCK_M=cfg.block_m,
            HAS_PRIOR=prior is not None,
            SOFTMAX_IN=softmax_in,
            ACC=_tl_acc(u.dtype),
        ),
        cfg.sweep_warps,
    )
    grads = KernelLaunch(
        routing_bwd_grads_kernel,
        (triton.cdiv(in_caps, cfg.grads_block_i),),
        dict(
            u_ptr=u,
            w_ptr=weight,
            ds_ptr=ds,
            vprev_ptr=v_prev,
            alpha_ptr=alpha,
            beta_ptr=beta,
            du_ptr=du if need_du else u,
            dw_ptr=dweight if need_dweight else weight,
            dprior_ptr=dprior if need_dprior else weight,
            B=batch,
            I=in_caps,
            J=out_caps,
            M=out_d,
            R=iterations,
        ),
        dict(
            N=in_d,
            BLOCK_I=cfg.grads_block_i,
            BLOCK_J=cfg.block_j,
            BLOCK_N=cfg.block_n,
            BLOCK_M=cfg.block_m,
            NEED_DU=need_du,
            NEED_DW=need_dweight,
            NEED_DPRIOR=need_dprior,
            DETACH_INNER=detach_inner,
            ACC=_tl_acc(u.dtype),
        ),
        cfg.grads_warps,
    )
    _run(sweep, record)
    _run(grads, record)
    return du, dweight, dprior, dbias


def planned_launches(
    shapes: list[tuple[int, int, int, int, int, int]], dtype: torch.dtype
) -> list[KernelLaunch]:
    """Every launch the launchers issue for (B, I, J, N, M, R) shapes in `dtype` on this build.

    Covers every routing variant and every combination of needed gradients that autograd can
    ask for; built on meta tensors, nothing runs. Used by the ahead-of-time compile check.
    """
    launches: list[KernelLaunch] = []
    for batch, in_caps, out_caps, in_d, out_d, iterations in shapes:
        u = torch.empty(batch, in_caps, in_d, dtype=dtype, device="meta")
        weight = torch.empty(in_caps, out_caps, in_d, out_d, dtype=dtype, device="meta")
        grad_v = torch.empty(batch, out_caps, out_d, dtype=dtype, device="meta")
        for softmax_in, with_prior, detach_inner in itertools.product((False, True), repeat=3):
            prior = (
                torch.empty(in_caps, out_caps, dtype=dtype, device="meta") if with_prior else None
            )
            _, s, v_prev, lse = routing_forward(u, weight, prior, iterations, softmax_in, launches)
            s, v_prev, lse = (torch.empty_like(t, device="meta") for t in (s, v_prev, lse))
            for needs in itertools.product((False, True), repeat=3):
                if not any(needs) or (needs[2] and not with_prior):
                    continue
                routing_backward(
                    grad_v,
                    u,
                    weight,
                    prior,
                    s,
                    v_prev,
                    lse,
                    iterations,
                    softmax_in,
                    detach_inner,
                    *needs,
                    record=launches,
                )
    return launches
