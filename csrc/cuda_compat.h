// What csrc/routing_cuda.cu needs from CUDA, for both of its builds: nvcc (the real kernels)
// and a C++ compiler with CAPSNET_FUSED_CUDA_EMULATION defined (the same kernels run on the CPU
// under csrc/cuda_emulation.h, for the tests). The .cu file itself is identical in both.
#pragma once

#include <cstddef>

#ifdef CAPSNET_FUSED_CUDA_EMULATION
#include "cuda_emulation.h"
// The block's dynamic shared memory, as a byte pointer named `name`.
#define CAPSNET_DYNAMIC_SHARED(name) unsigned char* name = ::cuda_emu::dynamic_shared()
#else
#include <cuda_runtime.h>
#define CAPSNET_DYNAMIC_SHARED(name) extern __shared__ __align__(32) unsigned char name[]
#endif

namespace capsnet_fused {
namespace cuda {

// Dynamic shared memory a kernel may use without opting in to more.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

// The one way the launchers start a kernel: `kernel<<<grid, block, shared_bytes, stream>>>(args)`
// with the opt-in that shared memory above 48 KB needs, or the emulated launch. `name` is for
// the emulation's launch log. Returns 0 or a CUDA error code.
template <typename... Params, typename... Args>
int launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                  size_t shared_bytes, void* stream, Args... args) {
#ifdef CAPSNET_FUSED_CUDA_EMULATION
  (void)stream;
  return ::cuda_emu::launch(name, kernel, grid, block, shared_bytes, args...);
#else
  (void)name;
  if (shared_bytes > kDefaultSharedBytes) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, block, shared_bytes, static_cast<cudaStream_t>(stream)>>>(args...);
  return cudaGetLastError();
#endif
}

}  // namespace cuda
}  // namespace capsnet_fused
