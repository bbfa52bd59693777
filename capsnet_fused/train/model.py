"""What a TrainConfig builds: the model (CapsNet or the CNN baseline) and its training loss;
the predictions of either, the autocast it trains under (--amp), and the settings left to
"auto" (amp, channels_last) settled for the device the run trains on."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from capsnet_fused import info
from capsnet_fused.baseline import BaselineCNN, CrossEntropyCriterion
from capsnet_fused.losses import CapsNetLoss
from capsnet_fused.models import CapsNet, CapsNetOutput
from capsnet_fused.train.config import TrainConfig


def build_model(config: TrainConfig, image_shape: tuple[int, int, int]) -> nn.Module:
    """CapsNet for images [C, H, W] with the sizes and routing options of `config` (or the CNN
    baseline of the same convolutions for model "cnn")."""
    channels, height, width = image_shape
    if config.model == "cnn":
        return BaselineCNN(
            channels,
            (height, width),
            conv_channels=config.conv_channels,
            kernel_size=config.kernel_size,
            conv2_channels=config.primary_caps * config.primary_dim,
        )
    return CapsNet(
        channels,
        (height, width),
        conv_channels=config.conv_channels,
        kernel_size=config.kernel_size,
        primary_caps=config.primary_caps,
        primary_dim=config.primary_dim,
        digit_dim=config.digit_dim,
        decoder_hidden=tuple(config.decoder_hidden),
        routing_iterations=config.routing_iterations,
        softmax_over=config.softmax_over,
        learn_prior=config.learn_prior,
        learn_bias=config.learn_bias,
        detach_inner=config.detach_inner,
        leaky=config.leaky,
        squash_eps=config.squash_eps,
        shared_logits=config.shared_logits,
        backend=config.backend,
        digit_init_scale=config.digit_init_scale,
        channels_last=config.channels_last,
    )


def make_criterion(config: TrainConfig) -> nn.Module:
    """The training loss of config.model: forward(output, images, labels) -> (loss, *parts),
    parts named by its part_names."""
    if config.model == "cnn":
        return CrossEntropyCriterion()
    return CapsNetLoss(config.recon_scale)


def class_scores(output: CapsNetOutput | torch.Tensor) -> torch.Tensor:
    """[B, J] scores whose argmax is the prediction: capsule lengths, or a CNN's logits."""
    return output.lengths if isinstance(output, CapsNetOutput) else output


def autocast_context(device: torch.device, enabled: bool):
    """bfloat16 autocast on CPU, float16 on CUDA; a no-op when disabled."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def resolve_auto_settings(config: TrainConfig, device: torch.device) -> tuple[TrainConfig, str]:
    """`config` with amp and channels_last settled where they are None ("auto"), and a line for
    the run's log saying what "auto" chose and why, and warning of bfloat16 asked for on a CPU
    that emulates it (empty when there is neither).

    Both are on for training on a CPU with native bfloat16, where bfloat16 autocast with
    channels-last convolutions made the paper's CapsNet's training step about twice as fast, at
    a test accuracy after one epoch within the spread of seeds (README, "Model, losses,
    training"); off elsewhere, CUDA included (not measured there)."""
    native = device.type == "cpu" and info.cpu_has_native_bfloat16()
    auto = [name for name in ("amp", "channels_last") if getattr(config, name) is None]
    config = dataclasses.replace(config, **{name: native for name in auto})
    lines = []
    if auto:
        flags = " ".join(f"--{'no-' if native else ''}{name.replace('_', '-')}" for name in auto)
        if device.type != "cpu":
            why = f"auto: off on {device.type}"
        else:
            why = (
                f"auto: this CPU has {'' if native else 'no '}native bfloat16 (AVX512_BF16 or AMX)"
            )
        precision = "bfloat16 autocast" if config.amp else "float32"
        layout = "channels-last" if config.channels_last else "contiguous"
        lines.append(f"{precision}, {layout} convolutions ({why}; {flags} to change)")
    if config.amp and device.type == "cpu" and not native:
        lines.append(
            "bfloat16 autocast on a CPU without native bfloat16 (AVX512_BF16 or AMX) is "
            "emulated: a training step was 9-11x slower than in float32 on an AVX2 Zen 3"
        )
    return config, "\n".join(lines)
