"""The capsnet-fused command line: every flag documented, train/eval/visualize end to end."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import torch

from capsnet_fused.cli import SUBCOMMANDS, build_parser, main
from capsnet_fused.train import TrainConfig, load_checkpoint, model_from_checkpoint
from capsnet_fused.visualize import PERTURBATIONS, perturbation_images, plot_training_curve
from tests.training_data import write_synthetic_dataset

TINY = [
    "--epochs", "1", "--batch-size", "16", "--conv-channels", "6", "--kernel-size", "3",
    "--primary-caps", "2", "--primary-dim", "4", "--digit-dim", "6",
    "--decoder-hidden", "24", "32", "--no-progress", "--seed", "1",
]  # fmt: skip


def _subparser(name: str):
    parser = build_parser([name])
    action = next(a for a in parser._actions if a.dest == "command")
    return parser, action.choices[name]


def test_help_documents_every_flag(capsys):
    parser, train = _subparser("train")
    flags = {s for a in train._actions for s in a.option_strings}
    for field in dataclasses.fields(TrainConfig):
        flag = "--no-progress" if field.name == "progress" else "--" + field.name.replace("_", "-")
        assert flag in flags, f"TrainConfig.{field.name} has no flag"
    required = {
        "--resume",
        "--softmax-over",
        "--learn-prior",
        "--detach-inner",
        "--amp",
        "--routing-iterations",
        "--checkpoint-every",
        "--limit-train",
        "--limit-test",
    }
    assert required <= flags
    for name in SUBCOMMANDS[:3]:
        _, sub = _subparser(name)
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in flags)
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in SUBCOMMANDS)


def test_module_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, "-m", "capsnet_fused.cli", "eval", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and "--limit-test" in result.stdout


def test_bench_subcommand_is_wired(capsys):
    if importlib.util.find_spec("capsnet_fused.benchmark") is None:
        with pytest.raises(SystemExit, match="bench command needs capsnet_fused.benchmark"):
            main(["bench"])
        pytest.skip("capsnet_fused.benchmark is not in this checkout")
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0 and "usage: capsnet-fused bench" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data dir, run folder) of a one-epoch CLI training run on the synthetic dataset."""
    data_dir = write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_test=24)
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--data-dir", str(data_dir), "--out", str(out)]) == 0
    return data_dir, out


def test_train_then_eval(trained_run, capsys):
    data_dir, out = trained_run
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    capsys.readouterr()
    assert main(["eval", str(out / "checkpoint.pt"), "--json", "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # eval reproduces the test numbers of the end-of-epoch evaluation.
    assert metrics["images"] == 24
    assert metrics["accuracy"] == pytest.approx(record["test_accuracy"])
    assert metrics["loss"] == pytest.approx(record["test_loss"], rel=1e-5)
    assert main(["eval", str(out), "--limit-test", "5", "--no-progress"]) == 0
    assert "| 5 images |" in capsys.readouterr().out


def test_train_errors_are_reported_not_raised(trained_run, capsys):
    data_dir, out = trained_run
    assert main(["train", *TINY, "--data-dir", str(data_dir), "--out", str(out)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(["eval", str(out / "nothing.pt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_visualize_writes_pngs(trained_run, tmp_path, capsys):
    _, out = trained_run
    args = [
        "visualize",
        str(out),
        "--out",
        str(tmp_path),
        "--num-images",
        "5",
        "--num-perturbed",
        "2",
    ]
    assert main(args) == 0
    names = {"reconstructions.png", "perturbations.png", "training_curve.png"}
    assert {p.name for p in tmp_path.iterdir()} == names
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(tmp_path / name).shape[0] > 100
    assert capsys.readouterr().out.count("wrote ") == 3


def test_perturbations_move_only_the_predicted_capsule(trained_run):
    _, out = trained_run
    model, _ = model_from_checkpoint(load_checkpoint(out))
    images = torch.rand(3, 1, 12, 12)
    recon, predicted = perturbation_images(model, images)
    assert PERTURBATIONS == (-0.25, -0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
    assert recon.shape == (3, 6, 11, 1, 12, 12)
    with torch.no_grad():
        output = model(images)
        assert torch.equal(predicted, output.lengths.argmax(1))
        # Delta 0 is the plain reconstruction, for every dimension.
        for d in range(6):
            torch.testing.assert_close(recon[:, d, 5], output.reconstructions)
        # Dimension 2 of sample 1 moved by +0.25: the decoder sees only the predicted capsule.
        caps = torch.zeros_like(output.caps[1])
        caps[predicted[1]] = output.caps[1, predicted[1]]
        caps[predicted[1], 2] += 0.25
        want = model.decoder(caps.flatten()[None]).view(1, 12, 12)
    torch.testing.assert_close(recon[1, 2, 10], want)
    assert not torch.allclose(recon[1, 2, 10], recon[1, 2, 0])


def test_training_curve_needs_records(trained_run, tmp_path):
    _, out = trained_run
    png = plot_training_curve(out / "metrics.jsonl", tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no epoch records"):
        plot_training_curve(tmp_path / "empty.jsonl", tmp_path / "x.png")


# ---------------------------------------------------------------- faults (issue 14)


def _one_line_error(capsys, text: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert text in err, err


@pytest.mark.parametrize(
    "flags, text",
    [
        (["--device", "bogus"], "--device 'bogus' is not a device"),
        (["--device", "meta"], "training runs on cpu or cuda"),
        (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
        (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
        (["--recon-scale", "-1"], "recon_scale must be a finite number >= 0"),
    ],
    ids=["device-bogus", "device-meta", "lr-inf", "lr-nan", "recon-negative"],
)
def test_bad_train_flags_are_one_line_errors(trained_run, tmp_path, capsys, flags, text):
    data_dir, _ = trained_run
    out = tmp_path / "run"
    args = ["train", *TINY, "--data-dir", str(data_dir), "--out", str(out), *flags]
    assert main(args) == 2
    _one_line_error(capsys, text)
    assert not out.exists()


def test_out_that_is_a_file_is_a_one_line_error(trained_run, tmp_path, capsys):
    data_dir, _ = trained_run
    (tmp_path / "file").write_text("x")
    args = ["train", *TINY, "--data-dir", str(data_dir), "--out", str(tmp_path / "file")]
    assert main(args) == 2
    _one_line_error(capsys, "is a file, not a folder")


def test_config_json_passed_as_a_checkpoint_is_a_one_line_error(trained_run, capsys):
    _, out = trained_run
    assert main(["eval", str(out / "config.json"), "--no-progress"]) == 2
    _one_line_error(capsys, "it is a JSON file; pass the run folder or its checkpoint.pt")
    assert main(["train", "--resume", str(out / "config.json")]) == 2
    _one_line_error(capsys, "it is a JSON file")


def test_resume_with_nothing_left_to_do_says_so(trained_run, capsys):
    _, out = trained_run
    before = (out / "config.json").read_bytes()
    assert main(["train", "--resume", str(out), "--epochs", "1", "--no-progress"]) == 0
    assert "has already trained 1 epochs (--epochs 1); nothing to do" in capsys.readouterr().out
    assert (out / "config.json").read_bytes() == before


def test_full_disk_is_a_one_line_error(trained_run, tmp_path, capsys, monkeypatch):
    data_dir, _ = trained_run

    def full(obj, handle, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data-dir", str(data_dir), "--out", str(out)]) == 1
    _one_line_error(capsys, f"could not write {out / 'checkpoint.pt'}")


def test_ctrl_c_outside_training_is_one_line(trained_run, capsys, monkeypatch):
    import capsnet_fused.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "evaluate_checkpoint", interrupted)
    assert main(["eval", str(trained_run[1])]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_visualize_without_matplotlib_fails_cleanly(trained_run, tmp_path, capsys, monkeypatch):
    _, out = trained_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    target = tmp_path / "figures"
    assert main(["visualize", str(out), "--out", str(target)]) == 1
    _one_line_error(capsys, "pip install capsnet-fused[plots]")
    assert not target.exists()


@pytest.mark.parametrize(
    "signum, workers",
    [(signal.SIGTERM, 0), (signal.SIGINT, 2)],
    ids=["SIGTERM-to-the-process", "SIGINT-to-the-group-with-workers"],
)
def test_signal_stops_training_with_a_checkpoint(trained_run, tmp_path, signum, workers):
    # A real process and a real signal: SIGTERM as a scheduler sends it before preempting a
    # job; SIGINT to the whole process group as Ctrl-C in a terminal sends it, DataLoader
    # workers included (they leave it to the main process).
    data_dir, _ = trained_run
    out = tmp_path / "run"
    args = [*TINY, "--epochs", "100000", "--checkpoint-every", "1", "--num-workers", str(workers)]
    command = [sys.executable, "-m", "capsnet_fused.cli", "train", *args]
    command += ["--data-dir", str(data_dir), "--out", str(out)]
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        command, cwd=repo, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        os.killpg(proc.pid, signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    assert err.count(f"{name} received: stopping after the current step") == 1, err
    assert f"stopped by {name}; {out / 'checkpoint.pt'} holds" in err
    assert f"Continue with: capsnet-fused train --resume {out}" in err
    assert "Traceback" not in err
    state = load_checkpoint(out)
    assert state["step"] >= 1 and not [p for p in out.iterdir() if ".tmp-" in p.name]
