import pytest
import torch
from torch import nn

from capsnet_fused import FusedRouter, PrimaryCaps, available_backends, reference_routing, squash


class LabmlStyleRouter(nn.Module):
    """A router laid out like labml's capsule Router: weight [I, J, N, M], softmax over in_caps,
    zero initial logits; written here as the model a user would replace."""

    def __init__(self, in_caps, out_caps, in_d, out_d, iterations):
        super().__init__()
        self.iterations = iterations
        self.weight = nn.Parameter(torch.randn(in_caps, out_caps, in_d, out_d))

    def forward(self, u):
        u_hat = torch.einsum("ijnm,bin->bijm", self.weight, u)
        logits = u.new_zeros(u.shape[0], self.weight.shape[0], self.weight.shape[1])
        for _ in range(self.iterations):
            coupling = torch.softmax(logits, dim=1)
            s = torch.einsum("bij,bijm->bjm", coupling, u_hat)
            sq = (s**2).sum(dim=-1, keepdim=True)
            v = sq / (1 + sq) * s / torch.sqrt(sq + 1e-8)
            logits = logits + torch.einsum("bjm,bijm->bij", v, u_hat)
        return v


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_labml_router_state_dict_loads_and_reproduces(backend):
    torch.manual_seed(0)
    theirs = LabmlStyleRouter(37, 10, 8, 16, 3).double()
    ours = FusedRouter(37, 10, 8, 16, 3, softmax_over="in_caps", backend=backend).double()
    ours.load_state_dict(theirs.state_dict())
    u = squash(torch.randn(4, 37, 8, dtype=torch.float64))
    torch.testing.assert_close(ours(u), theirs(u), rtol=1e-10, atol=1e-12)


def test_router_parameters_and_prior():
    router = FusedRouter(12, 3, 4, 5, learn_prior=True)
    assert dict(router.named_parameters()).keys() == {"weight", "prior"}
    assert router.weight.shape == (12, 3, 4, 5) and router.prior.shape == (12, 3)
    assert "prior" not in dict(FusedRouter(12, 3, 4, 5).named_parameters())
    with torch.no_grad():
        router.prior.normal_()
    u = torch.randn(2, 12, 4)
    want = reference_routing(u, router.weight, 3, prior=router.prior)
    torch.testing.assert_close(router(u), want)
    router(u).sum().backward()
    assert router.prior.grad is not None and router.prior.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_router_bias_leaky_and_squash_eps(backend):
    # learn_bias adds `bias` [J, M] at the official code's 0.1; leaky and squash_eps are passed
    # on, to the reference and to the C++ CPU kernels.
    if backend not in available_backends("cpu"):
        pytest.skip(f"the {backend} backend is not built")
    router = FusedRouter(
        12, 3, 4, 5, learn_bias=True, leaky=True, squash_eps=0.0, backend=backend
    ).double()
    assert dict(router.named_parameters()).keys() == {"weight", "bias"}
    assert torch.equal(router.bias.float(), torch.full((3, 5), 0.1))
    assert "bias" not in dict(FusedRouter(12, 3, 4, 5).named_parameters())
    assert "learn_bias=True" in repr(router) and "squash_eps=0" in repr(router)
    u = torch.randn(2, 12, 4, dtype=torch.float64)
    want = reference_routing(u, router.weight, 3, bias=router.bias, leaky=True, squash_eps=0.0)
    exact = backend == "reference"
    torch.testing.assert_close(router(u), want, rtol=0 if exact else 1e-12, atol=0)
    router(u).sum().backward()
    assert router.bias.grad is not None and router.bias.grad.abs().sum() > 0


def test_router_weights_start_small():
    router = FusedRouter(1152, 10, 8, 16)
    assert 0.005 < router.weight.std().item() < 0.02


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(iterations=0), "iterations must be"),
        (dict(softmax_over="rows"), "softmax_over must be"),
        (dict(squash_eps=-1e-8), "squash_eps must be"),
        (dict(leaky="yes"), "leaky must be a bool"),
    ],
)
def test_router_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedRouter(4, 2, 3, 3, **kwargs)
    with pytest.raises(ValueError, match="must be >= 1"):
        FusedRouter(0, 2, 3, 3)


def test_primary_caps_order_and_squash():
    layer = PrimaryCaps(6, caps=4, dim=3, kernel_size=3, stride=2)
    x = torch.randn(2, 6, 9, 9)
    u = layer(x)
    assert u.shape == (2, 4 * 4 * 4, 3)
    conv = layer.conv(x)  # [2, 4 * 3, 4, 4]: capsule c, row y, column x -> index (c, y, x)
    raw = conv.view(2, 4, 3, 4, 4)[:, 1, :, 2, 3]
    torch.testing.assert_close(u[:, 1 * 16 + 2 * 4 + 3], squash(raw))
    assert (u.norm(dim=-1) < 1).all()
    eps_free = PrimaryCaps(6, caps=4, dim=3, kernel_size=3, stride=2, squash_eps=0.0)
    eps_free.load_state_dict(layer.state_dict())
    torch.testing.assert_close(eps_free(x)[:, 1 * 16 + 2 * 4 + 3], squash(raw, eps=0.0))
