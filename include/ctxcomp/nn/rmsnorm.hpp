// RMSNorm as Llama and IC-Former compute it: in fp32, y = weight * (x * 1/sqrt(mean(x^2) + eps)).
// Layout: x and out token-major [tokens x hidden] (out may alias x); weight [hidden] in float,
// bf16 or fp16. Source: transformers' LlamaRMSNorm. `rmsnorm_heads` normalises each head's
// vector of a HeadsView on its own (Qwen3's q_norm / k_norm: weight [head_dim]).
#pragma once
#include <cmath>

#include "../core/kernels.hpp"
#include "../core/views.hpp"

namespace ctxcomp {

namespace detail {
/// One row: y = weight * (x * 1/sqrt(mean(x^2) + eps)); y may alias x.
template <class W, class V>
void rmsnorm_row(const float* x, const W* weight, index_t n, float eps, float* y) {
  const float mean = kernels::dot<V>(x, x, n) / static_cast<float>(n);
  const float r = 1.f / std::sqrt(mean + eps);
  for (index_t i = 0; i < n; ++i) y[i] = to_float(weight[i]) * (x[i] * r);
}
}  // namespace detail

template <class W, class V = simd::Vec>
void rmsnorm(MatrixView<const float> x, const W* weight, index_t weight_len, float eps, MatrixView<float> out) {
  CTXCOMP_CHECK(weight != nullptr && weight_len == x.cols(), "rmsnorm: weight has ", weight_len,
                " elements but x has ", x.cols(), " features");
  CTXCOMP_CHECK(out.rows() == x.rows() && out.cols() == x.cols(), "rmsnorm: out is ", out.rows(), " x ", out.cols(),
                " but x is ", x.rows(), " x ", x.cols());
  CTXCOMP_CHECK(eps >= 0.f && std::isfinite(eps), "rmsnorm: eps (", eps, ") must be finite and >= 0");
  const index_t n = x.cols();
  for (index_t t = 0; t < x.rows(); ++t) {
    detail::rmsnorm_row<W, V>(x.data() + t * x.outerStride(), weight, n, eps, out.data() + t * out.outerStride());
  }
}

/// RMSNorm of every head vector of x [heads x tokens x head_dim] in place, one weight [head_dim]
/// shared by all heads (Qwen3's per-head q/k norm, applied before RoPE).
template <class W, class V = simd::Vec>
void rmsnorm_heads(HeadsView<float> x, const W* weight, index_t weight_len, float eps) {
  detail::check_heads_view(x, "rmsnorm_heads", "x");
  CTXCOMP_CHECK(weight != nullptr && weight_len == x.head_dim, "rmsnorm_heads: weight has ", weight_len,
                " elements but the heads have head_dim ", x.head_dim);
  CTXCOMP_CHECK(eps >= 0.f && std::isfinite(eps), "rmsnorm_heads: eps (", eps, ") must be finite and >= 0");
  if (x.empty()) return;
  for (index_t h = 0; h < x.heads; ++h)
    for (index_t t = 0; t < x.tokens; ++t) detail::rmsnorm_row<W, V>(x.row(h, t), weight, x.head_dim, eps, x.row(h, t));
}

}  // namespace ctxcomp
