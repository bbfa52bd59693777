"""The Fashion-MNIST recipe flags (issue 20): --hflip and --normalize in training, resume, eval
and visualize, older checkpoints without them, and the training curve's reference line.

Tiny synthetic dataset and CapsNet of tests/training_data.py: a second or two per run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from capsnet_fused.cli import main
from capsnet_fused.data import Normalization, load_dataset
from capsnet_fused.info import machine_summary
from capsnet_fused.models import CapsNet
from capsnet_fused.train import (
    CapsNetLoss,
    evaluate_checkpoint,
    load_checkpoint,
    save_checkpoint,
    train,
)
from capsnet_fused.visualize import draw_training_curve, visualize_checkpoint
from tests.training_data import assert_same_state, tiny_config, write_synthetic_dataset

LIMIT = 40  # of the 64 training images: the statistics must be those of the images used


def _quiet():
    return {"log": lambda *_: None}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))


def recipe_config(dataset_dir: Path, out: Path, **changes):
    return tiny_config(dataset_dir, out, hflip=True, normalize=True, limit_train=LIMIT, **changes)


@pytest.fixture(scope="module")
def recipe_run(dataset_dir, tmp_path_factory) -> Path:
    """Two epochs with --hflip --normalize on the first LIMIT training images."""
    out = tmp_path_factory.mktemp("recipe")
    train(recipe_config(dataset_dir, out), **_quiet())
    return out


def _expected_normalization(dataset_dir: Path) -> Normalization:
    images = load_dataset("fashion-mnist", "train", dataset_dir, limit=LIMIT).images
    pixels = images.double() / 255
    return Normalization((pixels.mean().item(),), (pixels.std(unbiased=False).item(),))


def test_flags_and_statistics_are_recorded_in_config_and_checkpoint(dataset_dir, recipe_run):
    want = _expected_normalization(dataset_dir)
    config = json.loads((recipe_run / "config.json").read_text())
    assert config["hflip"] is True and config["normalize"] is True
    assert config["normalization"]["mean"] == pytest.approx(list(want.mean), abs=1e-12)
    assert config["normalization"]["std"] == pytest.approx(list(want.std), abs=1e-12)
    # All 64 images give another mean (by 2e-5, far above the 1e-12 checked): the limit counts.
    everything = load_dataset("fashion-mnist", "train", dataset_dir).images.double() / 255
    assert abs(everything.mean().item() - want.mean[0]) > 1e-6
    state = load_checkpoint(recipe_run)
    assert state["config"]["hflip"] and state["config"]["normalize"]
    assert state["normalization"] == config["normalization"]
    record = json.loads((recipe_run / "metrics.jsonl").read_text().splitlines()[-1])
    # The test evaluation's time is recorded beside the training's, for the time per epoch.
    assert record["test_time_s"] > 0 and record["epoch_time_s"] > 0
    # And the machine the epoch ran on (a resumed run may move), for the report.
    assert record["machine"] == machine_summary("cpu")


def test_the_model_sees_normalised_images_and_the_loss_the_raw_ones(
    dataset_dir, tmp_path, monkeypatch
):
    seen = {"model": [], "loss": []}
    real_model, real_loss = CapsNet.forward, CapsNetLoss.forward

    def model_forward(self, images, labels=None):
        seen["model"].append(images.detach().clone())
        return real_model(self, images, labels)

    def loss_forward(self, output, images, labels):
        seen["loss"].append(images.detach().clone())
        return real_loss(self, output, images, labels)

    monkeypatch.setattr(CapsNet, "forward", model_forward)
    monkeypatch.setattr(CapsNetLoss, "forward", loss_forward)
    train(recipe_config(dataset_dir, tmp_path, epochs=1), **_quiet())
    norm = _expected_normalization(dataset_dir)
    assert len(seen["model"]) == len(seen["loss"]) > 3  # training and test batches
    for model_input, loss_input in zip(seen["model"], seen["loss"], strict=True):
        # The reconstruction target is the image in [0, 1] that the decoder's sigmoid can reach.
        assert loss_input.min() >= 0 and loss_input.max() <= 1
        torch.testing.assert_close(model_input, norm(loss_input))
    assert min(batch.min().item() for batch in seen["model"]) < 0


def test_hflip_changes_the_trajectory_and_only_when_asked(dataset_dir, tmp_path):
    runs = {}
    for name, hflip in (("plain", False), ("again", False), ("flip", True)):
        out = tmp_path / name
        train(tiny_config(dataset_dir, out, epochs=1, hflip=hflip), **_quiet())
        runs[name] = load_checkpoint(out)["model"]
    assert_same_state(runs["plain"], runs["again"], atol=0)
    assert not torch.allclose(runs["plain"]["conv1.0.weight"], runs["flip"]["conv1.0.weight"])


def test_resume_keeps_the_flags_and_the_checkpoints_statistics(
    dataset_dir, recipe_run, tmp_path, monkeypatch
):
    half = tmp_path / "half"
    train(recipe_config(dataset_dir, half, epochs=1), **_quiet())
    train(recipe_config(dataset_dir, half), resume=half, given={"epochs": 2}, **_quiet())
    assert_same_state(load_checkpoint(recipe_run)["model"], load_checkpoint(half)["model"])
    for flag, value in (("hflip", False), ("normalize", False)):
        with pytest.raises(ValueError, match=f"--{flag} False differs from the checkpoint's True"):
            train(recipe_config(dataset_dir, half), resume=half, given={flag: value}, **_quiet())

    # The statistics come from the checkpoint, not from the images: change them and resume.
    state = load_checkpoint(half)
    state["normalization"] = {"mean": [0.25], "std": [0.5]}
    other = tmp_path / "other"
    other.mkdir()
    save_checkpoint(state, other / "checkpoint.pt")
    seen = []
    real_model = CapsNet.forward

    def model_forward(self, images, labels=None):
        seen.append(images.detach().clone())
        return real_model(self, images, labels)

    monkeypatch.setattr(CapsNet, "forward", model_forward)
    train(recipe_config(dataset_dir, other), resume=other, given={"epochs": 3}, **_quiet())
    # Every model input is (x - 0.25) / 0.5 of an image in [0, 1].
    assert min(batch.min().item() for batch in seen) >= -0.5 - 1e-6
    assert max(batch.max().item() for batch in seen) <= 1.5 + 1e-6
    assert json.loads((other / "config.json").read_text())["normalization"]["mean"] == [0.25]


def test_a_plain_run_refuses_normalize_on_resume(dataset_dir, tmp_path):
    train(tiny_config(dataset_dir, tmp_path, epochs=1), **_quiet())
    with pytest.raises(ValueError, match="--normalize True differs from the checkpoint's False"):
        train(
            tiny_config(dataset_dir, tmp_path, normalize=True),
            resume=tmp_path,
            given={"epochs": 2, "normalize": True},
            **_quiet(),
        )


def test_eval_applies_the_runs_normalisation(recipe_run):
    record = json.loads((recipe_run / "metrics.jsonl").read_text().splitlines()[-1])
    metrics = evaluate_checkpoint(recipe_run, progress=False)
    assert metrics["accuracy"] == pytest.approx(record["test_accuracy"])
    assert metrics["loss"] == pytest.approx(record["test_loss"], rel=1e-5)
    assert metrics["recon_loss"] == pytest.approx(record["test_recon_loss"], rel=1e-5)


def test_a_normalize_checkpoint_without_statistics_is_refused(recipe_run, tmp_path):
    state = load_checkpoint(recipe_run)
    del state["normalization"]
    path = save_checkpoint(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=f"{path}: the run was trained with --normalize"):
        evaluate_checkpoint(path, progress=False)


def test_visualize_feeds_the_model_normalised_images(recipe_run, tmp_path, monkeypatch):
    seen = []
    real_model = CapsNet.forward

    def model_forward(self, images, labels=None):
        seen.append(images.detach().clone())
        return real_model(self, images, labels)

    monkeypatch.setattr(CapsNet, "forward", model_forward)
    written = visualize_checkpoint(recipe_run, tmp_path, device="cpu", num_images=4)
    assert {p.name for p in written} == {
        "reconstructions.png",
        "perturbations.png",
        "training_curve.png",
    }
    norm = Normalization.from_dict(load_checkpoint(recipe_run)["normalization"])
    test_images = load_dataset(
        "fashion-mnist",
        "test",
        json.loads((recipe_run / "config.json").read_text())["data_dir"],
        limit=4,
    ).images
    torch.testing.assert_close(seen[0], norm(test_images.float() / 255))


def test_checkpoints_from_before_the_new_settings_still_load(dataset_dir, tmp_path):
    # An older checkpoint's config has no hflip, normalize or model: read as the defaults.
    train(tiny_config(dataset_dir, tmp_path / "run", epochs=1), **_quiet())
    state = load_checkpoint(tmp_path / "run")
    for name in ("hflip", "normalize", "model"):
        del state["config"][name]
    del state["normalization"]
    old = tmp_path / "old"
    old.mkdir()
    save_checkpoint(state, old / "checkpoint.pt")
    metrics = evaluate_checkpoint(old, progress=False)
    assert metrics["model"] == "capsnet" and metrics["images"] == 40
    train(tiny_config(dataset_dir, old), resume=old, given={"epochs": 2}, **_quiet())
    config = json.loads((old / "config.json").read_text())
    assert (config["hflip"], config["normalize"], config["model"]) == (False, False, "capsnet")


def test_training_curve_draws_the_reference_line(recipe_run, tmp_path, capsys):
    records = [json.loads(line) for line in (recipe_run / "metrics.jsonl").read_text().splitlines()]
    fig = draw_training_curve(records, 93.6, "published CapsNet")
    accuracy_axis = fig.axes[1]
    lines = {line.get_label(): line for line in accuracy_axis.get_lines()}
    assert set(lines) == {"train", "test", "published CapsNet 93.6%"}
    assert list(lines["published CapsNet 93.6%"].get_ydata()) == [93.6, 93.6]
    legend = [text.get_text() for text in accuracy_axis.get_legend().get_texts()]
    assert "published CapsNet 93.6%" in legend
    plain = draw_training_curve(records)
    assert {line.get_label() for line in plain.axes[1].get_lines()} == {"train", "test"}
    with pytest.raises(ValueError, match="test accuracy in %, 0..100"):
        draw_training_curve(records, 136.0)
    args = ["visualize", str(recipe_run), "--out", str(tmp_path), "--reference", "93.6"]
    assert main([*args, "--reference-label", "published"]) == 0
    assert (tmp_path / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["visualize", str(recipe_run), "--out", str(tmp_path), "--reference", "-1"]) == 2
    assert "0..100" in capsys.readouterr().err


# The command-line twin of recipe_config (tiny_config's sizes and seed).
RECIPE_ARGS = [
    "--dataset", "fashion-mnist", "--batch-size", "16", "--conv-channels", "6",
    "--kernel-size", "3", "--primary-caps", "2", "--primary-dim", "4", "--digit-dim", "6",
    "--decoder-hidden", "24", "32", "--no-progress", "--seed", "3", "--hflip", "--normalize",
    "--limit-train", str(LIMIT),
]  # fmt: skip


def test_a_recipe_run_killed_hard_resumes_on_the_uninterrupted_trajectory(dataset_dir, tmp_path):
    # kill -9 (what a session's end or an out-of-memory kill does): no handler runs, so the
    # run continues from the last checkpoint written every step, with the flip generator's
    # state and the normalisation statistics from it.
    out = tmp_path / "killed"
    args = [*RECIPE_ARGS, "--data-dir", str(dataset_dir), "--checkpoint-every", "1"]
    command = [sys.executable, "-m", "capsnet_fused.cli", "train", *args, "--epochs", "100000"]
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [*command, "--out", str(out)],
        cwd=repo,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(out)
    # Finish the epoch the kill interrupted, and one more: the resumed part crosses an epoch
    # boundary, where the flips of the next epoch are drawn.
    epochs = state["epoch"] + 2
    assert main(["train", "--resume", str(out), "--epochs", str(epochs)]) == 0
    straight = tmp_path / "straight"
    argv = ["train", *args, "--epochs", str(epochs), "--out", str(straight)]
    assert main(argv) == 0
    assert_same_state(load_checkpoint(straight)["model"], load_checkpoint(out)["model"])
    want = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in got] == list(range(1, epochs + 1))
    assert [r["test_accuracy"] for r in got] == [r["test_accuracy"] for r in want]
    config = json.loads((out / "config.json").read_text())
    assert (
        config["normalization"]
        == json.loads((straight / "config.json").read_text())["normalization"]
    )
    # Both sessions are recorded for the report: how each started and from where.
    sessions = [json.loads(x) for x in (out / "sessions.jsonl").read_text().splitlines()]
    assert [s["from_step"] for s in sessions] == [0, state["step"]]
    assert sessions[1]["command"] == f"capsnet-fused train --resume {out} --epochs {epochs}"
    assert "--hflip --normalize" in sessions[0]["command"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
