// The machine's single-core floor for the CPU roofline (bench/bench_roofline.py): the FP32 fused multiply-add
// rate and the L1 / L2 / memory read bandwidth, measured with the widest vector unit the CPU has.
//
// FMA: 12 independent accumulators per thread (enough to cover the FMA latency of current cores: 4-5 cycles x 2
// pipes), each updated by acc = acc * a + b with constants that keep the values finite; counted as 2 flops per lane.
// Bandwidth: the sum of a buffer of the given size read over and over (8 accumulators; the buffer stays in that
// cache level), counted in bytes read. Best of repeats (the floor: what the core can do, not what it usually does).
// Output: one JSON object on stdout. Build: c++ -O3 -std=c++17 peak.cpp (the vector paths carry their own targets;
// the accumulator loops are unrolled so that the accumulators stay in registers -- checked in the disassembly).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

volatile float g_sink;  // keeps results observable

__attribute__((target("avx2,fma"))) double fma_avx2(long iters) {
  __m256 acc[12];
  for (int k = 0; k < 12; ++k) acc[k] = _mm256_set1_ps(0.001f * float(k + 1));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  const double t0 = seconds();
  for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int k = 0; k < 12; ++k) acc[k] = _mm256_fmadd_ps(acc[k], a, b);
  }
  const double t = seconds() - t0;
  __m256 s = acc[0];
  for (int k = 1; k < 12; ++k) s = _mm256_add_ps(s, acc[k]);
  float out[8];
  _mm256_storeu_ps(out, s);
  g_sink = out[0];
  return double(iters) * 12 * 8 * 2 / t;
}

__attribute__((target("avx512f"))) double fma_avx512(long iters) {
  __m512 acc[12];
  for (int k = 0; k < 12; ++k) acc[k] = _mm512_set1_ps(0.001f * float(k + 1));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  const double t0 = seconds();
  for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int k = 0; k < 12; ++k) acc[k] = _mm512_fmadd_ps(acc[k], a, b);
  }
  const double t = seconds() - t0;
  __m512 s = acc[0];
  for (int k = 1; k < 12; ++k) s = _mm512_add_ps(s, acc[k]);
  g_sink = _mm512_reduce_add_ps(s);
  return double(iters) * 12 * 16 * 2 / t;
}

__attribute__((target("avx2"))) double read_bandwidth(const std::vector<float>& buf, long passes) {
  const long n = long(buf.size()) / 64 * 64;
  __m256 acc[8];
  for (auto& x : acc) x = _mm256_setzero_ps();
  const double t0 = seconds();
  for (long p = 0; p < passes; ++p)
    for (long i = 0; i < n; i += 64) {
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) acc[k] = _mm256_add_ps(acc[k], _mm256_loadu_ps(buf.data() + i + 8 * k));
    }
  const double t = seconds() - t0;
  __m256 s = acc[0];
  for (int k = 1; k < 8; ++k) s = _mm256_add_ps(s, acc[k]);
  float out[8];
  _mm256_storeu_ps(out, s);
  g_sink = out[0];
  return double(n) * sizeof(float) * passes / t;
}

template <typename F>
double best(int repeats, F&& f) {
  double b = 0;
  for (int r = 0; r < repeats; ++r) b = std::max(b, f());
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  const double scale = argc > 1 ? std::atof(argv[1]) : 1.0;  // < 1 for a quick run (tests)
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!avx2) {
    std::printf("{\"error\": \"this CPU has no AVX2 + FMA\"}\n");
    return 1;
  }
  const long iters = long(2e7 * scale) + 1000;
  const double fma256 = best(5, [&] { return fma_avx2(iters); });
  const double fma512 = avx512 ? best(5, [&] { return fma_avx512(iters); }) : 0.0;
  auto bw = [&](size_t bytes, double work) {
    std::vector<float> buf(bytes / sizeof(float), 1.0f);
    const long passes = std::max(1L, long(work * scale / double(bytes)));
    return best(5, [&] { return read_bandwidth(buf, passes); });
  };
  const double l1 = bw(16 << 10, 4e9), l2 = bw(256 << 10, 4e9), mem = bw(256 << 20, 2e9);
  std::printf("{\"avx2_fma_flops\": %.6g, \"avx512_fma_flops\": %.6g, \"avx512\": %s, \"l1_read_bytes_per_s\": %.6g, "
              "\"l2_read_bytes_per_s\": %.6g, \"mem_read_bytes_per_s\": %.6g}\n",
              fma256, fma512, avx512 ? "true" : "false", l1, l2, mem);
  return 0;
}
