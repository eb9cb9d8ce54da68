// pybind11 bindings of the extension fastcl._C (the module name comes from the build:
// TORCH_EXTENSION_NAME = _C). The wrappers in fastcl/backends/cuda.py are the intended callers;
// every entry point checks its inputs (ops.cpp) before it touches CUDA.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "fastcl CUDA kernels: fused contrastive-loss tiles that never materialise S = Q K^T";

  m.def("built_with_cuda", &fastcl::built_with_cuda, "True when the CUDA tile kernels were compiled in");
  m.def("cuda_archs", &fastcl::cuda_archs, "The SM architectures the kernels were compiled for, e.g. ['80', '90']");

  m.def("softmax_stats", &fastcl::softmax_stats,
        "Softmax-family statistics: (lse [n_own], pos_sum, pos_cnt); rows when own_rows, else columns",
        py::arg("query"), py::arg("key"), py::arg("scale_rows"), py::arg("positive_index") = py::none(),
        py::arg("row_labels") = py::none(), py::arg("col_labels") = py::none(),
        py::arg("col_has_label") = py::none(), py::arg("own_rows") = true, py::arg("exclude_self") = false,
        py::arg("decoupled") = false, py::arg("allow_tf32") = false, py::arg("n_split") = 0);

  m.def("softmax_grad", &fastcl::softmax_grad,
        "Softmax-family gradient accumulator [n_own, D]: sum_j G_ij k_j (rows) or sum_i G_ij s_i q_i (columns)",
        py::arg("query"), py::arg("key"), py::arg("scale_rows"), py::arg("positive_index"),
        py::arg("row_labels"), py::arg("col_labels"),
        py::arg("col_has_label"), py::arg("lse_row"), py::arg("w_row"),
        py::arg("coef_row"), py::arg("lse_col"), py::arg("w_col"),
        py::arg("own_rows"), py::arg("n_own"), py::arg("exclude_self"),
        py::arg("decoupled"), py::arg("g_scale") = py::none(), py::arg("allow_tf32") = false,
        py::arg("n_split") = 0);

  m.def("logit_grad", &fastcl::logit_grad,
        "The chunked pass: G of query rows [row0, row0 + R) into g [R, C]; sigmoid also returns (loss_rows, gsum_rows)",
        py::arg("query"), py::arg("key"), py::arg("scale_rows"), py::arg("positive_index"),
        py::arg("row_labels"), py::arg("col_labels"), py::arg("col_has_label"), py::arg("lse_row"),
        py::arg("w_row"), py::arg("coef_row"), py::arg("lse_col"), py::arg("w_col"), py::arg("bias"),
        py::arg("g_scale"), py::arg("g"), py::arg("row0"), py::arg("sigmoid"), py::arg("exclude_self"),
        py::arg("decoupled"), py::arg("allow_tf32") = false, py::arg("n_split") = 0);

  m.def("sigmoid_pass", &fastcl::sigmoid_pass,
        "Sigmoid family: (acc [n_own, D] or empty, sum_j softplus(-z_ij L_ij) [N], sum_j G_ij [N])",
        py::arg("query"), py::arg("key"), py::arg("scale_rows"), py::arg("positive_index"), py::arg("bias"),
        py::arg("own_rows"), py::arg("n_own"), py::arg("accumulate"), py::arg("row_labels") = py::none(),
        py::arg("col_labels") = py::none(), py::arg("allow_tf32") = false, py::arg("n_split") = 0);
}
