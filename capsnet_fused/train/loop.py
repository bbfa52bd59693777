"""The training loop: train() sets up a run (fresh or resumed), then trains epoch by epoch,
step by step, checkpointing only states known to be good (see the package docstring).
main_train is `capsnet-fused train`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shlex
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from capsnet_fused._checks import resolve_device
from capsnet_fused.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    SESSIONS_NAME,
    history_for,
    read_jsonl,
    read_metrics_lenient,
    remove_stale_temporaries,
    save_checkpoint,
    write_metrics,
    write_text_atomic,
)
from capsnet_fused.data import (
    Normalization,
    ResumableSampler,
    load_dataset,
    random_hflip,
    random_shift,
    to_float,
)
from capsnet_fused.info import machine_summary
from capsnet_fused.ops import choose_backend
from capsnet_fused.train.config import TrainConfig, config_from_args
from capsnet_fused.train.distributed import DistInfo, _any_rank, setup_distributed
from capsnet_fused.train.evaluation import evaluate
from capsnet_fused.train.model import autocast_context, build_model, class_scores, make_criterion
from capsnet_fused.train.resume import (
    _load_state_dict,
    _prepare_config,
    _rng_state,
    _set_rng_state,
    normalization_from_checkpoint,
)
from capsnet_fused.train.signals import _ignore_stop_signals, _StopSignals


class TrainingDiverged(RuntimeError):
    """The loss, the test loss or the parameters became NaN or Inf; the last good checkpoint
    is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run after writing a checkpoint; exit_status is 128 + the
    signal number (130, 143)."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def _default_out(config: TrainConfig) -> Path:
    return Path("runs") / f"{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _format_epoch(record: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
        f"acc {100 * record['train_accuracy']:.2f}% | test loss {record['test_loss']:.4f} "
        f"acc {100 * record['test_accuracy']:.2f}% | {record['images_per_s']:.1f} img/s, "
        f"{record['epoch_time_s']:.1f} s | lr {record['lr']:.3g} | backend {record['backend']}"
    )


def _position(epoch: int, step_in_epoch: int, step: int) -> str:
    """Where training stands, in words: after `epoch` whole epochs and step_in_epoch steps."""
    if step_in_epoch == 0:
        return f"the end of epoch {epoch} (step {step})"
    return f"step {step_in_epoch} of epoch {epoch + 1} (step {step} overall)"


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


def _finite_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter and every floating-point optimiser state is finite."""
    tensors = [p.detach() for p in model.parameters()]
    for per_param in optimizer.state.values():
        tensors += [t for t in per_param.values() if torch.is_tensor(t) and t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def train(
    config: TrainConfig,
    *,
    resume: str | os.PathLike | None = None,
    given: dict[str, Any] | None = None,
    log=print,
    command: str | None = None,
) -> dict[str, Any]:
    """Train per `config` (or continue the checkpoint `resume`); returns the last epoch's record.

    `command` (the command line that started this process) is recorded in the run folder's
    sessions.jsonl beside the machine, for the run's report.

    `given` holds the settings passed explicitly (see config_from_args): on resume those among
    RESUMABLE_OVERRIDES replace the checkpoint's, and any other that differs is an error.
    Raises TrainingDiverged when the loss, the test loss or the state becomes NaN or Inf (the
    last good checkpoint is kept), TrainingInterrupted after SIGINT / SIGTERM (a checkpoint is
    written first) and CheckpointWriteError when the run folder cannot be written.
    """
    config, state = _prepare_config(config, given, None if resume is None else str(resume))
    if state is not None and state["epoch"] >= config.epochs:
        log(
            f"{state['path']} has already trained {state['epoch']} epochs (--epochs "
            f"{config.epochs}); nothing to do"
        )
        history = state.get("history") or read_metrics_lenient(Path(config.out) / METRICS_NAME)
        return history[-1] if history else {}
    resolve_device(config.device)
    with _StopSignals() as stop:
        info = setup_distributed(config.device)
        try:
            return _train(config, state, info, log, stop, command)
        finally:
            if info.owns_group:
                dist.destroy_process_group()


def _train(
    config: TrainConfig,
    state: dict | None,
    info: DistInfo,
    log,
    stop: _StopSignals,
    command: str | None = None,
) -> dict[str, Any]:
    device = resolve_device(config.device, info.local_rank)
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

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    # One generator per process for the shifts, so ranks augment independently.
    augment_gen = torch.Generator().manual_seed(config.seed + 7919 * (info.rank + 1))

    # An explicit data folder is the only place looked at (no download); the folder actually
    # read is recorded as an absolute path, so eval and visualize find it from anywhere.
    explicit = config.data_dir is not None
    train_set = load_dataset(
        config.dataset, "train", config.data_dir, limit=config.limit_train, download=not explicit
    )
    config.data_dir = str(Path(train_set.source).resolve())
    test_set = load_dataset(
        config.dataset, "test", config.data_dir, limit=config.limit_test, download=False
    )
    image_shape = train_set.image_shape
    if test_set.image_shape != image_shape:
        raise ValueError(
            f"test images in {config.data_dir} are {list(test_set.image_shape)} [C, H, W] but "
            f"training images are {list(image_shape)}"
        )
    if state is not None and tuple(state["image_shape"]) != image_shape:
        raise ValueError(
            f"{state['path']} was trained on images {list(state['image_shape'])}, but those in "
            f"{config.data_dir} are {list(image_shape)}"
        )
    # The statistics of the training images actually used (after --limit-train), computed once:
    # a resumed run keeps the checkpoint's, as eval and visualize do.
    normalization = None
    if state is not None:
        normalization = normalization_from_checkpoint(state, config, state["path"])
    elif config.normalize:
        normalization = Normalization.of_images(train_set.images)
    model = build_model(config, image_shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    use_scaler = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    criterion = make_criterion(config)
    backend = choose_backend(device, torch.float32, config.backend)
    machine = machine_summary(device)

    sampler = ResumableSampler(
        train_set, info.world_size, info.rank, shuffle=True, seed=config.seed
    )
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_ignore_stop_signals if config.num_workers else None,
    )
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)

    epoch, step, step_in_epoch = 0, 0, 0
    # loss sum, correct, images (without the sampler's padding), seconds, images processed
    epoch_sums = [0.0, 0.0, 0.0, 0.0, 0.0]
    history: list[dict[str, Any]] = []
    saved_at: tuple[int, int, int] | None = None  # (epoch, step_in_epoch, step) of ckpt_file
    if state is not None:
        path = state["path"]
        if state["world_size"] != info.world_size:
            raise ValueError(
                f"checkpoint was written by {state['world_size']} processes; "
                f"resume it with the same number (got {info.world_size})"
            )
        _load_state_dict(model, state["model"], "model", path)
        _load_state_dict(optimizer, state["optimizer"], "optimizer state", path)
        _load_state_dict(scheduler, state["scheduler"], "scheduler state", path)
        _load_state_dict(scaler, state["scaler"], "grad scaler state", path)
        _set_rng_state(state["rng"], augment_gen)
        epoch, step, step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        saved_at = (epoch, step_in_epoch, step)
        sums = list(state["epoch_sums"])
        # Checkpoints from before the padding was told apart counted processed images only.
        epoch_sums = sums + [sums[2]] if len(sums) == 4 else sums
        history = state.get("history")
        if history is None:  # an older checkpoint: its epochs from metrics.jsonl, once each
            history = history_for(read_metrics_lenient(out / METRICS_NAME), epoch)

    ddp_model: nn.Module = model
    if info.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    if info.main:
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
        # it was started (a fresh run starts the list anew).
        sessions = read_jsonl(out / SESSIONS_NAME) if state is not None else []
        session = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command,
            "cwd": os.getcwd(),
            "from_epoch": epoch,
            "from_step": step,
            "machine": machine,
            "device": str(device),
            "world_size": info.world_size,
            "backend": backend,
            "torch": torch.__version__,
        }
        write_metrics(out / SESSIONS_NAME, [*sessions, session])
        log(
            f"training {config.dataset} ({len(train_set)} train / {len(test_set)} test images "
            f"from {config.data_dir}) on {device} x{info.world_size}, backend {backend}, "
            f"run folder {out}"
        )
        if normalization is not None:
            log(
                f"inputs normalised with mean {list(normalization.mean)} and std "
                f"{list(normalization.std)} of the {len(train_set)} training images"
            )

    def kept() -> str:
        if saved_at is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint {ckpt_file} holds {_position(*saved_at)}"

    def snapshot(rng: dict[str, Any], sums: list[float]) -> None:
        """Checkpoint the current model and optimiser state at (epoch, step_in_epoch, step)."""
        nonlocal saved_at
        # Every rank holds the same state, so every rank reaches the same verdict.
        if not _finite_state(model, optimizer):
            raise TrainingDiverged(
                f"parameters or optimiser state became NaN or Inf by "
                f"{_position(epoch, step_in_epoch, step)}; stopping ({kept()}). "
                "Try a lower --lr or disabling --amp."
            )
        if info.main:
            save_checkpoint(
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": dataclasses.asdict(config),
                    "image_shape": list(image_shape),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rng,
                    "epoch": epoch,
                    "step": step,
                    "step_in_epoch": step_in_epoch,
                    "epoch_sums": sums,
                    "world_size": info.world_size,
                    "history": history,
                    "normalization": normalization.to_dict() if normalization else None,
                },
                ckpt_file,
            )
        saved_at = (epoch, step_in_epoch, step)

    def interrupted() -> TrainingInterrupted:
        name = signal.Signals(stop.signum).name
        where = _position(*saved_at) if saved_at else "nothing"
        return TrainingInterrupted(
            f"stopped by {name}; {ckpt_file} holds {where}. Continue with: "
            f"capsnet-fused train --resume {out}",
            128 + stop.signum,
        )

    record: dict[str, Any] = history[-1] if history else {}
    # A --checkpoint-every checkpoint is due; it is written once the next loss, computed from
    # the same state, has come out finite.
    due = False
    while epoch < config.epochs:
        sampler.set_epoch(epoch)
        sampler.set_start(step_in_epoch * config.batch_size)
        model.train()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="batch",
            initial=step_in_epoch,
            total=steps_per_epoch,
            disable=not (config.progress and info.main),
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        for images, labels in bar:
            # The state a checkpoint written at this step resumes from: before this batch.
            rng = _rng_state(augment_gen)
            sums_before = [
                *epoch_sums[:3],
                epoch_sums[3] + time.perf_counter() - start,
                epoch_sums[4],
            ]
            first = step_in_epoch * config.batch_size
            real = sampler.real_samples(first, first + labels.shape[0])
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            images = to_float(images)
            if config.max_shift:
                images = random_shift(images, config.max_shift, augment_gen)
            if config.hflip:
                images = random_hflip(images, augment_gen)
            # Normalised after augmenting, so shifted-in pixels are background (0) like the
            # image's own border. Only the model's input is normalised: the decoder ends in a
            # sigmoid, so its reconstruction is compared with the image in [0, 1], and the
            # reconstruction loss keeps the paper's scale.
            inputs = normalization(images) if normalization is not None else images
            with autocast_context(device, config.amp):
                output = ddp_model(inputs, labels)
            loss = criterion(output, images, labels)[0]
            hits = class_scores(output).argmax(dim=1) == labels
            stats = torch.stack(
                [
                    loss.detach().double() * labels.shape[0],
                    hits[:real].sum().double(),
                    torch.tensor(real, device=device, dtype=torch.float64),
                    torch.tensor(labels.shape[0], device=device, dtype=torch.float64),
                    torch.tensor(float(stop.requested), device=device, dtype=torch.float64),
                ]
            )
            if info.enabled:
                dist.all_reduce(stats)
            loss_sum, batch_correct, batch_real, batch_images, stopping = stats.tolist()
            if not math.isfinite(loss_sum):
                bar.close()
                raise TrainingDiverged(
                    f"loss became {loss_sum / batch_images} at epoch {epoch + 1}, step "
                    f"{step + 1}; stopping ({kept()}). Try a lower --lr or disabling --amp."
                )
            # The loss is finite: the state after the previous step is good to keep.
            if due or stopping:
                snapshot(rng, sums_before)
                due = False
            if stopping:
                bar.close()
                raise interrupted()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            step_in_epoch += 1
            elapsed = time.perf_counter() - start
            epoch_sums = [
                epoch_sums[0] + loss_sum,
                epoch_sums[1] + batch_correct,
                epoch_sums[2] + batch_real,
                epoch_sums[3],
                epoch_sums[4] + batch_images,
            ]
            if step_in_epoch % 10 == 0 or step_in_epoch == steps_per_epoch:
                seconds = epoch_sums[3] + elapsed
                bar.set_postfix(
                    loss=f"{epoch_sums[0] / epoch_sums[4]:.4f}",
                    acc=f"{100 * epoch_sums[1] / max(epoch_sums[2], 1.0):.2f}%",
                    img_s=f"{epoch_sums[2] / max(seconds, 1e-9):.1f}",
                )
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                due = True
        bar.close()
        epoch_sums[3] += time.perf_counter() - start
        # The test loss checks the state after the epoch's last step, as the next step's loss
        # checks a mid-epoch one.
        test_start = time.perf_counter()
        test = evaluate(
            model,
            test_set,
            criterion,
            device,
            batch_size=max(config.batch_size, 256),
            amp=config.amp,
            info=info,
            progress=config.progress,
            stop=lambda: stop.requested,
            normalization=normalization,
        )
        if not math.isfinite(test["loss"]):
            raise TrainingDiverged(
                f"test loss became {test['loss']} after epoch {epoch + 1} (step {step}); "
                f"stopping ({kept()}). Try a lower --lr or disabling --amp."
            )
        if not test["complete"]:
            # Stopped during the evaluation: keep the epoch's training, evaluate on resume.
            snapshot(_rng_state(augment_gen), list(epoch_sums))
            raise interrupted()
        images_seen = max(epoch_sums[2], 1.0)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": epoch_sums[0] / max(epoch_sums[4], 1.0),
            "train_accuracy": epoch_sums[1] / images_seen,
            "train_images": int(epoch_sums[2]),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            # CapsNet's test_margin_loss and test_recon_loss; the CNN's loss has no parts.
            **{f"test_{name}": test[name] for name in criterion.part_names},
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": epoch_sums[3],
            "images_per_s": epoch_sums[2] / max(epoch_sums[3], 1e-9),
            # epoch_time_s is the training alone; an epoch's wall time adds this.
            "test_time_s": time.perf_counter() - test_start,
            "world_size": info.world_size,
            "device": str(device),
            # Where this epoch finished (a run resumed elsewhere changes machine mid-run).
            "machine": machine,
            "backend": backend,
            "amp": config.amp,
            "model": config.model,
        }
        with warnings.catch_warnings():
            # A run resumed after its epoch's last step (stopped during the evaluation) steps
            # the scheduler before this process stepped the optimiser; the schedule is right.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            scheduler.step()
        epoch += 1
        step_in_epoch = 0
        epoch_sums = [0.0, 0.0, 0.0, 0.0, 0.0]
        history = [*history, record]
        due = False
        # The checkpoint first: metrics.jsonl never shows an epoch the checkpoint lacks.
        snapshot(_rng_state(augment_gen), list(epoch_sums))
        if info.main:
            write_metrics(out / METRICS_NAME, history)
            log(_format_epoch(record, config.epochs))
        # Every process takes part in the vote, or the others would wait for it forever.
        if _any_rank(stop.requested, info, device) if info.enabled else stop.requested:
            raise interrupted()
    if info.enabled:
        dist.barrier()
    return record


def main_train(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Entry point of `capsnet-fused train` (see cli.py); argv, the command's arguments, is
    recorded in the run folder. Exit status: 0 done, 3 diverged, 130 / 143 stopped by SIGINT /
    SIGTERM with a checkpoint; cli.py maps other errors."""
    config, given = config_from_args(args)
    command = None if argv is None else shlex.join(["capsnet-fused", *argv])
    try:
        train(config, resume=args.resume, given=given, command=command)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr)
        return exc.exit_status
    return 0
