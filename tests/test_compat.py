"""capsnet_fused.compat against the published routings it claims to reproduce.

Each test builds a layer of the published shape (the MNIST DigitCaps: 1152 input capsules of 8,
10 output capsules of 16) with random weights at that code's initial scale, runs the published
routing as transcribed here (our own transcription of their math, in their weight layout, in
float64), and checks that dynamic_routing with the compat function's arguments gives the same
output and the same gradients, to the input capsules and to their parameters, to 1e-12.
"""

from __future__ import annotations

import pytest
import torch

from capsnet_fused import PrimaryCaps, compat, dynamic_routing
from capsnet_fused.reference import squash
from tests.helpers import rel_error

B, I, J, N, M = 3, 1152, 10, 8, 16  # noqa: E741
F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def input_capsules(seed: int = 0) -> torch.Tensor:
    """u [B, I, N]: squashed, as primary capsules are."""
    return squash(torch.randn(B, I, N, generator=gen(seed), dtype=F64), eps=0.0)


def squash_no_eps(s: torch.Tensor) -> torch.Tensor:
    """|s|^2 / (1 + |s|^2) * s / |s| over the last axis: the eps-free squash."""
    q = (s * s).sum(-1, keepdim=True)
    return q / (1 + q) * s / q.sqrt()


def squash_eps_in_root(s: torch.Tensor, eps: float) -> torch.Tensor:
    q = (s * s).sum(-1, keepdim=True)
    return q / (1 + q) * s / (q + eps).sqrt()


def check_reproduces(theirs, params: dict, args_of, tol: float = 1e-12) -> None:
    """theirs(u, **params) -> v [B, J, M]; args_of(**params) -> dynamic_routing's keywords.
    Output and gradients (to u and to every parameter, through the mapping) within tol."""
    u = input_capsules().requires_grad_()
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    grad = torch.randn(B, J, M, generator=gen(7), dtype=F64)
    want = theirs(u, **leaves)
    want_grads = torch.autograd.grad(want, [u, *leaves.values()], grad)
    ours_leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    u2 = u.detach().clone().requires_grad_()
    got = dynamic_routing(u2, **args_of(**ours_leaves), backend="reference")
    got_grads = torch.autograd.grad(got, [u2, *ours_leaves.values()], grad)
    assert rel_error(got, want) < tol
    for name, g, w in zip(["u", *leaves], got_grads, want_grads, strict=True):
        assert rel_error(g, w) < tol, name


def test_labml():
    def theirs(u, weight):
        u_hat = torch.einsum("ijnm,bin->bijm", weight, u)
        logits = u.new_zeros(B, I, J)
        for _ in range(3):
            c = torch.softmax(logits, dim=1)
            v = squash_eps_in_root(torch.einsum("bij,bijm->bjm", c, u_hat), 1e-8)
            logits = logits + torch.einsum("bjm,bijm->bij", v, u_hat)
        return v

    weight = torch.randn(I, J, N, M, generator=gen(1), dtype=F64)
    check_reproduces(theirs, dict(weight=weight), lambda weight: compat.labml(weight, 3))


@pytest.mark.parametrize("n_iterations", [0, 2])
def test_adambielski(n_iterations):
    def theirs(u, weights, b):
        # u_predict [B, I, J, M]: each input capsule times its [N, J*M] matrix
        u_predict = (u.unsqueeze(2) @ weights).view(B, I, J, M)
        v = squash_no_eps((torch.softmax(b, dim=1).unsqueeze(2) * u_predict).sum(1))
        logits = b.expand(B, I, J)
        for _ in range(n_iterations):
            logits = logits + (u_predict * v.unsqueeze(1)).sum(-1)
            v = squash_no_eps((torch.softmax(logits, dim=2).unsqueeze(3) * u_predict).sum(1))
        return v

    bound = 1 / I**0.5
    weights = (torch.rand(I, N, J * M, generator=gen(2), dtype=F64) * 2 - 1) * bound
    b = 0.5 * torch.randn(I, J, generator=gen(3), dtype=F64)  # trained logits, not zeros
    check_reproduces(
        theirs,
        dict(weights=weights, b=b),
        lambda weights, b: compat.adambielski(weights, b, n_iterations),
    )


def gram_ai_style_routing(u, route_weights, logits, iterations):
    """The routing of gram-ai's and cezannec's capsule layers: weights [J, I, N, M], logits
    broadcast against priors [J, B, I, 1, M], softmax over axis 2 (input capsules)."""
    priors = u[None, :, :, None, :] @ route_weights[:, None]  # [J, B, I, 1, M]
    for t in range(iterations):
        probs = torch.softmax(logits, dim=2)
        outputs = squash_no_eps((probs * priors).sum(dim=2, keepdim=True))  # [J, B, 1, 1, M]
        if t < iterations - 1:
            logits = logits + (priors * outputs).sum(dim=-1, keepdim=True)
    return outputs.squeeze(2).squeeze(2).transpose(0, 1)


def test_gram_ai():
    def theirs(u, route_weights, route_logits):
        return gram_ai_style_routing(u, route_weights, route_logits, 3)

    route_weights = torch.randn(J, I, N, M, generator=gen(4), dtype=F64)
    route_logits = 0.5 * torch.randn(J, 1, I, 1, 1, generator=gen(5), dtype=F64)
    check_reproduces(
        theirs, dict(route_weights=route_weights, route_logits=route_logits), compat.gram_ai
    )


def test_cezannec():
    def theirs(u, W):
        return gram_ai_style_routing(u, W, u.new_zeros(J, B, I, 1, M), 3)

    W = torch.randn(J, I, N, M, generator=gen(6), dtype=F64)
    check_reproduces(theirs, dict(W=W), compat.cezannec)


def xifengguo_style_routing(u, weight, iterations, squash_fn, detach):
    """XifengGuo's routing (Keras and Pytorch): weight [J, I, M, N], logits [B, J, I] with the
    softmax over axis 1 (output capsules); optionally u_hat detached in the inner iterations."""
    u_hat = (weight @ u[:, None, :, :, None]).squeeze(-1)  # [B, J, I, M]
    inner = u_hat.detach() if detach else u_hat
    logits = u.new_zeros(B, J, I)
    for t in range(iterations):
        c = torch.softmax(logits, dim=1)
        last = t == iterations - 1
        v = squash_fn((c.unsqueeze(-1) * (u_hat if last else inner)).sum(dim=2))  # [B, J, M]
        if not last:
            logits = logits + (v.unsqueeze(2) * inner).sum(-1)
    return v


@pytest.mark.parametrize("before", [False, True], ids=["today", "before-2017-12-14"])
def test_xifengguo_keras(before):
    def theirs(u, W):
        return xifengguo_style_routing(
            u, W, 3, lambda s: squash_eps_in_root(s, 1e-7), detach=before
        )

    W = 0.01 * torch.randn(J, I, M, N, generator=gen(8), dtype=F64)
    check_reproduces(
        theirs, dict(W=W), lambda W: compat.xifengguo_keras(W, 3, before_2017_12_14=before)
    )


def test_xifengguo_pytorch_up_to_its_norm_eps():
    def norm_plus_eps_squash(s):
        norm = s.norm(dim=-1, keepdim=True)
        return norm**2 / (1 + norm**2) / (norm + 1e-8) * s

    def theirs(u, weight):
        return xifengguo_style_routing(u, weight, 3, norm_plus_eps_squash, detach=True)

    weight = 0.01 * torch.randn(J, I, M, N, generator=gen(9), dtype=F64)
    # Not exact (see compat.xifengguo_pytorch): 1e-8 / |s| relative, |s| ~ 0.03 here.
    check_reproduces(theirs, dict(weight=weight), compat.xifengguo_pytorch, tol=1e-6)
    with pytest.raises(AssertionError):
        check_reproduces(theirs, dict(weight=weight), compat.xifengguo_pytorch, tol=1e-9)


@pytest.mark.parametrize("leaky", [False, True], ids=["softmax", "leaky"])
def test_sabour_official(leaky):
    def theirs(u, weights, biases):
        votes = (u.unsqueeze(-1) * weights).sum(dim=2).reshape(B, I, J, M)
        logits = u.new_zeros(B, I, J)
        for _ in range(3):
            if leaky:
                padded = torch.cat([logits.new_zeros(B, I, 1), logits], dim=2)
                route = torch.softmax(padded, dim=2)[:, :, 1:]
            else:
                route = torch.softmax(logits, dim=2)
            v = squash_no_eps((route.unsqueeze(-1) * votes).sum(dim=1) + biases)
            logits = logits + (votes * v.unsqueeze(1)).sum(dim=3)
        return v

    weights = 0.1 * torch.randn(I, N, J * M, generator=gen(10), dtype=F64)
    biases = 0.1 + 0.05 * torch.randn(J, M, generator=gen(11), dtype=F64)
    check_reproduces(
        theirs,
        dict(weights=weights, biases=biases),
        lambda weights, biases: compat.sabour(weights, biases, 3, leaky=leaky),
    )


def test_primary_caps_from_conv_list():
    # gram-ai's / cezannec's primary capsules: D convolutions of K channels, outputs viewed as
    # [B, K*H*W, 1] and concatenated along the last axis, then squashed without eps.
    torch.manual_seed(0)
    C, K, D = 6, 4, 3  # noqa: N806
    convs = [torch.nn.Conv2d(C, K, 3, stride=2).double() for _ in range(D)]
    x = torch.randn(2, C, 9, 9, dtype=F64)
    theirs = squash_no_eps(torch.cat([conv(x).reshape(2, -1, 1) for conv in convs], dim=-1))
    ours = PrimaryCaps(C, caps=K, dim=D, kernel_size=3, stride=2, squash_eps=0.0).double()
    weight, bias = compat.primary_caps_from_conv_list(
        [c.weight for c in convs], [c.bias for c in convs]
    )
    ours.conv.load_state_dict({"weight": weight, "bias": bias})
    torch.testing.assert_close(ours(x), theirs, rtol=1e-13, atol=1e-15)


def test_fused_router_holds_the_mapping():
    weights = 0.1 * torch.randn(I, N, J * M, generator=gen(12), dtype=F64)
    biases = torch.full((J, M), 0.1, dtype=F64)
    args = compat.sabour(weights, biases, 3, leaky=True)
    router = compat.fused_router(args, backend="reference")
    assert dict(router.named_parameters()).keys() == {"weight", "bias"}
    assert router.leaky and router.squash_eps == 0.0 and router.weight.dtype == F64
    u = input_capsules(1)
    want = dynamic_routing(u, **args, backend="reference")
    torch.testing.assert_close(router(u), want, rtol=0, atol=0)
    # The parameters are copies: training the router leaves the published layer alone.
    with torch.no_grad():
        router.bias.add_(1.0)
    assert torch.equal(biases, torch.full((J, M), 0.1, dtype=F64))


def test_keras_weights_as_numpy():
    W = 0.01 * torch.randn(J, I, M, N, generator=gen(13), dtype=F64)
    args = compat.xifengguo_keras(W.numpy())
    assert torch.equal(args["weight"], W.permute(1, 0, 3, 2))


def test_split_of_columns_is_checked():
    with pytest.raises(ValueError, match="do not split"):
        compat.sabour(torch.zeros(4, 2, 15), torch.zeros(2, 4))
