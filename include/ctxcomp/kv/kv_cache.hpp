// KvCache: per-layer keys and values [kv_heads x capacity x head_dim] in float, bf16, fp16 or
// qint8 (symmetric int8 with one fp32 scale per token per kv head, kept beside the data and moved
// with it), with each cached token's position id and logical token index (its place in the stream).
// Appending reserves slots in every layer; eviction removes token ranges and compacts in place
// by block moves of the kept runs (no reallocation), keeping positions. Semantics: llama.cpp's
// KV-cache operations; the sentinel and SAC rules decide what to evict or keep. K and V live in
// HugePageAllocator memory (core/memory.hpp): 2 MB pages where the OS offers them.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/memory.hpp"
#include "../core/views.hpp"
#include "layout.hpp"
#include "rows.hpp"

namespace ctxcomp {

/// An owning per-layer K/V cache (see the top of this file).
template <class T>
class KvCache {
  static_assert(is_kv_type_v<T>, "KvCache: the storage type must be float, bf16, fp16 or qint8");

 public:
  KvCache() = default;
  /// A cache of `capacity` slots per layer.
  KvCache(index_t layers, index_t kv_heads, index_t head_dim, index_t capacity)
      : layers_(layers), kv_heads_(kv_heads), head_dim_(head_dim), capacity_(capacity) {
    CTXCOMP_CHECK(layers > 0 && kv_heads > 0 && head_dim > 0 && capacity > 0, "KvCache: layers (", layers,
                  "), kv_heads (", kv_heads, "), head_dim (", head_dim, ") and capacity (", capacity,
                  ") must be positive");
    const std::size_t per_layer = std::size_t(kv_heads * capacity * head_dim);
    keys_.assign(std::size_t(layers) * per_layer, T{});
    values_.assign(std::size_t(layers) * per_layer, T{});
    if constexpr (is_quantized_v<T>) {
      key_scales_.assign(std::size_t(layers * kv_heads * capacity), 0.f);
      value_scales_.assign(std::size_t(layers * kv_heads * capacity), 0.f);
    }
    positions_.resize(std::size_t(capacity));
    token_index_.resize(std::size_t(capacity));
  }

  /// Shape: layers, kv heads, head size, slots per layer, and the slots in use.
  ///@{
  index_t layers() const noexcept { return layers_; }
  index_t kv_heads() const noexcept { return kv_heads_; }
  index_t head_dim() const noexcept { return head_dim_; }
  index_t capacity() const noexcept { return capacity_; }
  index_t size() const noexcept { return size_; }
  ///@}
  /// Bytes of K and V held for the cached tokens (all layers), scales included.
  std::size_t bytes_used() const noexcept {
    const std::size_t rows = std::size_t(2 * layers_ * kv_heads_ * size_);
    return rows * std::size_t(head_dim_) * sizeof(T) + (is_quantized_v<T> ? rows * sizeof(float) : 0);
  }

  /// Keys or values of one layer, tokens [0, size()) (qint8: with their scales).
  ///@{
  HeadsView<T> keys(index_t layer) noexcept { return buffers().view(false, layer, shape(), size_); }
  HeadsView<T> values(index_t layer) noexcept { return buffers().view(true, layer, shape(), size_); }
  HeadsView<const T> keys(index_t layer) const noexcept { return buffers().view(false, layer, shape(), size_); }
  HeadsView<const T> values(index_t layer) const noexcept { return buffers().view(true, layer, shape(), size_); }
  ///@}
  /// Position id and logical token index of each cached token.
  ///@{
  const std::int64_t* positions() const noexcept { return positions_.data(); }
  const index_t* token_index() const noexcept { return token_index_.data(); }
  ///@}

  /// Reserves `count` slots at the end in every layer for tokens with these positions and
  /// logical indices (the caller then writes their K/V, layer by layer, into
  /// keys(l).slice_tokens(begin, count), e.g. with `store_row`, which quantises for qint8).
  /// Returns the first new slot (slots_out, when given, receives all of them). On error nothing
  /// changes.
  index_t append(index_t count, const std::int64_t* positions, const index_t* token_index, index_t* slots_out = nullptr) {
    if (count == 0 && capacity_ == 0) return 0;
    auto kv = layout();
    const index_t first = kv.append(count, positions, token_index, slots_out);
    size_ = kv.size();
    return first;
  }
  /// Undoes an append of these slots.
  void unappend(const index_t* slots, index_t count) noexcept {
    if (count > 0) size_ = std::min(size_, slots[0]);
  }

  /// Removes the slots of `ranges` (sorted, disjoint, within [0, size())) from every layer and
  /// compacts the rest in place, keeping order, positions and token indices. On error the
  /// cache is unchanged.
  EvictStats evict(TokenRanges ranges) {
    if (capacity_ == 0 && ranges.empty()) return {};
    return update(layout().evict(ranges));
  }
  /// Keeps only the slots listed in `keep` (strictly increasing), compacting in place.
  EvictStats gather(const std::vector<index_t>& keep) { return update(layout().gather(keep)); }
  /// Drops the tokens from slot `n` on (e.g. to undo an append, or rejected speculative tokens).
  EvictStats truncate(index_t n) {
    if (capacity_ == 0 && n == 0) return {};
    return update(layout().truncate(n));
  }
  /// Forgets every token (capacity is kept).
  void clear() noexcept { size_ = 0; }

  /// Slots attention runs over (= size(): a KvCache has no holes), whether slot s is live, room
  /// for appends and the last token index (-1: empty), as every KV layout (kv/layout.hpp).
  ///@{
  static constexpr bool has_holes = false;
  index_t slots() const noexcept { return size_; }
  bool live(index_t s) const noexcept { return s >= 0 && s < size_; }
  index_t room() const noexcept { return capacity_ - size_; }
  index_t last_token_index() const noexcept { return size_ > 0 ? token_index_[std::size_t(size_ - 1)] : -1; }
  ///@}
  /// This cache as a ContiguousKv (the layout its operations are written in).
  /// A default-constructed KvCache has no layout (capacity 0): an error.
  ContiguousKv<T> layout() {
    CTXCOMP_CHECK(capacity_ > 0, "KvCache: the cache has no capacity (default-constructed)");
    return ContiguousKv<T>(shape(), buffers(), capacity_, positions_.data(), token_index_.data(), size_)
        .as_kv_cache();
  }

 private:
  EvictStats update(const EvictStats& st) noexcept {
    size_ -= st.tokens;
    return st;
  }
  KvShape shape() const noexcept { return {layers_, kv_heads_, head_dim_}; }
  // The owned buffers, head-major [layers x kv_heads x capacity x head_dim] (const callers get
  // read-only views of them).
  KvBuffers<T> buffers() const noexcept {
    auto* self = const_cast<KvCache*>(this);
    return KvBuffers<T>::head_major(self->keys_.data(), self->values_.data(), shape(), capacity_,
                                    self->key_scales_.data(), self->value_scales_.data());
  }

  index_t layers_ = 0, kv_heads_ = 0, head_dim_ = 0, capacity_ = 0, size_ = 0;
  std::vector<T, HugePageAllocator<T>> keys_, values_;  // 2 MB pages where the OS offers them
  std::vector<float> key_scales_, value_scales_;  // qint8: [layers x kv_heads x capacity]
  std::vector<std::int64_t> positions_;
  std::vector<index_t> token_index_;
};

}  // namespace ctxcomp
