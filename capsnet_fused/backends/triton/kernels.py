"""Triton kernels for fused dynamic routing (math and decomposition: docs/ROUTING-MATH.md).

Shape letters: B batch, I input capsules, J output capsules, N input pose size, M output pose
size, R routing iterations; k is a 0-based iteration index (iteration t = k + 1 of the paper).
BLOCK_J, BLOCK_M, BLOCK_N are J, M, N padded to powers of two; padded lanes are masked on every
load and store. Every kernel loads its inputs in their own dtype and computes in ACC (float32,
or float64 for float64 inputs): the Triton interpreter does bfloat16 arithmetic on the raw bit
pattern, and a GPU should accumulate in float32 anyway.

The work is split so that no program walks the whole problem alone and every weight block is
loaded once per tile of samples (see capsnet_fused/backends/triton/launch.py for the launch order):

    first_sweep_kernel   iteration 1: couplings do not depend on the sample, so s^1 is a GEMM
                         u [B, I*N] x (c1 * W) [I*N, J*M], split over K; writes partial s
    sweep_kernel         iterations 2..R: tiles of (BLOCK_B samples x BLOCK_I capsules),
                         u_hat recomputed per tile and never stored; writes partial s (and
                         partial max / sum for the softmax over input capsules)
    combine_kernel       per (b, j): partials summed in block order, squash, V^t; saves s^t,
                         V^{t-1}, lse^t
    combine_back_kernel  per (b, j): dL/dV carry D += partials of A, ds^t = squash'(s^t, dv)
    sweep_back_kernel    iteration t backward over the same tiles: couplings alpha^t and logit
                         gradients beta^t [B, R, I, J], partial A = sum_i beta u_hat
    grads_kernel         per block of capsules, over all samples in order: du_hat from alpha,
                         beta, ds and V, then du, dW and dprior (owner computes, no atomics)

Partial sums live in [NPART, B, J, M] buffers and are combined in a fixed order, so results are
deterministic and no kernel uses float atomics.
"""

import triton
import triton.language as tl


@triton.jit
def _u_hat_tile(
    u_ptr,
    w_ptr,
    offs_b,
    mask_b,
    offs_i,
    mask_i,
    offs_j,
    mask_j,
    offs_m,
    mask_m,
    I,  # noqa: E741 (the shape letter used everywhere)
    J,
    M,
    N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_IS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ACC: tl.constexpr,
):
    """u_hat [BLOCK_B, BLOCK_IS, BLOCK_J, BLOCK_M] for samples offs_b and capsules offs_i.

    Each W[i, :, n, :] slice is loaded once and used for every sample of the tile. A static loop
    over n keeps the tile 4-D: the contraction over N is a few FMAs per element, too small for
    tl.dot, and needs no cross-thread reduction.
    """
    # int64: I * J * N * M and B * I * N can pass 2^31 for wide layers.
    w_offs = (
        offs_i.to(tl.int64)[:, None, None] * (J * N * M)
        + (offs_j * (N * M))[None, :, None]
        + offs_m[None, None, :]
    )
    w_mask = mask_i[:, None, None] & mask_j[None, :, None] & mask_m[None, None, :]
    u_offs = offs_b.to(tl.int64)[:, None] * (I * N) + offs_i[None, :] * N
    u_mask = mask_b[:, None] & mask_i[None, :]
    u_hat = tl.zeros([BLOCK_B, BLOCK_IS, BLOCK_J, BLOCK_M], dtype=ACC)
    for n in range(N):
        u_n = tl.load(u_ptr + u_offs + n, mask=u_mask, other=0.0).to(ACC)
        w_n = tl.load(w_ptr + w_offs + n * M, mask=w_mask, other=0.0).to(ACC)
        u_hat += u_n[:, :, None, None] * w_n[None, :, :, :]
    return u_hat


@triton.jit
def _bjm_offsets(offs_b, mask_b, offs_j, mask_j, offs_m, mask_m, J, M, R, k):
    """Offsets and mask of [BLOCK_B, BLOCK_J, BLOCK_M] in a [B, R, J, M] state at iteration k."""
    offs = (
        (offs_b.to(tl.int64) * R + k)[:, None, None] * (J * M)
        + (offs_j * M)[None, :, None]
        + offs_m[None, None, :]
    )
    mask = mask_b[:, None, None] & mask_j[None, :, None] & mask_m[None, None, :]
    return offs, mask


@triton.jit
def _bij_offsets(offs_b, mask_b, offs_i, mask_i, offs_j, mask_j, I, J, R, k):  # noqa: E741
    """Offsets and mask of [BLOCK_B, BLOCK_IS, BLOCK_J] in a [B, R, I, J] buffer at iteration k."""
    offs = (
        (offs_b.to(tl.int64) * R + k)[:, None, None] * (I * J)
        + (offs_i * J)[None, :, None]
        + offs_j[None, None, :]
    )
    mask = mask_b[:, None, None] & mask_i[None, :, None] & mask_j[None, None, :]
    return offs, mask


@triton.jit
def _prior_tile(prior_ptr, offs_i, mask_i, offs_j, mask_j, J, ACC: tl.constexpr):
    """prior [1, BLOCK_IS, BLOCK_J] of the capsules offs_i (0 where masked)."""
    prior_offs = offs_i[:, None] * J + offs_j[None, :]
    prior_mask = mask_i[:, None] & mask_j[None, :]
    return tl.load(prior_ptr + prior_offs, mask=prior_mask, other=0.0).to(ACC)[None, :, :]


@triton.jit
def _logits(u_hat, v_prev, prior_ptr, offs_i, mask_i, offs_j, mask_j, J, HAS_PRIOR: tl.constexpr):
    """logits [BLOCK_B, BLOCK_IS, BLOCK_J] = prior + u_hat . V^{t-1}."""
    logits = tl.sum(u_hat * v_prev[:, None, :, :], axis=3)
    if HAS_PRIOR:
        logits += _prior_tile(prior_ptr, offs_i, mask_i, offs_j, mask_j, J, logits.dtype)
    return logits


@triton.jit
def _softmax_over_j(logits, mask_j, LEAKY: tl.constexpr):
    """Couplings of each (sample, input capsule) over the output capsules (padded j get 0).

    LEAKY: one more logit, fixed at 0, joins the softmax and its share is dropped.
    """
    logits = tl.where(mask_j[None, None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=2)
    if LEAKY:
        row_max = tl.maximum(row_max, 0.0)
    p = tl.exp(logits - row_max[:, :, None])
    total = tl.sum(p, axis=2)
    if LEAKY:
        total += tl.exp(-row_max)
    return p / total[:, :, None]


@triton.jit
def _squash_scales(s, eps):
    """Overflow-safe pieces of squash for the rows of s [ROWS, BLOCK_M] (docs/ROUTING-MATH.md).

    With a = max |s|, t = s / a, qt = |t|^2 and r = 1 / a^2 (inf for tiny a, 0 for huge a):
    v = g t with g = 1 / (1 + r / qt) / sqrt(qt + eps r), equal to |s|^2 / (1 + |s|^2) *
    s / sqrt(|s|^2 + eps) without forming |s|^2, which overflows float32 once |s| > 1.8e19
    (and the textbook denominator (1 + q) sqrt(q + eps) once |s| > 7e12). Returns (nonzero, a,
    t, qt, r, er, g) with er = eps r (0 when eps = 0, also where r is inf). A NaN or Inf in a
    row makes its a NaN (max() alone would skip a NaN), so it spreads over the row as in the
    reference; rows that are all zero (nonzero false) are the caller's (see _squash_at_zero).
    """
    a = tl.max(tl.abs(s), axis=1) + tl.sum(s * 0.0, axis=1)
    nonzero = a != 0
    safe_a = tl.where(nonzero, a, 1.0)
    t = s / safe_a[:, None]
    qt = tl.where(nonzero, tl.sum(t * t, axis=1), 1.0)
    r = 1.0 / (safe_a * safe_a)
    er = tl.where(eps > 0, eps * r, 0.0)
    g = 1.0 / (1.0 + r / qt) / tl.sqrt(qt + er)
    return nonzero, safe_a, t, qt, r, er, g


@triton.jit
def _squash_at_zero(eps):
    """v and ds of an all-zero capsule: the limit 0 for eps > 0; NaN for the eps-free squash
    (0/0, as in the published implementations without eps)."""
    return tl.where(eps > 0, 0.0, float("nan"))


@triton.jit
def _squash(s, eps):
    """v = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps) for the rows of s [ROWS, BLOCK_M]."""
    nonzero, a, t, qt, r, er, g = _squash_scales(s, eps)
    return tl.where(nonzero[:, None], g[:, None] * t, _squash_at_zero(eps))


@triton.jit
def _squash_backward(s, dv, eps):
    """ds = dL/ds for the rows of s [ROWS, BLOCK_M] given dv = dL/dv.

    With f = g / a the squash factor (v = f s) and h = a^2 f' / f =
    1/qt - 1/(r + qt) - 1/(2 (qt + eps r)): ds = f dv + 2 f' (s . dv) s = f (dv + 2 h (t . dv) t).
    """
    nonzero, a, t, qt, r, er, g = _squash_scales(s, eps)
    h = 1.0 / qt - 1.0 / (r + qt) - 0.5 / (qt + er)
    t_dot_dv = tl.sum(t * dv, axis=1)
    ds = (g / a)[:, None] * (dv + (2.0 * h * t_dot_dv)[:, None] * t)
    return tl.where(nonzero[:, None], ds, _squash_at_zero(eps))


@triton.jit
def first_sweep_kernel(
    u_ptr,  # [B, I, N], read as [B, I*N]
    w_ptr,  # [I, J, N, M], read as [I*N, J*M]
    c1_ptr,  # [I, J] first-iteration couplings (only if HAS_C1; uniform otherwise)
    part_s_ptr,  # [NPART, B, J, M] output: partial s^1 (unscaled when uniform)
    B,
    I,  # noqa: E741 (the shape letter used everywhere)
    J,
    M,
    K_PER_SPLIT,  # a multiple of BLOCK_K: the reduction range of one split
    N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_C1: tl.constexpr,
    ACC: tl.constexpr,
):
    """Partial s^1[b, (j, m)] = sum over the split's k = (i, n) of u[b, k] c1[i, j] W[k, (j, m)].

    Program (b tile, column tile, split): a [BLOCK_B, BLOCK_C] block of the GEMM, its W tiles
    loaded once for all BLOCK_B samples. Columns are (j, m) flattened, so J is not padded.
    """
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < J * M
    j_of_c = offs_c // M
    m_of_c = offs_c % M
    k_start = pid_s * K_PER_SPLIT
    k_stop = tl.minimum(k_start + K_PER_SPLIT, I * N)
    u_rows = offs_b.to(tl.int64)[:, None] * (I * N)
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=ACC)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_stop
        i_of_k = offs_k // N
        n_of_k = offs_k % N
        u_tile = tl.load(
            u_ptr + u_rows + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0
        ).to(ACC)
        w_offs = (
            i_of_k.to(tl.int64)[:, None] * (J * N * M)
            + (n_of_k * M)[:, None]
            + (j_of_c * (N * M) + m_of_c)[None, :]
        )
        kc_mask = mask_k[:, None] & mask_c[None, :]
        w_tile = tl.load(w_ptr + w_offs, mask=kc_mask, other=0.0).to(ACC)
        if HAS_C1:
            c1_offs = i_of_k[:, None] * J + j_of_c[None, :]
            w_tile *= tl.load(c1_ptr + c1_offs, mask=kc_mask, other=0.0).to(ACC)
        acc = tl.dot(u_tile, w_tile, acc, input_precision="ieee", out_dtype=ACC)
    out_offs = (pid_s * B + offs_b.to(tl.int64))[:, None] * (J * M) + offs_c[None, :]
    tl.store(part_s_ptr + out_offs, acc, mask=mask_b[:, None] & mask_c[None, :])


@triton.jit
def sweep_kernel(
    u_ptr,  # [B, I, N]
    w_ptr,  # [I, J, N, M]
    prior_ptr,  # [I, J] (only if HAS_PRIOR)
    vprev_ptr,  # [B, R, J, M] V^{t-1} at iteration k, written by the previous combine
    part_s_ptr,  # [NPART, B, J, M] output: partial weighted sums
    part_max_ptr,  # [NPART, B, J] output: partial max of the logits over i (SOFTMAX_IN)
    part_sum_ptr,  # [NPART, B, J] output: partial sum of exp(logit - max) (SOFTMAX_IN)
    B,
    I,  # noqa: E741 (the shape letter used everywhere)
    J,
    M,
    R,
    k,  # 0-based iteration, >= 1
    N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_IS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    SOFTMAX_IN: tl.constexpr,
    LEAKY: tl.constexpr,
    ACC: tl.constexpr,
):
    """Forward sweep of iteration k over one tile: BLOCK_B samples x BLOCK_I input capsules.

    The tile's capsules are visited BLOCK_IS at a time; each W[i] is loaded once for the tile's
    samples. With the softmax over output capsules the couplings are local to (b, i); over input
    capsules a running max and sum per (b, j) rescale the partial sum when the max grows (flash
    attention's online softmax), and the combine merges the tiles' (max, sum, s) triples (and
    adds the leaky logit, once per (b, j)).
    """
    pid_i = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_j = tl.arange(0, BLOCK_J)
    mask_j = offs_j < J
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    state_offs, state_mask = _bjm_offsets(
        offs_b, mask_b, offs_j, mask_j, offs_m, mask_m, J, M, R, k
    )
    v_prev = tl.load(vprev_ptr + state_offs, mask=state_mask, other=0.0)

    s_acc = tl.zeros([BLOCK_B, BLOCK_J, BLOCK_M], dtype=ACC)
    run_max = tl.full([BLOCK_B, BLOCK_J], float("-inf"), dtype=ACC)
    run_sum = tl.zeros([BLOCK_B, BLOCK_J], dtype=ACC)
    i_start = pid_i * BLOCK_I
    i_stop = tl.minimum(i_start + BLOCK_I, I)
    for i0 in range(i_start, i_stop, BLOCK_IS):
        offs_i = i0 + tl.arange(0, BLOCK_IS)
        mask_i = offs_i < i_stop
        u_hat = _u_hat_tile(
            u_ptr, w_ptr, offs_b, mask_b, offs_i, mask_i, offs_j, mask_j, offs_m, mask_m,
            I, J, M, N, BLOCK_B, BLOCK_IS, BLOCK_J, BLOCK_M, ACC,
        )  # fmt: skip
        logits = _logits(u_hat, v_prev, prior_ptr, offs_i, mask_i, offs_j, mask_j, J, HAS_PRIOR)
        if SOFTMAX_IN:
            logits = tl.where(mask_i[None, :, None], logits, float("-inf"))
            # The first step always holds a real capsule, so new_max is finite and
            # exp(-inf - new_max) = 0 clears the empty initial state.
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            rescale = tl.exp(run_max - new_max)
            p = tl.exp(logits - new_max[:, None, :])
            run_sum = run_sum * rescale + tl.sum(p, axis=1)
            s_acc = s_acc * rescale[:, :, None] + tl.sum(p[:, :, :, None] * u_hat, axis=1)
            run_max = new_max
        else:
            c = _softmax_over_j(logits, mask_j, LEAKY)
            s_acc += tl.sum(c[:, :, :, None] * u_hat, axis=1)

    part_row = pid_i * B + offs_b.to(tl.int64)
    jm_offs = (offs_j * M)[:, None] + offs_m[None, :]
    tl.store(
        part_s_ptr + part_row[:, None, None] * (J * M) + jm_offs[None, :, :], s_acc, mask=state_mask
    )
    if SOFTMAX_IN:
        bj_offs = part_row[:, None] * J + offs_j[None, :]
        bj_mask = mask_b[:, None] & mask_j[None, :]
        tl.store(part_max_ptr + bj_offs, run_max, mask=bj_mask)
        tl.store(part_sum_ptr + bj_offs, run_sum, mask=bj_mask)


@triton.jit
def _rows(B, J, ROWS: tl.constexpr):
    """The (b, j) rows r = b * J + j of this combine program: (r, b, j, mask)."""
    offs_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask_r = offs_r < B * J
    return offs_r.to(tl.int64), (offs_r // J).to(tl.int64), offs_r % J, mask_r


@triton.jit
def combine_kernel(
    part_s_ptr,  # [NPART, B, J, M]
    part_max_ptr,  # [NPART, B, J] (SOFTMAX_IN and not FIRST)
    part_sum_ptr,  # [NPART, B, J] (SOFTMAX_IN and not FIRST)
    lse1_ptr,  # [J] log-sum-exp over i of the first logits (SOFTMAX_IN, FIRST and HAS_LSE1)
    bias_ptr,  # [J, M] added to s before the squash (HAS_BIAS)
    s_ptr,  # [B, R, J, M] output: the squash input s^t (+ bias)
    vprev_ptr,  # [B, R, J, M] V^{t-1} at k (read; zeros written when FIRST), V^t at k + 1
    lse_ptr,  # [B, R, J] output (SOFTMAX_IN)
    v_ptr,  # [B, J, M] output v^R, input dtype (only when LAST)
    B,
    J,
    M,
    R,
    k,
    NPART,
    DIVISOR,  # divides the summed partials: J or I (+1 if leaky) for uniform first couplings
    eps,  # of the squash
    ROWS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SOFTMAX_IN: tl.constexpr,
    FIRST: tl.constexpr,
    HAS_LSE1: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LEAKY: tl.constexpr,
    LAST: tl.constexpr,
    ACC: tl.constexpr,
):
    """ROWS (b, j) pairs of iteration k: s from the partials, squash, V^t = V^{t-1} + v^t.

    The reduction over the partials axis is a tree of fixed shape for a given launch, so results
    are reproducible run to run. With the softmax over input capsules (after iteration 1) the
    partials are merged as in split-KV attention: s = sum_p e^(m_p - m) s_p / sum_p e^(m_p - m)
    l_p with m the largest partial max, and lse = m + log(sum_p e^(m_p - m) l_p) is saved.
    """
    offs_r, b, j, mask_r = _rows(B, J, ROWS)
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < NPART
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # Partial p of row r = b * J + j sits at row p * B * J + r of the [NPART * B * J, M] buffer.
    part_rows = offs_p.to(tl.int64)[None, :] * (B * J) + offs_r[:, None]
    rp_mask = mask_r[:, None] & mask_p[None, :]
    parts = tl.load(
        part_s_ptr + part_rows[:, :, None] * M + offs_m[None, None, :],
        mask=rp_mask[:, :, None] & mask_m[None, None, :],
        other=0.0,
    )
    if SOFTMAX_IN and not FIRST:
        part_max = tl.load(part_max_ptr + part_rows, mask=rp_mask, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + part_rows, mask=rp_mask, other=0.0)
        # Rows past B * J get top 0 and total 1: their lanes stay finite (and unstored).
        top = tl.where(mask_r, tl.max(part_max, axis=1), 0.0)
        if LEAKY:
            # The extra logit 0 on the input-capsule axis: one more term, once per (b, j).
            top = tl.maximum(top, 0.0)
        weight = tl.where(rp_mask, tl.exp(part_max - top[:, None]), 0.0)
        total = tl.where(mask_r, tl.sum(weight * part_sum, axis=1), 1.0)
        if LEAKY:
            total += tl.where(mask_r, tl.exp(-top), 0.0)
        s = tl.sum(weight[:, :, None] * parts, axis=1) / total[:, None]
        lse = top + tl.log(total)
    else:
        # An int, not a float: float arguments are float32 and would round 1/J for float64.
        s = tl.sum(parts, axis=1) / DIVISOR
        if SOFTMAX_IN:
            if HAS_LSE1:
                lse = tl.load(lse1_ptr + j, mask=mask_r, other=0.0)
            else:
                # Uniform first logits (all 0): lse = log(I).
                lse = tl.log(tl.zeros([ROWS], dtype=ACC) + DIVISOR)
    state = (b * R + k) * J + j
    state_offs = state[:, None] * M + offs_m[None, :]
    rm_mask = mask_r[:, None] & mask_m[None, :]
    if HAS_BIAS:
        bias_offs = j[:, None] * M + offs_m[None, :]
        s += tl.load(bias_ptr + bias_offs, mask=rm_mask, other=0.0).to(ACC)
    tl.store(s_ptr + state_offs, s, mask=rm_mask)
    if SOFTMAX_IN:
        tl.store(lse_ptr + state, lse, mask=mask_r)
    v = _squash(s, eps)
    if FIRST:
        v_prev = tl.zeros([ROWS, BLOCK_M], dtype=ACC)
        tl.store(vprev_ptr + state_offs, v_prev, mask=rm_mask)
    else:
        v_prev = tl.load(vprev_ptr + state_offs, mask=rm_mask, other=0.0)
    if LAST:
        out_offs = offs_r[:, None] * M + offs_m[None, :]
        tl.store(v_ptr + out_offs, v.to(v_ptr.dtype.element_ty), mask=rm_mask)
    else:
        tl.store(vprev_ptr + state_offs + J * M, v_prev + v, mask=rm_mask)


@triton.jit
def combine_back_kernel(
    part_a_ptr,  # [NPART, B, J, M] partial A of sweep k + 1 (READ_A)
    carry_ptr,  # [B, J, M] dL/dV carried from iterations after k (READ_CARRY / WRITE_CARRY)
    grad_v_ptr,  # [B, J, M] dL/dv^R (only at k = R - 1)
    s_ptr,  # [B, R, J, M] saved s^t
    ds_ptr,  # [B, R, J, M] output dL/ds^t at k
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
    READ_A: tl.constexpr,
    READ_CARRY: tl.constexpr,
    WRITE_CARRY: tl.constexpr,
    ACC: tl.constexpr,
):
    """ROWS (b, j) pairs of backward iteration k: D += sum_p A_p, ds^t = squash'(s^t, dv).

    D is dL/dV^{t+1} from the logits of the later iterations (they read V^{t'} = V^{t+1} + ...),
    so dL/dv^t = D, plus the upstream gradient at the last iteration.
    """
    offs_r, b, j, mask_r = _rows(B, J, ROWS)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rm_mask = mask_r[:, None] & mask_m[None, :]
    row_offs = offs_r[:, None] * M + offs_m[None, :]
    if READ_CARRY:
        carry = tl.load(carry_ptr + row_offs, mask=rm_mask, other=0.0)
    else:
        carry = tl.zeros([ROWS, BLOCK_M], dtype=ACC)
    if READ_A:
        offs_p = tl.arange(0, BLOCK_P)
        mask_p = offs_p < NPART
        part_rows = offs_p.to(tl.int64)[None, :] * (B * J) + offs_r[:, None]
        parts = tl.load(
            part_a_ptr + part_rows[:, :, None] * M + offs_m[None, None, :],
            mask=(mask_r[:, None] & mask_p[None, :])[:, :, None] & mask_m[None, None, :],
            other=0.0,
        )
        carry += tl.sum(parts, axis=1)
    if WRITE_CARRY:
        tl.store(carry_ptr + row_offs, carry, mask=rm_mask)
    if k == R - 1:
        dv = carry + tl.load(grad_v_ptr + row_offs, mask=rm_mask, other=0.0).to(ACC)
    else:
        dv = carry
    state_offs = ((b * R + k) * J + j)[:, None] * M + offs_m[None, :]
    s = tl.load(s_ptr + state_offs, mask=rm_mask, other=0.0)
    tl.store(ds_ptr + state_offs, _squash_backward(s, dv, eps), mask=rm_mask)


@triton.jit
def sweep_back_kernel(
    u_ptr,  # [B, I, N]
    w_ptr,  # [I, J, N, M]
    prior_ptr,  # [I, J] (only if HAS_PRIOR)
    vprev_ptr,  # [B, R, J, M] saved V^{t-1}
    s_ptr,  # [B, R, J, M] saved squash input s^t + bias (SOFTMAX_IN)
    bias_ptr,  # [J, M] (SOFTMAX_IN and HAS_BIAS)
    ds_ptr,  # [B, R, J, M] dL/ds^t from combine_back_kernel
    lse_ptr,  # [B, R, J] saved log-sum-exp over i (SOFTMAX_IN)
    alpha_ptr,  # [B, R, I, J] output c^t (STORE_ALPHA)
    beta_ptr,  # [B, R, I, J] output dL/dlogit^t (NEED_BETA)
    part_a_ptr,  # [NPART, B, J, M] output: partial sum_i beta u_hat (NEED_A)
    B,
    I,  # noqa: E741 (the shape letter used everywhere)
    J,
    M,
    R,
    k,
    N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_IS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    SOFTMAX_IN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LEAKY: tl.constexpr,
    FIRST: tl.constexpr,
    STORE_ALPHA: tl.constexpr,
    NEED_BETA: tl.constexpr,
    NEED_A: tl.constexpr,
    ACC: tl.constexpr,
):
    """Backward sweep of iteration k over one tile (same tiling as sweep_kernel).

    Recomputes u_hat, the logits and c^t; e = u_hat . ds^t = dL/dc; the logit gradient is
    c (e - sum_j c e) for the softmax over output capsules and c (e - ds^t . s^t) over input
    capsules (sum_i c_ij e_ij = ds_j . s_j). Stores alpha = c^t and beta = dlogit^t for
    grads_kernel and writes the tile's partial A = sum_i beta u_hat (dL/dV^{t-1} via the logits).
    FIRST (k = 0) runs only for the prior's gradient: V^0 = 0, so its logits are the prior.
    """
    pid_i = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_j = tl.arange(0, BLOCK_J)
    mask_j = offs_j < J
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    state_offs, state_mask = _bjm_offsets(
        offs_b, mask_b, offs_j, mask_j, offs_m, mask_m, J, M, R, k
    )
    v_prev = tl.load(vprev_ptr + state_offs, mask=state_mask, other=0.0)
    ds = tl.load(ds_ptr + state_offs, mask=state_mask, other=0.0)
    if SOFTMAX_IN:
        # sum_i c_ij e_ij = ds_j . sum_i c_ij u_hat_ij, the saved squash input less the bias.
        s = tl.load(s_ptr + state_offs, mask=state_mask, other=0.0)
        if HAS_BIAS:
            jm_bias = (offs_j * M)[:, None] + offs_m[None, :]
            jm_bias_mask = mask_j[:, None] & mask_m[None, :]
            s -= tl.load(bias_ptr + jm_bias, mask=jm_bias_mask, other=0.0).to(ACC)[None, :, :]
        ds_dot_s = tl.sum(ds * s, axis=2)
        bj_offs = (offs_b.to(tl.int64) * R + k)[:, None] * J + offs_j[None, :]
        lse = tl.load(lse_ptr + bj_offs, mask=mask_b[:, None] & mask_j[None, :], other=0.0)

    a_acc = tl.zeros([BLOCK_B, BLOCK_J, BLOCK_M], dtype=ACC)
    i_start = pid_i * BLOCK_I
    i_stop = tl.minimum(i_start + BLOCK_I, I)
    for i0 in range(i_start, i_stop, BLOCK_IS):
        offs_i = i0 + tl.arange(0, BLOCK_IS)
        mask_i = offs_i < i_stop
        u_hat = _u_hat_tile(
            u_ptr, w_ptr, offs_b, mask_b, offs_i, mask_i, offs_j, mask_j, offs_m, mask_m,
            I, J, M, N, BLOCK_B, BLOCK_IS, BLOCK_J, BLOCK_M, ACC,
        )  # fmt: skip
        if FIRST:
            # V^0 = 0: the logits are the prior (this sweep runs only for its gradient).
            logits = _prior_tile(prior_ptr, offs_i, mask_i, offs_j, mask_j, J, ACC)
            logits = tl.broadcast_to(logits, [BLOCK_B, BLOCK_IS, BLOCK_J])
        else:
            logits = _logits(u_hat, v_prev, prior_ptr, offs_i, mask_i, offs_j, mask_j, J, HAS_PRIOR)
        if SOFTMAX_IN:
            c = tl.where(mask_j[None, None, :], tl.exp(logits - lse[:, None, :]), 0.0)
        else:
            c = _softmax_over_j(logits, mask_j, LEAKY)
        bij_offs, bij_mask = _bij_offsets(
            offs_b, mask_b, offs_i, mask_i, offs_j, mask_j, I, J, R, k
        )
        if STORE_ALPHA:
            tl.store(alpha_ptr + bij_offs, c, mask=bij_mask)
        if NEED_BETA:
            e = tl.sum(u_hat * ds[:, None, :, :], axis=3)
            if SOFTMAX_IN:
                beta = c * (e - ds_dot_s[:, None, :])
            else:
                beta = c * (e - tl.sum(c * e, axis=2)[:, :, None])
            tl.store(beta_ptr + bij_offs, beta, mask=bij_mask)
            if NEED_A:
                a_acc += tl.sum(beta[:, :, :, None] * u_hat, axis=1)
    if NEED_A:
        part_row = pid_i * B + offs_b.to(tl.int64)
        jm_offs = (offs_j * M)[:, None] + offs_m[None, :]
        part_offs = part_row[:, None, None] * (J * M) + jm_offs[None, :, :]
        tl.store(part_a_ptr + part_offs, a_acc, mask=state_mask)


@triton.jit
def grads_kernel(
    u_ptr,  # [B, I, N]
    w_ptr,  # [I, J, N, M]
    c1_ptr,  # [I, J] first-iteration couplings (only if HAS_C1; else 1 / C1_DIVISOR)
    ds_ptr,  # [B, R, J, M]
    vprev_ptr,  # [B, R, J, M]
    alpha_ptr,  # [B, R, I, J] (iterations k >= 1)
    beta_ptr,  # [B, R, I, J] (k >= 1; k = 0 too with NEED_DPRIOR)
    du_ptr,  # [B, I, N] output (NEED_DU): the sum over this program's j, at row pid_j of
    # [J blocks, B, I, N] partials when the output capsules are split over programs
    dw_ptr,  # [I, J, N, M] output (NEED_DW)
    dprior_ptr,  # [I, J] output (NEED_DPRIOR)
    B,
    I,  # noqa: E741 (the shape letter used everywhere)
    J,
    M,
    R,
    C1_DIVISOR,
    N: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_C1: tl.constexpr,
    NEED_DU: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DPRIOR: tl.constexpr,
    DETACH_INNER: tl.constexpr,
    ACC: tl.constexpr,
):
    """du, dW and dprior for a block of input capsules and output capsules, over the batch.

    du_hat[b, i, j] = c1_ij ds^1_bj + sum_{t >= 2} (alpha^t_bij ds^t_bj + beta^t_bij V^{t-1}_bj)
    (only alpha^R ds^R with detach_inner; beta^1 multiplies V^0 = 0). Program (pid_i, pid_j)
    owns dW and dprior of its capsules and output capsules and sums them over b in a fixed
    order: deterministic, no atomics; its du is the sum over its output capsules only. W and
    the dW accumulator stay in registers for the whole batch loop; every program reads ds and
    V of every sample, so the fewer capsule blocks the less traffic (hence the j split, which
    keeps eight capsules' W and dW within the registers).
    """
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < I
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < J
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    ij_offs = offs_i[:, None] * J + offs_j[None, :]
    ij_mask = mask_i[:, None] & mask_j[None, :]
    jm_offs = (offs_j * M)[:, None] + offs_m[None, :]
    jm_mask = mask_j[:, None] & mask_m[None, :]
    in_offs = offs_i[:, None] * N + offs_n[None, :]
    in_mask = mask_i[:, None] & mask_n[None, :]

    if NEED_DU:
        w_offs = (
            offs_i.to(tl.int64)[:, None, None, None] * (J * N * M)
            + (offs_j * (N * M))[None, :, None, None]
            + (offs_n * M)[None, None, :, None]
            + offs_m[None, None, None, :]
        )
        w_mask = (
            ij_mask[:, :, None, None] & mask_n[None, None, :, None] & mask_m[None, None, None, :]
        )
        w = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0).to(ACC)
    if HAS_C1:
        c1 = tl.load(c1_ptr + ij_offs, mask=ij_mask, other=0.0).to(ACC)
    else:
        c1 = tl.where(ij_mask, tl.full([BLOCK_I, BLOCK_J], 1.0, ACC) / C1_DIVISOR, 0.0)
    dw_acc = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_N, BLOCK_M], dtype=ACC)
    dprior_acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=ACC)
    if DETACH_INNER:
        k_first = R - 1
    else:
        k_first = 0
    zero64 = tl.full([], 0, dtype=tl.int64)
    for b in range(B):
        # int64 batch offsets: B * I * N and B * R * I * J can pass 2^31.
        b64 = zero64 + b
        if NEED_DU or NEED_DW:
            du_hat = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_M], dtype=ACC)
            for k in range(k_first, R):
                state = b64 * R + k
                ds = tl.load(ds_ptr + state * J * M + jm_offs, mask=jm_mask, other=0.0)
                if k == 0:
                    coef = c1
                else:
                    coef = tl.load(alpha_ptr + state * I * J + ij_offs, mask=ij_mask, other=0.0)
                du_hat += coef[:, :, None] * ds[None, :, :]
                if not DETACH_INNER:
                    if k > 0:
                        beta = tl.load(beta_ptr + state * I * J + ij_offs, mask=ij_mask, other=0.0)
                        v_prev = tl.load(
                            vprev_ptr + state * J * M + jm_offs, mask=jm_mask, other=0.0
                        )
                        du_hat += beta[:, :, None] * v_prev[None, :, :]
            if NEED_DU:
                du = tl.sum(tl.sum(w * du_hat[:, :, None, :], axis=3), axis=1)
                du_row = pid_j * B + b64
                tl.store(
                    du_ptr + du_row * I * N + in_offs, du.to(du_ptr.dtype.element_ty), mask=in_mask
                )
            if NEED_DW:
                u_b = tl.load(u_ptr + b64 * I * N + in_offs, mask=in_mask, other=0.0).to(ACC)
                dw_acc += u_b[:, None, :, None] * du_hat[:, :, None, :]
        if NEED_DPRIOR:
            for k in range(R):
                state = b64 * R + k
                dprior_acc += tl.load(beta_ptr + state * I * J + ij_offs, mask=ij_mask, other=0.0)
    if NEED_DW:
        # Offsets rebuilt in another order than the W load's (which the compiler would reuse):
        # a [BLOCK_I, BLOCK_J, BLOCK_N, BLOCK_M] offset tensor kept live through the batch loop
        # costs as many registers as W itself.
        row = (offs_i.to(tl.int64)[:, None] * J + offs_j[None, :]) * N
        dw_offs = (row[:, :, None] + offs_n[None, None, :])[:, :, :, None] * M + offs_m[
            None, None, None, :
        ]
        dw_mask = (
            (mask_i[:, None] & mask_j[None, :])[:, :, None, None]
            & mask_n[None, None, :, None]
            & mask_m[None, None, None, :]
        )
        tl.store(dw_ptr + dw_offs, dw_acc.to(dw_ptr.dtype.element_ty), mask=dw_mask)
    if NEED_DPRIOR:
        tl.store(dprior_ptr + ij_offs, dprior_acc.to(dprior_ptr.dtype.element_ty), mask=ij_mask)


@triton.jit
def sum_partials_kernel(
    part_ptr,  # [NPART, NUMEL]
    out_ptr,  # [NUMEL] output, its own dtype
    NPART,
    NUMEL,
    BLOCK: tl.constexpr,
):
    """out = sum over p of part[p] in order p = 0, 1, ... (the j blocks' du partials)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    zero64 = tl.full([], 0, dtype=tl.int64)
    for p in range(1, NPART):
        acc += tl.load(part_ptr + (zero64 + p) * NUMEL + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
