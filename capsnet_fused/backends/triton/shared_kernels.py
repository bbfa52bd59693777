"""Triton kernels for routing logits shared by the batch (issue 18; docs/ROUTING-MATH.md).

With one set of logits b [I, J] for the whole batch, the couplings c^t [I, J] do not depend on
the sample, so every contraction is a GEMM over the batch instead of a per-sample sweep:

    s^t[b, (j, m)]  = u[b, (i, n)] x (c^t (.) W)[(i, n), (j, m)]     first_sweep_kernel (kernels.py)
    a^t_ij          = sum_{n, m} W_ijnm G^t_ijnm,  G^t = u^T v^t     shared_agree_kernel

Forward, for every iteration k (0-based):

    shared_softmax_kernel   logits b^k = b^{k-1} + a^{k-1} / kappa_div (b^0 = prior or 0) and
                            c^k = softmax(b^k) over j or over i (leaky or not); saves c^k
    first_sweep_kernel      partial s^k over splits of (i, n), with c^k folded into W
    shared_combine_kernel   per (b, j): partials summed in split order, + bias, squash; saves
                            s^k and v^k
    shared_agree_kernel     (k < R - 1) a^k [I, J]: the batch reduction of the agreements

Backward, for k = R - 1 .. 0 (D^{k+1} = dL/db^{k+1}, zero after the last iteration):

    first_sweep_kernel       (k < R - 1) partial u x (D^{k+1} (.) W): dL/dv^k through the logits
    shared_combine_back_kernel  dv^k = [k = R - 1] g + those partials / kappa_div; ds^k
    shared_agree_kernel      e^k = sum_{n, m} W (.) (u^T ds^k) and the dW terms of iteration k,
                             c^k (.) u^T ds^k + D^{k+1} (.) u^T v^k / kappa_div, accumulated
    shared_logits_back_kernel  dl^k = the softmax backward of c^k for e^k; D^k = D^{k+1} + dl^k
                             (at k = 0: dprior)
    shared_du_kernel         du = sum_k ds^k x (c^k (.) W)^T + v^k x (D^{k+1} (.) W)^T / kappa_div

kappa_div is B for the batch mean (max(B, 1)), 1 for the sum: an int, so that float64 runs are
not rounded through a float32 argument. Every reduction over the batch is a tl.dot over sample
tiles in order inside one program (the owner of its [I, J] or W block); every reduction over
capsules has one owner too. No float atomics: results are deterministic.
"""

import triton
import triton.language as tl

from capsnet_fused.backends.triton.kernels import _squash, _squash_backward


@triton.jit
def _coupling_rows(logits, mask_j, LEAKY: tl.constexpr):
    """softmax over j (axis 1) of logits [BLOCK_I, BLOCK_J]; padded j get 0. LEAKY: one more
    logit, fixed at 0, joins the softmax and its share is dropped."""
    logits = tl.where(mask_j[None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    if LEAKY:
        row_max = tl.maximum(row_max, 0.0)
    p = tl.exp(logits - row_max[:, None])
    total = tl.sum(p, axis=1)
    if LEAKY:
        total += tl.exp(-row_max)
    return p / total[:, None]


@triton.jit
def _shared_logits(
    logits_ptr, a_ptr, offs, mask, KAPPA_DIV, HAS_LOGITS: tl.constexpr, HAS_A: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """b^k at offs: the previous logits (or 0) plus the agreements over kappa_div."""
    logits = tl.zeros(offs.shape, dtype=ACC)
    if HAS_LOGITS:
        logits += tl.load(logits_ptr + offs, mask=mask, other=0.0).to(ACC)
    if HAS_A:
        # An int divisor: a float argument is float32 and would round 1/B for float64.
        logits += tl.load(a_ptr + offs, mask=mask, other=0.0) / KAPPA_DIV
    return logits


@triton.jit
def shared_softmax_kernel(
    logits_in_ptr,  # [I, J] b^{k-1} (the prior at k <= 1) (HAS_LOGITS)
    a_ptr,  # [I, J] agreements of iteration k - 1 (HAS_A)
    logits_out_ptr,  # [I, J] b^k, for the next update (STORE_LOGITS; may be logits_in_ptr)
    c_ptr,  # [I, J] output: c^k (a slice of the saved [R, I, J])
    I,  # noqa: E741 (the shape letter used everywhere)
    J,
    KAPPA_DIV,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    HAS_LOGITS: tl.constexpr,
    HAS_A: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    SOFTMAX_IN: tl.constexpr,
    LEAKY: tl.constexpr,
    ACC: tl.constexpr,
):
    """The logit update and the couplings of iteration k, [I, J] once for the batch.

    Over j: a program owns BLOCK_I rows (BLOCK_J covers J). Over i: a program owns BLOCK_J
    columns and walks the capsules twice, once for the column max and sum (online, rescaled as
    the max grows) and once to write; each element is read and written by its owner only, so
    logits_out may alias logits_in.
    """
    pid = tl.program_id(0)
    if SOFTMAX_IN:
        offs_j = pid * BLOCK_J + tl.arange(0, BLOCK_J)
        mask_j = offs_j < J
        run_max = tl.full([BLOCK_J], float("-inf"), dtype=ACC)
        run_sum = tl.zeros([BLOCK_J], dtype=ACC)
        for i0 in range(0, I, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            mask_i = offs_i < I
            offs = offs_i[:, None] * J + offs_j[None, :]
            mask = mask_i[:, None] & mask_j[None, :]
            logits = _shared_logits(
                logits_in_ptr, a_ptr, offs, mask, KAPPA_DIV, HAS_LOGITS, HAS_A, ACC
            )
            # Padded capsules do not count; padded columns stay finite (0) and are never stored.
            logits = tl.where(mask_i[:, None], logits, float("-inf"))
            # The first block always holds a capsule: new_max is finite, exp(-inf) = 0 clears
            # the empty start.
            new_max = tl.maximum(run_max, tl.max(logits, axis=0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(
                tl.exp(logits - new_max[None, :]), axis=0
            )
            run_max = new_max
        top = run_max
        if LEAKY:
            # The extra logit 0 on the input-capsule axis: once per column.
            top = tl.maximum(run_max, 0.0)
            run_sum = run_sum * tl.exp(run_max - top) + tl.exp(-top)
        for i0 in range(0, I, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            mask_i = offs_i < I
            offs = offs_i[:, None] * J + offs_j[None, :]
            mask = mask_i[:, None] & mask_j[None, :]
            logits = _shared_logits(
                logits_in_ptr, a_ptr, offs, mask, KAPPA_DIV, HAS_LOGITS, HAS_A, ACC
            )
            tl.store(c_ptr + offs, tl.exp(logits - top[None, :]) / run_sum[None, :], mask=mask)
            if STORE_LOGITS:
                tl.store(logits_out_ptr + offs, logits, mask=mask)
    else:
        offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
        mask_i = offs_i < I
        offs_j = tl.arange(0, BLOCK_J)
        mask_j = offs_j < J
        offs = offs_i[:, None] * J + offs_j[None, :]
        mask = mask_i[:, None] & mask_j[None, :]
        logits = _shared_logits(logits_in_ptr, a_ptr, offs, mask, KAPPA_DIV, HAS_LOGITS, HAS_A, ACC)
        tl.store(c_ptr + offs, _coupling_rows(logits, mask_j, LEAKY), mask=mask)
        if STORE_LOGITS:
            tl.store(logits_out_ptr + offs, logits, mask=mask)


@triton.jit
def _combine_rows(B, J, ROWS: tl.constexpr):
    """The (b, j) rows r = b * J + j of this combine program: (r, b, j, mask)."""
    offs_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask_r = offs_r < B * J
    return offs_r.to(tl.int64), (offs_r // J).to(tl.int64), offs_r % J, mask_r


@triton.jit
def _sum_partials(part_ptr, offs_r, mask_r, offs_m, mask_m, B, J, M, NPART, BLOCK_P: tl.constexpr):
    """sum over p of part[p, r, :] for the rows r = b * J + j of a [NPART, B, J, M] buffer: a
    reduction tree of fixed shape for a launch, so reproducible run to run."""
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < NPART
    part_rows = offs_p.to(tl.int64)[None, :] * (B * J) + offs_r[:, None]
    parts = tl.load(
        part_ptr + part_rows[:, :, None] * M + offs_m[None, None, :],
        mask=(mask_r[:, None] & mask_p[None, :])[:, :, None] & mask_m[None, None, :],
        other=0.0,
    )
    return tl.sum(parts, axis=1)


@triton.jit
def shared_combine_kernel(
    part_s_ptr,  # [NPART, B, J, M] partial s^k of the GEMM's splits
    bias_ptr,  # [J, M] (HAS_BIAS)
    s_ptr,  # [B, R, J, M] output: the squash input s^k + bias
    viter_ptr,  # [B, R, J, M] output: v^k
    v_ptr,  # [B, J, M] output v^R in the input dtype (LAST)
    B,
    J,
    M,
    R,
    k,
    NPART,
    eps,  # of the squash
    ROWS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LAST: tl.constexpr,
    ACC: tl.constexpr,
):
    """ROWS (b, j) pairs of iteration k: s from the partials (+ bias), v^k = squash(s)."""
    offs_r, b, j, mask_r = _combine_rows(B, J, ROWS)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rm_mask = mask_r[:, None] & mask_m[None, :]
    s = _sum_partials(part_s_ptr, offs_r, mask_r, offs_m, mask_m, B, J, M, NPART, BLOCK_P)
    if HAS_BIAS:
        s += tl.load(bias_ptr + j[:, None] * M + offs_m[None, :], mask=rm_mask, other=0.0).to(ACC)
    state_offs = ((b * R + k) * J + j)[:, None] * M + offs_m[None, :]
    tl.store(s_ptr + state_offs, s, mask=rm_mask)
    v = _squash(s, eps)
    tl.store(viter_ptr + state_offs, v, mask=rm_mask)
    if LAST:
        out_offs = offs_r[:, None] * M + offs_m[None, :]
        tl.store(v_ptr + out_offs, v.to(v_ptr.dtype.element_ty), mask=rm_mask)


@triton.jit
def shared_combine_back_kernel(
    part_ptr,  # [NPART, B, J, M] partial u x (D^{k+1} (.) W) (READ_PARTS)
    grad_v_ptr,  # [B, J, M] dL/dv^R (LAST)
    s_ptr,  # [B, R, J, M] saved s^k
    ds_ptr,  # [B, R, J, M] output dL/ds^k
    B,
    J,
    M,
    R,
    k,
    NPART,
    KAPPA_DIV,
    eps,  # of the squash
    ROWS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    READ_PARTS: tl.constexpr,
    LAST: tl.constexpr,
    ACC: tl.constexpr,
):
    """ROWS (b, j) pairs of backward iteration k: dv^k = [k = R - 1] g + kappa sum_i D u_hat
    (the partials over kappa_div), then ds^k = squash'(s^k, dv^k)."""
    offs_r, b, j, mask_r = _combine_rows(B, J, ROWS)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rm_mask = mask_r[:, None] & mask_m[None, :]
    row_offs = offs_r[:, None] * M + offs_m[None, :]
    dv = tl.zeros([ROWS, BLOCK_M], dtype=ACC)
    if READ_PARTS:
        dv += (
            _sum_partials(part_ptr, offs_r, mask_r, offs_m, mask_m, B, J, M, NPART, BLOCK_P)
            / KAPPA_DIV
        )
    if LAST:
        dv += tl.load(grad_v_ptr + row_offs, mask=rm_mask, other=0.0).to(ACC)
    state_offs = ((b * R + k) * J + j)[:, None] * M + offs_m[None, :]
    s = tl.load(s_ptr + state_offs, mask=rm_mask, other=0.0)
    tl.store(ds_ptr + state_offs, _squash_backward(s, dv, eps), mask=rm_mask)


@triton.jit
def shared_agree_kernel(
    u_ptr,  # [B, I, N]
    w_ptr,  # [I, J, N, M]
    x_ptr,  # [B, R, J, M] the state contracted with u at iteration k: v^k, or ds^k backward
    y_ptr,  # [B, R, J, M] v^k in the backward, for the D term of dW (NEED_G)
    e_ptr,  # [I, J] output: sum_{n, m} W (.) (u^T x) (NEED_E)
    c_ptr,  # [I, J] c^k, scales u^T x into dW (NEED_DW)
    d_ptr,  # [I, J] D^{k+1}, scales u^T y into dW (NEED_G)
    dw_acc_ptr,  # [I, J, N, M] ACC: dW of the iterations after k (ACCUM_DW); written unless
    # FINAL_DW
    dw_ptr,  # [I, J, N, M] output dW in its own dtype (FINAL_DW)
    B,
    I,  # noqa: E741 (the shape letter used everywhere)
    J,
    M,
    R,
    k,
    KAPPA_DIV,
    N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NEED_E: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_G: tl.constexpr,
    ACCUM_DW: tl.constexpr,
    FINAL_DW: tl.constexpr,
    ACC: tl.constexpr,
):
    """Batch reductions of one block of BLOCK_I capsules x BLOCK_J output capsules.

    H[(i, n), (j, m)] = sum_b u[b, i, n] x[b, k, j, m] is a GEMM u^T [I N, B] x x [B, J M]: rows
    (i, n) and columns (j, m) padded to BLOCK_N and BLOCK_M, the batch walked in tiles of
    BLOCK_B in order by this program alone (the owner). Then e_ij = sum_{n, m} W_ijnm H_ijnm
    (the agreements a^k forward, dL/dc^k backward), and dW += c^k (.) H + D^{k+1} (.) G /
    kappa_div with G = u^T y.
    """
    ROWS: tl.constexpr = BLOCK_I * BLOCK_N
    COLS: tl.constexpr = BLOCK_J * BLOCK_M
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    rows = tl.arange(0, ROWS)
    offs_i = pid_i * BLOCK_I + rows // BLOCK_N
    offs_n = rows % BLOCK_N
    mask_row = (offs_i < I) & (offs_n < N)
    cols = tl.arange(0, COLS)
    offs_j = pid_j * BLOCK_J + cols // BLOCK_M
    offs_m = cols % BLOCK_M
    mask_col = (offs_j < J) & (offs_m < M)
    # int64: B * I * N, B * R * J * M and I * J * N * M can pass 2^31.
    u_cols = offs_i.to(tl.int64) * N + offs_n
    x_cols = (k * J + offs_j) * M + offs_m
    h = tl.zeros([ROWS, COLS], dtype=ACC)
    g = tl.zeros([ROWS, COLS], dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        u_t = tl.load(
            u_ptr + offs_b.to(tl.int64)[None, :] * (I * N) + u_cols[:, None],
            mask=mask_row[:, None] & mask_b[None, :],
            other=0.0,
        ).to(ACC)
        x_offs = offs_b.to(tl.int64)[:, None] * (R * J * M) + x_cols[None, :]
        bc_mask = mask_b[:, None] & mask_col[None, :]
        x_t = tl.load(x_ptr + x_offs, mask=bc_mask, other=0.0)
        h = tl.dot(u_t, x_t, h, input_precision="ieee", out_dtype=ACC)
        if NEED_G:
            y_t = tl.load(y_ptr + x_offs, mask=bc_mask, other=0.0)
            g = tl.dot(u_t, y_t, g, input_precision="ieee", out_dtype=ACC)
    rc_mask = mask_row[:, None] & mask_col[None, :]
    w_offs = (
        (offs_i.to(tl.int64)[:, None] * J + offs_j[None, :]) * (N * M)
        + (offs_n * M)[:, None]
        + offs_m[None, :]
    )
    if NEED_E:
        w = tl.load(w_ptr + w_offs, mask=rc_mask, other=0.0).to(ACC)
        # Rows (i, n) and columns (j, m) of the row-major tile are [BLOCK_I, BLOCK_N] and
        # [BLOCK_J, BLOCK_M]: the reshape keeps the order.
        prod = tl.reshape(w * h, [BLOCK_I, BLOCK_N, BLOCK_J, BLOCK_M])
        e = tl.sum(tl.sum(prod, axis=3), axis=1)
        e_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        e_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
        e_mask = (e_i < I)[:, None] & (e_j < J)[None, :]
        tl.store(e_ptr + e_i[:, None] * J + e_j[None, :], e, mask=e_mask)
    if NEED_DW:
        ij_offs = offs_i[:, None] * J + offs_j[None, :]
        dw = tl.load(c_ptr + ij_offs, mask=rc_mask, other=0.0) * h
        if NEED_G:
            dw += tl.load(d_ptr + ij_offs, mask=rc_mask, other=0.0) * g / KAPPA_DIV
        if ACCUM_DW:
            dw += tl.load(dw_acc_ptr + w_offs, mask=rc_mask, other=0.0)
        if FINAL_DW:
            tl.store(dw_ptr + w_offs, dw.to(dw_ptr.dtype.element_ty), mask=rc_mask)
        else:
            tl.store(dw_acc_ptr + w_offs, dw, mask=rc_mask)


@triton.jit
def shared_logits_back_kernel(
    c_ptr,  # [I, J] c^k
    e_ptr,  # [I, J] dL/dc^k from shared_agree_kernel
    d_in_ptr,  # [I, J] D^{k+1} (HAS_D)
    d_out_ptr,  # [I, J] output D^k = D^{k+1} + dl^k, in d_out_ptr's dtype (dprior at k = 0)
    I,  # noqa: E741 (the shape letter used everywhere)
    J,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    HAS_D: tl.constexpr,
    SOFTMAX_IN: tl.constexpr,
    ACC: tl.constexpr,
):
    """dl^k = c (e - sum_j' c e) over j (a program owns BLOCK_I rows), or c (e - sum_i' c e)
    over i (a program owns BLOCK_J columns and walks the capsules twice, in order); the leak
    changes only the values of c. D^k = D^{k+1} + dl^k."""
    pid = tl.program_id(0)
    if SOFTMAX_IN:
        offs_j = pid * BLOCK_J + tl.arange(0, BLOCK_J)
        mask_j = offs_j < J
        col = tl.zeros([BLOCK_J], dtype=ACC)
        for i0 in range(0, I, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            offs = offs_i[:, None] * J + offs_j[None, :]
            mask = (offs_i < I)[:, None] & mask_j[None, :]
            c = tl.load(c_ptr + offs, mask=mask, other=0.0)
            col += tl.sum(c * tl.load(e_ptr + offs, mask=mask, other=0.0), axis=0)
        for i0 in range(0, I, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            offs = offs_i[:, None] * J + offs_j[None, :]
            mask = (offs_i < I)[:, None] & mask_j[None, :]
            c = tl.load(c_ptr + offs, mask=mask, other=0.0)
            d = c * (tl.load(e_ptr + offs, mask=mask, other=0.0) - col[None, :])
            if HAS_D:
                d += tl.load(d_in_ptr + offs, mask=mask, other=0.0)
            tl.store(d_out_ptr + offs, d.to(d_out_ptr.dtype.element_ty), mask=mask)
    else:
        offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_j = tl.arange(0, BLOCK_J)
        offs = offs_i[:, None] * J + offs_j[None, :]
        mask = (offs_i < I)[:, None] & (offs_j < J)[None, :]
        c = tl.load(c_ptr + offs, mask=mask, other=0.0)
        e = tl.load(e_ptr + offs, mask=mask, other=0.0)
        d = c * (e - tl.sum(c * e, axis=1)[:, None])
        if HAS_D:
            d += tl.load(d_in_ptr + offs, mask=mask, other=0.0)
        tl.store(d_out_ptr + offs, d.to(d_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def shared_du_kernel(
    ds_ptr,  # [B, R, J, M]
    viter_ptr,  # [B, R, J, M] v^k (the D terms; not DETACH_INNER)
    w_ptr,  # [I, J, N, M]
    c_ptr,  # [R, I, J] saved couplings
    d_ptr,  # [R, I, J] D^k at row k (rows 1 .. R - 1 read; not DETACH_INNER)
    du_ptr,  # [B, I, N] output, its own dtype
    B,
    I,  # noqa: E741 (the shape letter used everywhere)
    J,
    M,
    R,
    KAPPA_DIV,
    N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DETACH_INNER: tl.constexpr,
    ACC: tl.constexpr,
):
    """du[b, (i, n)] = sum_k ds^k[b, (j, m)] x (c^k (.) W)^T + v^k x (D^{k+1} (.) W)^T / kappa_div
    (only the last iteration's first term with detach_inner).

    Program (b tile, column tile of (i, n)): a [BLOCK_B, BLOCK_C] block of the GEMM over
    K = (j, m) in steps of BLOCK_K, each W tile loaded once for every iteration's terms. One
    owner per block: no partials.
    """
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < I * N
    i_of_c = offs_c // N
    n_of_c = offs_c % N
    state_rows = offs_b.to(tl.int64)[:, None] * (R * J * M)
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=ACC)
    if DETACH_INNER:
        k_first = R - 1
    else:
        k_first = 0
    for k0 in range(0, J * M, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < J * M
        j_of_k = offs_k // M
        m_of_k = offs_k % M
        kc_mask = mask_k[:, None] & mask_c[None, :]
        w_t = tl.load(
            w_ptr
            + (i_of_c.to(tl.int64)[None, :] * J + j_of_k[:, None]) * (N * M)
            + (n_of_c * M)[None, :]
            + m_of_k[:, None],
            mask=kc_mask,
            other=0.0,
        ).to(ACC)
        ij_offs = i_of_c[None, :] * J + j_of_k[:, None]
        bk_mask = mask_b[:, None] & mask_k[None, :]
        for k in range(k_first, R):
            x_offs = state_rows + (k * (J * M) + offs_k)[None, :]
            ds_t = tl.load(ds_ptr + x_offs, mask=bk_mask, other=0.0)
            c_t = tl.load(c_ptr + k * I * J + ij_offs, mask=kc_mask, other=0.0)
            acc = tl.dot(ds_t, c_t * w_t, acc, input_precision="ieee", out_dtype=ACC)
            if not DETACH_INNER:
                if k < R - 1:
                    v_t = tl.load(viter_ptr + x_offs, mask=bk_mask, other=0.0)
                    d_t = tl.load(d_ptr + (k + 1) * I * J + ij_offs, mask=kc_mask, other=0.0)
                    acc = tl.dot(
                        v_t, d_t / KAPPA_DIV * w_t, acc, input_precision="ieee", out_dtype=ACC
                    )
    out_offs = offs_b.to(tl.int64)[:, None] * (I * N) + offs_c[None, :]
    tl.store(
        du_ptr + out_offs, acc.to(du_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_c[None, :]
    )
