// The sparse convolution's register-tile kernels compiled for AVX2 with FMA: see sparse_conv_tiles.h.
#define ADAPMTL_TILE_NATIVE_BYTES 32
#include "cpu/sparse_conv_tiles.h"

#ifdef ADAPMTL_TILES_X86
namespace adapmtl::cpu_tiles {
ADAPMTL_TILES_ENTRIES(run_items_avx2, ADAPMTL_TARGET_AVX2)
}  // namespace adapmtl::cpu_tiles
#endif
