"""Traffic counter and roofline model of the Triton routing: a MODEL, not a measurement.

Runs the op's Triton kernels under the Triton interpreter with the tiles the launchers choose for
a GPU (CAPSNET_FUSED_TRITON_TILES=gpu), wraps the interpreter's loads, stores and floating-point
operations, and reports per launch: grid, bytes loaded and stored per tensor, the launch's
footprint (distinct bytes it touches), and FLOPs executed (masked-off lanes included: a GPU
executes them too). From these it models each launch's time on an H100 and an H200 as

    3 us + max(FLOPs / 60 TFLOP/s, footprint / HBM, bytes loaded and stored / L2)

with HBM 3.35 / 4.8 TB/s and L2 2.5 x HBM. Beside it, the same model for the einsum reference
(its aten ops counted by a TorchDispatchMode on meta tensors: every op that moves data is a
kernel reading its inputs and writing its output) and for torch.compile of the reference, under
the stated assumption that compilation fuses every pointwise and reduction op into its
neighbours, so that only the ops touching a tensor of u_hat's size (B x I x J x M) remain, each
reading or writing those large tensors once and nothing else (bench/reference_traffic.py holds
the machines and that side of the model). Nothing here ran on a GPU.

Usage (about 3 minutes for the MNIST shape on one core; the interpreter runs every program):

    python bench/traffic.py                         # B=128, I=1152, J=10, N=8, M=16, R=3
    python bench/traffic.py --shape 128,288,10,8,16,3 --json out.json   # + out.md
    python bench/traffic.py --variant in_caps,prior --check

--check exits 1 unless the Triton issue's targets hold for the shape (see TARGETS).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# The kernels must be decorated as interpreted functions, with the GPU's tiles: both are read
# when capsnet_fused is imported.
os.environ["TRITON_INTERPRET"] = "1"
os.environ["CAPSNET_FUSED_TRITON_TILES"] = "gpu"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from triton.language import int32 as tl_int32  # noqa: E402
from triton.language import standard as tl_standard  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from bench.reference_traffic import (  # noqa: E402
    MACHINES,
    US,
    Machine,
    Variant,
    count_reference,
    make_inputs,
    model_reference,
)
from capsnet_fused import dynamic_routing  # noqa: E402
from capsnet_fused.backends.triton import launch as launchers  # noqa: E402


@dataclass
class Launch:
    """What one kernel launch loaded, stored and computed."""

    name: str
    grid: tuple[int, ...]
    loads: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    stores: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    footprint: dict[str, int] = field(default_factory=dict)
    flops: float = 0.0
    phase: str = "forward"
    sampled: bool = False

    @property
    def programs(self) -> int:
        return int(np.prod(self.grid))

    @property
    def bytes_moved(self) -> int:
        return sum(self.loads.values()) + sum(self.stores.values())

    @property
    def bytes_footprint(self) -> int:
        return sum(self.footprint.values())

    def scale(self, factor: float, tensors: _Tensors) -> None:
        """Counts of sampled programs scaled to the whole grid (factor 1: all programs ran)."""
        self.sampled = factor != 1.0
        self.footprint = tensors.footprint(factor)
        if factor != 1.0:
            self.loads = {k: int(v * factor) for k, v in self.loads.items()}
            self.stores = {k: int(v * factor) for k, v in self.stores.items()}
            self.flops *= factor

    def seconds(self, machine: Machine) -> float:
        return machine.launch_s + max(
            self.flops / machine.flops_per_s,
            self.bytes_footprint / machine.hbm_bytes_per_s,
            self.bytes_moved / machine.l2_bytes_per_s,
        )

    def as_dict(self) -> dict:
        out = {
            "name": self.name,
            "phase": self.phase,
            "grid": list(self.grid),
            "programs": self.programs,
            "loads": dict(self.loads),
            "stores": dict(self.stores),
            "bytes_moved": self.bytes_moved,
            "bytes_footprint": self.bytes_footprint,
            "flops": self.flops,
            "sampled": self.sampled,
        }
        for machine in MACHINES:
            out[f"model_us_{machine.name}"] = self.seconds(machine) / US
        return out


class _Tensors:
    """Maps raw addresses seen by the interpreter to the launch's tensor arguments."""

    def __init__(self, args: dict):
        self.names, starts, ends, sizes = [], [], [], []
        for name, value in args.items():
            # Unused pointer arguments alias a real tensor: the first name given wins.
            if (
                isinstance(value, torch.Tensor)
                and value.numel() > 0
                and (value.data_ptr() not in starts)
            ):
                self.names.append(name.removesuffix("_ptr"))
                starts.append(value.data_ptr())
                ends.append(value.data_ptr() + value.numel() * value.element_size())
                sizes.append(value.element_size())
        order = np.argsort(starts, kind="stable")
        self.names = [self.names[i] for i in order]
        self.starts = np.asarray(starts, dtype=np.uint64)[order]
        self.ends = np.asarray(ends, dtype=np.uint64)[order]
        self.sizes = np.asarray(sizes)[order]
        self.touched = [
            np.zeros(int((e - s) // z), dtype=bool)
            for s, e, z in zip(self.starts, self.ends, self.sizes)
        ]

    def account(self, ptrs: np.ndarray, mask: np.ndarray, per_tensor: dict) -> None:
        addrs = np.asarray(ptrs, dtype=np.uint64)[np.asarray(mask, dtype=bool)]
        if addrs.size == 0:
            return
        which = np.searchsorted(self.starts, addrs, side="right") - 1
        for index in np.unique(which):
            chosen = addrs[which == index]
            if index < 0 or chosen.max() >= self.ends[index]:
                raise RuntimeError("a kernel accessed memory outside its tensor arguments")
            name = self.names[index]
            per_tensor[name] += int(chosen.size * self.sizes[index])
            elements = ((chosen - self.starts[index]) // np.uint64(self.sizes[index])).astype(
                np.int64
            )
            self.touched[index][elements] = True

    def footprint(self, factor: float = 1.0) -> dict[str, int]:
        """Distinct bytes touched per tensor (scaled by factor, at most the whole tensor)."""
        out: dict[str, int] = defaultdict(int)
        for name, touched, size in zip(self.names, self.touched, self.sizes):
            out[name] += int(min(touched.size, touched.sum() * factor)) * int(size)
        return dict(out)


def _spread(grid: tuple[int, ...], count: int) -> list[tuple[int, int, int]]:
    """`count` program ids (x, y, z) spread evenly over the grid, first and last included."""
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    total = grid3[0] * grid3[1] * grid3[2]
    flat = np.unique(np.linspace(0, total - 1, count).round().astype(np.int64))
    # Flattened in the interpreter's order: x outermost, z innermost.
    return [
        (int(f // (grid3[1] * grid3[2])), int(f // grid3[2] % grid3[1]), int(f % grid3[2]))
        for f in flat
    ]


_FLOAT_BINARY = (
    "create_fadd", "create_fsub", "create_fmul", "create_fdiv", "create_precise_divf",
    "create_minimumf", "create_maximumf", "create_minnumf", "create_maxnumf",
)  # fmt: skip
_FLOAT_UNARY = ("create_exp", "create_log", "create_sqrt", "create_precise_sqrt", "create_rsqrt")


class Counter:
    """Counts loads, stores and FLOPs of every KernelLaunch run inside `with counter.active()`."""

    def __init__(self, max_programs: int | None = None) -> None:
        self.launches: list[Launch] = []
        self.phase = "forward"
        # When set, launches with more programs run only this many, spread evenly over the
        # grid (the first and last included), and their counts are scaled to the whole grid.
        self.max_programs = max_programs
        self._current: Launch | None = None
        self._tensors: _Tensors | None = None
        self._program_ids: list[tuple[int, int, int]] | None = None

    def _count_flops(self, result, per_element: float = 1.0) -> None:
        if self._current is not None and np.issubdtype(result.data.dtype, np.floating):
            self._current.flops += per_element * result.data.size

    @contextlib.contextmanager
    def active(self):
        builder = interpreter.InterpreterBuilder
        saved = {}

        def patch(owner, name, make):
            saved[(owner, name)] = getattr(owner, name)
            setattr(owner, name, make(getattr(owner, name)))

        def loads(original):
            def wrapper(builder_self, ptrs, mask, other, cache, volatile):
                if self._tensors is not None:
                    self._tensors.account(ptrs.data, mask.data, self._current.loads)
                return original(builder_self, ptrs, mask, other, cache, volatile)

            return wrapper

        def stores(original):
            def wrapper(builder_self, ptrs, value, mask, cache):
                if self._tensors is not None:
                    self._tensors.account(ptrs.data, mask.data, self._current.stores)
                return original(builder_self, ptrs, value, mask, cache)

            return wrapper

        def counted(per_element):
            def make(original):
                def wrapper(*args):
                    result = original(*args)
                    self._count_flops(result, per_element)
                    return result

                return wrapper

            return make

        def dot(original):
            def wrapper(builder_self, a, b, d, *rest):
                if self._current is not None:
                    m, k = a.data.shape[-2:]
                    self._current.flops += 2.0 * m * k * b.data.shape[-1]
                return original(builder_self, a, b, d, *rest)

            return wrapper

        def reduction(original):
            def wrapper(reduce_self, input):
                tensors = input if isinstance(input, tuple) else (input,)
                for t in tensors:
                    if t.dtype.is_floating() and self._current is not None:
                        self._current.flops += t.handle.data.size
                return original(reduce_self, input)

            return wrapper

        def program_id(original):
            def wrapper(builder_self, axis):
                if self._program_ids is None:
                    return original(builder_self, axis)
                real = self._program_ids[builder_self.grid_idx[0]][axis]
                return interpreter.TensorHandle(np.array([real], dtype=np.int32), tl_int32)

            return wrapper

        def num_programs(original):
            def wrapper(builder_self, axis):
                if self._program_ids is None:
                    return original(builder_self, axis)
                real = self._current.grid[axis] if axis < len(self._current.grid) else 1
                return interpreter.TensorHandle(np.array([real], dtype=np.int32), tl_int32)

            return wrapper

        def launch_call(original):
            def wrapper(launch):
                record = Launch(launch.name, tuple(launch.grid), phase=self.phase)
                self._current, self._tensors = record, _Tensors(launch.args)
                # triton.language.core as triton.language.standard's functions see it.
                scope = interpreter._patch_lang(tl_standard.sum.fn)
                scale = 1.0
                if self.max_programs is not None and record.programs > self.max_programs:
                    self._program_ids = _spread(record.grid, self.max_programs)
                    scale = record.programs / len(self._program_ids)
                    launch = dataclasses.replace(launch, grid=(len(self._program_ids),))
                try:
                    original(launch)
                finally:
                    scope.restore()
                    self._program_ids = None
                    record.scale(scale, self._tensors)
                    self.launches.append(record)
                    self._current, self._tensors = None, None

            return wrapper

        def device_call(original):
            # A @triton.jit function called from a kernel (ours, or tl.sum and friends) re-patches
            # triton.language on every call in the interpreter, about 1 ms each; launch_call
            # patches both modules those functions see once per launch instead.
            def wrapper(function, *args, **kwargs):
                try:
                    return function.rewrite()(*args, **kwargs)
                except Exception as exc:
                    raise interpreter.InterpreterError(repr(exc)) from exc

            return wrapper

        patch(interpreter.InterpretedFunction, "__call__", device_call)
        patch(builder, "create_masked_load", loads)
        patch(builder, "create_masked_store", stores)
        for name in _FLOAT_BINARY + _FLOAT_UNARY:
            patch(builder, name, counted(1.0))
        patch(builder, "create_fma", counted(2.0))
        patch(builder, "create_dot", dot)
        patch(interpreter.ReduceOps, "apply_impl", reduction)

        def torch_call(original):
            def wrapper(launch):
                original(launch)
                self.add_torch_launch(launch)

            return wrapper

        patch(launchers.KernelLaunch, "__call__", launch_call)
        patch(launchers.TorchLaunch, "__call__", torch_call)
        patch(builder, "create_get_program_id", program_id)
        patch(builder, "create_get_num_programs", num_programs)
        try:
            yield self
        finally:
            for (owner, name), value in saved.items():
                setattr(owner, name, value)

    def add_torch_launch(self, launch: launchers.TorchLaunch) -> None:
        """Torch ops a launcher issues (the prior's softmax, the bias gradient's sum): their
        tensors read once and written once, a few FLOPs per element read."""
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        record = Launch(launch.name, (1,), phase=self.phase)
        record.loads[launch.name] = sum(nbytes(t) for t in launch.reads)
        record.stores[launch.name] = sum(nbytes(t) for t in launch.writes)
        record.footprint = {launch.name: record.bytes_moved}
        record.flops = 5.0 * sum(t.numel() for t in launch.reads)
        self.launches.append(record)


def count_triton(shape, variant: Variant, max_programs: int | None = None) -> list[Launch]:
    """Run forward and backward of the Triton op under the counter; the launches in order."""
    u, weight, prior, grad = make_inputs(shape, variant, "cpu")
    leaves = [t.requires_grad_() for t in (u, weight, prior) if t is not None]
    counter = Counter(max_programs)
    with counter.active():
        v = dynamic_routing(u, weight, shape[5], prior=prior, backend="triton",
                            softmax_over=variant.softmax_over,
                            detach_inner=variant.detach_inner)  # fmt: skip
        counter.phase = "backward"
        torch.autograd.grad(v, leaves, grad)
    return counter.launches


# Targets of the Triton issue at the MNIST shape (B=128, I=1152, J=10, N=8, M=16, R=3, float32).
TARGETS = {
    "loads_mb_max": 300.0,
    "w_loads_per_forward_sweep_max": 16.0,
    "forward_launches_max": lambda r: 2 * r + 2,
    "backward_launches_max": lambda r: 2 * r + 3,
    "h200_model_us_max": 150.0,
}
# At B=128, I=288: forward+backward loads at most this many times |W| + |u|.
SMALL_LOADS_FACTOR = 60.0


def summarise(shape, variant: Variant, launches: list[Launch], ref_ops: list[dict]) -> dict:
    batch, in_caps, out_caps, in_d, out_d, iterations = shape
    u_bytes = batch * in_caps * in_d * 4
    w_bytes = in_caps * out_caps * in_d * out_d * 4
    u_hat = batch * in_caps * out_caps * out_d
    fwd = [x for x in launches if x.phase == "forward"]
    bwd = [x for x in launches if x.phase == "backward"]
    loads = sum(sum(x.loads.values()) for x in launches)
    sweeps_fwd = [x for x in fwd if x.name in ("first_sweep_kernel", "sweep_kernel")]
    w_loads = max(x.loads.get("w", 0) for x in sweeps_fwd) / w_bytes
    out = {
        "shape": dict(B=batch, I=in_caps, J=out_caps, N=in_d, M=out_d, R=iterations),
        "variant": variant.label,
        "launches": [x.as_dict() for x in launches],
        "forward_launches": len(fwd),
        "backward_launches": len(bwd),
        "loads_mb": loads / 1e6,
        "stores_mb": sum(sum(x.stores.values()) for x in launches) / 1e6,
        "loads_over_w_plus_u": loads / (w_bytes + u_bytes),
        "w_loads_per_forward_sweep": w_loads,
        "flops_g": sum(x.flops for x in launches) / 1e9,
        "model": {},
    }
    for machine in MACHINES:
        row = {
            "triton_forward_us": sum(x.seconds(machine) for x in fwd) / US,
            "triton_backward_us": sum(x.seconds(machine) for x in bwd) / US,
        }
        for compiled, label in ((False, "eager"), (True, "compiled")):
            seconds, kernels, moved = model_reference(ref_ops, machine, u_hat, compiled)
            row[f"{label}_forward_us"] = seconds["forward"] / US
            row[f"{label}_backward_us"] = seconds["backward"] / US
            row[f"{label}_kernels"] = dict(kernels)
            row[f"{label}_mb"] = {k: v / 1e6 for k, v in moved.items()}
        for label in ("triton", "eager", "compiled"):
            row[f"{label}_total_us"] = row[f"{label}_forward_us"] + row[f"{label}_backward_us"]
        out["model"][machine.name] = row
    return out


def check(summary: dict) -> list[str]:
    """The targets this summary misses (empty when all hold)."""
    shape = summary["shape"]
    r = shape["R"]
    failures = []
    if (shape["B"], shape["I"], shape["J"], shape["N"], shape["M"]) == (128, 1152, 10, 8, 16):
        limits = [
            ("loads_mb", TARGETS["loads_mb_max"]),
            ("w_loads_per_forward_sweep", TARGETS["w_loads_per_forward_sweep_max"]),
            ("forward_launches", TARGETS["forward_launches_max"](r)),
            ("backward_launches", TARGETS["backward_launches_max"](r)),
        ]
        for key, limit in limits:
            if summary[key] > limit:
                failures.append(f"{key} = {summary[key]:.4g} > {limit:.4g}")
        h200 = summary["model"]["H200"]["triton_total_us"]
        if h200 > TARGETS["h200_model_us_max"]:
            failures.append(f"modelled H200 forward+backward {h200:.1f} us > 150 us")
    if (shape["B"], shape["I"]) == (128, 288):
        if summary["loads_over_w_plus_u"] > SMALL_LOADS_FACTOR:
            failures.append(
                f"loads = {summary['loads_over_w_plus_u']:.1f} x (|W| + |u|) > {SMALL_LOADS_FACTOR}"
            )
    return failures


def format_report(summary: dict) -> str:
    s = summary["shape"]
    lines = [
        f"MODEL (interpreter counts, no GPU): B={s['B']} I={s['I']} J={s['J']} N={s['N']} "
        f"M={s['M']} R={s['R']}, float32, {summary['variant']}, GPU tiles",
        "",
        "| phase | launch | programs | loaded MB | stored MB | footprint MB | GFLOP "
        "| H100 us | H200 us |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in summary["launches"]:
        lines.append(
            f"| {x['phase']} | {x['name']}{' *' if x['sampled'] else ''} | {x['programs']} | "
            f"{sum(x['loads'].values()) / 1e6:.2f} | {sum(x['stores'].values()) / 1e6:.2f} | "
            f"{x['bytes_footprint'] / 1e6:.2f} | {x['flops'] / 1e9:.3f} | "
            f"{x['model_us_H100']:.1f} | {x['model_us_H200']:.1f} |"
        )
    if any(x["sampled"] for x in summary["launches"]):
        lines.append("\n* counts of evenly spread programs (--sample), scaled to the whole grid")
    lines += [
        "",
        f"launches: forward {summary['forward_launches']}, backward "
        f"{summary['backward_launches']}; loads {summary['loads_mb']:.1f} MB "
        f"({summary['loads_over_w_plus_u']:.1f} x (|W| + |u|)), stores "
        f"{summary['stores_mb']:.1f} MB; W loaded {summary['w_loads_per_forward_sweep']:.1f} "
        f"times in the heaviest forward sweep; {summary['flops_g']:.2f} GFLOP executed",
        "",
        "| modelled us | Triton fwd | Triton fwd+bwd | eager fwd | eager fwd+bwd "
        "| compiled fwd | compiled fwd+bwd |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["model"].items():
        lines.append(
            f"| {name} | {row['triton_forward_us']:.0f} | {row['triton_total_us']:.0f} | "
            f"{row['eager_forward_us']:.0f} | {row['eager_total_us']:.0f} | "
            f"{row['compiled_forward_us']:.0f} | {row['compiled_total_us']:.0f} |"
        )
    h200 = summary["model"]["H200"]
    lines.append(
        f"\neager reference: {h200['eager_kernels'].get('forward', 0)} kernels forward, "
        f"{h200['eager_kernels'].get('backward', 0)} backward, "
        f"{h200['eager_mb'].get('forward', 0):.0f} / {h200['eager_mb'].get('backward', 0):.0f} MB;"
        f" compiled (assumed fusion): {h200['compiled_kernels'].get('forward', 0)} / "
        f"{h200['compiled_kernels'].get('backward', 0)} kernels"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="128,1152,10,8,16,3", help="B,I,J,N,M,R")
    parser.add_argument("--variant", default="out_caps",
                        help="comma-separated: out_caps|in_caps, prior, detach")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the summary as JSON here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--sample",
        type=int,
        default=None,
        help="run at most this many programs of a launch (spread over its grid) and scale its "
        "counts to the whole grid; default: every program",
    )
    args = parser.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    if len(shape) != 6:
        parser.error("--shape takes B,I,J,N,M,R")
    variant = Variant.parse(args.variant)
    start = time.time()
    launches = count_triton(shape, variant, args.sample)
    summary = summarise(shape, variant, launches, count_reference(shape, variant))
    summary["seconds_to_count"] = time.time() - start
    report = format_report(summary)
    print(report)
    if args.json:
        # The summary as JSON, and the report a person reads beside it (.md).
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
        args.json.with_suffix(".md").write_text(report + "\n")
    failures = check(summary)
    for failure in failures:
        print(f"TARGET MISSED: {failure}")
    return 1 if (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
