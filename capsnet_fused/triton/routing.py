"""Launchers for the fused routing kernels: plain functions, tensors in and tensors out.

Shapes: u [B, I, N], weight [I, J, N, M], prior [I, J] or None, v [B, J, M]; R iterations.
Saved for the backward: s^t and V^{t-1} [B, R, J, M] and, with the softmax over input capsules,
the log-sum-exp of the logits over i [B, R, J]. The backward keeps c^t and dlogit^t as
[B, R, I, J] scalars; nothing of size B x I x J x M is allocated anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

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

# On a GPU, a [BLOCK_I, BLOCK_J, BLOCK_M] tile of this many float32 elements is 32 registers
# per thread at 4 warps; the forward and sweep kernels hold about three such tiles (u_hat, a W
# slice, a product) and stay well below the 255-register limit without spilling
# (tests/test_triton_compile.py checks the cubins for local memory).
_GPU_SWEEP_TILE = 4096
# The gradient kernel's tiles are [BLOCK_I, BLOCK_J, BLOCK_N * BLOCK_M] and it holds four (W,
# du_hat, the dW accumulator, a product): half the sweep kernels' budget.
_GPU_GRADS_TILE = 2048
_GPU_NUM_WARPS = 4
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
    grads_block_i: int  # BLOCK_I of the gradient kernel
    num_warps: int


def choose_config(
    in_caps: int, out_caps: int, in_d: int, out_d: int, interpreted: bool = INTERPRETED
) -> RoutingConfig:
    """The tiles the launchers use for I, J, N, M (GPU choice unless `interpreted`)."""
    block_j = triton.next_power_of_2(out_caps)
    block_n = triton.next_power_of_2(in_d)
    block_m = triton.next_power_of_2(out_d)
    sweep_tile = _INTERP_SWEEP_TILE if interpreted else _GPU_SWEEP_TILE
    grads_tile = _INTERP_GRADS_TILE if interpreted else _GPU_GRADS_TILE
    max_block_i = triton.next_power_of_2(in_caps)
    sweep_block_i = max(1, min(max_block_i, 64, sweep_tile // (block_j * block_m)))
    grads_block_i = max(1, min(max_block_i, 64, grads_tile // (block_j * block_n * block_m)))
    return RoutingConfig(block_j, block_n, block_m, sweep_block_i, grads_block_i, _GPU_NUM_WARPS)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and saved-state) dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _new(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer that a kernel fills completely (NaN-filled under POISON_OUTPUTS)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def routing_forward(
    u: torch.Tensor,
    weight: torch.Tensor,
    prior: torch.Tensor | None,
    iterations: int,
    softmax_in: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One kernel launch: v [B, J, M] (u's dtype) and the state saved for the backward.

    Returns (v, s [B, R, J, M], v_prev [B, R, J, M], lse [B, R, J] or [B, R, 0] when the
    softmax is over output capsules); saved tensors are float32 (float64 for float64 inputs).
    """
    u, weight = u.contiguous(), weight.contiguous()
    prior = None if prior is None else prior.contiguous()
    batch, in_caps, in_d = u.shape
    _, out_caps, _, out_d = weight.shape
    acc = acc_dtype(u.dtype)
    state_shape = (batch, iterations, out_caps, out_d)
    v = _new((batch, out_caps, out_d), u.dtype, u.device)
    s = _new(state_shape, acc, u.device)
    v_prev = _new(state_shape, acc, u.device)
    lse = _new((batch, iterations, out_caps if softmax_in else 0), acc, u.device)
    if batch == 0:
        return v, s, v_prev, lse
    cfg = choose_config(in_caps, out_caps, in_d, out_d)
    routing_fwd_kernel[(batch,)](
        u,
        weight,
        u if prior is None else prior,
        v,
        s,
        v_prev,
        lse,
        in_caps,
        out_caps,
        out_d,
        iterations,
        N=in_d,
        BLOCK_I=cfg.sweep_block_i,
        BLOCK_J=cfg.block_j,
        BLOCK_M=cfg.block_m,
        HAS_PRIOR=prior is not None,
        SOFTMAX_IN=softmax_in,
        ACC=_tl_acc(u.dtype),
        num_warps=cfg.num_warps,
    )
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact gradients in two launches: (du [B, I, N], dweight [I, J, N, M], dprior [I, J]).

    A gradient that is not needed comes back as an empty tensor of shape [0]; dprior is only
    computed when prior is given. grad_v [B, J, M]; s, v_prev, lse as routing_forward returned.
    """
    u, weight, grad_v = u.contiguous(), weight.contiguous(), grad_v.contiguous()
    prior = None if prior is None else prior.contiguous()
    need_dprior = need_dprior and prior is not None
    batch, in_caps, in_d = u.shape
    _, out_caps, _, out_d = weight.shape
    device = u.device
    empty = torch.empty(0, dtype=u.dtype, device=device)
    du = _new(u.shape, u.dtype, device) if need_du else empty
    # dW and dprior are sums over the batch: zero (not garbage) when B = 0.
    if need_dweight:
        dweight = (torch.zeros if batch == 0 else _new)(weight.shape, weight.dtype, device)
    else:
        dweight = empty.clone()
    if need_dprior:
        dprior = (torch.zeros if batch == 0 else _new)(prior.shape, prior.dtype, device)
    else:
        dprior = empty.clone()
    if batch == 0 or not (need_du or need_dweight or need_dprior):
        return du, dweight, dprior

    cfg = choose_config(in_caps, out_caps, in_d, out_d)
    acc = acc_dtype(u.dtype)
    ds = _new(s.shape, acc, device)
    alpha = _new((batch, iterations, in_caps, out_caps), acc, device)
    beta = _new((batch, iterations, in_caps, out_caps), acc, device)
    # With detach_inner, du_hat needs only the last sweep's couplings; the earlier sweeps
    # matter only for the prior's gradient.
    t_stop = iterations if detach_inner and not need_dprior else 1
    routing_bwd_sweep_kernel[(batch,)](
        u,
        weight,
        u if prior is None else prior,
        grad_v,
        s.contiguous(),
        v_prev.contiguous(),
        lse.contiguous() if softmax_in else s,
        ds,
        alpha,
        beta,
        in_caps,
        out_caps,
        out_d,
        iterations,
        t_stop,
        N=in_d,
        BLOCK_I=cfg.sweep_block_i,
        BLOCK_J=cfg.block_j,
        BLOCK_M=cfg.block_m,
        HAS_PRIOR=prior is not None,
        SOFTMAX_IN=softmax_in,
        ACC=_tl_acc(u.dtype),
        num_warps=cfg.num_warps,
    )
    routing_bwd_grads_kernel[(triton.cdiv(in_caps, cfg.grads_block_i),)](
        u,
        weight,
        ds,
        v_prev.contiguous(),
        alpha,
        beta,
        du if need_du else u,
        dweight if need_dweight else weight,
        dprior if need_dprior else weight,
        batch,
        in_caps,
        out_caps,
        out_d,
        iterations,
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
        num_warps=cfg.num_warps,
    )
    return du, dweight, dprior
