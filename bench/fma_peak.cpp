// Peak 256-bit FMA throughput of one core, the floor behind the CPU figures in the README:
//   g++ -O2 -mavx2 -mfma bench/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak
// Ten independent accumulator chains hide the FMA latency.
#include <immintrin.h>

#include <chrono>
#include <cstdio>

int main() {
  __m256 acc[10];
  for (int k = 0; k < 10; ++k) acc[k] = _mm256_set1_ps(k * 0.001f);
  const __m256 x = _mm256_set1_ps(0.999999f), y = _mm256_set1_ps(1e-7f);
  const long iters = 200000000;
  const auto start = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 10
    for (int k = 0; k < 10; ++k) acc[k] = _mm256_fmadd_ps(acc[k], x, y);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  float sum = 0;  // keeps the loop from being optimised away
  for (int k = 0; k < 10; ++k) sum += acc[k][0];
  std::printf("%.2f G 256-bit FMA/s on one core (checksum %g)\n", iters * 10 / s / 1e9, sum);
}
