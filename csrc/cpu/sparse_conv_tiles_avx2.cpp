// The sparse convolution's register-tile kernels compiled for AVX2 with FMA: see sparse_conv_tiles.h.
#define ADAPMTL_TILE_NATIVE_BYTES 32
#include "cpu/sparse_conv_tiles.h"

#ifdef ADAPMTL_TILES_X86
namespace adapmtl::cpu_tiles {

ADAPMTL_TARGET_AVX2 void run_items_avx2(const Plan<float>& g, int64_t begin, int64_t end, float* scratch) {
  run_items(g, begin, end, scratch);
}

ADAPMTL_TARGET_AVX2 void run_items_avx2(const Plan<double>& g, int64_t begin, int64_t end, double* scratch) {
  run_items(g, begin, end, scratch);
}

}  // namespace adapmtl::cpu_tiles
#endif
