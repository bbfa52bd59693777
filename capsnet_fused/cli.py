"""The `capsnet-fused` command: train, eval, visualize, bench and info.

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

SUBCOMMANDS = ("train", "eval", "visualize", "bench", "info")


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        if args.command == "train":
            from capsnet_fused.train import main_train

            return main_train(args)
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
            )
            if args.json:
                print(json.dumps(metrics))
            else:
                print(
                    f"test accuracy {100 * metrics['accuracy']:.2f}% | loss "
                    f"{metrics['loss']:.4f} (margin {metrics['margin_loss']:.4f}, "
                    f"reconstruction {metrics['recon_loss']:.4f}) | {metrics['images']} "
                    f"images | backend {metrics['backend']}"
                )
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
