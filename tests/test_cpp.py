"""What is particular to the cpp backend's CPU kernels (capsnet_fused._C): each ISA clone on both
u_hat paths against the float64 reference, threads, kernel info and clone selection, the
floating-point mode, the compiled code. The checks every fused implementation passes (every
shape, variant and option, gradcheck, opcheck, dtypes, edge cases, compile, ...) run it in
tests/test_backends.py."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

try:
    import capsnet_fused._C
except ImportError as exc:
    pytest.skip(
        f"capsnet_fused._C is not built ({exc}); build it with "
        "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`",
        allow_module_level=True,
    )

from capsnet_fused import FusedRouter, choose_backend, dynamic_routing, reference_routing
from capsnet_fused.backends import cpp as cpp_op
from capsnet_fused.ops import available_backends
from tests.helpers import (
    ALL_OPTIONS,
    BATCH_SHAPES,
    SHAPES,
    VARIANTS,
    Options,
    Shape,
    assert_matches_reference,
    make_bias,
    make_inputs,
    option_case_id,
    reference64,
    rel_error,
    run_with_grads,
    variant_params,
)

OPS = torch.ops.capsnet_fused


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels must write starts as NaN (read by csrc/routing_common.h)."""
    monkeypatch.setenv("CAPSNET_FUSED_POISON_OUTPUTS", "1")


def cpp_routing(u, weight, prior=None, **kwargs):
    return dynamic_routing(u, weight, prior=prior, backend="cpp", **kwargs)


def routing_kwargs(shape: Shape, variant, options: Options | None = None) -> dict:
    softmax_over, detach_inner = variant.softmax_over, variant.detach_inner
    kwargs = dict(iterations=shape.R, softmax_over=softmax_over, detach_inner=detach_inner)
    return kwargs if options is None else {**kwargs, **options.kwargs()}


# CAPSNET_FUSED_CPU_ISA values and the kernel clones they force (csrc/routing_cpu.cpp).
CLONES = {"generic": "default", "avx2": "x86-64-v3", "avx512": "x86-64-v4"}


def kernel_info() -> dict:
    return json.loads(OPS.cpp_kernel_info())


def require_clone(isa: str, monkeypatch) -> None:
    """Skip unless this build has the clone that CAPSNET_FUSED_CPU_ISA=isa forces and the CPU
    runs it; then force it for the rest of the test."""
    monkeypatch.delenv("CAPSNET_FUSED_CPU_ISA", raising=False)
    info, clone = kernel_info(), CLONES[isa]
    if clone not in info["clones_built"]:
        pytest.skip(f"this build of capsnet_fused._C has no {clone} clone ({info['clones_built']})")
    if clone not in info["clones_cpu_runs"]:
        needs = "avx512f/bw/cd/dq/vl" if isa == "avx512" else "avx2/fma/bmi2"
        pytest.skip(f"this CPU cannot run the {clone} clone (it needs {needs})")
    monkeypatch.setenv("CAPSNET_FUSED_CPU_ISA", isa)


# The float64 reference of each (shape, variant, options, dtype) case, computed once for all
# the clones and u_hat paths that are compared with it.
_REFERENCES: dict = {}


def reference_case(shape: Shape, variant, dtype, options: Options | None = None):
    key = (shape, variant, dtype, options)
    if key not in _REFERENCES:
        u, weight, prior, grad = make_inputs(shape, variant.prior, dtype=dtype)
        bias = None if options is None else make_bias(shape, options, dtype=dtype)
        kwargs = routing_kwargs(shape, variant, options)
        want = reference64(u, weight, prior, grad, bias=bias, **kwargs)
        _REFERENCES[key] = (u, weight, prior, grad, bias), want
    return _REFERENCES[key]


# Every clone of the kernels (forced; the ones the CPU cannot run skip) with u_hat recomputed
# in every sweep and cached across sweeps (forced; "auto" picks one of the two by size), on a
# few shapes: an odd one (r = 4), one with several sample vectors and a ragged last one (r = 3),
# and one with a single iteration and pose vectors of four 32-byte vectors. The default path
# (the best clone the CPU runs, "auto") runs every shape in tests/test_backends.py.
CLONE_SHAPES = [SHAPES[3], BATCH_SHAPES[0], BATCH_SHAPES[2]]


@pytest.mark.parametrize("shape", CLONE_SHAPES, ids=[s.id for s in CLONE_SHAPES])
@variant_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("uhat_cache", ["off", "on"], ids=["recompute", "cached"])
@pytest.mark.parametrize("isa", list(CLONES))
def test_matches_reference(shape, variant, dtype, uhat_cache, isa, monkeypatch):
    require_clone(isa, monkeypatch)
    monkeypatch.setenv("CAPSNET_FUSED_UHAT_CACHE", uhat_cache)
    (u, weight, prior, grad, _), want = reference_case(shape, variant, dtype)
    out = run_with_grads(cpp_routing, u, weight, prior, grad, **routing_kwargs(shape, variant))
    assert out[0].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    assert_matches_reference(out, want, tol)


# The options of issue 15, all at once with each variant (the squash eps 0.05 and 0 in turn), in
# every clone the CPU runs and on both u_hat paths, on the two shapes of several sample vectors
# (every option case runs the default path in tests/test_backends.py).
CLONE_OPTION_SHAPES = CLONE_SHAPES[1:]
CLONE_OPTION_CASES = [(v, ALL_OPTIONS[k % 2]) for k, v in enumerate(VARIANTS)]


@pytest.mark.parametrize("shape", CLONE_OPTION_SHAPES, ids=[s.id for s in CLONE_OPTION_SHAPES])
@pytest.mark.parametrize(
    "variant, options", CLONE_OPTION_CASES, ids=[option_case_id(c) for c in CLONE_OPTION_CASES]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("uhat_cache", ["off", "on"], ids=["recompute", "cached"])
@pytest.mark.parametrize("isa", list(CLONES))
def test_options_match_reference(shape, variant, options, dtype, uhat_cache, isa, monkeypatch):
    require_clone(isa, monkeypatch)
    monkeypatch.setenv("CAPSNET_FUSED_UHAT_CACHE", uhat_cache)
    (u, weight, prior, grad, bias), want = reference_case(shape, variant, dtype, options)
    kwargs = routing_kwargs(shape, variant, options)
    out = run_with_grads(cpp_routing, u, weight, prior, grad, bias=bias, **kwargs)
    assert out[0].dtype == dtype
    assert_matches_reference(out, want, 1e-5 if dtype == torch.float32 else 1e-11)


@pytest.mark.parametrize("isa", list(CLONES))
def test_padded_sample_lanes_stay_out_of_the_gradients(isa, monkeypatch):
    # B = 18: the last sample vector holds 2 samples and 2 or 6 empty lanes. With the softmax
    # over in_caps and priors of +-800, exp(prior) overflows float64 wherever a padded lane's
    # log-sum-exp were taken as 0, and inf x 0 would put NaN into dW and dprior; the backward
    # must keep those lanes out of the gradients whatever the clone's vector width.
    require_clone(isa, monkeypatch)
    shape = Shape(18, 9, 3, 4, 16, 3)
    u, weight, prior, grad = make_inputs(shape, True, dtype=torch.float64)
    prior = prior.sign() * 800
    kwargs = dict(iterations=shape.R, softmax_over="in_caps")
    want = reference64(u, weight, prior, grad, **kwargs)
    got = run_with_grads(cpp_routing, u, weight, prior, grad, **kwargs)
    assert_matches_reference(got, want, 1e-11)


def test_dynamic_routing_router_and_auto_choice():
    shape = Shape(2, 12, 4, 3, 5, 3)
    u, weight, _, _ = make_inputs(shape, False, dtype=torch.float32)
    assert "cpp" in available_backends("cpu")
    assert choose_backend("cpu", torch.float32) == "cpp"
    ref = reference_routing(u, weight, 3)
    assert rel_error(dynamic_routing(u, weight, 3), ref) < 1e-5
    router = FusedRouter(12, 4, 3, 5, 3, softmax_over="in_caps", learn_prior=True, backend="cpp")
    with torch.no_grad():
        router.prior.normal_()
    out = router(u)
    out.square().sum().backward()
    want = reference_routing(u, router.weight, 3, prior=router.prior, softmax_over="in_caps")
    assert rel_error(out, want) < 1e-5
    assert router.weight.grad is not None and router.prior.grad is not None


def test_unavailable_reason_contract():
    assert cpp_op.unavailable_reason(torch.device("cpu"), torch.float32) is None
    assert cpp_op.unavailable_reason(torch.device("cpu"), torch.bfloat16) is None
    assert "float32" in cpp_op.unavailable_reason(torch.device("cpu"), torch.int32)
    assert "meta" in cpp_op.unavailable_reason(torch.device("meta"), torch.float32)
    has_cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key(
        "capsnet_fused::cpp_routing_fwd", "CUDA"
    )
    cuda_reason = cpp_op.unavailable_reason(torch.device("cuda"), torch.float32)
    assert (cuda_reason is None) == has_cuda_kernels


THREAD_OPTIONS = [Options(), Options(bias=True, leaky=True, squash_eps=0.05)]


@pytest.mark.parametrize("options", THREAD_OPTIONS, ids=[o.id for o in THREAD_OPTIONS])
@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
@pytest.mark.parametrize("uhat_cache", ["off", "on"], ids=["recompute", "cached"])
def test_threads_do_not_change_results(uhat_cache, softmax_over, options, monkeypatch):
    monkeypatch.setenv("CAPSNET_FUSED_UHAT_CACHE", uhat_cache)
    shape = Shape(70, 40, 5, 4, 16, 3)
    u, weight, prior, grad = make_inputs(shape, True, dtype=torch.float32)
    bias = make_bias(shape, options, dtype=torch.float32)
    kwargs = dict(iterations=3, softmax_over=softmax_over, **options.kwargs())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_with_grads(cpp_routing, u, weight, prior, grad, bias=bias, **kwargs)
        torch.set_num_threads(max(threads, 2))
        multi = run_with_grads(cpp_routing, u, weight, prior, grad, bias=bias, **kwargs)
    finally:
        torch.set_num_threads(threads)
    # Each output element is computed by one thread in a fixed order: bitwise equal.
    for a, b in zip([single[0], *single[1]], [multi[0], *multi[1]], strict=True):
        assert torch.equal(a, b)


def test_shared_logits_threads_do_not_change_results():
    shape = Shape(70, 100, 5, 4, 16, 3)
    u, weight, prior, grad = make_inputs(shape, True, dtype=torch.float32)
    bias = make_bias(shape, Options(bias=True), dtype=torch.float32)
    kwargs = dict(iterations=3, softmax_over="in_caps", leaky=True, shared_logits="mean")
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            v, grads = run_with_grads(cpp_routing, u, weight, prior, grad, bias=bias, **kwargs)
            runs.append([v, *grads])
    finally:
        torch.set_num_threads(threads)
    # Each element has one owner that sums in a fixed order: bitwise equal.
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("shared_logits", [None, "mean"], ids=["per-sample", "shared"])
def test_scratch_blocks_are_kept_between_calls_and_released(shared_logits):
    # Large scratch buffers go back to a pool after a call (csrc/cpu_scratch.h, ScratchPool)
    # instead of to glibc, which returned them to the system and made every call fault them in
    # again; cpp_release_scratch frees the pool, which the shared-logits kernels use as well.
    # Results must not depend on whether a call got fresh blocks or blocks a previous call wrote.
    shape = Shape(64, 1152, 10, 8, 16, 3)  # u in sample lanes alone is over 1 MB
    u, weight, prior, grad = make_inputs(shape, False, dtype=torch.float32)
    kwargs = dict(iterations=3, shared_logits=shared_logits)
    OPS.cpp_release_scratch()
    first = run_with_grads(cpp_routing, u, weight, prior, grad, **kwargs)
    kept = OPS.cpp_release_scratch()
    assert kept >= 1 << 20
    assert OPS.cpp_release_scratch() == 0
    run_with_grads(cpp_routing, u, weight, prior, grad, **kwargs)
    again = run_with_grads(cpp_routing, u, weight, prior, grad, **kwargs)
    for a, b in zip([first[0], *first[1]], [again[0], *again[1]], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_concurrent_calls_match_serial_calls():
    # Calls from several Python threads share the scratch pool (and the kernels' thread pool).
    shapes = [Shape(40, 300, 10, 8, 16, 3), Shape(17, 500, 6, 4, 8, 2)]
    cases = []
    for seed, shape in enumerate(shapes * 2):
        u, weight, prior, grad = make_inputs(shape, True, dtype=torch.float32, seed=seed)
        cases.append((u, weight, prior, grad, shape.R))

    def run(case):
        u, weight, prior, grad, R = case
        v, grads = run_with_grads(cpp_routing, u, weight, prior, grad, iterations=R)
        return [v, *grads]

    serial = [run(case) for case in cases]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(run, cases * 3))
    for k, results in enumerate(parallel):
        for a, b in zip(serial[k % len(cases)], results, strict=True):
            assert torch.equal(a, b)


def test_flush_to_zero_is_restored_after_the_kernels():
    # The kernels flush float32 denormals to zero while they run (csrc/routing_cpu.cpp) and
    # must hand the thread back in its previous floating-point mode.
    u, weight, prior, grad = make_inputs(Shape(9, 7, 3, 4, 16, 2), True, dtype=torch.float32)
    run_with_grads(cpp_routing, u, weight, prior, grad, iterations=2)
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert (tiny * 1.5).item() != 0.0


def test_kernel_info_reports_clone_l2_and_uhat_cache(monkeypatch):
    monkeypatch.delenv("CAPSNET_FUSED_CPU_ISA", raising=False)
    monkeypatch.delenv("CAPSNET_FUSED_UHAT_CACHE", raising=False)
    info = kernel_info()
    assert info["clone"] in CLONES.values()
    # Without a setting, the best clone this CPU runs (they are listed best first).
    assert info["clone"] == info["clones_cpu_runs"][0]
    assert set(info["clones_cpu_runs"]) <= set(info["clones_built"])
    # The default clone has 64-byte vectors only when the build's own flags have AVX-512 (a
    # native build on such a CPU, which has no other clone).
    wide = info["clone"] == "x86-64-v4" or (
        info["clone"] == "default" and info["build_isa"] == "avx512f"
    )
    assert info["sample_vector_bytes"] == (64 if wide else 32)
    if "x86-64-v4" in info["clones_built"]:
        assert info["build_isa"] == "baseline"
    assert info["u_hat_cache"] == "auto"
    l2 = info["l2_bytes_per_core"]
    assert isinstance(l2, int) and l2 >= 0
    sys_l2 = _sysfs_l2_bytes()
    if sys_l2 is not None:
        assert l2 == sys_l2
    mnist = info["u_hat_cache_mnist"]
    assert mnist["u_hat_bytes_per_group"] == 1152 * 10 * 16 * mnist["sample_vector_bytes"]
    fits = 4 * mnist["u_hat_bytes_per_group"] <= 3 * l2
    assert mnist["path"] == ("cached" if fits else "recompute")
    for setting, path in (("on", "cached"), ("off", "recompute")):
        monkeypatch.setenv("CAPSNET_FUSED_UHAT_CACHE", setting)
        forced = kernel_info()
        assert forced["u_hat_cache"] == setting and forced["u_hat_cache_mnist"]["path"] == path
    monkeypatch.setenv("CAPSNET_FUSED_CPU_ISA", "generic")
    assert kernel_info()["clone"] == "default"


def _sysfs_l2_bytes() -> int | None:
    """cpu0's L2 size as Linux describes it, or None where /sys does not say."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    if not os.path.isdir(root):
        return None
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        try:
            with open(os.path.join(path, "level")) as f:
                level = int(f.read())
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(path, "size")) as f:
                size = f.read().strip()
        except (OSError, ValueError):
            continue
        if level == 2 and kind != "Instruction":
            units = {"K": 1024, "M": 1024**2, "G": 1024**3}
            return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return None


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CAPSNET_FUSED_CPU_ISA", "sse9"), ("CAPSNET_FUSED_UHAT_CACHE", "sometimes")],
)
def test_invalid_settings_are_refused(variable, value, monkeypatch):
    monkeypatch.setenv(variable, value)
    u, weight, _, _ = make_inputs(Shape(2, 5, 3, 2, 4, 2), False, dtype=torch.float32)
    with pytest.raises(ValueError, match=f"{variable} must be"):
        cpp_routing(u, weight, iterations=2)
    with pytest.raises(ValueError, match=f"{variable} must be"):
        kernel_info()


def test_forcing_a_clone_the_cpu_cannot_run_is_refused(monkeypatch):
    monkeypatch.delenv("CAPSNET_FUSED_CPU_ISA", raising=False)
    info = kernel_info()
    missing = [isa for isa, clone in CLONES.items() if clone not in info["clones_cpu_runs"]]
    if not missing:
        pytest.skip(f"this CPU and build run every clone ({info['clones_cpu_runs']})")
    isa = missing[0]
    monkeypatch.setenv("CAPSNET_FUSED_CPU_ISA", isa)
    u, weight, _, _ = make_inputs(Shape(9, 5, 3, 2, 4, 2), False, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=f"CAPSNET_FUSED_CPU_ISA={isa} asks for the"):
        cpp_routing(u, weight, iterations=2)


def _disassembled_functions(library: str) -> dict[str, str]:
    """Demangled function name -> its disassembly, for every function `objdump -d -C` lists."""
    text = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", library],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    functions: dict[str, list[str]] = {}
    body: list[str] = []
    for line in text.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            body = functions.setdefault(header.group(1), [])
        else:
            body.append(line)
    return {name: "\n".join(lines) for name, lines in functions.items()}


def test_avx512_clone_uses_512_bit_registers():
    # This CPU may not run the x86-64-v4 clone, so what it was compiled to is checked instead:
    # its kernels on 64-byte sample vectors must use zmm registers, and the other clones none.
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    built = kernel_info()["clones_built"]
    if "x86-64-v4" not in built:
        pytest.skip(f"this build has no x86-64-v4 clone ({built})")
    functions = _disassembled_functions(capsnet_fused._C.__file__)

    def bodies(kernels: str, signature: str = "") -> list[str]:
        return [
            body
            for name, body in functions.items()
            if f"::{kernels}::" in name and signature in name
        ]

    for signature in (
        "forward<float, 64>", "sweeps<float, 64>", "capsules<float, 64>", "forward<double, 64>"
    ):  # fmt: skip
        found = bodies("X86V4Kernels", signature)
        assert found, f"no X86V4Kernels::{signature} in the library"
        assert any("%zmm" in body for body in found), signature
    for kernels in ("X86V3Kernels", "DefaultKernels"):
        found = bodies(kernels)
        assert found, f"no {kernels} functions in the library"
        assert not any("%zmm" in body for body in found), kernels
    # The default clone is baseline x86-64 (SSE2): no 32-byte registers either.
    assert not any("%ymm" in body for body in bodies("DefaultKernels"))
    assert any("%ymm" in body for body in bodies("X86V3Kernels"))


def _predefined_macros(source: str, flags: list[str]) -> dict[str, str]:
    """Macro name -> value after preprocessing `source` with the torch headers and flags."""
    from torch.utils import cpp_extension

    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    done = subprocess.run(
        ["c++", "-std=c++20", "-E", "-dM", *includes, *flags, source],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    defines = [line.split(maxsplit=2) for line in done.stdout.splitlines()]
    return {d[1]: d[2] if len(d) > 2 else "" for d in defines if d[0] == "#define"}


@pytest.mark.parametrize("march", ["x86-64-v4", "sapphirerapids", "x86-64-v3", "x86-64"])
def test_kernel_clones_only_in_baseline_builds(march):
    # GCC 12.2 crashes (internal compiler error in expand_direct_optab_fn) on a clone for a
    # lower target than the build's flags: under -march=x86-64-v4 it folds a vector select with
    # a zero arm, `x < lo ? 0 : y * s` (vexp), into a masked multiply (.COND_MUL) that the
    # x86-64-v3 clone cannot expand; always_inline helpers also fail to inline into such a
    # clone ("target specific option mismatch"). So a build whose flags go beyond baseline
    # x86-64 (CAPSNET_FUSED_NATIVE=1 on an AVX-512 CPU) must have the default clone only.
    if shutil.which("c++") is None:
        pytest.skip("no c++ compiler")
    source = os.path.join(os.path.dirname(__file__), os.pardir, "csrc", "routing_cpu.cpp")
    macros = _predefined_macros(source, [f"-march={march}"])
    if "__clang__" in macros or int(macros.get("__GNUC__", "0")) < 11:
        pytest.skip("the kernel clones are built by GCC >= 11 only")
    if "__x86_64__" not in macros:
        pytest.skip("the kernel clones are for x86-64")
    assert ("CAPSNET_X86_CLONES" in macros) == (march == "x86-64")
