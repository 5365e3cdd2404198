// Launch sizing, block reductions and the dL/ds finish kernel shared by the CUDA soft-threshold kernels.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace adapmtl {
namespace cuda_launch {

inline int64_t sm_count() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return std::max(count, 1);
}

// Blocks of `threads` for a grid-stride loop over `work` items: enough to cover them, at most
// `blocks_per_sm` per SM.
inline int64_t grid_for(int64_t work, int threads, int blocks_per_sm) {
  const int64_t cap = sm_count() * blocks_per_sm;
  const int64_t need = (work + threads - 1) / threads;
  return std::max<int64_t>(1, std::min(need, cap));
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0. The order
// of additions is fixed by the thread layout alone, so a float sum is reproducible.
template <typename A>
__device__ A block_sum(A x, A* shared) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    x = lane < warps ? shared[lane] : A(0);
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  }
  return x;
}

// One block (of at most 1024 threads): sums the `count` partials in a fixed order and writes
// grad_s = -g(1-g) * sum in s's dtype.
template <typename A, typename S>
__global__ void finalize_grad_s_kernel(const A* __restrict__ partials, int64_t count, const S* __restrict__ g_ptr,
                                       S* __restrict__ grad_s) {
  __shared__ A shared[32];
  A sum = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) sum += partials[i];
  const A total = block_sum(sum, shared);
  if (threadIdx.x == 0) {
    const double g = static_cast<double>(*g_ptr);
    *grad_s = static_cast<S>(-g * (1.0 - g) * static_cast<double>(total));
  }
}

// Launches finalize_grad_s_kernel (one block of 256 threads) over `count` partials into grad_s, in s's dtype.
template <typename A>
void finish_grad_s(const A* partials, int64_t count, const at::Tensor& g_s, at::Tensor& grad_s, cudaStream_t stream) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_s.scalar_type(), "finish_grad_s_cuda", [&] {
    finalize_grad_s_kernel<A, scalar_t><<<1, 256, 0, stream>>>(partials, count, g_s.const_data_ptr<scalar_t>(),
                                                               grad_s.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda_launch
}  // namespace adapmtl
