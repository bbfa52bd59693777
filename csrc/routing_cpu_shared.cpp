// CPU kernels of capsnet_fused::cpp_shared_routing_fwd / cpp_shared_routing_bwd: routing logits
// shared by the batch (issue 18; math in docs/ROUTING-MATH.md, contract in routing_schema.h).
//
// With one set of logits [I, J] for the batch, every iteration ends with a reduction over the
// whole batch (the agreements a^t_ij = sum_b u_hat_bij . v^t_bj), so the sweeps of
// routing_cpu.cpp, which run a group of samples through all iterations alone, do not apply.
// Each iteration is instead two contractions with W, neither of which forms u_hat:
//   s^t = u [B, I N] x (c^t (.) W) [I N, J M]                 rows_gemm: tiles of samples
//   G^t = u^T [I N, B] x v^t [B, J M],  a^t_ij = W_ij : G^t_ij  batch_agreement: of capsules
// The backward reuses both (dv^t from u x (kappa D (.) W), e^t from u^T x ds^t), then one pass
// over blocks of input capsules forms du_hat_bi from the saved c^t, v^t, the ds^t and D^{t+1},
// and from it du_bi and dW_i (summed over the batch by the block that owns capsule i).
//
// Determinism: every output element is computed by one thread, which sums over the contracted
// index in ascending order; the work is cut into fixed tiles (of samples, of (i, n) rows, of
// capsules) whatever the number of threads, so results are bitwise the same with any thread
// count. The [I, J] softmax, its backward and the bias gradient are serial (I J and B R J M
// values: microseconds).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_scratch.h"
#include "routing_common.h"

// The 32-byte vector helpers are always inlined, so the ABI of passing them by value (which GCC
// warns differs with and without AVX) never applies.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace capsnet_fused {
namespace {

// Helpers are force-inlined into the kernels, so that they are compiled for each instruction
// set the kernels are cloned for.
#define CAPSNET_SHARED_INLINE __attribute__((always_inline)) inline

// As in routing_cpu.cpp: wheels must run on any x86-64, so the kernels are cloned for
// x86-64-v3 (AVX2 + FMA) and the dynamic loader picks the clone the CPU supports.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && \
    !defined(CAPSNET_FUSED_NO_CLONES)
#define CAPSNET_SHARED_KERNEL __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CAPSNET_SHARED_KERNEL
#endif

// 32 bytes of T (GCC vector extension): one AVX register in the x86-64-v3 clone, a pair of SSE
// registers in the baseline one.
template <typename T>
struct Vec {
  typedef T V __attribute__((vector_size(32)));
  static constexpr int64_t L = 32 / sizeof(T);
};

// A register tile is kTileRows rows x 2 vectors: 12 accumulators, two operand vectors and a
// broadcast fill 15 of the 16 AVX registers.
constexpr int kTileRows = 6;
// Rows per parallel task (a multiple of kTileRows, so that tiles start at the same rows
// whatever the split between threads).
constexpr int64_t kTaskRows = 4 * kTileRows;
// Contraction chunk of rows_gemm: the chunk of a weight panel (kDepth x 2 vectors, 16 KB in
// float32) stays in L1 while the task's row tiles use it.
constexpr int64_t kDepth = 256;
// Input capsules per task of the gradient pass: the saved ds^t and v^t rows of a sample are
// read once for the block (at the MNIST shape the block's transposed W and dW take 80 KB).
constexpr int64_t kCapsBlock = 8;

// at::parallel_for over n tasks of about `work` multiply-adds each, with a grain that gives
// each thread at least kThreadWork of them: every parallel region ends in a barrier, which on a
// busy machine can wait a scheduler time slice for a preempted thread, so small problems run on
// the calling thread. The tiles, hence the results, are the same either way. Every thread
// flushes denormals while it works, as the calling thread does for the whole call: the same
// floating-point mode wherever a task runs.
constexpr int64_t kThreadWork = int64_t{1} << 18;

template <typename F>
void parallel_tasks(int64_t n, int64_t work, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kThreadWork / std::max<int64_t>(work, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    f(begin, end);
  });
}

// Sizes of one call. The J M columns (j, m) of s, v and ds are kept in NP panels of two vectors
// (PW values), zero beyond J M, so that every loop over columns is whole vectors whatever M is.
// The packed weights of rows_gemm are NP panels [K, PW], PS values apart: K PW plus one cache
// line, so that the panels' rows are not a multiple of 4 KB apart (see padded_stride).
struct Layout {
  int64_t B, I, J, N, M, R, K, JM, PW, NP, NPW, PS;
  template <typename T>
  static Layout of(const RoutingSizes& sz) {
    const int64_t JM = sz.J * sz.M, PW = 2 * Vec<T>::L, NP = (JM + PW - 1) / PW;
    const int64_t K = sz.I * sz.N;
    return {sz.B, sz.I, sz.J, sz.N, sz.M, sz.R, K, JM, PW, NP, NP * PW, (K + 1) * PW};
  }
};

// The rows a tile reads side by side are first copied into a task's buffer with a row stride
// of n values rounded up to a cache line plus one line: never a multiple of 4 KB. At the MNIST
// shape u's rows are 36 KB apart, and rows at such strides all fall into one L1 set (8 ways):
// reading them in place made the contraction over the batch several times slower on the 2-core
// Zen 3 (AMD EPYC family 25, 32 KB 8-way L1d, 512 KB L2 per core) this was written on.
template <typename T>
int64_t padded_stride(int64_t n) {
  constexpr int64_t line = 64 / sizeof(T);
  return (n + line - 1) / line * line + line;
}

// One register tile: out[r, 0 .. 2L) (+)= sum_{s < steps} a[r a_row + s] b[s b_step + ..] for
// r < NR, summing over s in ascending order. first: out is overwritten, else added to
// (continuing the same sum: the result is bitwise that of one pass over all steps).
template <int NR, typename T>
CAPSNET_SHARED_INLINE void tile(const T* a, int64_t a_row, const T* b, int64_t b_step,
                                int64_t steps, T* out, int64_t out_row, bool first) {
  using V = typename Vec<T>::V;
  V acc[NR][2];
#pragma GCC unroll 6
  for (int r = 0; r < NR; ++r) {
    const V* o = reinterpret_cast<const V*>(out + r * out_row);
    acc[r][0] = first ? V{} : o[0];
    acc[r][1] = first ? V{} : o[1];
  }
  for (int64_t s = 0; s < steps; ++s) {
    const V* bs = reinterpret_cast<const V*>(b + s * b_step);
    const V b0 = bs[0], b1 = bs[1];
#pragma GCC unroll 6
    for (int r = 0; r < NR; ++r) {
      // A scalar times a vector is a broadcast (vbroadcastss) and an FMA.
      const T x = a[r * a_row + s];
      acc[r][0] += x * b0;
      acc[r][1] += x * b1;
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < NR; ++r) {
    V* o = reinterpret_cast<V*>(out + r * out_row);
    o[0] = acc[r][0];
    o[1] = acc[r][1];
  }
}

// tile<nr> for a run-time nr in [1, kTileRows].
template <typename T>
CAPSNET_SHARED_INLINE void tile_rows(int64_t nr, const T* a, int64_t a_row, const T* b,
                                     int64_t b_step, int64_t steps, T* out, int64_t out_row,
                                     bool first) {
  switch (nr) {
    case 6: return tile<6>(a, a_row, b, b_step, steps, out, out_row, first);
    case 5: return tile<5>(a, a_row, b, b_step, steps, out, out_row, first);
    case 4: return tile<4>(a, a_row, b, b_step, steps, out, out_row, first);
    case 3: return tile<3>(a, a_row, b, b_step, steps, out, out_row, first);
    case 2: return tile<2>(a, a_row, b, b_step, steps, out, out_row, first);
    default: return tile<1>(a, a_row, b, b_step, steps, out, out_row, first);
  }
}

// P[p][k][c] = F[i, j] W[i, j, n, m] for k = i N + n and column q = p PW + c = j M + m (0 for
// q >= J M): W with an [I, J] factor F (c^t, or kappa D) folded in, as rows_gemm reads it. Rows
// of input capsules [i_begin, i_end); each W row is scaled in runs of contiguous columns.
template <typename T>
CAPSNET_SHARED_KERNEL void pack_rows(const Layout& z, const T* F, const T* w, T* P,
                                     int64_t i_begin, int64_t i_end) {
  for (int64_t i = i_begin; i < i_end; ++i) {
    for (int64_t n = 0; n < z.N; ++n) {
      const int64_t k = i * z.N + n;
      for (int64_t j = 0; j < z.J; ++j) {
        const T f = F[i * z.J + j];
        const T* wr = w + ((i * z.J + j) * z.N + n) * z.M;
        for (int64_t m = 0; m < z.M;) {
          const int64_t q = j * z.M + m, c = q % z.PW;
          const int64_t len = std::min(z.PW - c, z.M - m);
          T* dst = P + (q / z.PW) * z.PS + k * z.PW + c;
          for (int64_t x = 0; x < len; ++x) dst[x] = f * wr[m + x];
          m += len;
        }
      }
      T* last = P + (z.NP - 1) * z.PS + k * z.PW;
      for (int64_t q = z.JM; q < z.NPW; ++q) last[q % z.PW] = T(0);
    }
  }
}

template <typename T>
void pack_scaled_weight(const Layout& z, const T* F, const T* w, T* P) {
  parallel_tasks(z.I, z.N * z.NPW, [&](int64_t begin, int64_t end) {
    pack_rows<T>(z, F, w, P, begin, end);
  });
}

// Y [B, NPW] = u [B, K] x P (pack_scaled_weight): the weighted sums s^t (or dv^t) of every
// sample. Tasks [task_begin, task_end) of (kTaskRows samples, one column panel); per chunk of
// kDepth rows k = (i, n) a task copies its samples' u into ua and runs its row tiles on the
// panel's chunk, which stays in L1 meanwhile.
template <typename T>
CAPSNET_SHARED_KERNEL void rows_gemm_tasks(const Layout& z, const T* u, const T* P, T* Y, T* ua,
                                           int64_t task_begin, int64_t task_end) {
  const int64_t ua_row = padded_stride<T>(kDepth);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t p = task % z.NP, r0 = task / z.NP * kTaskRows;
    const int64_t r1 = std::min(z.B, r0 + kTaskRows);
    for (int64_t k0 = 0; k0 < z.K; k0 += kDepth) {
      const int64_t kc = std::min(kDepth, z.K - k0);
      for (int64_t r = r0; r < r1; ++r) {
        std::copy(u + r * z.K + k0, u + r * z.K + k0 + kc, ua + (r - r0) * ua_row);
      }
      const T* panel = P + p * z.PS + k0 * z.PW;
      for (int64_t r = r0; r < r1; r += kTileRows) {
        tile_rows(std::min<int64_t>(kTileRows, r1 - r), ua + (r - r0) * ua_row, ua_row, panel,
                  z.PW, kc, Y + r * z.NPW + p * z.PW, z.NPW, k0 == 0);
      }
    }
  }
}

// Y = u x (F (.) W) through P, a scratch of NP x PS values.
template <typename T>
void rows_gemm(const Layout& z, const T* u, const T* F, const T* w, T* P, T* Y) {
  pack_scaled_weight(z, F, w, P);
  const int64_t tasks = (z.B + kTaskRows - 1) / kTaskRows * z.NP;
  parallel_tasks(tasks, kTaskRows * z.K * z.PW, [&](int64_t begin, int64_t end) {
    Buffer<T> ua(kTaskRows * padded_stride<T>(kDepth));
    rows_gemm_tasks<T>(z, u, P, Y, ua.data(), begin, end);
  });
}

// Unaligned loads of 32 bytes of T (W's rows need not be 32-byte aligned).
template <typename T>
struct Unaligned {
  typedef T V __attribute__((vector_size(32), aligned(alignof(T)), may_alias));
};

// sum_n sum_m w[n M + m] g[n NPW + m]: a W_ij [N, M] block against G's rows. Whole vectors of m
// when M is a multiple of them (the lanes added in order at the end), else one value at a
// time: the path depends on M only, so the sum's order is fixed.
template <typename T>
CAPSNET_SHARED_INLINE T contract_capsule(const Layout& z, const T* w, const T* g) {
  using U = typename Unaligned<T>::V;
  constexpr int64_t L = Vec<T>::L;
  T sum = 0;
  if (z.M % L == 0) {
    typename Vec<T>::V acc{};
    for (int64_t n = 0; n < z.N; ++n) {
      for (int64_t m = 0; m < z.M; m += L) {
        acc += *reinterpret_cast<const U*>(w + n * z.M + m) *
               *reinterpret_cast<const U*>(g + n * z.NPW + m);
      }
    }
    for (int64_t k = 0; k < L; ++k) sum += acc[k];
    return sum;
  }
  for (int64_t n = 0; n < z.N; ++n) {
    for (int64_t m = 0; m < z.M; ++m) sum += w[n * z.M + m] * g[n * z.NPW + m];
  }
  return sum;
}

// Input capsules per task of batch_agreement: about 48 rows (i, n), 8 row tiles.
inline int64_t agreement_caps(int64_t N) { return std::max<int64_t>(1, 48 / N); }

// A[i, j] = sum_{n, m} W[i, j, n, m] G[(i, n), (j, m)] with G = u^T Z (G[(i, n), q] =
// sum_b u[b, i, n] Z[b, q], b in order): the agreements sum_b u_hat_bij . v_bj (Z = v^t) or the
// coupling gradients sum_b u_hat_bij . ds_bj (Z = ds^t); Z's rows are z_row apart. Tasks
// [task_begin, task_end) of agreement_caps(N) input capsules: u^T of their rows is copied into
// ut, G for them computed into g, then contracted with W.
template <typename T>
CAPSNET_SHARED_KERNEL void agreement_tasks(const Layout& z, const T* u, const T* w, const T* Z,
                                           int64_t z_row, T* A, T* ut, T* g, int64_t task_begin,
                                           int64_t task_end) {
  const int64_t caps = agreement_caps(z.N), ut_row = padded_stride<T>(z.B);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t i0 = task * caps, i1 = std::min(z.I, i0 + caps);
    const int64_t k0 = i0 * z.N, rows = (i1 - i0) * z.N;
    for (int64_t b = 0; b < z.B; ++b) {
      for (int64_t kk = 0; kk < rows; ++kk) ut[kk * ut_row + b] = u[b * z.K + k0 + kk];
    }
    for (int64_t p = 0; p < z.NP; ++p) {
      for (int64_t kk = 0; kk < rows; kk += kTileRows) {
        tile_rows(std::min<int64_t>(kTileRows, rows - kk), ut + kk * ut_row, ut_row,
                  Z + p * z.PW, z_row, z.B, g + kk * z.NPW + p * z.PW, z.NPW, true);
      }
    }
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = 0; j < z.J; ++j) {
        A[i * z.J + j] = contract_capsule(z, w + (i * z.J + j) * z.N * z.M,
                                          g + (i - i0) * z.N * z.NPW + j * z.M);
      }
    }
  }
}

template <typename T>
void batch_agreement(const Layout& z, const T* u, const T* w, const T* Z, int64_t z_row, T* A) {
  const int64_t caps = agreement_caps(z.N);
  const int64_t tasks = (z.I + caps - 1) / caps;
  parallel_tasks(tasks, caps * z.N * z.B * z.NPW, [&](int64_t begin, int64_t end) {
    Buffer<T> ut(caps * z.N * padded_stride<T>(z.B)), g(caps * z.N * z.NPW);
    agreement_tasks<T>(z, u, w, Z, z_row, A, ut.data(), g.data(), begin, end);
  });
}

// c = softmax of the logits l [I, J] over j for each i, or over i for each j (in_caps); leaky:
// one more logit, 0, joins the max and the sum and its share is dropped. A NaN logit makes its
// line NaN, as torch.softmax does.
template <typename T>
void coupling_softmax(const T* l, T* c, int64_t I, int64_t J, bool in_caps, bool leaky) {
  const int64_t lines = in_caps ? J : I, len = in_caps ? I : J;
  const int64_t step = in_caps ? J : 1, line_stride = in_caps ? 1 : J;
  for (int64_t line = 0; line < lines; ++line) {
    const T* x = l + line * line_stride;
    T* y = c + line * line_stride;
    T mx = leaky ? T(0) : -std::numeric_limits<T>::infinity();
    for (int64_t k = 0; k < len; ++k) {
      const T xk = x[k * step];
      mx = (xk > mx || xk != xk) && mx == mx ? xk : mx;
    }
    T den = leaky ? std::exp(-mx) : T(0);
    for (int64_t k = 0; k < len; ++k) {
      y[k * step] = std::exp(x[k * step] - mx);
      den += y[k * step];
    }
    for (int64_t k = 0; k < len; ++k) y[k * step] /= den;
  }
}

// dl = c (e - sum over the softmax axis of c e), for the coupling gradients e [I, J]; the leaky
// share multiplies nothing and does not enter (docs/ROUTING-MATH.md).
template <typename T>
void coupling_softmax_backward(const T* c, const T* e, T* dl, int64_t I, int64_t J,
                               bool in_caps) {
  const int64_t lines = in_caps ? J : I, len = in_caps ? I : J;
  const int64_t step = in_caps ? J : 1, line_stride = in_caps ? 1 : J;
  for (int64_t line = 0; line < lines; ++line) {
    const int64_t base = line * line_stride;
    T ce = 0;
    for (int64_t k = 0; k < len; ++k) ce += c[base + k * step] * e[base + k * step];
    for (int64_t k = 0; k < len; ++k) {
      dl[base + k * step] = c[base + k * step] * (e[base + k * step] - ce);
    }
  }
}

// max_m |s_m| of one capsule, NaN when some s_m is NaN.
template <typename T>
CAPSNET_SHARED_INLINE T max_abs(const T* s, int64_t M) {
  T a = 0;
  for (int64_t m = 0; m < M; ++m) {
    const T x = std::abs(s[m]);
    a = (x > a || x != x) && a == a ? x : a;
  }
  return a;
}

// v = squash_eps(s) of one capsule, on t = s / a with a = max |s_m| so that nothing overflows:
// with qt = |t|^2 and r = 1 / a^2, v = t / (1 + r / qt) / sqrt(qt + eps r). At s = 0: v = 0
// for eps > 0, NaN for eps = 0 (the eps-free squash is 0/0 there), as in the reference.
template <typename T>
void squash_capsule(const T* s, T* v, int64_t M, T eps) {
  const T a = max_abs(s, M);
  if (a == 0) {
    for (int64_t m = 0; m < M; ++m) v[m] = eps == 0 ? std::numeric_limits<T>::quiet_NaN() : T(0);
    return;
  }
  T qt = 0;
  for (int64_t m = 0; m < M; ++m) qt += (s[m] / a) * (s[m] / a);
  const T r = T(1) / (a * a);
  const T er = eps == 0 ? T(0) : eps * r;
  const T g = T(1) / (T(1) + r / qt) / std::sqrt(qt + er);
  for (int64_t m = 0; m < M; ++m) v[m] = g * (s[m] / a);
}

// ds = dL/ds of v = squash_eps(s) for dv = dL/dv: ds = (g / a) (dv + 2 h (t . dv) t) with
// h = 1/qt - 1/(r + qt) - 1/(2 (qt + eps r)); at s = 0, 0 (eps > 0) or NaN (eps = 0).
template <typename T>
void squash_backward_capsule(const T* s, const T* dv, T* ds, int64_t M, T eps) {
  const T a = max_abs(s, M);
  if (a == 0) {
    for (int64_t m = 0; m < M; ++m) ds[m] = eps == 0 ? std::numeric_limits<T>::quiet_NaN() : T(0);
    return;
  }
  T qt = 0, tdv = 0;
  for (int64_t m = 0; m < M; ++m) {
    const T t = s[m] / a;
    qt += t * t;
    tdv += t * dv[m];
  }
  const T r = T(1) / (a * a);
  const T er = eps == 0 ? T(0) : eps * r;
  const T g = T(1) / (T(1) + r / qt) / std::sqrt(qt + er);
  const T h = T(1) / qt - T(1) / (r + qt) - T(0.5) / (qt + er);
  const T scale = g / a, c = T(2) * h * tdv;
  for (int64_t m = 0; m < M; ++m) ds[m] = scale * (dv[m] + c * (s[m] / a));
}

// The inputs of one call (contiguous, in the compute dtype) and its options.
template <typename T>
struct SharedRouting {
  const T* u;      // [B, I, N] = [B, K]
  const T* w;      // [I, J, N, M]
  const T* prior;  // [I, J] or null
  const T* bias;   // [J, M] or null
  Layout z;
  bool in_caps, leaky;
  T eps, kappa;  // kappa: 1 / max(B, 1) for the batch mean, 1 for the sum
};

// The states the forward saves: s^t + bias and v^t [B, R, J, M], c^t [R, I, J].
template <typename T>
struct SharedStates {
  T* s;
  T* v_iter;
  T* c;
};

template <typename T>
void shared_forward(const SharedRouting<T>& a, const SharedStates<T>& out, T* v_out) {
  const Layout& z = a.z;
  const int64_t IJ = z.I * z.J;
  Buffer<T> logits(IJ), P(z.NP * z.PS), Y(z.B * z.NPW), Zv(z.B * z.NPW), A(IJ);
  for (int64_t q = 0; q < IJ; ++q) logits.data()[q] = a.prior ? a.prior[q] : T(0);
  // v^t padded to NPW columns for the agreements (the padding stays 0).
  Zv.zero();
  for (int64_t t = 0; t < z.R; ++t) {
    T* c = out.c + t * IJ;
    coupling_softmax(logits.data(), c, z.I, z.J, a.in_caps, a.leaky);
    rows_gemm(z, a.u, c, a.w, P.data(), Y.data());
    const bool last = t == z.R - 1;
    parallel_tasks(z.B, 8 * z.JM, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        T* s = out.s + (b * z.R + t) * z.JM;
        T* v = out.v_iter + (b * z.R + t) * z.JM;
        for (int64_t q = 0; q < z.JM; ++q) {
          s[q] = a.bias ? Y.data()[b * z.NPW + q] + a.bias[q] : Y.data()[b * z.NPW + q];
        }
        for (int64_t j = 0; j < z.J; ++j) squash_capsule(s + j * z.M, v + j * z.M, z.M, a.eps);
        std::copy(v, v + z.JM, last ? v_out + b * z.JM : Zv.data() + b * z.NPW);
      }
    });
    if (last) break;
    batch_agreement(z, a.u, a.w, Zv.data(), z.NPW, A.data());
    for (int64_t q = 0; q < IJ; ++q) logits.data()[q] += a.kappa * A.data()[q];
  }
}

// Which gradients the backward forms and which iterations it needs.
struct SharedPlan {
  bool detach_inner, need_du, need_dw, need_dp, need_db;
  bool uhat_grad() const { return need_du || need_dw; }
  // D (dL/d logits) is carried through every iteration: ds^t for every t is needed.
  bool carry() const { return (!detach_inner && uhat_grad()) || need_dp || need_db; }
};

// Gradient pass over blocks [blk_begin, blk_end) of kCapsBlock input capsules: du_hat_bi =
// sum_t c^t_i ds^t_b + kappa D^{t+1}_i v^t_b (only c^R ds^R with detach_inner), then
// du_bi = W_i du_hat_bi and dW_i = sum_b u_bi (x) du_hat_bi (b in order).
template <typename T>
CAPSNET_SHARED_KERNEL void gradient_blocks(const SharedRouting<T>& a, const SharedPlan& plan,
                                           const T* c, const T* DS, const T* VP, const T* Dk,
                                           T* du, T* dw, int64_t blk_begin, int64_t blk_end) {
  using V = typename Vec<T>::V;
  constexpr int64_t L = Vec<T>::L;
  const Layout& z = a.z;
  const int64_t NV = z.NPW / L, IJ = z.I * z.J;
  const int64_t t0 = plan.detach_inner ? z.R - 1 : 0;
  // Per capsule of the block: the coefficients of ds^t and v^t per column, W_i and dW_i with
  // their columns in the padded (j, m) layout.
  Buffer<T> cq(kCapsBlock * z.R * z.NPW), dq(kCapsBlock * z.R * z.NPW), duh(z.NPW);
  Buffer<T> wt(plan.need_du ? kCapsBlock * z.N * z.NPW : 0);
  Buffer<T> dwt(plan.need_dw ? kCapsBlock * z.N * z.NPW : 0);
  V* h = reinterpret_cast<V*>(duh.data());
  for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
    const int64_t i0 = blk * kCapsBlock, nb = std::min(kCapsBlock, z.I - i0);
    for (int64_t ib = 0; ib < nb; ++ib) {
      const int64_t i = i0 + ib;
      for (int64_t t = t0; t < z.R; ++t) {
        T* ct = cq.data() + (ib * z.R + t) * z.NPW;
        T* dt = dq.data() + (ib * z.R + t) * z.NPW;
        for (int64_t q = 0; q < z.NPW; ++q) {
          const int64_t j = q / z.M;
          ct[q] = q < z.JM ? c[t * IJ + i * z.J + j] : T(0);
          dt[q] = q < z.JM ? Dk[t * IJ + i * z.J + j] : T(0);
        }
      }
      for (int64_t n = 0; n < z.N; ++n) {
        for (int64_t q = 0; q < z.NPW && plan.need_du; ++q) {
          const int64_t j = q / z.M, m = q % z.M;
          wt.data()[(ib * z.N + n) * z.NPW + q] =
              q < z.JM ? a.w[((i * z.J + j) * z.N + n) * z.M + m] : T(0);
        }
      }
    }
    if (plan.need_dw) dwt.zero();
    for (int64_t b = 0; b < z.B; ++b) {
      for (int64_t ib = 0; ib < nb; ++ib) {
        const int64_t i = i0 + ib;
        for (int64_t q = 0; q < NV; ++q) h[q] = V{};
        for (int64_t t = t0; t < z.R; ++t) {
          const V* ct = reinterpret_cast<const V*>(cq.data() + (ib * z.R + t) * z.NPW);
          const V* ds = reinterpret_cast<const V*>(DS + (b * z.R + t) * z.NPW);
          for (int64_t q = 0; q < NV; ++q) h[q] += ct[q] * ds[q];
          // D^{R+1} = 0: the last iteration has no logit update.
          if (plan.detach_inner || t == z.R - 1) continue;
          const V* dt = reinterpret_cast<const V*>(dq.data() + (ib * z.R + t) * z.NPW);
          const V* vp = reinterpret_cast<const V*>(VP + (b * z.R + t) * z.NPW);
          for (int64_t q = 0; q < NV; ++q) h[q] += dt[q] * vp[q];
        }
        const T* ub = a.u + (b * z.I + i) * z.N;
        for (int64_t n = 0; n < z.N; ++n) {
          if (plan.need_du) {
            // Two accumulators (the panels' first and second vectors), then the lanes in order.
            const V* wr = reinterpret_cast<const V*>(wt.data() + (ib * z.N + n) * z.NPW);
            V acc0{}, acc1{};
            for (int64_t q = 0; q < NV; q += 2) {
              acc0 += wr[q] * h[q];
              acc1 += wr[q + 1] * h[q + 1];
            }
            const V sum = acc0 + acc1;
            T x = 0;
            for (int64_t k = 0; k < L; ++k) x += sum[k];
            du[(b * z.I + i) * z.N + n] = x;
          }
          if (plan.need_dw) {
            V* dr = reinterpret_cast<V*>(dwt.data() + (ib * z.N + n) * z.NPW);
            const T un = ub[n];
            for (int64_t q = 0; q < NV; ++q) dr[q] += un * h[q];
          }
        }
      }
    }
    if (!plan.need_dw) continue;
    for (int64_t ib = 0; ib < nb; ++ib) {
      const int64_t i = i0 + ib;
      for (int64_t j = 0; j < z.J; ++j) {
        for (int64_t n = 0; n < z.N; ++n) {
          const T* src = dwt.data() + (ib * z.N + n) * z.NPW + j * z.M;
          std::copy(src, src + z.M, dw + ((i * z.J + j) * z.N + n) * z.M);
        }
      }
    }
  }
}

// Gradients from the upstream g [B, J, M] and the saved s, v_iter, c; each output pointer is
// null when its gradient is not wanted.
template <typename T>
void shared_backward(const SharedRouting<T>& a, const SharedPlan& plan, const T* s_saved,
                     const T* v_saved, const T* c_saved, const T* g, T* du, T* dw, T* dprior,
                     T* dbias) {
  const Layout& z = a.z;
  const int64_t IJ = z.I * z.J;
  // ds^t and v^t per sample in the padded column layout ([B, R, NPW], padding 0).
  Buffer<T> DS(z.B * z.R * z.NPW), VP(z.B * z.R * z.NPW);
  Buffer<T> P(plan.carry() && z.R > 1 ? z.NP * z.PS : 0), Y(z.B * z.NPW);
  // D = dL/d(logits after iteration t) while going back; Dk[t] = kappa D^{t+1}.
  Buffer<T> D(IJ), F(IJ), E(IJ), dl(IJ), Dk(z.R * IJ);
  DS.zero();
  VP.zero();
  D.zero();
  Dk.zero();
  parallel_tasks(z.B, z.R * z.JM, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t t = 0; t < z.R; ++t) {
        const T* v = v_saved + (b * z.R + t) * z.JM;
        std::copy(v, v + z.JM, VP.data() + (b * z.R + t) * z.NPW);
      }
    }
  });
  const int64_t t_first = plan.carry() ? 0 : z.R - 1;
  for (int64_t t = z.R - 1; t >= t_first; --t) {
    const bool last = t == z.R - 1;
    if (!last) {
      // dv^t = kappa sum_i D_ij u_hat_bij = u x (kappa D (.) W).
      for (int64_t q = 0; q < IJ; ++q) F.data()[q] = a.kappa * D.data()[q];
      rows_gemm(z, a.u, F.data(), a.w, P.data(), Y.data());
    }
    parallel_tasks(z.B, 8 * z.JM, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const T* s = s_saved + (b * z.R + t) * z.JM;
        const T* dv = last ? g + b * z.JM : Y.data() + b * z.NPW;
        T* ds = DS.data() + (b * z.R + t) * z.NPW;
        for (int64_t j = 0; j < z.J; ++j) {
          squash_backward_capsule(s + j * z.M, dv + j * z.M, ds + j * z.M, z.M, a.eps);
        }
      }
    });
    for (int64_t q = 0; q < IJ; ++q) Dk.data()[t * IJ + q] = a.kappa * D.data()[q];
    // e^t (and from it dl^t, D^t) is needed for the earlier iterations' dv and for dprior.
    if (!plan.carry() || (t == 0 && !plan.need_dp)) continue;
    batch_agreement(z, a.u, a.w, DS.data() + t * z.NPW, z.R * z.NPW, E.data());
    coupling_softmax_backward(c_saved + t * IJ, E.data(), dl.data(), z.I, z.J, a.in_caps);
    for (int64_t q = 0; q < IJ; ++q) D.data()[q] += dl.data()[q];
  }
  if (plan.need_dp) std::copy(D.data(), D.data() + IJ, dprior);
  if (plan.need_db) {
    for (int64_t q = 0; q < z.JM; ++q) dbias[q] = T(0);
    for (int64_t b = 0; b < z.B; ++b) {
      for (int64_t t = 0; t < z.R; ++t) {
        const T* ds = DS.data() + (b * z.R + t) * z.NPW;
        for (int64_t q = 0; q < z.JM; ++q) dbias[q] += ds[q];
      }
    }
  }
  if (!plan.uhat_grad()) return;
  const int64_t blocks = (z.I + kCapsBlock - 1) / kCapsBlock;
  const int64_t block_work = kCapsBlock * z.B * z.NPW * (2 * z.R + 2 * z.N);
  parallel_tasks(blocks, block_work, [&](int64_t begin, int64_t end) {
    gradient_blocks<T>(a, plan, c_saved, DS.data(), VP.data(), Dk.data(), du, dw, begin, end);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shared_routing_fwd_cpu(
    const at::Tensor& u, const at::Tensor& weight, const std::optional<at::Tensor>& prior,
    const std::optional<at::Tensor>& bias, int64_t iterations, bool softmax_in_caps,
    bool /*detach_inner: backward only*/, bool leaky, double squash_eps, bool batch_mean) {
  const RoutingSizes sz = check_routing_args(u, weight, prior, bias, iterations, squash_eps);
  const at::ScalarType dtype = compute_dtype(u.scalar_type());
  const at::TensorOptions opts = u.options().dtype(dtype);
  const at::Tensor uc = u.to(dtype).contiguous(), wc = weight.to(dtype).contiguous();
  const at::Tensor pc = optional_input(prior, dtype), bc = optional_input(bias, dtype);
  at::Tensor v = new_output({sz.B, sz.J, sz.M}, opts);
  at::Tensor s = new_output({sz.B, sz.R, sz.J, sz.M}, opts);
  at::Tensor v_iter = new_output({sz.B, sz.R, sz.J, sz.M}, opts);
  at::Tensor c = new_output({sz.R, sz.I, sz.J}, opts);
  AT_DISPATCH_FLOATING_TYPES(dtype, "cpp_shared_routing_fwd", [&] {
    using T = scalar_t;
    const FlushDenormals ftz;
    const T kappa = batch_mean ? T(1) / static_cast<T>(std::max<int64_t>(sz.B, 1)) : T(1);
    const SharedRouting<T> a{uc.data_ptr<T>(),   wc.data_ptr<T>(), ptr_or_null<T>(pc),
                             ptr_or_null<T>(bc),  Layout::of<T>(sz), softmax_in_caps,
                             leaky,               static_cast<T>(squash_eps), kappa};
    const SharedStates<T> out{s.data_ptr<T>(), v_iter.data_ptr<T>(), c.data_ptr<T>()};
    shared_forward<T>(a, out, v.data_ptr<T>());
  });
  return {v.to(u.scalar_type()), s, v_iter, c};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shared_routing_bwd_cpu(
    const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& weight,
    const std::optional<at::Tensor>& prior, const std::optional<at::Tensor>& bias,
    const at::Tensor& s, const at::Tensor& v_iter, const at::Tensor& c, int64_t iterations,
    bool softmax_in_caps, bool detach_inner, bool leaky, double squash_eps, bool batch_mean,
    bool need_du, bool need_dweight, bool need_dprior, bool need_dbias) {
  const RoutingSizes sz = check_routing_args(u, weight, prior, bias, iterations, squash_eps);
  const at::ScalarType dtype = compute_dtype(u.scalar_type());
  TORCH_CHECK(grad_v.sizes() == at::IntArrayRef({sz.B, sz.J, sz.M}),
              "capsnet_fused: grad_v must be [B, J, M] = [", sz.B, ", ", sz.J, ", ", sz.M,
              "], got ", grad_v.sizes());
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
  const SharedPlan plan{detach_inner, need_du, need_dweight, need_dprior && prior.has_value(),
                        need_dbias && bias.has_value()};
  at::Tensor du = plan.need_du ? new_output({sz.B, sz.I, sz.N}, opts) : at::empty({0}, opts);
  at::Tensor dw =
      plan.need_dw ? new_output({sz.I, sz.J, sz.N, sz.M}, opts) : at::empty({0}, opts);
  at::Tensor dp = plan.need_dp ? new_output({sz.I, sz.J}, opts) : at::empty({0}, opts);
  at::Tensor db = plan.need_db ? new_output({sz.J, sz.M}, opts) : at::empty({0}, opts);
  if (plan.uhat_grad() || plan.need_dp || plan.need_db) {
    const at::Tensor gc = grad_v.to(dtype).contiguous();
    const at::Tensor uc = u.to(dtype).contiguous(), wc = weight.to(dtype).contiguous();
    const at::Tensor sc = s.contiguous(), vc = v_iter.contiguous(), cc = c.contiguous();
    AT_DISPATCH_FLOATING_TYPES(dtype, "cpp_shared_routing_bwd", [&] {
      using T = scalar_t;
      const FlushDenormals ftz;
      const T kappa = batch_mean ? T(1) / static_cast<T>(std::max<int64_t>(sz.B, 1)) : T(1);
      // The backward needs neither the prior (c^t is saved) nor the bias (in the saved s).
      const SharedRouting<T> a{uc.data_ptr<T>(),  wc.data_ptr<T>(), nullptr,
                               nullptr,           Layout::of<T>(sz), softmax_in_caps,
                               leaky,             static_cast<T>(squash_eps), kappa};
      shared_backward<T>(a, plan, sc.data_ptr<T>(), vc.data_ptr<T>(), cc.data_ptr<T>(),
                         gc.data_ptr<T>(), plan.need_du ? du.data_ptr<T>() : nullptr,
                         plan.need_dw ? dw.data_ptr<T>() : nullptr,
                         plan.need_dp ? dp.data_ptr<T>() : nullptr,
                         plan.need_db ? db.data_ptr<T>() : nullptr);
    });
  }
  return {du.to(u.scalar_type()), dw.to(weight.scalar_type()),
          dp.to(prior.has_value() ? prior->scalar_type() : u.scalar_type()),
          db.to(bias.has_value() ? bias->scalar_type() : u.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(capsnet_fused, CPU, m) {
  m.impl("cpp_shared_routing_fwd", &shared_routing_fwd_cpu);
  m.impl("cpp_shared_routing_bwd", &shared_routing_bwd_cpu);
}

}  // namespace capsnet_fused
