// Tiles of the batch, grouped into a fixed number of chunks, run over OpenMP threads deterministically.
#pragma once

#include "detail/gemm.h"

namespace fastode {
namespace {  // internal linkage: each translation unit has its own copy (see platform.h)

// ===================================================================================================
// Parallel driver over chunks of tiles. Chunk boundaries depend only on the number of tiles.
constexpr int kMaxChunks = 16;

struct Tiling {
  int64_t B, tile, ntiles;
  int nchunks;
  Tiling(int64_t B_, int64_t tile_) : B(B_), tile(std::max<int64_t>(tile_, 1)) {
    ntiles = (B + tile - 1) / tile;
    nchunks = int(std::min<int64_t>(ntiles, kMaxChunks));
  }
  int64_t chunk_begin(int c) const { return ntiles * c / nchunks; }
  int64_t rows(int64_t t) const { return std::min(tile, B - t * tile); }
};

template <typename F>
void run_chunks(const Tiling& tl, const Exec& ex, F&& fn) {
  if (tl.nchunks == 0) return;
#ifdef _OPENMP
  if (ex.nthreads > 1 && tl.nchunks > 1) {
    std::exception_ptr err;
    std::mutex mu;
#pragma omp parallel num_threads(ex.nthreads)
    {
      BlasThreadGuard guard;
      int nt = omp_get_num_threads(), tid = omp_get_thread_num();
      for (int c = tid; c < tl.nchunks; c += nt) {
        try {
          fn(c, tl.chunk_begin(c), tl.chunk_begin(c + 1));
        } catch (...) {
          std::lock_guard<std::mutex> lk(mu);
          if (!err) err = std::current_exception();
        }
      }
    }
    if (err) std::rethrow_exception(err);
    return;
  }
#endif
  BlasThreadGuard guard;
  for (int c = 0; c < tl.nchunks; ++c) fn(c, tl.chunk_begin(c), tl.chunk_begin(c + 1));
}

}  // namespace
}  // namespace fastode
