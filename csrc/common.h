// Argument checks shared by the CPU and CUDA kernels. They raise TypeError/ValueError naming the
// argument, like the Python op layer, so direct torch.ops.adapmtl calls fail just as clearly.
#pragma once
#include <torch/extension.h>

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

}  // namespace adapmtl
