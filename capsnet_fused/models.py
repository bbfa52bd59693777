"""CapsNet of Sabour et al. (2017): Conv1, PrimaryCaps, DigitCaps (FusedRouter), decoder."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import nn

from capsnet_fused.layers import FusedRouter, PrimaryCaps
from capsnet_fused.losses import capsule_lengths
from capsnet_fused.reference import SQUASH_EPS


class CapsNetOutput(NamedTuple):
    caps: torch.Tensor  # [B, num_classes, digit_dim] digit capsules
    lengths: torch.Tensor  # [B, num_classes] capsule lengths (class scores)
    reconstructions: torch.Tensor  # [B, C, H, W] decoder output in [0, 1]


# torch.export.save writes the output's pytree spec, which can name a namedtuple only once it is
# registered with a serialized name; torch.export.load rebuilds CapsNetOutput from that name
# (importing capsnet_fused registers it). Namedtuples have no public counterpart of
# torch.export.register_dataclass: pytree's _register_namedtuple is the API (torch >= 2.4).
pytree._register_namedtuple(
    CapsNetOutput, serialized_type_name="capsnet_fused.models.CapsNetOutput"
)


def conv_grid(
    image_size: int | tuple[int, int], kernel_size: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((height, width), (out_h, out_w)): the image and the grid after two kernel_size x
    kernel_size convolutions, the second with stride 2 (CapsNet's conv1 and primary capsules,
    and the CNN baseline's two convolutions); ValueError when nothing is left."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    conv1 = (height - kernel_size + 1, width - kernel_size + 1)
    out_h, out_w = ((n - kernel_size) // 2 + 1 for n in conv1)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"image_size {(height, width)} is too small for two {kernel_size}x{kernel_size} "
            f"convolutions (the second with stride 2)"
        )
    return (height, width), (out_h, out_w)


class CapsNet(nn.Module):
    """The paper's CapsNet, every size and routing option a constructor argument.

    squash_eps is the eps of both squashes (PrimaryCaps and the routing); learn_prior,
    learn_bias, leaky, detach_inner, softmax_over and shared_logits are FusedRouter's options
    for DigitCaps (with shared_logits a sample's capsules depend on the rest of its batch).

    forward(images [B, C, H, W], labels [B] or None) -> CapsNetOutput. The decoder sees only the
    digit capsule of the true label while training (when labels are given) and of the
    predicted class otherwise.

    channels_last=True keeps the two convolutions' weights and activations in channels-last
    memory order (the images are converted in forward), which oneDNN's CPU convolutions run
    without reordering; the values computed are the same.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int | tuple[int, int] = 28,
        num_classes: int = 10,
        *,
        conv_channels: int = 256,
        kernel_size: int = 9,
        primary_caps: int = 32,
        primary_dim: int = 8,
        digit_dim: int = 16,
        decoder_hidden: tuple[int, int] = (512, 1024),
        routing_iterations: int = 3,
        softmax_over: str = "out_caps",
        learn_prior: bool = False,
        learn_bias: bool = False,
        detach_inner: bool = False,
        leaky: bool = False,
        squash_eps: float = SQUASH_EPS,
        shared_logits: str | None = None,
        backend: str = "auto",
        digit_init_scale: float = 0.01,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        (height, width), (primary_h, primary_w) = conv_grid(image_size, kernel_size)
        self.image_shape = (in_channels, height, width)
        self.num_classes = num_classes
        self.channels_last = channels_last
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, conv_channels, kernel_size), nn.ReLU())
        self.primary = PrimaryCaps(
            conv_channels, primary_caps, primary_dim, kernel_size, 2, squash_eps=squash_eps
        )
        if channels_last:
            self.conv1.to(memory_format=torch.channels_last)
            self.primary.to(memory_format=torch.channels_last)
        self.digit = FusedRouter(
            primary_caps * primary_h * primary_w,
            num_classes,
            primary_dim,
            digit_dim,
            routing_iterations,
            softmax_over=softmax_over,
            learn_prior=learn_prior,
            learn_bias=learn_bias,
            detach_inner=detach_inner,
            leaky=leaky,
            squash_eps=squash_eps,
            shared_logits=shared_logits,
            backend=backend,
            init_scale=digit_init_scale,
        )
        hidden1, hidden2 = decoder_hidden
        self.decoder = nn.Sequential(
            nn.Linear(digit_dim * num_classes, hidden1),
            nn.ReLU(),
            nn.Linear(hidden1, hidden2),
            nn.ReLU(),
            nn.Linear(hidden2, in_channels * height * width),
            nn.Sigmoid(),
        )

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> CapsNetOutput:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"expected images [B, {', '.join(map(str, self.image_shape))}], "
                f"got {tuple(images.shape)}"
            )
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        caps = self.digit(self.primary(self.conv1(images)))
        lengths = capsule_lengths(caps)
        chosen = labels if labels is not None and self.training else lengths.argmax(dim=1)
        mask = nn.functional.one_hot(chosen, self.num_classes).to(caps.dtype)
        recon = self.decoder((caps * mask.unsqueeze(-1)).flatten(1))
        return CapsNetOutput(caps, lengths, recon.view(-1, *self.image_shape))
