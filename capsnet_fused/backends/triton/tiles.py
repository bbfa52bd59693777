"""Tile sizes and grids of the Triton launchers: which tiles a launch uses on a GPU (sized for
an H100/H200: 132 SMs, 64 K registers each) or under the interpreter (small, for speed), and the
register cap they are compiled with. launch.py and shared_launch.py read them; the grid table in
launch.py's docstring is checked against choose_config by tests/test_triton.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import triton
from triton.runtime.interpreter import InterpretedFunction

from capsnet_fused.backends.triton.kernels import sweep_kernel

# True when the kernels were decorated with TRITON_INTERPRET=1 (they then run on CPU tensors).
INTERPRETED = isinstance(sweep_kernel, InterpretedFunction)

# "gpu" or "interpreter": which tile sizes the launchers choose. Defaults to the kind of kernel
# decorated here; CAPSNET_FUSED_TRITON_TILES=gpu makes interpreted launches use the GPU's tiles
# (the traffic counter and some tests), "interpreter" the reverse.
TILES_ENV = "CAPSNET_FUSED_TRITON_TILES"
TILE_KINDS = ("gpu", "interpreter")

# Programs per launch to aim for: two per SM of an H100/H200 (132 SMs). The sweep tiles use
# well under half of an SM's registers, so every program of such a grid is resident at once.
_GPU_TARGET_PROGRAMS = 264
_GPU_MIN_PROGRAMS = 132
# 32-bit registers per SM on sm_80 and sm_90, and ptxas's per-thread maximum.
_GPU_REGISTER_FILE = 65536
_GPU_MAX_REGISTERS = 255


@dataclass(frozen=True)
class RoutingConfig:
    """Tile sizes and warps for one problem size (J, N, M padded to powers of two)."""

    block_j: int
    block_n: int
    block_m: int
    # first_sweep_kernel: a [gemm_block_b, gemm_block_c] output tile, K in steps of gemm_block_k
    gemm_block_b: int
    gemm_block_c: int
    gemm_block_k: int
    gemm_k_per_split: int
    gemm_warps: int
    # sweep_kernel and sweep_back_kernel: sweep_block_b samples x sweep_block_i capsules,
    # visited sweep_block_is capsules at a time
    sweep_block_b: int
    sweep_block_i: int
    sweep_block_is: int
    sweep_warps: int
    # grads_kernel: grads_block_i capsules x grads_block_j output capsules per program
    grads_block_i: int
    grads_block_j: int
    grads_warps: int
    # combine kernels: combine_rows (b, j) pairs per program
    combine_rows: int
    combine_warps: int

    def gemm_grid(self, batch: int, in_caps: int, in_d: int, out_caps: int, out_d: int):
        splits = triton.cdiv(in_caps * in_d, self.gemm_k_per_split)
        return (
            triton.cdiv(batch, self.gemm_block_b),
            triton.cdiv(out_caps * out_d, self.gemm_block_c),
            splits,
        )

    def sweep_grid(self, batch: int, in_caps: int):
        return (triton.cdiv(in_caps, self.sweep_block_i), triton.cdiv(batch, self.sweep_block_b))

    def combine_grid(self, batch: int, out_caps: int):
        return (triton.cdiv(batch * out_caps, self.combine_rows),)

    def grads_grid(self, in_caps: int, out_caps: int):
        return (triton.cdiv(in_caps, self.grads_block_i), triton.cdiv(out_caps, self.grads_block_j))


def tile_kind() -> str:
    """The tile sizes the launchers choose now: the environment's choice, else the default."""
    kind = os.environ.get(TILES_ENV, "") or ("interpreter" if INTERPRETED else "gpu")
    if kind not in TILE_KINDS:
        raise ValueError(f"{TILES_ENV} must be one of {TILE_KINDS}, got {kind!r}")
    return kind


def max_registers(num_warps: int) -> int:
    """Per-thread register cap (PTX .maxnreg) for a kernel launched with `num_warps` warps.

    The cap is the CTA's share of the register file when one CTA has the SM to itself. Without
    it, ptxas (triton 3.9 runs it with --regAllocOptLevel=2) may aim at a lower count to fit
    more CTAs and put what does not fit on the stack; the ahead-of-time compile check uses the
    same cap and asserts that nothing spills.
    """
    return min(_GPU_MAX_REGISTERS, _GPU_REGISTER_FILE // (32 * num_warps))


def _split_k(batch_tiles: int, col_tiles: int, k_total: int, block_k: int) -> int:
    """K per split so that the GEMM grid reaches _GPU_MIN_PROGRAMS (a multiple of block_k)."""
    splits = max(1, triton.cdiv(_GPU_MIN_PROGRAMS, batch_tiles * col_tiles))
    # Rounded down to a multiple of block_k, so that there are at least `splits` splits.
    return max(block_k, k_total // splits // block_k * block_k)


def choose_config(
    batch: int, in_caps: int, out_caps: int, in_d: int, out_d: int, kind: str | None = None
) -> RoutingConfig:
    """The tiles and warps the launchers use for (B, I, J, N, M); kind as tile_kind()."""
    kind = tile_kind() if kind is None else kind
    block_j = triton.next_power_of_2(out_caps)
    block_n = triton.next_power_of_2(in_d)
    block_m = triton.next_power_of_2(out_d)
    cols = out_caps * out_d
    k_total = in_caps * in_d
    if kind == "interpreter":
        # The interpreter costs milliseconds per loop iteration whatever the tile size: few,
        # large steps, but still several capsule blocks and splits so that the partial sums
        # and their combine are exercised.
        gemm_block_b = min(64, triton.next_power_of_2(max(batch, 1)))
        gemm_block_c = min(256, triton.next_power_of_2(cols))
        gemm_block_k = 64
        k_per_split = max(gemm_block_k, triton.cdiv(triton.cdiv(k_total, 3), 64) * 64)
        sweep_block_b = min(8, triton.next_power_of_2(max(batch, 1)))
        # Output capsules split in two where there are several, as the GPU does at J = 10.
        grads_block_j = max(1, block_j // 2)
        return RoutingConfig(
            block_j, block_n, block_m,
            gemm_block_b, gemm_block_c, gemm_block_k, k_per_split, 4,
            sweep_block_b, 16, 16, 4,
            16, grads_block_j, 4,
            min(256, triton.next_power_of_2(max(batch * out_caps, 1))), 4,
        )  # fmt: skip
    # GPU tiles, each checked for spills by tests/test_triton_compile.py (sm_80, sm_90); the
    # register counts quoted are sm_90, float32, triton 3.9, MNIST shape.
    # first_sweep: tl.dot operands need every dimension >= 16 (K >= 16 on triton 3.6). u is
    # read once per column tile and W once per row tile: [64 x 64] output tiles (three column
    # tiles for J * M = 160), K steps of 32, 8 warps: 197 registers.
    gemm_block_b = 64 if batch > 32 else max(16, triton.next_power_of_2(max(batch, 1)))
    gemm_block_c = 64 if gemm_block_b == 64 else 32
    gemm_block_k = 32
    gemm_warps = 8 if gemm_block_b == 64 else 4
    batch_tiles = triton.cdiv(batch, gemm_block_b)
    k_per_split = _split_k(batch_tiles, triton.cdiv(cols, gemm_block_c), k_total, gemm_block_k)
    # Sweeps: each W[i] serves sweep_block_b samples, so W is read B / sweep_block_b times a
    # sweep. [32 samples, 1 capsule, 16, 16] at 8 warps: 233-243 registers (sweep and
    # sweep_back), one CTA an SM, so one program per SM; 16 samples: 141-142, two CTAs an SM.
    if batch <= 8:
        sweep_block_b, sweep_warps, sweep_programs = triton.next_power_of_2(max(batch, 1)), 4, 264
    elif batch <= 16:
        sweep_block_b, sweep_warps, sweep_programs = 16, 8, 264
    else:
        sweep_block_b, sweep_warps, sweep_programs = 32, 8, _GPU_MIN_PROGRAMS
    sweep_block_is = 1
    batch_blocks = triton.cdiv(batch, sweep_block_b)
    capsule_blocks = max(1, min(in_caps, triton.cdiv(sweep_programs, batch_blocks)))
    sweep_block_i = triton.cdiv(in_caps, capsule_blocks)
    # grads: W and the dW accumulator of its capsules stay in registers for the whole batch
    # loop, and every program reads every sample's ds and V, so the fewer capsule blocks the
    # less traffic: 8 capsules x 4 output capsules (three j blocks at J = 10) at 8 warps is
    # 149-152 registers in float32/float16; 8 x 8 at 16 warps spills in float16 on sm_90.
    grads_block_i = 8 if in_caps >= 8 * _GPU_MIN_PROGRAMS else 2 if in_caps >= 256 else 1
    grads_block_j = min(block_j, max(1, 4096 // (grads_block_i * block_n * block_m)))
    grads_warps = 8 if grads_block_i * grads_block_j * block_n * block_m >= 2048 else 4
    # Combines: a few (b, j) rows per program, at least _GPU_MIN_PROGRAMS programs when B*J allows.
    combine_rows = 1
    while combine_rows < 8 and batch * out_caps >= 2 * combine_rows * _GPU_MIN_PROGRAMS:
        combine_rows *= 2
    # A [rows, partials, M] tile at up to 32 elements a thread.
    parts = max(triton.cdiv(k_total, k_per_split), triton.cdiv(in_caps, sweep_block_i))
    combine_elements = combine_rows * triton.next_power_of_2(parts) * block_m
    combine_warps = max(1, min(8, combine_elements // (32 * 32)))
    return RoutingConfig(
        block_j, block_n, block_m,
        gemm_block_b, gemm_block_c, gemm_block_k, k_per_split, gemm_warps,
        sweep_block_b, sweep_block_i, sweep_block_is, sweep_warps,
        grads_block_i, grads_block_j, grads_warps,
        combine_rows, combine_warps,
    )  # fmt: skip
