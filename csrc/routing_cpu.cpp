// CPU kernels of capsnet_fused::cpp_routing_fwd / cpp_routing_bwd (math: docs/ROUTING-MATH.md).
//
// Layout: the sweeps over input capsules work on vectors of L samples (L = 8 float32 / 4 float64
// lanes in a 32-byte vector, 16 / 8 in the 64-byte vectors of the AVX-512 clone), so that every
// per-(sample, i, j) quantity - logits, softmax, agreement - is a vertical vector operation: no
// horizontal sums, and the softmax's exp is a vector polynomial instead of L x J calls to libm.
//
// Forward: parallel over groups of kGroupVectors x L samples. Each sweep walks the input
// capsules once; W[i] (5 KB at the MNIST shape) is read once per group and sweep and reused
// from L1 for every vector of the group. u_hat_i [J, M] is either recomputed in every sweep
// into an L1 buffer, or - when a group's u_hat fits the L2 (use_uhat_cache) - computed in the
// first sweep into a per-thread copy that the later sweeps read. A group is at least one
// vector of L samples, so at the MNIST shape its u_hat is L x 737 KB (5.9 MB with 32-byte
// float32 vectors), more than any L2: there the kernel recomputes (see the README for what
// the cache gains or costs when forced). The weighted u_hat of kCapsBlock input capsules is
// added to s in one pass. The first sweep's couplings c^0 (the softmax of the prior alone) do
// not depend on the sample: it adds each block of u_hat to s with its coupling while the block
// is in registers, so u_hat is stored and read back only in the later sweeps (first_sweep).
// Only s^t, V^{t-1} and (softmax over in_caps) the log-sum-exp per (t, j) are saved:
// O(B R J M), never a B x I x J x M tensor.
//
// Options of the published implementations (docs/ROUTING-MATH.md): a bias [J, M] is added to s^t
// before every squash (the saved s includes it), leaky routing puts one more logit, fixed at 0,
// into the softmax over j (softmax) or over i (the online softmax starts from it), and the
// squash eps is an argument (0: the eps-free squash, NaN at s = 0 as in the reference).
//
// Backward, over the whole batch in sample vectors, in two phases; every output element is
// written by one thread in a fixed order, so the results are bitwise identical whatever the
// thread count:
//   1. parallel over groups of sample vectors: the sweeps t = R-1..1 that carry dL/dV
//      backwards (u_hat recomputed or cached as in the forward). They give ds^t = dL/ds^t for
//      every t (B R J M values, as the saved s and V).
//   2. parallel over input capsules: per sample vector, u_hat_i is predicted once more and,
//      from it, every iteration's couplings alpha^t = c^t (c^0, the same for every sample,
//      once per call) and logit gradients beta^t = dl^t,
//      so that no per-(t, i, sample) state passes between the phases (an earlier design kept
//      alpha and beta, 2 R I J values per sample: 35 MB of traffic at B = 128). Then
//      du_hat_bij = sum_t alpha^t ds^t_bj + beta^t V^{t-1}_bj, du [B, I, N] = W^T du_hat
//      (weights broadcast over the sample lanes), dW[i] = sum_b u_bi du_hat_bi (lanes summed
//      by transpose_sum) and dprior[i] = sum_b,t beta^t.
// dbias = sum over samples and t of ds^t, after the kernel, on one thread.
//
// Instruction sets: the kernels are compiled three times in this one translation unit, as
// "clones" with target attributes - x86-64-v4 (AVX-512, 64-byte sample vectors), x86-64-v3
// (AVX2 + FMA) and the build's default - and clone_for_call() picks the best one the CPU runs
// at run time, so that a wheel runs on any x86-64. CAPSNET_FUSED_CPU_ISA forces a lower clone
// and CAPSNET_FUSED_UHAT_CACHE the u_hat path; cpp_kernel_info() says what was chosen.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

#include "cpu_scratch.h"
#include "routing_common.h"

// The 32-byte vector helpers are always inlined, so the ABI of passing them by value (which
// GCC warns differs with and without AVX) never applies.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace capsnet_fused {
namespace {

// Sample vectors per forward / backward-phase-1 task: W[i] is reused from L1 for all of them,
// while the group's states (2 x kGroupVectors x J x M vectors) still fit L1 beside it. Small
// batches (fewer than 4 vectors) use groups of one vector, so that both cores get work.
constexpr int64_t kGroupVectors = 2;
inline int64_t group_vectors(int64_t vectors) { return vectors >= 4 ? kGroupVectors : 1; }
// Input capsules whose weighted u_hat is added to s (or, backward, to A) in one pass: one load
// and store of the running sum per kCapsBlock products (stores are the slow part on this CPU).
constexpr int64_t kCapsBlock = 4;

// Helpers are force-inlined into the kernels below, so that they are compiled for each
// instruction set the kernels are cloned for, with M a compile-time constant where the kernel
// is specialised for it.
#define CAPSNET_INLINE __attribute__((always_inline)) inline
#define CAPSNET_INLINE_LAMBDA __attribute__((always_inline))

// Wheels must run on any x86-64, so the kernels are not built with -march; instead each kernel
// is compiled as three clones (target attributes; the helpers above are inlined into each) and
// chosen at run time. Explicit clones rather than GCC's target_clones: the choice can then be
// forced (tests run every clone the CPU can run) and reported, and the AVX-512 clone can use
// 64-byte vectors, a type the other clones must not see.
// A build whose flags already go beyond baseline x86-64 (-march=native, setup.py's
// CAPSNET_FUSED_NATIVE=1, or -march=x86-64-v3 and up: __AVX__ defined) has the default clone
// only, compiled for those flags, as has one with CAPSNET_FUSED_NO_CLONES: there the helpers
// carry the build's instruction sets, which a clone for another -march cannot inline (GCC
// 12.2 stops with "target specific option mismatch" for always_inline helpers under
// -march=native on a Zen 5). With GCC's target_clones("arch=x86-64-v3", "default") instead,
// GCC 12.2 under -march=x86-64-v4 (reproduced on the Zen 3 machine; -march=native on the Zen 5)
// folds vexp's select with a zero arm, `x < lo ? 0 : y * scale`, into a masked multiply
// (.COND_MUL, an AVX-512 instruction) also in the x86-64-v3 clone, which cannot expand it:
// "internal compiler error in expand_direct_optab_fn". test_kernel_clones_only_in_baseline_builds
// checks this guard.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && \
    !defined(__AVX__) && !defined(CAPSNET_FUSED_NO_CLONES)
#define CAPSNET_X86_CLONES 1
#define CAPSNET_TARGET_X86_V4 __attribute__((target("arch=x86-64-v4")))
#define CAPSNET_TARGET_X86_V3 __attribute__((target("arch=x86-64-v3")))
#endif

// The widest instruction set the build's own flags enable (what the default clone uses).
#if defined(__AVX512F__)
constexpr const char* kBuildIsa = "avx512f";
#elif defined(__AVX2__)
constexpr const char* kBuildIsa = "avx2";
#elif defined(__AVX__)
constexpr const char* kBuildIsa = "avx";
#else
constexpr const char* kBuildIsa = "baseline";
#endif

// Widest sample vector of the default clone: 64 bytes only when the build's -march has AVX-512
// (a native build on such a CPU); the wheel's default clone is baseline x86-64.
#if defined(__AVX512F__)
constexpr int kDefaultWideBytes = 64;
#else
constexpr int kDefaultWideBytes = 32;
#endif
// Widest vector register of the default clone's instruction set (shuffles of wider vectors
// would be emulated: gather_samples then moves lanes one by one).
#if defined(__AVX512F__)
constexpr int kDefaultRegisterBytes = 64;
#elif defined(__AVX__)
constexpr int kDefaultRegisterBytes = 32;
#else
constexpr int kDefaultRegisterBytes = 16;
#endif

// A vector of L values (GCC vector extension) in Bytes bytes: with 32, one AVX register in the
// x86-64-v3 clone and a pair of SSE registers in the baseline one; with 64 (x86-64-v4 clone
// only), one AVX-512 register. Batches that fit one 16-byte vector (4 float32 / 2 float64
// samples) use 16-byte sample vectors: on Zen 1 (AMD EPYC family 23) a 256-bit FMA is two
// 128-bit ones, so half-empty 32-byte vectors would cost twice the time.
template <typename T, int Bytes = 32>
struct Lanes {
  typedef T V __attribute__((vector_size(Bytes)));
  static constexpr int64_t L = Bytes / sizeof(T);
};

// Every lane x (a broadcast; `V{} + x` would also add 0, which is not free: -0 + 0 = +0).
template <typename V, typename T>
CAPSNET_INLINE V splat(T x) {
  V r;
  for (size_t k = 0; k < sizeof(V) / sizeof(T); ++k) r[k] = x;
  return r;
}

// Lane-wise max that keeps a NaN in `b` (the running value) and ignores one in `a` only for
// the comparison: the NaN then reaches the result through exp(a - max) anyway.
template <typename V>
CAPSNET_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}

// exp for float32 lanes (Cephes expf: range reduction by ln 2 and a degree-6 polynomial,
// about 1 ulp). Inputs below -87 give 0 (the kernels only take exp of non-positive numbers,
// differences from a running maximum); NaN stays NaN. float64 lanes: libm per lane (float64 is
// the checking dtype, not the fast path).
template <typename T, typename V>
CAPSNET_INLINE V vexp(V x) {
  if constexpr (std::is_same_v<T, float>) {
    typedef int32_t IV __attribute__((vector_size(sizeof(V))));
    const V lo = splat<V>(-87.0f);
    const V xc = x < lo ? lo : x;
    // k = round(x / ln 2) with the 1.5 x 2^23 trick (exact for |k| < 2^22).
    const V k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    V r = xc - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    V p = splat<V>(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const V y = p * r * r + r + 1.0f;
    const IV bits = (__builtin_convertvector(k, IV) + 127) << 23;
    const V out = y * __builtin_bit_cast(V, bits);
    return x < lo ? V{} : out;
  } else {
    V y;
    for (size_t k = 0; k < sizeof(V) / sizeof(T); ++k) y[k] = std::exp(x[k]);
    return y;
  }
}

// v = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps) for one capsule, lane `k` of M vectors
// (v may be s), eps = squash_eps >= 0. Computed on t = s / a, a = max |s_m|, so that nothing
// overflows: with qt = |t|^2 in [1, M] and r = 1 / a^2, v = t / (1 + r / qt) / sqrt(qt + eps r).
// The naive |s|^2 overflows float32 once |s| > 1.8e19 (and v became 0 from |s| ~ 7e12 on). r is
// inf for tiny a and 0 for huge a; both give the right limit (v = 0, v = t / |t|).
template <typename T, typename V>
CAPSNET_INLINE void squash_lane(const V* s, V* v, int k, int64_t M, T eps) {
  // a = max_m |s_m|, NaN when some s_m is NaN (std::max would drop it, and a capsule of zeros
  // and a NaN would then squash to 0).
  T a = 0;
  for (int64_t m = 0; m < M; ++m) {
    const T x = std::abs(s[m][k]);
    a = (x > a || x != x) && a == a ? x : a;
  }
  if (a == 0) {
    // The limit for eps > 0; the eps-free squash is 0/0 here, NaN as in the reference.
    const T at_zero = eps == 0 ? std::numeric_limits<T>::quiet_NaN() : T(0);
    for (int64_t m = 0; m < M; ++m) v[m][k] = at_zero;
    return;
  }
  T qt = 0;
  for (int64_t m = 0; m < M; ++m) {
    const T t = s[m][k] / a;
    qt += t * t;
  }
  const T r = T(1) / (a * a);
  const T er = eps == 0 ? T(0) : eps * r;
  const T g = T(1) / (T(1) + r / qt) / std::sqrt(qt + er);
  for (int64_t m = 0; m < M; ++m) v[m][k] = g * (s[m][k] / a);
}

// ds = dL/ds from dv = dL/dv for v = f(|s|^2) s, on the scaled t = s / a of squash_lane:
// ds = (g / a) (dv + 2 h (t . dv) t) with h = 1/qt - 1/(r + qt) - 1/(2 (qt + eps r)), which is
// f dv + 2 f'(|s|^2) (s . dv) s (h = a^2 f' / f); 0 at s = 0 (NaN when eps = 0, as v). Lane k
// of one capsule; returns ds . (s - bias) (bias_j [M] or null), the sum over i of
// c_ij ds . u_hat_ij that the softmax over in_caps needs: s is the squash input, bias included.
template <typename T, typename V>
CAPSNET_INLINE T squash_backward_lane(const V* s, const V* dv, V* ds, int k, int64_t M, T eps,
                                      const T* bias_j) {
  T a = 0;  // max_m |s_m|, NaN when some s_m is NaN (as in squash_lane)
  for (int64_t m = 0; m < M; ++m) {
    const T x = std::abs(s[m][k]);
    a = (x > a || x != x) && a == a ? x : a;
  }
  if (a == 0) {
    const T at_zero = eps == 0 ? std::numeric_limits<T>::quiet_NaN() : T(0);
    for (int64_t m = 0; m < M; ++m) ds[m][k] = at_zero;
    return at_zero;
  }
  T qt = 0, tdv = 0;
  for (int64_t m = 0; m < M; ++m) {
    const T t = s[m][k] / a;
    qt += t * t;
    tdv += t * dv[m][k];
  }
  const T r = T(1) / (a * a);
  const T er = eps == 0 ? T(0) : eps * r;
  const T g = T(1) / (T(1) + r / qt) / std::sqrt(qt + er);
  const T h = T(1) / qt - T(1) / (r + qt) - T(0.5) / (qt + er);
  const T scale = g / a, c = T(2) * h * tdv;
  T dss = 0;
  for (int64_t m = 0; m < M; ++m) {
    const T sm = s[m][k];
    ds[m][k] = scale * (dv[m][k] + c * (sm / a));
    dss += ds[m][k] * (bias_j != nullptr ? sm - bias_j[m] : sm);
  }
  return dss;
}

// The operands of one sample vector in predict: u_i, where u_hat_i goes, and the arrays whose
// dot products with u_hat_i are wanted.
template <typename V>
struct PredictArgs {
  const V* ur;       // [N] u_i
  V* uh;             // [J, M] u_hat_i
  const V* with[2];  // [J, M] each (NDOT of them): V^{t-1} for the logits, ds^t
  V* dots;           // [NDOT, J]: dots[d * J + j] = u_hat_ij . with[d][j]
};

// dj[d] += sum_k acc[k] with[d][jm + k] for the K values acc of u_hat_i[j, m .. m + K), in two
// interleaved FMA chains (even and odd k) so that no long dependent chain forms: K FMAs and
// two adds where a tree of products took 2 K - 1 operations. Shared by predict and agree, so
// that the agreement of a cached u_hat is rounded as that of a recomputed one.
template <int K, int NDOT, typename V>
CAPSNET_INLINE void add_dots(const V (&acc)[K], const V* const (&with)[2], int64_t jm,
                             V (&dj)[2]) {
#pragma GCC unroll 2
  for (int d = 0; d < NDOT; ++d) {
    if constexpr (K == 1) {
      dj[d] += acc[0] * with[d][jm];
    } else {
      V even = acc[0] * with[d][jm], odd = acc[1] * with[d][jm + 1];
#pragma GCC unroll 4
      for (int k = 2; k < K; k += 2) {
        even += acc[k] * with[d][jm + k];
        odd += acc[k + 1] * with[d][jm + k + 1];
      }
      dj[d] += even + odd;
    }
  }
}

// acc[p][k] = sum_n u[p][n] w[n M + k], k < K, for P sample vectors: u_hat_i[j, m .. m + K)
// with w = W_i[j, :, m ..]. The K outputs are accumulated in registers (P K independent FMA
// chains; each u[p][n] vector is loaded once per block and each weight broadcast once for the
// P vectors). P = 2 only with 64-byte vectors, whose 32 registers hold 2 x 8 accumulators
// (with 32-byte vectors, 16 registers, 4 x 2 accumulators ran 30% slower on the 2-core Zen 1
// this was first tuned on).
template <int P, int K, typename T, typename V>
CAPSNET_INLINE void product_block(const T* __restrict w, const V* const (&u)[P], int64_t N,
                                  int64_t M, V (&acc)[P][K]) {
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p) {
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) acc[p][k] = V{};
  }
  for (int64_t n = 0; n < N; ++n) {
    const T* wn = w + n * M;
    if constexpr (P == 1) {
      const V un = u[0][n];
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) acc[0][k] += wn[k] * un;
    } else {
      V un[P];
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) un[p] = u[p][n];
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) {
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p) acc[p][k] += wn[k] * un[p];
      }
    }
  }
}

// product_block for the P sample vectors args[p], the block stored to args[p].uh and, while it
// is in registers, its dot products with the `with` arrays added to dj[p][d].
template <int P, int K, int NDOT, typename T, typename V>
CAPSNET_INLINE void predict_block(const T* __restrict w, const PredictArgs<V>* args, int64_t jm,
                                  int64_t N, int64_t M, V (&dj)[P][2]) {
  const V* u[P];
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p) u[p] = args[p].ur;
  V acc[P][K];
  product_block<P, K>(w, u, N, M, acc);
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p) {
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) args[p].uh[jm + k] = acc[p][k];
    add_dots<K, NDOT>(acc[p], args[p].with, jm, dj[p]);
  }
}

// u_hat_i [J, M] and its NDOT dot products per j for P sample vectors; w_i = W[i] [J, N, M].
template <int NDOT, int P, typename T, typename V>
CAPSNET_INLINE void predict_vectors(const T* __restrict w_i, const PredictArgs<V>* args,
                                    int64_t J, int64_t N, int64_t M) {
  for (int64_t j = 0; j < J; ++j) {
    const T* w = w_i + j * N * M;
    V dj[P][2] = {};
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) predict_block<P, 8, NDOT>(w + m, args, j * M + m, N, M, dj);
    for (; m + 4 <= M; m += 4) predict_block<P, 4, NDOT>(w + m, args, j * M + m, N, M, dj);
    for (; m < M; ++m) predict_block<P, 1, NDOT>(w + m, args, j * M + m, N, M, dj);
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p) {
      for (int d = 0; d < NDOT; ++d) args[p].dots[d * J + j] = dj[p][d];
    }
  }
}

// predict_vectors for `count` sample vectors: in pairs with 64-byte vectors, else one by one.
template <int NDOT, typename T, typename V>
CAPSNET_INLINE void predict(const T* __restrict w_i, const PredictArgs<V>* args, int64_t count,
                            int64_t J, int64_t N, int64_t M) {
  int64_t p = 0;
  if constexpr (sizeof(V) == 64) {
    for (; p + 2 <= count; p += 2) predict_vectors<NDOT, 2>(w_i, args + p, J, N, M);
  }
  for (; p < count; ++p) predict_vectors<NDOT, 1>(w_i, args + p, J, N, M);
}

// The dot products of predict for a u_hat_i [J, M] already in memory (args.uh, the cache),
// in the same blocks and order as predict's.
template <int K, int NDOT, typename V>
CAPSNET_INLINE void agree_block(const PredictArgs<V>& args, int64_t jm, V (&dj)[2]) {
  V acc[K];
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) acc[k] = args.uh[jm + k];
  add_dots<K, NDOT>(acc, args.with, jm, dj);
}

template <int NDOT, typename V>
CAPSNET_INLINE void agree(const PredictArgs<V>& args, int64_t J, int64_t M) {
  for (int64_t j = 0; j < J; ++j) {
    V dj[2] = {};
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) agree_block<8, NDOT>(args, j * M + m, dj);
    for (; m + 4 <= M; m += 4) agree_block<4, NDOT>(args, j * M + m, dj);
    for (; m < M; ++m) agree_block<1, NDOT>(args, j * M + m, dj);
    for (int d = 0; d < NDOT; ++d) args.dots[d * J + j] = dj[d];
  }
}

// u_hat_i and its dot products for `count` sample vectors: computed from W (into args[p].uh)
// in the sweep that fills the cache or when nothing is cached, read from args[p].uh in the
// later sweeps of the cached path.
template <int NDOT, typename T, typename V>
CAPSNET_INLINE void predict_or_agree(bool from_cache, const T* __restrict w_i,
                                     const PredictArgs<V>* args, int64_t count, int64_t J,
                                     int64_t N, int64_t M) {
  if (from_cache) {
    for (int64_t p = 0; p < count; ++p) agree<NDOT>(args[p], J, M);
  } else {
    predict<NDOT>(w_i, args, count, J, N, M);
  }
}

// Routing logits of one input capsule: l[j] = prior_ij (+ agreement[j] after the first
// iteration: u_hat_ij . V^{t-1}_j; V^0 = 0, so the first iteration's logits are the prior).
template <typename T, typename V>
CAPSNET_INLINE void logits(const T* prior_i, const V* agreement, V* l, int64_t J) {
  for (int64_t j = 0; j < J; ++j) {
    const V p = prior_i != nullptr ? splat<V>(prior_i[j]) : V{};
    l[j] = agreement != nullptr ? p + agreement[j] : p;
  }
}

// In place: l -> softmax(l) over its J entries, max-subtracted so large logits stay finite.
// leaky: one more logit, fixed at 0, joins the max and the sum; its share is dropped.
template <typename T, typename V>
CAPSNET_INLINE void softmax(V* l, int64_t J, bool leaky) {
  V mx = leaky ? V{} : l[0];
  for (int64_t j = leaky ? 0 : 1; j < J; ++j) mx = vmax(l[j], mx);
  V sum = leaky ? vexp<T>(-mx) : V{};
  for (int64_t j = 0; j < J; ++j) {
    l[j] = vexp<T>(l[j] - mx);
    sum += l[j];
  }
  const V inv = splat<V>(T(1)) / sum;
  for (int64_t j = 0; j < J; ++j) l[j] *= inv;
}

// acc[j, m] = acc[j, m] (x scale[j] when given) + sum_{ib < nb} p[ib, j] uh[ib, j, m] for a block
// of nb input capsules (NB = nb when known at compile time, else 0).
template <int NB, typename V>
CAPSNET_INLINE void accumulate_block(V* __restrict acc, const V* scale, const V* __restrict uh,
                                     const V* __restrict p, int64_t nb, int64_t J, int64_t M) {
  const int64_t JM = J * M;
  const int64_t n = NB > 0 ? NB : nb;
  for (int64_t j = 0; j < J; ++j) {
    V pj[kCapsBlock] = {};
    for (int64_t ib = 0; ib < n; ++ib) pj[ib] = p[ib * J + j];
    const V sc = scale != nullptr ? scale[j] : V{};
    for (int64_t m = 0; m < M; ++m) {
      V x = acc[j * M + m];
      if (scale != nullptr) x *= sc;
#pragma GCC unroll 4
      for (int64_t ib = 0; ib < n; ++ib) x += pj[ib] * uh[ib * JM + j * M + m];
      acc[j * M + m] = x;
    }
  }
}

template <typename V>
CAPSNET_INLINE void accumulate_block(V* acc, const V* scale, const V* uh, const V* p, int64_t nb,
                                     int64_t J, int64_t M) {
  if (nb == kCapsBlock) {
    accumulate_block<kCapsBlock>(acc, scale, uh, p, nb, J, M);
  } else {
    accumulate_block<0>(acc, scale, uh, p, nb, J, M);
  }
}

// Pointers and sizes of one call; kernels assume contiguous tensors in the compute dtype.
template <typename T>
struct Routing {
  const T* u;      // [B, I, N]
  const T* w;      // [I, J, N, M]
  const T* prior;  // [I, J] or null
  const T* bias;   // [J, M] or null, added to s^t before every squash
  T* s;            // [B, R, J, M] s^t (+ bias: the squash input)
  T* V;            // [B, R, J, M] V^{t-1}
  T* lse;          // [B, R, J] for in_caps
  RoutingSizes sz;
  bool in_caps;
  bool leaky;  // one extra logit fixed at 0 on the softmax axis
  T eps;       // squash_eps
};

// The index vector of __builtin_shuffle for vectors V of T: integers of T's size, as many.
template <typename T, typename V>
struct ShuffleIndex {
  using Index = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef Index IV __attribute__((vector_size(sizeof(V))));
};

// The shuffle indices of one round of transpose_block: lane k of the first result takes
// lane k of a where bit h of k is 0, else lane k - h of b (index L + k - h); the second takes
// lane k + h of a where bit h is 0, else lane k of b.
template <typename IV, int L, int h, bool second, size_t... k>
CAPSNET_INLINE IV swap_mask(std::index_sequence<k...>) {
  return IV{((static_cast<int>(k) & h) == 0 ? static_cast<int>(k) + (second ? h : 0)
                                             : L + static_cast<int>(k) - (second ? 0 : h))...};
}

// x[q][k] <-> x[k][q] for the L x L block held in L vectors x: log2(L) rounds, the round for
// h swapping the off-diagonal h x h blocks of every 2h x 2h block (L two-source shuffles).
template <typename T, typename V, int h>
CAPSNET_INLINE void transpose_block(V* x) {
  if constexpr (h >= 1) {
    constexpr int L = static_cast<int>(sizeof(V) / sizeof(T));
    using IV = typename ShuffleIndex<T, V>::IV;
    const IV first = swap_mask<IV, L, h, false>(std::make_index_sequence<L>{});
    const IV second = swap_mask<IV, L, h, true>(std::make_index_sequence<L>{});
#pragma GCC unroll 16
    for (int q = 0; q < L; ++q) {
      if ((q & h) != 0) continue;
      const V lo = x[q], hi = x[q + h];
      x[q] = __builtin_shuffle(lo, hi, first);
      x[q + h] = __builtin_shuffle(lo, hi, second);
    }
    transpose_block<T, V, h / 2>(x);
  }
}

// ut[(i * nv + v) * N + n][k] = u[b0 + v L + k, i, n] for the nv vectors of samples from b0
// and the input capsules [i_begin, i_end) (lanes past the batch are zero: their u_hat is 0 and
// every state stays finite). Shuffle: transpose L x L blocks of (sample, i N + n) in registers
// (when the clone has registers of sizeof(V) bytes); else, and for the rows' tail, lane by lane.
template <bool Shuffle, typename T, typename V>
CAPSNET_INLINE void gather_samples(const Routing<T>& a, int64_t b0, int64_t nv, V* ut,
                                   int64_t i_begin, int64_t i_end) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  const int64_t I = a.sz.I, N = a.sz.N;
  const int64_t nb = std::min(nv * L, a.sz.B - b0);
  if (nb < nv * L) std::fill(ut + i_begin * nv * N, ut + i_end * nv * N, V{});
  // Element q = i N + n of a sample's row goes to ut[(i nv + v) N + n].
  auto dst = [&](int64_t v, int64_t q) { return ut + ((q / N) * nv + v) * N + q % N; };
  const int64_t q_end = i_end * N;
  for (int64_t v = 0; v < nv; ++v) {
    const int64_t lanes = std::min(L, nb - v * L);
    const T* rows = a.u + (b0 + v * L) * I * N;
    int64_t q = i_begin * N;
    if constexpr (Shuffle) {
      for (; q + L <= q_end; q += L) {
        V x[L];
        for (int64_t k = 0; k < L; ++k) {
          if (k < lanes) {
            __builtin_memcpy(&x[k], rows + k * I * N + q, sizeof(V));
          } else {
            x[k] = V{};
          }
        }
        transpose_block<T, V, static_cast<int>(L / 2)>(x);
        for (int64_t e = 0; e < L; ++e) *dst(v, q + e) = x[e];
      }
    }
    for (; q < q_end; ++q) {
      V* out = dst(v, q);
      for (int64_t k = 0; k < lanes; ++k) (*out)[k] = rows[k * I * N + q];
    }
  }
}

// The first iteration's couplings c^0 [I, J] (c0), the same for every sample: the softmax of
// the prior alone over j, or (in_caps) over i with lse0 [J] its log-sum-exp. Computed with the
// vector softmax and exp of the later iterations' couplings; the forward's first sweep and the
// backward's phase 2 both take c^0 from here. Not called when every c^0 is the same (out_caps
// without a prior: 1 / J, or 1 / (J + 1) leaky).
template <typename T, typename V>
CAPSNET_INLINE void first_couplings(const Routing<T>& a, T* c0, T* lse0) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  const int64_t I = a.sz.I, J = a.sz.J;
  auto logit = [&](int64_t i, int64_t j) { return a.prior != nullptr ? a.prior[i * J + j] : T(0); };
  Buffer<V> l(J);
  if (a.in_caps) {
    // lse0_j = log(sum_i exp(prior_ij)) (+ exp(0), leaky), L input capsules per vector.
    for (int64_t j = 0; j < J; ++j) {
      T mx = a.leaky ? T(0) : -std::numeric_limits<T>::infinity();
      for (int64_t i = 0; i < I; ++i) mx = std::max(mx, logit(i, j));
      V sum{};
      for (int64_t i0 = 0; i0 < I; i0 += L) {
        V x;
        for (int64_t k = 0; k < L; ++k) {
          x[k] = i0 + k < I ? logit(i0 + k, j) - mx : -std::numeric_limits<T>::infinity();
        }
        sum += vexp<T>(x);
      }
      T total = a.leaky ? std::exp(-mx) : T(0);
      for (int64_t k = 0; k < L; ++k) total += sum[k];
      lse0[j] = mx + std::log(total);
    }
  }
  for (int64_t i0 = 0; i0 < I; i0 += L) {
    const int64_t lanes = std::min(L, I - i0);
    for (int64_t j = 0; j < J; ++j) {
      for (int64_t k = 0; k < L; ++k) l[j][k] = k < lanes ? logit(i0 + k, j) : T(0);
    }
    if (a.in_caps) {
      for (int64_t j = 0; j < J; ++j) l[j] = vexp<T>(l[j] - lse0[j]);
    } else {
      softmax<T>(l.data(), J, a.leaky);
    }
    for (int64_t k = 0; k < lanes; ++k) {
      for (int64_t j = 0; j < J; ++j) c0[(i0 + k) * J + j] = l[j][k];
    }
  }
}

// c^0 of every input capsule: first_couplings' values, or one value for all of them (out_caps
// without a prior: 1 / J, or 1 / (J + 1) leaky), where first_couplings is not called.
template <typename T>
struct FirstCouplings {
  Buffer<T> c0, lse0;  // [I, J] when varies; [J] (in_caps: lse0 of first_couplings)
  bool varies = false;
  T uniform = 0;
  T at(int64_t i, int64_t j, int64_t J) const { return varies ? c0[i * J + j] : uniform; }
};

template <typename T, typename V>
CAPSNET_INLINE void compute_first_couplings(const Routing<T>& a, FirstCouplings<T>& f) {
  const int64_t I = a.sz.I, J = a.sz.J;
  f.varies = a.in_caps || a.prior != nullptr;
  f.uniform = T(1) / static_cast<T>(J + (a.leaky ? 1 : 0));
  f.lse0.resize(J);
  if (f.varies) {
    f.c0.resize(I * J);
    first_couplings<T, V>(a, f.c0.data(), f.lse0.data());
  }
}

// The first sweep of a group of nv sample vectors: S [nv, J, M] = s^0 without the bias,
// sum_i c^0_ij u_hat_ij. c^0 does not depend on the sample, so it is known before u_hat: each
// block of u_hat_ij is added to S with its coupling while in registers, instead of being
// stored and read back as in the later sweeps (softmax over j: the sums and their order are
// those of accumulate_block; over i, c^0 comes normalised instead of from the online softmax).
template <typename T, typename V>
CAPSNET_INLINE void first_sweep(const Routing<T>& a, const FirstCouplings<T>& c0, const V* ut,
                                int64_t nv, V* S) {
  const int64_t I = a.sz.I, J = a.sz.J, N = a.sz.N, M = a.sz.M, JM = J * M;
  for (int64_t i = 0; i < I; ++i) {
    const T* w_i = a.w + i * J * N * M;
    int64_t v = 0;
    auto vectors = [&](auto pair) CAPSNET_INLINE_LAMBDA {
      constexpr int P = decltype(pair)::value;
      const V* u[P];
      for (int p = 0; p < P; ++p) u[p] = ut + (i * nv + v + p) * N;
      for (int64_t j = 0; j < J; ++j) {
        // A scalar: c * acc compiles to FMAs with the coupling broadcast from memory, where a
        // splat of it here became one masked broadcast per lane (GCC 12, x86-64-v4 clone).
        const T c = c0.at(i, j, J);
        auto block = [&](int64_t m, auto width) CAPSNET_INLINE_LAMBDA {
          constexpr int K = decltype(width)::value;
          V acc[P][K];
          product_block<P, K>(w_i + j * N * M + m, u, N, M, acc);
          V* s = S + v * JM + j * M + m;
#pragma GCC unroll 2
          for (int p = 0; p < P; ++p) {
#pragma GCC unroll 8
            for (int k = 0; k < K; ++k) s[p * JM + k] += c * acc[p][k];
          }
        };
        int64_t m = 0;
        for (; m + 8 <= M; m += 8) block(m, std::integral_constant<int, 8>());
        for (; m + 4 <= M; m += 4) block(m, std::integral_constant<int, 4>());
        for (; m < M; ++m) block(m, std::integral_constant<int, 1>());
      }
    };
    // Vectors in pairs with 64-byte vectors (each weight broadcast once for two), as predict.
    if constexpr (sizeof(V) == 64) {
      for (; v + 2 <= nv; v += 2) vectors(std::integral_constant<int, 2>());
    }
    for (; v < nv; ++v) vectors(std::integral_constant<int, 1>());
  }
}

// Forward for groups [grp_begin, grp_end) of KV sample vectors (the last one may be shorter).
// cached: u_hat of the group is kept for the later sweeps (KV I J M vectors, allocated here).
// Shuffle: see gather_samples.
template <bool Shuffle, typename T, int SB>
CAPSNET_INLINE void forward_groups(const Routing<T>& a, T* v_out, int64_t KV, bool cached,
                                   int64_t grp_begin, int64_t grp_end) {
  using V = typename Lanes<T, SB>::V;
  constexpr int64_t L = Lanes<T, SB>::L;
  const int64_t B = a.sz.B, I = a.sz.I, J = a.sz.J, N = a.sz.N, M = a.sz.M, R = a.sz.R;
  const int64_t JM = J * M, JNM = J * N * M;
  Buffer<V> ut(I * KV * N), uh(cached ? KV * I * JM : KV * kCapsBlock * JM),
      l(KV * kCapsBlock * J), dots(KV * J), scale(J), Vs(KV * JM), S(KV * JM), mx(KV * J),
      norm(KV * J);
  FirstCouplings<T> c0;
  compute_first_couplings<T, V>(a, c0);
  // u_hat of input capsule i0 + ib for vector v: [KV, I, J, M] when cached, else the block's
  // [KV, kCapsBlock, J, M]; either way the block's capsules are JM vectors apart.
  auto uh_at = [&](int64_t v, int64_t i0, int64_t ib) CAPSNET_INLINE_LAMBDA {
    return &uh[cached ? (v * I + i0 + ib) * JM : (v * kCapsBlock + ib) * JM];
  };
  for (int64_t grp = grp_begin; grp < grp_end; ++grp) {
    const int64_t b0 = grp * KV * L;
    const int64_t nv = std::min(KV, (B - b0 + L - 1) / L);
    gather_samples<Shuffle>(a, b0, nv, ut.data(), 0, I);
    std::fill(Vs.begin(), Vs.end(), V{});
    for (int64_t t = 0; t < R; ++t) {
      std::fill(S.begin(), S.end(), V{});
      if (t == 0) {
        first_sweep(a, c0, ut.data(), nv, S.data());
        // in_caps: s^0 is normalised already; its log-sum-exp over i is lse0.
        for (int64_t q = 0; q < KV * J; ++q) {
          mx[q] = splat<V>(a.in_caps ? c0.lse0[q % J] : T(0));
          norm[q] = splat<V>(T(1));
        }
      } else {
        // The online softmax over i starts empty, or (leaky) with the extra logit 0 already in:
        // max 0 and sum exp(0 - 0) = 1.
        std::fill(mx.begin(), mx.end(),
                  a.leaky ? V{} : splat<V>(-std::numeric_limits<T>::infinity()));
        std::fill(norm.begin(), norm.end(), a.leaky ? splat<V>(T(1)) : V{});
        for (int64_t i0 = 0; i0 < I; i0 += kCapsBlock) {
          const int64_t nb = std::min(kCapsBlock, I - i0);
          // u_hat and logits of the block's input capsules, for every vector of the group.
          for (int64_t ib = 0; ib < nb; ++ib) {
            const int64_t i = i0 + ib;
            PredictArgs<V> args[kGroupVectors];
            for (int64_t v = 0; v < nv; ++v) {
              args[v] = {&ut[(i * nv + v) * N], uh_at(v, i0, ib), {&Vs[v * JM], nullptr},
                         &dots[v * J]};
            }
            // The cache is filled in the second sweep (the first forms no u_hat).
            predict_or_agree<1>(cached && t > 1, a.w + i * JNM, args, nv, J, N, M);
            for (int64_t v = 0; v < nv; ++v) {
              V* l_i = &l[(v * kCapsBlock + ib) * J];
              logits<T, V>(a.prior ? a.prior + i * J : nullptr, &dots[v * J], l_i, J);
              if (!a.in_caps) softmax<T>(l_i, J, a.leaky);
            }
          }
          for (int64_t v = 0; v < nv; ++v) {
            const V* uh_v = uh_at(v, i0, 0);
            V* l_v = &l[v * kCapsBlock * J];
            V* Sv = &S[v * JM];
            if (!a.in_caps) {
              accumulate_block<V>(Sv, nullptr, uh_v, l_v, nb, J, M);
            } else {
              // Softmax over i in the same sweep (online, as in flash attention): s_j and the
              // denominator are rescaled by exp(old max - new max) as the maximum grows.
              for (int64_t j = 0; j < J; ++j) {
                V& mxj = mx[v * J + j];
                V top = mxj;
                for (int64_t ib = 0; ib < nb; ++ib) top = vmax(l_v[ib * J + j], top);
                scale[j] = vexp<T>(mxj - top);
                V sum = norm[v * J + j] * scale[j];
                for (int64_t ib = 0; ib < nb; ++ib) {
                  l_v[ib * J + j] = vexp<T>(l_v[ib * J + j] - top);
                  sum += l_v[ib * J + j];
                }
                norm[v * J + j] = sum;
                mxj = top;
              }
              accumulate_block<V>(Sv, scale.data(), uh_v, l_v, nb, J, M);
            }
          }
        }
      }
      // Per sample: normalise (in_caps), add the bias, save s^t and V^{t-1}, squash,
      // V^t = V^{t-1} + v^t.
      for (int64_t g = 0; g < KV * L && b0 + g < B; ++g) {
        const int64_t v = g / L, b = b0 + g;
        const int k = static_cast<int>(g % L);
        const int64_t bt = b * R + t;
        V* Sv = &S[v * JM];
        V* Vv = &Vs[v * JM];
        if (a.in_caps) {
          for (int64_t j = 0; j < J; ++j) {
            const T nj = norm[v * J + j][k];
            for (int64_t m = 0; m < M; ++m) Sv[j * M + m][k] /= nj;
            a.lse[bt * J + j] = mx[v * J + j][k] + std::log(nj);
          }
        }
        if (a.bias != nullptr) {
          for (int64_t q = 0; q < JM; ++q) Sv[q][k] += a.bias[q];
        }
        for (int64_t q = 0; q < JM; ++q) {
          a.V[bt * JM + q] = Vv[q][k];
          a.s[bt * JM + q] = Sv[q][k];
        }
        // v^t overwrites s^t (saved above); the last v^t is the output.
        for (int64_t j = 0; j < J; ++j) squash_lane<T>(Sv + j * M, Sv + j * M, k, M, a.eps);
        for (int64_t q = 0; q < JM; ++q) Vv[q][k] += Sv[q][k];
        if (t == R - 1) {
          for (int64_t q = 0; q < JM; ++q) v_out[b * JM + q] = Sv[q][k];
        }
      }
    }
  }
}

// Which backward sweeps run and what they produce.
struct BackwardPlan {
  bool detach_inner, need_uhat_grad, need_dp, need_db;
  // D = dL/dV is carried backwards (ds^t for t < R-1 is needed: by du_hat without
  // detach_inner, by dprior through beta^t, by dbias = sum_t ds^t).
  bool carry() const { return !detach_inner || need_dp || need_db; }
  // Phase 1 runs sweep t (t = R-1 .. 1) to carry D from ds^t to ds^{t-1}.
  bool carries(int64_t t) const { return t >= 1 && carry(); }
  // alpha^t = c^t enters du_hat: every t, or with detach_inner only the last.
  bool alpha_used(int64_t t, int64_t R) const {
    return need_uhat_grad && (!detach_inner || t == R - 1);
  }
  // beta^t V^{t-1} enters du_hat (not with detach_inner; V^{-1} = 0 at t = 0).
  bool beta_in_uhat(int64_t t, int64_t R) const {
    return alpha_used(t, R) && !detach_inner && t > 0;
  }
  // beta^t = dL/dl^t is needed in phase 2: by du_hat or by dprior (every t).
  bool beta_used(int64_t t, int64_t R) const { return need_dp || beta_in_uhat(t, R); }
};

// The backward's state of the whole batch, in sample vectors of SB bytes (index v < VB).
template <typename T, int SB>
struct BackwardState {
  using V = typename Lanes<T, SB>::V;
  int64_t VB;
  Buffer<V> ut;     // [I, VB, N] u
  Buffer<V> S, Vp;  // [R, VB, J, M] s^t and V^{t-1}
  Buffer<V> lse;    // [R, VB, J] (in_caps)
  Buffer<V> DS;     // [R, VB, J, M] ds^t
  Buffer<V> dss;    // [R, VB, J] ds^t . (s^t - bias)
  int64_t state(int64_t t, int64_t v, int64_t JM) const { return (t * VB + v) * JM; }
  int64_t scalars(int64_t t, int64_t v, int64_t J) const { return (t * VB + v) * J; }
};

// Routing coefficients of one input capsule and sample vector for iteration t, from its
// logits l [J] (in place): c^t = softmax over j, or (in_caps) exp(l - lse^t) with the
// log-sum-exp over i that the forward saved.
template <typename T, int SB>
CAPSNET_INLINE void couplings(const Routing<T>& a, const BackwardState<T, SB>& st, int64_t t,
                              int64_t v, typename Lanes<T, SB>::V* l) {
  const int64_t J = a.sz.J;
  if (a.in_caps) {
    const auto* lse = &st.lse[st.scalars(t, v, J)];
    for (int64_t j = 0; j < J; ++j) l[j] = vexp<T>(l[j] - lse[j]);
  } else {
    softmax<T>(l, J, a.leaky);
  }
}

// e_j = ds^t_j . u_hat_ij = dL/dc^t_ij in, beta^t_j = dL/dl^t_ij out (in place), from the
// softmax's Jacobian: c_j (e_j - sum_j' c_j' e_j') over j; over i, sum_i c_ij e_ij is
// ds^t_j . (s^t_j - bias_j) = dss^t_j.
template <typename T, int SB>
CAPSNET_INLINE void logit_gradients(const Routing<T>& a, const BackwardState<T, SB>& st,
                                    int64_t t, int64_t v, const typename Lanes<T, SB>::V* c,
                                    typename Lanes<T, SB>::V* e) {
  using V = typename Lanes<T, SB>::V;
  const int64_t J = a.sz.J;
  if (a.in_caps) {
    const V* dss = &st.dss[st.scalars(t, v, J)];
    for (int64_t j = 0; j < J; ++j) e[j] = c[j] * (e[j] - dss[j]);
  } else {
    V ce{};
    for (int64_t j = 0; j < J; ++j) ce += c[j] * e[j];
    for (int64_t j = 0; j < J; ++j) e[j] = c[j] * (e[j] - ce);
  }
}

// Backward phase 1 for one group of sample vectors [v_begin, v_end) (at most kGroupVectors):
// ds^t for every t, by the sweeps t = R-1 .. 1 that carry D = dL/dV^{t-1} backwards. cached:
// the first sweep keeps u_hat of the vectors for the later ones ((v_end - v_begin) I J M
// vectors, allocated here).
template <typename T, int SB>
CAPSNET_INLINE void backward_sweeps(const Routing<T>& a, BackwardState<T, SB>& st,
                                    const T* g_out, const BackwardPlan& plan, bool cached,
                                    int64_t v_begin, int64_t v_end) {
  using V = typename Lanes<T, SB>::V;
  constexpr int64_t L = Lanes<T, SB>::L;
  const int64_t B = a.sz.B, I = a.sz.I, J = a.sz.J, N = a.sz.N, M = a.sz.M, R = a.sz.R;
  const int64_t JM = J * M, JNM = J * N * M, VB = st.VB;
  const int64_t nv = v_end - v_begin;
  Buffer<V> uh(cached ? nv * I * JM : nv * kCapsBlock * JM), eb(nv * kCapsBlock * J),
      dots(nv * 2 * J), D(nv * JM), A(nv * JM), g(JM), ut(I * nv * N);
  // The group's rows of st.ut ([I, VB, N]), contiguous: [I, nv, N]. Read in place, runs of nv N
  // vectors VB N apart (1 KB every 4 KB at the MNIST shape), the first loads of each input
  // capsule's prediction stalled (perf); the forward's own gather is contiguous already.
  for (int64_t i = 0; i < I; ++i) {
    std::copy(&st.ut[(i * VB + v_begin) * N], &st.ut[(i * VB + v_end) * N], &ut[i * nv * N]);
  }
  // u_hat of input capsule i0 + ib for vector v - v_begin, laid out as in forward_groups.
  auto uh_at = [&](int64_t v, int64_t i0, int64_t ib) CAPSNET_INLINE_LAMBDA {
    return &uh[cached ? (v * I + i0 + ib) * JM : (v * kCapsBlock + ib) * JM];
  };
  // The lanes of samples only: padded lanes keep ds^t = 0 (their s is 0, which the eps-free
  // squash would turn into NaN).
  auto squash_backward_vector = [&](int64_t t, int64_t v, const V* dv) CAPSNET_INLINE_LAMBDA {
    const int lanes = static_cast<int>(std::min<int64_t>(L, B - v * L));
    for (int k = 0; k < lanes; ++k) {
      for (int64_t j = 0; j < J; ++j) {
        st.dss[st.scalars(t, v, J) + j][k] = squash_backward_lane<T>(
            &st.S[st.state(t, v, JM) + j * M], dv + j * M, &st.DS[st.state(t, v, JM) + j * M],
            k, M, a.eps, a.bias != nullptr ? a.bias + j * M : nullptr);
      }
    }
  };
  for (int64_t v = v_begin; v < v_end; ++v) {
    g.assign(JM, V{});
    for (int64_t k = 0; k < L && v * L + k < B; ++k) {
      for (int64_t q = 0; q < JM; ++q) g[q][k] = g_out[(v * L + k) * JM + q];
    }
    squash_backward_vector(R - 1, v, g.data());
  }
  std::fill(D.begin(), D.end(), V{});
  for (int64_t t = R - 1; plan.carries(t); --t) {
    // The first sweep fills the cache, the later ones read it.
    const bool from_cache = cached && t < R - 1;
    std::fill(A.begin(), A.end(), V{});
    for (int64_t i0 = 0; i0 < I; i0 += kCapsBlock) {
      const int64_t nb = std::min(kCapsBlock, I - i0);
      for (int64_t ib = 0; ib < nb; ++ib) {
        const int64_t i = i0 + ib;
        // dots [0, J) = u_hat . V^{t-1} (agreement), [J, 2J) = u_hat . ds^t = e.
        PredictArgs<V> args[kGroupVectors];
        for (int64_t v = v_begin; v < v_end; ++v) {
          args[v - v_begin] = {&ut[(i * nv + v - v_begin) * N], uh_at(v - v_begin, i0, ib),
                               {&st.Vp[st.state(t, v, JM)], &st.DS[st.state(t, v, JM)]},
                               &dots[(v - v_begin) * 2 * J]};
        }
        predict_or_agree<2>(from_cache, a.w + i * JNM, args, nv, J, N, M);
        for (int64_t v = v_begin; v < v_end; ++v) {
          V* dots_v = &dots[(v - v_begin) * 2 * J];
          // dots_v [0, J) becomes c^t, [J, 2J) beta^t = dl^t.
          logits<T, V>(a.prior ? a.prior + i * J : nullptr, dots_v, dots_v, J);
          couplings<T, SB>(a, st, t, v, dots_v);
          logit_gradients<T, SB>(a, st, t, v, dots_v, dots_v + J);
          std::copy(dots_v + J, dots_v + 2 * J, &eb[((v - v_begin) * kCapsBlock + ib) * J]);
        }
      }
      // A_j += sum_i dl^t_ij u_hat_ij over the block.
      for (int64_t v = 0; v < nv; ++v) {
        accumulate_block<V>(&A[v * JM], nullptr, uh_at(v, i0, 0), &eb[v * kCapsBlock * J], nb,
                            J, M);
      }
    }
    // dL/dv^{t-1} = D, the sum of A over the later sweeps (V^{t-1} feeds every later one).
    for (int64_t v = v_begin; v < v_end; ++v) {
      V* Dv = &D[(v - v_begin) * JM];
      for (int64_t q = 0; q < JM; ++q) Dv[q] += A[(v - v_begin) * JM + q];
      squash_backward_vector(t - 1, v, Dv);
    }
  }
}

// Lane k of the result: the sum of x[k]'s lanes, for the L vectors x (overwritten). log2(L)
// rounds; a round pairs vector q with vector q + n/2 of the n left and adds the low half of
// each group of lanes to its high half, so that a vector's groups then hold the partial sums
// of twice as many inputs in half the lanes. L - 1 pairs of two shuffles and one add, instead
// of L horizontal sums of log2(L) steps each.
// The shuffle indices of one round of transpose_sum for groups of n lanes: the low (or, hi,
// high) half of each group of the pair's first vector, then the same half of the second's
// (indices L and up), as a constant vector.
template <typename IV, int L, int n, bool hi, size_t... k>
CAPSNET_INLINE IV pair_mask(std::index_sequence<k...>) {
  return IV{((static_cast<int>(k) % n) < n / 2 ? static_cast<int>(k)
                                                : L + static_cast<int>(k) - n / 2) +
            (hi ? n / 2 : 0)...};
}

template <typename T, typename V, int n>
CAPSNET_INLINE void pair_rounds(V* x) {
  if constexpr (n > 1) {
    constexpr int L = static_cast<int>(sizeof(V) / sizeof(T));
    using IV = typename ShuffleIndex<T, V>::IV;
    const IV lo = pair_mask<IV, L, n, false>(std::make_index_sequence<L>{});
    const IV hi = pair_mask<IV, L, n, true>(std::make_index_sequence<L>{});
#pragma GCC unroll 8
    for (int q = 0; q < n / 2; ++q) {
      x[q] = __builtin_shuffle(x[q], x[q + n / 2], lo) +
             __builtin_shuffle(x[q], x[q + n / 2], hi);
    }
    pair_rounds<T, V, n / 2>(x);
  }
}

template <typename T, typename V>
CAPSNET_INLINE V transpose_sum(V* x) {
  pair_rounds<T, V, static_cast<int>(sizeof(V) / sizeof(T))>(x);
  return x[0];
}

template <typename T, typename V>
CAPSNET_INLINE T hsum(V x) {
  T sum = 0;
  for (size_t k = 0; k < sizeof(V) / sizeof(T); ++k) sum += x[k];
  return sum;
}

// Sample vectors whose du_hat phase 2 keeps for dW at once (dW[i] is added to between
// blocks): 80 KB at the MNIST shape with 64-byte vectors.
constexpr int64_t kWeightBlockVectors = 8;

// du_hat_i of one sample vector: d [J, M] = sum_t alpha^t ds^t + beta^t V^{t-1}, with u_hat_i
// (uh) and the routing of every iteration recomputed from it (c0_i: c^0 of capsule i in every
// lane, the same for every sample); dp [J] += beta^t over t (dprior). coef: 2 R J vectors of scratch: alpha^t and beta^t as they enter du_hat (0 where
// they do not), so that d is written in one pass (2 R loads and FMAs per value, one store).
template <typename T, int SB>
CAPSNET_INLINE void uhat_gradient(const Routing<T>& a, const BackwardState<T, SB>& st,
                                  const BackwardPlan& plan, int64_t i, int64_t v,
                                  const typename Lanes<T, SB>::V* c0_i,
                                  typename Lanes<T, SB>::V* uh, typename Lanes<T, SB>::V* coef,
                                  typename Lanes<T, SB>::V* d, typename Lanes<T, SB>::V* dp) {
  using V = typename Lanes<T, SB>::V;
  const int64_t J = a.sz.J, M = a.sz.M, R = a.sz.R, JM = J * M;
  for (int64_t t = 0; t < R; ++t) {
    // [0, J): u_hat . V^{t-1}, then c^t; [J, 2J): u_hat . ds^t, then beta^t.
    V* c = coef + 2 * t * J;
    V* e = c + J;
    const bool alpha = plan.alpha_used(t, R), beta = plan.beta_used(t, R);
    if (alpha || beta) {
      const V* ds = &st.DS[st.state(t, v, JM)];
      if (t > 0) {
        agree<2>(PredictArgs<V>{nullptr, uh, {&st.Vp[st.state(t, v, JM)], ds}, c}, J, M);
        logits<T, V>(a.prior ? a.prior + i * J : nullptr, c, c, J);
        couplings<T, SB>(a, st, t, v, c);
      } else {
        // u_hat . ds^0 only enters beta^0 (dprior); c^0 needs no agreement and is the same
        // for every sample.
        if (beta) agree<1>(PredictArgs<V>{nullptr, uh, {ds, nullptr}, e}, J, M);
        std::copy(c0_i, c0_i + J, c);
      }
    }
    if (beta) {
      logit_gradients<T, SB>(a, st, t, v, c, e);
      for (int64_t j = 0; j < J; ++j) dp[j] += e[j];
    }
    if (!alpha) std::fill(c, c + J, V{});
    if (!plan.beta_in_uhat(t, R)) std::fill(e, e + J, V{});
  }
  if (!plan.need_uhat_grad) return;  // dprior alone
  // kPoseBlock values of m at a time in registers, each coefficient loaded once for them.
  constexpr int64_t kPoseBlock = 4;
  for (int64_t j = 0; j < J; ++j) {
    int64_t m0 = 0;
    auto pose_block = [&](auto width) CAPSNET_INLINE_LAMBDA {
      constexpr int64_t W = decltype(width)::value;
      V x[W] = {};
      for (int64_t t = 0; t < R; ++t) {
        const int64_t q = st.state(t, v, JM) + j * M + m0;
        const V c = coef[2 * t * J + j], e = coef[(2 * t + 1) * J + j];
#pragma GCC unroll 4
        for (int64_t k = 0; k < W; ++k) x[k] += c * st.DS[q + k];
        if (t == 0) continue;
#pragma GCC unroll 4
        for (int64_t k = 0; k < W; ++k) x[k] += e * st.Vp[q + k];
      }
#pragma GCC unroll 4
      for (int64_t k = 0; k < W; ++k) d[j * M + m0 + k] = x[k];
    };
    for (; m0 + kPoseBlock <= M; m0 += kPoseBlock) {
      pose_block(std::integral_constant<int64_t, kPoseBlock>());
    }
    for (; m0 < M; ++m0) pose_block(std::integral_constant<int64_t, 1>());
  }
}

// du[b, i, n] = sum_{j, m} W[i, j, n, m] du_hat_bijm for the samples of vector v (d: [J, M]),
// kInputRows rows n at a time in registers, each weight broadcast.
constexpr int64_t kInputRows = 8;
template <int NB, typename T, typename V>
CAPSNET_INLINE void input_rows(const T* w_i, const V* d, int64_t n0, int64_t J, int64_t N,
                               int64_t M, V (&acc)[kInputRows]) {
#pragma GCC unroll 8
  for (int r = 0; r < NB; ++r) acc[r] = V{};
  for (int64_t j = 0; j < J; ++j) {
    const T* w = w_i + (j * N + n0) * M;
    for (int64_t m = 0; m < M; ++m) {
      const V x = d[j * M + m];
#pragma GCC unroll 8
      for (int r = 0; r < NB; ++r) acc[r] += w[r * M + m] * x;
    }
  }
}

template <typename T, int SB>
CAPSNET_INLINE void input_gradient(const Routing<T>& a, int64_t i, int64_t v,
                                   const typename Lanes<T, SB>::V* d, T* du) {
  using V = typename Lanes<T, SB>::V;
  constexpr int64_t L = Lanes<T, SB>::L;
  const int64_t B = a.sz.B, I = a.sz.I, J = a.sz.J, N = a.sz.N, M = a.sz.M;
  const T* w_i = a.w + i * J * N * M;
  const int64_t lanes = std::min(L, B - v * L);
  V acc[kInputRows];
  for (int64_t n0 = 0; n0 < N; n0 += kInputRows) {
    const int64_t rows = std::min(kInputRows, N - n0);
    if (rows == kInputRows) {
      input_rows<kInputRows, T>(w_i, d, n0, J, N, M, acc);
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        V one[kInputRows];
        input_rows<1, T>(w_i, d, n0 + r, J, N, M, one);
        acc[r] = one[0];
      }
    }
    for (int64_t k = 0; k < lanes; ++k) {
      T* du_bi = du + ((v * L + k) * I + i) * N + n0;
      for (int64_t r = 0; r < rows; ++r) du_bi[r] = acc[r][k];
    }
  }
}

// dW[i, j, n, :] (first: =, else +=) sum over the samples of vectors [v0, v0 + nv) of
// u[b, i, n] du_hat_bij (duh: [nv, J, M]); L values of m at a time, summed over the lanes
// by transpose_sum.
template <typename T, int SB>
CAPSNET_INLINE void weight_gradient(const Routing<T>& a, const BackwardState<T, SB>& st,
                                    int64_t i, int64_t v0, int64_t nv,
                                    const typename Lanes<T, SB>::V* duh, T* dw_i, bool first) {
  using V = typename Lanes<T, SB>::V;
  constexpr int64_t L = Lanes<T, SB>::L;
  const int64_t J = a.sz.J, N = a.sz.N, M = a.sz.M, JM = J * M, VB = st.VB;
  const V* u_i = &st.ut[(i * VB + v0) * N];
  for (int64_t j = 0; j < J; ++j) {
    for (int64_t n = 0; n < N; ++n) {
      T* out = dw_i + (j * N + n) * M;
      int64_t m0 = 0;
      for (; m0 + L <= M; m0 += L) {
        V acc[L] = {};
        for (int64_t v = 0; v < nv; ++v) {
          const V un = u_i[v * N + n];
          const V* x = duh + v * JM + j * M + m0;
#pragma GCC unroll 16
          for (int64_t k = 0; k < L; ++k) acc[k] += un * x[k];
        }
        const V sum = transpose_sum<T>(acc);
        for (int64_t k = 0; k < L; ++k) out[m0 + k] = first ? sum[k] : out[m0 + k] + sum[k];
      }
      for (; m0 < M; ++m0) {
        V acc{};
        for (int64_t v = 0; v < nv; ++v) acc += u_i[v * N + n] * duh[v * JM + j * M + m0];
        const T sum = hsum<T>(acc);
        out[m0] = first ? sum : out[m0] + sum;
      }
    }
  }
}

// Backward phase 2 for input capsules [i_begin, i_end), over the whole batch: u_hat_i is
// recomputed per sample vector and, with it, every iteration's c^t and beta^t (no per-(t, i)
// state is kept between the phases); du_hat_i gives du rows, dW[i] (summed over the batch in
// blocks of kWeightBlockVectors vectors) and dprior[i].
template <typename T, int SB>
CAPSNET_INLINE void backward_capsules(const Routing<T>& a, const BackwardState<T, SB>& st,
                                      const BackwardPlan& plan, T* du, T* dw, T* dprior,
                                      int64_t i_begin, int64_t i_end) {
  using V = typename Lanes<T, SB>::V;
  const int64_t J = a.sz.J, N = a.sz.N, M = a.sz.M, JM = J * M, JNM = J * N * M, VB = st.VB;
  const int64_t block = std::min(VB, kWeightBlockVectors);
  // u_hat_i of two sample vectors (predicted in pairs), du_hat_i of the block's.
  Buffer<V> uh(2 * JM), duh(block * JM), dp(J), coef(2 * a.sz.R * J), c0_i(J);
  // c^0, the softmax of the prior alone, does not depend on the sample: computed once (as the
  // forward's first sweep does, so that the values are those the per-sample softmax gave),
  // not for every sample vector.
  FirstCouplings<T> c0;
  compute_first_couplings<T, V>(a, c0);
  for (int64_t i = i_begin; i < i_end; ++i) {
    dp.assign(J, V{});
    for (int64_t j = 0; j < J; ++j) c0_i[j] = splat<V>(c0.at(i, j, J));
    for (int64_t v0 = 0; v0 < VB; v0 += block) {
      const int64_t nv = std::min(block, VB - v0);
      for (int64_t v1 = v0; v1 < v0 + nv; v1 += 2) {
        const int64_t pair = std::min<int64_t>(2, v0 + nv - v1);
        PredictArgs<V> args[2];
        for (int64_t p = 0; p < pair; ++p) {
          args[p] = {&st.ut[(i * VB + v1 + p) * N], &uh[p * JM], {nullptr, nullptr},
                     coef.data()};
        }
        predict<0>(a.w + i * JNM, args, pair, J, N, M);
        for (int64_t v = v1; v < v1 + pair; ++v) {
          V* d = &duh[(v - v0) * JM];
          uhat_gradient<T, SB>(a, st, plan, i, v, c0_i.data(), &uh[(v - v1) * JM], coef.data(), d,
                               dp.data());
          if (du != nullptr) input_gradient<T, SB>(a, i, v, d, du);
        }
      }
      if (dw != nullptr) {
        weight_gradient<T, SB>(a, st, i, v0, nv, duh.data(), dw + i * JNM, v0 == 0);
      }
    }
    if (dprior != nullptr) {
      for (int64_t j = 0; j < J; ++j) dprior[i * J + j] = hsum<T>(dp[j]);
    }
  }
}

// The kernels of one clone: the bodies above (always inlined) inside functions compiled for
// the clone's instruction set. kWideBytes: its widest sample vector; REGISTER_BYTES: its widest
// vector register.
#define CAPSNET_CLONE_KERNELS(NAME, TARGET, WIDE_BYTES, REGISTER_BYTES)                        \
  struct NAME {                                                                                \
    static constexpr int kWideBytes = WIDE_BYTES;                                              \
    template <typename T, int SB>                                                              \
    TARGET static void forward(const Routing<T>& a, T* v_out, int64_t KV, bool cached,         \
                               int64_t grp_begin, int64_t grp_end) {                           \
      forward_groups<SB <= REGISTER_BYTES, T, SB>(a, v_out, KV, cached, grp_begin, grp_end);   \
    }                                                                                          \
    template <typename T, int SB>                                                              \
    TARGET static void gather(const Routing<T>& a, int64_t nv, typename Lanes<T, SB>::V* ut,   \
                              int64_t i_begin, int64_t i_end) {                                \
      gather_samples<SB <= REGISTER_BYTES>(a, 0, nv, ut, i_begin, i_end);                      \
    }                                                                                          \
    template <typename T, int SB>                                                              \
    TARGET static void sweeps(const Routing<T>& a, BackwardState<T, SB>& st, const T* g_out,   \
                              const BackwardPlan& plan, bool cached, int64_t v_begin,          \
                              int64_t v_end) {                                                 \
      backward_sweeps<T, SB>(a, st, g_out, plan, cached, v_begin, v_end);                      \
    }                                                                                          \
    template <typename T, int SB>                                                              \
    TARGET static void capsules(const Routing<T>& a, const BackwardState<T, SB>& st,           \
                                const BackwardPlan& plan, T* du, T* dw, T* dprior,             \
                                int64_t i_begin, int64_t i_end) {                              \
      backward_capsules<T, SB>(a, st, plan, du, dw, dprior, i_begin, i_end);                   \
    }                                                                                          \
  };

CAPSNET_CLONE_KERNELS(DefaultKernels, , kDefaultWideBytes, kDefaultRegisterBytes)
#if defined(CAPSNET_X86_CLONES)
CAPSNET_CLONE_KERNELS(X86V3Kernels, CAPSNET_TARGET_X86_V3, 32, 32)
CAPSNET_CLONE_KERNELS(X86V4Kernels, CAPSNET_TARGET_X86_V4, 64, 64)
#endif

// ---- Run-time choices: clone, sample vector width, u_hat cache.

enum class Clone { kDefault = 0, kX86V3 = 1, kX86V4 = 2 };
constexpr Clone kClones[] = {Clone::kX86V4, Clone::kX86V3, Clone::kDefault};  // best first
const char* clone_name(Clone c) {
  return c == Clone::kX86V4 ? "x86-64-v4" : c == Clone::kX86V3 ? "x86-64-v3" : "default";
}

bool clone_built(Clone c) {
#if defined(CAPSNET_X86_CLONES)
  (void)c;
  return true;
#else
  return c == Clone::kDefault;
#endif
}

// Whether this CPU (and its OS: AVX-512 state saved on context switches) runs the clone.
bool cpu_runs(Clone c) {
#if defined(CAPSNET_X86_CLONES)
  __builtin_cpu_init();
  if (c == Clone::kX86V4) return __builtin_cpu_supports("x86-64-v4");
  if (c == Clone::kX86V3) return __builtin_cpu_supports("x86-64-v3");
#endif
  return c == Clone::kDefault;
}

int wide_bytes(Clone c) {
  return c == Clone::kX86V4 ? 64 : c == Clone::kX86V3 ? 32 : kDefaultWideBytes;
}

std::string env_setting(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr || value[0] == '\0' ? std::string("auto") : std::string(value);
}

// The clone this call runs: the best one the CPU runs, or the one CAPSNET_FUSED_CPU_ISA names
// (read at every call, so that tests can switch it).
Clone clone_for_call() {
  const std::string isa = env_setting("CAPSNET_FUSED_CPU_ISA");
  if (isa == "auto") {
    for (Clone c : kClones) {
      if (clone_built(c) && cpu_runs(c)) return c;
    }
    return Clone::kDefault;
  }
  TORCH_CHECK_VALUE(isa == "generic" || isa == "avx2" || isa == "avx512",
                    "capsnet_fused: CAPSNET_FUSED_CPU_ISA must be auto, generic, avx2 or avx512, "
                    "got '", isa, "'");
  const Clone c =
      isa == "avx512" ? Clone::kX86V4 : isa == "avx2" ? Clone::kX86V3 : Clone::kDefault;
  TORCH_CHECK(clone_built(c), "capsnet_fused: CAPSNET_FUSED_CPU_ISA=", isa, " asks for the ",
              clone_name(c),
              " clone, which this build does not have (it has the default clone only: built "
              "with CAPSNET_FUSED_NO_CLONES or CAPSNET_FUSED_NATIVE=1, or not by GCC >= 11 for "
              "x86-64)");
  TORCH_CHECK(cpu_runs(c), "capsnet_fused: CAPSNET_FUSED_CPU_ISA=", isa, " asks for the ",
              clone_name(c), " clone, which this CPU cannot run (it lacks ",
              c == Clone::kX86V4 ? "AVX-512 F/BW/CD/DQ/VL" : "AVX2/FMA/BMI2", ")");
  return c;
}

// Bytes of one sample vector for a batch of B: 16 when the batch fits one 16-byte vector (a
// half-empty wider vector costs full time); 64 in a clone that has them once the batch fills
// two 64-byte vectors (one per core of a 2-core machine); else 32.
int sample_bytes(Clone c, int64_t B, int64_t elem_bytes) {
  if (B <= 16 / elem_bytes) return 16;
  if (wide_bytes(c) == 64 && B >= 2 * (64 / elem_bytes)) return 64;
  return 32;
}

int64_t parse_cache_size(const std::string& text) {
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str() || value <= 0) return 0;
  const char unit = *end;
  const int64_t scale = unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : unit == 'G' ? 1 << 30 : 1;
  return value * scale;
}

// L2 bytes of one core, 0 when unknown: the kernel's cache description of cpu0 (any
// architecture), else glibc's sysconf. Read once.
int64_t l2_bytes_per_core() {
  static const int64_t bytes = [] {
    for (int index = 0; index < 16; ++index) {
      const std::string dir =
          "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      std::ifstream level_file(dir + "level");
      if (!level_file) break;
      int level = 0;
      std::string type, size;
      level_file >> level;
      std::ifstream(dir + "type") >> type;
      std::ifstream(dir + "size") >> size;
      if (level == 2 && type != "Instruction") {
        const int64_t parsed = parse_cache_size(size);
        if (parsed > 0) return parsed;
      }
    }
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long value = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (value > 0) return static_cast<int64_t>(value);
#endif
    return int64_t{0};
  }();
  return bytes;
}

// Bytes of the u_hat that the cached path keeps per thread: one sample vector's, I J M
// vectors (groups are one vector on that path).
int64_t uhat_group_bytes(const RoutingSizes& sz, int64_t sample_vector_bytes) {
  return sz.I * sz.J * sz.M * sample_vector_bytes;
}

// The fraction of the L2 that the cached u_hat may take: the rest holds the group's states and
// the stream of W through the first sweep.
constexpr int64_t kCacheL2Num = 3, kCacheL2Den = 4;

// CAPSNET_FUSED_UHAT_CACHE: on / off force the cached or the recomputing path; auto (default)
// caches when a group's u_hat fits 3/4 of the L2 of a core.
bool use_uhat_cache(const RoutingSizes& sz, int64_t sample_vector_bytes) {
  const std::string mode = env_setting("CAPSNET_FUSED_UHAT_CACHE");
  TORCH_CHECK_VALUE(mode == "auto" || mode == "on" || mode == "off",
                    "capsnet_fused: CAPSNET_FUSED_UHAT_CACHE must be auto, on or off, got '", mode,
                    "'");
  if (mode != "auto") return mode == "on";
  return uhat_group_bytes(sz, sample_vector_bytes) * kCacheL2Den <=
         l2_bytes_per_core() * kCacheL2Num;
}

// Calls body(Kernels{}) with the kernels of clone c.
template <typename Body>
void with_clone(Clone c, const Body& body) {
#if defined(CAPSNET_X86_CLONES)
  if (c == Clone::kX86V4) return body(X86V4Kernels{});
  if (c == Clone::kX86V3) return body(X86V3Kernels{});
#endif
  (void)c;
  body(DefaultKernels{});
}

// Calls body(std::integral_constant<int, SB>) for sample vectors of sb bytes (64 only in
// clones that have 64-byte vectors).
template <typename Kernels, typename Body>
void with_sample_bytes(int sb, const Body& body) {
  if constexpr (Kernels::kWideBytes == 64) {
    if (sb == 64) return body(std::integral_constant<int, 64>());
  }
  if (sb == 16) return body(std::integral_constant<int, 16>());
  body(std::integral_constant<int, 32>());
}

template <typename Kernels, typename T, int SB>
void forward_kernel(const Routing<T>& a, T* v, bool cached) {
  const int64_t vectors = (a.sz.B + Lanes<T, SB>::L - 1) / Lanes<T, SB>::L;
  // The cached path keeps the u_hat of one vector per group: W[i]'s reuse across a group's
  // vectors only pays in the sweep that computes u_hat.
  const int64_t KV = cached ? 1 : group_vectors(vectors);
  at::parallel_for(0, (vectors + KV - 1) / KV, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    Kernels::template forward<T, SB>(a, v, KV, cached, begin, end);
  });
}

// dbias [J, M] = sum over b and t of ds^t_b (ds [B, R, J, M]), in that fixed order: one
// thread, so the sum does not depend on the thread count (B R J M adds, 61 K at the MNIST
// shape with B = 128).
template <typename T>
void bias_gradient(const T* ds, const RoutingSizes& sz, T* dbias) {
  const int64_t JM = sz.J * sz.M;
  std::fill(dbias, dbias + JM, T(0));
  for (int64_t bt = 0; bt < sz.B * sz.R; ++bt) {
    for (int64_t q = 0; q < JM; ++q) dbias[q] += ds[bt * JM + q];
  }
}

template <typename Kernels, typename T, int SB>
void backward_kernel(const Routing<T>& a, const T* g, T* ds_out, T* du, T* dw, T* dprior,
                     bool need_dbias, bool detach_inner, bool cached) {
  using V = typename Lanes<T, SB>::V;
  constexpr int64_t L = Lanes<T, SB>::L;
  const RoutingSizes& sz = a.sz;
  const int64_t I = sz.I, J = sz.J, N = sz.N, M = sz.M, R = sz.R, JM = J * M;
  const BackwardPlan plan{detach_inner, du != nullptr || dw != nullptr, dprior != nullptr,
                          need_dbias};
  const int64_t vectors = (sz.B + L - 1) / L;
  if (vectors == 0) {  // B = 0: the sums over the batch are empty
    if (dw != nullptr) std::fill(dw, dw + I * J * N * M, T(0));
    if (dprior != nullptr) std::fill(dprior, dprior + I * J, T(0));
    return;
  }
  BackwardState<T, SB> st;
  st.VB = vectors;
  st.ut.resize(I * vectors * N);
  at::parallel_for(0, I, 64, [&](int64_t begin, int64_t end) {
    Kernels::template gather<T, SB>(a, vectors, st.ut.data(), begin, end);
  });
  st.S.assign(R * vectors * JM, V{});
  st.Vp.assign(R * vectors * JM, V{});
  // Padded lanes get lse = +inf, so that their in_caps couplings exp(l - lse) are 0 (with 0
  // an overflowing exp(l) would make them inf and their zero gradients NaN).
  st.lse.assign(R * vectors * J, splat<V>(std::numeric_limits<T>::infinity()));
  st.DS.assign(R * vectors * JM, V{});
  st.dss.assign(R * vectors * J, V{});
  for (int64_t b = 0; b < sz.B; ++b) {
    const int64_t v = b / L, k = b % L;
    for (int64_t t = 0; t < R; ++t) {
      for (int64_t q = 0; q < JM; ++q) {
        st.S[st.state(t, v, JM) + q][k] = a.s[(b * R + t) * JM + q];
        st.Vp[st.state(t, v, JM) + q][k] = a.V[(b * R + t) * JM + q];
      }
      if (!a.in_caps) continue;  // lse belongs to the softmax over in_caps
      for (int64_t j = 0; j < J; ++j) {
        st.lse[st.scalars(t, v, J) + j][k] = a.lse[(b * R + t) * J + j];
      }
    }
  }
  // Phase 1, parallel over groups of sample vectors: ds^t for every t.
  const int64_t KV = cached ? 1 : group_vectors(vectors);
  at::parallel_for(0, (vectors + KV - 1) / KV, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    for (int64_t grp = begin; grp < end; ++grp) {
      Kernels::template sweeps<T, SB>(a, st, g, plan, cached, grp * KV,
                                      std::min(vectors, (grp + 1) * KV));
    }
  });
  for (int64_t b = 0; b < sz.B; ++b) {
    const int64_t v = b / L, k = b % L;
    for (int64_t t = 0; t < R; ++t) {
      for (int64_t q = 0; q < JM; ++q) {
        ds_out[(b * R + t) * JM + q] = st.DS[st.state(t, v, JM) + q][k];
      }
    }
  }
  // Phase 2, parallel over input capsules: du, dW and dprior.
  if (!plan.need_uhat_grad && !plan.need_dp) return;
  at::parallel_for(0, I, 8, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    Kernels::template capsules<T, SB>(a, st, plan, du, dw, dprior, begin, end);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_fwd_cpu(
    const at::Tensor& u, const at::Tensor& weight, const std::optional<at::Tensor>& prior,
    const std::optional<at::Tensor>& bias, int64_t iterations, bool softmax_in_caps,
    bool /*detach_inner: backward only*/, bool leaky, double squash_eps) {
  const ForwardCall call =
      prepare_forward(u, weight, prior, bias, iterations, softmax_in_caps, squash_eps);
  const Clone clone = clone_for_call();
  AT_DISPATCH_FLOATING_TYPES(call.dtype, "cpp_routing_fwd", [&] {
    using T = scalar_t;
    const Routing<T> a{call.u.data_ptr<T>(), call.w.data_ptr<T>(), ptr_or_null<T>(call.prior),
                       ptr_or_null<T>(call.bias), call.s.data_ptr<T>(), call.V.data_ptr<T>(),
                       call.lse.data_ptr<T>(), call.sz, softmax_in_caps, leaky,
                       static_cast<T>(squash_eps)};
    const int sb = sample_bytes(clone, call.sz.B, sizeof(T));
    const bool cached = use_uhat_cache(call.sz, sb);
    with_clone(clone, [&](auto kernels) {
      using Kernels = decltype(kernels);
      with_sample_bytes<Kernels>(sb, [&](auto sb_constant) {
        constexpr int SB = decltype(sb_constant)::value;
        forward_kernel<Kernels, T, SB>(a, call.v.data_ptr<T>(), cached);
      });
    });
  });
  return finish_forward(call, u.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_bwd_cpu(
    const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& weight,
    const std::optional<at::Tensor>& prior, const std::optional<at::Tensor>& bias,
    const at::Tensor& s, const at::Tensor& V, const at::Tensor& lse, int64_t iterations,
    bool softmax_in_caps, bool detach_inner, bool leaky, double squash_eps, bool need_du,
    bool need_dweight, bool need_dprior, bool need_dbias) {
  const BackwardCall call =
      prepare_backward(grad_v, u, weight, prior, bias, s, V, lse, iterations, softmax_in_caps,
                       squash_eps, need_du, need_dweight, need_dprior, need_dbias);
  if (call.any()) {
    const Clone clone = clone_for_call();
    AT_DISPATCH_FLOATING_TYPES(call.dtype, "cpp_routing_bwd", [&] {
      using T = scalar_t;
      // The backward kernels only read s, V and lse.
      const Routing<T> a{call.u.data_ptr<T>(), call.w.data_ptr<T>(), ptr_or_null<T>(call.prior),
                         ptr_or_null<T>(call.bias), call.s.data_ptr<T>(), call.V.data_ptr<T>(),
                         call.lse.data_ptr<T>(), call.sz, softmax_in_caps, leaky,
                         static_cast<T>(squash_eps)};
      T* du = call.need_du ? call.du.data_ptr<T>() : nullptr;
      T* dw = call.need_dw ? call.dw.data_ptr<T>() : nullptr;
      T* dp = call.need_dp ? call.dp.data_ptr<T>() : nullptr;
      const int sb = sample_bytes(clone, call.sz.B, sizeof(T));
      const bool cached = use_uhat_cache(call.sz, sb);
      with_clone(clone, [&](auto kernels) {
        using Kernels = decltype(kernels);
        with_sample_bytes<Kernels>(sb, [&](auto sb_constant) {
          constexpr int SB = decltype(sb_constant)::value;
          backward_kernel<Kernels, T, SB>(a, call.g.data_ptr<T>(), call.ds.data_ptr<T>(), du,
                                          dw, dp, call.need_db, detach_inner, cached);
        });
      });
      if (call.need_db) bias_gradient(call.ds.data_ptr<T>(), call.sz, call.db.data_ptr<T>());
    });
  }
  return finish_backward(call, u, weight, prior, bias);
}

// The MNIST DigitCaps routing problem at B = 128, float32: what cpp_kernel_info reports the
// u_hat cache's decision for.
constexpr RoutingSizes kMnistSizes{128, 1152, 10, 8, 16, 3};

std::string json_list(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t k = 0; k < items.size(); ++k) out += (k ? ", \"" : "\"") + items[k] + "\"";
  return out + "]";
}

// JSON: the clone this process's calls run, what was built and what the CPU runs, the L2
// size read, and the u_hat cache setting with its decision at the MNIST shape.
std::string cpp_kernel_info() {
  const Clone clone = clone_for_call();
  std::vector<std::string> built, runs;
  for (Clone c : kClones) {
    if (clone_built(c)) built.push_back(clone_name(c));
    if (clone_built(c) && cpu_runs(c)) runs.push_back(clone_name(c));
  }
  const int sb = sample_bytes(clone, kMnistSizes.B, sizeof(float));
  const bool cached = use_uhat_cache(kMnistSizes, sb);
  std::string json = "{";
  json += "\"clone\": \"" + std::string(clone_name(clone)) + "\"";
  json += ", \"clones_built\": " + json_list(built);
  json += ", \"clones_cpu_runs\": " + json_list(runs);
  json += ", \"cpu_isa\": \"" + env_setting("CAPSNET_FUSED_CPU_ISA") + "\"";
  json += ", \"build_isa\": \"" + std::string(kBuildIsa) + "\"";
  json += ", \"sample_vector_bytes\": " + std::to_string(wide_bytes(clone));
  json += ", \"l2_bytes_per_core\": " + std::to_string(l2_bytes_per_core());
  json += ", \"u_hat_cache\": \"" + env_setting("CAPSNET_FUSED_UHAT_CACHE") + "\"";
  json += ", \"u_hat_cache_mnist\": {\"shape\": \"B=128 I=1152 J=10 N=8 M=16 float32\"";
  json += ", \"sample_vector_bytes\": " + std::to_string(sb);
  json += ", \"u_hat_bytes_per_group\": " + std::to_string(uhat_group_bytes(kMnistSizes, sb));
  json += ", \"path\": \"" + std::string(cached ? "cached" : "recompute") + "\"}";
  return json + "}";
}

}  // namespace

TORCH_LIBRARY_IMPL(capsnet_fused, CPU, m) {
  m.impl("cpp_routing_fwd", &routing_fwd_cpu);
  m.impl("cpp_routing_bwd", &routing_bwd_cpu);
}

// Frees the scratch blocks the CPU kernels keep between calls (ScratchPool); returns their
// bytes.
int64_t cpp_release_scratch() { return static_cast<int64_t>(ScratchPool::get().release_all()); }

// No tensor arguments, so no backend key to dispatch on: registered for every backend.
TORCH_LIBRARY_IMPL(capsnet_fused, CompositeExplicitAutograd, m) {
  m.impl("cpp_kernel_info", &cpp_kernel_info);
  m.impl("cpp_release_scratch", &cpp_release_scratch);
}

}  // namespace capsnet_fused
