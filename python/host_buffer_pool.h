// Host tensors that a CPU training step makes and drops at the same sizes every
// step: the write's saved probabilities (8x the bank's bytes at T = 512, Dh 64)
// and the read's and write's outputs and gradients, on buffers kept for reuse.
// PyTorch's CPU allocator caches nothing: glibc hands a freed block over its
// mmap threshold back to the OS, and trims its heap's top when a step frees
// tens of MB, so the next step's outputs are fresh pages again, a fault per
// 4 KiB page on first touch (1-19 thousand a write's training step at the
// bench's shape, 2-30 ms of its ~140; docs/performance.md, "Training on the
// CPU"). From kMinPooledBytes up, buffers are mapped at 2 MiB boundaries on
// 2 MiB pages where the kernel allows it (MADV_HUGEPAGE), and go back to the
// pool when the last tensor viewing one dies: at most kMaxCachedBuffers,
// kMaxCachedBytes in all, stay mapped (the oldest unmapped first);
// cpu_empty_cache() unmaps them. Smaller ones are plain CPU tensors, made by
// at::detail::empty_cpu, not through the dispatcher: at a decode step, whose
// other weights have evicted the dispatcher's tables, at::empty cost ~4-13 us
// a call more (docs/log.md, "The output's allocation, cold").
// Like at::empty, a buffer's contents are undefined: every caller overwrites
// all of it. Its storage cannot grow (resize_ to more elements raises).
// fork(): the pool's lock is held across it (pthread_atfork), so a child
// never inherits it locked by a thread that does not exist there (a tensor
// freed on another thread at that moment); the child keeps the cached
// buffers, copy-on-write like the rest of the process. Nothing allocates
// while holding the lock, so a fork handler that takes the allocator's lock
// cannot wait on it in turn.
#pragma once
#include <ATen/EmptyTensor.h>
#include <torch/extension.h>

#include <pthread.h>
#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "common.h"

namespace memkernels::binding {

class HostBufferPool {
 public:
  static constexpr size_t kPage = size_t(2) << 20;
  // Below this, a tensor's pages are few and a 2 MiB-rounded mapping would
  // waste up to half of itself.
  static constexpr size_t kMinPooledBytes = size_t(4) << 20;
  // A write's training step frees up to 7 (P, its two outputs, four
  // gradients): room for a model of several memory layers, whose steps
  // would otherwise unmap and map again the oldest each step. The bytes'
  // cap bounds the pool; the count only bounds its search.
  static constexpr size_t kMaxCachedBuffers = 64;
  static constexpr size_t kMaxCachedBytes = size_t(2) << 30;

  // Never destroyed: a tensor may outlive static destruction at exit.
  static HostBufferPool& instance() {
    static auto* pool = new HostBufferPool();
    return *pool;
  }

  // An uninitialized contiguous CPU tensor, 64-byte aligned; on a pooled
  // buffer from kMinPooledBytes up.
  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
    size_t bytes = c10::elementSize(dtype);
    for (const int64_t s : sizes) bytes *= static_cast<size_t>(s);
    const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
    if (bytes < kMinPooledBytes) return at::Tensor(at::detail::empty_cpu(sizes, dtype));
    const Buffer b = take((bytes + kPage - 1) / kPage * kPage);
    return torch::from_blob(
        b.data, sizes, [b](void*) { instance().give_back(b); }, options);
  }

  // Unmaps every cached buffer; returns the bytes released.
  size_t empty_cache() {
    std::vector<Buffer> drop, fresh;
    fresh.reserve(kMaxCachedBuffers + 1);  // allocated outside the lock (see fork() above)
    {
      std::lock_guard<std::mutex> lock(mutex_);
      drop.swap(free_);
      free_.swap(fresh);
      cached_ = 0;
    }
    size_t bytes = 0;
    for (const Buffer& b : drop) {
      unmap(b);
      bytes += b.bytes;
    }
    return bytes;
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  struct Buffer {
    void* data;    // kPage-aligned
    size_t bytes;  // a multiple of kPage
  };

  // Reserved up front, so that giving a buffer back (in a tensor's deleter)
  // never allocates.
  HostBufferPool() {
    free_.reserve(kMaxCachedBuffers + 1);
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
  }

  // The smallest cached buffer that holds `bytes` and is at most twice that,
  // else a new mapping.
  Buffer take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i)
        if (free_[i].bytes >= bytes && free_[i].bytes <= 2 * bytes &&
            (best == free_.size() || free_[i].bytes < free_[best].bytes))
          best = i;
      if (best < free_.size()) {
        const Buffer b = free_[best];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        cached_ -= b.bytes;
        return b;
      }
    }
    void* data = map_aligned(bytes);
    if (data == nullptr) {
      empty_cache();  // the cached buffers of other sizes may be what is missing
      data = map_aligned(bytes);
    }
    MK_CHECK(data != nullptr, "memkernels: out of memory mapping a ", bytes, "-byte host buffer");
    return {data, bytes};
  }

  // A mapping of `bytes` at a kPage boundary, so that all of it can take
  // 2 MiB pages (MADV_HUGEPAGE: advice, 4 KiB pages where refused).
  static void* map_aligned(size_t bytes) {
    void* raw = mmap(nullptr, bytes + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + kPage - 1) / kPage * kPage;
    if (aligned > start) munmap(raw, aligned - start);
    const size_t tail = kPage - (aligned - start);
    if (tail > 0) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
    void* data = reinterpret_cast<void*>(aligned);
#ifdef MADV_HUGEPAGE
    madvise(data, bytes, MADV_HUGEPAGE);
#endif
    return data;
  }

  static void unmap(const Buffer& b) { munmap(b.data, b.bytes); }

  // Cached for reuse, the least recently returned buffer unmapped first when
  // the pool is full. Runs in a tensor's deleter: allocates nothing.
  void give_back(const Buffer& b) {
    Buffer drop[kMaxCachedBuffers + 1];
    size_t dropped = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (b.bytes > kMaxCachedBytes) {
        drop[dropped++] = b;
      } else {
        free_.push_back(b);  // within the capacity reserved: no allocation
        cached_ += b.bytes;
        while (free_.size() > kMaxCachedBuffers || cached_ > kMaxCachedBytes) {
          drop[dropped++] = free_.front();
          cached_ -= free_.front().bytes;
          free_.erase(free_.begin());
        }
      }
    }
    for (size_t i = 0; i < dropped; ++i) unmap(drop[i]);
  }

  std::mutex mutex_;
  std::vector<Buffer> free_;  // oldest first
  size_t cached_ = 0;
};

}  // namespace memkernels::binding
