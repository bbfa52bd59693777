"""Launchers for routing logits shared by the batch (issue 18): tensors in, tensors out.

Shapes: u [B, I, N], weight [I, J, N, M], prior [I, J] or None, bias [J, M] or None, v [B, J, M];
R iterations. Saved for the backward (the op contract, capsnet_fused/backends/glue.py): s^k and
v^k [B, R, J, M] and the couplings c^k [R, I, J], the same for every sample. Scratch: the
logits and the agreements [I, J], the GEMM's partial sums [splits, B, J, M], in the backward
D^k [R, I, J] and dW's float32 accumulator for half-precision weights. Nothing of size
B x I x J x M. The kernels and the math: capsnet_fused/backends/triton/shared_kernels.py,
docs/ROUTING-MATH.md.

Launches (k is the 0-based iteration):

    forward   for k = 0 .. R-1: softmax(k), first_sweep(k), combine(k), agree(k) (k < R-1)
    backward  for k = R-1 .. 0: first_sweep (k < R-1), combine_back(k), agree_back(k),
              logits_back(k) (k > 0, or k = 0 for the prior's gradient); then du, and the bias's
              gradient as a torch sum

that is 4R - 1 forward and at most 4R + 1 backward. detach_inner without the prior's or the
bias's gradient needs only the last iteration: combine_back, agree_back (dW), du.

Grids at the MNIST DigitCaps shape (I=1152, J=10, N=8, M=16) with the GPU tiles of
choose_shared_config (programs per launch; the GEMM and the combines as in launch.py):

    | B   | softmax (j / i) | agree         | du      |
    |-----|-----------------|---------------|---------|
    | 8   | 5 / 1           | 144 x 3 = 432 | 1 x 144 |
    | 128 | 5 / 1           | 144 x 3 = 432 | 2 x 144 |
    | 512 | 5 / 1           | 144 x 3 = 432 | 8 x 144 |

(tests/test_triton_shared.py checks this table against choose_shared_config.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from capsnet_fused.backends.glue import state_dtype
from capsnet_fused.backends.triton.launch import (
    KernelLaunch,
    _bias_gradient_launch,
    _combine_launch,
    _contiguous,
    _gemm_launch,
    _gradient_buffers,
    _new,
    _run,
    _tl_acc,
)
from capsnet_fused.backends.triton.shared_kernels import (
    shared_agree_kernel,
    shared_combine_back_kernel,
    shared_combine_kernel,
    shared_du_kernel,
    shared_logits_back_kernel,
    shared_softmax_kernel,
)
from capsnet_fused.backends.triton.tiles import RoutingConfig, choose_config, tile_kind
from capsnet_fused.reference import SQUASH_EPS

# Elements of an [I, J] tile a softmax or logits_back program holds.
_LOGIT_TILE = 4096


@dataclass(frozen=True)
class SharedConfig:
    """Tile sizes and warps of the shared-logits kernels for one problem size; `base` holds the
    GEMM (first_sweep_kernel) and combine tiles, chosen as for the per-sample routing."""

    base: RoutingConfig
    # shared_softmax_kernel and shared_logits_back_kernel: [rows, block_j] tiles; over i a
    # program owns softmax_in_block_j columns and walks the capsules softmax_in_block_i at a time
    softmax_block_i: int
    softmax_in_block_i: int
    softmax_in_block_j: int
    softmax_warps: int
    # shared_agree_kernel: agree_block_i capsules x agree_block_j output capsules, the batch in
    # tiles of agree_block_b
    agree_block_b: int
    agree_block_i: int
    agree_block_j: int
    agree_warps: int
    # shared_du_kernel: [du_block_b, du_block_c] output tiles of du [B, I*N], K = (j, m) in
    # steps of du_block_k
    du_block_b: int
    du_block_c: int
    du_block_k: int
    du_warps: int

    def softmax_grid(self, in_caps: int, out_caps: int, softmax_in: bool):
        if softmax_in:
            return (triton.cdiv(out_caps, self.softmax_in_block_j),)
        return (triton.cdiv(in_caps, self.softmax_block_i),)

    def softmax_tile(self, softmax_in: bool) -> tuple[int, int]:
        """(BLOCK_I, BLOCK_J) of the softmax and logits_back kernels."""
        if softmax_in:
            return self.softmax_in_block_i, self.softmax_in_block_j
        return self.softmax_block_i, self.base.block_j

    def agree_grid(self, in_caps: int, out_caps: int):
        return (triton.cdiv(in_caps, self.agree_block_i), triton.cdiv(out_caps, self.agree_block_j))

    def du_grid(self, batch: int, in_caps: int, in_d: int):
        return (triton.cdiv(batch, self.du_block_b), triton.cdiv(in_caps * in_d, self.du_block_c))


def choose_shared_config(
    batch: int, in_caps: int, out_caps: int, in_d: int, out_d: int, kind: str | None = None
) -> SharedConfig:
    """The tiles and warps the shared-logits launchers use for (B, I, J, N, M); kind as
    tiles.tile_kind()."""
    kind = tile_kind() if kind is None else kind
    base = choose_config(batch, in_caps, out_caps, in_d, out_d, kind)
    block_j, block_n, block_m = base.block_j, base.block_n, base.block_m
    pow_b = triton.next_power_of_2(max(batch, 1))
    if kind == "interpreter":
        # Few, large steps (the interpreter costs milliseconds per loop iteration), but still
        # several capsule blocks, output-capsule blocks and batch tiles where the shape allows,
        # so that the owners and their fixed-order walks are exercised.
        return SharedConfig(
            base,
            16, 16, max(1, block_j // 2), 4,
            min(8, pow_b), 16, max(1, block_j // 2), 4,
            min(8, pow_b), 64, 64, 4,
        )  # fmt: skip
    # GPU tiles, each compiled without spills by tests/test_triton_compile.py (sm_80, sm_90).
    # The softmax and logits_back kernels touch [I, J] (46 KB at the MNIST shape): small tiles,
    # a handful of programs.
    # Tiles that depend on J alone: fewer configurations to compile.
    softmax_block_i = max(1, _LOGIT_TILE // block_j)
    softmax_in_block_j = min(block_j, 32)
    softmax_in_block_i = max(1, _LOGIT_TILE // 4 // softmax_in_block_j)
    # agree: a tl.dot of [rows (i, n), batch tile] x [batch tile, columns (j, m)]; every
    # dimension >= 16 (tl.dot on a GPU, K >= 16 on triton 3.6). About 64 x 64 tiles: eight
    # capsules x four output capsules at the MNIST shape, 144 x 3 programs; the batch in tiles
    # of 32 samples (16 for small batches).
    agree_block_i = max(1, 64 // block_n)
    agree_block_j = min(block_j, max(1, 64 // block_m))
    # Columns padded up to 16 where J x M is smaller (masked lanes).
    agree_block_j = max(agree_block_j, triton.cdiv(16, block_m))
    agree_block_b = 32 if batch > 16 else 16
    # 8 warps: at 4, the two [64, 64] accumulators of the backward (u^T ds and u^T v) and their
    # operands spill on sm_80 (255 registers and a 312-byte stack in float32).
    agree_warps = 8
    # du: [64 samples, 64 (i, n)] tiles, K = (j, m) in steps of 32, as first_sweep's; 8 warps
    # (the W tile, its [I, J] factors and their offsets stay live across the iterations: at 4
    # warps even a 16-sample tile spills on sm_90).
    du_block_b = 64 if batch > 32 else max(16, pow_b)
    du_warps = 8
    return SharedConfig(
        base,
        softmax_block_i, softmax_in_block_i, softmax_in_block_j, 4,
        agree_block_b, agree_block_i, agree_block_j, agree_warps,
        du_block_b, 64, 32, du_warps,
    )  # fmt: skip


def shared_routing_forward(
    u: torch.Tensor,
    weight: torch.Tensor,
    prior: torch.Tensor | None,
    iterations: int,
    softmax_in: bool,
    batch_mean: bool,
    record: list | None = None,
    *,
    bias: torch.Tensor | None = None,
    leaky: bool = False,
    squash_eps: float = SQUASH_EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """v [B, J, M] (u's dtype) and the states saved for the backward.

    Returns (v, s [B, R, J, M] (the squash inputs s^k + bias), v_iter [B, R, J, M] (v^k), c
    [R, I, J] (the couplings, the leaky share excluded)), the states in float32 (float64 for
    float64 inputs). batch_mean: the logits grow by the batch mean of the agreements (the mean
    of no sample is 0), else by their sum. With `record`, the launches are appended there
    instead of run (meta tensors work).
    """
    u, weight, prior, bias = _contiguous(u, weight, prior, bias)
    batch, in_caps, in_d = u.shape
    _, out_caps, _, out_d = weight.shape
    acc = state_dtype(u.dtype)
    acc_tl = _tl_acc(u.dtype)
    device = u.device
    state_shape = (batch, iterations, out_caps, out_d)
    v = _new((batch, out_caps, out_d), u.dtype, device)
    s = _new(state_shape, acc, device)
    v_iter = _new(state_shape, acc, device)
    c = _new((iterations, in_caps, out_caps), acc, device)
    cfg = choose_shared_config(batch, in_caps, out_caps, in_d, out_d)
    base = cfg.base
    kappa_div = max(batch, 1) if batch_mean else 1
    # The running logits, needed from the second update on (iteration 1 reads the prior).
    logits = _new((in_caps, out_caps), acc, device) if batch > 0 and iterations > 2 else None
    agree = _new((in_caps, out_caps), acc, device) if batch > 0 and iterations > 1 else None
    gemm_grid = base.gemm_grid(batch, in_caps, in_d, out_caps, out_d)
    part_s = _new((gemm_grid[2], batch, out_caps, out_d), acc, device) if batch > 0 else None
    softmax_block_i, softmax_block_j = cfg.softmax_tile(softmax_in)

    for k in range(iterations):
        # Without samples the logits never move: every iteration's couplings are the first.
        has_a = batch > 0 and k > 0
        from_prior = k <= 1 or batch == 0
        _run(
            KernelLaunch(
                shared_softmax_kernel,
                cfg.softmax_grid(in_caps, out_caps, softmax_in),
                dict(
                    # An unused pointer still needs a tensor; the flags say what is read.
                    logits_in_ptr=(c if prior is None else prior) if from_prior else logits,
                    a_ptr=agree if has_a else c,
                    logits_out_ptr=logits if logits is not None else c,
                    c_ptr=c[k],
                    I=in_caps,
                    J=out_caps,
                    KAPPA_DIV=kappa_div,
                ),
                dict(
                    BLOCK_I=softmax_block_i,
                    BLOCK_J=softmax_block_j,
                    HAS_LOGITS=prior is not None or not from_prior,
                    HAS_A=has_a,
                    STORE_LOGITS=has_a and k < iterations - 1,
                    SOFTMAX_IN=softmax_in,
                    LEAKY=leaky,
                    ACC=acc_tl,
                ),
                cfg.softmax_warps,
            ),
            record,
        )
        if batch == 0:
            continue
        _run(_gemm_launch(base, u, weight, c[k], part_s, acc_tl), record)
        _run(
            _combine_launch(
                shared_combine_kernel, base, s, k, part_s.shape[0], squash_eps, acc_tl,
                dict(
                    part_s_ptr=part_s,
                    bias_ptr=s if bias is None else bias,
                    viter_ptr=v_iter,
                    v_ptr=v,
                ),
                dict(HAS_BIAS=bias is not None, LAST=k == iterations - 1),
            ),
            record,
        )  # fmt: skip
        if k < iterations - 1:
            _run(
                _agree_launch(cfg, u, weight, v_iter, k, kappa_div, acc_tl, e=agree, need_e=True),
                record,
            )
    return v, s, v_iter, c


def _agree_launch(
    cfg: SharedConfig,
    u,
    weight,
    x,
    k: int,
    kappa_div: int,
    acc_tl,
    *,
    e=None,
    need_e: bool = False,
    y=None,
    coef=None,
    d=None,
    dw_acc=None,
    dw=None,
    need_dw: bool = False,
    need_g: bool = False,
    accum_dw: bool = False,
    final_dw: bool = False,
) -> KernelLaunch:
    batch, in_caps, in_d = u.shape
    _, out_caps, _, out_d = weight.shape
    # Unused pointers still need tensors; the flags say what is read and written.
    return KernelLaunch(
        shared_agree_kernel,
        cfg.agree_grid(in_caps, out_caps),
        dict(
            u_ptr=u,
            w_ptr=weight,
            x_ptr=x,
            y_ptr=x if y is None else y,
            e_ptr=x if e is None else e,
            c_ptr=x if coef is None else coef,
            d_ptr=x if d is None else d,
            dw_acc_ptr=x if dw_acc is None else dw_acc,
            dw_ptr=x if dw is None else dw,
            B=batch,
            I=in_caps,
            J=out_caps,
            M=out_d,
            R=x.shape[1],
            k=k,
            KAPPA_DIV=kappa_div,
        ),
        dict(
            N=in_d,
            BLOCK_B=cfg.agree_block_b,
            BLOCK_I=cfg.agree_block_i,
            BLOCK_N=cfg.base.block_n,
            BLOCK_J=cfg.agree_block_j,
            BLOCK_M=cfg.base.block_m,
            NEED_E=need_e,
            NEED_DW=need_dw,
            NEED_G=need_g,
            ACCUM_DW=accum_dw,
            FINAL_DW=final_dw,
            ACC=acc_tl,
        ),
        cfg.agree_warps,
    )


def shared_routing_backward(
    grad_v: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    prior: torch.Tensor | None,
    s: torch.Tensor,
    v_iter: torch.Tensor,
    c: torch.Tensor,
    iterations: int,
    softmax_in: bool,
    detach_inner: bool,
    batch_mean: bool,
    need_du: bool,
    need_dweight: bool,
    need_dprior: bool,
    record: list | None = None,
    *,
    bias: torch.Tensor | None = None,
    leaky: bool = False,
    squash_eps: float = SQUASH_EPS,
    need_dbias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact gradients (du [B, I, N], dweight [I, J, N, M], dprior [I, J], dbias [J, M]) of the
    shared-logits routing, from the states shared_routing_forward saved.

    A gradient not needed comes back as an empty tensor of shape [0]; dprior and dbias only
    with a prior and a bias. leaky changes nothing here: the saved couplings already exclude
    the leak's share.
    """
    del leaky
    u, weight, grad_v, prior, bias = _contiguous(u, weight, grad_v, prior, bias)
    s, v_iter, c = _contiguous(s, v_iter, c)
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

    cfg = choose_shared_config(batch, in_caps, out_caps, in_d, out_d)
    base = cfg.base
    acc = state_dtype(u.dtype)
    acc_tl = _tl_acc(u.dtype)
    kappa_div = max(batch, 1) if batch_mean else 1
    last = iterations - 1
    # The chain of D (dL/d of the shared logits) through every iteration: needed by every
    # gradient except du and dW with detach_inner, which read the last iteration alone.
    chain = (not detach_inner and (need_du or need_dweight)) or need_dprior or need_dbias
    steps = range(last, -1, -1) if chain else [last]
    ds = _new(s.shape, acc, device)
    d_hist = _new((iterations, in_caps, out_caps), acc, device) if chain and last > 0 else None
    e = _new((in_caps, out_caps), acc, device) if chain else None
    gemm_grid = base.gemm_grid(batch, in_caps, in_d, out_caps, out_d)
    softmax_block_i, softmax_block_j = cfg.softmax_tile(softmax_in)
    part = None
    if chain and last > 0:
        part = _new((gemm_grid[2], batch, out_caps, out_d), acc, device)
    dw_acc = None
    if need_dweight and not detach_inner and last > 0:
        # dW sums a term of every iteration, launch after launch: in place when dW is in the
        # accumulation dtype, else in a float32 buffer until the last term.
        dw_acc = dweight if dweight.dtype == acc else _new(weight.shape, acc, device)

    for k in steps:
        if k < last:
            _run(_gemm_launch(base, u, weight, d_hist[k + 1], part, acc_tl), record)
        _run(
            _combine_launch(
                shared_combine_back_kernel, base, s, k, gemm_grid[2], squash_eps, acc_tl,
                dict(
                    part_ptr=ds if part is None else part,
                    grad_v_ptr=grad_v,
                    ds_ptr=ds,
                    KAPPA_DIV=kappa_div,
                ),
                dict(READ_PARTS=k < last, LAST=k == last),
            ),
            record,
        )  # fmt: skip
        # e^0 feeds only dL/db^1 = dprior.
        need_e = chain and (k > 0 or need_dprior)
        need_dw = need_dweight and (not detach_inner or k == last)
        if need_e or need_dw:
            need_g = need_dw and not detach_inner and k < last
            final_dw = need_dw and (k == 0 or detach_inner)
            _run(
                _agree_launch(
                    cfg,
                    u,
                    weight,
                    ds,
                    k,
                    kappa_div,
                    acc_tl,
                    e=e,
                    need_e=need_e,
                    y=v_iter,
                    coef=c[k],
                    d=d_hist[k + 1] if need_g else None,
                    dw_acc=dw_acc,
                    dw=dweight,
                    need_dw=need_dw,
                    need_g=need_g,
                    accum_dw=need_dw and not detach_inner and k < last,
                    final_dw=final_dw,
                ),
                record,
            )
        if need_e:
            _run(
                KernelLaunch(
                    shared_logits_back_kernel,
                    cfg.softmax_grid(in_caps, out_caps, softmax_in),
                    dict(
                        c_ptr=c[k],
                        e_ptr=e,
                        d_in_ptr=d_hist[k + 1] if k < last else e,
                        d_out_ptr=dprior if k == 0 else d_hist[k],
                        I=in_caps,
                        J=out_caps,
                    ),
                    dict(
                        BLOCK_I=softmax_block_i,
                        BLOCK_J=softmax_block_j,
                        HAS_D=k < last,
                        SOFTMAX_IN=softmax_in,
                        ACC=acc_tl,
                    ),
                    cfg.softmax_warps,
                ),
                record,
            )
    if need_du:
        _run(
            KernelLaunch(
                shared_du_kernel,
                cfg.du_grid(batch, in_caps, in_d),
                dict(
                    ds_ptr=ds,
                    viter_ptr=v_iter,
                    w_ptr=weight,
                    c_ptr=c,
                    d_ptr=ds if d_hist is None else d_hist,
                    du_ptr=du,
                    B=batch,
                    I=in_caps,
                    J=out_caps,
                    M=out_d,
                    R=iterations,
                    KAPPA_DIV=kappa_div,
                ),
                dict(
                    N=in_d,
                    BLOCK_B=cfg.du_block_b,
                    BLOCK_K=cfg.du_block_k,
                    BLOCK_C=cfg.du_block_c,
                    DETACH_INNER=detach_inner,
                    ACC=acc_tl,
                ),
                cfg.du_warps,
            ),
            record,
        )
    if need_dbias:
        _run(_bias_gradient_launch(ds, dbias), record)
    return du, dweight, dprior, dbias
