// CUDA kernels of capsnet_fused::cpp_routing_fwd / cpp_routing_bwd (math: ROUTING-MATH.md).
// Only the CUDA runtime is used (no torch), so `nvcc -c` checks this file on any machine.
//
// This is the fallback GPU path (Triton is the fast one), written for clarity and exactness:
//   forward          one block per sample; each sweep walks the input capsules in order and
//                    recomputes u_hat_bi [J, M] into shared memory (threads over (j, m)).
//   backward phase 1 one block per sample: ds^t = dL/ds^t for every t, running the sweeps
//                    t = R..2 that carry dL/dV backwards (as the CPU kernel).
//   backward phase 2 one block per input capsule i: walks the samples in order, recomputes
//                    u_hat_bi, the couplings and logit gradients, and accumulates du[b, i],
//                    dW[i] and dprior[i], which the block owns (no atomics: deterministic).
// Nothing of size B x I x J x M is stored; u_hat is recomputed once per sweep.
#include <cuda_runtime.h>

#include <cstdint>

#include "routing_cuda.h"

namespace capsnet_fused {
namespace cuda {
namespace {

constexpr double kSquashEps = 1e-8;
// Dynamic shared memory a block may use without opting in to more.
constexpr size_t kMaxSharedBytes = 48 * 1024;

__device__ inline float dev_exp(float x) { return expf(x); }
__device__ inline double dev_exp(double x) { return exp(x); }
__device__ inline float dev_log(float x) { return logf(x); }
__device__ inline double dev_log(double x) { return log(x); }
__device__ inline float dev_sqrt(float x) { return sqrtf(x); }
__device__ inline double dev_sqrt(double x) { return sqrt(x); }

template <typename T>
__device__ inline T neg_inf();
template <>
__device__ inline float neg_inf<float>() { return -INFINITY; }
template <>
__device__ inline double neg_inf<double>() { return -static_cast<double>(INFINITY); }

// uh [J, M] = sum_n u_bi[n] w_i[:, n, :], threads over (j, m).
template <typename T>
__device__ void predict(const T* u_bi, const T* w_i, T* uh, int J, int N, int M) {
  for (int k = threadIdx.x; k < J * M; k += blockDim.x) {
    const int j = k / M, m = k % M;
    const T* w = w_i + static_cast<int64_t>(j) * N * M + m;
    T acc = 0;
    for (int n = 0; n < N; ++n) acc += u_bi[n] * w[static_cast<int64_t>(n) * M];
    uh[k] = acc;
  }
}

// l[j] = prior_ij + uh_j . V_j (V = V^{t-1}; zero at the first iteration), threads over j.
template <typename T>
__device__ void logits(const T* uh, const T* V, const T* prior_i, bool first, T* l, int J,
                       int M) {
  for (int j = threadIdx.x; j < J; j += blockDim.x) {
    T x = prior_i != nullptr ? prior_i[j] : T(0);
    if (!first) {
      for (int m = 0; m < M; ++m) x += uh[j * M + m] * V[j * M + m];
    }
    l[j] = x;
  }
}

// c[j] = c^t_ij: softmax of l over j (out_caps), or exp(l - lse_t) (in_caps); threads over j.
template <typename T>
__device__ void couplings(const T* l, const T* lse_t, bool in_caps, T* c, int J) {
  for (int j = threadIdx.x; j < J; j += blockDim.x) {
    if (in_caps) {
      c[j] = dev_exp(l[j] - lse_t[j]);
    } else {
      T mx = l[0];
      for (int jj = 1; jj < J; ++jj) mx = l[jj] > mx ? l[jj] : mx;
      T sum = 0;
      for (int jj = 0; jj < J; ++jj) sum += dev_exp(l[jj] - mx);
      c[j] = dev_exp(l[j] - mx) / sum;
    }
  }
}

// e[j] = ds_j . uh_j = dL/dc_ij, threads over j.
template <typename T>
__device__ void coupling_grads(const T* ds_t, const T* uh, T* e, int J, int M) {
  for (int j = threadIdx.x; j < J; j += blockDim.x) {
    T x = 0;
    for (int m = 0; m < M; ++m) x += ds_t[j * M + m] * uh[j * M + m];
    e[j] = x;
  }
}

// dl[j] = dL/dl_ij from c and e; over in_caps sum_i c_ij e_ij = dss_t[j]. Threads over j.
template <typename T>
__device__ void logit_grads(const T* c, const T* e, const T* dss_t, bool in_caps, T* dl, int J) {
  for (int j = threadIdx.x; j < J; j += blockDim.x) {
    if (in_caps) {
      dl[j] = c[j] * (e[j] - dss_t[j]);
    } else {
      T ce = 0;
      for (int jj = 0; jj < J; ++jj) ce += c[jj] * e[jj];
      dl[j] = c[j] * (e[j] - ce);
    }
  }
}

// ds = dL/ds^t from dv = dL/dv^t (squash backward), dss[j] = ds_j . s_j. f and k are [J]
// shared scratch. Ends synchronised.
template <typename T>
__device__ void squash_backward(const T* s, const T* dv, T* ds, T* dss, T* f, T* k, int J,
                                int M) {
  for (int j = threadIdx.x; j < J; j += blockDim.x) {
    T n2 = 0, sdv = 0;
    for (int m = 0; m < M; ++m) {
      n2 += s[j * M + m] * s[j * M + m];
      sdv += s[j * M + m] * dv[j * M + m];
    }
    const T root = dev_sqrt(n2 + T(kSquashEps));
    const T fj = n2 / ((T(1) + n2) * root);
    const T df = T(1) / ((T(1) + n2) * (T(1) + n2) * root) - T(0.5) * fj / (n2 + T(kSquashEps));
    f[j] = fj;
    k[j] = T(2) * df * sdv;
  }
  __syncthreads();
  for (int q = threadIdx.x; q < J * M; q += blockDim.x) {
    const int j = q / M;
    ds[q] = f[j] * dv[q] + k[j] * s[q];
  }
  __syncthreads();
  for (int j = threadIdx.x; j < J; j += blockDim.x) {
    T x = 0;
    for (int m = 0; m < M; ++m) x += ds[j * M + m] * s[j * M + m];
    dss[j] = x;
  }
  __syncthreads();
}

template <typename T>
__global__ void forward_kernel(const T* u, const T* w, const T* prior, T* v, T* s_out, T* V_out,
                               T* lse, Sizes sz, bool in_caps) {
  const int64_t b = blockIdx.x;
  const int64_t I = sz.I;
  const int J = static_cast<int>(sz.J), N = static_cast<int>(sz.N), M = static_cast<int>(sz.M);
  const int R = static_cast<int>(sz.R);
  const int JM = J * M;
  const int64_t JNM = static_cast<int64_t>(JM) * N;
  extern __shared__ unsigned char shared_raw[];
  T* uh = reinterpret_cast<T*>(shared_raw);  // [J, M]
  T* V = uh + JM;                             // [J, M] V^{t-1}
  T* s = V + JM;                              // [J, M]
  T* l = s + JM;                              // [J] logits
  T* p = l + J;                               // [J] weights of u_hat_ij in s_j
  T* mx = p + J;                              // [J] running max (in_caps)
  T* norm = mx + J;                           // [J] running denominator (in_caps)
  T* scale = norm + J;                        // [J] rescaling of s_j (in_caps)
  for (int q = threadIdx.x; q < JM; q += blockDim.x) V[q] = T(0);
  for (int t = 0; t < R; ++t) {
    for (int q = threadIdx.x; q < JM; q += blockDim.x) s[q] = T(0);
    for (int j = threadIdx.x; j < J; j += blockDim.x) {
      mx[j] = neg_inf<T>();
      norm[j] = T(0);
    }
    __syncthreads();
    for (int64_t i = 0; i < I; ++i) {
      predict(u + (b * I + i) * N, w + i * JNM, uh, J, N, M);
      __syncthreads();
      logits(uh, V, prior != nullptr ? prior + i * J : nullptr, t == 0, l, J, M);
      __syncthreads();
      if (in_caps) {
        // Online softmax over i: rescale s_j and the denominator when the maximum grows.
        for (int j = threadIdx.x; j < J; j += blockDim.x) {
          T sc = T(1);
          if (l[j] > mx[j]) {
            sc = dev_exp(mx[j] - l[j]);
            norm[j] *= sc;
            mx[j] = l[j];
          }
          scale[j] = sc;
          p[j] = dev_exp(l[j] - mx[j]);
          norm[j] += p[j];
        }
      } else {
        couplings(l, static_cast<const T*>(nullptr), false, p, J);
        for (int j = threadIdx.x; j < J; j += blockDim.x) scale[j] = T(1);
      }
      __syncthreads();
      for (int q = threadIdx.x; q < JM; q += blockDim.x) {
        const int j = q / M;
        s[q] = s[q] * scale[j] + p[j] * uh[q];
      }
      __syncthreads();
    }
    const int64_t bt = b * R + t;
    for (int j = threadIdx.x; j < J; j += blockDim.x) {
      if (in_caps) lse[bt * J + j] = mx[j] + dev_log(norm[j]);
      scale[j] = in_caps ? T(1) / norm[j] : T(1);
    }
    __syncthreads();
    for (int q = threadIdx.x; q < JM; q += blockDim.x) {
      s[q] *= scale[q / M];
      s_out[bt * JM + q] = s[q];
      V_out[bt * JM + q] = V[q];
    }
    __syncthreads();
    // squash: p[j] = |s_j|^2 / (1 + |s_j|^2) / sqrt(|s_j|^2 + eps).
    for (int j = threadIdx.x; j < J; j += blockDim.x) {
      T n2 = 0;
      for (int m = 0; m < M; ++m) n2 += s[j * M + m] * s[j * M + m];
      p[j] = n2 / ((T(1) + n2) * dev_sqrt(n2 + T(kSquashEps)));
    }
    __syncthreads();
    for (int q = threadIdx.x; q < JM; q += blockDim.x) {
      const T vq = p[q / M] * s[q];
      V[q] += vq;
      if (t == R - 1) v[b * JM + q] = vq;
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void backward_states_kernel(const T* g, const T* u, const T* w, const T* prior,
                                       const T* s_sv, const T* V_sv, const T* lse, T* ds, T* dss,
                                       Sizes sz, bool in_caps, bool sweeps) {
  const int64_t b = blockIdx.x;
  const int64_t I = sz.I;
  const int J = static_cast<int>(sz.J), N = static_cast<int>(sz.N), M = static_cast<int>(sz.M);
  const int R = static_cast<int>(sz.R);
  const int JM = J * M;
  const int64_t JNM = static_cast<int64_t>(JM) * N;
  extern __shared__ unsigned char shared_raw[];
  T* uh = reinterpret_cast<T*>(shared_raw);  // [J, M]
  T* D = uh + JM;                             // [J, M] dL/dV^t from later iterations
  T* A = D + JM;                              // [J, M]
  T* l = A + JM;                              // [J]
  T* c = l + J;                               // [J]
  T* e = c + J;                               // [J]
  T* dl = e + J;                              // [J]
  int64_t bt = b * R + R - 1;
  squash_backward(s_sv + bt * JM, g + b * JM, ds + bt * JM, dss + bt * J, c, e, J, M);
  if (!sweeps) return;
  for (int q = threadIdx.x; q < JM; q += blockDim.x) D[q] = T(0);
  // V^0 is a constant: no sweep for the first iteration.
  for (int t = R - 1; t >= 1; --t) {
    bt = b * R + t;
    const T* ds_t = ds + bt * JM;
    for (int q = threadIdx.x; q < JM; q += blockDim.x) A[q] = T(0);
    __syncthreads();
    for (int64_t i = 0; i < I; ++i) {
      predict(u + (b * I + i) * N, w + i * JNM, uh, J, N, M);
      __syncthreads();
      logits(uh, V_sv + bt * JM, prior != nullptr ? prior + i * J : nullptr, false, l, J, M);
      __syncthreads();
      couplings(l, in_caps ? lse + bt * J : nullptr, in_caps, c, J);
      coupling_grads(ds_t, uh, e, J, M);
      __syncthreads();
      logit_grads(c, e, dss + bt * J, in_caps, dl, J);
      __syncthreads();
      for (int q = threadIdx.x; q < JM; q += blockDim.x) A[q] += dl[q / M] * uh[q];
      __syncthreads();
    }
    for (int q = threadIdx.x; q < JM; q += blockDim.x) D[q] += A[q];
    __syncthreads();
    squash_backward(s_sv + (bt - 1) * JM, D, ds + (bt - 1) * JM, dss + (bt - 1) * J, c, e, J, M);
  }
}

template <typename T>
__global__ void backward_inputs_kernel(const T* u, const T* w, const T* prior, const T* V_sv,
                                       const T* lse, const T* ds, const T* dss, T* du, T* dw,
                                       T* dprior, Sizes sz, bool in_caps, bool detach_inner) {
  const int64_t i = blockIdx.x;
  const int64_t B = sz.B, I = sz.I;
  const int J = static_cast<int>(sz.J), N = static_cast<int>(sz.N), M = static_cast<int>(sz.M);
  const int R = static_cast<int>(sz.R);
  const int JM = J * M;
  const int64_t JNM = static_cast<int64_t>(JM) * N;
  const bool need_uhat_grad = du != nullptr || dw != nullptr;
  extern __shared__ unsigned char shared_raw[];
  T* uh = reinterpret_cast<T*>(shared_raw);  // [J, M]
  T* duh = uh + JM;                           // [J, M]
  T* l = duh + JM;                            // [J]
  T* c = l + J;                               // [J]
  T* e = c + J;                               // [J]
  T* dl = e + J;                              // [J]
  T* dp = dl + J;                             // [J]
  const T* w_i = w + i * JNM;
  const T* prior_i = prior != nullptr ? prior + i * J : nullptr;
  T* dw_i = dw != nullptr ? dw + i * JNM : nullptr;
  if (dw_i != nullptr) {
    for (int64_t q = threadIdx.x; q < JNM; q += blockDim.x) dw_i[q] = T(0);
  }
  for (int j = threadIdx.x; j < J; j += blockDim.x) dp[j] = T(0);
  for (int64_t b = 0; b < B; ++b) {
    const T* u_bi = u + (b * I + i) * N;
    predict(u_bi, w_i, uh, J, N, M);
    for (int q = threadIdx.x; q < JM; q += blockDim.x) duh[q] = T(0);
    __syncthreads();
    for (int t = 0; t < R; ++t) {
      // detach_inner: u_hat has a gradient only through the last weighted sum.
      const bool uhat_grad = need_uhat_grad && (!detach_inner || t == R - 1);
      if (!uhat_grad && dprior == nullptr) continue;
      const int64_t bt = b * R + t;
      const T* Vp = V_sv + bt * JM;
      const T* ds_t = ds + bt * JM;
      logits(uh, Vp, prior_i, t == 0, l, J, M);
      __syncthreads();
      couplings(l, in_caps ? lse + bt * J : nullptr, in_caps, c, J);
      coupling_grads(ds_t, uh, e, J, M);
      __syncthreads();
      logit_grads(c, e, dss + bt * J, in_caps, dl, J);
      __syncthreads();
      if (uhat_grad) {
        const bool through_logits = !detach_inner && t > 0;
        for (int q = threadIdx.x; q < JM; q += blockDim.x) {
          const int j = q / M;
          duh[q] += c[j] * ds_t[q] + (through_logits ? dl[j] * Vp[q] : T(0));
        }
      }
      if (dprior != nullptr) {
        for (int j = threadIdx.x; j < J; j += blockDim.x) dp[j] += dl[j];
      }
      __syncthreads();
    }
    if (du != nullptr) {
      for (int n = threadIdx.x; n < N; n += blockDim.x) {
        T acc = 0;
        for (int j = 0; j < J; ++j) {
          for (int m = 0; m < M; ++m) acc += w_i[(static_cast<int64_t>(j) * N + n) * M + m] * duh[j * M + m];
        }
        du[(b * I + i) * N + n] = acc;
      }
    }
    if (dw_i != nullptr) {
      for (int64_t q = threadIdx.x; q < JNM; q += blockDim.x) {
        const int64_t j = q / (static_cast<int64_t>(N) * M);
        const int64_t n = (q / M) % N;
        const int64_t m = q % M;
        dw_i[q] += u_bi[n] * duh[j * M + m];
      }
    }
    __syncthreads();
  }
  if (dprior != nullptr) {
    for (int j = threadIdx.x; j < J; j += blockDim.x) dprior[i * J + j] = dp[j];
  }
}

// Threads per block: enough for the (j, m) elements of one capsule pair, a multiple of a warp.
int block_threads(const Sizes& sz) {
  const int64_t want = ((sz.J * sz.M + 31) / 32) * 32;
  return static_cast<int>(want < 64 ? 64 : (want > 256 ? 256 : want));
}

}  // namespace

template <typename T>
int routing_forward(const T* u, const T* w, const T* prior, T* v, T* s, T* V, T* lse,
                    const Sizes& sz, bool in_caps, void* stream) {
  if (sz.B == 0) return cudaSuccess;
  const size_t shared = sizeof(T) * (3 * sz.J * sz.M + 6 * sz.J);
  if (shared > kMaxSharedBytes) return cudaErrorInvalidConfiguration;
  forward_kernel<T><<<static_cast<unsigned>(sz.B), block_threads(sz), shared,
                      static_cast<cudaStream_t>(stream)>>>(u, w, prior, v, s, V, lse, sz,
                                                           in_caps);
  return cudaGetLastError();
}

template <typename T>
int routing_backward(const T* grad_v, const T* u, const T* w, const T* prior, const T* s,
                     const T* V, const T* lse, T* ds, T* dss, T* du, T* dw, T* dprior,
                     const Sizes& sz, bool in_caps, bool detach_inner, void* stream) {
  const size_t shared = sizeof(T) * (3 * sz.J * sz.M + 6 * sz.J);
  if (shared > kMaxSharedBytes) return cudaErrorInvalidConfiguration;
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const int threads = block_threads(sz);
  // With detach_inner only the prior's gradient needs the iterations before the last.
  const bool sweeps = !detach_inner || dprior != nullptr;
  if (sz.B > 0) {
    backward_states_kernel<T><<<static_cast<unsigned>(sz.B), threads, shared, cuda_stream>>>(
        grad_v, u, w, prior, s, V, lse, ds, dss, sz, in_caps, sweeps);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  backward_inputs_kernel<T><<<static_cast<unsigned>(sz.I), threads, shared, cuda_stream>>>(
      u, w, prior, V, lse, ds, dss, du, dw, dprior, sz, in_caps, detach_inner);
  return cudaGetLastError();
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

template int routing_forward<float>(const float*, const float*, const float*, float*, float*,
                                    float*, float*, const Sizes&, bool, void*);
template int routing_forward<double>(const double*, const double*, const double*, double*,
                                     double*, double*, double*, const Sizes&, bool, void*);
template int routing_backward<float>(const float*, const float*, const float*, const float*,
                                     const float*, const float*, const float*, float*, float*,
                                     float*, float*, float*, const Sizes&, bool, bool, void*);
template int routing_backward<double>(const double*, const double*, const double*,
                                      const double*, const double*, const double*, const double*,
                                      double*, double*, double*, double*, double*, const Sizes&,
                                      bool, bool, void*);

}  // namespace cuda
}  // namespace capsnet_fused
