"""Compile every launch configuration of the Triton routing kernels ahead of time; check spills.

Run in a process without TRITON_INTERPRET (tests/test_triton_compile.py does that): the kernels
must be real @triton.jit functions. No GPU is needed: triton.compile with a GPUTarget produces a
cubin, and cuobjdump (shipped in the triton wheel) reports its registers, shared memory, stack
and local memory. Prints one line per compiled kernel and exits with status 1 when any kernel
uses local memory or stack (register spills), 2 when the kernels are interpreted.

The launches come from capsnet_fused.backends.triton.planned_launches, i.e. from the launchers'
own code path (meta tensors), specialised the way the JIT specialises them at run time (ints
equal to 1 become constexprs, 16-divisible ints and 16-byte-aligned pointers get divisibility
hints).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from capsnet_fused.backends.triton import (
    INTERPRETED,
    kernels,
    planned_launches,
    planned_shared_launches,
    shared_kernels,
)

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# (B, I, J, N, M, R): the MNIST DigitCaps shape, other sizes the project names, and every shape
# of tests/helpers.SHAPES (B and R change no configuration, only runtime arguments).
MNIST = (128, 1152, 10, 8, 16, 3)
SHAPES = [
    MNIST,
    (128, 2048, 10, 8, 16, 3),
    (2, 37, 10, 8, 16, 3),
    (1, 5, 1, 3, 1, 1),
    (3, 37, 5, 4, 12, 2),
    (2, 19, 3, 3, 5, 4),
    (1, 64, 10, 8, 16, 1),
    (4, 33, 7, 2, 3, 5),
    (2, 200, 10, 8, 16, 3),
]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Flags that only add or remove code (never change the tiles): by default each tile
# configuration is compiled with the most code, i.e. with these flags at the values below;
# flags not listed (SOFTMAX_IN, the combine's FIRST and LAST, ...) select different code and are
# compiled both ways.
HEAVY = {
    "first_sweep_kernel": {"HAS_C1": True},
    "combine_kernel": {"SOFTMAX_IN": True, "HAS_LSE1": True, "LAST": False},
    "sweep_kernel": {"HAS_PRIOR": True},
    "combine_back_kernel": {"READ_A": True, "READ_CARRY": True, "WRITE_CARRY": True},
    "sweep_back_kernel": {
        "HAS_PRIOR": True,
        "FIRST": False,
        "STORE_ALPHA": True,
        "NEED_BETA": True,
        "NEED_A": True,
    },
    "grads_kernel": {
        "HAS_C1": True,
        "NEED_DU": True,
        "NEED_DW": True,
        "NEED_DPRIOR": True,
        "DETACH_INNER": False,
    },
    # Routing logits shared by the batch (capsnet_fused/backends/triton/shared_kernels.py).
    "shared_softmax_kernel": {
        "HAS_LOGITS": True,
        "HAS_A": True,
        "STORE_LOGITS": True,
        "LEAKY": True,
    },
    "shared_combine_kernel": {"HAS_BIAS": True, "LAST": True},
    "shared_combine_back_kernel": {"READ_PARTS": True, "LAST": False},
    "shared_agree_kernel": {
        "NEED_E": True,
        "NEED_DW": True,
        "NEED_G": True,
        "ACCUM_DW": True,
        "FINAL_DW": False,
    },
    "shared_logits_back_kernel": {"HAS_D": True},
    "shared_du_kernel": {"DETACH_INNER": False},
}
KERNELS = [
    "first_sweep_kernel",
    "sweep_kernel",
    "combine_kernel",
    "combine_back_kernel",
    "sweep_back_kernel",
    "grads_kernel",
]
SHARED_KERNELS = [
    "shared_softmax_kernel",
    "shared_combine_kernel",
    "shared_combine_back_kernel",
    "shared_agree_kernel",
    "shared_logits_back_kernel",
    "shared_du_kernel",
]
# Where each kernel is defined (first_sweep_kernel serves both routings).
MODULES = {name: kernels for name in KERNELS} | {name: shared_kernels for name in SHARED_KERNELS}


def specialise(launch):
    """(signature, constexprs, attrs) for ASTSource, as the JIT builds them for this launch."""
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(launch.kernel.arg_names):
        if name in launch.constexprs:
            signature[name], constexprs[name] = "constexpr", launch.constexprs[name]
            continue
        kind, attr = native_specialize_impl(CUDABackend, launch.args[name], False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = attr
        elif attr:
            attrs[(index,)] = CUDABackend.parse_attr(attr)
    return signature, constexprs, attrs


def compile_one(job):
    kernel_name, signature, constexprs, attrs, num_warps, maxnreg, arch = job
    source = ASTSource(getattr(MODULES[kernel_name], kernel_name), signature, constexprs, attrs)
    # The same options the launcher passes (KernelLaunch.__call__).
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "maxnreg": maxnreg},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", cubin.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {k: int(v) for k, v in fields.items()}, compiled.metadata.shared


def describe(kernel, constexprs, num_warps, maxnreg):
    shown = ", ".join(f"{k}={getattr(v, 'name', v)}" for k, v in constexprs.items() if k != "ACC")
    return f"{kernel.__name__}[{shown}] warps={num_warps} maxnreg={maxnreg}"


def jobs(archs, dtypes, every_variant, kernel_names):
    """Unique compile jobs for the kernels named in kernel_names.

    Default: every tile configuration (kernel, block sizes, warps) the launchers choose for
    SHAPES, with the code-adding flags of HEAVY, for every arch in float32, and the MNIST
    shape's configurations in every dtype. every_variant: every launch of every shape, arch and
    dtype.
    """
    seen, out = set(), []
    for dtype_name in dtypes:
        for shape in SHAPES:
            if not every_variant and dtype_name != "float32" and shape != MNIST:
                continue
            launches = []
            if kernel_names & set(KERNELS):
                launches += planned_launches([shape], DTYPES[dtype_name])
            if kernel_names & set(SHARED_KERNELS):
                launches += planned_shared_launches([shape], DTYPES[dtype_name])
            for launch in launches:
                name = launch.kernel.__name__
                if name not in kernel_names:
                    continue
                heavy = HEAVY.get(name, {})
                if not every_variant and any(
                    launch.constexprs.get(flag, value) != value for flag, value in heavy.items()
                ):
                    continue
                signature, constexprs, attrs = specialise(launch)
                # Without every_variant, a configuration is compiled once (int arguments
                # specialised as for the first shape that uses it).
                key = (
                    name,
                    tuple(signature.items()) if every_variant else "",
                    tuple((k, str(v)) for k, v in launch.constexprs.items()),
                    str(sorted(attrs.items())) if every_variant else "",
                    launch.num_warps,
                    launch.maxnreg,
                    dtype_name,
                )
                if key in seen:
                    continue
                seen.add(key)
                for arch in archs:
                    out.append(
                        (
                            launch.kernel,
                            signature,
                            constexprs,
                            attrs,
                            launch.num_warps,
                            launch.maxnreg,
                            arch,
                            dtype_name,
                        )
                    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument(
        "--every-variant",
        action="store_true",
        help="compile every launch (all variant flags, int specialisations, dtypes); slow: "
        "about 3 s per kernel on a laptop core",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--kernels", nargs="+", default=KERNELS + SHARED_KERNELS, choices=KERNELS + SHARED_KERNELS
    )
    args = parser.parse_args()
    if INTERPRETED:
        print("TRITON_INTERPRET=1 is set: the kernels are interpreted, nothing to compile")
        return 2
    todo = jobs(args.archs, args.dtypes, args.every_variant, set(args.kernels))
    start = time.time()
    failures = 0
    with ProcessPoolExecutor(args.workers) as pool:
        results = pool.map(compile_one, [(job[0].__name__, *job[1:7]) for job in todo])
        for job, (usage, dynamic_shared) in zip(todo, results, strict=True):
            kernel, _, constexprs, _, num_warps, maxnreg, arch, dtype_name = job
            spills = usage.get("LOCAL", 0) + usage.get("STACK", 0)
            failures += spills > 0
            print(
                f"sm_{arch} {dtype_name:8s} {describe(kernel, constexprs, num_warps, maxnreg)}: "
                f"registers {usage.get('REG')}, shared {usage.get('SHARED', 0)} B static + "
                f"{dynamic_shared} B dynamic, stack {usage.get('STACK')}, local "
                f"{usage.get('LOCAL')}{'  <-- SPILLS' if spills else ''}"
            )
    print(f"{len(todo)} kernels compiled in {time.time() - start:.0f} s, {failures} with spills")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
