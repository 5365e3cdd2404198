// Fused block (group) soft threshold on the CPU: the proximal step of a group lasso over blocks of `block`
// consecutive output channels (dim 0) at each position of the other dims (adapmtl/ops/block_soft_threshold.py
// has the definition and the gradient's derivation).
//
// w viewed as [OC, R]; block b = rows [b * block, min(OC, (b + 1) * block)) at column j; n = ||w_B||_2, g = sigmoid(s):
//   forward:  out_B = w_B * (n <= g ? 0 : 1 - g / n), and nnz(out), in one read of w;
//   backward: live blocks (n > g): dL/dw_B = (1 - g/n) G_B + g w_B (w_B . G_B) / n^3; dead ones: 0 (exact) or
//             G_B (ste); dL/ds = -g(1 - g) * sum over live blocks of (w_B . G_B) / n, in one read of G and w.
// NaN in a block makes its n NaN: NaN <= g is false, so the block's outputs are NaN (kept, counted), as the
// element-wise op keeps a NaN weight. Work is cut into (block, column chunk) items whose partial counts and
// sums are added in item order, so results do not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "cpu/buffer_pool.h"

namespace adapmtl {
namespace {

constexpr int64_t kColumns = 512;  // columns per item: the block's rows of them stay in L1

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ADAPMTL_BLOCK_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ADAPMTL_BLOCK_MULTIVERSION
#endif

// Rows [0, rows) x columns [0, cols) of one item (row stride R); returns the non-zeros written.
template <typename T>
ADAPMTL_BLOCK_MULTIVERSION int64_t forward_item(const T* __restrict w, T* __restrict out, int64_t rows, int64_t cols,
                                                int64_t R, T g, T* __restrict scale) {
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) scale[j] = T(0);
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) scale[j] += w[r * R + j] * w[r * R + j];
  }
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    const T n = std::sqrt(scale[j]);
    scale[j] = n <= g ? T(0) : T(1) - g / n;  // NaN n: NaN scale
  }
  int64_t count = 0;
  for (int64_t r = 0; r < rows; ++r) {
    int32_t c = 0;
#pragma omp simd reduction(+ : c)
    for (int64_t j = 0; j < cols; ++j) {
      const T o = w[r * R + j] * scale[j];
      out[r * R + j] = o;
      c += o != T(0) ? 1 : 0;
    }
    count += c;
  }
  return count;
}

// Returns the item's sum of (w_B . G_B) / n over its live blocks; writes grad_w.
template <typename T, bool kSte>
ADAPMTL_BLOCK_MULTIVERSION double backward_item(const T* __restrict grad, const T* __restrict w, T* __restrict grad_w,
                                                int64_t rows, int64_t cols, int64_t R, T g, T* __restrict sq,
                                                T* __restrict dot) {
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) sq[j] = T(0), dot[j] = T(0);
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      sq[j] += w[r * R + j] * w[r * R + j];
      dot[j] += w[r * R + j] * grad[r * R + j];
    }
  }
  double sum = 0;
  for (int64_t j = 0; j < cols; ++j) {
    const T n = std::sqrt(sq[j]);
    const bool live = n > g;  // false for NaN
    if (live) sum += double(dot[j]) / double(n);      // (w . G) / n
    sq[j] = live ? T(1) - g / n : T(0);               // now the scale
    dot[j] = live ? g * dot[j] / (n * n * n) : T(0);  // now the coefficient of w in dL/dw
  }
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      const T G = grad[r * R + j];
      grad_w[r * R + j] = kSte ? G : sq[j] * G + dot[j] * w[r * R + j];
    }
  }
  return sum;
}

std::tuple<at::Tensor, at::Tensor> block_soft_threshold_forward_cpu(const at::Tensor& w_in, const at::Tensor& s,
                                                                    int64_t block, bool /*ste*/) {
  const char* op = "block_soft_threshold_forward";
  check_soft_threshold_args(op, w_in, s);
  check_threshold_block(op, block);
  const at::Tensor w = w_in.contiguous();
  at::Tensor out = pooled_empty(w.sizes(), w.options());
  const auto [OC, R] = threshold_rows_cols(w);
  const int64_t blocks = (OC + block - 1) / block, chunks = (R + kColumns - 1) / kColumns;
  std::vector<int64_t> counts(blocks * chunks, 0);
  const double g = at::sigmoid(s.reshape({})).item<double>();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "block_soft_threshold_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    const scalar_t gt = static_cast<scalar_t>(g);
    at::parallel_for(0, blocks * chunks, std::max<int64_t>(1, 65536 / (block * kColumns)), [&](int64_t a, int64_t e) {
      std::vector<scalar_t> scale(kColumns);
      for (int64_t it = a; it < e; ++it) {
        const int64_t b = it / chunks, j0 = (it % chunks) * kColumns;
        const int64_t rows = std::min(block, OC - b * block), cols = std::min(kColumns, R - j0);
        const int64_t at = b * block * R + j0;
        counts[it] = forward_item<scalar_t>(wp + at, op_ + at, rows, cols, R, gt, scale.data());
      }
    });
  });
  int64_t nnz = 0;
  for (int64_t c : counts) nnz += c;
  return {out, at::scalar_tensor(nnz, w.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor> block_soft_threshold_backward_cpu(const at::Tensor& grad_in, const at::Tensor& w_in,
                                                                     const at::Tensor& s, int64_t block, bool ste) {
  const char* op = "block_soft_threshold_backward";
  check_soft_threshold_args(op, w_in, s);
  check_grad_out(op, grad_in, w_in);
  check_threshold_block(op, block);
  const at::Tensor w = w_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor grad_w = pooled_empty(w.sizes(), w.options());
  const auto [OC, R] = threshold_rows_cols(w);
  const int64_t blocks = (OC + block - 1) / block, chunks = (R + kColumns - 1) / kColumns;
  std::vector<double> partials(blocks * chunks, 0.0);
  const double g = at::sigmoid(s.reshape({})).item<double>();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "block_soft_threshold_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gwp = grad_w.mutable_data_ptr<scalar_t>();
    const scalar_t gt = static_cast<scalar_t>(g);
    at::parallel_for(0, blocks * chunks, std::max<int64_t>(1, 65536 / (block * kColumns)), [&](int64_t a, int64_t e) {
      std::vector<scalar_t> sq(kColumns), dot(kColumns);
      for (int64_t it = a; it < e; ++it) {
        const int64_t b = it / chunks, j0 = (it % chunks) * kColumns;
        const int64_t rows = std::min(block, OC - b * block), cols = std::min(kColumns, R - j0);
        const int64_t at = b * block * R + j0;
        partials[it] = ste ? backward_item<scalar_t, true>(gp + at, wp + at, gwp + at, rows, cols, R, gt, sq.data(), dot.data())
                           : backward_item<scalar_t, false>(gp + at, wp + at, gwp + at, rows, cols, R, gt, sq.data(), dot.data());
      }
    });
  });
  double sum = 0.0;
  for (double p : partials) sum += p;
  return {grad_w, at::full(s.sizes(), -g * (1.0 - g) * sum, s.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(adapmtl, CPU, m) {
  m.impl("block_soft_threshold_forward", &block_soft_threshold_forward_cpu);
  m.impl("block_soft_threshold_backward", &block_soft_threshold_backward_cpu);
}

}  // namespace adapmtl
