// Fused soft-threshold forward and backward on CUDA (SPEC §1).
//
// forward:  out = sign(w) * relu(|w| - g), g = sigmoid(s), and nnz(out), in one read of w.
// backward: grad_w = G * m (exact) or G (ste), m = 1[|w| - g > 0], and grad_s = -g(1-g) * sum(G * sign(w) * m),
//           in one read of G and w.
//
// g is computed by at::sigmoid on the device (bit-identical to the reference) and read by the kernels through
// a pointer: nothing here synchronises with the host. Both passes are grid-stride loops over 16-byte vectors
// (scalar when a pointer is not 16-byte aligned) with the grid capped at a few blocks per SM. The forward adds
// each block's count with one integer atomic (exact in any order). The backward writes one partial per block;
// a single-block kernel sums them in a fixed order, so grad_s is bitwise reproducible on a given GPU.
// Only c10 CUDA headers: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers that a minimal CUDA
// toolkit lacks, and nothing here needs them.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "cuda/launch.cuh"

namespace adapmtl {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 4;
constexpr int kVecBytes = 16;

template <typename T>
struct Vec {
  static constexpr int kSize = kVecBytes / sizeof(T);
  alignas(kVecBytes) T v[kSize];
};

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

int64_t grid_for(int64_t work) { return cuda_launch::grid_for(work, kThreads, kBlocksPerSm); }

using cuda_launch::block_sum;

// One element of the forward. `a <= 0` is false for NaN, so NaN in w stays NaN in out (and counts as non-zero).
template <typename T, typename A>
__device__ __forceinline__ T forward_one(T x, A g, unsigned long long& count) {
  const A xf = static_cast<A>(x);
  const A a = ::fabs(xf) - g;
  const A r = a <= A(0) ? A(0) : a;
  // Rounding to T is symmetric in sign, so rounding copysign(r, x) equals the reference's
  // sign(w) * relu(round(a)); the count looks at the rounded value, i.e. at what is stored.
  const T o = static_cast<T>(::copysign(r, xf));
  count += static_cast<A>(o) != A(0) ? 1ull : 0ull;
  return o;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(const T* __restrict__ w, T* __restrict__ out,
                                                           const T* __restrict__ g_ptr, int64_t n, bool vectorised,
                                                           unsigned long long* __restrict__ nnz) {
  using A = at::opmath_type<T>;
  __shared__ unsigned long long shared[kThreads / 32];
  const A g = static_cast<A>(*g_ptr);
  unsigned long long count = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t scalar_begin = 0;
  if (vectorised) {
    constexpr int V = Vec<T>::kSize;
    const int64_t nvec = n / V;
    const Vec<T>* wv = reinterpret_cast<const Vec<T>*>(w);
    Vec<T>* ov = reinterpret_cast<Vec<T>*>(out);
    for (int64_t i = first; i < nvec; i += stride) {
      const Vec<T> x = wv[i];
      Vec<T> o;
#pragma unroll
      for (int k = 0; k < V; ++k) o.v[k] = forward_one<T, A>(x.v[k], g, count);
      ov[i] = o;
    }
    scalar_begin = nvec * V;
  }
  // The tail after the last full vector (fewer than V elements), or everything when not vectorised.
  for (int64_t i = scalar_begin + first; i < n; i += stride) out[i] = forward_one<T, A>(w[i], g, count);
  const unsigned long long total = block_sum(count, shared);
  if (threadIdx.x == 0 && total != 0) atomicAdd(nnz, total);
}

// One element of the backward; returns G * sign(w) * m (in the accumulation type).
template <typename T, typename A, bool kSte>
__device__ __forceinline__ A backward_one(T G, T x, A g, T& gw) {
  const A xf = static_cast<A>(x);
  const bool keep = ::fabs(xf) - g > A(0);
  gw = (kSte || keep) ? G : T(0);
  const A masked = keep ? static_cast<A>(G) : A(0);
  return xf < A(0) ? -masked : masked;  // masked * sign(x); x != 0 wherever masked != 0
}

template <typename T, bool kSte>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ grad, const T* __restrict__ w, T* __restrict__ grad_w,
                    const T* __restrict__ g_ptr, int64_t n, bool vectorised,
                    at::opmath_type<T>* __restrict__ partials) {
  using A = at::opmath_type<T>;
  __shared__ A shared[kThreads / 32];
  const A g = static_cast<A>(*g_ptr);
  A sum = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t scalar_begin = 0;
  if (vectorised) {
    constexpr int V = Vec<T>::kSize;
    const int64_t nvec = n / V;
    const Vec<T>* gv = reinterpret_cast<const Vec<T>*>(grad);
    const Vec<T>* wv = reinterpret_cast<const Vec<T>*>(w);
    Vec<T>* ov = reinterpret_cast<Vec<T>*>(grad_w);
    for (int64_t i = first; i < nvec; i += stride) {
      const Vec<T> G = gv[i];
      const Vec<T> x = wv[i];
      Vec<T> o;
#pragma unroll
      for (int k = 0; k < V; ++k) sum += backward_one<T, A, kSte>(G.v[k], x.v[k], g, o.v[k]);
      ov[i] = o;
    }
    scalar_begin = nvec * V;
  }
  for (int64_t i = scalar_begin + first; i < n; i += stride) sum += backward_one<T, A, kSte>(grad[i], w[i], g, grad_w[i]);
  const A total = block_sum(sum, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

std::tuple<at::Tensor, at::Tensor> soft_threshold_forward_cuda(const at::Tensor& w_in, const at::Tensor& s,
                                                               bool /*ste*/) {
  check_soft_threshold_args("soft_threshold_forward", w_in, s);
  TORCH_CHECK_VALUE(w_in.is_cuda(), "soft_threshold_forward: argument 'w' must be a CUDA tensor, got ", w_in.device());
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options());
  at::Tensor nnz = at::zeros({}, w.options().dtype(at::kLong));
  const int64_t n = w.numel();
  if (n == 0) return {out, nnz};
  // g as the reference uses it: sigmoid in s's dtype, then cast to w's dtype (0-d tensors do not promote).
  const at::Tensor g = at::sigmoid(s.reshape({})).to(w.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "soft_threshold_forward_cuda", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool vectorised = aligned16(wp) && aligned16(op);
    const int64_t work = vectorised ? (n + Vec<scalar_t>::kSize - 1) / Vec<scalar_t>::kSize : n;
    const int64_t blocks = grid_for(work);
    forward_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        wp, op, g.const_data_ptr<scalar_t>(), n, vectorised,
        reinterpret_cast<unsigned long long*>(nnz.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, nnz};
}

std::tuple<at::Tensor, at::Tensor> soft_threshold_backward_cuda(const at::Tensor& grad_in, const at::Tensor& w_in,
                                                                const at::Tensor& s, bool ste) {
  check_soft_threshold_args("soft_threshold_backward", w_in, s);
  check_grad_out("soft_threshold_backward", grad_in, w_in);
  TORCH_CHECK_VALUE(w_in.is_cuda(), "soft_threshold_backward: argument 'w' must be a CUDA tensor, got ", w_in.device());
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor grad_w = at::empty(w.sizes(), w.options());
  const int64_t n = w.numel();
  if (n == 0) return {grad_w, at::zeros(s.sizes(), s.options())};
  at::Tensor grad_s = at::empty(s.sizes(), s.options());
  const at::Tensor g_s = at::sigmoid(s.reshape({}));
  const at::Tensor g_w = g_s.to(w.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "soft_threshold_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* gwp = grad_w.mutable_data_ptr<scalar_t>();
    const bool vectorised = aligned16(gp) && aligned16(wp) && aligned16(gwp);
    const int64_t work = vectorised ? (n + Vec<scalar_t>::kSize - 1) / Vec<scalar_t>::kSize : n;
    const int64_t blocks = grid_for(work);
    // One slot per block of the launch below: every block writes its slot, so no zero-fill is needed.
    at::Tensor partials = at::empty({blocks}, w.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* pp = partials.mutable_data_ptr<acc_t>();
    const scalar_t* gwt = g_w.const_data_ptr<scalar_t>();
    if (ste) {
      backward_kernel<scalar_t, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(gp, wp, gwp, gwt, n,
                                                                                               vectorised, pp);
    } else {
      backward_kernel<scalar_t, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(gp, wp, gwp, gwt, n,
                                                                                                vectorised, pp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda_launch::finish_grad_s(pp, blocks, g_s, grad_s, stream);
  });
  return {grad_w, grad_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(adapmtl, CUDA, m) {
  m.impl("soft_threshold_forward", &soft_threshold_forward_cuda);
  m.impl("soft_threshold_backward", &soft_threshold_backward_cuda);
}

}  // namespace adapmtl
