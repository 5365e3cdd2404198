// The sparse convolution's register-tile kernels compiled for the baseline instruction set of the build (SSE2 on x86-64): see sparse_conv_tiles.h.
#define ADAPMTL_TILE_NATIVE_BYTES 16
#include "cpu/sparse_conv_tiles.h"

namespace adapmtl::cpu_tiles {

void run_items_baseline(const Plan<float>& g, int64_t begin, int64_t end, float* scratch) {
  run_items(g, begin, end, scratch);
}

void run_items_baseline(const Plan<double>& g, int64_t begin, int64_t end, double* scratch) {
  run_items(g, begin, end, scratch);
}

}  // namespace adapmtl::cpu_tiles
