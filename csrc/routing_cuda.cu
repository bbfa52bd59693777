// CUDA kernels of capsnet_fused::cpp_routing_fwd / cpp_routing_bwd (math: docs/ROUTING-MATH.md).
// Only the CUDA runtime is used (no torch), so `nvcc -c` checks this file on any machine, and
// with CAPSNET_FUSED_CUDA_EMULATION the same source runs on the CPU (cuda_compat.h).
//
// The decomposition (the plan of the Triton backend, with CUDA's thread mapping):
//   forward   prior_softmax (with a prior), then
//             gemm_kernel: s^1 without softmax: u [B, I*N] x W [I*N, J*M] with the first
//               couplings folded into W as it is loaded, split over capsule ranges (split-K),
//             combine_forward_kernel(0), then for t = 2..R:
//             sweep_forward_kernel(t): tiles of (samples x input capsules); W of a few capsules
//               staged in shared memory and used by every sample of the tile; warps along
//               samples (4 at a time), lanes along (j, m); logits, couplings and the partial s
//               of the tile, written to a partials buffer [capsule blocks, B, J, M] (with the
//               running max and sum per (b, j) for the softmax over input capsules),
//             combine_forward_kernel(t): per (b, j), the partials summed in capsule-block
//               order (the split-softmax merge over i), squash, V^t = V^{t-1} + v^t.
//   backward  combine_backward_kernel(t): ds^t from dL/dv^t = [t = R] g + D, D the dL/dV carry
//               plus the partials A of sweep t+1, in fixed order,
//             sweep_backward_kernel(t), t = R..2 (and 1 when the prior needs its gradient):
//               the forward's tiles; couplings alpha^t and logit gradients beta^t stored as
//               [B, R, I, J] scalars, partial A = sum_i beta u_hat,
//             grads_kernel: each block owns a few capsules and walks every sample in order:
//               du_hat from alpha, beta, ds and V, then du, dW and dprior of its capsules.
// Routing logits shared by the batch (issue 18) use the same pieces in GEMM form (the couplings
// c^t [I, J] are the batch's, so no per-sample sweep is needed; docs/ROUTING-MATH.md):
//   forward   for t = 1..R: shared_softmax_kernel (the logit update b^t = b^{t-1} + a^{t-1} /
//               kappa_div and c^t = softmax(b^t)), gemm_kernel with c^t folded into W,
//               shared_combine_kernel (partials in split order, bias, squash; saves s^t, v^t),
//               and for t < R shared_agree_kernel: a^t_ij = sum_{n,m} W_ijnm sum_b u_bin v^t_bjm,
//               each block the owner of a few capsules, walking the batch in order;
//   backward  for t = R..1: gemm_kernel with D^{t+1} (dL/db^{t+1}) folded into W (dL/dv^t through
//               the logits), shared_combine_back_kernel (ds^t), shared_agree_kernel with ds^t
//               (e^t = dL/dc^t), shared_logits_back_kernel (the softmax backward: D^t, dprior at
//               t = 1); then grads_kernel with du_hat = sum_t c^t ds^t + D^{t+1} v^t / kappa_div
//               (owner-computes du and dW, the batch in order) and bias_grad_kernel.
// No float atomics: every reduction has one owner and a fixed order, so results are
// deterministic (for given tiles). Nothing of size B x I x J x M is allocated.
//
// Thread mapping of the sweeps: a row (j, m) of a capsule is laid out over lanes with m padded
// to MP (a power of two up to 32), so that the m-sums of the logits and of dL/dc are butterflies
// within the MP lanes of a j (the softmax over j, a butterfly over the warp); per (sample,
// capsule) a warp makes KP / 32 passes. The per-sample state (V^{t-1}, ds^t, the partial sums)
// stays in shared memory, each element owned by one lane. Tiles are chosen by plan_routing
// (two blocks per SM of an H100/H200 at the MNIST shape: 64 capsule blocks x 4 sample tiles of
// 32 at B = 128); J x M is limited by shared memory (227 KB per block on sm_90: J * MP up to
// about 2000 in float32), beyond which plan_routing refuses and the triton backend is the way.
// bench/cuda_traffic.py counts each launch's bytes and FLOPs; tests/test_cuda_emulated.py runs
// this file on the CPU (cuda_emulation.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "cuda_compat.h"
#include "routing_cuda.h"

namespace capsnet_fused {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
// Samples a warp works on at once: each W value loaded from shared memory serves 4 samples.
constexpr int kGroup = 4;
// Blocks per launch to aim for: two per SM of an H100/H200 (132 SMs).
constexpr int64_t kTargetBlocks = 264;
constexpr int64_t kMinBlocks = 132;
// gemm_kernel's tile: 32 samples x 64 columns (j, m), 32 rows (i, n) staged at a time;
// 256 threads, each 4 samples x 2 columns.
constexpr int kGemmThreads = 256;
constexpr int kGemmTileB = 32;
constexpr int kGemmTileC = 64;
constexpr int kGemmTileK = 32;
constexpr int kGemmStrideB = kGemmTileB + 4;  // padded rows: 4-way instead of 32-way conflicts
constexpr int kPriorThreads = 256;
constexpr int kBiasThreads = 256;
constexpr int kLogitThreads = 256;

// Everything the kernels read: sizes, variant, tiles, tensors, workspace and the per-launch
// iteration. One struct, passed by value to every kernel, so that a new routing option is one
// field here and one in Options.
template <typename T>
struct Params {
  int B, I, J, N, M, R;
  int JM;      // J * M
  int MP;      // M padded: a power of two up to 32, a multiple of 32 above
  int SW;      // lanes that hold one (j) row of a pass: min(MP, 32)
  int KP;      // columns of a sweep row: J * MP rounded up to a multiple of 32
  int passes;  // KP / 32
  bool in_caps, detach_inner, has_prior, has_bias, leaky;
  T squash_eps;
  int sweep_samples, sweep_caps, sweep_stage, sweep_blocks;
  int gemm_caps, gemm_splits;
  int grads_caps, grads_samples;
  const T* u;
  const T* w;
  const T* prior;
  const T* bias;
  const T* grad_v;
  T* v;
  T* s;
  T* V;
  T* lse;
  T* ds;
  T* du;
  T* dw;
  T* dprior;
  T* dbias;
  // workspace
  T* c1;          // [I, J] first couplings softmax(prior)
  T* lse1;        // [J] log-sum-exp over i of the prior (in_caps)
  T* part_first;  // [gemm_splits, B, J, M]
  T* part_s;      // [sweep_blocks, B, J, M]
  T* part_max;    // [sweep_blocks, B, J] (in_caps)
  T* part_sum;    // [sweep_blocks, B, J] (in_caps)
  T* carry;       // [B, J, M] dL/dV carried between backward iterations
  T* part_a;      // [sweep_blocks, B, J, M]
  T* alpha;       // [B, R, I, J] couplings
  T* beta;        // [B, R, I, J] logit gradients
  // gemm_kernel: out[split, b, (j, m)] = sum u (coef (.) W); coef [I, J] or null (uniform)
  const T* gemm_coef;
  T* gemm_out;
  // shared logits (issue 18)
  bool shared;
  int kappa_div;     // B for the batch mean (at least 1), 1 for the sum
  int agree_caps, agree_samples;
  T* v_iter;         // [B, R, J, M] v^t
  T* coup;           // [R, I, J] saved couplings c^t
  T* logits;         // [I, J] workspace: the running logits b^t (t >= 2)
  T* agree;          // [I, J] workspace: a^t, or e^t = dL/dc^t in the backward
  T* d_hist;         // [R, I, J] workspace: D^t = dL/db^t at row t - 1 (rows 1..R-1 used)
  T* part;           // [gemm_splits, B, J, M] workspace: gemm_kernel's partials
  // per launch
  int k;  // iteration, 0-based (t = k + 1)
  bool read_a, read_carry, write_carry, store_alpha, need_beta, need_a;
  const T* logits_in;  // shared_softmax_kernel: b^{t-1} (the prior, or null: 0)
  bool add_agree, store_logits;
  const T* agree_x;    // shared_agree_kernel: the state contracted with u (v^t or ds^t)
  const T* d_in;       // shared_logits_back_kernel: D^{t+1} (null: 0)
  T* d_out;            // shared_logits_back_kernel: D^t (or dprior)
};

__host__ __device__ inline int64_t round4(int64_t x) { return (x + 3) / 4 * 4; }

__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Offsets (elements) of a sweep block's shared arrays; the host sizes the launch with it.
struct SweepLayout {
  int64_t w, u, prior, V, acc, ds, stat0, stat1, warp, per_warp, total;
};

__host__ __device__ inline SweepLayout sweep_layout(int64_t samples, int64_t stage,
                                                    int64_t warps, int64_t N, int64_t J,
                                                    int64_t KP, bool backward) {
  SweepLayout L;
  L.w = 0;                                         // [stage, N, KP] W, (j, m) padded
  L.u = L.w + round4(stage * N * KP);              // [stage, N, samples]
  L.prior = L.u + round4(stage * N * samples);     // [stage, J]
  L.V = L.prior + round4(stage * J);               // [samples, KP] V^{t-1}
  L.acc = L.V + round4(samples * KP);              // [samples, KP] partial s or A
  L.ds = L.acc + round4(samples * KP);             // [samples, KP] ds^t (backward)
  L.stat0 = L.ds + (backward ? round4(samples * KP) : 0);  // [samples, J] max | lse
  L.stat1 = L.stat0 + round4(samples * J);         // [samples, J] sum | ds.s
  L.warp = L.stat1 + round4(samples * J);
  // per warp: u_hat [4, KP], logits, coupling-gradient e, couplings and scales [4, J] each
  L.per_warp = round4(kGroup * KP) + 4 * round4(kGroup * J);
  L.total = L.warp + warps * L.per_warp;
  return L;
}

// Offsets (elements) of a gradient block's shared arrays.
struct GradsLayout {
  int64_t w, dw, duh, u, dp, total, JMs;
};

__host__ __device__ inline GradsLayout grads_layout(int64_t caps, int64_t samples, int64_t J,
                                                    int64_t N, int64_t M) {
  GradsLayout L;
  // Rows of J*M padded to an odd length: threads along n read rows without bank conflicts.
  L.JMs = J * M + ((J * M) % 2 == 0 ? 1 : 0);
  L.w = 0;                                        // [caps, N, JMs]
  L.dw = L.w + round4(caps * N * L.JMs);          // [caps, J, N, M] dW accumulators
  L.duh = L.dw + round4(caps * J * N * M);        // [samples, caps, JMs] du_hat
  L.u = L.duh + round4(samples * caps * L.JMs);   // [samples, caps, N]
  L.dp = L.u + round4(samples * caps * N);        // [caps, J] dprior accumulators
  L.total = L.dp + round4(caps * J);
  return L;
}

__device__ inline float dev_exp(float x) { return expf(x); }
__device__ inline double dev_exp(double x) { return exp(x); }
__device__ inline float dev_log(float x) { return logf(x); }
__device__ inline double dev_log(double x) { return log(x); }
__device__ inline float dev_sqrt(float x) { return sqrtf(x); }
__device__ inline double dev_sqrt(double x) { return sqrt(x); }
__device__ inline float dev_abs(float x) { return fabsf(x); }
__device__ inline double dev_abs(double x) { return fabs(x); }

template <typename T>
__device__ inline T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// max that returns NaN when either argument is NaN, the same whichever comes first (so that a
// butterfly gives every lane the same value).
template <typename T>
__device__ inline T max_nan(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// Butterfly reductions over the warp: every lane gets the result, the same bits on every lane
// (each step adds a pair in both orders), in a fixed order.
template <typename T>
__device__ inline T warp_sum(T x) {
  for (int off = kWarpSize / 2; off > 0; off /= 2) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

template <typename T>
__device__ inline T warp_max(T x) {
  for (int off = kWarpSize / 2; off > 0; off /= 2) {
    const T y = __shfl_xor_sync(kFullMask, x, off);
    x = y > x ? y : x;
  }
  return x;
}

template <typename T>
__device__ inline T warp_max_nan(T x) {
  for (int off = kWarpSize / 2; off > 0; off /= 2) {
    x = max_nan(x, __shfl_xor_sync(kFullMask, x, off));
  }
  return x;
}

// Sums over aligned groups of `width` lanes (a power of two up to 32).
template <typename T>
__device__ inline T group_sum(T x, int width) {
  for (int off = width / 2; off > 0; off /= 2) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

template <typename T>
struct alignas(kGroup * sizeof(T)) Group {
  T x[kGroup];
};

template <typename T>
__device__ inline Group<T> load_group(const T* p) {
  return *reinterpret_cast<const Group<T>*>(p);
}

// The overflow-safe squash of one capsule, the formulation every backend uses: a = max |s_m|,
// t = s / a, v = g t with g = 1 / (1 + r / qt) / sqrt(qt + eps r), r = 1 / a^2, qt = |t|^2
// (the same as |s|^2 / (1 + |s|^2) s / sqrt(|s|^2 + eps), which overflows in float32 once |s|
// passes ~7e12). A warp computes it with lanes along m; Squash holds what the forward and
// backward share. At s = 0, v = 0 and ds = 0 for eps > 0; for eps = 0 both are NaN (the
// eps-free squash is 0/0 there), as in the reference.
template <typename T>
struct Squash {
  T a;   // max |s_m| (0: see at_zero)
  T qt;  // |s / a|^2
  T r;   // 1 / a^2
  T er;  // eps r (0 when eps is 0)
  T g;   // v = g s / a
  T at_zero;  // v and ds where a = 0: 0, or NaN when eps = 0
};

template <typename T>
__device__ inline Squash<T> warp_squash(const T* s_row, int M, T eps, int lane) {
  Squash<T> q;
  T a = 0;
  for (int m = lane; m < M; m += kWarpSize) a = max_nan(a, dev_abs(s_row[m]));
  q.a = warp_max_nan(a);
  q.qt = q.r = q.er = q.g = 0;
  q.at_zero = eps == T(0) ? static_cast<T>(NAN) : T(0);
  if (q.a == T(0)) return q;
  T qt = 0;
  for (int m = lane; m < M; m += kWarpSize) {
    const T t = s_row[m] / q.a;
    qt += t * t;
  }
  q.qt = warp_sum(qt);
  q.r = T(1) / (q.a * q.a);
  q.er = eps == T(0) ? T(0) : eps * q.r;
  q.g = T(1) / (T(1) + q.r / q.qt) / dev_sqrt(q.qt + q.er);
  return q;
}

// Squash backward of one capsule by a warp, lanes along m: ds_row holds dv = dL/dv on entry
// (each lane its own elements) and ds = dL/ds on return:
// ds = (g / a) (dv + 2 h (t . dv) t), h = 1/qt - 1/(r + qt) - 1/(2 (qt + er)).
template <typename T>
__device__ inline void warp_squash_backward(const T* s_row, T* ds_row, int M, T eps, int lane) {
  const Squash<T> q = warp_squash(s_row, M, eps, lane);
  if (q.a == T(0)) {
    for (int m = lane; m < M; m += kWarpSize) ds_row[m] = q.at_zero;
    return;
  }
  T td = 0;
  for (int m = lane; m < M; m += kWarpSize) td += (s_row[m] / q.a) * ds_row[m];
  td = warp_sum(td);
  const T h = T(1) / q.qt - T(1) / (q.r + q.qt) - T(1) / (T(2) * (q.qt + q.er));
  const T scale = q.g / q.a;
  const T k2 = T(2) * h * td;
  for (int m = lane; m < M; m += kWarpSize) {
    ds_row[m] = scale * (ds_row[m] + k2 * (s_row[m] / q.a));
  }
}

// A softmax's max and denominator: sum_i exp(x_i - max).
template <typename T>
struct Softmax {
  T max, sum;
};

// The softmax over count logits logit(i), i = 0..count-1, held by one warp: per lane an online
// max and sum over its logits (i = lane, lane + 32, ...), then a butterfly merge, so that every
// lane returns the same (max, sum). Leaky: one more logit, 0, starts lane 0's.
template <typename T, typename Logit>
__device__ inline Softmax<T> warp_softmax(int64_t count, bool leaky, int lane, Logit logit) {
  const bool leak = leaky && lane == 0;
  T mx = leak ? T(0) : neg_inf<T>(), sum = leak ? T(1) : T(0);
  for (int64_t i = lane; i < count; i += kWarpSize) {
    const T x = logit(i);
    if (x > mx) {
      sum = sum * dev_exp(mx - x) + T(1);
      mx = x;
    } else {
      sum += dev_exp(x - mx);
    }
  }
  for (int off = kWarpSize / 2; off > 0; off /= 2) {
    const T om = __shfl_xor_sync(kFullMask, mx, off);
    const T os = __shfl_xor_sync(kFullMask, sum, off);
    const T nm = om > mx ? om : mx;
    // A lane without logits has sum 0 and max -inf: it adds nothing (and no inf - inf).
    const T mine = sum == T(0) ? T(0) : sum * dev_exp(mx - nm);
    const T other = os == T(0) ? T(0) : os * dev_exp(om - nm);
    sum = mine + other;
    mx = nm;
  }
  return {mx, sum};
}

// prior softmax: c1 = softmax(prior) over j (out_caps: a thread per capsule) or over i (in_caps:
// a warp per output capsule j, which also writes lse1[j]). Leaky: one more logit, 0, in the
// max and the sum.

template <typename T>
__global__ void prior_softmax_kernel(Params<T> p) {
  const int J = p.J;
  if (!p.in_caps) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= p.I) return;
    const T* row = p.prior + i * J;
    T mx = p.leaky ? T(0) : neg_inf<T>();
    for (int j = 0; j < J; ++j) mx = row[j] > mx ? row[j] : mx;
    T den = p.leaky ? dev_exp(-mx) : T(0);
    for (int j = 0; j < J; ++j) den += dev_exp(row[j] - mx);
    for (int j = 0; j < J; ++j) p.c1[i * J + j] = dev_exp(row[j] - mx) / den;
    return;
  }
  const int j = blockIdx.x;
  const int lane = threadIdx.x;
  const Softmax<T> sm =
      warp_softmax<T>(p.I, p.leaky, lane, [&](int64_t i) { return p.prior[i * J + j]; });
  const T lse = sm.max + dev_log(sm.sum);
  if (lane == 0) p.lse1[j] = lse;
  for (int64_t i = lane; i < p.I; i += kWarpSize) {
    p.c1[i * J + j] = dev_exp(p.prior[i * J + j] - lse);
  }
}

// First iteration: part_first[split, b, c] = sum over the split's rows (i, n) of
// u[b, i, n] c1[i, j] W[i, j, n, m], c = (j, m). Without a prior c1 is uniform and the combine
// divides by J (out_caps) or I (in_caps). In general gemm_out = u x (gemm_coef (.) W) (the
// shared-logits launchers pass c^t or D^{t+1}; null gemm_coef: W alone).

template <typename T>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(Params<T> p) {
  CAPSNET_DYNAMIC_SHARED(raw);
  T* u_s = reinterpret_cast<T*>(raw);          // [TK, TB + 4] u, rows (i, n)
  T* w_s = u_s + kGemmTileK * kGemmStrideB;    // [TK, TC]
  const int tid = threadIdx.x;
  const int ty = tid / kWarpSize, tx = tid % kWarpSize;
  const int c0 = blockIdx.x * kGemmTileC;
  const int b0 = blockIdx.y * kGemmTileB;
  const int split = blockIdx.z;
  const int64_t IN = static_cast<int64_t>(p.I) * p.N;
  const int64_t NM = static_cast<int64_t>(p.N) * p.M;
  const int64_t i_begin = static_cast<int64_t>(split) * p.gemm_caps;
  const int64_t i_end = i_begin + p.gemm_caps < p.I ? i_begin + p.gemm_caps : p.I;
  const int64_t k_end = i_end * p.N;
  T acc[kGroup][2];
  for (int r = 0; r < kGroup; ++r) acc[r][0] = acc[r][1] = T(0);
  for (int64_t k0 = i_begin * p.N; k0 < k_end; k0 += kGemmTileK) {
    for (int e = tid; e < kGemmTileB * kGemmTileK; e += kGemmThreads) {
      const int bl = e / kGemmTileK, kq = e % kGemmTileK;
      const int64_t b = b0 + bl, kk = k0 + kq;
      u_s[kq * kGemmStrideB + bl] = (b < p.B && kk < k_end) ? p.u[b * IN + kk] : T(0);
    }
    for (int e = tid; e < kGemmTileK * kGemmTileC; e += kGemmThreads) {
      const int kq = e / kGemmTileC, cq = e % kGemmTileC;
      const int64_t kk = k0 + kq;
      const int c = c0 + cq;
      T val = 0;
      if (kk < k_end && c < p.JM) {
        const int64_t i = kk / p.N;
        const int n = static_cast<int>(kk % p.N);
        const int j = c / p.M, m = c % p.M;
        val = p.w[(i * p.J + j) * NM + static_cast<int64_t>(n) * p.M + m];
        if (p.gemm_coef != nullptr) val *= p.gemm_coef[i * p.J + j];
      }
      w_s[kq * kGemmTileC + cq] = val;
    }
    __syncthreads();
    for (int kq = 0; kq < kGemmTileK; ++kq) {
      const Group<T> ug = load_group(u_s + kq * kGemmStrideB + ty * kGroup);
      const T w0 = w_s[kq * kGemmTileC + tx];
      const T w1 = w_s[kq * kGemmTileC + tx + kWarpSize];
      for (int r = 0; r < kGroup; ++r) {
        acc[r][0] += ug.x[r] * w0;
        acc[r][1] += ug.x[r] * w1;
      }
    }
    __syncthreads();
  }
  for (int r = 0; r < kGroup; ++r) {
    const int64_t b = b0 + ty * kGroup + r;
    for (int q = 0; q < 2; ++q) {
      const int c = c0 + tx + q * kWarpSize;
      if (b < p.B && c < p.JM) {
        p.gemm_out[(static_cast<int64_t>(split) * p.B + b) * p.JM + c] = acc[r][q];
      }
    }
  }
}

// Sweeps. Block (capsule block, sample tile); warps take groups of 4 samples, lanes take the
// columns (j, m) of a row, padded so that each j owns SW aligned lanes (m-reductions are
// butterflies within them) or, for M > 32, whole passes.

template <typename T>
struct SweepTile {
  T* w;      // [stage, N, KP]
  T* u;      // [stage, N, samples]
  T* prior;  // [stage, J]
  T* V;      // [samples, KP]
  T* acc;    // [samples, KP]
  T* ds;     // [samples, KP]
  T* stat0;  // [samples, J]
  T* stat1;  // [samples, J]
  T* uh;     // this warp's [4, KP]
  T* lg;     // this warp's [4, J] logits
  T* e;      // this warp's [4, J] dL/dc
  T* cf;     // this warp's [4, J] couplings, or beta
  T* sc;     // this warp's [4, J] rescaling of the partial s (in_caps)
  int64_t i_begin, i_end, b0;
};

template <typename T>
__device__ inline SweepTile<T> sweep_tile(const Params<T>& p, bool backward) {
  CAPSNET_DYNAMIC_SHARED(raw);
  T* sh = reinterpret_cast<T*>(raw);
  const int warps = blockDim.x / kWarpSize;
  const SweepLayout L =
      sweep_layout(p.sweep_samples, p.sweep_stage, warps, p.N, p.J, p.KP, backward);
  SweepTile<T> t;
  t.w = sh + L.w;
  t.u = sh + L.u;
  t.prior = sh + L.prior;
  t.V = sh + L.V;
  t.acc = sh + L.acc;
  t.ds = sh + L.ds;
  t.stat0 = sh + L.stat0;
  t.stat1 = sh + L.stat1;
  T* mine = sh + L.warp + (threadIdx.x / kWarpSize) * L.per_warp;
  const int64_t gj = round4(kGroup * p.J);
  t.uh = mine;
  t.lg = mine + round4(kGroup * p.KP);
  t.e = t.lg + gj;
  t.cf = t.e + gj;
  t.sc = t.cf + gj;
  t.i_begin = static_cast<int64_t>(blockIdx.x) * p.sweep_caps;
  t.i_end = t.i_begin + p.sweep_caps < p.I ? t.i_begin + p.sweep_caps : p.I;
  t.b0 = static_cast<int64_t>(blockIdx.y) * p.sweep_samples;
  return t;
}

// Loads rows [samples, KP] of a [B, R, J, M] state at iteration k into shared memory, in the
// sweep's column layout (zero in padding columns and for samples past B).
template <typename T>
__device__ inline void load_state_rows(const Params<T>& p, const T* state, T* rows, int64_t b0) {
  const int S = p.sweep_samples;
  for (int e = threadIdx.x; e < S * p.KP; e += blockDim.x) {
    const int bl = e / p.KP, col = e % p.KP;
    const int j = col / p.MP, m = col % p.MP;
    const int64_t b = b0 + bl;
    T x = 0;
    if (b < p.B && j < p.J && m < p.M) {
      x = state[((b * p.R + p.k) * p.J + j) * p.M + m];
    }
    rows[e] = x;
  }
}

// Loads W, u and the prior of capsules [c0, c0 + count) into the tile's shared arrays.
template <typename T>
__device__ inline void stage_capsules(const Params<T>& p, const SweepTile<T>& t, int64_t c0,
                                      int count) {
  const int S = p.sweep_samples;
  const int NM = p.N * p.M;
  const int JNM = p.J * NM;
  for (int e = threadIdx.x; e < count * JNM; e += blockDim.x) {
    const int ci = e / JNM, r = e % JNM;
    const int j = r / NM, n = (r / p.M) % p.N, m = r % p.M;
    t.w[(ci * p.N + n) * p.KP + j * p.MP + m] = p.w[(c0 + ci) * JNM + r];
  }
  const int CN = count * p.N;
  for (int e = threadIdx.x; e < S * CN; e += blockDim.x) {
    const int bl = e / CN, r = e % CN;
    const int64_t b = t.b0 + bl;
    t.u[r * S + bl] = b < p.B ? p.u[(b * p.I + c0) * p.N + r] : T(0);
  }
  for (int e = threadIdx.x; e < count * p.J; e += blockDim.x) {
    t.prior[e] = p.has_prior ? p.prior[c0 * p.J + e] : T(0);
  }
}

// u_hat of capsule ci for the 4 samples of group g, one pass of 32 columns: h[s] for column
// col = lane + 32 pass.
template <typename T>
__device__ inline void predict(const Params<T>& p, const SweepTile<T>& t, int ci, int g, int col,
                               T h[kGroup]) {
  const int S = p.sweep_samples;
  const T* wcol = t.w + ci * p.N * p.KP + col;
  const T* urow = t.u + ci * p.N * S + g * kGroup;
  for (int s = 0; s < kGroup; ++s) h[s] = T(0);
  for (int n = 0; n < p.N; ++n) {
    const T wv = wcol[n * p.KP];
    const Group<T> ug = load_group(urow + n * S);
    for (int s = 0; s < kGroup; ++s) h[s] += ug.x[s] * wv;
  }
}

// Adds x, the product of one column, into the (s, j) row sum `out` (sum over m): a butterfly
// over the SW lanes of the row, then the row's first lane writes (or, for M > 32, adds the
// pass's share to what earlier passes wrote). `base` starts the sum.
template <typename T>
__device__ inline void row_sum(const Params<T>& p, T x, int lane, int col, T base, T* out) {
  x = group_sum(x, p.SW);
  const int j = col / p.MP;
  if (lane % p.SW == 0 && j < p.J) {
    const T start = (col % p.MP == 0) ? base : out[j];
    out[j] = start + x;
  }
}

// Softmax over j of the logits lg[0..J) of one sample: the warp's max and sum (leaky: with one
// more logit, 0, added once after the butterflies).
template <typename T>
__device__ inline void softmax_stats(const T* lg, int J, bool leaky, int lane, T* mx_out,
                                     T* den_out) {
  T mx = leaky ? T(0) : neg_inf<T>();
  for (int j = lane; j < J; j += kWarpSize) mx = lg[j] > mx ? lg[j] : mx;
  mx = warp_max(mx);
  T den = 0;
  for (int j = lane; j < J; j += kWarpSize) den += dev_exp(lg[j] - mx);
  *mx_out = mx;
  *den_out = warp_sum(den) + (leaky ? dev_exp(-mx) : T(0));
}

template <typename T>
__global__ void sweep_forward_kernel(Params<T> p) {
  const SweepTile<T> t = sweep_tile(p, false);
  const int S = p.sweep_samples;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  // Zero once: staging writes only the real columns, so W's padding columns stay zero.
  for (int e = threadIdx.x; e < p.sweep_stage * p.N * p.KP; e += blockDim.x) t.w[e] = T(0);
  load_state_rows(p, p.V, t.V, t.b0);
  for (int e = threadIdx.x; e < S * p.KP; e += blockDim.x) t.acc[e] = T(0);
  for (int e = threadIdx.x; e < S * p.J; e += blockDim.x) {
    t.stat0[e] = neg_inf<T>();
    t.stat1[e] = T(0);
  }
  __syncthreads();
  for (int64_t c0 = t.i_begin; c0 < t.i_end; c0 += p.sweep_stage) {
    const int count = static_cast<int>(min64(t.i_end - c0, p.sweep_stage));
    stage_capsules(p, t, c0, count);
    __syncthreads();
    for (int g = warp; g < S / kGroup; g += warps) {
      for (int ci = 0; ci < count; ++ci) {
        // u_hat and the logits prior + u_hat . V of the group's samples.
        for (int pass = 0; pass < p.passes; ++pass) {
          const int col = lane + pass * kWarpSize;
          T h[kGroup];
          predict(p, t, ci, g, col, h);
          const T base = t.prior[ci * p.J + (col / p.MP < p.J ? col / p.MP : 0)];
          for (int s = 0; s < kGroup; ++s) {
            t.uh[s * p.KP + col] = h[s];
            row_sum(p, h[s] * t.V[(g * kGroup + s) * p.KP + col], lane, col, base, t.lg + s * p.J);
          }
        }
        __syncwarp();
        // Couplings: softmax over j, or (in_caps) the online softmax over i of each (b, j).
        for (int s = 0; s < kGroup; ++s) {
          const T* lg = t.lg + s * p.J;
          if (!p.in_caps) {
            T mx, den;
            softmax_stats(lg, p.J, p.leaky, lane, &mx, &den);
            for (int j = lane; j < p.J; j += kWarpSize) {
              t.cf[s * p.J + j] = dev_exp(lg[j] - mx) / den;
            }
          } else {
            T* run_max = t.stat0 + (g * kGroup + s) * p.J;
            T* run_sum = t.stat1 + (g * kGroup + s) * p.J;
            for (int j = lane; j < p.J; j += kWarpSize) {
              const T old = run_max[j];
              const T now = lg[j] > old ? lg[j] : old;
              const T scale = dev_exp(old - now);
              const T weight = dev_exp(lg[j] - now);
              run_sum[j] = run_sum[j] * scale + weight;
              run_max[j] = now;
              t.cf[s * p.J + j] = weight;
              t.sc[s * p.J + j] = scale;
            }
          }
        }
        __syncwarp();
        for (int pass = 0; pass < p.passes; ++pass) {
          const int col = lane + pass * kWarpSize;
          const int j = col / p.MP;
          if (j >= p.J || col % p.MP >= p.M) continue;
          for (int s = 0; s < kGroup; ++s) {
            T* a = t.acc + (g * kGroup + s) * p.KP + col;
            const T contrib = t.cf[s * p.J + j] * t.uh[s * p.KP + col];
            *a = p.in_caps ? *a * t.sc[s * p.J + j] + contrib : *a + contrib;
          }
        }
      }
    }
    __syncthreads();
  }
  const int64_t part = static_cast<int64_t>(blockIdx.x) * p.B;
  for (int e = threadIdx.x; e < S * p.JM; e += blockDim.x) {
    const int bl = e / p.JM, c = e % p.JM;
    const int64_t b = t.b0 + bl;
    if (b >= p.B) continue;
    const int j = c / p.M, m = c % p.M;
    p.part_s[(part + b) * p.JM + c] = t.acc[bl * p.KP + j * p.MP + m];
  }
  if (p.in_caps) {
    for (int e = threadIdx.x; e < S * p.J; e += blockDim.x) {
      const int bl = e / p.J, j = e % p.J;
      const int64_t b = t.b0 + bl;
      if (b >= p.B) continue;
      p.part_max[(part + b) * p.J + j] = t.stat0[e];
      p.part_sum[(part + b) * p.J + j] = t.stat1[e];
    }
  }
}

template <typename T>
__global__ void sweep_backward_kernel(Params<T> p) {
  const SweepTile<T> t = sweep_tile(p, true);
  const int S = p.sweep_samples;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  // Zero once: staging writes only the real columns, so W's padding columns stay zero.
  for (int e = threadIdx.x; e < p.sweep_stage * p.N * p.KP; e += blockDim.x) t.w[e] = T(0);
  load_state_rows(p, p.V, t.V, t.b0);
  load_state_rows(p, p.ds, t.ds, t.b0);
  for (int e = threadIdx.x; e < S * p.KP; e += blockDim.x) t.acc[e] = T(0);
  if (p.in_caps) {
    // lse^t and ds^t . (s^t - bias) of each (b, j): sum_i c_ij e_ij, with s the saved squash
    // input s^t + bias.
    for (int e = threadIdx.x; e < S * p.J; e += blockDim.x) {
      const int bl = e / p.J, j = e % p.J;
      const int64_t b = t.b0 + bl;
      T lse = 0, dss = 0;
      if (b < p.B) {
        const int64_t bt = b * p.R + p.k;
        lse = p.lse[bt * p.J + j];
        const T* s_row = p.s + (bt * p.J + j) * p.M;
        const T* ds_row = p.ds + (bt * p.J + j) * p.M;
        const T* bias_row = p.has_bias ? p.bias + static_cast<int64_t>(j) * p.M : nullptr;
        for (int m = 0; m < p.M; ++m) {
          dss += ds_row[m] * (p.has_bias ? s_row[m] - bias_row[m] : s_row[m]);
        }
      }
      t.stat0[e] = lse;
      t.stat1[e] = dss;
    }
  }
  __syncthreads();
  for (int64_t c0 = t.i_begin; c0 < t.i_end; c0 += p.sweep_stage) {
    const int count = static_cast<int>(min64(t.i_end - c0, p.sweep_stage));
    stage_capsules(p, t, c0, count);
    __syncthreads();
    for (int g = warp; g < S / kGroup; g += warps) {
      for (int ci = 0; ci < count; ++ci) {
        const int64_t i = c0 + ci;
        // u_hat, the logits and e = dL/dc = ds^t . u_hat of the group's samples.
        for (int pass = 0; pass < p.passes; ++pass) {
          const int col = lane + pass * kWarpSize;
          T h[kGroup];
          predict(p, t, ci, g, col, h);
          const T base = t.prior[ci * p.J + (col / p.MP < p.J ? col / p.MP : 0)];
          for (int s = 0; s < kGroup; ++s) {
            if (p.need_a) t.uh[s * p.KP + col] = h[s];
            const int row = (g * kGroup + s) * p.KP + col;
            row_sum(p, h[s] * t.V[row], lane, col, base, t.lg + s * p.J);
            row_sum(p, h[s] * t.ds[row], lane, col, T(0), t.e + s * p.J);
          }
        }
        __syncwarp();
        for (int s = 0; s < kGroup; ++s) {
          const int bl = g * kGroup + s;
          const int64_t b = t.b0 + bl;
          const T* lg = t.lg + s * p.J;
          const T* e = t.e + s * p.J;
          T mx = 0, den = 1, ce = 0;
          if (!p.in_caps) {
            softmax_stats(lg, p.J, p.leaky, lane, &mx, &den);
            T x = 0;
            for (int j = lane; j < p.J; j += kWarpSize) x += dev_exp(lg[j] - mx) / den * e[j];
            ce = warp_sum(x);
          }
          const int64_t scalars = ((b * p.R + p.k) * p.I + i) * p.J;
          for (int j = lane; j < p.J; j += kWarpSize) {
            T c, beta;
            if (!p.in_caps) {
              c = dev_exp(lg[j] - mx) / den;
              beta = c * (e[j] - ce);
            } else {
              c = dev_exp(lg[j] - t.stat0[bl * p.J + j]);
              beta = c * (e[j] - t.stat1[bl * p.J + j]);
            }
            if (b < p.B) {
              if (p.store_alpha) p.alpha[scalars + j] = c;
              if (p.need_beta) p.beta[scalars + j] = beta;
            }
            t.cf[s * p.J + j] = beta;
          }
        }
        __syncwarp();
        if (p.need_a) {
          // A partial: sum over the tile's capsules of beta u_hat.
          for (int pass = 0; pass < p.passes; ++pass) {
            const int col = lane + pass * kWarpSize;
            const int j = col / p.MP;
            if (j >= p.J || col % p.MP >= p.M) continue;
            for (int s = 0; s < kGroup; ++s) {
              t.acc[(g * kGroup + s) * p.KP + col] += t.cf[s * p.J + j] * t.uh[s * p.KP + col];
            }
          }
        }
      }
    }
    __syncthreads();
  }
  if (p.need_a) {
    const int64_t part = static_cast<int64_t>(blockIdx.x) * p.B;
    for (int e = threadIdx.x; e < S * p.JM; e += blockDim.x) {
      const int bl = e / p.JM, c = e % p.JM;
      const int64_t b = t.b0 + bl;
      if (b >= p.B) continue;
      const int j = c / p.M, m = c % p.M;
      p.part_a[(part + b) * p.JM + c] = t.acc[bl * p.KP + j * p.MP + m];
    }
  }
}

// Combines: a warp per (b, j), lanes along m; partials summed in capsule-block order.

template <typename T>
__global__ void combine_forward_kernel(Params<T> p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t pair =
      static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (pair >= static_cast<int64_t>(p.B) * p.J) return;
  const int64_t b = pair / p.J;
  const int j = static_cast<int>(pair % p.J);
  const int64_t bt = b * p.R + p.k;
  T* s_row = p.s + (bt * p.J + j) * p.M;
  T* V_row = p.V + (bt * p.J + j) * p.M;
  const int64_t col = static_cast<int64_t>(j) * p.M;
  if (p.k == 0) {
    // Without a prior the first couplings are uniform: 1/J over j, 1/I over i (leaky: one more
    // logit, 1/(J+1) or 1/(I+1)).
    const int uniform = (p.in_caps ? p.I : p.J) + (p.leaky ? 1 : 0);
    const T divisor = p.has_prior ? T(1) : T(uniform);
    for (int m = lane; m < p.M; m += kWarpSize) {
      T x = 0;
      for (int q = 0; q < p.gemm_splits; ++q) {
        x += p.part_first[(static_cast<int64_t>(q) * p.B + b) * p.JM + col + m];
      }
      s_row[m] = x / divisor;
      V_row[m] = T(0);
    }
    if (p.in_caps && lane == 0) {
      p.lse[bt * p.J + j] = p.has_prior ? p.lse1[j] : dev_log(T(uniform));
    }
  } else if (!p.in_caps) {
    for (int m = lane; m < p.M; m += kWarpSize) {
      T x = 0;
      for (int q = 0; q < p.sweep_blocks; ++q) {
        x += p.part_s[(static_cast<int64_t>(q) * p.B + b) * p.JM + col + m];
      }
      s_row[m] = x;
    }
  } else {
    // The split-softmax merge: rescale each block's partial to the global maximum. The leaky
    // logit 0 joins the merge here, once per (b, j).
    T gmax = p.leaky ? T(0) : neg_inf<T>();
    for (int q = 0; q < p.sweep_blocks; ++q) {
      const T x = p.part_max[(static_cast<int64_t>(q) * p.B + b) * p.J + j];
      gmax = x > gmax ? x : gmax;
    }
    T den = p.leaky ? dev_exp(-gmax) : T(0);
    for (int q = 0; q < p.sweep_blocks; ++q) {
      const int64_t stat = (static_cast<int64_t>(q) * p.B + b) * p.J + j;
      den += p.part_sum[stat] * dev_exp(p.part_max[stat] - gmax);
    }
    for (int m = lane; m < p.M; m += kWarpSize) {
      T x = 0;
      for (int q = 0; q < p.sweep_blocks; ++q) {
        const int64_t stat = (static_cast<int64_t>(q) * p.B + b) * p.J + j;
        x += p.part_s[(static_cast<int64_t>(q) * p.B + b) * p.JM + col + m] *
             dev_exp(p.part_max[stat] - gmax);
      }
      s_row[m] = x / den;
    }
    if (lane == 0) p.lse[bt * p.J + j] = gmax + dev_log(den);
  }
  // The squash input (and saved s) is s^t + bias. Each lane reads back only the elements it
  // wrote.
  if (p.has_bias) {
    for (int m = lane; m < p.M; m += kWarpSize) s_row[m] += p.bias[col + m];
  }
  const Squash<T> q = warp_squash(s_row, p.M, p.squash_eps, lane);
  const bool last = p.k == p.R - 1;
  T* out = last ? p.v + (b * p.J + j) * p.M : V_row + static_cast<int64_t>(p.J) * p.M;
  for (int m = lane; m < p.M; m += kWarpSize) {
    const T vm = q.a == T(0) ? q.at_zero : q.g * (s_row[m] / q.a);
    out[m] = last ? vm : V_row[m] + vm;
  }
}

template <typename T>
__global__ void combine_backward_kernel(Params<T> p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t pair =
      static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (pair >= static_cast<int64_t>(p.B) * p.J) return;
  const int64_t b = pair / p.J;
  const int j = static_cast<int>(pair % p.J);
  const int64_t bt = b * p.R + p.k;
  const T* s_row = p.s + (bt * p.J + j) * p.M;
  T* ds_row = p.ds + (bt * p.J + j) * p.M;
  const int64_t bj = (b * p.J + j) * p.M;
  const bool last = p.k == p.R - 1;
  // dL/dv^t = [t = R] g + D, D = dL/dV^t = carry + A^{t+1}; ds_row holds dv until the squash.
  const int64_t col = static_cast<int64_t>(j) * p.M;
  for (int m = lane; m < p.M; m += kWarpSize) {
    T a = 0;
    if (p.read_a) {
      for (int q = 0; q < p.sweep_blocks; ++q) {
        a += p.part_a[(static_cast<int64_t>(q) * p.B + b) * p.JM + col + m];
      }
    }
    const T d = (p.read_carry ? p.carry[bj + m] : T(0)) + a;
    if (p.write_carry) p.carry[bj + m] = d;
    ds_row[m] = last ? d + p.grad_v[bj + m] : d;
  }
  warp_squash_backward(s_row, ds_row, p.M, p.squash_eps, lane);
}

// Gradients: block per grads_caps capsules, the owner of their dW and dprior; walks the
// samples in order, grads_samples at a time.

template <typename T>
__device__ inline T first_coupling(const Params<T>& p, int64_t i, int j) {
  if (p.has_prior) return p.c1[i * p.J + j];
  return T(1) / T((p.in_caps ? p.I : p.J) + (p.leaky ? 1 : 0));
}

// du_hat[b, i, j, m] with shared logits: sum_t c^t_ij ds^t_bjm + D^{t+1}_ij v^t_bjm / kappa_div
// (D^{R+1} = 0), or c^R ds^R alone with detach_inner (docs/ROUTING-MATH.md).
template <typename T>
__device__ inline T shared_uhat_grad(const Params<T>& p, int64_t b, int64_t i, int c) {
  const int j = c / p.M;
  const int64_t JM = p.JM, IJ = static_cast<int64_t>(p.I) * p.J, ij = i * p.J + j;
  const int first = p.detach_inner ? p.R - 1 : 0;
  T x = 0;
  for (int k = first; k < p.R; ++k) {
    const int64_t state = (b * p.R + k) * JM + c;
    x += p.coup[k * IJ + ij] * p.ds[state];
    if (!p.detach_inner && k < p.R - 1) {
      x += p.d_hist[(k + 1) * IJ + ij] * p.v_iter[state] / T(p.kappa_div);
    }
  }
  return x;
}

// du_hat[b, i, j, m] (c = j M + m): c^1 ds^1 + sum_{t >= 2} (alpha^t ds^t + beta^t V^{t-1}),
// or alpha^R ds^R alone with detach_inner.
template <typename T>
__device__ inline T uhat_grad(const Params<T>& p, int64_t b, int64_t i, int c) {
  if (p.shared) return shared_uhat_grad(p, b, i, c);
  const int j = c / p.M;
  const int64_t JM = p.JM;
  if (p.detach_inner) {
    const int k = p.R - 1;
    const T a = k == 0 ? first_coupling(p, i, j) : p.alpha[((b * p.R + k) * p.I + i) * p.J + j];
    return a * p.ds[(b * p.R + k) * JM + c];
  }
  T x = first_coupling(p, i, j) * p.ds[b * p.R * JM + c];
  for (int k = 1; k < p.R; ++k) {
    const int64_t scalar = ((b * p.R + k) * p.I + i) * p.J + j;
    const int64_t state = (b * p.R + k) * JM + c;
    x += p.alpha[scalar] * p.ds[state] + p.beta[scalar] * p.V[state];
  }
  return x;
}

template <typename T>
__global__ void grads_kernel(Params<T> p) {
  CAPSNET_DYNAMIC_SHARED(raw);
  T* sh = reinterpret_cast<T*>(raw);
  const GradsLayout L = grads_layout(p.grads_caps, p.grads_samples, p.J, p.N, p.M);
  T* w_s = sh + L.w;
  T* dw_acc = sh + L.dw;
  T* duh_s = sh + L.duh;
  T* u_s = sh + L.u;
  T* dp_acc = sh + L.dp;
  const int JMs = static_cast<int>(L.JMs);
  const int caps = p.grads_caps;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * caps;
  const int count = static_cast<int>(p.I - i0 < caps ? p.I - i0 : caps);
  const int NM = p.N * p.M, JNM = p.J * NM;
  const bool need_du = p.du != nullptr, need_dw = p.dw != nullptr;
  const bool need_dp = p.dprior != nullptr;
  const bool need_uhat = need_du || need_dw;
  // Accumulators: element e belongs to thread e % blockDim.x from start to end.
  if (need_dw) {
    for (int e = threadIdx.x; e < count * JNM; e += blockDim.x) dw_acc[e] = T(0);
  }
  if (need_dp) {
    for (int e = threadIdx.x; e < count * p.J; e += blockDim.x) dp_acc[e] = T(0);
  }
  if (need_du) {
    for (int e = threadIdx.x; e < count * JNM; e += blockDim.x) {
      const int ci = e / JNM, r = e % JNM;
      const int j = r / NM, n = (r / p.M) % p.N, m = r % p.M;
      w_s[(ci * p.N + n) * JMs + j * p.M + m] = p.w[i0 * JNM + e];
    }
  }
  __syncthreads();
  for (int64_t b0 = 0; b0 < p.B; b0 += p.grads_samples) {
    const int nb = static_cast<int>(p.B - b0 < p.grads_samples ? p.B - b0 : p.grads_samples);
    if (need_dw) {
      const int CN = count * p.N;
      for (int e = threadIdx.x; e < nb * CN; e += blockDim.x) {
        const int bl = e / CN, r = e % CN;
        u_s[bl * caps * p.N + r] = p.u[((b0 + bl) * p.I + i0) * p.N + r];
      }
    }
    if (need_uhat) {
      const int CJM = count * p.JM;
      for (int e = threadIdx.x; e < nb * CJM; e += blockDim.x) {
        const int bl = e / CJM, r = e % CJM;
        const int ci = r / p.JM, c = r % p.JM;
        duh_s[(bl * caps + ci) * JMs + c] = uhat_grad(p, b0 + bl, i0 + ci, c);
      }
    }
    if (need_dp) {
      for (int e = threadIdx.x; e < count * p.J; e += blockDim.x) {
        const int ci = e / p.J, j = e % p.J;
        T x = dp_acc[e];
        for (int bl = 0; bl < nb; ++bl) {
          for (int k = 0; k < p.R; ++k) {
            x += p.beta[(((b0 + bl) * p.R + k) * p.I + i0 + ci) * p.J + j];
          }
        }
        dp_acc[e] = x;
      }
    }
    __syncthreads();
    if (need_du) {
      // du[b, i, n] = sum_(j, m) W[i, j, n, m] du_hat[b, i, j, m]
      const int CN = count * p.N;
      for (int e = threadIdx.x; e < nb * CN; e += blockDim.x) {
        const int bl = e / CN, r = e % CN;
        const int ci = r / p.N;
        const T* wrow = w_s + r * JMs;
        const T* grow = duh_s + (bl * caps + ci) * JMs;
        T x = 0;
        for (int c = 0; c < p.JM; ++c) x += wrow[c] * grow[c];
        p.du[((b0 + bl) * p.I + i0) * p.N + r] = x;
      }
    }
    if (need_dw) {
      // dW[i, j, n, m] += u[b, i, n] du_hat[b, i, j, m], samples in order.
      for (int e = threadIdx.x; e < count * JNM; e += blockDim.x) {
        const int ci = e / JNM, r = e % JNM;
        const int j = r / NM, n = (r / p.M) % p.N, m = r % p.M;
        T x = dw_acc[e];
        for (int bl = 0; bl < nb; ++bl) {
          x += u_s[(bl * caps + ci) * p.N + n] * duh_s[(bl * caps + ci) * JMs + j * p.M + m];
        }
        dw_acc[e] = x;
      }
    }
    __syncthreads();
  }
  if (need_dw) {
    for (int e = threadIdx.x; e < count * JNM; e += blockDim.x) p.dw[i0 * JNM + e] = dw_acc[e];
  }
  if (need_dp) {
    for (int e = threadIdx.x; e < count * p.J; e += blockDim.x) {
      p.dprior[i0 * p.J + e] = dp_acc[e];
    }
  }
}

// dbias[j, m] = sum over samples and iterations of ds^t[b, j, m] (ds is dL/d(s^t + bias)): a
// thread per (j, m), the owner, summing in a fixed order; neighbouring threads read neighbouring
// columns. Also for B = 0 (zero).
template <typename T>
__global__ void bias_grad_kernel(Params<T> p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.JM) return;
  const int64_t rows = static_cast<int64_t>(p.B) * p.R;
  T x = 0;
  for (int64_t bt = 0; bt < rows; ++bt) x += p.ds[bt * p.JM + c];
  p.dbias[c] = x;
}

// Routing logits shared by the batch (issue 18).

// b^t at [i, j]: the previous logits (or 0) plus the agreements over kappa_div.
template <typename T>
__device__ inline T shared_logit(const Params<T>& p, int64_t idx) {
  T x = p.logits_in != nullptr ? p.logits_in[idx] : T(0);
  // An int divisor, as the reference divides by max(B, 1).
  if (p.add_agree) x += p.agree[idx] / T(p.kappa_div);
  return x;
}

// The logit update and the couplings of iteration k, c^k = softmax(b^k), [I, J] once for the
// batch: over j a thread per capsule; over i a warp per output capsule j (per lane an online max
// and sum over its capsules, then a butterfly merge: warp_softmax). Each element is
// read and then written by one thread, so p.logits may be logits_in (the update in place).
template <typename T>
__global__ void shared_softmax_kernel(Params<T> p) {
  const int J = p.J;
  T* c_out = p.coup + static_cast<int64_t>(p.k) * p.I * J;
  if (!p.in_caps) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= p.I) return;
    T mx = p.leaky ? T(0) : neg_inf<T>();
    for (int j = 0; j < J; ++j) mx = max_nan(mx, shared_logit(p, i * J + j));
    T den = p.leaky ? dev_exp(-mx) : T(0);
    for (int j = 0; j < J; ++j) den += dev_exp(shared_logit(p, i * J + j) - mx);
    for (int j = 0; j < J; ++j) {
      const T x = shared_logit(p, i * J + j);
      c_out[i * J + j] = dev_exp(x - mx) / den;
      if (p.store_logits) p.logits[i * J + j] = x;
    }
    return;
  }
  const int j = blockIdx.x;
  const int lane = threadIdx.x;
  const Softmax<T> sm =
      warp_softmax<T>(p.I, p.leaky, lane, [&](int64_t i) { return shared_logit(p, i * J + j); });
  for (int64_t i = lane; i < p.I; i += kWarpSize) {
    const T x = shared_logit(p, i * J + j);
    c_out[i * J + j] = dev_exp(x - sm.max) / sm.sum;
    if (p.store_logits) p.logits[i * J + j] = x;
  }
}

// A warp per (b, j), lanes along m: s^k from gemm_kernel's partials in split order (+ bias),
// saved, and v^k = squash(s^k) saved (and written to v at the last iteration).
template <typename T>
__global__ void shared_combine_kernel(Params<T> p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t pair =
      static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (pair >= static_cast<int64_t>(p.B) * p.J) return;
  const int64_t b = pair / p.J;
  const int j = static_cast<int>(pair % p.J);
  const int64_t state = ((b * p.R + p.k) * p.J + j) * p.M;
  const int64_t col = static_cast<int64_t>(j) * p.M;
  T* s_row = p.s + state;
  // Each lane reads back only the elements it wrote.
  for (int m = lane; m < p.M; m += kWarpSize) {
    T x = 0;
    for (int q = 0; q < p.gemm_splits; ++q) {
      x += p.part[(static_cast<int64_t>(q) * p.B + b) * p.JM + col + m];
    }
    s_row[m] = p.has_bias ? x + p.bias[col + m] : x;
  }
  const Squash<T> q = warp_squash(s_row, p.M, p.squash_eps, lane);
  const bool last = p.k == p.R - 1;
  for (int m = lane; m < p.M; m += kWarpSize) {
    const T vm = q.a == T(0) ? q.at_zero : q.g * (s_row[m] / q.a);
    p.v_iter[state + m] = vm;
    if (last) p.v[(b * p.J + j) * p.M + m] = vm;
  }
}

// A warp per (b, j): dv^k = [k = R - 1] g + (the partials of u x (D^{k+1} (.) W), k < R - 1) /
// kappa_div, then ds^k = squash'(s^k, dv^k).
template <typename T>
__global__ void shared_combine_back_kernel(Params<T> p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t pair =
      static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (pair >= static_cast<int64_t>(p.B) * p.J) return;
  const int64_t b = pair / p.J;
  const int j = static_cast<int>(pair % p.J);
  const int64_t state = ((b * p.R + p.k) * p.J + j) * p.M;
  const int64_t col = static_cast<int64_t>(j) * p.M;
  const int64_t bj = (b * p.J + j) * p.M;
  T* ds_row = p.ds + state;
  for (int m = lane; m < p.M; m += kWarpSize) {
    T dv = 0;
    if (p.k < p.R - 1) {
      for (int q = 0; q < p.gemm_splits; ++q) {
        dv += p.part[(static_cast<int64_t>(q) * p.B + b) * p.JM + col + m];
      }
      dv /= T(p.kappa_div);
    } else {
      dv = p.grad_v[bj + m];
    }
    ds_row[m] = dv;
  }
  warp_squash_backward(p.s + state, ds_row, p.M, p.squash_eps, lane);
}

// Offsets (elements) of an agreement block's shared arrays.
struct AgreeLayout {
  int64_t h, u, x, total;
};

__host__ __device__ inline AgreeLayout agree_layout(int64_t caps, int64_t samples, int64_t N,
                                                    int64_t JM) {
  AgreeLayout L;
  L.h = 0;                                  // [caps, N, J*M] sum_b u_bin x_bjm
  L.u = L.h + round4(caps * N * JM);        // [samples, caps, N]
  L.x = L.u + round4(samples * caps * N);   // [samples, J*M]
  L.total = L.x + round4(samples * JM);
  return L;
}

// out[i, j] = sum_{n, m} W[i, j, n, m] H[i, n, j, m], H = sum_b u[b, i, n] x[b, k, j, m], for the
// block's agree_caps capsules and every j: the agreements a^k (x = v^k) forward, dL/dc^k
// (x = ds^k) backward. The block owns H of its capsules (element e with thread e % blockDim)
// and walks the batch in order, agree_samples at a time; then a thread per (i, j) reduces over
// (n, m) in order. Deterministic, no atomics.
template <typename T>
__global__ void shared_agree_kernel(Params<T> p) {
  CAPSNET_DYNAMIC_SHARED(raw);
  T* sh = reinterpret_cast<T*>(raw);
  const int caps = p.agree_caps, S = p.agree_samples;
  const AgreeLayout L = agree_layout(caps, S, p.N, p.JM);
  T* h_acc = sh + L.h;
  T* u_s = sh + L.u;
  T* x_s = sh + L.x;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * caps;
  const int count = static_cast<int>(p.I - i0 < caps ? p.I - i0 : caps);
  const int CN = count * p.N;
  const int NJM = p.N * p.JM;
  for (int e = threadIdx.x; e < count * NJM; e += blockDim.x) h_acc[e] = T(0);
  for (int64_t b0 = 0; b0 < p.B; b0 += S) {
    const int nb = static_cast<int>(p.B - b0 < S ? p.B - b0 : S);
    for (int e = threadIdx.x; e < nb * CN; e += blockDim.x) {
      const int bl = e / CN, r = e % CN;
      u_s[bl * CN + r] = p.u[((b0 + bl) * p.I + i0) * p.N + r];
    }
    for (int e = threadIdx.x; e < nb * p.JM; e += blockDim.x) {
      const int bl = e / p.JM, c = e % p.JM;
      x_s[e] = p.agree_x[((b0 + bl) * p.R + p.k) * p.JM + c];
    }
    __syncthreads();
    // Neighbouring threads take neighbouring (j, m): x_s rows are read without conflicts, u_s
    // values are broadcast.
    for (int e = threadIdx.x; e < count * NJM; e += blockDim.x) {
      const int r = e / p.JM, c = e % p.JM;
      T h = h_acc[e];
      for (int bl = 0; bl < nb; ++bl) h += u_s[bl * CN + r] * x_s[bl * p.JM + c];
      h_acc[e] = h;
    }
    __syncthreads();
  }
  const int NM = p.N * p.M;
  for (int q = threadIdx.x; q < count * p.J; q += blockDim.x) {
    const int ci = q / p.J, j = q % p.J;
    const T* w = p.w + ((i0 + ci) * p.J + j) * NM;
    const T* h = h_acc + static_cast<int64_t>(ci) * NJM + j * p.M;
    T x = 0;
    for (int n = 0; n < p.N; ++n) {
      for (int m = 0; m < p.M; ++m) x += w[n * p.M + m] * h[n * p.JM + m];
    }
    p.agree[(i0 + ci) * p.J + j] = x;
  }
}

// dl^k = c (e - sum_j' c e) over j (a thread per capsule), or c (e - sum_i' c e) over i (a warp
// per output capsule, a butterfly over its lanes' strided sums); D^k = D^{k+1} + dl^k. The leak
// changes only the values of c. e is p.agree (shared_agree_kernel's output).
template <typename T>
__global__ void shared_logits_back_kernel(Params<T> p) {
  const int J = p.J;
  const T* c = p.coup + static_cast<int64_t>(p.k) * p.I * J;
  const T* e = p.agree;
  if (!p.in_caps) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= p.I) return;
    T ce = 0;
    for (int j = 0; j < J; ++j) ce += c[i * J + j] * e[i * J + j];
    for (int j = 0; j < J; ++j) {
      const int64_t ij = i * J + j;
      const T d = c[ij] * (e[ij] - ce);
      p.d_out[ij] = p.d_in != nullptr ? p.d_in[ij] + d : d;
    }
    return;
  }
  const int j = blockIdx.x;
  const int lane = threadIdx.x;
  T ce = 0;
  for (int64_t i = lane; i < p.I; i += kWarpSize) ce += c[i * J + j] * e[i * J + j];
  ce = warp_sum(ce);
  for (int64_t i = lane; i < p.I; i += kWarpSize) {
    const int64_t ij = i * J + j;
    const T d = c[ij] * (e[ij] - ce);
    p.d_out[ij] = p.d_in != nullptr ? p.d_in[ij] + d : d;
  }
}

// out[e] = 0 for e < n: dprior of an empty batch.
template <typename T>
__global__ void zero_kernel(T* out, int64_t n) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < n) out[e] = T(0);
}

// Host side.

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_pow2(int64_t x) {
  int64_t v = 1;
  while (v < x) v *= 2;
  return v;
}

// Column layout of the sweeps for M: (MP, SW, KP).
void sweep_columns(int64_t J, int64_t M, int64_t* MP, int64_t* SW, int64_t* KP) {
  *MP = M <= kWarpSize ? next_pow2(M) : cdiv(M, kWarpSize) * kWarpSize;
  *SW = *MP < kWarpSize ? *MP : kWarpSize;
  *KP = cdiv(J * *MP, kWarpSize) * kWarpSize;
}

size_t max_shared_bytes() {
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return kDefaultSharedBytes;
  if (cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
      cudaSuccess) {
    return kDefaultSharedBytes;
  }
  return static_cast<size_t>(value);
}

// The tiles of a kernel whose blocks stage `caps` input capsules and `samples` samples in
// shared memory (the gradient and agreement kernels). A 0 is chosen here: up to 4 capsules per
// block while the grid keeps kMinBlocks blocks, 8 samples, 8 warps. Then the chosen sizes halve,
// samples first, until bytes() (which reads caps and samples) is at most max_shared; false when
// they cannot (sizes given by the caller are never changed).
template <typename Bytes>
bool fit_block_tiles(int& caps, int& samples, int& warps, int64_t I, size_t max_shared,
                     Bytes bytes) {
  const bool auto_caps = caps == 0, auto_samples = samples == 0;
  if (auto_caps) {
    caps = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(4, I / kMinBlocks)));
  }
  if (auto_samples) samples = 8;
  if (warps == 0) warps = 8;
  while (bytes() > max_shared) {
    if (auto_samples && samples > 1) {
      samples /= 2;
    } else if (auto_caps && caps > 1) {
      caps /= 2;
    } else {
      return false;
    }
  }
  return true;
}

int plan_error(Plan* plan, const char* message) {
  std::snprintf(plan->error, sizeof(plan->error), "%s", message);
  return cudaErrorInvalidConfiguration;
}

// Sizes, options, tiles and tensors; no workspace.
template <typename T>
Params<T> base_params(const Plan& plan, const Tensors<T>& t) {
  const Sizes& sz = plan.sz;
  Params<T> p{};
  p.B = static_cast<int>(sz.B);
  p.I = static_cast<int>(sz.I);
  p.J = static_cast<int>(sz.J);
  p.N = static_cast<int>(sz.N);
  p.M = static_cast<int>(sz.M);
  p.R = static_cast<int>(sz.R);
  p.JM = p.J * p.M;
  int64_t MP, SW, KP;
  sweep_columns(sz.J, sz.M, &MP, &SW, &KP);
  p.MP = static_cast<int>(MP);
  p.SW = static_cast<int>(SW);
  p.KP = static_cast<int>(KP);
  p.passes = static_cast<int>(KP / kWarpSize);
  p.in_caps = plan.opt.in_caps;
  p.detach_inner = plan.opt.detach_inner;
  p.has_prior = plan.opt.has_prior;
  p.has_bias = plan.opt.has_bias;
  p.leaky = plan.opt.leaky;
  p.squash_eps = static_cast<T>(plan.opt.squash_eps);
  p.sweep_samples = plan.tiles.sweep_samples;
  p.sweep_caps = plan.tiles.sweep_caps;
  p.sweep_stage = plan.tiles.sweep_stage;
  p.sweep_blocks = static_cast<int>(plan.sweep_blocks);
  p.gemm_caps = plan.tiles.gemm_caps;
  p.gemm_splits = static_cast<int>(plan.gemm_splits);
  p.grads_caps = plan.tiles.grads_caps;
  p.grads_samples = plan.tiles.grads_samples;
  p.u = t.u;
  p.w = t.w;
  p.prior = t.prior;
  p.bias = t.bias;
  p.grad_v = t.grad_v;
  p.v = t.v;
  p.s = t.s;
  p.V = t.V;
  p.lse = t.lse;
  p.ds = t.ds;
  p.du = t.du;
  p.dw = t.dw;
  p.dprior = t.dprior;
  p.dbias = t.dbias;
  p.v_iter = t.v_iter;
  p.coup = t.c;
  p.agree_caps = plan.tiles.agree_caps;
  p.agree_samples = plan.tiles.agree_samples;
  return p;
}

template <typename T>
Params<T> make_params(const Plan& plan, const Tensors<T>& t, bool backward) {
  const Sizes& sz = plan.sz;
  Params<T> p = base_params(plan, t);
  // Workspace, in the order of forward_workspace / backward_workspace.
  T* ws = t.workspace;
  const int64_t B = sz.B, I = sz.I, J = sz.J, JM = sz.J * sz.M;
  if (plan.opt.has_prior) {
    p.c1 = ws;
    ws += I * J;
    p.lse1 = ws;
    ws += J;
  }
  if (!backward) {
    p.part_first = ws;
    p.gemm_out = ws;
    p.gemm_coef = plan.opt.has_prior ? p.c1 : nullptr;
    ws += plan.gemm_splits * B * JM;
    if (sz.R > 1) {
      p.part_s = ws;
      ws += plan.sweep_blocks * B * JM;
      if (plan.opt.in_caps) {
        p.part_max = ws;
        ws += plan.sweep_blocks * B * J;
        p.part_sum = ws;
        ws += plan.sweep_blocks * B * J;
      }
    }
  } else {
    p.carry = ws;
    ws += B * JM;
    p.part_a = ws;
    ws += plan.sweep_blocks * B * JM;
    p.alpha = ws;
    ws += B * sz.R * I * J;
    p.beta = ws;
    ws += B * sz.R * I * J;
  }
  return p;
}

// The shared-logits launchers' parameters, workspace in the order of shared_forward_workspace
// / shared_backward_workspace.
template <typename T>
Params<T> make_shared_params(const Plan& plan, const Tensors<T>& t, bool backward) {
  const Sizes& sz = plan.sz;
  Params<T> p = base_params(plan, t);
  p.shared = true;
  p.kappa_div = plan.opt.batch_mean ? static_cast<int>(std::max<int64_t>(sz.B, 1)) : 1;
  const int64_t B = sz.B, IJ = sz.I * sz.J, JM = sz.J * sz.M;
  T* ws = t.workspace;
  p.agree = ws;
  ws += IJ;
  p.part = ws;
  ws += plan.gemm_splits * B * JM;
  if (!backward) {
    p.logits = ws;
    ws += IJ;
  } else {
    p.d_hist = ws;
    ws += sz.R * IJ;
  }
  p.gemm_out = p.part;
  return p;
}

template <typename T>
int launch_prior_softmax(const Plan& plan, const Params<T>& p, void* stream) {
  if (plan.opt.in_caps) {
    return launch_kernel("prior_softmax", &prior_softmax_kernel<T>,
                         dim3(static_cast<unsigned>(p.J)), dim3(kWarpSize), 0, stream, p);
  }
  return launch_kernel("prior_softmax", &prior_softmax_kernel<T>,
                       dim3(static_cast<unsigned>(cdiv(p.I, kPriorThreads))),
                       dim3(kPriorThreads), 0, stream, p);
}

template <typename T>
int launch_combine(const Plan& plan, const Params<T>& p, bool forward, void* stream) {
  const int warps = plan.tiles.combine_warps;
  const dim3 grid(static_cast<unsigned>(cdiv(plan.sz.B * plan.sz.J, warps)));
  if (forward) {
    return launch_kernel("combine_forward", &combine_forward_kernel<T>, grid,
                         dim3(warps * kWarpSize), 0, stream, p);
  }
  return launch_kernel("combine_backward", &combine_backward_kernel<T>, grid,
                       dim3(warps * kWarpSize), 0, stream, p);
}

template <typename T>
int launch_sweep(const Plan& plan, const Params<T>& p, bool forward, void* stream) {
  const dim3 grid(static_cast<unsigned>(plan.sweep_blocks),
                  static_cast<unsigned>(plan.sample_tiles));
  const dim3 block(plan.tiles.sweep_warps * kWarpSize);
  if (forward) {
    return launch_kernel("sweep_forward", &sweep_forward_kernel<T>, grid, block,
                         plan.sweep_forward_shared, stream, p);
  }
  return launch_kernel("sweep_backward", &sweep_backward_kernel<T>, grid, block,
                       plan.sweep_backward_shared, stream, p);
}

template <typename T>
int backward_combine(const Plan& plan, Params<T>& p, int k, bool chain, void* stream) {
  const int last = p.R - 1;
  p.k = k;
  p.read_a = chain && k < last;
  p.read_carry = chain && k < last - 1;
  p.write_carry = chain && k > 0 && k < last;
  return launch_combine(plan, p, false, stream);
}

template <typename T>
int backward_sweep(const Plan& plan, Params<T>& p, int k, bool chain, bool need_uhat,
                   void* stream) {
  p.k = k;
  // The first couplings come from c1 (or are uniform): no alpha^1.
  p.store_alpha = need_uhat && k > 0 && (!p.detach_inner || k == p.R - 1);
  p.need_beta = chain;
  p.need_a = chain && k > 0;
  return launch_sweep(plan, p, false, stream);
}

}  // namespace

int plan_routing(const Sizes& sz, const Options& opt, const Tiles& request, size_t elem_size,
                 Plan* plan) {
  *plan = Plan{};
  plan->sz = sz;
  plan->opt = opt;
  plan->elem_size = elem_size;
  plan->error[0] = '\0';
  if (sz.B < 0 || sz.I < 1 || sz.J < 1 || sz.N < 1 || sz.M < 1 || sz.R < 1) {
    return plan_error(plan, "sizes must be B >= 0 and I, J, N, M, R >= 1");
  }
  const int64_t limit31 = int64_t{1} << 31;
  if (sz.B >= limit31 || sz.I * sz.J * sz.N * sz.M >= limit31 || sz.I * sz.N >= limit31) {
    return plan_error(plan, "sizes past 2^31 elements per sample or in W are not supported");
  }
  const size_t max_shared = max_shared_bytes();
  Tiles t = request;
  const int64_t B = sz.B, I = sz.I, J = sz.J, N = sz.N, M = sz.M, JM = sz.J * sz.M;
  int64_t MP, SW, KP;
  sweep_columns(J, M, &MP, &SW, &KP);

  // Sweeps: 32 samples (8 warps, one group of 4 each) for large batches; capsule blocks so
  // that the grid reaches kTargetBlocks.
  const bool auto_samples = t.sweep_samples == 0;
  if (auto_samples) {
    t.sweep_samples = static_cast<int>(B >= 32 ? 32 : cdiv(B > 0 ? B : 1, kGroup) * kGroup);
  }
  if (t.sweep_warps == 0) t.sweep_warps = t.sweep_samples / kGroup;
  plan->sample_tiles = cdiv(B, t.sweep_samples);
  if (t.sweep_caps == 0) {
    const int64_t tiles = plan->sample_tiles > 0 ? plan->sample_tiles : 1;
    const int64_t blocks = std::min<int64_t>(I, std::max<int64_t>(1, cdiv(kTargetBlocks, tiles)));
    t.sweep_caps = static_cast<int>(cdiv(I, blocks));
  }
  const bool auto_stage = t.sweep_stage == 0;
  if (auto_stage) t.sweep_stage = static_cast<int>(std::min<int64_t>(t.sweep_caps, 4));
  auto sweep_bytes = [&](bool backward) {
    return elem_size * static_cast<size_t>(sweep_layout(t.sweep_samples, t.sweep_stage,
                                                        t.sweep_warps, N, J, KP, backward)
                                               .total);
  };
  // Shrink what was not asked for until the backward sweep (the larger) fits. The
  // shared-logits launchers run no sweep: any J x M that the other kernels fit will do.
  while (!opt.shared_logits && sweep_bytes(true) > max_shared) {
    if (auto_stage && t.sweep_stage > 1) {
      t.sweep_stage /= 2;
    } else if (auto_samples && t.sweep_samples > kGroup) {
      t.sweep_samples /= 2;
      t.sweep_samples = static_cast<int>(cdiv(t.sweep_samples, kGroup) * kGroup);
      if (request.sweep_warps == 0) t.sweep_warps = t.sweep_samples / kGroup;
      plan->sample_tiles = cdiv(B, t.sweep_samples);
    } else {
      return plan_error(plan,
                        "the CUDA kernels of the cpp backend do not fit this J x M in shared "
                        "memory; use the triton backend");
    }
  }
  if (t.sweep_samples % kGroup != 0 || t.sweep_warps < 1 || t.sweep_warps > 32 ||
      t.sweep_caps < 1 || t.sweep_stage < 1) {
    return plan_error(plan, "sweep tiles: samples must be a multiple of 4, 1..32 warps");
  }
  plan->sweep_blocks = cdiv(I, t.sweep_caps);
  plan->sweep_forward_shared = sweep_bytes(false);
  plan->sweep_backward_shared = sweep_bytes(true);

  // First iteration's product: split over capsules until the grid reaches kTargetBlocks.
  if (t.gemm_caps == 0) {
    const int64_t tiles = cdiv(B > 0 ? B : 1, kGemmTileB) * cdiv(JM, kGemmTileC);
    const int64_t splits = std::min<int64_t>(I, std::max<int64_t>(1, cdiv(kTargetBlocks, tiles)));
    t.gemm_caps = static_cast<int>(cdiv(I, splits));
  }
  if (t.gemm_caps < 1) return plan_error(plan, "gemm_caps must be >= 1");
  plan->gemm_splits = cdiv(I, t.gemm_caps);
  plan->gemm_shared = elem_size * (kGemmTileK * kGemmStrideB + kGemmTileK * kGemmTileC);

  // Gradients.
  auto grads_bytes = [&]() {
    return elem_size *
           static_cast<size_t>(grads_layout(t.grads_caps, t.grads_samples, J, N, M).total);
  };
  if (!fit_block_tiles(t.grads_caps, t.grads_samples, t.grads_warps, I, max_shared,
                       grads_bytes)) {
    return plan_error(plan,
                      "the CUDA gradient kernel does not fit this J x N x M in shared memory; "
                      "use the triton backend");
  }
  if (t.grads_caps < 1 || t.grads_samples < 1 || t.grads_warps < 1 || t.grads_warps > 32) {
    return plan_error(plan, "grads tiles: caps, samples >= 1, 1..32 warps");
  }
  plan->grads_blocks = cdiv(I, t.grads_caps);
  plan->grads_shared = grads_bytes();

  if (t.combine_warps == 0) t.combine_warps = 8;
  if (t.combine_warps < 1 || t.combine_warps > 32) {
    return plan_error(plan, "combine_warps must be 1..32");
  }

  // Agreements of the shared-logits launchers (staged as the gradient blocks); they need to
  // fit only where they run.
  auto agree_bytes = [&]() {
    return elem_size *
           static_cast<size_t>(agree_layout(t.agree_caps, t.agree_samples, N, JM).total);
  };
  const size_t agree_limit = opt.shared_logits ? max_shared : SIZE_MAX;
  if (!fit_block_tiles(t.agree_caps, t.agree_samples, t.agree_warps, I, agree_limit,
                       agree_bytes)) {
    return plan_error(plan,
                      "the CUDA agreement kernel does not fit this N x J x M in shared memory; "
                      "use the triton backend");
  }
  if (t.agree_caps < 1 || t.agree_samples < 1 || t.agree_warps < 1 || t.agree_warps > 32) {
    return plan_error(plan, "agree tiles: caps, samples >= 1, 1..32 warps");
  }
  plan->agree_blocks = cdiv(I, t.agree_caps);
  plan->agree_shared = agree_bytes();
  plan->tiles = t;

  const int64_t prior_ws = opt.has_prior ? I * J + J : 0;
  int64_t fwd = prior_ws + plan->gemm_splits * B * JM;
  if (sz.R > 1) {
    fwd += plan->sweep_blocks * B * JM;
    if (opt.in_caps) fwd += 2 * plan->sweep_blocks * B * J;
  }
  plan->forward_workspace = fwd;
  plan->backward_workspace =
      prior_ws + B * JM + plan->sweep_blocks * B * JM + 2 * B * sz.R * I * J;
  // Shared logits (make_shared_params): the agreements (or e), the GEMM's partials, then the
  // running logits forward or D^t [R, I, J] backward.
  plan->shared_forward_workspace = 2 * I * J + plan->gemm_splits * B * JM;
  plan->shared_backward_workspace = (1 + sz.R) * I * J + plan->gemm_splits * B * JM;
  return 0;
}

template <typename T>
int routing_forward(const Plan& plan, const Tensors<T>& t, void* stream) {
  if (plan.sz.B == 0) return cudaSuccess;
  Params<T> p = make_params(plan, t, false);
  int err = cudaSuccess;
  if (plan.opt.has_prior) {
    if ((err = launch_prior_softmax(plan, p, stream)) != cudaSuccess) return err;
  }
  const dim3 gemm_grid(static_cast<unsigned>(cdiv(p.JM, kGemmTileC)),
                       static_cast<unsigned>(cdiv(p.B, kGemmTileB)),
                       static_cast<unsigned>(plan.gemm_splits));
  err = launch_kernel("gemm", &gemm_kernel<T>, gemm_grid, dim3(kGemmThreads), plan.gemm_shared,
                      stream, p);
  if (err != cudaSuccess) return err;
  for (int k = 0; k < p.R; ++k) {
    p.k = k;
    if (k > 0 && (err = launch_sweep(plan, p, true, stream)) != cudaSuccess) return err;
    if ((err = launch_combine(plan, p, true, stream)) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
int routing_backward(const Plan& plan, const Tensors<T>& t, void* stream) {
  Params<T> p = make_params(plan, t, true);
  const bool need_uhat = t.du != nullptr || t.dw != nullptr;
  const bool need_dp = t.dprior != nullptr;
  const bool need_db = t.dbias != nullptr;
  int err = cudaSuccess;
  if (plan.opt.has_prior && need_uhat) {
    if ((err = launch_prior_softmax(plan, p, stream)) != cudaSuccess) return err;
  }
  if (p.B > 0) {
    const int last = p.R - 1;
    // With detach_inner, du_hat needs only the last iteration's couplings; the rest of the
    // chain matters only for the prior's and the bias's gradients (every ds^t).
    const bool chain = !(p.detach_inner && !need_dp && !need_db);
    if (!chain) {
      if ((err = backward_combine(plan, p, last, chain, stream)) != cudaSuccess) return err;
      if (last > 0 && (err = backward_sweep(plan, p, last, chain, need_uhat, stream)) != 0) {
        return err;
      }
    } else {
      for (int k = last; k >= 1; --k) {
        if ((err = backward_combine(plan, p, k, chain, stream)) != cudaSuccess) return err;
        if ((err = backward_sweep(plan, p, k, chain, need_uhat, stream)) != 0) return err;
      }
      if ((err = backward_combine(plan, p, 0, chain, stream)) != cudaSuccess) return err;
      if (need_dp && (err = backward_sweep(plan, p, 0, chain, need_uhat, stream)) != 0) {
        return err;
      }
    }
  }
  // Also for B = 0: dW, dprior and dbias are then zero, written by their owners.
  if (need_db) {
    err = launch_kernel("bias_grad", &bias_grad_kernel<T>,
                        dim3(static_cast<unsigned>(cdiv(p.JM, kBiasThreads))), dim3(kBiasThreads),
                        0, stream, p);
    if (err != cudaSuccess) return err;
  }
  if (t.du == nullptr && t.dw == nullptr && !need_dp) return cudaSuccess;
  return launch_kernel("grads", &grads_kernel<T>, dim3(static_cast<unsigned>(plan.grads_blocks)),
                       dim3(plan.tiles.grads_warps * kWarpSize), plan.grads_shared, stream, p);
}

namespace {

template <typename T>
int launch_shared_logits(const Params<T>& p, void (*kernel)(Params<T>), const char* name,
                         void* stream) {
  if (p.in_caps) {
    return launch_kernel(name, kernel, dim3(static_cast<unsigned>(p.J)), dim3(kWarpSize), 0,
                         stream, p);
  }
  return launch_kernel(name, kernel, dim3(static_cast<unsigned>(cdiv(p.I, kLogitThreads))),
                       dim3(kLogitThreads), 0, stream, p);
}

template <typename T>
int launch_shared_gemm(const Plan& plan, const Params<T>& p, void* stream) {
  const dim3 grid(static_cast<unsigned>(cdiv(p.JM, kGemmTileC)),
                  static_cast<unsigned>(cdiv(p.B, kGemmTileB)),
                  static_cast<unsigned>(plan.gemm_splits));
  return launch_kernel("gemm", &gemm_kernel<T>, grid, dim3(kGemmThreads), plan.gemm_shared,
                       stream, p);
}

template <typename T>
int launch_shared_combine(const Plan& plan, const Params<T>& p, bool forward, void* stream) {
  const int warps = plan.tiles.combine_warps;
  const dim3 grid(static_cast<unsigned>(cdiv(plan.sz.B * plan.sz.J, warps)));
  if (forward) {
    return launch_kernel("shared_combine", &shared_combine_kernel<T>, grid,
                         dim3(warps * kWarpSize), 0, stream, p);
  }
  return launch_kernel("shared_combine_back", &shared_combine_back_kernel<T>, grid,
                       dim3(warps * kWarpSize), 0, stream, p);
}

template <typename T>
int launch_shared_agree(const Plan& plan, const Params<T>& p, void* stream) {
  return launch_kernel("shared_agree", &shared_agree_kernel<T>,
                       dim3(static_cast<unsigned>(plan.agree_blocks)),
                       dim3(plan.tiles.agree_warps * kWarpSize), plan.agree_shared, stream, p);
}

}  // namespace

template <typename T>
int shared_routing_forward(const Plan& plan, const Tensors<T>& t, void* stream) {
  Params<T> p = make_shared_params(plan, t, false);
  const int64_t IJ = static_cast<int64_t>(p.I) * p.J;
  int err = cudaSuccess;
  for (int k = 0; k < p.R; ++k) {
    p.k = k;
    // Without samples the logits never move: every iteration's couplings are the first.
    p.add_agree = p.B > 0 && k > 0;
    p.logits_in = (k <= 1 || p.B == 0) ? t.prior : p.logits;
    p.store_logits = p.add_agree && k < p.R - 1;
    err = launch_shared_logits(p, &shared_softmax_kernel<T>, "shared_softmax", stream);
    if (err != cudaSuccess) return err;
    if (p.B == 0) continue;
    p.gemm_coef = p.coup + k * IJ;
    if ((err = launch_shared_gemm(plan, p, stream)) != cudaSuccess) return err;
    if ((err = launch_shared_combine(plan, p, true, stream)) != cudaSuccess) return err;
    if (k < p.R - 1) {
      p.agree_x = p.v_iter;
      if ((err = launch_shared_agree(plan, p, stream)) != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

template <typename T>
int shared_routing_backward(const Plan& plan, const Tensors<T>& t, void* stream) {
  Params<T> p = make_shared_params(plan, t, true);
  const int64_t IJ = static_cast<int64_t>(p.I) * p.J;
  const bool need_uhat = t.du != nullptr || t.dw != nullptr;
  const bool need_dp = t.dprior != nullptr;
  const bool need_db = t.dbias != nullptr;
  const int last = p.R - 1;
  int err = cudaSuccess;
  if (p.B > 0) {
    // The chain of D = dL/d(shared logits) through every iteration: needed by every gradient
    // except du and dW with detach_inner, which read the last iteration alone.
    const bool chain = (!p.detach_inner && need_uhat) || need_dp || need_db;
    for (int k = last; k >= (chain ? 0 : last); --k) {
      p.k = k;
      if (k < last) {
        p.gemm_coef = p.d_hist + (k + 1) * IJ;
        if ((err = launch_shared_gemm(plan, p, stream)) != cudaSuccess) return err;
      }
      if ((err = launch_shared_combine(plan, p, false, stream)) != cudaSuccess) return err;
      // e^1 feeds only dL/db^1 = dprior.
      if (!chain || (k == 0 && !need_dp)) continue;
      p.agree_x = p.ds;
      if ((err = launch_shared_agree(plan, p, stream)) != cudaSuccess) return err;
      p.d_in = k < last ? p.d_hist + (k + 1) * IJ : nullptr;
      p.d_out = k == 0 ? t.dprior : p.d_hist + k * IJ;
      err = launch_shared_logits(p, &shared_logits_back_kernel<T>, "shared_logits_back", stream);
      if (err != cudaSuccess) return err;
    }
  } else if (need_dp) {
    err = launch_kernel("zero", &zero_kernel<T>, dim3(static_cast<unsigned>(cdiv(IJ, 256))),
                        dim3(256), 0, stream, t.dprior, IJ);
    if (err != cudaSuccess) return err;
  }
  // Also for B = 0: dW and dbias are then zero, written by their owners.
  if (need_db) {
    err = launch_kernel("bias_grad", &bias_grad_kernel<T>,
                        dim3(static_cast<unsigned>(cdiv(p.JM, kBiasThreads))), dim3(kBiasThreads),
                        0, stream, p);
    if (err != cudaSuccess) return err;
  }
  if (!need_uhat) return cudaSuccess;
  // du and dW from du_hat (shared_uhat_grad); dprior came from the logits' backward.
  p.dprior = nullptr;
  return launch_kernel("grads", &grads_kernel<T>, dim3(static_cast<unsigned>(plan.grads_blocks)),
                       dim3(plan.tiles.grads_warps * kWarpSize), plan.grads_shared, stream, p);
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

template int routing_forward<float>(const Plan&, const Tensors<float>&, void*);
template int routing_forward<double>(const Plan&, const Tensors<double>&, void*);
template int routing_backward<float>(const Plan&, const Tensors<float>&, void*);
template int routing_backward<double>(const Plan&, const Tensors<double>&, void*);
template int shared_routing_forward<float>(const Plan&, const Tensors<float>&, void*);
template int shared_routing_forward<double>(const Plan&, const Tensors<double>&, void*);
template int shared_routing_backward<float>(const Plan&, const Tensors<float>&, void*);
template int shared_routing_backward<double>(const Plan&, const Tensors<double>&, void*);

}  // namespace cuda
}  // namespace capsnet_fused
