// The sparse convolution's register-tile kernels compiled for AVX-512 (AVX512F): see sparse_conv_tiles.h.
#include "cpu/sparse_conv_tiles.h"

#ifdef ADAPMTL_TILES_X86
namespace adapmtl::cpu_tiles {

ADAPMTL_TARGET_AVX512 void run_items_avx512(const Plan<float>& g, int64_t begin, int64_t end, float* scratch) {
  run_items(g, begin, end, scratch);
}

ADAPMTL_TARGET_AVX512 void run_items_avx512(const Plan<double>& g, int64_t begin, int64_t end, double* scratch) {
  run_items(g, begin, end, scratch);
}

}  // namespace adapmtl::cpu_tiles
#endif
