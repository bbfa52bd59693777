"""`capsnet-fused report`: a run folder turned into a documentation folder (issue 20).

The figures come from a real tiny run (tests/training_data.py's synthetic data and CapsNet); the
table's arithmetic is checked on hand-made records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capsnet_fused.cli import main
from capsnet_fused.report import BEGIN, END, _epoch_ranges, summarize, write_report
from tests.training_data import write_synthetic_dataset

TINY = [
    "--dataset", "fashion-mnist", "--batch-size", "16", "--conv-channels", "6",
    "--kernel-size", "3", "--primary-caps", "2", "--primary-dim", "4", "--digit-dim", "6",
    "--decoder-hidden", "24", "32", "--no-progress", "--seed", "3", "--hflip", "--normalize",
]  # fmt: skip


def _record(epoch: int, accuracy: float, **changes) -> dict:
    record = {
        "epoch": epoch,
        "test_accuracy": accuracy,
        "train_loss": 1.0 / epoch,
        "train_images": 60000,
        "epoch_time_s": 100.0 * epoch,
        "test_time_s": 10.0,
        "images_per_s": 600.0 / epoch,
        "machine": "cpu A",
        "device": "cpu",
        "backend": "cpp",
    }
    return {**record, **changes}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A one-epoch run, then resumed for a second: two sessions."""
    data = write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))
    out = tmp_path_factory.mktemp("run")
    args = ["train", *TINY, "--data-dir", str(data), "--out", str(out)]
    assert main([*args, "--epochs", "1"]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    return out


def test_summary_best_final_and_times():
    records = [
        _record(1, 0.80),
        _record(2, 0.90),
        _record(3, 0.90, machine="cpu B"),
        _record(4, 0.85, machine="cpu B"),
    ]
    summary = summarize(records)
    # A tie goes to the earlier epoch: the first time the best accuracy was reached.
    assert (summary["best_epoch"], summary["best_accuracy"]) == (2, pytest.approx(90.0))
    assert (summary["final_epoch"], summary["final_accuracy"]) == (4, pytest.approx(85.0))
    assert summary["train_time_s"] == {"median": 250.0, "min": 100.0, "max": 400.0}
    assert summary["wall_time_s"]["median"] == 260.0
    assert summary["total_wall_s"] == 1000.0 + 40.0
    assert summary["images_per_s"]["max"] == 600.0
    assert summary["machines"] == {"cpu A": [1, 2], "cpu B": [3, 4]}


def test_summary_without_test_times_reports_the_training_time_only():
    records = [_record(1, 0.5), _record(2, 0.6)]
    del records[0]["test_time_s"]
    summary = summarize(records)
    assert summary["wall_time_s"] is None and summary["total_wall_s"] is None
    assert summary["total_train_s"] == 300.0
    with pytest.raises(ValueError, match="no epoch records"):
        summarize([])


def test_epoch_ranges():
    assert _epoch_ranges([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8"
    assert _epoch_ranges([4]) == "4"


def test_report_of_a_run(run, tmp_path, capsys):
    out = tmp_path / "doc"
    args = ["report", str(run), "--out", str(out), "--reference", "93.6"]
    assert main([*args, "--reference-label", "published CapsNet"]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {
        "README.md",
        "config.json",
        "metrics.jsonl",
        "sessions.jsonl",
        "training_curve.png",
        "reconstructions.png",
        "perturbations.png",
    }
    for name in ("config.json", "metrics.jsonl", "sessions.jsonl"):
        assert (out / name).read_bytes() == (run / name).read_bytes()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: (r["test_accuracy"], -r["epoch"]))
    readme = (out / "README.md").read_text()
    assert f"| best test accuracy | **{100 * best['test_accuracy']:.2f}%** (epoch " in readme
    final = f"**{100 * records[-1]['test_accuracy']:.2f}%** (epoch 2)"
    assert f"| final test accuracy | {final} |" in readme
    assert "| epochs | 2 |" in readme and "| published CapsNet | 93.6% (best " in readme
    assert f"| machine | {records[0]['machine']} |" in readme
    assert "| wall time per epoch (training + test) |" in readme
    # The precision the run settled on when it started ("auto" depends on the CPU).
    config = json.loads((run / "config.json").read_text())
    precision = "bfloat16 autocast" if config["amp"] else "float32"
    layout = "channels-last" if config["channels_last"] else "contiguous"
    assert f"| precision, convolution layout | {precision}, {layout} |" in readme
    # Both sessions' commands, in order: the one that started the run and the resume.
    started = readme.index(f"capsnet-fused train {' '.join(TINY)}")
    assert readme.index(f"capsnet-fused train --resume {run} --epochs 2") > started
    assert "![training curve](training_curve.png)" in readme
    assert f"capsnet-fused visualize {run} --out {out} --reference 93.6" in readme
    assert (out / "perturbations.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_rerun_replaces_only_the_block_between_the_markers(run, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# By hand\n\nRecipe text.\n\n{BEGIN}\nold table\n{END}\n\nAfter.\n")
    write_report(run, tmp_path, figures=False)
    write_report(run, tmp_path, figures=False)
    text = readme.read_text()
    assert text.startswith("# By hand\n\nRecipe text.\n\n") and text.endswith(f"{END}\n\nAfter.\n")
    assert text.count(BEGIN) == 1 and "old table" not in text and "| epochs | 2 |" in text
    assert not list(tmp_path.glob("*.png"))
    # A README without markers keeps its text and gets the table appended.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "README.md").write_text("Notes.\n")
    write_report(run, plain, figures=False)
    assert (plain / "README.md").read_text().startswith(f"Notes.\n\n{BEGIN}\n")
    readme.write_text(f"{END}\n{BEGIN}\n")
    with pytest.raises(ValueError, match="markers are incomplete or out of order"):
        write_report(run, tmp_path, figures=False)


def test_report_refuses_what_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "config.json does not exist" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["report", str(tmp_path), "--no-figures"]) == 2
    assert "no epoch records" in capsys.readouterr().err
    assert not (tmp_path / "README.md").exists()
