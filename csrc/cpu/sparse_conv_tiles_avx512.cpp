// The sparse convolution's register-tile kernels compiled for AVX-512 (AVX512F): see sparse_conv_tiles.h.
#include "cpu/sparse_conv_tiles.h"

#ifdef ADAPMTL_TILES_X86
namespace adapmtl::cpu_tiles {
ADAPMTL_TILES_ENTRIES(run_items_avx512, ADAPMTL_TARGET_AVX512)
}  // namespace adapmtl::cpu_tiles
#endif
