// Torch glue of the CUDA routing kernels (routing_cuda.cu), compiled in two builds:
//   - the CUDA build (setup.py, with a CUDA torch and nvcc): registers the kernels for CUDA
//     tensors as capsnet_fused::cpp_routing_fwd / cpp_routing_bwd, and those of routing logits
//     shared by the batch as cpp_shared_routing_fwd / cpp_shared_routing_bwd;
//   - the emulated build (CAPSNET_FUSED_CUDA_EMULATION, tests/cuda_emulation.py): the same
//     kernels compiled as C++ run on the CPU under csrc/cuda_emulation.h, registered for CPU
//     tensors under the test-only names capsnet_fused::cuda_emulated_routing_fwd / _bwd and
//     cuda_emulated_shared_routing_fwd / _bwd with the same schemas (routing_schema.h).
// Both take the same path from tensors to the launchers: this file.
//
// CAPSNET_FUSED_CUDA_TILES="sweep_samples=8,sweep_caps=3,..." sets tile sizes (the fields of
// cuda::Tiles) instead of letting the planner choose; the tests use it for ragged tiles.
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

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
                 : key == "agree_caps"    ? &tiles.agree_caps
                 : key == "agree_samples" ? &tiles.agree_samples
                 : key == "agree_warps"   ? &tiles.agree_warps
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

// Routing logits shared by the batch (issue 18): the op pair of CAPSNET_SHARED_ROUTING_*_SCHEMA.

cuda::Options make_shared_options(const std::optional<at::Tensor>& prior,
                                  const std::optional<at::Tensor>& bias, bool softmax_in_caps,
                                  bool detach_inner, bool leaky, double squash_eps,
                                  bool batch_mean) {
  cuda::Options opt =
      make_options(prior, bias, softmax_in_caps, detach_inner, leaky, squash_eps);
  opt.shared_logits = true;
  opt.batch_mean = batch_mean;
  return opt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shared_routing_fwd(
    const at::Tensor& u, const at::Tensor& weight, const std::optional<at::Tensor>& prior,
    const std::optional<at::Tensor>& bias, int64_t iterations, bool softmax_in_caps,
    bool detach_inner, bool leaky, double squash_eps, bool batch_mean) {
#ifndef CAPSNET_FUSED_CUDA_EMULATION
  const c10::DeviceGuard guard(u.device());
#endif
  const RoutingSizes sz = check_routing_args(u, weight, prior, bias, iterations, squash_eps);
  const at::ScalarType dtype = compute_dtype(u.scalar_type());
  const at::TensorOptions opts = u.options().dtype(dtype);
  const at::Tensor uc = u.to(dtype).contiguous(), wc = weight.to(dtype).contiguous();
  const at::Tensor pc = optional_input(prior, dtype), bc = optional_input(bias, dtype);
  const at::Tensor v = new_output({sz.B, sz.J, sz.M}, opts);
  const at::Tensor s = new_output({sz.B, sz.R, sz.J, sz.M}, opts);
  const at::Tensor v_iter = new_output({sz.B, sz.R, sz.J, sz.M}, opts);
  const at::Tensor c = new_output({sz.R, sz.I, sz.J}, opts);
  // Also for B = 0: the couplings are saved (the prior's softmax, every iteration).
  const cuda::Plan plan = make_plan(
      sz,
      make_shared_options(prior, bias, softmax_in_caps, detach_inner, leaky, squash_eps,
                          batch_mean),
      dtype);
  const at::Tensor workspace = new_output({plan.shared_forward_workspace}, opts);
  void* stream = current_stream(u.device());
  AT_DISPATCH_FLOATING_TYPES(dtype, "cuda_shared_routing_fwd", [&] {
    using T = scalar_t;
    cuda::Tensors<T> t{};
    t.u = uc.data_ptr<T>();
    t.w = wc.data_ptr<T>();
    t.prior = ptr_or_null<T>(pc);
    t.bias = ptr_or_null<T>(bc);
    t.v = v.data_ptr<T>();
    t.s = s.data_ptr<T>();
    t.v_iter = v_iter.data_ptr<T>();
    t.c = c.data_ptr<T>();
    t.workspace = workspace.data_ptr<T>();
    check_launch(cuda::shared_routing_forward<T>(plan, t, stream), "shared routing forward");
  });
  return {v.to(u.scalar_type()), s, v_iter, c};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shared_routing_bwd(
    const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& weight,
    const std::optional<at::Tensor>& prior, const std::optional<at::Tensor>& bias,
    const at::Tensor& s, const at::Tensor& v_iter, const at::Tensor& c, int64_t iterations,
    bool softmax_in_caps, bool detach_inner, bool leaky, double squash_eps, bool batch_mean,
    bool need_du, bool need_dweight, bool need_dprior, bool need_dbias) {
#ifndef CAPSNET_FUSED_CUDA_EMULATION
  const c10::DeviceGuard guard(u.device());
#endif
  const RoutingSizes sz = check_routing_args(u, weight, prior, bias, iterations, squash_eps);
  const at::ScalarType dtype = compute_dtype(u.scalar_type());
  TORCH_CHECK(grad_v.sizes() == at::IntArrayRef({sz.B, sz.J, sz.M}),
              "capsnet_fused: grad_v must be [B, J, M] = [", sz.B, ", ", sz.J, ", ", sz.M,
              "], got ", grad_v.sizes());
  TORCH_CHECK(grad_v.device() == u.device(), "capsnet_fused: grad_v is on ", grad_v.device(),
              " but u is on ", u.device());
  const std::vector<int64_t> state{sz.B, sz.R, sz.J, sz.M}, couplings{sz.R, sz.I, sz.J};
  TORCH_CHECK(s.sizes() == at::IntArrayRef(state) && v_iter.sizes() == at::IntArrayRef(state),
              "capsnet_fused: saved s and v_iter must be [B, R, J, M] = ",
              at::IntArrayRef(state), ", got ", s.sizes(), " and ", v_iter.sizes());
  TORCH_CHECK(c.sizes() == at::IntArrayRef(couplings),
              "capsnet_fused: saved c must be [R, I, J] = ", at::IntArrayRef(couplings), ", got ",
              c.sizes());
  TORCH_CHECK(s.scalar_type() == dtype && v_iter.scalar_type() == dtype &&
                  c.scalar_type() == dtype,
              "capsnet_fused: saved states must be ", dtype);
  const at::TensorOptions opts = u.options().dtype(dtype);
  need_dprior = need_dprior && prior.has_value();
  need_dbias = need_dbias && bias.has_value();
  const at::Tensor du = need_du ? new_output({sz.B, sz.I, sz.N}, opts) : at::empty({0}, opts);
  const at::Tensor dw =
      need_dweight ? new_output({sz.I, sz.J, sz.N, sz.M}, opts) : at::empty({0}, opts);
  const at::Tensor dp = need_dprior ? new_output({sz.I, sz.J}, opts) : at::empty({0}, opts);
  const at::Tensor db = need_dbias ? new_output({sz.J, sz.M}, opts) : at::empty({0}, opts);
  if (need_du || need_dweight || need_dprior || need_dbias) {
    const cuda::Plan plan = make_plan(
        sz,
        make_shared_options(prior, bias, softmax_in_caps, detach_inner, leaky, squash_eps,
                            batch_mean),
        dtype);
    const at::Tensor gc = grad_v.to(dtype).contiguous();
    const at::Tensor uc = u.to(dtype).contiguous(), wc = weight.to(dtype).contiguous();
    const at::Tensor sc = s.contiguous(), vc = v_iter.contiguous(), cc = c.contiguous();
    const at::Tensor ds = new_output({sz.B, sz.R, sz.J, sz.M}, opts);
    const at::Tensor workspace = new_output({plan.shared_backward_workspace}, opts);
    void* stream = current_stream(u.device());
    AT_DISPATCH_FLOATING_TYPES(dtype, "cuda_shared_routing_bwd", [&] {
      using T = scalar_t;
      cuda::Tensors<T> t{};
      // Neither the prior nor the bias is read: c^t is saved, and so is s^t + bias.
      t.u = uc.data_ptr<T>();
      t.w = wc.data_ptr<T>();
      t.s = sc.data_ptr<T>();
      t.v_iter = vc.data_ptr<T>();
      t.c = cc.data_ptr<T>();
      t.grad_v = gc.data_ptr<T>();
      t.ds = ds.data_ptr<T>();
      t.du = need_du ? du.data_ptr<T>() : nullptr;
      t.dw = need_dweight ? dw.data_ptr<T>() : nullptr;
      t.dprior = need_dprior ? dp.data_ptr<T>() : nullptr;
      t.dbias = need_dbias ? db.data_ptr<T>() : nullptr;
      t.workspace = workspace.data_ptr<T>();
      check_launch(cuda::shared_routing_backward<T>(plan, t, stream), "shared routing backward");
    });
  }
  return {du.to(u.scalar_type()), dw.to(weight.scalar_type()),
          dp.to(prior.has_value() ? prior->scalar_type() : u.scalar_type()),
          db.to(bias.has_value() ? bias->scalar_type() : u.scalar_type())};
}

}  // namespace

#ifdef CAPSNET_FUSED_CUDA_EMULATION
TORCH_LIBRARY_FRAGMENT(capsnet_fused, m) {
  m.def("cuda_emulated_routing_fwd" CAPSNET_ROUTING_FWD_SCHEMA);
  m.def("cuda_emulated_routing_bwd" CAPSNET_ROUTING_BWD_SCHEMA);
  m.def("cuda_emulated_shared_routing_fwd" CAPSNET_SHARED_ROUTING_FWD_SCHEMA);
  m.def("cuda_emulated_shared_routing_bwd" CAPSNET_SHARED_ROUTING_BWD_SCHEMA);
}

TORCH_LIBRARY_IMPL(capsnet_fused, CPU, m) {
  m.impl("cuda_emulated_routing_fwd", &routing_fwd);
  m.impl("cuda_emulated_routing_bwd", &routing_bwd);
  m.impl("cuda_emulated_shared_routing_fwd", &shared_routing_fwd);
  m.impl("cuda_emulated_shared_routing_bwd", &shared_routing_bwd);
}
#else
TORCH_LIBRARY_IMPL(capsnet_fused, CUDA, m) {
  m.impl("cpp_routing_fwd", &routing_fwd);
  m.impl("cpp_routing_bwd", &routing_bwd);
  m.impl("cpp_shared_routing_fwd", &shared_routing_fwd);
  m.impl("cpp_shared_routing_bwd", &shared_routing_bwd);
}
#endif

}  // namespace capsnet_fused
