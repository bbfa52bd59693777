"""Training: resume follows the same trajectory, atomic checkpoints, NaN stop, DDP gradients.

Everything runs on a tiny synthetic dataset (12x12 images written as IDX files) and a tiny
CapsNet (3x3 kernels, 2 primary capsule channels), so each run takes a second or two.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from capsnet_fused import data
from capsnet_fused.data import load_dataset, to_float
from capsnet_fused.train import (
    CapsNetLoss,
    CheckpointWriteError,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
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

SIZE = 12


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_synthetic_dataset(directory: Path, n_train: int = 64, n_test: int = 40) -> Path:
    """Fashion-MNIST-named IDX files of 12x12 images: class k is a bright block at spot k."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, SIZE, SIZE)).astype(np.uint8)
        for k, label in enumerate(labels):
            top, left = 2 * (label // 5) + 3, 2 * (label % 5)
            images[k, top : top + 3, left : left + 3] = 255
        image_name, label_name = data.FILES[split]
        (directory / image_name).write_bytes(gzip.compress(_idx(images)))
        # Labels unzipped: both forms are accepted.
        (directory / label_name[: -len(".gz")]).write_bytes(_idx(labels))
    return directory


def tiny_config(data_dir: Path, out: Path, **changes) -> TrainConfig:
    config = TrainConfig(
        dataset="fashion-mnist",
        data_dir=str(data_dir),
        out=str(out),
        epochs=2,
        batch_size=16,
        conv_channels=6,
        kernel_size=3,
        primary_caps=2,
        primary_dim=4,
        digit_dim=6,
        decoder_hidden=(24, 32),
        progress=False,
        seed=3,
    )
    return dataclasses.replace(config, **changes)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def straight_run(dataset_dir, tmp_path_factory) -> Path:
    """Two uninterrupted epochs; the run folder."""
    out = tmp_path_factory.mktemp("straight")
    train(tiny_config(dataset_dir, out), log=lambda *_: None)
    return out


def _assert_same_state(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=atol), name


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
    _assert_same_state(want["model"], got["model"])
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
    _assert_same_state(load_checkpoint(straight_run)["model"], load_checkpoint(tmp_path)["model"])


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _global_batch(dataset_dir: Path, size: int = 8):
    train_set = load_dataset("fashion-mnist", "train", dataset_dir, limit=size, download=False)
    return to_float(train_set.images), train_set.labels


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
        images, labels = _global_batch(Path(dataset_dir))
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


def test_ddp_two_processes_average_gradients_of_the_global_batch(dataset_dir, tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(dataset_dir), str(tmp_path)), nprocs=2)
    config = tiny_config(dataset_dir, tmp_path)
    images, labels = _global_batch(dataset_dir)
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


# ---------------------------------------------------------------- faults (issue 14)


def _quiet(**kwargs):
    return dict(log=lambda *_: None, **kwargs)


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _finite_loss(state: dict, dataset_dir: Path) -> bool:
    """Whether the checkpoint's model gives a finite training loss on a few images."""
    model = build_model(tiny_config(dataset_dir, Path(".")), (1, SIZE, SIZE))
    model.load_state_dict(state["model"])
    images, labels = _global_batch(dataset_dir)
    with torch.no_grad():
        loss, _, _ = CapsNetLoss()(model.train()(images, labels), images, labels)
    return bool(torch.isfinite(loss))


def test_lr_1e30_diverges_without_keeping_a_diverged_checkpoint(dataset_dir, tmp_path):
    # The issue's example: every checkpoint that exists must give a finite loss.
    config = tiny_config(dataset_dir, tmp_path, lr=1e30, checkpoint_every=1, epochs=3)
    with pytest.raises(TrainingDiverged, match="stopping"):
        train(config, **_quiet())
    if (tmp_path / "checkpoint.pt").exists():
        assert _finite_loss(load_checkpoint(tmp_path), dataset_dir)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_blown_up_step_is_not_checkpointed(dataset_dir, tmp_path, monkeypatch):
    # Step 3's update makes the weights huge but finite; step 4's loss is then NaN. The
    # checkpoint of step 3 (due with --checkpoint-every 1) must not be written.
    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                for group in self.param_groups:
                    for param in group["params"]:
                        param.mul_(1e30)
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    config = tiny_config(dataset_dir, tmp_path, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match="at epoch 1, step 4") as info:
        train(config, **_quiet())
    assert "holds step 2 of epoch 1 (step 2 overall)" in str(info.value)
    state = load_checkpoint(tmp_path)
    assert state["step"] == 2 and _finite_loss(state, dataset_dir)


def test_non_finite_optimiser_state_is_not_checkpointed(dataset_dir, tmp_path, monkeypatch):
    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            next(iter(self.state.values()))["exp_avg_sq"].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    config = tiny_config(dataset_dir, tmp_path, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match="optimiser state became NaN or Inf") as info:
        train(config, **_quiet())
    assert "holds step 1 of epoch 1" in str(info.value)
    assert load_checkpoint(tmp_path)["step"] == 1


def test_nan_test_loss_stops_at_the_end_of_the_epoch(dataset_dir, tmp_path, monkeypatch):
    real_forward = CapsNetLoss.forward
    calls = {"eval": 0}

    def poisoned(self, output, images, labels):
        loss, margin, recon = real_forward(self, output, images, labels)
        if not torch.is_grad_enabled():
            calls["eval"] += 1
            if calls["eval"] == 2:  # the test set is one batch: epoch 2's evaluation
                loss = loss * float("nan")
        return loss, margin, recon

    monkeypatch.setattr(CapsNetLoss, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="test loss became nan after epoch 2") as info:
        train(tiny_config(dataset_dir, tmp_path), **_quiet())
    assert "holds the end of epoch 1 (step 4)" in str(info.value)
    assert load_checkpoint(tmp_path)["epoch"] == 1 and _epochs(tmp_path) == [1]


@pytest.mark.parametrize("name", ["lr", "recon_scale"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_config_refuses_non_finite_lr_and_negative_recon_scale(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        dataclasses.replace(TrainConfig(), **{name: value}).validate()


def test_stale_temporaries_are_removed_when_a_run_starts(dataset_dir, tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / f".checkpoint.pt.tmp-{child.pid}"
    stale.write_bytes(b"134 MB of a half-written checkpoint")
    logged = []
    train(tiny_config(dataset_dir, tmp_path, epochs=1), log=logged.append)
    assert not stale.exists() and any(f"removed {stale}" in line for line in logged)
    stale.write_bytes(b"again")
    train(tiny_config(dataset_dir, tmp_path), resume=tmp_path, given={"epochs": 2}, **_quiet())
    assert not stale.exists()


def test_metrics_agree_with_the_checkpoint_after_a_crash(dataset_dir, tmp_path, monkeypatch):
    # A crash after epoch 2's checkpoint but before metrics.jsonl is written...
    from capsnet_fused.train import loop as train_loop

    real_write = train_loop.write_metrics

    def crash_on_epoch_2(path, records):
        if len(records) == 2:
            raise KeyboardInterrupt("killed between the checkpoint and the metrics")
        return real_write(path, records)

    monkeypatch.setattr(train_loop, "write_metrics", crash_on_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(dataset_dir, tmp_path, epochs=3), **_quiet())
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["epoch"] == 2 and _epochs(tmp_path) == [1]
    # ...is repaired on resume: no epoch missing, none twice.
    train(tiny_config(dataset_dir, tmp_path), resume=tmp_path, given={"epochs": 3}, **_quiet())
    assert _epochs(tmp_path) == [1, 2, 3]


def test_old_checkpoint_without_history_trims_duplicate_metrics(
    dataset_dir, straight_run, tmp_path
):
    # A checkpoint of an older version (no "history") whose metrics.jsonl holds epochs twice
    # and one past the checkpoint, as the old append-then-checkpoint order could leave it.
    run = tmp_path / "run"
    run.mkdir()
    state = load_checkpoint(straight_run)
    del state["history"]
    state["epoch_sums"] = state["epoch_sums"][:4]
    save_checkpoint(state, run / "checkpoint.pt")
    records = [json.loads(x) for x in (straight_run / "metrics.jsonl").read_text().splitlines()]
    extra = dict(records[1], epoch=3)
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [records[0], records[1], records[1], extra])
    )
    train(tiny_config(dataset_dir, run), resume=run, given={"epochs": 3}, **_quiet())
    assert _epochs(run) == [1, 2, 3]


def test_fresh_run_replaces_a_stale_metrics_file(dataset_dir, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 7}\n')
    train(tiny_config(dataset_dir, tmp_path, epochs=1), **_quiet())
    assert _epochs(tmp_path) == [1]


def test_resume_with_no_epochs_left_does_nothing(dataset_dir, straight_run):
    config_before = (straight_run / "config.json").read_bytes()
    checkpoint_before = (straight_run / "checkpoint.pt").read_bytes()
    for epochs in (2, 1):
        logged = []
        record = train(
            tiny_config(dataset_dir, straight_run),
            resume=straight_run,
            given={"epochs": epochs},
            log=logged.append,
        )
        assert logged == [
            f"{straight_run / 'checkpoint.pt'} has already trained 2 epochs (--epochs {epochs}); "
            "nothing to do"
        ]
        assert record["epoch"] == 2
    assert (straight_run / "config.json").read_bytes() == config_before
    assert (straight_run / "checkpoint.pt").read_bytes() == checkpoint_before


def test_resume_may_change_the_backend(dataset_dir, straight_run, tmp_path):
    train(tiny_config(dataset_dir, tmp_path, epochs=1), **_quiet())
    assert load_checkpoint(tmp_path)["config"]["backend"] == "auto"
    record = train(
        tiny_config(dataset_dir, tmp_path),
        resume=tmp_path,
        given={"epochs": 2, "backend": "reference"},
        **_quiet(),
    )
    assert record["backend"] == "reference"
    # The same math: the trajectory of the uninterrupted run, to rounding.
    _assert_same_state(load_checkpoint(straight_run)["model"], load_checkpoint(tmp_path)["model"])


def _send_signal_at(monkeypatch, signum: int, train_call: int | None = None, eval_call=None):
    """Send `signum` to this process during the given training (or evaluation) loss call."""
    real_forward = CapsNetLoss.forward
    calls = {"train": 0, "eval": 0}

    def forward(self, output, images, labels):
        kind = "train" if torch.is_grad_enabled() else "eval"
        calls[kind] += 1
        if calls[kind] == {"train": train_call, "eval": eval_call}[kind]:
            os.kill(os.getpid(), signum)
        return real_forward(self, output, images, labels)

    monkeypatch.setattr(CapsNetLoss, "forward", forward)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_with_a_checkpoint_and_resume_continues(
    dataset_dir, straight_run, tmp_path, monkeypatch, signum
):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _send_signal_at(monkeypatch, signum, train_call=3)
    with pytest.raises(TrainingInterrupted) as info:
        train(tiny_config(dataset_dir, tmp_path), **_quiet())
    assert info.value.exit_status == 128 + signum
    assert f"capsnet-fused train --resume {tmp_path}" in str(info.value)
    # The signal came during step 3: the checkpoint holds the state after step 2.
    state = load_checkpoint(tmp_path)
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (0, 2, 2)
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    monkeypatch.undo()
    train(tiny_config(dataset_dir, tmp_path), resume=tmp_path, given={}, **_quiet())
    _assert_same_state(load_checkpoint(straight_run)["model"], load_checkpoint(tmp_path)["model"])
    assert _epochs(tmp_path) == [1, 2]


def test_signal_during_evaluation_keeps_the_epochs_training(
    dataset_dir, straight_run, tmp_path, monkeypatch
):
    # The 40 test images are one batch of the training loop's evaluation; batches of 8 leave
    # some after the signal.
    from capsnet_fused.train import loop as train_loop

    real_evaluate = train_loop.evaluate
    monkeypatch.setattr(
        train_loop, "evaluate", lambda *a, **k: real_evaluate(*a, **{**k, "batch_size": 8})
    )
    _send_signal_at(monkeypatch, signal.SIGTERM, eval_call=1)
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(dataset_dir, tmp_path), **_quiet())
    state = load_checkpoint(tmp_path)
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (0, 4, 4)
    assert not (tmp_path / "metrics.jsonl").exists()
    monkeypatch.undo()
    train(tiny_config(dataset_dir, tmp_path), resume=tmp_path, given={}, **_quiet())
    _assert_same_state(load_checkpoint(straight_run)["model"], load_checkpoint(tmp_path)["model"])
    want = [json.loads(x) for x in (straight_run / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_accuracy"] for r in got] == [r["test_accuracy"] for r in want]


def test_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(
    dataset_dir, tmp_path, monkeypatch
):
    real_forward = CapsNetLoss.forward
    calls = {"train": 0}

    def forward(self, output, images, labels):
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == 3:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
        return real_forward(self, output, images, labels)

    monkeypatch.setattr(CapsNetLoss, "forward", forward)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(dataset_dir, tmp_path, checkpoint_every=1), **_quiet())
    assert load_checkpoint(tmp_path)["step"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_explicit_data_dir_without_the_files_is_an_error_not_a_fallback(
    dataset_dir, tmp_path, monkeypatch
):
    # The files exist in a system folder, but the folder given must be used.
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", (dataset_dir,))
    empty = tmp_path / "fasion-mnist"
    empty.mkdir()
    (empty / "train-images-idx3-ubyte.gz").write_bytes(
        (dataset_dir / "train-images-idx3-ubyte.gz").read_bytes()
    )
    with pytest.raises(data.DatasetNotFoundError) as info:
        train(tiny_config(empty, tmp_path / "run"), **_quiet())
    message = str(info.value)
    missing = message.split(f"missing in {empty} (and in {empty / 'fashion-mnist'}): ")[1]
    assert missing.split(";")[0] == (
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
    )
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_config_records_the_absolute_data_folder_for_eval_anywhere(
    dataset_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(dataset_dir.parent)
    run = tmp_path / "run"
    train(tiny_config(Path(dataset_dir.name), run, epochs=1), **_quiet())
    recorded = json.loads((run / "config.json").read_text())["data_dir"]
    assert recorded == str(dataset_dir.resolve())
    assert load_checkpoint(run)["config"]["data_dir"] == recorded
    monkeypatch.chdir(tmp_path)
    assert evaluate_checkpoint(run, progress=False)["images"] == 40


def test_test_images_of_another_size_are_refused_before_training(tmp_path):
    data_dir = write_synthetic_dataset(tmp_path / "data")
    images = np.zeros((5, SIZE + 2, SIZE + 2), dtype=np.uint8)
    (data_dir / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
    (data_dir / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"test images in .* are \[1, 14, 14\] .* \[1, 12, 12\]"):
        train(tiny_config(data_dir, tmp_path / "run"), **_quiet())
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "device, message",
    [("bogus", "is not a device"), ("meta", "training runs on cpu or cuda")] + [("cuda:7", "CUDA")],
)
def test_bad_device_is_refused_before_any_work(dataset_dir, tmp_path, device, message):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ValueError, match=message):
        train(tiny_config(dataset_dir, tmp_path, device=device), **_quiet())
    assert not list(tmp_path.iterdir())


def _unwritable_folder(tmp_path: Path) -> Path | None:
    """An existing folder this process cannot create files in (root ignores permissions, so
    fall back to sysfs, which refuses root too), or None."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    for folder in (locked, Path("/sys/kernel")):
        try:
            (folder / f".probe-{os.getpid()}").write_bytes(b"")
        except OSError:
            return folder
        (folder / f".probe-{os.getpid()}").unlink()
    return None


def test_unusable_out_folder_is_refused_before_any_work(dataset_dir, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    with pytest.raises(ValueError, match=f"--out {a_file} is a file"):
        train(tiny_config(dataset_dir, a_file), **_quiet())
    with pytest.raises(ValueError, match=f"--out {a_file / 'run'} cannot be used"):
        train(tiny_config(dataset_dir, a_file / "run"), **_quiet())
    unwritable = _unwritable_folder(tmp_path)
    if unwritable is None:
        pytest.skip("no unwritable folder on this machine")
    with pytest.raises(ValueError, match=f"--out {unwritable / 'run'} cannot be used"):
        train(tiny_config(dataset_dir, unwritable / "run"), **_quiet())


def test_full_disk_at_a_checkpoint_stops_with_the_previous_one_kept(
    dataset_dir, tmp_path, monkeypatch
):
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, handle, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            handle.write(b"PK partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointWriteError, match=f"could not write {tmp_path / 'checkpoint.pt'}"):
        train(tiny_config(dataset_dir, tmp_path), **_quiet())
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["epoch"] == 1 and _epochs(tmp_path) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "metrics.jsonl",
        "sessions.jsonl",
    ]


def _write_checkpoint_variant(source: Path, target: Path, change) -> Path:
    state = load_checkpoint(source)
    change(state)
    target.mkdir()
    return save_checkpoint(state, target / "checkpoint.pt")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("optimizer"), "it lacks optimizer"),
        (lambda s: s["config"].update(dropout=0.5), "unknown settings: dropout"),
        (lambda s: s["config"].pop("digit_dim"), "missing: digit_dim"),
        (lambda s: s["config"].update(epochs="ten"), "config is invalid"),
        (lambda s: s["model"].pop("conv1.0.weight"), "model does not fit"),
    ],
    ids=["no-optimizer", "unknown-field", "missing-field", "bad-value", "bad-weights"],
)
def test_damaged_checkpoint_is_refused_naming_the_file(
    dataset_dir, straight_run, tmp_path, change, message
):
    path = _write_checkpoint_variant(straight_run, tmp_path / "run", change)
    with pytest.raises(ValueError, match=message) as info:
        train(tiny_config(dataset_dir, path.parent), resume=path, given={"epochs": 3}, **_quiet())
    assert str(path) in str(info.value)


def test_random_shift_keeps_the_standard_layout():
    # Channels-last strides of [B, 1, H, W] images made conv1's weight gradient channels-last,
    # which DDP warned about.
    images = torch.rand(4, 1, SIZE, SIZE)
    shifted = data.random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.stride() == images.stride()
    conv = torch.nn.Conv2d(1, 6, 3)
    conv(shifted).sum().backward()
    assert conv.weight.grad.stride() == conv.weight.stride()
