// LayerNorm as GPT-NeoX computes it (torch.nn.LayerNorm, fp32): per row,
// y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, var the biased variance
// mean((x - mean)^2). Layout: x and out token-major [tokens x hidden] (out may alias x); weight
// and bias [hidden] in float, bf16 or fp16. Templated on the vector type like every kernel:
// `layernorm<W, simd::ScalarVec>` is its scalar twin.
#pragma once
#include <cmath>

#include "../core/kernels.hpp"
#include "../core/views.hpp"

namespace ctxcomp {

namespace detail {
/// One row (two passes: the mean, then the variance of the centred values); y may alias x.
template <class W, class V>
void layernorm_row(const float* x, const W* weight, const W* bias, index_t n, float eps, float* y) {
  const float mean = kernels::row_sum<V>(x, n) / static_cast<float>(n);
  for (index_t i = 0; i < n; ++i) y[i] = x[i] - mean;
  const float var = kernels::dot<V>(y, y, n) / static_cast<float>(n);
  const float r = 1.f / std::sqrt(var + eps);
  for (index_t i = 0; i < n; ++i) y[i] = y[i] * r * to_float(weight[i]) + to_float(bias[i]);
}
}  // namespace detail

/// out = LayerNorm(x) with `weight` and `bias` of `len` (= x.cols()) elements each.
template <class W, class V = simd::Vec>
void layernorm(MatrixView<const float> x, const W* weight, const W* bias, index_t len, float eps,
               MatrixView<float> out) {
  CTXCOMP_CHECK(weight != nullptr && bias != nullptr && len == x.cols() && len > 0, "layernorm: weight and bias have ",
                len, " elements but x has ", x.cols(), " features");
  CTXCOMP_CHECK(out.rows() == x.rows() && out.cols() == x.cols(), "layernorm: out is ", out.rows(), " x ", out.cols(),
                " but x is ", x.rows(), " x ", x.cols());
  CTXCOMP_CHECK(eps >= 0.f && std::isfinite(eps), "layernorm: eps (", eps, ") must be finite and >= 0");
  for (index_t t = 0; t < x.rows(); ++t)
    detail::layernorm_row<W, V>(x.data() + t * x.outerStride(), weight, bias, len, eps,
                                out.data() + t * out.outerStride());
}

}  // namespace ctxcomp
