// Concatsquash MLP ops: forward, probe forward (Hutchinson / exact trace) and backward over tiles.
#include "detail/mlp_tile.h"

namespace fastode {

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

// Explicit instantiations
#define FASTODE_INSTANTIATE(T) \
  template void mlp_forward<T>(const Net&, const Params<T>&, double, int64_t, const T*, T*, T*, const Exec&); \
  template void mlp_probe_forward<T>(const Net&, const Params<T>&, double, int64_t, const T*, int, const T*, T*, T*, T*, T*, T*, T*, const Exec&); \
  template void mlp_backward<T>(const Net&, const Params<T>&, double, int64_t, const T*, int, const T*, bool, const T*, const T*, const T*, const T*, const T*, const T*, const T*, const T*, T*, T*, const Grads<T>*, T*, const Exec&);

FASTODE_INSTANTIATE(float)
FASTODE_INSTANTIATE(double)

}  // namespace fastode
