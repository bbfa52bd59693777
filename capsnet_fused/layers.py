"""Capsule layers: FusedRouter (drop-in for labml's Router) and PrimaryCaps."""

from __future__ import annotations

import torch
from torch import nn

from capsnet_fused._checks import (
    SQUASH_EPS,
    check_backend_name,
    check_routing_options,
    check_squash_eps,
)
from capsnet_fused.ops import dynamic_routing
from capsnet_fused.reference import squash

# The official code's (Sabour et al.'s release) initial value of its capsule biases.
BIAS_INIT = 0.1


class FusedRouter(nn.Module):
    """Dynamic routing between capsule layers with a fused backend.

    Parameters: `weight` [I, J, N, M] (the layout and name of labml's Router, so its state_dict
    loads unchanged); with learn_prior=True, `prior` [I, J], the initial routing logits; with
    learn_bias=True, `bias` [J, M], added to s before every squash, starting at 0.1 (the
    official code's value). leaky, squash_eps and shared_logits: see reference_routing (with
    shared_logits="mean" or "sum" a sample's output depends on the rest of its batch).
    forward(u [B, I, N]) -> v [B, J, M].

    weight starts at init_scale * randn: with the softmax over out_caps, unit-variance weights
    saturate the squash and training stalls (labml uses init_scale=1).
    """

    def __init__(
        self,
        in_caps: int,
        out_caps: int,
        in_d: int,
        out_d: int,
        iterations: int = 3,
        *,
        softmax_over: str = "out_caps",
        learn_prior: bool = False,
        learn_bias: bool = False,
        detach_inner: bool = False,
        leaky: bool = False,
        squash_eps: float = SQUASH_EPS,
        shared_logits: str | None = None,
        backend: str = "auto",
        init_scale: float = 0.01,
    ) -> None:
        super().__init__()
        if min(in_caps, out_caps, in_d, out_d) < 1:
            raise ValueError(
                f"in_caps, out_caps, in_d and out_d must be >= 1, "
                f"got {(in_caps, out_caps, in_d, out_d)}"
            )
        iterations, squash_eps = check_routing_options(
            iterations, softmax_over, leaky, squash_eps, shared_logits
        )
        # Whether the backend can run is known only at the first call (it depends on the
        # tensors' device and dtype); a name that is no backend at all is refused now.
        check_backend_name(backend)
        self.in_caps, self.out_caps, self.in_d, self.out_d = in_caps, out_caps, in_d, out_d
        self.iterations = iterations
        self.softmax_over = softmax_over
        self.detach_inner = detach_inner
        self.leaky = leaky
        self.squash_eps = squash_eps
        self.shared_logits = shared_logits
        self.backend = backend
        self.weight = nn.Parameter(init_scale * torch.randn(in_caps, out_caps, in_d, out_d))
        self.prior = nn.Parameter(torch.zeros(in_caps, out_caps)) if learn_prior else None
        self.bias = nn.Parameter(torch.full((out_caps, out_d), BIAS_INIT)) if learn_bias else None

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return dynamic_routing(
            u,
            self.weight,
            self.iterations,
            prior=self.prior,
            bias=self.bias,
            softmax_over=self.softmax_over,
            detach_inner=self.detach_inner,
            leaky=self.leaky,
            squash_eps=self.squash_eps,
            shared_logits=self.shared_logits,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_caps={self.in_caps}, out_caps={self.out_caps}, in_d={self.in_d}, "
            f"out_d={self.out_d}, iterations={self.iterations}, "
            f"softmax_over={self.softmax_over!r}, learn_prior={self.prior is not None}, "
            f"learn_bias={self.bias is not None}, detach_inner={self.detach_inner}, "
            f"leaky={self.leaky}, squash_eps={self.squash_eps:g}, "
            f"shared_logits={self.shared_logits!r}, backend={self.backend!r}"
        )


class PrimaryCaps(nn.Module):
    """Convolutional capsules: x [B, C, H, W] -> squashed u [B, caps * H' * W', dim].

    Capsule index order is (capsule channel, row, column); capsule channel k takes the conv's
    output channels k * dim .. k * dim + dim - 1. squash_eps: the eps of its squash.
    """

    def __init__(
        self,
        in_channels: int,
        caps: int,
        dim: int,
        kernel_size: int = 9,
        stride: int = 2,
        squash_eps: float = SQUASH_EPS,
    ) -> None:
        super().__init__()
        self.caps, self.dim = caps, dim
        self.squash_eps = check_squash_eps(squash_eps)
        self.conv = nn.Conv2d(in_channels, caps * dim, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        batch, _, height, width = out.shape
        out = out.view(batch, self.caps, self.dim, height * width).permute(0, 1, 3, 2)
        return squash(out.reshape(batch, self.caps * height * width, self.dim), eps=self.squash_eps)
