// Generic RK stage combination and step epilogue on flat vectors.
#include "detail/mlp_tile.h"

namespace fastode {

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

// Explicit instantiations
#define FASTODE_INSTANTIATE(T) \
  template void rk_combine<T>(int64_t, const T*, int, const T* const*, const double*, double, T*, const Exec&); \
  template void rk_epilogue<T>(int64_t, int64_t, const T*, int, const T* const*, const double*, const double*, double, const T*, double, const T*, double, T*, T*, double*, double*, const Exec&);

FASTODE_INSTANTIATE(float)
FASTODE_INSTANTIATE(double)

}  // namespace fastode
