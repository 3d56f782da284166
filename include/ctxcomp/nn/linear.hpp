// Linear layer y = x W^T + b (bias optional) with PyTorch's weight layout [out_features x in_features],
// weights in float or bf16 (bf16 blocks are widened to fp32 in the workspace; fp32 products).
// Layout: x [tokens x in], y [tokens x out], token-major views. From kLinearMinGemmRows tokens on
// the product is ctxcomp's packed GEMM (core/gemm.hpp: one FMA chain per element, bit-identical
// on any thread count); below it (decode) an Eigen matrix-vector product over weight blocks.
#pragma once
#include <algorithm>

#include "../core/executor.hpp"
#include "../core/gemm.hpp"
#include "../core/kernels.hpp"
#include "../core/views.hpp"
#include "../core/workspace.hpp"

namespace ctxcomp {

/// A weight matrix [out_features x in_features], row-major, float or bf16 (or fp16), with an
/// optional bias [out_features] of the same type (nullptr: none), as a PyTorch nn.Linear holds them.
template <class T>
struct WeightView {
  const T* data = nullptr;  ///< [out_features x in_features], row-major
  /// Output and input features.
  ///@{
  index_t out_features = 0, in_features = 0;
  ///@}
  const T* bias = nullptr;  ///< [out_features], or null
  /// The weights of output feature o.
  const T* row(index_t o) const noexcept { return data + o * in_features; }
};

namespace detail {
/// y[t] += bias for every row (the bias is added once, after the product, as nn.Linear does).
template <class T>
void add_bias(MatrixView<float> y, const T* bias) {
  if (!bias) return;
  for (index_t t = 0; t < y.rows(); ++t) {
    float* r = y.data() + t * y.outerStride();
    for (index_t o = 0; o < y.cols(); ++o) r[o] += to_float(bias[o]);
  }
}
}  // namespace detail

namespace detail {
/// Output features per task. Fixed (not derived from the thread count) so that every element's
/// reduction is the same product whatever the executor.
inline constexpr index_t kLinearBlock = 128;
/// Token rows from which `linear` uses the packed GEMM (one row, i.e. decode: Eigen's matrix-vector
/// product, which reads each weight once and allocates nothing).
inline constexpr index_t kLinearMinGemmRows = 2;
}  // namespace detail

/// Workspace bytes `linear` needs for `tokens` rows with weights of type T.
template <class T>
std::size_t linear_workspace_bytes(index_t tokens, index_t out_features, index_t in_features,
                                   index_t concurrency, Compute compute = Compute::fp32) {
  if (compute == Compute::bf16)
    return kernels::gemm_nt_bf16_workspace_bytes<T>(tokens, out_features, in_features, concurrency);
  if (tokens >= detail::kLinearMinGemmRows)
    return kernels::gemm_nt_workspace_bytes<T>(tokens, out_features, in_features, concurrency);
  if constexpr (std::is_same_v<T, float>) return 0;
  else return static_cast<std::size_t>(std::max<index_t>(1, concurrency)) *
              Workspace::bytes_for<float>(detail::kLinearBlock * in_features);
}

/// y = x W^T (+ w.bias). All scratch comes from `ws` (reserved here; it grows only on the first
/// call of a larger shape). `Compute::bf16`: x and W rounded to bf16, products accumulated in
/// fp32 (kernels::gemm_nt_bf16, every row count; bf16 weights read in place); the bias is added
/// in fp32.
template <class T, class Exec = SerialExecutor>
void linear(MatrixView<const float> x, WeightView<T> w, MatrixView<float> y, Workspace& ws, const Exec& exec = {},
            Compute compute = Compute::fp32) {
  CTXCOMP_CHECK(w.data != nullptr, "linear: weight has no data");
  CTXCOMP_CHECK(x.cols() == w.in_features, "linear: x has ", x.cols(), " features but the weight expects ",
                w.in_features);
  CTXCOMP_CHECK(y.rows() == x.rows() && y.cols() == w.out_features, "linear: y is ", y.rows(), " x ", y.cols(),
                " but should be ", x.rows(), " x ", w.out_features);
  if (compute == Compute::bf16) {
    kernels::gemm_nt_bf16<T>(x.data(), x.outerStride(), w.data, w.in_features, y.data(), y.outerStride(), x.rows(),
                             w.out_features, w.in_features, ws, exec);
    detail::add_bias(y, w.bias);
    return;
  }
  if (x.rows() >= detail::kLinearMinGemmRows) {
    kernels::gemm_nt<T>(x.data(), x.outerStride(), w.data, w.in_features, y.data(), y.outerStride(), x.rows(),
                        w.out_features, w.in_features, ws, exec);
    detail::add_bias(y, w.bias);
    return;
  }
  const index_t blocks = (w.out_features + detail::kLinearBlock - 1) / detail::kLinearBlock;
  const index_t workers = std::max<index_t>(1, exec.concurrency());  // any worker slot may run a block
  float* scratch[64] = {};
  CTXCOMP_CHECK(workers <= 64, "linear: executor concurrency (", workers, ") above the supported 64");
  if constexpr (!std::is_same_v<T, float>) {
    ws.reserve(linear_workspace_bytes<T>(x.rows(), w.out_features, w.in_features, workers));
    for (index_t i = 0; i < workers; ++i) scratch[i] = ws.take<float>(detail::kLinearBlock * w.in_features);
  }
  exec.parallel_for(blocks, [&](index_t b, index_t worker) {
    const index_t o0 = b * detail::kLinearBlock, n = std::min(detail::kLinearBlock, w.out_features - o0);
    const float* wf;
    if constexpr (std::is_same_v<T, float>) {
      wf = w.row(o0);
    } else {
      kernels::convert<T, float>(w.row(o0), scratch[worker], n * w.in_features);
      wf = scratch[worker];
    }
    auto wb = matrix_view(wf, n, w.in_features);
    y.middleCols(o0, n).noalias() = x * wb.transpose();
  });
  detail::add_bias(y, w.bias);
}

}  // namespace ctxcomp
