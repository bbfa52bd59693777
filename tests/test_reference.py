import pytest
import torch

from capsnet_fused import reference_routing, squash
from tests.helpers import SHAPES, Shape, make_inputs, variant_params


def procedure1(u, weight, iterations, prior, softmax_over, detach_inner):
    """Procedure 1 of Sabour et al. transcribed literally: scalar loops over b, i, j."""
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
                rows = [torch.softmax(torch.stack(logits[i]), 0) for i in range(in_caps)]
                c = [[rows[i][j] for j in range(out_caps)] for i in range(in_caps)]
            else:
                cols = [
                    torch.softmax(torch.stack([logits[i][j] for i in range(in_caps)]), 0)
                    for j in range(out_caps)
                ]
                c = [[cols[j][i] for j in range(out_caps)] for i in range(in_caps)]
            v = []
            for j in range(out_caps):
                s_j = sum(c[i][j] * preds[i][j] for i in range(in_caps))
                norm2 = (s_j * s_j).sum()
                v.append(norm2 / (1 + norm2) * s_j / torch.sqrt(norm2 + 1e-8))
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
    softmax_over, with_prior, detach_inner = variant
    u, weight, prior, grad = make_inputs(shape, with_prior)
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


def test_squash_second_derivatives_are_exact():
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(squash, (s,))
    zero = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(squash(zero).sum(), zero, create_graph=True)
    assert torch.equal(grad, torch.zeros_like(zero))
