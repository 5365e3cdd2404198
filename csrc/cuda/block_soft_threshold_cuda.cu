// Fused block (group) soft threshold on CUDA (adapmtl/ops/block_soft_threshold.py defines it; the C++ CPU kernel,
// csrc/cpu/block_soft_threshold_cpu.cpp, computes the same).
//
// w viewed as [OC, R]; one thread per (block b, column j), grid-stride, consecutive threads on consecutive
// columns (coalesced row reads). Forward: n = ||w_B||, out_B = w_B * (n <= g ? 0 : 1 - g/n), the count added per
// CUDA block with one integer atomic. Backward: live blocks dL/dw_B = (1 - g/n) G_B + g w_B (w_B . G_B) / n^3,
// dead 0 (exact) or G_B (ste); one partial of sum_live (w_B . G_B) / n per CUDA block, summed in a fixed order
// by the finish kernel (reproducible). Arithmetic in at::opmath_type (float for half types).
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdint>

#include "common.h"
#include "cuda/launch.cuh"

namespace adapmtl {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 4;

using cuda_launch::block_sum;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    block_forward_kernel(const T* __restrict__ w, T* __restrict__ out, const T* __restrict__ g_ptr, int64_t OC,
                         int64_t R, int64_t block, unsigned long long* __restrict__ nnz) {
  using A = at::opmath_type<T>;
  __shared__ unsigned long long shared[kThreads / 32];
  const A g = static_cast<A>(*g_ptr);
  const int64_t items = (OC + block - 1) / block * R;
  unsigned long long count = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / R, j = i % R;
    const int64_t r0 = b * block, r1 = r0 + block < OC ? r0 + block : OC;
    A sq = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const A x = static_cast<A>(w[r * R + j]);
      sq += x * x;
    }
    const A n = ::sqrt(sq);
    const A scale = n <= g ? A(0) : A(1) - g / n;  // NaN n: NaN scale, the block stays NaN
    for (int64_t r = r0; r < r1; ++r) {
      const T o = static_cast<T>(static_cast<A>(w[r * R + j]) * scale);
      out[r * R + j] = o;
      count += static_cast<A>(o) != A(0) ? 1ull : 0ull;
    }
  }
  const unsigned long long total = block_sum(count, shared);
  if (threadIdx.x == 0 && total != 0) atomicAdd(nnz, total);
}

template <typename T, bool kSte>
__global__ void __launch_bounds__(kThreads)
    block_backward_kernel(const T* __restrict__ grad, const T* __restrict__ w, T* __restrict__ grad_w,
                          const T* __restrict__ g_ptr, int64_t OC, int64_t R, int64_t block,
                          at::opmath_type<T>* __restrict__ partials) {
  using A = at::opmath_type<T>;
  __shared__ A shared[kThreads / 32];
  const A g = static_cast<A>(*g_ptr);
  const int64_t items = (OC + block - 1) / block * R;
  A sum = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / R, j = i % R;
    const int64_t r0 = b * block, r1 = r0 + block < OC ? r0 + block : OC;
    A sq = 0, dot = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const A x = static_cast<A>(w[r * R + j]);
      sq += x * x;
      dot += x * static_cast<A>(grad[r * R + j]);
    }
    const A n = ::sqrt(sq);
    const bool live = n > g;  // false for NaN
    const A scale = live ? A(1) - g / n : A(0);
    const A coef = live ? g * dot / (n * n * n) : A(0);
    if (live) sum += dot / n;
    for (int64_t r = r0; r < r1; ++r) {
      const T G = grad[r * R + j];
      grad_w[r * R + j] = kSte ? G : static_cast<T>(scale * static_cast<A>(G) + coef * static_cast<A>(w[r * R + j]));
    }
  }
  const A total = block_sum(sum, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

std::tuple<at::Tensor, at::Tensor> block_soft_threshold_forward_cuda(const at::Tensor& w_in, const at::Tensor& s,
                                                                     int64_t block, bool /*ste*/) {
  const char* op = "block_soft_threshold_forward";
  check_soft_threshold_args(op, w_in, s);
  check_threshold_block(op, block);
  TORCH_CHECK_VALUE(w_in.is_cuda(), op, ": argument 'w' must be a CUDA tensor, got ", w_in.device());
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options());
  at::Tensor nnz = at::zeros({}, w.options().dtype(at::kLong));
  if (w.numel() == 0) return {out, nnz};
  const auto [OC, R] = threshold_rows_cols(w);
  const at::Tensor g = at::sigmoid(s.reshape({})).to(w.scalar_type());  // as the reference: in w's dtype
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = cuda_launch::grid_for((OC + block - 1) / block * R, kThreads, kBlocksPerSm);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "block_soft_threshold_forward_cuda", [&] {
    block_forward_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), OC, R, block,
        reinterpret_cast<unsigned long long*>(nnz.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, nnz};
}

std::tuple<at::Tensor, at::Tensor> block_soft_threshold_backward_cuda(const at::Tensor& grad_in, const at::Tensor& w_in,
                                                                      const at::Tensor& s, int64_t block, bool ste) {
  const char* op = "block_soft_threshold_backward";
  check_soft_threshold_args(op, w_in, s);
  check_grad_out(op, grad_in, w_in);
  check_threshold_block(op, block);
  TORCH_CHECK_VALUE(w_in.is_cuda(), op, ": argument 'w' must be a CUDA tensor, got ", w_in.device());
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor grad_w = at::empty(w.sizes(), w.options());
  if (w.numel() == 0) return {grad_w, at::zeros(s.sizes(), s.options())};
  at::Tensor grad_s = at::empty(s.sizes(), s.options());
  const auto [OC, R] = threshold_rows_cols(w);
  const at::Tensor g_s = at::sigmoid(s.reshape({}));
  const at::Tensor g_w = g_s.to(w.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = cuda_launch::grid_for((OC + block - 1) / block * R, kThreads, kBlocksPerSm);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "block_soft_threshold_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partials = at::empty({blocks}, w.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* pp = partials.mutable_data_ptr<acc_t>();
    const scalar_t *gp = grad.const_data_ptr<scalar_t>(), *wp = w.const_data_ptr<scalar_t>();
    scalar_t* gwp = grad_w.mutable_data_ptr<scalar_t>();
    const scalar_t* gwt = g_w.const_data_ptr<scalar_t>();
    if (ste) {
      block_backward_kernel<scalar_t, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          gp, wp, gwp, gwt, OC, R, block, pp);
    } else {
      block_backward_kernel<scalar_t, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          gp, wp, gwp, gwt, OC, R, block, pp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda_launch::finish_grad_s(pp, blocks, g_s, grad_s, stream);
  });
  return {grad_w, grad_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(adapmtl, CUDA, m) {
  m.impl("block_soft_threshold_forward", &block_soft_threshold_forward_cuda);
  m.impl("block_soft_threshold_backward", &block_soft_threshold_backward_cuda);
}

}  // namespace adapmtl
