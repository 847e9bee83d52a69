// Activations of the core: value, first and second derivative (float32 tanh: a rational approximation).
#pragma once

#include "detail/platform.h"

namespace fastode {
namespace {  // internal linkage: each translation unit has its own copy (see platform.h)

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

}  // namespace
}  // namespace fastode
