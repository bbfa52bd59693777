"""Builds capsnet_fused._C: the CPU kernels always, the CUDA kernels when possible.

Install with `pip install --no-build-isolation -e .` so that the build uses the installed torch
(build isolation would download a CUDA build of torch into the build environment).
"""

from setuptools import setup

try:
    import torch  # noqa: F401
except ImportError as exc:
    raise SystemExit(
        "capsnet-fused builds against the installed torch, and none was found. Install torch "
        "first (CPU machines: pip install torch==2.13.0), then: "
        "pip install --no-build-isolation -e ."
    ) from exc

setup()
