// Host tensors that a CPU training step makes and drops at the same size every
// step (the write's saved probabilities: 8x the bank's bytes at T = 512, Dh 64),
// on buffers kept for reuse. A fresh buffer of that size is a fresh mapping
// (above glibc's mmap threshold), and its first touch takes a page fault per
// 4 KiB page: more time than the backward product the buffer saves
// (docs/design.md, "The write keeps its probabilities"). These are mapped on
// 2 MiB pages where the kernel allows it (MADV_HUGEPAGE), and go back to the
// pool when the last tensor viewing one dies: at most kMaxCachedBuffers,
// kMaxCachedBytes in all, stay mapped; cpu_empty_cache() unmaps them.
#pragma once
#include <torch/extension.h>

#include <sys/mman.h>

#include <cstddef>
#include <mutex>
#include <vector>

#include "common.h"

namespace memkernels::binding {

class HostBufferPool {
 public:
  static constexpr size_t kPage = size_t(2) << 20;
  static constexpr size_t kMaxCachedBuffers = 4;
  static constexpr size_t kMaxCachedBytes = size_t(2) << 30;

  // Never destroyed: a tensor may outlive static destruction at exit.
  static HostBufferPool& instance() {
    static auto* pool = new HostBufferPool();
    return *pool;
  }

  // An uninitialized contiguous CPU tensor on a pooled buffer.
  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
    size_t bytes = c10::elementSize(dtype);
    for (const int64_t s : sizes) bytes *= static_cast<size_t>(s);
    if (bytes == 0) return at::empty(sizes, at::TensorOptions().dtype(dtype));
    const size_t mapped = (bytes + kPage - 1) / kPage * kPage;
    void* data = take(mapped);
    return torch::from_blob(
        data, sizes, [mapped](void* p) { instance().give_back(p, mapped); },
        at::TensorOptions().dtype(dtype).device(at::kCPU));
  }

  // Unmaps every cached buffer; returns the bytes released.
  size_t empty_cache() {
    std::vector<Buffer> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      drop.swap(free_);
      cached_ = 0;
    }
    size_t bytes = 0;
    for (const Buffer& b : drop) {
      munmap(b.data, b.bytes);
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
    void* data;
    size_t bytes;
  };

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].bytes != bytes) continue;
        void* data = free_[i].data;
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
        cached_ -= bytes;
        return data;
      }
    }
    void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) {
      empty_cache();  // the cached buffers of other sizes may be what is missing
      data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    MK_CHECK(data != MAP_FAILED, "memkernels: out of memory mapping a ", bytes,
             "-byte host buffer");
#ifdef MADV_HUGEPAGE
    madvise(data, bytes, MADV_HUGEPAGE);  // advice only: 4 KiB pages if refused
#endif
    return data;
  }

  void give_back(void* data, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (free_.size() < kMaxCachedBuffers && cached_ + bytes <= kMaxCachedBytes) {
        free_.push_back({data, bytes});
        cached_ += bytes;
        return;
      }
    }
    munmap(data, bytes);
  }

  std::mutex mutex_;
  std::vector<Buffer> free_;
  size_t cached_ = 0;
};

}  // namespace memkernels::binding
