#include "tile_epilogues.h"

#include <cstring>
#include <limits>
#include <vector>

// One clone per x86-64 level (AVX-512, AVX2+FMA, baseline), chosen when the library loads.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTCL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTCL_CLONES
#endif

namespace fastcl_cpu {
namespace {

inline float bits_to_float(int32_t bits) {
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// exp(x) in a form the compiler vectorises: x = n ln2 + r with n = round(x / ln2) and ln2 in
// two parts (the first exact in float for |n| <= 128), e^r by its Taylor series to r^7 on
// |r| <= ln2 / 2 (truncation below 3e-9 relative), 2^n from the exponent bits. Below -86.6
// (2^-125) the result flushes to 0 instead of a subnormal; above 88.72 it is +inf; NaN stays NaN.
inline float vexp(float x) {
  constexpr float kLo = -86.6f, kHi = 88.72283f, kMagic = 12582912.0f;  // 1.5 * 2^23: rounds
  const float xc = (x >= kLo && x <= kHi) ? x : (x > kHi ? kHi : kLo);
  const float n = (xc * 1.44269504088896341f + kMagic) - kMagic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^(n - 1) * 2: n = 128 (just below kHi) keeps a finite exponent field
  float e = p * bits_to_float((static_cast<int32_t>(n) + 126) << 23) * 2.0f;
  e = x < kLo ? 0.0f : e;
  e = x > kHi ? std::numeric_limits<float>::infinity() : e;
  return x != x ? x : e;
}

}  // namespace

FASTCL_CLONES
void exp_row_sums(const float* prod, int64_t rows, int64_t cols, int64_t ld, const float* col_scale,
                  const float* shift, const float* row_scale, float* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* __restrict row = prod + i * ld;
    const float* __restrict c = col_scale;
    const float s = row_scale[i], sh = shift[i];
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) sum += vexp(s * (c[j] * row[j] + sh));
    out[i] = sum;
  }
}

FASTCL_CLONES
void prefix_logit_grads(float* const* prods, int64_t n_prefixes, int64_t rows, int64_t cols, int64_t ld,
                        const float* col_scale, const float* row_scale, const float* gamma,
                        const float* sign, const float* coef, const int64_t* pos, float* d_row,
                        float* d_col) {
  std::vector<float> running(static_cast<size_t>(cols));
  for (int64_t i = 0; i < rows; ++i) {
    float* __restrict acc = running.data();
    std::memset(acc, 0, sizeof(float) * static_cast<size_t>(cols));
    const int64_t t = pos[i];
    for (int64_t p = n_prefixes - 1; p >= 0; --p) {
      float* __restrict row = prods[p] + i * ld;
      const float* __restrict c = col_scale + p * cols;
      float* __restrict col = d_col + p * cols;
      const int64_t at = p * rows + i;
      const float s = row_scale[at], ga = gamma[at], sg = sign ? sign[at] : 1.0f;
      const float raw_t = t >= 0 ? row[t] : 0.0f;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < cols; ++j) {
        const float x = row[j];
        const float g = sg * vexp(s * (c[j] * x + ga));
        const float y = g * x;
        sum += y * c[j];
        col[j] += y;
        const float h = acc[j] + g * c[j];
        acc[j] = h;
        row[j] = h;
      }
      if (t >= 0) {  // the target term -coef at the positive, added after the vector loop
        const float d = -coef[at];
        sum += d * raw_t * c[t];
        col[t] += d * raw_t;
        acc[t] += d * c[t];
        row[t] = acc[t];
      }
      d_row[at] += sum;
    }
  }
}

}  // namespace fastcl_cpu
