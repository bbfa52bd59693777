"""Several processes under torchrun (DistributedDataParallel: gloo on CPU, nccl on CUDA): the
process group, this process's place in it, sums over all processes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from capsnet_fused._checks import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_hint: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1) or the one already set up."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            dist.get_rank(),
            dist.get_world_size(),
            int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device_hint, local_rank).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def _all_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Element-wise sum over processes (identity for one process)."""
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Whether any process has `flag` set (every process must call this)."""
    return _all_sum([float(flag)], info, device)[0] > 0
