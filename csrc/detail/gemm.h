// GEMM of the core: row-major wrappers over the process's Fortran BLAS (sgemm_/dgemm_, found with dlsym), or
// built-in loops; thin GEMMs (a dimension <= kThin) as plain vectorised loops.
#pragma once

#include "detail/platform.h"

namespace fastode {
namespace detail {  // shared by every translation unit (defined in gemm.cpp)

// ===================================================================================================
// GEMM (row-major wrappers over column-major Fortran BLAS, or built-in loops).
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                          const float*, const int*, const float*, const int*, const float*, float*,
                          const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*,
                          const int*);
using set_threads_fn = int (*)(int);

struct Blas {
  sgemm_fn s = nullptr;
  dgemm_fn d = nullptr;
  set_threads_fn set_local = nullptr;  // MKL_Set_Num_Threads_Local, when the BLAS is MKL
  bool use = false;
};

Blas& blas();
extern bool g_use_blas_override_set;  // set_gemm_backend("blas" | "fallback") overrides the automatic choice
extern bool g_use_blas;
extern bool g_use_mk;

}  // namespace detail

namespace {  // internal linkage: each translation unit has its own copy (see platform.h)
using detail::blas;
using detail::g_use_blas;
using detail::g_use_blas_override_set;
using detail::g_use_mk;

// Keeps BLAS single-threaded in the calling thread for the lifetime of the guard.
struct BlasThreadGuard {
  int prev = -1;
  BlasThreadGuard() {
    if (blas().use && blas().set_local) prev = blas().set_local(1);
  }
  ~BlasThreadGuard() {
    if (prev >= 0) blas().set_local(prev);
  }
};

inline void blas_call(const char* ta, const char* tb, int m, int n, int k, float alpha, const float* a,
                      int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  blas().s(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas_call(const char* ta, const char* tb, int m, int n, int k, double alpha, const double* a,
                      int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  blas().d(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

template <typename T>
FASTODE_CLONES void fb_scale(int64_t M, int64_t N, T* C, int64_t ldc, T beta) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
}
// C (M x N) = A (M x K) B (K x N) + beta C
template <typename T>
FASTODE_CLONES void fb_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                          int64_t ldb, T beta, T* C, int64_t ldc) {
  fb_scale(M, N, C, ldc, beta);
  for (int64_t i = 0; i < M; ++i) {
    T* __restrict ci = C + i * ldc;
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[i * lda + k];
      const T* __restrict bk = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) ci[j] += a * bk[j];
    }
  }
}
// C (M x N) = A^T B + beta C, A (K x M), B (K x N)
template <typename T>
FASTODE_CLONES void fb_tn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                          int64_t ldb, T beta, T* C, int64_t ldc) {
  fb_scale(M, N, C, ldc, beta);
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict bk = B + k * ldb;
    for (int64_t i = 0; i < M; ++i) {
      const T a = A[k * lda + i];
      T* __restrict ci = C + i * ldc;
      for (int64_t j = 0; j < N; ++j) ci[j] += a * bk[j];
    }
  }
}
// C (M x N) = A B^T + beta C, A (M x K), B (N x K)
template <typename T>
FASTODE_CLONES void fb_nt(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                          int64_t ldb, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    const T* __restrict ai = A + i * lda;
    for (int64_t j = 0; j < N; ++j) {
      const T* __restrict bj = B + j * ldb;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += ai[k] * bj[k];
      C[i * ldc + j] = beta == T(0) ? s : s + beta * C[i * ldc + j];
    }
  }
}

// Thin GEMMs: one of the non-batch dimensions is at most kThin (the D-wide first and last layers of a
// CNF MLP). BLAS spends microseconds of overhead on these; plain loops vectorised over the wide
// dimension take a fraction of that. Small transposed copies go to a thread-local buffer.
constexpr int64_t kThin = 8;

template <typename T>
T* thin_scratch(int64_t n) {
  thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// C (M x N) = A (M x K) Bt^T + beta C with N <= kThin; Bt is (N x K) row-major (dot products)
template <typename T>
FASTODE_CLONES void thin_dots(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bt, int64_t ldb,
                              T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    const T* __restrict a = A + i * lda;
    for (int64_t j = 0; j < N; ++j) {
      const T* __restrict b = Bt + j * ldb;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += a[k] * b[k];
      C[i * ldc + j] = beta == T(0) ? s : beta * C[i * ldc + j] + s;
    }
  }
}

// C (M x N) = A (M x K) B (K x N) + beta C with K <= kThin
template <typename T>
FASTODE_CLONES void thin_nn_k(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                              T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    T* __restrict c = C + i * ldc;
    const T* a = A + i * lda;
    if (beta == T(0))
      for (int64_t j = 0; j < N; ++j) c[j] = a[0] * B[j];
    else
      for (int64_t j = 0; j < N; ++j) c[j] = beta * c[j] + a[0] * B[j];
    for (int64_t k = 1; k < K; ++k) {
      const T ak = a[k];
      const T* __restrict bk = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += ak * bk[j];
    }
  }
}

// C (M x N) = A (M x K) B^T + beta C with K <= kThin; B is (N x K): thin_nn_k on a transposed copy of B
template <typename T>
void thin_nt_k(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
               int64_t ldc) {
  T* BT = thin_scratch<T>(K * N);  // (K x N)
  for (int64_t j = 0; j < N; ++j)
    for (int64_t k = 0; k < K; ++k) BT[k * N + j] = B[j * ldb + k];
  thin_nn_k(M, N, K, A, lda, BT, N, beta, C, ldc);
}

// C (M x N) = A^T B + beta C with A (K x M), B (K x N), M <= kThin
template <typename T>
FASTODE_CLONES void thin_tn_m(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                              T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    T* __restrict c = C + i * ldc;
    if (beta == T(0))
      for (int64_t j = 0; j < N; ++j) c[j] = 0;
    else if (beta != T(1))
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict bk = B + k * ldb;
    for (int64_t i = 0; i < M; ++i) {
      const T a = A[k * lda + i];
      T* __restrict c = C + i * ldc;
      for (int64_t j = 0; j < N; ++j) c[j] += a * bk[j];
    }
  }
}

// C (M x N) = A^T B + beta C with A (K x M), B (K x N), N <= kThin (accumulated transposed)
template <typename T>
FASTODE_CLONES void thin_tn_n(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                              T beta, T* C, int64_t ldc) {
  T* CT = thin_scratch<T>(N * M);  // (N x M)
  std::fill(CT, CT + N * M, T(0));
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict ak = A + k * lda;
    for (int64_t j = 0; j < N; ++j) {
      const T b = B[k * ldb + j];
      T* __restrict ct = CT + j * M;
      for (int64_t i = 0; i < M; ++i) ct[i] += b * ak[i];
    }
  }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j)
      C[i * ldc + j] = (beta == T(0) ? T(0) : beta * C[i * ldc + j]) + CT[j * M + i];
}


inline bool use_blas() { return blas().use && (!g_use_blas_override_set || g_use_blas); }

inline bool use_microkernels() {
#ifdef FASTODE_HAVE_AVX512_KERNELS
  static const bool env_ok = [] {
    const char* f = std::getenv("FASTODE_GEMM");
    return !(f && (std::string(f) == "fallback" || std::string(f) == "blas"));
  }();
  return env_ok && g_use_mk && mk::cpu_has_avx512();
#else
  return false;
#endif
}

// Row-major C = A B^T (A: M x K, B: N x K)
template <typename T>
void gemm_nt(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
             int64_t ldc, T beta) {
  if (M == 0 || N == 0) return;
  if (K == 0) return fb_scale(M, N, C, ldc, beta);
  if (K <= kThin) return thin_nt_k(M, N, K, A, lda, B, ldb, beta, C, ldc);
  if (N <= kThin) return thin_dots(M, N, K, A, lda, B, ldb, beta, C, ldc);
  if (use_blas())
    blas_call("T", "N", int(N), int(M), int(K), T(1), B, int(ldb), A, int(lda), beta, C, int(ldc));
  else
    fb_nt(M, N, K, A, lda, B, ldb, beta, C, ldc);
}
// Row-major C = A B (A: M x K, B: K x N)
template <typename T>
void gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
             int64_t ldc, T beta) {
  if (M == 0 || N == 0) return;
  if (K == 0) return fb_scale(M, N, C, ldc, beta);
  if (K <= kThin) return thin_nn_k(M, N, K, A, lda, B, ldb, beta, C, ldc);
  if (N <= kThin) {
    T* Bt = thin_scratch<T>(N * K);  // (N x K)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < N; ++j) Bt[j * K + k] = B[k * ldb + j];
    return thin_dots(M, N, K, A, lda, Bt, K, beta, C, ldc);
  }
  if (use_blas())
    blas_call("N", "N", int(N), int(M), int(K), T(1), B, int(ldb), A, int(lda), beta, C, int(ldc));
  else
    fb_nn(M, N, K, A, lda, B, ldb, beta, C, ldc);
}
// Row-major C = A^T B (A: K x M, B: K x N)
template <typename T>
void gemm_tn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
             int64_t ldc, T beta) {
  if (M == 0 || N == 0) return;
  if (K == 0) return fb_scale(M, N, C, ldc, beta);
  if (M <= kThin) return thin_tn_m(M, N, K, A, lda, B, ldb, beta, C, ldc);
  if (N <= kThin) return thin_tn_n(M, N, K, A, lda, B, ldb, beta, C, ldc);
  if (use_blas())
    blas_call("N", "T", int(N), int(M), int(K), T(1), B, int(ldb), A, int(lda), beta, C, int(ldc));
  else
    fb_tn(M, N, K, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace
}  // namespace fastode
