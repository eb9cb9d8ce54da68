// fastcl._cpu: Torch bindings of the fused CPU tile epilogues (tile_epilogues.h). Every entry
// checks its tensors (float32, on the CPU, shapes and strides the kernels assume) and releases
// the GIL while it runs: the torch backend calls it from its tile worker threads.
#include <torch/extension.h>

#include <vector>

#include "tile_epilogues.h"

namespace {

void check_tile(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == 2,
              "fastcl._cpu: ", name, " must be a float32 CPU matrix, got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 && t.stride(0) >= t.size(1), "fastcl._cpu: ", name, " must have unit column stride");
}

void check_vec(const torch::Tensor& t, const char* name, c10::IntArrayRef shape, torch::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == shape && t.is_contiguous(),
              "fastcl._cpu: ", name, " must be a contiguous ", dtype, " CPU tensor of shape ", shape, ", got ",
              t.scalar_type(), " ", t.sizes());
}

torch::Tensor exp_row_sums(const torch::Tensor& prod, const torch::Tensor& col_scale, const torch::Tensor& shift,
                           const torch::Tensor& row_scale) {
  check_tile(prod, "prod");
  const int64_t rows = prod.size(0), cols = prod.size(1);
  check_vec(col_scale, "col_scale", {cols}, torch::kFloat32);
  check_vec(shift, "shift", {rows}, torch::kFloat32);
  check_vec(row_scale, "row_scale", {rows}, torch::kFloat32);
  auto out = torch::empty({rows}, prod.options());
  {
    pybind11::gil_scoped_release no_gil;
    fastcl_cpu::exp_row_sums(prod.data_ptr<float>(), rows, cols, prod.stride(0), col_scale.data_ptr<float>(),
                             shift.data_ptr<float>(), row_scale.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}

void prefix_logit_grads(const std::vector<torch::Tensor>& prods, const torch::Tensor& col_scale,
                        const torch::Tensor& row_scale, const torch::Tensor& gamma,
                        const c10::optional<torch::Tensor>& sign, const torch::Tensor& coef, const torch::Tensor& pos,
                        const torch::Tensor& d_row, const torch::Tensor& d_col) {
  const int64_t n_pre = static_cast<int64_t>(prods.size());
  TORCH_CHECK(n_pre > 0, "fastcl._cpu: prefix_logit_grads needs at least one prefix");
  check_tile(prods[0], "prods[0]");
  const int64_t rows = prods[0].size(0), cols = prods[0].size(1), ld = prods[0].stride(0);
  std::vector<float*> ptrs;
  for (const auto& t : prods) {
    check_tile(t, "prods[p]");
    TORCH_CHECK(t.size(0) == rows && t.size(1) == cols && t.stride(0) == ld,
                "fastcl._cpu: every prefix's product tile must have one shape and stride");
    ptrs.push_back(t.data_ptr<float>());
  }
  check_vec(col_scale, "col_scale", {n_pre, cols}, torch::kFloat32);
  check_vec(d_col, "d_col", {n_pre, cols}, torch::kFloat32);
  for (const auto* t : {&row_scale, &gamma, &coef, &d_row}) check_vec(*t, "a per-prefix row vector", {n_pre, rows}, torch::kFloat32);
  if (sign) check_vec(*sign, "sign", {n_pre, rows}, torch::kFloat32);
  check_vec(pos, "pos", {rows}, torch::kInt64);
  const int64_t* at = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i)
    TORCH_CHECK(at[i] >= -1 && at[i] < cols, "fastcl._cpu: pos[", i, "] = ", at[i], " is outside the tile");
  pybind11::gil_scoped_release no_gil;
  fastcl_cpu::prefix_logit_grads(ptrs.data(), n_pre, rows, cols, ld, col_scale.data_ptr<float>(),
                                 row_scale.data_ptr<float>(), gamma.data_ptr<float>(),
                                 sign ? sign->data_ptr<float>() : nullptr, coef.data_ptr<float>(), at,
                                 d_row.data_ptr<float>(), d_col.data_ptr<float>());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcl's fused CPU tile epilogues (the torch backend's Matryoshka prefix passes)";
  namespace py = pybind11;
  m.def("exp_row_sums", &exp_row_sums, "Shifted exp row sums of a product tile", py::arg("prod"),
        py::arg("col_scale"), py::arg("shift"), py::arg("row_scale"));
  m.def("prefix_logit_grads", &prefix_logit_grads, "Nested prefixes' logit gradients of a tile, in place",
        py::arg("prods"), py::arg("col_scale"), py::arg("row_scale"), py::arg("gamma"), py::arg("sign"),
        py::arg("coef"), py::arg("pos"), py::arg("d_row"), py::arg("d_col"));
}
