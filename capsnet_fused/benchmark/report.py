"""Reporting: the routing and end-to-end text tables, the result files (<stem>.json with
the environment, config and rows; <stem>.csv, one flat row per result) and the PNG plot.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from capsnet_fused.benchmark.cases import MODES, BenchConfig

# (header, row key, width, format) of the routing table.
_COLUMNS = [
    ("shape", "shape", 9, "{}"),
    ("B", "B", 4, "{}"),
    ("R", "R", 2, "{}"),
    ("dtype", "dtype", 8, "{}"),
    ("variant", "variant", 9, "{}"),
    ("mode", "mode", 16, "{}"),
    ("backend", "backend", 9, "{}"),
    ("median ms", "median_ms", 10, "{:.3f}"),
    ("IQR ms", "iqr_ms", 8, "{:.3f}"),
    ("peak MiB", "peak_bytes", 9, "{:.1f}"),
    ("x ref", "speedup_vs_reference", 6, "{:.2f}"),
    ("x comp", "speedup_vs_compiled", 6, "{:.2f}"),
    ("mem x ref", "mem_saving_vs_reference", 9, "{:.2f}"),
]


def _status(row: dict) -> str:
    """A row's status: ok, or failed or skipped with the reason."""
    return row["status"] if row["status"] == "ok" else f"{row['status']}: {row['error']}"


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "peak_bytes":
        value = value / 2**20
    return fmt.format(value)


def format_table(
    rows: list[dict],
    header: bool = True,
    header_only: bool = False,
    widths: dict[str, int] | None = None,
) -> str:
    """Fixed-width text table of routing rows; failed and skipped rows show their reason.

    widths: column widths by row key, for columns wider than the defaults (long variant ids).
    """
    columns = [(h, k, max(w, (widths or {}).get(k, 0)), f) for h, k, w, f in _COLUMNS]
    lines = []
    if header or header_only:
        lines.append(" ".join(f"{h:>{w}}" for h, _, w, _ in columns) + "  status")
        if header_only:
            return lines[0]
    for row in rows:
        cells = " ".join(f"{_cell(row, k, f):>{w}}" for _, k, w, f in columns)
        lines.append(f"{cells}  {_status(row)}")
    return "\n".join(lines)


def format_e2e_table(rows: list[dict]) -> str:
    """Text table of end-to-end rows; failed and skipped rows show their reason."""
    lines = [
        f"{'backend':>9} {'setting':>25} {'batch':>5} {'train ms':>9} {'train img/s':>11} "
        f"{'x ref':>6} {'x plain':>7} {'x ref32':>7} {'infer ms':>9} {'infer img/s':>11} "
        f"{'x ref':>6} {'x plain':>7} {'x ref32':>7}  status"
    ]
    for row in rows:
        marked = "*" if row.get("train_default") else ""
        setting = row.get("setting", "float32 contiguous") + marked
        cells = [f"{row['backend']:>9} {setting:>25} {row['batch']:>5}"]
        for mode in ("train", "infer"):
            cells += [
                f"{_cell(row, f'{mode}_median_ms', '{:.1f}'):>9}",
                f"{_cell(row, f'{mode}_images_per_s', '{:.1f}'):>11}",
                f"{_cell(row, f'{mode}_speedup_vs_reference', '{:.2f}'):>6}",
                f"{_cell(row, f'{mode}_speedup_vs_plain', '{:.2f}'):>7}",
                f"{_cell(row, f'{mode}_speedup_vs_reference_float32', '{:.2f}'):>7}",
            ]
        lines.append(f"{' '.join(cells)}  {_status(row)}")
    if any(row.get("train_default") for row in rows):
        lines.append(
            "* what `capsnet-fused train` uses on this machine without --amp / --channels-last; "
            "x ref32: over the reference router in float32 contiguous"
        )
    return "\n".join(lines)


# Environment fields repeated on every CSV row, so that a CSV file stands on its own.
_CSV_ENV_FIELDS = (
    "date",
    "device_name",
    "cpu_model",
    "cpu_isa",
    "cpu_l2_bytes_per_core",
    "cpp_clone",
    "cpp_u_hat_cache",
    "cpu_cores",
    "torch_threads",
    "torch",
    "triton",
    "capsnet_fused",
    "git_revision",
)


def write_results(
    rows: list[dict], env: dict, out_dir: Path | str, stem: str, config: BenchConfig | None = None
) -> dict[str, Path]:
    """Write <stem>.json ({"environment", "config", "rows"}) and <stem>.csv; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    config_dict = (
        None if config is None else json.loads(json.dumps(dataclasses.asdict(config), default=str))
    )
    json_path.write_text(
        json.dumps({"environment": env, "config": config_dict, "rows": rows}, indent=1, default=str)
        + "\n"
    )
    flat = []
    for row in rows:
        out = {k: v for k, v in row.items() if not isinstance(v, dict)}
        if "rel_errors" in row:
            errors, tols = row["rel_errors"], row.get("tolerances", {})
            worst = max(errors, key=lambda n: errors[n] / tols.get(n, 1.0), default=None)
            out["max_rel_error"] = None if worst is None else errors[worst]
            out["worst_tensor"] = worst or ""
            out["tolerance"] = tols.get(worst) if worst else None
        out.update({k: env.get(k) for k in _CSV_ENV_FIELDS})
        flat.append(out)
    fields = list(dict.fromkeys(k for out in flat for k in out))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)
    return {"json": json_path, "csv": csv_path}


def plot_results(rows: list[dict], path: Path | str, title: str = "") -> Path | None:
    """PNG: median time vs batch size per backend (and shape), log-log, one panel per mode.

    The plotted slice is one (R, dtype, variant): R = 3 when present, else the first of each;
    the others stay in the CSV. Bars span the interquartile range. None when nothing is ok.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in rows if r["status"] == "ok" and r["median_ms"] is not None]
    if not ok:
        return None
    iters = 3 if any(r["R"] == 3 for r in ok) else ok[0]["R"]
    dtype, variant = ok[0]["dtype"], ok[0]["variant"]
    ok = [r for r in ok if r["R"] == iters and r["dtype"] == dtype and r["variant"] == variant]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for b_index, backend in enumerate(backends):
            for s_index, shape in enumerate(shapes):
                pts = sorted(
                    (r["B"], r["median_ms"], r["iqr_ms"])
                    for r in ok
                    if r["mode"] == mode and r["backend"] == backend and r["shape"] == shape
                )
                if not pts:
                    continue
                xs, ys, iqrs = zip(*pts, strict=True)
                label = backend if len(shapes) == 1 else f"{backend} {shape}"
                ax.errorbar(
                    xs,
                    ys,
                    yerr=[[i / 2 for i in iqrs], [i / 2 for i in iqrs]],
                    color=f"C{b_index}",
                    linestyle=styles[s_index % len(styles)],
                    marker="o",
                    capsize=3,
                    label=label,
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        # Label the measured batch sizes themselves rather than powers of two.
        batches = sorted({r["B"] for r in ok if r["mode"] == mode})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("batch size B")
        ax.set_ylabel("median time per call (ms), bars: IQR")
        ax.set_title(f"{mode}, R={iters}, {dtype}, {variant}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
