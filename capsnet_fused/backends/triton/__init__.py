"""The Triton backend: op.py (its torch ops and the backend contract) calls the launchers,
launch.py (per-sample routing logits) and shared_launch.py (logits shared by the batch), which
launch the kernels of kernels.py and shared_kernels.py with the tile sizes of tiles.py;
planned.py lists the launches of a call without running them.

This package re-exports the launchers' public names; it registers no torch op (op.py does, when
capsnet_fused.ops imports it)."""

from capsnet_fused.backends.triton.launch import (
    KernelLaunch,
    routing_backward,
    routing_forward,
)
from capsnet_fused.backends.triton.planned import planned_launches, planned_shared_launches
from capsnet_fused.backends.triton.shared_launch import (
    SharedConfig,
    choose_shared_config,
    shared_routing_backward,
    shared_routing_forward,
)
from capsnet_fused.backends.triton.tiles import INTERPRETED, RoutingConfig, choose_config

__all__ = [
    "INTERPRETED",
    "KernelLaunch",
    "RoutingConfig",
    "SharedConfig",
    "choose_config",
    "choose_shared_config",
    "planned_launches",
    "planned_shared_launches",
    "routing_backward",
    "routing_forward",
    "shared_routing_backward",
    "shared_routing_forward",
]
