// Paged K/V over caller-owned memory, vLLM / FlashInfer style: a pool of fixed-size pages, and per
// sequence a page table (FlashInfer's paged_kv_t: page_size, NHD or HND order, and per sequence
// indptr / indices / last_page_len). `PagedHeadsView` is one sequence's keys or values, read by
// `attention` like a HeadsView: token t of head h lives in pool page pages[t / page_size], at
// slot t % page_size. Layouts are given by strides, so NHD ([page][slot][head][dim]), HND
// ([page][head][slot][dim]) and any padded variant are views of the same kind.
#pragma once
#include <algorithm>
#include <type_traits>
#include <vector>

#include "../core/error.hpp"
#include "../core/views.hpp"
#include "rows.hpp"

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

/// A page table for several sequences in CSR form (FlashInfer's paged_kv_t): sequence s owns
/// pool pages indices[indptr[s] .. indptr[s + 1]) in order, its last page holding
/// last_page_len[s] tokens (1..page_size). Arrays are the caller's.
struct PageTable {
  const index_t* indptr = nullptr;         ///< [sequences + 1]
  const index_t* indices = nullptr;        ///< [indptr[sequences]]
  const index_t* last_page_len = nullptr;  ///< [sequences]
  index_t sequences = 0;                   ///< number of sequences
  index_t page_size = 0;                   ///< tokens per page

  /// Tokens of sequence s.
  index_t tokens(index_t s) const noexcept {
    const index_t n = indptr[s + 1] - indptr[s];
    return n == 0 ? 0 : (n - 1) * page_size + last_page_len[s];
  }
  /// Sequence s of a pool laid out like `layout` (a view of any sequence: pool, strides, heads).
  template <class T>
  PagedHeadsView<T> sequence(index_t s, PagedHeadsView<T> layout) const noexcept {
    layout.pages = indices + indptr[s];
    layout.tokens = tokens(s);
    layout.page_size = page_size;
    return layout;
  }
  /// Checks the table against a pool of `pool_pages` pages: increasing indptr, every index in
  /// the pool, no page owned twice (by one sequence or two), last_page_len in [1, page_size].
  /// Allocates a bitmap of the pool (call it when the table changes, not per layer).
  void check(index_t pool_pages, const char* fn = "PageTable::check") const {
    CTXCOMP_CHECK(page_size > 0, fn, ": page_size (", page_size, ") must be positive");
    CTXCOMP_CHECK(sequences >= 0 && indptr && (sequences == 0 || (indices && last_page_len)), fn,
                  ": indptr, indices and last_page_len must be given");
    CTXCOMP_CHECK(indptr[0] == 0, fn, ": indptr[0] is ", indptr[0], ", not 0");
    std::vector<bool> owned(static_cast<std::size_t>(std::max<index_t>(pool_pages, 0)), false);
    for (index_t s = 0; s < sequences; ++s) {
      CTXCOMP_CHECK(indptr[s + 1] >= indptr[s], fn, ": indptr decreases at sequence ", s, " (", indptr[s], " then ",
                    indptr[s + 1], ")");
      for (index_t i = indptr[s]; i < indptr[s + 1]; ++i) {
        const index_t p = indices[i];
        CTXCOMP_CHECK(p >= 0 && p < pool_pages, fn, ": sequence ", s, " page ", i - indptr[s], " is pool page ", p,
                      ", outside the pool [0, ", pool_pages, ")");
        CTXCOMP_CHECK(!owned[std::size_t(p)], fn, ": pool page ", p, " appears twice (sequence ", s, ")");
        owned[std::size_t(p)] = true;
      }
      if (indptr[s + 1] > indptr[s])
        CTXCOMP_CHECK(last_page_len[s] >= 1 && last_page_len[s] <= page_size, fn, ": sequence ", s,
                      " last_page_len (", last_page_len[s], ") is outside [1, ", page_size, "]");
    }
  }
};

/// Writes row (h, t) of a paged view from fp32 (as store_row for a HeadsView: converted, or
/// quantised with its scale for qint8).
template <class T>
void store_row(const PagedHeadsView<T>& dst, index_t h, index_t t, const float* src) noexcept {
  if constexpr (is_quantized_v<T>) dst.scale(h, t) = kernels::quantize_row(src, dst.row(h, t), dst.head_dim);
  else kernels::convert(src, dst.row(h, t), dst.head_dim);
}

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
