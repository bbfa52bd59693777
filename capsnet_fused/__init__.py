"""capsnet-fused: fused dynamic routing for capsule networks."""

# models is imported for its registration of CapsNetOutput with pytree, without which
# torch.export.load cannot rebuild a saved CapsNet's output.
from capsnet_fused import models  # noqa: F401
from capsnet_fused.layers import FusedRouter, PrimaryCaps
from capsnet_fused.ops import available_backends, choose_backend, dynamic_routing, load_backends
from capsnet_fused.reference import reference_routing, squash

__version__ = "0.1.0"

load_backends()

__all__ = [
    "FusedRouter",
    "PrimaryCaps",
    "available_backends",
    "choose_backend",
    "dynamic_routing",
    "reference_routing",
    "squash",
    "__version__",
]
