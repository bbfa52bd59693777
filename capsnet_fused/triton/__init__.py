"""Fused dynamic-routing kernels in Triton and their launchers (no torch op registration here)."""

from capsnet_fused.triton.routing import (
    INTERPRETED,
    KernelLaunch,
    RoutingConfig,
    choose_config,
    planned_launches,
    routing_backward,
    routing_forward,
)

__all__ = [
    "INTERPRETED",
    "KernelLaunch",
    "RoutingConfig",
    "choose_config",
    "planned_launches",
    "routing_backward",
    "routing_forward",
]
