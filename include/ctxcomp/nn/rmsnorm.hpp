// RMSNorm as Llama and IC-Former compute it: in fp32, y = weight * (x * 1/sqrt(mean(x^2) + eps)).
// Layout: x and out token-major [tokens x hidden] (out may alias x); weight [hidden] in float,
// bf16 or fp16. Source: transformers' LlamaRMSNorm.
#pragma once
#include <cmath>

#include "../core/kernels.hpp"
#include "../core/views.hpp"

namespace ctxcomp {

template <class W, class V = simd::Vec>
void rmsnorm(MatrixView<const float> x, const W* weight, index_t weight_len, float eps, MatrixView<float> out) {
  CTXCOMP_CHECK(weight != nullptr && weight_len == x.cols(), "rmsnorm: weight has ", weight_len,
                " elements but x has ", x.cols(), " features");
  CTXCOMP_CHECK(out.rows() == x.rows() && out.cols() == x.cols(), "rmsnorm: out is ", out.rows(), " x ", out.cols(),
                " but x is ", x.rows(), " x ", x.cols());
  CTXCOMP_CHECK(eps >= 0.f && std::isfinite(eps), "rmsnorm: eps (", eps, ") must be finite and >= 0");
  const index_t n = x.cols();
  for (index_t t = 0; t < x.rows(); ++t) {
    const float* xr = x.data() + t * x.outerStride();
    float* yr = out.data() + t * out.outerStride();
    const float mean = kernels::dot<V>(xr, xr, n) / static_cast<float>(n);
    const float r = 1.f / std::sqrt(mean + eps);
    for (index_t i = 0; i < n; ++i) yr[i] = to_float(weight[i]) * (xr[i] * r);
  }
}

}  // namespace ctxcomp
