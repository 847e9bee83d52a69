// Element-wise kernels of the core (multi-versioned with target_clones).
#pragma once

#include "detail/activations.h"

namespace fastode {
namespace {  // internal linkage: each translation unit has its own copy (see platform.h)

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

}  // namespace
}  // namespace fastode
