"""Every kernel configuration the Triton launchers choose compiles for sm_80 and sm_90 without
register spills (no GPU needed: triton.compile with a GPUTarget, then cuobjdump on the cubin).

The check runs tests/triton_aot_compile.py in a subprocess with TRITON_INTERPRET unset, because
the conftest makes this process's kernels interpreted functions. Its output (registers, shared
memory, stack and local memory per kernel) is printed; see it with `pytest -s`. A kernel
passes when both its local memory and its stack are 0 bytes: the launchers cap registers per
thread at the CTA's share of the register file (routing.max_registers, PTX .maxnreg), and the
check compiles with that same cap, so ptxas has no reason to spill.
"""

import dataclasses
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
    # Every line carries its resource usage (a missing field would print None); both archs
    # and every dtype appear.
    usage = re.compile(r"registers \d+, shared \d+ B static \+ \d+ B dynamic, stack \d+, local \d+")
    assert lines and all(usage.search(line) for line in lines), proc.stdout
    assert {line.split()[1] for line in lines} == {"float32", "float16", "bfloat16"}
    assert {line.split()[0] for line in lines} == {"sm_80", "sm_90"}
    return proc.returncode, proc.stdout


def spilling(report: str) -> list[str]:
    return [line for line in report.splitlines() if "SPILLS" in line]


def test_forward_kernels_do_not_spill():
    code, report = compile_and_report(["first_sweep_kernel", "sweep_kernel", "combine_kernel"])
    assert not spilling(report) and code == 0, "\n".join(spilling(report))


def test_backward_kernels_do_not_spill():
    code, report = compile_and_report(["combine_back_kernel", "sweep_back_kernel", "grads_kernel"])
    assert not spilling(report) and code == 0, "\n".join(spilling(report))


def test_shared_logits_kernels_do_not_spill():
    # first_sweep_kernel serves the shared-logits routing too (its per-iteration GEMM), with the
    # tiles of the forward test above.
    code, report = compile_and_report(
        [
            "shared_softmax_kernel",
            "shared_combine_kernel",
            "shared_combine_back_kernel",
            "shared_agree_kernel",
            "shared_logits_back_kernel",
            "shared_du_kernel",
        ]
    )
    assert not spilling(report) and code == 0, "\n".join(spilling(report))


def test_launcher_passes_the_register_cap_the_check_compiles_with():
    """KernelLaunch (what routing_forward/backward run) passes maxnreg; the check uses it too."""
    import torch

    from capsnet_fused.backends.triton import planned_launches
    from capsnet_fused.backends.triton.launch import max_registers

    assert [max_registers(w) for w in (1, 4, 8, 16)] == [255, 255, 255, 128]
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda **kwargs: seen.append(kwargs)

    launches = planned_launches([(2, 37, 10, 8, 16, 3)], torch.float32)
    for launch in launches:
        dataclasses.replace(launch, kernel=Recorder())()
    assert len(seen) == len(launches)
    for launch, kwargs in zip(launches, seen, strict=True):
        assert kwargs["num_warps"] == launch.num_warps
        assert kwargs["maxnreg"] == launch.maxnreg == max_registers(launch.num_warps)
