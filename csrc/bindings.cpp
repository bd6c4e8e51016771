// pybind11 module pyengine._C: thin wrappers over the launchers in ops.h. Python passes
// raw device pointers (tensor.data_ptr()), element strides, dtype codes, the device index
// and the current stream (torch.cuda.current_stream().cuda_stream); pyengine/cuda_ops.py
// validates everything before calling in. No libtorch: only the CUDA runtime.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "ops.h"

#ifndef PYENGINE_CUDA_ARCHS
#define PYENGINE_CUDA_ARCHS "unknown"
#endif
#ifndef PYENGINE_NVCC_VERSION
#define PYENGINE_NVCC_VERSION "unknown"
#endif
#ifndef PYENGINE_CUDART_LINKAGE
#define PYENGINE_CUDART_LINKAGE "unknown"
#endif
#ifndef PYENGINE_BUILD_TYPE
#define PYENGINE_BUILD_TYPE "unknown"
#endif

namespace py = pybind11;

namespace {

std::vector<std::string> split_archs(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ';' || c == ',' || c == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

py::dict build_info() {
  py::dict d;
  d["cuda_archs"] = split_archs(PYENGINE_CUDA_ARCHS);
  d["cuda_runtime_version"] = CUDART_VERSION;  // compiled against, e.g. 13000
  d["nvcc_version"] = std::string(PYENGINE_NVCC_VERSION);
  d["cudart"] = std::string(PYENGINE_CUDART_LINKAGE);
  d["build_type"] = std::string(PYENGINE_BUILD_TYPE);
  d["pybind11_version"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                          std::to_string(PYBIND11_VERSION_MINOR) + "." +
                          std::to_string(PYBIND11_VERSION_PATCH);
  d["ops"] = std::vector<std::string>{"add_rms_norm", "add_layer_norm", "rotary",
                                      "gather_pooled", "pooled_norm", "activation"};
  // Safe without a GPU or driver: 0 means no driver was found.
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  cudaGetLastError();
  d["driver_version"] = driver;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyengine CUDA kernels (raw-pointer launchers; use pyengine.cuda_ops)";
  m.def("build_info", &build_info,
        "Compiled CUDA architectures, CUDA runtime version, nvcc version, cudart linkage, "
        "driver version (0 without a driver) and the ops built in.");

  m.def(
      "add_rms_norm",
      [](int dtype, int wdtype, uintptr_t x, int64_t x_stride, uintptr_t residual,
         int64_t res_stride, uintptr_t weight, uintptr_t out, uintptr_t summed, int64_t rows,
         int64_t hidden, double eps, double offset, int device, uintptr_t stream) {
        pyengine::launch_add_norm("add_rms_norm", true, dtype, wdtype, x, x_stride, residual,
                                  res_stride, weight, 0, out, summed, rows, hidden, eps, offset,
                                  device, stream);
      },
      py::arg("dtype"), py::arg("wdtype"), py::arg("x"), py::arg("x_stride"),
      py::arg("residual"), py::arg("res_stride"), py::arg("weight"), py::arg("out"),
      py::arg("summed"), py::arg("rows"), py::arg("hidden"), py::arg("eps"), py::arg("offset"),
      py::arg("device"), py::arg("stream"));

  m.def(
      "add_layer_norm",
      [](int dtype, int wdtype, uintptr_t x, int64_t x_stride, uintptr_t residual,
         int64_t res_stride, uintptr_t weight, uintptr_t bias, uintptr_t out, uintptr_t summed,
         int64_t rows, int64_t hidden, double eps, int device, uintptr_t stream) {
        pyengine::launch_add_norm("add_layer_norm", false, dtype, wdtype, x, x_stride, residual,
                                  res_stride, weight, bias, out, summed, rows, hidden, eps, 0.0,
                                  device, stream);
      },
      py::arg("dtype"), py::arg("wdtype"), py::arg("x"), py::arg("x_stride"),
      py::arg("residual"), py::arg("res_stride"), py::arg("weight"), py::arg("bias"),
      py::arg("out"), py::arg("summed"), py::arg("rows"), py::arg("hidden"), py::arg("eps"),
      py::arg("device"), py::arg("stream"));

  m.def("rotary", &pyengine::launch_rotary, py::arg("dtype"), py::arg("q"),
        py::arg("q_tok_stride"), py::arg("q_head_stride"), py::arg("q_heads"), py::arg("k"),
        py::arg("k_tok_stride"), py::arg("k_head_stride"), py::arg("k_heads"),
        py::arg("positions"), py::arg("cos_sin"), py::arg("tokens"), py::arg("rot_dim"),
        py::arg("neox"), py::arg("device"), py::arg("stream"));

  m.def("gather_pooled", &pyengine::launch_gather_pooled, py::arg("dtype"), py::arg("hidden"),
        py::arg("row_stride"), py::arg("hidden_size"), py::arg("cu_seqlens"), py::arg("batch"),
        py::arg("pooling"), py::arg("out"), py::arg("device"), py::arg("stream"));

  // The trailing arguments (pyengine::PooledNormConfig) select a mean-path variant; their
  // defaults are the default kernel.
  m.def(
      "pooled_norm",
      [](int dtype, int wdtype, uintptr_t hidden, int64_t h_stride, uintptr_t residual,
         int64_t r_stride, uintptr_t cu_seqlens, int64_t batch, int pooling, int norm_kind,
         uintptr_t weight, uintptr_t bias, double eps, double offset, uintptr_t out,
         int64_t hidden_size, int device, uintptr_t stream, int variant, int64_t slice_rows,
         int warps, int rows_per_warp, int blocks_per_sm, int64_t tokens, uintptr_t workspace,
         int64_t workspace_rows) {
        pyengine::PooledNormConfig cfg;
        cfg.variant = variant;
        cfg.slice_rows = slice_rows;
        cfg.warps = warps;
        cfg.rows_per_warp = rows_per_warp;
        cfg.blocks_per_sm = blocks_per_sm;
        cfg.tokens = tokens;
        cfg.workspace = workspace;
        cfg.workspace_rows = workspace_rows;
        pyengine::launch_pooled_norm(dtype, wdtype, hidden, h_stride, residual, r_stride,
                                     cu_seqlens, batch, pooling, norm_kind, weight, bias, eps,
                                     offset, out, hidden_size, device, stream, cfg);
      },
      py::arg("dtype"), py::arg("wdtype"), py::arg("hidden"), py::arg("h_stride"),
      py::arg("residual"), py::arg("r_stride"), py::arg("cu_seqlens"), py::arg("batch"),
      py::arg("pooling"), py::arg("norm_kind"), py::arg("weight"), py::arg("bias"),
      py::arg("eps"), py::arg("offset"), py::arg("out"), py::arg("hidden_size"),
      py::arg("device"), py::arg("stream"), py::arg("variant") = 0, py::arg("slice_rows") = 0,
      py::arg("warps") = 8, py::arg("rows_per_warp") = 1, py::arg("blocks_per_sm") = 0,
      py::arg("tokens") = -1, py::arg("workspace") = 0, py::arg("workspace_rows") = 0);

  m.def("activation", &pyengine::launch_activation, py::arg("dtype"), py::arg("logits"),
        py::arg("row_stride"), py::arg("batch"), py::arg("labels"), py::arg("kind"),
        py::arg("bias"), py::arg("scale"), py::arg("bias_vec"), py::arg("scale_vec"),
        py::arg("out"), py::arg("device"), py::arg("stream"));
}
