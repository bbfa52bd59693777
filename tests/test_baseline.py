"""The CNN baseline (--model cnn): its size against CapsNet's, training through the same loop,
eval clean and affine-perturbed, visualize. Tiny synthetic data: seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capsnet_fused.baseline import BaselineCNN, CrossEntropyCriterion
from capsnet_fused.cli import main
from capsnet_fused.models import CapsNet
from capsnet_fused.train import load_checkpoint, model_from_checkpoint, train
from tests.training_data import tiny_config, write_synthetic_dataset

TINY_CNN = [
    "--model", "cnn", "--batch-size", "8", "--conv-channels", "6", "--kernel-size", "3",
    "--primary-caps", "2", "--primary-dim", "4", "--no-progress", "--seed", "1",
    "--no-amp", "--no-channels-last",  # as tiny_config, which a test retraces this run with
]  # fmt: skip


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_default_baseline_is_the_size_of_capsnet():
    cnn, capsnet = BaselineCNN(), CapsNet()
    assert _parameters(cnn) == 8_417_938
    assert _parameters(cnn) == pytest.approx(_parameters(capsnet), rel=0.03)
    # The same two convolutions as CapsNet's Conv1 and PrimaryCaps.
    assert cnn.features[0].weight.shape == capsnet.conv1[0].weight.shape
    assert cnn.features[2].weight.shape == capsnet.primary.conv.weight.shape
    assert cnn.features[2].stride == capsnet.primary.conv.stride
    logits = cnn(torch.rand(3, 1, 28, 28), torch.tensor([1, 2, 3]))
    assert logits.shape == (3, 10)
    with pytest.raises(ValueError, match=r"expected images \[B, 1, 28, 28\]"):
        cnn(torch.rand(3, 1, 32, 32))
    with pytest.raises(ValueError, match="too small"):
        BaselineCNN(image_size=12)


def test_cross_entropy_criterion_matches_torch():
    logits, labels = torch.randn(5, 10), torch.tensor([0, 3, 9, 3, 1])
    (loss,) = CrossEntropyCriterion()(logits.bfloat16(), None, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss, torch.nn.functional.cross_entropy(logits.bfloat16().float(), labels)
    )


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory) -> Path:
    data_dir = write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))
    out = tmp_path_factory.mktemp("cnn")
    args = [*TINY_CNN, "--epochs", "4", "--lr", "0.003", "--max-shift", "0", "--normalize"]
    assert main(["train", *args, "--data-dir", str(data_dir), "--out", str(out)]) == 0
    return out


def test_cnn_trains_through_the_same_loop(cnn_run):
    records = [json.loads(line) for line in (cnn_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["model"] for r in records] == ["cnn"] * 4
    assert "test_margin_loss" not in records[-1]
    assert records[-1]["train_loss"] < 0.5 * records[0]["train_loss"]
    # Chance is 0.1 (40 test images); this seed reaches 1.0.
    assert records[-1]["test_accuracy"] >= 0.6
    model, config = model_from_checkpoint(load_checkpoint(cnn_run))
    assert isinstance(model, BaselineCNN) and config.model == "cnn" and config.normalize


def test_cnn_resume_follows_the_uninterrupted_trajectory(cnn_run, tmp_path):
    data_dir = json.loads((cnn_run / "config.json").read_text())["data_dir"]
    config = tiny_config(
        Path(data_dir), tmp_path, model="cnn", batch_size=8, lr=0.003, max_shift=0,
        normalize=True, seed=1, epochs=2,
    )  # fmt: skip
    train(config, log=lambda *_: None)
    config.epochs = 4
    train(config, resume=tmp_path, given={"epochs": 4}, log=lambda *_: None)
    want, got = load_checkpoint(cnn_run)["model"], load_checkpoint(tmp_path)["model"]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_cnn_eval_clean_and_affine(cnn_run, capsys):
    record = json.loads((cnn_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert main(["eval", str(cnn_run), "--json", "--no-progress"]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert clean["model"] == "cnn" and "margin_loss" not in clean
    assert clean["accuracy"] == pytest.approx(record["test_accuracy"])
    assert clean["loss"] == pytest.approx(record["test_loss"], rel=1e-5)
    # A spec that moves nothing gives the clean images back, so the same numbers.
    assert main(["eval", str(cnn_run), "--json", "--no-progress", "--affine", "shift=0"]) == 0
    unmoved = json.loads(capsys.readouterr().out)
    assert unmoved["accuracy"] == clean["accuracy"] and unmoved["affine"] == "none"
    args = ["eval", str(cnn_run), "--no-progress", "--affine", "rotate=30,shift=3", "--seed", "5"]
    assert main([*args, "--json"]) == 0
    moved = json.loads(capsys.readouterr().out)
    assert (moved["affine"], moved["affine_seed"], moved["images"]) == ("rotate=30,shift=3", 5, 40)
    assert moved["loss"] != pytest.approx(clean["loss"])
    assert main(args) == 0
    line = capsys.readouterr().out
    assert line.startswith("affine-perturbed (rotate=30,shift=3, seed 5) test accuracy ")
    assert f"{100 * moved['accuracy']:.2f}%" in line and "| model cnn |" in line


def test_bad_affine_spec_is_a_usage_error(cnn_run, capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", str(cnn_run), "--affine", "rotate=twenty"])
    assert info.value.code == 2
    assert "'twenty' is not a number" in capsys.readouterr().err


def test_visualize_a_cnn_run_draws_only_its_curve(cnn_run, tmp_path, capsys):
    assert main(["visualize", str(cnn_run), "--out", str(tmp_path), "--reference", "93.6"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["training_curve.png"]
    assert capsys.readouterr().out.count("wrote ") == 1
