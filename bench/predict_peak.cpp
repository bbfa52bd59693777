// The u_hat prediction's inner loop alone (csrc/routing_cpu.cpp, product_block with P = 2 sample
// vectors of 16 float32 lanes and K = 8 values of m in registers), on one core, against the FMA
// peak of bench/fma_peak.cpp: how far the CPU kernels' main loop can go on this CPU, apart from
// everything around it (dot products, softmaxes, weighted sums, gradients).
//   g++ -O3 -march=native bench/predict_peak.cpp -o /tmp/predict_peak && /tmp/predict_peak
// Needs a CPU with AVX-512 (64-byte vectors, as the kernels' x86-64-v4 clone). Two rows:
//   W_i in L1: one input capsule's weights (J N M = 1280 floats, 5 KB) predicted over and over;
//   W streamed: every input capsule of the MNIST shape (W: 5.9 MB, from L3), as one sweep of a
//   group of two sample vectors does, u_hat stored (the later sweeps) or added to s with a
//   coupling (the first sweep).
#include <chrono>
#include <cstdio>
#include <cstdlib>

#if !defined(__AVX512F__)
#error "predict_peak needs -march with AVX-512 (the kernels' 64-byte sample vectors)"
#endif

typedef float V __attribute__((vector_size(64)));
constexpr int I = 1152, J = 10, N = 8, M = 16, JM = J * M, JNM = J * N * M, K = 8;

enum class Out { kStore, kAccumulate };

// u_hat of input capsules [0, caps) for the two sample vectors u [caps, 2, N]; w_stride 0
// repeats capsule 0's weights (L1), JNM walks W.
template <Out out>
__attribute__((noinline)) void predict(const float* __restrict w, long w_stride, const V* u,
                                       long caps, V* __restrict uh) {
  for (long i = 0; i < caps; ++i) {
    const float* w_i = w + i * w_stride;
    const V* u0 = u + (i * 2) * N;
    const V* u1 = u0 + N;
    for (int j = 0; j < J; ++j) {
      for (int m = 0; m < M; m += K) {
        const float* wb = w_i + j * N * M + m;
        V a0[K] = {}, a1[K] = {};
        for (int n = 0; n < N; ++n) {
          const V x0 = u0[n], x1 = u1[n];
#pragma GCC unroll 8
          for (int k = 0; k < K; ++k) {
            a0[k] += wb[n * M + k] * x0;
            a1[k] += wb[n * M + k] * x1;
          }
        }
#pragma GCC unroll 8
        for (int k = 0; k < K; ++k) {
          if constexpr (out == Out::kStore) {
            uh[j * M + m + k] = a0[k];
            uh[JM + j * M + m + k] = a1[k];
          } else {
            uh[j * M + m + k] += 0.1f * a0[k];
            uh[JM + j * M + m + k] += 0.1f * a1[k];
          }
        }
      }
    }
  }
}

template <Out out>
void report(const char* name, const float* w, long w_stride, const V* u, long caps, int reps) {
  V* uh = static_cast<V*>(std::aligned_alloc(64, sizeof(V) * 2 * JM));
  for (int q = 0; q < 2 * JM; ++q) uh[q] = V{};
  predict<out>(w, w_stride, u, caps, uh);  // warm-up
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) predict<out>(w, w_stride, u, caps, uh);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double fmas = double(reps) * caps * 2 * JNM;
  float sum = 0;  // keeps the stores from being optimised away
  for (int q = 0; q < 2 * JM; ++q) sum += uh[q][0];
  std::printf("%-40s %.2f G 512-bit FMA/s (checksum %g)\n", name, fmas / s / 1e9, sum);
  std::free(uh);
}

int main() {
  float* w = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * I * JNM));
  for (long q = 0; q < long{I} * JNM; ++q) w[q] = 0.001f * static_cast<float>(q % 7);
  V* u = static_cast<V*>(std::aligned_alloc(64, sizeof(V) * I * 2 * N));
  for (long q = 0; q < long{I} * 2 * N; ++q) u[q] = V{} + 0.5f;
  for (int round = 0; round < 2; ++round) {
    report<Out::kStore>("W_i in L1, u_hat stored", w, 0, u, I, 200);
    report<Out::kStore>("W streamed (5.9 MB), u_hat stored", w, JNM, u, I, 200);
    report<Out::kAccumulate>("W streamed (5.9 MB), added to s", w, JNM, u, I, 200);
  }
  std::free(u);
  std::free(w);
}
