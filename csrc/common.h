// Argument checks for direct torch.ops.adapmtl calls, in one place: the CPU and CUDA kernels call them, and
// adapmtl._C exposes them (ops.cpp) to the Triton custom ops. They raise TypeError/ValueError naming the
// argument, like the user-facing checks of the Python op layer, so direct calls fail just as clearly. Limits
// of one kernel (its int32 offsets, grid sizes) stay with that kernel.
#pragma once
#include <torch/extension.h>

#include <cmath>
#include <string>
#include <tuple>
#include <utility>

namespace adapmtl {

// Size arithmetic on user-controlled values (shapes, strides, padding, dilation) that must not wrap:
// an overflow raises ValueError naming what was being computed, before anything is allocated.
inline int64_t checked_mul(const char* op, const char* what, int64_t a, int64_t b) {
  int64_t r = 0;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(a, b, &r), op, ": ", what, " overflows int64 (", a, " * ", b, ")");
  return r;
}

inline int64_t checked_add(const char* op, const char* what, int64_t a, int64_t b) {
  int64_t r = 0;
  TORCH_CHECK_VALUE(!__builtin_add_overflow(a, b, &r), op, ": ", what, " overflows int64 (", a, " + ", b, ")");
  return r;
}

inline void check_soft_threshold_args(const char* op, const at::Tensor& w, const at::Tensor& s) {
  TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()), op, ": argument 'w' must be a floating-point tensor, got ",
                   w.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(s.scalar_type()), op, ": argument 's' must be a floating-point tensor, got ",
                   s.scalar_type());
  TORCH_CHECK_VALUE(s.numel() == 1, op, ": argument 's' must hold exactly one value (a scalar threshold), got shape ",
                    s.sizes());
  TORCH_CHECK_VALUE(w.device() == s.device(), op, ": arguments 'w' and 's' must be on the same device, got ",
                    w.device(), " and ", s.device());
}

// Block soft threshold (csrc/*/block_soft_threshold_*): blocks of `block` output channels, at most this many.
constexpr int64_t kMaxThresholdBlock = 4096;

inline void check_threshold_block(const char* op, int64_t block) {
  TORCH_CHECK_VALUE(block >= 1 && block <= kMaxThresholdBlock, op, ": argument 'block' must be in [1, ",
                    kMaxThresholdBlock, "], got ", block);
}

// The rows (dim 0; 1 for a 0-d w) the block soft threshold groups, and the columns of each row.
inline std::pair<int64_t, int64_t> threshold_rows_cols(const at::Tensor& w) {
  const int64_t oc = w.dim() ? w.size(0) : 1;
  return {oc, oc ? w.numel() / oc : 0};
}

inline void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& w) {
  TORCH_CHECK_VALUE(grad_out.sizes() == w.sizes(), op, ": argument 'grad_out' must have the shape of 'w' ", w.sizes(),
                    ", got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == w.scalar_type(), op, ": argument 'grad_out' must have the dtype of 'w' (",
                   w.scalar_type(), "), got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == w.device(), op, ": argument 'grad_out' must be on the device of 'w' (",
                    w.device(), "), got ", grad_out.device());
}

// The CSR arrays of a packed sparse weight with `rows` output channels (layout: adapmtl/ops/sparse_weight.py):
// dtypes, shapes and devices, the same for every device. Each kernel adds its own dtype/device rules for x.
inline void check_csr_arrays(const char* op, const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                             const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t rows) {
  TORCH_CHECK_TYPE(row_ptr.scalar_type() == at::kInt, op, ": argument 'row_ptr' must be int32, got ",
                   row_ptr.scalar_type());
  TORCH_CHECK_TYPE(col_idx.scalar_type() == at::kInt, op, ": argument 'col_idx' must be int32, got ",
                   col_idx.scalar_type());
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), op, ": argument 'values' must have the dtype of 'x' (",
                   x.scalar_type(), "), got ", values.scalar_type());
  TORCH_CHECK_VALUE(row_ptr.dim() == 1 && row_ptr.numel() == rows + 1, op, ": argument 'row_ptr' must have shape [",
                    rows + 1, "] (output channels + 1), got ", row_ptr.sizes());
  TORCH_CHECK_VALUE(col_idx.dim() == 1, op, ": argument 'col_idx' must be 1-D, got shape ", col_idx.sizes());
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() == col_idx.numel(), op,
                    ": argument 'values' must be 1-D with the length of 'col_idx' (", col_idx.numel(), "), got shape ",
                    values.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"row_ptr", &row_ptr},
                                {"col_idx", &col_idx}, {"values", &values}}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": argument '", name, "' must be on the device of 'x' (",
                      x.device(), "), got ", t->device());
  }
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": argument 'bias' must have the dtype of 'x' (",
                     x.scalar_type(), "), got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == rows, op, ": argument 'bias' must have shape [", rows,
                      "], got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == x.device(), op, ": argument 'bias' must be on the device of 'x' (",
                      x.device(), "), got ", bias->device());
  }
}

// The dtype of a kernel's input `arg`: float32/float64, and float16/bfloat16 where the kernel has them
// (`reduced`).
inline void check_input_dtype(const char* op, const char* arg, const at::Tensor& x, bool reduced) {
  const auto t = x.scalar_type();
  const bool ok = t == at::kFloat || t == at::kDouble || (reduced && (t == at::kHalf || t == at::kBFloat16));
  TORCH_CHECK_TYPE(ok, op, ": argument '", arg, "' must be ",
                   reduced ? "float32, float64, float16 or bfloat16" : "float32 or float64", ", got ", t);
}

// A 2-D convolution's geometry, validated with overflow-checked arithmetic before anything is allocated.
struct ConvGeometry {
  int64_t N, C, H, W;                // input
  int64_t OC, KH, KW, cols;          // weight; cols = C * KH * KW, the length of a CSR row
  int64_t sh, sw, ph, pw, dh, dw;    // stride, zero padding, dilation
  int64_t Hp, Wp, span_h, span_w;    // padded input, dilated kernel
  int64_t OH, OW;                    // output
};

inline ConvGeometry check_conv_args(const char* op, const at::Tensor& x, at::IntArrayRef weight_shape,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(weight_shape.size() == 4, op, ": argument 'weight_shape' must be [C_out, C_in, KH, KW], got ",
                    weight_shape);
  ConvGeometry g{};
  g.OC = weight_shape[0], g.C = weight_shape[1], g.KH = weight_shape[2], g.KW = weight_shape[3];
  TORCH_CHECK_VALUE(g.OC >= 0 && g.C > 0 && g.KH > 0 && g.KW > 0, op,
                    ": argument 'weight_shape' must hold positive sizes (C_out may be 0), got ", weight_shape);
  for (const auto& [name, v, least] : {std::tuple<const char*, at::IntArrayRef, int64_t>{"stride", stride, 1},
                                       {"padding", padding, 0}, {"dilation", dilation, 1}}) {
    TORCH_CHECK_VALUE(v.size() == 2, op, ": argument '", name, "' must have 2 values, got ", v.size());
    TORCH_CHECK_VALUE(v[0] >= least && v[1] >= least, op, ": argument '", name, "' must hold values >= ", least,
                      ", got ", v);
  }
  g.cols = checked_mul(op, "the weight's row length", checked_mul(op, "the weight's row length", g.C, g.KH), g.KW);
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) == g.C, op, ": argument 'x' must have shape [N, ", g.C,
                    ", H, W] (NCHW, C_in of 'weight_shape'), got ", x.sizes());
  g.N = x.size(0), g.H = x.size(2), g.W = x.size(3);
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  g.Hp = checked_add(op, "the padded input height", g.H, checked_mul(op, "2 * padding", 2, g.ph));
  g.Wp = checked_add(op, "the padded input width", g.W, checked_mul(op, "2 * padding", 2, g.pw));
  g.span_h = checked_mul(op, "the dilated kernel height", g.dh, g.KH - 1) + 1;
  g.span_w = checked_mul(op, "the dilated kernel width", g.dw, g.KW - 1) + 1;
  TORCH_CHECK_VALUE(g.Hp >= g.span_h && g.Wp >= g.span_w, op, ": argument 'x' of spatial size ", g.H, "x", g.W,
                    " (padded ", g.Hp, "x", g.Wp, ") is smaller than the dilated kernel ", g.span_h, "x", g.span_w);
  g.OH = (g.Hp - g.span_h) / g.sh + 1;
  g.OW = (g.Wp - g.span_w) / g.sw + 1;
  return g;
}

// A sparse linear layer's arguments: returns the number of output features (rows of the CSR weight).
inline int64_t check_linear_args(const char* op, const at::Tensor& x, const at::Tensor& row_ptr, int64_t in_features) {
  TORCH_CHECK_VALUE(in_features > 0, op, ": argument 'in_features' must be a positive int, got ", in_features);
  TORCH_CHECK_VALUE(row_ptr.dim() == 1 && row_ptr.numel() >= 1, op,
                    ": argument 'row_ptr' must be 1-D of length out_features + 1, got shape ", row_ptr.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == in_features, op, ": argument 'x' must have shape [..., ", in_features,
                    "], got ", x.sizes());
  return row_ptr.numel() - 1;
}

// Everything a sparse_conv2d kernel needs checked (the kernel adds its device and its own limits).
inline ConvGeometry check_sparse_conv2d_args(const char* op, const at::Tensor& x, const at::Tensor& row_ptr,
                                             const at::Tensor& col_idx, const at::Tensor& values,
                                             const c10::optional<at::Tensor>& bias, at::IntArrayRef weight_shape,
                                             at::IntArrayRef stride, at::IntArrayRef padding,
                                             at::IntArrayRef dilation, bool reduced) {
  check_input_dtype(op, "x", x, reduced);
  const ConvGeometry g = check_conv_args(op, x, weight_shape, stride, padding, dilation);
  check_csr_arrays(op, x, row_ptr, col_idx, values, bias, g.OC);
  return g;
}

// The epilogue of sparse_conv2d_fused (every device): the clamp bounds, either absent or a number, no NaN,
// lo <= hi; the residual, when given, of the output's shape, x's dtype and x's device.
inline void check_conv_epilogue(const char* op, const at::Tensor& x, const ConvGeometry& g,
                                const c10::optional<at::Tensor>& residual, c10::optional<double> lo,
                                c10::optional<double> hi) {
  const auto bound = [](c10::optional<double> v) { return v ? std::to_string(*v) : std::string("None"); };
  TORCH_CHECK_VALUE(!(lo && std::isnan(*lo)) && !(hi && std::isnan(*hi)) && !(lo && hi && *lo > *hi), op,
                    ": arguments 'lo' and 'hi' (the clamp bounds) must satisfy lo <= hi, got [", bound(lo), ", ",
                    bound(hi), "]");
  if (!residual.has_value()) return;
  const std::vector<int64_t> out{g.N, g.OC, g.OH, g.OW};
  TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef(out) && residual->scalar_type() == x.scalar_type() &&
                        residual->device() == x.device(),
                    op, ": argument 'residual' must be a ", at::IntArrayRef(out), " ", x.scalar_type(),
                    " tensor on ", x.device(), " (the output's shape), got ", residual->sizes(), " ",
                    residual->scalar_type(), " on ", residual->device());
}

inline int64_t check_sparse_linear_args(const char* op, const at::Tensor& x, const at::Tensor& row_ptr,
                                        const at::Tensor& col_idx, const at::Tensor& values,
                                        const c10::optional<at::Tensor>& bias, int64_t in_features, bool reduced) {
  check_input_dtype(op, "x", x, reduced);
  const int64_t rows = check_linear_args(op, x, row_ptr, in_features);
  check_csr_arrays(op, x, row_ptr, col_idx, values, bias, rows);
  return rows;
}

}  // namespace adapmtl
