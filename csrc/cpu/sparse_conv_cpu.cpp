// Direct sparse convolution and sparse linear (SpMM) on the CPU over a CSR-packed pruned weight.
//
// Weight format (adapmtl/ops/sparse_weight.py documents it in full): CSR over output channels,
// row_ptr int32 [C_out + 1], col_idx int32 [nnz] = c * KH * KW + kh * KW + kw, values [nnz].
//
// Algorithm (no im2col). Tap (kh, kw) of output pixel (oy, ox) reads padded input row oy * sh + kh * dh,
// column (ox + q) * sw + p with p = (kw * dw) % sw, q = (kw * dw) / sw. The input is copied once into a
// zero-padded buffer P that stores every padded row once per distinct (p, q % L) pair ("copy" u), as
// stride-phase p shifted left by sigma_u = q % L (L = lanes per vector):
//   P[n][c][iy][u][j] = x_padded[n][c][iy][(j + sigma_u) * sw + p_u],  j < Wrow (a whole number of vectors)
// so the pixels one output row needs from a tap are contiguous and start on a vector boundary:
//   out[n][oc][oy][ox..] += v * P[n][c][oy * sh + kh * dh][u(kw)][q - sigma_u + ox..]
// Each non-zero thus becomes one fixed element offset into P, computed once per call, and every load is
// aligned (unaligned 64-byte loads measured ~1.6x slower; the price is up to KW copies of the input). The
// kernel keeps a tile of up to 2 rows x 4 vectors (up to 8 rows of one vector on narrow maps, kTileVectors) of
// output pixels of one output channel in registers,
// streams that channel's non-zeros through it (broadcast value, vector loads at the offset, FMA) and stores
// it. Whole-vector loads past the last output column stay inside the row (those lanes are never stored).
//
// Cache blocking: every non-zero costs one vector load per accumulator, and nothing is reused within an
// output channel, so the input rows a tile reads must stay in cache while the output channels stream past.
// A work item is (image, row pair, column tile, chunk of output channels); inside it the non-zeros are cut
// into blocks, and each block is swept over all output channels of the chunk (the non-zeros of a row are
// grouped into per-block segments once per call), with the partial tiles parked in a per-thread scratch
// between blocks. Two block layouts (choose_layout picks one per call from a cost model):
//   channel-major: a range of input channels, all taps (the order SparseWeight stores; fewer, longer
//                  segments, and the per-call plan is one direct pass);
//   tap-major:     one tap and a range of input channels, so that a tile can skip dead taps.
//
// Dead taps: a tap whose reads for a whole tile fall in the zero padding adds nothing there. Tap-major
// tiles skip its blocks (and, within a tile, the vectors of a tap that read only padding); in both layouts
// a tap dead in every tile is dropped from the plan, and the pack writes only the rows of P that some tile
// reads. Dilated convs have many: ASPP's 3x3 with dilation 24 on a 41x41 map reads padding for 39% of its
// (tap, output row) pairs, and with dilation >= 11 on an 11x11 map every tap but the centre is dead. The
// result is unchanged (those products are all 0 * w), unless a weight is inf or NaN. Outer taps dead at every
// output position go further: the call runs as the smaller kernel they leave, with that much less padding (a
// 3x3 conv with dilation >= the map is the 1x1 in it), so P holds only what the live taps read; the weight's
// columns keep the whole kernel's numbering (ConvShape::tap_of).
//
// sparse_linear is the same kernel on a 1x1 "convolution" whose output row is the batch: x^T [in][B].
//
// Epilogue (sparse_conv2d_fused): a tile about to be stored gets the residual (a tensor of the output's shape)
// added and is clamped to [lo, hi] in registers -- the add and the ReLU / ReLU6 that follow a conv in ResNet and
// MobileNet blocks, without another pass over the output. Same operations in the same order as the unfused
// conv, add and clamp: the same bits; a NaN stays NaN (clamp's select keeps it, as torch.clamp does).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/buffer_pool.h"
#include "cpu/cpu_info.h"
#include "cpu/plan_cache.h"
#include "cpu/sparse_conv_tiles.h"
#include "cpu/sparse_tuning.h"

namespace adapmtl {
namespace {

using namespace cpu_tiles;  // the kernels (sparse_conv_tiles.h); this file plans their calls

// The kernels compiled for torch's CPU capability (cpu_capability()).
template <typename T>
void run_items_for_cpu(const Plan<T>& g, int64_t begin, int64_t end, T* scratch) {
#ifdef ADAPMTL_TILES_X86
  switch (cpu_capability()) {
    case CpuCapability::avx512: return run_items_avx512(g, begin, end, scratch);
    case CpuCapability::avx2: return run_items_avx2(g, begin, end, scratch);
    case CpuCapability::baseline: break;
  }
#endif
  run_items_baseline(g, begin, end, scratch);
}

// The CPU kernels' own rules on top of csrc/common.h's checks: x on the CPU, and row_ptr's contents, which
// they read on the host. The column indices are validated where run_conv reads them (one parallel pass
// instead of a serial one): they come from user code, so a bad index must raise instead of reading out of
// bounds.
void check_cpu_csr(const char* op, const at::Tensor& x, const at::Tensor& row_ptr, int64_t nnz, int64_t rows) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": argument 'x' must be a CPU tensor, got ", x.device());
  auto rp = row_ptr.contiguous();
  const int32_t* r = rp.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(r[0] == 0 && r[rows] == nnz, op, ": argument 'row_ptr' must start at 0 and end at nnz = ", nnz,
                    ", got ", r[0], " and ", r[rows]);
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK_VALUE(r[i] <= r[i + 1], op, ": argument 'row_ptr' must be non-decreasing (row ", i, ")");
  }
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// The packed input buffer is reused between calls on the same thread (up to kMaxCachedBytes): a fresh
// multi-MB allocation costs more in page faults than the copy itself. Larger inputs get a temporary. Both
// start on a 2 MiB boundary with a huge-page hint: the kernel's loads roam over megabytes of P, and with
// 4 KiB pages they miss the TLB (measured: 8% of the kernel time on a 3x3 512->1024 conv).
constexpr int64_t kMaxCachedBytes = int64_t(64) << 20;

at::Tensor workspace(int64_t numel, const at::TensorOptions& options) {
  thread_local at::Tensor cached;
  const int64_t bytes = numel * int64_t(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  const int64_t need = bytes + kHugePageBytes;
  at::Tensor storage;
  if (bytes > kMaxCachedBytes) {
    storage = at::empty({need}, options.dtype(at::kByte));
    hint_huge_pages(storage.data_ptr(), storage.nbytes());
  } else {
    if (!cached.defined() || cached.nbytes() < size_t(need)) {
      cached = at::empty({std::max<int64_t>(need, int64_t(4) << 20)}, options.dtype(at::kByte));
      hint_huge_pages(cached.data_ptr(), cached.nbytes());
    }
    storage = cached;
  }
  const uintptr_t base = reinterpret_cast<uintptr_t>(storage.data_ptr());
  void* aligned = reinterpret_cast<void*>((base + kHugePageBytes - 1) & ~uintptr_t(kHugePageBytes - 1));
  // from_blob's deleter keeps `storage` alive for as long as the view lives.
  return at::from_blob(aligned, {numel}, [storage](void*) mutable { storage.reset(); }, options);
}

// How the non-zeros map onto P: the offset of each kernel tap within a channel, and what the blocking needs.
struct ConvShape {
  int64_t C, taps;
  int64_t plane;                // elements of P per input channel
  int64_t row_step;             // elements of P between consecutive output rows
  std::vector<int64_t> tap;     // [KH * KW] offset of tap (kh, kw) from the channel start
  int64_t rows, cols;           // register tile: output rows x output columns (whole vectors)
  // Geometry of the unpadded input, for the dead-tap test: output (oy, ox) of tap (kh, kw) reads input
  // row oy * sh + kh * dh - ph and column ox * sw + kw * dw - pw.
  int64_t H, W, KH, KW, sh, sw, ph, pw, dh, dw;
  std::vector<uint8_t> row_live;      // [row groups][taps], see Plan
  std::vector<uint8_t> live_vectors;  // [column tiles][taps][2], see Plan
  std::vector<uint8_t> tap_used;      // [taps]: live in some tile; the other taps' non-zeros are dropped
  bool skips = false;                 // some (tap, tile) reads only zero padding and is skipped
  // Block layout (choose_layout): tap-major blocks of cb channels of one tap, whose dead taps tiles skip,
  // or channel-major blocks of cb channels x all taps (fewer, longer segments, and the plan is one
  // direct pass; tiles run every block whole).
  bool tap_major = false;
  int64_t cb = 1;
  int64_t panel = 1;  // output channels per register tile (channel panels: channel-major, rows == 1)
  bool vector = false;  // channel-vector tiles (L channels at up to kVectorPixels pixels of a row; cb == C)
  bool vector_forced = false;  // configured (panel=vector): padded to any fill, not only up to kVectorsMaxFill
  Tuning tuning;      // the configuration this call runs with (sparse_tuning.h)
  // The weight's columns are c * full_taps + (its kernel's tap); tap_of maps such a tap to this kernel's tap, or
  // -1 for an outer tap trimmed away because it reads only padding (conv2d_cpu). Untrimmed: the identity.
  int64_t full_taps = 0;
  std::vector<int32_t> tap_of;
};

// Channels per block (of one tap): as many as keep a work item's input within tuning.l1_budget bytes, but
// at least enough that a row segment averages tuning.min_segment non-zeros, else parking the tile between
// blocks costs more than the misses it saves. Measured on the ResNet-34 head convs (2-core EPYC, AVX-512,
// 32 KiB L1d): the second rule wins at 90% sparsity (an L2-sized working set); no blocking at all was
// 10-25% slower, L1-sized blocks with short segments 20-40% slower. Other machines: the autotuner.
int64_t channel_block(const ConvShape& s, int64_t nnz, int64_t OC, int64_t element_size, int64_t taps_per_block) {
  const int64_t tile_bytes = s.rows * s.cols * element_size * taps_per_block;  // read per channel of a block
  const int64_t fit = std::max<int64_t>(1, s.tuning.l1_budget / std::max<int64_t>(1, tile_bytes));
  const double nnz_per_channel =
      double(nnz) / double(std::max<int64_t>(1, OC)) / double(s.C * s.taps) * double(taps_per_block);
  const int64_t dense_enough = nnz_per_channel > 0 ? int64_t(s.tuning.min_segment / nnz_per_channel) + 1 : s.C;
  return std::min(s.C, std::max(fit, dense_enough));
}

// Vectors of L columns in column tile i of an OW-wide output cut into tiles of `cols` columns.
inline int64_t tile_vectors(int64_t i, int64_t cols, int64_t OW, int64_t L) {
  return (std::min(cols, OW - i * cols) + L - 1) / L;
}

// Whether input index o * stride + k * dilation - pad of output position o lands in [0, size).
inline bool reads_input(int64_t o, int64_t k, int64_t size, int64_t stride, int64_t pad, int64_t dilation) {
  const int64_t at = o * stride + k * dilation - pad;
  return at >= 0 && at < size;
}

// How many kernel taps on each side of one dimension read only zero padding at every one of the `out` output
// positions (as adapmtl/ops/sparse_conv.py's dead_tap_margin): a kernel without them and with dilation * margin
// less padding gives the same output. At least one tap stays; the padding never goes negative.
int64_t dead_tap_margin(int64_t size, int64_t kernel, int64_t out, int64_t stride, int64_t pad, int64_t dilation) {
  const auto live = [&](int64_t tap) {
    for (int64_t o = 0; o < out; ++o)
      if (reads_input(o, tap, size, stride, pad, dilation)) return true;
    return false;
  };
  int64_t m = 0;
  while (2 * (m + 1) < kernel && pad - (m + 1) * dilation >= 0 && !live(m) && !live(kernel - 1 - m)) ++m;
  return m;
}

// Fills s.row_live, s.live_vectors and s.tap_used for an OH x OW output (geometry, rows and cols set).
//   row_live[group][t]: tap t = (kh, kw) reads a real input row for some output row of the group;
//   live_vectors[tile][t] = [lo, hi): the tile's vectors in which tap t reads a real input column (one
//   tap's columns form one run, so its live vectors do too); lo == hi when none.
void find_live_taps(ConvShape& s, int64_t OH, int64_t OW, int64_t L) {
  const int64_t groups = (OH + s.rows - 1) / s.rows, tiles = (OW + s.cols - 1) / s.cols, taps = s.KH * s.KW;
  s.row_live.assign(groups * taps, 0);
  s.live_vectors.assign(tiles * taps * 2, 0);
  s.tap_used.assign(taps, 0);
  std::vector<uint8_t> any_row(taps, 0), any_col(taps, 0);
  for (int64_t i = 0; i < groups; ++i) {
    for (int64_t t = 0; t < taps; ++t) {
      for (int64_t oy = i * s.rows; oy < std::min(OH, (i + 1) * s.rows); ++oy)
        s.row_live[i * taps + t] |= reads_input(oy, t / s.KW, s.H, s.sh, s.ph, s.dh);
      any_row[t] |= s.row_live[i * taps + t];
    }
  }
  for (int64_t i = 0; i < tiles; ++i) {
    for (int64_t t = 0; t < taps; ++t) {
      int64_t lo = -1, hi = -1;
      for (int64_t ox = i * s.cols; ox < std::min(OW, (i + 1) * s.cols); ++ox) {
        if (!reads_input(ox, t % s.KW, s.W, s.sw, s.pw, s.dw)) continue;
        const int64_t v = (ox - i * s.cols) / L;
        if (lo < 0) lo = v;
        hi = v + 1;
      }
      s.live_vectors[(i * taps + t) * 2] = uint8_t(std::max<int64_t>(lo, 0));
      s.live_vectors[(i * taps + t) * 2 + 1] = uint8_t(std::max<int64_t>(hi, 0));
      any_col[t] |= hi > 0;
    }
  }
  for (int64_t t = 0; t < taps; ++t) s.tap_used[t] = any_row[t] && any_col[t];
  s.skips = std::find(s.row_live.begin(), s.row_live.end(), 0) != s.row_live.end();
  for (int64_t i = 0; i < tiles && !s.skips; ++i) {
    const int64_t nv = tile_vectors(i, s.cols, OW, L);
    for (int64_t t = 0; t < taps; ++t)
      s.skips |= s.live_vectors[(i * taps + t) * 2] != 0 || s.live_vectors[(i * taps + t) * 2 + 1] != nv;
  }
}

// Every tap live in every tile: nothing is skipped (the rerun for non-finite weights, see run_conv).
void make_all_live(ConvShape& s, int64_t OW, int64_t L) {
  const int64_t tiles = (OW + s.cols - 1) / s.cols, taps = s.KH * s.KW;
  std::fill(s.row_live.begin(), s.row_live.end(), 1);
  std::fill(s.tap_used.begin(), s.tap_used.end(), 1);
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t nv = tile_vectors(i, s.cols, OW, L);
    for (int64_t t = 0; t < taps; ++t) {
      s.live_vectors[(i * taps + t) * 2] = 0;
      s.live_vectors[(i * taps + t) * 2 + 1] = uint8_t(nv);
    }
  }
  s.skips = false;
}

// Cost model of the two block layouts, in vector multiply-adds, measured on the 2-core EPYC: a tile's
// visit to one (output channel, block) segment costs ~12 (parking, a mispredicted loop exit) and a tap-major
// multiply-add ~1.1 (a block's lines are spread over more channels). Tap-major wins where many taps are dead
// (dilated convs), channel-major where few are or where one tap's column holds few non-zeros (the 7x7 stem over
// 3 channels). Encoding the plan (grouping a non-zero by tap ~5, against ~1.5 for channel-major's direct pass)
// is left out: the plan cache keeps plans across calls (plan_cache.h), so it is paid at a weight's first call,
// and leaving it out keeps the choice, hence the output's bits, independent of the cache's budget. Measured with
// it in, the per-call grouping cost ruled out tap-major for MobileNetV2's 3x3 d6 head conv at 11x11, which runs
// 1.1-1.6x faster tap-major with tall tiles (three runs in alternation; benchmarks/results/kernel_tile_rows_*.json).
constexpr double kVisitCost = 12.0, kTapMajorCost = 1.1;

void choose_layout(ConvShape& s, int64_t nnz, int64_t OC, int64_t OH, int64_t OW, int64_t element_size, int64_t L) {
  const int64_t groups = (OH + s.rows - 1) / s.rows, tiles = (OW + s.cols - 1) / s.cols, taps = s.taps;
  const int64_t cb_tap = channel_block(s, nnz, OC, element_size, 1);
  const int64_t cb_all = channel_block(s, nnz, OC, element_size, taps);
  s.tap_major = false, s.cb = cb_all;
  if (s.tuning.layout >= 0) {  // a configured or tuned layout (sparse_tuning.h)
    if (s.tuning.layout == 1) s.tap_major = true, s.cb = cb_tap;
    return;
  }
  if (taps == 1 || nnz == 0) return;
  const double nnz_per_tap = double(nnz) / double(taps);
  const int64_t blocks_tap = (s.C + cb_tap - 1) / cb_tap, blocks_all = (s.C + cb_all - 1) / cb_all;
  double fma_all = 0, fma_tap = 0, visits_all = 0, visits_tap = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t R = std::min(s.rows, OH - g * s.rows);
    for (int64_t i = 0; i < tiles; ++i) {
      const int64_t NV = tile_vectors(i, s.cols, OW, L);
      visits_all += double(blocks_all);
      for (int64_t t = 0; t < taps; ++t) {
        if (!s.tap_used[t]) continue;
        fma_all += nnz_per_tap * double(R * NV);
        const int64_t live = s.row_live[g * taps + t] *
                             (s.live_vectors[(i * taps + t) * 2 + 1] - s.live_vectors[(i * taps + t) * 2]);
        fma_tap += nnz_per_tap * double(R * live);
        visits_tap += live > 0 ? double(blocks_tap) : 0.0;
      }
    }
  }
  const double cost_all = fma_all + kVisitCost * visits_all * double(OC);
  const double cost_tap = kTapMajorCost * fma_tap + kVisitCost * visits_tap * double(OC);
  if (cost_tap < cost_all) s.tap_major = true, s.cb = cb_tap;
}

// The rows of P (padded row, copy) that some tile reads, as needed[row * U + copy]; copy_of[kw] is tap
// column kw's copy. Tap-major: the rows of live (row group, tap) pairs; channel-major: every row of every
// used tap. With a large dilation most padding rows are read by dead taps only (ASPP d24, 41x41: 48 of 89).
std::vector<uint8_t> needed_rows(const ConvShape& s, int64_t OH, int64_t Hp, int64_t U,
                                 const std::vector<int64_t>& copy_of) {
  std::vector<uint8_t> needed(Hp * U, 0);
  const int64_t groups = (OH + s.rows - 1) / s.rows, taps = s.taps;
  for (int64_t t = 0; t < taps; ++t) {
    if (!s.tap_used[t]) continue;
    for (int64_t g = 0; g < groups; ++g) {
      if (s.tap_major && !s.row_live[g * taps + t]) continue;
      for (int64_t oy = g * s.rows; oy < std::min(OH, (g + 1) * s.rows); ++oy)
        needed[(oy * s.sh + t / s.KW * s.dh) * U + copy_of[t % s.KW]] = 1;
    }
  }
  return needed;
}

// A weight's non-zeros encoded for one plan: per kept non-zero its offset into P, grouped by block per row.
template <typename T>
struct EncodedRows {
  std::unique_ptr<int32_t[]> off;  // [nnz]: every entry the kernel reads is written
  std::vector<int32_t> seg;        // [OC][blocks + 1], see Plan
  std::vector<T> val;              // the kept values in off's order; empty when the weight's are read in place
  bool nonfinite_skipped = false;  // some row with an inf/NaN value would skip padding it reads
};

// Per column of a weight row (input channel c, tap t; index c * taps + t): its offset in P, its block and
// whether its tap is used. A table, so that the per-non-zero passes do no integer division (two divisions per
// non-zero cost ~1.5 ms on a 470k-non-zero conv).
struct ColumnTable {
  int64_t ncols;
  std::vector<int32_t> off, block;
  std::vector<uint8_t> used;
  bool all_used;
  ColumnTable(const ConvShape& s, int64_t channel_blocks)
      : ncols(s.C * s.full_taps), off(ncols), block(ncols), used(ncols) {
    for (int64_t c = 0; c < s.C; ++c) {
      for (int64_t f = 0; f < s.full_taps; ++f) {
        const int64_t col = c * s.full_taps + f, t = s.tap_of[f];
        off[col] = t < 0 ? 0 : int32_t(c * s.plane + s.tap[t]);
        block[col] = int32_t((s.tap_major && t >= 0 ? t * channel_blocks : 0) + c / s.cb);
        used[col] = t < 0 ? 0 : s.tap_used[t];
      }
    }
    all_used = s.full_taps == s.taps && std::find(s.tap_used.begin(), s.tap_used.end(), 0) == s.tap_used.end();
  }
};

// Each row's non-zeros become offsets into P, grouped by block, without those of dead taps (their products
// are all 0 * w). Channel-major blocks follow the order of sorted rows (SparseWeight's): one direct pass,
// and with every tap used the values are read in place. Tap-major blocks (and unsorted rows) take a stable
// counting sort by block. Both write the values they keep into `val`. Column indices come from user code:
// each is checked before use, in the same pass.
template <typename T>
EncodedRows<T> encode_rows(const char* op, const int32_t* rp, const int32_t* ci, const T* vals, int64_t nnz,
                           int64_t OC, const ConvShape& s, int64_t blocks, int64_t channel_blocks) {
  const ColumnTable cols(s, channel_blocks);
  const int64_t ncols = cols.ncols;
  const std::vector<int32_t>&col_off = cols.off, &col_block = cols.block;
  const std::vector<uint8_t>& col_used = cols.used;
  const bool all_used = cols.all_used;
  const bool direct = !s.tap_major;
  const bool in_place = direct && all_used;
  EncodedRows<T> enc;
  enc.off.reset(new int32_t[nnz]);
  enc.seg.resize(OC * (blocks + 1));
  enc.val.resize(in_place ? 0 : nnz);
  int32_t* off = enc.off.get();
  std::vector<int32_t>& seg = enc.seg;
  std::vector<T>& val = enc.val;
  std::vector<uint8_t> unsorted(OC, 0);  // rows the direct pass leaves to the counting sort
  // Rows holding an inf/NaN value, checked only where something is skipped: tap-major tiles skipping dead
  // (tap, tile) pairs, or channel-major blocks without the taps dead everywhere.
  std::vector<uint8_t> nonfinite(OC, 0);
  const bool check_finite = (s.tap_major ? s.skips : !all_used) || s.full_taps != s.taps;  // trimmed taps too
  const auto check_col = [&](int32_t col, int64_t k) {
    TORCH_CHECK_VALUE(col >= 0 && col < ncols, op, ": argument 'col_idx' entries must lie in [0, ", ncols,
                      "), got ", col, " at position ", k);
  };
  const auto group_row = [&](int64_t oc, T* grouped, std::vector<int32_t>& cursor) {
    const int64_t k0 = rp[oc], n = rp[oc + 1] - k0;
    const int32_t* c = ci + k0;
    int32_t* sg = seg.data() + oc * (blocks + 1);
    std::fill(sg, sg + blocks + 1, 0);
    bool bad = false;
    for (int64_t j = 0; j < n; ++j) {
      check_col(c[j], k0 + j);
      sg[col_block[c[j]] + 1] += col_used[c[j]];
      if (check_finite) bad |= !std::isfinite(vals[k0 + j]);
    }
    nonfinite[oc] |= bad;
    sg[0] = int32_t(k0);
    for (int64_t b = 1; b <= blocks; ++b) sg[b] += sg[b - 1];
    cursor.assign(sg, sg + blocks);
    for (int64_t j = 0; j < n; ++j) {
      if (!col_used[c[j]]) continue;
      const int32_t k = cursor[col_block[c[j]]]++;
      off[k] = col_off[c[j]];
      grouped[k] = vals[k0 + j];
    }
  };
  at::parallel_for(0, OC, 16, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> cursor;
    for (int64_t oc = begin; oc < end; ++oc) {
      if (!direct) {
        group_row(oc, val.data(), cursor);
        continue;
      }
      const int64_t k0 = rp[oc], n = rp[oc + 1] - k0;
      const int32_t* c = ci + k0;
      bool row_sorted = true;
      for (int64_t j = 0; j < n; ++j) {
        check_col(c[j], k0 + j);
        row_sorted = row_sorted && (j == 0 || c[j - 1] < c[j]);
      }
      if (!row_sorted) {
        unsorted[oc] = 1;
        continue;
      }
      int32_t* sg = seg.data() + oc * (blocks + 1);
      // Branch-free filter: every non-zero is written at k, and k moves on only past those kept (a dead tap's
      // non-zero is overwritten by the next one; the last write may land on an entry past the row's kept
      // ones, which no segment covers).
      int64_t b = 0, k = k0;
      bool bad = false;
      for (int64_t j = 0; j < n; ++j) {
        while (b <= col_block[c[j]]) sg[b++] = int32_t(k);
        off[k] = col_off[c[j]];
        if (!in_place) val[k] = vals[k0 + j];
        if (check_finite) bad |= !std::isfinite(vals[k0 + j]);
        k += col_used[c[j]];
      }
      nonfinite[oc] = bad;
      while (b <= blocks) sg[b++] = int32_t(k);
    }
  });
  if (std::find(unsorted.begin(), unsorted.end(), 1) != unsorted.end()) {
    if (in_place) val.assign(vals, vals + nnz);  // the sorted rows keep their values
    at::parallel_for(0, OC, 16, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> cursor;
      for (int64_t oc = begin; oc < end; ++oc)
        if (unsorted[oc]) group_row(oc, val.data(), cursor);
    });
  }
  enc.nonfinite_skipped = check_finite && std::find(nonfinite.begin(), nonfinite.end(), 1) != nonfinite.end();
  return enc;
}

// The keys a column pattern of an M-panel runs under (the inverse of panel_key_mask): up to two, -1 for none.
inline std::pair<int, int> panel_keys_of(int64_t M, int pattern) {
  if (M == 4) return {pattern - 1, -1};
  if (pattern == 255) return {30, -1};
  const int lo = pattern & 15, hi = pattern >> 4;
  return {lo ? lo - 1 : -1, hi ? 14 + hi : -1};
}

// The non-zeros of each panel of M output channels (channel-major blocks), grouped by block, then by key
// (pattern), then by column. Per entry (a column and key) its offset into P; its values, one per channel of the
// key's pattern in channel order, in `val`. A panel's entries and values both fit in the index range its rows
// hold in the CSR (an entry has at least one value; duplicate columns of a row are summed), so the arrays
// have the CSR's size and every panel writes its own range. Dead taps are dropped and column indices checked,
// as in encode_rows.
template <typename T>
struct EncodedPanels {
  std::unique_ptr<int32_t[]> off;
  std::vector<T> val;
  std::vector<int32_t> seg;  // see Plan::pseg
  bool nonfinite_skipped = false;
};

template <typename T>
EncodedPanels<T> encode_panels(const char* op, const int32_t* rp, const int32_t* ci, const T* vals, int64_t nnz,
                               int64_t OC, const ConvShape& s, int64_t blocks) {
  const int64_t M = s.panel, K = panel_keys(M), stride = 2 * K + 1, panels = (OC + M - 1) / M;
  const ColumnTable cols(s, (s.C + s.cb - 1) / s.cb);
  const bool check_finite = !cols.all_used;
  EncodedPanels<T> enc;
  enc.off.reset(new int32_t[std::max<int64_t>(nnz, 1)]);
  enc.val.resize(nnz);
  enc.seg.resize(panels * blocks * stride);
  std::vector<uint8_t> nonfinite(panels, 0);
  at::parallel_for(0, panels, 4, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> pattern(cols.ncols, 0);  // of the panel at hand; reset through `touched`
    std::vector<T> cval(cols.ncols * M);
    std::vector<int32_t> touched, ecur(blocks * K), vcur(blocks * K);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t r0 = p * M, r1 = std::min(OC, r0 + M);
      touched.clear();
      bool bad = false;
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t bit = uint8_t(1u << (r - r0));
        for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
          const int32_t col = ci[k];
          TORCH_CHECK_VALUE(col >= 0 && col < cols.ncols, op, ": argument 'col_idx' entries must lie in [0, ",
                            cols.ncols, "), got ", col, " at position ", k);
          if (check_finite) bad |= !std::isfinite(vals[k]);
          if (!cols.used[col]) continue;
          if (!pattern[col]) touched.push_back(col);
          T& v = cval[col * M + (r - r0)];
          v = (pattern[col] & bit) ? v + vals[k] : vals[k];
          pattern[col] |= bit;
        }
      }
      nonfinite[p] = bad;
      std::sort(touched.begin(), touched.end());  // each key's columns in memory order
      std::fill(ecur.begin(), ecur.end(), 0);
      std::fill(vcur.begin(), vcur.end(), 0);
      for (const int32_t col : touched) {
        const auto [k1, k2] = panel_keys_of(M, pattern[col]);
        for (const int key : {k1, k2}) {
          if (key < 0) continue;
          ecur[cols.block[col] * K + key] += 1;
          vcur[cols.block[col] * K + key] += __builtin_popcount(panel_key_mask(M, key));
        }
      }
      int32_t* sg = enc.seg.data() + p * blocks * stride;
      int32_t e = rp[r0], v = rp[r0];
      for (int64_t b = 0; b < blocks; ++b) {
        for (int64_t key = 0; key < K; ++key) {
          sg[b * stride + key] = e;
          sg[b * stride + K + 1 + key] = v;
          const int32_t ne = ecur[b * K + key], nv = vcur[b * K + key];
          ecur[b * K + key] = e, vcur[b * K + key] = v;  // now the cursors
          e += ne, v += nv;
        }
        sg[b * stride + K] = e;
      }
      for (const int32_t col : touched) {
        const auto [k1, k2] = panel_keys_of(M, pattern[col]);
        for (const int key : {k1, k2}) {
          if (key < 0) continue;
          const int64_t at = cols.block[col] * K + key;
          enc.off[ecur[at]++] = cols.off[col];
          const int mask = panel_key_mask(M, key);
          for (int64_t m = 0; m < M; ++m)
            if (mask >> m & 1) enc.val[vcur[at]++] = cval[col * M + m];
        }
        pattern[col] = 0;
      }
    }
  });
  enc.nonfinite_skipped = check_finite && std::find(nonfinite.begin(), nonfinite.end(), 1) != nonfinite.end();
  return enc;
}

// Channel-vector tiles store, per group of L output channels, every column any channel of the group holds, with a
// zero for each channel that lacks it: a weight pruned in L x 1 blocks stores nothing extra, and one whose blocks lost
// a few weights (an exact zero left by training or folding, another library's finer pruning on top) stores a little.
// By default they run where that pads the weight's non-zeros by at most kVectorsMaxFill (stored / non-zeros). Measured
// on the 2-core EPYC (docs/cpu_sparse_kernel.md, "Blocks with holes"), 16 x 1 blocks with holes: channel vectors beat
// the better of panels and one channel by 1.20-1.42x at 1.49 on four convs, by 1.00-1.74x at 2.0.
constexpr double kVectorsMaxFill = 1.5;

// Whether rows [r0, r1) of the CSR hold the same columns in the same order (a group that needs no padding).
inline bool same_columns(const int32_t* rp, const int32_t* ci, int64_t r0, int64_t r1) {
  const int64_t len = rp[r0 + 1] - rp[r0];
  for (int64_t r = r0 + 1; r < r1; ++r)
    if (rp[r + 1] - rp[r] != len || std::memcmp(ci + rp[r], ci + rp[r0], len * sizeof(int32_t)) != 0) return false;
  return true;
}

// The columns rows [r0, r1) hold between them, ascending, each once, into `out`. `mark` has ncols entries, none equal
// to `tag`. Column indices come from user code: each is checked before use.
inline void group_columns(const char* op, const int32_t* rp, const int32_t* ci, int64_t r0, int64_t r1, int64_t ncols,
                          std::vector<int64_t>& mark, int64_t tag, std::vector<int32_t>& out) {
  out.clear();
  for (int64_t k = rp[r0]; k < rp[r1]; ++k) {
    const int32_t col = ci[k];
    TORCH_CHECK_VALUE(col >= 0 && col < ncols, op, ": argument 'col_idx' entries must lie in [0, ", ncols, "), got ",
                      col, " at position ", k);
    if (mark[col] != tag) {
      mark[col] = tag;
      out.push_back(col);
    }
  }
  std::sort(out.begin(), out.end());
}

template <typename T>
struct EncodedVectors {
  std::unique_ptr<int32_t[]> off;
  std::vector<T> val;
  std::vector<int32_t> seg;  // [groups][blocks + 1], see Plan::vector
  bool nonfinite_skipped = false;
  bool fits = true;     // false: padding would pass kVectorsMaxFill (not forced): nothing else is filled
  bool padded = false;  // some stored value is a zero the weight does not hold (0 * inf: run_conv)
};

// The non-zeros of each group of L output channels for channel-vector tiles: per entry (a column some channel of the
// group holds, ascending, grouped by block with a stable counting sort) its offset into P, and in `val` its L values,
// one per channel of the group, 0 for a channel that lacks the column and for the channels a last group lacks (never
// stored). Dead taps are dropped, column indices checked and non-finite values found where something is skipped, as
// in encode_rows.
template <typename T>
EncodedVectors<T> encode_vectors(const char* op, const int32_t* rp, const int32_t* ci, const T* vals, int64_t OC,
                                 const ConvShape& s, int64_t blocks, int64_t channel_blocks, int64_t L) {
  const int64_t groups = (OC + L - 1) / L;
  const ColumnTable cols(s, channel_blocks);
  const bool check_finite = (s.tap_major ? s.skips : !cols.all_used) || s.full_taps != s.taps;
  EncodedVectors<T> enc;
  std::vector<int64_t> start(groups + 1, 0);  // entries per group, then where each group's entries start
  std::vector<int64_t> stored(groups, 0), held(groups, 0);  // values stored (padding included) and the weight's own
  std::vector<uint8_t> nonfinite(groups, 0);
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> mark(cols.ncols, -1);
    std::vector<int32_t> columns;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t r0 = p * L, r1 = std::min(OC, r0 + L);
      group_columns(op, rp, ci, r0, r1, cols.ncols, mark, p, columns);
      int64_t kept = 0, own = 0;
      for (const int32_t col : columns) kept += cols.used[col];
      for (int64_t k = rp[r0]; k < rp[r1]; ++k) own += cols.used[ci[k]];
      bool bad = false;
      if (check_finite)
        for (int64_t k = rp[r0]; k < rp[r1]; ++k) bad |= !std::isfinite(vals[k]);
      start[p + 1] = kept;
      stored[p] = kept * (r1 - r0);
      held[p] = own;
      nonfinite[p] = bad;
    }
  });
  const int64_t all_stored = std::accumulate(stored.begin(), stored.end(), int64_t(0));
  const int64_t all_held = std::accumulate(held.begin(), held.end(), int64_t(0));
  if (!s.vector_forced && double(all_stored) > kVectorsMaxFill * double(all_held)) {
    enc.fits = false;
    return enc;
  }
  enc.padded = all_stored > all_held;
  for (int64_t p = 0; p < groups; ++p) start[p + 1] += start[p];
  enc.off.reset(new int32_t[std::max<int64_t>(start[groups], 1)]);
  enc.val.assign(start[groups] * L, T(0));
  enc.seg.resize(groups * (blocks + 1));
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> mark(cols.ncols, -1), entry(cols.ncols, -1);
    std::vector<int32_t> columns, cursor(blocks + 1);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t r0 = p * L, r1 = std::min(OC, r0 + L);
      group_columns(op, rp, ci, r0, r1, cols.ncols, mark, p, columns);
      std::fill(cursor.begin(), cursor.end(), 0);
      for (const int32_t col : columns)
        if (cols.used[col]) ++cursor[cols.block[col] + 1];
      cursor[0] = int32_t(start[p]);
      for (int64_t b = 0; b < blocks; ++b) cursor[b + 1] += cursor[b];
      std::copy(cursor.begin(), cursor.end(), enc.seg.begin() + p * (blocks + 1));
      for (const int32_t col : columns) {
        if (!cols.used[col]) continue;
        const int64_t e = cursor[cols.block[col]]++;
        entry[col] = e;
        enc.off[e] = cols.off[col];
      }
      for (int64_t m = 0; m < r1 - r0; ++m)
        for (int64_t k = rp[r0 + m]; k < rp[r0 + m + 1]; ++k)
          if (cols.used[ci[k]]) enc.val[entry[ci[k]] * L + m] += vals[k];  // += : a column twice in a row sums
    }
  });
  enc.nonfinite_skipped = check_finite && std::find(nonfinite.begin(), nonfinite.end(), 1) != nonfinite.end();
  return enc;
}

// Output channels per register tile for a channel-major plan, from the weight's own column patterns: the reuse
// of 4-channel panels, values / entries (multiply-adds per input load), over up to 16 panels spread over the
// weight. Measured on the 2-core EPYC (docs/cpu_sparse_kernel.md), plans kept across calls: a 4-panel is as fast
// as one channel at reuse 1.1-1.2 (unstructured at 90-95%), 2-4% faster at 1.26 (85%), 2-17% at 1.4-2.0
// (80-53%, one conv 3.5% slower) and 1.15-1.28x on 2 x 1 blocks (~2.1), so panels from kPanelMinReuse; but
// only where each non-zero meets enough output pixels to pay for the panel's costlier plan (~3 ns more per
// non-zero): at 41x41 it wins, on MobileNetV2's 11x11 head maps and smaller backbone maps it lost (whole model
// 62 -> 74 ms), so panels need kPanelMinPixels output pixels (batch x height x width). Panels of 8 measured no
// better than 4: the autotuner and ADAPMTL_CPU_SPARSE_CONFIG reach them.
constexpr int64_t kPanelMinPixels = 1024;
constexpr double kPanelMinReuse = 1.3;

int64_t choose_panel(const ConvShape& s, const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t OC,
                     int64_t pixels) {
  constexpr int64_t M = 4;
  const int64_t panels = OC / M;
  if (panels == 0 || col_idx.numel() == 0 || pixels < kPanelMinPixels) return 1;
  const at::Tensor rp_t = row_ptr.contiguous(), ci_t = col_idx.contiguous();
  const int32_t *rp = rp_t.data_ptr<int32_t>(), *ci = ci_t.data_ptr<int32_t>();
  const int64_t ncols = s.C * s.full_taps, step = std::max<int64_t>(1, panels / 16);
  std::vector<int32_t> seen(ncols, -1);  // the last sampled panel holding the column
  int64_t entries = 0, values = 0;
  for (int64_t p = 0; p < panels; p += step) {
    for (int64_t k = rp[p * M]; k < rp[(p + 1) * M]; ++k) {
      const int32_t col = ci[k];
      if (col < 0 || col >= ncols) continue;  // bad indices raise when encoded
      const int32_t t = s.tap_of[col % s.full_taps];
      if (t < 0 || !s.tap_used[t]) continue;
      entries += seen[col] != p;
      seen[col] = int32_t(p);
      ++values;
    }
  }
  return entries && double(values) >= kPanelMinReuse * double(entries) ? 4 : 1;
}

// Switches a channel-major plan to panels of `panel` channels: one output row per tile, and at most 3 vectors
// for panels of 8 (24 accumulators, the loaded input and a value fill the 32 vector registers); the liveness
// tables and the channel blocks are redone for that tile.
void use_panel(ConvShape& s, int64_t panel, int64_t nv, int64_t nnz, int64_t OC, int64_t OH, int64_t OW,
               int64_t element_size, int64_t L) {
  if (panel <= 1) return;
  s.panel = panel;
  s.tuning.layout = 0;
  s.rows = 1;
  s.cols = std::min<int64_t>(nv, panel == 8 ? 3 : 4) * L;
  find_live_taps(s, OH, OW, L);
  choose_layout(s, nnz, OC, OH, OW, element_size, L);
}

// Whether the weight's output channels come in groups of L (one vector) that hold nearly the same columns, sampled over
// up to 16 groups spread over the weight (encode_vectors checks every group): their columns, each stored for every
// channel of its group, pad the non-zeros by at most kVectorsMaxFill -- a weight pruned in L x 1 blocks or larger,
// whoever pruned it, even with a few more zeros inside its blocks. Measured on the 2-core EPYC
// (docs/cpu_sparse_kernel.md): channel-vector tiles then run 1.5-2x faster than panels on a 3x3 conv. On one-tap
// calls (1x1 convs, linear) they run where the row is shorter than kVectorsOneTapRow pixels (the batch, for linear):
// there panels do not run (kPanelMinPixels) and vectors measured 1.04-1.49x faster than the one-channel tile (16 x 1
// blocks, rows of 64-841 pixels, 52.7-94.7%); on longer rows they are no faster than panels (0.85-1.08x at 1024-6561).
constexpr int64_t kVectorsOneTapRow = kPanelMinPixels;

bool channel_vectors_fit(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t OC, int64_t ncols, int64_t L) {
  const int64_t groups = OC / L;
  if (groups == 0 || col_idx.numel() == 0) return false;
  const at::Tensor rp_t = row_ptr.contiguous(), ci_t = col_idx.contiguous();
  const int32_t *rp = rp_t.data_ptr<int32_t>(), *ci = ci_t.data_ptr<int32_t>();
  const int64_t step = std::max<int64_t>(1, groups / 16);
  int64_t held = 0;
  for (int64_t p = 0; p < groups; p += step) held += rp[(p + 1) * L] - rp[p * L];
  const double most = kVectorsMaxFill * double(held);  // stored values past this: no (an unstructured weight, early)
  std::vector<int64_t> seen;  // the last sampled group holding the column; only for groups that are not uniform
  int64_t stored = 0;
  for (int64_t p = 0; p < groups && double(stored) <= most; p += step) {
    const int64_t r0 = p * L, r1 = r0 + L;
    if (same_columns(rp, ci, r0, r1)) {  // the common case, without the marks
      stored += (rp[r0 + 1] - rp[r0]) * L;
      continue;
    }
    if (seen.empty()) seen.assign(ncols, -1);
    for (int64_t k = rp[r0]; k < rp[r1]; ++k) {
      const int32_t col = ci[k];
      if (col < 0 || col >= ncols || seen[col] == p) continue;  // bad indices raise when encoded
      seen[col] = p;
      stored += L;
    }
  }
  return double(stored) <= most;
}

// Whether a call with configuration t runs channel-vector tiles: where configured (panel=vector), or by default where
// the weight's groups fit them (`fit`) unless the call is one tap over a row of kVectorsOneTapRow pixels or more.
inline bool runs_vectors(const Tuning& t, bool fit, int64_t taps, int64_t row) {
  return t.panel == kVectorPanel || (t.panel == 0 && t.layout < 0 && fit && (taps > 1 || row < kVectorsOneTapRow));
}

// Switches a plan to channel-vector tiles: up to kVectorPixels pixels of one output row per tile (the row's tiles
// balanced: 41 columns -> 21 + 20), one channel block (every block of a group runs in registers), tap-major where
// some tap reads only padding for a tile (unless the layout is configured), so that tiles skip it; `all_live`:
// nothing skipped (the rerun for non-finite weights).
void use_vectors(ConvShape& s, int64_t OH, int64_t OW, int64_t L, bool all_live = false) {
  const int64_t most = cpu_capability() == CpuCapability::avx512 ? kVectorPixels : kVectorPixelsBelowAvx512;
  const int64_t tiles = (OW + most - 1) / most;
  s.vector = true;
  s.panel = 1;
  s.rows = 1;
  s.cols = std::max<int64_t>(1, (OW + tiles - 1) / tiles);
  find_live_taps(s, OH, OW, L);
  if (all_live) make_all_live(s, OW, L);
  s.cb = s.C;
  s.tap_major = s.tuning.layout >= 0 ? s.tuning.layout == 1 : s.skips;
}

// What the stored tiles get (sparse_conv2d_fused): the residual, contiguous [N][OC][OH][OW] in the output's
// dtype (undefined: none), then the clamp to [lo, hi] when `clamp`.
struct Epilogue {
  at::Tensor residual;
  bool clamp = false;
  double lo = -std::numeric_limits<double>::infinity(), hi = std::numeric_limits<double>::infinity();
};

// Runs a plan over the batch. Images go through in passes whose packed input fits the reused workspace: a
// fresh buffer for a whole large batch costs more in page faults than the kernel (measured: batch 16, 1x1
// 1024->1024 at 41x41, ~150 ms of faults per call on top of a 60 ms kernel).
template <typename T, typename Pack>
void run_passes(Plan<T>& g, at::Tensor& out, int64_t nnz, const Pack& pack) {
  constexpr int64_t L = Vec<T>::kLanes;
  const int64_t N = out.size(0), OC = g.OC, OH = g.OH, OW = g.OW, rows = g.rows, cols = g.cols;
  const int64_t scratch_len = g.blocks > 1 && !g.vector ? g.oc_chunk * kTileVectors * L : 0;
  const int64_t per_pass = std::clamp<int64_t>(kMaxCachedBytes / (g.in_batch * int64_t(sizeof(T))), 1, N);
  at::Tensor P = workspace(per_pass * g.in_batch, out.options());
  for (int64_t n0 = 0; n0 < N; n0 += per_pass) {
    const int64_t count = std::min(per_pass, N - n0);  // images in this pass
    g.P = P.data_ptr<T>();
    g.out = out.data_ptr<T>() + n0 * OC * OH * OW;
    g.residual = g.residual_all ? g.residual_all + n0 * OC * OH * OW : nullptr;
    pack(P.data_ptr<T>(), n0, count);
    const int64_t items = count * ((OH + rows - 1) / rows) * ((OW + cols - 1) / cols) * ((OC + g.oc_chunk - 1) / g.oc_chunk);
    const double work = double(nnz) * double(OH) * double(OW) * double(count);  // multiply-adds (may exceed int64)
    const double per_item = std::max(1.0, work / double(std::max<int64_t>(1, items)));
    // Below ~1M multiply-adds everything runs on the calling thread (parallel_for runs a range no larger than
    // its grain inline): waking the pool costs more than such a call. Otherwise ~256k multiply-adds per task.
    const int64_t grain = work < double(int64_t(1) << 20) ? items
                                                           : std::max<int64_t>(1, int64_t(double(1 << 18) / per_item));
    at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(scratch_len);
      run_items_for_cpu<T>(g, begin, end, scratch.data());
    });
  }
}

// What run_conv did: ran the plan, or computed nothing and asks for a rerun with nothing skipped (rerun_all_live),
// or with another tile than channel vectors (not_vectors: the groups would pad the weight past kVectorsMaxFill, or
// a padded plan meets a non-finite input).
enum class Ran { done, rerun_all_live, not_vectors };

// pack(P, n0, count) writes images [n0, n0 + count) of the input into P (in_batch elements each); input_finite()
// says whether every input element is finite (asked only of a padded channel-vector plan, whose stored zeros would
// turn an inf into NaN where the op's semantics keep pruned weights structural: it then returns not_vectors).
// Computes nothing and returns rerun_all_live when the plan would skip zero padding that a non-finite weight reads:
// the op's semantics (adapmtl/ops/sparse_conv.py) treat padding as real zeros, so 0 * inf = NaN must reach
// the output; the caller then reruns with nothing skipped (make_all_live). Finite weights never rerun.
template <typename T, typename Pack, typename InputFinite>
Ran run_conv(const char* op, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
              const c10::optional<at::Tensor>& bias, at::Tensor& out, const ConvShape& s, int64_t in_batch,
              const Pack& pack, const InputFinite& input_finite, const Epilogue& epi = Epilogue{}) {
  constexpr int64_t L = Vec<T>::kLanes;
  const int64_t OC = out.size(1), OH = out.size(2), OW = out.size(3);
  TORCH_CHECK_VALUE(in_batch <= std::numeric_limits<int32_t>::max(), op, ": one image of the padded input holds ",
                    in_batch, " elements, more than the CPU kernel's int32 offsets address");
  const at::Tensor rp_t = row_ptr.contiguous(), ci_t = col_idx.contiguous(), val_t = values.contiguous();
  const T* vals = val_t.data_ptr<T>();
  const int64_t nnz = ci_t.numel();
  const int64_t channel_blocks = (s.C + s.cb - 1) / s.cb;
  const int64_t blocks = (s.tap_major ? s.taps : 1) * channel_blocks;
  const int32_t *rp = rp_t.data_ptr<int32_t>(), *ci = ci_t.data_ptr<int32_t>();
  // The encoded weight, kept across calls (plan_cache.h) under everything the encoders read besides the arrays.
  std::vector<int64_t> key{s.vector ? 2 + s.vector_forced : int64_t(s.panel > 1),
                           int64_t(c10::CppTypeToScalarType<T>::value),
                           OC, s.C, s.taps, s.plane, s.tap_major, s.skips, s.cb, s.panel, blocks, channel_blocks};
  key.insert(key.end(), s.tap.begin(), s.tap.end());
  key.insert(key.end(), s.tap_used.begin(), s.tap_used.end());
  key.push_back(s.full_taps);
  key.insert(key.end(), s.tap_of.begin(), s.tap_of.end());
  // What a plan (rows or panels) holds, and whether it depends on the values: one read in place (empty val)
  // depends on rp and ci alone (nonfinite_skipped is only set where val holds the values).
  const auto plan_bytes = [nnz](const auto& e) {
    return int64_t(nnz * 4 + e.val.size() * sizeof(T) + e.seg.size() * 4);
  };
  const auto holds_values = [](const auto& e) { return !e.val.empty(); };
  std::shared_ptr<const EncodedRows<T>> enc;
  std::shared_ptr<const EncodedPanels<T>> panels;
  std::shared_ptr<const EncodedVectors<T>> vecs;
  if (s.vector) {
    vecs = PlanCache::instance().get<EncodedVectors<T>>(
        key, rp, OC, ci, nnz, vals, sizeof(T),
        [&] { return encode_vectors<T>(op, rp, ci, vals, OC, s, blocks, channel_blocks, L); }, plan_bytes,
        holds_values);
    if (!vecs->fits || (vecs->padded && !input_finite())) return Ran::not_vectors;
    if (vecs->nonfinite_skipped) return Ran::rerun_all_live;
  } else if (s.panel > 1) {
    panels = PlanCache::instance().get<EncodedPanels<T>>(
        key, rp, OC, ci, nnz, vals, sizeof(T), [&] { return encode_panels<T>(op, rp, ci, vals, nnz, OC, s, blocks); },
        plan_bytes, holds_values);
    if (panels->nonfinite_skipped) return Ran::rerun_all_live;
  } else {
    enc = PlanCache::instance().get<EncodedRows<T>>(
        key, rp, OC, ci, nnz, vals, sizeof(T),
        [&] { return encode_rows<T>(op, rp, ci, vals, nnz, OC, s, blocks, channel_blocks); }, plan_bytes,
        holds_values);
    if (enc->nonfinite_skipped) return Ran::rerun_all_live;
  }
  // Channel-major: every block of every tile is live, over all its vectors (one pseudo-tap).
  std::vector<uint8_t> all_rows, all_vectors;
  if (!s.tap_major) {
    const int64_t groups = (OH + s.rows - 1) / s.rows, tiles = (OW + s.cols - 1) / s.cols;
    all_rows.assign(groups, 1);
    all_vectors.resize(tiles * 2);
    for (int64_t i = 0; i < tiles; ++i) {
      all_vectors[2 * i] = 0;
      all_vectors[2 * i + 1] = uint8_t(tile_vectors(i, s.cols, OW, L));
    }
  }
  const at::Tensor b_t = bias.has_value() ? bias->contiguous() : at::Tensor();
  Plan<T> g;
  g.panel = s.panel;
  g.vector = s.vector;
  if (s.vector) {
    g.off = vecs->off.get();
    g.val = vecs->val.data();
    g.seg = vecs->seg.data();
    g.pseg = nullptr;
  } else if (s.panel > 1) {
    g.off = panels->off.get();
    g.val = panels->val.data();
    g.seg = nullptr;
    g.pseg = panels->seg.data();
  } else {
    g.off = enc->off.get();
    g.val = enc->val.empty() ? vals : enc->val.data();  // in place: these values are the plan's, byte for byte
    g.seg = enc->seg.data();
    g.pseg = nullptr;
  }
  g.bias = b_t.defined() ? b_t.data_ptr<T>() : nullptr;
  g.residual_all = epi.residual.defined() ? epi.residual.data_ptr<T>() : nullptr;
  g.residual = nullptr;
  g.clamp = epi.clamp;
  g.lo = T(epi.lo), g.hi = T(epi.hi);
  g.OC = OC, g.OH = OH, g.OW = OW;
  g.in_batch = in_batch;
  g.row_step = s.row_step;
  g.rows = s.rows, g.cols = s.cols, g.blocks = blocks;
  g.channel_blocks = channel_blocks, g.taps = s.tap_major ? s.taps : 1;
  g.row_live = s.tap_major ? s.row_live.data() : all_rows.data();
  g.live_vectors = s.tap_major ? s.live_vectors.data() : all_vectors.data();
  // Chunks of output channels: enough items to balance the threads; parked tiles (<= 64 KiB) stay in L2.
  g.oc_chunk = round_up(std::min<int64_t>(OC, s.tuning.oc_chunk), s.vector ? L : s.panel);  // whole panels / groups
  count_panel_call(s.vector ? kVectorPanel : s.panel);
  run_passes<T>(g, out, nnz, pack);
  return Ran::done;
}

// Pad + copy images [n0, n0 + count) of x into P, any input strides (NCHW, channels-last, views): the rows
// (padded row iy, copy u) with needed[iy * U + u] set, wholly (data or zero), so the reused buffer needs no
// clearing pass; the kernel reads no other row.
template <typename T>
void pack_conv_input(const at::Tensor& x, T* P, int64_t n0, int64_t count, const ConvShape& s, int64_t ph,
                     int64_t pw, int64_t sw, int64_t Wrow, const std::vector<std::pair<int64_t, int64_t>>& copies,
                     const std::vector<uint8_t>& needed) {
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), U = copies.size();
  const int64_t Hp = int64_t(needed.size()) / U;
  const T* xp = x.data_ptr<T>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);
  // The copy is cheap next to the kernel: split it across threads only when large, since every parallel
  // region costs a thread hand-off (milliseconds when the cores are oversubscribed).
  const int64_t pack_grain = std::max<int64_t>(16, (int64_t(1) << 22) / std::max<int64_t>(1, s.plane));
  at::parallel_for(0, count * C, pack_grain, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / C, c = nc % C;
      const T* src = xp + (n0 + n) * s0 + c * s1;
      T* dst = P + nc * s.plane;
      for (int64_t py = 0; py < Hp; ++py) {
        const int64_t iy = py - ph;
        for (int64_t u = 0; u < U; ++u) {
          if (!needed[py * U + u]) continue;
          T* drow = dst + (py * U + u) * Wrow;
          if (iy < 0 || iy >= H) {
            std::fill(drow, drow + Wrow, T(0));
            continue;
          }
          const T* srow = src + iy * s2;
          const int64_t p = copies[u].first, sigma = copies[u].second;
          // drow[j] = padded column (j + sigma) * sw + p, i.e. x column ix = (j + sigma) * sw + p - pw
          if (sw == 1 && s3 == 1) {
            const int64_t lo = std::clamp<int64_t>(pw - sigma, 0, Wrow);
            const int64_t hi = std::clamp<int64_t>(pw - sigma + W, lo, Wrow);
            std::fill(drow, drow + lo, T(0));
            std::memcpy(drow + lo, srow + (lo + sigma - pw), (hi - lo) * sizeof(T));
            std::fill(drow + hi, drow + Wrow, T(0));
          } else {
            for (int64_t j = 0; j < Wrow; ++j) {
              const int64_t ix = (j + sigma) * sw + p - pw;
              drow[j] = (ix >= 0 && ix < W) ? srow[ix * s3] : T(0);
            }
          }
        }
      }
    }
  });
}

// Whether every element of x is finite: inf - inf and NaN - NaN are NaN, anything else - itself is 0, so a NaN lane of
// the sum marks a non-finite element. Vector partial sums: a plain loop would not vectorise (the adds' order).
template <typename T>
bool all_finite(const at::Tensor& x) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::kLanes;
  const at::Tensor c = x.is_non_overlapping_and_dense() ? x : x.contiguous();  // any order: only the set matters
  const T* p = c.data_ptr<T>();
  const int64_t n = c.numel();
  V acc{};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const V v = load(p + i);
    acc += v - v;
  }
  T tail = 0;
  for (; i < n; ++i) tail += p[i] - p[i];
  for (int64_t m = 0; m < L; ++m) tail += acc[m];
  return tail == tail;
}

// Output rows per register tile for rows of nv vectors (Tuning::rows; 0: the default, see kTileVectors): one-vector
// rows get as many as fit, balanced over the row groups (11 rows: 6 + 5, not 8 + 3); wider rows 2.
int64_t tile_rows(int64_t rows, int64_t nv, int64_t OH) {
  const int64_t most = std::min<int64_t>(max_tile_rows(nv), std::max<int64_t>(OH, 1));
  if (rows > 0 || nv > 1) return std::min<int64_t>(rows > 0 ? rows : 2, most);
  const int64_t groups = (OH + most - 1) / most;
  return (OH + groups - 1) / groups;
}

at::Tensor conv2d_cpu(const char* op, const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                      const at::Tensor& values, const c10::optional<at::Tensor>& bias, at::IntArrayRef weight_shape,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                      const c10::optional<at::Tensor>& residual, c10::optional<double> lo, c10::optional<double> hi) {
  const ConvGeometry g = check_sparse_conv2d_args(op, x, row_ptr, col_idx, values, bias, weight_shape, stride,
                                                  padding, dilation, /*reduced=*/false);
  check_conv_epilogue(op, x, g, residual, lo, hi);
  check_cpu_csr(op, x, row_ptr, col_idx.numel(), g.OC);
  const int64_t N = g.N, C = g.C, H = g.H, W = g.W, OC = g.OC, KH = g.KH, KW = g.KW;
  const int64_t sh = g.sh, sw = g.sw, ph = g.ph, pw = g.pw, dh = g.dh, dw = g.dw;
  const int64_t Hp = g.Hp, OH = g.OH, OW = g.OW;
  // A 1x1, stride-1, unpadded conv is a 1 x (H * W) conv: one long output row per channel, so vectors run
  // across row ends instead of idling at each row's tail (41 columns fill 41 of 48 lanes): ~15% faster.
  if (KH == 1 && KW == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0 && H > 1) {
    const auto flat_residual =
        residual.has_value() ? c10::optional<at::Tensor>(residual->reshape({N, OC, 1, H * W})) : c10::nullopt;
    const at::Tensor flat = conv2d_cpu(op, x.reshape({N, C, 1, H * W}), row_ptr, col_idx, values, bias, weight_shape,
                                       stride, padding, dilation, flat_residual, lo, hi);
    return flat.view({N, OC, H, W});  // a view keeps the flat result's memory format (NCHW or channels-last)
  }
  Epilogue epi;
  epi.clamp = lo.has_value() || hi.has_value();
  epi.lo = lo.value_or(-std::numeric_limits<double>::infinity());
  epi.hi = hi.value_or(std::numeric_limits<double>::infinity());
  if (residual.has_value()) epi.residual = residual->contiguous();  // NCHW, as the kernel stores
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  auto out = pooled_empty({N, OC, OH, OW}, x.options());  // large outputs: recycled, not faulted in again
  if (out.numel() == 0) return channels_last ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;

  const int64_t L = x.scalar_type() == at::kFloat ? Vec<float>::kLanes : Vec<double>::kLanes;
  ConvShape s;
  s.C = C;
  // Register tile columns: up to kMaxVectors vectors (its rows are a tuning choice).
  const int64_t nv = std::min<int64_t>(kMaxVectors, (OW + L - 1) / L);
  // The padded input P for the kernel without its outer (mh, mw) taps on each side, with (mh dh, mw dw) less
  // padding: the same output. Tap (kh, kw) reads padded column (ox + q) * sw + p of row oy * sh + kh * dh, with
  // p = (kw * dw) % sw and q = (kw * dw) / sw. Each input row is stored once per distinct (p, q % L) as a "copy"
  // holding phase p shifted left by q % L, so the tap's loads start q - q % L + ox elements into the copy: whole
  // vectors. Aligned loads run ~1.6x faster than unaligned ones, which is worth the extra copies (KW at most).
  int64_t pht = ph, pwt = pw, Hpt = Hp, U = 0, Wrow = 0, in_batch = 0;
  std::vector<std::pair<int64_t, int64_t>> copies;  // (phase p, shift sigma)
  std::vector<int64_t> copy_of, skip;
  // `aligned`: copies per (p, q % L) so that vector loads start on vector boundaries. Channel-vector tiles load single
  // elements (broadcasts): one copy per phase p then, the tap's shift q all in its offset, and P is up to L times
  // smaller (ASPP's 3x3 d6 at 41x41: 6.5 instead of 15.6 MB; its larger P measured ~30% slower in a microbenchmark).
  const auto set_geometry = [&](int64_t mh, int64_t mw, bool aligned) {
    const int64_t KHt = KH - 2 * mh, KWt = KW - 2 * mw;
    pht = ph - mh * dh, pwt = pw - mw * dw, Hpt = H + 2 * pht;  // <= Hp: no overflow
    copies.clear();
    copy_of.assign(KWt, 0), skip.assign(KWt, 0);
    for (int64_t kw = 0; kw < KWt; ++kw) {
      const int64_t reach = kw * dw;  // < the dilated kernel width: no overflow
      const int64_t p = reach % sw, q = reach / sw;
      const std::pair<int64_t, int64_t> key{p, aligned ? q % L : 0};
      copy_of[kw] = std::find(copies.begin(), copies.end(), key) - copies.begin();
      if (copy_of[kw] == int64_t(copies.size())) copies.push_back(key);
      skip[kw] = q - key.second;
    }
    U = copies.size();
    // Whole-vector loads of a tile reach round_up(OW, L) + skip: the row length (a whole number of vectors where
    // aligned).
    Wrow = round_up(OW, L) + *std::max_element(skip.begin(), skip.end());
    // The kernel addresses one image of P with int32 offsets: refuse larger ones before allocating anything.
    s.plane = checked_mul(op, "the padded input plane", checked_mul(op, "the padded input plane", Hpt, U), Wrow);
    in_batch = checked_mul(op, "the padded input image", C, s.plane);
    TORCH_CHECK_VALUE(in_batch <= std::numeric_limits<int32_t>::max(), op, ": one image of the padded input holds ",
                      in_batch, " elements (padding ", padding, ", dilation ", dilation, ", stride ", stride,
                      "), more than the CPU kernel's int32 offsets address; use backend='torch'");
    s.row_step = OH > 1 ? sh * U * Wrow : 0;  // with two or more output rows sh < Hpt, so this is < plane
    s.taps = KHt * KWt;
    s.tap.resize(s.taps);
    for (int64_t kh = 0; kh < KHt; ++kh)
      for (int64_t kw = 0; kw < KWt; ++kw) s.tap[kh * KWt + kw] = (kh * dh * U + copy_of[kw]) * Wrow + skip[kw];
    s.H = H, s.W = W, s.KH = KHt, s.KW = KWt, s.sh = sh, s.sw = sw, s.ph = pht, s.pw = pwt, s.dh = dh, s.dw = dw;
    s.full_taps = KH * KW;  // the weight's columns stay those of the whole kernel
    s.tap_of.assign(KH * KW, -1);
    for (int64_t kh = mh; kh < KH - mh; ++kh)
      for (int64_t kw = mw; kw < KW - mw; ++kw) s.tap_of[kh * KW + kw] = int32_t((kh - mh) * KWt + (kw - mw));
  };
  // Outer taps that read only zero padding at every output position of this input size (a 3x3 conv with
  // dilation >= the map is the 1x1 it leaves): dropped with their padding, so P holds only what live taps read.
  // Measured on 3x3 convs 320->256 at 11x11, 90% (2-core EPYC): 0.14 ms trimmed vs 0.45 ms whole (d12, d24).
  const int64_t mh = dead_tap_margin(H, KH, OH, sh, ph, dh), mw = dead_tap_margin(W, KW, OW, sw, pw, dw);
  // The whole convolution with configuration t, into `out`. Channel-vector tiles where configured (panel=vector) or,
  // by default, where the weight's sampled groups fit them; a weight whose groups turn out not to (encode_vectors)
  // then runs as if they had not been asked for.
  const bool vectors_fit = channel_vectors_fit(row_ptr, col_idx, OC, C * KH * KW, L);
  const auto run = [&](const Tuning& t) {
    bool vector = runs_vectors(t, vectors_fit, KH * KW, OW);
    for (;;) {  // at most twice: with channel vectors, then without them
      set_geometry(mh, mw, !vector);
      s.tuning = t;
      if (t.panel == kVectorPanel) s.tuning.panel = 0;
      s.panel = 1;
      s.vector = false;
      s.vector_forced = t.panel == kVectorPanel;
      if (vector) {
        use_vectors(s, OH, OW, L);
      } else {
        s.rows = tile_rows(t.rows, nv, OH);
        s.cols = nv * L;
        find_live_taps(s, OH, OW, L);
        if (s.tuning.panel > 1) s.tuning.layout = 0;  // panels run over channel-major blocks
        choose_layout(s, col_idx.numel(), OC, OH, OW, x.element_size(), L);
        if (!s.tap_major) {
          const int64_t panel = s.tuning.panel ? s.tuning.panel : choose_panel(s, row_ptr, col_idx, OC, N * OH * OW);
          use_panel(s, panel, nv, col_idx.numel(), OC, OH, OW, x.element_size(), L);
        }
      }
      Ran ran = Ran::done;
      for (;;) {  // at most three passes: trimmed, whole, and whole with nothing skipped (run_conv)
        const std::vector<uint8_t> needed = needed_rows(s, OH, Hpt, U, copy_of);
        AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_cpu", [&] {
          ran = run_conv<scalar_t>(op, row_ptr, col_idx, values, bias, out, s, in_batch,
                                   [&](scalar_t* P, int64_t n0, int64_t count) {
                                     pack_conv_input<scalar_t>(x, P, n0, count, s, pht, pwt, sw, Wrow, copies, needed);
                                   }, [&] { return all_finite<scalar_t>(x); }, epi);
        });
        if (ran != Ran::rerun_all_live) break;
        if (s.full_taps != s.taps) {  // a non-finite weight on a trimmed tap: the whole kernel, as tuned
          set_geometry(0, 0, !s.vector);
          if (s.vector) {
            use_vectors(s, OH, OW, L);
          } else {
            find_live_taps(s, OH, OW, L);
            if (s.panel > 1) use_panel(s, s.panel, nv, col_idx.numel(), OC, OH, OW, x.element_size(), L);
            else choose_layout(s, col_idx.numel(), OC, OH, OW, x.element_size(), L);
          }
          continue;
        }
        if (s.vector) {
          use_vectors(s, OH, OW, L, /*all_live=*/true);
        } else {
          make_all_live(s, OW, L);
          choose_layout(s, col_idx.numel(), OC, OH, OW, x.element_size(), L);
        }
      }
      if (ran == Ran::done) return;
      vector = false;  // Ran::not_vectors
    }
  };
  bool forced = false;
  Tuning tuning = configured_tuning(&forced);
  if (!forced && col_idx.numel() > 0 && Autotuner::instance().enabled()) {
    std::ostringstream key;
    key << "threads=" << at::get_num_threads() << "|" << x.scalar_type() << "|x=" << x.sizes() << "|w=" << weight_shape
        << "|stride=" << stride << "|padding=" << padding << "|dilation=" << dilation << "|nnz=" << col_idx.numel();
    tuning = Autotuner::instance().tuning_for(key.str(), KH * KW > 1, tile_rows(0, nv, OH) != tile_rows(2, nv, OH),
                                              vectors_fit, [&](const Tuning& t) {
      const auto start = std::chrono::steady_clock::now();
      run(t);
      return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    });
  }
  run(tuning);
  return channels_last ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;
}

at::Tensor sparse_conv2d_cpu(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                             const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                             at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  return conv2d_cpu("adapmtl::sparse_conv2d", x, row_ptr, col_idx, values, bias, weight_shape, stride, padding,
                    dilation, c10::nullopt, c10::nullopt, c10::nullopt);
}

// clamp(conv + bias + residual, lo, hi) with the add and the clamp in the kernel's store (module comment).
at::Tensor sparse_conv2d_fused_cpu(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                   const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                                   at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, const c10::optional<at::Tensor>& residual,
                                   c10::optional<double> lo_in, c10::optional<double> hi_in) {
  return conv2d_cpu("adapmtl::sparse_conv2d_fused", x, row_ptr, col_idx, values, bias, weight_shape, stride,
                    padding, dilation, residual, lo_in, hi_in);
}

at::Tensor sparse_linear_cpu(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                             const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t in_features) {
  const char* op = "adapmtl::sparse_linear";
  const int64_t OC = check_sparse_linear_args(op, x, row_ptr, col_idx, values, bias, in_features, /*reduced=*/false);
  check_cpu_csr(op, x, row_ptr, col_idx.numel(), OC);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = OC;
  const int64_t B = x.numel() / in_features;
  if (B == 0 || OC == 0) return at::zeros(out_shape, x.options()).add_(bias.has_value() ? *bias : at::zeros({}, x.options()));
  const int64_t L = x.scalar_type() == at::kFloat ? Vec<float>::kLanes : Vec<double>::kLanes;
  const int64_t Wrow = round_up(B, L);
  // P = x^T [in][Wrow], the input of a 1x1 convolution whose single output row is the batch.
  const at::Tensor xt = x.reshape({B, in_features}).t();
  auto out = at::empty({1, OC, 1, B}, x.options());
  ConvShape s;
  s.tuning = configured_tuning();
  s.vector_forced = s.tuning.panel == kVectorPanel;
  s.C = in_features, s.taps = 1, s.plane = Wrow, s.row_step = Wrow, s.tap = {0}, s.full_taps = 1, s.tap_of = {0};
  s.rows = 1, s.cols = std::min<int64_t>(kMaxVectors, Wrow / L) * L;
  s.H = 1, s.W = B, s.KH = s.KW = 1, s.sh = s.sw = 1, s.ph = s.pw = 0, s.dh = s.dw = 1;
  const int64_t cols = s.cols;
  // No padding: nothing is skipped, so run_conv never asks for a rerun; it may refuse channel vectors (run_conv).
  const bool vectors_fit = channel_vectors_fit(row_ptr, col_idx, OC, in_features, L);
  for (bool vector = runs_vectors(s.tuning, vectors_fit, 1, B);; vector = false) {
    s.vector = false, s.panel = 1, s.rows = 1, s.cols = cols;
    if (vector) {
      use_vectors(s, 1, B, L);
    } else {
      if (s.tuning.panel == kVectorPanel) s.tuning.panel = 0;
      find_live_taps(s, 1, B, L);
      choose_layout(s, col_idx.numel(), OC, 1, B, x.element_size(), L);  // one tap: channel-major
      use_panel(s, s.tuning.panel ? s.tuning.panel : choose_panel(s, row_ptr, col_idx, OC, B), s.cols / L,
                col_idx.numel(), OC, 1, B, x.element_size(), L);
    }
    Ran ran = Ran::done;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_linear_cpu", [&] {
      ran = run_conv<scalar_t>(op, row_ptr, col_idx, values, bias, out, s,
                               checked_mul(op, "the packed input", in_features, Wrow),
                               [&](scalar_t* P, int64_t, int64_t) {
                                 auto p = at::from_blob(P, {in_features, Wrow}, x.options());
                                 p.narrow(1, B, Wrow - B).zero_();
                                 p.narrow(1, 0, B).copy_(xt);
                               }, [&] { return all_finite<scalar_t>(x); });
    });
    if (ran == Ran::done) break;
  }
  // contiguous, as the op's fake kernel (and F.linear) says: a transposed view fails a compiled graph's stride check
  return out.view({OC, B}).t().contiguous().view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(adapmtl, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cpu);
  m.impl("sparse_conv2d_fused", &sparse_conv2d_fused_cpu);
  m.impl("sparse_linear", &sparse_linear_cpu);
}

}  // namespace adapmtl
