"""Launches, bytes and FLOPs of the CUDA kernels of the cpp backend (csrc/routing_cuda.cu).

Derived from the code, not measured: plan() is plan_routing() of routing_cuda.cu line by line
(tile choice and shrinking to the shared memory limit), launches() is the launch sequence of
routing_forward() / routing_backward(), and each launch's bytes and FLOPs are counted from its
kernel's loops. tests/test_cuda_traffic.py checks the grids, blocks and shared memory of every
launch against what the emulated kernels actually launch.

Counting rules:
  - bytes loaded: each element a block reads from global memory counts once per block (as if
    its L1 kept it), including reads the kernel repeats (a combine reading back what it wrote);
    bytes stored: each element written. Per tensor name: u, weight, prior, bias, c1, lse1,
    grad_v, s, V, lse, ds, v, du, dweight, dprior, dbias (the op's tensors) and the workspace's
    part_first, part_s, part_max, part_sum, part_a, carry, alpha, beta. The bias rows a
    combine reads are counted per (b, j) warp.
  - flops: arithmetic the kernel issues, padding lanes included (a fused multiply-add is 2; exp,
    log, sqrt, a division and a comparison are 1 each); useful_flops: the u_hat, du and dW
    products alone (2 per multiply-add), without padding. Leaky routing's extra logit (an exp
    and an add per softmax) is not counted; it changes no launch and no byte.

    python bench/cuda_traffic.py 128 1152 10 8 16 3            # the MNIST DigitCaps shape
    python bench/cuda_traffic.py 128 1152 10 8 16 3 --in-caps --prior --bias --dtype-bytes 8
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

WARP = 32
GROUP = 4  # samples a warp takes at once
TARGET_BLOCKS = 264
MIN_BLOCKS = 132
GEMM_THREADS = 256
GEMM_TILE_B = 32
GEMM_TILE_C = 64
GEMM_TILE_K = 32
GEMM_STRIDE_B = GEMM_TILE_B + 4
PRIOR_THREADS = 256
BIAS_THREADS = 256
# Dynamic shared memory per block with the opt-in, sm_90 (H100/H200); sm_80 (A100): 163 KB.
SM90_SHARED_BYTES = 227 * 1024


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    v = 1
    while v < x:
        v *= 2
    return v


def round4(x: int) -> int:
    return (x + 3) // 4 * 4


@dataclass(frozen=True)
class Tiles:
    """cuda::Tiles: 0 means chosen by plan()."""

    sweep_warps: int = 0
    sweep_samples: int = 0
    sweep_caps: int = 0
    sweep_stage: int = 0
    gemm_caps: int = 0
    grads_caps: int = 0
    grads_samples: int = 0
    grads_warps: int = 0
    combine_warps: int = 0

    @classmethod
    def parse(cls, spec: str) -> Tiles:
        """From the CAPSNET_FUSED_CUDA_TILES syntax, "sweep_samples=8,sweep_caps=3"."""
        values = {}
        for item in filter(None, spec.split(",")):
            key, value = item.split("=")
            values[key] = int(value)
        return cls(**values)


@dataclass(frozen=True)
class Plan:
    """cuda::Plan."""

    B: int
    I: int  # noqa: E741
    J: int
    N: int
    M: int
    R: int
    elem: int
    tiles: Tiles
    MP: int
    SW: int
    KP: int
    sweep_blocks: int
    sample_tiles: int
    gemm_splits: int
    grads_blocks: int
    sweep_forward_shared: int
    sweep_backward_shared: int
    gemm_shared: int
    grads_shared: int


def sweep_columns(J: int, M: int) -> tuple[int, int, int]:
    MP = next_pow2(M) if M <= WARP else cdiv(M, WARP) * WARP
    return MP, min(MP, WARP), cdiv(J * MP, WARP) * WARP


def sweep_shared_elements(samples, stage, warps, N, J, KP, backward) -> int:
    total = round4(stage * N * KP) + round4(stage * N * samples) + round4(stage * J)
    total += 2 * round4(samples * KP) + (round4(samples * KP) if backward else 0)
    total += 2 * round4(samples * J)
    return total + warps * (round4(GROUP * KP) + 4 * round4(GROUP * J))


def grads_shared_elements(caps, samples, J, N, M) -> int:
    JMs = J * M + (1 if (J * M) % 2 == 0 else 0)
    return (
        round4(caps * N * JMs)
        + round4(caps * J * N * M)
        + round4(samples * caps * JMs)
        + round4(samples * caps * N)
        + round4(caps * J)
    )


def plan(
    B: int,
    I: int,  # noqa: E741
    J: int,
    N: int,
    M: int,
    R: int,
    elem: int = 4,
    tiles: Tiles | None = None,
    max_shared: int = SM90_SHARED_BYTES,
) -> Plan:
    """plan_routing() of routing_cuda.cu; raises ValueError where it returns an error."""
    req = tiles or Tiles()
    MP, SW, KP = sweep_columns(J, M)
    JM = J * M
    auto_samples = req.sweep_samples == 0
    samples = req.sweep_samples or (32 if B >= 32 else cdiv(max(B, 1), GROUP) * GROUP)
    warps = req.sweep_warps or samples // GROUP
    sample_tiles = cdiv(B, samples)
    caps = req.sweep_caps
    if caps == 0:
        blocks = min(I, max(1, cdiv(TARGET_BLOCKS, max(sample_tiles, 1))))
        caps = cdiv(I, blocks)
    auto_stage = req.sweep_stage == 0
    stage = req.sweep_stage or min(caps, 4)

    def sweep_bytes(backward):
        return elem * sweep_shared_elements(samples, stage, warps, N, J, KP, backward)

    while sweep_bytes(True) > max_shared:
        if auto_stage and stage > 1:
            stage //= 2
        elif auto_samples and samples > GROUP:
            samples = cdiv(samples // 2, GROUP) * GROUP
            if req.sweep_warps == 0:
                warps = samples // GROUP
            sample_tiles = cdiv(B, samples)
        else:
            raise ValueError("the CUDA kernels do not fit this J x M in shared memory")
    if samples % GROUP or not 1 <= warps <= 32 or caps < 1 or stage < 1:
        raise ValueError("sweep tiles: samples must be a multiple of 4, 1..32 warps")

    gemm_caps = req.gemm_caps
    if gemm_caps == 0:
        gemm_tiles = cdiv(max(B, 1), GEMM_TILE_B) * cdiv(JM, GEMM_TILE_C)
        gemm_caps = cdiv(I, min(I, max(1, cdiv(TARGET_BLOCKS, gemm_tiles))))

    auto_gc, auto_gs = req.grads_caps == 0, req.grads_samples == 0
    g_caps = req.grads_caps or max(1, min(4, I // MIN_BLOCKS))
    g_samples = req.grads_samples or 8
    g_warps = req.grads_warps or 8
    while elem * grads_shared_elements(g_caps, g_samples, J, N, M) > max_shared:
        if auto_gs and g_samples > 1:
            g_samples //= 2
        elif auto_gc and g_caps > 1:
            g_caps //= 2
        else:
            raise ValueError("the CUDA gradient kernel does not fit in shared memory")
    resolved = Tiles(
        warps, samples, caps, stage, gemm_caps, g_caps, g_samples, g_warps,
        req.combine_warps or 8,
    )  # fmt: skip
    return Plan(
        B, I, J, N, M, R, elem, resolved, MP, SW, KP,
        sweep_blocks=cdiv(I, caps),
        sample_tiles=sample_tiles,
        gemm_splits=cdiv(I, gemm_caps),
        grads_blocks=cdiv(I, g_caps),
        sweep_forward_shared=sweep_bytes(False),
        sweep_backward_shared=sweep_bytes(True),
        gemm_shared=elem * (GEMM_TILE_K * GEMM_STRIDE_B + GEMM_TILE_K * GEMM_TILE_C),
        grads_shared=elem * grads_shared_elements(g_caps, g_samples, J, N, M),
    )  # fmt: skip


@dataclass
class Launch:
    kernel: str
    phase: str  # "forward" or "backward"
    grid: tuple[int, int, int]
    block: int
    shared_bytes: int
    loads: dict[str, int] = field(default_factory=dict)  # bytes per tensor
    stores: dict[str, int] = field(default_factory=dict)
    flops: int = 0
    useful_flops: int = 0

    @property
    def bytes_loaded(self) -> int:
        return sum(self.loads.values())

    @property
    def bytes_stored(self) -> int:
        return sum(self.stores.values())


def _counts(elem: int, **elements: int) -> dict[str, int]:
    return {name: n * elem for name, n in elements.items() if n}


def _prior_softmax(p: Plan, in_caps: bool, phase: str) -> Launch:
    e, I, J = p.elem, p.I, p.J  # noqa: E741
    if in_caps:
        # one warp per j: an online pass over i, then c1 = exp(prior - lse)
        return Launch(
            "prior_softmax", phase, (J, 1, 1), WARP, 0,
            _counts(e, prior=2 * I * J), _counts(e, c1=I * J, lse1=J),
            # per element about 6; per j, 5 butterfly merges of about 8 on 32 lanes
            flops=6 * I * J + 5 * 8 * WARP * J,
        )  # fmt: skip
    # one thread per i: max, sum of exp, then the quotients (the row read three times)
    return Launch(
        "prior_softmax", phase, (cdiv(I, PRIOR_THREADS), 1, 1), PRIOR_THREADS, 0,
        _counts(e, prior=3 * I * J), _counts(e, c1=I * J), flops=7 * I * J,
    )  # fmt: skip


def _gemm(p: Plan, has_prior: bool) -> Launch:
    e, B, I, N, JM = p.elem, p.B, p.I, p.N, p.J * p.M  # noqa: E741
    col_tiles, b_tiles = cdiv(JM, GEMM_TILE_C), cdiv(B, GEMM_TILE_B)
    # rows (i, n) staged in steps of 32, padded per split
    padded_rows = 0
    for split in range(p.gemm_splits):
        caps = min(p.tiles.gemm_caps, I - split * p.tiles.gemm_caps)
        padded_rows += cdiv(caps * N, GEMM_TILE_K) * GEMM_TILE_K
    loads = _counts(
        e,
        u=col_tiles * B * I * N,  # each column tile reads u
        weight=b_tiles * I * N * JM,  # each sample tile reads W
        c1=b_tiles * I * N * JM if has_prior else 0,
    )
    executed = 2 * b_tiles * GEMM_TILE_B * col_tiles * GEMM_TILE_C * padded_rows
    executed += b_tiles * I * N * JM if has_prior else 0
    return Launch(
        "gemm", "forward", (col_tiles, b_tiles, p.gemm_splits), GEMM_THREADS, p.gemm_shared,
        loads, _counts(e, part_first=p.gemm_splits * B * JM),
        flops=executed, useful_flops=2 * B * I * N * JM,
    )  # fmt: skip


def _squash_flops(M: int) -> int:
    # max |s|, t = s / a and t^2 (a warp-wide sum), g, then v = g s / a
    return 2 * M + 3 * M + 2 * M + 12


def _combine_forward(p: Plan, k: int, in_caps: bool, has_prior: bool, has_bias: bool) -> Launch:
    e, B, J, M, R = p.elem, p.B, p.J, p.M, p.R
    pairs, nb = B * J, p.sweep_blocks
    warps = p.tiles.combine_warps
    stores = _counts(e, s=pairs * M)
    flops = pairs * _squash_flops(M)
    if k == 0:
        lse1 = pairs if in_caps and has_prior else 0
        loads = _counts(e, part_first=p.gemm_splits * pairs * M, lse1=lse1)
        stores.update(_counts(e, V=pairs * M, lse=pairs if in_caps else 0))
        flops += pairs * M * (p.gemm_splits + 1)
    elif not in_caps:
        loads = _counts(e, part_s=nb * pairs * M)
        flops += pairs * M * nb
    else:
        # max over blocks, the rescaled sum, then per m the rescaled partials
        loads = _counts(e, part_s=nb * pairs * M, part_max=nb * pairs, part_sum=nb * pairs)
        stores.update(_counts(e, lse=pairs))
        flops += pairs * (nb * 5 + 2) + pairs * M * (nb * 4 + 1)
    loads["s"] = pairs * M * e  # read back by the squash
    if has_bias:
        # s + bias, written over s (read back once more)
        loads["bias"] = pairs * M * e
        loads["s"] += pairs * M * e
        stores["s"] += pairs * M * e
        flops += pairs * M
    if k < R - 1:
        loads["V"] = loads.get("V", 0) + pairs * M * e
        stores["V"] = stores.get("V", 0) + pairs * M * e
        flops += pairs * M
    else:
        stores["v"] = pairs * M * e
    return Launch(
        "combine_forward", "forward", (cdiv(pairs, warps), 1, 1), warps * WARP, 0,
        loads, stores, flops,
    )  # fmt: skip


def _sweep_common(p: Plan) -> tuple[dict[str, int], int, int]:
    """Loads shared by both sweeps (W, u, prior of every tile), padded sample slots, FLOPs."""
    e, B, I, J, N = p.elem, p.B, p.I, p.J, p.N  # noqa: E741
    loads = _counts(e, weight=p.sample_tiles * I * J * N * p.M, u=B * I * N)
    slots = p.sample_tiles * p.tiles.sweep_samples  # samples computed, padding included
    # per (slot, capsule, padded column): u_hat (N multiply-adds), its product with V and the
    # butterfly over SW lanes
    per_column = 2 * N + 2 + int(math.log2(p.SW))
    return loads, slots, slots * I * p.KP * per_column


def _sweep_forward(p: Plan, in_caps: bool, has_prior: bool) -> Launch:
    e, B, I, J, JM = p.elem, p.B, p.I, p.J, p.J * p.M  # noqa: E741
    loads, slots, flops = _sweep_common(p)
    loads.update(_counts(e, V=B * JM, prior=p.sample_tiles * I * J if has_prior else 0))
    # couplings per (slot, capsule): over j, two butterflies of 5 and 6 per j; over i, 7 per j
    flops += slots * I * (7 * J if in_caps else 10 + 6 * J)
    # the update of the partial s per valid column (in_caps: rescaled first)
    flops += slots * I * JM * (3 if in_caps else 2)
    nb = p.sweep_blocks
    stores = _counts(e, part_s=nb * B * JM, part_max=nb * B * J if in_caps else 0)
    if in_caps:
        stores.update(_counts(e, part_sum=nb * B * J))
    return Launch(
        "sweep_forward", "forward", (nb, p.sample_tiles, 1), p.tiles.sweep_warps * WARP,
        p.sweep_forward_shared, loads, stores, flops,
        useful_flops=2 * B * I * JM * p.N,
    )  # fmt: skip


def _sweep_backward(
    p: Plan, k: int, in_caps, has_prior, has_bias, store_alpha, need_beta, need_a
):  # fmt: skip
    e, B, I, J, JM = p.elem, p.B, p.I, p.J, p.J * p.M  # noqa: E741
    loads, slots, flops = _sweep_common(p)
    # the second row sum, e = ds . u_hat
    flops += slots * I * p.KP * (2 + int(math.log2(p.SW)))
    loads.update(_counts(e, V=B * JM, ds=B * JM, prior=p.sample_tiles * I * J if has_prior else 0))
    if in_caps:
        loads.update(_counts(e, lse=B * J, s=B * JM))
        loads["ds"] += B * JM * e  # ds . s per (b, j)
        flops += 2 * B * JM
        if has_bias:
            # ds . (s - bias): each block reads the bias row of every (sample, j) of its tile
            loads["bias"] = p.sweep_blocks * p.sample_tiles * JM * e
            flops += B * JM
    # couplings and logit gradients per (slot, capsule): over j, softmax (10 + 3 per j), the
    # sum of c e (5 per j and a butterfly of 5), c and beta (5 per j); over i, 4 per j
    flops += slots * I * (4 * J if in_caps else 15 + 13 * J)
    if need_a:
        flops += slots * I * JM * 2
    nb = p.sweep_blocks
    stores = _counts(
        e,
        alpha=B * I * J if store_alpha else 0,
        beta=B * I * J if need_beta else 0,
        part_a=nb * B * JM if need_a else 0,
    )
    return Launch(
        "sweep_backward", "backward", (nb, p.sample_tiles, 1), p.tiles.sweep_warps * WARP,
        p.sweep_backward_shared, loads, stores, flops,
        useful_flops=2 * B * I * JM * p.N,
    )  # fmt: skip


def _combine_backward(p: Plan, k: int, read_a: bool, read_carry: bool, write_carry: bool):
    e, B, J, M, R = p.elem, p.B, p.J, p.M, p.R
    pairs, warps = B * J, p.tiles.combine_warps
    loads = _counts(
        e,
        part_a=p.sweep_blocks * pairs * M if read_a else 0,
        carry=pairs * M if read_carry else 0,
        grad_v=pairs * M if k == R - 1 else 0,
        s=pairs * M,
        ds=pairs * M,  # dv, read back by the squash backward
    )
    stores = _counts(e, carry=pairs * M if write_carry else 0, ds=2 * pairs * M)
    flops = pairs * M * ((p.sweep_blocks if read_a else 0) + 2) + pairs * (
        _squash_flops(M) + 4 * M + 8
    )
    return Launch(
        "combine_backward", "backward", (cdiv(pairs, warps), 1, 1), warps * WARP, 0,
        loads, stores, flops,
    )  # fmt: skip


def _bias_grad(p: Plan) -> Launch:
    e, B, R, JM = p.elem, p.B, p.R, p.J * p.M
    return Launch(
        "bias_grad", "backward", (cdiv(JM, BIAS_THREADS), 1, 1), BIAS_THREADS, 0,
        _counts(e, ds=B * R * JM), _counts(e, dbias=JM), B * R * JM,
    )  # fmt: skip


def _grads(p: Plan, detach: bool, has_prior: bool, need_du, need_dw, need_dp) -> Launch:
    e, B, I, J, N, M, R = p.elem, p.B, p.I, p.J, p.N, p.M, p.R  # noqa: E741
    JM, JNM = J * M, J * N * M
    need_uhat = need_du or need_dw
    loads: dict[str, int] = {}
    flops = useful = 0
    if need_du:
        loads["weight"] = I * JNM * e
    if need_dw:
        loads["u"] = B * I * N * e
    if need_uhat:
        # du_hat; the ds and V rows of every sample are read by every capsule block
        if detach:
            loads["ds"] = p.grads_blocks * B * JM * e
            if R > 1:
                loads["alpha"] = B * I * J * e
            elif has_prior:
                loads["c1"] = I * J * e
            flops += B * I * JM
        else:
            loads["ds"] = p.grads_blocks * B * R * JM * e
            if R > 1:
                loads["V"] = p.grads_blocks * B * (R - 1) * JM * e
                loads["alpha"] = loads["beta"] = B * (R - 1) * I * J * e
            if has_prior:
                loads["c1"] = I * J * e
            flops += B * I * JM * (1 + 4 * (R - 1))
    if need_dp:
        loads["beta"] = B * R * I * J * e
        flops += B * R * I * J
    if need_du:
        flops += 2 * B * I * N * JM
        useful += 2 * B * I * N * JM
    if need_dw:
        flops += 2 * B * I * JNM
        useful += 2 * B * I * JNM
    stores = _counts(
        e,
        du=B * I * N if need_du else 0,
        dweight=I * JNM if need_dw else 0,
        dprior=I * J if need_dp else 0,
    )
    return Launch(
        "grads", "backward", (p.grads_blocks, 1, 1), p.tiles.grads_warps * WARP, p.grads_shared,
        loads, stores, flops, useful,
    )  # fmt: skip


def launches(
    B: int,
    I: int,  # noqa: E741
    J: int,
    N: int,
    M: int,
    R: int,
    *,
    softmax_over: str = "out_caps",
    prior: bool = False,
    bias: bool = False,
    detach_inner: bool = False,
    dtype_bytes: int = 4,
    backward: bool = True,
    need_du: bool = True,
    need_dweight: bool = True,
    need_dprior: bool | None = None,
    need_dbias: bool | None = None,
    tiles: Tiles | None = None,
    max_shared_bytes: int = SM90_SHARED_BYTES,
) -> list[Launch]:
    """Every launch of routing_forward (and routing_backward) in order, for float32
    (dtype_bytes 4; float16/bfloat16 run in float32 too) or float64 (8). need_dprior and
    need_dbias default to whether there is a prior and a bias."""
    in_caps = softmax_over == "in_caps"
    need_dp = prior if need_dprior is None else need_dprior and prior
    need_db = bias if need_dbias is None else need_dbias and bias
    p = plan(B, I, J, N, M, R, dtype_bytes, tiles, max_shared_bytes)
    out: list[Launch] = []
    if B > 0:
        if prior:
            out.append(_prior_softmax(p, in_caps, "forward"))
        out.append(_gemm(p, prior))
        for k in range(R):
            if k > 0:
                out.append(_sweep_forward(p, in_caps, prior))
            out.append(_combine_forward(p, k, in_caps, prior, bias))
    if not backward or not (need_du or need_dweight or need_dp or need_db):
        return out
    need_uhat = need_du or need_dweight
    if prior and need_uhat:
        out.append(_prior_softmax(p, in_caps, "backward"))
    if B > 0:
        last = R - 1
        chain = not (detach_inner and not need_dp and not need_db)

        def combine(k):
            return _combine_backward(
                p, k, chain and k < last, chain and k < last - 1, chain and 0 < k < last
            )

        def sweep(k):
            store_alpha = need_uhat and k > 0 and (not detach_inner or k == last)
            return _sweep_backward(p, k, in_caps, prior, bias, store_alpha, chain, chain and k > 0)

        if not chain:
            out.append(combine(last))
            if last > 0:
                out.append(sweep(last))
        else:
            for k in range(last, 0, -1):
                out += [combine(k), sweep(k)]
            out.append(combine(0))
            if need_dp:
                out.append(sweep(0))
    if need_db:
        out.append(_bias_grad(p))
    if need_uhat or need_dp:
        out.append(_grads(p, detach_inner, prior, need_du, need_dweight, need_dp))
    return out


def summary(items: list[Launch]) -> dict[str, dict[str, int]]:
    """Totals per phase: launches, bytes loaded and stored, flops, useful flops."""
    totals: dict[str, dict[str, int]] = {}
    for launch in items:
        t = totals.setdefault(
            launch.phase,
            dict(launches=0, bytes_loaded=0, bytes_stored=0, flops=0, useful_flops=0),
        )
        t["launches"] += 1
        t["bytes_loaded"] += launch.bytes_loaded
        t["bytes_stored"] += launch.bytes_stored
        t["flops"] += launch.flops
        t["useful_flops"] += launch.useful_flops
    return totals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", type=int, nargs=6, metavar="B I J N M R")
    parser.add_argument("--in-caps", action="store_true", help="softmax over input capsules")
    parser.add_argument("--prior", action="store_true")
    parser.add_argument("--bias", action="store_true")
    parser.add_argument("--detach-inner", action="store_true")
    parser.add_argument("--dtype-bytes", type=int, default=4, choices=(4, 8))
    parser.add_argument("--tiles", default="", help='e.g. "sweep_samples=16,sweep_caps=8"')
    args = parser.parse_args(argv)
    items = launches(
        *args.shape,
        softmax_over="in_caps" if args.in_caps else "out_caps",
        prior=args.prior,
        bias=args.bias,
        detach_inner=args.detach_inner,
        dtype_bytes=args.dtype_bytes,
        tiles=Tiles.parse(args.tiles),
    )
    print(f"{'kernel':<17} {'phase':<8} {'grid':<16} {'block':>5} {'smem KB':>8} "
          f"{'loaded MB':>10} {'stored MB':>10} {'MFLOP':>9}")  # fmt: skip
    for launch in items:
        print(
            f"{launch.kernel:<17} {launch.phase:<8} {str(launch.grid):<16} {launch.block:>5} "
            f"{launch.shared_bytes / 1024:>8.1f} {launch.bytes_loaded / 1e6:>10.2f} "
            f"{launch.bytes_stored / 1e6:>10.2f} {launch.flops / 1e6:>9.1f}"
        )
    for phase, t in summary(items).items():
        print(
            f"{phase}: {t['launches']} launches, {t['bytes_loaded'] / 1e6:.1f} MB loaded, "
            f"{t['bytes_stored'] / 1e6:.1f} MB stored, {t['flops'] / 1e9:.2f} GFLOP issued "
            f"({t['useful_flops'] / 1e9:.2f} in the u_hat, du and dW products)"
        )


if __name__ == "__main__":
    main()
