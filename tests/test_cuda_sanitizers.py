"""The CUDA kernels under the CPU emulation, built without torch (tests/cuda_emulation_check.cpp)
as plain C++, with AddressSanitizer and UndefinedBehaviorSanitizer, and with ThreadSanitizer.

ThreadSanitizer sees every emulated CUDA thread as a thread of its own and, as happens-before
edges, only CUDA's (__syncthreads, __syncwarp, kernel boundaries; csrc/cuda_emulation.h), so a
shared-memory access that a barrier does not separate from another thread's is reported. Each
sanitizer run has a positive control, a kernel with a deliberate race or out-of-bounds write
that the sanitizer must report, so that a sanitizer doing nothing cannot pass.

    python -m pytest tests/test_cuda_sanitizers.py      (or -m sanitizer; about 2-3 minutes)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "cuda_emulation_check.cpp"
FLAGS = {
    "plain": [],
    "asan": [
        "-fno-omit-frame-pointer",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=undefined",
    ],
    "tsan": ["-fsanitize=thread"],
}

pytestmark = pytest.mark.sanitizer


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    out_dir = tmp_path_factory.mktemp("cuda_emulation_check")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            exe = out_dir / f"check_{kind}"
            cmd = [compiler, "-std=c++17", "-O1", "-g", "-DCAPSNET_FUSED_CUDA_EMULATION"]
            cmd += [f"-I{ROOT / 'csrc'}", "-pthread", *FLAGS[kind], str(SOURCE), "-o", str(exe)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0 and kind != "plain" and "sanitize" in result.stderr:
                pytest.skip(f"the compiler cannot build with {kind}: {result.stderr[-500:]}")
            assert result.returncode == 0, result.stderr[-4000:]
            built[kind] = exe
        return built[kind]

    return get


def run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_EMU_THREADS="2")
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=900)
    if "unexpected memory mapping" in result.stderr:
        pytest.skip("ThreadSanitizer cannot run with this kernel's address-space layout")
    return result


def test_emulation_selftest(build):
    result = run(build("plain"), "selftest")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: 0 failures" in result.stdout


def test_results_do_not_depend_on_thread_order(build):
    result = run(build("plain"), "routing")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ", 0 failures" in result.stdout


def test_address_sanitizer_reports_an_overflow(build):
    result = run(build("asan"), "overflow")
    assert result.returncode != 0
    assert "heap-buffer-overflow" in result.stderr and "overflow_kernel" in result.stderr


def test_address_sanitizer_clean(build):
    result = run(build("asan"), "routing")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "AddressSanitizer" not in result.stderr and "runtime error" not in result.stderr
    assert ", 0 failures" in result.stdout


def test_thread_sanitizer_reports_a_race(build):
    result = run(build("tsan"), "race")
    assert "WARNING: ThreadSanitizer: data race" in result.stderr, result.stderr[-4000:]
    assert "racy_kernel" in result.stderr


def test_thread_sanitizer_clean(build):
    result = run(build("tsan"), "routing", "quick")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "ThreadSanitizer" not in result.stderr
    assert ", 0 failures" in result.stdout
