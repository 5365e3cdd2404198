// Recycled storage for the CPU kernels' large outputs (w_hat and dL/dw of the soft threshold, sparse conv
// outputs).
//
// PyTorch's CPU allocator is malloc, and glibc serves a request of more than 32 MiB with a fresh mmap, so
// every such tensor is faulted in, page by page, and zeroed by the kernel before the kernel writes it: a
// 23M-element w_hat cost 1.8x its memory floor that way (measured, 2-core EPYC), and training allocates the
// same sizes every step. Here a freed buffer goes back to a pool keyed by its size (rounded up to 2 MiB,
// huge-page hinted) and the next request of that size takes it, already faulted in. The pool holds at most
// ADAPMTL_CPU_BUFFER_POOL_MB megabytes of free buffers (default 1024; 0 turns it off), beyond which freed
// buffers go back to the system. Buffers are handed out uninitialised, like at::empty.
#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>

#include "cpu/env.h"
#include "cpu/huge_pages.h"

namespace adapmtl {

class BufferPool {
 public:
  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();  // never destroyed: tensors may be freed after static teardown
    return *pool;
  }

  // Requests below this size go to at::empty: malloc reuses small blocks without faulting anyway.
  static constexpr int64_t kMinBytes = int64_t(4) << 20;

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (const int64_t s : sizes) numel *= s;  // the caller's sizes come from an existing tensor: no overflow
    const int64_t bytes = numel * int64_t(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
    if (limit_ == 0 || bytes < kMinBytes) return at::empty(sizes, options);
    const size_t block = size_t((bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes);
    void* data = take(block);
    if (data == nullptr) {
      data = std::aligned_alloc(size_t(kHugePageBytes), block);
      TORCH_CHECK(data != nullptr, "adapmtl: out of memory allocating ", block, " bytes");
      hint_huge_pages(data, block);
    }
    return at::from_blob(data, sizes, [block](void* p) { BufferPool::instance().give_back(p, block); }, options);
  }

 private:
  // A bad ADAPMTL_CPU_BUFFER_POOL_MB throws here, at the first large output: construction is retried, so every
  // call fails the same way until it is fixed.
  BufferPool() : limit_(env_int("ADAPMTL_CPU_BUFFER_POOL_MB", 1024, 0, int64_t(1) << 30) << 20) {}

  void* take(size_t block) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = free_.find(block);
    if (it == free_.end()) return nullptr;
    void* data = it->second;
    free_.erase(it);
    held_ -= int64_t(block);
    return data;
  }

  void give_back(void* data, size_t block) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + int64_t(block) <= limit_) {
        free_.emplace(block, data);
        held_ += int64_t(block);
        return;
      }
    }
    std::free(data);
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // block size -> free buffers of that size
  int64_t held_ = 0;                   // bytes in free_
  int64_t limit_ = 0;
};

// at::empty for the CPU kernels' outputs, through the pool above.
inline at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return BufferPool::instance().empty(sizes, options);
}

}  // namespace adapmtl
