"""The training loop, to be read top to bottom.

main_train (`capsnet-fused train`) calls train(), which settles the config (fresh or resumed),
catches SIGINT / SIGTERM and joins the process group; _train then runs the steps, all on one
_Run, the state they share:

  _setup           run folder, seeds, data, model, optimiser, loader (_restore on resume)
  _start_session   metrics.jsonl, config.json, sessions.jsonl and the first log lines
  _train_epoch     the epoch's steps: _train_step, with the loss of _batch_loss
  _end_epoch       the test loss, the epoch's record, the checkpoint and metrics.jsonl

Only states known to be good are checkpointed (_Run.snapshot; see the package docstring).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import shlex
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
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
    METRICS_NAME,
    history_for,
    read_metrics_lenient,
    save_checkpoint,
    write_metrics,
)
from capsnet_fused.data import (
    ImageDataset,
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
from capsnet_fused.train.model import (
    autocast_context,
    build_model,
    class_scores,
    make_criterion,
    resolve_auto_settings,
)
from capsnet_fused.train.resume import (
    _load_state_dict,
    _prepare_config,
    _rng_state,
    _set_rng_state,
    normalization_from_checkpoint,
)
from capsnet_fused.train.run_folder import prepare_run_folder, write_session_files
from capsnet_fused.train.signals import _ignore_stop_signals, _StopSignals
from capsnet_fused.train.stats import EpochStats


class TrainingDiverged(RuntimeError):
    """The loss, the test loss or the parameters became NaN or Inf; the last good checkpoint
    is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run after writing a checkpoint; exit_status is 128 + the
    signal number (130, 143)."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


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
    """The run from its setup to the end of its last epoch; returns that epoch's record."""
    run = _setup(config, state, info, log, stop)
    if info.main:
        _start_session(run, state, command)
    while run.epoch < run.config.epochs:
        _train_epoch(run)
        _end_epoch(run)
    if info.enabled:
        dist.barrier()
    return run.record


@dataclass
class _Run:
    """A run in training: what _setup builds, and where training stands, after `epoch` whole
    epochs and `step_in_epoch` steps of the next (`step` steps in all)."""

    config: TrainConfig
    info: DistInfo
    log: Callable[[str], Any]
    stop: _StopSignals
    device: torch.device
    out: Path
    augment_gen: torch.Generator
    train_set: ImageDataset
    test_set: ImageDataset
    normalization: Normalization | None
    model: nn.Module
    ddp_model: nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    backend: str
    machine: str
    settled: str  # what "auto" chose for amp and channels_last (resolve_auto_settings), or ""
    sampler: ResumableSampler
    loader: DataLoader
    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    stats: EpochStats = dataclasses.field(default_factory=EpochStats)  # of the epoch so far
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    record: dict[str, Any] = dataclasses.field(default_factory=dict)  # the last epoch's
    saved_at: tuple[int, int, int] | None = None  # (epoch, step_in_epoch, step) of ckpt_file
    # A --checkpoint-every checkpoint is due; it is written once the next loss, computed from
    # the same state, has come out finite.
    due: bool = False

    @property
    def ckpt_file(self) -> Path:
        return self.out / CHECKPOINT_NAME

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.sampler) / self.config.batch_size)

    def kept(self) -> str:
        """What the run keeps if it stops now, in words: its last good checkpoint, if any."""
        if self.saved_at is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint {self.ckpt_file} holds {_position(*self.saved_at)}"

    def snapshot(self, rng: dict[str, Any], stats: EpochStats) -> None:
        """Checkpoint the current model and optimiser state at (epoch, step_in_epoch, step)."""
        # Every rank holds the same state, so every rank reaches the same verdict.
        if not _finite_state(self.model, self.optimizer):
            raise TrainingDiverged(
                f"parameters or optimiser state became NaN or Inf by "
                f"{_position(self.epoch, self.step_in_epoch, self.step)}; stopping "
                f"({self.kept()}). Try a lower --lr or disabling --amp."
            )
        if self.info.main:
            save_checkpoint(
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": dataclasses.asdict(self.config),
                    "image_shape": list(self.train_set.image_shape),
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rng": rng,
                    "epoch": self.epoch,
                    "step": self.step,
                    "step_in_epoch": self.step_in_epoch,
                    "epoch_sums": stats.to_list(),
                    "world_size": self.info.world_size,
                    "history": self.history,
                    "normalization": self.normalization.to_dict() if self.normalization else None,
                },
                self.ckpt_file,
            )
        self.saved_at = (self.epoch, self.step_in_epoch, self.step)

    def interrupted(self) -> TrainingInterrupted:
        """The error that ends a run stopped by a signal: what its checkpoint holds, how to
        continue."""
        name = signal.Signals(self.stop.signum).name
        where = _position(*self.saved_at) if self.saved_at else "nothing"
        return TrainingInterrupted(
            f"stopped by {name}; {self.ckpt_file} holds {where}. Continue with: "
            f"capsnet-fused train --resume {self.out}",
            128 + self.stop.signum,
        )


# ---------------------------------------------------------------- setup


def _setup(
    config: TrainConfig, state: dict | None, info: DistInfo, log, stop: _StopSignals
) -> _Run:
    """Everything the run needs, in the order that makes it reproducible: the run folder, the
    seeds, the data, the model and its optimiser; a resumed run then takes the checkpoint's
    state (before DistributedDataParallel copies rank 0's parameters to every process)."""
    device = resolve_device(config.device, info.local_rank)
    config, settled = resolve_auto_settings(config, device)
    out = prepare_run_folder(config, state, info, log)

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    # One generator per process for the shifts, so ranks augment independently.
    augment_gen = torch.Generator().manual_seed(config.seed + 7919 * (info.rank + 1))

    train_set, test_set = _load_data(config, state)
    # The statistics of the training images actually used (after --limit-train), computed once:
    # a resumed run keeps the checkpoint's, as eval and visualize do.
    normalization = None
    if state is not None:
        normalization = normalization_from_checkpoint(state, config, state["path"])
    elif config.normalize:
        normalization = Normalization.of_images(train_set.images)
    model = build_model(config, train_set.image_shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    use_scaler = config.amp and device.type == "cuda"
    sampler = ResumableSampler(
        train_set, info.world_size, info.rank, shuffle=True, seed=config.seed
    )
    run = _Run(
        config=config,
        info=info,
        log=log,
        stop=stop,
        device=device,
        out=out,
        augment_gen=augment_gen,
        train_set=train_set,
        test_set=test_set,
        normalization=normalization,
        model=model,
        ddp_model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay),
        scaler=torch.amp.GradScaler(device.type, enabled=use_scaler),
        settled=settled,
        criterion=make_criterion(config),
        backend=choose_backend(device, torch.float32, config.backend),
        machine=machine_summary(device),
        sampler=sampler,
        loader=DataLoader(
            train_set,
            batch_size=config.batch_size,
            sampler=sampler,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=_ignore_stop_signals if config.num_workers else None,
        ),
    )
    if state is not None:
        _restore(run, state)
    if info.enabled:
        run.ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return run


def _load_data(config: TrainConfig, state: dict | None) -> tuple[ImageDataset, ImageDataset]:
    """The training and test images, of the same shape (a resumed run's: the checkpoint's)."""
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
    return train_set, test_set


def _restore(run: _Run, state: dict[str, Any]) -> None:
    """Continue where the checkpoint `state` stopped: its model, optimiser, scheduler, scaler and
    RNG states, its position, the sums of its epoch so far and the epochs' records."""
    path = state["path"]
    if state["world_size"] != run.info.world_size:
        raise ValueError(
            f"checkpoint was written by {state['world_size']} processes; "
            f"resume it with the same number (got {run.info.world_size})"
        )
    _load_state_dict(run.model, state["model"], "model", path)
    _load_state_dict(run.optimizer, state["optimizer"], "optimizer state", path)
    _load_state_dict(run.scheduler, state["scheduler"], "scheduler state", path)
    _load_state_dict(run.scaler, state["scaler"], "grad scaler state", path)
    _set_rng_state(state["rng"], run.augment_gen)
    run.epoch, run.step, run.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
    run.saved_at = (run.epoch, run.step_in_epoch, run.step)
    sums = list(state["epoch_sums"])
    # Checkpoints from before the padding was told apart counted processed images only.
    run.stats = EpochStats.from_list(sums + [sums[2]] if len(sums) == 4 else sums)
    history = state.get("history")
    if history is None:  # an older checkpoint: its epochs from metrics.jsonl, once each
        history = history_for(read_metrics_lenient(run.out / METRICS_NAME), run.epoch)
    run.history = history
    run.record = history[-1] if history else {}


def _start_session(run: _Run, state: dict | None, command: str | None) -> None:
    """Rank 0, before the first step: the run folder's files (write_session_files) and what
    is trained where in the log."""
    config, normalization = run.config, run.normalization
    session = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "cwd": os.getcwd(),
        "from_epoch": run.epoch,
        "from_step": run.step,
        "machine": run.machine,
        "device": str(run.device),
        "world_size": run.info.world_size,
        "backend": run.backend,
        "torch": torch.__version__,
    }
    write_session_files(run.out, config, normalization, run.history, session, state is not None)
    run.log(
        f"training {config.dataset} ({len(run.train_set)} train / {len(run.test_set)} test "
        f"images from {config.data_dir}) on {run.device} x{run.info.world_size}, backend "
        f"{run.backend}, run folder {run.out}"
    )
    if run.settled:
        run.log(run.settled)
    if normalization is not None:
        run.log(
            f"inputs normalised with mean {list(normalization.mean)} and std "
            f"{list(normalization.std)} of the {len(run.train_set)} training images"
        )


# ---------------------------------------------------------------- the epoch and its steps


def _train_epoch(run: _Run) -> None:
    """The steps of epoch run.epoch + 1, from where it stands (a resumed run may start inside
    it)."""
    config = run.config
    run.sampler.set_epoch(run.epoch)
    run.sampler.set_start(run.step_in_epoch * config.batch_size)
    run.model.train()
    bar = tqdm(
        run.loader,
        desc=f"epoch {run.epoch + 1}/{config.epochs}",
        unit="batch",
        initial=run.step_in_epoch,
        total=run.steps_per_epoch,
        disable=not (config.progress and run.info.main),
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    for images, labels in bar:
        _train_step(run, images, labels, bar, start)
    bar.close()
    run.stats.seconds += time.perf_counter() - start


def _train_step(
    run: _Run, images: torch.Tensor, labels: torch.Tensor, bar: tqdm, start: float
) -> None:
    """One step: the batch's loss; once it is finite, the checkpoint of the state it was
    computed from when one is due (or a stop is requested); then the optimiser step. `start`:
    when the epoch's steps in this process began."""
    config = run.config
    # The state a checkpoint written at this step resumes from: before this batch.
    rng = _rng_state(run.augment_gen)
    stats_before = dataclasses.replace(
        run.stats, seconds=run.stats.seconds + time.perf_counter() - start
    )
    first = run.step_in_epoch * config.batch_size
    real = run.sampler.real_samples(first, first + labels.shape[0])
    loss, batch, stopping = _batch_loss(run, images, labels, real)
    if not math.isfinite(batch.loss_sum):
        bar.close()
        raise TrainingDiverged(
            f"loss became {batch.loss_sum / batch.processed} at epoch {run.epoch + 1}, step "
            f"{run.step + 1}; stopping ({run.kept()}). Try a lower --lr or disabling --amp."
        )
    # The loss is finite: the state after the previous step is good to keep.
    if run.due or stopping:
        run.snapshot(rng, stats_before)
        run.due = False
    if stopping:
        bar.close()
        raise run.interrupted()
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.step += 1
    run.step_in_epoch += 1
    elapsed = time.perf_counter() - start
    run.stats = run.stats + batch
    if run.step_in_epoch % 10 == 0 or run.step_in_epoch == run.steps_per_epoch:
        seconds = run.stats.seconds + elapsed
        bar.set_postfix(
            loss=f"{run.stats.loss_sum / run.stats.processed:.4f}",
            acc=f"{100 * run.stats.correct / max(run.stats.images, 1.0):.2f}%",
            img_s=f"{run.stats.images / max(seconds, 1e-9):.1f}",
        )
    if config.checkpoint_every and run.step % config.checkpoint_every == 0:
        run.due = True


def _batch_loss(
    run: _Run, images: torch.Tensor, labels: torch.Tensor, real: int
) -> tuple[torch.Tensor, EpochStats, bool]:
    """The training loss of one batch (augmented; `real` of its images are not the sampler's
    padding), the batch's sums over all processes, and whether any process is asked to stop."""
    config, device = run.config, run.device
    images, labels = images.to(device, non_blocking=True), labels.to(device)
    images = to_float(images)
    if config.max_shift:
        images = random_shift(images, config.max_shift, run.augment_gen)
    if config.hflip:
        images = random_hflip(images, run.augment_gen)
    # Normalised after augmenting, so shifted-in pixels are background (0) like the
    # image's own border. Only the model's input is normalised: the decoder ends in a
    # sigmoid, so its reconstruction is compared with the image in [0, 1], and the
    # reconstruction loss keeps the paper's scale.
    inputs = run.normalization(images) if run.normalization is not None else images
    with autocast_context(device, config.amp):
        output = run.ddp_model(inputs, labels)
    loss = run.criterion(output, images, labels)[0]
    hits = class_scores(output).argmax(dim=1) == labels
    stats = torch.stack(
        [
            loss.detach().double() * labels.shape[0],
            hits[:real].sum().double(),
            torch.tensor(real, device=device, dtype=torch.float64),
            torch.tensor(labels.shape[0], device=device, dtype=torch.float64),
            torch.tensor(float(run.stop.requested), device=device, dtype=torch.float64),
        ]
    )
    if run.info.enabled:
        dist.all_reduce(stats)
    loss_sum, batch_correct, batch_real, batch_images, stopping = stats.tolist()
    batch = EpochStats(
        loss_sum=loss_sum, correct=batch_correct, images=batch_real, processed=batch_images
    )
    return loss, batch, bool(stopping)


# ---------------------------------------------------------------- the end of an epoch


def _end_epoch(run: _Run) -> None:
    """After the epoch's last step: the test loss, which checks the state the epoch ends in;
    then the epoch's record, the checkpoint and metrics.jsonl. A stop requested in any process
    ends the run here."""
    config, info = run.config, run.info
    # The test loss checks the state after the epoch's last step, as the next step's loss
    # checks a mid-epoch one. It is computed in float32 also under --amp: the record is then
    # the model's accuracy, the number `capsnet-fused eval` gives for the checkpoint, whatever
    # precision it was trained in.
    test_start = time.perf_counter()
    test = evaluate(
        run.model,
        run.test_set,
        run.criterion,
        run.device,
        batch_size=max(config.batch_size, 256),
        info=info,
        progress=config.progress,
        stop=lambda: run.stop.requested,
        normalization=run.normalization,
    )
    if not math.isfinite(test["loss"]):
        raise TrainingDiverged(
            f"test loss became {test['loss']} after epoch {run.epoch + 1} (step {run.step}); "
            f"stopping ({run.kept()}). Try a lower --lr or disabling --amp."
        )
    if not test["complete"]:
        # Stopped during the evaluation: keep the epoch's training, evaluate on resume.
        run.snapshot(_rng_state(run.augment_gen), run.stats)
        raise run.interrupted()
    record = _epoch_record(run, test, test_start)
    with warnings.catch_warnings():
        # A run resumed after its epoch's last step (stopped during the evaluation) steps
        # the scheduler before this process stepped the optimiser; the schedule is right.
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        run.scheduler.step()
    run.epoch += 1
    run.step_in_epoch = 0
    run.stats = EpochStats()
    run.history = [*run.history, record]
    run.record = record
    run.due = False
    # The checkpoint first: metrics.jsonl never shows an epoch the checkpoint lacks.
    run.snapshot(_rng_state(run.augment_gen), run.stats)
    if info.main:
        write_metrics(run.out / METRICS_NAME, run.history)
        run.log(_format_epoch(record, config.epochs))
    # Every process takes part in the vote, or the others would wait for it forever.
    if _any_rank(run.stop.requested, info, run.device) if info.enabled else run.stop.requested:
        raise run.interrupted()


def _epoch_record(run: _Run, test: dict[str, Any], test_start: float) -> dict[str, Any]:
    """The line of metrics.jsonl for the epoch just trained (run.epoch + 1) and tested."""
    config, stats = run.config, run.stats
    images_seen = max(stats.images, 1.0)
    return {
        "epoch": run.epoch + 1,
        "step": run.step,
        "train_loss": stats.loss_sum / max(stats.processed, 1.0),
        "train_accuracy": stats.correct / images_seen,
        "train_images": int(stats.images),
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        # CapsNet's test_margin_loss and test_recon_loss; the CNN's loss has no parts.
        **{f"test_{name}": test[name] for name in run.criterion.part_names},
        "lr": run.optimizer.param_groups[0]["lr"],
        "epoch_time_s": stats.seconds,
        "images_per_s": stats.images / max(stats.seconds, 1e-9),
        # epoch_time_s is the training alone; an epoch's wall time adds this.
        "test_time_s": time.perf_counter() - test_start,
        "world_size": run.info.world_size,
        "device": str(run.device),
        # Where this epoch finished (a run resumed elsewhere changes machine mid-run).
        "machine": run.machine,
        "backend": run.backend,
        "amp": config.amp,
        "model": config.model,
    }


# ---------------------------------------------------------------- helpers


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


def _finite_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter and every floating-point optimiser state is finite."""
    tensors = [p.detach() for p in model.parameters()]
    for per_param in optimizer.state.values():
        tensors += [t for t in per_param.values() if torch.is_tensor(t) and t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)
