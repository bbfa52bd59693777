"""The run folder of `capsnet-fused train`: where it is, that it can be written, and the files
a session writes before its first step (metrics.jsonl as the checkpoint has it, config.json,
sessions.jsonl). The checkpoint itself and the file formats are capsnet_fused/checkpoint.py's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from capsnet_fused.checkpoint import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    SESSIONS_NAME,
    read_jsonl,
    remove_stale_temporaries,
    write_metrics,
    write_text_atomic,
)
from capsnet_fused.data import Normalization
from capsnet_fused.train.config import TrainConfig
from capsnet_fused.train.distributed import DistInfo


def prepare_run_folder(config: TrainConfig, state: dict | None, info: DistInfo, log) -> Path:
    """The run folder, created and cleaned (by rank 0), recorded in config.out; a fresh run
    refuses a folder that holds a checkpoint."""
    out = Path(config.out) if config.out else _default_out(config)
    ckpt_file = out / CHECKPOINT_NAME
    if info.main:
        _prepare_out(out)
        for stale in remove_stale_temporaries(out):
            log(f"removed {stale}, left by a process that no longer runs")
    if state is None and ckpt_file.exists():
        raise ValueError(
            f"{out} already holds a checkpoint; resume it with --resume {out} "
            "or choose another --out"
        )
    config.out = str(out)
    return out


def _default_out(config: TrainConfig) -> Path:
    return Path("runs") / f"{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _prepare_out(out: Path) -> None:
    """Create the run folder and check that it can be written, before any work is done."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"--out {out} cannot be used as a run folder: {exc.strerror or exc}"
        ) from exc


def write_session_files(
    out: Path,
    config: TrainConfig,
    normalization: Normalization | None,
    history: list[dict[str, Any]],
    session: dict[str, Any],
    resumed: bool,
) -> None:
    """metrics.jsonl as the checkpoint has it, config.json, and `session` appended to
    sessions.jsonl (a fresh run starts the list anew)."""
    # metrics.jsonl agrees with the checkpoint: the epochs it holds, no more, none twice
    # (a fresh run removes a stale file).
    if history:
        write_metrics(out / METRICS_NAME, history)
    else:
        (out / METRICS_NAME).unlink(missing_ok=True)
    recorded = dataclasses.asdict(config)
    if normalization is not None:
        recorded["normalization"] = normalization.to_dict()
    write_text_atomic(out / CONFIG_NAME, json.dumps(recorded, indent=2) + "\n")
    # A long run may be resumed on other machines: each session says where it ran and how
    # it was started.
    sessions = read_jsonl(out / SESSIONS_NAME) if resumed else []
    write_metrics(out / SESSIONS_NAME, [*sessions, session])
