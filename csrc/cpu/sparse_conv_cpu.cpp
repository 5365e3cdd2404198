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
// kernel keeps a tile of up to 2 rows x 4 vectors of output pixels of one output channel in registers,
// streams that channel's non-zeros through it (broadcast value, vector loads at the offset, FMA) and stores
// it. Whole-vector loads past the last output column stay inside the row (those lanes are never stored).
//
// Cache blocking: every non-zero costs one vector load per accumulator, and nothing is reused within an
// output channel, so the input rows a tile reads must stay in cache while the output channels stream past.
// A work item is (image, row pair, column tile, chunk of output channels); inside it the input channels are
// cut into blocks, and each block is swept over all output channels of the chunk (the non-zeros of a row are
// split into per-block segments once per call), with the partial tiles parked in a per-thread scratch
// between blocks.
//
// sparse_linear is the same kernel on a 1x1 "convolution" whose output row is the batch: x^T [in][B].
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "common.h"
#include "cpu/huge_pages.h"

namespace adapmtl {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ADAPMTL_SPARSE_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ADAPMTL_SPARSE_MULTIVERSION
#endif

// 64-byte GCC vectors: one zmm with AVX-512, lowered to 2 ymm / 4 xmm on the other clones.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int64_t kLanes = 64 / sizeof(T);
};

template <typename T>
inline __attribute__((always_inline)) typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Two rows of up to four vectors: taller tiles (3-4 rows) amortise the index and value loads over more
// FMAs but touch more input rows per non-zero, and measured 10-20% slower on the head convs.
constexpr int kMaxRows = 2;     // output rows per register tile
constexpr int kMaxVectors = 4;  // vectors of output pixels per register tile row

// Everything a work item needs; offsets are relative to one image of P.
template <typename T>
struct Plan {
  const T* P;
  const int32_t* off;  // per non-zero, ordered by (output channel, input-channel block)
  const T* val;        // same order
  const int32_t* seg;  // [OC][blocks + 1]: segment b of row oc is [seg[oc][b], seg[oc][b + 1])
  const T* bias;       // nullptr when none
  T* out;              // [N][OC][OH][OW]
  int64_t OC, OH, OW;
  int64_t in_batch;  // elements of P per image
  int64_t row_step;  // elements of P between consecutive output rows
  int64_t rows;      // output rows per item (<= kMaxRows)
  int64_t cols;      // output columns per item (<= kMaxVectors vectors)
  int64_t oc_chunk;  // output channels per item
  int64_t blocks;    // input-channel blocks
};

// One output channel of a tile: R rows x NV vectors, over non-zeros [k0, k1).
template <typename T, int NV, int R>
inline __attribute__((always_inline)) void accumulate(typename Vec<T>::type (&acc)[R][NV], const T* __restrict base,
                                                      int64_t row_step, const int32_t* __restrict off,
                                                      const T* __restrict val, int64_t k0, int64_t k1) {
  constexpr int64_t L = Vec<T>::kLanes;
  // One base pointer per row keeps every load a single [base + off * sizeof(T) + i * 64] address.
  const T* rowp[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) rowp[r] = base + r * row_step;
  for (int64_t k = k0; k < k1; ++k) {
    const T v = val[k];
    const int64_t o = off[k];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) acc[r][i] += v * load(rowp[r] + o + i * L);
  }
}

// Output channels [oc0, oc1) of rows [oy, oy + R) and columns [ox, ox + count) of image n.
template <typename T, int NV, int R>
inline __attribute__((always_inline)) void item(const Plan<T>& g, int64_t n, int64_t oy, int64_t ox, int64_t count,
                                                int64_t oc0, int64_t oc1, T* __restrict scratch) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::kLanes;
  const T* base = g.P + n * g.in_batch + oy * g.row_step + ox;
  const int64_t stride = g.blocks + 1;
  for (int64_t b = 0; b < g.blocks; ++b) {
    const bool first = b == 0, last = b == g.blocks - 1;
    for (int64_t oc = oc0; oc < oc1; ++oc) {
      const int32_t k0 = g.seg[oc * stride + b], k1 = g.seg[oc * stride + b + 1];
      if (k0 == k1 && !first && !last) continue;  // the parked tile is already right
      V acc[R][NV];
      T* park = scratch + (oc - oc0) * (R * NV * L);
      if (first) {
        const T bv = g.bias ? g.bias[oc] : T(0);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
          for (int i = 0; i < NV; ++i) acc[r][i] = V{} + bv;
      } else {
        std::memcpy(&acc[0][0], park, sizeof(acc));
      }
      accumulate<T, NV, R>(acc, base, g.row_step, g.off, g.val, k0, k1);
      if (last) {
        T* o = g.out + ((n * g.OC + oc) * g.OH + oy) * g.OW + ox;
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) std::memcpy(o + r * g.OW, &acc[r][0], count * sizeof(T));
      } else {
        std::memcpy(park, &acc[0][0], sizeof(acc));
      }
    }
  }
}

template <typename T, int NV>
inline __attribute__((always_inline)) void item_rows(const Plan<T>& g, int64_t rows, int64_t n, int64_t oy,
                                                     int64_t ox, int64_t count, int64_t oc0, int64_t oc1, T* scratch) {
  if (rows == 2) {
    item<T, NV, 2>(g, n, oy, ox, count, oc0, oc1, scratch);
  } else {
    item<T, NV, 1>(g, n, oy, ox, count, oc0, oc1, scratch);
  }
}

// Items [begin, end) of the (n, row group, column tile, channel chunk) space, channel chunk fastest so the
// input rows of a row group stay in L2 while the chunks pass over them.
template <typename T>
ADAPMTL_SPARSE_MULTIVERSION void run_items(const Plan<T>& g, int64_t begin, int64_t end, T* scratch) {
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
    const int64_t ox = tile * g.cols, count = std::min(g.cols, g.OW - ox);
    const int64_t oy = group * g.rows, rows = std::min(g.rows, g.OH - oy);
    switch ((count + L - 1) / L) {
      case 1: item_rows<T, 1>(g, rows, n, oy, ox, count, oc0, oc1, scratch); break;
      case 2: item_rows<T, 2>(g, rows, n, oy, ox, count, oc0, oc1, scratch); break;
      case 3: item_rows<T, 3>(g, rows, n, oy, ox, count, oc0, oc1, scratch); break;
      default: item_rows<T, 4>(g, rows, n, oy, ox, count, oc0, oc1, scratch); break;
    }
  }
}

// Checks x and the CSR arrays' dtypes, shapes and row pointers. The column indices are validated where
// run_conv reads them (one parallel pass instead of a serial one): they come from user code, so a bad index
// must raise instead of reading out of bounds.
void check_csr(const char* op, const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
               const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t rows) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": argument 'x' must be a CPU tensor, got ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   ": the CPU kernel supports argument 'x' of dtype float32 or float64, got ", x.scalar_type());
  check_csr_arrays(op, x, row_ptr, col_idx, values, bias, rows);
  auto rp = row_ptr.contiguous();
  const int32_t* r = rp.data_ptr<int32_t>();
  const int64_t nnz = col_idx.numel();
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
  int64_t bytes_per_row_tile;   // input bytes of one channel that a tile touches
};

// Input-channel block size: as many channels as keep a work item's input within kL1Budget bytes, but at
// least enough that a row segment averages kMinSegment non-zeros, else parking the tile between blocks
// costs more than the misses it saves. Measured on the ResNet-34 head convs (2-core EPYC, AVX-512): with
// 32 KiB of L1 the second rule wins at 90% sparsity (blocks of ~45 channels, an L2-sized working set);
// no blocking at all was 10-25% slower, L1-sized blocks with short segments 20-40% slower.
constexpr int64_t kL1Budget = 20 << 10;
constexpr double kMinSegment = 40.0;

int64_t channel_block(const ConvShape& s, int64_t nnz, int64_t OC) {
  const int64_t fit = std::max<int64_t>(1, kL1Budget / std::max<int64_t>(1, s.bytes_per_row_tile));
  const double nnz_per_channel = double(nnz) / double(std::max<int64_t>(1, OC)) / double(s.C);
  const int64_t dense_enough = nnz_per_channel > 0 ? int64_t(kMinSegment / nnz_per_channel) + 1 : s.C;
  return std::min(s.C, std::max(fit, dense_enough));
}

// pack(P, n0, count) writes images [n0, n0 + count) of the input into P (in_batch elements each).
template <typename T, typename Pack>
void run_conv(const char* op, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
              const c10::optional<at::Tensor>& bias, at::Tensor& out, const ConvShape& s, int64_t in_batch,
              const Pack& pack) {
  constexpr int64_t L = Vec<T>::kLanes;
  const int64_t N = out.size(0), OC = out.size(1), OH = out.size(2), OW = out.size(3);
  TORCH_CHECK_VALUE(in_batch <= std::numeric_limits<int32_t>::max(), op, ": one image of the padded input holds ",
                    in_batch, " elements, more than the CPU kernel's int32 offsets address");
  const at::Tensor rp_t = row_ptr.contiguous(), ci_t = col_idx.contiguous(), val_t = values.contiguous();
  const int32_t* rp = rp_t.data_ptr<int32_t>();
  const int32_t* ci = ci_t.data_ptr<int32_t>();
  const T* vals = val_t.data_ptr<T>();
  const int64_t nnz = ci_t.numel();

  const int64_t rows = s.rows, cols = s.cols;
  const int64_t cb = channel_block(s, nnz, OC);
  const int64_t blocks = (s.C + cb - 1) / cb;

  // Per column of a weight row: its offset in P and its channel block. A table, so that the per-non-zero
  // pass below does no integer division (two divisions per non-zero cost ~1.5 ms on a 470k-non-zero conv).
  const int64_t ncols = s.C * s.taps;
  std::vector<int32_t> col_off(ncols), col_block(ncols);
  for (int64_t c = 0; c < s.C; ++c) {
    for (int64_t t = 0; t < s.taps; ++t) {
      col_off[c * s.taps + t] = int32_t(c * s.plane + s.tap[t]);
      col_block[c * s.taps + t] = int32_t(c / cb);
    }
  }
  // Validate each row's columns, order them (SparseWeight's rows already are; user-built ones may not be),
  // turn each non-zero into its offset in P and cut the row into per-block segments.
  std::vector<int32_t> off(nnz), seg(OC * (blocks + 1));
  std::vector<T> val(nnz);
  at::parallel_for(0, OC, 16, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> order;
    for (int64_t oc = begin; oc < end; ++oc) {
      const int64_t k0 = rp[oc], n = rp[oc + 1] - k0;
      const int32_t* c = ci + k0;
      bool row_sorted = true;
      for (int64_t j = 0; j < n; ++j) {
        TORCH_CHECK_VALUE(c[j] >= 0 && c[j] < ncols, op, ": argument 'col_idx' entries must lie in [0, ", ncols,
                          "), got ", c[j], " at position ", k0 + j);
        row_sorted = row_sorted && (j == 0 || c[j - 1] < c[j]);
      }
      if (!row_sorted) {
        order.resize(n);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return c[a] < c[b]; });
      }
      int32_t* sg = seg.data() + oc * (blocks + 1);
      int64_t b = 0;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t src = row_sorted ? j : order[j];
        const int32_t col = c[src];
        while (b <= col_block[col]) sg[b++] = int32_t(k0 + j);
        off[k0 + j] = col_off[col];
        val[k0 + j] = vals[k0 + src];
      }
      while (b <= blocks) sg[b++] = int32_t(k0 + n);
    }
  });

  Plan<T> g;
  g.off = off.data();
  g.val = val.data();
  g.seg = seg.data();
  at::Tensor b_t;
  if (bias.has_value()) b_t = bias->contiguous();
  g.bias = bias.has_value() ? b_t.data_ptr<T>() : nullptr;
  g.OC = OC, g.OH = OH, g.OW = OW;
  g.in_batch = in_batch;
  g.row_step = s.row_step;
  g.rows = rows, g.cols = cols, g.blocks = blocks;
  // Chunks of output channels: enough items to balance the threads; parked tiles (<= 64 KiB) stay in L2.
  g.oc_chunk = std::min<int64_t>(OC, 128);
  const int64_t scratch_len = blocks > 1 ? g.oc_chunk * kMaxRows * kMaxVectors * L : 0;

  // Images go through in passes whose packed input fits the reused workspace: a fresh buffer for a whole
  // large batch costs more in page faults than the kernel (measured: batch 16, 1x1 1024->1024 at 41x41,
  // ~150 ms of faults per call on top of a 60 ms kernel).
  const int64_t per_pass = std::clamp<int64_t>(kMaxCachedBytes / (in_batch * int64_t(sizeof(T))), 1, N);
  at::Tensor P = workspace(per_pass * in_batch, out.options());
  for (int64_t n0 = 0; n0 < N; n0 += per_pass) {
    const int64_t count = std::min(per_pass, N - n0);  // images in this pass
    g.P = P.data_ptr<T>();
    g.out = out.data_ptr<T>() + n0 * OC * OH * OW;
    pack(P.data_ptr<T>(), n0, count);
    const int64_t items = count * ((OH + rows - 1) / rows) * ((OW + cols - 1) / cols) * ((OC + g.oc_chunk - 1) / g.oc_chunk);
    const int64_t work = nnz * OH * OW * count;  // multiply-adds
    const int64_t per_item = std::max<int64_t>(1, work / std::max<int64_t>(1, items));
    // Below ~1M multiply-adds everything runs on the calling thread (parallel_for runs a range no larger than
    // its grain inline): waking the pool costs more than such a call. Otherwise ~256k multiply-adds per task.
    const int64_t grain = work < (int64_t(1) << 20) ? items : std::max<int64_t>(1, (int64_t(1) << 18) / per_item);
    at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(scratch_len);
      run_items<T>(g, begin, end, scratch.data());
    });
  }
}

// Pad + copy images [n0, n0 + count) of x into P, any input strides (NCHW, channels-last, views). Every
// element of P is written (data or zero), so the reused buffer needs no separate clearing pass.
template <typename T>
void pack_conv_input(const at::Tensor& x, T* P, int64_t n0, int64_t count, const ConvShape& s, int64_t ph,
                     int64_t pw, int64_t sw, int64_t Wrow, const std::vector<std::pair<int64_t, int64_t>>& copies) {
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), U = copies.size();
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
      std::fill(dst, dst + ph * U * Wrow, T(0));
      std::fill(dst + (ph + H) * U * Wrow, dst + s.plane, T(0));
      for (int64_t iy = 0; iy < H; ++iy) {
        const T* srow = src + iy * s2;
        for (int64_t u = 0; u < U; ++u) {
          T* drow = dst + ((iy + ph) * U + u) * Wrow;
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

at::Tensor sparse_conv2d_cpu(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                             const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                             at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  const char* op = "adapmtl::sparse_conv2d";
  TORCH_CHECK_VALUE(weight_shape.size() == 4, op, ": argument 'weight_shape' must be [C_out, C_in, KH, KW], got ",
                    weight_shape);
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                    ": arguments 'stride', 'padding' and 'dilation' must have 2 entries each");
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": argument 'x' must be 4-D [N, C_in, H, W], got shape ", x.sizes());
  const int64_t OC = weight_shape[0], C = weight_shape[1], KH = weight_shape[2], KW = weight_shape[3];
  TORCH_CHECK_VALUE(OC >= 0 && C > 0 && KH > 0 && KW > 0, op, ": argument 'weight_shape' must be positive, got ",
                    weight_shape);
  TORCH_CHECK_VALUE(x.size(1) == C, op, ": argument 'x' must have ", C, " channels (weight_shape[1]), got ",
                    x.size(1));
  const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1], dh = dilation[0],
                dw = dilation[1];
  TORCH_CHECK_VALUE(sh > 0 && sw > 0, op, ": argument 'stride' must be positive, got ", stride);
  TORCH_CHECK_VALUE(dh > 0 && dw > 0, op, ": argument 'dilation' must be positive, got ", dilation);
  TORCH_CHECK_VALUE(ph >= 0 && pw >= 0, op, ": argument 'padding' must be non-negative, got ", padding);
  check_csr(op, x, row_ptr, col_idx, values, bias, OC);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  const int64_t OH = (Hp - dh * (KH - 1) - 1) / sh + 1;
  const int64_t OW = (Wp - dw * (KW - 1) - 1) / sw + 1;
  TORCH_CHECK_VALUE(Hp >= dh * (KH - 1) + 1 && Wp >= dw * (KW - 1) + 1, op, ": input of size ", H, "x", W,
                    " (padded ", Hp, "x", Wp, ") is smaller than the dilated kernel ", dh * (KH - 1) + 1, "x",
                    dw * (KW - 1) + 1);
  // A 1x1, stride-1, unpadded conv is a 1 x (H * W) conv: one long output row per channel, so vectors run
  // across row ends instead of idling at each row's tail (41 columns fill 41 of 48 lanes): ~15% faster.
  if (KH == 1 && KW == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0 && H > 1) {
    const at::Tensor flat = sparse_conv2d_cpu(x.reshape({N, C, 1, H * W}), row_ptr, col_idx, values, bias,
                                              weight_shape, stride, padding, dilation);
    return flat.view({N, OC, H, W});  // a view keeps the flat result's memory format (NCHW or channels-last)
  }
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  auto out = at::empty({N, OC, OH, OW}, x.options());
  if (out.numel() == 0) return channels_last ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;
  hint_huge_pages(out.data_ptr(), out.nbytes());  // large outputs: fault in 2 MiB pages (huge_pages.h)

  const int64_t L = x.scalar_type() == at::kFloat ? Vec<float>::kLanes : Vec<double>::kLanes;
  ConvShape s;
  s.C = C, s.taps = KH * KW;
  // Register tile: up to kMaxVectors vectors of columns x kMaxRows rows.
  const int64_t nv = std::min<int64_t>(kMaxVectors, (OW + L - 1) / L);
  s.rows = std::min<int64_t>(kMaxRows, OH);
  s.cols = nv * L;
  // Tap (kh, kw) reads padded column (ox + q) * sw + p of row oy * sh + kh * dh, with p = (kw * dw) % sw and
  // q = (kw * dw) / sw. Each input row is stored once per distinct (p, q % L) as a "copy" holding phase p
  // shifted left by q % L, so the tap's loads start q - q % L + ox elements into the copy: whole vectors.
  // Aligned loads run ~1.6x faster than unaligned ones, which is worth the extra copies (KW at most).
  std::vector<std::pair<int64_t, int64_t>> copies;  // (phase p, shift sigma)
  std::vector<int64_t> copy_of(KW), skip(KW);
  for (int64_t kw = 0; kw < KW; ++kw) {
    const int64_t p = (kw * dw) % sw, q = (kw * dw) / sw;
    const std::pair<int64_t, int64_t> key{p, q % L};
    copy_of[kw] = std::find(copies.begin(), copies.end(), key) - copies.begin();
    if (copy_of[kw] == int64_t(copies.size())) copies.push_back(key);
    skip[kw] = q - q % L;
  }
  const int64_t U = copies.size();
  // Whole-vector loads of a tile reach round_up(OW, L) + skip: the row length (a whole number of vectors).
  const int64_t Wrow = round_up(OW, L) + *std::max_element(skip.begin(), skip.end());
  s.plane = Hp * U * Wrow;
  s.row_step = sh * U * Wrow;
  s.tap.resize(KH * KW);
  for (int64_t kh = 0; kh < KH; ++kh)
    for (int64_t kw = 0; kw < KW; ++kw) s.tap[kh * KW + kw] = (kh * dh * U + copy_of[kw]) * Wrow + skip[kw];
  {
    std::vector<int64_t> row_set, windows;
    for (int64_t r = 0; r < s.rows; ++r)
      for (int64_t kh = 0; kh < KH; ++kh) row_set.push_back(r * sh + kh * dh);
    for (int64_t kw = 0; kw < KW; ++kw) windows.push_back(copy_of[kw] * Wrow + skip[kw]);
    for (auto* v : {&row_set, &windows}) {
      std::sort(v->begin(), v->end());
      v->erase(std::unique(v->begin(), v->end()), v->end());
    }
    s.bytes_per_row_tile = int64_t(row_set.size() * windows.size()) * s.cols * int64_t(x.element_size());
  }
  const int64_t in_batch = C * s.plane;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_cpu", [&] {
    run_conv<scalar_t>(op, row_ptr, col_idx, values, bias, out, s, in_batch,
                       [&](scalar_t* P, int64_t n0, int64_t count) {
                         pack_conv_input<scalar_t>(x, P, n0, count, s, ph, pw, sw, Wrow, copies);
                       });
  });
  return channels_last ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;
}

at::Tensor sparse_linear_cpu(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                             const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t in_features) {
  const char* op = "adapmtl::sparse_linear";
  TORCH_CHECK_VALUE(in_features > 0, op, ": argument 'in_features' must be positive, got ", in_features);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == in_features, op, ": argument 'x' must have last dimension ",
                    in_features, " (in_features), got shape ", x.sizes());
  const int64_t OC = row_ptr.numel() - 1;
  TORCH_CHECK_VALUE(OC >= 0, op, ": argument 'row_ptr' must have at least one entry");
  check_csr(op, x, row_ptr, col_idx, values, bias, OC);
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
  s.C = in_features, s.taps = 1, s.plane = Wrow, s.row_step = Wrow, s.tap = {0};
  s.rows = 1, s.cols = std::min<int64_t>(kMaxVectors, Wrow / L) * L;
  s.bytes_per_row_tile = s.cols * int64_t(x.element_size());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_linear_cpu", [&] {
    run_conv<scalar_t>(op, row_ptr, col_idx, values, bias, out, s, in_features * Wrow,
                       [&](scalar_t* P, int64_t, int64_t) {
                         auto p = at::from_blob(P, {in_features, Wrow}, x.options());
                         p.narrow(1, B, Wrow - B).zero_();
                         p.narrow(1, 0, B).copy_(xt);
                       });
  });
  return out.view({OC, B}).t().reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(adapmtl, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cpu);
  m.impl("sparse_linear", &sparse_linear_cpu);
}

}  // namespace adapmtl
