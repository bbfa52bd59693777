"""The benchmark library on tiny shapes: structure, refusal of wrong results, files, plot."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch

import capsnet_fused
from capsnet_fused import benchmark as bm
from capsnet_fused import info, ops, reference_routing
from capsnet_fused.benchmark.cli import _cpu_line
from capsnet_fused.benchmark.environment import _cpu_kernel_fields
from capsnet_fused.benchmark.measure import _summary, time_calls_interleaved
from tests.helpers import reference64, rel_error, run_with_grads

TINY = "32x4x4x8"
CPU = torch.device("cpu")


def tiny_config(**overrides) -> bm.BenchConfig:
    settings = dict(
        shapes=(TINY,),
        batches=(2,),
        iterations=(2,),
        backends=("reference", "cpp"),
        repeats=2,
        warmup=1,
        min_measure_s=0.001,
        memory=False,
        device="cpu",
    )
    settings.update(overrides)
    return bm.BenchConfig(**settings)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times 1.5: a backend whose forward is right, backward wrong."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return 1.5 * grad


def _correct(u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps):
    return reference_routing(
        u, weight, iterations, prior=prior, bias=bias, softmax_over=softmax_over,
        detach_inner=detach_inner, leaky=leaky, squash_eps=squash_eps,
    )  # fmt: skip


def _wrong_forward(*args):
    return 1.05 * _correct(*args)


def _wrong_backward(u, *args):
    return _correct(_ScaleGrad.apply(u), *args)


def _raises(*args):
    raise RuntimeError("kernel exploded")


@pytest.fixture
def fake_cpp(monkeypatch):
    """Install a fake "cpp" backend module (the registry's contract) with a given routing."""

    def install(routing):
        module = SimpleNamespace(unavailable_reason=lambda device, dtype: None, routing=routing)
        monkeypatch.setitem(ops._MODULES, "cpp", module)

    return install


def _by(rows, backend, mode):
    (row,) = [r for r in rows if r["backend"] == backend and r["mode"] == mode]
    return row


def test_default_backends_run_and_report_structure():
    # Forward only: compiling the fwd+bwd graph too would double this test's time on a cold
    # inductor cache; test_correct_fused_backend_is_timed covers the fwd+bwd rows.
    rows = bm.run_routing_benchmark(tiny_config(backends=(), modes=("forward",)))
    backends = [r["backend"] for r in rows]
    assert backends[:2] == ["reference", "compiled"]
    assert "triton" not in backends  # the interpreter is not a speed path
    ref, comp = rows[0], rows[1]
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert (row["B"], row["I"], row["J"], row["N"], row["M"], row["R"]) == (2, 32, 4, 4, 8, 2)
        assert (row["mode"], row["dtype"], row["variant"]) == ("forward", "float32", "out_caps")
        assert row["runs"] == 2
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["iqr_ms"] >= 0
        assert set(row["rel_errors"]) == {"v"}
        assert row["rel_errors"]["v"] <= row["tolerances"]["v"] == 1e-4
        assert row["speedup_vs_reference"] == pytest.approx(ref["median_ms"] / row["median_ms"])
        assert row["speedup_vs_compiled"] == pytest.approx(comp["median_ms"] / row["median_ms"])
        assert row["peak_bytes"] is None  # memory=False
    assert ref["speedup_vs_reference"] == pytest.approx(1.0)


def test_recorded_error_is_the_float64_comparison():
    case = bm.build_cases(tiny_config(variants=(bm.Variant("in_caps", True, False),)))[-1]
    assert case.mode == "forward+backward"
    (row,) = bm.run_case(case, ["reference"], tiny_config(), CPU)
    inputs = bm.make_case_inputs(case, CPU)
    args = [inputs[k] for k in ("u", "weight", "prior", "grad")]
    kwargs = dict(iterations=case.R, softmax_over="in_caps")
    v32, grads32 = run_with_grads(reference_routing, *args, **kwargs)
    v64, grads64 = reference64(*args, **kwargs)
    names = ("v", "du", "dweight", "dprior")
    for name, got, want in zip(names, [v32, *grads32], [v64, *grads64], strict=True):
        assert row["rel_errors"][name] == pytest.approx(rel_error(got, want), rel=1e-6)
        assert 0 < row["rel_errors"][name] < 1e-5


def test_correct_fused_backend_is_timed(fake_cpp):
    fake_cpp(_correct)
    rows = bm.run_routing_benchmark(tiny_config(variants=(bm.Variant("out_caps", True, True),)))
    assert len(rows) == 4
    for mode in bm.MODES:
        row, ref = _by(rows, "cpp", mode), _by(rows, "reference", mode)
        assert row["status"] == "ok", row["error"]
        names = {"v"} if mode == "forward" else {"v", "du", "dweight", "dprior"}
        assert set(row["rel_errors"]) == names
        assert row["median_ms"] > 0
        assert row["speedup_vs_reference"] == pytest.approx(ref["median_ms"] / row["median_ms"])
        assert row["speedup_vs_compiled"] is None  # not benchmarked in this run


@pytest.mark.parametrize(
    "routing, failing_modes, culprit",
    [
        (_wrong_forward, bm.MODES, "v: relative error"),
        (_wrong_backward, ("forward+backward",), "du: relative error"),
        (_raises, bm.MODES, "RuntimeError: kernel exploded"),
    ],
    ids=["wrong-forward", "wrong-backward", "raises"],
)
def test_wrong_backend_is_refused(fake_cpp, routing, failing_modes, culprit):
    fake_cpp(routing)
    rows = bm.run_routing_benchmark(tiny_config())
    for mode in bm.MODES:
        row, ref = _by(rows, "cpp", mode), _by(rows, "reference", mode)
        assert ref["status"] == "ok" and ref["median_ms"] > 0
        if mode not in failing_modes:
            assert row["status"] == "ok"
            continue
        assert row["status"] == "failed"
        assert culprit in row["error"]
        for key in ("median_ms", "peak_bytes", "speedup_vs_reference", "mem_saving_vs_reference"):
            assert row[key] is None, key
    if routing is _wrong_forward:
        # The recorded error is the 5% the fake backend added.
        assert _by(rows, "cpp", "forward")["rel_errors"]["v"] == pytest.approx(0.05, rel=1e-3)
    assert "failed: " in bm.format_table(rows)


def test_cpu_memory_is_the_routing_footprint(fake_cpp):
    # The reference materialises u_hat [B, I, J, M] (5 MiB here) and autograd keeps a few such
    # tensors: its peak is at least u_hat and far below the ~200 MiB that importing torch
    # costs, which the baseline must exclude. Measured in a fresh subprocess; the wrong fake
    # backend never reaches it (it exists in this process only).
    fake_cpp(_wrong_forward)
    case = bm.Case("t", 32, 256, 10, 8, 16, 2, "float32", bm.Variant(), "forward+backward")
    ref, cpp = bm.run_case(case, ["reference", "cpp"], tiny_config(memory=True), CPU)
    u_hat_bytes = 32 * 256 * 10 * 16 * 4
    assert u_hat_bytes <= ref["peak_bytes"] <= 20 * u_hat_bytes
    assert "peak RSS" in ref["memory_method"]
    assert ref["mem_saving_vs_reference"] == pytest.approx(1.0)
    assert cpp["status"] == "failed" and cpp["peak_bytes"] is None


def test_results_files_and_plot(fake_cpp, tmp_path):
    fake_cpp(_wrong_forward)
    rows = bm.run_routing_benchmark(tiny_config(batches=(1, 2)))
    env = bm.environment_info(CPU)
    paths = bm.write_results(rows, env, tmp_path, "cpu", tiny_config())
    data = json.loads(paths["json"].read_text())
    for key in (
        "torch",
        "triton",
        "capsnet_fused",
        "git_revision",
        "date",
        "device_name",
        "cpu_model",
        "cpu_cores",
        "available_backends",
    ):
        assert key in data["environment"], key
    assert data["environment"]["torch"] == torch.__version__
    assert data["environment"]["capsnet_fused"] == capsnet_fused.__version__
    assert len(data["rows"]) == len(rows) == 8
    with paths["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 8
    for field in (
        "torch",
        "triton",
        "capsnet_fused",
        "git_revision",
        "device_name",
        "median_ms",
        "status",
        "error",
        "max_rel_error",
        "tolerance",
    ):
        assert field in table[0], field
    assert {r["torch"] for r in table} == {torch.__version__}
    failed = [r for r in table if r["status"] == "failed"]
    assert len(failed) == 4 and all(r["median_ms"] == "" for r in failed)
    ok = [r for r in table if r["status"] == "ok"]
    assert all(float(r["max_rel_error"]) <= float(r["tolerance"]) for r in ok)

    png = bm.plot_results(rows, tmp_path / "cpu.png", title="test")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bm.plot_results([r for r in rows if r["status"] == "failed"], tmp_path / "x.png") is None


def _parse(argv):
    parser = argparse.ArgumentParser()
    bm.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_run_writes_named_files(tmp_path, capsys, fake_cpp):
    argv = [
        "--shapes",
        TINY,
        "--batches",
        "1,2",
        "--iterations",
        "2",
        "--modes",
        "fwd",
        "--backends",
        "reference,cpp",
        "--repeats",
        "1",
        "--no-memory",
        "--device",
        "cpu",
        "--out-dir",
        str(tmp_path),
        "--variants",
        "in_caps-prior-detach",
    ]
    fake_cpp(_correct)
    assert bm.run(_parse(argv)) == 0
    out = capsys.readouterr().out
    assert "median ms" in out and "in_caps-prior-detach" in out
    assert {p.name for p in tmp_path.iterdir()} == {"cpu.csv", "cpu.json", "cpu.png"}
    rows = json.loads((tmp_path / "cpu.json").read_text())["rows"]
    assert {(r["backend"], r["B"], r["status"]) for r in rows} == {
        (b, batch, "ok") for b in ("reference", "cpp") for batch in (1, 2)
    }
    fake_cpp(_wrong_forward)
    assert bm.run(_parse([*argv, "--no-plot", "--name", "bad"])) == 1
    assert (tmp_path / "bad.json").exists() and not (tmp_path / "bad.png").exists()


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="IxJxNxM"):
        bm.parse_shape("mnist2")
    with pytest.raises(ValueError, match="-prior"):
        bm.parse_variant("out_caps-fast")
    with pytest.raises(ValueError, match="dtype"):
        bm.build_cases(tiny_config(dtypes=("float8",)))
    with pytest.raises(ValueError, match="batch"):
        bm.build_cases(tiny_config(batches=(0,)))
    with pytest.raises(ValueError, match="backend"):
        bm.benchmark_backends(tiny_config(backends=("cuda-magic",)), CPU, torch.float32)
    with pytest.raises(SystemExit):
        _parse(["--modes", "sideways"])
    assert bm.run(_parse(["--dtypes", "float8"])) == 2
    assert bm.run(_parse(["--backends", "reference,warp"])) == 2


def test_grid_defaults_and_full():
    default = bm.build_cases(bm.BenchConfig(device="cpu"))
    assert {(c.shape, c.R, c.dtype, c.variant.id) for c in default} == {
        ("mnist", 3, "float32", "out_caps")
    }
    assert sorted({c.B for c in default}) == [1, 8, 32, 128]
    assert {c.mode for c in default} == set(bm.MODES)
    full = bm.build_cases(bm.BenchConfig(device="cpu", full=True))
    assert {c.shape for c in full} == {"mnist", "cifar10", "smallnorb"}
    assert {c.R for c in full} == {1, 3, 5}
    assert len(full) == 3 * 4 * 3 * 2
    variants = bm.build_cases(tiny_config(variants=tuple(bm.ALL_VARIANTS)))
    assert len({c.variant for c in variants}) == 8


def test_cpu_timing_alternates_between_backends():
    # The backends of a case are measured in turns, so that a drift of the machine's speed
    # reaches all of them alike: after each one's warm-up, the calls go a b c a b c ...
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    stats = time_calls_interleaved(fns, torch.device("cpu"), repeats=3, warmup=2, min_measure_s=0)
    assert calls == list("aabbcc") + list("abc") * 3
    assert set(stats) == set("abc") and all(s["runs"] == 3 for s in stats.values())


def test_a_function_that_fails_while_timed_leaves_the_others_timed():
    calls = []

    def flaky():
        calls.append("b")
        if len([c for c in calls if c == "b"]) == 4:  # the second timed measurement
            raise RuntimeError("lost the device")

    fns = {"a": lambda: calls.append("a"), "b": flaky, "c": lambda: calls.append("c")}
    stats = time_calls_interleaved(fns, torch.device("cpu"), repeats=3, warmup=2, min_measure_s=0)
    assert list(stats) == ["a", "b", "c"]
    assert isinstance(stats["b"], RuntimeError)
    assert stats["a"]["runs"] == stats["c"]["runs"] == 3
    assert calls == list("aabbcc") + list("abc") * 2 + list("ac")


def test_tolerance_rule_and_summary():
    tols = bm.tolerances_for(torch.float32, {"v": 1e-7, "du": 3e-4}, None)
    assert tols == {"v": 1e-4, "du": 6e-4}
    assert bm.tolerances_for(torch.bfloat16, {"v": 0.02}, None) == {"v": 0.04}
    assert bm.tolerances_for(torch.float32, {"v": 1e-7}, 1e-2) == {"v": 1e-2}
    assert bm.check_errors({"v": 1e-5, "du": math.nan}, {"v": 1e-4, "du": 1e-4}).startswith("du")
    stats = _summary([0.001, 0.002, 0.003, 0.004, 0.005])
    assert stats["median_ms"] == pytest.approx(3.0)
    assert stats["iqr_ms"] == pytest.approx(2.0)
    assert (stats["min_ms"], stats["max_ms"], stats["runs"]) == (pytest.approx(1.0), 5.0, 5)


SMALL_CAPSNET = dict(
    image_size=20,
    num_classes=3,
    conv_channels=8,
    kernel_size=5,
    primary_caps=2,
    primary_dim=4,
    digit_dim=4,
    decoder_hidden=(16, 16),
)


def test_end_to_end_checks_and_times(fake_cpp):
    config = tiny_config(e2e_batch=4, repeats=1, model_kwargs=SMALL_CAPSNET)
    fake_cpp(_correct)
    rows = bm.run_end_to_end(config)
    assert [r["backend"] for r in rows] == ["reference", "cpp"]
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert row["train_images_per_s"] == pytest.approx(4 / (row["train_median_ms"] / 1e3))
        assert row["infer_images_per_s"] > 0 and row["train_speedup_vs_reference"] > 0
    fake_cpp(_wrong_backward)
    rows = bm.run_end_to_end(config)
    assert rows[1]["status"] == "failed" and "d_conv1_weight" in rows[1]["error"]
    assert rows[1]["train_images_per_s"] is None
    assert "failed: wrong result" in bm.format_e2e_table(rows)


def test_end_to_end_times_every_amp_and_layout_setting(fake_cpp):
    both = (False, True)
    config = tiny_config(
        e2e_batch=4,
        repeats=1,
        model_kwargs=SMALL_CAPSNET,
        e2e_amp=both,
        e2e_channels_last=both,
    )
    fake_cpp(_correct)
    rows = bm.run_end_to_end(config)
    assert [(r["backend"], r["amp"], r["channels_last"]) for r in rows] == [
        (backend, amp, last) for amp in both for last in both for backend in ("reference", "cpp")
    ]
    by_key = {(r["backend"], r["amp"], r["channels_last"]): r for r in rows}
    for (backend, amp, last), row in by_key.items():
        assert row["status"] == "ok", row["error"]
        assert row["autocast_dtype"] == ("torch.bfloat16" if amp else None)
        plain = by_key[backend, False, False]
        ref = by_key["reference", amp, last]
        assert row["train_speedup_vs_plain"] == pytest.approx(
            plain["train_median_ms"] / row["train_median_ms"]
        )
        assert row["infer_speedup_vs_reference"] == pytest.approx(
            ref["infer_median_ms"] / row["infer_median_ms"]
        )
        # Under autocast the check allows twice the reference router's own bfloat16 error.
        assert min(row["tolerances"].values()) >= 1e-3
    table = bm.format_e2e_table(rows)
    assert "bfloat16 channels_last" in table and "float32 contiguous" in table
    # A wrong gradient is still refused under autocast: its error is far above bfloat16's.
    fake_cpp(_wrong_backward)
    amp_only = dataclasses.replace(config, e2e_amp=(True,), e2e_channels_last=(False,))
    rows = bm.run_end_to_end(amp_only)
    assert rows[1]["status"] == "failed" and "wrong result" in rows[1]["error"]


@pytest.mark.parametrize("native", [True, False])
def test_end_to_end_adds_and_marks_the_training_default(fake_cpp, monkeypatch, native):
    # bench --end-to-end also times what `train` uses here by default (bfloat16 autocast with
    # channels-last on a CPU with native bfloat16), with its speed-up over float32's reference.
    monkeypatch.setattr(info, "cpu_has_native_bfloat16", lambda: native)
    config = tiny_config(e2e_batch=4, repeats=1, model_kwargs=SMALL_CAPSNET)
    config = dataclasses.replace(config, e2e_train_default=True)
    fake_cpp(_correct)
    rows = bm.run_end_to_end(config)
    settings = [(False, False), (True, True)] if native else [(False, False)]
    assert [(r["backend"], r["amp"], r["channels_last"]) for r in rows] == [
        (backend, *setting) for setting in settings for backend in ("reference", "cpp")
    ]
    assert [r["train_default"] for r in rows] == [
        s == (native, native) for s in settings for _ in "ab"
    ]
    ref32 = rows[0]
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert row["train_speedup_vs_reference_float32"] == pytest.approx(
            ref32["train_median_ms"] / row["train_median_ms"]
        )
    table = bm.format_e2e_table(rows)
    default = "bfloat16 channels_last*" if native else "float32 contiguous*"
    assert default in table and "x ref32" in table


def test_end_to_end_flags():
    config = bm.config_from_args(_parse(["--end-to-end", "--amp", "--channels-last"]))
    assert tuple(config.e2e_amp) == (False, True)
    assert tuple(config.e2e_channels_last) == (False, True)
    plain = bm.config_from_args(_parse(["--end-to-end"]))
    assert bm.e2e_settings(plain) == [bm.E2ESetting()] and plain.e2e_train_default


def test_end_to_end_rows_name_the_cpu_kernel_clone():
    pytest.importorskip("capsnet_fused._C", reason="capsnet_fused._C is not built")
    fields = _cpu_kernel_fields(CPU)
    assert fields["cpp_clone"] in ("x86-64-v4", "x86-64-v3", "default")
    assert fields["cpu_l2_bytes_per_core"] >= 0
    assert _cpu_kernel_fields(torch.device("meta")) == {}


_CLI_TINY = [
    "--shapes", TINY, "--batches", "1", "--iterations", "1", "--modes", "fwd",
    "--backends", "reference", "--repeats", "1", "--no-memory", "--device", "cpu",
]  # fmt: skip


def test_results_go_to_the_working_directory_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bm.run(_parse([*_CLI_TINY, "--no-plot"])) == 0
    assert {p.name for p in (tmp_path / "bench-results").iterdir()} == {"cpu.csv", "cpu.json"}


def test_missing_matplotlib_skips_only_the_plot(tmp_path, monkeypatch, capsys):
    # None in sys.modules makes `import matplotlib` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert bm.run(_parse([*_CLI_TINY, "--out-dir", str(tmp_path)])) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"cpu.csv", "cpu.json"}
    assert "pip install capsnet-fused[plots]" in capsys.readouterr().err


def test_cpu_results_name_the_isa_and_the_kernel_path():
    # The CPU's model name alone does not say which kernels ran (a VM reports "AMD EPYC" for
    # Zen 1 to Zen 5): the environment records family/model, the vector ISA and the cpp path.
    try:
        with open("/proc/cpuinfo") as handle:
            text = handle.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
    env = bm.environment_info(CPU)
    assert env["cpu_isa"].startswith("family ")
    for flag in ("avx2", "avx512f", "avx512_bf16"):
        assert (f" {flag}" in env["cpu_isa"]) == (flag in flags), flag
    line = _cpu_line(env)
    assert env["cpu_isa"] in line
    if "cpp_clone" in env:
        assert env["cpp_clone"] in ("x86-64-v4", "x86-64-v3", "default")
        assert env["cpp_u_hat_cache"] in ("auto", "on", "off")
        assert f"cpp clone {env['cpp_clone']}" in line
