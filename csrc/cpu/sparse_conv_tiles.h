// The register-tile kernels of the CPU sparse convolution (sparse_conv_cpu.cpp has the algorithm and the planner).
//
// Compiled once per CPU capability, each in a translation unit of its own (sparse_conv_tiles_<capability>.cpp): the
// same templates, inlined into one entry point under __attribute__((target)), with ADAPMTL_TILE_NATIVE_BYTES that
// instruction set's vector (below). The planner calls the entry point of torch's CPU capability (cpu_capability(),
// which ATEN_CPU_CAPABILITY=default|avx2|avx512 lowers), so every level runs and is tested on any AVX-512 machine,
// and the three compile in parallel: as one function with target_clones they were one 11-minute job, most of the
// package's build (docs/cpu_sparse_kernel.md, "CPU capabilities"). No torch header here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace adapmtl::cpu_tiles {

// Everything a work item needs; offsets are relative to one image of P.
template <typename T>
struct Plan {
  const T* P;
  const int32_t* off;  // per non-zero, ordered by (output channel, block)
  const T* val;        // same order
  const int32_t* seg;  // [OC][blocks + 1]: segment b of row oc is [seg[oc][b], seg[oc][b + 1])
  const uint8_t* row_live;      // [row groups][taps]: tap t reads some real input row in this row group
  const uint8_t* live_vectors;  // [column tiles][taps][2]: the tile's vectors [lo, hi) where tap t reads
                                // some real input column
  const T* bias;       // nullptr when none
  T* out;              // [N][OC][OH][OW]
  const T* residual;   // the epilogue's addend, laid out as `out` (this pass's images), or nullptr
  const T* residual_all;  // ... from image 0
  bool clamp;          // the epilogue clamps to [lo, hi]
  T lo, hi;
  int64_t OC, OH, OW;
  int64_t in_batch;  // elements of P per image
  int64_t row_step;  // elements of P between consecutive output rows
  int64_t rows;      // output rows per item (<= max_tile_rows(vectors per row))
  int64_t cols;      // output columns per item (<= kMaxVectors vectors)
  int64_t oc_chunk;  // output channels per item
  int64_t blocks;          // = taps * channel_blocks; block b belongs to (pseudo-)tap b / channel_blocks
  int64_t channel_blocks;  // blocks per tap
  int64_t taps;            // taps of the liveness tables: the kernel's taps if tap-major, else 1 (all live)
  // Channel panels (panel > 1, channel-major, one row per tile): the non-zeros of M = panel consecutive output
  // channels grouped by column (input channel, tap) and by which of them a column holds (encode_panels).
  int64_t panel;       // output channels per register tile (1: one channel, the segments above)
  const int32_t* pseg;  // [panels][blocks][2 * panel_keys(panel) + 1]: entry ranges per key, then value starts
  // Channel-vector tiles (vector): per group of L output channels, entries (a column's offset, then its L values in
  // val at L * entry) by block; seg is then [groups][blocks + 1], each group's entry starts (encode_vectors).
  bool vector;
};

// The kernels, in an unnamed namespace: each capability's unit compiles a copy of its own.
namespace {

// The plan's vector is 64 bytes (16 fp32, 8 fp64) at every capability. ADAPMTL_TILE_NATIVE_BYTES, set by the unit
// before it includes this header, is the instruction set's vector: 64 (AVX-512, the default), 32 (AVX2), 16 (SSE2).
#ifndef ADAPMTL_TILE_NATIVE_BYTES
#define ADAPMTL_TILE_NATIVE_BYTES 64
#endif

// A plan vector (64 bytes: 16 fp32, 8 fp64, what offsets and tiles count in) is kParts native vectors of the
// instruction set (1 zmm, 2 ymm, 4 xmm), and the kernels' accumulators and loads are native vectors: GCC keeps a vector
// type wider than the instruction set's in memory, every operation on it a load and a store (measured: the AVX2 kernels
// on one 64-byte type ran 12x slower than AVX-512's and 3.6x slower than oneDNN's dense AVX2 conv, most of their
// instructions stack traffic).
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(ADAPMTL_TILE_NATIVE_BYTES)));  // a native vector
  static constexpr int64_t kLanes = 64 / sizeof(T);                       // lanes of a plan vector
  static constexpr int kParts = 64 / ADAPMTL_TILE_NATIVE_BYTES;            // native vectors per plan vector
  static constexpr int64_t kPartLanes = ADAPMTL_TILE_NATIVE_BYTES / sizeof(T);
};

template <typename T>
inline __attribute__((always_inline)) typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// A register tile holds up to kTileVectors accumulators: rows x vectors per row, at most kMaxVectors per row.
// Rows of two or more vectors get tiles of 2 rows: taller ones (3-4 rows of 3 vectors, 41x41 head maps) touch
// more input rows per non-zero and measured 10-20% slower. Rows of one vector (maps up to 16 fp32 columns wide,
// MobileNetV2's 11x11 heads) get up to 8 rows (tile_rows): each pass over a channel's non-zeros then feeds up to
// 8 FMAs per index and value instead of 2, and the plan is read once per 8 output rows instead of per 2.
constexpr int kTileVectors = 8;
constexpr int kMaxVectors = 4;  // vectors of output pixels per register tile row

// The most rows a tile of rows of nv vectors may have: only one-vector rows go past 2 (4 rows of 2 vectors measured
// no faster than 2 at 21x21, and every allowed height is compiled for each vector count).
constexpr int64_t max_tile_rows(int64_t nv) { return nv == 1 ? kTileVectors : 2; }

// One output channel of a tile: R rows x vectors [V0, V1) of NV, over non-zeros [k0, k1).
template <typename T, int NV, int R, int V0, int V1>
inline __attribute__((always_inline)) void accumulate(typename Vec<T>::type (&acc)[R][NV * Vec<T>::kParts],
                                                      const T* __restrict base, int64_t row_step,
                                                      const int32_t* __restrict off, const T* __restrict val,
                                                      int64_t k0, int64_t k1) {
  constexpr int kP = Vec<T>::kParts;
  constexpr int64_t PL = Vec<T>::kPartLanes;
  // One base pointer per row keeps every load a single [base + off * sizeof(T) + i * native vector bytes] address.
  const T* rowp[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) rowp[r] = base + r * row_step;
  for (int64_t k = k0; k < k1; ++k) {
    const T v = val[k];
    const int64_t o = off[k];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int i = V0 * kP; i < V1 * kP; ++i) acc[r][i] += v * load(rowp[r] + o + i * PL);
  }
}

// The epilogue of one tile row about to be stored at `o` (count pixels): + the residual there, then the clamp.
template <typename T, int NV>
inline __attribute__((always_inline)) void epilogue(const Plan<T>& g, typename Vec<T>::type (&acc)[NV * Vec<T>::kParts],
                                                    const T* o, int64_t count) {
  using V = typename Vec<T>::type;
  constexpr int kN = NV * Vec<T>::kParts;
  if (g.residual) {
    V r[kN] = {};  // lanes past `count` are never stored
    std::memcpy(&r[0], g.residual + (o - g.out), count * sizeof(T));
#pragma GCC unroll 16
    for (int i = 0; i < kN; ++i) acc[i] += r[i];
  }
  if (g.clamp) {
    const V lo = V{} + g.lo, hi = V{} + g.hi;
#pragma GCC unroll 16
    for (int i = 0; i < kN; ++i) {
      acc[i] = acc[i] < lo ? lo : acc[i];
      acc[i] = acc[i] > hi ? hi : acc[i];
    }
  }
}

// Block b of the tile over output channels [oc0, oc1); only vectors [V0, V1) of the tile read real input
// in this block (V0 == V1: none, the block only starts and/or stores the tiles).
template <typename T, int NV, int R, int V0, int V1>
inline __attribute__((always_inline)) void sweep(const Plan<T>& g, const T* base, int64_t b, bool first, bool last,
                                                 T* out, int64_t count, int64_t oc0, int64_t oc1,
                                                 T* __restrict scratch) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::kLanes;
  const int64_t stride = g.blocks + 1;
  for (int64_t oc = oc0; oc < oc1; ++oc) {
    const int32_t k0 = g.seg[oc * stride + b], k1 = V0 < V1 ? g.seg[oc * stride + b + 1] : k0;
    if (k0 == k1 && !first && !last) continue;  // the parked tile is already right
    V acc[R][NV * Vec<T>::kParts];
    T* park = scratch + (oc - oc0) * (R * NV * L);
    if (first) {
      const T bv = g.bias ? g.bias[oc] : T(0);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int i = 0; i < NV * Vec<T>::kParts; ++i) acc[r][i] = V{} + bv;
    } else {
      std::memcpy(&acc[0][0], park, sizeof(acc));
    }
    accumulate<T, NV, R, V0, V1>(acc, base, g.row_step, g.off, g.val, k0, k1);
    if (last) {
      T* o = out + oc * g.OH * g.OW;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        epilogue<T, NV>(g, acc[r], o + r * g.OW, count);
        std::memcpy(o + r * g.OW, &acc[r][0], count * sizeof(T));
      }
    } else {
      std::memcpy(park, &acc[0][0], sizeof(acc));
    }
  }
}

// sweep<..., v0, v1> for runtime 0 <= v0 <= v1 <= NV, trying (V0, V1) = (0, 0), (0, 1), .., (NV, NV).
template <typename T, int NV, int R, int V0 = 0, int V1 = 0>
inline __attribute__((always_inline)) void sweep_vectors(int64_t v0, int64_t v1, const Plan<T>& g, const T* base,
                                                         int64_t b, bool first, bool last, T* out, int64_t count,
                                                         int64_t oc0, int64_t oc1, T* scratch) {
  if constexpr (V1 > NV) {
    if constexpr (V0 < NV) sweep_vectors<T, NV, R, V0 + 1, V0 + 1>(v0, v1, g, base, b, first, last, out, count, oc0,
                                                                   oc1, scratch);
  } else if (v0 == V0 && v1 == V1) {
    sweep<T, NV, R, V0, V1>(g, base, b, first, last, out, count, oc0, oc1, scratch);
  } else {
    sweep_vectors<T, NV, R, V0, V1 + 1>(v0, v1, g, base, b, first, last, out, count, oc0, oc1, scratch);
  }
}

// Output channels [oc0, oc1) of row group `group` (rows [oy, oy + R)) and column tile `tile` (columns
// [ox, ox + count)) of image n.
template <typename T, int NV, int R>
inline __attribute__((always_inline)) void item(const Plan<T>& g, int64_t n, int64_t group, int64_t tile,
                                                int64_t count, int64_t oc0, int64_t oc1, T* __restrict scratch) {
  const int64_t oy = group * g.rows, ox = tile * g.cols;
  const T* base = g.P + n * g.in_batch + oy * g.row_step + ox;
  T* out = g.out + (n * g.OC * g.OH + oy) * g.OW + ox;
  const uint8_t* row_live = g.row_live + group * g.taps;
  const uint8_t* vectors = g.live_vectors + tile * g.taps * 2;
  const auto live = [&](int64_t b) {
    const int64_t t = b / g.channel_blocks;
    return row_live[t] && vectors[2 * t] < vectors[2 * t + 1];
  };
  // The first live block starts the tiles from the bias, the last one stores them; a tile with no live
  // block at all (it reads only padding) runs block 0 as an empty one and stores the bias.
  int64_t b_first = 0, b_last = 0;
  while (b_first < g.blocks && !live(b_first)) ++b_first;
  if (b_first == g.blocks) {
    b_first = 0;
  } else {
    b_last = g.blocks - 1;
    while (!live(b_last)) --b_last;
  }
  for (int64_t b = b_first; b <= b_last; ++b) {
    const bool first = b == b_first, last = b == b_last, on = live(b);
    if (!on && !first && !last) continue;
    const int64_t t = b / g.channel_blocks;
    const int64_t v0 = on ? vectors[2 * t] : 0, v1 = on ? vectors[2 * t + 1] : 0;
    sweep_vectors<T, NV, R>(v0, v1, g, base, b, first, last, out, count, oc0, oc1, scratch);
  }
}

// item<T, NV, rows> for runtime 1 <= rows <= max_tile_rows(NV) (a row group's rows: the last may be shorter).
template <typename T, int NV, int R = 1>
inline __attribute__((always_inline)) void item_rows(const Plan<T>& g, int64_t rows, int64_t n, int64_t group,
                                                     int64_t tile, int64_t count, int64_t oc0, int64_t oc1,
                                                     T* scratch) {
  if constexpr (R <= max_tile_rows(NV)) {
    if (rows == R) {
      item<T, NV, R>(g, n, group, tile, count, oc0, oc1, scratch);
    } else {
      item_rows<T, NV, R + 1>(g, rows, n, group, tile, count, oc0, oc1, scratch);
    }
  }
}

// ---- Channel panels --------------------------------------------------------------------------------------
// A tile of one row x NV vectors for each of M consecutive output channels. A column of the weight (input
// channel, tap) that several of them hold is loaded once and feeds each of their accumulators: NV loads
// for popcount(pattern) x NV FMAs instead of one load per FMA. The columns of a panel and block are grouped
// by their pattern (which of the M channels hold them) and each group runs one micro-kernel compiled for its
// pattern, so the kernel has no per-matrix code (Sparse Register Tiling, Wilkinson et al., PLDI'23, groups
// columns the same way). M = 4: a key per pattern (15). M = 8: a key for the full pattern, and the other
// patterns run as their two halves (15 + 15 keys). A weight pruned in blocks of 4 or 8 output channels has
// full patterns only; docs/cpu_sparse_kernel.md has what each panel reaches on unstructured and block weights.
// Keys of an M-panel, and the channels (bit mask) key `key` multiplies into; the kernels take both as template
// arguments, the encoder (encode_panels) calls them at run time.
constexpr int panel_keys(int64_t M) { return M == 4 ? 15 : 31; }

constexpr int panel_key_mask(int64_t M, int key) {
  return M == 4 ? key + 1 : key < 15 ? key + 1 : key < 30 ? (key - 14) << 4 : 255;
}

// Columns [e0, e1) of one pattern: NV input loads each, then one FMA per channel of the pattern per vector;
// the values of a column are stored together, in channel order (w advances by popcount(MASK) per column).
template <typename T, int M, int NV, int MASK>
inline __attribute__((always_inline)) void panel_columns(typename Vec<T>::type (&acc)[M][NV * Vec<T>::kParts],
                                                         const T* __restrict base, const int32_t* __restrict off,
                                                         const T* __restrict w, int64_t e0, int64_t e1) {
  using V = typename Vec<T>::type;
  constexpr int kN = NV * Vec<T>::kParts;
  constexpr int64_t PL = Vec<T>::kPartLanes;
  constexpr int n = __builtin_popcount(MASK);
  for (int64_t e = e0; e < e1; ++e, w += n) {
    const T* b = base + off[e];
    V x[kN];
#pragma GCC unroll 16
    for (int i = 0; i < kN; ++i) x[i] = load(b + i * PL);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      if (MASK >> m & 1) {
        const T v = w[__builtin_popcount(MASK & ((1 << m) - 1))];
#pragma GCC unroll 16
        for (int i = 0; i < kN; ++i) acc[m][i] += v * x[i];
      }
    }
  }
}

template <typename T, int M, int NV, int KEY = 0>
inline __attribute__((always_inline)) void panel_all_keys(typename Vec<T>::type (&acc)[M][NV * Vec<T>::kParts],
                                                          const T* base, const int32_t* off, const T* val,
                                                          const int32_t* sg) {
  constexpr int K = panel_keys(M);
  if constexpr (KEY < K) {
    const int32_t e0 = sg[KEY], e1 = sg[KEY + 1];
    if (e0 < e1) panel_columns<T, M, NV, panel_key_mask(M, KEY)>(acc, base, off, val + sg[K + 1 + KEY], e0, e1);
    panel_all_keys<T, M, NV, KEY + 1>(acc, base, off, val, sg);
  }
}

// Block b of the tile over the panels of output channels [oc0, oc1) (oc0 a multiple of M).
template <typename T, int M, int NV>
inline __attribute__((always_inline)) void sweep_panel(const Plan<T>& g, const T* base, int64_t b, bool first,
                                                       bool last, T* out, int64_t count, int64_t oc0, int64_t oc1,
                                                       T* __restrict scratch) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::kLanes;
  constexpr int K = panel_keys(M);
  for (int64_t p0 = oc0; p0 < oc1; p0 += M) {
    const int32_t* sg = g.pseg + ((p0 / M) * g.blocks + b) * (2 * K + 1);
    if (sg[0] == sg[K] && !first && !last) continue;  // the parked tiles are already right
    const int64_t valid = std::min<int64_t>(M, g.OC - p0);  // the last panel may hold fewer channels
    V acc[M][NV * Vec<T>::kParts];
    T* park = scratch + (p0 - oc0) * (NV * L);
    if (first) {
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const T bv = g.bias && m < valid ? g.bias[p0 + m] : T(0);
#pragma GCC unroll 16
        for (int i = 0; i < NV * Vec<T>::kParts; ++i) acc[m][i] = V{} + bv;
      }
    } else {
      std::memcpy(&acc[0][0], park, sizeof(acc));
    }
    panel_all_keys<T, M, NV>(acc, base, g.off, g.val, sg);
    if (last) {
      for (int64_t m = 0; m < valid; ++m) {
        epilogue<T, NV>(g, acc[m], out + (p0 + m) * g.OH * g.OW, count);
        std::memcpy(out + (p0 + m) * g.OH * g.OW, &acc[m][0], count * sizeof(T));
      }
    } else {
      std::memcpy(park, &acc[0][0], sizeof(acc));
    }
  }
}

// Output channels [oc0, oc1) of output row `group` and column tile `tile` of image n, over every block.
template <typename T, int M, int NV>
inline __attribute__((always_inline)) void item_panel(const Plan<T>& g, int64_t n, int64_t group, int64_t tile,
                                                      int64_t count, int64_t oc0, int64_t oc1, T* __restrict scratch) {
  const int64_t oy = group, ox = tile * g.cols;
  const T* base = g.P + n * g.in_batch + oy * g.row_step + ox;
  T* out = g.out + (n * g.OC * g.OH + oy) * g.OW + ox;
  for (int64_t b = 0; b < g.blocks; ++b)
    sweep_panel<T, M, NV>(g, base, b, b == 0, b == g.blocks - 1, out, count, oc0, oc1, scratch);
}

// ---- Channel-vector tiles ----------------------------------------------------------------------------------
// Where every L consecutive output channels (one vector: 16 fp32, 8 fp64) hold the same columns -- a weight pruned
// in L x 1 blocks or larger, by us or another library -- the tile turns around: one vector of L output channels at
// each of P <= kVectorPixels consecutive output pixels of one row (P accumulators). Per column of the group: one load
// of its L values, then P multiply-adds whose input element is broadcast from memory (AVX-512's embedded broadcast),
// so an input element costs 4 bytes per L multiply-adds, where a pixel-vector tile loads 64 bytes per multiply-add (one
// channel) or per 4 (a panel of 4): what limits the other tiles is that input traffic (docs/cpu_sparse_kernel.md).
// Every block of the group runs in registers (nothing parked); tap-major blocks whose tap reads only padding for the
// tile are skipped. The tile is stored element by element, transposed, with the epilogue (transposing it in
// registers first, 64 shuffles, measured no faster: docs/cpu_sparse_kernel.md).

// The most pixels a channel-vector tile holds: 28 accumulators and the loaded values fill AVX-512's 32 vector
// registers. Below the AVX512 capability (16 vector registers) tiles keep the 16 pixels they had before 28 was
// measured on AVX-512; 28 was not tried there.
constexpr int kVectorPixels = 28;
constexpr int kVectorPixelsBelowAvx512 = 16;

template <typename T, int P>
inline __attribute__((always_inline)) void item_vectors(const Plan<T>& g, int64_t n, int64_t row, int64_t tile,
                                                        int64_t oc0, int64_t oc1) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::kLanes;
  constexpr int kP = Vec<T>::kParts;
  constexpr int64_t PL = Vec<T>::kPartLanes;
  const int64_t ox = tile * g.cols, plane = g.OH * g.OW, stride = g.blocks + 1;
  const T* base = g.P + n * g.in_batch + row * g.row_step + ox;
  T* out = g.out + (n * g.OC * g.OH + row) * g.OW + ox;
  const uint8_t* row_live = g.row_live + row * g.taps;
  const uint8_t* vectors = g.live_vectors + tile * g.taps * 2;
  for (int64_t p0 = oc0; p0 < oc1; p0 += L) {
    const int32_t* sg = g.seg + (p0 / L) * stride;
    const int64_t valid = std::min<int64_t>(L, g.OC - p0);  // the last group may hold fewer channels
    T bias[L] = {};
    if (g.bias)
      for (int64_t m = 0; m < valid; ++m) bias[m] = g.bias[p0 + m];
    V init[kP];
#pragma GCC unroll 4
    for (int j = 0; j < kP; ++j) init[j] = load(bias + j * PL);
    V acc[P][kP];  // acc[i]: the group's L channels at pixel i
#pragma GCC unroll 28
    for (int i = 0; i < P; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < kP; ++j) acc[i][j] = init[j];
    for (int64_t b = 0; b < g.blocks; ++b) {
      const int64_t t = b / g.channel_blocks;
      if (!row_live[t] || vectors[2 * t] >= vectors[2 * t + 1]) continue;
      const T* __restrict w = g.val + int64_t(sg[b]) * L;
      for (int32_t e = sg[b]; e < sg[b + 1]; ++e, w += L) {
        V v[kP];
#pragma GCC unroll 4
        for (int j = 0; j < kP; ++j) v[j] = load(w + j * PL);
        const T* __restrict x = base + g.off[e];
#pragma GCC unroll 28
        for (int i = 0; i < P; ++i)
#pragma GCC unroll 4
          for (int j = 0; j < kP; ++j) acc[i][j] += v[j] * x[i];
      }
    }
    T tile_out[P][L];  // lane m of acc[i]: channel p0 + m at pixel i
    std::memcpy(tile_out, acc, sizeof(tile_out));
    for (int64_t m = 0; m < valid; ++m) {
      T* o = out + (p0 + m) * plane;
      const T* r = g.residual ? g.residual + (o - g.out) : nullptr;
#pragma GCC unroll 28
      for (int i = 0; i < P; ++i) {  // as epilogue(): + the residual, then the clamp (a NaN stays NaN)
        T v = tile_out[i][m];
        if (r) v += r[i];
        if (g.clamp) {
          v = v < g.lo ? g.lo : v;
          v = v > g.hi ? g.hi : v;
        }
        o[i] = v;
      }
    }
  }
}

// item_vectors<T, count> for runtime 1 <= count <= kVectorPixels (the pixels of the tile: the last one of a row may
// be short).
template <typename T, int P = 1>
inline __attribute__((always_inline)) void item_vectors_count(const Plan<T>& g, int64_t count, int64_t n, int64_t row,
                                                              int64_t tile, int64_t oc0, int64_t oc1) {
  if constexpr (P <= kVectorPixels) {
    if (count == P) {
      item_vectors<T, P>(g, n, row, tile, oc0, oc1);
    } else {
      item_vectors_count<T, P + 1>(g, count, n, row, tile, oc0, oc1);
    }
  }
}

// Items [begin, end) of the (n, row group, column tile, channel chunk) space, channel chunk fastest so the
// input rows of a row group stay in L2 while the chunks pass over them.
template <typename T>
inline __attribute__((always_inline)) void run_items(const Plan<T>& g, int64_t begin, int64_t end, T* scratch) {
  constexpr int64_t L = Vec<T>::kLanes;
  const int64_t chunks = (g.OC + g.oc_chunk - 1) / g.oc_chunk;
  const int64_t tiles = (g.OW + g.cols - 1) / g.cols;
  const int64_t groups = (g.OH + g.rows - 1) / g.rows;
  for (int64_t it = begin; it < end; ++it) {
    const int64_t chunk = it % chunks;
    const int64_t tile = (it / chunks) % tiles;
    const int64_t group = (it / (chunks * tiles)) % groups;
    const int64_t n = it / (chunks * tiles * groups);
    const int64_t oc0 = chunk * g.oc_chunk, oc1 = std::min(g.OC, oc0 + g.oc_chunk);
    const int64_t count = std::min(g.cols, g.OW - tile * g.cols);
    const int64_t rows = std::min(g.rows, g.OH - group * g.rows);
    if (g.vector) {
      item_vectors_count<T>(g, count, n, group, tile, oc0, oc1);
      continue;
    }
    if (g.panel == 4) {
      switch ((count + L - 1) / L) {
        case 1: item_panel<T, 4, 1>(g, n, group, tile, count, oc0, oc1, scratch); break;
        case 2: item_panel<T, 4, 2>(g, n, group, tile, count, oc0, oc1, scratch); break;
        case 3: item_panel<T, 4, 3>(g, n, group, tile, count, oc0, oc1, scratch); break;
        default: item_panel<T, 4, 4>(g, n, group, tile, count, oc0, oc1, scratch); break;
      }
      continue;
    }
    if (g.panel == 8) {
      switch ((count + L - 1) / L) {
        case 1: item_panel<T, 8, 1>(g, n, group, tile, count, oc0, oc1, scratch); break;
        case 2: item_panel<T, 8, 2>(g, n, group, tile, count, oc0, oc1, scratch); break;
        default: item_panel<T, 8, 3>(g, n, group, tile, count, oc0, oc1, scratch); break;
      }
      continue;
    }
    switch ((count + L - 1) / L) {
      case 1: item_rows<T, 1>(g, rows, n, group, tile, count, oc0, oc1, scratch); break;
      case 2: item_rows<T, 2>(g, rows, n, group, tile, count, oc0, oc1, scratch); break;
      case 3: item_rows<T, 3>(g, rows, n, group, tile, count, oc0, oc1, scratch); break;
      default: item_rows<T, 4>(g, rows, n, group, tile, count, oc0, oc1, scratch); break;
    }
  }
}

}  // namespace

// The entry points, one per capability. x86-64 with GCC only (as the target attributes are); elsewhere the
// baseline runs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ADAPMTL_TILES_X86 1
#define ADAPMTL_TARGET_AVX512 __attribute__((target("avx512f")))
#define ADAPMTL_TARGET_AVX2 __attribute__((target("avx2,fma")))  // torch's AVX2 capability includes FMA
ADAPMTL_TARGET_AVX512 void run_items_avx512(const Plan<float>& g, int64_t begin, int64_t end, float* scratch);
ADAPMTL_TARGET_AVX512 void run_items_avx512(const Plan<double>& g, int64_t begin, int64_t end, double* scratch);
ADAPMTL_TARGET_AVX2 void run_items_avx2(const Plan<float>& g, int64_t begin, int64_t end, float* scratch);
ADAPMTL_TARGET_AVX2 void run_items_avx2(const Plan<double>& g, int64_t begin, int64_t end, double* scratch);
#endif
void run_items_baseline(const Plan<float>& g, int64_t begin, int64_t end, float* scratch);
void run_items_baseline(const Plan<double>& g, int64_t begin, int64_t end, double* scratch);

// The definitions, one line in each capability's unit: run_items for fp32 and fp64 under that unit's target.
#define ADAPMTL_TILES_ENTRIES(NAME, TARGET)                                               \
  TARGET void NAME(const Plan<float>& g, int64_t begin, int64_t end, float* scratch) {   \
    run_items(g, begin, end, scratch);                                                  \
  }                                                                                     \
  TARGET void NAME(const Plan<double>& g, int64_t begin, int64_t end, double* scratch) { \
    run_items(g, begin, end, scratch);                                                  \
  }

}  // namespace adapmtl::cpu_tiles
