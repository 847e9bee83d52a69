// AVX-512 float32 GEMM micro-kernels with fused epilogues (included through detail/platform.h).
//
// Used for the hidden (wide) layers of a tile when the CPU has AVX-512 (checked at run time) and the
// activation is tanh or identity; everything else goes through BLAS + separate element-wise passes.
// One register block is 6 rows x 64 columns (24 zmm accumulators); columns beyond N are masked, so any
// width works (multiples of 16 waste nothing). Each output vector is handed to an epilogue before it is
// stored, which replaces the separate bias/activation/derivative passes and BLAS's C scaling.
//
//   mk_nn(M, N, K, A, lda, B, ldb, epi)   epi(i, j, v, mask) for v = (A B)[i, j:j+16]
//   mk_tn_acc(M, N, K, A, lda, B, ldb, C, ldc)   C += A^T B  (A: K x M, B: K x N)
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FASTODE_NO_AVX512)
#define FASTODE_HAVE_AVX512_KERNELS 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive inside avx512fintrin.h
#include <immintrin.h>

#include <cstdint>

namespace fastode {
namespace mk {

#define FASTODE_AVX512 __attribute__((target("avx512f,fma"), always_inline)) inline
#define FASTODE_AVX512_FN __attribute__((target("avx512f,fma")))

inline bool cpu_has_avx512() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  }();
  return ok;
}

FASTODE_AVX512 __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << remaining) - 1u);
}

// tanh: the same rational approximation as tanh_approx(float) in detail/activations.h
FASTODE_AVX512 __m512 tanh16(__m512 x) {
  const __m512 lim = _mm512_set1_ps(7.90531110763549805f);
  __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
  __m512 x2 = _mm512_mul_ps(xc, xc);
  __m512 p = _mm512_set1_ps(-2.76076847742355e-16f);
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(2.00018790482477e-13f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-8.60467152213735e-11f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(5.12229709037114e-08f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(1.48572235717979e-05f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(6.37261928875436e-04f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(4.89352455891786e-03f));
  p = _mm512_mul_ps(p, xc);
  __m512 q = _mm512_set1_ps(1.19825839466702e-06f);
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(1.18534705686654e-04f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(2.26843463243900e-03f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(4.89352518554385e-03f));
  __m512 r = _mm512_div_ps(p, q);
  __m512 ax = _mm512_abs_ps(x);
  __mmask16 tiny = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.0004f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(tiny, r, x);
}

// ------------------------------------------------------------------------------------------------
// C = A B for one block of MR rows and NV <= 4 column vectors starting at column j0; epilogue per vector.
template <int MR, class Epi>
FASTODE_AVX512 void nn_block(int64_t i0, int64_t j0, int64_t N, int64_t K, const float* A, int64_t lda,
                             const float* B, int64_t ldb, const Epi& epi) {
  __mmask16 mk[4];
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) mk[v] = tail_mask(N - j0 - 16 * v > 0 ? N - j0 - 16 * v : 0);
  __m512 acc[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* a = A + i0 * lda;
  const float* b = B + j0;
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) bv[v] = _mm512_maskz_loadu_ps(mk[v], b + k * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      __m512 av = _mm512_set1_ps(a[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v)
      if (mk[v]) epi(i0 + r, j0 + 16 * v, acc[r][v], mk[v]);
}

template <class Epi>
FASTODE_AVX512_FN void mk_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                             int64_t ldb, const Epi& epi) {
  for (int64_t j0 = 0; j0 < N; j0 += 64) {
    int64_t i = 0;
    for (; i + 6 <= M; i += 6) nn_block<6>(i, j0, N, K, A, lda, B, ldb, epi);
    switch (M - i) {
      case 5: nn_block<5>(i, j0, N, K, A, lda, B, ldb, epi); break;
      case 4: nn_block<4>(i, j0, N, K, A, lda, B, ldb, epi); break;
      case 3: nn_block<3>(i, j0, N, K, A, lda, B, ldb, epi); break;
      case 2: nn_block<2>(i, j0, N, K, A, lda, B, ldb, epi); break;
      case 1: nn_block<1>(i, j0, N, K, A, lda, B, ldb, epi); break;
      default: break;
    }
  }
}

// C[i0:i0+MR, j0:j0+64] += sum_k A[k, i] B[k, j]
template <int MR>
FASTODE_AVX512 void tn_block(int64_t i0, int64_t j0, int64_t N, int64_t K, const float* A, int64_t lda,
                             const float* B, int64_t ldb, float* C, int64_t ldc) {
  __mmask16 mk[4];
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) mk[v] = tail_mask(N - j0 - 16 * v > 0 ? N - j0 - 16 * v : 0);
  __m512 acc[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_maskz_loadu_ps(mk[v], C + (i0 + r) * ldc + j0 + 16 * v);
  const float* b = B + j0;
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) bv[v] = _mm512_maskz_loadu_ps(mk[v], b + k * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      __m512 av = _mm512_set1_ps(A[k * lda + i0 + r]);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v)
      if (mk[v]) _mm512_mask_storeu_ps(C + (i0 + r) * ldc + j0 + 16 * v, mk[v], acc[r][v]);
}

FASTODE_AVX512_FN inline void mk_tn_acc(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                                        const float* B, int64_t ldb, float* C, int64_t ldc) {
  for (int64_t j0 = 0; j0 < N; j0 += 64) {
    int64_t i = 0;
    for (; i + 6 <= M; i += 6) tn_block<6>(i, j0, N, K, A, lda, B, ldb, C, ldc);
    switch (M - i) {
      case 5: tn_block<5>(i, j0, N, K, A, lda, B, ldb, C, ldc); break;
      case 4: tn_block<4>(i, j0, N, K, A, lda, B, ldb, C, ldc); break;
      case 3: tn_block<3>(i, j0, N, K, A, lda, B, ldb, C, ldc); break;
      case 2: tn_block<2>(i, j0, N, K, A, lda, B, ldb, C, ldc); break;
      case 1: tn_block<1>(i, j0, N, K, A, lda, B, ldb, C, ldc); break;
      default: break;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Epilogues. TANH selects tanh (true) or identity (false); ld = width of the row-major outputs.

// forward hidden layer: h = act(v + c)
template <bool TANH>
struct EpiBiasAct {
  const float* c;
  float* h;
  int64_t ld;
  FASTODE_AVX512 void operator()(int64_t i, int64_t j, __m512 v, __mmask16 m) const {
    __m512 x = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, c + j));
    _mm512_mask_storeu_ps(h + i * ld + j, m, TANH ? tanh16(x) : x);
  }
};

// act'(a) from h = act(a)
template <bool TANH>
FASTODE_AVX512 __m512 d1_of(__m512 h) {
  return TANH ? _mm512_fnmadd_ps(h, h, _mm512_set1_ps(1.0f)) : _mm512_set1_ps(1.0f);
}

// probe VJP: g = v * act'(a)
template <bool TANH>
struct EpiMulD1 {
  const float* h;
  float* g;
  int64_t ld;
  FASTODE_AVX512 void operator()(int64_t i, int64_t j, __m512 v, __mmask16 m) const {
    __m512 hv = _mm512_maskz_loadu_ps(m, h + i * ld + j);
    _mm512_mask_storeu_ps(g + i * ld + j, m, _mm512_mul_ps(v, d1_of<TANH>(hv)));
  }
};

// double backward, VJP chain: pb = v act'(a); acc += v * g * act''/act' (= -2h for tanh, 0 for identity)
template <bool TANH>
struct EpiBwd1 {
  const float* h;
  const float* g;
  float* pb;
  float* acc;
  int64_t ld;
  FASTODE_AVX512 void operator()(int64_t i, int64_t j, __m512 v, __mmask16 m) const {
    const int64_t o = i * ld + j;
    __m512 hv = _mm512_maskz_loadu_ps(m, h + o);
    _mm512_mask_storeu_ps(pb + o, m, _mm512_mul_ps(v, d1_of<TANH>(hv)));
    if (TANH) {
      __m512 gv = _mm512_maskz_loadu_ps(m, g + o);
      __m512 t = _mm512_mul_ps(_mm512_mul_ps(v, gv), _mm512_mul_ps(hv, _mm512_set1_ps(-2.0f)));
      _mm512_mask_storeu_ps(acc + o, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + o), t));
    }
  }
};

// backward, forward chain: out = v act'(a) (+ acc); dc += out (bias gradient of the layer below)
template <bool TANH>
struct EpiBwd2 {
  const float* h;
  const float* acc;  // may be null
  float* out;
  float* dc;  // may be null
  int64_t ld;
  FASTODE_AVX512 void operator()(int64_t i, int64_t j, __m512 v, __mmask16 m) const {
    const int64_t o = i * ld + j;
    __m512 x = _mm512_mul_ps(v, d1_of<TANH>(_mm512_maskz_loadu_ps(m, h + o)));
    if (acc) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, acc + o));
    _mm512_mask_storeu_ps(out + o, m, x);
    if (dc) _mm512_mask_storeu_ps(dc + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dc + j), x));
  }
};

}  // namespace mk
}  // namespace fastode

#pragma GCC diagnostic pop
#endif
