// Transparent-huge-page hint for large CPU buffers, shared by the CPU kernels.
#pragma once
#include <cstddef>
#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace adapmtl {

constexpr int64_t kHugePageBytes = int64_t(1) << 21;

// Asks for 2 MiB pages on the 2 MiB-aligned interior of [data, data + bytes), before the first touch.
// Fresh large buffers come from mmap, and faulting them in 4 KiB pages can cost more than the kernel
// (measured: 23M floats, 24 ms to fault vs 4 ms to write); kernels that roam over megabytes also miss
// the TLB less. A hint only: small buffers are skipped and errors (THP off, non-Linux) are ignored.
inline void hint_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(kHugePageBytes);
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

}  // namespace adapmtl
