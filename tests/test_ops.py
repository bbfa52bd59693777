import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import capsnet_fused as cf
from capsnet_fused import ops
from tests.helpers import SHAPES, Shape, make_inputs, rel_error


def _inputs(dtype=torch.float32):
    u, weight, prior, _ = make_inputs(SHAPES[0], True, dtype=dtype)
    return u, weight, prior


BAD_CALLS = [
    ("u rank", lambda u, w, p: dict(u=u[0], weight=w), "u must have 3 dims"),
    ("weight rank", lambda u, w, p: dict(u=u, weight=w[0]), "weight must have 4 dims"),
    ("I mismatch", lambda u, w, p: dict(u=u[:, :5], weight=w), r"u must be \[B, I=37, N=8\]"),
    ("N mismatch", lambda u, w, p: dict(u=u[..., :3], weight=w), r"u must be \[B, I=37, N=8\]"),
    (
        "prior shape",
        lambda u, w, p: dict(u=u, weight=w, prior=p.T),
        r"prior must be \[I=37, J=10\]",
    ),
    ("iterations 0", lambda u, w, p: dict(u=u, weight=w, iterations=0), "iterations must be"),
    ("iterations float", lambda u, w, p: dict(u=u, weight=w, iterations=2.0), "iterations must"),
    ("int u", lambda u, w, p: dict(u=u.long(), weight=w), "u must be a floating-point"),
    ("int weight", lambda u, w, p: dict(u=u, weight=w.int()), "weight must be a floating-point"),
    ("int prior", lambda u, w, p: dict(u=u, weight=w, prior=p.long()), "prior must be a floating"),
    ("softmax_over", lambda u, w, p: dict(u=u, weight=w, softmax_over="j"), "softmax_over must"),
    ("empty J", lambda u, w, p: dict(u=u, weight=w[:, :0]), "I, J, N and M must be >= 1"),
]


@pytest.mark.parametrize("call", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
@pytest.mark.parametrize("fn", [cf.dynamic_routing, cf.reference_routing], ids=["op", "ref"])
def test_bad_input_is_a_value_error(fn, call):
    _, make_kwargs, message = call
    with pytest.raises(ValueError, match=message):
        fn(**make_kwargs(*_inputs()))


def test_unknown_backend_is_a_value_error():
    u, weight, _ = _inputs()
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        cf.dynamic_routing(u, weight, backend="cuda-magic")


def test_unavailable_backend_named_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setitem(ops._MODULES, "cpp", "pretend the extension is not built")
    u, weight, _ = _inputs()
    assert "cpp" not in cf.available_backends("cpu")
    with pytest.raises(ValueError, match="'cpp' is not available: pretend the extension"):
        cf.dynamic_routing(u, weight, backend="cpp")
    assert cf.choose_backend("cpu") == "reference"


def test_available_backends_lists_reference_first():
    names = cf.available_backends("cpu")
    assert names[0] == "reference" and set(names) <= set(ops.BACKENDS)
    assert cf.choose_backend("cpu") in names


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "reference")
    assert cf.choose_backend("cpu") == "reference"
    monkeypatch.setenv(ops.BACKEND_ENV, "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        cf.choose_backend("cpu")


def test_auto_on_cuda_takes_triton_then_cpp(monkeypatch):
    # No GPU needed: which backends can run is faked, the choice itself is ops.choose_backend's.
    runnable = {"triton", "cpp"}
    real = ops.unavailable_reason

    def fake(backend, device, dtype=torch.float32):
        if torch.device(device).type != "cuda":
            return real(backend, device, dtype)
        return None if backend in runnable | {"reference"} else "not here"

    monkeypatch.setattr(ops, "unavailable_reason", fake)
    assert cf.choose_backend("cuda") == "triton"
    runnable.discard("triton")
    assert cf.choose_backend("cuda") == "cpp"
    runnable.discard("cpp")
    assert cf.choose_backend("cuda") == "reference"


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_empty_batch(backend):
    u, weight, prior = _inputs()
    weight.requires_grad_()
    v = cf.dynamic_routing(u[:0], weight, prior=prior, backend=backend)
    assert v.shape == (0, 10, 16)
    v.sum().backward()
    assert torch.all(weight.grad == 0)


def test_nan_and_inf_propagate_without_crashing():
    u, weight, _ = _inputs()
    u[0, 3, 1] = float("nan")
    u[1, 4, 2] = float("inf")
    v = cf.dynamic_routing(u, weight)
    assert v.shape == (2, 10, 16)
    assert not torch.isfinite(v[0]).all() and not torch.isfinite(v[1]).all()


def test_mixed_float_dtypes_are_promoted():
    u, weight, _ = _inputs()
    v = cf.dynamic_routing(u.double(), weight, backend="reference")
    assert v.dtype == torch.float64
    torch.testing.assert_close(v, cf.reference_routing(u.double(), weight.double()))


def test_autocast_runs_in_the_autocast_dtype():
    u, weight, _ = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = cf.dynamic_routing(u, weight, backend="reference")
    assert v.dtype == torch.bfloat16
    ref = cf.reference_routing(u.double(), weight.double())
    assert (v.double() - ref).norm() / ref.norm() < 0.05


FUSED_ON_CPU = [name for name in cf.available_backends("cpu", torch.float64) if name != "reference"]


@pytest.mark.parametrize("backend", FUSED_ON_CPU)
def test_double_backward_is_an_error_not_a_silent_zero(backend):
    u, weight, prior, _ = (t.requires_grad_() for t in make_inputs(SHAPES[0], True))

    def first_order(backend, create_graph):
        v = cf.dynamic_routing(u, weight, prior=prior, backend=backend)
        return torch.autograd.grad(v.pow(2).sum(), (u, weight), create_graph=create_graph)

    # create_graph=True alone is fine and gives the same first-order gradients...
    fused = first_order(backend, create_graph=True)
    for got, want in zip(fused, first_order("reference", create_graph=False), strict=True):
        torch.testing.assert_close(got, want)
    # ...differentiating them raises instead of silently treating the gradient as constant.
    with pytest.raises(RuntimeError, match="first-order gradients only.*backend='reference'"):
        torch.autograd.grad(fused[0].pow(2).sum(), weight)


# ---------------------------------------------------------------- overflow-safe squash (issue 14)

# Backends whose squash runs on this machine's CPU; "triton" joins when its kernels use the
# same overflow-safe formulation.
SQUASH_BACKENDS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            name not in cf.available_backends("cpu"), reason=f"{name} is not available"
        ),
    )
    for name in ("reference", "cpp", "triton")
]


def _naive_squash64(s: torch.Tensor) -> torch.Tensor:
    """The textbook formula in float64, where |s|^2 does not overflow for |s| <= 1e30."""
    q = (s * s).sum(-1, keepdim=True)
    return q / (1 + q) * s / torch.sqrt(q + 1e-8)


@pytest.mark.parametrize("backend", SQUASH_BACKENDS)
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-10, 1e-3, 1.0, 1e13, 1e30], ids=str)
@pytest.mark.parametrize("iterations", [1, 3])
def test_squash_has_no_overflow_in_float32(backend, scale, iterations):
    # With J = 1 every coupling is 1 and an identity weight makes s = u: v = squash(u) and
    # du = d squash(u), in float32, against the formula in float64 on the same inputs.
    gen = torch.Generator().manual_seed(1)
    batch, dim = 6, 12
    direction = torch.randn(batch, 1, dim, generator=gen, dtype=torch.float64)
    u = (scale * direction / direction.norm(dim=-1, keepdim=True)).float().requires_grad_()
    weight = torch.eye(dim).reshape(1, 1, dim, dim)
    grad = torch.randn(batch, 1, dim, generator=gen, dtype=torch.float64)
    v = cf.dynamic_routing(u, weight, iterations, backend=backend)
    (du,) = torch.autograd.grad(v, u, grad.float())
    u64 = u.detach().double().requires_grad_()
    v64 = _naive_squash64(u64)
    (du64,) = torch.autograd.grad(v64, u64, grad)
    assert torch.isfinite(v).all() and torch.isfinite(du).all()
    # Relative error, with an absolute floor far below anything float32 training resolves
    # (v and du underflow to 0 for the tiniest inputs).
    assert rel_error(v, v64, floor=1e-30) < 1e-6
    assert rel_error(du, du64, floor=1e-30) < 1e-6
    if scale >= 1e13:
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(batch, 1))


@pytest.mark.parametrize("backend", SQUASH_BACKENDS)
def test_squash_of_the_issue_example_is_a_unit_vector(backend):
    # u = 1e13, W = 1, I = J = N = M = 1: the naive float32 squash gave v = 0.
    v = cf.dynamic_routing(torch.full((1, 1, 1), 1e13), torch.ones(1, 1, 1, 1), backend=backend)
    assert v.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("backend", SQUASH_BACKENDS)
def test_squash_propagates_nan_and_inf(backend):
    weight = torch.eye(4).reshape(1, 1, 4, 4)
    u = torch.zeros(3, 1, 4)
    u[0, 0, 2] = float("nan")  # the other values are 0: a max that skipped NaN would give v = 0
    u[1, 0, 1] = float("inf")
    v = cf.dynamic_routing(u, weight, 1, backend=backend)
    assert torch.isnan(v[0]).all() and torch.isnan(v[1]).all()
    assert torch.equal(v[2], torch.zeros(1, 4))


# ---------------------------------------------------------------- devices, meta, arguments


def test_no_backend_for_a_device_that_does_not_exist():
    if torch.cuda.is_available():
        missing = f"cuda:{torch.cuda.device_count()}"
    else:
        missing = "cuda"
    assert cf.available_backends(missing) == []
    with pytest.raises(ValueError, match=f"no routing backend can run on {missing}"):
        cf.choose_backend(missing)
    for name in ops.BACKENDS:
        with pytest.raises(ValueError, match=f"'{name}' is not available"):
            cf.choose_backend(missing, backend=name)


def test_interpreted_triton_still_serves_cpu_tensors():
    from capsnet_fused.backends.triton import INTERPRETED

    assert ("triton" in cf.available_backends("cpu")) == INTERPRETED


def test_meta_tensors_give_the_output_shape():
    u, weight, prior = (t.to("meta") for t in _inputs())
    v = cf.dynamic_routing(u, weight, prior=prior)
    assert v.device.type == "meta" and v.shape == (2, 10, 16)
    router = cf.FusedRouter(37, 10, 8, 16, learn_prior=True).to("meta")
    assert router(u).shape == (2, 10, 16)


def test_fake_tensor_tracing_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for backend in cf.available_backends("cpu"):
        with FakeTensorMode():
            u, weight = torch.empty(3, 37, 8), torch.empty(37, 10, 8, 16)
            v = cf.dynamic_routing(u, weight, backend=backend)
        assert v.shape == (3, 10, 16), backend


def test_unknown_backend_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "garbage")
    u, weight, _ = _inputs()
    with pytest.raises(ValueError, match=f"environment variable {ops.BACKEND_ENV}") as info:
        cf.dynamic_routing(u, weight)
    assert "unknown backend 'garbage'" in str(info.value)
    # An explicit backend argument is not affected by the variable.
    cf.dynamic_routing(u, weight, backend="reference")


def test_router_refuses_an_unknown_backend_at_construction():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        cf.FusedRouter(4, 2, 3, 3, backend="garbage")


@pytest.mark.parametrize(
    "iterations",
    [np.int64(2), np.int32(2), torch.tensor(2), torch.tensor(2, dtype=torch.int32)],
    ids=["np.int64", "np.int32", "tensor-int64", "tensor-int32"],
)
def test_iterations_accepts_integers_with_index(iterations):
    u, weight, _ = _inputs()
    want = cf.dynamic_routing(u, weight, 2, backend="reference")
    for backend in cf.available_backends("cpu"):
        got = cf.dynamic_routing(u[:1], weight, iterations, backend=backend)
        torch.testing.assert_close(got, want[:1], rtol=1e-4, atol=1e-5)
    router = cf.FusedRouter(37, 10, 8, 16, iterations)
    assert type(router.iterations) is int and router.iterations == 2


@pytest.mark.parametrize(
    "iterations",
    [True, torch.tensor(True), np.bool_(True), 2.0, torch.tensor(2.0), "3", 0, -1, 1001]
    + [2**40, 2**63],
    ids=str,
)
def test_iterations_rejects_bools_non_integers_and_huge_counts(iterations):
    u, weight, _ = _inputs()
    message = rf"iterations must be an integer in \[1, {ops.MAX_ITERATIONS}\]"
    with pytest.raises(ValueError, match=message):
        cf.dynamic_routing(u, weight, iterations)
    with pytest.raises(ValueError, match=message):
        cf.FusedRouter(4, 2, 3, 3, iterations)


# ---------------------------------------------------------------- function transforms


def _transform_calls(backend):
    u, weight, _, grad = make_inputs(Shape(2, 5, 3, 4, 6, 2), False)

    def routing(u):
        return cf.dynamic_routing(u, weight, 2, backend=backend)

    def forward_ad():
        with fwAD.dual_level():
            return fwAD.unpack_dual(routing(fwAD.make_dual(u, grad.new_ones(u.shape)))).tangent

    return {
        "jvp": lambda: torch.func.jvp(routing, (u,), (torch.ones_like(u),))[1],
        "forward_ad": forward_ad,
        "jacfwd": lambda: torch.func.jacfwd(routing)(u),
        "grad": lambda: torch.func.grad(lambda u: (routing(u) * grad).sum())(u),
        "vjp": lambda: torch.func.vjp(routing, u)[1](grad)[0],
        "jacrev": lambda: torch.func.jacrev(routing)(u),
    }


# torch's jvp decompositions still go through torch.jit.script, which warns that it is deprecated.
@pytest.mark.filterwarnings("ignore:.torch.jit.script. is deprecated:DeprecationWarning")
@pytest.mark.parametrize("transform", list(_transform_calls("reference")))
@pytest.mark.parametrize("backend", FUSED_ON_CPU)
def test_function_transforms_are_refused_by_fused_backends(backend, transform):
    # The reference supports each of them; the fused ops would give a zero tangent (forward
    # mode) or torch's error about setup_context (torch.func.grad and friends).
    want = _transform_calls("reference")[transform]()
    assert want is not None and want.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="backend='reference'"):
        _transform_calls(backend)[transform]()


@pytest.mark.parametrize("backend", FUSED_ON_CPU)
def test_vmap_works_with_fused_backends(backend):
    u, weight, _, _ = make_inputs(Shape(2, 5, 3, 4, 6, 2), False)
    stacked = torch.stack([u, 2 * u])
    got = torch.func.vmap(lambda u: cf.dynamic_routing(u, weight, 2, backend=backend))(stacked)
    want = torch.stack([cf.reference_routing(x, weight, 2) for x in stacked])
    torch.testing.assert_close(got, want)
