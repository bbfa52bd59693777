"""A/B of the cpp routing kernels of two checkouts, in units of an interleaved yardstick.

    python bench/ab_yardstick.py OLD_CHECKOUT NEW_CHECKOUT --pairs 4

On a shared VM whose speed drifts by 1.5-2x within minutes (the 2-core Zen 5 of this project),
the A B A B process alternation of bench/ab_builds.py gave pair ratios from 0.75 to 1.22 for
the same two builds. Here each process times the forward and the backward op
(cpp_routing_fwd / cpp_routing_bwd, MNIST shape, B=128, float32, du and dW) each between two
calls of a fixed float32 matmul (768 x 768, MKL) and reports the ratio kernel / matmul:
a drift of the machine then reaches both sides of every ratio. The environment passes through
(CAPSNET_FUSED_CPU_ISA=avx2 compares the AVX2 clones).

Page faults: builds before the scratch pool (ScratchPool in csrc/routing_cpu.cpp) got the
backward's large buffers and outputs (about 12 MB at this shape) back from glibc's malloc as
fresh pages in every call in some processes and not in others, at random (about 3000 minor
faults per call, which made the backward 1.2x slower on the Zen 5 VM), and in this tool's
alternation with the matmul in most of them. So that this does not decide an A/B with such a
build, the measured processes run with MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ fixed
(nothing handed back to the system); --default-malloc leaves glibc as it is. Each line reports
the process's page faults per call.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# glibc tunables: blocks up to 32 MB from the heap, and the heap never trimmed.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def measure(calls: int) -> dict[str, float]:
    import torch

    import capsnet_fused  # noqa: F401 - registers the ops

    torch.manual_seed(0)
    batch, inputs, outputs, n, m, R = 128, 1152, 10, 8, 16, 3
    u = torch.randn(batch, inputs, n)
    w = torch.randn(inputs, outputs, n, m) * 0.05
    op = torch.ops.capsnet_fused
    v, s, V, lse = op.cpp_routing_fwd(u, w, None, None, R, False, False, False, 1e-7)
    g = torch.randn_like(v)
    x, y = torch.randn(768, 768), torch.randn(768, 768)
    fns = {
        "yardstick": lambda: torch.mm(x, y),
        "forward": lambda: op.cpp_routing_fwd(u, w, None, None, R, False, False, False, 1e-7),
        "backward": lambda: op.cpp_routing_bwd(
            g, u, w, None, None, s, V, lse, R, False, False, False, 1e-7, True, True, False, False
        ),
    }

    def once(name: str) -> float:
        start = time.perf_counter()
        fns[name]()
        return time.perf_counter() - start

    for name in fns:
        once(name)
    ratios: dict[str, list[float]] = {"forward": [], "backward": []}
    faults = dict.fromkeys(ratios, 0)
    for _ in range(calls):
        for name in ratios:
            before = once("yardstick")
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            kernel = once(name)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
            after = once("yardstick")
            ratios[name].append(kernel / ((before + after) / 2))
    result = {name: statistics.median(r) for name, r in ratios.items()}
    result.update({f"{name} faults/call": faults[name] / calls for name in ratios})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, nargs="?")
    parser.add_argument("new", type=Path, nargs="?")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument(
        "--default-malloc", action="store_true", help="leave glibc's malloc thresholds as they are"
    )
    parser.add_argument("--measure", action="store_true", help="(internal) measure this checkout")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.calls)))
        return 0
    malloc_env = {} if args.default_malloc else FIXED_MALLOC
    sides: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for _ in range(args.pairs):
        for side, checkout in (("old", args.old), ("new", args.new)):
            command = [sys.executable, str(Path(__file__).resolve()), "--measure"]
            command += ["--calls", str(args.calls)]
            out = subprocess.run(
                command, cwd=checkout, check=True, capture_output=True, text=True,
                env={**os.environ, **malloc_env, "PYTHONPATH": str(checkout.resolve())},
            )  # fmt: skip
            sides[side].append(json.loads(out.stdout.splitlines()[-1]))
            print(side, sides[side][-1], flush=True)
    for name in ("forward", "backward"):
        old = [r[name] for r in sides["old"]]
        new = [r[name] for r in sides["new"]]
        print(
            f"{name}: old {statistics.median(old):.2f}, new {statistics.median(new):.2f} "
            f"matmul units; new / old {statistics.median(new) / statistics.median(old):.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
