// Peak FMA throughput of one core, the floor behind the CPU figures in the README: 256-bit FMAs,
// and 512-bit ones where the CPU has AVX-512.
//   g++ -O2 bench/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak
// Run one copy per core at once (`/tmp/fma_peak & /tmp/fma_peak & wait`) to see whether the
// cores share FMA units. Ten independent accumulator chains hide the FMA latency.
#include <immintrin.h>

#include <chrono>
#include <cstdio>

constexpr long kIters = 200000000;

// One core's rate of Bits-bit FMAs (ten chains of kIters each), and its float32 GFLOP/s. A macro,
// so that each body is compiled inside a function with its instruction set as a target.
#define CAPSNET_FMA_PEAK(Bits, V, set1, fmadd)                                                 \
  V acc[10];                                                                                   \
  for (int k = 0; k < 10; ++k) acc[k] = set1(k * 0.001f);                                      \
  const V x = set1(0.999999f), y = set1(1e-7f);                                                \
  const auto start = std::chrono::steady_clock::now();                                         \
  for (long i = 0; i < kIters; ++i) {                                                          \
    _Pragma("GCC unroll 10") for (int k = 0; k < 10; ++k) acc[k] = fmadd(acc[k], x, y);        \
  }                                                                                            \
  const double s =                                                                             \
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();         \
  const double rate = kIters * 10 / s;                                                         \
  float sum = 0; /* keeps the loop from being optimised away */                                \
  for (int k = 0; k < 10; ++k) sum += acc[k][0];                                               \
  std::printf("%.2f G %d-bit FMA/s on one core = %.0f GFLOP/s float32 (checksum %g)\n",       \
              rate / 1e9, Bits, rate * 2 * Bits / 32 / 1e9, sum);

__attribute__((target("avx2,fma"))) void peak256() {
  CAPSNET_FMA_PEAK(256, __m256, _mm256_set1_ps, _mm256_fmadd_ps)
}

__attribute__((target("avx512f"))) void peak512() {
  CAPSNET_FMA_PEAK(512, __m512, _mm512_set1_ps, _mm512_fmadd_ps)
}

int main() {
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) peak256();
  if (__builtin_cpu_supports("avx512f")) peak512();
}
