// The process-wide cache of large scratch buffers (see fastode.h: pool_take).
//
// Policy (why each rule):
// * best fit up to twice the request: a training iteration asks for the same sizes again, but a fixed-grid solve
//   over a learned end time asks for a buffer whose size follows the step count; a slightly larger cached block
//   (its pages already resident) serves it without new memory, a much larger one would pin memory for a small use;
// * blocks idle for more than twice the peak bytes lent at once are freed: a block that one whole working set of
//   requests (an iteration) did not reuse is stale -- typically the previous size of a buffer whose size grew -- and
//   caching every size ever seen made a learned-T training run climb to the cap (bench/results/soak.md). The peak
//   decays by a quarter of each request's bytes (never below what is lent now), so one early large solve does not
//   widen the horizon for good; in a steady loop it stays at least 0.8x the iteration's working set;
// * at most FASTODE_CPP_POOL_MB (default 1024) MiB cached, a hard limit on top.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

#include "fastode.h"

namespace fastode {
namespace {

struct CachedBlock {
  void* p;
  uint64_t given_at;  // the pool's clock (bytes lent so far) when the block came back
};

struct BufferPool {
  std::mutex mu;
  std::multimap<size_t, CachedBlock> free_blocks;  // by real size: best fit
  std::unordered_map<void*, size_t> lent;          // blocks handed out -> real size (a reused block may be larger)
  size_t cached = 0, lent_bytes = 0, peak_lent = 0;
  uint64_t clock = 0;  // bytes handed out so far
  size_t cap() {
    static size_t c = [] {
      const char* v = std::getenv("FASTODE_CPP_POOL_MB");
      return size_t(v ? std::atoll(v) : 1024) << 20;
    }();
    return c;
  }
  void free_stale() {  // caller holds mu
    const uint64_t horizon = 2 * uint64_t(peak_lent);
    for (auto it = free_blocks.begin(); it != free_blocks.end();) {
      if (clock - it->second.given_at > horizon) {
        std::free(it->second.p);
        cached -= it->first;
        it = free_blocks.erase(it);
      } else {
        ++it;
      }
    }
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
  std::lock_guard<std::mutex> lk(pl.mu);
  pl.clock += bytes;
  pl.peak_lent = std::max(pl.lent_bytes, pl.peak_lent - std::min(pl.peak_lent, bytes / 4));
  pl.free_stale();
  void* p = nullptr;
  size_t size = bytes;
  auto it = pl.free_blocks.lower_bound(bytes);
  if (it != pl.free_blocks.end() && it->first <= 2 * bytes) {
    p = it->second.p;
    size = it->first;
    pl.cached -= size;
    pl.free_blocks.erase(it);
  } else {
    p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
  }
  pl.lent[p] = size;
  pl.lent_bytes += size;
  pl.peak_lent = std::max(pl.peak_lent, pl.lent_bytes);
  return p;
}

void pool_give(void* p, size_t bytes) noexcept {
  if (!p) return;
  BufferPool& pl = pool();
  std::lock_guard<std::mutex> lk(pl.mu);
  size_t size = rounded(bytes);
  auto it = pl.lent.find(p);
  if (it != pl.lent.end()) {
    size = it->second;
    pl.lent.erase(it);
    pl.lent_bytes -= size;
  }
  if (pl.cached + size > pl.cap()) {
    std::free(p);
    return;
  }
  pl.free_blocks.emplace(size, CachedBlock{p, pl.clock});
  pl.cached += size;
}

size_t pool_clear() {
  BufferPool& pl = pool();
  std::lock_guard<std::mutex> lk(pl.mu);
  const size_t n = pl.cached;
  for (auto& kv : pl.free_blocks) std::free(kv.second.p);
  pl.free_blocks.clear();
  pl.cached = 0;
  pl.peak_lent = pl.lent_bytes;  // a fresh start: the working set is measured again
  return n;
}

size_t pool_cached() {
  BufferPool& pl = pool();
  std::lock_guard<std::mutex> lk(pl.mu);
  return pl.cached;
}

}  // namespace fastode
