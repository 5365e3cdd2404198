// Sparse (CSR) convolution and linear layers on CUDA, for inference with a pruned weight.
//
// Weight layout (shared with the CPU kernel; adapmtl/ops/sparse_weight.py): one CSR row per output channel,
// row_ptr int32 [C_out + 1], col_idx int32 [nnz] = c * KH * KW + kh * KW + kw (for linear: the input
// feature), values [nnz] in the activation's dtype. The index contents are not re-validated on the host (that
// would need a device-to-host sync per call); a bad row_ptr or col_idx trips a device assert instead of
// reading out of bounds.
//
// sparse_conv2d: one thread block per (output channel, tile of output pixels), pixels flattened over
// (n, oh, ow); the output is NCHW-contiguous, or channels_last when x is (written through its strides, as
// the CPU kernel and the fake kernel lay it out). The block stages its row's non-zeros in shared memory, decoded once into (offset into the
// image, kh * dil_h, kw * dil_w, value), then every thread accumulates kPix output pixels (kPix strided by
// the block size, so each gather of x is coalesced along ow). Implicit im2col: x is read in place, padding
// is a bounds check; x is const __restrict__, so the gathers use the read-only cache path. Accumulation in
// float (double for double).
//
// sparse_linear: one warp per output feature and per tile of kRowsM input rows; the lanes split the row's
// non-zeros and the partial sums are combined with a fixed-order warp reduction (deterministic).
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"
#include "cpu/env.h"

namespace adapmtl {
namespace {

constexpr int kConvThreads = 128;
constexpr int kChunk = 1024;  // non-zeros staged in shared memory at a time (16 KiB for float)
constexpr int kMaxGridY = 65535;
constexpr int kLinearWarps = 4;
constexpr int kRowsM = 8;

template <typename A>
struct NzEntry {
  int off;  // c * H * W + kh * dil_h * W + kw * dil_w: where the tap reads x relative to the pixel's origin
  int dy;   // kh * dil_h
  int dx;   // kw * dil_w
  A val;
};

// ADAPMTL_GPU_SPARSE_ROWS (1, 2, 4 or 8; unset: 1): output channels per block of the sparse conv, as for the
// Triton kernel (triton_kernels/sparse_conv.py). Opt-in until timed on a GPU.
int64_t gpu_sparse_rows() {
  const int64_t rows = env_int("ADAPMTL_GPU_SPARSE_ROWS", 1, 1, 8);
  TORCH_CHECK_VALUE(rows == 1 || rows == 2 || rows == 4 || rows == 8,
                    "ADAPMTL_GPU_SPARSE_ROWS must be one of 1, 2, 4, 8, got ", rows);
  return rows;
}

int sm_count() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return std::max(count, 1);
}

// Decodes non-zeros [first, first + count) of the CSR arrays into shared memory (whole block).
template <typename T, typename A>
__device__ __forceinline__ void stage_row(NzEntry<A>* nz, const int* __restrict__ col_idx,
                                          const T* __restrict__ values, int first, int count, int KH, int KW,
                                          int C_in, int H, int W, int dh, int dw) {
  const int taps = KH * KW;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    const int col = col_idx[first + i];
    CUDA_KERNEL_ASSERT(col >= 0 && col < C_in * taps);
    const int c = col / taps;
    const int rem = col - c * taps;
    const int kh = rem / KW;
    const int kw = rem - kh * KW;
    const int dy = kh * dh;
    const int dx = kw * dw;
    nz[i] = NzEntry<A>{c * H * W + dy * W + dx, dy, dx, static_cast<A>(values[first + i])};
  }
}

// This thread's kPix pixels of `tile`: pixel(k, n, p) for each that exists (image n, pixel p of its H_out x W_out
// plane), missing(k) for each past the last: the walk both kernels' setup and stores share.
template <int kPix, typename Pixel, typename Missing>
__device__ __forceinline__ void for_each_pixel(int64_t tile, int64_t total_pixels, int64_t P, const Pixel& pixel,
                                               const Missing& missing) {
  constexpr int kTile = kConvThreads * kPix;
#pragma unroll
  for (int k = 0; k < kPix; ++k) {
    const int64_t q = tile * kTile + k * kConvThreads + threadIdx.x;
    if (q < total_pixels) {
      const int64_t n = q / P;
      pixel(k, n, q - n * P);
    } else {
      missing(k);
    }
  }
}

// The tile's pixels for thread threadIdx.x: where each one's window starts in x (ih0, iw0, and base, its offset
// in the batch); a pixel past the end gets coordinates that fail every bounds check.
template <int kPix>
__device__ __forceinline__ void tile_pixels(int64_t tile, int64_t total_pixels, int64_t P, int W_out, int sh, int sw,
                                            int ph, int pw, int W, int64_t image, int64_t (&base)[kPix],
                                            int (&ih0)[kPix], int (&iw0)[kPix]) {
  for_each_pixel<kPix>(
      tile, total_pixels, P,
      [&](int k, int64_t n, int64_t q) {
        const int p = static_cast<int>(q);
        const int oh = p / W_out;
        const int ow = p - oh * W_out;
        ih0[k] = oh * sh - ph;
        iw0[k] = ow * sw - pw;
        base[k] = n * image + static_cast<int64_t>(ih0[k]) * W + iw0[k];
      },
      [&](int k) {
        ih0[k] = INT_MIN / 2;  // every tap fails the bounds check; nothing is read or written
        iw0[k] = 0;
        base[k] = 0;
      });
}

// x at tap e of pixel k, or a real zero on the padding (the op's NaN/inf semantics, adapmtl/ops/sparse_conv.py:
// 0 * inf = NaN as in F.conv2d, so only the load is skipped). The unsigned compare also rejects negatives.
template <typename T, typename A>
__device__ __forceinline__ A tap_value(const T* __restrict__ x, const NzEntry<A>& e, int64_t base, int ih0, int iw0,
                                       int H, int W) {
  const int ih = ih0 + e.dy;
  const int iw = iw0 + e.dx;
  const bool inside =
      static_cast<unsigned>(ih) < static_cast<unsigned>(H) && static_cast<unsigned>(iw) < static_cast<unsigned>(W);
  return inside ? static_cast<A>(x[base + e.off]) : A(0);
}

// Output channel `row` over the tiles this block visits (blockIdx.y, step gridDim.y): its non-zeros staged in
// nz (kChunk entries) and streamed past every thread's kPix pixels.
template <typename T, int kPix>
__device__ __forceinline__ void conv_channel(NzEntry<at::opmath_type<T>>* nz, int row, const T* __restrict__ x,
                                             const int* __restrict__ row_ptr, const int* __restrict__ col_idx,
                                             const T* __restrict__ values, const T* __restrict__ bias,
                                             T* __restrict__ out, int C_in, int H, int W, int KH, int KW, int H_out,
                                             int W_out, int sh, int sw, int ph, int pw, int dh, int dw,
                                             int64_t total_pixels, int64_t out_sn, int64_t out_sc, int64_t out_sp) {
  using A = at::opmath_type<T>;
  constexpr int kTile = kConvThreads * kPix;
  const int begin = row_ptr[row];
  const int end = row_ptr[row + 1];
  CUDA_KERNEL_ASSERT(begin <= end);
  const A b = bias != nullptr ? static_cast<A>(bias[row]) : A(0);
  const int64_t P = static_cast<int64_t>(H_out) * W_out;
  const int64_t image = static_cast<int64_t>(C_in) * H * W;
  // A row that fits in one chunk is staged once for all the tiles this block visits.
  const bool resident = end - begin <= kChunk;
  if (resident) {
    stage_row<T, A>(nz, col_idx, values, begin, end - begin, KH, KW, C_in, H, W, dh, dw);
    __syncthreads();
  }
  for (int64_t tile = blockIdx.y; tile * kTile < total_pixels; tile += gridDim.y) {
    int64_t base[kPix];
    int ih0[kPix];
    int iw0[kPix];
    A acc[kPix];
    tile_pixels<kPix>(tile, total_pixels, P, W_out, sh, sw, ph, pw, W, image, base, ih0, iw0);
#pragma unroll
    for (int k = 0; k < kPix; ++k) acc[k] = A(0);
    for (int first = begin; first < end; first += kChunk) {
      const int count = min(kChunk, end - first);
      if (!resident) {
        __syncthreads();  // the previous chunk has been consumed by every thread
        stage_row<T, A>(nz, col_idx, values, first, count, KH, KW, C_in, H, W, dh, dw);
        __syncthreads();
      }
      for (int i = 0; i < count; ++i) {
        const NzEntry<A> e = nz[i];
#pragma unroll
        for (int k = 0; k < kPix; ++k) acc[k] += e.val * tap_value<T, A>(x, e, base[k], ih0[k], iw0[k], H, W);
      }
    }
    for_each_pixel<kPix>(
        tile, total_pixels, P,
        [&](int k, int64_t n, int64_t p) { out[n * out_sn + row * out_sc + p * out_sp] = static_cast<T>(acc[k] + b); },
        [](int) {});
  }
}

template <typename T, int kPix>
__global__ void __launch_bounds__(kConvThreads)
    sparse_conv2d_kernel(const T* __restrict__ x, const int* __restrict__ row_ptr, const int* __restrict__ col_idx,
                         const T* __restrict__ values, const T* __restrict__ bias, T* __restrict__ out, int C_in,
                         int H, int W, int C_out, int KH, int KW, int H_out, int W_out, int sh, int sw, int ph,
                         int pw, int dh, int dw, int64_t total_pixels, int64_t out_sn, int64_t out_sc,
                         int64_t out_sp) {
  __shared__ NzEntry<at::opmath_type<T>> nz[kChunk];
  conv_channel<T, kPix>(nz, blockIdx.x, x, row_ptr, col_idx, values, bias, out, C_in, H, W, KH, KW, H_out, W_out, sh,
                        sw, ph, pw, dh, dw, total_pixels, out_sn, out_sc, out_sp);
}

// kRows consecutive output channels per block (ADAPMTL_GPU_SPARSE_ROWS, opt-in). Where their rows hold the same
// columns (a weight pruned in blocks of output channels), each gather of x feeds all of them: row blockIdx.x *
// kRows's entries are staged with the other rows' values beside them (kSharedChunk at a time). Otherwise each
// row runs as sparse_conv2d_kernel runs it. Decided per block from the indices, so any CSR weight is exact.
constexpr int kSharedChunk = 256;

template <typename T, int kPix, int kRows>
__global__ void __launch_bounds__(kConvThreads)
    sparse_conv2d_rows_kernel(const T* __restrict__ x, const int* __restrict__ row_ptr,
                              const int* __restrict__ col_idx, const T* __restrict__ values,
                              const T* __restrict__ bias, T* __restrict__ out, int C_in, int H, int W, int C_out,
                              int KH, int KW, int H_out, int W_out, int sh, int sw, int ph, int pw, int dh, int dw,
                              int64_t total_pixels, int64_t out_sn, int64_t out_sc, int64_t out_sp) {
  using A = at::opmath_type<T>;
  __shared__ NzEntry<A> nz[kChunk];
  __shared__ A vals[kRows][kSharedChunk];
  constexpr int kTile = kConvThreads * kPix;
  const int row0 = blockIdx.x * kRows;
  const int rows = min(kRows, C_out - row0);
  const int begin0 = row_ptr[row0];
  const int len0 = row_ptr[row0 + 1] - begin0;
  CUDA_KERNEL_ASSERT(len0 >= 0);
  int mismatch = 0;
  for (int r = 1; r < rows && !mismatch; ++r) {  // the same for every thread up to the column compare
    const int begin = row_ptr[row0 + r];
    if (row_ptr[row0 + r + 1] - begin != len0) {
      mismatch = 1;
      break;
    }
    for (int i = threadIdx.x; i < len0; i += blockDim.x) mismatch |= col_idx[begin + i] != col_idx[begin0 + i];
  }
  if (__syncthreads_or(mismatch)) {
    for (int r = 0; r < rows; ++r) {
      __syncthreads();  // the previous row's staged entries have been consumed by every thread
      conv_channel<T, kPix>(nz, row0 + r, x, row_ptr, col_idx, values, bias, out, C_in, H, W, KH, KW, H_out, W_out,
                            sh, sw, ph, pw, dh, dw, total_pixels, out_sn, out_sc, out_sp);
    }
    return;
  }
  int begin[kRows];
  A b[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    begin[r] = r < rows ? row_ptr[row0 + r] : begin0;
    b[r] = bias != nullptr && r < rows ? static_cast<A>(bias[row0 + r]) : A(0);
  }
  const int64_t P = static_cast<int64_t>(H_out) * W_out;
  const int64_t image = static_cast<int64_t>(C_in) * H * W;
  for (int64_t tile = blockIdx.y; tile * kTile < total_pixels; tile += gridDim.y) {
    int64_t base[kPix];
    int ih0[kPix];
    int iw0[kPix];
    A acc[kRows][kPix];
    tile_pixels<kPix>(tile, total_pixels, P, W_out, sh, sw, ph, pw, W, image, base, ih0, iw0);
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int k = 0; k < kPix; ++k) acc[r][k] = A(0);
    for (int first = 0; first < len0; first += kSharedChunk) {
      const int count = min(kSharedChunk, len0 - first);
      __syncthreads();  // the previous chunk has been consumed by every thread
      stage_row<T, A>(nz, col_idx, values, begin0 + first, count, KH, KW, C_in, H, W, dh, dw);
      for (int i = threadIdx.x; i < count; i += blockDim.x)
#pragma unroll
        for (int r = 0; r < kRows; ++r) vals[r][i] = r < rows ? static_cast<A>(values[begin[r] + first + i]) : A(0);
      __syncthreads();
      for (int i = 0; i < count; ++i) {
        const NzEntry<A> e = nz[i];
#pragma unroll
        for (int k = 0; k < kPix; ++k) {
          const A xv = tap_value<T, A>(x, e, base[k], ih0[k], iw0[k], H, W);
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[r][k] += vals[r][i] * xv;
        }
      }
    }
    for_each_pixel<kPix>(
        tile, total_pixels, P,
        [&](int k, int64_t n, int64_t p) {
#pragma unroll
          for (int r = 0; r < kRows; ++r)
            if (r < rows) out[n * out_sn + (row0 + r) * out_sc + p * out_sp] = static_cast<T>(acc[r][k] + b[r]);
        },
        [](int) {});
  }
}

template <typename T>
__global__ void __launch_bounds__(kLinearWarps * 32)
    sparse_linear_kernel(const T* __restrict__ x, const int* __restrict__ row_ptr, const int* __restrict__ col_idx,
                         const T* __restrict__ values, const T* __restrict__ bias, T* __restrict__ out, int64_t M,
                         int K, int O) {
  using A = at::opmath_type<T>;
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kLinearWarps + (threadIdx.x >> 5);
  if (row >= O) return;  // whole warps only; no block-level synchronisation below
  const int begin = row_ptr[row];
  const int end = row_ptr[row + 1];
  CUDA_KERNEL_ASSERT(begin <= end);
  const A b = bias != nullptr ? static_cast<A>(bias[row]) : A(0);
  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRowsM; m0 < M; m0 += static_cast<int64_t>(gridDim.y) * kRowsM) {
    const int rows = M - m0 < kRowsM ? static_cast<int>(M - m0) : kRowsM;
    A acc[kRowsM];
#pragma unroll
    for (int r = 0; r < kRowsM; ++r) acc[r] = A(0);
    for (int j = begin + lane; j < end; j += 32) {
      const int col = col_idx[j];
      CUDA_KERNEL_ASSERT(col >= 0 && col < K);
      const A v = static_cast<A>(values[j]);
      const T* xc = x + m0 * K + col;
#pragma unroll
      for (int r = 0; r < kRowsM; ++r) {
        if (r < rows) acc[r] += v * static_cast<A>(xc[static_cast<int64_t>(r) * K]);
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsM; ++r) {
      A s = acc[r];
      for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
      if (lane == 0 && r < rows) out[(m0 + r) * O + row] = static_cast<T>(s + b);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The CUDA kernels' own rules on top of csrc/common.h's checks: x on a CUDA device, and 32-bit indices. The
// contents of row_ptr / col_idx are checked on the device (CUDA_KERNEL_ASSERT): no host sync here.

void check_cuda_csr(const char* op, const at::Tensor& x, int64_t cols, int64_t nnz) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": argument 'x' must be a CUDA tensor, got ", x.device());
  TORCH_CHECK_VALUE(cols <= INT_MAX && nnz <= INT_MAX, op, ": the weight is too large for int32 CSR indices (", cols,
                    " columns, ", nnz, " non-zeros)");
}

at::Tensor sparse_conv2d_cuda(const at::Tensor& x_in, const at::Tensor& row_ptr_in, const at::Tensor& col_idx_in,
                              const at::Tensor& values_in, const c10::optional<at::Tensor>& bias_in,
                              at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation) {
  const char* op = "sparse_conv2d";
  const ConvGeometry g = check_sparse_conv2d_args(op, x_in, row_ptr_in, col_idx_in, values_in, bias_in, weight_shape,
                                                  stride, padding, dilation, /*reduced=*/true);
  const int64_t C_out = g.OC, C_in = g.C, KH = g.KH, KW = g.KW, N = g.N, H = g.H, W = g.W;
  const int64_t H_out = g.OH, W_out = g.OW;
  check_cuda_csr(op, x_in, g.cols, col_idx_in.numel());
  for (const int64_t v : {g.sh, g.sw, g.ph, g.pw, g.dh, g.dw}) {
    TORCH_CHECK_VALUE(v <= INT_MAX / 4, op, ": stride, padding and dilation must be <= ", INT_MAX / 4,
                      " for the CUDA kernel's 32-bit coordinates, got ", stride, ", ", padding, ", ", dilation);
  }
  TORCH_CHECK_VALUE(C_out <= INT_MAX, op, ": too many output channels (", C_out, ")");
  // 32-bit offsets inside one image (the decoded tap offset included) and 32-bit pixel coordinates.
  TORCH_CHECK_VALUE(C_in * H * W + dilation[0] * (KH - 1) * W + dilation[1] * (KW - 1) <= INT_MAX &&
                        H_out * W_out <= INT_MAX &&
                        H + padding[0] + dilation[0] * KH <= INT_MAX / 2 && W + padding[1] + dilation[1] * KW <= INT_MAX / 2,
                    op, ": argument 'x' is too large (one image must hold < 2^31 elements), got ", x_in.sizes());

  const c10::cuda::CUDAGuard guard(x_in.device());
  // Output memory format as the CPU kernel and the registered fake kernel: channels_last in, channels_last out.
  const bool channels_last = x_in.is_contiguous(at::MemoryFormat::ChannelsLast) && !x_in.is_contiguous();
  at::Tensor out = at::empty({N, C_out, H_out, W_out},
                             x_in.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                        : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor row_ptr = row_ptr_in.contiguous();
  const at::Tensor col_idx = col_idx_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t total = N * H_out * W_out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Four pixels per thread amortise each staged non-zero over more gathers; with few blocks (small layers)
  // one pixel per thread keeps every SM busy instead.
  const int64_t tiles4 = (total + kConvThreads * 4 - 1) / (kConvThreads * 4);
  const int64_t rows = gpu_sparse_rows();
  const bool wide = C_out * tiles4 >= 2 * static_cast<int64_t>(sm_count());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_conv2d_cuda", [&] {
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    // `channels` output channels per thread block (the rows kernel's kRows), `pix` pixels per thread
    auto launch = [&](auto kernel, int pix, int64_t channels) {
      const int64_t tiles = (total + kConvThreads * pix - 1) / (kConvThreads * pix);
      const dim3 grid(static_cast<unsigned>((C_out + channels - 1) / channels),
                      static_cast<unsigned>(std::min<int64_t>(tiles, kMaxGridY)));
      kernel<<<grid, kConvThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), row_ptr.const_data_ptr<int>(), col_idx.const_data_ptr<int>(),
          values.const_data_ptr<scalar_t>(), bp, out.mutable_data_ptr<scalar_t>(), static_cast<int>(C_in),
          static_cast<int>(H), static_cast<int>(W), static_cast<int>(C_out), static_cast<int>(KH),
          static_cast<int>(KW), static_cast<int>(H_out), static_cast<int>(W_out), static_cast<int>(stride[0]),
          static_cast<int>(stride[1]), static_cast<int>(padding[0]), static_cast<int>(padding[1]),
          static_cast<int>(dilation[0]), static_cast<int>(dilation[1]), total, out.stride(0), out.stride(1),
          out.stride(3));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (rows == 2) {
      launch(sparse_conv2d_rows_kernel<scalar_t, 1, 2>, 1, rows);
    } else if (rows == 4) {
      launch(sparse_conv2d_rows_kernel<scalar_t, 1, 4>, 1, rows);
    } else if (rows == 8) {
      launch(sparse_conv2d_rows_kernel<scalar_t, 1, 8>, 1, rows);
    } else if (wide) {
      launch(sparse_conv2d_kernel<scalar_t, 4>, 4, 1);
    } else {
      launch(sparse_conv2d_kernel<scalar_t, 1>, 1, 1);
    }
  });
  return out;
}

at::Tensor sparse_linear_cuda(const at::Tensor& x_in, const at::Tensor& row_ptr_in, const at::Tensor& col_idx_in,
                              const at::Tensor& values_in, const c10::optional<at::Tensor>& bias_in,
                              int64_t in_features) {
  const char* op = "sparse_linear";
  const int64_t O = check_sparse_linear_args(op, x_in, row_ptr_in, col_idx_in, values_in, bias_in, in_features,
                                             /*reduced=*/true);
  TORCH_CHECK_VALUE(O <= INT_MAX, op, ": too many output features (", O, ")");
  check_cuda_csr(op, x_in, in_features, col_idx_in.numel());
  const c10::cuda::CUDAGuard guard(x_in.device());
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = O;
  at::Tensor out = at::empty(out_shape, x_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.numel() / in_features;
  const at::Tensor row_ptr = row_ptr_in.contiguous();
  const at::Tensor col_idx = col_idx_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>((O + kLinearWarps - 1) / kLinearWarps),
                  static_cast<unsigned>(std::min<int64_t>((M + kRowsM - 1) / kRowsM, kMaxGridY)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_linear_cuda", [&] {
    sparse_linear_kernel<scalar_t><<<grid, kLinearWarps * 32, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), row_ptr.const_data_ptr<int>(), col_idx.const_data_ptr<int>(),
        values.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), M, static_cast<int>(in_features), static_cast<int>(O));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The epilogue op on the GPU: the conv, then the residual add and the clamp as two elementwise passes (not fused
// into the kernel here; the same operations in the same order as on the CPU, so programs that call it -- a .pt2
// exported from a fused model -- run on either device).
at::Tensor sparse_conv2d_fused_cuda(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                    const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                                    at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, const c10::optional<at::Tensor>& residual,
                                    c10::optional<double> lo, c10::optional<double> hi) {
  const char* op = "sparse_conv2d_fused";
  const ConvGeometry g = check_sparse_conv2d_args(op, x, row_ptr, col_idx, values, bias, weight_shape, stride, padding,
                                                  dilation, /*reduced=*/true);
  check_conv_epilogue(op, x, g, residual, lo, hi);
  at::Tensor out = sparse_conv2d_cuda(x, row_ptr, col_idx, values, bias, weight_shape, stride, padding, dilation);
  if (residual.has_value()) out.add_(*residual);
  if (lo || hi)
    out.clamp_(lo ? c10::optional<at::Scalar>(*lo) : c10::nullopt, hi ? c10::optional<at::Scalar>(*hi) : c10::nullopt);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(adapmtl, CUDA, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cuda);
  m.impl("sparse_conv2d_fused", &sparse_conv2d_fused_cuda);
  m.impl("sparse_linear", &sparse_linear_cuda);
}

}  // namespace adapmtl
