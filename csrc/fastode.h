// fastode C++ core: fused concatsquash-MLP kernels and fused Runge-Kutta steps for CNF dynamics.
//
// This header and the core behind it (csrc/*.cpp except bindings.cpp, and csrc/detail/; see csrc/README.md) know
// nothing about torch or autograd (DESIGN.md, layer "kernels"): raw row-major pointers, shapes and tableau
// coefficients passed in by the caller. bindings.cpp wraps them for torch; tests/test_core.cpp tests them
// standalone (built by CMakeLists.txt, run by ctest).
//
// Notation (one concatsquash layer l, FFJORD's ConcatSquashLinear):
//   gate_l = sigmoid(gw_l t + gb_l),  W'_l = diag(gate_l) W_l,  c_l = b_l gate_l + bw_l t
//   a_l = h_l W'_l^T + c_l,  h_{l+1} = act(a_l) for l < L-1,  f = a_{L-1}.
// A "probe" e gives the vector-Jacobian product vjp = e^T df/dz (Hutchinson: one probe per sample;
// exact trace: the D basis vectors, e == nullptr). Per row:
//   trace = sum_k <vjp_k, e_k>,  kinetic = |f|^2,  jac_frob = sum_k |vjp_k|^2.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace fastode {

// The codes Python sends (fastode/codes.py: ACTIVATION_CODES, RATE_CODES, Status); tests/test_codes.py pins these
// enums to them through the extension's codes().
enum Act : int { kTanh = 0, kSoftplus = 1, kElu = 2, kSwish = 3, kIdentity = 4 };
// Integrands of a CNF's extra states q: the log-density change (-trace), +trace, |f|^2, sum_k |vjp_k|^2.
enum Rate : int { kNegTrace = 0, kTrace = 1, kKinetic = 2, kJacFrob = 3 };
// Names as in fastode.nn.functional.ACTIVATIONS; throws std::invalid_argument for an unknown name.
int act_from_name(const std::string& name);

// Shape of an L-layer MLP: dims = {D, h_1, ..., h_{L-1}, D} (L = dims.size() - 1 >= 1).
struct Net {
  std::vector<int64_t> dims;
  int act = kTanh;
  int L() const { return static_cast<int>(dims.size()) - 1; }
};

// Parameters of every layer, in FFJORD's order: W (out, in), b, gw, gb, bw (out,), all contiguous.
template <typename T>
struct Params {
  std::vector<const T*> W, b, gw, gb, bw;
  // Optional: W_l^T (n x m) per layer, set by callers that fold the same weights many times (per-tile solves
  // fold every stage of every tile); fold() then scales its columns instead of transposing W' each time.
  std::vector<const T*> WT;
};
// Parameter gradients, accumulated into (+=). Either all pointers are set or the struct is not passed.
template <typename T>
struct Grads {
  std::vector<T*> W, b, gw, gb, bw;
};

// Execution: rows per tile, and whether OpenMP may be used (nthreads > 1). The result does not depend
// on nthreads: tiles are grouped into a fixed number of chunks and partial sums are reduced in order.
struct Exec {
  int64_t tile = 64;
  int nthreads = 1;
};

// For unit tests: the float32 activation as the kernels compute it (value, first and second derivative).
void activation_f32(int act, int64_t n, const float* a, float* h, float* d1, float* d2);

// ---------------------------------------------------------------------------------------------------
// GEMM used by the kernels. "blas" = the process's Fortran BLAS (sgemm_/dgemm_ found with dlsym, e.g.
// the MKL inside libtorch_cpu, or a library named by $FASTODE_BLAS_LIB); "fallback" = built-in loops.
// set_gemm_backend("auto") picks blas when found. Returns the name in use.
std::string gemm_backend();
std::string set_gemm_backend(const std::string& name);

// ---------------------------------------------------------------------------------------------------
// Concatsquash MLP. Inputs are contiguous row-major; B rows; t is the (scalar) time.
// Saved activations for the backward pass live in `save` (mlp_save_size elements; tile layout is
// private to the core (detail/mlp_tile.h) and depends on exec.tile, which must be the same in the backward call).
int64_t mlp_save_size(const Net& net, int64_t B, int K, bool probes, const Exec& ex);

template <typename T>
void mlp_forward(const Net& net, const Params<T>& p, double t, int64_t B, const T* z, T* f, T* save,
                 const Exec& ex);

// K probes: e is (K, B, D) (Hutchinson: K = 1), or nullptr for the D basis vectors (exact trace, K = D).
// vjp (K, B, D), kinetic, jac_frob and save may be nullptr (not wanted).
template <typename T>
void mlp_probe_forward(const Net& net, const Params<T>& p, double t, int64_t B, const T* z, int K,
                       const T* e, T* f, T* vjp, T* trace, T* kinetic, T* jac_frob, T* save,
                       const Exec& ex);

// Backward of mlp_forward (probes = false: only gf) or of mlp_probe_forward (probes = true).
// Upstream gradients gf (B,D), gvjp (K,B,D), gtrace/gkin/gfrob (B,) may each be nullptr (zero).
// Outputs (each may be nullptr): gz (B,D) overwritten, ge (K,B,D) overwritten, grads accumulated,
// gt (scalar) overwritten.
template <typename T>
void mlp_backward(const Net& net, const Params<T>& p, double t, int64_t B, const T* z, int K,
                  const T* e, bool probes, const T* save, const T* f, const T* vjp, const T* gf,
                  const T* gvjp, const T* gtrace, const T* gkin, const T* gfrob, T* gz, T* ge,
                  const Grads<T>* grads, T* gt, const Exec& ex);

// ---------------------------------------------------------------------------------------------------
// Explicit Runge-Kutta tableau (coefficients come from fastode.tableaus through the caller).
struct Tableau {
  int s = 0;
  std::vector<double> c, a, b, b_err;  // a: s*s row-major (strictly lower triangular); b_err may be empty
  bool has_err() const { return !b_err.empty(); }
};

// ---------------------------------------------------------------------------------------------------
// Fused RK step of CNF dynamics:  dz/dt = f(t, z),  dq_j/dt = rate_j  for the NQ columns of q, where
// rate codes: enum Rate.
struct CnfSpec {
  Net net;
  int K = 1;              // probes (1 = Hutchinson with e; D = exact trace with e == nullptr)
  bool exact = false;     // basis probes
  std::vector<int> rates; // NQ codes
};

template <typename T>
struct CnfStepIn {
  double t0 = 0, dt = 0;
  int64_t B = 0;
  const T* z0 = nullptr;   // (B, D)
  const T* q0 = nullptr;   // (B, NQ)
  const T* e = nullptr;    // (K, B, D) or nullptr with exact
  const T* kz0 = nullptr;  // FSAL: first stage given (B, D), (B, NQ); nullptr: evaluate it
  const T* kq0 = nullptr;
  // error control (used when the tableau has b_err): per column of [z | q], D + NQ values
  const double* atol = nullptr;
  const double* rtol = nullptr;
};

template <typename T>
struct CnfStepOut {
  T* z1 = nullptr;        // (B, D)
  T* q1 = nullptr;        // (B, NQ)
  T* ez = nullptr;        // (B, D) error estimate, or nullptr
  T* eq = nullptr;        // (B, NQ)
  T* kz = nullptr;        // all stages (s, B, D), or nullptr (needed for dense output / FSAL)
  T* kq = nullptr;        // (s, B, NQ)
  double* sumsq = nullptr;  // (D + NQ): per column sum of squared scaled error, or nullptr
  T* save = nullptr;      // for the backward pass, cnf_step_save_size elements, or nullptr
};

int64_t cnf_step_save_size(const CnfSpec& spec, const Tableau& tab, int64_t B, const Exec& ex);

template <typename T>
void cnf_step_forward(const CnfSpec& spec, const Tableau& tab, const Params<T>& p,
                      const CnfStepIn<T>& in, const CnfStepOut<T>& out, const Exec& ex);

// Gradients flowing into the step outputs (each may be nullptr = zero).
template <typename T>
struct CnfStepGradIn {
  const T* gz1 = nullptr;  // (B, D)
  const T* gq1 = nullptr;  // (B, NQ)
  const T* gez = nullptr;  // (B, D)
  const T* geq = nullptr;  // (B, NQ)
  const T* gkz = nullptr;  // (s, B, D): gradient of the returned stages
  const T* gkq = nullptr;  // (s, B, NQ)
};
template <typename T>
struct CnfStepGradOut {
  T* gz0 = nullptr;   // (B, D)
  T* gq0 = nullptr;   // (B, NQ)
  T* ge = nullptr;    // (K, B, D)
  T* gkz0 = nullptr;  // (B, D) when the first stage was given (FSAL)
  T* gkq0 = nullptr;
  const Grads<T>* grads = nullptr;
  double* gt0 = nullptr;
  double* gdt = nullptr;
};

template <typename T>
void cnf_step_backward(const CnfSpec& spec, const Tableau& tab, const Params<T>& p,
                       const CnfStepIn<T>& in, const T* save, const CnfStepGradIn<T>& g,
                       const CnfStepGradOut<T>& out, const Exec& ex);

// Fixed-grid solve: the steps between consecutive times ts[0..nsteps] in one call (no error control).
// Forward: (z0, q0) -> (zT, qT), saving every step for the backward (cnf_grid_save_size elements).
// Backward: gradients of (zT, qT) -> z0, q0, e, parameters (accumulated) and every grid time (gts, nsteps+1,
// overwritten).
int64_t cnf_grid_save_size(const CnfSpec& spec, const Tableau& tab, int64_t B, int nsteps, const Exec& ex);

template <typename T>
void cnf_grid_forward(const CnfSpec& spec, const Tableau& tab, const Params<T>& p, const double* ts, int nsteps,
                      int64_t B, const T* z0, const T* q0, const T* e, T* zT, T* qT, T* save, const Exec& ex);

template <typename T>
void cnf_grid_backward(const CnfSpec& spec, const Tableau& tab, const Params<T>& p, const double* ts, int nsteps,
                       int64_t B, const T* e, const T* save, const T* gzT, const T* gqT, T* gz0, T* gq0, T* ge,
                       const Grads<T>* grads, double* gts, const Exec& ex);

// ---------------------------------------------------------------------------------------------------
// Adaptive CNF solve with one step size for the batch (batch-global control, torchdiffeq's semantics): the
// Hairer-Norsett-Wanner first step, the integral controller, the mixed RMS norm over z and the first nq_norm
// columns of q (max of their RMS; later columns, e.g. regulariser integrals, do not steer the step), overshoot
// past t1 and torchdiffeq's quartic interpolation there (c_mid weights). The tableau must be FSAL with an error
// estimate. Times are rounded as a float32 time tensor rounds them when time_f32 (the CNF's times have the
// state's dtype). Decreasing t1 < t0 integrates backwards.
struct AdaptiveControl {
  double rtol = 1e-7, atol = 1e-9;
  double safety = 0.9, ifactor = 10.0, dfactor = 0.2;
  double min_step = 0.0, max_step = 1.0 / 0.0;
  int64_t max_num_steps = 10000;  // step attempts
  double first_step = 0.0;        // > 0: the first step (magnitude) instead of the HNW heuristic
  int order = 5;                  // the tableau's order: exponent 1/order of the controller and the first step
  bool time_f32 = true;
  int nq_norm = 1;
  int64_t store_budget = 0;  // values of saved step activations the tape may keep (0: recompute every step)
};

enum AdaptiveStatus : int { kSolved = 0, kMaxSteps = 1, kUnderflow = 2, kNonFinite = 3 };

// Step-size control, named as the spec it mirrors (fastode/solvers/controller.py, fastode/solvers/rk_adaptive.py);
// tests/test_cpp_control.py checks each against the spec through the extension.
struct Adapted {
  bool accept;
  double dt_next;
};
// IntegralController.adapt_host: accept (ratio <= 1; refused above max_step, forced at min_step) and the next step.
Adapted adapt_step(const AdaptiveControl& ctl, double h, double ratio);
// RKAdaptiveSolver._x: the fraction of the step [t0, t1] at t, each operation rounded as the clock (float32 times).
double interp_coordinate(double t, double t0, double t1, bool time_f32);
// fastode.ops.rk.initial_step (Hairer, Norsett & Wanner) in its two formulas, around the one trial evaluation the
// caller makes at t0 + h0: the trial step h0 from d0 = |y0/s| and d1 = |f0/s| (rounded to the state dtype T), then
// the proposed first step min(100 h0, h1) from d1 and d2 = |(f1 - f0)/s| / h0, in T. `order` is the tableau's order
// (the spec's order - 1 convention of the adaptive solver: exponent 1/order).
template <typename T>
T initial_trial_step(double d0, double d1) {
  return T((d0 < 1e-5 || d1 < 1e-5) ? 1e-6 : 0.01 * d0 / d1);
}
template <typename T>
double initial_step_size(T h0, double d1, double d2, int order) {
  const double h1 = (d1 <= 1e-15 && d2 <= 1e-15) ? std::max(1e-6, double(h0) * 1e-3)
                                                 : std::pow(0.01 / std::max(d1, d2), 1.0 / double(order));
  return double(std::min(T(100) * h0, T(std::abs(h1))));
}

struct AdaptiveStats {
  int status = kSolved;
  double t_status = 0;  // the time the solve stopped at (status != kSolved)
  int64_t nfe = 0, steps = 0, accepted = 0, rejected = 0;
  std::vector<double> step_ts, step_sizes;  // accepted steps: start time and signed size (t units)
};

// Large scratch buffers (the saved activations of training steps, the kept steps of adaptive solves) come from one
// process-wide cache (pool.cpp): a training iteration allocates the same few buffers (megabytes each) every
// iteration, and fresh memory costs a page fault per 4 KiB on first touch (~15% of an iteration; for the kept steps
// as much as not recomputing them saves). A request takes the smallest cached block of at least its size and at
// most twice it; a freed buffer is cached unless that would exceed FASTODE_CPP_POOL_MB (default 1024) MiB, and a
// cached block that sat idle while more than twice the peak bytes lent at once were handed out (a whole working
// set did not reuse it) is freed, so a buffer whose size drifts (a grid over a learned end time) does not leave one
// block per size behind. pool_clear (fastode.cpp.empty_cache()) frees them all. Buffers are 64-byte aligned.
void* pool_take(size_t bytes);
void pool_give(void* p, size_t bytes) noexcept;
size_t pool_clear();  // returns the bytes freed
size_t pool_cached();

template <typename T>
struct StepBufferDeleter {
  int64_t n = 0;
  void operator()(T* p) const noexcept { pool_give(p, size_t(n) * sizeof(T)); }
};
template <typename T>
using StepBuffer = std::unique_ptr<T[], StepBufferDeleter<T>>;
template <typename T>
StepBuffer<T> make_step_buffer(int64_t n) {
  return StepBuffer<T>(static_cast<T*>(pool_take(size_t(n) * sizeof(T))), StepBufferDeleter<T>{n});
}

// What the backward of an adaptive solve needs, recorded by the forward when asked: every accepted step's start (t0,
// dt exactly as passed to cnf_step_forward, its state [z | q] and its first stage [kz | kq], B*(D+NQ) values
// each) and the output's place in the last step (interpolation coordinate x and the step's width in t units).
// With AdaptiveControl::store_budget > 0 (fastode's gradient="direct") it also keeps the first accepted steps' saved
// activations (cnf_step_forward's `save`, within the budget), so that the backward does not recompute those steps:
// the same gradient bitwise, for memory. `saves` owns them; `saved` are the views the backward reads (a caller that
// moves `saves` elsewhere keeps the views valid).
template <typename T>
struct AdaptiveTape {
  std::vector<double> t0, dt;
  std::vector<T> y, k0;
  double x = 0, width = 0;
  std::vector<StepBuffer<T>> saves;
  std::vector<const T*> saved;
  int64_t save_size = 0;  // values per kept step
};

template <typename T>
AdaptiveStats cnf_adaptive_forward(const CnfSpec& spec, const Tableau& tab, const std::vector<double>& c_mid,
                                   const Params<T>& p, double t0, double t1, int64_t B, const T* z0, const T* q0,
                                   const T* e, const AdaptiveControl& ctl, T* zT, T* qT, const Exec& ex,
                                   AdaptiveTape<T>* tape = nullptr);

// The exact gradient of the discrete adaptive solve (a checkpointed discrete adjoint: each step is recomputed from
// its recorded start, one step's working set at a time). Step sizes are constants, the clock is the start time
// plus a constant (fastode.odeint's "direct" semantics). Gradients: gz0, gq0 (overwritten), ge (overwritten,
// Hutchinson probes), the parameters (accumulated), g_anchor (d/d of the start time through every stage time) and
// g_x (d/d of the interpolation coordinate; the caller turns it into the time gradients). Returns the number of
// network evaluations of the recomputation.
template <typename T>
int64_t cnf_adaptive_backward(const CnfSpec& spec, const Tableau& tab, const std::vector<double>& c_mid,
                              const Params<T>& p, const AdaptiveTape<T>& tape, int64_t B, const T* e, const T* gzT,
                              const T* gqT, T* gz0, T* gq0, T* ge, const Grads<T>* grads, double* g_anchor,
                              double* g_x, const Exec& ex);

// Per-tile step control (opt-in; not bit-identical to the batch-global solve): the batch is cut into tiles of
// `rows` rows (1: every row alone) and each tile is solved as its own batch-global problem -- its own step size,
// accept/reject, status, error norm over its rows -- in parallel over ex.nthreads threads (one thread per tile, so
// the result does not depend on the thread count). stats[i] is tile i's; tapes (optional) one per tile.
template <typename T>
std::vector<AdaptiveStats> cnf_adaptive_forward_tiles(const CnfSpec& spec, const Tableau& tab,
                                                      const std::vector<double>& c_mid, const Params<T>& p,
                                                      double t0, double t1, int64_t B, int64_t rows, const T* z0,
                                                      const T* q0, const T* e, const AdaptiveControl& ctl, T* zT,
                                                      T* qT, const Exec& ex,
                                                      std::vector<AdaptiveTape<T>>* tapes = nullptr);

// Backward of cnf_adaptive_forward_tiles: the tiles in parallel, each tile's parameter gradients in its own buffer,
// summed in tile order (deterministic). g_anchor / g_x get one value per tile. Returns the recomputation's NFE.
template <typename T>
int64_t cnf_adaptive_backward_tiles(const CnfSpec& spec, const Tableau& tab, const std::vector<double>& c_mid,
                                    const Params<T>& p, const std::vector<AdaptiveTape<T>>& tapes, int64_t B,
                                    int64_t rows, const T* e, const T* gzT, const T* gqT, T* gz0, T* gq0, T* ge,
                                    const Grads<T>* grads, const std::vector<int64_t>& param_sizes, double* g_anchor,
                                    double* g_x, const Exec& ex);

}  // namespace fastode
