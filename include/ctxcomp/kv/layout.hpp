// The KV-layout layer: one small interface over the three ways engines keep a K/V cache, all over
// caller-owned memory (buffers and metadata arrays belong to the engine; a layout object is a
// handle that holds only pointers, strides and counts):
//   ContiguousKv  per layer [kv_heads x capacity x head_dim] (or any strides), compacted by
//                 moving the kept runs (what KvCache owns);
//   CellKv        llama.cpp's cell cache (kv/cells.hpp): eviction marks cells free, appends fill
//                 free cells first, attention masks the holes;
//   PagedKv       vLLM / FlashInfer pages (kv/paged.hpp) through one sequence's page table;
//                 eviction compacts the tail through the table and returns emptied pages.
// Every layout answers the same calls, which the host, `fold::fold` and the SAC compressor are
// written against:
//   layers() kv_heads() head_dim()      shape
//   size()                              cached tokens
//   slots()                             slots attention runs over (cells: up to the last live cell)
//   capacity()                          slots in all
//   keys(l) values(l)                   HeadsView / PagedHeadsView over slots [0, slots())
//   positions() token_index()           per slot (a free cell: position < 0)
//   live(s)                             whether slot s holds a token of this cache
//   append(count, pos, idx, slots_out)  reserves slots (written to slots_out), metadata set;
//                                       on error nothing changes
//   unappend(slots, count)              undoes an append
//   evict(ranges) gather(keep) truncate(n)   drop tokens (slot ranges); return EvictStats
// `has_holes` tells whether slots may be free between live ones (then masks come from the
// layout's own adaptors, see fold::SpanTracker::mask).
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <numeric>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/views.hpp"
#include "cells.hpp"
#include "paged.hpp"
#include "rows.hpp"

namespace ctxcomp {

/// A half-open range of cache slots [begin, end).
struct TokenRange {
  index_t begin = 0;  ///< first slot
  index_t end = 0;    ///< one past the last slot
};

/// Eviction ranges as passed to evict(): sorted, disjoint ranges the caller owns (a vector, a
/// braced list, or a pointer and a count). A view: nothing is copied or allocated.
class TokenRanges {
 public:
  /// No ranges.
  TokenRanges() = default;
  /// `count` ranges starting at `data` (the caller keeps them alive while the view is used).
  TokenRanges(const TokenRange* data, index_t count) noexcept : data_(data), size_(count) {}
  /// Every range of `v` (a view: `v` must outlive it).
  TokenRanges(const std::vector<TokenRange>& v) noexcept  // NOLINT: implicit, as a view
      : data_(v.data()), size_(index_t(v.size())) {}
  /// A braced list (its array lives until the end of the call the view is passed to).
  TokenRanges(std::initializer_list<TokenRange> l) noexcept {
    data_ = std::data(l);
    size_ = index_t(l.size());
  }
  /// First range.
  const TokenRange* begin() const noexcept { return data_; }
  /// One past the last range.
  const TokenRange* end() const noexcept { return data_ + size_; }
  /// Number of ranges.
  index_t size() const noexcept { return size_; }
  /// True when there are no ranges.
  bool empty() const noexcept { return size_ == 0; }

 private:
  const TokenRange* data_ = nullptr;
  index_t size_ = 0;
};

/// Collects increasing slots as ranges (neighbours merged) for evict(): in a fixed buffer, so a
/// fold or truncation of a few runs never allocates; past kInline ranges it spills to the heap.
class RangeCollector {
 public:
  /// Adds slot s (greater than every slot added before).
  void add(index_t s) {
    if (n_ > 0 && back().end == s) {
      ++back().end;
      return;
    }
    if (n_ < kInline) {
      local_[n_++] = {s, s + 1};
      return;
    }
    if (heap_.empty()) heap_.assign(local_, local_ + kInline);
    heap_.push_back({s, s + 1});
    ++n_;
  }
  /// The ranges collected so far, as a view valid until the next add() or the collector's end.
  TokenRanges ranges() const noexcept { return n_ <= kInline ? TokenRanges(local_, n_) : TokenRanges(heap_); }

 private:
  static constexpr index_t kInline = 32;
  TokenRange& back() noexcept { return n_ <= kInline ? local_[n_ - 1] : heap_.back(); }
  TokenRange local_[kInline];
  std::vector<TokenRange> heap_;
  index_t n_ = 0;
};

/// What an eviction did: tokens removed, bytes of K/V (and scales) moved, pages returned.
struct EvictStats {
  index_t tokens = 0;            ///< tokens evicted
  std::size_t bytes_moved = 0;   ///< bytes of K/V rows and scales copied to compact
  index_t pages_freed = 0;       ///< paged caches: pages pushed back onto the pool's free list
};

/// Shape of a K/V cache: layers, kv heads, head size.
struct KvShape {
  index_t layers = 0;    ///< transformer layers
  index_t kv_heads = 0;  ///< key/value heads per layer
  index_t head_dim = 0;  ///< elements per head row
};

/// Per-layer K/V buffers addressed by strides (elements): row (layer l, head h, slot t) at
/// keys + l * layer_stride + h * head_stride + t * token_stride, head_dim contiguous elements.
/// qint8 storage also has one fp32 scale per row, at key_scales + l * scale_layer_stride + h *
/// scale_head_stride + t * scale_token_stride (values alike).
template <class T>
struct KvBuffers {
  T* keys = nullptr;    ///< row (0, 0, 0) of the keys
  T* values = nullptr;  ///< row (0, 0, 0) of the values
  /// Strides in elements between layers, heads and slots.
  ///@{
  index_t layer_stride = 0, head_stride = 0, token_stride = 0;
  ///@}
  float* key_scales = nullptr;    ///< qint8: scales of the keys, else null
  float* value_scales = nullptr;  ///< qint8: scales of the values, else null
  /// Strides in floats of the scales between layers, heads and slots.
  ///@{
  index_t scale_layer_stride = 0, scale_head_stride = 0, scale_token_stride = 0;
  ///@}

  /// Head-major [layers][kv_heads][capacity][head_dim] (KvCache's layout); scales
  /// [layers][kv_heads][capacity].
  static KvBuffers head_major(T* keys, T* values, KvShape s, index_t capacity, float* key_scales = nullptr,
                              float* value_scales = nullptr) noexcept {
    return {keys,       values,       s.kv_heads * capacity * s.head_dim, capacity * s.head_dim, s.head_dim,
            key_scales, value_scales, s.kv_heads * capacity,              capacity,              1};
  }
  /// Token-major [layers][capacity][kv_heads * head_dim] (llama.cpp's cells); scales
  /// [layers][capacity][kv_heads].
  static KvBuffers token_major(T* keys, T* values, KvShape s, index_t capacity, float* key_scales = nullptr,
                               float* value_scales = nullptr) noexcept {
    return {keys,       values,       capacity * s.kv_heads * s.head_dim, s.head_dim, s.kv_heads * s.head_dim,
            key_scales, value_scales, capacity * s.kv_heads,              1,          s.kv_heads};
  }
  /// Layer l's keys (or values), slots [0, tokens).
  HeadsView<T> view(bool value_side, index_t l, KvShape s, index_t tokens) const noexcept {
    HeadsView<T> v{(value_side ? values : keys) + l * layer_stride, s.kv_heads, tokens, s.head_dim, head_stride,
                   token_stride};
    if constexpr (is_quantized_v<T>) {
      v.scales = (value_side ? value_scales : key_scales) + l * scale_layer_stride;
      v.scale_head_stride = scale_head_stride;
      v.scale_token_stride = scale_token_stride;
    }
    return v;
  }
};

/// Pools of K and V pages for every layer: page p of layer l at keys + l * layer_stride + p *
/// page_stride, laid out inside by head_stride / token_stride (NHD or HND, see PagedHeadsView).
template <class T>
struct PagedBuffers {
  T* keys = nullptr;    ///< layer 0, page 0 of the key pool
  T* values = nullptr;  ///< layer 0, page 0 of the value pool
  index_t pool_pages = 0;  ///< pages per layer pool
  index_t page_size = 0;   ///< tokens per page
  /// Strides in elements between layers, pages, heads and slots.
  ///@{
  index_t layer_stride = 0, page_stride = 0, head_stride = 0, token_stride = 0;
  ///@}
  float* key_scales = nullptr;    ///< qint8: key scales, else null
  float* value_scales = nullptr;  ///< qint8: value scales, else null
  /// Strides in floats of the scales between layers, pages, heads and slots.
  ///@{
  index_t scale_layer_stride = 0, scale_page_stride = 0, scale_head_stride = 0, scale_token_stride = 0;
  ///@}

  /// NHD pages [layers][pool_pages][page_size][kv_heads][head_dim] (FlashInfer's default).
  static PagedBuffers nhd(T* keys, T* values, KvShape s, index_t pool_pages, index_t page_size,
                          float* key_scales = nullptr, float* value_scales = nullptr) noexcept {
    const index_t page = page_size * s.kv_heads * s.head_dim;
    return {keys,       values,       pool_pages, page_size, pool_pages * page, page, s.head_dim, s.kv_heads * s.head_dim,
            key_scales, value_scales, pool_pages * page_size * s.kv_heads, page_size * s.kv_heads, 1, s.kv_heads};
  }
  /// HND pages [layers][pool_pages][kv_heads][page_size][head_dim].
  static PagedBuffers hnd(T* keys, T* values, KvShape s, index_t pool_pages, index_t page_size,
                          float* key_scales = nullptr, float* value_scales = nullptr) noexcept {
    const index_t page = page_size * s.kv_heads * s.head_dim;
    return {keys,       values,       pool_pages, page_size, pool_pages * page, page, page_size * s.head_dim, s.head_dim,
            key_scales, value_scales, pool_pages * page_size * s.kv_heads, page_size * s.kv_heads, page_size, 1};
  }
};

/// A pool's free pages, owned by the engine: a stack free_pages[0, free_count). Appends pop
/// pages from the top; evictions push the pages they empty.
struct PagePool {
  index_t* free_pages = nullptr;  ///< [pool_pages] storage of the stack
  index_t free_count = 0;         ///< pages on the stack
  index_t pool_pages = 0;         ///< pages in the pool (the stack's capacity)
};

namespace detail {

/// Checks that rows of head_dim elements at (i, j) -> i * s1 + j * s2 for i < n1, j < n2 never
/// overlap (strides in elements; any order).
inline void check_row_strides(index_t head_dim, std::initializer_list<std::pair<index_t, index_t>> dims,
                              const char* fn, const char* what) {
  std::array<std::pair<index_t, index_t>, 4> d{};  // no allocation: checked on every handle
  std::size_t n = 0;
  for (auto [stride, count] : dims)
    if (count > 1 && n < d.size()) d[n++] = {stride, count};
  for (std::size_t i = 1; i < n; ++i)  // insertion sort by stride (at most 4 entries)
    for (std::size_t j = i; j > 0 && d[j].first < d[j - 1].first; --j) std::swap(d[j], d[j - 1]);
  index_t extent = head_dim;
  for (std::size_t i = 0; i < n; ++i) {
    const auto [stride, count] = d[i];
    CTXCOMP_CHECK(stride >= extent, fn, ": ", what, " strides overlap (a stride of ", stride, " elements over ", count,
                  " entries, inside an extent of ", extent, ")");
    extent = stride * (count - 1) + extent;
  }
}

/// Checks eviction ranges: sorted, disjoint, within [0, limit).
inline void check_ranges(TokenRanges ranges, index_t limit, const char* fn) {
  index_t last = 0;
  for (const auto& r : ranges) {
    CTXCOMP_CHECK(r.begin >= last && r.begin <= r.end && r.end <= limit, fn, ": range [", r.begin, ", ", r.end,
                  ") is out of [0, ", limit, ") or overlaps / precedes the previous range");
    last = r.end;
  }
}

/// The complement of `keep` (strictly increasing slots in [0, limit)) as ranges.
inline std::vector<TokenRange> ranges_outside(const std::vector<index_t>& keep, index_t limit, const char* fn) {
  std::vector<TokenRange> drop;
  index_t next = 0;
  for (std::size_t i = 0; i < keep.size(); ++i) {
    CTXCOMP_CHECK(keep[i] >= next && keep[i] < limit, fn, ": slot ", keep[i], " is out of range or not increasing");
    if (keep[i] > next) drop.push_back({next, keep[i]});
    next = keep[i] + 1;
  }
  if (next < limit) drop.push_back({next, limit});
  return drop;
}

/// Calls move(src, dst, n) for each run of kept slots that must move left when `ranges` (checked)
/// are removed from [0, size); returns the number of slots kept.
template <class F>
index_t for_each_moved_run(TokenRanges ranges, index_t size, F&& move) {
  index_t dst = 0, src = 0;
  for (const auto& r : ranges) {
    if (r.begin > src && src != dst) move(src, dst, r.begin - src);
    dst += r.begin - src;
    src = r.end;
  }
  if (size > src && src != dst) move(src, dst, size - src);
  return dst + (size - src);
}

/// Moves the rows of tokens [src, src + n) of every head to [dst, dst + n) (dst < src, or any
/// non-overlapping pair), scales included, in as few block moves as the strides allow. Paged
/// views are moved page run by page run. Returns the bytes moved.
template <class View>
std::size_t move_tokens(const View& v, index_t src, index_t dst, index_t n) noexcept {
  using T = typename View::element_type;
  const std::size_t row = std::size_t(v.head_dim) * sizeof(T);
  std::size_t bytes = 0;
  while (n > 0) {
    const index_t m = std::min(v.run(src, n), v.run(dst, n));
    if (v.token_stride == v.head_dim || v.heads == 1) {  // each head's rows are one block
      for (index_t h = 0; h < v.heads; ++h)
        if (m == 1 || v.token_stride == v.head_dim) std::memmove(v.row(h, dst), v.row(h, src), std::size_t(m) * row);
        else
          for (index_t t = 0; t < m; ++t) std::memmove(v.row(h, dst + t), v.row(h, src + t), row);
    } else if (v.head_stride == v.head_dim) {  // token-major: a token's heads are one block
      if (v.token_stride == v.heads * v.head_dim)
        std::memmove(v.row(0, dst), v.row(0, src), std::size_t(m) * std::size_t(v.heads) * row);
      else
        for (index_t t = 0; t < m; ++t) std::memmove(v.row(0, dst + t), v.row(0, src + t), std::size_t(v.heads) * row);
    } else {
      for (index_t h = 0; h < v.heads; ++h)
        for (index_t t = 0; t < m; ++t) std::memmove(v.row(h, dst + t), v.row(h, src + t), row);
    }
    bytes += std::size_t(m) * std::size_t(v.heads) * row;
    if constexpr (is_quantized_v<T>) {
      for (index_t h = 0; h < v.heads; ++h)
        for (index_t t = 0; t < m; ++t) v.scale(h, dst + t) = v.scale(h, src + t);
      bytes += std::size_t(m) * std::size_t(v.heads) * sizeof(float);
    }
    src += m, dst += m, n -= m;
  }
  return bytes;
}

/// Compacts a dense (hole-free) layout: removes `ranges` (checked) from every layer's K and V
/// and from the per-slot metadata. Returns the stats; the caller sets its new size.
template <class Kv>
EvictStats compact_dense(Kv& kv, TokenRanges ranges, std::int64_t* pos, index_t* idx) {
  EvictStats st;
  for (index_t l = 0; l < kv.layers(); ++l)
    for (const auto& view : {kv.keys(l), kv.values(l)})
      for_each_moved_run(ranges, kv.size(), [&](index_t src, index_t dst, index_t n) {
        st.bytes_moved += move_tokens(view, src, dst, n);
      });
  const index_t kept = for_each_moved_run(ranges, kv.size(), [&](index_t src, index_t dst, index_t n) {
    std::memmove(pos + dst, pos + src, std::size_t(n) * sizeof(std::int64_t));
    std::memmove(idx + dst, idx + src, std::size_t(n) * sizeof(index_t));
  });
  st.tokens = kv.size() - kept;
  return st;
}

/// Checks an append's metadata: token indices increasing and past `last_index`.
inline void check_append(index_t count, const std::int64_t* positions, const index_t* token_index, index_t last_index,
                         const char* fn) {
  CTXCOMP_CHECK(count >= 0, fn, ": negative count (", count, ")");
  CTXCOMP_CHECK(count == 0 || (positions != nullptr && token_index != nullptr), fn,
                ": positions and token_index must point to ", count, " values (one is null)");
  for (index_t i = 0; i < count; ++i) {
    const index_t prev = i > 0 ? token_index[i - 1] : last_index;
    CTXCOMP_CHECK(token_index[i] > prev, fn, ": token indices must increase (", prev, " then ", token_index[i], ")");
    CTXCOMP_CHECK(positions[i] >= 0, fn, ": position ", positions[i], " at ", i,
                  " is negative (negative positions mark free cells)");
  }
}

/// A compacted layout's append after its checks: metadata of slots [size, size + count), their
/// slots into slots_out (when given); size grows. Returns the first slot.
inline index_t append_at_end(index_t count, const std::int64_t* positions, const index_t* token_index,
                             index_t* slots_out, std::int64_t* pos, index_t* idx, index_t& size) noexcept {
  std::copy(positions, positions + count, pos + size);
  std::copy(token_index, token_index + count, idx + size);
  if (slots_out) std::iota(slots_out, slots_out + count, size);
  const index_t first = size;
  size += count;
  return first;
}

inline void check_shape(KvShape s, index_t capacity, const char* fn) {
  CTXCOMP_CHECK(s.layers > 0 && s.kv_heads > 0 && s.head_dim > 0 && capacity > 0, fn, ": layers (", s.layers,
                "), kv_heads (", s.kv_heads, "), head_dim (", s.head_dim, ") and capacity (", capacity,
                ") must be positive");
}

template <class T>
void check_buffers(const KvBuffers<T>& b, KvShape s, index_t capacity, const char* fn) {
  CTXCOMP_CHECK(b.keys != nullptr && b.values != nullptr, fn, ": null key or value buffer");
  check_row_strides(s.head_dim, {{b.layer_stride, s.layers}, {b.head_stride, s.kv_heads}, {b.token_stride, capacity}},
                    fn, "K/V buffer");
  if constexpr (is_quantized_v<T>) {
    CTXCOMP_CHECK(b.key_scales != nullptr && b.value_scales != nullptr, fn, ": int8 storage without its scales");
    check_row_strides(1, {{b.scale_layer_stride, s.layers}, {b.scale_head_stride, s.kv_heads},
                          {b.scale_token_stride, capacity}},
                      fn, "scale");
  }
}

}  // namespace detail

/// A contiguous, compacted cache over caller memory: slots [0, size()) are the cached tokens in
/// order; eviction moves the kept runs left (KvCache's behaviour, for any strides).
template <class T>
class ContiguousKv {
  static_assert(is_kv_type_v<T>, "ContiguousKv: the storage type must be float, bf16, fp16 or qint8");

 public:
  static constexpr bool has_holes = false;  ///< slots [0, size()) are all live

  ContiguousKv() = default;
  /// A view of `capacity` slots per layer in `buf`, whose first `size` hold tokens with these
  /// positions and token indices (arrays of `capacity`, the caller's).
  ContiguousKv(KvShape shape, KvBuffers<T> buf, index_t capacity, std::int64_t* positions, index_t* token_index,
               index_t size = 0)
      : s_(shape), b_(buf), capacity_(capacity), size_(size), pos_(positions), idx_(token_index) {
    const char* fn = "ContiguousKv";
    detail::check_shape(shape, capacity, fn);
    detail::check_buffers(buf, shape, capacity, fn);
    CTXCOMP_CHECK(positions != nullptr && token_index != nullptr, fn, ": null positions or token_index array");
    CTXCOMP_CHECK(size >= 0 && size <= capacity, fn, ": size ", size, " is outside [0, ", capacity, "]");
  }

  /// Shape and occupancy (see the top of this file); room() is how many tokens an append can
  /// still take, last_token_index() the largest cached token index (-1: empty).
  ///@{
  index_t layers() const noexcept { return s_.layers; }
  index_t kv_heads() const noexcept { return s_.kv_heads; }
  index_t head_dim() const noexcept { return s_.head_dim; }
  index_t capacity() const noexcept { return capacity_; }
  index_t size() const noexcept { return size_; }
  index_t slots() const noexcept { return size_; }
  index_t room() const noexcept { return capacity_ - size_; }
  bool live(index_t s) const noexcept { return s >= 0 && s < size_; }
  index_t last_token_index() const noexcept { return size_ > 0 ? idx_[size_ - 1] : -1; }
  ///@}
  /// Keys or values of layer l, slots [0, size()).
  ///@{
  HeadsView<T> keys(index_t l) const noexcept { return b_.view(false, l, s_, size_); }
  HeadsView<T> values(index_t l) const noexcept { return b_.view(true, l, s_, size_); }
  ///@}
  /// Per-slot position ids and logical token indices.
  ///@{
  std::int64_t* positions() const noexcept { return pos_; }
  index_t* token_index() const noexcept { return idx_; }
  ///@}

  /// Reserves `count` slots at the end (their slots written to slots_out when given). Returns
  /// the first. On error nothing changes.
  index_t append(index_t count, const std::int64_t* positions, const index_t* token_index, index_t* slots_out = nullptr) {
    const char* fn = kv_cache_ ? "KvCache::append" : "ContiguousKv::append";
    detail::check_append(count, positions, token_index, size_ > 0 ? idx_[size_ - 1] : -1, fn);
    CTXCOMP_CHECK(size_ + count <= capacity_, fn, ": ", count, " tokens do not fit (", size_, " of ", capacity_,
                  " slots used)");
    return detail::append_at_end(count, positions, token_index, slots_out, pos_, idx_, size_);
  }
  /// Undoes the last append of these `count` slots.
  void unappend(const index_t* slots, index_t count) noexcept {
    if (count > 0) size_ = std::min(size_, slots[0]);
  }
  /// Removes the slots of `ranges` (sorted, disjoint, within [0, size())) from every layer,
  /// compacting in place. On error nothing changes.
  EvictStats evict(TokenRanges ranges) {
    detail::check_ranges(ranges, size_, kv_cache_ ? "KvCache::evict" : "ContiguousKv::evict");
    const EvictStats st = detail::compact_dense(*this, ranges, pos_, idx_);
    size_ -= st.tokens;
    return st;
  }
  /// Keeps only the slots in `keep` (strictly increasing).
  EvictStats gather(const std::vector<index_t>& keep) {
    return evict(detail::ranges_outside(keep, size_, kv_cache_ ? "KvCache::gather" : "ContiguousKv::gather"));
  }
  /// Drops the tokens from slot n on.
  EvictStats truncate(index_t n) {
    CTXCOMP_CHECK(n >= 0 && n <= size_, kv_cache_ ? "KvCache" : "ContiguousKv", "::truncate: ", n,
                  " is outside [0, ", size_, "]");
    EvictStats st{size_ - n, 0, 0};
    size_ = n;
    return st;
  }
  /// Forgets every token.
  void clear() noexcept { size_ = 0; }
  /// Errors name KvCache (for the handle KvCache works through).
  ContiguousKv& as_kv_cache() noexcept {
    kv_cache_ = true;
    return *this;
  }

 private:
  bool kv_cache_ = false;
  KvShape s_;
  KvBuffers<T> b_;
  index_t capacity_ = 0, size_ = 0;
  std::int64_t* pos_ = nullptr;
  index_t* idx_ = nullptr;
};

/// A llama.cpp-style cell cache over caller memory: `cells` slots per layer (any strides,
/// token-major as llama.cpp by KvBuffers::token_major), per cell a position (negative: free),
/// a logical token index and optionally a sequence id (cells of other sequences are neither
/// seen nor touched). Evicting marks cells free and moves nothing; appends take the first free
/// cells; attention covers cells [0, slots()) and masks the rest (CellSentinel, CellOrder).
/// The handle keeps its counts (size, room, slots, last token index, lowest free cell) up to
/// date through its own calls, so an append costs the cells it takes, not a scan of the cache.
/// When the host or another sequence's handle changes the metadata, construct the handle again
/// (a stale handle stays safe: an append re-scans from cell 0 before it reports "does not fit",
/// but may take free cells above ones freed behind its back).
template <class T>
class CellKv {
  static_assert(is_kv_type_v<T>, "CellKv: the storage type must be float, bf16, fp16 or qint8");

 public:
  static constexpr bool has_holes = true;  ///< free cells may lie between live ones

  CellKv() = default;
  /// The engine's cells: K/V `buf`, and arrays of `cells` entries: positions (negative: free),
  /// token indices, sequence ids (or null: one sequence). This cache is sequence `seq_id`.
  CellKv(KvShape shape, KvBuffers<T> buf, index_t cells, std::int64_t* positions, index_t* token_index,
         std::int32_t* seq = nullptr, std::int32_t seq_id = 0)
      : s_(shape), b_(buf), cells_(cells), pos_(positions), idx_(token_index), seq_(seq), seq_id_(seq_id) {
    const char* fn = "CellKv";
    detail::check_shape(shape, cells, fn);
    detail::check_buffers(buf, shape, cells, fn);
    CTXCOMP_CHECK(positions != nullptr && token_index != nullptr, fn, ": null positions or token_index array");
    for (index_t c = 0; c < cells; ++c)
      CTXCOMP_CHECK(positions[c] < 0 || token_index[c] >= 0, fn, ": cell ", c, " is live (position ", positions[c],
                    ") but has no token index (", token_index[c], ")");
    rescan();
  }

  /// Shape and occupancy (see the top of this file); room() is how many tokens an append can
  /// still take, last_token_index() the largest cached token index (-1: empty).
  ///@{
  index_t layers() const noexcept { return s_.layers; }
  index_t kv_heads() const noexcept { return s_.kv_heads; }
  index_t head_dim() const noexcept { return s_.head_dim; }
  index_t capacity() const noexcept { return cells_; }
  index_t size() const noexcept { return size_; }
  index_t slots() const noexcept { return used_; }
  index_t room() const noexcept { return free_; }
  bool live(index_t c) const noexcept { return meta().live(c, seq_id_); }
  index_t last_token_index() const noexcept { return last_index_; }
  ///@}
  /// The cells' metadata (for CellCausal and the engine's own masks).
  CellMeta meta() const noexcept { return {pos_, seq_, cells_}; }
  /// This cache's sequence id.
  std::int32_t sequence() const noexcept { return seq_id_; }
  /// Keys or values of layer l, cells [0, slots()).
  ///@{
  HeadsView<T> keys(index_t l) const noexcept { return b_.view(false, l, s_, used_); }
  HeadsView<T> values(index_t l) const noexcept { return b_.view(true, l, s_, used_); }
  ///@}
  /// Per-cell position ids (negative: free) and logical token indices.
  ///@{
  std::int64_t* positions() const noexcept { return pos_; }
  index_t* token_index() const noexcept { return idx_; }
  ///@}

  /// Puts `count` tokens into the first free cells (written to slots_out, required), setting
  /// their metadata. Returns the first cell used. On error (too few free cells) nothing changes.
  index_t append(index_t count, const std::int64_t* positions, const index_t* token_index, index_t* slots_out) {
    const char* fn = "CellKv::append";
    detail::check_append(count, positions, token_index, last_index_, fn);
    CTXCOMP_CHECK(count == 0 || slots_out != nullptr, fn, ": slots_out is required (free cells are scattered)");
    // Every cell below first_free_ is occupied as far as this handle knows; when the metadata
    // changed behind it (another sequence's handle freed cells below), the scan starts over.
    const bool fits = cells::find_free(meta(), count, slots_out, first_free_) ||
                      (first_free_ > 0 && cells::find_free(meta(), count, slots_out, 0));
    CTXCOMP_CHECK(fits, fn, ": ", count, " tokens do not fit (", cells_ - free_, " of ", cells_, " cells used)");
    for (index_t i = 0; i < count; ++i) {
      const index_t c = slots_out[i];
      pos_[c] = positions[i], idx_[c] = token_index[i];
      if (seq_) seq_[c] = seq_id_;
      used_ = std::max(used_, c + 1);
    }
    size_ += count, free_ -= count;
    if (count > 0) last_index_ = token_index[count - 1], first_free_ = slots_out[count - 1] + 1;
    return count > 0 ? slots_out[0] : used_;
  }
  /// Frees the cells of an append.
  void unappend(const index_t* slots, index_t count) noexcept {
    for (index_t i = 0; i < count; ++i) pos_[slots[i]] = -1;
    rescan();
  }
  /// Marks this sequence's live cells in `ranges` (sorted, disjoint, within [0, slots())) free.
  /// Nothing moves.
  EvictStats evict(TokenRanges ranges) {
    detail::check_ranges(ranges, used_, "CellKv::evict");
    EvictStats st;
    bool newest = false;  // the newest token was freed: last_token_index() must be recomputed
    for (const auto& r : ranges)
      for (index_t c = r.begin; c < r.end; ++c)
        if (live(c)) pos_[c] = -1, ++st.tokens, newest |= idx_[c] == last_index_, first_free_ = std::min(first_free_, c);
    // Costs the freed cells (plus the cells below a freed last one), not the cache.
    size_ -= st.tokens, free_ += st.tokens;
    while (used_ > 0 && !live(used_ - 1)) --used_;
    if (newest) rescan();
    return st;
  }
  /// Keeps only the live cells in `keep` (strictly increasing).
  EvictStats gather(const std::vector<index_t>& keep) {
    return evict(detail::ranges_outside(keep, used_, "CellKv::gather"));
  }
  /// Frees this sequence's cells from cell n on.
  EvictStats truncate(index_t n) {
    CTXCOMP_CHECK(n >= 0 && n <= cells_, "CellKv::truncate: ", n, " is outside [0, ", cells_, "]");
    return evict({{std::min(n, used_), used_}});
  }
  /// Frees every cell of this sequence.
  void clear() noexcept {
    for (index_t c = 0; c < used_; ++c)
      if (live(c)) pos_[c] = -1;
    rescan();
  }
  /// Moves the live cells (of every sequence) down over the free ones, keeping their order, so
  /// that tiles are dense again (llama.cpp's old defragmentation). Costs the cells moved.
  EvictStats compact() {
    std::vector<TokenRange> holes;
    for (index_t c = 0; c < cells_; ++c)
      if (pos_[c] < 0) {
        if (!holes.empty() && holes.back().end == c) ++holes.back().end;
        else holes.push_back({c, c + 1});
      }
    EvictStats st;
    const index_t end = last_occupied() + 1;  // live cells of any sequence lie below
    while (!holes.empty() && holes.back().begin >= end) holes.pop_back();
    if (!holes.empty() && holes.back().end > end) holes.back().end = end;
    for (index_t l = 0; l < s_.layers; ++l)
      for (bool v : {false, true}) {
        const auto view = b_.view(v, l, s_, end);
        detail::for_each_moved_run(holes, end, [&](index_t src, index_t dst, index_t n) {
          st.bytes_moved += detail::move_tokens(view, src, dst, n);
        });
      }
    const index_t kept = detail::for_each_moved_run(holes, end, [&](index_t src, index_t dst, index_t n) {
      std::memmove(pos_ + dst, pos_ + src, std::size_t(n) * sizeof(std::int64_t));
      std::memmove(idx_ + dst, idx_ + src, std::size_t(n) * sizeof(index_t));
      if (seq_) std::memmove(seq_ + dst, seq_ + src, std::size_t(n) * sizeof(std::int32_t));
    });
    std::fill(pos_ + kept, pos_ + end, std::int64_t(-1));
    rescan();
    return st;
  }

 private:
  index_t last_occupied() const noexcept {
    index_t c = cells_ - 1;
    while (c >= 0 && pos_[c] < 0) --c;
    return c;
  }
  // Recounts the live cells, the free cells, the first free cell, the attention range and the
  // last token index.
  void rescan() noexcept {
    size_ = 0, free_ = 0, used_ = 0, last_index_ = -1, first_free_ = cells_;
    for (index_t c = 0; c < cells_; ++c) {
      if (pos_[c] < 0) ++free_, first_free_ = std::min(first_free_, c);
      if (live(c)) ++size_, used_ = c + 1, last_index_ = std::max(last_index_, idx_[c]);
    }
  }

  KvShape s_;
  KvBuffers<T> b_;
  index_t cells_ = 0, size_ = 0, free_ = 0, used_ = 0, last_index_ = -1;
  index_t first_free_ = 0;  // no free cell below (as far as this handle's own operations tell)
  std::int64_t* pos_ = nullptr;
  index_t* idx_ = nullptr;
  std::int32_t* seq_ = nullptr;
  std::int32_t seq_id_ = 0;
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
    CTXCOMP_CHECK(buf.keys != nullptr && buf.values != nullptr, fn, ": null key or value pool");
    CTXCOMP_CHECK(buf.page_size > 0 && buf.pool_pages > 0, fn, ": page_size (", buf.page_size, ") and pool_pages (",
                  buf.pool_pages, ") must be positive");
    detail::check_row_strides(shape.head_dim,
                              {{buf.layer_stride, shape.layers}, {buf.page_stride, buf.pool_pages},
                               {buf.head_stride, shape.kv_heads}, {buf.token_stride, buf.page_size}},
                              fn, "page pool");
    if constexpr (is_quantized_v<T>)
      CTXCOMP_CHECK(buf.key_scales != nullptr && buf.value_scales != nullptr, fn, ": int8 pools without scales");
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
    PagedHeadsView<T> v{(value_side ? b_.values : b_.keys) + l * b_.layer_stride,
                        pages_,
                        s_.kv_heads,
                        size_,
                        s_.head_dim,
                        b_.page_size,
                        b_.pool_pages,
                        b_.page_stride,
                        b_.head_stride,
                        b_.token_stride};
    if constexpr (is_quantized_v<T>) {
      v.scales = (value_side ? b_.value_scales : b_.key_scales) + l * b_.scale_layer_stride;
      v.scale_page_stride = b_.scale_page_stride;
      v.scale_head_stride = b_.scale_head_stride;
      v.scale_token_stride = b_.scale_token_stride;
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

namespace kv {

/// The live slots of a cache in logical order (by token index): how to read any layout as a
/// compacted cache (outputs, tests). Allocates; not for hot loops.
template <class Kv>
std::vector<index_t> logical_order(const Kv& cache) {
  std::vector<index_t> s;
  s.reserve(std::size_t(cache.size()));
  for (index_t c = 0; c < cache.slots(); ++c)
    if (cache.live(c)) s.push_back(c);
  const index_t* idx = cache.token_index();
  std::sort(s.begin(), s.end(), [idx](index_t a, index_t b) { return idx[a] < idx[b]; });
  return s;
}

/// Drops every cached token whose logical index is `token_index` or later (undoing decoded
/// tokens in any layout: a compacted cache truncates, a cell cache frees their cells).
template <class Kv>
EvictStats truncate_logical(Kv& cache, index_t token_index) {
  const index_t* idx = cache.token_index();
  if constexpr (!Kv::has_holes) {
    return cache.truncate(index_t(std::lower_bound(idx, idx + cache.size(), token_index) - idx));
  } else {
    RangeCollector drop;
    for (index_t c = 0; c < cache.slots(); ++c)
      if (cache.live(c) && idx[c] >= token_index) drop.add(c);
    return cache.evict(drop.ranges());
  }
}

}  // namespace kv

}  // namespace ctxcomp
