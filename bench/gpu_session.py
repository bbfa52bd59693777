"""Python steps of bench/gpu_session.sh: env, smoke, train and summary (see that script).

    python bench/gpu_session.py env OUT        machine, versions, git revision -> OUT/env.json
    python bench/gpu_session.py smoke          one small forward+backward per fused path
    python bench/gpu_session.py train OUT DATA DEVICE SECONDS
    python bench/gpu_session.py summary OUT    the table printed last; OUT/summary.md and .json

Runs on the lent GPU machine's Python 3.12 with torch 2.11 and triton 3.6, and on the CPU
machines (a dry run); uses nothing newer than those.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
# What stays in OUT besides logs.tar.gz (the device tool returns at most 8 files).
KEEP = ("summary.md", "summary.json", "env.json", "routing.csv", "e2e-end-to-end.csv",
        "train_curve.png")  # fmt: skip


def _run(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({exc.__class__.__name__})"


def env(out: Path) -> int:
    import torch

    info = {
        "mode": os.environ.get("CAPSNET_FUSED_SESSION_MODE", "unknown"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "git_revision": _run("git", "-C", str(ROOT), "rev-parse", "HEAD"),
        "nvcc": _run("nvcc", "--version").splitlines()[-1:] if shutil.which("nvcc") else None,
        "nvidia_smi": _run("nvidia-smi") if shutil.which("nvidia-smi") else None,
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    import numpy

    info["numpy"] = numpy.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            sm_count=props.multi_processor_count,
            l2_bytes=getattr(props, "L2_cache_size", None),
            memory_bytes=props.total_memory,
            capability=f"{props.major}.{props.minor}",
            driver=_run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
        )
    (out / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "nvidia_smi"}, indent=1))
    return 0


def smoke() -> int:
    """One small forward+backward through each fused backend available on the device."""
    import torch

    import capsnet_fused
    from capsnet_fused import available_backends, dynamic_routing, reference_routing

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, 37, 8, generator=gen).to(device)
    weight = (torch.randn(37, 10, 8, 16, generator=gen) / 3).to(device)
    prior = torch.randn(37, 10, generator=gen).to(device)
    worst = 0.0
    for backend in available_backends(device):
        for softmax_over in ("out_caps", "in_caps"):
            leaves = [t.clone().requires_grad_() for t in (u, weight, prior)]
            v = dynamic_routing(*leaves[:2], 3, prior=leaves[2], softmax_over=softmax_over,
                                backend=backend)  # fmt: skip
            grads = torch.autograd.grad(v.square().sum(), leaves)
            ref = [t.detach().double().requires_grad_() for t in (u, weight, prior)]
            v_ref = reference_routing(*ref[:2], 3, prior=ref[2], softmax_over=softmax_over)
            grads_ref = torch.autograd.grad(v_ref.square().sum(), ref)
            for got, want in zip([v, *grads], [v_ref, *grads_ref]):
                err = ((got.double() - want).norm() / want.norm()).item()
                worst = max(worst, err)
            print(f"{backend} {softmax_over}: ok")
    print(
        f"capsnet_fused {capsnet_fused.__version__} on {device}: worst relative error {worst:.2e}"
    )
    return 0 if worst < 1e-3 else 1


def train(out: Path, data: str, device: str, seconds: float) -> int:
    """Fashion-MNIST training for about `seconds` seconds; accuracy per epoch."""
    run_dir = out / "logs" / "train-run"
    cmd = [sys.executable, "-m", "capsnet_fused.cli", "train", "--dataset", "fashion-mnist"]
    cmd += ["--data-dir", data, "--device", device, "--out", str(run_dir), "--epochs", "100"]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"trained {time.time() - start:.0f} s")
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        print(metrics.read_text())
        _plot_curve(metrics, out / "train_curve.png")
    return 0


def _plot_curve(metrics: Path, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    epochs = [r.get("epoch") for r in records if "test_accuracy" in r]
    accuracy = [r["test_accuracy"] for r in records if "test_accuracy" in r]
    if not epochs:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, accuracy, marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _model_us() -> dict[tuple[int, str], float]:
    """Modelled H200 microseconds of the Triton op by (B, mode) from the committed counts."""
    model = {}
    for path in sorted(RESULTS.glob("traffic-*.json")):
        summary = json.loads(path.read_text())
        if summary.get("variant") != "out_caps":
            continue
        row = summary["model"]["H200"]
        batch = summary["shape"]["B"]
        model[(batch, "forward")] = row["triton_forward_us"]
        model[(batch, "forward+backward")] = row["triton_total_us"]
    return model


def _fmt(value) -> str:
    """A CSV cell for a table: numbers to 4 significant digits."""
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return "" if value is None else str(value)


def _junit(path: Path) -> str:
    if not path.exists():
        return "no junit report"
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return "empty junit report"
    keys = ("tests", "failures", "errors", "skipped")
    return ", ".join(f"{k} {suite.get(k, '?')}" for k in keys) + f", {suite.get('time', '?')} s"


def summary(out: Path) -> int:
    logs = out / "logs"
    lines = []
    info = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    mode = info.get("mode", "unknown")
    lines.append(
        f"# GPU session ({'dry run: no CUDA, CPU only' if mode != 'gpu' else info.get('gpu')})"
    )
    lines.append(
        f"python {info.get('python')}, torch {info.get('torch')}, triton {info.get('triton')}, "
        f"git {str(info.get('git_revision'))[:12]}, SMs {info.get('sm_count')}, "
        f"L2 {info.get('l2_bytes')}"
    )
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    steps_path = logs / "steps.tsv"
    if steps_path.exists():
        for row in steps_path.read_text().splitlines():
            lines.append("| " + " | ".join(row.split("\t")) + " |")
    lines += ["", f"tests: {_junit(logs / 'junit.xml')}"]
    model = _model_us()
    # The routing steps' CSVs (routing-b128, routing-batches, routing-bf16) as one routing.csv.
    rows = [row for path in sorted(out.glob("routing-*.csv")) for row in _read_csv(path)]
    if rows:
        with (out / "routing.csv").open("w", newline="") as handle:
            fields = list(dict.fromkeys(key for row in rows for key in row))
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    if rows:
        lines += [
            "",
            "Routing (median ms; model = bench/results/traffic-*.json, Triton, H200, float32, "
            "out_caps; a model, not a measurement)",
            "",
            "| mode | B | dtype | backend | status | median ms | x ref | model ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            batch = int(r.get("B", 0) or 0)
            predicted = model.get((batch, r.get("mode")))
            shown = (
                f"{predicted / 1000:.3f}"
                if predicted is not None
                and r.get("backend") == "triton"
                and r.get("dtype") == "float32"
                else ""
            )
            lines.append(
                f"| {r.get('mode')} | {batch} | {r.get('dtype')} | {r.get('backend')} | "
                f"{r.get('status')} | {_fmt(r.get('median_ms'))} | "
                f"{_fmt(r.get('speedup_vs_reference'))} | {shown} |"
            )
    e2e = _read_csv(out / "e2e-end-to-end.csv")
    if e2e:
        keys = ["backend", "batch", "status", "train_median_ms", "train_images_per_s",
                "train_speedup_vs_reference", "infer_median_ms", "infer_images_per_s",
                "infer_speedup_vs_reference"]  # fmt: skip
        lines += ["", "End to end (CapsNet training step and inference)", ""]
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in e2e]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(
        json.dumps({"env": info, "routing": rows, "end_to_end": e2e}, indent=1) + "\n"
    )
    # Keep at most 8 files: the rest goes into logs/ (packed by the shell script).
    logs.mkdir(exist_ok=True)
    for path in out.iterdir():
        if path.is_file() and path.name not in KEEP:
            path.rename(logs / path.name)
    print(text)
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    command, *rest = argv
    if command == "env":
        return env(Path(rest[0]))
    if command == "smoke":
        return smoke()
    if command == "train":
        return train(Path(rest[0]), rest[1], rest[2], float(rest[3]))
    if command == "summary":
        return summary(Path(rest[0]))
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
