// Registers the CUDA kernels (routing_cuda.cu) for capsnet_fused::cpp_routing_fwd / _bwd.
// Built only when setup.py finds a CUDA build of torch and nvcc.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "routing_common.h"
#include "routing_cuda.h"

namespace capsnet_fused {
namespace {

// The current stream of `device`, taken through c10's device-guard interface so that this file
// needs no CUDA headers.
void* current_stream(const c10::Device& device) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
}

cuda::Sizes cuda_sizes(const RoutingSizes& sz) { return {sz.B, sz.I, sz.J, sz.N, sz.M, sz.R}; }

void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "capsnet_fused: CUDA ", what, " failed: ", cuda::error_string(code),
              " (the fallback kernels keep 3 J M + 6 J values per block in 48 KB of shared "
              "memory; use the triton backend for larger capsules)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_fwd_cuda(
    const at::Tensor& u, const at::Tensor& weight, const std::optional<at::Tensor>& prior,
    int64_t iterations, bool softmax_in_caps, bool /*detach_inner: backward only*/) {
  const c10::DeviceGuard guard(u.device());
  const ForwardCall call = prepare_forward(u, weight, prior, iterations, softmax_in_caps);
  void* stream = current_stream(u.device());
  AT_DISPATCH_FLOATING_TYPES(call.dtype, "cpp_routing_fwd_cuda", [&] {
    using T = scalar_t;
    check_launch(cuda::routing_forward<T>(call.u.data_ptr<T>(), call.w.data_ptr<T>(),
                                          ptr_or_null<T>(call.prior), call.v.data_ptr<T>(),
                                          call.s.data_ptr<T>(), call.V.data_ptr<T>(),
                                          call.lse.data_ptr<T>(), cuda_sizes(call.sz),
                                          softmax_in_caps, stream),
                 "routing forward");
  });
  return finish_forward(call, u.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_bwd_cuda(
    const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& weight,
    const std::optional<at::Tensor>& prior, const at::Tensor& s, const at::Tensor& V,
    const at::Tensor& lse, int64_t iterations, bool softmax_in_caps, bool detach_inner,
    bool need_du, bool need_dweight, bool need_dprior) {
  const c10::DeviceGuard guard(u.device());
  const BackwardCall call = prepare_backward(grad_v, u, weight, prior, s, V, lse, iterations,
                                             softmax_in_caps, need_du, need_dweight, need_dprior);
  if (call.any()) {
    void* stream = current_stream(u.device());
    // Scratch of the CUDA kernels: ds^t . s^t per (b, t, j).
    const at::Tensor dss = at::empty({call.sz.B, call.sz.R, call.sz.J}, call.ds.options());
    AT_DISPATCH_FLOATING_TYPES(call.dtype, "cpp_routing_bwd_cuda", [&] {
      using T = scalar_t;
      check_launch(
          cuda::routing_backward<T>(
              call.g.data_ptr<T>(), call.u.data_ptr<T>(), call.w.data_ptr<T>(),
              ptr_or_null<T>(call.prior), call.s.data_ptr<T>(), call.V.data_ptr<T>(),
              call.lse.data_ptr<T>(), call.ds.data_ptr<T>(), dss.data_ptr<T>(),
              call.need_du ? call.du.data_ptr<T>() : nullptr,
              call.need_dw ? call.dw.data_ptr<T>() : nullptr,
              call.need_dp ? call.dp.data_ptr<T>() : nullptr, cuda_sizes(call.sz),
              softmax_in_caps, detach_inner, stream),
          "routing backward");
    });
  }
  return finish_backward(call, u, weight, prior);
}

}  // namespace

TORCH_LIBRARY_IMPL(capsnet_fused, CUDA, m) {
  m.impl("cpp_routing_fwd", &routing_fwd_cuda);
  m.impl("cpp_routing_bwd", &routing_bwd_cuda);
}

}  // namespace capsnet_fused
