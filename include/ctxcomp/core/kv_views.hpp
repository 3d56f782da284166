// Views of K/V storage that attention reads and the KV layouts manage, beside HeadsView
// (core/views.hpp). Paged K/V over caller-owned memory, vLLM / FlashInfer style: a pool of
// fixed-size pages, and per sequence a page table (FlashInfer's paged_kv_t: page_size, NHD or HND
// order, and per sequence indptr / indices / last_page_len). `PagedHeadsView` is one sequence's
// keys or values, read by `attention` like a HeadsView: token t of head h lives in pool page
// pages[t / page_size], at slot t % page_size. Layouts are given by strides, so NHD
// ([page][slot][head][dim]), HND ([page][head][slot][dim]) and any padded variant are views of
// the same kind. CellMeta is a cell cache's per-cell metadata (the engine's arrays), which the
// cell masks read.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "error.hpp"
#include "types.hpp"
#include "views.hpp"

namespace ctxcomp {

/// One sequence's keys or values in a page pool: element (h, t, i) at
/// pool[pages[t / page_size] * page_stride + h * head_stride + (t % page_size) * token_stride + i].
/// qint8 pools carry one fp32 scale per row, at scales[page * scale_page_stride + h *
/// scale_head_stride + slot * scale_token_stride]. Nothing is owned: pool, page table and scales
/// belong to the engine.
template <class T>
struct PagedHeadsView {
  using element_type = T;  ///< the storage type
  using scale_type = std::conditional_t<std::is_const_v<T>, const float, float>;  ///< float, const with T
  T* pool = nullptr;                ///< element (0, 0, 0) of pool page 0
  const index_t* pages = nullptr;   ///< the sequence's page table: ceil(tokens / page_size) pool pages
  /// Extents: heads, tokens of the sequence, head_dim; tokens per page; pages in the pool.
  ///@{
  index_t heads = 0, tokens = 0, head_dim = 0, page_size = 0, pool_pages = 0;
  ///@}
  /// Strides in elements between pages, heads and slots of a page.
  ///@{
  index_t page_stride = 0, head_stride = 0, token_stride = 0;
  ///@}
  scale_type* scales = nullptr;  ///< qint8: per-row scales, else null
  /// Strides in floats of `scales` between pages, heads and slots.
  ///@{
  index_t scale_page_stride = 0, scale_head_stride = 0, scale_token_stride = 0;
  ///@}

  /// Row (h, t): head_dim contiguous elements.
  T* row(index_t h, index_t t) const noexcept {
    return pool + pages[t / page_size] * page_stride + h * head_stride + (t % page_size) * token_stride;
  }
  /// Element (h, t, i).
  T& operator()(index_t h, index_t t, index_t i) const noexcept { return row(h, t)[i]; }
  /// The scale of row (h, t) (qint8 only).
  scale_type& scale(index_t h, index_t t) const noexcept {
    return scales[pages[t / page_size] * scale_page_stride + h * scale_head_stride + (t % page_size) * scale_token_stride];
  }
  /// How many of the n tokens from t on lie token_stride apart (to the end of t's page).
  index_t run(index_t t, index_t n) const noexcept { return std::min(n, page_size - t % page_size); }
  /// Whether the view has no element.
  bool empty() const noexcept { return heads == 0 || tokens == 0 || head_dim == 0; }

  /// The same memory, read-only.
  operator PagedHeadsView<const T>() const noexcept {
    return {pool,        pages,       heads,        tokens,  head_dim,          page_size,        pool_pages,
            page_stride, head_stride, token_stride, scales, scale_page_stride, scale_head_stride, scale_token_stride};
  }

  /// NHD pages [pool_pages][page_size][heads][head_dim] (FlashInfer's default), scales (qint8)
  /// [pool_pages][page_size][heads].
  static PagedHeadsView nhd(T* pool, index_t pool_pages, index_t page_size, index_t heads, index_t head_dim,
                            const index_t* pages, index_t tokens, scale_type* scales = nullptr) noexcept {
    return {pool,    pages,   heads, tokens,         head_dim, page_size, pool_pages, page_size * heads * head_dim,
            head_dim, heads * head_dim, scales, page_size * heads, 1, heads};
  }
  /// HND pages [pool_pages][heads][page_size][head_dim], scales (qint8) [pool_pages][heads][page_size].
  static PagedHeadsView hnd(T* pool, index_t pool_pages, index_t page_size, index_t heads, index_t head_dim,
                            const index_t* pages, index_t tokens, scale_type* scales = nullptr) noexcept {
    return {pool,
            pages,
            heads,
            tokens,
            head_dim,
            page_size,
            pool_pages,
            heads * page_size * head_dim,
            page_size * head_dim,
            head_dim,
            scales,
            heads * page_size,
            page_size,
            1};
  }
};

/// The same paged view, read-only.
template <class T>
PagedHeadsView<const T> read_only(const PagedHeadsView<T>& v) noexcept {
  return v;
}

/// Whether a K/V view type is paged (its rows are not one stride apart).
template <class View>
inline constexpr bool is_paged_view_v = false;
/// PagedHeadsView is.
template <class T>
inline constexpr bool is_paged_view_v<PagedHeadsView<T>> = true;

/// Per-cell metadata of a cell cache (the engine's arrays).
struct CellMeta {
  std::int64_t* pos = nullptr;        ///< [cells] position of the cell's token; negative: free
  const std::int32_t* seq = nullptr;  ///< [cells] sequence of the cell's token, or null (one sequence)
  index_t cells = 0;                  ///< number of cells (kv_size)

  /// Whether cell c holds a token of sequence `s` (live, and of that sequence when there are several).
  bool live(index_t c, std::int32_t s) const noexcept { return pos[c] >= 0 && (!seq || seq[c] == s); }
};

namespace detail {
/// Checks a paged view as attention reads it: extents, strides that keep rows and heads apart,
/// a page table covering the tokens with every page inside the pool (O(pages); repeated pages
/// are PageTable::check's business).
template <class T>
void check_heads_view(const PagedHeadsView<T>& v, const char* fn, const char* name) {
  CTXCOMP_CHECK(v.heads >= 0 && v.tokens >= 0 && v.head_dim >= 0, fn, ": ", name, " has negative extents (heads ",
                v.heads, ", tokens ", v.tokens, ", head_dim ", v.head_dim, ")");
  if (v.empty()) return;
  CTXCOMP_CHECK(v.pool != nullptr && v.pages != nullptr, fn, ": ", name, " has a null pool or page table");
  CTXCOMP_CHECK(v.page_size > 0, fn, ": ", name, " page_size (", v.page_size, ") must be positive");
  CTXCOMP_CHECK(v.page_size == 1 || v.token_stride >= v.head_dim, fn, ": ", name, " token_stride (", v.token_stride,
                ") is smaller than head_dim (", v.head_dim, "): rows would overlap");
  CTXCOMP_CHECK(v.heads == 1 || v.head_stride >= v.head_dim, fn, ": ", name, " head_stride (", v.head_stride,
                ") is smaller than head_dim (", v.head_dim, "): heads would overlap");
  const index_t n = (v.tokens + v.page_size - 1) / v.page_size;
  for (index_t i = 0; i < n; ++i)
    CTXCOMP_CHECK(v.pages[i] >= 0 && v.pages[i] < v.pool_pages, fn, ": ", name, " page ", i, " is pool page ",
                  v.pages[i], ", outside the pool [0, ", v.pool_pages, ")");
  if constexpr (is_quantized_v<T>)
    CTXCOMP_CHECK(v.scales != nullptr, fn, ": ", name, " is int8 storage without its per-row scales");
}
}  // namespace detail

}  // namespace ctxcomp
