// Gate folding of a concatsquash layer: W' = diag(gate) W, c = b gate + bw t (and the reverse).
#pragma once

#include <memory>

#include "detail/elementwise.h"
#include "detail/gemm.h"

namespace fastode {
namespace {  // internal linkage: each translation unit has its own copy (see platform.h)

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

// The Folded buffers of one fused RK step (one per stage), taken from a per-thread pool and returned to it: a
// step folds every stage, and fresh vectors would cost an allocation and a memset per stage -- most of a small
// tile's step in per-tile solves. At most kKeep buffers stay pooled per thread.
template <typename T>
class FoldSet {
 public:
  explicit FoldSet(int n) {
    auto& pool = pool_();
    for (int i = 0; i < n; ++i) {
      if (pool.empty()) {
        sets_.emplace_back(new Folded<T>());
      } else {
        sets_.push_back(std::move(pool.back()));
        pool.pop_back();
      }
    }
  }
  ~FoldSet() {
    auto& pool = pool_();
    for (auto& f : sets_)
      if (pool.size() < kKeep) pool.push_back(std::move(f));
  }
  FoldSet(const FoldSet&) = delete;
  FoldSet& operator=(const FoldSet&) = delete;
  Folded<T>& operator[](int i) { return *sets_[i]; }
  const Folded<T>& operator[](int i) const { return *sets_[i]; }

 private:
  static constexpr size_t kKeep = 8;
  static std::vector<std::unique_ptr<Folded<T>>>& pool_() {
    thread_local std::vector<std::unique_ptr<Folded<T>>> pool;
    return pool;
  }
  std::vector<std::unique_ptr<Folded<T>>> sets_;
};

template <typename T>
FASTODE_CLONES void mul_row(int64_t n, const T* __restrict a, const T* __restrict b, T* __restrict out) {
  for (int64_t k = 0; k < n; ++k) out[k] = a[k] * b[k];
}

template <typename T>
FASTODE_CLONES void scale_row(int64_t n, T g, const T* __restrict W, T* __restrict out) {
  for (int64_t k = 0; k < n; ++k) out[k] = g * W[k];
}

// Whether fold() builds W'^T: it is read only by the micro-kernels (float32, tanh / identity, layers whose both
// widths exceed kThin, Kern::wide); other activations never touch it.
template <typename T>
bool folds_transposed(const Net& net) {
  return std::is_same<T, float>::value && (net.act == kTanh || net.act == kIdentity) && use_microkernels();
}

// `p` with W_l^T of the wide layers that fold() transposes in Params::WT (storage kept by the caller); `p` itself
// when it already has them (a per-tile solve transposes once for all its tiles) or fold() would not read them.
template <typename T>
Params<T> with_transposes(const Net& net, const Params<T>& p, std::vector<std::vector<T>>& store) {
  Params<T> q = p;
  if (!p.WT.empty() || !folds_transposed<T>(net)) return q;
  store.assign(net.L(), {});
  q.WT.assign(net.L(), nullptr);
  for (int l = 0; l < net.L(); ++l) {
    const int64_t n = net.dims[l], m = net.dims[l + 1];
    if (n <= kThin || m <= kThin) continue;
    store[l].resize(m * n);
    for (int64_t j = 0; j < m; ++j)
      for (int64_t k = 0; k < n; ++k) store[l][k * m + j] = p.W[l][j * n + k];
    q.WT[l] = store[l].data();
  }
  return q;
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
  if (folds_transposed<T>(net)) {
    out.bufT.resize(fl.size);
    constexpr int64_t kBlk = 32;  // blocked transpose: both sides stay in L1
    for (int l = 0; l < net.L(); ++l) {
      int64_t n = net.dims[l], m = net.dims[l + 1];
      if (n <= kThin || m <= kThin) continue;
      const T* Wp = out.buf.data() + fl.offW[l];
      T* Wt = out.bufT.data() + fl.offW[l];
      if (l < int(p.WT.size()) && p.WT[l]) {  // W'^T = W^T diag(gate): contiguous rows, no transpose
        const double* g = out.gate.data() + out.offG[l];
        std::vector<T> gt(g, g + m);
        for (int64_t k = 0; k < n; ++k) mul_row<T>(m, p.WT[l] + k * m, gt.data(), Wt + k * m);
        continue;
      }
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

}  // namespace
}  // namespace fastode
