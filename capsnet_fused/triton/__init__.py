"""Fused dynamic-routing kernels in Triton and their launchers (no torch op registration here)."""

from capsnet_fused.triton.routing import (
    INTERPRETED,
    RoutingConfig,
    acc_dtype,
    choose_config,
    routing_backward,
    routing_forward,
)

__all__ = [
    "INTERPRETED",
    "RoutingConfig",
    "acc_dtype",
    "choose_config",
    "routing_backward",
    "routing_forward",
]
