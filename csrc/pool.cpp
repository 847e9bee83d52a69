// The process-wide cache of large scratch buffers (see fastode.h: pool_take).
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

#include "fastode.h"

namespace fastode {
namespace {

struct BufferPool {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // exact sizes: a training loop asks for the same ones every iteration
  size_t cached = 0;
  size_t cap() {
    static size_t c = [] {
      const char* v = std::getenv("FASTODE_CPP_POOL_MB");
      return size_t(v ? std::atoll(v) : 1024) << 20;
    }();
    return c;
  }
};

// Never destroyed: buffers held by Python objects may be freed after static destructors ran (interpreter exit).
BufferPool& pool() {
  static BufferPool* p = new BufferPool();
  return *p;
}

size_t rounded(size_t bytes) { return (std::max<size_t>(bytes, 1) + 63) / 64 * 64; }

}  // namespace

void* pool_take(size_t bytes) {
  bytes = rounded(bytes);
  BufferPool& pl = pool();
  {
    std::lock_guard<std::mutex> lk(pl.mu);
    auto it = pl.free_blocks.find(bytes);
    if (it != pl.free_blocks.end()) {
      void* p = it->second;
      pl.free_blocks.erase(it);
      pl.cached -= bytes;
      return p;
    }
  }
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return p;
}

void pool_give(void* p, size_t bytes) noexcept {
  if (!p) return;
  bytes = rounded(bytes);
  BufferPool& pl = pool();
  {
    std::lock_guard<std::mutex> lk(pl.mu);
    if (pl.cached + bytes <= pl.cap()) {
      pl.free_blocks.emplace(bytes, p);
      pl.cached += bytes;
      return;
    }
  }
  std::free(p);
}

size_t pool_clear() {
  BufferPool& pl = pool();
  std::lock_guard<std::mutex> lk(pl.mu);
  const size_t n = pl.cached;
  for (auto& kv : pl.free_blocks) std::free(kv.second);
  pl.free_blocks.clear();
  pl.cached = 0;
  return n;
}

size_t pool_cached() {
  BufferPool& pl = pool();
  std::lock_guard<std::mutex> lk(pl.mu);
  return pl.cached;
}

}  // namespace fastode
