// Tile kernels of the concatsquash MLP: forward, probe VJPs and backward of one tile, per activation.
#pragma once

#include "detail/arena.h"
#include "detail/elementwise.h"
#include "detail/fold.h"
#include "detail/gemm.h"
#include "detail/tiling.h"

namespace fastode {
namespace {  // internal linkage: each translation unit has its own copy (see platform.h)

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

inline bool act_needs_a(int act) { return !(act == kTanh || act == kIdentity); }

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

inline void check_net(const Net& net) {
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
}  // namespace fastode
