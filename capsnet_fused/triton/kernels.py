"""Triton kernels for fused dynamic routing (math: ROUTING-MATH.md beside the repository).

Shape letters: B batch, I input capsules, J output capsules, N input pose size, M output pose
size, R routing iterations. BLOCK_J, BLOCK_M (and BLOCK_N) are J, M (N) padded to powers of two;
padded lanes are masked on every load and store. Every kernel loads its inputs in their own
dtype and computes in ACC (float32, or float64 for float64 inputs): the Triton interpreter does
bfloat16 arithmetic on the raw bit pattern, and a GPU should accumulate in float32 anyway.

u_hat[i, j, :] = sum_n u[i, n] * W[i, j, n, :] is recomputed tile by tile in every sweep and
never written to memory.
"""

import triton
import triton.language as tl

# Must match capsnet_fused.reference.SQUASH_EPS; a constexpr so that kernels may read it.
SQUASH_EPS = tl.constexpr(1e-8)


@triton.jit
def _u_hat_tile(
    u_row_ptr,
    w_ptr,
    offs_i,
    mask_i,
    offs_j,
    mask_j,
    offs_m,
    mask_m,
    J,
    M,
    N: tl.constexpr,
    ACC: tl.constexpr,
):
    """u_hat [BLOCK_I, BLOCK_J, BLOCK_M] for the input capsules offs_i of one sample.

    A static loop over n keeps the tile 3-D (the contraction over N is at most a few FMAs per
    element, too small for tl.dot) and needs no cross-thread reduction on a GPU.
    """
    # int64: I * J * N * M can pass 2^31 for wide layers.
    w_offs = (
        offs_i.to(tl.int64)[:, None, None] * (J * N * M)
        + (offs_j * (N * M))[None, :, None]
        + offs_m[None, None, :]
    )
    w_mask = mask_i[:, None, None] & mask_j[None, :, None] & mask_m[None, None, :]
    u_hat = tl.zeros([offs_i.shape[0], offs_j.shape[0], offs_m.shape[0]], dtype=ACC)
    for n in tl.static_range(N):
        u_n = tl.load(u_row_ptr + offs_i * N + n, mask=mask_i, other=0.0).to(ACC)
        w_n = tl.load(w_ptr + w_offs + n * M, mask=w_mask, other=0.0).to(ACC)
        u_hat += u_n[:, None, None] * w_n
    return u_hat


@triton.jit
def _logits_tile(
    u_hat, v_sum, prior_ptr, offs_i, mask_i, offs_j, mask_j, J, HAS_PRIOR: tl.constexpr
):
    """logits [BLOCK_I, BLOCK_J] = prior + u_hat . V^{t-1}."""
    logits = tl.sum(u_hat * v_sum[None, :, :], axis=2)
    if HAS_PRIOR:
        prior_offs = offs_i[:, None] * J + offs_j[None, :]
        prior_mask = mask_i[:, None] & mask_j[None, :]
        logits += tl.load(prior_ptr + prior_offs, mask=prior_mask, other=0.0).to(logits.dtype)
    return logits


@triton.jit
def _softmax_over_j(logits, mask_j):
    """Couplings of each input capsule over the output capsules (padded j get 0)."""
    logits = tl.where(mask_j[None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    p = tl.exp(logits - row_max[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _squash(s, eps: tl.constexpr):
    """v [BLOCK_J, BLOCK_M] = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps), rows j."""
    sq_norm = tl.sum(s * s, axis=1)
    scale = sq_norm / ((1.0 + sq_norm) * tl.sqrt(sq_norm + eps))
    return s * scale[:, None]


@triton.jit
def _squash_backward(s, dv, eps: tl.constexpr):
    """ds [BLOCK_J, BLOCK_M] given dL/dv, with v = a(q) s and q = |s|^2.

    da/dq = a (1/q - 1/(1+q) - 1/(2(q+eps))), written with a/q = 1/((1+q) sqrt(q+eps)) so that
    it stays finite at s = 0 (where autograd of the reference gives 0, and so does this).
    """
    sq_norm = tl.sum(s * s, axis=1)
    root = tl.sqrt(sq_norm + eps)
    a_over_q = 1.0 / ((1.0 + sq_norm) * root)
    a = sq_norm * a_over_q
    da_dq = a_over_q - a / (1.0 + sq_norm) - 0.5 * a / (sq_norm + eps)
    s_dot_dv = tl.sum(s * dv, axis=1)
    return a[:, None] * dv + (2.0 * da_dq * s_dot_dv)[:, None] * s


@triton.jit
def routing_fwd_kernel(
    u_ptr,  # [B, I, N]
    w_ptr,  # [I, J, N, M]
    prior_ptr,  # [I, J] (unused unless HAS_PRIOR)
    v_ptr,  # [B, J, M] output, input dtype
    s_ptr,  # [B, R, J, M] saved s^t, ACC dtype
    vprev_ptr,  # [B, R, J, M] saved V^{t-1} (V^0 = 0), ACC dtype
    lse_ptr,  # [B, R, J] saved log-sum-exp over i of the logits (only if SOFTMAX_IN)
    I,  # noqa: E741 (the shape letter used everywhere)
    J,
    M,
    R,
    N: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    SOFTMAX_IN: tl.constexpr,
    ACC: tl.constexpr,
):
    """All R routing iterations of one sample (program b), one sweep over I per iteration.

    Logits are p + u_hat . V^{t-1}, so the only state between sweeps is V (J x M). With the
    softmax over input capsules, each sweep keeps a running max and sum per j and rescales the
    partial weighted sum when the max grows (flash-attention's online softmax).
    """
    b = tl.program_id(0).to(tl.int64)
    u_row_ptr = u_ptr + b * I * N
    offs_j = tl.arange(0, BLOCK_J)
    offs_m = tl.arange(0, BLOCK_M)
    mask_j = offs_j < J
    mask_m = offs_m < M
    jm_offs = offs_j[:, None] * M + offs_m[None, :]
    jm_mask = mask_j[:, None] & mask_m[None, :]

    v_sum = tl.zeros([BLOCK_J, BLOCK_M], dtype=ACC)
    v = tl.zeros([BLOCK_J, BLOCK_M], dtype=ACC)
    for t in range(R):
        state = (b * R + t) * J
        tl.store(vprev_ptr + state * M + jm_offs, v_sum, mask=jm_mask)
        s_acc = tl.zeros([BLOCK_J, BLOCK_M], dtype=ACC)
        run_max = tl.full([BLOCK_J], float("-inf"), dtype=ACC)
        run_sum = tl.zeros([BLOCK_J], dtype=ACC)
        for i_start in range(0, I, BLOCK_I):
            offs_i = i_start + tl.arange(0, BLOCK_I)
            mask_i = offs_i < I
            u_hat = _u_hat_tile(
                u_row_ptr, w_ptr, offs_i, mask_i, offs_j, mask_j, offs_m, mask_m, J, M, N, ACC
            )
            logits = _logits_tile(
                u_hat, v_sum, prior_ptr, offs_i, mask_i, offs_j, mask_j, J, HAS_PRIOR
            )
            if SOFTMAX_IN:
                logits = tl.where(mask_i[:, None], logits, float("-inf"))
                new_max = tl.maximum(run_max, tl.max(logits, axis=0))
                # The first tile always holds a real capsule, so new_max is finite and
                # exp(-inf - new_max) = 0 clears the empty initial state.
                rescale = tl.exp(run_max - new_max)
                p = tl.exp(logits - new_max[None, :])
                run_sum = run_sum * rescale + tl.sum(p, axis=0)
                s_acc = s_acc * rescale[:, None] + tl.sum(p[:, :, None] * u_hat, axis=0)
                run_max = new_max
            else:
                c = _softmax_over_j(logits, mask_j)
                s_acc += tl.sum(c[:, :, None] * u_hat, axis=0)
        if SOFTMAX_IN:
            s = s_acc / run_sum[:, None]
            tl.store(lse_ptr + state + offs_j, run_max + tl.log(run_sum), mask=mask_j)
        else:
            s = s_acc
        tl.store(s_ptr + state * M + jm_offs, s, mask=jm_mask)
        v = _squash(s, SQUASH_EPS)
        v_sum += v
    tl.store(v_ptr + b * J * M + jm_offs, v.to(v_ptr.dtype.element_ty), mask=jm_mask)


@triton.jit
def routing_bwd_sweep_kernel(
    u_ptr,  # [B, I, N]
    w_ptr,  # [I, J, N, M]
    prior_ptr,  # [I, J] (unused unless HAS_PRIOR)
    grad_v_ptr,  # [B, J, M] dL/dv^R
    s_ptr,  # [B, R, J, M] saved s^t
    vprev_ptr,  # [B, R, J, M] saved V^{t-1}
    lse_ptr,  # [B, R, J] saved log-sum-exp (only if SOFTMAX_IN)
    ds_ptr,  # [B, R, J, M] output dL/ds^t, ACC dtype
    alpha_ptr,  # [B, R, I, J] output c^t_ij, ACC dtype
    beta_ptr,  # [B, R, I, J] output dL/dlogit^t_ij, ACC dtype
    I,  # noqa: E741 (the shape letter used everywhere)
    J,
    M,
    R,
    T_STOP,
    N: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    SOFTMAX_IN: tl.constexpr,
    ACC: tl.constexpr,
):
    """Backward sweeps t = R .. T_STOP (1-based) of one sample (program b).

    Sweep t needs D = dL/dV^t from the later sweeps, a reduction over all i, so the sweeps of a
    sample run in order. Each writes ds^t and the per-(i, j) scalars alpha = c^t and
    beta = dlogit^t, from which routing_bwd_grads_kernel forms du_hat without a B x I x J x M
    buffer.
    """
    b = tl.program_id(0).to(tl.int64)
    u_row_ptr = u_ptr + b * I * N
    offs_j = tl.arange(0, BLOCK_J)
    offs_m = tl.arange(0, BLOCK_M)
    mask_j = offs_j < J
    mask_m = offs_m < M
    jm_offs = offs_j[:, None] * M + offs_m[None, :]
    jm_mask = mask_j[:, None] & mask_m[None, :]

    grad_v = tl.load(grad_v_ptr + b * J * M + jm_offs, mask=jm_mask, other=0.0).to(ACC)
    d_later = tl.zeros([BLOCK_J, BLOCK_M], dtype=ACC)
    for k in range(R - T_STOP + 1):
        t = R - 1 - k
        state = (b * R + t) * J
        s = tl.load(s_ptr + state * M + jm_offs, mask=jm_mask, other=0.0).to(ACC)
        v_prev = tl.load(vprev_ptr + state * M + jm_offs, mask=jm_mask, other=0.0).to(ACC)
        dv = tl.where(k == 0, grad_v + d_later, d_later)
        ds = _squash_backward(s, dv, SQUASH_EPS)
        tl.store(ds_ptr + state * M + jm_offs, ds, mask=jm_mask)
        # Softmax over i: sum_i c_ij e_ij = ds_j . s_j.
        ds_dot_s = tl.sum(ds * s, axis=1)
        if SOFTMAX_IN:
            lse = tl.load(lse_ptr + state + offs_j, mask=mask_j, other=0.0).to(ACC)
        else:
            lse = tl.zeros([BLOCK_J], dtype=ACC)
        d_logit_v = tl.zeros([BLOCK_J, BLOCK_M], dtype=ACC)
        ij_base = (b * R + t) * I * J
        for i_start in range(0, I, BLOCK_I):
            offs_i = i_start + tl.arange(0, BLOCK_I)
            mask_i = offs_i < I
            u_hat = _u_hat_tile(
                u_row_ptr, w_ptr, offs_i, mask_i, offs_j, mask_j, offs_m, mask_m, J, M, N, ACC
            )
            logits = _logits_tile(
                u_hat, v_prev, prior_ptr, offs_i, mask_i, offs_j, mask_j, J, HAS_PRIOR
            )
            # e_ij = dL/dc_ij
            e = tl.sum(u_hat * ds[None, :, :], axis=2)
            if SOFTMAX_IN:
                logits = tl.where(mask_i[:, None], logits, float("-inf"))
                c = tl.exp(logits - lse[None, :])
                d_logit = c * (e - ds_dot_s[None, :])
            else:
                c = _softmax_over_j(logits, mask_j)
                d_logit = c * (e - tl.sum(c * e, axis=1)[:, None])
            ij_offs = ij_base + offs_i[:, None] * J + offs_j[None, :]
            ij_mask = mask_i[:, None] & mask_j[None, :]
            tl.store(alpha_ptr + ij_offs, c, mask=ij_mask)
            tl.store(beta_ptr + ij_offs, d_logit, mask=ij_mask)
            d_logit_v += tl.sum(d_logit[:, :, None] * u_hat, axis=0)
        d_later += d_logit_v


@triton.jit
def routing_bwd_grads_kernel(
    u_ptr,  # [B, I, N]
    w_ptr,  # [I, J, N, M]
    ds_ptr,  # [B, R, J, M]
    vprev_ptr,  # [B, R, J, M]
    alpha_ptr,  # [B, R, I, J]
    beta_ptr,  # [B, R, I, J]
    du_ptr,  # [B, I, N] output (if NEED_DU)
    dw_ptr,  # [I, J, N, M] output (if NEED_DW)
    dprior_ptr,  # [I, J] output (if NEED_DPRIOR)
    B,
    I,  # noqa: E741 (the shape letter used everywhere)
    J,
    M,
    R,
    N: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NEED_DU: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DPRIOR: tl.constexpr,
    DETACH_INNER: tl.constexpr,
    ACC: tl.constexpr,
):
    """du, dW and dprior for the input capsules of one block (program), looping over the batch.

    du_hat_ij = sum_t alpha^t_ij ds^t_j + beta^t_ij V^{t-1}_j (only alpha^R ds^R with
    detach_inner). The (n, m) pair is flattened to one axis k = n * BLOCK_M + m so that W,
    du_hat (repeated over n) and the dW accumulator share one [BLOCK_I, BLOCK_J, BLOCK_N *
    BLOCK_M] layout. dW and dprior are summed over b in a fixed order: deterministic, no atomics.
    """
    BLOCK_K: tl.constexpr = BLOCK_N * BLOCK_M
    pid = tl.program_id(0)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < I
    offs_j = tl.arange(0, BLOCK_J)
    mask_j = offs_j < J
    offs_k = tl.arange(0, BLOCK_K)
    n_of_k = offs_k // BLOCK_M
    m_of_k = offs_k % BLOCK_M
    mask_k = (n_of_k < N) & (m_of_k < M)

    w_offs = (
        offs_i.to(tl.int64)[:, None, None] * (J * N * M)
        + (offs_j * (N * M))[None, :, None]
        + (n_of_k * M + m_of_k)[None, None, :]
    )
    w_mask = mask_i[:, None, None] & mask_j[None, :, None] & mask_k[None, None, :]
    jk_offs = offs_j[:, None] * M + m_of_k[None, :]
    jk_mask = mask_j[:, None] & mask_k[None, :]
    ij_offs = offs_i[:, None] * J + offs_j[None, :]
    ij_mask = mask_i[:, None] & mask_j[None, :]
    ik_offs = offs_i[:, None] * N + n_of_k[None, :]
    ik_mask = mask_i[:, None] & (n_of_k < N)[None, :]
    offs_n = tl.arange(0, BLOCK_N)
    in_offs = offs_i[:, None] * N + offs_n[None, :]
    in_mask = mask_i[:, None] & (offs_n < N)[None, :]

    if NEED_DU:
        w = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0).to(ACC)
    dw_acc = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_K], dtype=ACC)
    dprior_acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=ACC)
    if DETACH_INNER:
        t_first = R - 1
    else:
        t_first = 0
    zero64 = tl.full([], 0, dtype=tl.int64)
    for b in range(B):
        # int64 batch offsets: B * I * N and B * R * I * J can pass 2^31.
        b64 = zero64 + b
        if NEED_DU or NEED_DW:
            du_hat = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_K], dtype=ACC)
            for t in range(t_first, R):
                state = b64 * R + t
                alpha = tl.load(alpha_ptr + state * I * J + ij_offs, mask=ij_mask, other=0.0)
                ds = tl.load(ds_ptr + state * J * M + jk_offs, mask=jk_mask, other=0.0)
                du_hat += alpha.to(ACC)[:, :, None] * ds.to(ACC)[None, :, :]
                if not DETACH_INNER:
                    beta = tl.load(beta_ptr + state * I * J + ij_offs, mask=ij_mask, other=0.0)
                    v_prev = tl.load(vprev_ptr + state * J * M + jk_offs, mask=jk_mask, other=0.0)
                    du_hat += beta.to(ACC)[:, :, None] * v_prev.to(ACC)[None, :, :]
            if NEED_DU:
                du_k = tl.sum(w * du_hat, axis=1)
                du = tl.sum(tl.reshape(du_k, [BLOCK_I, BLOCK_N, BLOCK_M]), axis=2)
                tl.store(
                    du_ptr + b64 * I * N + in_offs,
                    du.to(du_ptr.dtype.element_ty),
                    mask=in_mask,
                )
            if NEED_DW:
                u_k = tl.load(u_ptr + b64 * I * N + ik_offs, mask=ik_mask, other=0.0).to(ACC)
                dw_acc += u_k[:, None, :] * du_hat
        if NEED_DPRIOR:
            for t in range(R):
                state = b64 * R + t
                beta = tl.load(beta_ptr + state * I * J + ij_offs, mask=ij_mask, other=0.0)
                dprior_acc += beta.to(ACC)
    if NEED_DW:
        tl.store(dw_ptr + w_offs, dw_acc.to(dw_ptr.dtype.element_ty), mask=w_mask)
    if NEED_DPRIOR:
        tl.store(dprior_ptr + ij_offs, dprior_acc.to(dprior_ptr.dtype.element_ty), mask=ij_mask)
