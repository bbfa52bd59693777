"""A plain CNN of CapsNet's size, the baseline for the capsule-network claims (`--model cnn`).

Which baseline, and why. Sabour et al. (2017) compare against "a standard CNN with three
convolutional layers of 256, 256, 128 channels. Each has 5x5 kernels and stride of 1. The last
convolutional layers are followed by two fully connected layers of size 328, 192. The last fully
connected layer is connected with dropout to a 10 class softmax layer with cross entropy loss",
35.4 M parameters against CapsNet's 8.2 M. Those 35.4 M come from 'same' padding: the first fully
connected layer alone takes 28 x 28 x 128 x 328 = 32.9 M, and the convolutions cost about 1.9 G
multiply-adds per image, some ten times CapsNet's 0.2 G. On the project's 2-core CPU that would
make the baseline's epochs several times longer than CapsNet's, and it would not be "of similar
size".

This baseline keeps CapsNet's own front end and the paper's baseline head:
Conv1 (256 9x9, ReLU) and a second convolution shaped like PrimaryCaps (256 9x9, stride 2,
ReLU), both exactly as in CapsNet, then the paper baseline's fully connected layers 328 and 192
(ReLU), dropout 0.5 and a 10-way linear layer trained with softmax cross entropy. At 28x28 it has
8.42 M parameters (CapsNet: 8.22 M, decoder included) and the same convolution cost, so it is
the same network with the capsule layer, the routing and the reconstruction decoder replaced by
ordinary fully connected layers: a comparison of what the capsules add, at equal size, equal
training budget (epochs, optimiser, schedule) and the same data pipeline (shifts, flips,
normalisation). Its sizes follow the same flags as CapsNet's (--conv-channels, --kernel-size and
--primary-caps x --primary-dim channels for the second convolution); the routing and decoder
flags do not apply to it.
"""

from __future__ import annotations

import torch
from torch import nn

from capsnet_fused.models import conv_grid

# The paper baseline's fully connected layers (Sabour et al. 2017, section 5) and its dropout.
HIDDEN = (328, 192)
DROPOUT = 0.5


class BaselineCNN(nn.Module):
    """Conv(k x k) + ReLU, Conv(k x k, stride 2) + ReLU, FC 328, FC 192, dropout, FC classes.

    forward(images [B, C, H, W], labels [B] or None) -> logits [B, num_classes]. labels are
    accepted and ignored, so the training loop calls it as it calls CapsNet.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int | tuple[int, int] = 28,
        num_classes: int = 10,
        *,
        conv_channels: int = 256,
        kernel_size: int = 9,
        conv2_channels: int = 256,
        hidden: tuple[int, int] = HIDDEN,
        dropout: float = DROPOUT,
    ) -> None:
        super().__init__()
        (height, width), (out_h, out_w) = conv_grid(image_size, kernel_size)
        self.image_shape = (in_channels, height, width)
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, conv_channels, kernel_size),
            nn.ReLU(),
            nn.Conv2d(conv_channels, conv2_channels, kernel_size, stride=2),
            nn.ReLU(),
        )
        hidden1, hidden2 = hidden
        self.classifier = nn.Sequential(
            nn.Linear(conv2_channels * out_h * out_w, hidden1),
            nn.ReLU(),
            nn.Linear(hidden1, hidden2),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden2, num_classes),
        )

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"expected images [B, {', '.join(map(str, self.image_shape))}], "
                f"got {tuple(images.shape)}"
            )
        return self.classifier(self.features(images).flatten(1))


class CrossEntropyCriterion(nn.Module):
    """Softmax cross entropy of the logits, computed in float32, batch mean.

    forward(logits [B, J], images (unused), labels [B]) -> (loss,): the calling convention of
    losses.CapsNetLoss, whose extra terms (part_names) this loss does not have.
    """

    part_names: tuple[str, ...] = ()

    def forward(self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor):
        return (nn.functional.cross_entropy(logits.float(), labels),)
