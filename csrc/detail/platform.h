// Internal headers of the C++ core (csrc/detail/): shared includes and the multi-versioning macro.
//
// Layout: the torch-free core is split by concern into translation units (activations, gemm, mlp, rk,
// cnf_step, cnf_grid; see csrc/README.md), which share the templates of csrc/detail/*.h. Those templates live in
// an anonymous namespace: GCC's target_clones creates an ifunc resolver per function, which is only safe for
// functions with internal linkage, so each translation unit compiles its own copies of what it uses. State
// that must be shared by all of them (the BLAS found at load time and the GEMM switches) lives in gemm.cpp.
//
// Performance notes
// Performance notes
// - Batches are cut into tiles of `Exec::tile` rows. A tile runs the whole MLP forward, the probe VJPs and
//   (in a fused RK step) every stage before the next tile starts, so its intermediates stay in L1/L2.
// - float32 with tanh / identity on an AVX-512 CPU (checked at run time): the wide layers use the
//   micro-kernels of microkernels.h (6 x 64 register blocks) with the bias/activation/derivative passes
//   fused into their epilogues. Otherwise the GEMMs go to the process's BLAS (MKL inside libtorch_cpu)
//   through sgemm_/dgemm_, limited to one thread per call (MKL_Set_Num_Threads_Local) so that results do
//   not depend on the thread count; GEMMs with a dimension <= kThin (the D-wide first and last layers) use
//   plain vectorised loops. Parallelism is OpenMP over chunks of tiles.
// - Element-wise epilogues are compiled three times (x86-64-v4 / v3 / baseline) with GCC target_clones
//   and picked at load time by the CPU, so one binary is portable and still uses AVX2/AVX-512.
// - float32 tanh uses a rational approximation (|error| <= 3.5e-7 absolute, <= 6 ulp) that vectorises;
//   float64 uses std::tanh and the other activations use libm (correct first, not the benchmark path).
#pragma once

#include "fastode.h"

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FASTODE_NO_CLONES)
#define FASTODE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTODE_CLONES
#endif

#include "microkernels.h"
