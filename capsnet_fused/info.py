"""`capsnet-fused info`: what is installed, how it was built, and what can run here.

The report to paste into a bug report (the role `python -m torch.utils.collect_env` plays for
torch): versions; how capsnet_fused._C was built (read from capsnet_fused/_build_info.json, which
setup.py writes; "unknown" without it, e.g. after a CAPSNET_FUSED_JIT=1 build); every backend on
cpu and cuda, available or why not; the CPU (model, the instruction sets the kernels care about,
L2 per core) and the CPU kernel clone that runs; the GPUs. `--json` prints the same as one JSON
object. Run it as `capsnet-fused info` or `python -m capsnet_fused.info`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import capsnet_fused
from capsnet_fused import ops

PACKAGE_DIR = Path(capsnet_fused.__file__).resolve().parent
BUILD_INFO_FILE = PACKAGE_DIR / "_build_info.json"
DEVICES = ("cpu", "cuda")
NOT_REPORTED = "not reported by this build"
KEY_WIDTH = 18  # the report's "  key   value" lines: keys are padded to this width
# The x86 features the kernels or torch's CPU paths use, in /proc/cpuinfo's spelling.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
# What each x86-64 microarchitecture level adds (the levels GCC's target_clones names).
_X86_LEVELS = (
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
)
ENV_VARS = (
    "CAPSNET_FUSED_BACKEND",
    "CAPSNET_FUSED_JIT",
    "TRITON_INTERPRET",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
)


def _distribution_version(*names: str) -> str | None:
    """The installed version of the first distribution found under any of `names`."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _git_revision(folder: Path) -> str | None:
    """Short commit of the checkout holding `folder` ("+ changes" when dirty), else None."""
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + (" + changes" if dirty.stdout.strip() else "")


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        # Nightly torch ships Triton as pytorch-triton.
        "triton": _distribution_version("triton", "pytorch-triton"),
        "numpy": _distribution_version("numpy"),
        "capsnet_fused": capsnet_fused.__version__,
        "capsnet_fused_path": str(PACKAGE_DIR),
        "git": _git_revision(PACKAGE_DIR),
    }


def build() -> dict:
    """Where the cpp backend's ops come from and what setup.py recorded about building them."""
    cpp = ops._backend_module("cpp")
    load_error = cpp if isinstance(cpp, str) else cpp._LOAD_ERROR
    extension = sys.modules.get("capsnet_fused._C")
    if load_error is not None:
        origin = None
    elif extension is not None:
        origin = getattr(extension, "__file__", "capsnet_fused._C")
    else:
        origin = "JIT build (CAPSNET_FUSED_JIT=1)"
    try:
        # A record left beside a _C that is not the loaded one (a JIT build) would mislead.
        recorded = json.loads(BUILD_INFO_FILE.read_text()) if extension is not None else None
    except FileNotFoundError:
        recorded = None
    except (OSError, ValueError) as exc:
        recorded = {"error": f"{BUILD_INFO_FILE} is unreadable: {exc}"}
    return {
        "extension": origin,
        "extension_error": load_error,
        "build_info_file": str(BUILD_INFO_FILE),
        "recorded": recorded,
        "cuda_kernels_loaded": load_error is None
        and torch._C._dispatch_has_kernel_for_dispatch_key(
            "capsnet_fused::cpp_routing_fwd", "CUDA"
        ),
    }


def _no_device_reason(device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            return f"no CUDA device (torch {torch.__version__} is a CPU build)"
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    return None


def backends(dtype: torch.dtype = torch.float32) -> dict:
    """{device: {backend: {"available": bool, "reason": str | None}}} and auto's choice."""
    table: dict = {}
    auto: dict = {}
    for device in DEVICES:
        no_device = _no_device_reason(device)
        table[device] = {}
        for name in ops.BACKENDS:
            own = ops.unavailable_reason(name, device, dtype)
            reasons = [r for r in (no_device, own) if r is not None]
            table[device][name] = {
                "available": not reasons,
                "reason": "; ".join(reasons) if reasons else None,
            }
        auto[device] = None if no_device else ops.choose_backend(device, dtype)
    return {"dtype": str(dtype).removeprefix("torch."), "devices": table, "auto": auto}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _size_bytes(text: str) -> int | None:
    match = re.fullmatch(r"(\d+)\s*([KMG]?)", text.strip())
    if not match:
        return None
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)]


def l2_per_core(cpu_dir: Path = Path("/sys/devices/system/cpu")) -> tuple[int | None, str]:
    """(L2 bytes per core, where the figure comes from).

    sysfs gives the size of one L2 and the CPUs sharing it; hyperthreads of one core share it
    without dividing it, so the size is split over the distinct cores among those CPUs.
    """
    for index in sorted((cpu_dir / "cpu0" / "cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() != "2":
                continue
            if (index / "type").read_text().strip() not in ("Unified", "Data"):
                continue
            size = _size_bytes((index / "size").read_text())
            shared = _cpu_list((index / "shared_cpu_list").read_text())
        except OSError:
            continue
        if size is None:
            continue
        cores = set()
        for cpu in shared:
            topology = cpu_dir / f"cpu{cpu}" / "topology"
            try:
                cores.add(
                    (
                        (topology / "physical_package_id").read_text().strip(),
                        (topology / "core_id").read_text().strip(),
                    )
                )
            except OSError:
                cores.add(("cpu", str(cpu)))
        return size // max(len(cores), 1), str(index)
    try:
        size = os.sysconf("SC_LEVEL2_CACHE_SIZE")
    except (ValueError, OSError, AttributeError):
        size = 0
    if size > 0:
        return size, "sysconf(SC_LEVEL2_CACHE_SIZE)"
    return None, "unknown"


def _cpu_list(text: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def x86_64_level(flags: set[str]) -> str | None:
    """The highest x86-64 microarchitecture level whose features are all in `flags`."""
    if "lm" not in flags:
        return None
    level = "x86-64"
    for name, required in _X86_LEVELS:
        if not required <= flags:
            break
        level = name
    return level


def _kernel_info_op() -> Callable[[], str] | None:
    """torch.ops.capsnet_fused.cpp_kernel_info when the loaded build defines it."""
    try:
        return torch.ops.capsnet_fused.cpp_kernel_info
    except (AttributeError, RuntimeError):
        return None


def cpu_kernel(op: Callable[[], str] | None = None) -> dict:
    """What the built CPU kernels report about themselves: the clone the loader chose, the L2
    size they plan for, their u_hat cache; {"reported": False, ...} where the build says
    nothing (a build from before cpp_kernel_info, or none)."""
    op = _kernel_info_op() if op is None else op
    if op is None:
        return {"reported": False, "note": NOT_REPORTED}
    try:
        reported = json.loads(op())
    except Exception as exc:  # a broken report must not break the rest of the listing
        return {"reported": False, "note": f"cpp_kernel_info failed: {exc}"}
    if not isinstance(reported, dict):
        return {"reported": False, "note": f"cpp_kernel_info returned {reported!r}"}
    return {"reported": True, **reported}


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512_BF16 or AMX), so that oneDNN runs
    bfloat16 convolutions natively. Elsewhere bfloat16 is emulated: on an AVX2-only Zen 3 a
    training step under bfloat16 autocast was 9-11x slower than in float32 (README)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cpu(kernel_op: Callable[[], str] | None = None) -> dict:
    fields = _cpuinfo()
    flags = set(fields.get("flags", "").split())
    l2, l2_source = l2_per_core()
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "vendor": fields.get("vendor_id"),
        "family": fields.get("cpu family"),
        "model_number": fields.get("model"),
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": {flag: flag in flags for flag in ISA_FLAGS} if flags else {},
        "x86_64_level": x86_64_level(flags) if flags else None,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # Whether `capsnet-fused train` defaults to --amp --channels-last here.
        "native_bfloat16": cpu_has_native_bfloat16(),
        "l2_bytes_per_core": l2,
        "l2_source": l2_source,
        "kernel": cpu_kernel(kernel_op),
    }


def machine_summary(device: torch.device | str = "cpu") -> str:
    """One line naming the machine a run computes on, for its records: the CPU (model, family
    and model number, which tell Zen generations apart where the name is just "AMD EPYC"), the
    logical CPUs and torch threads, and the GPU when `device` is a CUDA device."""
    fields = _cpuinfo()
    name = fields.get("model name") or platform.processor() or platform.machine()
    if fields.get("cpu family"):
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    text = f"{name}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"
    device = torch.device(device)
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def cuda_arch_coverage(major: int, minor: int, archs: list[str]) -> str:
    """How the compiled targets `archs` (sm_XY, compute_XY) serve a GPU of compute capability
    major.minor: machine code for sm_XY runs on X.Y' with Y' >= Y; PTX for compute_XY is
    compiled by the driver for any capability >= X.Y."""
    numbers = [
        (kind, int(code[:-1]), int(code[-1]))
        for kind, code in (arch.split("_", 1) for arch in archs if "_" in arch)
        if code.isdigit() and len(code) >= 2
    ]
    if any(kind == "sm" and x == major and y <= minor for kind, x, y in numbers):
        return "yes (machine code)"
    if any(kind == "compute" and (x, y) <= (major, minor) for kind, x, y in numbers):
        return "yes (PTX, compiled by the driver at first use)"
    return f"NO: compiled for {' '.join(archs) or 'nothing'}"


def gpus() -> dict:
    reason = _no_device_reason("cuda")
    devices = []
    if reason is None:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(
                {
                    "index": index,
                    "name": props.name,
                    "capability": f"sm_{props.major}{props.minor}",
                    "sm_count": props.multi_processor_count,
                    "memory_bytes": props.total_memory,
                }
            )
    return {"available": reason is None, "reason": reason, "devices": devices}


def collect(kernel_op: Callable[[], str] | None = None) -> dict:
    """Everything `capsnet-fused info` reports, as plain JSON-able data."""
    return {
        "versions": versions(),
        "build": build(),
        "backends": backends(),
        "cpu": cpu(kernel_op),
        "gpu": gpus(),
        "environment": {name: os.environ[name] for name in ENV_VARS if name in os.environ},
    }


def _size(size: int | None) -> str:
    if size is None:
        return "unknown"
    return f"{size // 1024} KiB" if size < 1 << 20 else f"{size / (1 << 20):g} MiB"


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def format_report(report: dict) -> str:
    """The human-readable report: one section per heading, one fact per line."""
    lines: list[str] = []

    def section(title: str) -> None:
        if lines:
            lines.append("")
        lines.append(title)

    def row(key: str, value: object) -> None:
        lines.append(f"  {key:<{KEY_WIDTH}} {value}")

    v = report["versions"]
    section("Versions")
    row("python", f"{v['python']} ({v['python_executable']})")
    gpu_runtime = (
        f"CUDA {v['torch_cuda']}"
        if v["torch_cuda"]
        else (f"HIP {v['torch_hip']}" if v["torch_hip"] else "CPU build")
    )
    row("torch", f"{v['torch']} ({gpu_runtime})")
    row("triton", v["triton"] or "not installed")
    row("numpy", v["numpy"] or "not installed")
    where = v["capsnet_fused_path"] + (f", git {v['git']}" if v["git"] else "")
    row("capsnet-fused", f"{v['capsnet_fused']} ({where})")

    b = report["build"]
    section("Build")
    if b["extension_error"]:
        row("cpp ops", f"not loaded: {b['extension_error']}")
    else:
        row("cpp ops", b["extension"])
    recorded = b["recorded"]
    if recorded is None:
        row(
            "build record",
            f"unknown (no {b['build_info_file']}: a JIT build, or one by an older setup.py)",
        )
    elif "error" in recorded:
        row("build record", recorded["error"])
    else:
        built_torch = recorded.get("torch", "unknown")
        stale = built_torch != v["torch"]
        row(
            "built against",
            f"torch {built_torch}, python {recorded.get('python', 'unknown')}"
            + (f" (MISMATCH: running torch {v['torch']})" if stale else ""),
        )
        row("compiler", recorded.get("compiler", "unknown"))
        row("cxx flags", " ".join(recorded.get("cxx_flags", [])) or "unknown")
        row("-march=native", _yes_no(recorded.get("native", False)) + " (CAPSNET_FUSED_NATIVE=1)")
        if recorded.get("cuda_kernels"):
            row("CUDA kernels", f"built ({recorded.get('nvcc') or 'nvcc'})")
            row("CUDA archs", " ".join(recorded.get("cuda_archs") or ["unknown"]))
        else:
            row("CUDA kernels", f"not built: {recorded.get('cuda_kernels_reason', 'unknown')}")
    row(
        "CUDA loaded",
        "yes: the loaded cpp ops have CUDA kernels"
        if b["cuda_kernels_loaded"]
        else "no: the loaded cpp ops are CPU-only",
    )

    bk = report["backends"]
    section(f"Backends ({bk['dtype']})")
    for device, table in bk["devices"].items():
        for name, state in table.items():
            status = "available" if state["available"] else f"unavailable: {state['reason']}"
            row(f"{device} {name}", status)
    row("auto picks", ", ".join(f"{d}: {n or '-'}" for d, n in bk["auto"].items()))

    c = report["cpu"]
    section("CPU")
    model = c["model"]
    if c["family"] is not None:
        model += f" (family {c['family']}, model {c['model_number']})"
    row("model", model)
    row("cores", f"{c['logical_cpus']} logical CPUs, torch uses {c['torch_threads']} threads")
    if c["isa"]:
        have = [flag for flag, present in c["isa"].items() if present]
        lack = [flag for flag, present in c["isa"].items() if not present]
        row("ISA level", c["x86_64_level"] or "unknown")
        row("ISA has", " ".join(have) or "none of " + " ".join(c["isa"]))
        row("ISA lacks", " ".join(lack) or "-")
    else:
        row("ISA", f"unknown ({c['machine']}: no /proc/cpuinfo flags)")
    row("torch ATen ISA", c["torch_cpu_capability"])
    row(
        "train default",
        "bfloat16 autocast, channels-last (native bfloat16)"
        if c["native_bfloat16"]
        else "float32, contiguous (no native bfloat16)",
    )
    row("L2 per core", f"{_size(c['l2_bytes_per_core'])} ({c['l2_source']})")
    kernel = c["kernel"]
    if kernel["reported"]:
        row("kernel clone", kernel.get("clone", "unknown"))
        extra = {k: val for k, val in kernel.items() if k not in ("reported", "clone")}
        for key, val in extra.items():
            row(key, _size(val) if key.endswith("bytes_per_core") else val)
    else:
        row("kernel clone", kernel["note"])

    g = report["gpu"]
    section("GPU")
    if not g["available"]:
        row("none", g["reason"])
    for dev in g["devices"]:
        row(
            f"cuda:{dev['index']}",
            f"{dev['name']}, {dev['capability']}, {dev['sm_count']} SMs, "
            f"{dev['memory_bytes'] / (1 << 30):.1f} GiB",
        )
        if recorded and recorded.get("cuda_kernels") and recorded.get("cuda_archs"):
            major, minor = divmod(int(dev["capability"].removeprefix("sm_")), 10)
            row("  cpp kernels", cuda_arch_coverage(major, minor, recorded["cuda_archs"]))

    if report["environment"]:
        section("Environment")
        for name, value in report["environment"].items():
            row(name, value)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args: argparse.Namespace) -> int:
    report = collect()
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m capsnet_fused.info", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
