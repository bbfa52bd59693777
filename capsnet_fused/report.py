"""`capsnet-fused report`: a run folder turned into a documentation folder.

From RUN/config.json, RUN/metrics.jsonl, RUN/sessions.jsonl (when the run wrote one) and
RUN/checkpoint.pt it writes into the output folder: copies of the three JSON files, the figures
of `capsnet-fused visualize` (training curve with an optional published reference line,
reconstructions, Figure 4 perturbations) and a results table in README.md. The table sits
between two marker lines, so a hand-written README around it survives a rerun: only the part
between the markers is replaced (a README without markers gets the table appended).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
from pathlib import Path
from typing import Any

from capsnet_fused.checkpoint import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    SESSIONS_NAME,
    load_checkpoint,
    read_jsonl,
    read_metrics_lenient,
)

BEGIN = (
    "<!-- capsnet-fused report: begin (generated; the lines up to the end marker are replaced) -->"
)
END = "<!-- capsnet-fused report: end -->"
README_NAME = "README.md"


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of a run from its epoch records (metrics.jsonl), in the units they are shown in.

    Times per epoch are medians with their range (single epochs on a shared machine are
    noisy); an epoch's wall time is its training (epoch_time_s) plus its test evaluation
    (test_time_s, absent from runs older than that field: then None).
    """
    if not records:
        raise ValueError("the run has no epoch records yet: nothing to report")
    best = max(records, key=lambda r: (r["test_accuracy"], -r["epoch"]))
    final = records[-1]
    train_s = [r["epoch_time_s"] for r in records]
    test_s = [r["test_time_s"] for r in records if "test_time_s" in r]
    wall_s = None
    if len(test_s) == len(records):
        wall_s = [r["epoch_time_s"] + r["test_time_s"] for r in records]
    machines: dict[str, list[int]] = {}
    for record in records:
        machines.setdefault(record.get("machine", "not recorded"), []).append(record["epoch"])
    return {
        "epochs": final["epoch"],
        "best_epoch": best["epoch"],
        "best_accuracy": 100 * best["test_accuracy"],
        "final_epoch": final["epoch"],
        "final_accuracy": 100 * final["test_accuracy"],
        "final_train_loss": final["train_loss"],
        "train_images": final.get("train_images"),
        "train_time_s": _spread(train_s),
        "test_time_s": _spread(test_s) if test_s else None,
        "wall_time_s": _spread(wall_s) if wall_s else None,
        "total_wall_s": sum(wall_s) if wall_s else None,
        "total_train_s": sum(train_s),
        "images_per_s": _spread([r["images_per_s"] for r in records]),
        "machines": machines,
        "devices": sorted({str(r.get("device", "?")) for r in records}),
        "backends": sorted({str(r.get("backend", "?")) for r in records}),
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _seconds(spread: dict[str, float]) -> str:
    return f"{spread['median']:.1f} s (median; {spread['min']:.1f}-{spread['max']:.1f} s)"


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def _epoch_ranges(epochs: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    parts, start = [], epochs[0]
    for previous, current in zip(epochs, [*epochs[1:], None]):
        if current != previous + 1:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ", ".join(parts)


def format_table(
    summary: dict[str, Any],
    config: dict[str, Any],
    sessions: list[dict[str, Any]],
    parameters: int | None = None,
    reference: float | None = None,
    reference_label: str = "reference",
) -> str:
    """The README's results table (markdown) with the commands that made the run."""
    model = config.get("model", "capsnet")
    if parameters is not None:
        model += f" ({parameters / 1e6:.2f} M parameters)"
    images = summary["train_images"]
    rows = [
        ("model", model),
        ("dataset", f"{config.get('dataset')}" + (f", {images} training images" if images else "")),
        ("epochs", str(summary["epochs"])),
        (
            "best test accuracy",
            f"**{summary['best_accuracy']:.2f}%** (epoch {summary['best_epoch']})",
        ),
        (
            "final test accuracy",
            f"**{summary['final_accuracy']:.2f}%** (epoch {summary['final_epoch']})",
        ),
    ]
    if reference is not None:
        best_gap = summary["best_accuracy"] - reference
        final_gap = summary["final_accuracy"] - reference
        rows.append(
            (
                reference_label,
                f"{reference:g}% (best {best_gap:+.2f}, final {final_gap:+.2f} points)",
            )
        )
    rows.append(("training time per epoch", _seconds(summary["train_time_s"])))
    if summary["wall_time_s"] is not None:
        rows.append(("test evaluation per epoch", _seconds(summary["test_time_s"])))
        rows.append(("wall time per epoch (training + test)", _seconds(summary["wall_time_s"])))
        rows.append(("total wall time (all epochs)", _duration(summary["total_wall_s"])))
    else:
        rows.append(("total training time", _duration(summary["total_train_s"])))
    spread = summary["images_per_s"]
    rows.append(
        (
            "images per second (training)",
            f"{spread['median']:.1f} (median; {spread['min']:.1f}-{spread['max']:.1f})",
        )
    )
    machines = summary["machines"]
    rows.append(
        (
            "machine",
            "; ".join(
                f"{name}" + (f" (epochs {_epoch_ranges(epochs)})" if len(machines) > 1 else "")
                for name, epochs in machines.items()
            ),
        )
    )
    rows.append(
        (
            "device, routing backend",
            f"{', '.join(summary['devices'])}, {', '.join(summary['backends'])}",
        )
    )
    # Settled when the run started (an "auto" default depends on the CPU it started on).
    on_cuda = any(device.startswith("cuda") for device in summary["devices"])
    autocast = "float16 autocast" if on_cuda else "bfloat16 autocast"
    precision = autocast if config.get("amp") else "float32"
    layout = "channels-last" if config.get("channels_last") else "contiguous"
    rows.append(("precision, convolution layout", f"{precision}, {layout}"))
    lines = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    lines.append("")
    if sessions:
        lines.append("Commands, in order (each start or resume of the run, from sessions.jsonl):")
        lines.append("")
        lines.append("```bash")
        for session in sessions:
            command = session.get("command") or "(command not recorded: started from Python)"
            step = session.get("from_step", "?")
            where = (
                "started"
                if step == 0
                else f"resumed at step {step} ({session.get('from_epoch', '?')} epochs done)"
            )
            lines.append(
                f"# {session.get('started', '?')}: {where}, on {session.get('machine', '?')}"
            )
            lines.append(command)
        lines.append("```")
    else:
        lines.append("Commands: not recorded (the run predates sessions.jsonl); see config.json.")
    lines.append("")
    lines.append(
        "Times are wall-clock seconds measured by the training process on the machine named; "
        "on a shared machine they vary with its load."
    )
    return "\n".join(lines)


def _command(name: str, run: Path, out: Path, reference: float | None, label: str) -> str:
    words = ["capsnet-fused", name, str(run), "--out", str(out)]
    if reference is not None:
        words += ["--reference", f"{reference:g}", "--reference-label", label]
    return shlex.join(words)


def _splice(readme: Path, block: str, title: str) -> str:
    """README.md's text with the block between the markers replaced (or appended)."""
    marked = f"{BEGIN}\n{block}\n{END}"
    if not readme.is_file():
        return f"# {title}\n\n{marked}\n"
    text = readme.read_text()
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 and end < 0:
        return text.rstrip("\n") + f"\n\n{marked}\n"
    if begin < 0 or end < begin:
        raise ValueError(f"{readme}: the report markers are incomplete or out of order")
    return text[:begin] + marked + text[end + len(END) :]


def write_report(
    run: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    reference: float | None = None,
    reference_label: str = "reference",
    figures: bool = True,
    data_dir: str | None = None,
    device: str = "auto",
) -> list[Path]:
    """Write the report of run folder `run` into `out` (default: the run folder); returns the
    files written. figures=False skips the PNGs (they load the model and test images)."""
    run = Path(run)
    if run.is_file():
        run = run.parent
    config_file, metrics_file = run / CONFIG_NAME, run / METRICS_NAME
    for needed in (config_file, metrics_file):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} does not exist: is {run} a run folder?")
    if reference is not None and not 0 <= reference <= 100:
        raise ValueError(f"--reference is a test accuracy in %, 0..100, got {reference}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file}: not JSON ({exc})") from exc
    records = read_metrics_lenient(metrics_file)
    sessions = read_jsonl(run / SESSIONS_NAME)
    summary = summarize(records)
    ckpt = run / CHECKPOINT_NAME
    parameters = None
    if ckpt.is_file():
        state = load_checkpoint(ckpt)
        parameters = sum(tensor.numel() for tensor in state["model"].values())
    out = Path(out) if out is not None else run
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in (CONFIG_NAME, METRICS_NAME, SESSIONS_NAME):
        source = run / name
        if source.is_file() and source.resolve() != (out / name).resolve():
            written.append(Path(shutil.copyfile(source, out / name)))
    pictures: list[Path] = []
    if figures:
        from capsnet_fused.visualize import plot_training_curve, visualize_checkpoint

        if ckpt.is_file():
            pictures = visualize_checkpoint(
                ckpt,
                out,
                data_dir=data_dir,
                device=device,
                reference=reference,
                reference_label=reference_label,
            )
        else:
            pictures = [
                plot_training_curve(
                    metrics_file, out / "training_curve.png", reference, reference_label
                )
            ]
    written += pictures
    block = [
        format_table(summary, config, sessions, parameters, reference, reference_label),
        "",
    ]
    for picture in pictures:
        block.append(f"![{picture.stem.replace('_', ' ')}]({picture.name})")
        block.append("")
    block.append(
        "The figures (training curve, reconstructions, Figure 4 perturbations) are drawn by "
        f"`{_command('visualize', run, out, reference, reference_label)}`; this table and "
        f"the figures by `{_command('report', run, out, reference, reference_label)}`."
    )
    readme = out / README_NAME
    text = _splice(readme, "\n".join(block), f"Run {run.name}")
    readme.write_text(text)
    written.append(readme)
    return written
