// Fused soft-threshold forward and backward on the CPU (SPEC §1).
//
// forward:  out = sign(w) * relu(|w| - g), g = sigmoid(s), and nnz(out), in one read of w.
// backward: grad_w = G * m (exact) or G (ste), m = 1[|w| - g > 0], and grad_s = -g(1-g) * sum(G * sign(w) * m),
//           in one read of G and w.
//
// The tensor is cut into fixed chunks of kChunk elements; every chunk writes its partial count/sum into its
// own slot and the slots are summed in index order, so results do not depend on the number of threads.
// Inner loops are branch-free `omp simd` loops compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// run time (target_clones).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "cpu/buffer_pool.h"

namespace adapmtl {
namespace {

constexpr int64_t kChunk = 16384;
// Below this many chunks the work runs on the calling thread (thread wake-up costs more than it saves).
constexpr int64_t kChunksPerTask = 4;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ADAPMTL_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ADAPMTL_MULTIVERSION
#endif

// NaN in w stays NaN (a <= 0 is false for NaN) and counts as a non-zero, like the reference.
template <typename T>
ADAPMTL_MULTIVERSION int32_t forward_chunk(const T* __restrict w, T* __restrict out, int64_t n, T g) {
  int32_t count = 0;  // a chunk holds < 2^31 elements; 32-bit lanes vectorise alongside float
#pragma omp simd reduction(+ : count)
  for (int64_t i = 0; i < n; ++i) {
    const T x = w[i];
    const T a = std::abs(x) - g;
    const T r = a <= T(0) ? T(0) : a;
    out[i] = std::copysign(r, x);
    count += r != T(0) ? 1 : 0;
  }
  return count;
}

// Returns sum(G * sign(w) * m) over the chunk; writes grad_w.
template <typename T, bool kSte>
ADAPMTL_MULTIVERSION T backward_chunk(const T* __restrict grad, const T* __restrict w, T* __restrict grad_w, int64_t n,
                                      T g) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const T x = w[i];
    const T G = grad[i];
    const bool keep = std::abs(x) - g > T(0);
    const T masked = keep ? G : T(0);
    grad_w[i] = kSte ? G : masked;
    sum += x < T(0) ? -masked : masked;  // masked * sign(x); x != 0 wherever masked != 0
  }
  return sum;
}

int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// g = sigmoid(s) exactly as the reference computes it (in s's dtype), then in w's dtype.
double threshold_of(const at::Tensor& s) { return at::sigmoid(s.reshape({})).item<double>(); }

std::tuple<at::Tensor, at::Tensor> soft_threshold_forward_cpu(const at::Tensor& w_in, const at::Tensor& s,
                                                              bool /*ste*/) {
  check_soft_threshold_args("soft_threshold_forward", w_in, s);
  const at::Tensor w = w_in.contiguous();
  at::Tensor out = pooled_empty(w.sizes(), w.options());
  const int64_t n = w.numel();
  const int64_t chunks = num_chunks(n);
  std::vector<int64_t> counts(chunks, 0);
  const double g = threshold_of(s);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "soft_threshold_forward_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t gt = static_cast<scalar_t>(g);
    at::parallel_for(0, chunks, kChunksPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t start = c * kChunk;
        counts[c] = forward_chunk<scalar_t>(wp + start, op + start, std::min(kChunk, n - start), gt);
      }
    });
  });
  int64_t nnz = 0;
  for (int64_t c : counts) nnz += c;
  return {out, at::scalar_tensor(nnz, w.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor> soft_threshold_backward_cpu(const at::Tensor& grad_in, const at::Tensor& w_in,
                                                               const at::Tensor& s, bool ste) {
  check_soft_threshold_args("soft_threshold_backward", w_in, s);
  check_grad_out("soft_threshold_backward", grad_in, w_in);
  const at::Tensor w = w_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor grad_w = pooled_empty(w.sizes(), w.options());
  const int64_t n = w.numel();
  const int64_t chunks = num_chunks(n);
  std::vector<double> partials(chunks, 0.0);
  const double g = threshold_of(s);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "soft_threshold_backward_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gwp = grad_w.mutable_data_ptr<scalar_t>();
    const scalar_t gt = static_cast<scalar_t>(g);
    at::parallel_for(0, chunks, kChunksPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t start = c * kChunk;
        const int64_t len = std::min(kChunk, n - start);
        partials[c] = ste ? backward_chunk<scalar_t, true>(gp + start, wp + start, gwp + start, len, gt)
                          : backward_chunk<scalar_t, false>(gp + start, wp + start, gwp + start, len, gt);
      }
    });
  });
  double sum = 0.0;
  for (double p : partials) sum += p;
  const double grad_s = -g * (1.0 - g) * sum;
  return {grad_w, at::full(s.sizes(), grad_s, s.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(adapmtl, CPU, m) {
  m.impl("soft_threshold_forward", &soft_threshold_forward_cpu);
  m.impl("soft_threshold_backward", &soft_threshold_backward_cpu);
}

}  // namespace adapmtl
