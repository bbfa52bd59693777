"""Run-folder files: atomic writes under faults, stale temporaries, refusing non-checkpoints."""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

from capsnet_fused.checkpoint import (
    RESUME_KEYS,
    CheckpointWriteError,
    history_for,
    load_checkpoint,
    read_metrics_lenient,
    remove_stale_temporaries,
    save_checkpoint,
    write_metrics,
)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(
    "failure",
    [
        # What torch.save raises when the disk fills up during the write.
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4224 vs 4112"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["torch-unexpected-pos", "ENOSPC"],
)
def test_a_failed_write_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch, failure):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"format": 1, "value": torch.arange(3)}, path)

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"the first bytes")
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint({"format": 1, "value": torch.arange(5)}, path)
    message = str(info.value)
    assert f"could not write {path}" in message and "MiB free there" in message
    assert "previous version of the file, if any, is kept" in message
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path, require=())["value"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale = [tmp_path / f".checkpoint.pt.tmp-{dead}", tmp_path / f".metrics.jsonl.tmp-{dead}"]
    live = tmp_path / f".checkpoint.pt.tmp-{alive}"
    keep = [tmp_path / "checkpoint.pt", tmp_path / ".hidden", tmp_path / ".x.tmp-notapid"]
    for path in [*stale, live, *keep]:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted([live, *keep])
    assert remove_stale_temporaries(tmp_path / "missing") == []


def _refusal(path) -> str:
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    # torch's advice to load with weights_only=False (running code from the file) is not relayed.
    assert "weights_only" not in message and "\n" not in message
    return message


def test_non_checkpoints_are_refused_with_one_clear_line(tmp_path):
    (tmp_path / "random.pt").write_bytes(os.urandom(2000))
    assert "not a file written by torch.save" in _refusal(tmp_path / "random.pt")
    (tmp_path / "config.json").write_text(json.dumps({"epochs": 3}, indent=2))
    assert "it is a JSON file; pass the run folder" in _refusal(tmp_path / "config.json")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "the file is empty" in _refusal(tmp_path / "empty.pt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("hello.txt", "not torch")
    _refusal(tmp_path / "other.zip")
    # A torch file that needs full unpickling (weights_only refuses arbitrary classes).
    torch.save({"format": 1, "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pt")
    assert "Python objects other than tensors" in _refusal(tmp_path / "pickled.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"format": 1}))
    _refusal(tmp_path / "plain.pkl")


def test_checkpoint_missing_keys_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"format": 1, "config": {}, "image_shape": [1, 4, 4]}, path)
    with pytest.raises(ValueError, match=r"incomplete capsnet-fused checkpoint: it lacks model"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="it lacks model, optimizer, scheduler"):
        load_checkpoint(path, require=RESUME_KEYS)
    save_checkpoint({"format": 2}, path)
    with pytest.raises(ValueError, match=r"is not a capsnet-fused checkpoint \(format 1\)"):
        load_checkpoint(path)


def test_metrics_history_keeps_each_epoch_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"epoch": e, "v": k} for k, e in enumerate([1, 2, 2, 3, 3])]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 4, "v"')
    records = read_metrics_lenient(path)
    assert [r["epoch"] for r in records] == [1, 2, 2, 3, 3]  # the torn last line is skipped
    history = history_for(records, 2)
    assert history == [{"epoch": 1, "v": 0}, {"epoch": 2, "v": 2}]
    write_metrics(path, history)
    assert read_metrics_lenient(path) == history
    assert read_metrics_lenient(tmp_path / "missing.jsonl") == []
