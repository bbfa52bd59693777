"""Routing logits shared by the batch (issue 18): the reference, its documented backward, the
op contract, the modules, CLI and benchmark, and pyCapsNet's DigitCaps on every backend. The
fused backends' kernels against the float64 reference: tests/test_backends.py."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

import capsnet_fused.benchmark as bm
from capsnet_fused import FusedRouter, dynamic_routing, reference_routing
from capsnet_fused.checkpoint import load_checkpoint
from capsnet_fused.models import CapsNet
from capsnet_fused.ops import shared_logits_unavailable_reason, unavailable_reason
from capsnet_fused.reference import coupling_softmax, squash
from capsnet_fused.train import (
    TrainConfig,
    add_train_arguments,
    build_model,
    config_from_args,
    config_from_checkpoint,
    train,
)
from tests.helpers import Shape, make_inputs, rel_error
from tests.training_data import tiny_config, write_synthetic_dataset


def squash_backward(s, dv, eps):
    """dL/ds of v = squash(s) for dL/dv = dv, through autograd of the reference squash."""
    leaf = s.detach().clone().requires_grad_()
    return torch.autograd.grad(squash(leaf, eps=eps), leaf, dv)[0]


def documented_backward(u, weight, prior, bias, grad, iterations, *, softmax_over, detach_inner,
                        leaky, squash_eps, shared_logits):  # fmt: skip
    """The forward and backward recurrences of docs/ROUTING-MATH.md (shared logits), written
    out: returns (v, du, dW, dprior, dbias)."""
    batch, in_caps = u.shape[:2]
    out_caps, out_d = weight.shape[1], weight.shape[3]
    kappa = 1.0 / max(batch, 1) if shared_logits == "mean" else 1.0
    dim = 1 if softmax_over == "out_caps" else 0
    beta = bias if bias is not None else u.new_zeros(out_caps, out_d)
    u_hat = torch.einsum("bin,ijnm->bijm", u, weight)
    logits = prior.clone() if prior is not None else u.new_zeros(in_caps, out_caps)
    c, s, v = [], [], []
    for t in range(iterations):
        c.append(coupling_softmax(logits, dim, leaky))
        s.append(torch.einsum("ij,bijm->bjm", c[t], u_hat) + beta)
        v.append(squash(s[t], eps=squash_eps))
        if t < iterations - 1:
            logits = logits + kappa * torch.einsum("bijm,bjm->ij", u_hat, v[t])
    D = u.new_zeros(in_caps, out_caps)
    du_hat = torch.zeros_like(u_hat)
    dbias = u.new_zeros(out_caps, out_d)
    for t in reversed(range(iterations)):
        last = t == iterations - 1
        dv = (grad if last else 0) + kappa * torch.einsum("ij,bijm->bjm", D, u_hat)
        ds = squash_backward(s[t], dv, squash_eps)
        e = torch.einsum("bjm,bijm->ij", ds, u_hat)
        if softmax_over == "out_caps":
            dl = c[t] * (e - (c[t] * e).sum(1, keepdim=True))
        else:
            # sum_i c_ij e_ij = sum_b ds_bj . (s_bj - bias_j)
            dl = c[t] * (e - torch.einsum("bjm,bjm->j", ds, s[t] - beta))
        if last or not detach_inner:
            du_hat += c[t][None, :, :, None] * ds[:, None]
        if not detach_inner:
            du_hat += kappa * D[None, :, :, None] * v[t][:, None]
        D = D + dl
        dbias += ds.sum(0)
    du = torch.einsum("ijnm,bijm->bin", weight, du_hat)
    dweight = torch.einsum("bin,bijm->ijnm", u, du_hat)
    return v[-1], du, dweight, D, dbias


def leaves_of(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


DOC_CASES = [
    # (softmax_over, prior, bias, detach_inner, leaky, squash_eps, shared_logits, R, B)
    ("out_caps", False, False, False, False, 1e-8, "mean", 3, 3),
    ("in_caps", True, True, False, True, 0.0, "mean", 2, 4),
    ("out_caps", True, True, True, True, 0.05, "sum", 4, 3),
    ("in_caps", False, True, True, False, 1e-8, "sum", 3, 1),
    ("in_caps", True, False, False, False, 0.05, "sum", 1, 2),
    ("out_caps", True, False, False, True, 0.0, "mean", 3, 5),
]


@pytest.mark.parametrize("case", DOC_CASES, ids=lambda c: "-".join(map(str, c)))
def test_documented_backward_matches_autograd(case):
    softmax_over, with_prior, with_bias, detach_inner, leaky, eps, mode, R, B = case
    u, weight, prior, grad = make_inputs(Shape(B, 6, 3, 3, 4, R), with_prior)
    bias = 0.1 + 0.3 * torch.randn(3, 4, dtype=torch.float64) if with_bias else None
    options = dict(
        softmax_over=softmax_over, detach_inner=detach_inner, leaky=leaky, squash_eps=eps,
        shared_logits=mode,
    )  # fmt: skip
    leaves = leaves_of(u, weight, prior, bias)
    v = reference_routing(leaves[0], leaves[1], R, prior=leaves[2], bias=leaves[3], **options)
    wrt = [t for t in leaves if t is not None]
    autograd = list(torch.autograd.grad(v, wrt, grad))
    v_doc, *doc = documented_backward(u, weight, prior, bias, grad, R, **options)
    doc = [g for g, t in zip(doc, (u, weight, prior, bias), strict=True) if t is not None]
    torch.testing.assert_close(v, v_doc, rtol=1e-12, atol=1e-14)
    for got, want in zip(autograd, doc, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("mode", ["mean", "sum"])
@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_one_sample_is_the_per_sample_routing(softmax_over, mode):
    # With B = 1 the batch mean and sum of the agreements are the sample's own: the shared
    # logits are its logits, values and gradients alike.
    u, weight, prior, grad = make_inputs(Shape(1, 9, 4, 3, 5, 3), True)
    bias = 0.1 + 0.3 * torch.randn(4, 5, dtype=torch.float64)
    results = []
    for shared in (None, mode):
        leaves = leaves_of(u, weight, prior, bias)
        v = reference_routing(
            leaves[0], leaves[1], 3, prior=leaves[2], bias=leaves[3], softmax_over=softmax_over,
            leaky=True, shared_logits=shared,
        )  # fmt: skip
        results.append([v, *torch.autograd.grad(v, leaves, grad)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_output_depends_on_the_rest_of_the_batch(mode):
    u, weight, _, _ = make_inputs(Shape(4, 9, 4, 3, 5, 3), False)
    whole = reference_routing(u, weight, 3, shared_logits=mode)
    other = u.clone()
    other[1:] = other[1:].flip(-1)
    changed = reference_routing(other, weight, 3, shared_logits=mode)
    # Sample 0 is the same in both batches; its output is not.
    assert (whole[0] - changed[0]).abs().max() > 1e-4
    alone = reference_routing(u[:1], weight, 3, shared_logits=mode)
    assert (whole[0] - alone[0]).abs().max() > 1e-4
    # One iteration has no logit update: nothing is shared yet.
    torch.testing.assert_close(
        reference_routing(u, weight, 1, shared_logits=mode)[0],
        reference_routing(u[:1], weight, 1)[0],
        rtol=1e-14,
        atol=0,
    )


def test_mean_and_sum_differ_only_with_several_samples():
    u, weight, _, _ = make_inputs(Shape(3, 9, 4, 3, 5, 2), False)
    mean = reference_routing(u, weight, 2, shared_logits="mean")
    total = reference_routing(u, weight, 2, shared_logits="sum")
    assert (mean - total).abs().max() > 1e-4
    torch.testing.assert_close(
        reference_routing(u[:1], weight, 2, shared_logits="mean"),
        reference_routing(u[:1], weight, 2, shared_logits="sum"),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_empty_batch(mode):
    u, weight, prior, grad = make_inputs(Shape(0, 7, 3, 2, 4, 3), True)
    leaves = leaves_of(u, weight, prior)
    v = reference_routing(leaves[0], leaves[1], 3, prior=leaves[2], shared_logits=mode)
    assert v.shape == (0, 3, 4)
    du, dweight, dprior = torch.autograd.grad(v, leaves, grad)
    assert du.shape == (0, 7, 2)
    assert torch.equal(dweight, torch.zeros_like(weight))
    assert torch.equal(dprior, torch.zeros_like(prior))


@pytest.mark.parametrize("bad", ["Mean", "batch", "", 1, True, ("mean",)])
def test_shared_logits_is_validated(bad):
    u, weight, _, _ = make_inputs(Shape(2, 5, 3, 2, 4, 2), False)
    for fn in (reference_routing, dynamic_routing):
        with pytest.raises(ValueError, match="shared_logits"):
            fn(u, weight, 2, shared_logits=bad)


def test_meta_tensors_give_the_shape():
    u = torch.empty(5, 7, 3, device="meta")
    weight = torch.empty(7, 4, 3, 6, device="meta")
    v = dynamic_routing(u, weight, 3, shared_logits="mean")
    assert v.device.type == "meta" and v.shape == (5, 4, 6)


def test_a_backend_without_the_kernels_refuses(monkeypatch):
    # A backend module without shared_routing (the Triton one before its kernels landed) makes
    # the op's validation refuse, naming the backend, instead of routing per sample or falling
    # back.
    if unavailable_reason("triton", "cpu") is not None:
        pytest.skip(f"the triton backend cannot run here: {unavailable_reason('triton', 'cpu')}")
    from capsnet_fused import ops

    module = ops._backend_module("triton")
    monkeypatch.delattr(module, "shared_routing")
    reason = shared_logits_unavailable_reason("triton", "cpu")
    assert reason is not None and "not implemented in the triton backend yet" in reason
    assert shared_logits_unavailable_reason("reference", "cpu") is None
    u, weight, _, _ = make_inputs(Shape(2, 5, 3, 2, 4, 2), False)
    with pytest.raises(NotImplementedError, match="not implemented in the triton backend yet"):
        dynamic_routing(u, weight, 2, shared_logits="mean", backend="triton")


def test_op_contract_shapes_on_meta_tensors():
    # The fakes of the cpp pair (the Triton pair follows the same contract): v [B, J, M] in the
    # input dtype; s and v_iter [B, R, J, M] and the couplings [R, I, J] in the state dtype
    # (float32 for half inputs); gradients shaped as their inputs, [0] when not asked for.
    pytest.importorskip("capsnet_fused._C")
    ops = torch.ops.capsnet_fused
    u = torch.empty(5, 7, 3, device="meta", dtype=torch.float16)
    weight = torch.empty(7, 4, 3, 6, device="meta", dtype=torch.float16)
    bias = torch.empty(4, 6, device="meta", dtype=torch.float16)
    flags = (3, True, False, True, 0.0, True)
    v, s, v_iter, c = ops.cpp_shared_routing_fwd(u, weight, None, bias, *flags)
    assert v.shape == (5, 4, 6) and v.dtype == torch.float16
    assert s.shape == v_iter.shape == (5, 3, 4, 6) and c.shape == (3, 7, 4)
    assert s.dtype == v_iter.dtype == c.dtype == torch.float32
    grads = ops.cpp_shared_routing_bwd(
        v, u, weight, None, bias, s, v_iter, c, *flags, True, False, True, True
    )
    assert [tuple(g.shape) for g in grads] == [(5, 7, 3), (0,), (0,), (4, 6)]


# ---------------------------------------------------------------- modules, CLI, benchmark


def test_router_and_capsnet_pass_shared_logits():
    router = FusedRouter(12, 3, 4, 5, shared_logits="mean", learn_prior=True, backend="reference")
    assert "shared_logits='mean'" in repr(router)
    with torch.no_grad():
        router.prior.normal_()
    u = torch.randn(3, 12, 4)
    want = reference_routing(u, router.weight, 3, prior=router.prior, shared_logits="mean")
    torch.testing.assert_close(router(u), want, rtol=0, atol=0)
    assert FusedRouter(12, 3, 4, 5).shared_logits is None
    with pytest.raises(ValueError, match="shared_logits"):
        FusedRouter(12, 3, 4, 5, shared_logits="max")
    model = CapsNet(1, 20, 4, conv_channels=8, primary_caps=2, shared_logits="sum")
    assert model.digit.shared_logits == "sum"


def test_train_flag_config_and_old_checkpoints(tmp_path):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    config, given = config_from_args(parser.parse_args(["--shared-logits", "mean"]))
    assert given == {"shared_logits": "mean"}
    assert build_model(config, (1, 28, 28)).digit.shared_logits == "mean"
    assert config_from_args(parser.parse_args([]))[0].shared_logits is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--shared-logits", "max"])
    with pytest.raises(ValueError, match="shared_logits must be"):
        TrainConfig(shared_logits="max").validate()
    # Checkpoints written before the setting existed routed with logits per sample.
    state = {"config": dataclasses.asdict(TrainConfig())}
    del state["config"]["shared_logits"]
    assert config_from_checkpoint(state, "old.pt").shared_logits is None


def test_training_records_shared_logits_and_resumes_with_it(tmp_path):
    data_dir = write_synthetic_dataset(tmp_path / "data")
    out = tmp_path / "run"
    config = tiny_config(data_dir, out, epochs=1, limit_train=32, shared_logits="mean")
    train(config, log=lambda *_: None)
    assert json.loads((out / "config.json").read_text())["shared_logits"] == "mean"
    state = load_checkpoint(out)
    assert config_from_checkpoint(state, out).shared_logits == "mean"


def test_benchmark_variants_accept_shared_logits():
    variant = bm.parse_variant("in_caps-prior-shared_sum")
    assert variant == bm.Variant("in_caps", True, False, "sum")
    assert variant.id == "in_caps-prior-shared_sum"
    assert bm.parse_variant(bm.Variant("out_caps", False, True, "mean").id).shared_logits == "mean"
    for bad in ("out_caps-shared_max", "out_caps-shared_mean-shared_sum"):
        with pytest.raises(ValueError, match="unknown variant"):
            bm.parse_variant(bad)
    config = bm.BenchConfig(
        shapes=("24x3x2x5",), batches=(3,), iterations=(2,), backends=("reference", "cpp"),
        variants=(variant,), repeats=1, memory=False, min_measure_s=0.0,
    )  # fmt: skip
    rows = bm.run_routing_benchmark(config)
    assert {r["variant"] for r in rows} == {"in_caps-prior-shared_sum"}
    assert {r["shared_logits"] for r in rows} == {"sum"}
    cpp = [r for r in rows if r["backend"] == "cpp"]
    if unavailable_reason("cpp", "cpu") is None:
        assert cpp and all(r["status"] == "ok" for r in cpp), cpp


# ---------------------------------------------------------------- the fused backends
# Their kernels with shared logits against the float64 reference (every combination of the
# options), gradcheck, opcheck, compile and the edge cases: tests/test_backends.py.


def cpp_available() -> bool:
    return unavailable_reason("cpp", "cpu") is None


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels must write starts as NaN (read by csrc/routing_common.h)."""
    monkeypatch.setenv("CAPSNET_FUSED_POISON_OUTPUTS", "1")


# ---------------------------------------------------------------- pyCapsNet


def pycapsnet_digitcaps(x, W, route_iter: int = 2, squash_axis: int = -1):
    """The forward of pyCapsNet's NumPy (and CuPy) DigitCaps (haofengac/pyCapsNet, formerly
    xanderchf/pyCapsNet: numpy/modules.py, cupy/modules.py), our transcription of its math in
    torch, in its layouts: W [1, I, J, M, N], x [B, I, N] -> v [B, J, M]. Its tensors keep
    trailing singleton axes: u_hat [B, I, J, M, 1], logits b [1, I, J, 1, 1] starting at 0.
    Per iteration: c = softmax(b) over the input capsules, s = sum_i c u_hat, v = squash(s)
    without eps, then (not after the last) b += the batch mean of u_hat . v.

    squash_axis=-1 is theirs: its sum of squares runs over the trailing axis of size 1, so
    each of the M pose components is squashed alone (v_m = |s_m| s_m / (1 + s_m^2)); -2
    squashes the capsule as in the paper.
    """
    u_hat = W @ x[:, :, None, :, None]
    b = x.new_zeros(1, W.shape[1], W.shape[2], 1, 1)
    for r in range(route_iter):
        e = torch.exp(b)
        c = e / e.sum(dim=1, keepdim=True)
        s = (c * u_hat).sum(dim=1, keepdim=True)
        norm2 = (s**2).sum(dim=squash_axis, keepdim=True)
        v = torch.sqrt(norm2) / (1.0 + norm2) * s
        if r == route_iter - 1:
            return v[:, 0, :, :, 0]
        agreement = u_hat.transpose(-1, -2) @ v
        b = b + agreement.mean(dim=0, keepdim=True)
    raise AssertionError("route_iter must be >= 1")


def pycapsnet_inputs(M: int, seed: int = 0):
    """x [3, 1152, 8] squashed (primary capsules) and W [1, 1152, 10, M, 8] at its init
    (np.random.randn), float64."""
    gen = torch.Generator().manual_seed(seed)
    x = squash(torch.randn(3, 1152, 8, generator=gen, dtype=torch.float64), eps=0.0)
    return x, torch.randn(1, 1152, 10, M, 8, generator=gen, dtype=torch.float64)


# iterations=2, softmax over the input capsules, the batch mean, the eps-free squash; their
# W [1, I, J, M, N] is our weight [I, J, N, M] transposed.
PYCAPSNET_CALL = dict(iterations=2, softmax_over="in_caps", shared_logits="mean", squash_eps=0.0)


def pycapsnet_backends():
    return (
        ["reference"]
        + (["cpp"] if cpp_available() else [])
        + (["triton"] if unavailable_reason("triton", "cpu") is None else [])
    )


@pytest.mark.parametrize("backend", pycapsnet_backends())
@pytest.mark.parametrize("M", [1, 16])
def test_pycapsnet_digitcaps_is_the_documented_call(backend, M):
    # With the squash over the capsule (M = 1: theirs as published, where a component is the
    # capsule; M = 16: their routing with the paper's squash), output and gradients to 1e-12.
    x, W = pycapsnet_inputs(M)
    grad = torch.randn(3, 10, M, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    leaves = leaves_of(x, W)
    want = pycapsnet_digitcaps(*leaves, squash_axis=-1 if M == 1 else -2)
    want_grads = torch.autograd.grad(want, leaves, grad)
    ours = leaves_of(x, W)
    got = dynamic_routing(ours[0], ours[1][0].permute(0, 1, 3, 2), **PYCAPSNET_CALL,
                          backend=backend)  # fmt: skip
    got_grads = torch.autograd.grad(got, ours, grad)
    assert rel_error(got, want) < 1e-12
    for g, w in zip(got_grads, want_grads, strict=True):
        assert rel_error(g, w) < 1e-12


def test_pycapsnet_componentwise_squash_is_not_reproduced():
    # pyCapsNet's DigitCaps as published squashes each of the 16 components separately (as
    # jindongwang/Pytorch-CapsuleNet's does, its issue 21); no option of ours does that, and
    # the outputs differ completely: the README says so.
    x, W = pycapsnet_inputs(16)
    theirs = pycapsnet_digitcaps(x, W, squash_axis=-1)
    ours = dynamic_routing(x, W[0].permute(0, 1, 3, 2), **PYCAPSNET_CALL, backend="reference")
    assert rel_error(ours, theirs) > 0.5


@pytest.mark.parametrize("backend", pycapsnet_backends())
def test_pycapsnet_pytorch_digitcaps_with_pose_components_as_capsules(backend):
    # pyCapsNet's PyTorch DigitCaps returns after the first weighted sum (iterations=1; there
    # the shared logits do not matter) and squashes component-wise too. Its pose components as
    # J M capsules of size 1 (weight W[0] [I, J, M, N] as [I, J M, N, 1]) reproduce it exactly.
    x, W = pycapsnet_inputs(16)
    grad = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    leaves = leaves_of(x, W)
    want = pycapsnet_digitcaps(*leaves, route_iter=1, squash_axis=-1)
    want_grads = torch.autograd.grad(want, leaves, grad)
    ours = leaves_of(x, W)
    weight = ours[1][0].reshape(1152, 160, 8, 1)
    got = dynamic_routing(ours[0], weight, 1, softmax_over="in_caps", squash_eps=0.0,
                          shared_logits="mean", backend=backend).reshape(3, 10, 16)  # fmt: skip
    got_grads = torch.autograd.grad(got, ours, grad)
    assert rel_error(got, want) < 1e-12
    for g, w in zip(got_grads, want_grads, strict=True):
        assert rel_error(g, w) < 1e-12
