import pytest
import torch

from capsnet_fused.losses import MarginLoss, ReconstructionLoss, capsule_lengths


def test_margin_loss_hand_computed():
    lengths = torch.tensor([[0.95, 0.5, 0.05], [0.2, 0.05, 0.8]])
    labels = torch.tensor([0, 2])
    # sample 0: present 0.95 > 0.9 -> 0; absent 0.5 -> 0.5*(0.4)^2 = 0.08; 0.05 -> 0
    # sample 1: present 0.8 -> (0.1)^2 = 0.01; absent 0.2 -> 0.5*(0.1)^2 = 0.005; 0.05 -> 0
    loss = MarginLoss()(lengths, labels)
    torch.testing.assert_close(loss, torch.tensor((0.08 + 0.015) / 2))


def test_margin_loss_is_squared_hinge():
    labels = torch.tensor([0])
    a = MarginLoss()(torch.tensor([[0.7, 0.0]]), labels)
    b = MarginLoss()(torch.tensor([[0.5, 0.0]]), labels)
    torch.testing.assert_close(b / a, torch.tensor((0.4 / 0.2) ** 2))


def test_unsquared_margin_loss_hand_computed():
    lengths = torch.tensor([[0.95, 0.5, 0.05], [0.2, 0.05, 0.8]])
    labels = torch.tensor([0, 2])
    # sample 0: present 0; absent 0.5 -> 0.5*0.4 = 0.2. sample 1: present 0.1; absent 0.5*0.1
    loss = MarginLoss(squared=False)(lengths, labels)
    torch.testing.assert_close(loss, torch.tensor((0.2 + 0.1 + 0.05) / 2))


def test_margin_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"expected lengths \[B, J\] and labels \[B\]"):
        MarginLoss()(torch.rand(2, 3, 4), torch.tensor([0, 1]))


def test_reconstruction_loss_hand_computed():
    images = torch.zeros(2, 1, 2, 2)
    recon = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0]).view(2, 4)
    # squared errors per sample: 1 and 2; mean 1.5; times 0.0005
    torch.testing.assert_close(ReconstructionLoss()(recon, images), torch.tensor(0.00075))


def test_capsule_lengths_gradient_is_finite_at_zero():
    v = torch.zeros(2, 3, 4, requires_grad=True)
    capsule_lengths(v).sum().backward()
    assert torch.isfinite(v.grad).all()
