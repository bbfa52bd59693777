// Launchers of the CUDA routing kernels (routing_cuda.cu). Torch-free: raw pointers into
// contiguous buffers and a cudaStream_t passed as void*, so that nvcc can compile the kernels on
// a machine without a CUDA build of torch. Shapes: u [B, I, N], w [I, J, N, M], prior [I, J] or
// null, v [B, J, M], s and V [B, R, J, M], lse [B, R, J] (softmax over in_caps only).
#pragma once

#include <cstdint>

namespace capsnet_fused {
namespace cuda {

struct Sizes {
  int64_t B, I, J, N, M, R;
};

// Each returns 0 (cudaSuccess) or a CUDA error code; error_string(code) describes it.
template <typename T>
int routing_forward(const T* u, const T* w, const T* prior, T* v, T* s, T* V, T* lse,
                    const Sizes& sz, bool in_caps, void* stream);

// ds [B, R, J, M] and dss [B, R, J] are scratch. du, dw, dprior: null when not wanted.
template <typename T>
int routing_backward(const T* grad_v, const T* u, const T* w, const T* prior, const T* s,
                     const T* V, const T* lse, T* ds, T* dss, T* du, T* dw, T* dprior,
                     const Sizes& sz, bool in_caps, bool detach_inner, void* stream);

const char* error_string(int code);

}  // namespace cuda
}  // namespace capsnet_fused
