"""Every kernel configuration the Triton launchers choose compiles for sm_80 and sm_90 without
register spills (no GPU needed: triton.compile with a GPUTarget, then cuobjdump on the cubin).

The check runs tests/triton_aot_compile.py in a subprocess with TRITON_INTERPRET unset, because
the conftest makes this process's kernels interpreted functions. Its output (registers, shared
memory, stack and local memory per kernel) is printed; see it with `pytest -s`.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "triton_aot_compile.py"


def compile_and_report(kernels: list[str]) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--archs", "80", "90", "--kernels", *kernels],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(proc.stdout)
    assert "kernels compiled" in proc.stdout, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sm_")]
    # Every line carries its resource usage; both archs appear.
    assert lines and all(re.search(r"registers \d+", line) for line in lines)
    assert {line.split()[0] for line in lines} == {"sm_80", "sm_90"}
    return proc.returncode, proc.stdout


def spilling(report: str) -> list[str]:
    return [line for line in report.splitlines() if "SPILLS" in line]


@pytest.mark.xfail(
    reason="known: the bfloat16 routing_bwd_sweep_kernel at the MNIST tiles (BLOCK_I=8, 16 warps) "
    "gets 64 registers and 24 B of stack on sm_80; open",
    strict=False,
)
def test_forward_and_backward_sweep_kernels_do_not_spill():
    code, report = compile_and_report(["routing_fwd_kernel", "routing_bwd_sweep_kernel"])
    assert not spilling(report) and code == 0, "\n".join(spilling(report))


@pytest.mark.xfail(
    reason="known: some routing_bwd_grads_kernel variants report 8-32 B of stack under the "
    "ptxas options Triton 3.9 passes (--regAllocOptLevel=2), even at 64 registers",
    strict=False,
)
def test_gradient_kernel_does_not_spill():
    code, report = compile_and_report(["routing_bwd_grads_kernel"])
    assert not spilling(report) and code == 0, "\n".join(spilling(report))
