"""A/B of the cpp kernel of two checkouts, each with its own built _C, run in alternation.

    python bench/ab_builds.py OLD_CHECKOUT NEW_CHECKOUT --pairs 4 --out bench/results/ab.csv

Two builds of _C register the same op names, so they cannot share a process: each run is a
fresh `python -m capsnet_fused.cli bench --backends cpp` in one checkout, A B A B ..., so that
a drift of a shared machine's speed reaches both sides alike. Writes one CSV row per run and
mode (median and IQR of --repeats calls, the load average) and prints the medians of each side
and the ratios NEW / OLD pair by pair.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_side(checkout: Path, out_dir: Path, stem: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, "-m", "capsnet_fused.cli", "bench", "--backends", "cpp",
        "--batches", str(args.batch), "--no-memory", "--no-plot", "--repeats", str(args.repeats),
        "--out-dir", str(out_dir), "--name", stem,
    ]  # fmt: skip
    subprocess.run(command, cwd=checkout, check=True, capture_output=True)
    return json.loads((out_dir / f"{stem}.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="checkout A (with its _C built in place)")
    parser.add_argument("new", type=Path, help="checkout B (with its _C built in place)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True, help="CSV to write")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(1, args.pairs + 1):
            for side, checkout in (("old", args.old), ("new", args.new)):
                data = run_side(checkout.resolve(), Path(tmp), f"{side}-{pair}", args)
                env = data["environment"]
                for row in data["rows"]:
                    rows.append(
                        {
                            "pair": pair,
                            "side": side,
                            "checkout": str(checkout),
                            "git_revision": env.get("git_revision"),
                            "mode": row["mode"],
                            "B": row["B"],
                            "median_ms": round(row["median_ms"], 3),
                            "iqr_ms": round(row["iqr_ms"], 3),
                            "load_average_1min": (env.get("load_average") or [None])[0],
                            "cpu_model": env.get("cpu_model"),
                            "cpu_isa": env.get("cpu_isa"),
                            "date": env.get("date"),
                        }
                    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for mode in dict.fromkeys(r["mode"] for r in rows):
        old = [r["median_ms"] for r in rows if r["mode"] == mode and r["side"] == "old"]
        new = [r["median_ms"] for r in rows if r["mode"] == mode and r["side"] == "new"]
        ratios = ", ".join(f"{b / a:.2f}" for a, b in zip(old, new, strict=True))
        print(
            f"{mode}: old median {statistics.median(old):.1f} ms, new median "
            f"{statistics.median(new):.1f} ms; new / old pair by pair: {ratios}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
