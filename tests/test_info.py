"""`capsnet-fused info`: its report on this machine, and its readers on made-up inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import capsnet_fused
from capsnet_fused import info
from capsnet_fused.cli import main

SECTIONS = ("Versions", "Build", "Backends (float32)", "CPU", "GPU")


def _rows(text: str) -> dict[str, str]:
    """The report's "  key   value" lines as {key: value}."""
    start = 2 + info.KEY_WIDTH + 1
    return {
        line[2:start].strip(): line[start:]
        for line in text.splitlines()
        if line.startswith("  ") and len(line) > start
    }


def test_info_command_reports_every_section(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    headings = [line for line in text.splitlines() if line and not line.startswith(" ")]
    assert headings[: len(SECTIONS)] == list(SECTIONS)
    rows = _rows(text)
    assert rows["torch"].startswith(torch.__version__)
    assert rows["capsnet-fused"].startswith(capsnet_fused.__version__)
    assert rows["triton"] == (info._distribution_version("triton") or "not installed")
    for key in ("python", "numpy", "cpp ops", "model", "cores", "L2 per core", "kernel clone"):
        assert rows[key], key


def test_backend_lines_agree_with_available_backends(capsys):
    assert main(["info"]) == 0
    rows = _rows(capsys.readouterr().out)
    for name in capsnet_fused.ops.BACKENDS:
        line = rows[f"cpu {name}"]
        if name in capsnet_fused.available_backends("cpu"):
            assert line == "available"
        else:
            reason = capsnet_fused.ops.unavailable_reason(name, "cpu")
            assert line == f"unavailable: {reason}"
    cuda = capsnet_fused.available_backends("cuda") if torch.cuda.is_available() else []
    for name in capsnet_fused.ops.BACKENDS:
        assert (rows[f"cuda {name}"] == "available") == (name in cuda)
        if not torch.cuda.is_available():
            assert rows[f"cuda {name}"].startswith("unavailable: no CUDA device")
    auto_cpu = capsnet_fused.choose_backend("cpu")
    assert rows["auto picks"].startswith(f"cpu: {auto_cpu},")


def test_json_report_matches_this_machine(capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] == torch.__version__
    cpu_table = report["backends"]["devices"]["cpu"]
    assert [n for n, s in cpu_table.items() if s["available"]] == capsnet_fused.available_backends(
        "cpu"
    )
    assert report["gpu"]["available"] == torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        assert report["gpu"]["devices"][0]["sm_count"] == props.multi_processor_count
    # The recorded build, when setup.py wrote one, describes the ops that are loaded.
    recorded = report["build"]["recorded"]
    if recorded is not None and "cpp" in capsnet_fused.available_backends("cpu"):
        assert recorded["cuda_kernels"] == report["build"]["cuda_kernels_loaded"]
        assert recorded["package_version"] == capsnet_fused.__version__


def test_cpu_section_on_this_machine():
    report = info.cpu()
    assert report["logical_cpus"] >= 1 and report["torch_threads"] >= 1
    if sys.platform == "linux" and report["machine"] == "x86_64":
        assert report["model"] and report["isa"]
        flags = set(info._cpuinfo()["flags"].split())
        assert report["isa"]["avx2"] == ("avx2" in flags)
        assert report["x86_64_level"].startswith("x86-64")
        assert report["l2_bytes_per_core"] > 0
        # torch's answer agrees with the flags the kernel reports: AVX512_BF16 or AMX.
        native = bool({"avx512_bf16", "amx_tile"} & flags)
        assert report["native_bfloat16"] is native
        default = "bfloat16 autocast" if native else "float32, contiguous"
        assert default in info.format_report(info.collect())


def test_module_runs_as_a_script():
    done = subprocess.run(
        [sys.executable, "-m", "capsnet_fused.info", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) >= {"versions", "build", "backends", "cpu", "gpu"}


def test_build_record_absent_says_unknown(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(info, "BUILD_INFO_FILE", tmp_path / "_build_info.json")
    assert main(["info"]) == 0
    assert _rows(capsys.readouterr().out)["build record"].startswith("unknown (no ")


def test_build_record_of_a_cuda_build_is_shown():
    record = {
        "package_version": capsnet_fused.__version__,
        "python": "3.12.1",
        "torch": "2.11.0+cu128",
        "torch_cuda": "12.8",
        "compiler": "c++ (GCC) 13.2.0",
        "cxx_flags": ["-O3", "-fopenmp"],
        "native": True,
        "cuda_kernels": True,
        "cuda_kernels_reason": None,
        "cuda_archs": ["compute_90", "sm_80", "sm_90"],
        "nvcc": "Cuda compilation tools, release 12.8, V12.8.93",
    }
    report = info.collect()
    report["build"]["recorded"] = record
    rows = _rows(info.format_report(report))
    assert rows["built against"].startswith("torch 2.11.0+cu128, python 3.12.1")
    # This process runs another torch than the record names: the report says so.
    assert ("MISMATCH" in rows["built against"]) == (torch.__version__ != "2.11.0+cu128")
    assert rows["CUDA archs"] == "compute_90 sm_80 sm_90"
    assert rows["CUDA kernels"] == "built (Cuda compilation tools, release 12.8, V12.8.93)"
    assert rows["-march=native"].startswith("yes")
    assert rows["compiler"] == "c++ (GCC) 13.2.0"


def test_kernel_clone_from_the_op_when_the_build_reports_it(capsys):
    reported = {"clone": "x86-64-v4", "l2_bytes_per_core": 1 << 20, "u_hat_cache": True}
    kernel = info.cpu_kernel(lambda: json.dumps(reported))
    assert kernel == {"reported": True, **reported}
    text = info.format_report({**info.collect(), "cpu": {**info.cpu(), "kernel": kernel}})
    rows = _rows(text)
    assert rows["kernel clone"] == "x86-64-v4"
    assert rows["l2_bytes_per_core"] == "1 MiB"
    assert rows["u_hat_cache"] == "True"


def test_kernel_clone_on_this_build():
    kernel = info.cpu_kernel()
    op = info._kernel_info_op()
    if op is None:
        assert kernel == {"reported": False, "note": "not reported by this build"}
    else:
        assert kernel["reported"] and kernel["clone"]
        assert {"clone", "l2_bytes_per_core", "u_hat_cache"} <= set(kernel)


def test_a_failing_kernel_report_does_not_break_the_listing():
    def broken() -> str:
        raise RuntimeError("boom")

    assert info.cpu_kernel(broken) == {"reported": False, "note": "cpp_kernel_info failed: boom"}
    assert info.cpu_kernel(lambda: "[1, 2]")["reported"] is False


def _fake_cpu(root, cpu: int, core: int, l2: str, shared: str) -> None:
    cache = root / f"cpu{cpu}" / "cache"
    for index, (level, kind, size) in enumerate([("1", "Data", "32K"), ("2", "Unified", l2)]):
        folder = cache / f"index{index}"
        folder.mkdir(parents=True)
        (folder / "level").write_text(level + "\n")
        (folder / "type").write_text(kind + "\n")
        (folder / "size").write_text(size + "\n")
        (folder / "shared_cpu_list").write_text(shared + "\n")
    topology = root / f"cpu{cpu}" / "topology"
    topology.mkdir(parents=True)
    (topology / "physical_package_id").write_text("0\n")
    (topology / "core_id").write_text(f"{core}\n")


@pytest.mark.parametrize(
    "cores, l2, shared, per_core",
    [
        ([0, 0], "1024K", "0-1", 1 << 20),  # two hyperthreads of one core share its L2
        ([0, 1, 2, 3], "2M", "0-3", 512 << 10),  # one L2 for a cluster of four cores
        ([0], "512K", "0", 512 << 10),
    ],
    ids=["smt-pair", "cluster-of-4", "private"],
)
def test_l2_per_core_from_sysfs(tmp_path, cores, l2, shared, per_core):
    for cpu, core in enumerate(cores):
        _fake_cpu(tmp_path, cpu, core, l2, shared)
    size, source = info.l2_per_core(tmp_path)
    assert size == per_core
    assert source.endswith("cpu0/cache/index1")


def test_x86_64_levels():
    v2 = {"lm", "cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}
    v3 = v2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    assert info.x86_64_level({"lm"}) == "x86-64"
    assert info.x86_64_level(v2) == "x86-64-v2"
    assert info.x86_64_level(v3) == "x86-64-v3"
    assert info.x86_64_level(v3 | {"avx512f"}) == "x86-64-v3"
    assert info.x86_64_level(v4) == "x86-64-v4"
    assert info.x86_64_level(v4 - {"sse4_2"}) == "x86-64"
    assert info.x86_64_level(set()) is None


def test_cpu_list_parsing():
    assert info._cpu_list("0-3,8\n") == [0, 1, 2, 3, 8]
    assert info._cpu_list("5") == [5]
    assert [info._size(n) for n in (768 << 10, 1 << 20, 3 << 19, None)] == [
        "768 KiB",
        "1 MiB",
        "1.5 MiB",
        "unknown",
    ]


@pytest.mark.parametrize(
    "capability, archs, verdict",
    [
        ((9, 0), ["sm_80", "sm_90"], "yes (machine code)"),
        ((8, 6), ["sm_80"], "yes (machine code)"),  # same major, higher minor
        ((9, 0), ["compute_80", "sm_80"], "yes (PTX"),
        ((9, 0), ["sm_80"], "NO: compiled for sm_80"),
        ((8, 0), ["sm_86", "compute_90"], "NO: compiled for sm_86 compute_90"),
        ((12, 0), ["sm_120", "sm_90"], "yes (machine code)"),
    ],
)
def test_cuda_arch_coverage(capability, archs, verdict):
    assert info.cuda_arch_coverage(*capability, archs).startswith(verdict)


def test_gpu_lines_of_a_report_with_a_gpu():
    report = info.collect()
    report["gpu"] = {
        "available": True,
        "reason": None,
        "devices": [
            {
                "index": 0,
                "name": "NVIDIA H200",
                "capability": "sm_90",
                "sm_count": 132,
                "memory_bytes": 150_000_000_000,
            }
        ],
    }
    report["build"]["recorded"] = {"torch": "2.11.0", "cuda_kernels": True, "cuda_archs": ["sm_80"]}
    rows = _rows(info.format_report(report))
    assert rows["cuda:0"] == "NVIDIA H200, sm_90, 132 SMs, 139.7 GiB"
    assert rows["cpp kernels"] == "NO: compiled for sm_80"
