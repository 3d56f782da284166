// Paged K/V caches, vLLM / FlashInfer style, over caller-owned memory: a page table for several
// sequences in CSR form (PageTable, FlashInfer's paged_kv_t) and the one-sequence layout
// handle (PagedKv) whose eviction compacts the tail through the page table and returns emptied
// pages to the engine's PagePool. The view attention reads, PagedHeadsView, is in
// core/kv_views.hpp.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../core/error.hpp"
#include "../core/kv_views.hpp"
#include "../core/views.hpp"
#include "buffers.hpp"
#include "compact.hpp"

namespace ctxcomp {

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

/// One sequence of a paged cache: its page table (`pages`, room for `max_pages`, the engine's)
/// into the layers' page pools, pages taken from and returned to the engine's PagePool, and
/// per-token positions and token indices (arrays of max_pages * page_size). Slots [0, size())
/// are the tokens in order, token t in page pages[t / page_size]. Eviction compacts the tokens
/// after the first removed one through the page table and pushes the pages left empty at the
/// end back onto the pool: folding a span that just closed moves only the tail after it.
template <class T>
class PagedKv {
  static_assert(is_kv_type_v<T>, "PagedKv: the storage type must be float, bf16, fp16 or qint8");

 public:
  static constexpr bool has_holes = false;  ///< slots [0, size()) are all live

  PagedKv() = default;
  /// The sequence holds `tokens` tokens in its first ceil(tokens / page_size) pages.
  PagedKv(KvShape shape, PagedBuffers<T> buf, PagePool* pool, index_t* pages, index_t max_pages,
          std::int64_t* positions, index_t* token_index, index_t tokens = 0)
      : s_(shape), b_(buf), pool_(pool), pages_(pages), max_pages_(max_pages), pos_(positions), idx_(token_index),
        size_(tokens) {
    const char* fn = "PagedKv";
    detail::check_shape(shape, max_pages, fn);
    const bool per_layer = buf.per_layer();
    if (per_layer) {
      detail::check_layer_pointers(buf.layer_keys, buf.layer_values, shape.layers, fn, "pool",
                                   "layer_keys and layer_values");
    } else {
      CTXCOMP_CHECK(buf.keys != nullptr && buf.values != nullptr, fn, ": null key or value pool");
    }
    CTXCOMP_CHECK(buf.page_size > 0 && buf.pool_pages > 0, fn, ": page_size (", buf.page_size, ") and pool_pages (",
                  buf.pool_pages, ") must be positive");
    const index_t layers = per_layer ? 1 : shape.layers;  // per-layer: rows are checked within a pool
    for (bool v : {false, true})
      detail::check_row_strides(shape.head_dim,
                                {{buf.layer_stride, layers},
                                 {PagedBuffers<T>::side(v, buf.page_stride, buf.value_page_stride), buf.pool_pages},
                                 {PagedBuffers<T>::side(v, buf.head_stride, buf.value_head_stride), shape.kv_heads},
                                 {PagedBuffers<T>::side(v, buf.token_stride, buf.value_token_stride), buf.page_size}},
                                fn, v ? "value page pool" : "key page pool");
    if constexpr (is_quantized_v<T>) {
      if (per_layer) {
        detail::check_layer_pointers(buf.layer_key_scales, buf.layer_value_scales, shape.layers, fn, "scale array",
                                     "layer_key_scales and layer_value_scales (int8 pools)");
      } else {
        CTXCOMP_CHECK(buf.key_scales != nullptr && buf.value_scales != nullptr, fn, ": int8 pools without scales");
      }
    }
    CTXCOMP_CHECK(pool != nullptr && pool->pool_pages == buf.pool_pages && pool->free_count >= 0 &&
                      pool->free_count <= pool->pool_pages && (pool->free_count == 0 || pool->free_pages),
                  fn, ": the page pool's free list does not describe a pool of ", buf.pool_pages, " pages");
    CTXCOMP_CHECK(pages != nullptr && positions != nullptr && token_index != nullptr, fn,
                  ": null page table, positions or token_index");
    CTXCOMP_CHECK(tokens >= 0 && tokens <= max_pages * buf.page_size, fn, ": ", tokens, " tokens do not fit in ",
                  max_pages, " pages");
    const index_t n = page_count();
    std::vector<bool> seen(std::size_t(buf.pool_pages), false);
    for (index_t i = 0; i < n; ++i) {
      CTXCOMP_CHECK(pages[i] >= 0 && pages[i] < buf.pool_pages, fn, ": page ", i, " is pool page ", pages[i],
                    ", outside the pool [0, ", buf.pool_pages, ")");
      CTXCOMP_CHECK(!seen[std::size_t(pages[i])], fn, ": pool page ", pages[i], " appears twice in the page table");
      seen[std::size_t(pages[i])] = true;
    }
    for (index_t i = 0; i < pool->free_count; ++i) {
      const index_t p = pool->free_pages[i];
      CTXCOMP_CHECK(p >= 0 && p < buf.pool_pages && !seen[std::size_t(p)], fn, ": free page ", p,
                    " is outside the pool or already in use");
      seen[std::size_t(p)] = true;
    }
  }

  /// Shape and occupancy (see the top of this file); room() is how many tokens an append can
  /// still take, last_token_index() the largest cached token index (-1: empty).
  ///@{
  index_t layers() const noexcept { return s_.layers; }
  index_t kv_heads() const noexcept { return s_.kv_heads; }
  index_t head_dim() const noexcept { return s_.head_dim; }
  index_t capacity() const noexcept { return max_pages_ * b_.page_size; }
  index_t size() const noexcept { return size_; }
  index_t slots() const noexcept { return size_; }
  index_t room() const noexcept {
    return std::min(max_pages_, page_count() + pool_->free_count) * b_.page_size - size_;
  }
  bool live(index_t s) const noexcept { return s >= 0 && s < size_; }
  index_t last_token_index() const noexcept { return size_ > 0 ? idx_[size_ - 1] : -1; }
  ///@}
  /// The page table: pages in use, tokens in the last one, the pages.
  ///@{
  index_t page_count() const noexcept { return (size_ + b_.page_size - 1) / b_.page_size; }
  index_t last_page_len() const noexcept { return size_ == 0 ? 0 : size_ - (page_count() - 1) * b_.page_size; }
  const index_t* pages() const noexcept { return pages_; }
  index_t page_size() const noexcept { return b_.page_size; }
  ///@}
  /// Keys or values of layer l, tokens [0, size()), read through the page table.
  ///@{
  PagedHeadsView<T> keys(index_t l) const noexcept { return view(false, l); }
  PagedHeadsView<T> values(index_t l) const noexcept { return view(true, l); }
  ///@}
  /// Per-slot position ids and logical token indices.
  ///@{
  std::int64_t* positions() const noexcept { return pos_; }
  index_t* token_index() const noexcept { return idx_; }
  ///@}

  /// Appends `count` tokens at the end, taking pages from the pool as needed. Returns the first
  /// slot. On error (page table full, pool too small) nothing changes.
  index_t append(index_t count, const std::int64_t* positions, const index_t* token_index, index_t* slots_out = nullptr) {
    const char* fn = "PagedKv::append";
    detail::check_append(count, positions, token_index, size_ > 0 ? idx_[size_ - 1] : -1, fn);
    const index_t need = (size_ + count + b_.page_size - 1) / b_.page_size;
    CTXCOMP_CHECK(need <= max_pages_, fn, ": ", count, " tokens do not fit (", size_, " tokens, page table of ",
                  max_pages_, " pages of ", b_.page_size, ")");
    CTXCOMP_CHECK(need - page_count() <= pool_->free_count, fn, ": the pool is too small: ", need - page_count(),
                  " more pages needed, ", pool_->free_count, " free");
    for (index_t p = page_count(); p < need; ++p) pages_[p] = pool_->free_pages[--pool_->free_count];
    return detail::append_at_end(count, positions, token_index, slots_out, pos_, idx_, size_);
  }
  /// Undoes the last append of these slots (its pages go back to the pool).
  void unappend(const index_t* slots, index_t count) noexcept {
    if (count > 0) shrink_to(std::min(size_, slots[0]));
  }
  /// Removes `ranges` (sorted, disjoint, within [0, size())), compacting the tokens after the
  /// first range through the page table; pages left empty go back onto the pool's free list
  /// (the top `pages_freed` entries). On error nothing changes.
  EvictStats evict(TokenRanges ranges) {
    detail::check_ranges(ranges, size_, "PagedKv::evict");
    EvictStats st = detail::compact_dense(*this, ranges, pos_, idx_);
    st.pages_freed = shrink_to(size_ - st.tokens);
    return st;
  }
  /// Keeps only the slots in `keep` (strictly increasing).
  EvictStats gather(const std::vector<index_t>& keep) {
    return evict(detail::ranges_outside(keep, size_, "PagedKv::gather"));
  }
  /// Drops the tokens from slot n on, returning emptied pages to the pool.
  EvictStats truncate(index_t n) {
    CTXCOMP_CHECK(n >= 0 && n <= size_, "PagedKv::truncate: ", n, " is outside [0, ", size_, "]");
    EvictStats st{size_ - n, 0, 0};
    st.pages_freed = shrink_to(n);
    return st;
  }
  /// Returns every page to the pool.
  void clear() noexcept { shrink_to(0); }

 private:
  PagedHeadsView<T> view(bool value_side, index_t l) const noexcept {
    using B = PagedBuffers<T>;
    PagedHeadsView<T> v{b_.base(value_side, l),
                        pages_,
                        s_.kv_heads,
                        size_,
                        s_.head_dim,
                        b_.page_size,
                        b_.pool_pages,
                        B::side(value_side, b_.page_stride, b_.value_page_stride),
                        B::side(value_side, b_.head_stride, b_.value_head_stride),
                        B::side(value_side, b_.token_stride, b_.value_token_stride)};
    if constexpr (is_quantized_v<T>) {
      v.scales = b_.scale_base(value_side, l);
      v.scale_page_stride = B::side(value_side, b_.scale_page_stride, b_.value_scale_page_stride);
      v.scale_head_stride = B::side(value_side, b_.scale_head_stride, b_.value_scale_head_stride);
      v.scale_token_stride = B::side(value_side, b_.scale_token_stride, b_.value_scale_token_stride);
    }
    return v;
  }
  // Sets the size to n (<= size_) and pushes the pages no longer needed onto the pool.
  index_t shrink_to(index_t n) noexcept {
    const index_t before = page_count();
    size_ = n;
    const index_t after = page_count();
    for (index_t p = before - 1; p >= after; --p) pool_->free_pages[pool_->free_count++] = pages_[p];
    return before - after;
  }

  KvShape s_;
  PagedBuffers<T> b_;
  PagePool* pool_ = nullptr;
  index_t* pages_ = nullptr;
  index_t max_pages_ = 0;
  std::int64_t* pos_ = nullptr;
  index_t* idx_ = nullptr;
  index_t size_ = 0;
};

}  // namespace ctxcomp
