// Adaptive CNF solve in one call: batch-global step control (torchdiffeq's controller, first step, mixed RMS norm,
// overshoot and quartic interpolation) over the fused step of cnf_step.cpp.
#include "detail/mlp_tile.h"

namespace fastode {

namespace {

// Times as the host loop of fastode.solvers.rk_adaptive holds them: float64, rounded to float32 for a float32
// time tensor.
struct Clock {
  bool f32;
  double operator()(double v) const { return f32 ? double(float(v)) : v; }
};

template <typename T>
double state_round(double v) {
  return double(T(v));
}

// The CNF rates at (t, z): kz = f (B, D), kq (B, NQ) per rate code (enum Rate).
template <typename T>
struct Rates {
  const CnfSpec& spec;
  const Params<T>& p;
  int64_t B, D, NQ;
  const T* e;
  const Exec& ex;
  std::vector<T> trace, kin, frob, vjp;
  Rates(const CnfSpec& s, const Params<T>& p_, int64_t B_, const T* e_, const Exec& ex_)
      : spec(s), p(p_), B(B_), D(s.net.dims[0]), NQ(int64_t(s.rates.size())), e(e_), ex(ex_),
        trace(B_), kin(B_), frob(B_) {}
  void operator()(double t, const T* z, T* kz, T* kq) {
    bool want_frob = false;
    for (int r : spec.rates) want_frob |= r == 3;
    if (want_frob && vjp.empty()) vjp.resize(size_t(spec.K) * B * D);
    mlp_probe_forward<T>(spec.net, p, t, B, z, spec.K, spec.exact ? nullptr : e, kz,
                         want_frob ? vjp.data() : nullptr, trace.data(), kin.data(), frob.data(), nullptr, ex);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < NQ; ++j) {
        const int r = spec.rates[j];
        kq[b * NQ + j] = r == kNegTrace ? -trace[b] : r == kTrace ? trace[b] : r == kKinetic ? kin[b] : frob[b];
      }
  }
};

// The CNF's state norm from sums of squares: max(RMS of the z part, RMS of the first nq_norm q columns); a NaN part
// makes the norm NaN (std::max would drop it).
inline double mixed_from_sums(double sz, double sq, int64_t B, int64_t D, int64_t NQ, int nq_norm) {
  double r = std::sqrt(sz / double(B * D));
  if (nq_norm > 0 && NQ > 0) {
    const double rq = std::sqrt(sq / double(B * std::min<int64_t>(nq_norm, NQ)));
    r = (rq > r || rq != rq) ? rq : r;
  }
  return r;
}

// The state norm of x / scale.
template <typename T, typename X, typename S>
double mixed_rms(int64_t B, int64_t D, int64_t NQ, int nq_norm, X&& x, S&& scale) {
  double sz = 0, sq = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < D; ++j) {
      const double v = double(x(b, j)) / double(scale(b, j));
      sz += v * v;
    }
    for (int64_t j = 0; j < nq_norm && j < NQ; ++j) {
      const double v = double(x(b, D + j)) / double(scale(b, D + j));
      sq += v * v;
    }
  }
  return mixed_from_sums(sz, sq, B, D, NQ, nq_norm);
}

// Coefficients a x^4 + b x^3 + c x^2 + d x + y0 of torchdiffeq's quartic interpolant of element i of a step
// (fastode.interp.quartic_fit): y_mid = y0 + dt sum_j c_mid_j k_j, end slopes k_0 and k_{s-1}.
template <typename T>
struct Quartic {
  T a, b, c, d;
  Quartic(int64_t i, const T* y0, const T* y1, const T* k, int s, int64_t stride, const std::vector<double>& c_mid,
          T dt) {
    T acc = 0;
    for (int j = 0; j < s; ++j) acc += T(dt * T(c_mid[j])) * k[j * stride + i];
    const T ymid = y0[i] + acc, f0 = k[i], f1 = k[(s - 1) * stride + i];
    a = T(2) * dt * (f1 - f0) - T(8) * (y1[i] + y0[i]) + T(16) * ymid;
    b = dt * (T(5) * f0 - T(3) * f1) + T(18) * y0[i] + T(14) * y1[i] - T(32) * ymid;
    c = dt * (f1 - T(4) * f0) - T(11) * y0[i] - T(5) * y1[i] + T(16) * ymid;
    d = dt * f0;
  }
};

// The interpolant at fraction x, in fastode.interp.quartic_eval's order of operations.
template <typename T>
void quartic(int64_t n, const T* y0, const T* y1, const T* k, int s, int64_t stride, const std::vector<double>& c_mid,
             T dt, T x, T* out) {
  for (int64_t i = 0; i < n; ++i) {
    const Quartic<T> q(i, y0, y1, k, s, stride, c_mid, dt);
    const T a = q.a, b = q.b, c = q.c, d = q.d;
    T total = y0[i] + x * d;
    T xp = x;
    xp = xp * x;
    total = total + xp * c;
    xp = xp * x;
    total = total + xp * b;
    xp = xp * x;
    total = total + xp * a;
    out[i] = total;
  }
}

}  // namespace

Adapted adapt_step(const AdaptiveControl& ctl, double h, double r) {
  bool accept = r <= 1;
  if (h > ctl.max_step) accept = false;
  if (h <= ctl.min_step) accept = true;
  double f;  // IntegralController._factor_host
  if (r == 0)
    f = ctl.ifactor;
  else if (!std::isfinite(r))
    f = r != r ? std::min(ctl.dfactor, 1.0) : std::min(ctl.ifactor, std::max(0.0, ctl.dfactor));
  else
    f = std::min(ctl.ifactor, std::max(ctl.safety / std::pow(r, 1.0 / double(ctl.order)), r < 1 ? 1.0 : ctl.dfactor));
  return {accept, std::min(std::max(h * f, ctl.min_step), ctl.max_step)};
}

double interp_coordinate(double t, double t0, double t1, bool time_f32) {
  const Clock rnd{time_f32};
  return rnd(rnd(t - t0) / rnd(t1 - t0));
}

template <typename T>
AdaptiveStats cnf_adaptive_forward(const CnfSpec& spec, const Tableau& tab, const std::vector<double>& c_mid,
                                   const Params<T>& p_in, double t0, double t1, int64_t B, const T* z0,
                                   const T* q0, const T* e, const AdaptiveControl& ctl, T* zT, T* qT, const Exec& ex,
                                   AdaptiveTape<T>* tape) {
  check_net(spec.net);
  std::vector<std::vector<T>> wt;  // every step folds every stage: transpose W once per solve
  const Params<T> p = with_transposes(spec.net, p_in, wt);
  if (!tab.has_err()) throw std::invalid_argument("fastode: an adaptive solve needs a tableau with an error estimate");
  if (int(c_mid.size()) != tab.s) throw std::invalid_argument("fastode: c_mid needs one weight per stage");
  const int s = tab.s;
  const int64_t D = spec.net.dims[0], NQ = int64_t(spec.rates.size()), M = D + NQ;
  const Clock rnd{ctl.time_f32};
  const double dir = t1 < t0 ? -1.0 : 1.0;  // integrate tau = dir * t forwards, as odeint does for decreasing t
  const double tau_end = rnd(dir * t1);
  double tau = rnd(dir * t0);
  AdaptiveStats st;

  std::vector<T> z(z0, z0 + B * D), q(q0, q0 + B * NQ), z1(B * D), q1(B * NQ), ez(B * D), eq(B * NQ);
  std::vector<T> kz(size_t(s) * B * D), kq(size_t(s) * B * NQ), kz0(B * D), kq0(B * NQ);
  std::vector<double> atol(M, ctl.atol), rtol(M, ctl.rtol), sumsq(M);
  Rates<T> rates(spec, p, B, e, ex);
  auto failed = [&](int status, double at) {
    st.status = status;
    st.t_status = dir * at;
    return st;
  };
  auto all_finite = [](const std::vector<T>& v) {
    for (T x : v)
      if (!std::isfinite(double(x))) return false;
    return true;
  };

  // ---- first stage and first step (fastode.ops.rk.initial_step with order - 1, i.e. exponent 1/order: its norms
  // here, its formulas in initial_trial_step / initial_step_size)
  rates(dir * tau, z.data(), kz0.data(), kq0.data());
  st.nfe += 1;
  if (tape) *tape = AdaptiveTape<T>();
  if (tau_end == tau) {
    std::copy(z.begin(), z.end(), zT);
    std::copy(q.begin(), q.end(), qT);
    return st;
  }
  double dt;  // the proposed step magnitude (host float, as the Python loop's self.dt)
  if (ctl.first_step > 0) {
    dt = rnd(ctl.first_step);
  } else {
    auto scale = [&](int64_t b, int64_t j) {
      const T y = j < D ? z[b * D + j] : q[b * NQ + (j - D)];
      return T(ctl.atol) + std::abs(y) * T(ctl.rtol);
    };
    auto y_at = [&](int64_t b, int64_t j) { return j < D ? z[b * D + j] : q[b * NQ + (j - D)]; };
    auto f_at = [&](int64_t b, int64_t j) {
      return T(dir) * (j < D ? kz0[b * D + j] : kq0[b * NQ + (j - D)]);
    };
    const double d0 = mixed_rms<T>(B, D, NQ, ctl.nq_norm, y_at, scale);
    const double d1 = mixed_rms<T>(B, D, NQ, ctl.nq_norm, f_at, scale);
    const T h0 = initial_trial_step<T>(d0, d1);
    std::vector<T> zt(B * D), qt(B * NQ), fz(B * D), fq(B * NQ);
    for (int64_t i = 0; i < B * D; ++i) zt[i] = z[i] + h0 * T(dir) * kz0[i];
    for (int64_t i = 0; i < B * NQ; ++i) qt[i] = q[i] + h0 * T(dir) * kq0[i];
    const double t_trial = rnd(tau + double(h0));
    rates(dir * state_round<T>(t_trial), zt.data(), fz.data(), fq.data());
    st.nfe += 1;
    auto df_at = [&](int64_t b, int64_t j) {
      return T(dir) * (j < D ? fz[b * D + j] - kz0[b * D + j] : fq[b * NQ + (j - D)] - kq0[b * NQ + (j - D)]);
    };
    const double d2 = mixed_rms<T>(B, D, NQ, ctl.nq_norm, df_at, scale) / double(h0);
    dt = initial_step_size<T>(h0, d1, d2, ctl.order);  // in the state dtype, as initial_step computes it
    if (!std::isfinite(dt) || dt <= 0) return failed(kNonFinite, tau);
    dt = rnd(dt);
  }

  // ---- the loop (fastode.solvers.rk_adaptive: _advance / _adaptive_step without step_t, jump_t or landing)
  CnfStepIn<T> in;
  in.B = B;
  in.e = e;
  in.atol = atol.data();
  in.rtol = rtol.data();
  CnfStepOut<T> out;
  out.ez = ez.data();
  out.eq = eq.data();
  out.sumsq = sumsq.data();
  // gradient="direct": each attempt writes its activations into `pending`, kept on acceptance within the budget
  const int64_t step_save = tape && ctl.store_budget > 0 ? cnf_step_save_size(spec, tab, B, ex) : 0;
  StepBuffer<T> pending;
  if (tape) tape->save_size = step_save;
  double tau_prev = tau, h_prev = 0;
  // the last accepted step (for the interpolation): its start and stages; buffers swap on acceptance
  std::vector<T> zp(B * D), qp(B * NQ), kzp(kz.size()), kqp(kq.size());
  int64_t attempts = 0;
  while (tau_end > tau) {
    if (attempts >= ctl.max_num_steps) return failed(kMaxSteps, tau);
    double h = std::isfinite(dt) ? dt : ctl.min_step;
    h = std::min(std::max(h, ctl.min_step), ctl.max_step);
    const double tnew = rnd(tau + h);
    if (!(tnew > tau)) return failed(kUnderflow, tau);
    const double h_state = state_round<T>(h);
    in.t0 = dir * tau;
    in.dt = dir * h_state;
    in.z0 = z.data();
    in.q0 = q.data();
    in.kz0 = kz0.data();
    in.kq0 = kq0.data();
    out.z1 = z1.data();  // (z / z1 and the stage buffers swap on acceptance)
    out.q1 = q1.data();
    out.kz = kz.data();
    out.kq = kq.data();
    out.save = nullptr;
    if (step_save && int64_t(tape->saves.size() + 1) * step_save <= ctl.store_budget) {
      if (!pending) pending = make_step_buffer<T>(step_save);
      out.save = pending.get();
    }
    cnf_step_forward<T>(spec, tab, p, in, out, ex);
    st.nfe += s - 1;
    double rz = 0, rq = 0;
    for (int64_t j = 0; j < D; ++j) rz += sumsq[j];
    for (int64_t j = 0; j < ctl.nq_norm && j < NQ; ++j) rq += sumsq[D + j];
    const double r = mixed_from_sums(rz, rq, B, D, NQ, ctl.nq_norm);
    const auto [accept, dt_next] = adapt_step(ctl, h, r);
    if (h <= ctl.min_step && !std::isfinite(r)) return failed(kNonFinite, tau);
    st.steps += 1;
    if (accept) {
      if (tape) {
        tape->t0.push_back(in.t0);
        tape->dt.push_back(in.dt);
        tape->y.insert(tape->y.end(), z.begin(), z.end());
        tape->y.insert(tape->y.end(), q.begin(), q.end());
        tape->k0.insert(tape->k0.end(), kz0.begin(), kz0.end());
        tape->k0.insert(tape->k0.end(), kq0.begin(), kq0.end());
        if (out.save) {
          tape->saved.push_back(pending.get());
          tape->saves.push_back(std::move(pending));
        }
      }
      zp.swap(z);  // zp: the step's start, z: its end (z1 gets a free buffer)
      qp.swap(q);
      z.swap(z1);
      q.swap(q1);
      kzp.swap(kz);
      kqp.swap(kq);
      st.accepted += 1;
      st.step_ts.push_back(dir * tau);  // in t, as odeint's SolveStats
      st.step_sizes.push_back(dir * (tnew - tau));
      tau_prev = tau;
      h_prev = h_state;
      tau = tnew;
      std::copy(kzp.begin() + size_t(s - 1) * B * D, kzp.end(), kz0.begin());  // FSAL
      std::copy(kqp.begin() + size_t(s - 1) * B * NQ, kqp.end(), kq0.begin());
    } else {
      st.rejected += 1;
    }
    dt = dt_next;
    ++attempts;
  }
  if (!all_finite(z) || !all_finite(q)) return failed(kNonFinite, tau);

  // ---- output at tau_end inside the last accepted step (fastode.solvers.rk_adaptive._interpolate / _x)
  const double x = interp_coordinate(tau_end, tau_prev, tau, ctl.time_f32);
  const T xs = T(x), dts = T(dir * h_prev);
  if (tape) {
    tape->x = double(xs);
    tape->width = dir * (tau - tau_prev);
  }
  quartic<T>(B * D, zp.data(), z.data(), kzp.data(), s, B * D, c_mid, dts, xs, zT);
  if (NQ) quartic<T>(B * NQ, qp.data(), q.data(), kqp.data(), s, B * NQ, c_mid, dts, xs, qT);
  return st;
}

template <typename T>
int64_t cnf_adaptive_backward(const CnfSpec& spec, const Tableau& tab, const std::vector<double>& c_mid,
                              const Params<T>& p_in, const AdaptiveTape<T>& tape, int64_t B, const T* e,
                              const T* gzT, const T* gqT, T* gz0, T* gq0, T* ge, const Grads<T>* grads,
                              double* g_anchor, double* g_x, const Exec& ex) {
  std::vector<std::vector<T>> wt;
  const Params<T> p = with_transposes(spec.net, p_in, wt);
  const int s = tab.s, K = spec.K;
  const int64_t D = spec.net.dims[0], NQ = int64_t(spec.rates.size()), M = B * (D + NQ);
  const int64_t N = int64_t(tape.t0.size());
  if (int64_t(tape.y.size()) != N * M || int64_t(tape.k0.size()) != N * M || int64_t(tape.dt.size()) != N)
    throw std::invalid_argument("fastode: the adaptive tape does not match the batch and the state");
  std::vector<T> adjz(B * D, T(0)), adjq(B * NQ, T(0));
  if (gzT) std::copy(gzT, gzT + B * D, adjz.begin());
  if (gqT && NQ) std::copy(gqT, gqT + B * NQ, adjq.begin());
  if (ge) std::fill(ge, ge + int64_t(K) * B * D, T(0));
  double ganchor = 0, gx = 0;
  int64_t nfe = 0;
  if (N == 0) {  // the output is the start: nothing was integrated
    if (gz0) std::copy(adjz.begin(), adjz.end(), gz0);
    if (gq0 && NQ) std::copy(adjq.begin(), adjq.end(), gq0);
    if (g_anchor) *g_anchor = 0;
    if (g_x) *g_x = 0;
    return 0;
  }
  const int64_t step_save = cnf_step_save_size(spec, tab, B, ex);
  std::vector<T> save(step_save), kz(size_t(s) * B * D), kq(size_t(s) * B * NQ), z1(B * D), q1(B * NQ);
  std::vector<T> gkz(size_t(s) * B * D), gkq(size_t(s) * B * NQ), nz(B * D), nq(B * NQ);
  std::vector<T> gk0z(B * D), gk0q(B * NQ), get(ge ? size_t(K) * B * D : 0);
  auto step_in = [&](int64_t n) {
    CnfStepIn<T> in;
    in.t0 = tape.t0[n];
    in.dt = tape.dt[n];
    in.B = B;
    in.z0 = tape.y.data() + n * M;
    in.q0 = NQ ? in.z0 + B * D : nullptr;
    in.kz0 = tape.k0.data() + n * M;
    in.kq0 = NQ ? in.kz0 + B * D : nullptr;
    in.e = e;
    return in;
  };
  // the activations step n's backward reads: kept by the forward (gradient="direct") or recomputed into `save`
  auto saved_of = [&](int64_t n) -> const T* { return n < int64_t(tape.saved.size()) ? tape.saved[n] : save.data(); };
  auto recompute = [&](int64_t n) {  // the checkpoint is the step's start; its stages and saved activations
    CnfStepIn<T> in = step_in(n);
    CnfStepOut<T> out;
    out.z1 = z1.data();
    out.q1 = NQ ? q1.data() : nullptr;
    out.kz = kz.data();
    out.kq = NQ ? kq.data() : nullptr;
    out.save = save.data();
    cnf_step_forward<T>(spec, tab, p, in, out, ex);
    nfe += s - 1;
  };
  auto backward = [&](int64_t n, const T* gz1, const T* gq1) {  // of step n (recomputed last, unless kept)
    CnfStepIn<T> in = step_in(n);
    CnfStepGradIn<T> g;
    g.gz1 = gz1;
    g.gq1 = NQ ? gq1 : nullptr;
    g.gkz = gkz.data();
    g.gkq = NQ ? gkq.data() : nullptr;
    CnfStepGradOut<T> o;
    o.gz0 = nz.data();
    o.gq0 = NQ ? nq.data() : nullptr;
    o.gkz0 = gk0z.data();
    o.gkq0 = NQ ? gk0q.data() : nullptr;
    o.ge = ge ? get.data() : nullptr;
    o.grads = grads;
    double gt0 = 0;
    o.gt0 = &gt0;
    cnf_step_backward<T>(spec, tab, p, in, saved_of(n), g, o, ex);
    ganchor += gt0;  // the stage times are t_n + c dt with t_n = the start time + a constant
    if (ge)
      for (size_t i = 0; i < get.size(); ++i) ge[i] += get[i];
  };

  // ---- the last step: recompute its stages, then the quartic interpolant's backward
  recompute(N - 1);
  const T x = T(tape.x), dt = T(tape.dt[N - 1]);
  std::vector<T> gy1z(B * D), gy1q(B * NQ);
  std::fill(gkz.begin(), gkz.end(), T(0));
  std::fill(gkq.begin(), gkq.end(), T(0));
  auto interp_backward = [&](int64_t n, const T* y0, const T* y1, const T* k, int64_t stride, T* adj, T* gk, T* gy1) {
    for (int64_t i = 0; i < n; ++i) {
      const Quartic<T> q(i, y0, y1, k, s, stride, c_mid, dt);
      const T a = q.a, b = q.b, c = q.c, d = q.d;
      const T g = adj[i];
      gx += double(g) * double(d + T(2) * x * c + T(3) * x * x * b + T(4) * x * x * x * a);
      const T ga = g * x * x * x * x, gb = g * x * x * x, gc = g * x * x, gd = g * x;
      const T gymid = T(16) * ga - T(32) * gb + T(16) * gc;
      gy1[i] = T(-8) * ga + T(14) * gb - T(5) * gc;
      const T gf0 = dt * (T(-2) * ga + T(5) * gb - T(4) * gc + gd);
      const T gf1 = dt * (T(2) * ga - T(3) * gb + gc);
      for (int j = 0; j < s; ++j) gk[j * stride + i] += gymid * T(dt * T(c_mid[j]));
      gk[i] += gf0;
      gk[(s - 1) * stride + i] += gf1;
      adj[i] = g + T(-8) * ga + T(18) * gb - T(11) * gc + gymid;  // now the gradient of y0 (the interpolant's)
    }
  };
  const T* yl = tape.y.data() + (N - 1) * M;
  interp_backward(B * D, yl, z1.data(), kz.data(), B * D, adjz.data(), gkz.data(), gy1z.data());
  if (NQ) interp_backward(B * NQ, yl + B * D, q1.data(), kq.data(), B * NQ, adjq.data(), gkq.data(), gy1q.data());
  // adjz / adjq hold the interpolant's direct gradient of the last step's start; the step adds its own
  std::vector<T> keepz(adjz), keepq(adjq);
  backward(N - 1, gy1z.data(), gy1q.data());
  for (int64_t i = 0; i < B * D; ++i) adjz[i] = keepz[i] + nz[i];
  for (int64_t i = 0; i < B * NQ; ++i) adjq[i] = keepq[i] + nq[i];

  // ---- the earlier steps: FSAL chains step n's last stage to step n+1's given first stage
  for (int64_t n = N - 2; n >= 0; --n) {
    std::fill(gkz.begin(), gkz.end(), T(0));
    std::fill(gkq.begin(), gkq.end(), T(0));
    std::copy(gk0z.begin(), gk0z.end(), gkz.begin() + size_t(s - 1) * B * D);
    if (NQ) std::copy(gk0q.begin(), gk0q.end(), gkq.begin() + size_t(s - 1) * B * NQ);
    if (n >= int64_t(tape.saved.size())) recompute(n);
    backward(n, adjz.data(), adjq.data());
    adjz.swap(nz);
    if (NQ) adjq.swap(nq);
  }

  // ---- the first stage, evaluated on its own at the start: f(t_0, z_0) and its rates
  {
    const Net& net = spec.net;
    const T* zs = tape.y.data();
    bool want_frob = false, want_kin = false, want_tr = false;
    for (int r : spec.rates) {
      want_frob |= r == 3;
      want_kin |= r == 2;
      want_tr |= r <= 1;
    }
    std::vector<T> msave(mlp_save_size(net, B, K, true, ex)), f(B * D), vjp(size_t(K) * B * D), tr(B), kin(B),
        fr(B), gtr(B, T(0)), gkin(B, T(0)), gfr(B, T(0)), gz(B * D), gef(ge ? size_t(K) * B * D : 0);
    mlp_probe_forward<T>(net, p, tape.t0[0], B, zs, K, spec.exact ? nullptr : e, f.data(), vjp.data(), tr.data(),
                         kin.data(), fr.data(), msave.data(), ex);
    nfe += 1;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < NQ; ++j) {
        const int r = spec.rates[j];
        const T g = gk0q[b * NQ + j];
        if (r == kNegTrace) gtr[b] -= g;
        if (r == kTrace) gtr[b] += g;
        if (r == kKinetic) gkin[b] += g;
        if (r == kJacFrob) gfr[b] += g;
      }
    T gt = 0;
    mlp_backward<T>(net, p, tape.t0[0], B, zs, K, spec.exact ? nullptr : e, true, msave.data(), f.data(), vjp.data(),
                    gk0z.data(), nullptr, want_tr ? gtr.data() : nullptr, want_kin ? gkin.data() : nullptr,
                    want_frob ? gfr.data() : nullptr, gz.data(), ge ? gef.data() : nullptr, grads, &gt, ex);
    for (int64_t i = 0; i < B * D; ++i) adjz[i] += gz[i];
    if (ge && !spec.exact)
      for (size_t i = 0; i < gef.size(); ++i) ge[i] += gef[i];
    ganchor += double(gt);
  }
  if (gz0) std::copy(adjz.begin(), adjz.end(), gz0);
  if (gq0 && NQ) std::copy(adjq.begin(), adjq.end(), gq0);
  if (g_anchor) *g_anchor = ganchor;
  if (g_x) *g_x = gx;
  return nfe;
}

namespace {

// Run fn(i) for every tile i over ex.nthreads OpenMP threads (each call single-threaded inside); the first
// exception is rethrown after the loop.
template <typename F>
void for_tiles(int64_t ntiles, const Exec& ex, F&& fn) {
  std::exception_ptr err;
#ifdef _OPENMP
#pragma omp parallel for num_threads(std::max(1, ex.nthreads)) schedule(dynamic, 1)
#endif
  for (int64_t i = 0; i < ntiles; ++i) {
    try {
      fn(i);
    } catch (...) {
#ifdef _OPENMP
#pragma omp critical(fastode_tiles_err)
#endif
      if (!err) err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
}

// Tile i's rows of a (B, n)-major array (or of a (K, B, D) probe with K = 1), copied out and back.
template <typename T>
std::vector<T> rows_of(const T* a, int64_t r0, int64_t R, int64_t n) {
  return a ? std::vector<T>(a + r0 * n, a + (r0 + R) * n) : std::vector<T>();
}

}  // namespace

template <typename T>
std::vector<AdaptiveStats> cnf_adaptive_forward_tiles(const CnfSpec& spec, const Tableau& tab,
                                                      const std::vector<double>& c_mid, const Params<T>& p,
                                                      double t0, double t1, int64_t B, int64_t rows, const T* z0,
                                                      const T* q0, const T* e, const AdaptiveControl& ctl, T* zT,
                                                      T* qT, const Exec& ex, std::vector<AdaptiveTape<T>>* tapes) {
  if (!spec.exact && spec.K != 1) throw std::invalid_argument("fastode: per-tile solves take one Hutchinson probe");
  rows = std::max<int64_t>(rows, 1);
  const int64_t D = spec.net.dims[0], NQ = int64_t(spec.rates.size()), nt = (B + rows - 1) / rows;
  std::vector<AdaptiveStats> stats(nt);
  if (tapes) {
    tapes->clear();
    tapes->resize(nt);
  }
  Exec inner = ex;
  inner.nthreads = 1;
  std::vector<std::vector<T>> wt;  // every tile folds every stage: transpose W once for all of them
  const Params<T> pt = with_transposes(spec.net, p, wt);
  for_tiles(nt, ex, [&](int64_t i) {
    const int64_t r0 = i * rows, R = std::min(rows, B - r0);
    auto z = rows_of(z0, r0, R, D), q = rows_of(q0, r0, R, NQ), ee = rows_of(e, r0, R, D);
    std::vector<T> zo(R * D), qo(R * NQ);
    stats[i] = cnf_adaptive_forward<T>(spec, tab, c_mid, pt, t0, t1, R, z.data(), NQ ? q.data() : nullptr,
                                       e ? ee.data() : nullptr, ctl, zo.data(), NQ ? qo.data() : nullptr, inner,
                                       tapes ? &(*tapes)[i] : nullptr);
    std::copy(zo.begin(), zo.end(), zT + r0 * D);
    if (NQ) std::copy(qo.begin(), qo.end(), qT + r0 * NQ);
  });
  return stats;
}

template <typename T>
int64_t cnf_adaptive_backward_tiles(const CnfSpec& spec, const Tableau& tab, const std::vector<double>& c_mid,
                                    const Params<T>& p, const std::vector<AdaptiveTape<T>>& tapes, int64_t B,
                                    int64_t rows, const T* e, const T* gzT, const T* gqT, T* gz0, T* gq0, T* ge,
                                    const Grads<T>* grads, const std::vector<int64_t>& param_sizes, double* g_anchor,
                                    double* g_x, const Exec& ex) {
  rows = std::max<int64_t>(rows, 1);
  const int64_t D = spec.net.dims[0], NQ = int64_t(spec.rates.size()), nt = int64_t(tapes.size());
  if (nt != (B + rows - 1) / rows) throw std::invalid_argument("fastode: one tape per tile is needed");
  const int L = spec.net.L();
  if (grads && int64_t(param_sizes.size()) != 5 * L) throw std::invalid_argument("fastode: param_sizes: 5 per layer");
  std::vector<std::vector<T>> gbuf(grads ? nt : 0);
  std::vector<int64_t> nfe(nt, 0);
  Exec inner = ex;
  inner.nthreads = 1;
  std::vector<std::vector<T>> wt;
  const Params<T> pt = with_transposes(spec.net, p, wt);
  for_tiles(nt, ex, [&](int64_t i) {
    const int64_t r0 = i * rows, R = std::min(rows, B - r0);
    auto ee = rows_of(e, r0, R, D), gz = rows_of(gzT, r0, R, D), gq = rows_of(gqT, r0, R, NQ);
    std::vector<T> oz(R * D), oq(R * NQ), oe(e && ge ? R * D : 0);
    Grads<T> g;
    if (grads) {  // this tile's own accumulators, laid out like the parameters
      int64_t total = 0;
      for (int64_t n : param_sizes) total += n;
      gbuf[i].assign(total, T(0));
      T* at = gbuf[i].data();
      for (int l = 0; l < L; ++l) {
        std::vector<T*>* dst[5] = {&g.W, &g.b, &g.gw, &g.gb, &g.bw};
        for (int k = 0; k < 5; ++k) {
          dst[k]->push_back(at);
          at += param_sizes[5 * l + k];
        }
      }
    }
    double ga = 0, gx = 0;
    nfe[i] = cnf_adaptive_backward<T>(spec, tab, c_mid, pt, tapes[i], R, e ? ee.data() : nullptr,
                                      gzT ? gz.data() : nullptr, gqT && NQ ? gq.data() : nullptr, oz.data(),
                                      NQ ? oq.data() : nullptr, oe.empty() ? nullptr : oe.data(),
                                      grads ? &g : nullptr, &ga, &gx, inner);
    if (gz0) std::copy(oz.begin(), oz.end(), gz0 + r0 * D);
    if (gq0 && NQ) std::copy(oq.begin(), oq.end(), gq0 + r0 * NQ);
    if (!oe.empty()) std::copy(oe.begin(), oe.end(), ge + r0 * D);
    if (g_anchor) g_anchor[i] = ga;
    if (g_x) g_x[i] = gx;
  });
  if (grads) {  // in tile order: the sum does not depend on the thread count
    for (int64_t i = 0; i < nt; ++i) {
      const T* src = gbuf[i].data();
      for (int l = 0; l < L; ++l) {
        T* dst[5] = {grads->W[l], grads->b[l], grads->gw[l], grads->gb[l], grads->bw[l]};
        for (int k = 0; k < 5; ++k) {
          const int64_t n = param_sizes[5 * l + k];
          for (int64_t j = 0; j < n; ++j) dst[k][j] += src[j];
          src += n;
        }
      }
    }
  }
  int64_t total = 0;
  for (int64_t n : nfe) total += n;
  return total;
}

#define FASTODE_INSTANTIATE(T)                                                                                \
  template AdaptiveStats cnf_adaptive_forward<T>(const CnfSpec&, const Tableau&, const std::vector<double>&, \
                                                 const Params<T>&, double, double, int64_t, const T*, const T*, \
                                                 const T*, const AdaptiveControl&, T*, T*, const Exec&,        \
                                                 AdaptiveTape<T>*);                                            \
  template int64_t cnf_adaptive_backward<T>(const CnfSpec&, const Tableau&, const std::vector<double>&,        \
                                            const Params<T>&, const AdaptiveTape<T>&, int64_t, const T*,      \
                                            const T*, const T*, T*, T*, T*, const Grads<T>*, double*, double*, \
                                            const Exec&);                                                    \
  template std::vector<AdaptiveStats> cnf_adaptive_forward_tiles<T>(                                           \
      const CnfSpec&, const Tableau&, const std::vector<double>&, const Params<T>&, double, double, int64_t,  \
      int64_t, const T*, const T*, const T*, const AdaptiveControl&, T*, T*, const Exec&,                     \
      std::vector<AdaptiveTape<T>>*);                                                                          \
  template int64_t cnf_adaptive_backward_tiles<T>(                                                             \
      const CnfSpec&, const Tableau&, const std::vector<double>&, const Params<T>&,                            \
      const std::vector<AdaptiveTape<T>>&, int64_t, int64_t, const T*, const T*, const T*, T*, T*, T*,         \
      const Grads<T>*, const std::vector<int64_t>&, double*, double*, const Exec&);

FASTODE_INSTANTIATE(float)
FASTODE_INSTANTIATE(double)

}  // namespace fastode
