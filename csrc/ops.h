// Host entry points of fastcl._C (ops.cpp): input checks, output allocation, launches.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace fastcl {

// Softmax statistics over the denominator columns of each owner line.
// Returns {lse [n_own], pos_sum [n_own], pos_cnt [n_own]}; the label sums are empty tensors
// unless row_labels are given and own_rows. n_own = N when own_rows, else C.
std::vector<at::Tensor> softmax_stats(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale_rows,
                                      const std::optional<at::Tensor>& positive_index,
                                      const std::optional<at::Tensor>& row_labels,
                                      const std::optional<at::Tensor>& col_labels,
                                      const std::optional<at::Tensor>& col_has_label, bool own_rows, bool exclude_self,
                                      bool decoupled, bool allow_tf32, int64_t n_split);

// sum_other G * other_row for the first n_own owner lines: [n_own, D] (fp32; fp64 for fp64).
// Rows: acc_i = sum_j G_ij k_j (no row scale). Columns: acc_j = sum_i G_ij s_i q_i.
// G: see TileParams in params.h; coef_row is the target weight on each positive entry;
// g_scale (fp16): G is staged divided by it and the result multiplied back.
at::Tensor softmax_grad(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale_rows,
                        const std::optional<at::Tensor>& positive_index, const std::optional<at::Tensor>& row_labels,
                        const std::optional<at::Tensor>& col_labels, const std::optional<at::Tensor>& col_has_label,
                        const at::Tensor& lse_row, const at::Tensor& w_row, const std::optional<at::Tensor>& coef_row,
                        const std::optional<at::Tensor>& lse_col, const std::optional<at::Tensor>& w_col,
                        bool own_rows, int64_t n_own, bool exclude_self, bool decoupled,
                        const std::optional<at::Tensor>& g_scale, bool allow_tf32, int64_t n_split);

// Sigmoid family, L = s_i <q_i, k_j> + b, z_ij = +1 at j = positive_index[i] (-1: none) or,
// with row_labels [N] / col_labels [C], wherever they are equal; -1 elsewhere;
// G_ij = sigmoid(L_ij) - [z_ij = 1]. Returns {acc, loss_rows, gsum_rows}:
// acc [n_own, D] = sum_other G * other_row (columns: times s_i), empty unless accumulate;
// loss_rows/gsum_rows [N] = sum_j softplus(-z_ij L_ij) / sum_j G_ij, empty unless own_rows.
std::vector<at::Tensor> sigmoid_pass(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale_rows,
                                     const std::optional<at::Tensor>& positive_index,
                                     const std::optional<at::Tensor>& bias, bool own_rows, int64_t n_own,
                                     bool accumulate, const std::optional<at::Tensor>& row_labels,
                                     const std::optional<at::Tensor>& col_labels, bool allow_tf32, int64_t n_split);

// The chunked gradient pass's logit gradient: G of query rows [row0, row0 + R) x every column
// written into g ([R, C], contiguous; the input type for fp16/bf16, else fp32/fp64), formed as
// softmax_grad's (sigmoid: sigmoid_pass's) G, multiplied by 1 / g_scale when given (fp16 range).
// Softmax needs lse_row and w_row. Returns {} (softmax) or {loss_rows [R], gsum_rows [R]} (sigmoid).
std::vector<at::Tensor> logit_grad(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale_rows,
                                   const std::optional<at::Tensor>& positive_index,
                                   const std::optional<at::Tensor>& row_labels,
                                   const std::optional<at::Tensor>& col_labels,
                                   const std::optional<at::Tensor>& col_has_label,
                                   const std::optional<at::Tensor>& lse_row, const std::optional<at::Tensor>& w_row,
                                   const std::optional<at::Tensor>& coef_row, const std::optional<at::Tensor>& lse_col,
                                   const std::optional<at::Tensor>& w_col, const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& g_scale, const at::Tensor& g, int64_t row0,
                                   bool sigmoid, bool exclude_self, bool decoupled, bool allow_tf32, int64_t n_split);

bool built_with_cuda();
std::vector<std::string> cuda_archs();

}  // namespace fastcl
