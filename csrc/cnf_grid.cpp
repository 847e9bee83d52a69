// Fixed-grid CNF solve: the steps between grid times, forward and backward, without leaving C++.
#include "detail/mlp_tile.h"

namespace fastode {

// ===================================================================================================
// Fixed-grid solve: a loop over cnf_step_forward / cnf_step_backward without leaving C++.
int64_t cnf_grid_save_size(const CnfSpec& spec, const Tableau& tab, int64_t B, int nsteps, const Exec& ex) {
  return int64_t(nsteps) * cnf_step_save_size(spec, tab, B, ex);
}

template <typename T>
void cnf_grid_forward(const CnfSpec& spec, const Tableau& tab, const Params<T>& p_in, const double* ts, int nsteps,
                      int64_t B, const T* z0, const T* q0, const T* e, T* zT, T* qT, T* save, const Exec& ex) {
  std::vector<std::vector<T>> wt;  // every step folds every stage: transpose W once per solve
  const Params<T> p = with_transposes(spec.net, p_in, wt);
  const int64_t D = spec.net.dims[0], NQ = int64_t(spec.rates.size());
  const int64_t step_save = save ? cnf_step_save_size(spec, tab, B, ex) : 0;
  std::vector<T> buf(2 * B * (D + NQ));  // ping-pong state (z | q) for the intermediate steps
  const T* zc = z0;
  const T* qc = q0;
  for (int n = 0; n < nsteps; ++n) {
    T* zn = n + 1 == nsteps ? zT : buf.data() + (n % 2) * B * (D + NQ);
    T* qn = n + 1 == nsteps ? qT : zn + B * D;
    if (n + 1 == nsteps && !NQ) qn = nullptr;
    CnfStepIn<T> in;
    in.t0 = ts[n];
    in.dt = ts[n + 1] - ts[n];
    in.B = B;
    in.z0 = zc;
    in.q0 = qc;
    in.e = e;
    CnfStepOut<T> out;
    out.z1 = zn;
    out.q1 = NQ ? qn : nullptr;
    out.save = save ? save + n * step_save : nullptr;
    cnf_step_forward<T>(spec, tab, p, in, out, ex);
    zc = zn;
    qc = qn;
  }
  if (nsteps == 0) {
    std::memcpy(zT, z0, sizeof(T) * B * D);
    if (NQ) std::memcpy(qT, q0, sizeof(T) * B * NQ);
  }
}

template <typename T>
void cnf_grid_backward(const CnfSpec& spec, const Tableau& tab, const Params<T>& p_in, const double* ts, int nsteps,
                       int64_t B, const T* e, const T* save, const T* gzT, const T* gqT, T* gz0, T* gq0, T* ge,
                       const Grads<T>* grads, double* gts, const Exec& ex) {
  std::vector<std::vector<T>> wt;
  const Params<T> p = with_transposes(spec.net, p_in, wt);
  const int64_t D = spec.net.dims[0], NQ = int64_t(spec.rates.size());
  const int64_t K = spec.K;
  const int64_t step_save = cnf_step_save_size(spec, tab, B, ex);
  // running adjoint of z (ping-pong); q's adjoint is constant along the solve (q does not feed f)
  std::vector<T> adj(2 * B * D, T(0)), gq(B * std::max<int64_t>(NQ, 1), T(0)), get(ge ? K * B * D : 0);
  if (gzT) std::memcpy(adj.data(), gzT, sizeof(T) * B * D);
  if (gqT && NQ) std::memcpy(gq.data(), gqT, sizeof(T) * B * NQ);
  if (ge) std::fill(ge, ge + K * B * D, T(0));
  if (gts) std::fill(gts, gts + nsteps + 1, 0.0);
  int cur = 0;
  for (int n = nsteps - 1; n >= 0; --n) {
    CnfStepIn<T> in;
    in.t0 = ts[n];
    in.dt = ts[n + 1] - ts[n];
    in.B = B;
    in.e = e;
    CnfStepGradIn<T> g;
    g.gz1 = adj.data() + cur * B * D;
    g.gq1 = NQ && gqT ? gq.data() : nullptr;
    CnfStepGradOut<T> o;
    o.gz0 = adj.data() + (1 - cur) * B * D;
    o.ge = ge ? get.data() : nullptr;
    o.grads = grads;
    double gt0 = 0, gdt = 0;
    o.gt0 = gts ? &gt0 : nullptr;
    o.gdt = gts ? &gdt : nullptr;
    cnf_step_backward<T>(spec, tab, p, in, save + n * step_save, g, o, ex);
    if (ge)
      for (int64_t i = 0; i < K * B * D; ++i) ge[i] += get[i];
    if (gts) {  // t_n enters as the step's start (t0 = t_n, dt = t_{n+1} - t_n) and t_{n+1} through dt
      gts[n] += gt0 - gdt;
      gts[n + 1] += gdt;
    }
    cur = 1 - cur;
  }
  if (gz0) std::memcpy(gz0, adj.data() + cur * B * D, sizeof(T) * B * D);
  if (gq0 && NQ) std::memcpy(gq0, gq.data(), sizeof(T) * B * NQ);
}

// Explicit instantiations
#define FASTODE_INSTANTIATE(T) \
  template void cnf_grid_forward<T>(const CnfSpec&, const Tableau&, const Params<T>&, const double*, int, int64_t, const T*, const T*, const T*, T*, T*, T*, const Exec&); \
  template void cnf_grid_backward<T>(const CnfSpec&, const Tableau&, const Params<T>&, const double*, int, int64_t, const T*, const T*, const T*, const T*, T*, T*, T*, const Grads<T>*, double*, const Exec&);

FASTODE_INSTANTIATE(float)
FASTODE_INSTANTIATE(double)

}  // namespace fastode
