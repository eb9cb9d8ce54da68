// The extension fastcl._C (the module name comes from the build: TORCH_EXTENSION_NAME = _C).
//
// The four kernel entry points are PyTorch operators, registered with TORCH_LIBRARY under the
// namespace fastcl_cuda (fastcl_emulated in the CPU emulation build, so both can live in one
// process): torch.ops.fastcl_cuda.softmax_stats and so on, with schemas the dispatcher,
// torch.library.opcheck and torch.compile understand (fake implementations: fastcl/backends/cuda.py).
// pybind11 keeps only the build queries and the namespace's name. The wrappers in
// fastcl/backends/cuda.py are the intended callers; every entry point checks its inputs (ops.cpp)
// before it touches CUDA.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

#ifdef FASTCL_EMULATION_HOST
#define FASTCL_OPS_NAMESPACE fastcl_emulated
#else
#define FASTCL_OPS_NAMESPACE fastcl_cuda
#endif
#define FASTCL_STRINGIFY_(x) #x
#define FASTCL_STRINGIFY(x) FASTCL_STRINGIFY_(x)

TORCH_LIBRARY(FASTCL_OPS_NAMESPACE, m) {
  // Softmax-family statistics: (lse [n_own], pos_sum, pos_cnt); rows when own_rows, else columns
  m.def("softmax_stats(Tensor query, Tensor key, Tensor scale_rows, Tensor? positive_index, Tensor? row_labels, "
        "Tensor? col_labels, Tensor? col_has_label, bool own_rows, bool exclude_self, bool decoupled, "
        "bool allow_tf32, int n_split) -> Tensor[]");
  // Softmax-family gradient accumulator [n_own, D]: sum_j G_ij k_j (rows) or sum_i G_ij s_i q_i (columns)
  m.def("softmax_grad(Tensor query, Tensor key, Tensor scale_rows, Tensor? positive_index, Tensor? row_labels, "
        "Tensor? col_labels, Tensor? col_has_label, Tensor lse_row, Tensor w_row, Tensor? coef_row, "
        "Tensor? lse_col, Tensor? w_col, bool own_rows, int n_own, bool exclude_self, bool decoupled, "
        "Tensor? g_scale, bool allow_tf32, int n_split) -> Tensor");
  // The chunked pass: G of query rows [row0, row0 + R) written into g [R, C]; sigmoid also
  // returns (loss_rows, gsum_rows)
  m.def("logit_grad(Tensor query, Tensor key, Tensor scale_rows, Tensor? positive_index, Tensor? row_labels, "
        "Tensor? col_labels, Tensor? col_has_label, Tensor? lse_row, Tensor? w_row, Tensor? coef_row, "
        "Tensor? lse_col, Tensor? w_col, Tensor? bias, Tensor? g_scale, Tensor(a!) g, int row0, bool sigmoid, "
        "bool exclude_self, bool decoupled, bool allow_tf32, int n_split) -> Tensor[]");
  // Sigmoid family: (acc [n_own, D] or empty, sum_j softplus(-z_ij L_ij) [N], sum_j G_ij [N])
  m.def("sigmoid_pass(Tensor query, Tensor key, Tensor scale_rows, Tensor? positive_index, Tensor? bias, "
        "bool own_rows, int n_own, bool accumulate, Tensor? row_labels, Tensor? col_labels, bool allow_tf32, "
        "int n_split) -> Tensor[]");
}

// One kernel for every device the tensors may be on (CUDA, or the CPU of the emulation build); no
// autograd formula: the callers run them where autograd is off (inside fastcl's own operators).
TORCH_LIBRARY_IMPL(FASTCL_OPS_NAMESPACE, CompositeExplicitAutograd, m) {
  m.impl("softmax_stats", &fastcl::softmax_stats);
  m.impl("softmax_grad", &fastcl::softmax_grad);
  m.impl("logit_grad", &fastcl::logit_grad);
  m.impl("sigmoid_pass", &fastcl::sigmoid_pass);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcl CUDA kernels: fused contrastive-loss tiles that never materialise S = Q K^T";

  m.def("built_with_cuda", &fastcl::built_with_cuda, "True when the CUDA tile kernels were compiled in");
  m.def("cuda_archs", &fastcl::cuda_archs, "The SM architectures the kernels were compiled for, e.g. ['80', '90']");
  m.def("ops_namespace", [] { return std::string(FASTCL_STRINGIFY(FASTCL_OPS_NAMESPACE)); },
        "The torch.ops namespace of the kernel operators (fastcl_cuda, or fastcl_emulated)");
}
