// Argument checks and output allocation shared by the CPU and CUDA registrations.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace capsnet_fused {

// Sizes of one routing problem, taken from u [B, I, N] and weight [I, J, N, M].
struct RoutingSizes {
  int64_t B, I, J, N, M, R;
};

// float16/bfloat16 are computed in float32; float32 and float64 natively.
inline at::ScalarType compute_dtype(at::ScalarType dtype) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
}

// Tests set CAPSNET_FUSED_POISON_OUTPUTS=1 so that every buffer the kernels must write starts
// as NaN: an element a kernel forgets to write then fails the comparison instead of passing
// by luck with whatever the allocator returned.
inline bool poison_outputs() {
  const char* flag = std::getenv("CAPSNET_FUSED_POISON_OUTPUTS");
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (poison_outputs()) {
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  }
  return at::empty(sizes, options);
}

inline RoutingSizes check_routing_args(
    const at::Tensor& u, const at::Tensor& weight, const std::optional<at::Tensor>& prior,
    const std::optional<at::Tensor>& bias, int64_t iterations, double squash_eps) {
  TORCH_CHECK(u.dim() == 3, "capsnet_fused: u must be [B, I, N], got ", u.sizes());
  TORCH_CHECK(weight.dim() == 4, "capsnet_fused: weight must be [I, J, N, M], got ",
              weight.sizes());
  RoutingSizes sz{u.size(0), weight.size(0), weight.size(1), weight.size(2), weight.size(3),
                  iterations};
  TORCH_CHECK(u.size(1) == sz.I && u.size(2) == sz.N, "capsnet_fused: u ", u.sizes(),
              " does not match weight ", weight.sizes(), "; expected u [B, I, N]");
  TORCH_CHECK(iterations >= 1, "capsnet_fused: iterations must be >= 1, got ", iterations);
  TORCH_CHECK(u.scalar_type() == weight.scalar_type(),
              "capsnet_fused: u and weight must have one dtype, got ", u.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(u.is_floating_point(), "capsnet_fused: expected floating-point inputs, got ",
              u.scalar_type());
  TORCH_CHECK(weight.device() == u.device(), "capsnet_fused: weight is on ", weight.device(),
              " but u is on ", u.device());
  if (prior.has_value()) {
    TORCH_CHECK(prior->dim() == 2 && prior->size(0) == sz.I && prior->size(1) == sz.J,
                "capsnet_fused: prior must be [I, J] = [", sz.I, ", ", sz.J, "], got ",
                prior->sizes());
    TORCH_CHECK(prior->scalar_type() == u.scalar_type(),
                "capsnet_fused: prior must have the dtype of u, got ", prior->scalar_type());
    TORCH_CHECK(prior->device() == u.device(), "capsnet_fused: prior is on ", prior->device(),
                " but u is on ", u.device());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == sz.J && bias->size(1) == sz.M,
                "capsnet_fused: bias must be [J, M] = [", sz.J, ", ", sz.M, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == u.scalar_type(),
                "capsnet_fused: bias must have the dtype of u, got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == u.device(), "capsnet_fused: bias is on ", bias->device(),
                " but u is on ", u.device());
  }
  // `!(x >= 0)` also refuses NaN.
  TORCH_CHECK_VALUE(!(squash_eps < 0) && std::isfinite(squash_eps),
                    "capsnet_fused: squash_eps must be a finite number >= 0, got ", squash_eps);
  return sz;
}

// The saved states of the forward: s and V [B, R, J, M], lse [B, R, J] (in_caps) or [B, 0, J].
inline void check_saved_states(const RoutingSizes& sz, bool softmax_in_caps, const at::Tensor& s,
                               const at::Tensor& V, const at::Tensor& lse,
                               at::ScalarType dtype) {
  const std::vector<int64_t> state{sz.B, sz.R, sz.J, sz.M};
  TORCH_CHECK(s.sizes() == at::IntArrayRef(state) && V.sizes() == at::IntArrayRef(state),
              "capsnet_fused: saved s and V must be [B, R, J, M] = ", at::IntArrayRef(state),
              ", got ", s.sizes(), " and ", V.sizes());
  const std::vector<int64_t> lse_shape{sz.B, softmax_in_caps ? sz.R : 0, sz.J};
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lse_shape), "capsnet_fused: saved lse must be ",
              at::IntArrayRef(lse_shape), ", got ", lse.sizes());
  TORCH_CHECK(s.scalar_type() == dtype && V.scalar_type() == dtype && lse.scalar_type() == dtype,
              "capsnet_fused: saved states must be ", dtype);
}

// An optional input in the compute dtype, contiguous; undefined when absent.
inline at::Tensor optional_input(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t.has_value() ? t->to(dtype).contiguous() : at::Tensor();
}

// One forward call: contiguous inputs in the compute dtype and freshly allocated outputs.
struct ForwardCall {
  RoutingSizes sz;
  at::ScalarType dtype;  // compute dtype
  at::Tensor u, w, prior, bias, v, s, V, lse;  // prior, bias undefined when absent
};

inline ForwardCall prepare_forward(const at::Tensor& u, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& prior,
                                   const std::optional<at::Tensor>& bias, int64_t iterations,
                                   bool softmax_in_caps, double squash_eps) {
  const RoutingSizes sz = check_routing_args(u, weight, prior, bias, iterations, squash_eps);
  const at::ScalarType dtype = compute_dtype(u.scalar_type());
  const at::TensorOptions opts = u.options().dtype(dtype);
  return ForwardCall{
      sz,
      dtype,
      u.to(dtype).contiguous(),
      weight.to(dtype).contiguous(),
      optional_input(prior, dtype),
      optional_input(bias, dtype),
      new_output({sz.B, sz.J, sz.M}, opts),
      new_output({sz.B, sz.R, sz.J, sz.M}, opts),
      new_output({sz.B, sz.R, sz.J, sz.M}, opts),
      new_output({sz.B, softmax_in_caps ? sz.R : 0, sz.J}, opts)};
}

// One backward call. du, dw, dp, db are [0]-shaped where not wanted; ds [B, R, J, M] is
// scratch (dL/d(s^t + bias)).
struct BackwardCall {
  RoutingSizes sz;
  at::ScalarType dtype;  // compute dtype
  bool need_du, need_dw, need_dp, need_db;
  at::Tensor g, u, w, prior, bias, s, V, lse, ds, du, dw, dp, db;
  bool any() const { return need_du || need_dw || need_dp || need_db; }
};

inline BackwardCall prepare_backward(const at::Tensor& grad_v, const at::Tensor& u,
                                     const at::Tensor& weight,
                                     const std::optional<at::Tensor>& prior,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& s,
                                     const at::Tensor& V, const at::Tensor& lse,
                                     int64_t iterations, bool softmax_in_caps, double squash_eps,
                                     bool need_du, bool need_dweight, bool need_dprior,
                                     bool need_dbias) {
  const RoutingSizes sz = check_routing_args(u, weight, prior, bias, iterations, squash_eps);
  const at::ScalarType dtype = compute_dtype(u.scalar_type());
  TORCH_CHECK(grad_v.sizes() == at::IntArrayRef({sz.B, sz.J, sz.M}),
              "capsnet_fused: grad_v must be [B, J, M] = [", sz.B, ", ", sz.J, ", ", sz.M,
              "], got ", grad_v.sizes());
  TORCH_CHECK(grad_v.device() == u.device(), "capsnet_fused: grad_v is on ", grad_v.device(),
              " but u is on ", u.device());
  check_saved_states(sz, softmax_in_caps, s, V, lse, dtype);
  const at::TensorOptions opts = u.options().dtype(dtype);
  need_dprior = need_dprior && prior.has_value();
  need_dbias = need_dbias && bias.has_value();
  BackwardCall call{sz, dtype, need_du, need_dweight, need_dprior, need_dbias};
  call.du = need_du ? new_output({sz.B, sz.I, sz.N}, opts) : at::empty({0}, opts);
  call.dw = need_dweight ? new_output({sz.I, sz.J, sz.N, sz.M}, opts) : at::empty({0}, opts);
  call.dp = need_dprior ? new_output({sz.I, sz.J}, opts) : at::empty({0}, opts);
  call.db = need_dbias ? new_output({sz.J, sz.M}, opts) : at::empty({0}, opts);
  if (call.any()) {
    call.g = grad_v.to(dtype).contiguous();
    call.u = u.to(dtype).contiguous();
    call.w = weight.to(dtype).contiguous();
    call.prior = optional_input(prior, dtype);
    call.bias = optional_input(bias, dtype);
    call.s = s.contiguous();
    call.V = V.contiguous();
    call.lse = lse.contiguous();
    call.ds = new_output({sz.B, sz.R, sz.J, sz.M}, opts);
  }
  return call;
}

// The op's results in the caller's dtypes.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_forward(
    const ForwardCall& call, at::ScalarType out_dtype) {
  return {call.v.to(out_dtype), call.s, call.V, call.lse};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_backward(
    const BackwardCall& call, const at::Tensor& u, const at::Tensor& weight,
    const std::optional<at::Tensor>& prior, const std::optional<at::Tensor>& bias) {
  return {call.du.to(u.scalar_type()), call.dw.to(weight.scalar_type()),
          call.dp.to(prior.has_value() ? prior->scalar_type() : u.scalar_type()),
          call.db.to(bias.has_value() ? bias->scalar_type() : u.scalar_type())};
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace capsnet_fused
