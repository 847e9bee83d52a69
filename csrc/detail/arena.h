// Scratch memory of the core: a thread-local arena and a bump allocator that measures, then carves.
#pragma once

#include "detail/platform.h"

namespace fastode {
namespace {  // internal linkage: each translation unit has its own copy (see platform.h)

// ===================================================================================================
// Thread-local scratch arena (grows, never shrinks; 64-byte aligned).
struct Arena {
  void* p = nullptr;
  size_t n = 0;
  ~Arena() { std::free(p); }
  void* get(size_t bytes) {
    if (bytes > n) {
      std::free(p);
      n = (bytes + 4095) / 4096 * 4096;
      p = std::aligned_alloc(64, n);
      if (!p) {
        n = 0;
        throw std::bad_alloc();
      }
    }
    return p;
  }
};
thread_local Arena t_arena;

// Bump allocator: measure (base == nullptr) or carve.
struct Bump {
  char* base;
  size_t off = 0;
  explicit Bump(void* b) : base(static_cast<char*>(b)) {}
  template <typename T>
  T* take(int64_t n) {
    size_t bytes = (size_t(std::max<int64_t>(n, 0)) * sizeof(T) + 63) / 64 * 64;
    T* r = base ? reinterpret_cast<T*>(base + off) : nullptr;
    off += bytes;
    return r;
  }
};

}  // namespace
}  // namespace fastode
