"""Compile checks of the CUDA sources on machines without a GPU (or a CUDA build of torch)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch.utils.cpp_extension

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))


def test_cuda_sources_exist():
    assert CU_FILES, f"no .cu files under {CSRC}"


@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_for_sm80_and_sm90_without_spills(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    cmd = [
        nvcc, "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")),
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "-Xptxas", "-v",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # ptxas reports, per kernel and architecture, "N bytes spill stores, N bytes spill loads".
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    kernels = re.findall(r"Compiling entry function '([^']+)' for '(sm_\d+)'", result.stderr)
    assert kernels and len(spills) == len(kernels), result.stderr[-4000:]
    spilled = [k for k, s in zip(kernels, spills) if s != ("0", "0")]
    assert not spilled, f"register spills in {spilled}"


def test_cuda_glue_compiles_against_torch_headers():
    # The torch-facing glue needs only c10's device-guard interface, so the CPU wheel's headers
    # are enough to check it.
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    includes = torch.utils.cpp_extension.include_paths()
    cmd = [cxx, "-std=c++20", "-fsyntax-only", str(CSRC / "routing_cuda.cpp")]
    cmd += [f"-I{path}" for path in includes + [sysconfig.get_paths()["include"]]]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
