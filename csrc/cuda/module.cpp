// The Python module adapmtl._C_cuda. Importing it registers the CUDA kernels of the adapmtl operators
// (TORCH_LIBRARY_IMPL blocks in the .cu files); the schemas come from adapmtl._C, imported first.
#include <c10/cuda/CUDAFunctions.h>
#include <torch/extension.h>

static int64_t device_count() { return static_cast<int64_t>(c10::cuda::device_count()); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adapmtl CUDA kernels (operators are registered under torch.ops.adapmtl for the CUDA dispatch key)";
  m.def("device_count", &device_count, "number of CUDA devices visible to this process (0 without a GPU)");
}
