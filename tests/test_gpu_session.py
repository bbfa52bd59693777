"""bench/gpu_session.sh in its dry-run form (no CUDA here): it must run to the end, leave at
most 8 files (the device tool's limit) and a summary, so that it has not rotted when a GPU is
lent. On a machine with CUDA the script does the real session, which is too long for a test."""

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_leaves_a_summary_and_at_most_8_files(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("with CUDA the script runs the whole GPU session")
    env = {**os.environ, "OUT": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)  # the script's processes choose for themselves
    proc = subprocess.run(
        ["bash", "bench/gpu_session.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8, files
    assert {"summary.md", "summary.json", "env.json", "logs.tar.gz"} <= set(files)
    summary = (tmp_path / "summary.md").read_text()
    assert "dry run" in summary
    steps = {}
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        names = tar.getnames()
        table = tar.extractfile("logs/steps.tsv").read().decode()
    for line in table.splitlines():
        name, status, _ = line.split("\t")
        steps[name] = status
    # Every step ran and passed in its reduced form.
    for name in ("env", "build", "bench_b128", "tests", "bench_e2e", "smoke"):
        assert steps.get(name) == "ok", (name, steps, proc.stdout[-3000:])
    assert "logs/junit.xml" in names
    assert json.loads((tmp_path / "env.json").read_text())["mode"] == "dry"
    # The routing rows reached the summary's table.
    assert "| forward | 2 | float32 | cpp | ok |" in summary
