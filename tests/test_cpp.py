"""The cpp backend (capsnet_fused._C) against the float64 reference: every shape and variant."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

try:
    import capsnet_fused._C
except ImportError as exc:
    pytest.skip(
        f"capsnet_fused._C is not built ({exc}); build it with "
        "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`",
        allow_module_level=True,
    )

from capsnet_fused import FusedRouter, choose_backend, dynamic_routing, reference_routing
from capsnet_fused.backends import cpp as cpp_op
from capsnet_fused.models import CapsNet
from capsnet_fused.ops import available_backends
from capsnet_fused.reference import SQUASH_EPS
from tests.helpers import (
    OPTION_CASES,
    SHAPES,
    VARIANTS,
    Options,
    Shape,
    assert_matches_reference,
    make_bias,
    make_inputs,
    option_case_params,
    reference64,
    rel_error,
    run_with_grads,
    variant_params,
)

OPS = torch.ops.capsnet_fused


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels must write starts as NaN (read by csrc/routing_common.h)."""
    monkeypatch.setenv("CAPSNET_FUSED_POISON_OUTPUTS", "1")


def cpp_routing(u, weight, prior=None, **kwargs):
    return dynamic_routing(u, weight, prior=prior, backend="cpp", **kwargs)


def routing_kwargs(shape: Shape, variant, options: Options | None = None) -> dict:
    softmax_over, detach_inner = variant.softmax_over, variant.detach_inner
    kwargs = dict(iterations=shape.R, softmax_over=softmax_over, detach_inner=detach_inner)
    return kwargs if options is None else {**kwargs, **options.kwargs()}


def check_options(shape, variant, options, dtype, tol, device="cpu"):
    u, weight, prior, grad = make_inputs(shape, variant.prior, dtype=dtype, device=device)
    bias = make_bias(shape, options, dtype=dtype, device=device)
    kwargs = routing_kwargs(shape, variant, options)
    out = run_with_grads(cpp_routing, u, weight, prior, grad, bias=bias, **kwargs)
    assert out[0].dtype == dtype
    assert_matches_reference(out, reference64(u, weight, prior, grad, bias=bias, **kwargs), tol)


# Batches that fill several sample vectors (8 float32 / 4 float64 lanes), groups of two
# vectors, several backward chunks (32 float32 / 16 float64 samples) and a ragged last vector;
# pose sizes of one, two and four vectors and a size that is none of those.
BATCH_SHAPES = [
    Shape(77, 13, 5, 4, 16, 3),
    Shape(45, 9, 3, 3, 8, 2),
    Shape(33, 6, 4, 5, 32, 1),
    Shape(20, 5, 2, 2, 7, 4),
]
CPP_SHAPES = SHAPES + BATCH_SHAPES


# CAPSNET_FUSED_CPU_ISA values and the kernel clones they force (csrc/routing_cpu.cpp).
CLONES = {"generic": "default", "avx2": "x86-64-v3", "avx512": "x86-64-v4"}


def kernel_info() -> dict:
    return json.loads(OPS.cpp_kernel_info())


def require_clone(isa: str, monkeypatch) -> None:
    """Skip unless this build has the clone that CAPSNET_FUSED_CPU_ISA=isa forces and the CPU
    runs it; then force it for the rest of the test."""
    monkeypatch.delenv("CAPSNET_FUSED_CPU_ISA", raising=False)
    info, clone = kernel_info(), CLONES[isa]
    if clone not in info["clones_built"]:
        pytest.skip(f"this build of capsnet_fused._C has no {clone} clone ({info['clones_built']})")
    if clone not in info["clones_cpu_runs"]:
        needs = "avx512f/bw/cd/dq/vl" if isa == "avx512" else "avx2/fma/bmi2"
        pytest.skip(f"this CPU cannot run the {clone} clone (it needs {needs})")
    monkeypatch.setenv("CAPSNET_FUSED_CPU_ISA", isa)


# The float64 reference of each (shape, variant, options, dtype) case, computed once for all
# the clones and u_hat paths that are compared with it.
_REFERENCES: dict = {}


def reference_case(shape: Shape, variant, dtype, options: Options | None = None):
    key = (shape, variant, dtype, options)
    if key not in _REFERENCES:
        u, weight, prior, grad = make_inputs(shape, variant.prior, dtype=dtype)
        bias = None if options is None else make_bias(shape, options, dtype=dtype)
        kwargs = routing_kwargs(shape, variant, options)
        want = reference64(u, weight, prior, grad, bias=bias, **kwargs)
        _REFERENCES[key] = (u, weight, prior, grad, bias), want
    return _REFERENCES[key]


# Every clone of the kernels (forced; the ones the CPU cannot run skip) with u_hat recomputed
# in every sweep and cached across sweeps (forced; "auto" picks one of the two by size).
@pytest.mark.parametrize("shape", CPP_SHAPES, ids=[s.id for s in CPP_SHAPES])
@variant_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("uhat_cache", ["off", "on"], ids=["recompute", "cached"])
@pytest.mark.parametrize("isa", list(CLONES))
def test_matches_reference(shape, variant, dtype, uhat_cache, isa, monkeypatch):
    require_clone(isa, monkeypatch)
    monkeypatch.setenv("CAPSNET_FUSED_UHAT_CACHE", uhat_cache)
    (u, weight, prior, grad, _), want = reference_case(shape, variant, dtype)
    out = run_with_grads(cpp_routing, u, weight, prior, grad, **routing_kwargs(shape, variant))
    assert out[0].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    assert_matches_reference(out, want, tol)


# The options of issue 15 with the variants (OPTION_CASES), in every clone the CPU runs and on
# both u_hat paths: an odd shape (r = 4), one with several sample vectors and a ragged last one
# (r = 3), and one with a single iteration and pose vectors of four 32-byte vectors.
OPTION_SHAPES = [SHAPES[3], BATCH_SHAPES[0], BATCH_SHAPES[2]]


@pytest.mark.parametrize("shape", OPTION_SHAPES, ids=[s.id for s in OPTION_SHAPES])
@option_case_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("uhat_cache", ["off", "on"], ids=["recompute", "cached"])
@pytest.mark.parametrize("isa", list(CLONES))
def test_options_match_reference(shape, variant, options, dtype, uhat_cache, isa, monkeypatch):
    require_clone(isa, monkeypatch)
    monkeypatch.setenv("CAPSNET_FUSED_UHAT_CACHE", uhat_cache)
    (u, weight, prior, grad, bias), want = reference_case(shape, variant, dtype, options)
    kwargs = routing_kwargs(shape, variant, options)
    out = run_with_grads(cpp_routing, u, weight, prior, grad, bias=bias, **kwargs)
    assert out[0].dtype == dtype
    assert_matches_reference(out, want, 1e-5 if dtype == torch.float32 else 1e-11)


GRADCHECK_VARIANTS = [v for v in VARIANTS if not v.detach_inner]
GRADCHECK_SHAPES = [Shape(2, 6, 3, 3, 4, 3), Shape(1, 4, 2, 2, 16, 2)]


@pytest.mark.parametrize("variant", GRADCHECK_VARIANTS, ids=[v.id for v in GRADCHECK_VARIANTS])
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=[s.id for s in GRADCHECK_SHAPES])
def test_gradcheck(shape, variant):
    u, weight, prior, _ = make_inputs(shape, variant.prior)
    inputs = [t.requires_grad_() for t in (u, weight)]
    if prior is not None:
        inputs.append(prior.requires_grad_())
    kwargs = routing_kwargs(shape, variant)

    def fn(u, weight, prior=None):
        return cpp_routing(u, weight, prior, **kwargs)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("squash_eps", [0.0, 0.05])
@pytest.mark.parametrize("variant", GRADCHECK_VARIANTS, ids=[v.id for v in GRADCHECK_VARIANTS])
def test_gradcheck_options(variant, squash_eps):
    shape = GRADCHECK_SHAPES[0]
    u, weight, prior, _ = make_inputs(shape, variant.prior)
    bias = make_bias(shape, Options(bias=True))
    inputs = [t.requires_grad_() for t in (u, weight, bias, prior) if t is not None]
    kwargs = routing_kwargs(shape, variant, Options(leaky=True, squash_eps=squash_eps))

    def fn(u, weight, bias, prior=None):
        return cpp_routing(u, weight, prior, bias=bias, **kwargs)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("with_prior", [False, True], ids=["noprior", "prior"])
@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_detach_inner_matches_reference_autograd(softmax_over, with_prior):
    # detach_inner's gradient is by definition not the derivative, so gradcheck does not apply:
    # compare against autograd through the reference, which detaches the same way.
    shape = Shape(3, 11, 4, 3, 5, 4)
    u, weight, prior, grad = make_inputs(shape, with_prior)
    kwargs = dict(iterations=shape.R, softmax_over=softmax_over, detach_inner=True)
    out = run_with_grads(cpp_routing, u, weight, prior, grad, **kwargs)
    ref = run_with_grads(reference_routing, u, weight, prior, grad, **kwargs)
    assert_matches_reference(out, ref, 1e-12)


def check_opcheck(variant, options: Options, device="cpu"):
    shape = Shape(2, 5, 3, 2, 4, 2)
    softmax_over, with_prior = variant.softmax_over, variant.prior
    detach_inner = variant.detach_inner
    u, weight, prior, grad = make_inputs(shape, with_prior, device=device)
    bias = make_bias(shape, options, device=device)
    detached = (u, weight, prior, bias)
    leaves = [None if t is None else t.clone().requires_grad_() for t in detached]
    flags = (shape.R, softmax_over == "in_caps", detach_inner, options.leaky, options.squash_eps)
    # Called bare first: opcheck would wrap an exception of the op in its own.
    _, s, V, lse = OPS.cpp_routing_fwd(*detached, *flags)
    torch.library.opcheck(OPS.cpp_routing_fwd, (*leaves, *flags))
    needs = (True, True, with_prior, options.bias)
    torch.library.opcheck(OPS.cpp_routing_bwd, (grad, *detached, s, V, lse, *flags, *needs))


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.id for v in VARIANTS])
def test_opcheck(variant):
    check_opcheck(variant, Options())


@pytest.mark.parametrize("variant", VARIANTS[::3], ids=[v.id for v in VARIANTS[::3]])
def test_opcheck_options(variant):
    check_opcheck(variant, Options(bias=True, leaky=True, squash_eps=0.0))


def test_gradients_only_for_inputs_that_need_them():
    shape = Shape(2, 9, 4, 3, 5, 3)
    u, weight, prior, grad = make_inputs(shape, True)
    ref = reference64(u, weight, prior, grad, iterations=3)
    w_leaf = weight.clone().requires_grad_()
    v = cpp_routing(u, w_leaf, prior, iterations=3)
    (d_weight,) = torch.autograd.grad(v, [w_leaf], grad)
    assert rel_error(d_weight, ref[1][1]) < 1e-11
    # The op returns [0]-shaped placeholders for gradients it was not asked for.
    flags = (3, False, False, False, SQUASH_EPS)
    _, s, V, lse = OPS.cpp_routing_fwd(u, weight, prior, None, *flags)
    du, dw, dp, db = OPS.cpp_routing_bwd(grad, u, weight, prior, None, s, V, lse, *flags,
                                         False, True, False, True)  # fmt: skip
    assert du.shape == (0,) and dp.shape == (0,) and dw.shape == weight.shape
    # No bias: no bias gradient, even when asked for.
    assert db.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS[::3], ids=[v.id for v in VARIANTS[::3]])
def test_half_precision_within_twice_reference_drift(dtype, variant):
    shape = Shape(2, 37, 10, 8, 16, 3)
    u, weight, prior, grad = make_inputs(shape, variant.prior)
    kwargs = routing_kwargs(shape, variant)
    exact = reference64(u, weight, prior, grad, **kwargs)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    out = run_with_grads(cpp_routing, cast(u), cast(weight), cast(prior), grad, **kwargs)
    drift = run_with_grads(reference_routing, cast(u), cast(weight), cast(prior), grad, **kwargs)
    assert out[0].dtype == dtype
    triples = zip([out[0], *out[1]], [drift[0], *drift[1]], [exact[0], *exact[1]], strict=True)
    for got, ref_lowp, want in triples:
        if want is None:
            continue
        assert got.dtype == dtype
        budget = max(2 * rel_error(ref_lowp, want), 1e-2 if dtype == torch.bfloat16 else 2e-3)
        assert rel_error(got, want) <= budget


def test_non_contiguous_inputs():
    shape = Shape(3, 13, 4, 3, 6, 3)
    u, weight, prior, grad = make_inputs(shape, True)
    # Same values, strided storage: transposed copies transposed back.
    u_nc = u.transpose(1, 2).contiguous().transpose(1, 2)
    w_nc = weight.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    p_nc = prior.t().contiguous().t()
    assert not (u_nc.is_contiguous() or w_nc.is_contiguous() or p_nc.is_contiguous())
    kwargs = dict(iterations=3, softmax_over="in_caps")
    out = run_with_grads(cpp_routing, u_nc, w_nc, p_nc, grad, **kwargs)
    assert_matches_reference(out, reference64(u, weight, prior, grad, **kwargs), 1e-11)


@pytest.mark.parametrize("variant", VARIANTS[::2], ids=[v.id for v in VARIANTS[::2]])
def test_empty_batch(variant):
    shape = Shape(0, 7, 3, 2, 4, 2)
    u, weight, prior, grad = make_inputs(shape, variant.prior)
    out = run_with_grads(cpp_routing, u, weight, prior, grad, **routing_kwargs(shape, variant))
    assert out[0].shape == (0, 3, 4)
    assert out[1][0].shape == (0, 7, 2)
    # No samples: the gradients to the parameters are zero, not unwritten memory.
    assert torch.equal(out[1][1], torch.zeros_like(weight))
    if prior is not None:
        assert torch.equal(out[1][2], torch.zeros_like(prior))


@pytest.mark.parametrize("variant", VARIANTS[::2], ids=[v.id for v in VARIANTS[::2]])
def test_empty_batch_with_bias(variant):
    shape = Shape(0, 7, 3, 2, 4, 2)
    options = Options(bias=True, leaky=True)
    u, weight, prior, grad = make_inputs(shape, variant.prior)
    bias = make_bias(shape, options)
    kwargs = routing_kwargs(shape, variant, options)
    out = run_with_grads(cpp_routing, u, weight, prior, grad, bias=bias, **kwargs)
    assert out[0].shape == (0, 3, 4)
    assert torch.equal(out[1][3], torch.zeros_like(bias))


@pytest.mark.parametrize(
    "squash_eps",
    [SQUASH_EPS, 0.0],
    ids=["eps1e-8", "eps0"],
)
@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_zero_capsule_squash_eps(softmax_over, squash_eps):
    # u = 0 gives s = 0 in every iteration: v = 0 and zero gradients for eps > 0, NaN (value
    # and gradients) for the eps-free squash, as the reference defines.
    shape = Shape(9, 5, 3, 2, 4, 2)
    u, weight, prior, grad = make_inputs(shape, True)
    u = torch.zeros_like(u)
    kwargs = dict(iterations=2, softmax_over=softmax_over, squash_eps=squash_eps)
    v, grads = run_with_grads(cpp_routing, u, weight, prior, grad, **kwargs)
    ref_v, ref_grads = reference64(u, weight, prior, grad, **kwargs)
    for got, want in zip([v, *grads], [ref_v, *ref_grads], strict=True):
        if squash_eps == 0.0:
            assert torch.isnan(want).all() and torch.isnan(got).all()
        else:
            torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_many_iterations(softmax_over):
    shape = Shape(2, 21, 5, 4, 8, 10)
    u, weight, prior, grad = make_inputs(shape, True, dtype=torch.float32)
    kwargs = dict(iterations=10, softmax_over=softmax_over)
    out = run_with_grads(cpp_routing, u, weight, prior, grad, **kwargs)
    assert_matches_reference(out, reference64(u, weight, prior, grad, **kwargs), 1e-5)


@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_large_inputs_stay_finite(softmax_over):
    # Logits in the thousands: a softmax without max subtraction overflows to inf / NaN.
    shape = Shape(2, 30, 6, 4, 8, 3)
    u, weight, prior, grad = make_inputs(shape, True, dtype=torch.float32)
    u, prior = 30 * u, 1000 * prior
    kwargs = dict(iterations=3, softmax_over=softmax_over)
    v, grads = run_with_grads(cpp_routing, u, weight, prior, grad, **kwargs)
    assert torch.isfinite(v).all() and all(torch.isfinite(g).all() for g in grads)
    ref_v, _ = reference64(u, weight, prior, grad, **kwargs)
    assert rel_error(v, ref_v) < 1e-4


def test_dynamic_routing_router_and_auto_choice():
    shape = Shape(2, 12, 4, 3, 5, 3)
    u, weight, _, _ = make_inputs(shape, False, dtype=torch.float32)
    assert "cpp" in available_backends("cpu")
    assert choose_backend("cpu", torch.float32) == "cpp"
    ref = reference_routing(u, weight, 3)
    assert rel_error(dynamic_routing(u, weight, 3), ref) < 1e-5
    router = FusedRouter(12, 4, 3, 5, 3, softmax_over="in_caps", learn_prior=True, backend="cpp")
    with torch.no_grad():
        router.prior.normal_()
    out = router(u)
    out.square().sum().backward()
    want = reference_routing(u, router.weight, 3, prior=router.prior, softmax_over="in_caps")
    assert rel_error(out, want) < 1e-5
    assert router.weight.grad is not None and router.prior.grad is not None


def test_unavailable_reason_contract():
    assert cpp_op.unavailable_reason(torch.device("cpu"), torch.float32) is None
    assert cpp_op.unavailable_reason(torch.device("cpu"), torch.bfloat16) is None
    assert "float32" in cpp_op.unavailable_reason(torch.device("cpu"), torch.int32)
    assert "meta" in cpp_op.unavailable_reason(torch.device("meta"), torch.float32)
    has_cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key(
        "capsnet_fused::cpp_routing_fwd", "CUDA"
    )
    cuda_reason = cpp_op.unavailable_reason(torch.device("cuda"), torch.float32)
    assert (cuda_reason is None) == has_cuda_kernels


def test_torch_compile_capsnet_fullgraph():
    torch.manual_seed(0)
    model = CapsNet(1, 20, 4, conv_channels=8, primary_caps=2, backend="cpp")
    images = torch.rand(2, 1, 20, 20)
    labels = torch.tensor([1, 3])
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(images, labels)
    want = model(images, labels)
    torch.testing.assert_close(out.caps, want.caps)
    out.caps.sum().backward()
    compiled_grad = model.digit.weight.grad.clone()
    model.zero_grad()
    want.caps.sum().backward()
    torch.testing.assert_close(compiled_grad, model.digit.weight.grad)


THREAD_OPTIONS = [Options(), Options(bias=True, leaky=True, squash_eps=0.05)]


@pytest.mark.parametrize("options", THREAD_OPTIONS, ids=[o.id for o in THREAD_OPTIONS])
@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
@pytest.mark.parametrize("uhat_cache", ["off", "on"], ids=["recompute", "cached"])
def test_threads_do_not_change_results(uhat_cache, softmax_over, options, monkeypatch):
    monkeypatch.setenv("CAPSNET_FUSED_UHAT_CACHE", uhat_cache)
    shape = Shape(70, 40, 5, 4, 16, 3)
    u, weight, prior, grad = make_inputs(shape, True, dtype=torch.float32)
    bias = make_bias(shape, options, dtype=torch.float32)
    kwargs = dict(iterations=3, softmax_over=softmax_over, **options.kwargs())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_with_grads(cpp_routing, u, weight, prior, grad, bias=bias, **kwargs)
        torch.set_num_threads(max(threads, 2))
        multi = run_with_grads(cpp_routing, u, weight, prior, grad, bias=bias, **kwargs)
    finally:
        torch.set_num_threads(threads)
    # Each output element is computed by one thread in a fixed order: bitwise equal.
    for a, b in zip([single[0], *single[1]], [multi[0], *multi[1]], strict=True):
        assert torch.equal(a, b)


def test_cuda_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if cpp_op.unavailable_reason(torch.device("cuda"), torch.float32) is not None:
        pytest.skip("capsnet_fused._C was built without CUDA kernels")
    for shape in [Shape(2, 37, 10, 8, 16, 3), Shape(3, 19, 3, 3, 5, 4)]:
        for variant in VARIANTS:
            u, weight, prior, grad = make_inputs(shape, variant.prior, device="cuda")
            kwargs = routing_kwargs(shape, variant)
            out = run_with_grads(cpp_routing, u, weight, prior, grad, **kwargs)
            assert_matches_reference(out, reference64(u, weight, prior, grad, **kwargs), 1e-11)
        # The options of issue 15 (the CUDA kernels have them; tests/test_cuda_emulated.py
        # checks every case on the CPU).
        for variant, options in OPTION_CASES:
            for dtype, tol in ((torch.float64, 1e-11), (torch.float32, 1e-5)):
                check_options(shape, variant, options, dtype, tol, device="cuda")


def test_flush_to_zero_is_restored_after_the_kernels():
    # The kernels flush float32 denormals to zero while they run (csrc/routing_cpu.cpp) and
    # must hand the thread back in its previous floating-point mode.
    u, weight, prior, grad = make_inputs(Shape(9, 7, 3, 4, 16, 2), True, dtype=torch.float32)
    run_with_grads(cpp_routing, u, weight, prior, grad, iterations=2)
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert (tiny * 1.5).item() != 0.0


def test_kernel_info_reports_clone_l2_and_uhat_cache(monkeypatch):
    monkeypatch.delenv("CAPSNET_FUSED_CPU_ISA", raising=False)
    monkeypatch.delenv("CAPSNET_FUSED_UHAT_CACHE", raising=False)
    info = kernel_info()
    assert info["clone"] in CLONES.values()
    # Without a setting, the best clone this CPU runs (they are listed best first).
    assert info["clone"] == info["clones_cpu_runs"][0]
    assert set(info["clones_cpu_runs"]) <= set(info["clones_built"])
    # The default clone has 64-byte vectors only when the build's own flags have AVX-512 (a
    # native build on such a CPU, which has no other clone).
    wide = info["clone"] == "x86-64-v4" or (
        info["clone"] == "default" and info["build_isa"] == "avx512f"
    )
    assert info["sample_vector_bytes"] == (64 if wide else 32)
    if "x86-64-v4" in info["clones_built"]:
        assert info["build_isa"] == "baseline"
    assert info["u_hat_cache"] == "auto"
    l2 = info["l2_bytes_per_core"]
    assert isinstance(l2, int) and l2 >= 0
    sys_l2 = _sysfs_l2_bytes()
    if sys_l2 is not None:
        assert l2 == sys_l2
    mnist = info["u_hat_cache_mnist"]
    assert mnist["u_hat_bytes_per_group"] == 1152 * 10 * 16 * mnist["sample_vector_bytes"]
    fits = 4 * mnist["u_hat_bytes_per_group"] <= 3 * l2
    assert mnist["path"] == ("cached" if fits else "recompute")
    for setting, path in (("on", "cached"), ("off", "recompute")):
        monkeypatch.setenv("CAPSNET_FUSED_UHAT_CACHE", setting)
        forced = kernel_info()
        assert forced["u_hat_cache"] == setting and forced["u_hat_cache_mnist"]["path"] == path
    monkeypatch.setenv("CAPSNET_FUSED_CPU_ISA", "generic")
    assert kernel_info()["clone"] == "default"


def _sysfs_l2_bytes() -> int | None:
    """cpu0's L2 size as Linux describes it, or None where /sys does not say."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    if not os.path.isdir(root):
        return None
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        try:
            with open(os.path.join(path, "level")) as f:
                level = int(f.read())
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(path, "size")) as f:
                size = f.read().strip()
        except (OSError, ValueError):
            continue
        if level == 2 and kind != "Instruction":
            units = {"K": 1024, "M": 1024**2, "G": 1024**3}
            return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return None


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CAPSNET_FUSED_CPU_ISA", "sse9"), ("CAPSNET_FUSED_UHAT_CACHE", "sometimes")],
)
def test_invalid_settings_are_refused(variable, value, monkeypatch):
    monkeypatch.setenv(variable, value)
    u, weight, _, _ = make_inputs(Shape(2, 5, 3, 2, 4, 2), False, dtype=torch.float32)
    with pytest.raises(ValueError, match=f"{variable} must be"):
        cpp_routing(u, weight, iterations=2)
    with pytest.raises(ValueError, match=f"{variable} must be"):
        kernel_info()


def test_forcing_a_clone_the_cpu_cannot_run_is_refused(monkeypatch):
    monkeypatch.delenv("CAPSNET_FUSED_CPU_ISA", raising=False)
    info = kernel_info()
    missing = [isa for isa, clone in CLONES.items() if clone not in info["clones_cpu_runs"]]
    if not missing:
        pytest.skip(f"this CPU and build run every clone ({info['clones_cpu_runs']})")
    isa = missing[0]
    monkeypatch.setenv("CAPSNET_FUSED_CPU_ISA", isa)
    u, weight, _, _ = make_inputs(Shape(9, 5, 3, 2, 4, 2), False, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=f"CAPSNET_FUSED_CPU_ISA={isa} asks for the"):
        cpp_routing(u, weight, iterations=2)


def _disassembled_functions(library: str) -> dict[str, str]:
    """Demangled function name -> its disassembly, for every function `objdump -d -C` lists."""
    text = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", library],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    functions: dict[str, list[str]] = {}
    body: list[str] = []
    for line in text.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            body = functions.setdefault(header.group(1), [])
        else:
            body.append(line)
    return {name: "\n".join(lines) for name, lines in functions.items()}


def test_avx512_clone_uses_512_bit_registers():
    # This CPU may not run the x86-64-v4 clone, so what it was compiled to is checked instead:
    # its kernels on 64-byte sample vectors must use zmm registers, and the other clones none.
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    built = kernel_info()["clones_built"]
    if "x86-64-v4" not in built:
        pytest.skip(f"this build has no x86-64-v4 clone ({built})")
    functions = _disassembled_functions(capsnet_fused._C.__file__)

    def bodies(kernels: str, signature: str = "") -> list[str]:
        return [
            body
            for name, body in functions.items()
            if f"::{kernels}::" in name and signature in name
        ]

    for signature in ("forward<float, 64>", "sweeps<float, 64>", "forward<double, 64>"):
        found = bodies("X86V4Kernels", signature)
        assert found, f"no X86V4Kernels::{signature} in the library"
        assert any("%zmm" in body for body in found), signature
    # The 64-byte pose vectors of backward phase 2 (M = 16 float32 is one of them).
    assert any("%zmm" in body for body in bodies("X86V4Kernels", "inputs<float>"))
    for kernels in ("X86V3Kernels", "DefaultKernels"):
        found = bodies(kernels)
        assert found, f"no {kernels} functions in the library"
        assert not any("%zmm" in body for body in found), kernels
    # The default clone is baseline x86-64 (SSE2): no 32-byte registers either.
    assert not any("%ymm" in body for body in bodies("DefaultKernels"))
    assert any("%ymm" in body for body in bodies("X86V3Kernels"))


def _predefined_macros(source: str, flags: list[str]) -> dict[str, str]:
    """Macro name -> value after preprocessing `source` with the torch headers and flags."""
    from torch.utils import cpp_extension

    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    done = subprocess.run(
        ["c++", "-std=c++20", "-E", "-dM", *includes, *flags, source],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    defines = [line.split(maxsplit=2) for line in done.stdout.splitlines()]
    return {d[1]: d[2] if len(d) > 2 else "" for d in defines if d[0] == "#define"}


@pytest.mark.parametrize("march", ["x86-64-v4", "sapphirerapids", "x86-64-v3", "x86-64"])
def test_kernel_clones_only_in_baseline_builds(march):
    # GCC 12.2 crashes (internal compiler error in expand_direct_optab_fn) on a clone for a
    # lower target than the build's flags: under -march=x86-64-v4 it folds a vector select with
    # a zero arm, `x < lo ? 0 : y * s` (vexp), into a masked multiply (.COND_MUL) that the
    # x86-64-v3 clone cannot expand; always_inline helpers also fail to inline into such a
    # clone ("target specific option mismatch"). So a build whose flags go beyond baseline
    # x86-64 (CAPSNET_FUSED_NATIVE=1 on an AVX-512 CPU) must have the default clone only.
    if shutil.which("c++") is None:
        pytest.skip("no c++ compiler")
    source = os.path.join(os.path.dirname(__file__), os.pardir, "csrc", "routing_cpu.cpp")
    macros = _predefined_macros(source, [f"-march={march}"])
    if "__clang__" in macros or int(macros.get("__GNUC__", "0")) < 11:
        pytest.skip("the kernel clones are built by GCC >= 11 only")
    if "__x86_64__" not in macros:
        pytest.skip("the kernel clones are for x86-64")
    assert ("CAPSNET_X86_CLONES" in macros) == (march == "x86-64")
