// Fused CPU epilogues of the torch backend's Matryoshka prefix passes (fastcl/backends/torch.py):
// each reads a tile of raw products once, where the PyTorch form of the same step makes four to
// eight elementwise passes over it. Plain C++ on float pointers, no Torch headers: the kernels
// are compiled once per x86-64 level (target_clones) and the loader picks one at run time.
#pragma once

#include <cstdint>

namespace fastcl_cpu {

// out[i] = sum_j exp(row_scale[i] * (col_scale[j] * prod[i * ld + j] + shift[i])) over a tile of
// `rows` x `cols` products: the forward's shifted row sums.
void exp_row_sums(const float* prod, int64_t rows, int64_t cols, int64_t ld, const float* col_scale,
                  const float* shift, const float* row_scale, float* out);

// The backward's logit gradients of `n_prefixes` nested prefixes over one tile, in the row-scaled
// form. prods[p] holds prefix p's raw products (rows x cols, leading dimension ld), narrowest
// prefix first; per prefix p, with c = col_scale[p], s = row_scale[p]:
//   g_ij   = sign[p][i] * exp(s_i * (c_j * prods[p]_ij + gamma[p][i])) - coef[p][i] * [j == pos[i]]
//   d_row[p][i] += sum_j g_ij * prods[p]_ij * c_j      d_col[p][j] += sum_i g_ij * prods[p]_ij
// and prods[p] is overwritten with H^p_ij = sum over prefixes q >= p of g^q_ij * col_scale[q]_j,
// the tile that multiplies the feature segment prefix p adds. The per-prefix arrays are
// contiguous [n_prefixes, rows] / [n_prefixes, cols]; sign may be null (all +1); pos[i] is the
// column of row i's positive inside the tile, or -1.
void prefix_logit_grads(float* const* prods, int64_t n_prefixes, int64_t rows, int64_t cols, int64_t ld,
                        const float* col_scale, const float* row_scale, const float* gamma,
                        const float* sign, const float* coef, const int64_t* pos, float* d_row,
                        float* d_col);

}  // namespace fastcl_cpu
