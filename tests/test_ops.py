import pytest
import torch

import capsnet_fused as cf
from capsnet_fused import ops
from tests.helpers import SHAPES, make_inputs


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
