"""The run folder's files: atomic writes, checkpoints, the metrics file, stale temporaries.

Every file of a run folder (checkpoint.pt, config.json, metrics.jsonl) is written to a temporary
`.<name>.tmp-<pid>` in the same folder, flushed to disk and renamed over the old file, so a
crash, a kill -9 or a full disk at any moment leaves the previous file or the new one, never a
torn one. The temporaries that a killed process leaves behind are removed by the next run in
that folder (remove_stale_temporaries).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
CHECKPOINT_FORMAT = 1

# What eval and visualize need, and what resuming needs besides. "history" (the epoch records,
# from which metrics.jsonl is rewritten on resume) is optional: older checkpoints lack it.
MODEL_KEYS = ("format", "config", "image_shape", "model")
RESUME_KEYS = (
    *MODEL_KEYS,
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "epoch",
    "step",
    "step_in_epoch",
    "epoch_sums",
    "world_size",
)

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointWriteError(OSError):
    """A run-folder file could not be written (full disk, lost permissions); the previous
    version of the file is intact."""


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call write(handle) on a temporary file beside path, flush it to disk, rename it to path.

    Raises CheckpointWriteError naming path (and the free space left) when any of it fails;
    the temporary is removed and an existing file at path is untouched.
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        with tmp.open("wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    # torch.save reports a full disk as RuntimeError ("unexpected pos ..."), not as OSError.
    except (OSError, RuntimeError) as exc:
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        raise CheckpointWriteError(
            f"could not write {path} ({type(exc).__name__}: {exc}; {free}); "
            f"the previous version of the file, if any, is kept"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` to path atomically (see write_atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda handle: torch.save(state, handle))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda handle: handle.write(text.encode()))


def write_metrics(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> Path:
    """metrics.jsonl: one JSON object per line, written atomically as a whole."""
    return write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def read_metrics_lenient(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl, skipping lines that are not one (a torn append
    of an older version); [] when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def history_for(records: Iterable[dict[str, Any]], epochs: int) -> list[dict[str, Any]]:
    """One record per epoch 1..epochs (the last one written wins), in epoch order."""
    by_epoch = {r["epoch"]: r for r in records if 1 <= r["epoch"] <= epochs}
    return [by_epoch[e] for e in sorted(by_epoch)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the `.<name>.tmp-<pid>` files of processes that no longer exist; return them.

    A temporary of a live process (another run writing here) is left alone. Processes are
    looked up on this machine: on a folder shared between machines, run one writer at a time.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match is None or not entry.is_file():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not _pid_alive(pid):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the checkpoint inside a run folder."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def _not_a_checkpoint(path: Path, head: bytes) -> str:
    """Why a file that is not a zip archive cannot be a checkpoint (torch.save writes zips)."""
    prefix = f"{path} is not a readable capsnet-fused checkpoint"
    if not head:
        return f"{prefix} (the file is empty)"
    if head.lstrip()[:1] in (b"{", b"["):
        return f"{prefix}: it is a JSON file; pass the run folder or its {CHECKPOINT_NAME}"
    return f"{prefix} (not a file written by torch.save)"


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    require: Sequence[str] = MODEL_KEYS,
) -> dict:
    """Load a checkpoint written by save_checkpoint (a file or its run folder).

    Raises FileNotFoundError when there is none, ValueError naming the file when it is not a
    capsnet-fused checkpoint or lacks one of the keys in `require`. Only tensors and plain
    containers are loaded (weights_only): a file that needs more was not written here, and is
    refused rather than unpickled.
    """
    path = checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with path.open("rb") as handle:
        head = handle.read(64)
    if not head.startswith(_ZIP_MAGIC):
        raise ValueError(_not_a_checkpoint(path, head))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        # torch's message for a weights_only refusal advises weights_only=False, which would
        # run arbitrary code from the file: never relayed.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            reason = "it holds Python objects other than tensors and plain containers"
        raise ValueError(
            f"{path} is not a readable capsnet-fused checkpoint ({reason[:200]})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a capsnet-fused checkpoint (format {CHECKPOINT_FORMAT})")
    missing = [key for key in require if key not in state]
    if missing:
        raise ValueError(
            f"{path} is an incomplete capsnet-fused checkpoint: it lacks {', '.join(missing)}"
        )
    return state
