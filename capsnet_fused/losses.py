"""Losses of Sabour et al. (2017): margin loss and scaled reconstruction loss."""

from __future__ import annotations

import torch
from torch import nn


def capsule_lengths(v: torch.Tensor) -> torch.Tensor:
    """v [B, J, M] -> lengths [B, J] (class probabilities of a CapsNet)."""
    return torch.linalg.vector_norm(v, dim=-1)


class MarginLoss(nn.Module):
    """L = sum_k T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2, batch mean.

    squared=False drops the squares (the unsquared hinge of labml's and cezannec's code).
    forward(lengths [B, J], labels [B] int64) -> scalar.
    """

    def __init__(
        self, m_pos: float = 0.9, m_neg: float = 0.1, lambda_: float = 0.5, squared: bool = True
    ) -> None:
        super().__init__()
        self.m_pos, self.m_neg, self.lambda_ = m_pos, m_neg, lambda_
        self.squared = squared

    def forward(self, lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if lengths.dim() != 2 or labels.shape != lengths.shape[:1]:
            raise ValueError(
                f"expected lengths [B, J] and labels [B], got {tuple(lengths.shape)} "
                f"and {tuple(labels.shape)}"
            )
        target = nn.functional.one_hot(labels, lengths.shape[1]).to(lengths.dtype)
        present = torch.relu(self.m_pos - lengths)
        absent = torch.relu(lengths - self.m_neg)
        if self.squared:
            present, absent = present**2, absent**2
        per_class = target * present + self.lambda_ * (1.0 - target) * absent
        return per_class.sum(dim=1).mean()


class ReconstructionLoss(nn.Module):
    """scale * sum of squared pixel errors, averaged over the batch (scale 0.0005 in the paper).

    forward(reconstructions, images), both [B, ...] with the same number of elements per sample.
    """

    def __init__(self, scale: float = 0.0005) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        diff = reconstructions.reshape(batch, -1) - images.reshape(batch, -1)
        return self.scale * (diff * diff).sum(dim=1).mean()


class CapsNetLoss(nn.Module):
    """margin loss + recon_scale x reconstruction loss, computed in float32.

    forward(output: CapsNetOutput, images [B, C, H, W], labels [B]) -> (loss, margin, recon).
    images are the un-normalised ones in [0, 1], which the decoder's sigmoid can reproduce.
    """

    part_names = ("margin_loss", "recon_loss")

    def __init__(self, recon_scale: float = 0.0005) -> None:
        super().__init__()
        self.margin = MarginLoss()
        self.recon = ReconstructionLoss(recon_scale)

    def forward(self, output, images: torch.Tensor, labels: torch.Tensor):
        margin = self.margin(output.lengths.float(), labels)
        recon = self.recon(output.reconstructions.float(), images.float())
        return margin + recon, margin, recon
