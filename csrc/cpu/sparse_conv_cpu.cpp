// Direct sparse convolution and sparse linear (SpMM) on the CPU over a CSR-packed pruned weight.
//
// Weight format (adapmtl/ops/sparse_weight.py documents it in full): CSR over output channels,
// row_ptr int32 [C_out + 1], col_idx int32 [nnz] = c * KH * KW + kh * KW + kw, values [nnz].
//
// Algorithm (no im2col): the input is copied once into a zero-padded, column-phase-split buffer
//   P[n][c][iy][p][j] = x_padded[n][c][iy][j * stride_w + p],   p in [0, stride_w)
// so that, for every non-zero (c, kh, kw), the input pixels an output row needs are contiguous:
//   out[n][oc][oy][ox] += v * P[n][c][oy * stride_h + kh * dil_h][(kw * dil_w) % stride_w][ox + (kw * dil_w) / stride_w]
// Each non-zero thus becomes one fixed element offset into P, computed once per call. The kernel keeps a
// tile of up to 4 vectors x 2 output rows of accumulators in registers, streams the CSR row of one output
// channel through it (broadcast value, unaligned vector loads at the offset, FMA), and stores the tile.
// Row stride of P is padded so that whole-vector loads past the row end stay inside the buffer (those lanes
// are never stored). Work items are (n, output-row pair, output channel) with the channel fastest, so the few
// input rows a row pair reads stay in cache while all channels stream past them.
//
// sparse_linear is the same kernel on a 1x1 "convolution" whose output row is the batch: x^T [in][B].
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

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

// One tile: R output rows (R = 1, 2) x NV vectors of output pixels, for one output channel.
// `base` points at P for (n, row oy, column ox0); `row_step` is the distance in P between output rows.
template <typename T, int NV, int R>
inline __attribute__((always_inline)) void tile(const T* __restrict base, int64_t row_step,
                                                const int64_t* __restrict off, const T* __restrict val, int64_t k0,
                                                int64_t k1, T b, T* __restrict out, int64_t out_row_step,
                                                int64_t count) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::kLanes;
  V acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) acc[r][i] = V{} + b;
  for (int64_t k = k0; k < k1; ++k) {
    const T v = val[k];
    const T* p = base + off[k];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) acc[r][i] += v * load(p + r * row_step + i * L);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    if (count == NV * L) {
      std::memcpy(out + r * out_row_step, &acc[r][0], sizeof(acc[r]));
    } else {
      std::memcpy(out + r * out_row_step, &acc[r][0], count * sizeof(T));
    }
  }
}

struct Geometry {
  int64_t N, C, OC, OH, OW;
  int64_t in_batch;  // elements of P per image
  int64_t row_step;  // elements of P between consecutive output rows (stride_h * stride_w * row stride)
};

template <typename T, int R>
inline __attribute__((always_inline)) void row_group(const T* P, const int64_t* off, const T* val,
                                                     const int32_t* row_ptr, const T* bias, T* out,
                                                     const Geometry& g, int64_t n, int64_t oy, int64_t oc) {
  constexpr int64_t L = Vec<T>::kLanes;
  const int64_t k0 = row_ptr[oc], k1 = row_ptr[oc + 1];
  const T b = bias ? bias[oc] : T(0);
  const T* base = P + n * g.in_batch + oy * g.row_step;
  T* o = out + ((n * g.OC + oc) * g.OH + oy) * g.OW;
  for (int64_t ox = 0; ox < g.OW; ox += 4 * L) {
    const int64_t count = std::min<int64_t>(4 * L, g.OW - ox);
    const int64_t nv = (count + L - 1) / L;
    switch (nv) {
      case 1: tile<T, 1, R>(base + ox, g.row_step, off, val, k0, k1, b, o + ox, g.OW, count); break;
      case 2: tile<T, 2, R>(base + ox, g.row_step, off, val, k0, k1, b, o + ox, g.OW, count); break;
      case 3: tile<T, 3, R>(base + ox, g.row_step, off, val, k0, k1, b, o + ox, g.OW, count); break;
      default: tile<T, 4, R>(base + ox, g.row_step, off, val, k0, k1, b, o + ox, g.OW, count); break;
    }
  }
}

// Items [begin, end) of the (n, row pair, oc) space, oc fastest.
template <typename T>
ADAPMTL_SPARSE_MULTIVERSION void run_items(const T* P, const int64_t* off, const T* val, const int32_t* row_ptr,
                                           const T* bias, T* out, const Geometry& g, int64_t begin, int64_t end) {
  const int64_t pairs = (g.OH + 1) / 2;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t oc = item % g.OC;
    const int64_t rest = item / g.OC;
    const int64_t oy = (rest % pairs) * 2;
    const int64_t n = rest / pairs;
    if (oy + 1 < g.OH) {
      row_group<T, 2>(P, off, val, row_ptr, bias, out, g, n, oy, oc);
    } else {
      row_group<T, 1>(P, off, val, row_ptr, bias, out, g, n, oy, oc);
    }
  }
}

void check_csr(const char* op, const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
               const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": argument 'x' must be a CPU tensor, got ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   ": the CPU kernel supports argument 'x' of dtype float32 or float64, got ", x.scalar_type());
  check_csr_arrays(op, x, row_ptr, col_idx, values, bias, rows);
  // The CSR arrays come from user code: validate them once (O(rows + nnz)) so a bad index cannot read out of bounds.
  auto rp = row_ptr.contiguous();
  auto ci = col_idx.contiguous();
  const int32_t* r = rp.data_ptr<int32_t>();
  const int64_t nnz = ci.numel();
  TORCH_CHECK_VALUE(r[0] == 0 && r[rows] == nnz, op, ": argument 'row_ptr' must start at 0 and end at nnz = ", nnz,
                    ", got ", r[0], " and ", r[rows]);
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK_VALUE(r[i] <= r[i + 1], op, ": argument 'row_ptr' must be non-decreasing (row ", i, ")");
  }
  const int32_t* c = ci.data_ptr<int32_t>();
  for (int64_t i = 0; i < nnz; ++i) {
    TORCH_CHECK_VALUE(c[i] >= 0 && c[i] < cols, op, ": argument 'col_idx' entries must lie in [0, ", cols,
                      "), got ", c[i], " at position ", i);
  }
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// The packed input buffer is reused between calls on the same thread (up to kMaxCachedBytes): a fresh
// multi-MB allocation costs more in page faults than the copy itself. Larger inputs get a temporary.
constexpr int64_t kMaxCachedBytes = int64_t(64) << 20;

at::Tensor workspace(int64_t numel, const at::TensorOptions& options) {
  thread_local at::Tensor cached;
  const int64_t bytes = numel * int64_t(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (bytes > kMaxCachedBytes) return at::empty({numel}, options);
  if (!cached.defined() || cached.nbytes() < size_t(bytes)) {
    cached = at::empty({std::max<int64_t>(bytes, 1 << 20)}, options.dtype(at::kByte));
  }
  return at::from_blob(cached.data_ptr(), {numel}, options);
}

template <typename T>
void run_kernel(const at::Tensor& P, const std::vector<int64_t>& offsets, const at::Tensor& values,
                const at::Tensor& row_ptr, const c10::optional<at::Tensor>& bias, at::Tensor& out, const Geometry& g) {
  const at::Tensor vals = values.contiguous();
  const at::Tensor rp = row_ptr.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();
  const T* Pp = P.data_ptr<T>();
  const T* vp = vals.data_ptr<T>();
  const int32_t* rpp = rp.data_ptr<int32_t>();
  const T* bp = bias.has_value() ? b.data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const int64_t* offp = offsets.data();
  const int64_t items = g.N * ((g.OH + 1) / 2) * g.OC;
  // About 64k multiply-adds per task: enough to amortise the task, small enough to balance uneven rows.
  const int64_t nnz = vals.numel();
  const int64_t per_item = std::max<int64_t>(1, (nnz / std::max<int64_t>(1, g.OC)) * 2 * g.OW);
  // Below ~1M multiply-adds everything runs on the calling thread (parallel_for runs a range no larger than
  // its grain inline): waking the pool costs more than such a call, and milliseconds on busy cores.
  const int64_t grain = items * per_item < (int64_t(1) << 20) ? items : std::max<int64_t>(1, 65536 / per_item);
  at::parallel_for(0, items, grain,
                   [&](int64_t begin, int64_t end) { run_items<T>(Pp, offp, vp, rpp, bp, op, g, begin, end); });
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
  check_csr(op, x, row_ptr, col_idx, values, bias, OC, C * KH * KW);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  const int64_t OH = (Hp - dh * (KH - 1) - 1) / sh + 1;
  const int64_t OW = (Wp - dw * (KW - 1) - 1) / sw + 1;
  TORCH_CHECK_VALUE(Hp >= dh * (KH - 1) + 1 && Wp >= dw * (KW - 1) + 1, op, ": input of size ", H, "x", W,
                    " (padded ", Hp, "x", Wp, ") is smaller than the dilated kernel ", dh * (KH - 1) + 1, "x",
                    dw * (KW - 1) + 1);
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  auto out = at::empty({N, OC, OH, OW}, x.options());
  if (out.numel() == 0) return channels_last ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;

  const int64_t L = x.scalar_type() == at::kFloat ? Vec<float>::kLanes : Vec<double>::kLanes;
  const int64_t qmax = ((KW - 1) * dw) / sw;
  const int64_t Wq = (Wp + sw - 1) / sw;
  const int64_t Wrow = std::max(Wq, round_up(OW, L) + qmax);
  const int64_t phase_rows = Hp * sw;  // rows of length Wrow per channel
  // One extra row per image of slack: whole-vector loads of the last row may run past Wrow.
  const int64_t plane = phase_rows * Wrow;
  const int64_t in_batch = C * plane + Wrow;
  at::Tensor P = workspace(N * in_batch, x.options());

  // Pad + phase-split copy, any input strides (NCHW, channels-last, views). Every element is written once
  // (data or zero), so the reused buffer needs no separate clearing pass.
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_pack", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* pp = P.data_ptr<scalar_t>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);
    // The copy is cheap next to the kernel: split it across threads only when large, since every parallel
    // region costs a thread hand-off (milliseconds when the cores are oversubscribed).
    const int64_t pack_grain = std::max<int64_t>(16, (int64_t(1) << 22) / std::max<int64_t>(1, plane));
    at::parallel_for(0, N * C, pack_grain, [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        const scalar_t* src = xp + n * s0 + c * s1;
        scalar_t* dst = pp + n * in_batch + c * plane;
        std::fill(dst, dst + ph * sw * Wrow, scalar_t(0));
        // bottom padding rows, plus the image's slack row after its last channel
        std::fill(dst + (ph + H) * sw * Wrow, dst + plane + (c == C - 1 ? Wrow : 0), scalar_t(0));
        for (int64_t iy = 0; iy < H; ++iy) {
          scalar_t* drow = dst + (iy + ph) * sw * Wrow;
          const scalar_t* srow = src + iy * s2;
          if (sw == 1) {
            std::fill(drow, drow + pw, scalar_t(0));
            std::fill(drow + pw + W, drow + Wrow, scalar_t(0));
            if (s3 == 1) {
              std::memcpy(drow + pw, srow, W * sizeof(scalar_t));
            } else {
              for (int64_t ix = 0; ix < W; ++ix) drow[pw + ix] = srow[ix * s3];
            }
          } else {
            for (int64_t p = 0; p < sw; ++p) {
              scalar_t* dphase = drow + p * Wrow;
              // padded column px = j * sw + p holds x[ix = px - pw] when 0 <= ix < W
              for (int64_t j = 0, px = p; j < Wq; ++j, px += sw) {
                const int64_t ix = px - pw;
                dphase[j] = (ix >= 0 && ix < W) ? srow[ix * s3] : scalar_t(0);
              }
              std::fill(dphase + Wq, dphase + Wrow, scalar_t(0));
            }
          }
        }
      }
    });
  });

  std::vector<int64_t> offsets(col_idx.numel());
  {
    auto ci = col_idx.contiguous();
    const int32_t* c = ci.data_ptr<int32_t>();
    for (int64_t k = 0; k < ci.numel(); ++k) {
      const int64_t col = c[k];
      const int64_t ch = col / (KH * KW), kh = (col / KW) % KH, kw = col % KW;
      offsets[k] = ch * plane + kh * dh * sw * Wrow + ((kw * dw) % sw) * Wrow + (kw * dw) / sw;
    }
  }
  const Geometry g{N, C, OC, OH, OW, in_batch, sh * sw * Wrow};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_cpu",
                             [&] { run_kernel<scalar_t>(P, offsets, values, row_ptr, bias, out, g); });
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
  check_csr(op, x, row_ptr, col_idx, values, bias, OC, in_features);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = OC;
  const int64_t B = x.numel() / in_features;
  if (B == 0 || OC == 0) return at::zeros(out_shape, x.options()).add_(bias.has_value() ? *bias : at::zeros({}, x.options()));
  const int64_t L = x.scalar_type() == at::kFloat ? Vec<float>::kLanes : Vec<double>::kLanes;
  const int64_t Wrow = round_up(B, L);
  // P = x^T [in][Wrow] (+ one slack row), a 1x1 convolution input whose single output row is the batch.
  auto P = at::zeros({in_features + 1, Wrow}, x.options());
  P.narrow(0, 0, in_features).narrow(1, 0, B).copy_(x.reshape({B, in_features}).t());
  auto out = at::empty({OC, B}, x.options());
  std::vector<int64_t> offsets(col_idx.numel());
  {
    auto ci = col_idx.contiguous();
    const int32_t* c = ci.data_ptr<int32_t>();
    for (int64_t k = 0; k < ci.numel(); ++k) offsets[k] = int64_t(c[k]) * Wrow;
  }
  const Geometry g{1, in_features, OC, 1, B, (in_features + 1) * Wrow, Wrow};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_linear_cpu",
                             [&] { run_kernel<scalar_t>(P, offsets, values, row_ptr, bias, out, g); });
  return out.t().reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(adapmtl, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cpu);
  m.impl("sparse_linear", &sparse_linear_cpu);
}

}  // namespace adapmtl
