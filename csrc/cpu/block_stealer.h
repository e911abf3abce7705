// Blocks of one step's work shared out over the threads of a parallel region:
// thread t starts on its own contiguous range of blocks, front first (one
// stream, as a static split reads); a thread whose range runs out takes blocks
// from the back of another's. A decode step's projections stream their
// weights from DRAM, which serves two threads unevenly: with an even static
// split one thread's half of a 1 MB projection took up to 8 us longer than
// the other's, and the faster thread waited that long at the barrier
// (memkernels_reader_cold, step by step; docs/log.md, kernels v47).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

namespace memkernels::cpu {

class BlockStealer {
 public:
  // n blocks over `threads` ranges of near-equal size. Call before the region
  // (or a barrier) that its threads then call next() in; n < 2^32.
  void reset(int64_t n, int64_t threads) {
    if (threads > capacity_) {
      ranges_.reset(new Range[threads]);
      capacity_ = threads;
    }
    threads_ = threads;
    for (int64_t t = 0; t < threads; ++t) {
      const uint64_t lo = uint64_t(n * t / threads), hi = uint64_t(n * (t + 1) / threads);
      ranges_[t].lo_hi.store(lo << 32 | hi, std::memory_order_relaxed);
    }
  }

  // The next block for thread t: from the front of its own range, else from
  // the back of another's; -1 when every range is empty. A region that runs
  // fewer threads than reset() was given still does every block (the missing
  // threads' ranges are taken from the back).
  int64_t next(int64_t t) {
    int64_t b = take(t % threads_, true);
    for (int64_t s = 1; b < 0 && s < threads_; ++s) b = take((t + s) % threads_, false);
    return b;
  }

 private:
  struct alignas(64) Range {  // a line each: the owner's claims do not bounce the others'
    std::atomic<uint64_t> lo_hi{0};  // [lo, hi) as lo << 32 | hi
  };

  int64_t take(int64_t s, bool front) {
    std::atomic<uint64_t>& range = ranges_[s].lo_hi;
    uint64_t cur = range.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = cur >> 32, hi = cur & 0xffffffffu;
      if (lo >= hi) return -1;
      const uint64_t want = front ? (lo + 1) << 32 | hi : lo << 32 | (hi - 1);
      // relaxed: each block's output is published by the barrier after the step
      if (range.compare_exchange_weak(cur, want, std::memory_order_relaxed))
        return int64_t(front ? lo : hi - 1);
    }
  }

  std::unique_ptr<Range[]> ranges_;
  int64_t threads_ = 0, capacity_ = 0;
};

}  // namespace memkernels::cpu
