"""Fused dynamic-routing kernels in Triton and their launchers (no torch op registration here)."""

from capsnet_fused.backends.triton.launch import (
    INTERPRETED,
    KernelLaunch,
    RoutingConfig,
    choose_config,
    planned_launches,
    routing_backward,
    routing_forward,
)
from capsnet_fused.backends.triton.shared_launch import (
    SharedConfig,
    choose_shared_config,
    planned_shared_launches,
    shared_routing_backward,
    shared_routing_forward,
)

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
