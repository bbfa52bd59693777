"""Training under faults (issue 14): divergence, crashes, signals, bad folders, full disk and
damaged checkpoints; each is handled without losing the last good checkpoint.

Everything runs on a tiny synthetic dataset (12x12 images written as IDX files) and a tiny
CapsNet (3x3 kernels, 2 primary capsule channels), so each run takes a second or two.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from capsnet_fused import data
from capsnet_fused.train import (
    CapsNetLoss,
    CheckpointWriteError,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    build_model,
    evaluate_checkpoint,
    load_checkpoint,
    save_checkpoint,
    train,
)
from capsnet_fused.train.signals import _StopSignals
from tests.training_data import (
    SIZE,
    assert_same_state,
    global_batch,
    idx_bytes,
    tiny_config,
    write_synthetic_dataset,
)


def _quiet(**kwargs):
    return dict(log=lambda *_: None, **kwargs)


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _finite_loss(state: dict, dataset_dir: Path) -> bool:
    """Whether the checkpoint's model gives a finite training loss on a few images."""
    model = build_model(tiny_config(dataset_dir, Path(".")), (1, SIZE, SIZE))
    model.load_state_dict(state["model"])
    images, labels = global_batch(dataset_dir)
    with torch.no_grad():
        loss, _, _ = CapsNetLoss()(model.train()(images, labels), images, labels)
    return bool(torch.isfinite(loss))


def test_lr_1e30_diverges_without_keeping_a_diverged_checkpoint(dataset_dir, tmp_path):
    # The example: every checkpoint that exists must give a finite loss.
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
    assert_same_state(load_checkpoint(straight_run)["model"], load_checkpoint(tmp_path)["model"])


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
    assert_same_state(load_checkpoint(straight_run)["model"], load_checkpoint(tmp_path)["model"])
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
    assert_same_state(load_checkpoint(straight_run)["model"], load_checkpoint(tmp_path)["model"])
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
    (data_dir / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (data_dir / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)))
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


def test_a_forked_worker_leaves_a_stop_signal_to_the_main_process():
    # A DataLoader worker is forked with the main process's handler and only ignores SIGINT and
    # SIGTERM once its worker_init_fn has run: a Ctrl-C to the process group in between must
    # not make the worker announce (or request) a stop of its own.
    with _StopSignals() as stop:
        pid = os.fork()
        if pid == 0:  # the worker, before its worker_init_fn
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                os._exit(1 if stop.requested else 0)
            finally:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not stop.requested
