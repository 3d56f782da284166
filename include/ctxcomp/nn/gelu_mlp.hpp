// GPT-NeoX's MLP: out = dense_4h_to_h( gelu(dense_h_to_4h(x)) ), exact-erf GELU
// (kernels::gelu), both projections with their biases. Layout: x [tokens x hidden], out
// [tokens x hidden] (must not alias x); weights in PyTorch layout (up [inter x hidden], down
// [hidden x inter]), float, bf16 or fp16.
#pragma once
#include "linear.hpp"

namespace ctxcomp {

/// The MLP's two projections (PyTorch layout, biases in WeightView::bias).
template <class T>
struct GeluMlpWeights {
  WeightView<T> up;    ///< dense_h_to_4h [inter x hidden]
  WeightView<T> down;  ///< dense_4h_to_h [hidden x inter]
};

/// Workspace bytes `gelu_mlp` needs (one [tokens x inter] buffer plus the linear layers').
template <class T>
std::size_t gelu_mlp_workspace_bytes(index_t tokens, index_t hidden, index_t inter, index_t concurrency,
                                     Compute compute = Compute::fp32) {
  return Workspace::bytes_for<float>(tokens * inter) +
         std::max(linear_workspace_bytes<T>(tokens, inter, hidden, concurrency, compute),
                  linear_workspace_bytes<T>(tokens, hidden, inter, concurrency, compute));
}

/// out = down(gelu(up(x))); `compute` selects the projections' arithmetic (linear).
template <class T, class Exec = SerialExecutor>
void gelu_mlp(MatrixView<const float> x, const GeluMlpWeights<T>& w, MatrixView<float> out, Workspace& ws,
              Workspace& linear_ws, const Exec& exec = {}, Compute compute = Compute::fp32) {
  const index_t inter = w.up.out_features;
  CTXCOMP_CHECK(w.down.in_features == inter && w.down.out_features == w.up.in_features, "gelu_mlp: down is ",
                w.down.out_features, " x ", w.down.in_features, ", expected ", w.up.in_features, " x ", inter);
  CTXCOMP_CHECK(x.cols() == w.up.in_features && out.rows() == x.rows() && out.cols() == x.cols(), "gelu_mlp: x is ",
                x.rows(), " x ", x.cols(), ", out ", out.rows(), " x ", out.cols(), ", hidden ", w.up.in_features);
  ws.reserve(Workspace::bytes_for<float>(x.rows() * inter));
  float* u = ws.take<float>(x.rows() * inter);
  linear(x, w.up, matrix_view(u, x.rows(), inter), linear_ws, exec, compute);
  kernels::gelu(u, x.rows() * inter);
  linear(matrix_view<const float>(u, x.rows(), inter), w.down, out, linear_ws, exec, compute);
}

}  // namespace ctxcomp
