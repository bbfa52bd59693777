// Torch glue of the CUDA routing kernels (routing_cuda.cu), compiled in two builds:
//   - the CUDA build (setup.py, with a CUDA torch and nvcc): registers the kernels for CUDA
//     tensors as capsnet_fused::cpp_routing_fwd / cpp_routing_bwd;
//   - the emulated build (CAPSNET_FUSED_CUDA_EMULATION, tests/cuda_emulation.py): the same
//     kernels compiled as C++ run on the CPU under csrc/cuda_emulation.h, registered for CPU
//     tensors under the test-only names capsnet_fused::cuda_emulated_routing_fwd / _bwd with
//     the same schema (routing_schema.h).
// Both take the same path from tensors to the launchers: this file.
//
// CAPSNET_FUSED_CUDA_TILES="sweep_samples=8,sweep_caps=3,..." sets tile sizes (the fields of
// cuda::Tiles) instead of letting the planner choose; the tests use it for ragged tiles.
#include <torch/library.h>

#include <cstdlib>
#include <string>

#ifndef CAPSNET_FUSED_CUDA_EMULATION
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#endif

#include "routing_common.h"
#include "routing_cuda.h"
#include "routing_schema.h"

namespace capsnet_fused {
namespace {

#ifdef CAPSNET_FUSED_CUDA_EMULATION
void* current_stream(const c10::Device& /*device*/) { return nullptr; }
#else
// The current stream of `device`, taken through c10's device-guard interface so that this file
// needs no CUDA headers.
void* current_stream(const c10::Device& device) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
}
#endif

cuda::Tiles requested_tiles() {
  cuda::Tiles tiles;
  const char* env = std::getenv("CAPSNET_FUSED_CUDA_TILES");
  if (env == nullptr) return tiles;
  const std::string spec(env);
  size_t pos = 0;
  while (pos < spec.size()) {
    size_t end = spec.find(',', pos);
    if (end == std::string::npos) end = spec.size();
    const std::string item = spec.substr(pos, end - pos);
    pos = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    TORCH_CHECK(eq != std::string::npos, "CAPSNET_FUSED_CUDA_TILES: expected key=value, got '",
                item, "'");
    const std::string key = item.substr(0, eq);
    const int value = std::stoi(item.substr(eq + 1));
    int* field = key == "sweep_warps"     ? &tiles.sweep_warps
                 : key == "sweep_samples" ? &tiles.sweep_samples
                 : key == "sweep_caps"    ? &tiles.sweep_caps
                 : key == "sweep_stage"   ? &tiles.sweep_stage
                 : key == "gemm_caps"     ? &tiles.gemm_caps
                 : key == "grads_caps"    ? &tiles.grads_caps
                 : key == "grads_samples" ? &tiles.grads_samples
                 : key == "grads_warps"   ? &tiles.grads_warps
                 : key == "combine_warps" ? &tiles.combine_warps
                                          : nullptr;
    TORCH_CHECK(field != nullptr, "CAPSNET_FUSED_CUDA_TILES: unknown tile '", key, "'");
    *field = value;
  }
  return tiles;
}

cuda::Plan make_plan(const RoutingSizes& sz, const cuda::Options& opt, at::ScalarType dtype) {
  cuda::Plan plan;
  const int code = cuda::plan_routing({sz.B, sz.I, sz.J, sz.N, sz.M, sz.R}, opt,
                                      requested_tiles(), c10::elementSize(dtype), &plan);
  TORCH_CHECK(code == 0, "capsnet_fused: ", plan.error);
  return plan;
}

void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "capsnet_fused: CUDA ", what, " failed: ", cuda::error_string(code));
}

cuda::Options make_options(const std::optional<at::Tensor>& prior,
                           const std::optional<at::Tensor>& bias, bool softmax_in_caps,
                           bool detach_inner, bool leaky, double squash_eps) {
  cuda::Options opt;
  opt.in_caps = softmax_in_caps;
  opt.detach_inner = detach_inner;
  opt.has_prior = prior.has_value();
  opt.has_bias = bias.has_value();
  opt.leaky = leaky;
  opt.squash_eps = squash_eps;
  return opt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_fwd(
    const at::Tensor& u, const at::Tensor& weight, const std::optional<at::Tensor>& prior,
    const std::optional<at::Tensor>& bias, int64_t iterations, bool softmax_in_caps,
    bool detach_inner, bool leaky, double squash_eps) {
#ifndef CAPSNET_FUSED_CUDA_EMULATION
  const c10::DeviceGuard guard(u.device());
#endif
  const ForwardCall call =
      prepare_forward(u, weight, prior, bias, iterations, softmax_in_caps, squash_eps);
  if (call.sz.B == 0) return finish_forward(call, u.scalar_type());
  const cuda::Plan plan = make_plan(
      call.sz, make_options(prior, bias, softmax_in_caps, detach_inner, leaky, squash_eps),
      call.dtype);
  // Scratch of the kernels (partials, first couplings); NaN-filled when tests poison outputs.
  const at::Tensor workspace = new_output({plan.forward_workspace}, call.v.options());
  void* stream = current_stream(u.device());
  AT_DISPATCH_FLOATING_TYPES(call.dtype, "cuda_routing_fwd", [&] {
    using T = scalar_t;
    cuda::Tensors<T> t{};
    t.u = call.u.data_ptr<T>();
    t.w = call.w.data_ptr<T>();
    t.prior = ptr_or_null<T>(call.prior);
    t.bias = ptr_or_null<T>(call.bias);
    t.v = call.v.data_ptr<T>();
    t.s = call.s.data_ptr<T>();
    t.V = call.V.data_ptr<T>();
    t.lse = call.lse.data_ptr<T>();
    t.workspace = workspace.data_ptr<T>();
    check_launch(cuda::routing_forward<T>(plan, t, stream), "routing forward");
  });
  return finish_forward(call, u.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_bwd(
    const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& weight,
    const std::optional<at::Tensor>& prior, const std::optional<at::Tensor>& bias,
    const at::Tensor& s, const at::Tensor& V, const at::Tensor& lse, int64_t iterations,
    bool softmax_in_caps, bool detach_inner, bool leaky, double squash_eps, bool need_du,
    bool need_dweight, bool need_dprior, bool need_dbias) {
#ifndef CAPSNET_FUSED_CUDA_EMULATION
  const c10::DeviceGuard guard(u.device());
#endif
  const BackwardCall call =
      prepare_backward(grad_v, u, weight, prior, bias, s, V, lse, iterations, softmax_in_caps,
                       squash_eps, need_du, need_dweight, need_dprior, need_dbias);
  if (call.any()) {
    const cuda::Plan plan = make_plan(
        call.sz, make_options(prior, bias, softmax_in_caps, detach_inner, leaky, squash_eps),
        call.dtype);
    const at::Tensor workspace = new_output({plan.backward_workspace}, call.ds.options());
    void* stream = current_stream(u.device());
    AT_DISPATCH_FLOATING_TYPES(call.dtype, "cuda_routing_bwd", [&] {
      using T = scalar_t;
      cuda::Tensors<T> t{};
      t.u = call.u.data_ptr<T>();
      t.w = call.w.data_ptr<T>();
      t.prior = ptr_or_null<T>(call.prior);
      t.bias = ptr_or_null<T>(call.bias);
      t.s = call.s.data_ptr<T>();
      t.V = call.V.data_ptr<T>();
      t.lse = call.lse.data_ptr<T>();
      t.grad_v = call.g.data_ptr<T>();
      t.ds = call.ds.data_ptr<T>();
      t.du = call.need_du ? call.du.data_ptr<T>() : nullptr;
      t.dw = call.need_dw ? call.dw.data_ptr<T>() : nullptr;
      t.dprior = call.need_dp ? call.dp.data_ptr<T>() : nullptr;
      t.dbias = call.need_db ? call.db.data_ptr<T>() : nullptr;
      t.workspace = workspace.data_ptr<T>();
      check_launch(cuda::routing_backward<T>(plan, t, stream), "routing backward");
    });
  }
  return finish_backward(call, u, weight, prior, bias);
}

}  // namespace

#ifdef CAPSNET_FUSED_CUDA_EMULATION
TORCH_LIBRARY_FRAGMENT(capsnet_fused, m) {
  m.def("cuda_emulated_routing_fwd" CAPSNET_ROUTING_FWD_SCHEMA);
  m.def("cuda_emulated_routing_bwd" CAPSNET_ROUTING_BWD_SCHEMA);
}

TORCH_LIBRARY_IMPL(capsnet_fused, CPU, m) {
  m.impl("cuda_emulated_routing_fwd", &routing_fwd);
  m.impl("cuda_emulated_routing_bwd", &routing_bwd);
}
#else
TORCH_LIBRARY_IMPL(capsnet_fused, CUDA, m) {
  m.impl("cpp_routing_fwd", &routing_fwd);
  m.impl("cpp_routing_bwd", &routing_bwd);
}
#endif

}  // namespace capsnet_fused
