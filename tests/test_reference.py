import pytest
import torch

from capsnet_fused import dynamic_routing, reference_routing, squash
from capsnet_fused.reference import SQUASH_EPS
from tests.helpers import (
    SHAPES,
    Options,
    Shape,
    make_bias,
    make_inputs,
    option_case_params,
    variant_params,
)


def leaky_softmax(logits, leaky):
    """softmax of a list of scalars, with one more logit 0 whose share is dropped when leaky."""
    full = torch.stack(([logits[0].new_zeros(())] if leaky else []) + list(logits))
    c = torch.softmax(full, 0)
    return c[1:] if leaky else c


def procedure1(
    u, weight, iterations, prior, softmax_over, detach_inner, bias=None, leaky=False, eps=1e-8
):
    """Procedure 1 of Sabour et al. transcribed literally: scalar loops over b, i, j; with the
    official code's bias before the squash and its leaky softmax, and the squash eps."""
    batch, in_caps, _ = u.shape
    out_caps = weight.shape[1]
    v_out = []
    for b in range(batch):
        u_hat = [[weight[i, j].T @ u[b, i] for j in range(out_caps)] for i in range(in_caps)]
        inner = [[x.detach() for x in row] for row in u_hat] if detach_inner else u_hat
        logits = [
            [prior[i, j] if prior is not None else u.new_zeros(()) for j in range(out_caps)]
            for i in range(in_caps)
        ]
        for t in range(iterations):
            last = t == iterations - 1
            preds = u_hat if last else inner
            if softmax_over == "out_caps":
                rows = [leaky_softmax(logits[i], leaky) for i in range(in_caps)]
                c = [[rows[i][j] for j in range(out_caps)] for i in range(in_caps)]
            else:
                cols = [
                    leaky_softmax([logits[i][j] for i in range(in_caps)], leaky)
                    for j in range(out_caps)
                ]
                c = [[cols[j][i] for j in range(out_caps)] for i in range(in_caps)]
            v = []
            for j in range(out_caps):
                s_j = sum(c[i][j] * preds[i][j] for i in range(in_caps))
                if bias is not None:
                    s_j = s_j + bias[j]
                norm2 = (s_j * s_j).sum()
                v.append(norm2 / (1 + norm2) * s_j / torch.sqrt(norm2 + eps))
            if not last:
                for i in range(in_caps):
                    for j in range(out_caps):
                        logits[i][j] = logits[i][j] + inner[i][j] @ v[j]
        v_out.append(torch.stack(v))
    return torch.stack(v_out)


LOOP_SHAPES = [Shape(2, 7, 3, 3, 4, 3), Shape(1, 5, 1, 2, 1, 1), Shape(3, 4, 5, 2, 3, 4)]


@pytest.mark.parametrize("shape", LOOP_SHAPES, ids=[s.id for s in LOOP_SHAPES])
@variant_params
def test_reference_matches_procedure1(shape, variant):
    softmax_over, detach_inner = variant.softmax_over, variant.detach_inner
    u, weight, prior, grad = make_inputs(shape, variant.prior)
    kwargs = dict(softmax_over=softmax_over, detach_inner=detach_inner)
    leaves = [t.clone().requires_grad_() for t in (u, weight)]
    prior_leaf = None if prior is None else prior.clone().requires_grad_()
    ref = reference_routing(*leaves, shape.R, prior=prior_leaf, **kwargs)
    loop_leaves = [t.clone().requires_grad_() for t in (u, weight)]
    loop_prior = None if prior is None else prior.clone().requires_grad_()
    loop = procedure1(*loop_leaves, shape.R, loop_prior, **kwargs)
    torch.testing.assert_close(ref, loop, rtol=1e-12, atol=1e-12)
    # Gradients through both agree too, detach_inner included.
    wrt = leaves + ([prior_leaf] if prior_leaf is not None else [])
    loop_wrt = loop_leaves + ([loop_prior] if loop_prior is not None else [])
    for g_ref, g_loop in zip(
        torch.autograd.grad(ref, wrt, grad), torch.autograd.grad(loop, loop_wrt, grad)
    ):
        torch.testing.assert_close(g_ref, g_loop, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", LOOP_SHAPES[:2], ids=[s.id for s in LOOP_SHAPES[:2]])
@option_case_params
def test_reference_options_match_procedure1(shape, variant, options):
    softmax_over, detach_inner = variant.softmax_over, variant.detach_inner
    u, weight, prior, grad = make_inputs(shape, variant.prior)
    bias = make_bias(shape, options)
    wrt = [t.clone().requires_grad_() for t in (u, weight, prior, bias) if t is not None]
    loop_wrt = [t.clone().requires_grad_() for t in (u, weight, prior, bias) if t is not None]

    def unpack(tensors):
        rest = list(tensors[2:])
        p = rest.pop(0) if prior is not None else None
        b = rest.pop(0) if bias is not None else None
        return tensors[0], tensors[1], p, b

    u1, w1, p1, b1 = unpack(wrt)
    ref = reference_routing(
        u1, w1, shape.R, prior=p1, bias=b1, softmax_over=softmax_over,
        detach_inner=detach_inner, **options.kwargs(),
    )  # fmt: skip
    u2, w2, p2, b2 = unpack(loop_wrt)
    loop = procedure1(
        u2, w2, shape.R, p2, softmax_over, detach_inner, b2, options.leaky, options.squash_eps
    )
    torch.testing.assert_close(ref, loop, rtol=1e-12, atol=1e-12)
    for g_ref, g_loop in zip(
        torch.autograd.grad(ref, wrt, grad), torch.autograd.grad(loop, loop_wrt, grad), strict=True
    ):
        torch.testing.assert_close(g_ref, g_loop, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_leaky_first_couplings_are_uniform_over_one_more(softmax_over):
    # One iteration, no prior: c = 1/(J+1) (out_caps) or 1/(I+1) (in_caps) for every pair.
    shape = Shape(2, 7, 3, 4, 5, 1)
    u, weight, _, _ = make_inputs(shape, False)
    u_hat = torch.einsum("bin,ijnm->bijm", u, weight)
    share = 1 / (shape.J + 1) if softmax_over == "out_caps" else 1 / (shape.I + 1)
    want = squash(share * u_hat.sum(1))
    got = reference_routing(u, weight, 1, softmax_over=softmax_over, leaky=True)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)


def test_bias_is_added_before_every_squash():
    # One iteration: v = squash(mean_j-coupled u_hat + bias); and bias = 0 changes nothing.
    shape = Shape(2, 7, 3, 4, 5, 2)
    u, weight, _, _ = make_inputs(shape, False)
    bias = make_bias(shape, Options(bias=True))
    u_hat = torch.einsum("bin,ijnm->bijm", u, weight)
    got = reference_routing(u, weight, 1, bias=bias)
    torch.testing.assert_close(got, squash(u_hat.sum(1) / shape.J + bias), rtol=1e-13, atol=0)
    zero = reference_routing(u, weight, 2, bias=torch.zeros_like(bias))
    torch.testing.assert_close(zero, reference_routing(u, weight, 2), rtol=0, atol=0)


# Each softmax axis once (with and without a prior): gradcheck costs ~10 s a case here.
@pytest.mark.parametrize("softmax_over, with_prior", [("out_caps", False), ("in_caps", True)])
def test_reference_gradcheck_options(softmax_over, with_prior):
    shape = Shape(2, 5, 3, 2, 3, 3)
    u, weight, prior, _ = make_inputs(shape, with_prior)
    bias = make_bias(shape, Options(bias=True))
    inputs = [t.requires_grad_() for t in (u, weight, bias, prior) if t is not None]

    def fn(u, weight, bias, prior=None):
        return reference_routing(
            u, weight, 3, prior=prior, bias=bias, softmax_over=softmax_over, leaky=True,
            squash_eps=0.0,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, inputs)


# detach_inner defines a gradient that is not the derivative, so gradcheck covers the rest.
@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
@pytest.mark.parametrize("with_prior", [False, True])
def test_reference_gradcheck(softmax_over, with_prior):
    u, weight, prior, _ = make_inputs(Shape(2, 6, 3, 3, 4, 3), with_prior)
    inputs = [t.requires_grad_() for t in (u, weight)] + (
        [prior.requires_grad_()] if prior is not None else []
    )

    def fn(u, weight, prior=None):
        return reference_routing(u, weight, 3, prior=prior, softmax_over=softmax_over)

    assert torch.autograd.gradcheck(fn, inputs)


def test_softmax_axis_matters():
    u, weight, _, _ = make_inputs(SHAPES[0], False)
    out = reference_routing(u, weight, 3, softmax_over="out_caps")
    inn = reference_routing(u, weight, 3, softmax_over="in_caps")
    assert (out - inn).abs().max() > 1e-3


def test_detach_inner_changes_gradient_not_value():
    u, weight, _, grad = make_inputs(SHAPES[0], False)
    values, grads = [], []
    for detach in (False, True):
        w = weight.clone().requires_grad_()
        v = reference_routing(u, w, 3, detach_inner=detach)
        values.append(v.detach())
        grads.append(torch.autograd.grad(v, w, grad)[0])
    torch.testing.assert_close(values[0], values[1])
    assert (grads[0] - grads[1]).abs().max() > 1e-6


def test_squash_is_finite_at_zero_and_shrinks():
    s = torch.zeros(3, 4, requires_grad=True)
    v = squash(s)
    v.sum().backward()
    assert torch.all(v == 0) and torch.isfinite(s.grad).all()
    big = squash(torch.tensor([[1e3, 0.0]], dtype=torch.float64))
    assert 0.999 < big.norm() < 1.0


def test_large_logits_stay_finite():
    u, weight, prior, _ = make_inputs(SHAPES[0], True)
    v = reference_routing(40 * u, 40 * weight, 3, prior=1e3 * prior)
    assert torch.isfinite(v).all()


@pytest.mark.parametrize(
    "dtype, scale",
    [(torch.float16, 300.0), (torch.float16, 6e4), (torch.bfloat16, 1e30), (torch.float32, 1e30)],
    ids=["fp16-300", "fp16-6e4", "bf16-1e30", "fp32-1e30"],
)
def test_squash_of_large_half_inputs_is_a_unit_vector(dtype, scale):
    # |s|^2 overflows float16 once |s| > 256 (the naive squash gave NaN): the norm is computed
    # in float32 from the scaled vector.
    direction = torch.randn(5, 8, dtype=torch.float64)
    s = (scale * direction / direction.abs().amax(-1, keepdim=True)).to(dtype)
    v = squash(s)
    assert v.dtype == dtype and torch.isfinite(v).all()
    want = s.double() / s.double().norm(dim=-1, keepdim=True)
    torch.testing.assert_close(v.double(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("eps", [0.0, 1e-7, 0.05])
def test_squash_eps_is_the_formula(eps):
    s = torch.randn(4, 6, dtype=torch.float64)
    q = (s * s).sum(-1, keepdim=True)
    want = q / (1 + q) * s / torch.sqrt(q + eps)
    torch.testing.assert_close(squash(s, eps=eps), want, rtol=1e-14, atol=0)


def test_squash_eps_zero_is_nan_at_zero_only():
    # The eps-free squash is 0/0 at s = 0, as in the published implementations: NaN value and
    # gradient there, and no NaN leaking into the other capsules' values or gradients.
    s = torch.randn(3, 4, dtype=torch.float64)
    s[1] = 0
    s.requires_grad_()
    v = squash(s, eps=0.0)
    (grad,) = torch.autograd.grad(v.sum(), s)
    assert torch.isnan(v[1]).all() and torch.isnan(grad[1]).all()
    rows = [0, 2]
    assert torch.isfinite(v[rows]).all() and torch.isfinite(grad[rows]).all()
    with_eps = squash(s.detach(), eps=SQUASH_EPS)
    assert torch.equal(with_eps[1], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("eps", [-1e-8, float("nan"), float("inf"), True, "0", None])
def test_squash_eps_is_validated(eps):
    u, weight, _, _ = make_inputs(SHAPES[1], False)
    for fn in (reference_routing, dynamic_routing):
        with pytest.raises(ValueError, match="squash_eps"):
            fn(u, weight, 2, squash_eps=eps)


def test_bias_and_leaky_are_validated():
    u, weight, _, _ = make_inputs(SHAPES[0], False)
    J, M = weight.shape[1], weight.shape[3]
    for bad in (torch.zeros(J), torch.zeros(M, J), torch.zeros(J, M, dtype=torch.int64), 0.1):
        with pytest.raises(ValueError, match="bias"):
            reference_routing(u, weight, 2, bias=bad)
    with pytest.raises(ValueError, match="leaky"):
        reference_routing(u, weight, 2, leaky=1)


def test_squash_eps_residual_is_eps_over_twice_q():
    # The README's claim: an eps against none changes v by about eps / (2 |s|^2), relatively.
    s = torch.randn(5, 16, dtype=torch.float64) * 0.01
    q = (s * s).sum(-1)
    exact = squash(s, eps=0.0)
    rel = (squash(s, eps=1e-8) - exact).norm(dim=-1) / exact.norm(dim=-1)
    torch.testing.assert_close(rel, 1e-8 / (2 * q), rtol=1e-3, atol=0)


def test_squash_second_derivatives_are_exact():
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(squash, (s,))
    zero = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(squash(zero).sum(), zero, create_graph=True)
    assert torch.equal(grad, torch.zeros_like(zero))
