// What csrc/cpu/soft_threshold_cpu.cpp shows outside its kernels.
#pragma once

#include <cstdint>
#include <utility>

namespace adapmtl {

// (forward, backward) calls of this process whose output took the streaming-store path: lets tests see which
// path ran (the two paths give the same bits, so results alone cannot tell).
std::pair<int64_t, int64_t> soft_threshold_streamed_calls();

}  // namespace adapmtl
