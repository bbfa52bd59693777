// Runs the CUDA routing kernels (csrc/routing_cuda.cu) under the CPU emulation without torch, so
// that they can be built with AddressSanitizer or ThreadSanitizer (tests/test_cuda_sanitizers.py
// builds and runs this file; bench/sanitize_cuda_emulation.sh is the same by hand).
//
//   cuda_emulation_check routing    every variant and a few shapes and tile configurations,
//                                   forward and backward, with NaN-filled outputs and workspace;
//                                   each run twice, threads in forward and reverse order between
//                                   barriers, and the results compared bit for bit
//   cuda_emulation_check routing quick   the first shape only, one order (for TSan, ~10x slower)
//   cuda_emulation_check selftest   the emulation's own checks: a missing __syncthreads changes
//                                   results with the thread order; divergent barriers, a barrier
//                                   after early returns, shuffles in a partial warp and mixed
//                                   warp operations are reported as launch errors; shuffles
//                                   exchange the right values; atomicAdd counts across blocks
//   cuda_emulation_check race       a kernel with a shared-memory race (ThreadSanitizer must
//                                   report it: the positive control of the TSan run)
//   cuda_emulation_check overflow   a kernel writing past a buffer (AddressSanitizer must
//                                   report it: the positive control of the ASan run)
// Exit status 0 when every check passed.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "routing_cuda.cu"

namespace {

using capsnet_fused::cuda::Options;
using capsnet_fused::cuda::Plan;
using capsnet_fused::cuda::Sizes;
using capsnet_fused::cuda::Tensors;
using capsnet_fused::cuda::Tiles;

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
  }
}

std::vector<double> nan_buffer(size_t n) {
  return std::vector<double>(n, std::numeric_limits<double>::quiet_NaN());
}

std::vector<double> random_buffer(size_t n, double scale, std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<double> out(n);
  for (double& x : out) x = normal(rng);
  return out;
}

struct Result {
  std::vector<double> v, s, V, lse, du, dw, dprior, dbias;
};

bool all_finite(const std::vector<double>& x) {
  for (double y : x) {
    if (!std::isfinite(y)) return false;
  }
  return true;
}

// Forward and backward of one problem; false (and a message) when a launch fails.
bool run_routing(const Sizes& sz, const Options& opt, const Tiles& tiles, Result* out) {
  std::mt19937_64 rng(1234);
  const size_t B = sz.B, I = sz.I, J = sz.J, N = sz.N, M = sz.M, R = sz.R;
  const std::vector<double> u = random_buffer(B * I * N, 0.6, rng);
  const std::vector<double> w = random_buffer(I * J * N * M, 1.0 / std::sqrt(double(N)), rng);
  const std::vector<double> prior = random_buffer(I * J, 1.0, rng);
  const std::vector<double> grad = random_buffer(B * J * M, 1.0, rng);
  const std::vector<double> bias = random_buffer(J * M, 0.3, rng);
  Plan plan;
  if (capsnet_fused::cuda::plan_routing(sz, opt, tiles, sizeof(double), &plan) != 0) {
    std::printf("FAIL plan: %s\n", plan.error);
    return false;
  }
  out->v = nan_buffer(B * J * M);
  out->s = nan_buffer(B * R * J * M);
  out->V = nan_buffer(B * R * J * M);
  out->lse = nan_buffer(B * (opt.in_caps ? R : 0) * J);
  std::vector<double> fwd_ws = nan_buffer(plan.forward_workspace);
  Tensors<double> t{};
  t.u = u.data();
  t.w = w.data();
  t.prior = opt.has_prior ? prior.data() : nullptr;
  t.bias = opt.has_bias ? bias.data() : nullptr;
  t.v = out->v.data();
  t.s = out->s.data();
  t.V = out->V.data();
  t.lse = out->lse.data();
  t.workspace = fwd_ws.data();
  int err = capsnet_fused::cuda::routing_forward<double>(plan, t, nullptr);
  if (err != 0) {
    std::printf("FAIL forward: %s\n", capsnet_fused::cuda::error_string(err));
    return false;
  }
  std::vector<double> ds = nan_buffer(B * R * J * M);
  std::vector<double> bwd_ws = nan_buffer(plan.backward_workspace);
  out->du = nan_buffer(B * I * N);
  out->dw = nan_buffer(I * J * N * M);
  out->dprior = nan_buffer(opt.has_prior ? I * J : 0);
  out->dbias = nan_buffer(opt.has_bias ? J * M : 0);
  t.grad_v = grad.data();
  t.ds = ds.data();
  t.du = out->du.data();
  t.dw = out->dw.data();
  t.dprior = opt.has_prior ? out->dprior.data() : nullptr;
  t.dbias = opt.has_bias ? out->dbias.data() : nullptr;
  t.workspace = bwd_ws.data();
  err = capsnet_fused::cuda::routing_backward<double>(plan, t, nullptr);
  if (err != 0) {
    std::printf("FAIL backward: %s\n", capsnet_fused::cuda::error_string(err));
    return false;
  }
  return true;
}

// quick: the first shape only, one thread order (ThreadSanitizer's run, which is slow: races are
// its business there, not thread-order dependence).
int mode_routing(bool quick) {
  std::vector<Sizes> shapes = {{5, 13, 3, 3, 5, 3}, {9, 20, 10, 8, 16, 2}, {3, 7, 2, 2, 37, 2}};
  if (quick) shapes.resize(1);
  Tiles ragged;
  ragged.sweep_warps = 1;
  ragged.sweep_samples = 4;
  ragged.sweep_caps = 5;
  ragged.sweep_stage = 2;
  ragged.gemm_caps = 3;
  ragged.grads_caps = 3;
  ragged.grads_samples = 3;
  ragged.grads_warps = 3;
  ragged.combine_warps = 3;
  const std::vector<Tiles> configs = {Tiles{}, ragged};
  int runs = 0;
  for (const Sizes& sz : shapes) {
    for (int variant = 0; variant < 8; ++variant) {
      Options opt;
      opt.in_caps = variant & 1;
      opt.has_prior = variant & 2;
      opt.detach_inner = variant & 4;
      // The options of issue 15 (bias, leaky routing, squash eps) in half the variants, so that
      // each of the above meets them with and without; the eps-free squash in one.
      opt.has_bias = opt.leaky = (opt.in_caps + opt.has_prior + opt.detach_inner) % 2 == 1;
      opt.squash_eps = variant == 7 ? 0.0 : 1e-8;
      for (size_t c = 0; c < configs.size(); ++c) {
        const std::string name = "B" + std::to_string(sz.B) + "-I" + std::to_string(sz.I) +
                                 "-J" + std::to_string(sz.J) + "-M" + std::to_string(sz.M) +
                                 " variant " + std::to_string(variant) + " tiles " +
                                 std::to_string(c);
        Result forward_order, reverse_order;
        setenv("CUDA_EMU_SCHEDULE", "forward", 1);
        if (!run_routing(sz, opt, configs[c], &forward_order)) return 1;
        ++runs;
        if (quick) {
          reverse_order = forward_order;
        } else {
          setenv("CUDA_EMU_SCHEDULE", "reverse", 1);
          if (!run_routing(sz, opt, configs[c], &reverse_order)) return 1;
          ++runs;
        }
        const std::vector<double>* a[] = {&forward_order.v,      &forward_order.s,
                                          &forward_order.V,      &forward_order.lse,
                                          &forward_order.du,     &forward_order.dw,
                                          &forward_order.dprior, &forward_order.dbias};
        const std::vector<double>* b[] = {&reverse_order.v,      &reverse_order.s,
                                          &reverse_order.V,      &reverse_order.lse,
                                          &reverse_order.du,     &reverse_order.dw,
                                          &reverse_order.dprior, &reverse_order.dbias};
        for (int k = 0; k < 8; ++k) {
          check(all_finite(*a[k]), name + ": output " + std::to_string(k) + " not all written");
          check(a[k]->size() == b[k]->size() &&
                    (a[k]->empty() || std::memcmp(a[k]->data(), b[k]->data(),
                                                  a[k]->size() * sizeof(double)) == 0),
                name + ": output " + std::to_string(k) + " depends on the thread order");
        }
      }
    }
  }
  std::printf("routing: %d forward+backward runs, %d failures\n", runs, failures);
  return failures == 0 ? 0 : 1;
}

// Kernels that misuse the execution model, for the emulation's self-checks.

__global__ void neighbour_kernel(float* out, bool with_barrier) {
  CAPSNET_DYNAMIC_SHARED(raw);
  float* sh = reinterpret_cast<float*>(raw);
  const int t = threadIdx.x, n = blockDim.x;
  sh[t] = float(t);
  if (with_barrier) __syncthreads();
  out[t] = sh[(t + 1) % n];
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x % 2 == 0) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void divergent_shuffle_kernel(float* out) {
  float x = 1.0f;
  // Thread 32, lane 0 of the second warp, skips the shuffle that its 31 lanes wait in.
  if (threadIdx.x >= 33) x = __shfl_xor_sync(0xffffffffu, x, 1);
  __syncthreads();
  out[threadIdx.x] = x;
}

__global__ void barrier_after_return_kernel(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

template <typename T>
__global__ void warp_sum_kernel(T* out) {
  T x = T(threadIdx.x + 1);
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  const T from_lane_5 = __shfl_sync(0xffffffffu, T(threadIdx.x), 5);
  out[threadIdx.x] = x + from_lane_5 * T(1000);
}

__global__ void mixed_warp_ops_kernel(float* out) {
  float x = 1.0f;
  if (threadIdx.x == 0) {
    __syncwarp();
  } else {
    x = __shfl_xor_sync(0xffffffffu, x, 1);
  }
  out[threadIdx.x] = x;
}

__global__ void count_kernel(int* counter) { atomicAdd(counter, 1); }

__global__ void racy_kernel(float* out) {
  CAPSNET_DYNAMIC_SHARED(raw);
  float* sh = reinterpret_cast<float*>(raw);
  sh[threadIdx.x] = float(threadIdx.x);
  // Missing __syncthreads: reads what another thread writes in the same phase.
  out[threadIdx.x] = sh[(threadIdx.x + 1) % blockDim.x];
}

__global__ void overflow_kernel(float* out, int n) {
  // Writes one element past the end of `out`.
  out[threadIdx.x + 1 == blockDim.x ? n : threadIdx.x] = 1.0f;
}

template <typename... Params, typename... Args>
int launch(const char* name, void (*kernel)(Params...), unsigned threads, size_t shared,
           Args... args) {
  return capsnet_fused::cuda::launch_kernel(name, kernel, dim3(1), dim3(threads), shared,
                                            nullptr, args...);
}

bool error_mentions(int code, const char* text) {
  return code != 0 && std::strstr(capsnet_fused::cuda::error_string(code), text) != nullptr;
}

int mode_selftest() {
  const unsigned n = 64;
  std::vector<float> fwd(n), rev(n);
  setenv("CUDA_EMU_SCHEDULE", "forward", 1);
  check(launch("neighbour", &neighbour_kernel, n, n * sizeof(float), fwd.data(), false) == 0,
        "neighbour launch");
  setenv("CUDA_EMU_SCHEDULE", "reverse", 1);
  check(launch("neighbour", &neighbour_kernel, n, n * sizeof(float), rev.data(), false) == 0,
        "neighbour launch");
  // Without the barrier, thread t reads t + 1's slot before (forward order: still the NaN
  // fill) or after (reverse order) t + 1 writes it.
  check(std::isnan(fwd[0]) && rev[0] == 1.0f, "a missing __syncthreads shows with thread order");
  check(launch("neighbour", &neighbour_kernel, n, n * sizeof(float), fwd.data(), true) == 0,
        "neighbour launch");
  bool right = true;
  for (unsigned t = 0; t < n; ++t) right = right && fwd[t] == float((t + 1) % n);
  check(right, "with the barrier every thread reads its neighbour's value");
  setenv("CUDA_EMU_SCHEDULE", "forward", 1);

  // The odd threads return, so the even ones meet a barrier after returns.
  check(error_mentions(launch("divergent", &divergent_barrier_kernel, n, 0, fwd.data()),
                       "returned"),
        "a __syncthreads reached by half the block is reported");
  check(error_mentions(launch("divergent_shuffle", &divergent_shuffle_kernel, n, 0, fwd.data()),
                       "deadlock"),
        "a shuffle that one lane skips is reported");
  check(error_mentions(launch("after_return", &barrier_after_return_kernel, n, 0, fwd.data()),
                       "returned"),
        "a __syncthreads after an early return is reported");
  check(error_mentions(launch("partial_warp", &warp_sum_kernel<float>, 48, 0, fwd.data()),
                       "partial warp"),
        "a shuffle in a partial warp is reported");
  check(error_mentions(launch("mixed", &mixed_warp_ops_kernel, 32, 0, fwd.data()),
                       "different warp operations"),
        "__syncwarp against a shuffle is reported");
  std::vector<float> sums(n);
  std::vector<double> sums64(n);
  check(launch("warp_sum", &warp_sum_kernel<float>, n, 0, sums.data()) == 0, "warp_sum launch");
  check(launch("warp_sum", &warp_sum_kernel<double>, n, 0, sums64.data()) == 0,
        "warp_sum launch");
  right = true;
  for (unsigned t = 0; t < n; ++t) {
    const unsigned warp = t / 32;
    // lanes hold warp * 32 + lane + 1; their sum, plus 1000 x (warp * 32 + 5) from lane 5
    const double want = 32.0 * warp * 32 + 528 + 1000.0 * (warp * 32 + 5);
    right = right && sums[t] == float(want) && sums64[t] == want;
  }
  check(right, "shuffles exchange the right values");
  check(launch("empty", &warp_sum_kernel<float>, 0, 0, sums.data()) != 0,
        "a block of 0 threads is an error");
  int counter = 0;
  setenv("CUDA_EMU_THREADS", "2", 1);
  check(capsnet_fused::cuda::launch_kernel("count", &count_kernel, dim3(7), dim3(96), 0, nullptr,
                                           &counter) == 0,
        "count launch");
  check(counter == 7 * 96, "atomicAdd counts every thread of every block");
  std::printf("selftest: %d failures\n", failures);
  return failures == 0 ? 0 : 1;
}

int mode_race() {
  std::vector<float> out(64);
  const int err = launch("racy", &racy_kernel, 64, 64 * sizeof(float), out.data());
  std::printf("race: launch returned %d\n", err);
  return 0;
}

int mode_overflow() {
  float* out = new float[64];
  const int err = launch("overflow", &overflow_kernel, 64, 0, out, 64);
  std::printf("overflow: launch returned %d\n", err);
  delete[] out;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "routing") return mode_routing(argc > 2 && std::string(argv[2]) == "quick");
  if (mode == "selftest") return mode_selftest();
  if (mode == "race") return mode_race();
  if (mode == "overflow") return mode_overflow();
  std::fprintf(stderr, "usage: %s routing|selftest|race|overflow\n", argv[0]);
  return 2;
}
