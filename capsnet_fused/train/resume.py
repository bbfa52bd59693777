"""What a run resumes from: the config, model and input normalisation stored in a checkpoint
(also what eval and visualize load) and every RNG state. The checkpoint's file I/O is in
capsnet_fused.checkpoint."""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from capsnet_fused.checkpoint import RESUME_KEYS, checkpoint_path, load_checkpoint
from capsnet_fused.data import Normalization
from capsnet_fused.train.config import ADDED_SETTINGS, TrainConfig, _resumed_config
from capsnet_fused.train.model import build_model


def config_from_checkpoint(state: dict[str, Any], path: str | os.PathLike = "") -> TrainConfig:
    """The TrainConfig stored in a checkpoint; ValueError naming `path` when it does not fit
    this version's settings (unknown or missing fields, values out of range)."""
    config = state["config"]
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the checkpoint's config is not a dict of settings")
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    config = {**{k: v for k, v in ADDED_SETTINGS.items() if k not in config}, **config}
    unknown, missing = sorted(set(config) - known), sorted(known - set(config))
    if unknown or missing:
        raise ValueError(
            f"{path}: the checkpoint's config does not match this version of capsnet-fused "
            f"(unknown settings: {', '.join(unknown) or 'none'}; missing: "
            f"{', '.join(missing) or 'none'})"
        )
    config = dict(config)
    try:
        config["decoder_hidden"] = tuple(config["decoder_hidden"])
        result = TrainConfig(**config)
        result.validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the checkpoint's config is invalid ({exc})") from exc
    return result


def _load_state_dict(target, state: dict, what: str, path: str | os.PathLike) -> None:
    """target.load_state_dict(state) with a one-line error naming the checkpoint."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{path}: the checkpoint's {what} does not fit the model its config describes "
            f"({first[:200]})"
        ) from exc


def normalization_from_checkpoint(
    state: dict[str, Any], config: TrainConfig, path: str | os.PathLike = ""
) -> Normalization | None:
    """The input normalisation a run was trained with (None without --normalize); ValueError
    naming `path` when a --normalize checkpoint lacks its statistics."""
    if not config.normalize:
        return None
    stored = state.get("normalization")
    try:
        return Normalization.from_dict(stored)
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(
            f"{path}: the run was trained with --normalize but its checkpoint holds no valid "
            f"normalization statistics ({stored!r})"
        ) from exc


def model_from_checkpoint(
    state: dict[str, Any],
    device: torch.device | str = "cpu",
    backend: str | None = None,
    path: str | os.PathLike = "",
) -> tuple[nn.Module, TrainConfig]:
    """The trained model (eval mode) and its config; backend overrides the trained one.

    With --normalize the model expects normalised images: see normalization_from_checkpoint.
    """
    config = config_from_checkpoint(state, path)
    if backend is not None:
        config.backend = backend
    model = build_model(config, tuple(state["image_shape"]))
    _load_state_dict(model, state["model"], "model", path)
    return model.to(device).eval(), config


def _rng_state(augment_gen: torch.Generator) -> dict[str, Any]:
    # numpy's state is stored as plain lists so that the checkpoint loads with weights_only.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "python": random.getstate(),
        "augment": augment_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], augment_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    augment_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _prepare_config(
    config: TrainConfig, given: dict[str, Any] | None, resume: str | None
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The effective config and the checkpoint to resume from (None for a fresh run)."""
    if resume is None:
        config.validate()
        return config, None
    path = checkpoint_path(resume)
    state = load_checkpoint(path, require=RESUME_KEYS)
    state["path"] = str(path)
    saved = config_from_checkpoint(state, path)
    given = given if given is not None else {}
    return _resumed_config(saved, given, path.parent), state
