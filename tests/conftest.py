import os
from pathlib import Path

import pytest
import torch

# The Triton interpreter is chosen when kernels are decorated, so it must be set before any
# capsnet_fused module with @triton.jit kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The tiny training run's data and one finished run, shared by the training tests
# (tests/training_data.py); each module that asks gets its own. Imported inside: capsnet_fused
# must not be imported before TRITON_INTERPRET is set above.
@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    from tests.training_data import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def straight_run(dataset_dir, tmp_path_factory) -> Path:
    """Two uninterrupted epochs; the run folder."""
    from capsnet_fused.train import train
    from tests.training_data import tiny_config

    out = tmp_path_factory.mktemp("straight")
    train(tiny_config(dataset_dir, out), log=lambda *_: None)
    return out
