// Launchers of the CUDA routing kernels (routing_cuda.cu). Torch-free: raw pointers into
// contiguous buffers and a cudaStream_t passed as void*, so that nvcc compiles the kernels on a
// machine without a CUDA build of torch, and a C++ compiler compiles them for the CPU emulation.
// Shapes: u [B, I, N], w [I, J, N, M], prior [I, J] or null, bias [J, M] or null, v [B, J, M],
// s and V [B, R, J, M], lse [B, R, J] (softmax over in_caps only), grad_v [B, J, M],
// ds [B, R, J, M] (scratch of the backward), du [B, I, N], dw [I, J, N, M], dprior [I, J],
// dbias [J, M].
#pragma once

#include <cstddef>
#include <cstdint>

namespace capsnet_fused {
namespace cuda {

struct Sizes {
  int64_t B, I, J, N, M, R;
};

// The routing variant. Options that change the math go here (and into the kernels' Params).
struct Options {
  bool in_caps = false;       // couplings normalised over input capsules (else output capsules)
  bool detach_inner = false;  // u_hat has a gradient only through the last weighted sum
  bool has_prior = false;     // prior logits [I, J] given
  bool has_bias = false;      // bias [J, M] added to s^t before every squash
  bool leaky = false;         // one extra logit fixed at 0 on the softmax axis
  double squash_eps = 1e-8;   // eps of the squash, >= 0 (0: NaN at s = 0)
};

// Tile sizes. A field left 0 is chosen by plan_routing; tests set them to exercise ragged tiles.
struct Tiles {
  int sweep_warps = 0;    // warps per sweep block
  int sweep_samples = 0;  // samples per sweep block (a multiple of 4: a warp takes 4 at a time)
  int sweep_caps = 0;     // input capsules per sweep block; each block writes one partial
  int sweep_stage = 0;    // capsules staged in shared memory at a time
  int gemm_caps = 0;      // input capsules per split of the first iteration's product
  int grads_caps = 0;     // input capsules per gradient block (the owner of their dW, dprior)
  int grads_samples = 0;  // samples a gradient block stages at a time
  int grads_warps = 0;    // warps per gradient block
  int combine_warps = 0;  // warps per combine block (one warp per (b, j))
};

// Everything the launchers need to know before they run: tiles, grids, shared memory, and the
// workspace the caller allocates (elements of the compute type).
struct Plan {
  Sizes sz;
  Options opt;
  Tiles tiles;
  size_t elem_size;
  int64_t sweep_blocks;   // capsule blocks of a sweep (grid.x)
  int64_t sample_tiles;   // sample tiles of a sweep (grid.y)
  int64_t gemm_splits;    // splits of the first iteration's product (grid.z)
  int64_t grads_blocks;   // gradient blocks (grid.x)
  size_t sweep_forward_shared, sweep_backward_shared, gemm_shared, grads_shared;  // bytes
  int64_t forward_workspace, backward_workspace;  // elements
  char error[256];  // why the problem cannot be run (plan_routing returned non-zero)
};

// Fills *plan for a problem of element size elem_size (4 or 8), taking the non-zero fields of
// `request` as given. Returns 0, or a CUDA error code with plan->error saying why.
int plan_routing(const Sizes& sz, const Options& opt, const Tiles& request, size_t elem_size,
                 Plan* plan);

template <typename T>
struct Tensors {
  const T* u;
  const T* w;
  const T* prior;   // null without a prior
  const T* bias;    // null without a bias
  T* v;             // forward output
  T* s;             // s^t, saved by the forward, read by the backward
  T* V;             // V^{t-1}, saved by the forward, read by the backward
  T* lse;           // log-sum-exp over i (in_caps), saved by the forward
  const T* grad_v;  // backward input
  T* ds;            // backward scratch [B, R, J, M]
  T* du;            // backward outputs, null when not wanted
  T* dw;
  T* dprior;
  T* dbias;
  T* workspace;     // plan.forward_workspace / backward_workspace elements
};

// Each returns 0 (cudaSuccess) or a CUDA error code; error_string(code) describes it.
template <typename T>
int routing_forward(const Plan& plan, const Tensors<T>& t, void* stream);

template <typename T>
int routing_backward(const Plan& plan, const Tensors<T>& t, void* stream);

const char* error_string(int code);

}  // namespace cuda
}  // namespace capsnet_fused
