import subprocess
import sys
import textwrap

import pytest
import torch

import capsnet_fused
from capsnet_fused.losses import MarginLoss, ReconstructionLoss
from capsnet_fused.models import CapsNet, CapsNetOutput


def test_mnist_shapes_and_paper_sizes():
    model = CapsNet()
    out = model(torch.rand(2, 1, 28, 28), torch.tensor([3, 7]))
    assert out.caps.shape == (2, 10, 16)
    assert out.lengths.shape == (2, 10)
    assert out.reconstructions.shape == (2, 1, 28, 28)
    assert model.digit.weight.shape == (1152, 10, 8, 16)
    assert [m.out_features for m in model.decoder if hasattr(m, "out_features")] == [512, 1024, 784]
    assert ((out.reconstructions >= 0) & (out.reconstructions <= 1)).all()


def test_color_32x32_and_routing_options():
    model = CapsNet(3, 32, 5, routing_iterations=2, softmax_over="in_caps", learn_prior=True)
    out = model(torch.rand(2, 3, 32, 32))
    assert model.digit.weight.shape == (2048, 5, 8, 16) and model.digit.prior.shape == (2048, 5)
    assert out.caps.shape == (2, 5, 16) and out.reconstructions.shape == (2, 3, 32, 32)


def test_bias_leaky_and_squash_eps_reach_both_squashes():
    model = CapsNet(
        1, 20, 4, conv_channels=8, primary_caps=2, learn_bias=True, leaky=True, squash_eps=0.0,
        backend="reference",
    )  # fmt: skip
    assert model.digit.bias.shape == (4, 16) and model.digit.leaky
    assert model.digit.squash_eps == 0.0 and model.primary.squash_eps == 0.0
    out = model(torch.rand(2, 1, 20, 20), torch.tensor([0, 3]))
    (out.lengths.sum() + out.reconstructions.sum()).backward()
    assert model.digit.bias.grad.abs().sum() > 0


def test_decoder_masks_with_label_in_training_and_prediction_in_eval():
    torch.manual_seed(0)
    model = CapsNet(1, 20, 4, conv_channels=8, primary_caps=2)
    images = torch.rand(3, 1, 20, 20)
    with torch.no_grad():
        model.eval()
        evaluated = model(images, torch.tensor([0, 1, 2]))
        predicted = evaluated.lengths.argmax(1)
        model.train()
        other = (predicted + 1) % 4
        with_other = model(images, other)
        with_predicted = model(images, predicted)
    torch.testing.assert_close(with_predicted.reconstructions, evaluated.reconstructions)
    assert (with_other.reconstructions - evaluated.reconstructions).abs().max() > 0


def test_rejects_wrong_image_shape():
    with pytest.raises(ValueError, match=r"expected images \[B, 1, 28, 28\]"):
        CapsNet()(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="too small"):
        CapsNet(1, 16)


def test_loss_falls_over_20_steps():
    torch.manual_seed(0)
    model = CapsNet(1, 20, 4, conv_channels=16, primary_caps=4)
    images = torch.rand(16, 1, 20, 20)
    # Classes that depend on the image, so that there is something to learn.
    labels = (images[:, 0, :10].mean((1, 2)) > images[:, 0, 10:].mean((1, 2))).long() * 2
    labels = labels + (images[:, 0, :, :10].mean((1, 2)) > 0.5).long()
    margin, recon = MarginLoss(), ReconstructionLoss()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        out = model(images, labels)
        loss = margin(out.lengths, labels) + recon(out.reconstructions, images)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_channels_last_computes_the_same_values_and_gradients():
    torch.manual_seed(0)
    sizes = dict(conv_channels=8, primary_caps=2)
    dense = CapsNet(3, 20, 4, **sizes)
    last = CapsNet(3, 20, 4, **sizes, channels_last=True)
    last.load_state_dict(dense.state_dict())
    for conv in (last.conv1[0], last.primary.conv):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not dense.primary.conv.weight.is_contiguous(memory_format=torch.channels_last)
    images, labels = torch.rand(3, 3, 20, 20), torch.tensor([0, 3, 1])
    outputs = [model(images, labels) for model in (dense, last)]
    for got, want in zip(outputs[1], outputs[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for out in outputs:
        (out.lengths.sum() + out.reconstructions.sum()).backward()
    for name, param in last.named_parameters():
        want = dict(dense.named_parameters())[name].grad
        torch.testing.assert_close(param.grad, want, rtol=1e-4, atol=1e-6, msg=name)


def _routing_ops(program) -> set[str]:
    """The capsnet_fused ops called anywhere in an exported program (HOP bodies included)."""
    return {
        str(node.target)
        for module in program.graph_module.modules()
        if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("capsnet_fused.")
    }


def test_export_save_load_round_trip_with_the_cpp_op(tmp_path):
    if "cpp" not in capsnet_fused.available_backends("cpu"):
        pytest.skip("the cpp backend is not built")
    torch.manual_seed(0)
    model = CapsNet(1, 20, 4, conv_channels=8, primary_caps=2, backend="cpp").eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.rand(2, 1, 20, 20),), dynamic_shapes=({0: batch},))
    path = tmp_path / "capsnet.pt2"
    torch.export.save(program, path)

    images = torch.rand(3, 1, 20, 20)  # another batch size than the exported example
    expected = model(images)
    loaded = torch.export.load(path)
    assert _routing_ops(loaded) == {"capsnet_fused.cpp_routing_fwd.default"}
    out = loaded.module()(images)
    assert type(out) is CapsNetOutput
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want)

    # A fresh process: importing capsnet_fused alone registers what loading needs.
    torch.save({"images": images, "expected": tuple(expected)}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import torch, capsnet_fused
        io = torch.load({str(tmp_path / "io.pt")!r})
        out = torch.export.load({str(path)!r}).module()(io["images"])
        assert type(out).__name__ == "CapsNetOutput", type(out)
        for got, want in zip(out, io["expected"]):
            torch.testing.assert_close(got, want)
        print("loaded ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "loaded ok" in done.stdout


@pytest.mark.parametrize("shared_logits", [None, "mean"], ids=["per_sample", "shared_mean"])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_capsnet_compiles_fullgraph_with_a_fused_backend(backend, shared_logits):
    """A whole CapsNet through torch.compile(fullgraph=True): no graph break around the fused op
    (Dynamo through its fake and autograd registrations), the same outputs and gradients of every
    parameter as eager. tests/test_backends.py compiles the routing call alone."""
    if backend not in capsnet_fused.available_backends("cpu"):
        pytest.skip(f"{backend} cannot run on this CPU")
    torch.manual_seed(0)
    model = CapsNet(
        1, 20, 4, conv_channels=8, primary_caps=2, decoder_hidden=(16, 32), learn_prior=True,
        learn_bias=True, softmax_over="in_caps", shared_logits=shared_logits, backend=backend,
    )  # fmt: skip
    images = torch.rand(3, 1, 20, 20)
    labels = torch.tensor([1, 3, 0])

    def loss_and_grads(fn):
        out = fn(images, labels)
        loss = out.lengths.sum() + out.reconstructions.square().sum()
        return out.caps.detach(), torch.autograd.grad(loss, list(model.parameters()))

    # aot_eager: Dynamo and AOTAutograd without Inductor's C++ build (slow on 2 CPU cores).
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    caps, grads = loss_and_grads(compiled)
    caps_eager, grads_eager = loss_and_grads(model)
    torch.testing.assert_close(caps, caps_eager, rtol=1e-5, atol=1e-6)
    for g, g_eager in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, g_eager, rtol=1e-4, atol=1e-6)
