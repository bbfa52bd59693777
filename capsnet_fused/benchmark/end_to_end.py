"""The end-to-end benchmark (--end-to-end): a CapsNet training step (forward, margin +
reconstruction loss, backward, Adam step) and an inference forward, images per second, with
the reference router and every fused backend; optionally also under autocast (--amp) and with
channels-last convolutions (--channels-last).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from capsnet_fused.benchmark.cases import BASELINES, BenchConfig, _device, benchmark_backends
from capsnet_fused.benchmark.check import _failure, _rel_error, check_errors
from capsnet_fused.benchmark.environment import _cpu_kernel_fields
from capsnet_fused.benchmark.measure import _summary, _sync
from capsnet_fused.ops import unavailable_reason


def _e2e_inputs(model: torch.nn.Module, batch: int, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, *model.image_shape, generator=gen).to(device)
    labels = torch.randint(0, model.num_classes, (batch,), generator=gen).to(device)
    return images, labels


def autocast_dtype(device: torch.device) -> torch.dtype:
    """The --amp dtype, as training uses it: bfloat16 on CPU, float16 (with GradScaler) on CUDA."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


@dataclass(frozen=True)
class E2ESetting:
    """How the end-to-end model runs: autocast (--amp) or float32, channels-last convolutions
    or the default layout."""

    amp: bool = False
    channels_last: bool = False

    def label(self, device: torch.device) -> str:
        precision = str(autocast_dtype(device)).removeprefix("torch.") if self.amp else "float32"
        return f"{precision} {'channels_last' if self.channels_last else 'contiguous'}"


def e2e_settings(config: BenchConfig) -> list[E2ESetting]:
    """Every combination of the config's autocast and layout choices, plain first."""
    return [E2ESetting(a, c) for a in config.e2e_amp for c in config.e2e_channels_last]


def run_end_to_end(
    config: BenchConfig, echo: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """CapsNet training step and inference throughput, reference router vs each fused backend,
    in every setting (autocast or not, channels-last or not) the config asks for.

    echo (e.g. print) receives a progress line per row; format_e2e_table prints the rows.

    Each backend gets a model with identical initial weights. Before timing, its forward
    output (capsule lengths [B, J]) and gradients (digit weight [I, J, N, M], conv1 weight) on
    one batch are checked against the float32 reference model's in the default layout; a
    mismatch marks the row failed. The tolerance is the relative error floor (--rtol, default
    1e-3), and under autocast at least twice the reference router's own error in that setting.
    Training step: forward, margin + reconstruction loss, backward, Adam step.
    """
    from capsnet_fused.losses import CapsNetLoss
    from capsnet_fused.models import CapsNet

    device = _device(config)
    wanted = [b for b in benchmark_backends(config, device, torch.float32) if b != "compiled"]
    criterion = CapsNetLoss()  # the training loss, as `capsnet-fused train` computes it
    names = ("lengths", "d_digit_weight", "d_conv1_weight")

    def build(backend: str, setting: E2ESetting) -> torch.nn.Module:
        torch.manual_seed(config.seed)
        model = CapsNet(backend=backend, channels_last=setting.channels_last, **config.model_kwargs)
        return model.to(device)

    def autocast(setting: E2ESetting):
        return torch.autocast(device.type, dtype=autocast_dtype(device), enabled=setting.amp)

    def loss_of(model, images, labels, setting):
        with autocast(setting):
            out = model(images, labels)
            loss, _margin, _recon = criterion(out, images, labels)
        return loss, out

    def check_pass(model, images, labels, setting):
        model.zero_grad(set_to_none=True)
        loss, out = loss_of(model, images, labels, setting)
        loss.backward()
        grads = [model.digit.weight.grad, model.conv1[0].weight.grad]
        return [out.lengths.detach().float()] + [g.detach().float().clone() for g in grads]

    def errors_of(got):
        return {n: _rel_error(g, w) for n, g, w in zip(names, got, expected, strict=True)}

    cpu_kernel_fields = _cpu_kernel_fields(device)
    plain = E2ESetting()
    images, labels = _e2e_inputs(build("reference", plain), config.e2e_batch, device, config.seed)
    expected = check_pass(build("reference", plain), images, labels, plain)
    floor = config.rtol if config.rtol is not None else 1e-3
    rows = []
    timed: dict[tuple[E2ESetting, str], tuple[dict[str, Any], Callable, Callable]] = {}
    for setting in e2e_settings(config):
        reference_model = build("reference", setting)
        tolerances = dict.fromkeys(names, floor)
        if setting.amp:
            drift = errors_of(check_pass(reference_model, images, labels, setting))
            tolerances = {n: max(floor, 2 * drift[n]) for n in names}
        for backend in wanted:
            row: dict[str, Any] = {
                "backend": backend,
                "device": device.type,
                "batch": config.e2e_batch,
                "amp": setting.amp,
                "autocast_dtype": str(autocast_dtype(device)) if setting.amp else None,
                "channels_last": setting.channels_last,
                "setting": setting.label(device),
                **cpu_kernel_fields,
                "status": "ok",
                "error": "",
                "rel_errors": {},
                "tolerances": {},
                "train_median_ms": None,
                "train_iqr_ms": None,
                "train_images_per_s": None,
                "infer_median_ms": None,
                "infer_iqr_ms": None,
                "infer_images_per_s": None,
                "train_speedup_vs_reference": None,
                "infer_speedup_vs_reference": None,
                "train_speedup_vs_plain": None,
                "infer_speedup_vs_plain": None,
            }
            rows.append(row)
            if backend not in BASELINES and unavailable_reason(backend, device) is not None:
                row.update(status="skipped", error=unavailable_reason(backend, device))
                continue
            try:
                model = reference_model if backend == "reference" else build(backend, setting)
                errors = errors_of(check_pass(model, images, labels, setting))
                row["rel_errors"], row["tolerances"] = errors, tolerances
                problem = check_errors(errors, tolerances)
                if problem is not None:
                    row.update(status="failed", error=f"wrong result, not timed: {problem}")
                    continue
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
                scaler = torch.amp.GradScaler(
                    device.type, enabled=setting.amp and device.type == "cuda"
                )

                def train_step(model=model, optimizer=optimizer, scaler=scaler, setting=setting):
                    model.train()
                    optimizer.zero_grad(set_to_none=True)
                    loss, _ = loss_of(model, images, labels, setting)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    return loss

                def infer(model=model, setting=setting):
                    model.eval()
                    with torch.no_grad(), autocast(setting):
                        return model(images)

                train_step()
                infer()
            except Exception as exc:  # noqa: BLE001
                row.update(status="failed", error=_failure(exc))
                continue
            timed[setting, backend] = (row, train_step, infer)

    # Every (setting, backend) takes its turn within every round, so that a drift of the
    # machine's speed (other load, frequency) hits all of them alike; a step lasts seconds on
    # CPU, so one call per measurement is enough.
    samples = {key: ([], []) for key in timed}
    for round_ in range(max(1, config.warmup) + config.repeats):
        for key, (_, train_step, infer) in timed.items():
            for fn, times in zip((train_step, infer), samples[key], strict=True):
                start = time.perf_counter()
                fn()
                _sync(device)
                if round_ >= max(1, config.warmup):
                    times.append(time.perf_counter() - start)
    for key, (row, _, _) in timed.items():
        train, infer_stats = (_summary(times) for times in samples[key])
        row.update(
            train_median_ms=train["median_ms"],
            train_iqr_ms=train["iqr_ms"],
            train_images_per_s=config.e2e_batch / (train["median_ms"] / 1e3),
            infer_median_ms=infer_stats["median_ms"],
            infer_iqr_ms=infer_stats["iqr_ms"],
            infer_images_per_s=config.e2e_batch / (infer_stats["median_ms"] / 1e3),
        )
        if echo is not None:
            echo(
                f"end-to-end {row['backend']} ({row['setting']}): train step "
                f"{row['train_median_ms']:.1f} ms, inference {row['infer_median_ms']:.1f} ms "
                f"at batch {config.e2e_batch}"
            )
    ok = {(r["backend"], r["amp"], r["channels_last"]): r for r in rows if r["status"] == "ok"}
    for (backend, amp, channels_last), row in ok.items():
        # Speed-ups over the reference router in the same setting, and over the same backend
        # in float32 with the default layout.
        bases = {
            "reference": ok.get(("reference", amp, channels_last)),
            "plain": ok.get((backend, False, False)),
        }
        for base_name, base in bases.items():
            for mode in ("train", "infer"):
                if base is not None:
                    row[f"{mode}_speedup_vs_{base_name}"] = (
                        base[f"{mode}_median_ms"] / row[f"{mode}_median_ms"]
                    )
    return rows
