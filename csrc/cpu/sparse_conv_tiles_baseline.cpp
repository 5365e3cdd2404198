// The sparse convolution's register-tile kernels compiled for the build's own instruction set (SSE2 on x86-64):
// see sparse_conv_tiles.h.
#define ADAPMTL_TILE_NATIVE_BYTES 16
#include "cpu/sparse_conv_tiles.h"

namespace adapmtl::cpu_tiles {
ADAPMTL_TILES_ENTRIES(run_items_baseline, )
}  // namespace adapmtl::cpu_tiles
