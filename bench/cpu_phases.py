"""Where the cpp kernel's time goes, against the CPU's FMA peak.

    g++ -O2 bench/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak   # the peak per core
    python bench/cpu_phases.py --peak-gflops 490                   # both cores' peak, float32

Times, in alternation (measure.time_calls_interleaved, median of --calls rounds), the forward
op and the backward op with different outputs asked for: dbias alone runs only phase 1 (the
sweeps t = R-1..1); du or dW adds phase 2 (u_hat predicted again, du_hat, then du = W^T du_hat
and/or dW = sum u du_hat), timed as the backward call's time less phase 1's. Each part is
reported in u_hat-prediction equivalents (one is B I J N M FMAs: the forward predicts u_hat R
times, phase 1 R - 1 times, phase 2 once plus one for du and one for dW) and, with
--peak-gflops, as a share of that peak. The dot products, softmaxes, weighted sums and du_hat
add 25-45% more FMAs that these counts leave out, so the shares are lower bounds.
float32, out_caps, a zero bias (so that a call can ask for dbias alone), no prior or leaky
routing.
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--shape", default="1152x10x8x16", help="IxJxNxM")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--calls", type=int, default=11)
    parser.add_argument("--peak-gflops", type=float, default=0.0, help="float32 peak, all cores")
    args = parser.parse_args()

    import torch

    import capsnet_fused  # noqa: F401 - registers the ops
    from capsnet_fused.benchmark.measure import time_calls_interleaved

    torch.manual_seed(0)
    inputs, outputs, n, m = (int(x) for x in args.shape.split("x"))
    batch, R = args.batch, args.iterations
    u = torch.randn(batch, inputs, n)
    w = torch.randn(inputs, outputs, n, m) * 0.05
    bias = torch.zeros(outputs, m)
    op = torch.ops.capsnet_fused

    def forward():
        return op.cpp_routing_fwd(u, w, None, bias, R, False, False, False, 1e-7)

    v, s, V, lse = forward()
    g = torch.randn_like(v)

    def backward(du: bool, dw: bool, dbias: bool):
        return lambda: op.cpp_routing_bwd(
            g, u, w, None, bias, s, V, lse, R, False, False, False, 1e-7, du, dw, False, dbias
        )

    calls = {
        "forward": forward,
        "phase 1 (dbias only)": backward(False, False, True),
        "backward du": backward(True, False, False),
        "backward dW": backward(False, True, False),
        "backward du + dW": backward(True, True, False),
    }
    timed = time_calls_interleaved(calls, torch.device("cpu"), args.calls, warmup=1)
    median: dict[str, float] = {}
    for name, result in timed.items():
        if isinstance(result, Exception):
            raise result
        median[name] = result["median_ms"] / 1e3
    # Phase 2 is what a backward call adds to phase 1 (its own call).
    phase1 = median["phase 1 (dbias only)"]
    both = median["backward du + dW"]
    parts = {
        "forward": (median["forward"], R),
        "backward phase 1": (phase1, R - 1),
        "phase 2 for du": (median["backward du"] - phase1, 2),
        "phase 2 for dW": (median["backward dW"] - phase1, 2),
        "phase 2 for du + dW": (both - phase1, 3),
        "forward + backward (du, dW)": (median["forward"] + both, 2 * R + 2),
    }
    gflop = 2 * batch * inputs * outputs * n * m / 1e9
    print(f"B={batch} {args.shape} R={R} float32, torch threads {torch.get_num_threads()}")
    for name, (seconds, equivalents) in parts.items():
        rate = equivalents * gflop / seconds
        share = f", {100 * rate / args.peak_gflops:.0f}% of peak" if args.peak_gflops else ""
        timing = f"{seconds * 1e3:7.2f} ms  {equivalents} x u_hat: {rate:5.0f} GFLOP/s"
        print(f"{name:28s} {timing}{share}")


if __name__ == "__main__":
    main()
