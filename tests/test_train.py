"""Training: resume follows the same trajectory, atomic checkpoints, NaN stop, DDP gradients.

Everything runs on a tiny synthetic dataset (12x12 images written as IDX files) and a tiny
CapsNet (3x3 kernels, 2 primary capsule channels), so each run takes a second or two.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from capsnet_fused import info
from capsnet_fused.data import load_dataset, to_float
from capsnet_fused.train import (
    CapsNetLoss,
    CheckpointWriteError,
    TrainConfig,
    TrainingDiverged,
    add_train_arguments,
    build_model,
    config_from_args,
    config_from_checkpoint,
    evaluate,
    evaluate_checkpoint,
    load_checkpoint,
    save_checkpoint,
    train,
)
from capsnet_fused.train.model import resolve_auto_settings
from tests.training_data import (
    SIZE,
    assert_same_state,
    global_batch,
    tiny_config,
)


def test_run_writes_metrics_config_and_checkpoint(straight_run):
    records = [
        json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["step"] == 8  # 64 images / batch 16, twice
    assert records[1]["lr"] == pytest.approx(1e-3 * 0.96)
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["train_loss"] > 0 for r in records)
    assert json.loads((straight_run / "config.json").read_text())["batch_size"] == 16
    state = load_checkpoint(straight_run)
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (2, 8, 0)
    assert state["scheduler"]["last_epoch"] == 2
    assert not [p for p in straight_run.iterdir() if p.name.startswith(".")]


def test_resume_follows_the_uninterrupted_trajectory(dataset_dir, straight_run, tmp_path):
    config = tiny_config(dataset_dir, tmp_path, epochs=1)
    train(config, log=lambda *_: None)
    resumed = tiny_config(dataset_dir, tmp_path)
    train(resumed, resume=tmp_path, given={"epochs": 2}, log=lambda *_: None)
    want, got = load_checkpoint(straight_run), load_checkpoint(tmp_path)
    assert_same_state(want["model"], got["model"])
    assert got["optimizer"]["state"][0]["step"] == want["optimizer"]["state"][0]["step"]
    assert torch.equal(want["rng"]["augment"], got["rng"]["augment"])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    straight = (straight_run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["train_loss"] == pytest.approx(
        json.loads(straight[1])["train_loss"]
    )


def test_nan_loss_stops_keeps_checkpoint_and_resume_mid_epoch(
    dataset_dir, straight_run, tmp_path, monkeypatch
):
    calls = {"train": 0}
    real_forward = CapsNetLoss.forward

    def poisoned(self, output, images, labels):
        loss, margin, recon = real_forward(self, output, images, labels)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == 3:
                loss = loss * float("nan")
        return loss, margin, recon

    monkeypatch.setattr(CapsNetLoss, "forward", poisoned)
    config = tiny_config(dataset_dir, tmp_path, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1, step 3") as info:
        train(config, log=lambda *_: None)
    # The state after step 2 gave the NaN loss of step 3, so it is not kept: the checkpoint
    # holds step 1, the last state whose successor's loss was finite.
    assert f"{tmp_path / 'checkpoint.pt'} holds step 1 of epoch 1" in str(info.value)
    state = load_checkpoint(tmp_path)
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (0, 1, 1)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (tmp_path / "metrics.jsonl").exists()

    # Resuming from the step-1 checkpoint (mid-epoch) rejoins the uninterrupted trajectory.
    monkeypatch.setattr(CapsNetLoss, "forward", real_forward)
    train(config, resume=tmp_path / "checkpoint.pt", given={}, log=lambda *_: None)
    assert_same_state(load_checkpoint(straight_run)["model"], load_checkpoint(tmp_path)["model"])


def test_resume_refuses_changed_settings_and_fresh_run_refuses_used_folder(
    dataset_dir, straight_run
):
    with pytest.raises(ValueError, match="--lr 0.01 differs from the checkpoint's 0.001"):
        train(tiny_config(dataset_dir, straight_run), resume=straight_run, given={"lr": 0.01})
    with pytest.raises(ValueError, match="already holds a checkpoint; resume it"):
        train(tiny_config(dataset_dir, straight_run), log=lambda *_: None)


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"format": 1, "value": torch.arange(3)}, path)
    real_save = torch.save

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(CheckpointWriteError, match=f"could not write {path}.*killed while saving"):
        save_checkpoint({"format": 1, "value": torch.arange(5)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_checkpoint(path, require=())["value"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_load_checkpoint_rejects_other_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a readable capsnet-fused checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_training_learns_the_synthetic_task(dataset_dir, tmp_path):
    config = tiny_config(
        dataset_dir, tmp_path, epochs=6, batch_size=8, lr=0.01, lr_decay=0.9, max_shift=0
    )
    record = train(config, log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == record
    assert record["train_loss"] < 0.5 * records[0]["train_loss"]
    # Chance is 0.1; this seed reaches 0.925.
    assert record["test_accuracy"] >= 0.6


def test_amp_bfloat16_on_cpu_trains(dataset_dir, tmp_path):
    record = train(tiny_config(dataset_dir, tmp_path, epochs=1, amp=True), log=lambda *_: None)
    assert record["amp"] and np.isfinite(record["train_loss"]) and np.isfinite(record["test_loss"])


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_the_cpu_and_is_saved_settled(
    dataset_dir, tmp_path, monkeypatch, native
):
    # amp and channels_last left to "auto" (None) are settled by the CPU when the run starts,
    # saved settled, and a resumed run keeps them whatever the CPU it resumes on has.
    monkeypatch.setattr(info, "cpu_has_native_bfloat16", lambda: native)
    config = tiny_config(dataset_dir, tmp_path, epochs=1, amp=None, channels_last=None)
    lines = []
    record = train(config, log=lines.append)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["amp"], saved["channels_last"], record["amp"]) == (native, native, native)
    assert config_from_checkpoint(load_checkpoint(tmp_path), tmp_path).amp is native
    have = "has native bfloat16" if native else "has no native bfloat16"
    assert any(f"auto: this CPU {have}" in line for line in lines), lines
    # The record's test numbers are float32 ones, also under autocast: eval reproduces them.
    metrics = evaluate_checkpoint(tmp_path, device="cpu")
    assert metrics["accuracy"] == pytest.approx(record["test_accuracy"])
    assert metrics["loss"] == pytest.approx(record["test_loss"], rel=1e-5)
    monkeypatch.setattr(info, "cpu_has_native_bfloat16", lambda: not native)
    resumed = train(config, resume=tmp_path, given={"epochs": 2}, log=lambda *_: None)
    assert resumed["amp"] is native


def test_auto_precision_settles_explicit_values_and_other_devices_alone(monkeypatch):
    monkeypatch.setattr(info, "cpu_has_native_bfloat16", lambda: True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = TrainConfig()
    assert (auto.amp, auto.channels_last) == (None, None)
    settled, note = resolve_auto_settings(auto, cpu)
    assert (settled.amp, settled.channels_last) == (True, True)
    assert "bfloat16 autocast, channels-last" in note and "--no-amp --no-channels-last" in note
    settled, note = resolve_auto_settings(TrainConfig(amp=False), cpu)
    assert (settled.amp, settled.channels_last) == (False, True)
    assert "--no-channels-last to change" in note and "--no-amp" not in note
    settled, note = resolve_auto_settings(auto, cuda)
    assert (settled.amp, settled.channels_last) == (False, False) and "off on cuda" in note
    explicit = TrainConfig(amp=True, channels_last=False)
    assert resolve_auto_settings(explicit, cuda) == (explicit, "")
    assert resolve_auto_settings(explicit, cpu) == (explicit, "")
    # Asked for where bfloat16 is emulated: kept, with a warning for the log.
    monkeypatch.setattr(info, "cpu_has_native_bfloat16", lambda: False)
    settled, note = resolve_auto_settings(explicit, cpu)
    assert settled == explicit and "is emulated" in note
    assert resolve_auto_settings(TrainConfig(amp=False), cpu)[1].startswith("float32")
    settled, note = resolve_auto_settings(TrainConfig(amp=True), cpu)
    assert settled.channels_last is False and "contiguous convolutions" in note
    assert "is emulated" in note


def test_amp_flags_parse_to_auto_on_and_off():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    for argv, amp in (([], None), (["--amp"], True), (["--no-amp"], False)):
        config, given = config_from_args(parser.parse_args(argv))
        assert config.amp is amp and given.get("amp") is amp
    config, given = config_from_args(parser.parse_args(["--no-channels-last"]))
    assert given == {"channels_last": False} and config.amp is None
    with pytest.raises(ValueError, match="amp must be True, False or None"):
        TrainConfig(amp="yes").validate()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gradients(model, images, labels, recon_scale) -> dict[str, torch.Tensor]:
    output = model(images, labels)
    loss, _, _ = CapsNetLoss(recon_scale)(output, images, labels)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _ddp_worker(rank: int, world: int, port: int, dataset_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        config = tiny_config(Path(dataset_dir), Path(out) / "run", epochs=1)
        images, labels = global_batch(Path(dataset_dir))
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(build_model(config, (1, SIZE, SIZE)))
        half = images.shape[0] // world
        part = slice(rank * half, (rank + 1) * half)
        grads = _gradients(model, images[part], labels[part], config.recon_scale)
        torch.save(grads, Path(out) / f"grads{rank}.pt")
        # The training loop itself under the same process group: rank 0 alone writes. 63
        # images, so the sampler pads one into the second shard.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(dataclasses.replace(config, limit_train=63), log=lambda *_: None)
        text = "\n".join(str(w.message) for w in caught)
        (Path(out) / f"warnings{rank}.txt").write_text(text)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_average_gradients_of_theglobal_batch(dataset_dir, tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(dataset_dir), str(tmp_path)), nprocs=2)
    config = tiny_config(dataset_dir, tmp_path)
    images, labels = global_batch(dataset_dir)
    torch.manual_seed(0)
    single = _gradients(build_model(config, (1, SIZE, SIZE)), images, labels, config.recon_scale)
    for rank in range(2):
        got = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        got = {name.removeprefix("module."): g for name, g in got.items()}
        assert got.keys() == single.keys()
        for name, grad in single.items():
            assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-7), (rank, name)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # One record for the one epoch (rank 0 only), 63 images in 2 shards of 32 = 2 steps of 16;
    # the padding is not counted as an image.
    assert len(records) == 1 and records[0]["world_size"] == 2 and records[0]["step"] == 2
    assert records[0]["train_images"] == 63
    for rank in range(2):
        # No DDP warning that grad strides do not match its buckets (it came from conv1).
        warned = (tmp_path / f"warnings{rank}.txt").read_text()
        assert "Grad strides do not match" not in warned, warned
    assert load_checkpoint(run)["world_size"] == 2
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "metrics.jsonl",
        "sessions.jsonl",
    ]
    # Rank 0 alone records the session, once.
    sessions = [json.loads(x) for x in (run / "sessions.jsonl").read_text().splitlines()]
    assert [s["world_size"] for s in sessions] == [2]


def test_evaluate_counts_every_test_image(dataset_dir, straight_run):
    state = load_checkpoint(straight_run)
    config = tiny_config(dataset_dir, straight_run)
    model = build_model(config, (1, SIZE, SIZE))
    model.load_state_dict(state["model"])
    test_set = load_dataset("fashion-mnist", "test", dataset_dir, download=False)
    metrics = evaluate(model, test_set, CapsNetLoss(), torch.device("cpu"), batch_size=7)
    with torch.no_grad():
        output = model.eval()(to_float(test_set.images))
    expected = (output.lengths.argmax(1) == test_set.labels).double().mean().item()
    assert metrics["images"] == 40 and metrics["accuracy"] == pytest.approx(expected)
    assert metrics["loss"] == pytest.approx(metrics["margin_loss"] + metrics["recon_loss"])


def test_config_validation():
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay=1.5).validate()
    with pytest.raises(ValueError, match="softmax_over must be one of"):
        TrainConfig(softmax_over="rows").validate()
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="digit_init_scale must be > 0"):
        TrainConfig(digit_init_scale=0.0).validate()
    for eps in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="squash_eps must be"):
            TrainConfig(squash_eps=eps).validate()
    # The CNN baseline has no routing: routing settings are refused, not ignored.
    TrainConfig(model="cnn", conv_channels=8).validate()
    with pytest.raises(ValueError, match="do not apply to it: routing_iterations, leaky"):
        TrainConfig(model="cnn", routing_iterations=2, leaky=True).validate()


def test_routing_flags_of_issue_15_reach_the_model():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--squash-eps", "0", "--leaky", "--learn-bias"])
    config, given = config_from_args(args)
    assert given == {"squash_eps": 0.0, "leaky": True, "learn_bias": True}
    model = build_model(config, (1, 28, 28))
    assert model.digit.squash_eps == 0.0 and model.digit.leaky
    assert model.digit.bias.shape == (10, 16) and model.primary.squash_eps == 0.0
    defaults = build_model(config_from_args(parser.parse_args([]))[0], (1, 28, 28))
    assert defaults.digit.bias is None and not defaults.digit.leaky
    assert defaults.digit.squash_eps == 1e-8


def test_checkpoint_config_from_before_issue_15_gets_the_old_behaviour():
    # Checkpoints written before these settings existed trained with exactly these values.
    state = {"config": dataclasses.asdict(TrainConfig())}
    for name in ("learn_bias", "leaky", "squash_eps"):
        del state["config"][name]
    config = config_from_checkpoint(state, "old.pt")
    assert (config.learn_bias, config.leaky, config.squash_eps) == (False, False, 1e-8)


def test_digit_init_scale_sets_the_router_weights():
    torch.manual_seed(0)
    small = build_model(TrainConfig(), (1, 28, 28)).digit.weight
    torch.manual_seed(0)
    large = build_model(TrainConfig(digit_init_scale=0.1), (1, 28, 28)).digit.weight
    assert abs(small.std().item() - 0.01) < 1e-3
    torch.testing.assert_close(large, small * 10)
