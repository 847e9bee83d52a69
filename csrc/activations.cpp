// Activation names and the float32 activations as the kernels compute them (for the unit tests).
#include "detail/activations.h"

namespace fastode {

int act_from_name(const std::string& name) {
  if (name == "tanh") return kTanh;
  if (name == "softplus") return kSoftplus;
  if (name == "elu") return kElu;
  if (name == "swish") return kSwish;
  if (name == "identity") return kIdentity;
  throw std::invalid_argument("fastode: unknown activation '" + name +
                              "'; expected one of tanh, softplus, elu, swish, identity");
}

// ===================================================================================================
void activation_f32(int act, int64_t n, const float* a, float* h, float* d1, float* d2) {
  auto run = [&](auto af) {
    using A = decltype(af);
    for (int64_t i = 0; i < n; ++i) {
      h[i] = A::f(a[i]);
      d1[i] = A::d1(a[i], h[i]);
      d2[i] = A::d2(a[i], h[i]);
    }
  };
  switch (act) {
    case kTanh: return run(ActF<kTanh, float>{});
    case kSoftplus: return run(ActF<kSoftplus, float>{});
    case kElu: return run(ActF<kElu, float>{});
    case kSwish: return run(ActF<kSwish, float>{});
    case kIdentity: return run(ActF<kIdentity, float>{});
    default: throw std::invalid_argument("fastode: unknown activation code");
  }
}

}  // namespace fastode
