// SwiGLU MLP as in Llama / IC-Former: out = down( silu(gate(x)) * up(x) ).
// Layout: x [tokens x hidden], out [tokens x hidden] (must not alias x); weights in PyTorch
// layout (gate/up [inter x hidden], down [hidden x inter]), float or bf16.
#pragma once
#include "linear.hpp"

namespace ctxcomp {

/// The MLP's three projections (PyTorch layout).
template <class T>
struct SwiGLUWeights {
  /// gate_proj and up_proj [inter x hidden], down_proj [hidden x inter].
  ///@{
  WeightView<T> gate, up, down;
  ///@}
};

/// Workspace bytes `swiglu` needs (two [tokens x inter] buffers plus the linear layers').
template <class T>
std::size_t swiglu_workspace_bytes(index_t tokens, index_t hidden, index_t inter, index_t concurrency,
                                   Compute compute = Compute::fp32) {
  return 2 * Workspace::bytes_for<float>(tokens * inter) +
         std::max(linear_workspace_bytes<T>(tokens, inter, hidden, concurrency, compute),
                  linear_workspace_bytes<T>(tokens, hidden, inter, concurrency, compute));
}

/// out = down(silu(gate(x)) * up(x)); `compute` selects the projections' arithmetic (linear).
template <class T, class Exec = SerialExecutor>
void swiglu(MatrixView<const float> x, const SwiGLUWeights<T>& w, MatrixView<float> out, Workspace& ws,
            Workspace& linear_ws, const Exec& exec = {}, Compute compute = Compute::fp32) {
  const index_t inter = w.gate.out_features;
  CTXCOMP_CHECK(w.up.out_features == inter && w.up.in_features == w.gate.in_features, "swiglu: up is ",
                w.up.out_features, " x ", w.up.in_features, " but gate is ", inter, " x ", w.gate.in_features);
  CTXCOMP_CHECK(w.down.in_features == inter && w.down.out_features == w.gate.in_features, "swiglu: down is ",
                w.down.out_features, " x ", w.down.in_features, ", expected ", w.gate.in_features, " x ", inter);
  CTXCOMP_CHECK(x.cols() == w.gate.in_features && out.rows() == x.rows() && out.cols() == x.cols(), "swiglu: x is ",
                x.rows(), " x ", x.cols(), ", out ", out.rows(), " x ", out.cols(), ", hidden ", w.gate.in_features);
  ws.reserve(2 * Workspace::bytes_for<float>(x.rows() * inter));
  float* g = ws.take<float>(x.rows() * inter);
  float* u = ws.take<float>(x.rows() * inter);
  linear(x, w.gate, matrix_view(g, x.rows(), inter), linear_ws, exec, compute);
  linear(x, w.up, matrix_view(u, x.rows(), inter), linear_ws, exec, compute);
  kernels::silu_mul(g, u, x.rows() * inter);
  linear(matrix_view<const float>(g, x.rows(), inter), w.down, out, linear_ws, exec, compute);
}

}  // namespace ctxcomp
