// Argument checks shared by the CPU and CUDA kernels. They raise TypeError/ValueError naming the
// argument, like the Python op layer, so direct torch.ops.adapmtl calls fail just as clearly.
#pragma once
#include <torch/extension.h>

namespace adapmtl {

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

}  // namespace adapmtl
