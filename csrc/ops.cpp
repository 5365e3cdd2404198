// Operator schemas of the adapmtl namespace and the Python module adapmtl._C.
//
// Kernels register implementations per dispatch key in their own files (cpu/*.cpp into this
// extension, cuda/*.cu into adapmtl._C_cuda). Fake (meta) kernels and autograd formulas are
// registered from Python in adapmtl/ops/, next to the dispatching op layer.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common.h"
#include "cpu/plan_cache.h"
#include "cpu/soft_threshold_cpu.h"
#include "cpu/sparse_tuning.h"

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(adapmtl, m) {
  // Soft threshold w_hat = sign(w) * relu(|w| - sigmoid(s)) and the count of non-zeros of w_hat.
  // `ste` only selects the gradient of the autograd formula registered on this op.
  m.def("soft_threshold_forward(Tensor w, Tensor s, bool ste) -> (Tensor, Tensor)");
  // (dL/dw, dL/ds) from grad_out = dL/dw_hat; dL/dw = grad_out * mask (exact) or grad_out (ste).
  m.def("soft_threshold_backward(Tensor grad_out, Tensor w, Tensor s, bool ste) -> (Tensor, Tensor)");
  // Block (group) soft threshold over blocks of `block` consecutive output channels (dim 0) at each position of
  // the other dims: w_B * relu(1 - sigmoid(s) / ||w_B||), and its non-zeros; its (dL/dw, dL/ds).
  m.def("block_soft_threshold_forward(Tensor w, Tensor s, int block, bool ste) -> (Tensor, Tensor)");
  m.def("block_soft_threshold_backward(Tensor grad_out, Tensor w, Tensor s, int block, bool ste) -> (Tensor, Tensor)");

  // Sparse inference kernels over a pruned weight packed as CSR rows per output channel
  // (layout documented in adapmtl/ops/sparse_weight.py): row_ptr int32 [C_out + 1], col_idx int32 [nnz]
  // indexing the flattened (c_in, kh, kw) of a row, values [nnz] in the weight's dtype.
  m.def(
      "sparse_conv2d(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? bias, int[] weight_shape, "
      "int[] stride, int[] padding, int[] dilation) -> Tensor");
  // clamp(sparse_conv2d(...) + residual, lo, hi): the residual add and the ReLU / ReLU6 in the kernel's store
  // (CPU; the Python op layer runs them unfused on the other backends). A bound that is None is none (optional
  // rather than +-inf: an AOTInductor package serializes the arguments as JSON, which has no infinities).
  m.def(
      "sparse_conv2d_fused(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? bias, int[] weight_shape, "
      "int[] stride, int[] padding, int[] dilation, Tensor? residual, float? lo, float? hi) -> Tensor");
  m.def(
      "sparse_linear(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? bias, int in_features) "
      "-> Tensor");
}

static bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adapmtl C++ CPU kernels (operators are registered under torch.ops.adapmtl)";
  m.def("openmp_enabled", &openmp_enabled, "whether the CPU kernels were built with OpenMP");
  // The CPU sparse kernel's configurations and autotuner (csrc/cpu/sparse_tuning.h).
  m.def("set_cpu_autotune", [](bool enabled, const std::string& cache_file) {
    adapmtl::Autotuner::instance().configure(enabled, cache_file);
  });
  m.def("cpu_autotune_info", [] { return adapmtl::Autotuner::instance().info(); },
        "(enabled, cache file, entries, searches, hits, skipped cache-file lines)");
  m.def("cpu_autotune_clear", [] { adapmtl::Autotuner::instance().clear(); });
  m.def("cpu_sparse_candidates", [](bool with_tap_major) {
    std::vector<std::string> out;
    for (const auto& t : adapmtl::candidate_tunings(with_tap_major)) out.push_back(t.str());
    return out;
  });
  m.def("cpu_sparse_default_config", [] { return adapmtl::default_tuning().str(); });
  m.def("cpu_sparse_panel_calls", [] {
    const auto* c = adapmtl::panel_calls();
    return std::make_tuple(c[0].load(), c[1].load(), c[2].load(), c[3].load());
  }, "sparse conv/linear calls of this process that ran one output channel, panels of 4, of 8 and channel-vector "
     "tiles");
  m.def("cpu_sparse_plan_cache_info", [] { return adapmtl::PlanCache::instance().info(); },
        "(hits, misses, plans kept, bytes kept) of the CPU sparse kernel's plan cache (csrc/cpu/plan_cache.h)");
  m.def("cpu_sparse_plan_cache_clear", [] { adapmtl::PlanCache::instance().clear(); });
  m.def("cpu_cache_sizes", [] {
    const auto& c = adapmtl::cache_sizes();
    return std::make_tuple(c.l1d, c.l2, c.l3);
  }, "(L1d, L2, L3) in bytes, as the CPU kernels read them (csrc/cpu/cpu_info.h)");
  m.def("cpu_model", [] { return adapmtl::cpu_model(); });
  m.def("cpu_capability", [] { return std::string(adapmtl::cpu_capability_name()); },
        "the instruction set the CPU sparse kernels run: torch's CPU capability (csrc/cpu/cpu_info.h)");
  m.def("soft_threshold_streamed_calls", &adapmtl::soft_threshold_streamed_calls,
        "(forward, backward) CPU soft-threshold calls of this process that wrote with streaming stores");
  // The checks of csrc/common.h for the Triton custom ops, so that direct torch.ops calls of every backend
  // are checked by the same code (the Triton launchers check only their own kernels' limits).
  m.def("check_soft_threshold_args",
        [](const std::string& op, const at::Tensor& w, const at::Tensor& s, const c10::optional<at::Tensor>& grad_out) {
          adapmtl::check_soft_threshold_args(op.c_str(), w, s);
          adapmtl::check_input_dtype(op.c_str(), "w", w, /*reduced=*/true);  // the Triton kernels' dtypes
          if (grad_out.has_value()) adapmtl::check_grad_out(op.c_str(), *grad_out, w);
        });
  m.def("check_threshold_block", [](const std::string& op, int64_t block) {
    adapmtl::check_threshold_block(op.c_str(), block);
  });
  m.def("check_sparse_conv2d_args",
        [](const std::string& op, const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
           const at::Tensor& values, const c10::optional<at::Tensor>& bias, const std::vector<int64_t>& weight_shape,
           const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
           const std::vector<int64_t>& dilation) {
          adapmtl::check_sparse_conv2d_args(op.c_str(), x, row_ptr, col_idx, values, bias, weight_shape, stride,
                                            padding, dilation, /*reduced=*/true);
        });
  m.def("check_sparse_linear_args",
        [](const std::string& op, const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
           const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t in_features) {
          adapmtl::check_sparse_linear_args(op.c_str(), x, row_ptr, col_idx, values, bias, in_features,
                                            /*reduced=*/true);
        });
}
