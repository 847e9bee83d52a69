// fastode C++ core (see fastode.h). One translation unit, no torch headers.
//
// Performance notes
// - Batches are cut into tiles of `Exec::tile` rows. A tile runs the whole MLP forward, the probe VJPs and
//   (in a fused RK step) every stage before the next tile starts, so its intermediates stay in L1/L2.
// - float32 with tanh / identity on an AVX-512 CPU (checked at run time): the wide layers use the
//   micro-kernels of microkernels.h (6 x 64 register blocks) with the bias/activation/derivative passes
//   fused into their epilogues. Otherwise the GEMMs go to the process's BLAS (MKL inside libtorch_cpu)
//   through sgemm_/dgemm_, limited to one thread per call (MKL_Set_Num_Threads_Local) so that results do
//   not depend on the thread count; GEMMs with a dimension <= kThin (the D-wide first and last layers) use
//   plain vectorised loops. Parallelism is OpenMP over chunks of tiles.
// - Element-wise epilogues are compiled three times (x86-64-v4 / v3 / baseline) with GCC target_clones
//   and picked at load time by the CPU, so one binary is portable and still uses AVX2/AVX-512.
// - float32 tanh uses a rational approximation (|error| <= 3.5e-7 absolute, <= 6 ulp) that vectorises;
//   float64 uses std::tanh and the other activations use libm (correct first, not the benchmark path).
#include "fastode.h"

#include <dlfcn.h>

#include <type_traits>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FASTODE_NO_CLONES)
#define FASTODE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTODE_CLONES
#endif

#include "microkernels.h"

namespace fastode {

int act_from_name(const std::string& name) {
  if (name == "tanh") return kTanh;
  if (name == "softplus") return kSoftplus;
  if (name == "elu") return kElu;
  if (name == "swish") return kSwish;
  if (name == "identity") return kIdentity;
  throw std::invalid_argument("fastode: unknown activation '" + name +
                              "'; expected one of tanh, softplus, elu, swish, identity");
}

namespace {

// ===================================================================================================
// Activations: value, first and second derivative. d1/d2 get both the pre-activation a and h = act(a);
// `needs_a` says whether a must be stored for the backward pass (tanh and identity need only h).
inline float tanh_approx(float x) {
  // Rational minimax approximation on [-7.9053, 7.9053] (beyond it tanh(x) rounds to +-1 in float).
  const float lim = 7.90531110763549805f;
  float xc = x < -lim ? -lim : (x > lim ? lim : x);
  float x2 = xc * xc;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * xc;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  float r = p / q;
  return std::fabs(x) < 0.0004f ? x : r;
}
inline double tanh_approx(double x) { return std::tanh(x); }

// float32 exp / expm1 / log1p written as branch-free arithmetic so that the element-wise loops vectorise
// (Cephes-style range reduction and polynomials; relative error ~1e-7). float64 uses libm.
inline float exp_f(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);  // keeps 2^n a normal float
  float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  int32_t n = int32_t(fx) + 127;
  return y * __builtin_bit_cast(float, n << 23);
}
inline double exp_f(double x) { return std::exp(x); }

inline float expm1_f(float x) {
  // |x| < 0.35: Taylor series (no cancellation); else exp(x) - 1
  float p = 1.0f / 40320.0f;
  p = p * x + 1.0f / 5040.0f;
  p = p * x + 1.0f / 720.0f;
  p = p * x + 1.0f / 120.0f;
  p = p * x + 1.0f / 24.0f;
  p = p * x + 1.0f / 6.0f;
  p = p * x + 0.5f;
  p = p * x * x + x;
  float e = exp_f(x) - 1.0f;
  return std::fabs(x) < 0.35f ? p : e;
}
inline double expm1_f(double x) { return std::expm1(x); }

inline float log_f(float x) {  // x > 0, finite
  int32_t bits = __builtin_bit_cast(int32_t, x);
  int32_t e = ((bits >> 23) & 0xff) - 126;
  float m = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f000000);  // m in [0.5, 1)
  bool small = m < 0.707106781186547524f;
  float fe = float(small ? e - 1 : e);
  float z = small ? m + m - 1.0f : m - 1.0f;
  float z2 = z * z;
  float y = 7.0376836292e-2f;
  y = y * z - 1.1514610310e-1f;
  y = y * z + 1.1676998740e-1f;
  y = y * z - 1.2420140846e-1f;
  y = y * z + 1.4249322787e-1f;
  y = y * z - 1.6668057665e-1f;
  y = y * z + 2.0000714765e-1f;
  y = y * z - 2.4999993993e-1f;
  y = y * z + 3.3333331174e-1f;
  y = y * z * z2;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z2;
  return z + y + 0.693359375f * fe;
}
inline float log1p_f(float x) {  // x > -1; log(u) * x / (u - 1) with u = 1 + x corrects the rounding of u
  float u = 1.0f + x;
  float d = u - 1.0f;
  float l = log_f(u);
  return d == 0.0f ? x : l * (x / d);
}
inline double log1p_f(double x) { return std::log1p(x); }

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + exp_f(-x));
}

template <int ACT, typename T>
struct ActF;
template <typename T>
struct ActF<kTanh, T> {
  static constexpr bool needs_a = false;
  static constexpr bool store_g = true;  // act''/act' = -2h: the backward needs only g = p * act'
  static T r(T, T h) { return T(-2) * h; }
  static T f(T a) { return tanh_approx(a); }
  static T d1(T, T h) { return T(1) - h * h; }
  static T d2(T, T h) { return T(-2) * h * (T(1) - h * h); }
};
template <typename T>
struct ActF<kIdentity, T> {
  static constexpr bool needs_a = false;
  static constexpr bool store_g = true;
  static T r(T, T) { return T(0); }
  static T f(T a) { return a; }
  static T d1(T, T) { return T(1); }
  static T d2(T, T) { return T(0); }
};
template <typename T>
struct ActF<kSoftplus, T> {  // torch.nn.functional.softplus (beta 1, threshold 20)
  static constexpr bool needs_a = true;
  static constexpr bool store_g = true;  // act''/act' = 1 - sigmoid(a) (0 above the threshold)
  static T r(T a, T) { return a > T(20) ? T(0) : T(1) - sigmoid(a); }
  static T f(T a) { return a > T(20) ? a : log1p_f(exp_f(a)); }
  // derivatives as in fastode.nn.functional.activation_grad: linear above the threshold 20
  static T d1(T a, T) { return a > T(20) ? T(1) : sigmoid(a); }
  static T d2(T a, T) {
    T s = sigmoid(a);
    return a > T(20) ? T(0) : s * (T(1) - s);
  }
};
template <typename T>
struct ActF<kElu, T> {  // alpha 1
  static constexpr bool needs_a = true;
  static constexpr bool store_g = true;  // act''/act' = 0 (a > 0) or 1
  static T r(T a, T) { return a > T(0) ? T(0) : T(1); }
  static T f(T a) { return a > T(0) ? a : expm1_f(a); }
  static T d1(T a, T) { return a > T(0) ? T(1) : exp_f(a); }
  static T d2(T a, T) { return a > T(0) ? T(0) : exp_f(a); }
};
template <typename T>
struct ActF<kSwish, T> {  // x * sigmoid(x)
  static constexpr bool needs_a = true;
  static constexpr bool store_g = false;  // act' has zeros: keep p and recompute g
  static T r(T, T) { return T(0); }
  static T f(T a) { return a * sigmoid(a); }
  static T d1(T a, T) {
    T s = sigmoid(a);
    return s * (T(1) + a * (T(1) - s));
  }
  static T d2(T a, T) {
    T s = sigmoid(a);
    return s * (T(1) - s) * (T(2) + a * (T(1) - T(2) * s));
  }
};

// ===================================================================================================
// Element-wise kernels (multi-versioned). Arrays are contiguous; `a` may be null when !needs_a.
// The probe VJP saves, per hidden layer, either g = p * act'(a) (store_g: act''/act' is a function of
// (a, h), so the backward needs only g) or p (swish).

// x (R x m) holds h W'^T; x <- act(x + c), a <- x + c (if needs_a)
template <int ACT, typename T>
FASTODE_CLONES void ew_bias_act(int64_t R, int64_t m, T* __restrict x, const T* __restrict c,
                                T* __restrict a) {
  using A = ActF<ACT, T>;
  for (int64_t i = 0; i < R; ++i) {
    T* xi = x + i * m;
    if constexpr (A::needs_a) {
      T* ai = a + i * m;
      for (int64_t j = 0; j < m; ++j) {
        T v = xi[j] + c[j];
        ai[j] = v;
        xi[j] = A::f(v);
      }
    } else {
      for (int64_t j = 0; j < m; ++j) xi[j] = A::f(xi[j] + c[j]);
    }
  }
}

template <typename T>
FASTODE_CLONES void ew_bias(int64_t R, int64_t m, T* __restrict x, const T* __restrict c) {
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < m; ++j) x[i * m + j] += c[j];
}

// g = p * act'(a)
template <int ACT, typename T>
FASTODE_CLONES void ew_mul_d1(int64_t n, const T* __restrict p, const T* __restrict a,
                              const T* __restrict h, T* __restrict g) {
  using A = ActF<ACT, T>;
  for (int64_t i = 0; i < n; ++i) g[i] = p[i] * A::d1(A::needs_a ? a[i] : T(0), h[i]);
}

// pb = gb * act'(a);  acc += gb * p * act''(a)   (x = g = p act' when store_g, else x = p)
template <int ACT, typename T>
FASTODE_CLONES void ew_bwd1(int64_t n, const T* __restrict gb, const T* __restrict x,
                            const T* __restrict a, const T* __restrict h, T* __restrict pb,
                            T* __restrict acc) {
  using A = ActF<ACT, T>;
  for (int64_t i = 0; i < n; ++i) {
    T av = A::needs_a ? a[i] : T(0);
    pb[i] = gb[i] * A::d1(av, h[i]);
    if constexpr (A::store_g)
      acc[i] += gb[i] * x[i] * A::r(av, h[i]);
    else
      acc[i] += gb[i] * x[i] * A::d2(av, h[i]);
  }
}

// out = hb * act'(a) (+ acc)   (out may alias acc)
template <int ACT, typename T>
FASTODE_CLONES void ew_bwd2(int64_t n, const T* __restrict hb, const T* __restrict a,
                            const T* __restrict h, const T* acc, T* out) {
  using A = ActF<ACT, T>;
  if (acc) {
    for (int64_t i = 0; i < n; ++i) out[i] = hb[i] * A::d1(A::needs_a ? a[i] : T(0), h[i]) + acc[i];
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = hb[i] * A::d1(A::needs_a ? a[i] : T(0), h[i]);
  }
}

// c[j] += sum_i x[i, j]
template <typename T>
FASTODE_CLONES void ew_colsum(int64_t R, int64_t m, const T* __restrict x, T* __restrict c) {
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < m; ++j) c[j] += x[i * m + j];
}

// out = y0 + sum_j w[j] k[j] (flat), summed in torchdiffeq's order: (sum_j w_j k_j) + y0
template <typename T>
FASTODE_CLONES void ew_combine(int64_t n, const T* __restrict y0, int nk, const T* const* k, const T* w,
                               T* __restrict out) {
  if (nk == 0) {
    if (out != y0) std::memcpy(out, y0, sizeof(T) * n);
    return;
  }
  {
    const T* __restrict k0 = k[0];
    const T w0 = w[0];
    for (int64_t i = 0; i < n; ++i) out[i] = w0 * k0[i];
  }
  for (int j = 1; j < nk; ++j) {
    const T* __restrict kj = k[j];
    const T wj = w[j];
    if (wj == T(0)) continue;
    for (int64_t i = 0; i < n; ++i) out[i] += wj * kj[i];
  }
  for (int64_t i = 0; i < n; ++i) out[i] += y0[i];
}

// out = sum_j w[j] k[j] (flat)
template <typename T>
FASTODE_CLONES void ew_lincomb(int64_t n, int nk, const T* const* k, const T* w, T* __restrict out) {
  std::memset(out, 0, sizeof(T) * n);
  for (int j = 0; j < nk; ++j) {
    const T* __restrict kj = k[j];
    const T wj = w[j];
    if (wj == T(0)) continue;
    for (int64_t i = 0; i < n; ++i) out[i] += wj * kj[i];
  }
}

// sum of squared scaled error per column of (R x ncol) arrays; adds into ss[ncol]
template <typename T>
void ew_err_sumsq(int64_t R, int64_t ncol, const T* y0, const T* y1, const T* err, const double* atol,
                  const double* rtol, double* ss) {
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < ncol; ++j) {
      int64_t idx = i * ncol + j;
      double sc = atol[j] + rtol[j] * std::max(std::fabs(double(y0[idx])), std::fabs(double(y1[idx])));
      double r = double(err[idx]) / sc;
      ss[j] += r * r;
    }
}

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

Blas load_blas() {
  Blas b;
  b.s = reinterpret_cast<sgemm_fn>(dlsym(RTLD_DEFAULT, "sgemm_"));
  b.d = reinterpret_cast<dgemm_fn>(dlsym(RTLD_DEFAULT, "dgemm_"));
  void* lib = nullptr;
  if ((!b.s || !b.d) && std::getenv("FASTODE_BLAS_LIB")) {
    lib = dlopen(std::getenv("FASTODE_BLAS_LIB"), RTLD_NOW | RTLD_GLOBAL);
    if (lib) {
      b.s = reinterpret_cast<sgemm_fn>(dlsym(lib, "sgemm_"));
      b.d = reinterpret_cast<dgemm_fn>(dlsym(lib, "dgemm_"));
    }
  }
  b.set_local = reinterpret_cast<set_threads_fn>(dlsym(lib ? lib : RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  const char* force = std::getenv("FASTODE_GEMM");
  b.use = b.s && b.d && !(force && std::string(force) == "fallback");
  return b;
}

Blas& blas() {
  static Blas b = load_blas();
  return b;
}

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

bool g_use_blas_override_set = false;
bool g_use_blas = true;
bool g_use_mk = true;  // AVX-512 micro-kernels for the wide layers (float32, tanh / identity)

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

// ===================================================================================================
// Thread-local scratch arena (grows, never shrinks; 64-byte aligned).
struct Arena {
  void* p = nullptr;
  size_t n = 0;
  ~Arena() { std::free(p); }
  void* get(size_t bytes) {
    if (bytes > n) {
      std::free(p);
      n = (bytes + 4095) / 4096 * 4096;
      p = std::aligned_alloc(64, n);
      if (!p) {
        n = 0;
        throw std::bad_alloc();
      }
    }
    return p;
  }
};
thread_local Arena t_arena;

// Bump allocator: measure (base == nullptr) or carve.
struct Bump {
  char* base;
  size_t off = 0;
  explicit Bump(void* b) : base(static_cast<char*>(b)) {}
  template <typename T>
  T* take(int64_t n) {
    size_t bytes = (size_t(std::max<int64_t>(n, 0)) * sizeof(T) + 63) / 64 * 64;
    T* r = base ? reinterpret_cast<T*>(base + off) : nullptr;
    off += bytes;
    return r;
  }
};

// ===================================================================================================
// Parallel driver over chunks of tiles. Chunk boundaries depend only on the number of tiles.
constexpr int kMaxChunks = 16;

struct Tiling {
  int64_t B, tile, ntiles;
  int nchunks;
  Tiling(int64_t B_, int64_t tile_) : B(B_), tile(std::max<int64_t>(tile_, 1)) {
    ntiles = (B + tile - 1) / tile;
    nchunks = int(std::min<int64_t>(ntiles, kMaxChunks));
  }
  int64_t chunk_begin(int c) const { return ntiles * c / nchunks; }
  int64_t rows(int64_t t) const { return std::min(tile, B - t * tile); }
};

template <typename F>
void run_chunks(const Tiling& tl, const Exec& ex, F&& fn) {
  if (tl.nchunks == 0) return;
#ifdef _OPENMP
  if (ex.nthreads > 1 && tl.nchunks > 1) {
    std::exception_ptr err;
    std::mutex mu;
#pragma omp parallel num_threads(ex.nthreads)
    {
      BlasThreadGuard guard;
      int nt = omp_get_num_threads(), tid = omp_get_thread_num();
      for (int c = tid; c < tl.nchunks; c += nt) {
        try {
          fn(c, tl.chunk_begin(c), tl.chunk_begin(c + 1));
        } catch (...) {
          std::lock_guard<std::mutex> lk(mu);
          if (!err) err = std::current_exception();
        }
      }
    }
    if (err) std::rethrow_exception(err);
    return;
  }
#endif
  BlasThreadGuard guard;
  for (int c = 0; c < tl.nchunks; ++c) fn(c, tl.chunk_begin(c), tl.chunk_begin(c + 1));
}

// ===================================================================================================
// Gate folding: W'_l = diag(gate) W_l, c_l = b gate + bw t. Layout per layer: W' (m x n), c (m).
// Gradient accumulators use the same layout.
struct FoldLayout {
  std::vector<int64_t> offW, offC;
  int64_t size = 0;
  explicit FoldLayout(const Net& net) {
    for (int l = 0; l < net.L(); ++l) {
      int64_t n = net.dims[l], m = net.dims[l + 1];
      offW.push_back(size);
      size += m * n;
      offC.push_back(size);
      size += m;
    }
  }
};

template <typename T>
struct Folded {
  std::vector<T> buf;
  std::vector<T> bufT;  // W'^T per layer (n x m), same offsets as W' (for the micro-kernels)
  std::vector<double> gate;  // concatenated over layers
  std::vector<int64_t> offG;
  const FoldLayout* lay = nullptr;
  const T* W(int l) const { return buf.data() + lay->offW[l]; }
  const T* WT(int l) const { return bufT.data() + lay->offW[l]; }
  const T* c(int l) const { return buf.data() + lay->offC[l]; }
};

// Per-thread Folded buffers of the MLP ops, reused across calls: for wide layers (W' of a 512 x 512 layer is
// 1 MiB) a fresh allocation each call costs page faults comparable to a GEMM of the tile.
template <typename T>
Folded<T>& cached_folded() {
  thread_local Folded<T> fo;
  return fo;
}

template <typename T>
FASTODE_CLONES void scale_row(int64_t n, T g, const T* __restrict W, T* __restrict out) {
  for (int64_t k = 0; k < n; ++k) out[k] = g * W[k];
}

template <typename T>
void fold(const Net& net, const FoldLayout& fl, const Params<T>& p, double t, Folded<T>& out) {
  out.lay = &fl;
  out.buf.resize(fl.size);
  out.gate.clear();
  out.offG.clear();
  const T tt = T(t);
  for (int l = 0; l < net.L(); ++l) {
    int64_t n = net.dims[l], m = net.dims[l + 1];
    out.offG.push_back(int64_t(out.gate.size()));
    T* Wp = out.buf.data() + fl.offW[l];
    T* c = out.buf.data() + fl.offC[l];
    for (int64_t j = 0; j < m; ++j) {
      // gate computed in T from T(t), as the reference does (gw * t + gb in the parameters' dtype)
      T pre = p.gw[l][j] * tt + p.gb[l][j];
      T g = sigmoid<T>(pre);
      out.gate.push_back(double(g));
      scale_row<T>(n, g, p.W[l] + j * n, Wp + j * n);
      c[j] = p.b[l][j] * g + p.bw[l][j] * tt;
    }
  }
  // W'^T is read only by the micro-kernels: float32, tanh / identity, layers whose both widths exceed kThin
  // (Kern::wide). Other activations never touch it, so it is not built for them.
  const bool mk_act = net.act == kTanh || net.act == kIdentity;
  if (std::is_same<T, float>::value && mk_act && use_microkernels()) {
    out.bufT.resize(fl.size);
    constexpr int64_t kBlk = 32;  // blocked transpose: both sides stay in L1
    for (int l = 0; l < net.L(); ++l) {
      int64_t n = net.dims[l], m = net.dims[l + 1];
      if (n <= kThin || m <= kThin) continue;
      const T* Wp = out.buf.data() + fl.offW[l];
      T* Wt = out.bufT.data() + fl.offW[l];
      for (int64_t j0 = 0; j0 < m; j0 += kBlk)
        for (int64_t k0 = 0; k0 < n; k0 += kBlk) {
          const int64_t j1 = std::min(m, j0 + kBlk), k1 = std::min(n, k0 + kBlk);
          for (int64_t j = j0; j < j1; ++j)
            for (int64_t k = k0; k < k1; ++k) Wt[k * m + j] = Wp[j * n + k];
        }
    }
  }
}

// out += g * x;  returns sum(x * W)
template <typename T>
FASTODE_CLONES T unfold_row(int64_t n, T g, const T* __restrict x, const T* __restrict W, T* __restrict out) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) {
    s += x[k] * W[k];
    out[k] += g * x[k];
  }
  return s;
}
template <typename T>
FASTODE_CLONES T dot_row(int64_t n, const T* __restrict x, const T* __restrict W) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += x[k] * W[k];
  return s;
}

// Adds the parameter gradients implied by accumulated dW', dc at time t; returns d/dt.
template <typename T>
double unfold(const Net& net, const FoldLayout& fl, const Params<T>& p, const Folded<T>& fo, double t,
              const T* acc, const Grads<T>* g) {
  double dt = 0;
  const T tt = T(t);
  for (int l = 0; l < net.L(); ++l) {
    int64_t n = net.dims[l], m = net.dims[l + 1];
    const T* dW = acc + fl.offW[l];
    const T* dc = acc + fl.offC[l];
    for (int64_t j = 0; j < m; ++j) {
      const T gate = T(fo.gate[fo.offG[l] + j]);
      T dgate = dc[j] * p.b[l][j];
      dgate += g ? unfold_row<T>(n, gate, dW + j * n, p.W[l] + j * n, g->W[l] + j * n)
                 : dot_row<T>(n, dW + j * n, p.W[l] + j * n);
      const T sg = dgate * gate * (T(1) - gate);
      if (g) {
        g->b[l][j] += dc[j] * gate;
        g->bw[l][j] += dc[j] * tt;
        g->gw[l][j] += sg * tt;
        g->gb[l][j] += sg;
      }
      dt += double(dc[j]) * double(p.bw[l][j]) + double(sg) * double(p.gw[l][j]);
    }
  }
  return dt;
}

// ===================================================================================================
// Saved-activation block of one tile (and, for RK steps, one stage).
struct BlockLayout {
  std::vector<int64_t> H, A, P;  // H[l], A[l] (l < L-1); P[k * (L-1) + l]: g_l or p_{l+1} of probe k
  int64_t Z = -1, F = -1, V = -1, Q = -1;
  int64_t size = 0;
  BlockLayout(const Net& net, int64_t R, int K, bool storeA, bool storeP, bool rk, int64_t NQ) {
    int L = net.L();
    int64_t D = net.dims[0];
    auto take = [&](int64_t n) {
      int64_t o = size;
      size += (n + 15) / 16 * 16;  // keep 64-byte alignment for float
      return o;
    };
    for (int l = 0; l + 1 < L; ++l) H.push_back(take(R * net.dims[l + 1]));
    if (storeA)
      for (int l = 0; l + 1 < L; ++l) A.push_back(take(R * net.dims[l + 1]));
    if (storeP)
      for (int k = 0; k < K; ++k)
        for (int l = 0; l + 1 < L; ++l) P.push_back(take(R * net.dims[l + 1]));
    if (rk) {
      Z = take(R * D);
      F = take(R * D);
      V = take(int64_t(K) * R * D);
      Q = take(R * std::max<int64_t>(NQ, 1));
    }
  }
};

bool act_needs_a(int act) { return !(act == kTanh || act == kIdentity); }

// Per-thread scratch of the tile kernels.
template <typename T>
struct TileWS {
  T *T0, *T1, *T2, *PB0, *PB1, *GB, *AB, *HB, *G, *E;
  std::vector<T*> Acc;
  void carve(Bump& bp, const Net& net, int64_t R) {
    int64_t w = *std::max_element(net.dims.begin(), net.dims.end());
    T0 = bp.take<T>(R * w);
    T1 = bp.take<T>(R * w);
    T2 = bp.take<T>(R * w);
    PB0 = bp.take<T>(R * w);
    PB1 = bp.take<T>(R * w);
    GB = bp.take<T>(R * w);
    AB = bp.take<T>(R * w);
    HB = bp.take<T>(R * w);
    G = bp.take<T>(R * w);
    E = bp.take<T>(R * net.dims[0]);
    Acc.clear();
    for (int l = 0; l + 1 < net.L(); ++l) Acc.push_back(bp.take<T>(R * net.dims[l + 1]));
  }
};

// ===================================================================================================
// Tile kernels for one activation.
template <typename T, int ACT>
struct Kern {
  using AF = ActF<ACT, T>;
#ifdef FASTODE_HAVE_AVX512_KERNELS
  static constexpr bool kMk = std::is_same<T, float>::value && (ACT == kTanh || ACT == kIdentity);
#else
  static constexpr bool kMk = false;
#endif
  static constexpr bool kTanhAct = ACT == kTanh;
  const Net& net;
  int L;
  int64_t D;
  bool mk_on;  // micro-kernels for layers whose both widths exceed kThin
  explicit Kern(const Net& n) : net(n), L(n.L()), D(n.dims[0]), mk_on(kMk && use_microkernels()) {}
  bool wide(int64_t a, int64_t b) const { return mk_on && a > kThin && b > kThin; }

  const T* Aptr(const T* blk, const BlockLayout& bl, int l) const {
    return AF::needs_a ? blk + bl.A[l] : nullptr;
  }

  // f (R x D) = MLP(z); hidden activations into blk.
  void forward(int64_t R, const T* z, const Folded<T>& fo, T* blk, const BlockLayout& bl, T* f) const {
    const T* hin = z;
    int64_t n = D;
    for (int l = 0; l < L; ++l) {
      int64_t m = net.dims[l + 1];
      if (l + 1 < L) {
        T* h = blk + bl.H[l];
        if constexpr (kMk) {
          if (wide(n, m)) {
            mk::mk_nn(R, m, n, hin, n, fo.WT(l), m, mk::EpiBiasAct<kTanhAct>{fo.c(l), h, m});
            hin = h;
            n = m;
            continue;
          }
        }
        gemm_nt<T>(R, m, n, hin, n, fo.W(l), n, h, m, T(0));
        ew_bias_act<ACT, T>(R, m, h, fo.c(l), AF::needs_a ? blk + bl.A[l] : nullptr);
        hin = h;
        n = m;
      } else {
        gemm_nt<T>(R, m, n, hin, n, fo.W(l), n, f, m, T(0));
        ew_bias<T>(R, m, f, fo.c(l));
      }
    }
  }

  // Probe input of probe k: e_k (R x D) or the k-th basis vector (built in ws.E).
  const T* probe_e(int64_t R, const T* ek, int k, const TileWS<T>& ws) const {
    if (ek) return ek;
    std::fill(ws.E, ws.E + R * D, T(0));
    for (int64_t r = 0; r < R; ++r) ws.E[r * D + k] = T(1);
    return ws.E;
  }

  // vjp_k (R x D) = e_k^T J for probe k; p_{l} stored in blk when storeP.
  void probe(int64_t R, const T* e, int k, const Folded<T>& fo, T* blk, const BlockLayout& bl,
             bool storeP, T* vout, const TileWS<T>& ws) const {
    const T* g = e;
    int64_t mg = D;
    T* gbufs[2] = {ws.T1, ws.T2};
    int gi = 0;
    for (int l = L - 1; l >= 1; --l) {
      int64_t n = net.dims[l];
      T* slot = storeP ? blk + bl.P[k * (L - 1) + (l - 1)] : nullptr;
      T* gn = slot && AF::store_g ? slot : gbufs[gi];
      gi ^= 1;
      bool done = false;
      if constexpr (kMk) {
        if (wide(n, mg)) {  // tanh / identity store g: p itself is not needed
          mk::mk_nn(R, n, mg, g, mg, fo.W(l), n, mk::EpiMulD1<kTanhAct>{blk + bl.H[l - 1], gn, n});
          done = true;
        }
      }
      if (!done) {
        T* p = slot && !AF::store_g ? slot : ws.T0;
        gemm_nn<T>(R, n, mg, g, mg, fo.W(l), n, p, n, T(0));
        ew_mul_d1<ACT, T>(R * n, p, Aptr(blk, bl, l - 1), blk + bl.H[l - 1], gn);
      }
      g = gn;
      mg = n;
    }
    gemm_nn<T>(R, D, mg, g, mg, fo.W(0), D, vout, D, T(0));
  }

  // Backward of one tile. Probe-chain gradients (gvjp, gtrace, gfrob) need storeP blocks.
  // e(k) / v(k) return probe k's e (null: basis) and vjp; gvjp(k) its upstream gradient (or null).
  template <typename EF, typename VF, typename GVF, typename GEF>
  void backward(int64_t R, const T* z, int K, const Folded<T>& fo, const T* blk, const BlockLayout& bl,
                const T* f, EF e_of, VF v_of, GVF gvjp_of, const T* gf, const T* gtrace,
                const T* gkin, const T* gfrob, bool any_gvjp, T* gz, GEF ge_of, T* acc,
                const FoldLayout& fl, bool want_params, const TileWS<T>& ws) const {
    const bool chain = bl.P.size() > 0 && (any_gvjp || gtrace || gfrob);
    for (int l = 0; l + 1 < L; ++l)
      if (chain) std::fill(ws.Acc[l], ws.Acc[l] + R * net.dims[l + 1], T(0));
    if (chain) {
      for (int k = 0; k < K; ++k) {
        const T* ek = probe_e(R, e_of(k), k, ws);
        const T* vk = v_of(k);
        const T* gvk = gvjp_of(k);
        T* Pb = ws.PB0;
        T* Pn = ws.PB1;
        for (int64_t r = 0; r < R; ++r)
          for (int64_t d = 0; d < D; ++d) {
            T v = gvk ? gvk[r * D + d] : T(0);
            if (gtrace) v += gtrace[r] * ek[r * D + d];
            if (gfrob) v += T(2) * gfrob[r] * vk[r * D + d];
            Pb[r * D + d] = v;
          }
        int64_t n = D;
        T* gek = ge_of(k);
        for (int l = 0; l < L; ++l) {
          int64_t m = net.dims[l + 1];
          const T* gl;
          if (l + 1 < L) {
            const T* slot = blk + bl.P[k * (L - 1) + l];
            if constexpr (AF::store_g) {
              gl = slot;
            } else {
              ew_mul_d1<ACT, T>(R * m, slot, Aptr(blk, bl, l), blk + bl.H[l], ws.G);
              gl = ws.G;
            }
          } else {
            gl = ek;
          }
          if constexpr (kMk) {
            if (l + 1 < L && wide(n, m)) {
              if (want_params) mk::mk_tn_acc(m, n, R, gl, m, Pb, n, acc + fl.offW[l], n);
              mk::mk_nn(R, m, n, Pb, n, fo.WT(l), m,
                        mk::EpiBwd1<kTanhAct>{blk + bl.H[l], gl, Pn, ws.Acc[l], m});
              std::swap(Pb, Pn);
              n = m;
              continue;
            }
          }
          if (want_params) gemm_tn<T>(m, n, R, gl, m, Pb, n, acc + fl.offW[l], n, T(1));
          if (l + 1 < L || gek) gemm_nt<T>(R, m, n, Pb, n, fo.W(l), n, ws.GB, m, T(0));
          if (l + 1 < L) {
            ew_bwd1<ACT, T>(R * m, ws.GB, blk + bl.P[k * (L - 1) + l], Aptr(blk, bl, l), blk + bl.H[l],
                            Pn, ws.Acc[l]);
            std::swap(Pb, Pn);
            n = m;
          } else if (gek) {
            for (int64_t i = 0; i < R * D; ++i) gek[i] = ws.GB[i] + (gtrace ? gtrace[i / D] * vk[i] : T(0));
          }
        }
      }
    } else {
      for (int k = 0; k < K; ++k) {
        T* gek = ge_of(k);
        if (!gek) continue;
        const T* vk = v_of(k);
        for (int64_t i = 0; i < R * D; ++i) gek[i] = gtrace && vk ? gtrace[i / D] * vk[i] : T(0);
      }
    }
    // forward chain
    T* Ab = ws.AB;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t d = 0; d < D; ++d) {
        T v = gf ? gf[r * D + d] : T(0);
        if (gkin) v += T(2) * gkin[r] * f[r * D + d];
        Ab[r * D + d] = v;
      }
    bool colsum_done = false;  // the fused epilogue already added this layer's bias gradient
    for (int l = L - 1; l >= 0; --l) {
      int64_t n = net.dims[l], m = net.dims[l + 1];
      const T* hl = l == 0 ? z : blk + bl.H[l - 1];
      if (want_params) {
        if (!colsum_done) ew_colsum<T>(R, m, Ab, acc + fl.offC[l]);
        if constexpr (kMk) {
          if (wide(m, n))
            mk::mk_tn_acc(m, n, R, Ab, m, hl, n, acc + fl.offW[l], n);
          else
            gemm_tn<T>(m, n, R, Ab, m, hl, n, acc + fl.offW[l], n, T(1));
        } else {
          gemm_tn<T>(m, n, R, Ab, m, hl, n, acc + fl.offW[l], n, T(1));
        }
      }
      colsum_done = false;
      if (l > 0 || gz) {
        T* other = Ab == ws.AB ? ws.HB : ws.AB;  // Ab ping-pongs between AB and HB
        if constexpr (kMk) {
          if (l > 0 && wide(n, m)) {
            mk::mk_nn(R, n, m, Ab, m, fo.W(l), n,
                      mk::EpiBwd2<kTanhAct>{blk + bl.H[l - 1], chain ? ws.Acc[l - 1] : nullptr, other,
                                            want_params ? acc + fl.offC[l - 1] : nullptr, n});
            Ab = other;
            colsum_done = want_params;
            continue;
          }
        }
        T* Hb = l > 0 ? other : gz;
        gemm_nn<T>(R, n, m, Ab, m, fo.W(l), n, Hb, n, T(0));
        if (l > 0)
          ew_bwd2<ACT, T>(R * n, Hb, Aptr(blk, bl, l - 1), blk + bl.H[l - 1], chain ? ws.Acc[l - 1] : nullptr,
                          Ab);
      }
    }
  }
};

template <typename T, typename F>
void dispatch_act(const Net& net, F&& fn) {
  switch (net.act) {
    case kTanh:
      return fn(Kern<T, kTanh>(net));
    case kSoftplus:
      return fn(Kern<T, kSoftplus>(net));
    case kElu:
      return fn(Kern<T, kElu>(net));
    case kSwish:
      return fn(Kern<T, kSwish>(net));
    case kIdentity:
      return fn(Kern<T, kIdentity>(net));
    default:
      throw std::invalid_argument("fastode: unknown activation code " + std::to_string(net.act));
  }
}

void check_net(const Net& net) {
  if (net.dims.size() < 2) throw std::invalid_argument("fastode: an MLP needs at least one layer");
  if (net.dims.front() != net.dims.back())
    throw std::invalid_argument("fastode: the MLP's output width must equal its input width");
  for (int64_t d : net.dims)
    if (d <= 0) throw std::invalid_argument("fastode: layer widths must be positive");
}

// Carve scratch twice: once to measure, once into the thread's arena.
template <typename Carve>
void with_scratch(Carve&& carve) {
  Bump m(nullptr);
  carve(m);
  Bump b(t_arena.get(m.off));
  carve(b);
}

template <typename T>
inline void axpy(int64_t n, T a, const T* __restrict x, T* __restrict y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}
template <typename T>
inline double dot(int64_t n, const T* x, const T* y) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(x[i]) * double(y[i]);
  return s;
}

}  // namespace

// ===================================================================================================
void activation_f32(int act, int64_t n, const float* a, float* h, float* d1, float* d2) {
  auto run = [&](auto af) {
    using A = decltype(af);
    for (int64_t i = 0; i < n; ++i) {
      h[i] = A::f(a[i]);
      d1[i] = A::d1(a[i], h[i]);
      d2[i] = A::d2(a[i], h[i]);
    }
  };
  switch (act) {
    case kTanh: return run(ActF<kTanh, float>{});
    case kSoftplus: return run(ActF<kSoftplus, float>{});
    case kElu: return run(ActF<kElu, float>{});
    case kSwish: return run(ActF<kSwish, float>{});
    case kIdentity: return run(ActF<kIdentity, float>{});
    default: throw std::invalid_argument("fastode: unknown activation code");
  }
}

std::string gemm_backend() {
  std::string b = use_blas() ? "blas" : "fallback";
  return use_microkernels() ? "avx512+" + b : b;
}

std::string set_gemm_backend(const std::string& name) {
  if (name == "auto") {
    g_use_blas_override_set = false;
    g_use_mk = true;
  } else if (name == "blas") {
    if (!blas().use) throw std::runtime_error("fastode: no BLAS (sgemm_/dgemm_) found in this process");
    g_use_blas_override_set = true;
    g_use_blas = true;
    g_use_mk = false;
  } else if (name == "fallback") {
    g_use_blas_override_set = true;
    g_use_blas = false;
    g_use_mk = false;
  } else {
    throw std::invalid_argument("fastode: gemm backend must be 'auto', 'blas' or 'fallback'");
  }
  return gemm_backend();
}

// ===================================================================================================
// MLP ops
int64_t mlp_save_size(const Net& net, int64_t B, int K, bool probes, const Exec& ex) {
  check_net(net);
  Tiling tl(B, ex.tile);
  BlockLayout bl(net, tl.tile, K, act_needs_a(net.act), probes, false, 0);
  return tl.ntiles * bl.size;
}

template <typename T>
void mlp_forward(const Net& net, const Params<T>& p, double t, int64_t B, const T* z, T* f, T* save,
                 const Exec& ex) {
  check_net(net);
  const int64_t D = net.dims[0];
  FoldLayout fl(net);
  Folded<T>& fo = cached_folded<T>();
  fold(net, fl, p, t, fo);
  Tiling tl(B, ex.tile);
  BlockLayout bl(net, tl.tile, 1, act_needs_a(net.act), false, false, 0);
  dispatch_act<T>(net, [&](const auto& kern) {
    run_chunks(tl, ex, [&](int, int64_t t0, int64_t t1) {
      TileWS<T> ws;
      T* blkws = nullptr;
      with_scratch([&](Bump& b) {
        ws.carve(b, net, tl.tile);
        blkws = b.take<T>(bl.size);
      });
      for (int64_t ti = t0; ti < t1; ++ti) {
        int64_t r0 = ti * tl.tile, R = tl.rows(ti);
        T* blk = save ? save + ti * bl.size : blkws;
        kern.forward(R, z + r0 * D, fo, blk, bl, f + r0 * D);
      }
    });
  });
}

template <typename T>
void mlp_probe_forward(const Net& net, const Params<T>& p, double t, int64_t B, const T* z, int K,
                       const T* e, T* f, T* vjp, T* trace, T* kinetic, T* jac_frob, T* save,
                       const Exec& ex) {
  check_net(net);
  const int64_t D = net.dims[0];
  if (!e && K != D) throw std::invalid_argument("fastode: basis probes need K == D");
  FoldLayout fl(net);
  Folded<T>& fo = cached_folded<T>();
  fold(net, fl, p, t, fo);
  Tiling tl(B, ex.tile);
  BlockLayout bl(net, tl.tile, K, act_needs_a(net.act), save != nullptr, false, 0);
  dispatch_act<T>(net, [&](const auto& kern) {
    run_chunks(tl, ex, [&](int, int64_t t0, int64_t t1) {
      TileWS<T> ws;
      T *blkws = nullptr, *V = nullptr, *FR = nullptr;
      with_scratch([&](Bump& b) {
        ws.carve(b, net, tl.tile);
        blkws = b.take<T>(bl.size);
        V = b.take<T>(tl.tile * D);
        FR = b.take<T>(tl.tile);
      });
      for (int64_t ti = t0; ti < t1; ++ti) {
        int64_t r0 = ti * tl.tile, R = tl.rows(ti);
        T* blk = save ? save + ti * bl.size : blkws;
        T* ft = f + r0 * D;
        kern.forward(R, z + r0 * D, fo, blk, bl, ft);
        if (kinetic)
          for (int64_t r = 0; r < R; ++r) {
            T s = 0;
            for (int64_t d = 0; d < D; ++d) s += ft[r * D + d] * ft[r * D + d];
            kinetic[r0 + r] = s;
          }
        T* tr = trace ? trace + r0 : nullptr;
        T* fr = jac_frob ? jac_frob + r0 : FR;
        if (tr) std::fill(tr, tr + R, T(0));
        std::fill(fr, fr + R, T(0));
        for (int k = 0; k < K; ++k) {
          const T* ek = kern.probe_e(R, e ? e + k * B * D + r0 * D : nullptr, k, ws);
          T* vk = vjp ? vjp + k * B * D + r0 * D : V;
          kern.probe(R, ek, k, fo, blk, bl, save != nullptr, vk, ws);
          for (int64_t r = 0; r < R; ++r) {
            T st = 0, sf = 0;
            for (int64_t d = 0; d < D; ++d) {
              st += vk[r * D + d] * ek[r * D + d];
              sf += vk[r * D + d] * vk[r * D + d];
            }
            if (tr) tr[r] += st;
            fr[r] += sf;
          }
        }
      }
    });
  });
}

template <typename T>
void mlp_backward(const Net& net, const Params<T>& p, double t, int64_t B, const T* z, int K,
                  const T* e, bool probes, const T* save, const T* f, const T* vjp, const T* gf,
                  const T* gvjp, const T* gtrace, const T* gkin, const T* gfrob, T* gz, T* ge,
                  const Grads<T>* grads, T* gt, const Exec& ex) {
  check_net(net);
  const int64_t D = net.dims[0];
  if ((gfrob || (ge && gtrace)) && !vjp)
    throw std::invalid_argument("fastode: mlp_backward needs the forward's vjp for these gradients");
  if (gkin && !f) throw std::invalid_argument("fastode: mlp_backward needs f for the kinetic gradient");
  FoldLayout fl(net);
  Folded<T>& fo = cached_folded<T>();
  fold(net, fl, p, t, fo);
  Tiling tl(B, ex.tile);
  BlockLayout bl(net, tl.tile, K, act_needs_a(net.act), probes, false, 0);
  const bool want_params = grads || gt;
  // Per-chunk gradient accumulators, reused across calls (see cached_folded). A reference, so that the OpenMP
  // workers below see this thread's vector, not their own thread_local one.
  thread_local std::vector<T> t_accs;
  std::vector<T>& accs = t_accs;
  accs.assign(want_params ? size_t(tl.nchunks) * fl.size : 0, T(0));
  dispatch_act<T>(net, [&](const auto& kern) {
    run_chunks(tl, ex, [&](int c, int64_t t0, int64_t t1) {
      TileWS<T> ws;
      with_scratch([&](Bump& b) { ws.carve(b, net, tl.tile); });
      T* acc = want_params ? accs.data() + size_t(c) * fl.size : nullptr;
      for (int64_t ti = t0; ti < t1; ++ti) {
        int64_t r0 = ti * tl.tile, R = tl.rows(ti);
        auto off = [&](int k) { return k * B * D + r0 * D; };
        kern.backward(
            R, z + r0 * D, K, fo, save + ti * bl.size, bl, f ? f + r0 * D : nullptr,
            [&](int k) { return e ? e + off(k) : nullptr; },
            [&](int k) { return vjp ? vjp + off(k) : nullptr; },
            [&](int k) { return gvjp ? gvjp + off(k) : nullptr; }, gf ? gf + r0 * D : nullptr,
            gtrace ? gtrace + r0 : nullptr, gkin ? gkin + r0 : nullptr, gfrob ? gfrob + r0 : nullptr,
            gvjp != nullptr, gz ? gz + r0 * D : nullptr, [&](int k) { return ge ? ge + off(k) : nullptr; },
            acc, fl, want_params, ws);
      }
    });
  });
  if (want_params) {
    T* acc0 = accs.data();
    for (int c = 1; c < tl.nchunks; ++c) axpy<T>(fl.size, T(1), accs.data() + size_t(c) * fl.size, acc0);
    double dt = unfold(net, fl, p, fo, t, acc0, grads);
    if (gt) *gt = T(dt);
  }
}

// ===================================================================================================
// Generic RK combination and epilogue on flat vectors.
constexpr int64_t kFlatTile = 1 << 14;

template <typename T>
void rk_combine(int64_t n, const T* y0, int nk, const T* const* k, const double* w, double dt, T* out,
                const Exec& ex) {
  std::vector<T> wt(nk);
  for (int j = 0; j < nk; ++j) wt[j] = T(dt * w[j]);
  Tiling tl(n, kFlatTile);
  run_chunks(tl, ex, [&](int, int64_t t0, int64_t t1) {
    std::vector<const T*> kp(nk);
    for (int64_t ti = t0; ti < t1; ++ti) {
      int64_t o = ti * tl.tile, len = tl.rows(ti);
      for (int j = 0; j < nk; ++j) kp[j] = k[j] + o;
      ew_combine<T>(len, y0 + o, nk, kp.data(), wt.data(), out + o);
    }
  });
}

template <typename T>
void rk_epilogue(int64_t B, int64_t M, const T* y0, int nk, const T* const* k, const double* b,
                 const double* b_err, double dt, const T* atol, double atol_s, const T* rtol, double rtol_s,
                 T* y1, T* y_err, double* row_sumsq, double* row_max, const Exec& ex) {
  std::vector<T> wb(nk), we(nk);
  for (int j = 0; j < nk; ++j) {
    wb[j] = T(dt * b[j]);
    we[j] = b_err ? T(dt * b_err[j]) : T(0);
  }
  // tiles of whole rows, about kFlatTile elements each
  Tiling tl(B, std::max<int64_t>(1, kFlatTile / std::max<int64_t>(M, 1)));
  run_chunks(tl, ex, [&](int, int64_t t0, int64_t t1) {
    std::vector<const T*> kp(nk);
    for (int64_t ti = t0; ti < t1; ++ti) {
      int64_t r0 = ti * tl.tile, R = tl.rows(ti), o = r0 * M, len = R * M;
      for (int j = 0; j < nk; ++j) kp[j] = k[j] + o;
      ew_combine<T>(len, y0 + o, nk, kp.data(), wb.data(), y1 + o);
      if (!b_err) continue;
      T* err = y_err + o;
      ew_lincomb<T>(len, nk, kp.data(), we.data(), err);
      for (int64_t r = 0; r < R; ++r) {
        double ss = 0, mx = 0;
        for (int64_t c = 0; c < M; ++c) {
          int64_t i = o + r * M + c;
          double at = atol ? double(atol[i]) : atol_s, rt = rtol ? double(rtol[i]) : rtol_s;
          double sc = at + rt * std::max(std::fabs(double(y0[i])), std::fabs(double(y1[i])));
          double q = double(y_err[i]) / sc;
          ss += q * q;
          mx = std::max(mx, std::fabs(q));
        }
        row_sumsq[r0 + r] = ss;
        // std::max drops a NaN second argument; the sum keeps it, so a NaN error gives a NaN max (rejected)
        row_max[r0 + r] = std::isnan(ss) ? ss : mx;
      }
    }
  });
}

// ===================================================================================================
// Fused CNF RK step.
namespace {

template <typename T>
struct StepCtx {
  const CnfSpec& spec;
  const Tableau& tab;
  const Net& net;
  int s, K, L;
  int64_t D, NQ, B;
  FoldLayout fl;
  std::vector<Folded<T>> folds;
  std::vector<double> ts;
  std::vector<T> Aw, Bw, Ew;  // dt-scaled coefficients
  Tiling tl;
  BlockLayout bl;
  StepCtx(const CnfSpec& sp, const Tableau& tb, const Params<T>& p, double t0, double dt, int64_t B_,
          const Exec& ex)
      : spec(sp),
        tab(tb),
        net(sp.net),
        s(tb.s),
        K(sp.K),
        L(sp.net.L()),
        D(sp.net.dims[0]),
        NQ(int64_t(sp.rates.size())),
        B(B_),
        fl(sp.net),
        tl(B_, ex.tile),
        bl(sp.net, tl.tile, sp.K, act_needs_a(sp.net.act), true, true, int64_t(sp.rates.size())) {
    check_net(net);
    if (s < 1 || int(tab.c.size()) != s || int(tab.a.size()) != s * s || int(tab.b.size()) != s ||
        (tab.has_err() && int(tab.b_err.size()) != s))
      throw std::invalid_argument("fastode: inconsistent tableau sizes");
    if (sp.exact && sp.K != D) throw std::invalid_argument("fastode: exact trace needs K == D probes");
    for (int r : sp.rates)
      if (r < 0 || r > 3) throw std::invalid_argument("fastode: rate codes are 0..3");
    folds.resize(s);
    for (int i = 0; i < s; ++i) {
      ts.push_back(t0 + tab.c[i] * dt);
      fold(net, fl, p, ts[i], folds[i]);
    }
    Aw.resize(size_t(s) * s);
    Bw.resize(s);
    Ew.resize(s);
    for (int i = 0; i < s; ++i) {
      for (int j = 0; j < s; ++j) Aw[i * s + j] = T(dt * tab.a[i * s + j]);
      Bw[i] = T(dt * tab.b[i]);
      Ew[i] = tab.has_err() ? T(dt * tab.b_err[i]) : T(0);
    }
  }
  bool has(int code) const {
    for (int r : spec.rates)
      if (r == code) return true;
    return false;
  }
};

template <typename T>
struct StepWS {
  TileWS<T> tw;
  T *KZ, *KQ, *ZI, *TR, *KIN, *FR, *V, *blk, *ZB, *GE, *GTR, *GKIN, *GFR, *KB, *KQB, *TMP, *TMPQ, *EZ, *EQ;
  void carve(Bump& b, const StepCtx<T>& c) {
    int64_t R = c.tl.tile, Q = std::max<int64_t>(c.NQ, 1);
    tw.carve(b, c.net, R);
    KZ = b.take<T>(c.s * R * c.D);
    KQ = b.take<T>(c.s * R * Q);
    ZI = b.take<T>(R * c.D);
    TR = b.take<T>(R);
    KIN = b.take<T>(R);
    FR = b.take<T>(R);
    V = b.take<T>(int64_t(c.K) * R * c.D);
    blk = b.take<T>(c.bl.size);
    ZB = b.take<T>(c.s * R * c.D);
    GE = b.take<T>(int64_t(c.K) * R * c.D);
    GTR = b.take<T>(R);
    GKIN = b.take<T>(R);
    GFR = b.take<T>(R);
    KB = b.take<T>(R * c.D);
    KQB = b.take<T>(R * Q);
    TMP = b.take<T>(R * c.D);
    TMPQ = b.take<T>(R * Q);
    EZ = b.take<T>(R * c.D);
    EQ = b.take<T>(R * Q);
  }
};

}  // namespace

int64_t cnf_step_save_size(const CnfSpec& spec, const Tableau& tab, int64_t B, const Exec& ex) {
  check_net(spec.net);
  Tiling tl(B, ex.tile);
  BlockLayout bl(spec.net, tl.tile, spec.K, act_needs_a(spec.net.act), true, true, int64_t(spec.rates.size()));
  return tl.ntiles * tab.s * bl.size;
}

template <typename T>
void cnf_step_forward(const CnfSpec& spec, const Tableau& tab, const Params<T>& p,
                      const CnfStepIn<T>& in, const CnfStepOut<T>& out, const Exec& ex) {
  StepCtx<T> c(spec, tab, p, in.t0, in.dt, in.B, ex);
  const int s = c.s, K = c.K;
  const int64_t D = c.D, NQ = c.NQ, B = c.B, ncol = D + NQ;
  const bool want_err = tab.has_err() && (out.ez || out.eq || out.sumsq);
  if (out.sumsq && tab.has_err() && (!in.atol || !in.rtol))
    throw std::invalid_argument("fastode: the error norm needs atol and rtol per column");
  std::vector<double> part(out.sumsq ? size_t(c.tl.ntiles) * ncol : 0, 0.0);
  dispatch_act<T>(c.net, [&](const auto& kern) {
    run_chunks(c.tl, ex, [&](int, int64_t t0, int64_t t1) {
      StepWS<T> w;
      with_scratch([&](Bump& b) { w.carve(b, c); });
      for (int64_t ti = t0; ti < t1; ++ti) {
        const int64_t r0 = ti * c.tl.tile, R = c.tl.rows(ti);
        const T* z0 = in.z0 + r0 * D;
        const T* q0 = NQ ? in.q0 + r0 * NQ : nullptr;
        std::vector<const T*> kzp(s), kqp(s);
        for (int i = 0; i < s; ++i) {
          T* kzi = w.KZ + i * R * D;
          T* kqi = w.KQ + i * R * NQ;
          kzp[i] = kzi;
          kqp[i] = kqi;
          if (i == 0 && in.kz0) {
            std::memcpy(kzi, in.kz0 + r0 * D, sizeof(T) * R * D);
            if (NQ) std::memcpy(kqi, in.kq0 + r0 * NQ, sizeof(T) * R * NQ);
            continue;
          }
          T* blk = out.save ? out.save + (ti * s + i) * c.bl.size : w.blk;
          T* zi = out.save ? blk + c.bl.Z : w.ZI;
          ew_combine<T>(R * D, z0, i, kzp.data(), c.Aw.data() + i * s, zi);
          kern.forward(R, zi, c.folds[i], blk, c.bl, kzi);
          std::fill(w.TR, w.TR + R, T(0));
          std::fill(w.FR, w.FR + R, T(0));
          for (int64_t r = 0; r < R; ++r) {
            T sk = 0;
            for (int64_t d = 0; d < D; ++d) sk += kzi[r * D + d] * kzi[r * D + d];
            w.KIN[r] = sk;
          }
          const bool probes = c.has(0) || c.has(1) || c.has(3);
          for (int k = 0; probes && k < K; ++k) {
            const T* ek = kern.probe_e(R, in.e ? in.e + k * B * D + r0 * D : nullptr, k, w.tw);
            T* vk = out.save ? blk + c.bl.V + k * R * D : w.V;
            kern.probe(R, ek, k, c.folds[i], blk, c.bl, out.save != nullptr, vk, w.tw);
            for (int64_t r = 0; r < R; ++r) {
              T st = 0, sf = 0;
              for (int64_t d = 0; d < D; ++d) {
                st += vk[r * D + d] * ek[r * D + d];
                sf += vk[r * D + d] * vk[r * D + d];
              }
              w.TR[r] += st;
              w.FR[r] += sf;
            }
          }
          for (int64_t r = 0; r < R; ++r)
            for (int64_t j = 0; j < NQ; ++j) {
              int code = spec.rates[j];
              kqi[r * NQ + j] = code == 0 ? -w.TR[r] : code == 1 ? w.TR[r] : code == 2 ? w.KIN[r] : w.FR[r];
            }
          if (out.save) {
            std::memcpy(blk + c.bl.F, kzi, sizeof(T) * R * D);
            if (NQ) std::memcpy(blk + c.bl.Q, kqi, sizeof(T) * R * NQ);
          }
        }
        T* z1 = out.z1 + r0 * D;
        ew_combine<T>(R * D, z0, s, kzp.data(), c.Bw.data(), z1);
        T* q1 = NQ ? out.q1 + r0 * NQ : nullptr;
        if (NQ) ew_combine<T>(R * NQ, q0, s, kqp.data(), c.Bw.data(), q1);
        if (want_err) {
          T* ez = out.ez ? out.ez + r0 * D : w.EZ;
          ew_lincomb<T>(R * D, s, kzp.data(), c.Ew.data(), ez);
          T* eq = NQ ? (out.eq ? out.eq + r0 * NQ : w.EQ) : nullptr;
          if (NQ) ew_lincomb<T>(R * NQ, s, kqp.data(), c.Ew.data(), eq);
          if (out.sumsq) {
            double* pt = part.data() + ti * ncol;
            ew_err_sumsq<T>(R, D, z0, z1, ez, in.atol, in.rtol, pt);
            if (NQ) ew_err_sumsq<T>(R, NQ, q0, q1, eq, in.atol + D, in.rtol + D, pt + D);
          }
        }
        if (out.kz)
          for (int i = 0; i < s; ++i) std::memcpy(out.kz + i * B * D + r0 * D, kzp[i], sizeof(T) * R * D);
        if (out.kq && NQ)
          for (int i = 0; i < s; ++i) std::memcpy(out.kq + i * B * NQ + r0 * NQ, kqp[i], sizeof(T) * R * NQ);
      }
    });
  });
  if (out.sumsq) {
    for (int64_t j = 0; j < ncol; ++j) out.sumsq[j] = 0;
    if (tab.has_err())
      for (int64_t ti = 0; ti < c.tl.ntiles; ++ti)
        for (int64_t j = 0; j < ncol; ++j) out.sumsq[j] += part[ti * ncol + j];
  }
}

template <typename T>
void cnf_step_backward(const CnfSpec& spec, const Tableau& tab, const Params<T>& p,
                       const CnfStepIn<T>& in, const T* save, const CnfStepGradIn<T>& g,
                       const CnfStepGradOut<T>& out, const Exec& ex) {
  StepCtx<T> c(spec, tab, p, in.t0, in.dt, in.B, ex);
  const int s = c.s, K = c.K;
  const int64_t D = c.D, NQ = c.NQ, B = c.B;
  const bool want_params = out.grads || out.gt0 || out.gdt;
  const bool want_dt = out.gdt != nullptr;
  std::vector<T> accs(want_params ? size_t(c.tl.nchunks) * s * c.fl.size : 0, T(0));
  std::vector<double> dtpart(c.tl.ntiles, 0.0);
  std::vector<T> araw(size_t(s) * s), braw(s), eraw(s);
  for (int i = 0; i < s; ++i) {
    for (int j = 0; j < s; ++j) araw[i * s + j] = T(tab.a[i * s + j]);
    braw[i] = T(tab.b[i]);
    eraw[i] = tab.has_err() ? T(tab.b_err[i]) : T(0);
  }
  dispatch_act<T>(c.net, [&](const auto& kern) {
    run_chunks(c.tl, ex, [&](int ch, int64_t t0, int64_t t1) {
      StepWS<T> w;
      with_scratch([&](Bump& b) { w.carve(b, c); });
      for (int64_t ti = t0; ti < t1; ++ti) {
        const int64_t r0 = ti * c.tl.tile, R = c.tl.rows(ti);
        auto blk_of = [&](int i) { return save + (ti * s + i) * c.bl.size; };
        const bool fsal_in = in.kz0 != nullptr;
        std::vector<const T*> kzp(s), kqp(s);
        for (int i = 0; i < s; ++i) {
          if (i == 0 && fsal_in) {
            kzp[0] = in.kz0 + r0 * D;
            kqp[0] = NQ ? in.kq0 + r0 * NQ : nullptr;
          } else {
            kzp[i] = blk_of(i) + c.bl.F;
            kqp[i] = blk_of(i) + c.bl.Q;
          }
        }
        const T* gz1 = g.gz1 ? g.gz1 + r0 * D : nullptr;
        const T* gq1 = g.gq1 && NQ ? g.gq1 + r0 * NQ : nullptr;
        const T* gez = g.gez ? g.gez + r0 * D : nullptr;
        const T* geq = g.geq && NQ ? g.geq + r0 * NQ : nullptr;
        T* get = out.ge ? out.ge : nullptr;
        if (get)
          for (int k = 0; k < K; ++k) std::fill(get + k * B * D + r0 * D, get + k * B * D + r0 * D + R * D, T(0));
        double dtp = 0;
        for (int i = s - 1; i >= 0; --i) {
          // gradient of stage i's derivative
          T* kb = w.KB;
          std::fill(kb, kb + R * D, T(0));
          if (gz1) axpy<T>(R * D, c.Bw[i], gz1, kb);
          if (gez && tab.has_err()) axpy<T>(R * D, c.Ew[i], gez, kb);
          if (g.gkz) axpy<T>(R * D, T(1), g.gkz + i * B * D + r0 * D, kb);
          for (int m = i + 1; m < s; ++m)
            if (c.Aw[m * s + i] != T(0) && !(m == 0)) axpy<T>(R * D, c.Aw[m * s + i], w.ZB + m * R * D, kb);
          T* kqb = w.KQB;
          if (NQ) {
            std::fill(kqb, kqb + R * NQ, T(0));
            if (gq1) axpy<T>(R * NQ, c.Bw[i], gq1, kqb);
            if (geq && tab.has_err()) axpy<T>(R * NQ, c.Ew[i], geq, kqb);
            if (g.gkq) axpy<T>(R * NQ, T(1), g.gkq + i * B * NQ + r0 * NQ, kqb);
          }
          T* zb = w.ZB + i * R * D;
          if (i == 0 && fsal_in) {
            if (out.gkz0) std::memcpy(out.gkz0 + r0 * D, kb, sizeof(T) * R * D);
            if (out.gkq0 && NQ) std::memcpy(out.gkq0 + r0 * NQ, kqb, sizeof(T) * R * NQ);
            std::fill(zb, zb + R * D, T(0));
            continue;
          }
          T *gtr = nullptr, *gkin = nullptr, *gfr = nullptr;
          for (int64_t j = 0; j < NQ; ++j) {
            int code = spec.rates[j];
            T*& dst = (code <= 1) ? gtr : code == 2 ? gkin : gfr;
            T* buf = (code <= 1) ? w.GTR : code == 2 ? w.GKIN : w.GFR;
            if (!dst) {
              dst = buf;
              std::fill(dst, dst + R, T(0));
            }
            const T sign = code == 0 ? T(-1) : T(1);
            for (int64_t r = 0; r < R; ++r) dst[r] += sign * kqb[r * NQ + j];
          }
          const T* blk = blk_of(i);
          const T* zi = blk + c.bl.Z;
          T* acc = want_params ? accs.data() + (size_t(ch) * s + i) * c.fl.size : nullptr;
          kern.backward(
              R, zi, K, c.folds[i], blk, c.bl, blk + c.bl.F,
              [&](int k) { return in.e ? in.e + k * B * D + r0 * D : nullptr; },
              [&](int k) { return blk + c.bl.V + k * R * D; }, [&](int) { return (const T*)nullptr; }, kb,
              gtr, gkin, gfr, false, zb, [&](int k) { return out.ge && in.e ? w.GE + k * R * D : nullptr; }, acc,
              c.fl, want_params, w.tw);
          if (out.ge && in.e)
            for (int k = 0; k < K; ++k) axpy<T>(R * D, T(1), w.GE + k * R * D, get + k * B * D + r0 * D);
          if (want_dt && i > 0) {
            ew_lincomb<T>(R * D, i, kzp.data(), araw.data() + i * s, w.TMP);
            dtp += dot<T>(R * D, zb, w.TMP);
          }
        }
        if (out.gz0) {
          T* gz0 = out.gz0 + r0 * D;
          if (gz1)
            std::memcpy(gz0, gz1, sizeof(T) * R * D);
          else
            std::fill(gz0, gz0 + R * D, T(0));
          for (int i = 0; i < s; ++i) axpy<T>(R * D, T(1), w.ZB + i * R * D, gz0);
        }
        if (out.gq0 && NQ) {
          T* gq0 = out.gq0 + r0 * NQ;
          if (gq1)
            std::memcpy(gq0, gq1, sizeof(T) * R * NQ);
          else
            std::fill(gq0, gq0 + R * NQ, T(0));
        }
        if (want_dt) {
          if (gz1) {
            ew_lincomb<T>(R * D, s, kzp.data(), braw.data(), w.TMP);
            dtp += dot<T>(R * D, gz1, w.TMP);
          }
          if (gq1) {
            ew_lincomb<T>(R * NQ, s, kqp.data(), braw.data(), w.TMPQ);
            dtp += dot<T>(R * NQ, gq1, w.TMPQ);
          }
          if (gez && tab.has_err()) {
            ew_lincomb<T>(R * D, s, kzp.data(), eraw.data(), w.TMP);
            dtp += dot<T>(R * D, gez, w.TMP);
          }
          if (geq && tab.has_err()) {
            ew_lincomb<T>(R * NQ, s, kqp.data(), eraw.data(), w.TMPQ);
            dtp += dot<T>(R * NQ, geq, w.TMPQ);
          }
          dtpart[ti] = dtp;
        }
      }
    });
  });
  double gt0 = 0, gdt = 0;
  for (double v : dtpart) gdt += v;
  if (want_params) {
    for (int i = 0; i < s; ++i) {
      T* acc0 = accs.data() + size_t(i) * c.fl.size;
      for (int ch = 1; ch < c.tl.nchunks; ++ch)
        axpy<T>(c.fl.size, T(1), accs.data() + (size_t(ch) * s + i) * c.fl.size, acc0);
      double gti = unfold(c.net, c.fl, p, c.folds[i], c.ts[i], acc0, out.grads);
      gt0 += gti;
      gdt += tab.c[i] * gti;
    }
  }
  if (out.gt0) *out.gt0 = gt0;
  if (out.gdt) *out.gdt = gdt;
}

// ===================================================================================================
// Fixed-grid solve: a loop over cnf_step_forward / cnf_step_backward without leaving C++.
int64_t cnf_grid_save_size(const CnfSpec& spec, const Tableau& tab, int64_t B, int nsteps, const Exec& ex) {
  return int64_t(nsteps) * cnf_step_save_size(spec, tab, B, ex);
}

template <typename T>
void cnf_grid_forward(const CnfSpec& spec, const Tableau& tab, const Params<T>& p, const double* ts, int nsteps,
                      int64_t B, const T* z0, const T* q0, const T* e, T* zT, T* qT, T* save, const Exec& ex) {
  const int64_t D = spec.net.dims[0], NQ = int64_t(spec.rates.size());
  const int64_t step_save = save ? cnf_step_save_size(spec, tab, B, ex) : 0;
  std::vector<T> buf(2 * B * (D + NQ));  // ping-pong state (z | q) for the intermediate steps
  const T* zc = z0;
  const T* qc = q0;
  for (int n = 0; n < nsteps; ++n) {
    T* zn = n + 1 == nsteps ? zT : buf.data() + (n % 2) * B * (D + NQ);
    T* qn = n + 1 == nsteps ? qT : zn + B * D;
    if (n + 1 == nsteps && !NQ) qn = nullptr;
    CnfStepIn<T> in;
    in.t0 = ts[n];
    in.dt = ts[n + 1] - ts[n];
    in.B = B;
    in.z0 = zc;
    in.q0 = qc;
    in.e = e;
    CnfStepOut<T> out;
    out.z1 = zn;
    out.q1 = NQ ? qn : nullptr;
    out.save = save ? save + n * step_save : nullptr;
    cnf_step_forward<T>(spec, tab, p, in, out, ex);
    zc = zn;
    qc = qn;
  }
  if (nsteps == 0) {
    std::memcpy(zT, z0, sizeof(T) * B * D);
    if (NQ) std::memcpy(qT, q0, sizeof(T) * B * NQ);
  }
}

template <typename T>
void cnf_grid_backward(const CnfSpec& spec, const Tableau& tab, const Params<T>& p, const double* ts, int nsteps,
                       int64_t B, const T* e, const T* save, const T* gzT, const T* gqT, T* gz0, T* gq0, T* ge,
                       const Grads<T>* grads, double* gts, const Exec& ex) {
  const int64_t D = spec.net.dims[0], NQ = int64_t(spec.rates.size());
  const int64_t K = spec.K;
  const int64_t step_save = cnf_step_save_size(spec, tab, B, ex);
  // running adjoint of z (ping-pong); q's adjoint is constant along the solve (q does not feed f)
  std::vector<T> adj(2 * B * D, T(0)), gq(B * std::max<int64_t>(NQ, 1), T(0)), get(ge ? K * B * D : 0);
  if (gzT) std::memcpy(adj.data(), gzT, sizeof(T) * B * D);
  if (gqT && NQ) std::memcpy(gq.data(), gqT, sizeof(T) * B * NQ);
  if (ge) std::fill(ge, ge + K * B * D, T(0));
  if (gts) std::fill(gts, gts + nsteps + 1, 0.0);
  int cur = 0;
  for (int n = nsteps - 1; n >= 0; --n) {
    CnfStepIn<T> in;
    in.t0 = ts[n];
    in.dt = ts[n + 1] - ts[n];
    in.B = B;
    in.e = e;
    CnfStepGradIn<T> g;
    g.gz1 = adj.data() + cur * B * D;
    g.gq1 = NQ && gqT ? gq.data() : nullptr;
    CnfStepGradOut<T> o;
    o.gz0 = adj.data() + (1 - cur) * B * D;
    o.ge = ge ? get.data() : nullptr;
    o.grads = grads;
    double gt0 = 0, gdt = 0;
    o.gt0 = gts ? &gt0 : nullptr;
    o.gdt = gts ? &gdt : nullptr;
    cnf_step_backward<T>(spec, tab, p, in, save + n * step_save, g, o, ex);
    if (ge)
      for (int64_t i = 0; i < K * B * D; ++i) ge[i] += get[i];
    if (gts) {  // t_n enters as the step's start (t0 = t_n, dt = t_{n+1} - t_n) and t_{n+1} through dt
      gts[n] += gt0 - gdt;
      gts[n + 1] += gdt;
    }
    cur = 1 - cur;
  }
  if (gz0) std::memcpy(gz0, adj.data() + cur * B * D, sizeof(T) * B * D);
  if (gq0 && NQ) std::memcpy(gq0, gq.data(), sizeof(T) * B * NQ);
}

// ===================================================================================================
// Explicit instantiations
#define FASTODE_INSTANTIATE(T)                                                                          \
  template void mlp_forward<T>(const Net&, const Params<T>&, double, int64_t, const T*, T*, T*,        \
                               const Exec&);                                                            \
  template void mlp_probe_forward<T>(const Net&, const Params<T>&, double, int64_t, const T*, int,     \
                                     const T*, T*, T*, T*, T*, T*, T*, const Exec&);                    \
  template void mlp_backward<T>(const Net&, const Params<T>&, double, int64_t, const T*, int, const T*, \
                                bool, const T*, const T*, const T*, const T*, const T*, const T*,       \
                                const T*, const T*, T*, T*, const Grads<T>*, T*, const Exec&);          \
  template void rk_combine<T>(int64_t, const T*, int, const T* const*, const double*, double, T*,      \
                              const Exec&);                                                             \
  template void rk_epilogue<T>(int64_t, int64_t, const T*, int, const T* const*, const double*,        \
                               const double*, double, const T*, double, const T*, double, T*, T*,       \
                               double*, double*, const Exec&);                                          \
  template void cnf_step_forward<T>(const CnfSpec&, const Tableau&, const Params<T>&,                  \
                                    const CnfStepIn<T>&, const CnfStepOut<T>&, const Exec&);            \
  template void cnf_step_backward<T>(const CnfSpec&, const Tableau&, const Params<T>&,                 \
                                     const CnfStepIn<T>&, const T*, const CnfStepGradIn<T>&,            \
                                     const CnfStepGradOut<T>&, const Exec&);                            \
  template void cnf_grid_forward<T>(const CnfSpec&, const Tableau&, const Params<T>&, const double*, int,  \
                                    int64_t, const T*, const T*, const T*, T*, T*, T*, const Exec&);    \
  template void cnf_grid_backward<T>(const CnfSpec&, const Tableau&, const Params<T>&, const double*, int, \
                                     int64_t, const T*, const T*, const T*, const T*, T*, T*, T*,       \
                                     const Grads<T>*, double*, const Exec&);

FASTODE_INSTANTIATE(float)
FASTODE_INSTANTIATE(double)

}  // namespace fastode
