// Python bindings of the fastode C++ core (module fastode._C): tensors in, tensors out.
// Autograd lives in Python (fastode/cpp/), so this file only checks tensors and unpacks pointers.
// Headers are kept minimal (no torch/extension.h) to keep the build short.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <pybind11/functional.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "fastode.h"

namespace py = pybind11;
using at::Tensor;
using OptT = std::optional<Tensor>;

namespace {

void check(bool cond, const std::string& msg) {
  if (!cond) throw std::invalid_argument("fastode._C: " + msg);
}

// Contiguous CPU tensor of the given dtype (no copy when it already is).
Tensor prep(const Tensor& x, at::ScalarType dt, const char* name) {
  check(x.defined(), std::string(name) + " is undefined");
  check(x.device().is_cpu(), std::string(name) + " must be a CPU tensor");
  check(x.scalar_type() == dt, std::string(name) + " has dtype " + std::string(c10::toString(x.scalar_type())) +
                                   " but z has " + std::string(c10::toString(dt)) + "; use one dtype");
  return x.contiguous();
}
OptT prep_opt(const OptT& x, at::ScalarType dt, const char* name) {
  if (!x || !x->defined()) return std::nullopt;
  return prep(*x, dt, name);
}

template <typename T>
const T* cptr(const OptT& x) {
  return x ? x->data_ptr<T>() : nullptr;
}
template <typename T>
T* mptr(const OptT& x) {
  return x ? x->data_ptr<T>() : nullptr;
}

fastode::Net make_net(const std::vector<Tensor>& params, int64_t D, int act) {
  check(!params.empty() && params.size() % 5 == 0, "params must hold 5 tensors (W, b, gw, gb, bw) per layer");
  fastode::Net net;
  net.act = act;
  net.dims.push_back(D);
  for (size_t l = 0; l < params.size() / 5; ++l) {
    const Tensor& W = params[5 * l];
    check(W.dim() == 2 && W.size(1) == net.dims.back(), "layer " + std::to_string(l) + ": W has the wrong shape");
    int64_t m = W.size(0);
    for (int j = 1; j < 5; ++j)
      check(params[5 * l + j].numel() == m, "layer " + std::to_string(l) + ": b/gw/gb/bw must have W.shape[0] elements");
    net.dims.push_back(m);
  }
  check(net.dims.back() == D, "the last layer must output z's width");
  return net;
}

// Per-layer pointers (W, b, gw, gb, bw) of 5 tensors per layer, as Params<T> (const) or Grads<T>.
template <typename T, typename Out>
Out layer_pointers(const std::vector<Tensor>& p) {
  Out r;
  for (size_t l = 0; l < p.size() / 5; ++l) {
    r.W.push_back(p[5 * l].data_ptr<T>());
    r.b.push_back(p[5 * l + 1].data_ptr<T>());
    r.gw.push_back(p[5 * l + 2].data_ptr<T>());
    r.gb.push_back(p[5 * l + 3].data_ptr<T>());
    r.bw.push_back(p[5 * l + 4].data_ptr<T>());
  }
  return r;
}
template <typename T>
fastode::Params<T> make_params(const std::vector<Tensor>& p) {
  return layer_pointers<T, fastode::Params<T>>(p);
}
template <typename T>
fastode::Grads<T> make_grads(const std::vector<Tensor>& g) {
  return layer_pointers<T, fastode::Grads<T>>(g);
}

std::vector<Tensor> prep_params(const std::vector<Tensor>& params, at::ScalarType dt) {
  std::vector<Tensor> r;
  r.reserve(params.size());
  for (const auto& p : params) r.push_back(prep(p, dt, "parameter"));
  return r;
}

fastode::Exec make_exec(int64_t tile) {
  fastode::Exec ex;
  ex.tile = tile > 0 ? tile : 64;
  ex.nthreads = at::get_num_threads();
  return ex;
}

// What every MLP / CNF entry point checks first: z (B, D), one float dtype on the CPU for z and the parameters,
// the network shape the parameters imply, and the execution settings.
struct NetCall {
  at::ScalarType dt;
  Tensor z;
  std::vector<Tensor> params;
  int64_t B, D;
  fastode::Net net;
  fastode::Exec ex;
};

NetCall net_call(const Tensor& z_, const char* zname, const std::vector<Tensor>& params_, int act, int64_t tile) {
  check(z_.dim() == 2, std::string(zname) + " must be (B, D)");
  NetCall c;
  c.dt = z_.scalar_type();
  c.z = prep(z_, c.dt, zname);
  c.params = prep_params(params_, c.dt);
  c.B = c.z.size(0);
  c.D = c.z.size(1);
  c.net = make_net(c.params, c.D, act);
  c.ex = make_exec(tile);
  return c;
}

// The CNF dynamics of a call: the network, the probes (Hutchinson with e, else the D basis vectors) and the rates.
fastode::CnfSpec cnf_spec(const fastode::Net& net, const OptT& e, const std::vector<int>& rates) {
  fastode::CnfSpec spec;
  spec.net = net;
  spec.exact = !e;
  spec.K = e ? 1 : int(net.dims.front());
  spec.rates = rates;
  return spec;
}

Tensor empty_like_dt(std::vector<int64_t> shape, const Tensor& like) {
  return at::empty(shape, like.options());
}

// ------------------------------------------------------------------------------------------------
// Saved activations come from the core's buffer pool (fastode::pool_take): a training iteration asks for the same
// buffers every iteration (sizes rounded to 64 KiB so that nearby sizes share them).
Tensor pooled_empty(int64_t n, const Tensor& like) {
  const size_t esz = like.element_size();
  const size_t bytes = (size_t(std::max<int64_t>(n, 1)) * esz + 65535) / 65536 * 65536;
  void* p = fastode::pool_take(bytes);
  return at::from_blob(
      p, {n}, [bytes](void* q) { fastode::pool_give(q, bytes); }, like.options());
}

// The rows of a partial last tile that the kernels leave unwritten in `save`: zeroed, so that the saved
// activations are a deterministic function of the inputs (torch.compile's checks compare every output). `save` is
// `count` records of `period` values (one per solve step), each ending with the last tile's `last` values.
// (`last_of()` is only evaluated for a partial tile: the common case costs one test.)
template <typename Last>
void zero_partial_tile(Tensor& save, int64_t B, const fastode::Exec& ex, int64_t period, Last last_of,
                       int64_t count = 1) {
  if (ex.tile <= 0 || B % ex.tile == 0) return;
  const int64_t last = last_of();
  for (int64_t n = 0; n < count; ++n) save.narrow(0, (n + 1) * period - last, last).zero_();
}

#define DISPATCH_FLOAT(dt, ...)                                                         \
  [&] {                                                                                 \
    if ((dt) == at::kFloat) {                                                           \
      using scalar_t = float;                                                           \
      return __VA_ARGS__();                                                             \
    } else if ((dt) == at::kDouble) {                                                   \
      using scalar_t = double;                                                          \
      return __VA_ARGS__();                                                             \
    }                                                                                   \
    throw std::invalid_argument("fastode._C: only float32 and float64 are supported"); \
  }()

// ------------------------------------------------------------------------------------------------
// MLP forward: returns (f, save); save is empty unless want_save.
std::tuple<Tensor, Tensor> mlp_forward(double t, const Tensor& z_, const std::vector<Tensor>& params_, int act,
                                       bool want_save, int64_t tile) {
  auto call = net_call(z_, "z", params_, act, tile);
  const auto dt = call.dt;
  Tensor& z = call.z;
  auto& params = call.params;
  const int64_t B = call.B, D = call.D;
  auto& net = call.net;
  auto& ex = call.ex;
  Tensor f = empty_like_dt({B, D}, z);
  Tensor save = want_save ? pooled_empty(fastode::mlp_save_size(net, B, 1, false, ex), z) : empty_like_dt({0}, z);
  if (want_save)
    zero_partial_tile(save, B, ex, save.numel(), [&] { return fastode::mlp_save_size(net, ex.tile, 1, false, ex); });
  DISPATCH_FLOAT(dt, [&] {
    auto p = make_params<scalar_t>(params);
    fastode::mlp_forward<scalar_t>(net, p, t, B, z.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(),
                                   want_save ? save.data_ptr<scalar_t>() : nullptr, ex);
  });
  return {f, save};
}

// Probe forward. e: (K, B, D) or (B, D) (K = 1), or None for exact trace (basis, K = D).
// Returns (f, vjp (K, B, D) or empty, trace, kinetic, jac_frob, save).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_probe_forward(
    double t, const Tensor& z_, const OptT& e_, const std::vector<Tensor>& params_, int act, bool want_vjp,
    bool want_save, int64_t tile) {
  auto call = net_call(z_, "z", params_, act, tile);
  const auto dt = call.dt;
  Tensor& z = call.z;
  auto& params = call.params;
  const int64_t B = call.B, D = call.D;
  auto& net = call.net;
  auto& ex = call.ex;
  OptT e = prep_opt(e_, dt, "e");
  int K = int(D);
  if (e) {
    check(e->numel() % (B * D) == 0 && e->size(-1) == D && (e->dim() == 2 ? e->size(0) == B : e->size(1) == B),
          "e must be (B, D) or (K, B, D) with z's B and D");
    K = int(e->numel() / (B * D));
  }
  Tensor f = empty_like_dt({B, D}, z);
  Tensor vjp = want_vjp ? empty_like_dt({K, B, D}, z) : empty_like_dt({0}, z);
  Tensor tr = empty_like_dt({B}, z), kin = empty_like_dt({B}, z), fr = empty_like_dt({B}, z);
  Tensor save = want_save ? pooled_empty(fastode::mlp_save_size(net, B, K, true, ex), z) : empty_like_dt({0}, z);
  if (want_save)
    zero_partial_tile(save, B, ex, save.numel(), [&] { return fastode::mlp_save_size(net, ex.tile, K, true, ex); });
  DISPATCH_FLOAT(dt, [&] {
    auto p = make_params<scalar_t>(params);
    fastode::mlp_probe_forward<scalar_t>(net, p, t, B, z.data_ptr<scalar_t>(), K, cptr<scalar_t>(e),
                                         f.data_ptr<scalar_t>(), want_vjp ? vjp.data_ptr<scalar_t>() : nullptr,
                                         tr.data_ptr<scalar_t>(), kin.data_ptr<scalar_t>(), fr.data_ptr<scalar_t>(),
                                         want_save ? save.data_ptr<scalar_t>() : nullptr, ex);
  });
  return {f, vjp, tr, kin, fr, save};
}

// Backward of mlp_forward (probes = false) or mlp_probe_forward (probes = true).
// Returns (gz or None, ge or None, param grads (list, empty unless need_params), gt or None).
py::tuple mlp_backward(double t, const Tensor& z_, const OptT& e_, bool probes, const std::vector<Tensor>& params_,
                       int act, const Tensor& save, const OptT& f_, const OptT& vjp_, const OptT& gf_,
                       const OptT& gvjp_, const OptT& gtrace_, const OptT& gkin_, const OptT& gfrob_, bool need_z,
                       bool need_e, bool need_params, bool need_t, int64_t tile) {
  auto call = net_call(z_, "z", params_, act, tile);
  const auto dt = call.dt;
  Tensor& z = call.z;
  auto& params = call.params;
  const int64_t B = call.B, D = call.D;
  auto& net = call.net;
  auto& ex = call.ex;
  OptT e = prep_opt(e_, dt, "e"), f = prep_opt(f_, dt, "f"), vjp = prep_opt(vjp_, dt, "vjp"),
       gf = prep_opt(gf_, dt, "grad f"), gvjp = prep_opt(gvjp_, dt, "grad vjp"),
       gtrace = prep_opt(gtrace_, dt, "grad trace"), gkin = prep_opt(gkin_, dt, "grad kinetic"),
       gfrob = prep_opt(gfrob_, dt, "grad jac_frob");
  if (vjp && vjp->numel() == 0) vjp = std::nullopt;
  const int K = e ? int(e->numel() / (B * D)) : int(D);
  check(save.numel() == fastode::mlp_save_size(net, B, probes ? K : 1, probes, ex),
        "saved activations do not match (tile size changed between forward and backward?)");
  OptT gz, ge;
  if (need_z) gz = empty_like_dt({B, D}, z);
  if (need_e && e) ge = at::empty(e->sizes(), z.options());
  std::vector<Tensor> gp;
  if (need_params)
    for (const auto& p : params) gp.push_back(at::zeros(p.sizes(), p.options()));
  Tensor gt = at::zeros({}, z.options());
  DISPATCH_FLOAT(dt, [&] {
    auto p = make_params<scalar_t>(params);
    fastode::Grads<scalar_t> g;
    if (need_params) g = make_grads<scalar_t>(gp);
    fastode::mlp_backward<scalar_t>(net, p, t, B, z.data_ptr<scalar_t>(), K, cptr<scalar_t>(e), probes,
                                    save.data_ptr<scalar_t>(), cptr<scalar_t>(f), cptr<scalar_t>(vjp),
                                    cptr<scalar_t>(gf), cptr<scalar_t>(gvjp), cptr<scalar_t>(gtrace),
                                    cptr<scalar_t>(gkin), cptr<scalar_t>(gfrob), mptr<scalar_t>(gz),
                                    mptr<scalar_t>(ge), need_params ? &g : nullptr,
                                    need_t ? gt.data_ptr<scalar_t>() : nullptr, ex);
  });
  py::object pgz = gz ? py::cast(*gz) : py::none(), pge = ge ? py::cast(*ge) : py::none();
  py::object pgt = need_t ? py::cast(gt) : py::none();
  return py::make_tuple(pgz, pge, gp, pgt);
}

// ------------------------------------------------------------------------------------------------
fastode::Tableau make_tableau(const std::vector<double>& c, const std::vector<double>& a, const std::vector<double>& b,
                              const std::vector<double>& b_err) {
  fastode::Tableau tb;
  tb.s = int(c.size());
  tb.c = c;
  tb.a = a;
  tb.b = b;
  tb.b_err = b_err;
  check(int(a.size()) == tb.s * tb.s && int(b.size()) == tb.s && (b_err.empty() || int(b_err.size()) == tb.s),
        "tableau: c (s), a (s*s), b (s), b_err (s or empty) have inconsistent sizes");
  return tb;
}

// Fused CNF RK step. Returns (z1, q1, ez, eq, kz, kq, sumsq (float64, D+NQ), save).
py::tuple cnf_step_forward(double t0, double dtv, const Tensor& z0_, const Tensor& q0_, const OptT& e_,
                           const OptT& kz0_, const OptT& kq0_, const std::vector<Tensor>& params_, int act,
                           const std::vector<int>& rates, const std::vector<double>& c, const std::vector<double>& a,
                           const std::vector<double>& b, const std::vector<double>& b_err,
                           const std::vector<double>& atol, const std::vector<double>& rtol, bool want_stages,
                           bool want_save, int64_t tile) {
  auto call = net_call(z0_, "z0", params_, act, tile);
  const auto dt = call.dt;
  Tensor& z0 = call.z;
  auto& params = call.params;
  const int64_t B = call.B, D = call.D, NQ = int64_t(rates.size());
  auto& ex = call.ex;
  Tensor q0 = prep(q0_, dt, "q0");
  check(q0.numel() == B * NQ, "q0 must be (B, len(rates))");
  OptT e = prep_opt(e_, dt, "e"), kz0 = prep_opt(kz0_, dt, "kz0"), kq0 = prep_opt(kq0_, dt, "kq0");
  if (e) check(e->numel() == B * D, "e must have z0's shape");
  check(bool(kz0) == bool(kq0) || NQ == 0, "give both kz0 and kq0 (first stage) or neither");
  if (kz0) check(kz0->numel() == B * D && (NQ == 0 || kq0->numel() == B * NQ), "kz0/kq0 have the wrong shape");
  auto spec = cnf_spec(call.net, e, rates);
  auto tab = make_tableau(c, a, b, b_err);
  const bool has_err = !b_err.empty();
  if (has_err) check(int64_t(atol.size()) == D + NQ && int64_t(rtol.size()) == D + NQ, "atol/rtol need D + NQ values");
  Tensor z1 = empty_like_dt({B, D}, z0), q1 = empty_like_dt({B, NQ}, z0);
  Tensor ez = has_err ? empty_like_dt({B, D}, z0) : empty_like_dt({0}, z0);
  Tensor eq = has_err ? empty_like_dt({B, NQ}, z0) : empty_like_dt({0}, z0);
  Tensor kz = want_stages ? empty_like_dt({tab.s, B, D}, z0) : empty_like_dt({0}, z0);
  Tensor kq = want_stages ? empty_like_dt({tab.s, B, NQ}, z0) : empty_like_dt({0}, z0);
  Tensor ss = at::zeros({D + NQ}, z0.options().dtype(at::kDouble));
  Tensor save = want_save ? pooled_empty(fastode::cnf_step_save_size(spec, tab, B, ex), z0) : empty_like_dt({0}, z0);
  DISPATCH_FLOAT(dt, [&] {
    auto p = make_params<scalar_t>(params);
    fastode::CnfStepIn<scalar_t> in;
    in.t0 = t0;
    in.dt = dtv;
    in.B = B;
    in.z0 = z0.data_ptr<scalar_t>();
    in.q0 = NQ ? q0.data_ptr<scalar_t>() : nullptr;
    in.e = cptr<scalar_t>(e);
    in.kz0 = cptr<scalar_t>(kz0);
    in.kq0 = NQ ? cptr<scalar_t>(kq0) : nullptr;
    in.atol = has_err ? atol.data() : nullptr;
    in.rtol = has_err ? rtol.data() : nullptr;
    fastode::CnfStepOut<scalar_t> out;
    out.z1 = z1.data_ptr<scalar_t>();
    out.q1 = NQ ? q1.data_ptr<scalar_t>() : nullptr;
    out.ez = has_err ? ez.data_ptr<scalar_t>() : nullptr;
    out.eq = has_err && NQ ? eq.data_ptr<scalar_t>() : nullptr;
    out.kz = want_stages ? kz.data_ptr<scalar_t>() : nullptr;
    out.kq = want_stages && NQ ? kq.data_ptr<scalar_t>() : nullptr;
    out.sumsq = has_err ? ss.data_ptr<double>() : nullptr;
    out.save = want_save ? save.data_ptr<scalar_t>() : nullptr;
    fastode::cnf_step_forward<scalar_t>(spec, tab, p, in, out, ex);
  });
  return py::make_tuple(z1, q1, ez, eq, kz, kq, ss, save);
}

// Backward of the fused step. Returns (gz0, gq0, ge, gkz0, gkq0, param grads, gt0, gdt) with None for
// what was not asked for.
py::tuple cnf_step_backward(double t0, double dtv, const Tensor& z0_, const Tensor& q0_, const OptT& e_,
                            const OptT& kz0_, const OptT& kq0_, const std::vector<Tensor>& params_, int act,
                            const std::vector<int>& rates, const std::vector<double>& c,
                            const std::vector<double>& a, const std::vector<double>& b,
                            const std::vector<double>& b_err, const Tensor& save, const OptT& gz1_,
                            const OptT& gq1_, const OptT& gez_, const OptT& geq_, const OptT& gkz_, const OptT& gkq_,
                            bool need_z0, bool need_q0, bool need_e, bool need_k0, bool need_params, bool need_t0,
                            bool need_dt, int64_t tile) {
  auto call = net_call(z0_, "z0", params_, act, tile);
  const auto dt = call.dt;
  Tensor& z0 = call.z;
  auto& params = call.params;
  const int64_t B = call.B, D = call.D, NQ = int64_t(rates.size());
  auto& ex = call.ex;
  Tensor q0 = prep(q0_, dt, "q0");
  OptT e = prep_opt(e_, dt, "e"), kz0 = prep_opt(kz0_, dt, "kz0"), kq0 = prep_opt(kq0_, dt, "kq0");
  auto spec = cnf_spec(call.net, e, rates);
  auto tab = make_tableau(c, a, b, b_err);
  check(save.numel() == fastode::cnf_step_save_size(spec, tab, B, ex),
        "saved activations do not match (tile size changed between forward and backward?)");
  OptT gz1 = prep_opt(gz1_, dt, "grad z1"), gq1 = prep_opt(gq1_, dt, "grad q1"), gez = prep_opt(gez_, dt, "grad ez"),
       geq = prep_opt(geq_, dt, "grad eq"), gkz = prep_opt(gkz_, dt, "grad kz"), gkq = prep_opt(gkq_, dt, "grad kq");
  OptT gz0, gq0, ge, gkz0, gkq0;
  if (need_z0) gz0 = empty_like_dt({B, D}, z0);
  if (need_q0) gq0 = empty_like_dt({B, NQ}, z0);
  if (need_e && e) ge = empty_like_dt({B, D}, z0);
  if (need_k0 && kz0) {
    gkz0 = empty_like_dt({B, D}, z0);
    gkq0 = empty_like_dt({B, NQ}, z0);
  }
  std::vector<Tensor> gp;
  if (need_params)
    for (const auto& p : params) gp.push_back(at::zeros(p.sizes(), p.options()));
  double gt0 = 0, gdt = 0;
  DISPATCH_FLOAT(dt, [&] {
    auto p = make_params<scalar_t>(params);
    fastode::Grads<scalar_t> g;
    if (need_params) g = make_grads<scalar_t>(gp);
    fastode::CnfStepIn<scalar_t> in;
    in.t0 = t0;
    in.dt = dtv;
    in.B = B;
    in.z0 = z0.data_ptr<scalar_t>();
    in.q0 = NQ ? q0.data_ptr<scalar_t>() : nullptr;
    in.e = cptr<scalar_t>(e);
    in.kz0 = cptr<scalar_t>(kz0);
    in.kq0 = NQ ? cptr<scalar_t>(kq0) : nullptr;
    fastode::CnfStepGradIn<scalar_t> gi;
    gi.gz1 = cptr<scalar_t>(gz1);
    gi.gq1 = NQ ? cptr<scalar_t>(gq1) : nullptr;
    gi.gez = gez && gez->numel() ? cptr<scalar_t>(gez) : nullptr;
    gi.geq = NQ && geq && geq->numel() ? cptr<scalar_t>(geq) : nullptr;
    gi.gkz = gkz && gkz->numel() ? cptr<scalar_t>(gkz) : nullptr;
    gi.gkq = NQ && gkq && gkq->numel() ? cptr<scalar_t>(gkq) : nullptr;
    fastode::CnfStepGradOut<scalar_t> go;
    go.gz0 = mptr<scalar_t>(gz0);
    go.gq0 = NQ ? mptr<scalar_t>(gq0) : nullptr;
    go.ge = mptr<scalar_t>(ge);
    go.gkz0 = mptr<scalar_t>(gkz0);
    go.gkq0 = NQ ? mptr<scalar_t>(gkq0) : nullptr;
    go.grads = need_params ? &g : nullptr;
    go.gt0 = need_t0 ? &gt0 : nullptr;
    go.gdt = need_dt ? &gdt : nullptr;
    fastode::cnf_step_backward<scalar_t>(spec, tab, p, in, save.data_ptr<scalar_t>(), gi, go, ex);
  });
  if (gq0 && NQ == 0) gq0 = std::nullopt;
  auto opt = [](const OptT& x) { return x ? py::cast(*x) : py::none(); };
  return py::make_tuple(opt(gz0), opt(gq0), opt(ge), opt(gkz0), opt(gkq0), gp,
                        need_t0 ? py::cast(gt0) : py::none(), need_dt ? py::cast(gdt) : py::none());
}

// Fixed-grid solve over the times ts. Returns (zT, qT, save).
std::tuple<Tensor, Tensor, Tensor> cnf_grid_forward(const std::vector<double>& ts, const Tensor& z0_, const Tensor& q0_,
                                                    const OptT& e_, const std::vector<Tensor>& params_, int act,
                                                    const std::vector<int>& rates, const std::vector<double>& c,
                                                    const std::vector<double>& a, const std::vector<double>& b,
                                                    bool want_save, int64_t tile) {
  auto call = net_call(z0_, "z0", params_, act, tile);
  const auto dt = call.dt;
  Tensor& z0 = call.z;
  auto& params = call.params;
  const int64_t B = call.B, D = call.D, NQ = int64_t(rates.size());
  auto& ex = call.ex;
  check(ts.size() >= 1, "the time grid needs at least one time");
  Tensor q0 = prep(q0_, dt, "q0");
  check(q0.numel() == B * NQ, "q0 must be (B, len(rates))");
  OptT e = prep_opt(e_, dt, "e");
  if (e) check(e->numel() == B * D, "e must have z0's shape");
  auto spec = cnf_spec(call.net, e, rates);
  auto tab = make_tableau(c, a, b, {});
  const int nsteps = int(ts.size()) - 1;
  Tensor zT = empty_like_dt({B, D}, z0), qT = empty_like_dt({B, NQ}, z0);
  Tensor save = want_save ? pooled_empty(fastode::cnf_grid_save_size(spec, tab, B, nsteps, ex), z0)
                          : empty_like_dt({0}, z0);
  if (want_save)  // every step's blocks end with the last tile's (all stages)
    zero_partial_tile(save, B, ex, fastode::cnf_step_save_size(spec, tab, B, ex),
                      [&] { return fastode::cnf_step_save_size(spec, tab, ex.tile, ex); }, nsteps);
  DISPATCH_FLOAT(dt, [&] {
    auto p = make_params<scalar_t>(params);
    fastode::cnf_grid_forward<scalar_t>(spec, tab, p, ts.data(), nsteps, B, z0.data_ptr<scalar_t>(),
                                        NQ ? q0.data_ptr<scalar_t>() : nullptr, cptr<scalar_t>(e),
                                        zT.data_ptr<scalar_t>(), NQ ? qT.data_ptr<scalar_t>() : nullptr,
                                        want_save ? save.data_ptr<scalar_t>() : nullptr, ex);
  });
  return {zT, qT, save};
}

// Adaptive solves. ctl: rtol, atol, safety, ifactor, dfactor, min_step, max_step, first_step (0: heuristic).
fastode::AdaptiveControl make_control(const std::vector<double>& ctl_f, int64_t max_num_steps, int order,
                                      bool time_f32, int nq_norm) {
  check(ctl_f.size() == 8 || ctl_f.size() == 9,
        "ctl needs rtol, atol, safety, ifactor, dfactor, min_step, max_step, first_step[, store_budget]");
  fastode::AdaptiveControl ctl;
  ctl.rtol = ctl_f[0];
  ctl.atol = ctl_f[1];
  ctl.safety = ctl_f[2];
  ctl.ifactor = ctl_f[3];
  ctl.dfactor = ctl_f[4];
  ctl.min_step = ctl_f[5];
  ctl.max_step = ctl_f[6];
  ctl.first_step = ctl_f[7];
  ctl.store_budget = ctl_f.size() == 9 ? int64_t(ctl_f[8]) : 0;
  ctl.max_num_steps = max_num_steps;
  ctl.order = order;
  ctl.time_f32 = time_f32;
  ctl.nq_norm = nq_norm;
  return ctl;
}

py::dict stats_dict(const fastode::AdaptiveStats& st) {
  py::dict d;
  d["status"] = st.status;
  d["t_status"] = st.t_status;
  d["nfe"] = st.nfe;
  d["steps"] = st.steps;
  d["accepted"] = st.accepted;
  d["rejected"] = st.rejected;
  d["step_ts"] = st.step_ts;
  d["step_sizes"] = st.step_sizes;
  return d;
}

// The kept step activations (gradient="direct") move into a capsule that the tape dict holds until the backward.
template <typename T>
using SavedSteps = std::vector<fastode::StepBuffer<T>>;

template <typename T>
py::dict tape_dict(fastode::AdaptiveTape<T>& tape, int64_t m, const Tensor& like) {
  const int64_t n = int64_t(tape.t0.size());
  Tensor ys = empty_like_dt({n, m}, like), k0s = empty_like_dt({n, m}, like);
  std::copy(tape.y.begin(), tape.y.end(), ys.data_ptr<T>());
  std::copy(tape.k0.begin(), tape.k0.end(), k0s.data_ptr<T>());
  py::dict d;
  d["t0"] = tape.t0;
  d["dt"] = tape.dt;
  d["y"] = ys;
  d["k0"] = k0s;
  d["x"] = tape.x;
  d["width"] = tape.width;
  d["kept_steps"] = int64_t(tape.saves.size());  // gradient="direct": steps whose activations are kept, and their size
  d["kept_step_values"] = tape.save_size;
  if (!tape.saves.empty()) {
    auto* held = new SavedSteps<T>(std::move(tape.saves));
    d["saves"] = py::capsule(held, [](void* ptr) { delete static_cast<SavedSteps<T>*>(ptr); });
  }
  return d;
}

template <typename T>
fastode::AdaptiveTape<T> tape_from(const py::dict& d, at::ScalarType dt) {
  fastode::AdaptiveTape<T> tape;
  tape.t0 = d["t0"].cast<std::vector<double>>();
  tape.dt = d["dt"].cast<std::vector<double>>();
  Tensor ys = prep(d["y"].cast<Tensor>(), dt, "tape y"), k0s = prep(d["k0"].cast<Tensor>(), dt, "tape k0");
  tape.y.assign(ys.data_ptr<T>(), ys.data_ptr<T>() + ys.numel());
  tape.k0.assign(k0s.data_ptr<T>(), k0s.data_ptr<T>() + k0s.numel());
  tape.x = d["x"].cast<double>();
  tape.width = d["width"].cast<double>();
  if (d.contains("saves")) {  // views into the capsule's steps (the dict keeps it alive during the backward)
    const auto* held = d["saves"].cast<py::capsule>().get_pointer<SavedSteps<T>>();
    for (const auto& step : *held) tape.saved.push_back(step.get());
  }
  return tape;
}

// From t0 to t1; step_rows = 0: batch-global control, else per-tile (tiles of step_rows rows). Returns
// (zT, qT, stats, tape): stats / tape are dicts (batch-global) or lists of dicts, one per tile (tape: {} / [] unless
// want_tape).
py::tuple cnf_adaptive_forward(double t0, double t1, const Tensor& z0_, const Tensor& q0_, const OptT& e_,
                               const std::vector<Tensor>& params_, int act, const std::vector<int>& rates,
                               const std::vector<double>& c, const std::vector<double>& a,
                               const std::vector<double>& b, const std::vector<double>& b_err,
                               const std::vector<double>& c_mid, const std::vector<double>& ctl_f,
                               int64_t max_num_steps, int order, bool time_f32, int nq_norm, bool want_tape,
                               int64_t step_rows, int64_t tile) {
  auto call = net_call(z0_, "z0", params_, act, tile);
  const int64_t B = call.B, D = call.D, NQ = int64_t(rates.size());
  Tensor q0 = prep(q0_, call.dt, "q0");
  check(q0.numel() == B * NQ, "q0 must be (B, len(rates))");
  OptT e = prep_opt(e_, call.dt, "e");
  if (e) check(e->numel() == B * D, "e must have z0's shape");
  check(!b_err.empty(), "an adaptive solve needs b_err");
  auto spec = cnf_spec(call.net, e, rates);
  auto tab = make_tableau(c, a, b, b_err);
  auto ctl = make_control(ctl_f, max_num_steps, order, time_f32, nq_norm);
  Tensor zT = empty_like_dt({B, D}, call.z), qT = empty_like_dt({B, NQ}, call.z);
  py::object stats_out, tape_out;
  DISPATCH_FLOAT(call.dt, [&] {
    using T = scalar_t;
    auto p = make_params<T>(call.params);
    const T *z0 = call.z.data_ptr<T>(), *q0p = NQ ? q0.data_ptr<T>() : nullptr, *ep = cptr<T>(e);
    T *zTp = zT.data_ptr<T>(), *qTp = NQ ? qT.data_ptr<T>() : nullptr;
    if (step_rows <= 0) {
      fastode::AdaptiveTape<T> tape;
      fastode::AdaptiveStats st;
      {
        py::gil_scoped_release nogil;
        st = fastode::cnf_adaptive_forward<T>(spec, tab, c_mid, p, t0, t1, B, z0, q0p, ep, ctl, zTp, qTp, call.ex,
                                              want_tape ? &tape : nullptr);
      }
      stats_out = stats_dict(st);
      tape_out = want_tape ? py::object(tape_dict<T>(tape, B * (D + NQ), call.z)) : py::object(py::dict());
      return;
    }
    std::vector<fastode::AdaptiveTape<T>> tapes;
    std::vector<fastode::AdaptiveStats> sts;
    {
      py::gil_scoped_release nogil;
      sts = fastode::cnf_adaptive_forward_tiles<T>(spec, tab, c_mid, p, t0, t1, B, step_rows, z0, q0p, ep, ctl, zTp,
                                                   qTp, call.ex, want_tape ? &tapes : nullptr);
    }
    py::list sl, tl;
    for (const auto& st : sts) sl.append(stats_dict(st));
    for (size_t i = 0; i < tapes.size(); ++i) {
      const int64_t R = std::min<int64_t>(step_rows, B - int64_t(i) * step_rows);
      tl.append(tape_dict<T>(tapes[i], R * (D + NQ), call.z));
    }
    stats_out = sl;
    tape_out = tl;
  });
  return py::make_tuple(zT, qT, stats_out, tape_out);
}

// Backward of cnf_adaptive_forward from its tape(s) (step_rows as in the forward). Returns (gz0, gq0, ge or None,
// param grads, g_anchor, g_x, nfe); g_anchor / g_x are floats (batch-global) or lists with one value per tile.
py::tuple cnf_adaptive_backward(const Tensor& z0_, const OptT& e_, const std::vector<Tensor>& params_, int act,
                                const std::vector<int>& rates, const std::vector<double>& c,
                                const std::vector<double>& a, const std::vector<double>& b,
                                const std::vector<double>& b_err, const std::vector<double>& c_mid,
                                const py::object& tape_in, const OptT& gzT_, const OptT& gqT_, bool need_e,
                                bool need_params, int64_t step_rows, int64_t tile) {
  auto call = net_call(z0_, "z0", params_, act, tile);
  const auto dt = call.dt;
  const int64_t B = call.B, D = call.D, NQ = int64_t(rates.size());
  OptT e = prep_opt(e_, dt, "e");
  OptT gzT = prep_opt(gzT_, dt, "grad zT"), gqT = prep_opt(gqT_, dt, "grad qT");
  auto spec = cnf_spec(call.net, e, rates);
  auto tab = make_tableau(c, a, b, b_err);
  Tensor gz0 = empty_like_dt({B, D}, call.z), gq0 = empty_like_dt({B, NQ}, call.z);
  OptT ge;
  if (need_e && e) ge = empty_like_dt({B, D}, call.z);
  std::vector<Tensor> gp;
  if (need_params)
    for (const auto& p : call.params) gp.push_back(at::zeros(p.sizes(), p.options()));
  std::vector<int64_t> sizes;
  for (const auto& p : call.params) sizes.push_back(p.numel());
  int64_t nfe = 0;
  py::object ganchor, gx;
  DISPATCH_FLOAT(dt, [&] {
    using T = scalar_t;
    auto p = make_params<T>(call.params);
    fastode::Grads<T> g;
    if (need_params) g = make_grads<T>(gp);
    const T *ep = cptr<T>(e), *gzp = cptr<T>(gzT), *gqp = NQ ? cptr<T>(gqT) : nullptr;
    T *gz0p = gz0.data_ptr<T>(), *gq0p = NQ ? gq0.data_ptr<T>() : nullptr, *gep = mptr<T>(ge);
    if (step_rows <= 0) {
      auto tape = tape_from<T>(tape_in.cast<py::dict>(), dt);
      check(int64_t(tape.y.size()) == int64_t(tape.t0.size()) * B * (D + NQ), "the tape does not match the batch");
      double ga = 0, gxv = 0;
      {
        py::gil_scoped_release nogil;
        nfe = fastode::cnf_adaptive_backward<T>(spec, tab, c_mid, p, tape, B, ep, gzp, gqp, gz0p, gq0p, gep,
                                                need_params ? &g : nullptr, &ga, &gxv, call.ex);
      }
      ganchor = py::float_(ga);
      gx = py::float_(gxv);
      return;
    }
    std::vector<fastode::AdaptiveTape<T>> tapes;
    for (auto item : tape_in.cast<py::list>()) tapes.push_back(tape_from<T>(item.cast<py::dict>(), dt));
    std::vector<double> ga(tapes.size()), gxv(tapes.size());
    {
      py::gil_scoped_release nogil;
      nfe = fastode::cnf_adaptive_backward_tiles<T>(spec, tab, c_mid, p, tapes, B, step_rows, ep, gzp, gqp, gz0p,
                                                    gq0p, gep, need_params ? &g : nullptr, sizes, ga.data(),
                                                    gxv.data(), call.ex);
    }
    ganchor = py::cast(ga);
    gx = py::cast(gxv);
  });
  py::object pge = ge ? py::cast(*ge) : py::none();
  return py::make_tuple(gz0, gq0, pge, gp, ganchor, gx, nfe);
}

// Backward of cnf_grid_forward. Returns (gz0, gq0, ge, param grads, gts (list of floats)) with None for what
// was not asked for.
py::tuple cnf_grid_backward(const std::vector<double>& ts, const Tensor& z0_, const OptT& e_,
                            const std::vector<Tensor>& params_, int act, const std::vector<int>& rates,
                            const std::vector<double>& c, const std::vector<double>& a, const std::vector<double>& b,
                            const Tensor& save, const OptT& gzT_, const OptT& gqT_, bool need_z0, bool need_q0,
                            bool need_e, bool need_params, bool need_ts, int64_t tile) {
  auto call = net_call(z0_, "z0", params_, act, tile);
  const auto dt = call.dt;
  Tensor& z0 = call.z;
  auto& params = call.params;
  const int64_t B = call.B, D = call.D, NQ = int64_t(rates.size());
  auto& ex = call.ex;
  OptT e = prep_opt(e_, dt, "e");
  auto spec = cnf_spec(call.net, e, rates);
  auto tab = make_tableau(c, a, b, {});
  const int nsteps = int(ts.size()) - 1;
  check(save.numel() == fastode::cnf_grid_save_size(spec, tab, B, nsteps, ex),
        "saved activations do not match (tile size changed between forward and backward?)");
  OptT gzT = prep_opt(gzT_, dt, "grad zT"), gqT = prep_opt(gqT_, dt, "grad qT");
  OptT gz0, gq0, ge;
  if (need_z0) gz0 = empty_like_dt({B, D}, z0);
  if (need_q0) gq0 = NQ && gqT ? empty_like_dt({B, NQ}, z0) : at::zeros({B, NQ}, z0.options());
  if (need_e && e) ge = empty_like_dt({B, D}, z0);
  std::vector<Tensor> gp;
  if (need_params)
    for (const auto& p : params) gp.push_back(at::zeros(p.sizes(), p.options()));
  std::vector<double> gts(need_ts ? ts.size() : 0);
  DISPATCH_FLOAT(dt, [&] {
    auto p = make_params<scalar_t>(params);
    fastode::Grads<scalar_t> g;
    if (need_params) g = make_grads<scalar_t>(gp);
    fastode::cnf_grid_backward<scalar_t>(spec, tab, p, ts.data(), nsteps, B, cptr<scalar_t>(e),
                                         save.data_ptr<scalar_t>(), cptr<scalar_t>(gzT),
                                         NQ ? cptr<scalar_t>(gqT) : nullptr, mptr<scalar_t>(gz0),
                                         NQ && gqT ? mptr<scalar_t>(gq0) : nullptr, mptr<scalar_t>(ge),
                                         need_params ? &g : nullptr, need_ts ? gts.data() : nullptr, ex);
  });
  auto opt = [](const OptT& x) { return x ? py::cast(*x) : py::none(); };
  return py::make_tuple(opt(gz0), opt(gq0), opt(ge), gp, need_ts ? py::cast(gts) : py::none());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastode C++ CPU kernels (fused concatsquash MLP, Hutchinson VJP, RK steps); see csrc/fastode.h";
  m.def("act_code", &fastode::act_from_name, "activation name -> code");
  m.def("codes", [] {  // the core's enums, which tests/test_codes.py pins to fastode/codes.py
    using Codes = std::initializer_list<std::pair<const char*, int>>;
    auto dict = [](Codes codes) {
      py::dict d;
      for (const auto& [name, code] : codes) d[name] = code;
      return d;
    };
    py::dict out;
    out["activation"] = dict({{"tanh", fastode::kTanh}, {"softplus", fastode::kSoftplus}, {"elu", fastode::kElu},
                              {"swish", fastode::kSwish}, {"identity", fastode::kIdentity}});
    out["rate"] = dict({{"-trace", fastode::kNegTrace}, {"trace", fastode::kTrace}, {"kinetic", fastode::kKinetic},
                        {"jac_frob", fastode::kJacFrob}});
    out["status"] = dict({{"SOLVED", fastode::kSolved}, {"MAX_STEPS", fastode::kMaxSteps},
                          {"UNDERFLOW", fastode::kUnderflow}, {"NONFINITE", fastode::kNonFinite}});
    return out;
  });
  m.def("gemm_backend", &fastode::gemm_backend);
  m.def("set_gemm_backend", &fastode::set_gemm_backend);
  m.def("mlp_forward", &mlp_forward);
  m.def("mlp_probe_forward", &mlp_probe_forward);
  m.def("mlp_backward", &mlp_backward);
  m.def(
      "cnf_step_save_size",
      [](const std::vector<int64_t>& dims, int act, int K, int nrates, int stages, int64_t B, int64_t tile) {
        fastode::CnfSpec spec;
        spec.net.dims = dims;
        spec.net.act = act;
        spec.K = K;
        spec.exact = false;
        spec.rates.assign(nrates, 0);
        fastode::Tableau tab;
        tab.s = stages;
        return fastode::cnf_step_save_size(spec, tab, B, make_exec(tile));
      },
      "values cnf_step_forward saves for one step of a batch of B (cnf_grid_forward: one per step)");
  m.def(
      "mlp_save_size",
      [](const std::vector<int64_t>& dims, int act, int64_t B, int K, bool probes, int64_t tile) {
        fastode::Net net;
        net.dims = dims;
        net.act = act;
        return fastode::mlp_save_size(net, B, K, probes, make_exec(tile));
      },
      "values of the saved activations of mlp_forward (probes false, K 1) / mlp_probe_forward (for shape inference)");
  m.def("cnf_step_forward", &cnf_step_forward);
  m.def("cnf_step_backward", &cnf_step_backward);
  m.def("cnf_grid_forward", &cnf_grid_forward);
  m.def("cnf_grid_backward", &cnf_grid_backward);
  m.def("cnf_adaptive_forward", &cnf_adaptive_forward);
  m.def("cnf_adaptive_backward", &cnf_adaptive_backward);
  m.def(
      "adapt_step",
      [](const std::vector<double>& ctl_f, int order, double h, double ratio) {
        const auto a = fastode::adapt_step(make_control(ctl_f, 1, order, false, 1), h, ratio);
        return py::make_tuple(a.accept, a.dt_next);
      },
      "the adaptive solves' controller step (tests: against IntegralController.adapt_host)");
  m.def("interp_coordinate", &fastode::interp_coordinate, "the output's fraction of the last step (tests)");
  m.def(
      "initial_step",
      [](double d0, double d1, const std::function<double(double)>& d2_of, int order, bool f32) {
        double h0, dt;
        if (f32) {
          const float h = fastode::initial_trial_step<float>(d0, d1);
          h0 = h, dt = fastode::initial_step_size<float>(h, d1, d2_of(h), order);
        } else {
          h0 = fastode::initial_trial_step<double>(d0, d1);
          dt = fastode::initial_step_size<double>(h0, d1, d2_of(h0), order);
        }
        return py::make_tuple(h0, dt);
      },
      "(h0, dt) of the first-step heuristic from d0, d1 and d2(h0) (tests: against fastode.ops.rk.initial_step)");
  m.def("empty_cache", &fastode::pool_clear, "free the cached buffers (saved activations, kept steps); returns bytes");
  m.def("cached_bytes", &fastode::pool_cached);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
