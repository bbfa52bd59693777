"""Launchers for the fused routing kernels: plain functions, tensors in and tensors out.

Shapes: u [B, I, N], weight [I, J, N, M], prior [I, J] or None, v [B, J, M]; R iterations.
Saved for the backward: s^t and V^{t-1} [B, R, J, M] and, with the softmax over input capsules,
the log-sum-exp of the logits over i [B, R, J]. The backward keeps the couplings and logit
gradients as [B, R, I, J] scalars; nothing of size B x I x J x M is allocated anywhere.

Launch order (k is the 0-based iteration; docs/ROUTING-MATH.md has the math):

    forward   first_sweep, combine(0), then sweep(k), combine(k) for k = 1 .. R-1
    backward  combine_back(k), sweep_back(k) for k = R-1 .. 1, combine_back(0),
              sweep_back(0) when the prior's gradient is wanted, grads, and sum_partials
              when grads splits the output capsules over programs (du's partial sums)

plus one softmax of the prior (a torch op) when there is a prior: 2R (+1) launches forward and
2R + 1 (+2) backward. detach_inner without a prior gradient needs only the last iteration's
couplings: combine_back(R-1), sweep_back(R-1), grads.

Grids at the MNIST DigitCaps shape (I=1152, J=10, N=8, M=16, R=3) with the GPU tiles of
choose_config (programs per launch; the combines take up to 8 (b, j) rows a program):

    | B   | first_sweep      | sweep, sweep_back | combine, combine_back | grads         |
    |-----|------------------|-------------------|-----------------------|---------------|
    | 8   | 1 x 5 x 29 = 145 | 231 x 1 = 231     | 80                    | 144 x 3 = 432 |
    | 128 | 2 x 3 x 23 = 138 | 33 x 4 = 132      | 160                   | 144 x 3 = 432 |
    | 512 | 8 x 3 x 6 = 144  | 9 x 16 = 144      | 640                   | 144 x 3 = 432 |

(tests/test_triton.py::test_grid_table checks this table against choose_config.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from capsnet_fused.backends.glue import state_dtype
from capsnet_fused.backends.triton.kernels import (
    combine_back_kernel,
    combine_kernel,
    first_sweep_kernel,
    grads_kernel,
    sum_partials_kernel,
    sweep_back_kernel,
    sweep_kernel,
)
from capsnet_fused.backends.triton.tiles import RoutingConfig, choose_config, max_registers
from capsnet_fused.reference import SQUASH_EPS, coupling_softmax

# Tests set this to fill every buffer a kernel should write with NaN first, so that an element
# the kernel forgets to write shows up as a NaN in the result.
POISON_OUTPUTS = False

# Elements per program of sum_partials_kernel.
_SUM_BLOCK = 1024


@dataclass
class KernelLaunch:
    """One kernel launch as a launcher issues it: runtime args by name, constexprs, warps."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def maxnreg(self) -> int:
        """The register cap this launch compiles with (see max_registers)."""
        return max_registers(self.num_warps)

    def __call__(self) -> None:
        # The interpreter ignores maxnreg (it drops launch options that are not arguments).
        self.kernel[self.grid](
            **self.args, **self.constexprs, num_warps=self.num_warps, maxnreg=self.maxnreg
        )


@dataclass
class TorchLaunch:
    """Work the launchers issue as torch ops rather than a Triton kernel (the prior's softmax,
    the bias gradient's sum), with what it reads and writes for the traffic counter."""

    name: str
    run: Callable[[], Any]
    reads: tuple[torch.Tensor, ...] = ()
    writes: tuple[torch.Tensor, ...] = ()

    def __call__(self) -> None:
        self.run()


def _run(launch: KernelLaunch | TorchLaunch, record: list | None) -> None:
    if record is None:
        launch()
    else:
        record.append(launch)


def _first_couplings_launch(first: FirstCouplings, prior: torch.Tensor) -> TorchLaunch:
    """first_couplings ran eagerly; this stands for its kernels (computed, then recorded)."""
    written = tuple(t for t in (first.c1, first.lse1) if t is not None)
    return TorchLaunch("softmax(prior)", lambda: None, reads=(prior,), writes=written)


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _new(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer that a kernel fills completely (NaN-filled under POISON_OUTPUTS)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _zeros_or_new(batch: int, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A batch-summed gradient buffer: zeros when there is no sample to sum over."""
    if batch == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    return _new(shape, dtype, device)


@dataclass
class FirstCouplings:
    """The first iteration's couplings, the same for every sample.

    Without a prior they are uniform, 1 / divisor (J over output capsules, I over input
    capsules, one more with the leaky logit); with one they are softmax(prior) over the softmax
    axis, computed once here. lse1 [J] is the log-sum-exp over i of the first logits (softmax
    over input capsules only).
    """

    c1: torch.Tensor | None
    lse1: torch.Tensor | None
    divisor: int


def first_couplings(
    prior: torch.Tensor | None,
    in_caps: int,
    out_caps: int,
    softmax_in: bool,
    acc: torch.dtype,
    leaky: bool = False,
) -> FirstCouplings:
    if prior is None:
        return FirstCouplings(None, None, (in_caps if softmax_in else out_caps) + leaky)
    logits = prior.to(acc)
    lse1 = None
    if softmax_in:
        lse1 = torch.logsumexp(logits, dim=0)
        if leaky:
            lse1 = torch.logaddexp(lse1, torch.zeros_like(lse1))
    c1 = coupling_softmax(logits, 0 if softmax_in else 1, leaky)
    return FirstCouplings(c1.contiguous(), lse1, 1)


def _combine_block(parts: int) -> int:
    return triton.next_power_of_2(max(parts, 1))


def _contiguous(*tensors: torch.Tensor | None) -> tuple:
    """The tensors, made contiguous; None stays None."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _gradient_buffers(
    u: torch.Tensor,
    weight: torch.Tensor,
    prior: torch.Tensor | None,
    bias: torch.Tensor | None,
    need_du: bool,
    need_dweight: bool,
    need_dprior: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du, dweight, dprior, dbias) for a backward to fill; a gradient that is not needed is an
    empty tensor of shape [0] (need_dprior and need_dbias only with a prior and a bias)."""
    batch = u.shape[0]
    device = u.device
    # Each gradient has its input's dtype, also when it is not needed and comes back empty.
    du = _new(u.shape if need_du else (0,), u.dtype, device)
    # dW, dprior and dbias are sums over the batch: zero (not garbage) when B = 0.
    if need_dweight:
        dweight = _zeros_or_new(batch, weight.shape, weight.dtype, device)
    else:
        dweight = torch.empty(0, dtype=weight.dtype, device=device)
    prior_dtype = u.dtype if prior is None else prior.dtype
    if need_dprior:
        dprior = _zeros_or_new(batch, prior.shape, prior.dtype, device)
    else:
        dprior = torch.empty(0, dtype=prior_dtype, device=device)
    bias_dtype = u.dtype if bias is None else bias.dtype
    if need_dbias:
        dbias = _zeros_or_new(batch, bias.shape, bias.dtype, device)
    else:
        dbias = torch.empty(0, dtype=bias_dtype, device=device)
    return du, dweight, dprior, dbias


def _bias_gradient_launch(ds: torch.Tensor, dbias: torch.Tensor) -> TorchLaunch:
    """dbias = sum over the batch and the iterations of ds^t = dL/d(s^t + bias); every ds^t must
    have been written (the full chain runs when the bias's gradient is wanted)."""
    return TorchLaunch(
        "sum(ds)", lambda: dbias.copy_(ds.sum(dim=(0, 1))), reads=(ds,), writes=(dbias,)
    )


def _gemm_launch(
    cfg: RoutingConfig, u, weight, coef: torch.Tensor | None, part, acc_tl
) -> KernelLaunch:
    """part[split] = u [B, I N] x (coef (.) W) [I N, J M] over the split's rows (i, n); without
    coef [I, J] the couplings are uniform (their divisor is applied by the combine)."""
    batch, in_caps, in_d = u.shape
    _, out_caps, _, out_d = weight.shape
    return KernelLaunch(
        first_sweep_kernel,
        cfg.gemm_grid(batch, in_caps, in_d, out_caps, out_d),
        dict(
            u_ptr=u,
            w_ptr=weight,
            # An unused pointer still needs a tensor; HAS_C1=False never reads it.
            c1_ptr=weight if coef is None else coef,
            part_s_ptr=part,
            B=batch,
            I=in_caps,
            J=out_caps,
            M=out_d,
            K_PER_SPLIT=cfg.gemm_k_per_split,
        ),
        dict(
            N=in_d,
            BLOCK_B=cfg.gemm_block_b,
            BLOCK_C=cfg.gemm_block_c,
            BLOCK_K=cfg.gemm_block_k,
            HAS_C1=coef is not None,
            ACC=acc_tl,
        ),
        cfg.gemm_warps,
    )


def _combine_launch(
    kernel, cfg: RoutingConfig, s, k: int, nparts: int, squash_eps: float, acc_tl, args, constexprs
) -> KernelLaunch:
    """A launch of a combine kernel (combine_kernel, combine_back_kernel and the shared-logits
    pair): per (b, j) row of s [B, R, J, M] at iteration k, nparts partials added in block order.
    `args` and `constexprs` are the kernel's own, beside those every combine takes."""
    batch, iterations, out_caps, out_d = s.shape
    return KernelLaunch(
        kernel,
        cfg.combine_grid(batch, out_caps),
        dict(
            s_ptr=s,
            **args,
            B=batch,
            J=out_caps,
            M=out_d,
            R=iterations,
            k=k,
            NPART=nparts,
            eps=squash_eps,
        ),
        dict(
            ROWS=cfg.combine_rows,
            BLOCK_P=_combine_block(nparts),
            BLOCK_M=cfg.block_m,
            **constexprs,
            ACC=acc_tl,
        ),
        cfg.combine_warps,
    )


def _sweep_launch(
    kernel, cfg: RoutingConfig, u, weight, prior, v_prev, k: int, softmax_in: bool, leaky: bool,
    acc_tl, args, constexprs=None,
) -> KernelLaunch:  # fmt: skip
    """A launch of sweep_kernel or sweep_back_kernel at iteration k over the tiles of (samples x
    capsules); `args` and `constexprs` are the kernel's own, beside those both sweeps take."""
    batch, in_caps, in_d = u.shape
    _, out_caps, _, out_d = weight.shape
    return KernelLaunch(
        kernel,
        cfg.sweep_grid(batch, in_caps),
        dict(
            u_ptr=u,
            w_ptr=weight,
            prior_ptr=weight if prior is None else prior,
            vprev_ptr=v_prev,
            **args,
            B=batch,
            I=in_caps,
            J=out_caps,
            M=out_d,
            R=v_prev.shape[1],
            k=k,
        ),
        dict(
            N=in_d,
            BLOCK_B=cfg.sweep_block_b,
            BLOCK_I=cfg.sweep_block_i,
            BLOCK_IS=cfg.sweep_block_is,
            BLOCK_J=cfg.block_j,
            BLOCK_M=cfg.block_m,
            HAS_PRIOR=prior is not None,
            SOFTMAX_IN=softmax_in,
            LEAKY=leaky,
            **(constexprs or {}),
            ACC=acc_tl,
        ),
        cfg.sweep_warps,
    )


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
    """v [B, J, M] (u's dtype) and the state saved for the backward, in 2R launches.

    Returns (v, s [B, R, J, M] (the squash inputs s^t + bias), v_prev [B, R, J, M], lse
    [B, R, J] or [B, 0, J] when the softmax is over output capsules); saved tensors are float32
    (float64 for float64 inputs). bias [J, M] or None; leaky adds a logit fixed at 0 to the
    softmax axis. With `record`, the launches are appended there instead of run (meta tensors
    work).
    """
    u, weight, prior, bias = _contiguous(u, weight, prior, bias)
    batch, in_caps, in_d = u.shape
    _, out_caps, _, out_d = weight.shape
    acc = state_dtype(u.dtype)
    device = u.device
    state_shape = (batch, iterations, out_caps, out_d)
    v = _new((batch, out_caps, out_d), u.dtype, device)
    s = _new(state_shape, acc, device)
    v_prev = _new(state_shape, acc, device)
    lse = _new((batch, iterations if softmax_in else 0, out_caps), acc, device)
    if batch == 0:
        return v, s, v_prev, lse
    cfg = choose_config(batch, in_caps, out_caps, in_d, out_d)
    first = first_couplings(prior, in_caps, out_caps, softmax_in, acc, leaky)
    if prior is not None:
        _run(_first_couplings_launch(first, prior), record)
    gemm_grid = cfg.gemm_grid(batch, in_caps, in_d, out_caps, out_d)
    sweep_grid = cfg.sweep_grid(batch, in_caps)
    part_first = _new((gemm_grid[2], batch, out_caps, out_d), acc, device)
    part_s = _new((sweep_grid[0], batch, out_caps, out_d), acc, device)
    part_stat_shape = (sweep_grid[0], batch, out_caps) if softmax_in else (0,)
    part_max = _new(part_stat_shape, acc, device)
    part_sum = _new(part_stat_shape, acc, device)
    acc_tl = _tl_acc(u.dtype)

    _run(_gemm_launch(cfg, u, weight, first.c1, part_first, acc_tl), record)
    for k in range(iterations):
        if k > 0:
            _run(
                _sweep_launch(
                    sweep_kernel, cfg, u, weight, prior, v_prev, k, softmax_in, leaky, acc_tl,
                    dict(
                        part_s_ptr=part_s,
                        part_max_ptr=part_max if softmax_in else part_s,
                        part_sum_ptr=part_sum if softmax_in else part_s,
                    ),
                ),
                record,
            )  # fmt: skip
        parts = part_first if k == 0 else part_s
        _run(
            _combine_launch(
                combine_kernel, cfg, s, k, parts.shape[0], squash_eps, acc_tl,
                dict(
                    part_s_ptr=parts,
                    part_max_ptr=part_max if softmax_in else parts,
                    part_sum_ptr=part_sum if softmax_in else parts,
                    lse1_ptr=s if first.lse1 is None else first.lse1,
                    bias_ptr=s if bias is None else bias,
                    vprev_ptr=v_prev,
                    lse_ptr=lse if softmax_in else s,
                    v_ptr=v,
                    DIVISOR=first.divisor if k == 0 else 1,
                ),
                dict(
                    SOFTMAX_IN=softmax_in,
                    FIRST=k == 0,
                    HAS_LSE1=first.lse1 is not None,
                    HAS_BIAS=bias is not None,
                    LEAKY=leaky,
                    LAST=k == iterations - 1,
                ),
            ),
            record,
        )  # fmt: skip
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
    """Exact gradients: (du [B, I, N], dweight [I, J, N, M], dprior [I, J], dbias [J, M]).

    A gradient that is not needed comes back as an empty tensor of shape [0]; dprior and dbias
    are only computed when prior and bias are given. grad_v [B, J, M]; s, v_prev, lse as
    routing_forward returned. Scratch: ds [B, R, J, M], the dL/dV carry [B, J, M], partial A
    [blocks, B, J, M] and the couplings and logit gradients [B, R, I, J].
    """
    u, weight, grad_v, prior, bias = _contiguous(u, weight, grad_v, prior, bias)
    s, v_prev, lse = _contiguous(s, v_prev, lse)
    need_dprior = need_dprior and prior is not None
    need_dbias = need_dbias and bias is not None
    batch, in_caps, in_d = u.shape
    _, out_caps, _, out_d = weight.shape
    device = u.device
    du, dweight, dprior, dbias = _gradient_buffers(
        u, weight, prior, bias, need_du, need_dweight, need_dprior, need_dbias
    )
    if batch == 0 or not (need_du or need_dweight or need_dprior or need_dbias):
        return du, dweight, dprior, dbias

    cfg = choose_config(batch, in_caps, out_caps, in_d, out_d)
    acc = state_dtype(u.dtype)
    acc_tl = _tl_acc(u.dtype)
    first = first_couplings(prior, in_caps, out_caps, softmax_in, acc, leaky)
    if prior is not None:
        _run(_first_couplings_launch(first, prior), record)
    sweep_grid = cfg.sweep_grid(batch, in_caps)
    ds = _new(s.shape, acc, device)
    carry = _new((batch, out_caps, out_d), acc, device)
    part_a = _new((sweep_grid[0], batch, out_caps, out_d), acc, device)
    scalars_shape = (batch, iterations, in_caps, out_caps)
    alpha = _new(scalars_shape, acc, device)
    beta = _new(scalars_shape, acc, device)
    last = iterations - 1
    # With detach_inner, du_hat needs only the last iteration's couplings and ds; the rest of
    # the chain matters only for the prior's and the bias's gradients.
    short = detach_inner and not (need_dprior or need_dbias)

    def combine_back(k: int) -> KernelLaunch:
        chain = not short
        return _combine_launch(
            combine_back_kernel, cfg, s, k, part_a.shape[0], squash_eps, acc_tl,
            dict(part_a_ptr=part_a, carry_ptr=carry, grad_v_ptr=grad_v, ds_ptr=ds),
            dict(
                READ_A=chain and k < last,
                READ_CARRY=chain and k < last - 1,
                WRITE_CARRY=chain and 0 < k < last,
            ),
        )  # fmt: skip

    def sweep_back(k: int) -> KernelLaunch:
        return _sweep_launch(
            sweep_back_kernel, cfg, u, weight, prior, v_prev, k, softmax_in, leaky, acc_tl,
            dict(
                s_ptr=s,
                bias_ptr=s if bias is None else bias,
                ds_ptr=ds,
                lse_ptr=lse if softmax_in else s,
                alpha_ptr=alpha,
                beta_ptr=beta,
                part_a_ptr=part_a,
            ),
            dict(
                HAS_BIAS=bias is not None,
                FIRST=k == 0,
                # k = 0 couplings are first.c1 (or uniform): grads_kernel takes them from there.
                STORE_ALPHA=k > 0,
                NEED_BETA=not short,
                NEED_A=not short and k > 0,
            ),
        )  # fmt: skip

    if short and iterations > 1:
        _run(combine_back(last), record)
        _run(sweep_back(last), record)
    elif short:
        _run(combine_back(0), record)
    else:
        for k in range(last, 0, -1):
            _run(combine_back(k), record)
            _run(sweep_back(k), record)
        _run(combine_back(0), record)
        if need_dprior:
            _run(sweep_back(0), record)

    grads_grid = cfg.grads_grid(in_caps, out_caps)
    # With the output capsules split over programs, each j block writes its share of du to a
    # partials buffer and sum_partials_kernel adds them in block order.
    du_parts = None
    if need_du and grads_grid[1] > 1:
        du_parts = _new((grads_grid[1], batch, in_caps, in_d), acc, device)
    grads = KernelLaunch(
        grads_kernel,
        grads_grid,
        dict(
            u_ptr=u,
            w_ptr=weight,
            c1_ptr=weight if first.c1 is None else first.c1,
            ds_ptr=ds,
            vprev_ptr=v_prev,
            alpha_ptr=alpha,
            beta_ptr=beta,
            du_ptr=du_parts if du_parts is not None else du if need_du else u,
            dw_ptr=dweight if need_dweight else weight,
            dprior_ptr=dprior if need_dprior else weight,
            B=batch,
            I=in_caps,
            J=out_caps,
            M=out_d,
            R=iterations,
            C1_DIVISOR=first.divisor,
        ),
        dict(
            N=in_d,
            BLOCK_I=cfg.grads_block_i,
            BLOCK_J=cfg.grads_block_j,
            BLOCK_N=cfg.block_n,
            BLOCK_M=cfg.block_m,
            HAS_C1=first.c1 is not None,
            NEED_DU=need_du,
            NEED_DW=need_dweight,
            NEED_DPRIOR=need_dprior,
            DETACH_INNER=detach_inner,
            ACC=acc_tl,
        ),
        cfg.grads_warps,
    )
    _run(grads, record)
    if du_parts is not None:
        _run(
            KernelLaunch(
                sum_partials_kernel,
                (triton.cdiv(du.numel(), _SUM_BLOCK),),
                dict(part_ptr=du_parts, out_ptr=du, NPART=grads_grid[1], NUMEL=du.numel()),
                dict(BLOCK=_SUM_BLOCK),
                4,
            ),
            record,
        )
    if need_dbias:
        _run(_bias_gradient_launch(ds, dbias), record)
    return du, dweight, dprior, dbias
