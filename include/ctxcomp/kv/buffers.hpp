// Slot ranges and buffer descriptors shared by every KV layout: the ranges an eviction removes
// (TokenRange, TokenRanges, RangeCollector) and what it did (EvictStats), a cache's shape
// (KvShape), per-layer K/V buffers addressed by strides (KvBuffers), page pools (PagedBuffers)
// and the engine's free-page stack (PagePool), with the checks the layouts share. Nothing here
// owns memory.
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
#include "../core/kv_views.hpp"
#include "../core/views.hpp"

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
///
/// Engines that allocate each layer on its own (llama.cpp, vLLM) give a pointer per layer
/// instead: with `layer_keys` / `layer_values` set, layer l starts at layer_keys[l] /
/// layer_values[l] (scales: layer_key_scales[l] / layer_value_scales[l]), and `keys`, `values`,
/// `layer_stride` (and the scales' base and layer stride) are not used. The values may also have
/// strides of their own (`value_head_stride`, `value_token_stride`; 0: the keys'), e.g. V stored
/// token-major beside head-major K. Rows must not overlap within a layer (checked); distinct
/// layers, and K against V, are the caller's to keep apart.
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
  /// Per-layer buffers: arrays of `layers` pointers (the caller's, outliving the handle), or null.
  ///@{
  T* const* layer_keys = nullptr;
  T* const* layer_values = nullptr;
  float* const* layer_key_scales = nullptr;
  float* const* layer_value_scales = nullptr;
  ///@}
  /// The values' own strides in elements (scales: in floats); 0 takes the keys'.
  ///@{
  index_t value_head_stride = 0, value_token_stride = 0;
  index_t value_scale_head_stride = 0, value_scale_token_stride = 0;
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
  /// Whether the layers are given one pointer each.
  bool per_layer() const noexcept { return layer_keys != nullptr || layer_values != nullptr; }
  /// Row (l, 0, 0) of the keys (or values).
  T* base(bool value_side, index_t l) const noexcept {
    if (per_layer()) return (value_side ? layer_values : layer_keys)[l];
    return (value_side ? values : keys) + l * layer_stride;
  }
  /// Strides between heads and slots of the keys (or values).
  ///@{
  index_t head_stride_of(bool value_side) const noexcept {
    return value_side && value_head_stride != 0 ? value_head_stride : head_stride;
  }
  index_t token_stride_of(bool value_side) const noexcept {
    return value_side && value_token_stride != 0 ? value_token_stride : token_stride;
  }
  ///@}
  /// Layer l's keys (or values), slots [0, tokens).
  HeadsView<T> view(bool value_side, index_t l, KvShape s, index_t tokens) const noexcept {
    HeadsView<T> v{base(value_side, l), s.kv_heads, tokens, s.head_dim, head_stride_of(value_side),
                   token_stride_of(value_side)};
    if constexpr (is_quantized_v<T>) {
      v.scales = per_layer() ? (value_side ? layer_value_scales : layer_key_scales)[l]
                             : (value_side ? value_scales : key_scales) + l * scale_layer_stride;
      v.scale_head_stride = value_side && value_scale_head_stride != 0 ? value_scale_head_stride : scale_head_stride;
      v.scale_token_stride =
          value_side && value_scale_token_stride != 0 ? value_scale_token_stride : scale_token_stride;
    }
    return v;
  }
};

/// Pools of K and V pages for every layer: page p of layer l at keys + l * layer_stride + p *
/// page_stride, laid out inside by head_stride / token_stride (NHD or HND, see PagedHeadsView).
/// As in KvBuffers, `layer_keys` / `layer_values` (and the scales') give each layer's pool its own
/// pointer, and `value_page_stride` / `value_head_stride` / `value_token_stride` (0: the keys')
/// give the value pool its own layout.
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
  /// Per-layer pools: arrays of `layers` pointers (the caller's, outliving the handle), or null.
  ///@{
  T* const* layer_keys = nullptr;
  T* const* layer_values = nullptr;
  float* const* layer_key_scales = nullptr;
  float* const* layer_value_scales = nullptr;
  ///@}
  /// The value pool's own strides in elements (scales: in floats); 0 takes the keys'.
  ///@{
  index_t value_page_stride = 0, value_head_stride = 0, value_token_stride = 0;
  index_t value_scale_page_stride = 0, value_scale_head_stride = 0, value_scale_token_stride = 0;
  ///@}

  /// Whether the layers' pools are given one pointer each.
  bool per_layer() const noexcept { return layer_keys != nullptr || layer_values != nullptr; }
  /// Page 0 of layer l's key (or value) pool.
  T* base(bool value_side, index_t l) const noexcept {
    if (per_layer()) return (value_side ? layer_values : layer_keys)[l];
    return (value_side ? values : keys) + l * layer_stride;
  }
  /// Layer l's key (or value) scales, page 0.
  float* scale_base(bool value_side, index_t l) const noexcept {
    if (per_layer()) return (value_side ? layer_value_scales : layer_key_scales)[l];
    return (value_side ? value_scales : key_scales) + l * scale_layer_stride;
  }
  /// `key` unless the value side has its own (non-zero) `value`.
  static index_t side(bool value_side, index_t key, index_t value) noexcept {
    return value_side && value != 0 ? value : key;
  }

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

/// Checks per-layer pointer arrays: both given (`arrays` names them), no layer null.
template <class P>
void check_layer_pointers(P* const* keys, P* const* values, index_t layers, const char* fn, const char* what,
                          const char* arrays) {
  CTXCOMP_CHECK(keys != nullptr && values != nullptr, fn, ": per-layer ", what, "s need both ", arrays);
  for (index_t l = 0; l < layers; ++l)
    CTXCOMP_CHECK(keys[l] != nullptr && values[l] != nullptr, fn, ": layer ", l, " has a null key or value ", what);
}

template <class T>
void check_buffers(const KvBuffers<T>& b, KvShape s, index_t capacity, const char* fn) {
  const bool per_layer = b.per_layer();
  if (per_layer) {
    check_layer_pointers(b.layer_keys, b.layer_values, s.layers, fn, "buffer", "layer_keys and layer_values");
  } else {
    CTXCOMP_CHECK(b.keys != nullptr && b.values != nullptr, fn, ": null key or value buffer");
  }
  const index_t layers = per_layer ? 1 : s.layers;  // per-layer: rows are checked within a layer
  for (bool v : {false, true})
    check_row_strides(s.head_dim, {{b.layer_stride, layers}, {b.head_stride_of(v), s.kv_heads},
                                   {b.token_stride_of(v), capacity}},
                      fn, v ? "V buffer" : "K buffer");
  if constexpr (is_quantized_v<T>) {
    if (per_layer) {
      check_layer_pointers(b.layer_key_scales, b.layer_value_scales, s.layers, fn, "scale array",
                           "layer_key_scales and layer_value_scales (int8 storage)");
    } else {
      CTXCOMP_CHECK(b.key_scales != nullptr && b.value_scales != nullptr, fn, ": int8 storage without its scales");
    }
    for (bool v : {false, true})
      check_row_strides(1, {{b.scale_layer_stride, layers},
                            {v && b.value_scale_head_stride ? b.value_scale_head_stride : b.scale_head_stride, s.kv_heads},
                            {v && b.value_scale_token_stride ? b.value_scale_token_stride : b.scale_token_stride,
                             capacity}},
                        fn, "scale");
  }
}

}  // namespace detail

}  // namespace ctxcomp
