"""What a benchmark ran on: the device's name and file stem, the CPU (model, vector ISA, the
C++ kernel clone and its L2), versions, the git revision and the date; every result file
records it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import capsnet_fused
from capsnet_fused import available_backends

# The checkout whose git revision a run records.
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The /proc/cpuinfo flags that decide which kernel clone runs and what --amp gains.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16")


def _cpu_isa() -> str:
    """CPU family, model and the vector instruction sets that matter here, e.g.
    "family 25 model 1: avx2 fma": the model name alone does not tell (a virtual machine
    reports "AMD EPYC" for Zen 1 to Zen 5). Empty where /proc/cpuinfo is missing."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return ""
    flags = set(fields.get("flags", "").split())
    isa = " ".join(f for f in _ISA_FLAGS if f in flags) or "no avx2"
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}: {isa}"


def _cpu_kernel_fields(device: torch.device) -> dict[str, Any]:
    """Which clone of the C++ CPU kernels runs and the L2 they read: the CPU's name alone does
    not say (a virtual machine reports "AMD EPYC" for Zen 1 to Zen 5). Empty off the CPU or
    without capsnet_fused._C."""
    if device.type != "cpu":
        return {}
    try:
        info = json.loads(torch.ops.capsnet_fused.cpp_kernel_info())
    except (AttributeError, RuntimeError, ValueError):  # not built, or a refused setting
        return {}
    return {
        "cpp_clone": info["clone"],
        "cpu_l2_bytes_per_core": info["l2_bytes_per_core"],
        # CAPSNET_FUSED_UHAT_CACHE as set (auto, on, off) and what auto decides at B = 128, MNIST.
        "cpp_u_hat_cache": info["u_hat_cache"],
        "cpp_u_hat_path_mnist": info["u_hat_cache_mnist"]["path"],
    }


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(_REPO_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def device_name(device: torch.device) -> str:
    """The accelerator's or the CPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def device_slug(device: torch.device) -> str:
    """File stem for a device: "cpu", or e.g. "nvidia-h100" from "NVIDIA H100 80GB HBM3"."""
    if device.type != "cuda":
        return device.type
    words = device_name(device).split()[:2]
    return re.sub(r"[^a-z0-9]+", "-", " ".join(words).lower()).strip("-") or "cuda"


def environment_info(device: torch.device) -> dict[str, Any]:
    """Machine, versions, git revision and date of a run."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_model": _cpu_model(),
        "cpu_isa": _cpu_isa(),
        **_cpu_kernel_fields(device),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other processes on the machine inflate CPU timings; the load says how busy it was.
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "capsnet_fused": capsnet_fused.__version__,
        "cuda": torch.version.cuda,
        "cuda_capability": (
            ".".join(map(str, torch.cuda.get_device_capability(device)))
            if device.type == "cuda"
            else None
        ),
        "git_revision": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "available_backends": available_backends(device),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
