"""Training and evaluation of CapsNet on MNIST / Fashion-MNIST.

One process or many under torchrun (DistributedDataParallel: gloo on CPU, nccl on CUDA). Rank 0
alone writes the run folder: config.json, metrics.jsonl (one JSON object per epoch) and
checkpoint.pt, all atomically (capsnet_fused.checkpoint). A resumed run restores the model,
optimiser, scheduler, grad scaler, every RNG state and the position in the epoch, so it follows
the trajectory of an uninterrupted run.

A checkpoint holds only a state known to be good: the state after step k is written once the
loss of step k+1, computed from it, is finite (or, at the end of an epoch, once the test loss
is), and its parameters and optimiser state are finite. So a run that diverges keeps the last
good checkpoint. The checkpoint also holds the epoch records, and metrics.jsonl is rewritten
from them, so the two always agree. SIGINT and SIGTERM stop the run at the next step with a
checkpoint (exit status 130 / 143).

The modules, in the order a run meets them:

  config.py       TrainConfig (every setting, its check and its flag), the flags of
                  `capsnet-fused train`, a config from the command line or on resume
  resume.py       config, model and normalisation from a checkpoint; RNG states
  run_folder.py   the run folder: created, checked, and the files a session starts with
  model.py        the model and loss a config describes, predictions, autocast
  distributed.py  the torchrun process group and sums over processes
  signals.py      SIGINT / SIGTERM as a request to stop with a checkpoint
  stats.py        EpochStats: the sums an epoch's (or an evaluation's) results come from
  evaluation.py   test loss and accuracy, of the model in training or of a checkpoint
  loop.py         train(): setup, the epochs and their steps, checkpoints; main_train

This package re-exports the names other modules and users import from capsnet_fused.train.
"""

from capsnet_fused._checks import resolve_device
from capsnet_fused.checkpoint import (
    METRICS_NAME,
    CheckpointWriteError,  # raised through save_checkpoint; importable from here
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from capsnet_fused.losses import CapsNetLoss
from capsnet_fused.train.config import (
    ADDED_SETTINGS,
    CAPSULE_ONLY,
    MODELS,
    RESUMABLE_OVERRIDES,
    TrainConfig,
    add_train_arguments,
    config_from_args,
)
from capsnet_fused.train.distributed import DistInfo, setup_distributed
from capsnet_fused.train.evaluation import evaluate, evaluate_checkpoint, load_test_set
from capsnet_fused.train.loop import TrainingDiverged, TrainingInterrupted, main_train, train
from capsnet_fused.train.model import autocast_context, build_model, class_scores, make_criterion
from capsnet_fused.train.resume import (
    config_from_checkpoint,
    model_from_checkpoint,
    normalization_from_checkpoint,
)

__all__ = [
    "ADDED_SETTINGS",
    "CAPSULE_ONLY",
    "METRICS_NAME",
    "MODELS",
    "RESUMABLE_OVERRIDES",
    "CapsNetLoss",
    "CheckpointWriteError",
    "DistInfo",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "add_train_arguments",
    "autocast_context",
    "build_model",
    "checkpoint_path",
    "class_scores",
    "config_from_args",
    "config_from_checkpoint",
    "evaluate",
    "evaluate_checkpoint",
    "load_checkpoint",
    "load_test_set",
    "main_train",
    "make_criterion",
    "model_from_checkpoint",
    "normalization_from_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "setup_distributed",
    "train",
]
