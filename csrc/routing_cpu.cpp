// CPU kernels of capsnet_fused::cpp_routing_fwd / cpp_routing_bwd (math: ROUTING-MATH.md).
//
// Forward: parallel over samples, in groups of kSampleGroup per thread. Each sweep walks the
// input capsules once; W[i] is loaded once per group and reused from L1 for every sample of
// the group, whose u_hat_bi [J, M] is recomputed into an L1 buffer (u_hat of one sample,
// 737 KB at the MNIST shape, does not fit this machine's 512 KB L2, and streaming W once per
// sample made the kernel memory-bound). Only s^t, V^{t-1} and (softmax over in_caps) the
// log-sum-exp per (t, j) are saved: O(B R J M), never a B x I x J x M tensor.
//
// Backward, in two phases, so that every output element is written by one thread in a fixed
// order (bitwise identical results whatever the thread count, no per-thread dW copies):
//   1. parallel over samples (grouped as the forward): the sweeps t = R..2 that carry dL/dV
//      backwards; this yields ds^t = dL/ds^t for every t (O(B R J M)).
//   2. parallel over tiles of input capsules: for each i and each sample, recompute u_hat_bi,
//      the couplings c^t_bi and logit gradients from the small per-sample states, form
//      du_hat_bij = sum_t c^t_bij ds^t_bj + dl^t_bij V^{t-1}_bj, and accumulate du, dW[i]
//      and dprior[i] directly (each tile owns its rows of dW and dprior).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "routing_common.h"

namespace capsnet_fused {
namespace {

constexpr double kSquashEps = 1e-8;
// Input capsules per backward phase-2 task: W[i] and dW[i] of a tile stay in L2 (16 x 5 KB at
// the MNIST shape) while the per-sample states are read once per tile, not once per capsule.
constexpr int64_t kCapsTile = 16;
// Samples per forward / backward-phase-1 group: W (5.9 MB at the MNIST shape, more than the
// L2) is streamed once per group and sweep instead of once per sample (perf showed the
// per-sample version stalled on those loads).
constexpr int64_t kSampleGroup = 32;

// Helpers are force-inlined into the per-thread kernels below, so that they are compiled for
// each instruction set the kernels are cloned for, with M a compile-time constant where the
// kernel is specialised for it.
#define CAPSNET_INLINE __attribute__((always_inline)) inline

// Wheels must run on any x86-64, so the kernels are not built with -march; instead GCC clones
// them for x86-64-v3 (AVX2 + FMA) and the dynamic loader picks the clone the CPU supports.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && \
    !defined(CAPSNET_FUSED_NO_CLONES)
#define CAPSNET_KERNEL __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CAPSNET_KERNEL
#endif

// The `omp simd` pragmas let the compiler vectorise the reductions over M (it may not reorder
// float sums on its own); the order is fixed at compile time, so results stay deterministic.
template <typename T>
CAPSNET_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
  return acc;
}

template <typename T>
CAPSNET_INLINE void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] += alpha * x[k];
}

template <typename T>
CAPSNET_INLINE T max_of(T a, T b) {
  return a < b ? b : a;
}

// 32-byte vectors (GCC vector extension): one AVX register in the x86-64-v3 clone, a pair of
// SSE registers in the baseline one. may_alias/aligned(alignof(T)): loads from any T*.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32), aligned(alignof(T)), may_alias));
  static constexpr int64_t kLanes = 32 / sizeof(T);
};

// u_hat_i [J, M] = sum_n u_i[n] W_i[:, n, :] for one sample and input capsule. When M is a known
// multiple of the vector width, a block of output capsules is accumulated in vector registers:
// independent FMA chains instead of one chain of N dependent FMAs per j (the latency-bound
// form kept the forward at 3x its current time).
template <typename T, int MC>
CAPSNET_INLINE void predict(const T* __restrict u_i, const T* __restrict w_i, T* __restrict uh,
                            int64_t J, int64_t N, int64_t M) {
  int64_t j = 0;
  if constexpr (MC > 0 && MC % Vec<T>::kLanes == 0) {
    using V = typename Vec<T>::type;
    constexpr int64_t VM = MC / Vec<T>::kLanes;  // vectors per capsule
    constexpr int64_t JB = VM >= 8 ? 1 : 8 / VM;  // about 8 accumulator registers
    for (; j + JB <= J; j += JB) {
      V acc[JB][VM];
#pragma GCC unroll 16
      for (int64_t jb = 0; jb < JB; ++jb) {
#pragma GCC unroll 16
        for (int64_t k = 0; k < VM; ++k) acc[jb][k] = V{} ;
      }
      for (int64_t n = 0; n < N; ++n) {
        const T un = u_i[n];
#pragma GCC unroll 16
        for (int64_t jb = 0; jb < JB; ++jb) {
          const V* w = reinterpret_cast<const V*>(w_i + ((j + jb) * N + n) * MC);
#pragma GCC unroll 16
          for (int64_t k = 0; k < VM; ++k) acc[jb][k] += un * w[k];
        }
      }
#pragma GCC unroll 16
      for (int64_t jb = 0; jb < JB; ++jb) {
        V* out = reinterpret_cast<V*>(uh + (j + jb) * MC);
#pragma GCC unroll 16
        for (int64_t k = 0; k < VM; ++k) out[k] = acc[jb][k];
      }
    }
  }
  for (; j < J; ++j) {
    T* out = uh + j * M;
    const T* w = w_i + j * N * M;
    for (int64_t m = 0; m < M; ++m) out[m] = T(0);
    for (int64_t n = 0; n < N; ++n) axpy(u_i[n], w + n * M, out, M);
  }
}

// Routing logits of one input capsule: l[j] = prior_ij + u_hat_ij . V_j (V = V^{t-1}).
template <typename T>
CAPSNET_INLINE void logits(const T* uh, const T* V, const T* prior_i, bool first, T* l,
                           int64_t J, int64_t M) {
  for (int64_t j = 0; j < J; ++j) {
    T x = prior_i != nullptr ? prior_i[j] : T(0);
    // V^0 = 0: the first iteration's logits are the prior alone.
    if (!first) x += dot(uh + j * M, V + j * M, M);
    l[j] = x;
  }
}

// In place: l -> softmax(l) over its J entries, max-subtracted so large logits stay finite.
template <typename T>
CAPSNET_INLINE void softmax(T* l, int64_t J) {
  T mx = l[0];
  for (int64_t j = 1; j < J; ++j) mx = max_of(mx, l[j]);
  T sum = 0;
  for (int64_t j = 0; j < J; ++j) {
    l[j] = std::exp(l[j] - mx);
    sum += l[j];
  }
  const T inv = T(1) / sum;
  for (int64_t j = 0; j < J; ++j) l[j] *= inv;
}

// In place: l -> c^t_ij for one input capsule. Softmax over out_caps is local to i; over
// in_caps the normaliser of each j (lse_t [J], from the forward) is needed.
template <typename T>
CAPSNET_INLINE void couplings(T* l, const T* lse_t, bool in_caps, int64_t J) {
  if (in_caps) {
    for (int64_t j = 0; j < J; ++j) l[j] = std::exp(l[j] - lse_t[j]);
  } else {
    softmax(l, J);
  }
}

// dl[j] = dL/dl^t_ij from c = c^t_i [J] and e[j] = ds^t_j . u_hat_ij (dL/dc^t_ij).
template <typename T>
CAPSNET_INLINE void logit_grads(const T* c, const T* e, const T* dss_t, bool in_caps, T* dl,
                                int64_t J) {
  if (in_caps) {
    // Softmax over i: sum_i c_ij e_ij = ds^t_j . s^t_j = dss_t[j].
    for (int64_t j = 0; j < J; ++j) dl[j] = c[j] * (e[j] - dss_t[j]);
  } else {
    T ce = 0;
    for (int64_t j = 0; j < J; ++j) ce += c[j] * e[j];
    for (int64_t j = 0; j < J; ++j) dl[j] = c[j] * (e[j] - ce);
  }
}

// v = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps) for one capsule of M components.
template <typename T>
CAPSNET_INLINE void squash(const T* s, T* v, int64_t M) {
  const T n2 = dot(s, s, M);
  const T f = n2 / ((T(1) + n2) * std::sqrt(n2 + T(kSquashEps)));
  for (int64_t m = 0; m < M; ++m) v[m] = f * s[m];
}

// ds = dL/ds from dv = dL/dv for v = f(|s|^2) s: ds = f dv + 2 f'(|s|^2) (s . dv) s, with
// f' = 1 / ((1 + n2)^2 sqrt(n2 + eps)) - f / (2 (n2 + eps)), finite at s = 0.
template <typename T>
CAPSNET_INLINE void squash_backward(const T* s, const T* dv, T* ds, int64_t M) {
  const T n2 = dot(s, s, M);
  const T root = std::sqrt(n2 + T(kSquashEps));
  const T f = n2 / ((T(1) + n2) * root);
  const T df = T(1) / ((T(1) + n2) * (T(1) + n2) * root) - T(0.5) * f / (n2 + T(kSquashEps));
  const T k = T(2) * df * dot(s, dv, M);
  for (int64_t m = 0; m < M; ++m) ds[m] = f * dv[m] + k * s[m];
}

// Pointers and sizes of one call; kernels assume contiguous tensors in the compute dtype.
template <typename T>
struct Routing {
  const T* u;      // [B, I, N]
  const T* w;      // [I, J, N, M]
  const T* prior;  // [I, J] or null
  T* s;            // [B, R, J, M] s^t
  T* V;            // [B, R, J, M] V^{t-1}
  T* lse;          // [B, R, J] for in_caps
  RoutingSizes sz;
  bool in_caps;
};

// Forward for samples [b_begin, b_end), in groups of at most kSampleGroup. Each sweep walks
// the input capsules once; W[i] (5 KB) is loaded once per group and sweep and reused, from L1,
// for every sample of the group, whose u_hat_bi [J, M] is recomputed into an L1 buffer. work
// holds the group's running states (see the layout below). MC > 0: M == MC, known to the
// compiler, so the loops over M unroll into whole vector registers.
template <typename T, int MC>
CAPSNET_KERNEL void forward_samples(const Routing<T>& a, T* v, int64_t b_begin, int64_t b_end,
                                    T* work) {
  const int64_t I = a.sz.I, J = a.sz.J, N = a.sz.N, R = a.sz.R;
  const int64_t M = MC > 0 ? MC : a.sz.M;
  const int64_t JM = J * M;
  const int64_t JNM = J * N * M;
  T* uh = work;                            // [J, M]
  T* l = uh + JM;                          // [J]
  T* V = l + J;                            // [G, J, M] V^{t-1}
  T* s = V + kSampleGroup * JM;            // [G, J, M]
  T* mx = s + kSampleGroup * JM;           // [G, J] running max of the logits (in_caps)
  T* norm = mx + kSampleGroup * J;         // [G, J] running softmax denominator (in_caps)
  for (int64_t g0 = b_begin; g0 < b_end; g0 += kSampleGroup) {
    const int64_t G = std::min(kSampleGroup, b_end - g0);
    for (int64_t k = 0; k < G * JM; ++k) V[k] = T(0);
    for (int64_t t = 0; t < R; ++t) {
      for (int64_t k = 0; k < G * JM; ++k) s[k] = T(0);
      for (int64_t k = 0; k < G * J; ++k) {
        mx[k] = -std::numeric_limits<T>::infinity();
        norm[k] = T(0);
      }
      for (int64_t i = 0; i < I; ++i) {
        const T* w_i = a.w + i * JNM;
        const T* prior_i = a.prior ? a.prior + i * J : nullptr;
        for (int64_t g = 0; g < G; ++g) {
          predict<T, MC>(a.u + ((g0 + g) * I + i) * N, w_i, uh, J, N, M);
          logits(uh, V + g * JM, prior_i, t == 0, l, J, M);
          T* s_g = s + g * JM;
          if (!a.in_caps) {
            softmax(l, J);
            for (int64_t j = 0; j < J; ++j) axpy(l[j], uh + j * M, s_g + j * M, M);
          } else {
            // Softmax over i in the same sweep (online, as in flash attention): s_j and the
            // denominator are rescaled whenever the running maximum of the logits grows.
            T* mx_g = mx + g * J;
            T* norm_g = norm + g * J;
            for (int64_t j = 0; j < J; ++j) {
              if (l[j] > mx_g[j]) {
                const T scale = std::exp(mx_g[j] - l[j]);
                norm_g[j] *= scale;
                for (int64_t m = 0; m < M; ++m) s_g[j * M + m] *= scale;
                mx_g[j] = l[j];
              }
              const T p = std::exp(l[j] - mx_g[j]);
              norm_g[j] += p;
              axpy(p, uh + j * M, s_g + j * M, M);
            }
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t bt = (g0 + g) * R + t;
        T* s_g = s + g * JM;
        T* V_g = V + g * JM;
        if (a.in_caps) {
          for (int64_t j = 0; j < J; ++j) {
            const T inv = T(1) / norm[g * J + j];
            for (int64_t m = 0; m < M; ++m) s_g[j * M + m] *= inv;
            a.lse[bt * J + j] = mx[g * J + j] + std::log(norm[g * J + j]);
          }
        }
        for (int64_t k = 0; k < JM; ++k) {
          a.V[bt * JM + k] = V_g[k];
          a.s[bt * JM + k] = s_g[k];
        }
        // v^t (kept in s_g) and V^t = V^{t-1} + v^t; the last v^t is the output.
        for (int64_t j = 0; j < J; ++j) squash(s_g + j * M, s_g + j * M, M);
        for (int64_t k = 0; k < JM; ++k) V_g[k] += s_g[k];
        if (t == R - 1) {
          for (int64_t k = 0; k < JM; ++k) v[(g0 + g) * JM + k] = s_g[k];
        }
      }
    }
  }
}

// Backward phase 1 for samples [b_begin, b_end), in groups as the forward: ds^t [B, R, J, M]
// and dss^t = ds^t . s^t [B, R, J] for every t (only t = R when `sweeps` is false: nothing
// then needs the earlier iterations). Each sweep t = R..2 recomputes u_hat and accumulates
// A_j = sum_i dl^t_ij u_hat_ij = dL/dV^{t-1}_j.
template <typename T, int MC>
CAPSNET_KERNEL void backward_states_samples(const Routing<T>& a, const T* g_out, T* ds, T* dss,
                                            bool sweeps, int64_t b_begin, int64_t b_end,
                                            T* work) {
  const int64_t I = a.sz.I, J = a.sz.J, N = a.sz.N, R = a.sz.R;
  const int64_t M = MC > 0 ? MC : a.sz.M;
  const int64_t JM = J * M;
  const int64_t JNM = J * N * M;
  T* uh = work;                  // [J, M]
  T* l = uh + JM;                // [J]
  T* e = l + J;                  // [J]
  T* dl = e + J;                 // [J]
  T* D = dl + J;                 // [G, J, M] dL/dV^t from the later iterations
  T* A = D + kSampleGroup * JM;  // [G, J, M]
  for (int64_t g0 = b_begin; g0 < b_end; g0 += kSampleGroup) {
    const int64_t G = std::min(kSampleGroup, b_end - g0);
    for (int64_t g = 0; g < G; ++g) {
      // t = R: dL/dv^R = grad_v and nothing from later iterations.
      const int64_t bt = (g0 + g) * R + R - 1;
      for (int64_t j = 0; j < J; ++j) {
        squash_backward(a.s + bt * JM + j * M, g_out + (g0 + g) * JM + j * M, ds + bt * JM + j * M, M);
        dss[bt * J + j] = dot(ds + bt * JM + j * M, a.s + bt * JM + j * M, M);
      }
    }
    if (!sweeps) continue;
    for (int64_t k = 0; k < G * JM; ++k) D[k] = T(0);
    // V^0 is a constant: the first iteration passes nothing further back, so no sweep t = 1.
    for (int64_t t = R - 1; t >= 1; --t) {
      for (int64_t k = 0; k < G * JM; ++k) A[k] = T(0);
      for (int64_t i = 0; i < I; ++i) {
        const T* w_i = a.w + i * JNM;
        const T* prior_i = a.prior ? a.prior + i * J : nullptr;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t bt = (g0 + g) * R + t;
          const T* ds_t = ds + bt * JM;
          predict<T, MC>(a.u + ((g0 + g) * I + i) * N, w_i, uh, J, N, M);
          logits(uh, a.V + bt * JM, prior_i, false, l, J, M);
          couplings(l, a.in_caps ? a.lse + bt * J : nullptr, a.in_caps, J);
          for (int64_t j = 0; j < J; ++j) e[j] = dot(ds_t + j * M, uh + j * M, M);
          logit_grads(l, e, dss + bt * J, a.in_caps, dl, J);
          T* A_g = A + g * JM;
          for (int64_t j = 0; j < J; ++j) axpy(dl[j], uh + j * M, A_g + j * M, M);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        // dL/dv^{t-1} = D (only through V^{t-1}, which feeds every later iteration).
        T* D_g = D + g * JM;
        for (int64_t k = 0; k < JM; ++k) D_g[k] += A[g * JM + k];
        const int64_t bt = (g0 + g) * R + t - 1;
        for (int64_t j = 0; j < J; ++j) {
          squash_backward(a.s + bt * JM + j * M, D_g + j * M, ds + bt * JM + j * M, M);
          dss[bt * J + j] = dot(ds + bt * JM + j * M, a.s + bt * JM + j * M, M);
        }
      }
    }
  }
}

// Backward phase 2 for input-capsule tiles [tile_begin, tile_end): du [B, I, N],
// dW [I, J, N, M], dprior [I, J] (null = not wanted). Each tile owns its rows of dW and dprior
// and visits the samples in order, so the sums do not depend on the thread count.
template <typename T, int MC>
CAPSNET_KERNEL void backward_inputs_tiles(const Routing<T>& a, const T* ds, const T* dss, T* du,
                                          T* dw, T* dprior, bool detach_inner,
                                          int64_t tile_begin, int64_t tile_end, T* work) {
  const int64_t I = a.sz.I, J = a.sz.J, N = a.sz.N, R = a.sz.R, B = a.sz.B;
  const int64_t M = MC > 0 ? MC : a.sz.M;
  const int64_t JM = J * M;
  const int64_t JNM = J * N * M;
  const bool need_uhat_grad = du != nullptr || dw != nullptr;
  T* uh = work;
  T* duh = work + JM;
  T* acc = work + 2 * JM;  // [N, M]
  T* l = acc + N * M;
  T* e = l + J;
  T* dl = e + J;
  T* dp = dl + J;  // [kCapsTile, J]
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t i0 = tile * kCapsTile;
    const int64_t i1 = std::min(I, i0 + kCapsTile);
    if (dw != nullptr) {
      for (int64_t k = i0 * JNM; k < i1 * JNM; ++k) dw[k] = T(0);
    }
    for (int64_t k = 0; k < kCapsTile * J; ++k) dp[k] = T(0);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = i0; i < i1; ++i) {
        const T* u_bi = a.u + (b * I + i) * N;
        const T* w_i = a.w + i * JNM;
        const T* prior_i = a.prior ? a.prior + i * J : nullptr;
        predict<T, MC>(u_bi, w_i, uh, J, N, M);
        if (need_uhat_grad) {
          for (int64_t k = 0; k < JM; ++k) duh[k] = T(0);
        }
        for (int64_t t = 0; t < R; ++t) {
          // detach_inner: u_hat has a gradient only through the last weighted sum.
          const bool uhat_grad = need_uhat_grad && (!detach_inner || t == R - 1);
          if (!uhat_grad && dprior == nullptr) continue;
          const int64_t bt = b * R + t;
          const T* Vp = a.V + bt * JM;
          const T* ds_t = ds + bt * JM;
          logits(uh, Vp, prior_i, t == 0, l, J, M);
          couplings(l, a.in_caps ? a.lse + bt * J : nullptr, a.in_caps, J);
          for (int64_t j = 0; j < J; ++j) e[j] = dot(ds_t + j * M, uh + j * M, M);
          logit_grads(l, e, dss + bt * J, a.in_caps, dl, J);
          if (uhat_grad) {
            for (int64_t j = 0; j < J; ++j) {
              axpy(l[j], ds_t + j * M, duh + j * M, M);
              if (!detach_inner && t > 0) axpy(dl[j], Vp + j * M, duh + j * M, M);
            }
          }
          if (dprior != nullptr) {
            for (int64_t j = 0; j < J; ++j) dp[(i - i0) * J + j] += dl[j];
          }
        }
        if (du != nullptr) {
          // du[n] = sum_j W[i, j, n, :] . du_hat_j: accumulate over j in vectors of M, then
          // one horizontal sum per n.
          for (int64_t k = 0; k < N * M; ++k) acc[k] = T(0);
          for (int64_t j = 0; j < J; ++j) {
            for (int64_t n = 0; n < N; ++n) {
              const T* w = w_i + (j * N + n) * M;
              const T* d = duh + j * M;
#pragma omp simd
              for (int64_t m = 0; m < M; ++m) acc[n * M + m] += w[m] * d[m];
            }
          }
          for (int64_t n = 0; n < N; ++n) {
            T sum = 0;
            for (int64_t m = 0; m < M; ++m) sum += acc[n * M + m];
            du[(b * I + i) * N + n] = sum;
          }
        }
        if (dw != nullptr) {
          T* dw_i = dw + i * JNM;
          for (int64_t j = 0; j < J; ++j) {
            for (int64_t n = 0; n < N; ++n) axpy(u_bi[n], duh + j * M, dw_i + (j * N + n) * M, M);
          }
        }
      }
    }
    if (dprior != nullptr) {
      for (int64_t k = 0; k < (i1 - i0) * J; ++k) dprior[i0 * J + k] = dp[k];
    }
  }
}

// Calls body(std::integral_constant<int, MC>) with MC = M for the pose sizes worth
// specialising (16: the paper's digit capsules), MC = 0 (any M) otherwise.
template <typename Body>
void dispatch_pose_size(int64_t M, const Body& body) {
  switch (M) {
    case 16: body(std::integral_constant<int, 16>()); break;
    case 8: body(std::integral_constant<int, 8>()); break;
    case 4: body(std::integral_constant<int, 4>()); break;
    default: body(std::integral_constant<int, 0>());
  }
}

template <typename T>
void forward_kernel(const Routing<T>& a, T* v) {
  const RoutingSizes& sz = a.sz;
  const int64_t JM = sz.J * sz.M;
  at::parallel_for(0, sz.B, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<T> work(JM + sz.J + kSampleGroup * (2 * JM + 2 * sz.J));
    dispatch_pose_size(sz.M, [&](auto mc) {
      constexpr int MC = decltype(mc)::value;
      forward_samples<T, MC>(a, v, b_begin, b_end, work.data());
    });
  });
}

template <typename T>
void backward_kernel(const Routing<T>& a, const T* g, T* ds, T* dss, T* du, T* dw, T* dprior,
                     bool detach_inner) {
  const RoutingSizes& sz = a.sz;
  const int64_t JM = sz.J * sz.M;
  // With detach_inner only the prior's gradient needs the iterations before the last.
  const bool sweeps = !detach_inner || dprior != nullptr;
  at::parallel_for(0, sz.B, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<T> work(JM + 3 * sz.J + kSampleGroup * 2 * JM);
    dispatch_pose_size(sz.M, [&](auto mc) {
      constexpr int MC = decltype(mc)::value;
      backward_states_samples<T, MC>(a, g, ds, dss, sweeps, b_begin, b_end, work.data());
    });
  });
  const int64_t tiles = (sz.I + kCapsTile - 1) / kCapsTile;
  at::parallel_for(0, tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<T> work(2 * JM + sz.N * sz.M + 3 * sz.J + kCapsTile * sz.J);
    dispatch_pose_size(sz.M, [&](auto mc) {
      constexpr int MC = decltype(mc)::value;
      backward_inputs_tiles<T, MC>(a, ds, dss, du, dw, dprior, detach_inner, tile_begin,
                                   tile_end, work.data());
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_fwd_cpu(
    const at::Tensor& u, const at::Tensor& weight, const std::optional<at::Tensor>& prior,
    int64_t iterations, bool softmax_in_caps, bool /*detach_inner: backward only*/) {
  const ForwardCall call = prepare_forward(u, weight, prior, iterations, softmax_in_caps);
  AT_DISPATCH_FLOATING_TYPES(call.dtype, "cpp_routing_fwd", [&] {
    using T = scalar_t;
    const Routing<T> a{call.u.data_ptr<T>(), call.w.data_ptr<T>(), ptr_or_null<T>(call.prior),
                       call.s.data_ptr<T>(), call.V.data_ptr<T>(), call.lse.data_ptr<T>(),
                       call.sz, softmax_in_caps};
    forward_kernel<T>(a, call.v.data_ptr<T>());
  });
  return finish_forward(call, u.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_bwd_cpu(
    const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& weight,
    const std::optional<at::Tensor>& prior, const at::Tensor& s, const at::Tensor& V,
    const at::Tensor& lse, int64_t iterations, bool softmax_in_caps, bool detach_inner,
    bool need_du, bool need_dweight, bool need_dprior) {
  const BackwardCall call = prepare_backward(grad_v, u, weight, prior, s, V, lse, iterations,
                                             softmax_in_caps, need_du, need_dweight, need_dprior);
  if (call.any()) {
    AT_DISPATCH_FLOATING_TYPES(call.dtype, "cpp_routing_bwd", [&] {
      using T = scalar_t;
      // The backward kernels only read s, V and lse.
      const Routing<T> a{call.u.data_ptr<T>(), call.w.data_ptr<T>(), ptr_or_null<T>(call.prior),
                         call.s.data_ptr<T>(), call.V.data_ptr<T>(), call.lse.data_ptr<T>(),
                         call.sz, softmax_in_caps};
      backward_kernel<T>(a, call.g.data_ptr<T>(), call.ds.data_ptr<T>(), call.dss.data_ptr<T>(),
                         call.need_du ? call.du.data_ptr<T>() : nullptr,
                         call.need_dw ? call.dw.data_ptr<T>() : nullptr,
                         call.need_dp ? call.dp.data_ptr<T>() : nullptr, detach_inner);
    });
  }
  return finish_backward(call, u, weight, prior);
}

}  // namespace

TORCH_LIBRARY_IMPL(capsnet_fused, CPU, m) {
  m.impl("cpp_routing_fwd", &routing_fwd_cpu);
  m.impl("cpp_routing_bwd", &routing_bwd_cpu);
}

}  // namespace capsnet_fused
