// Fused RK step of CNF dynamics (all stages per tile) and its backward.
#include "detail/mlp_tile.h"

namespace fastode {

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
  FoldSet<T> folds;
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
        folds(tb.s),
        tl(B_, ex.tile),
        bl(sp.net, tl.tile, sp.K, act_needs_a(sp.net.act), true, true, int64_t(sp.rates.size())) {
    check_net(net);
    if (s < 1 || int(tab.c.size()) != s || int(tab.a.size()) != s * s || int(tab.b.size()) != s ||
        (tab.has_err() && int(tab.b_err.size()) != s))
      throw std::invalid_argument("fastode: inconsistent tableau sizes");
    if (sp.exact && sp.K != D) throw std::invalid_argument("fastode: exact trace needs K == D probes");
    for (int r : sp.rates)
      if (r < 0 || r > 3) throw std::invalid_argument("fastode: rate codes are 0..3");
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
              kqi[r * NQ + j] = code == kNegTrace ? -w.TR[r] : code == kTrace ? w.TR[r]
                                : code == kKinetic ? w.KIN[r] : w.FR[r];
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
            const bool tr = code == kNegTrace || code == kTrace;
            T*& dst = tr ? gtr : code == kKinetic ? gkin : gfr;
            T* buf = tr ? w.GTR : code == kKinetic ? w.GKIN : w.GFR;
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

// Explicit instantiations
#define FASTODE_INSTANTIATE(T) \
  template void cnf_step_forward<T>(const CnfSpec&, const Tableau&, const Params<T>&, const CnfStepIn<T>&, const CnfStepOut<T>&, const Exec&); \
  template void cnf_step_backward<T>(const CnfSpec&, const Tableau&, const Params<T>&, const CnfStepIn<T>&, const T*, const CnfStepGradIn<T>&, const CnfStepGradOut<T>&, const Exec&);

FASTODE_INSTANTIATE(float)
FASTODE_INSTANTIATE(double)

}  // namespace fastode
