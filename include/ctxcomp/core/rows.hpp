// Row access to K/V storage of any cache type (float, bf16, fp16, qint8) through a HeadsView:
// write a row from fp32 (converted, or quantised with its scale), copy a row between views of
// one type (with its scale), and read an element's exact value. What hosts, caches and the
// compressors use so that one code path serves every storage type.
#pragma once
#include <algorithm>
#include <type_traits>

#include "kernels.hpp"
#include "kv_views.hpp"
#include "views.hpp"

namespace ctxcomp {

/// Writes row (h, t) of `dst` from fp32 `src` [head_dim]: rounded to nearest even for bf16 /
/// fp16, quantised (scale = max|x| / 127, see kernels::quantize_row) for qint8.
template <class T>
void store_row(const HeadsView<T>& dst, index_t h, index_t t, const float* src) noexcept {
  if constexpr (is_quantized_v<T>) dst.scale(h, t) = kernels::quantize_row(src, dst.row(h, t), dst.head_dim);
  else kernels::convert(src, dst.row(h, t), dst.head_dim);
}

/// Copies row (hs, ts) of `src` to row (hd, td) of `dst` (views of one storage type, HeadsView
/// or PagedHeadsView), scale included.
template <class Src, class Dst>
void copy_row(const Src& src, index_t hs, index_t ts, const Dst& dst, index_t hd, index_t td) noexcept {
  using T = std::remove_const_t<typename Src::element_type>;
  static_assert(std::is_same_v<T, std::remove_const_t<typename Dst::element_type>>,
                "copy_row: source and destination storage types differ");
  const T* s = src.row(hs, ts);
  std::copy(s, s + src.head_dim, dst.row(hd, td));
  if constexpr (is_quantized_v<T>) dst.scale(hd, td) = src.scale(hs, ts);
}

/// The value element (h, t, i) of a HeadsView or PagedHeadsView stands for, in double: exact
/// for every storage type (qint8: scale * q).
template <class View>
double element_value(const View& v, index_t h, index_t t, index_t i) noexcept {
  if constexpr (is_quantized_v<std::remove_const_t<typename View::element_type>>)
    return double(v.scale(h, t)) * double(v(h, t, i).v);
  else
    return double(to_float(v(h, t, i)));
}

/// Writes row (h, t) of a paged view from fp32 (as store_row for a HeadsView: converted, or
/// quantised with its scale for qint8).
template <class T>
void store_row(const PagedHeadsView<T>& dst, index_t h, index_t t, const float* src) noexcept {
  if constexpr (is_quantized_v<T>) dst.scale(h, t) = kernels::quantize_row(src, dst.row(h, t), dst.head_dim);
  else kernels::convert(src, dst.row(h, t), dst.head_dim);
}

}  // namespace ctxcomp
