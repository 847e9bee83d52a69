// Unit tests of the torch-free core (run by ctest): independent naive references in double precision
// and central finite differences. Usage: test_core [group]   (no argument: every group; groups follow the
// translation units of the core: activations, mlp_forward, mlp_backward, cnf_step, cnf_grid, gemm, threads, pool)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../fastode.h"

using namespace fastode;

static int g_failures = 0;
#define CHECK(cond, ...)                                    \
  do {                                                      \
    if (!(cond)) {                                          \
      ++g_failures;                                         \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);      \
      std::printf(__VA_ARGS__);                             \
      std::printf("\n");                                    \
    }                                                       \
  } while (0)

static double max_rel(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(a[i] - b[i]));
    den = std::max(den, std::fabs(b[i]));
  }
  return num / den;
}
template <typename T>
static std::vector<double> todbl(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// ------------------------------------------------------------------------------------------------
// A model: dims, activation, parameters in double (cast to T for the kernels).
struct Model {
  Net net;
  std::vector<std::vector<double>> W, b, gw, gb, bw;
  Model(std::vector<int64_t> dims, int act, unsigned seed) {
    net.dims = dims;
    net.act = act;
    std::mt19937 rng(seed);
    std::normal_distribution<double> nd(0.0, 1.0);
    for (size_t l = 0; l + 1 < dims.size(); ++l) {
      int64_t n = dims[l], m = dims[l + 1];
      double sc = 1.0 / std::sqrt(double(n));
      std::vector<double> w(m * n), bb(m), g1(m), g2(m), g3(m);
      for (auto& x : w) x = sc * nd(rng);
      for (auto& x : bb) x = 0.3 * nd(rng);
      for (auto& x : g1) x = 0.8 * nd(rng);
      for (auto& x : g2) x = 0.5 * nd(rng);
      for (auto& x : g3) x = 0.4 * nd(rng);
      W.push_back(w);
      b.push_back(bb);
      gw.push_back(g1);
      gb.push_back(g2);
      bw.push_back(g3);
    }
  }
  int L() const { return net.L(); }
  // flat view of all parameters for finite differences
  std::vector<double*> flat() {
    std::vector<double*> r;
    for (int l = 0; l < L(); ++l)
      for (auto* v : {&W[l], &b[l], &gw[l], &gb[l], &bw[l]})
        for (auto& x : *v) r.push_back(&x);
    return r;
  }
};

template <typename T>
struct TParams {
  std::vector<std::vector<T>> W, b, gw, gb, bw;
  Params<T> p;
  explicit TParams(const Model& m) {
    auto cv = [](const std::vector<double>& v) { return std::vector<T>(v.begin(), v.end()); };
    for (int l = 0; l < m.L(); ++l) {
      W.push_back(cv(m.W[l]));
      b.push_back(cv(m.b[l]));
      gw.push_back(cv(m.gw[l]));
      gb.push_back(cv(m.gb[l]));
      bw.push_back(cv(m.bw[l]));
    }
    for (int l = 0; l < m.L(); ++l) {
      p.W.push_back(W[l].data());
      p.b.push_back(b[l].data());
      p.gw.push_back(gw[l].data());
      p.gb.push_back(gb[l].data());
      p.bw.push_back(bw[l].data());
    }
  }
};
template <typename T>
struct TGrads {
  std::vector<std::vector<T>> W, b, gw, gb, bw;
  Grads<T> g;
  explicit TGrads(const Model& m) {
    for (int l = 0; l < m.L(); ++l) {
      W.emplace_back(m.W[l].size(), T(0));
      b.emplace_back(m.b[l].size(), T(0));
      gw.emplace_back(m.b[l].size(), T(0));
      gb.emplace_back(m.b[l].size(), T(0));
      bw.emplace_back(m.b[l].size(), T(0));
    }
    for (int l = 0; l < m.L(); ++l) {
      g.W.push_back(W[l].data());
      g.b.push_back(b[l].data());
      g.gw.push_back(gw[l].data());
      g.gb.push_back(gb[l].data());
      g.bw.push_back(bw[l].data());
    }
  }
  std::vector<double> flat() const {
    std::vector<double> r;
    for (size_t l = 0; l < W.size(); ++l)
      for (auto* v : {&W[l], &b[l], &gw[l], &gb[l], &bw[l]})
        for (auto x : *v) r.push_back(double(x));
    return r;
  }
};

// ------------------------------------------------------------------------------------------------
// Naive double reference (one row at a time).
static double act_f(int act, double a) {
  switch (act) {
    case kTanh: return std::tanh(a);
    case kSoftplus: return a > 20 ? a : std::log1p(std::exp(a));
    case kElu: return a > 0 ? a : std::expm1(a);
    case kSwish: return a / (1 + std::exp(-a));
    default: return a;
  }
}
static double act_d1(int act, double a) {
  double s = 1 / (1 + std::exp(-a));
  switch (act) {
    case kTanh: return 1 - std::tanh(a) * std::tanh(a);
    case kSoftplus: return a > 20 ? 1 : s;
    case kElu: return a > 0 ? 1 : std::exp(a);
    case kSwish: return s * (1 + a * (1 - s));
    default: return 1;
  }
}

struct RowOut {
  std::vector<double> f;
  std::vector<std::vector<double>> vjp;  // per probe
  double trace = 0, kin = 0, frob = 0;
};

static RowOut naive_row(const Model& m, double t, const double* z, const std::vector<std::vector<double>>& probes) {
  int L = m.L();
  std::vector<std::vector<double>> pre(L);
  std::vector<double> h(z, z + m.net.dims[0]);
  for (int l = 0; l < L; ++l) {
    int64_t n = m.net.dims[l], o = m.net.dims[l + 1];
    std::vector<double> a(o);
    for (int64_t j = 0; j < o; ++j) {
      double u = m.b[l][j];
      for (int64_t k = 0; k < n; ++k) u += m.W[l][j * n + k] * h[k];
      double g = 1 / (1 + std::exp(-(m.gw[l][j] * t + m.gb[l][j])));
      a[j] = u * g + m.bw[l][j] * t;
    }
    pre[l] = a;
    if (l + 1 < L)
      for (auto& x : a) x = act_f(m.net.act, x);
    h = a;
  }
  RowOut r;
  r.f = h;
  for (double x : h) r.kin += x * x;
  for (const auto& e : probes) {
    std::vector<double> g = e;  // gradient wrt a_{L-1}
    for (int l = L - 1; l >= 0; --l) {
      int64_t n = m.net.dims[l], o = m.net.dims[l + 1];
      std::vector<double> p(n, 0.0);
      for (int64_t j = 0; j < o; ++j) {
        double gate = 1 / (1 + std::exp(-(m.gw[l][j] * t + m.gb[l][j])));
        for (int64_t k = 0; k < n; ++k) p[k] += g[j] * gate * m.W[l][j * n + k];
      }
      if (l > 0)
        for (int64_t k = 0; k < n; ++k) p[k] *= act_d1(m.net.act, pre[l - 1][k]);
      g = p;
    }
    for (size_t d = 0; d < g.size(); ++d) {
      r.trace += g[d] * e[d];
      r.frob += g[d] * g[d];
    }
    r.vjp.push_back(g);
  }
  return r;
}

// ------------------------------------------------------------------------------------------------
static std::vector<double> randn(size_t n, unsigned seed, double sc = 1.0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, sc);
  std::vector<double> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

template <typename T>
static std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

// Central differences of loss() with respect to each value behind xs (perturbed in place, then restored).
template <typename F>
static std::vector<double> central_diff(const std::vector<double*>& xs, F&& loss, double h = 1e-6) {
  std::vector<double> r;
  for (double* x : xs) {
    double o = *x;
    *x = o + h;
    double lp = loss();
    *x = o - h;
    double lm = loss();
    *x = o;
    r.push_back((lp - lm) / (2 * h));
  }
  return r;
}
static std::vector<double*> ptrs(std::vector<double>& v) {
  std::vector<double*> r;
  for (auto& x : v) r.push_back(&x);
  return r;
}

// Forward values (f, vjp, trace, kinetic, jac_frob) against the naive reference.
template <typename T>
static void test_forward_values(int act, bool exact, int64_t B, int64_t tile, double tol) {
  Model m({3, 16, 12, 3}, act, 7 + act);
  TParams<T> tp(m);
  const int64_t D = 3;
  const int K = exact ? int(D) : 1;
  const double t = 0.37;
  auto z = randn(B * D, 11);
  auto e = randn(B * D, 12);
  std::vector<T> zt = cast<T>(z), et = cast<T>(e), f(B * D), vjp(K * B * D), tr(B), kin(B), fr(B);
  Exec ex;
  ex.tile = tile;
  mlp_probe_forward<T>(m.net, tp.p, t, B, zt.data(), K, exact ? nullptr : et.data(), f.data(), vjp.data(),
                       tr.data(), kin.data(), fr.data(), nullptr, ex);
  std::vector<T> f2(B * D);
  mlp_forward<T>(m.net, tp.p, t, B, zt.data(), f2.data(), nullptr, ex);
  std::vector<double> rf, rv, rt, rk, rfr;
  for (int64_t r = 0; r < B; ++r) {
    std::vector<std::vector<double>> probes;
    if (exact) {
      for (int k = 0; k < K; ++k) {
        std::vector<double> ek(D, 0.0);
        ek[k] = 1;
        probes.push_back(ek);
      }
    } else {
      probes.push_back(std::vector<double>(e.begin() + r * D, e.begin() + (r + 1) * D));
    }
    RowOut o = naive_row(m, t, z.data() + r * D, probes);
    rf.insert(rf.end(), o.f.begin(), o.f.end());
    rt.push_back(o.trace);
    rk.push_back(o.kin);
    rfr.push_back(o.frob);
  }
  for (int k = 0; k < K; ++k)
    for (int64_t r = 0; r < B; ++r) {
      std::vector<std::vector<double>> probes;
      std::vector<double> ek(D, 0.0);
      if (exact)
        ek[k] = 1;
      else
        ek.assign(e.begin() + r * D, e.begin() + (r + 1) * D);
      probes.push_back(ek);
      RowOut o = naive_row(m, t, z.data() + r * D, probes);
      rv.insert(rv.end(), o.vjp[0].begin(), o.vjp[0].end());
    }
  CHECK(max_rel(todbl(f), rf) < tol, "f act=%d exact=%d B=%ld tile=%ld err=%g", act, exact, (long)B, (long)tile,
        max_rel(todbl(f), rf));
  CHECK(max_rel(todbl(f2), rf) < tol, "mlp_forward f act=%d err=%g", act, max_rel(todbl(f2), rf));
  CHECK(max_rel(todbl(vjp), rv) < tol, "vjp act=%d exact=%d err=%g", act, exact, max_rel(todbl(vjp), rv));
  CHECK(max_rel(todbl(tr), rt) < tol, "trace act=%d exact=%d err=%g", act, exact, max_rel(todbl(tr), rt));
  CHECK(max_rel(todbl(kin), rk) < tol, "kinetic act=%d err=%g", act, max_rel(todbl(kin), rk));
  CHECK(max_rel(todbl(fr), rfr) < tol, "jac_frob act=%d err=%g", act, max_rel(todbl(fr), rfr));
}

// Gradients of a random linear functional of every output, against central differences (double).
static void test_backward_fd(int act, bool exact, int64_t B, int64_t tile) {
  Model m({2, 9, 7, 2}, act, 21 + act);
  const int64_t D = 2;
  const int K = exact ? int(D) : 1;
  double t = 0.61;
  auto z = randn(B * D, 31);
  auto e = randn(K * B * D, 32);
  auto wf = randn(B * D, 33), wv = randn(K * B * D, 34), wt = randn(B, 35), wk = randn(B, 36),
       wr = randn(B, 37);
  Exec ex;
  ex.tile = tile;
  auto loss = [&](Model& mm, double tt, const std::vector<double>& zz, const std::vector<double>& ee) {
    TParams<double> tp(mm);
    std::vector<double> f(B * D), v(K * B * D), tr(B), kin(B), fr(B);
    mlp_probe_forward<double>(mm.net, tp.p, tt, B, zz.data(), K, exact ? nullptr : ee.data(), f.data(), v.data(),
                              tr.data(), kin.data(), fr.data(), nullptr, ex);
    double s = 0;
    for (int64_t i = 0; i < B * D; ++i) s += wf[i] * f[i];
    for (int64_t i = 0; i < K * B * D; ++i) s += wv[i] * v[i];
    for (int64_t i = 0; i < B; ++i) s += wt[i] * tr[i] + wk[i] * kin[i] + wr[i] * fr[i];
    return s;
  };
  // analytic
  TParams<double> tp(m);
  std::vector<double> f(B * D), v(K * B * D), tr(B), kin(B), fr(B);
  std::vector<double> save(mlp_save_size(m.net, B, K, true, ex));
  mlp_probe_forward<double>(m.net, tp.p, t, B, z.data(), K, exact ? nullptr : e.data(), f.data(), v.data(),
                            tr.data(), kin.data(), fr.data(), save.data(), ex);
  std::vector<double> gz(B * D), ge(K * B * D);
  TGrads<double> gr(m);
  double gt = 0;
  mlp_backward<double>(m.net, tp.p, t, B, z.data(), K, exact ? nullptr : e.data(), true, save.data(), f.data(),
                       v.data(), wf.data(), wv.data(), wt.data(), wk.data(), wr.data(), gz.data(),
                       exact ? nullptr : ge.data(), &gr.g, &gt, ex);
  auto L = [&]() { return loss(m, t, z, e); };
  auto num = central_diff(m.flat(), L);
  CHECK(max_rel(gr.flat(), num) < 1e-6, "param grads act=%d exact=%d err=%g", act, exact, max_rel(gr.flat(), num));
  auto numz = central_diff(ptrs(z), L);
  CHECK(max_rel(gz, numz) < 1e-6, "z grad act=%d exact=%d err=%g", act, exact, max_rel(gz, numz));
  if (!exact) {
    auto nume = central_diff(ptrs(e), L);
    CHECK(max_rel(ge, nume) < 1e-6, "e grad act=%d err=%g", act, max_rel(ge, nume));
  }
  double numt = central_diff({&t}, L)[0];
  CHECK(std::fabs(gt - numt) < 1e-6 * std::max(1.0, std::fabs(numt)), "t grad act=%d exact=%d %g vs %g", act, exact,
        gt, numt);
}

// ------------------------------------------------------------------------------------------------
// Fused CNF step against stages composed from mlp_probe_forward, and its backward against differences.
static Tableau rk4_38() {  // the 3/8 rule (torchdiffeq's rk4); the tests own their coefficients
  Tableau tb;
  tb.s = 4;
  tb.c = {0, 1.0 / 3, 2.0 / 3, 1};
  tb.a = {0, 0, 0, 0, 1.0 / 3, 0, 0, 0, -1.0 / 3, 1, 0, 0, 1, -1, 1, 0};
  tb.b = {0.125, 0.375, 0.375, 0.125};
  return tb;
}
static Tableau heun_euler() {  // embedded 2(1) pair: tests the error estimate
  Tableau tb;
  tb.s = 2;
  tb.c = {0, 1};
  tb.a = {0, 0, 1, 0};
  tb.b = {0.5, 0.5};
  tb.b_err = {-0.5, 0.5};
  return tb;
}

template <typename T>
static void test_step_forward(const Tableau& tab, int64_t B, int64_t tile, double tol) {
  Model m({2, 8, 8, 2}, kTanh, 41);
  TParams<T> tp(m);
  const int64_t D = 2;
  CnfSpec spec;
  spec.net = m.net;
  spec.K = 1;
  spec.rates = {0, 2, 3};
  const int64_t NQ = 3;
  auto z0 = randn(B * D, 51), q0 = randn(B * NQ, 52), e = randn(B * D, 53);
  std::vector<T> z0t = cast<T>(z0), q0t = cast<T>(q0), et = cast<T>(e);
  double t0 = 0.2, dt = 0.15;
  std::vector<double> atol(D + NQ, 1e-3), rtol(D + NQ, 1e-2);
  CnfStepIn<T> in;
  in.t0 = t0;
  in.dt = dt;
  in.B = B;
  in.z0 = z0t.data();
  in.q0 = q0t.data();
  in.e = et.data();
  in.atol = atol.data();
  in.rtol = rtol.data();
  std::vector<T> z1(B * D), q1(B * NQ), ez(B * D), eq(B * NQ), kz(tab.s * B * D), kq(tab.s * B * NQ);
  std::vector<double> ss(D + NQ);
  CnfStepOut<T> out;
  out.z1 = z1.data();
  out.q1 = q1.data();
  out.ez = tab.has_err() ? ez.data() : nullptr;
  out.eq = tab.has_err() ? eq.data() : nullptr;
  out.kz = kz.data();
  out.kq = kq.data();
  out.sumsq = ss.data();
  Exec ex;
  ex.tile = tile;
  cnf_step_forward<T>(spec, tab, tp.p, in, out, ex);
  // reference: stage by stage in double with mlp_probe_forward<double>
  TParams<double> td(m);
  int s = tab.s;
  std::vector<std::vector<double>> KZ(s), KQ(s);
  for (int i = 0; i < s; ++i) {
    std::vector<double> zi = z0;
    for (int j = 0; j < i; ++j)
      for (int64_t x = 0; x < B * D; ++x) zi[x] += dt * tab.a[i * s + j] * KZ[j][x];
    std::vector<double> f(B * D), v(B * D), tr(B), kin(B), fr(B);
    mlp_probe_forward<double>(m.net, td.p, t0 + tab.c[i] * dt, B, zi.data(), 1, e.data(), f.data(), v.data(),
                              tr.data(), kin.data(), fr.data(), nullptr, Exec());
    KZ[i] = f;
    KQ[i].resize(B * NQ);
    for (int64_t r = 0; r < B; ++r) {
      KQ[i][r * NQ + 0] = -tr[r];
      KQ[i][r * NQ + 1] = kin[r];
      KQ[i][r * NQ + 2] = fr[r];
    }
  }
  std::vector<double> rz1 = z0, rq1 = q0, rez(B * D, 0.0), req(B * NQ, 0.0);
  for (int i = 0; i < s; ++i) {
    for (int64_t x = 0; x < B * D; ++x) rz1[x] += dt * tab.b[i] * KZ[i][x];
    for (int64_t x = 0; x < B * NQ; ++x) rq1[x] += dt * tab.b[i] * KQ[i][x];
    if (tab.has_err()) {
      for (int64_t x = 0; x < B * D; ++x) rez[x] += dt * tab.b_err[i] * KZ[i][x];
      for (int64_t x = 0; x < B * NQ; ++x) req[x] += dt * tab.b_err[i] * KQ[i][x];
    }
  }
  CHECK(max_rel(todbl(z1), rz1) < tol, "step z1 err=%g", max_rel(todbl(z1), rz1));
  CHECK(max_rel(todbl(q1), rq1) < tol, "step q1 err=%g", max_rel(todbl(q1), rq1));
  std::vector<double> kzall;
  for (int i = 0; i < s; ++i) kzall.insert(kzall.end(), KZ[i].begin(), KZ[i].end());
  CHECK(max_rel(todbl(kz), kzall) < tol, "step stages err=%g", max_rel(todbl(kz), kzall));
  if (tab.has_err()) {
    CHECK(max_rel(todbl(ez), rez) < tol, "step ez err=%g", max_rel(todbl(ez), rez));
    CHECK(max_rel(todbl(eq), req) < tol, "step eq err=%g", max_rel(todbl(eq), req));
    std::vector<double> rss(D + NQ, 0.0);
    for (int64_t r = 0; r < B; ++r)
      for (int64_t j = 0; j < D + NQ; ++j) {
        double y0 = j < D ? z0[r * D + j] : q0[r * NQ + j - D];
        double y1 = j < D ? rz1[r * D + j] : rq1[r * NQ + j - D];
        double er = j < D ? rez[r * D + j] : req[r * NQ + j - D];
        double sc = 1e-3 + 1e-2 * std::max(std::fabs(y0), std::fabs(y1));
        rss[j] += (er / sc) * (er / sc);
      }
    CHECK(max_rel(ss, rss) < 100 * tol, "step sumsq err=%g", max_rel(ss, rss));
  }
}

static void test_step_backward_fd(const Tableau& tab, bool fsal_in, bool exact) {
  Model m({2, 6, 5, 2}, kTanh, 61);
  const int64_t B = 5, D = 2;
  CnfSpec spec;
  spec.net = m.net;
  spec.K = exact ? 2 : 1;
  spec.exact = exact;
  spec.rates = {0, 2, 3};
  const int64_t NQ = 3;
  const int s = tab.s;
  auto z0 = randn(B * D, 71), q0 = randn(B * NQ, 72), e = randn(B * D, 73);
  auto kz0 = randn(B * D, 74), kq0 = randn(B * NQ, 75);
  auto wz = randn(B * D, 76), wq = randn(B * NQ, 77), wez = randn(B * D, 78), weq = randn(B * NQ, 79);
  auto wkz = randn(s * B * D, 80), wkq = randn(s * B * NQ, 81);
  Exec ex;
  ex.tile = 2;  // ragged tiles
  auto run = [&](Model& mm, double t0, double dt, const std::vector<double>& z, const std::vector<double>& q,
                 const std::vector<double>& ee, const std::vector<double>& k0, const std::vector<double>& kq0v,
                 std::vector<double>* save, TParams<double>& tp) {
    CnfStepIn<double> in;
    in.t0 = t0;
    in.dt = dt;
    in.B = B;
    in.z0 = z.data();
    in.q0 = q.data();
    in.e = exact ? nullptr : ee.data();
    in.kz0 = fsal_in ? k0.data() : nullptr;
    in.kq0 = fsal_in ? kq0v.data() : nullptr;
    std::vector<double> z1(B * D), q1(B * NQ), ez(B * D), eq(B * NQ), kz(s * B * D), kq(s * B * NQ);
    CnfStepOut<double> out;
    out.z1 = z1.data();
    out.q1 = q1.data();
    out.ez = tab.has_err() ? ez.data() : nullptr;
    out.eq = tab.has_err() ? eq.data() : nullptr;
    out.kz = kz.data();
    out.kq = kq.data();
    out.save = save ? save->data() : nullptr;
    cnf_step_forward<double>(spec, tab, tp.p, in, out, ex);
    double L = 0;
    for (int64_t i = 0; i < B * D; ++i) L += wz[i] * z1[i] + (tab.has_err() ? wez[i] * ez[i] : 0);
    for (int64_t i = 0; i < B * NQ; ++i) L += wq[i] * q1[i] + (tab.has_err() ? weq[i] * eq[i] : 0);
    for (int64_t i = 0; i < s * B * D; ++i) L += wkz[i] * kz[i];
    for (int64_t i = 0; i < s * B * NQ; ++i) L += wkq[i] * kq[i];
    return L;
  };
  auto loss = [&](Model& mm, double t0, double dt, const std::vector<double>& z, const std::vector<double>& q,
                  const std::vector<double>& ee, const std::vector<double>& k0, const std::vector<double>& kq0v) {
    TParams<double> tp(mm);
    return run(mm, t0, dt, z, q, ee, k0, kq0v, nullptr, tp);
  };
  double t0 = 0.3, dt = 0.2;
  TParams<double> tp(m);
  std::vector<double> save(cnf_step_save_size(spec, tab, B, ex));
  run(m, t0, dt, z0, q0, e, kz0, kq0, &save, tp);
  CnfStepIn<double> in;
  in.t0 = t0;
  in.dt = dt;
  in.B = B;
  in.z0 = z0.data();
  in.q0 = q0.data();
  in.e = exact ? nullptr : e.data();
  in.kz0 = fsal_in ? kz0.data() : nullptr;
  in.kq0 = fsal_in ? kq0.data() : nullptr;
  CnfStepGradIn<double> gi;
  gi.gz1 = wz.data();
  gi.gq1 = wq.data();
  gi.gez = tab.has_err() ? wez.data() : nullptr;
  gi.geq = tab.has_err() ? weq.data() : nullptr;
  gi.gkz = wkz.data();
  gi.gkq = wkq.data();
  std::vector<double> gz0(B * D), gq0(B * NQ), ge(B * D), gkz0(B * D), gkq0(B * NQ);
  TGrads<double> gr(m);
  double gt0 = 0, gdt = 0;
  CnfStepGradOut<double> go;
  go.gz0 = gz0.data();
  go.gq0 = gq0.data();
  go.ge = exact ? nullptr : ge.data();
  go.gkz0 = gkz0.data();
  go.gkq0 = gkq0.data();
  go.grads = &gr.g;
  go.gt0 = &gt0;
  go.gdt = &gdt;
  cnf_step_backward<double>(spec, tab, tp.p, in, save.data(), gi, go, ex);
  auto L = [&]() { return loss(m, t0, dt, z0, q0, e, kz0, kq0); };
  auto np = central_diff(m.flat(), L);
  const char* tag = fsal_in ? "fsal" : "plain";
  CHECK(max_rel(gr.flat(), np) < 1e-6, "step param grads (%s, s=%d, exact=%d) err=%g", tag, s, exact,
        max_rel(gr.flat(), np));
  auto nz = central_diff(ptrs(z0), L);
  CHECK(max_rel(gz0, nz) < 1e-6, "step z0 grad (%s) err=%g", tag, max_rel(gz0, nz));
  auto nq = central_diff(ptrs(q0), L);
  CHECK(max_rel(gq0, nq) < 1e-6, "step q0 grad (%s) err=%g", tag, max_rel(gq0, nq));
  if (!exact) {
    auto ne = central_diff(ptrs(e), L);
    CHECK(max_rel(ge, ne) < 1e-6, "step e grad (%s) err=%g", tag, max_rel(ge, ne));
  }
  if (fsal_in) {
    auto nk = central_diff(ptrs(kz0), L);
    CHECK(max_rel(gkz0, nk) < 1e-6, "step kz0 grad err=%g", max_rel(gkz0, nk));
    auto nkq = central_diff(ptrs(kq0), L);
    CHECK(max_rel(gkq0, nkq) < 1e-6, "step kq0 grad err=%g", max_rel(gkq0, nkq));
  }
  double nt0 = central_diff({&t0}, L)[0];
  double ndt = central_diff({&dt}, L)[0];
  CHECK(std::fabs(gt0 - nt0) < 1e-6 * std::max(1.0, std::fabs(nt0)), "step t0 grad (%s) %g vs %g", tag, gt0, nt0);
  CHECK(std::fabs(gdt - ndt) < 1e-6 * std::max(1.0, std::fabs(ndt)), "step dt grad (%s) %g vs %g", tag, gdt, ndt);
}

// Fixed-grid solve: equals chained steps; backward against central differences (incl. grid times).
static void test_grid_solve() {
  Model m({2, 6, 5, 2}, kTanh, 91);
  const int64_t B = 5, D = 2, NQ = 2;
  Tableau tab = rk4_38();
  CnfSpec spec;
  spec.net = m.net;
  spec.rates = {0, 2};
  std::vector<double> ts = {0.0, 0.1, 0.25, 0.3};
  const int nsteps = 3;
  auto z0 = randn(B * D, 92), q0 = randn(B * NQ, 93), e = randn(B * D, 94);
  auto wz = randn(B * D, 95), wq = randn(B * NQ, 96);
  Exec ex;
  ex.tile = 2;
  auto solve = [&](Model& mm, const std::vector<double>& tt, const std::vector<double>& z,
                   const std::vector<double>& q, const std::vector<double>& ee, std::vector<double>* save,
                   std::vector<double>* zT, std::vector<double>* qT) {
    TParams<double> tp(mm);
    std::vector<double> zo(B * D), qo(B * NQ);
    cnf_grid_forward<double>(spec, tab, tp.p, tt.data(), nsteps, B, z.data(), q.data(), ee.data(), zo.data(),
                             qo.data(), save ? save->data() : nullptr, ex);
    if (zT) *zT = zo;
    if (qT) *qT = qo;
    double L = 0;
    for (int64_t i = 0; i < B * D; ++i) L += wz[i] * zo[i];
    for (int64_t i = 0; i < B * NQ; ++i) L += wq[i] * qo[i];
    return L;
  };
  // forward = chained steps
  std::vector<double> zT, qT;
  solve(m, ts, z0, q0, e, nullptr, &zT, &qT);
  {
    TParams<double> tp(m);
    std::vector<double> z = z0, q = q0;
    for (int n = 0; n < nsteps; ++n) {
      std::vector<double> z1(B * D), q1(B * NQ);
      CnfStepIn<double> in;
      in.t0 = ts[n];
      in.dt = ts[n + 1] - ts[n];
      in.B = B;
      in.z0 = z.data();
      in.q0 = q.data();
      in.e = e.data();
      CnfStepOut<double> out;
      out.z1 = z1.data();
      out.q1 = q1.data();
      cnf_step_forward<double>(spec, tab, tp.p, in, out, ex);
      z = z1;
      q = q1;
    }
    CHECK(max_rel(zT, z) < 1e-15 && max_rel(qT, q) < 1e-15, "grid forward != chained steps");
  }
  // backward
  TParams<double> tp(m);
  std::vector<double> save(cnf_grid_save_size(spec, tab, B, nsteps, ex));
  solve(m, ts, z0, q0, e, &save, nullptr, nullptr);
  std::vector<double> gz0(B * D), gq0(B * NQ), ge(B * D), gts(nsteps + 1);
  TGrads<double> gr(m);
  cnf_grid_backward<double>(spec, tab, tp.p, ts.data(), nsteps, B, e.data(), save.data(), wz.data(), wq.data(),
                            gz0.data(), gq0.data(), ge.data(), &gr.g, gts.data(), ex);
  auto L = [&]() { return solve(m, ts, z0, q0, e, nullptr, nullptr, nullptr); };
  auto np = central_diff(m.flat(), L);
  CHECK(max_rel(gr.flat(), np) < 1e-6, "grid param grads err=%g", max_rel(gr.flat(), np));
  auto nz = central_diff(ptrs(z0), L);
  CHECK(max_rel(gz0, nz) < 1e-6, "grid z0 grad err=%g", max_rel(gz0, nz));
  auto nq = central_diff(ptrs(q0), L);
  CHECK(max_rel(gq0, nq) < 1e-6, "grid q0 grad err=%g", max_rel(gq0, nq));
  auto ne = central_diff(ptrs(e), L);
  CHECK(max_rel(ge, ne) < 1e-6, "grid e grad err=%g", max_rel(ge, ne));
  auto nt = central_diff(ptrs(ts), L);
  CHECK(max_rel(gts, nt) < 1e-6, "grid time grads err=%g", max_rel(gts, nt));
}

// float32 (micro-kernel path on AVX-512 CPUs for the wide layers) against float64 (validated by finite
// differences above), for the MLP backward and a fused step, widths that are not multiples of 16.
static void test_float_vs_double(int act) {
  Model m({2, 37, 64, 20, 2}, act, 111 + act);
  const int64_t B = 70, D = 2;
  auto z = randn(B * D, 112), e = randn(B * D, 113), wf = randn(B * D, 114), wv = randn(B * D, 115),
       wt = randn(B, 116), wk = randn(B, 117), wr = randn(B, 118);
  Exec ex;
  ex.tile = 32;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    TParams<T> tp(m);
    std::vector<T> zt = cast<T>(z), et = cast<T>(e), f(B * D), v(B * D), tr(B), kin(B), fr(B);
    std::vector<T> save(mlp_save_size(m.net, B, 1, true, ex));
    mlp_probe_forward<T>(m.net, tp.p, 0.3, B, zt.data(), 1, et.data(), f.data(), v.data(), tr.data(), kin.data(),
                         fr.data(), save.data(), ex);
    std::vector<T> gz(B * D), ge(B * D), wft = cast<T>(wf), wvt = cast<T>(wv), wtt = cast<T>(wt), wkt = cast<T>(wk),
                   wrt = cast<T>(wr);
    TGrads<T> gr(m);
    T gt = 0;
    mlp_backward<T>(m.net, tp.p, 0.3, B, zt.data(), 1, et.data(), true, save.data(), f.data(), v.data(), wft.data(),
                    wvt.data(), wtt.data(), wkt.data(), wrt.data(), gz.data(), ge.data(), &gr.g, &gt, ex);
    // a fused rk4 step with its backward
    CnfSpec spec;
    spec.net = m.net;
    spec.rates = {0, 2, 3};
    Tableau tab = rk4_38();
    std::vector<T> q0(B * 3, T(0)), z1(B * D), q1(B * 3), ssave(cnf_step_save_size(spec, tab, B, ex));
    CnfStepIn<T> in;
    in.t0 = 0.1;
    in.dt = 0.2;
    in.B = B;
    in.z0 = zt.data();
    in.q0 = q0.data();
    in.e = et.data();
    CnfStepOut<T> out;
    out.z1 = z1.data();
    out.q1 = q1.data();
    out.save = ssave.data();
    cnf_step_forward<T>(spec, tab, tp.p, in, out, ex);
    std::vector<T> gq1(B * 3, T(1)), gz0(B * D), gq0(B * 3);
    TGrads<T> gr2(m);
    CnfStepGradIn<T> gi;
    gi.gz1 = wft.data();
    gi.gq1 = gq1.data();
    CnfStepGradOut<T> go;
    go.gz0 = gz0.data();
    go.grads = &gr2.g;
    cnf_step_backward<T>(spec, tab, tp.p, in, ssave.data(), gi, go, ex);
    std::vector<std::vector<double>> r = {todbl(f), todbl(v), todbl(tr), todbl(fr), todbl(gz), todbl(ge),
                                          gr.flat(), {double(gt)}, todbl(z1), todbl(q1), todbl(gz0), gr2.flat()};
    return r;
  };
  auto d = run(double());
  auto f1 = run(float());
  std::string orig = gemm_backend();
  set_gemm_backend("fallback");  // no micro-kernels, no BLAS
  auto f2 = run(float());
  set_gemm_backend("auto");
  const char* names[] = {"f", "vjp", "trace", "frob", "gz", "ge", "param grads", "gt", "z1", "q1", "step gz0",
                         "step param grads"};
  for (size_t i = 0; i < d.size(); ++i) {
    CHECK(max_rel(f1[i], d[i]) < 3e-4, "float (%s) vs double: %s act=%d err=%g", orig.c_str(), names[i], act,
          max_rel(f1[i], d[i]));
    CHECK(max_rel(f2[i], d[i]) < 3e-4, "float (fallback) vs double: %s act=%d err=%g", names[i], act,
          max_rel(f2[i], d[i]));
  }
}

// ------------------------------------------------------------------------------------------------
static void test_gemm_backends() {
  // blas vs fallback: same forward to rounding (only meaningful when a BLAS is present)
  std::string orig = gemm_backend();
  Model m({2, 64, 64, 2}, kTanh, 3);
  TParams<float> tp(m);
  const int64_t B = 100;
  auto z = cast<float>(randn(B * 2, 5)), e = cast<float>(randn(B * 2, 6));
  std::vector<float> f1(B * 2), v1(B * 2), t1(B), f2(B * 2), v2(B * 2), t2(B);
  set_gemm_backend("fallback");
  mlp_probe_forward<float>(m.net, tp.p, 0.1, B, z.data(), 1, e.data(), f1.data(), v1.data(), t1.data(), nullptr,
                           nullptr, nullptr, Exec());
  set_gemm_backend("auto");
  mlp_probe_forward<float>(m.net, tp.p, 0.1, B, z.data(), 1, e.data(), f2.data(), v2.data(), t2.data(), nullptr,
                           nullptr, nullptr, Exec());
  std::printf("  gemm backend in use: %s\n", gemm_backend().c_str());
  CHECK(max_rel(todbl(f1), todbl(f2)) < 1e-5, "fallback vs %s f err=%g", orig.c_str(), max_rel(todbl(f1), todbl(f2)));
  CHECK(max_rel(todbl(t1), todbl(t2)) < 1e-4, "fallback vs %s trace err=%g", orig.c_str(),
        max_rel(todbl(t1), todbl(t2)));
}

static void test_threads_deterministic() {
#ifdef _OPENMP
  Model m({2, 64, 64, 64, 2}, kTanh, 9);
  TParams<float> tp(m);
  const int64_t B = 1000, D = 2;
  Tableau tab = rk4_38();
  CnfSpec spec;
  spec.net = m.net;
  spec.rates = {0};
  auto z0 = cast<float>(randn(B * D, 1)), q0 = cast<float>(randn(B, 2)), e = cast<float>(randn(B * D, 3));
  auto gz = cast<float>(randn(B * D, 4)), gq = cast<float>(randn(B, 5));
  std::vector<std::vector<double>> results;
  for (int nt : {1, 2}) {
    omp_set_num_threads(nt);
    Exec ex;
    ex.nthreads = nt;
    CnfStepIn<float> in;
    in.t0 = 0.1;
    in.dt = 0.05;
    in.B = B;
    in.z0 = z0.data();
    in.q0 = q0.data();
    in.e = e.data();
    std::vector<float> z1(B * D), q1(B), save(cnf_step_save_size(spec, tab, B, ex));
    CnfStepOut<float> out;
    out.z1 = z1.data();
    out.q1 = q1.data();
    out.save = save.data();
    cnf_step_forward<float>(spec, tab, tp.p, in, out, ex);
    CnfStepGradIn<float> gi;
    gi.gz1 = gz.data();
    gi.gq1 = gq.data();
    std::vector<float> gz0(B * D), gq0(B), ge(B * D);
    TGrads<float> gr(m);
    double gt0, gdt;
    CnfStepGradOut<float> go;
    go.gz0 = gz0.data();
    go.gq0 = gq0.data();
    go.ge = ge.data();
    go.grads = &gr.g;
    go.gt0 = &gt0;
    go.gdt = &gdt;
    cnf_step_backward<float>(spec, tab, tp.p, in, save.data(), gi, go, ex);
    std::vector<double> all = todbl(z1);
    for (auto* v : {&q1, &gz0, &ge}) all.insert(all.end(), v->begin(), v->end());
    auto pf = gr.flat();
    all.insert(all.end(), pf.begin(), pf.end());
    all.push_back(gt0);
    all.push_back(gdt);
    results.push_back(all);
  }
  bool same = results[0] == results[1];
  CHECK(same, "1 and 2 threads differ (max rel %g)", max_rel(results[0], results[1]));
  omp_set_num_threads(1);
#else
  std::printf("  (built without OpenMP: thread test skipped)\n");
#endif
}

// float32 activations (rational tanh, polynomial exp / expm1 / log1p) against libm in double.
static double act_d2(int act, double a) {
  double s = 1 / (1 + std::exp(-a)), t = std::tanh(a);
  switch (act) {
    case kTanh: return -2 * t * (1 - t * t);
    case kSoftplus: return a > 20 ? 0 : s * (1 - s);
    case kElu: return a > 0 ? 0 : std::exp(a);
    case kSwish: return s * (1 - s) * (2 + a * (1 - 2 * s));
    default: return 0;
  }
}
static void test_activation_accuracy() {
  std::vector<float> a;
  for (double x = -100; x <= 100; x += 0.001) a.push_back(float(x));
  for (double x = -1e-3; x <= 1e-3; x += 1e-7) a.push_back(float(x));
  const int64_t n = int64_t(a.size());
  std::vector<float> h(n), d1(n), d2(n);
  for (int act : {kTanh, kSoftplus, kElu, kSwish, kIdentity}) {
    activation_f32(act, n, a.data(), h.data(), d1.data(), d2.data());
    double eh = 0, e1 = 0, e2 = 0;
    for (int64_t i = 0; i < n; ++i) {
      double x = a[i];
      double rh = act_f(act, x), r1 = act_d1(act, x), r2 = act_d2(act, x);
      // error relative to max(1, |value|): float rounding of the inputs to each formula included
      eh = std::max(eh, std::fabs(h[i] - rh) / std::max(1.0, std::fabs(rh)));
      e1 = std::max(e1, std::fabs(d1[i] - r1) / std::max(1.0, std::fabs(r1)));
      e2 = std::max(e2, std::fabs(d2[i] - r2) / std::max(1.0, std::fabs(r2)));
    }
    CHECK(eh < 1e-6 && e1 < 2e-6 && e2 < 2e-6, "float32 activation %d: value %g, d1 %g, d2 %g", act, eh, e1, e2);
  }
}

// The buffer pool (pool.cpp): reuse of the same size and of a slightly larger block, never of a much larger one,
// the real size kept for a block lent for a smaller request, and a buffer whose size drifts (a grid solve over a
// learned end time) kept to a bounded cache instead of one block per size ever seen.
static void test_pool() {
  pool_clear();
  const size_t MiB = size_t(1) << 20;
  void* a = pool_take(MiB);
  pool_give(a, MiB);
  CHECK(pool_cached() == MiB, "a returned block is cached (%zu)", pool_cached());
  void* b = pool_take(MiB);
  CHECK(b == a && pool_cached() == 0, "the same size reuses the cached block");
  pool_give(b, MiB);
  void* c = pool_take(MiB - 4096);  // slightly smaller: the cached block serves it, and keeps its real size
  CHECK(c == a, "a slightly smaller request reuses the cached block");
  pool_give(c, MiB - 4096);
  CHECK(pool_cached() == MiB, "the block comes back with its real size (%zu)", pool_cached());
  void* d = pool_take(MiB / 4);  // a quarter: not worth pinning a block four times larger
  CHECK(d != a, "a much smaller request does not take a much larger block");
  pool_give(d, MiB / 4);
  pool_clear();
  CHECK(pool_cached() == 0, "pool_clear frees everything");
  // drift: one buffer per iteration, its size growing by a step's worth every few iterations
  const size_t step = 100 * 1024;
  size_t largest = 0, most = 0, every_size = 0;
  for (int it = 0; it < 300; ++it) {
    const size_t bytes = (10 + it / 5) * step;
    if (it % 5 == 0) every_size += bytes;
    void* p = pool_take(bytes);
    std::memset(p, 1, bytes);
    pool_give(p, bytes);
    largest = std::max(largest, bytes);
    most = std::max(most, pool_cached());
  }
  CHECK(most <= 3 * largest, "a drifting buffer keeps at most a few blocks cached (%zu bytes for blocks of at most "
        "%zu; one per size would be %zu)", most, largest, every_size);
  // a working set of many same-size blocks (an adaptive solve's kept steps) is reused whole, every iteration
  pool_clear();
  std::vector<void*> steps(40);
  for (int it = 0; it < 5; ++it) {
    for (auto& p : steps) p = pool_take(step);
    for (auto& p : steps) pool_give(p, step);
  }
  CHECK(pool_cached() == 40 * step, "the kept steps stay cached for the next iteration (%zu)",
        pool_cached());
  pool_clear();
}

int main(int argc, char** argv) {
  std::string only = argc > 1 ? argv[1] : "";
  auto want = [&](const char* g) { return only.empty() || only == g; };
#ifdef _OPENMP
  omp_set_num_threads(1);
#endif
  // groups follow the core's translation units (csrc/README.md); ctest runs each one separately
  bool any = false;
  auto group = [&](const char* g) {
    if (!want(g)) return false;
    std::printf("%s\n", g);
    return any = true;
  };
  if (group("activations")) test_activation_accuracy();
  if (group("mlp_forward")) {
    for (int act : {kTanh, kSoftplus, kElu, kSwish, kIdentity}) {
      for (bool exact : {false, true}) {
        test_forward_values<double>(act, exact, 13, 4, 1e-12);
        test_forward_values<float>(act, exact, 37, 16, 2e-5);
      }
    }
    test_forward_values<float>(kTanh, false, 1, 64, 2e-5);
    test_forward_values<float>(kTanh, false, 130, 64, 2e-5);
  }
  if (group("mlp_backward")) {
    for (int act : {kTanh, kSoftplus, kElu, kSwish, kIdentity})
      for (bool exact : {false, true}) test_backward_fd(act, exact, 5, 2);
  }
  if (group("cnf_step")) {
    test_step_forward<double>(rk4_38(), 11, 4, 1e-12);
    test_step_forward<float>(rk4_38(), 70, 32, 2e-5);
    test_step_forward<double>(heun_euler(), 9, 4, 1e-12);
    test_step_backward_fd(rk4_38(), false, false);
    test_step_backward_fd(heun_euler(), false, false);
    test_step_backward_fd(heun_euler(), true, false);
    test_step_backward_fd(rk4_38(), false, true);
  }
  if (group("cnf_grid")) test_grid_solve();
  if (group("gemm")) {
    test_gemm_backends();
    for (int act : {kTanh, kIdentity, kSoftplus}) test_float_vs_double(act);
  }
  if (group("threads")) test_threads_deterministic();
  if (group("pool")) test_pool();
  if (!any) {
    std::printf("unknown group '%s'; groups: activations mlp_forward mlp_backward cnf_step cnf_grid gemm "
                "threads pool\n", only.c_str());
    return 2;
  }
  std::printf(g_failures ? "%d FAILED\n" : "all passed\n", g_failures);
  return g_failures ? 1 : 0;
}
