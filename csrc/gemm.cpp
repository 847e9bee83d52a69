// The BLAS the core calls and the GEMM switches: state shared by every translation unit.
#include "detail/gemm.h"

namespace fastode {
namespace detail {

namespace {
Blas load_blas() {
  Blas b;
  b.s = reinterpret_cast<sgemm_fn>(dlsym(RTLD_DEFAULT, "sgemm_"));
  b.d = reinterpret_cast<dgemm_fn>(dlsym(RTLD_DEFAULT, "dgemm_"));
  void* lib = nullptr;
  if ((!b.s || !b.d) && std::getenv("FASTODE_BLAS_LIB")) {
    lib = dlopen(std::getenv("FASTODE_BLAS_LIB"), RTLD_NOW | RTLD_GLOBAL);
    if (lib) {
      b.s = reinterpret_cast<sgemm_fn>(dlsym(lib, "sgemm_"));
      b.d = reinterpret_cast<dgemm_fn>(dlsym(lib, "dgemm_"));
    }
  }
  b.set_local = reinterpret_cast<set_threads_fn>(dlsym(lib ? lib : RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  const char* force = std::getenv("FASTODE_GEMM");
  b.use = b.s && b.d && !(force && std::string(force) == "fallback");
  return b;
}
}  // namespace

Blas& blas() {
  static Blas b = load_blas();
  return b;
}

bool g_use_blas_override_set = false;
bool g_use_blas = true;
bool g_use_mk = true;

}  // namespace detail

std::string gemm_backend() {
  std::string b = use_blas() ? "blas" : "fallback";
  return use_microkernels() ? "avx512+" + b : b;
}

std::string set_gemm_backend(const std::string& name) {
  if (name == "auto") {
    g_use_blas_override_set = false;
    g_use_mk = true;
  } else if (name == "blas") {
    if (!blas().use) throw std::runtime_error("fastode: no BLAS (sgemm_/dgemm_) found in this process");
    g_use_blas_override_set = true;
    g_use_blas = true;
    g_use_mk = false;
  } else if (name == "fallback") {
    g_use_blas_override_set = true;
    g_use_blas = false;
    g_use_mk = false;
  } else {
    throw std::invalid_argument("fastode: gemm backend must be 'auto', 'blas' or 'fallback'");
  }
  return gemm_backend();
}

}  // namespace fastode
