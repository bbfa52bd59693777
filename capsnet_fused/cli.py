"""The `capsnet-fused` command: train, eval, visualize, report, bench and info.

Run it as `capsnet-fused ...` once installed, or `python -m capsnet_fused.cli ...` from a
checkout. `bench` is defined by capsnet_fused.benchmark (add_arguments, run), imported only
when that subcommand is chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from capsnet_fused.ops import BACKENDS

SUBCOMMANDS = ("train", "eval", "visualize", "report", "bench", "info")


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint file or run folder")
    parser.add_argument(
        "--data-dir",
        help="folder with the IDX files (default: the folder the run was trained on, "
        "recorded in its checkpoint)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument(
        "--backend",
        choices=("auto", *BACKENDS),
        help="routing backend (default: the one the run was trained with)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (256)")
    parser.add_argument(
        "--limit-test", type=int, metavar="N", help="evaluate on the first N test images only"
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON line")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )
    parser.add_argument(
        "--affine",
        type=_affine_spec,
        metavar="SPEC",
        help="evaluate on affine-perturbed test images instead (the affNIST-style robustness "
        "check): each image gets its own random transformation within SPEC, name=value pairs "
        "among rotate (degrees), shift (whole pixels), scale (factors 1 +- scale) and shear "
        "(degrees), e.g. rotate=20,shift=3",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the --affine transformations (default 0): the same seed shows every "
        "model the same images",
    )


def _affine_spec(text: str):
    """argparse type of --affine: a bad spec is a usage error naming it."""
    from capsnet_fused.robustness import AffineSpec

    try:
        return AffineSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_visualize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint file or run folder")
    parser.add_argument("--out", help="folder for the PNGs (default: the checkpoint's folder)")
    parser.add_argument("--data-dir", help="folder with the IDX files (default: as for eval)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument(
        "--backend",
        choices=("auto", *BACKENDS),
        help="routing backend (default: the one the run was trained with)",
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=16,
        help="test images in the reconstruction grid (default 16)",
    )
    parser.add_argument(
        "--num-perturbed",
        type=int,
        default=3,
        help="test images in the Figure 4 perturbation plot (default 3)",
    )
    parser.add_argument(
        "--reference",
        type=float,
        metavar="PCT",
        help="draw this test accuracy (in %%, e.g. 93.6 for the published CapsNet on "
        "Fashion-MNIST) as a horizontal line on the training curve",
    )
    parser.add_argument(
        "--reference-label",
        default="reference",
        help="legend text of the --reference line (default 'reference')",
    )


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (config.json, metrics.jsonl, checkpoint.pt)")
    parser.add_argument(
        "--out",
        help="folder for the report (default: the run folder); a README.md there keeps its "
        "text outside the report's markers",
    )
    parser.add_argument(
        "--reference",
        type=float,
        metavar="PCT",
        help="a published test accuracy in %% (e.g. 93.6), drawn on the curve and compared in "
        "the table",
    )
    parser.add_argument(
        "--reference-label",
        default="reference",
        help="name of the --reference result (default 'reference')",
    )
    parser.add_argument(
        "--no-figures",
        dest="figures",
        action="store_false",
        help="only the table and the copied files (the figures load the model and test images)",
    )
    parser.add_argument("--data-dir", help="folder with the IDX files (default: as for eval)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser. The bench flags are added only when argv selects `bench`."""
    from capsnet_fused.train import add_train_arguments

    parser = argparse.ArgumentParser(
        prog="capsnet-fused",
        description="CapsNet with fused dynamic routing: train, evaluate, plot, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train a CapsNet on MNIST or Fashion-MNIST",
        description="Train a CapsNet (Sabour et al. 2017 defaults).",
    )
    add_train_arguments(train)
    _add_eval_arguments(sub.add_parser("eval", help="test accuracy and loss of a checkpoint"))
    _add_visualize_arguments(
        sub.add_parser(
            "visualize", help="PNGs: reconstructions, Figure 4 perturbations, training curve"
        )
    )
    _add_report_arguments(
        sub.add_parser(
            "report",
            help="a run folder as documentation: results table (README.md), figures, run files",
        )
    )
    bench = sub.add_parser(
        "bench",
        help="benchmark the routing backends",
        description="Benchmark the routing backends (capsnet_fused.benchmark).",
    )
    if argv and argv[0] == "bench":
        _benchmark_module().add_arguments(bench)
    from capsnet_fused.info import add_arguments as add_info_arguments

    add_info_arguments(
        sub.add_parser(
            "info",
            help="versions, build, backends per device, CPU and GPU: what to put in a bug report",
        )
    )
    return parser


def _benchmark_module():
    try:
        import capsnet_fused.benchmark as benchmark
    except ImportError as exc:
        raise SystemExit(f"error: the bench command needs capsnet_fused.benchmark ({exc})") from exc
    return benchmark


def _eval_line(metrics: dict) -> str:
    """The one-line summary `capsnet-fused eval` prints."""
    which = "test accuracy"
    if "affine" in metrics:
        which = f"affine-perturbed ({metrics['affine']}, seed {metrics['affine_seed']}) {which}"
    loss = f"loss {metrics['loss']:.4f}"
    if "margin_loss" in metrics:
        loss += (
            f" (margin {metrics['margin_loss']:.4f}, reconstruction {metrics['recon_loss']:.4f})"
        )
    return (
        f"{which} {100 * metrics['accuracy']:.2f}% | {loss} | {metrics['images']} images | "
        f"model {metrics['model']} | backend {metrics['backend']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        if args.command == "train":
            from capsnet_fused.train import main_train

            return main_train(args, argv)
        if args.command == "eval":
            from capsnet_fused.train import evaluate_checkpoint

            metrics = evaluate_checkpoint(
                args.checkpoint,
                data_dir=args.data_dir,
                device=args.device,
                batch_size=args.batch_size,
                limit=args.limit_test,
                backend=args.backend,
                progress=args.progress,
                affine=args.affine,
                seed=args.seed,
            )
            if args.json:
                print(json.dumps(metrics))
            else:
                print(_eval_line(metrics))
            return 0
        if args.command == "visualize":
            from capsnet_fused.visualize import visualize_checkpoint

            paths = visualize_checkpoint(
                args.checkpoint,
                args.out,
                data_dir=args.data_dir,
                device=args.device,
                num_images=args.num_images,
                num_perturbed=args.num_perturbed,
                backend=args.backend,
                reference=args.reference,
                reference_label=args.reference_label,
            )
            for path in paths:
                print(f"wrote {path}")
            return 0
        if args.command == "report":
            from capsnet_fused.report import write_report

            paths = write_report(
                args.run,
                args.out,
                reference=args.reference,
                reference_label=args.reference_label,
                figures=args.figures,
                data_dir=args.data_dir,
                device=args.device,
            )
            for path in paths:
                print(f"wrote {path}")
            return 0
        if args.command == "info":
            from capsnet_fused.info import run as run_info

            return run_info(args)
        return int(_benchmark_module().run(args))
    # One line, no traceback: 2 for bad input (flags, files, checkpoints), 1 for what the
    # machine refused (full disk, permissions, a missing optional package), 130 for Ctrl-C.
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
