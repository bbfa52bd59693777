"""The end-to-end benchmark (--end-to-end): a CapsNet training step (forward, margin +
reconstruction loss, backward, Adam step) and an inference forward, images per second, with
the reference router and every fused backend; optionally also under autocast (--amp) and with
channels-last convolutions (--channels-last), and (from the CLI) in what `capsnet-fused train`
uses on the machine by default (train.model.resolve_auto_settings).

run_end_to_end takes these steps: one batch and the float32 reference model's outputs and
gradients on it (_E2ERun.load_batch); every (setting, backend) checked against them, its
training step and inference warmed up (_checked_rows); all of them timed in interleaved rounds
(_time_rounds, _record_times); the speed-ups (_add_speedups).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from capsnet_fused.benchmark.cases import BenchConfig, _device, benchmark_backends, skip_reason
from capsnet_fused.benchmark.check import _failure, _rel_error, passes_check
from capsnet_fused.benchmark.environment import _cpu_kernel_fields
from capsnet_fused.benchmark.measure import _summary, _sync
from capsnet_fused.train.config import TrainConfig
from capsnet_fused.train.model import resolve_auto_settings

# What the check compares: the capsule lengths [B, J] and the gradients of the digit weight
# [I, J, N, M] and of conv1's weight.
_CHECKED = ("lengths", "d_digit_weight", "d_conv1_weight")


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


def e2e_settings(config: BenchConfig, device: torch.device | None = None) -> list[E2ESetting]:
    """Every combination of the config's autocast and layout choices, plain first; then, with
    config.e2e_train_default, the device's training default when it is not among them."""
    settings = [E2ESetting(a, c) for a in config.e2e_amp for c in config.e2e_channels_last]
    if config.e2e_train_default and device is not None:
        default = train_default_setting(device)
        settings += [default] if default not in settings else []
    return settings


def train_default_setting(device: torch.device) -> E2ESetting:
    """What `capsnet-fused train` uses on `device` without --amp and --channels-last."""
    settled, _ = resolve_auto_settings(TrainConfig(), device)
    return E2ESetting(bool(settled.amp), bool(settled.channels_last))


# By (setting, backend): its result row with its warmed-up training step and inference, and
# the times in seconds of those two calls.
_Timed = dict[tuple[E2ESetting, str], tuple[dict[str, Any], Callable, Callable]]
_Samples = dict[tuple[E2ESetting, str], tuple[list[float], list[float]]]


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

    device = _device(config)
    wanted = [b for b in benchmark_backends(config, device, torch.float32) if b != "compiled"]
    # The training loss, as `capsnet-fused train` computes it.
    run = _E2ERun(config, device, CapsNetLoss())
    cpu_kernel_fields = _cpu_kernel_fields(device)
    run.load_batch()
    rows, timed = _checked_rows(run, wanted, cpu_kernel_fields)
    samples = _time_rounds(timed, config, device)
    _record_times(timed, samples, config, echo)
    _add_speedups(rows)
    return rows


@dataclass
class _E2ERun:
    """What the steps of one end-to-end run share: the config, the device, the training loss,
    one batch (images, labels) and the float32 reference model's check pass on it (expected)."""

    config: BenchConfig
    device: torch.device
    criterion: torch.nn.Module
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    expected: list[torch.Tensor] = field(default_factory=list)

    def build(self, backend: str, setting: E2ESetting) -> torch.nn.Module:
        """A CapsNet with the backend's router, initialised from the config's seed."""
        from capsnet_fused.models import CapsNet

        torch.manual_seed(self.config.seed)
        model = CapsNet(
            backend=backend, channels_last=setting.channels_last, **self.config.model_kwargs
        )
        return model.to(self.device)

    def autocast(self, setting: E2ESetting):
        return torch.autocast(
            self.device.type, dtype=autocast_dtype(self.device), enabled=setting.amp
        )

    def loss_of(self, model, setting):
        with self.autocast(setting):
            out = model(self.images, self.labels)
            loss, _margin, _recon = self.criterion(out, self.images, self.labels)
        return loss, out

    def check_pass(self, model, setting):
        """One forward and backward pass on the batch -> the _CHECKED tensors in float32."""
        model.zero_grad(set_to_none=True)
        loss, out = self.loss_of(model, setting)
        loss.backward()
        grads = [model.digit.weight.grad, model.conv1[0].weight.grad]
        return [out.lengths.detach().float()] + [g.detach().float().clone() for g in grads]

    def errors_of(self, got):
        """Relative errors of check_pass tensors against the reference's (expected)."""
        return {n: _rel_error(g, w) for n, g, w in zip(_CHECKED, got, self.expected, strict=True)}

    def load_batch(self) -> None:
        """The batch (from the config's seed) and the float32 reference model's check pass on
        it in the default layout, which every backend and setting is checked against."""
        plain = E2ESetting()
        self.images, self.labels = _e2e_inputs(
            self.build("reference", plain), self.config.e2e_batch, self.device, self.config.seed
        )
        self.expected = self.check_pass(self.build("reference", plain), plain)


def _checked_rows(
    run: _E2ERun, wanted: list[str], cpu_kernel_fields: dict[str, Any]
) -> tuple[list[dict[str, Any]], _Timed]:
    """A row per (setting, backend), checked against the reference; the rows that passed with
    their warmed-up calls, by (setting, backend)."""
    config, device = run.config, run.device
    floor = config.rtol if config.rtol is not None else 1e-3
    rows = []
    timed: _Timed = {}
    for setting in e2e_settings(config, device):
        reference_model = run.build("reference", setting)
        tolerances = dict.fromkeys(_CHECKED, floor)
        if setting.amp:
            drift = run.errors_of(run.check_pass(reference_model, setting))
            tolerances = {n: max(floor, 2 * drift[n]) for n in _CHECKED}
        for backend in wanted:
            row = _e2e_row(backend, setting, config, device, cpu_kernel_fields)
            rows.append(row)
            reason = skip_reason(backend, device)
            if reason is not None:
                row.update(status="skipped", error=reason)
                continue
            calls = _checked_calls(run, row, backend, setting, reference_model, tolerances)
            if calls is not None:
                timed[setting, backend] = (row, *calls)
    return rows, timed


def _e2e_row(
    backend: str,
    setting: E2ESetting,
    config: BenchConfig,
    device: torch.device,
    cpu_kernel_fields: dict[str, Any],
) -> dict[str, Any]:
    """A (setting, backend)'s result row, nothing measured yet."""
    return {
        "backend": backend,
        "device": device.type,
        "batch": config.e2e_batch,
        "amp": setting.amp,
        "autocast_dtype": str(autocast_dtype(device)) if setting.amp else None,
        "channels_last": setting.channels_last,
        "setting": setting.label(device),
        "train_default": setting == train_default_setting(device),
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
        "train_speedup_vs_reference_float32": None,
        "infer_speedup_vs_reference_float32": None,
    }


def _checked_calls(
    run: _E2ERun,
    row: dict[str, Any],
    backend: str,
    setting: E2ESetting,
    reference_model: torch.nn.Module,
    tolerances: dict[str, float],
) -> tuple[Callable, Callable] | None:
    """The backend's model checked against the reference (its errors go on the row), then its
    training step and inference, each called once; None, with the row marked failed, when the
    check or a call fails."""
    try:
        model = reference_model if backend == "reference" else run.build(backend, setting)
        errors = run.errors_of(run.check_pass(model, setting))
        if not passes_check(row, errors, tolerances):
            return None
        train_step, infer = _calls(run, model, setting)
        train_step()
        infer()
    except Exception as exc:  # noqa: BLE001
        row.update(status="failed", error=_failure(exc))
        return None
    return train_step, infer


def _calls(run: _E2ERun, model: torch.nn.Module, setting: E2ESetting) -> tuple[Callable, Callable]:
    """The timed calls of a model: a training step (forward, loss, backward, Adam step, with a
    GradScaler under autocast on CUDA) and an inference forward."""
    device = run.device
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=setting.amp and device.type == "cuda")

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = run.loss_of(model, setting)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    def infer():
        model.eval()
        with torch.no_grad(), run.autocast(setting):
            return model(run.images)

    return train_step, infer


def _time_rounds(timed: _Timed, config: BenchConfig, device: torch.device) -> _Samples:
    """(training step times, inference times) in seconds of every (setting, backend)."""
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
    return samples


def _record_times(
    timed: _Timed,
    samples: _Samples,
    config: BenchConfig,
    echo: Callable[[str], None] | None,
) -> None:
    """Medians, IQRs and images per second on the rows; a progress line each to echo."""
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


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """Speed-ups of the rows that passed (baseline time / time, > 1 = faster)."""
    ok = {(r["backend"], r["amp"], r["channels_last"]): r for r in rows if r["status"] == "ok"}
    for (backend, amp, channels_last), row in ok.items():
        # Speed-ups over the reference router in the same setting, over the same backend in
        # float32 with the default layout, and over the reference router in float32 with the
        # default layout.
        bases = {
            "reference": ok.get(("reference", amp, channels_last)),
            "plain": ok.get((backend, False, False)),
            "reference_float32": ok.get(("reference", False, False)),
        }
        for base_name, base in bases.items():
            for mode in ("train", "infer"):
                if base is not None:
                    row[f"{mode}_speedup_vs_{base_name}"] = (
                        base[f"{mode}_median_ms"] / row[f"{mode}_median_ms"]
                    )
