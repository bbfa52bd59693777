"""Published capsule routing layers mapped onto ours: the weights into our layout, the options
that reproduce each routing.

Each function takes the parameters of one published implementation's routing layer (tensors,
or numpy arrays for the TensorFlow/Keras ones) and returns the keyword arguments of
dynamic_routing, weight included, so that

    v = dynamic_routing(u, **compat.adambielski(layer.weights, layer.routing_module.b, 3))

computes what that layer computes for the same input capsules u [B, I, N]; fused_router() turns
them into a FusedRouter holding the mapped parameters. "Exact" below means equal to float64
rounding: tests/test_compat.py transcribes each published routing (our transcription of their
math, in float64, with their layouts) and checks the output and the gradients to 1e-12.

Only the routing layer is mapped; primary capsules differ in capsule order between
implementations (primary_caps_from_conv_list maps gram-ai's and cezannec's onto PrimaryCaps),
and so do the losses (see the README).
"""

from __future__ import annotations

from typing import Any

import torch

from capsnet_fused.layers import FusedRouter
from capsnet_fused.reference import SQUASH_EPS

__all__ = [
    "adambielski",
    "cezannec",
    "fused_router",
    "gram_ai",
    "labml",
    "primary_caps_from_conv_list",
    "sabour",
    "xifengguo_keras",
    "xifengguo_pytorch",
]


def _tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _from_i_n_jm(weights, out_caps: int) -> torch.Tensor:
    """[I, N, J*M] (u_hat[b, i, j*M + m] = sum_n u[b, i, n] weights[i, n, j*M + m]) ->
    [I, J, N, M]."""
    weights = _tensor(weights)
    in_caps, in_d, columns = weights.shape
    if columns % out_caps != 0:
        raise ValueError(
            f"weights [I, N, J*M] = {tuple(weights.shape)} do not split into J={out_caps} capsules"
        )
    return weights.reshape(in_caps, in_d, out_caps, columns // out_caps).permute(0, 2, 1, 3)


def labml(weight, iterations: int = 3) -> dict[str, Any]:
    """labml.ai's capsule `Router` (labml_nn/capsule_networks/__init__.py): weight
    [I, J, N, M] is our layout, as is.

    Exact: softmax over input capsules, no prior, squash with 1e-8 inside the square root (our
    default), `iterations` weighted sums. Its state_dict loads into
    FusedRouter(..., softmax_over="in_caps") unchanged.
    """
    return dict(weight=_tensor(weight), iterations=iterations, softmax_over="in_caps")


def adambielski(weights, b, n_iterations: int) -> dict[str, Any]:
    """adambielski/CapsNet-pytorch (net.py): `CapsLayer.weights` [I, N, J*M] and its
    `AgreementRouting` module's learned logits `b` [I, J] and `n_iterations` (the script's
    --routing_iterations).

    Exact: weights -> view(I, N, J, M).permute(0, 2, 1, 3); b is our prior (learned initial
    logits); softmax over output capsules; its squash has no eps (squash_eps=0, NaN at s = 0 as
    theirs); it squashes once before the loop and once per iteration, so n_iterations = k is
    iterations = k + 1 weighted sums.
    """
    b = _tensor(b)
    return dict(
        weight=_from_i_n_jm(weights, b.shape[1]),
        iterations=n_iterations + 1,
        prior=b,
        softmax_over="out_caps",
        squash_eps=0.0,
    )


def gram_ai(route_weights, route_logits=None, num_iterations: int = 3) -> dict[str, Any]:
    """gram-ai/capsule-networks (capsule_network.py): the digit `CapsuleLayer`'s
    `route_weights` [J, I, N, M] and `route_logits` [J, 1, I, 1, 1] (a parameter, zero at
    initialisation and trained with the rest).

    Exact: route_weights -> permute(1, 0, 2, 3); route_logits -> prior [I, J]; softmax over
    input capsules (its dim 2); squash without eps (squash_eps=0); num_iterations weighted
    sums. Its primary capsules: primary_caps_from_conv_list.
    """
    route_weights = _tensor(route_weights)
    out_caps, in_caps = route_weights.shape[:2]
    prior = None
    if route_logits is not None:
        prior = _tensor(route_logits).reshape(out_caps, in_caps).t()
    return dict(
        weight=route_weights.permute(1, 0, 2, 3),
        iterations=num_iterations,
        prior=prior,
        softmax_over="in_caps",
        squash_eps=0.0,
    )


def cezannec(W, routing_iterations: int = 3) -> dict[str, Any]:
    """cezannec/capsule_net_pytorch (Capsule_Network.ipynb): `DigitCaps.W` [J, I, N, M].

    Exact: W -> permute(1, 0, 2, 3); zero initial logits (not learned); softmax over input
    capsules (its dim 2); squash without eps (squash_eps=0); 3 weighted sums (its forward fixes
    routing_iterations=3). Its primary capsules: primary_caps_from_conv_list.
    """
    return dict(
        weight=_tensor(W).permute(1, 0, 2, 3),
        iterations=routing_iterations,
        softmax_over="in_caps",
        squash_eps=0.0,
    )


def xifengguo_pytorch(weight, routings: int = 3) -> dict[str, Any]:
    """XifengGuo/CapsNet-Pytorch (capsulelayers.py): `DenseCapsule.weight` [J, I, M, N].

    weight -> permute(1, 0, 3, 2); softmax over output capsules; u_hat detached in the inner
    iterations (detach_inner=True); `routings` weighted sums. NOT exact: its squash adds 1e-8 to
    the norm, |s|^2 / (1 + |s|^2) s / (|s| + 1e-8), which no squash_eps reproduces;
    squash_eps=0 is closest (relative difference about 1e-8 / |s|, 1e-6 at |s| = 0.01).
    """
    return dict(
        weight=_tensor(weight).permute(1, 0, 3, 2),
        iterations=routings,
        softmax_over="out_caps",
        detach_inner=True,
        squash_eps=0.0,
    )


def xifengguo_keras(W, routings: int = 3, *, before_2017_12_14: bool = False) -> dict[str, Any]:
    """XifengGuo/CapsNet-Keras (capsulelayers.py): `CapsuleLayer.W` [J, I, M, N] (a numpy
    array from get_weights() works).

    Exact: W -> permute(1, 0, 3, 2); softmax over output capsules; squash with Keras' epsilon
    1e-7 inside the square root (squash_eps=1e-7); `routings` weighted sums; today's code
    differentiates through every iteration. before_2017_12_14=True: the code before commit
    "remove gradient_stop" (2017-12-14), which stopped the gradient of u_hat in the inner
    iterations (detach_inner=True).
    """
    return dict(
        weight=_tensor(W).permute(1, 0, 3, 2),
        iterations=routings,
        softmax_over="out_caps",
        detach_inner=before_2017_12_14,
        squash_eps=1e-7,
    )


def sabour(weights, biases, num_routing: int = 3, leaky: bool = False) -> dict[str, Any]:
    """Sabour et al.'s official code (research/capsules/models/layers/layers.py, `capsule`
    and `_update_routing`): the layer's `weights` [I, N, J*M] (its votes are
    sum_n u[b, i, n] weights[i, n, j*M + m]), `biases` [J, M], its num_routing and leaky.

    Exact: weights -> view(I, N, J, M).permute(0, 2, 1, 3); biases added to s before every
    squash (bias=); leaky routing (one extra logit 0 next to the output capsules); softmax over
    output capsules; squash without eps (squash_eps=0); num_routing weighted sums.
    """
    biases = _tensor(biases)
    return dict(
        weight=_from_i_n_jm(weights, biases.shape[0]),
        iterations=num_routing,
        bias=biases,
        softmax_over="out_caps",
        leaky=leaky,
        squash_eps=0.0,
    )


def primary_caps_from_conv_list(weights: list, biases: list) -> tuple[torch.Tensor, torch.Tensor]:
    """gram-ai's and cezannec's primary capsules: a list of D convolutions with K output
    channels each (capsules[d] gives pose element d of K capsule channels), into the one
    convolution of PrimaryCaps(caps=K, dim=D): our output channel k * D + d is their
    capsules[d] channel k. Returns (conv weight [K*D, C, kh, kw], conv bias [K*D]).

    Exact together with squash_eps=0 (their squash has no eps): the capsule order (channel,
    row, column) is the same.
    """
    weight = torch.stack([_tensor(w) for w in weights], dim=1)
    bias = torch.stack([_tensor(b) for b in biases], dim=1)
    return weight.reshape(-1, *weight.shape[2:]), bias.reshape(-1)


def fused_router(args: dict[str, Any], backend: str = "auto") -> FusedRouter:
    """A FusedRouter computing the routing `args` describe (as returned by the functions
    above), with the mapped weight, prior and bias as its parameters (copies)."""
    weight = args["weight"]
    in_caps, out_caps, in_d, out_d = weight.shape
    prior, bias = args.get("prior"), args.get("bias")
    router = FusedRouter(
        in_caps,
        out_caps,
        in_d,
        out_d,
        args["iterations"],
        softmax_over=args.get("softmax_over", "out_caps"),
        learn_prior=prior is not None,
        learn_bias=bias is not None,
        detach_inner=args.get("detach_inner", False),
        leaky=args.get("leaky", False),
        squash_eps=args.get("squash_eps", SQUASH_EPS),
        backend=backend,
    ).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        router.weight.copy_(weight)
        if prior is not None:
            router.prior.copy_(prior)
        if bias is not None:
            router.bias.copy_(bias)
    return router
