// Views over caller-owned memory: token-major matrices [tokens x features] (Eigen::Map with an
// outer stride) and per-head tensors [heads x tokens x head_dim] with runtime strides.
// Nothing here owns or copies memory; the caller keeps the buffers alive.
#pragma once
#include <Eigen/Core>
#include <type_traits>

#include "error.hpp"
#include "types.hpp"

namespace ctxcomp {

template <class T>
using RowMatrix = Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Token-major matrix view [rows x cols], row stride `outerStride()` elements, unit column stride.
/// `MatrixView<const float>` for inputs, `MatrixView<float>` for outputs.
template <class T>
using MatrixView = Eigen::Map<std::conditional_t<std::is_const_v<T>, const RowMatrix<T>, RowMatrix<T>>,
                              Eigen::Unaligned, Eigen::OuterStride<>>;

/// Views `rows x cols` elements at `data`, rows `ld` elements apart (default: contiguous).
template <class T>
MatrixView<T> matrix_view(T* data, index_t rows, index_t cols, index_t ld = -1) {
  return MatrixView<T>(data, rows, cols, Eigen::OuterStride<>(ld < 0 ? cols : ld));
}

/// The same view, read-only.
template <class S>
MatrixView<const S> const_view(
    const Eigen::Map<Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, Eigen::Unaligned, Eigen::OuterStride<>>& m) {
  return MatrixView<const S>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.outerStride()));
}

/// Views an Eigen row-major matrix (or any dense row-major expression with direct access).
template <class Derived>
auto matrix_view(Eigen::PlainObjectBase<Derived>& m) {
  static_assert(Derived::IsRowMajor || Derived::ColsAtCompileTime == 1, "token-major views need row-major storage");
  using S = typename Derived::Scalar;
  return MatrixView<S>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols()));
}
template <class Derived>
auto matrix_view(const Eigen::PlainObjectBase<Derived>& m) {
  static_assert(Derived::IsRowMajor || Derived::ColsAtCompileTime == 1, "token-major views need row-major storage");
  using S = typename Derived::Scalar;
  return MatrixView<const S>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols()));
}

/// Per-head tensor view [heads x tokens x head_dim]: element (h, t, i) lives at
/// data[h * head_stride + t * token_stride + i]. Strides are in elements; head_dim is contiguous.
/// A token-major activation [tokens x heads*head_dim] is viewed with head_stride = head_dim and
/// token_stride = heads*head_dim; a KV cache layer with head_stride = capacity*head_dim.
/// Quantised storage (qint8) also carries one fp32 scale per row (h, t), at
/// scales[h * scale_head_stride + t * scale_token_stride]; other types leave `scales` null.
template <class T>
struct HeadsView {
  using element_type = T;  ///< the storage type
  using scale_type = std::conditional_t<std::is_const_v<T>, const float, float>;  ///< float, const with T
  T* data = nullptr;  ///< element (0, 0, 0)
  /// Extents: heads, tokens, head_dim.
  ///@{
  index_t heads = 0, tokens = 0, head_dim = 0;
  ///@}
  /// Strides in elements between heads and between tokens.
  ///@{
  index_t head_stride = 0, token_stride = 0;
  ///@}
  scale_type* scales = nullptr;  ///< per-row scales of quantised storage, else null
  /// Strides in floats of `scales` between heads and between tokens.
  ///@{
  index_t scale_head_stride = 0, scale_token_stride = 0;
  ///@}

  /// Row (h, t): head_dim contiguous elements.
  T* row(index_t h, index_t t) const noexcept { return data + h * head_stride + t * token_stride; }
  /// Element (h, t, i).
  T& operator()(index_t h, index_t t, index_t i) const noexcept { return row(h, t)[i]; }
  /// The scale of row (h, t) (quantised storage only).
  scale_type& scale(index_t h, index_t t) const noexcept { return scales[h * scale_head_stride + t * scale_token_stride]; }
  /// Whether the view has no element.
  bool empty() const noexcept { return heads == 0 || tokens == 0 || head_dim == 0; }
  /// How many of the n tokens from t on lie token_stride apart: all of them (paged views: to the
  /// end of a page).
  index_t run(index_t t, index_t n) const noexcept { return (void)t, n; }

  /// The same memory, read-only.
  operator HeadsView<const T>() const noexcept {
    return {data, heads, tokens, head_dim, head_stride, token_stride, scales, scale_head_stride, scale_token_stride};
  }

  /// Contiguous [heads x tokens x head_dim].
  static HeadsView contiguous(T* data, index_t heads, index_t tokens, index_t head_dim) noexcept {
    return {data, heads, tokens, head_dim, tokens * head_dim, head_dim};
  }
  /// Token-major [tokens x heads*head_dim] with rows `ld` elements apart (default heads*head_dim).
  static HeadsView token_major(T* data, index_t tokens, index_t heads, index_t head_dim, index_t ld = -1) noexcept {
    return {data, heads, tokens, head_dim, head_dim, ld < 0 ? heads * head_dim : ld};
  }
  /// Tokens [begin, begin + count).
  HeadsView slice_tokens(index_t begin, index_t count) const noexcept {
    return {data + begin * token_stride, heads,          count, head_dim, head_stride, token_stride,
            scales ? scales + begin * scale_token_stride : nullptr, scale_head_stride, scale_token_stride};
  }
};

/// The same view, read-only (generic code's way to pass any K/V view to attention).
template <class T>
HeadsView<const T> read_only(const HeadsView<T>& v) noexcept {
  return v;
}

namespace detail {
/// Checks a HeadsView's own consistency: non-negative extents, unit-stride rows that do not overlap.
template <class T>
void check_heads_view(const HeadsView<T>& v, const char* fn, const char* name) {
  CTXCOMP_CHECK(v.heads >= 0 && v.tokens >= 0 && v.head_dim >= 0, fn, ": ", name, " has negative extents (heads ",
                v.heads, ", tokens ", v.tokens, ", head_dim ", v.head_dim, ")");
  if (v.empty()) return;
  CTXCOMP_CHECK(v.data != nullptr, fn, ": ", name, " has a null data pointer");
  CTXCOMP_CHECK(v.tokens == 1 || v.token_stride >= v.head_dim, fn, ": ", name, " token_stride (", v.token_stride,
                ") is smaller than head_dim (", v.head_dim, "): rows would overlap");
  CTXCOMP_CHECK(v.heads == 1 || v.head_stride >= v.head_dim, fn, ": ", name, " head_stride (", v.head_stride,
                ") is smaller than head_dim (", v.head_dim, "): heads would overlap");
  if constexpr (is_quantized_v<T>)
    CTXCOMP_CHECK(v.scales != nullptr, fn, ": ", name, " is int8 storage without its per-row scales");
}
}  // namespace detail

}  // namespace ctxcomp
