// KvCache: per-layer keys and values [kv_heads x capacity x head_dim] in float, bf16, fp16 or
// qint8 (symmetric int8 with one fp32 scale per token per kv head, kept beside the data and moved
// with it), with each cached token's position id and logical token index (its place in the stream).
// Appending reserves slots in every layer; eviction removes token ranges and compacts in place
// by block moves of the kept runs (no reallocation), keeping positions. Semantics: llama.cpp's
// KV-cache operations; the sentinel and SAC rules decide what to evict or keep. K and V live in
// HugePageAllocator memory (core/memory.hpp): 2 MB pages where the OS offers them. KvCache owns
// the memory; every query and operation forwards to the ContiguousKv handle over it
// (kv/contiguous.hpp), so the two behave alike by construction.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/memory.hpp"
#include "../core/views.hpp"
#include "../core/rows.hpp"
#include "buffers.hpp"
#include "contiguous.hpp"

namespace ctxcomp {

/// An owning per-layer K/V cache (see the top of this file).
template <class T>
class KvCache {
  static_assert(is_kv_type_v<T>, "KvCache: the storage type must be float, bf16, fp16 or qint8");

 public:
  KvCache() = default;
  /// A cache of `capacity` slots per layer.
  KvCache(index_t layers, index_t kv_heads, index_t head_dim, index_t capacity) {
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
    bind({layers, kv_heads, head_dim}, capacity, 0);
  }
  /// Copies the cached tokens into new memory (the copy's handle is over its own buffers).
  KvCache(const KvCache& o)
      : keys_(o.keys_), values_(o.values_), key_scales_(o.key_scales_), value_scales_(o.value_scales_),
        positions_(o.positions_), token_index_(o.token_index_) {
    rebind(o);
  }
  /// Takes the other cache's memory; `o` is left empty (capacity 0).
  KvCache(KvCache&& o) noexcept
      : keys_(std::move(o.keys_)), values_(std::move(o.values_)), key_scales_(std::move(o.key_scales_)),
        value_scales_(std::move(o.value_scales_)), positions_(std::move(o.positions_)),
        token_index_(std::move(o.token_index_)) {
    rebind(o);
    o.kv_ = {};
  }
  /// Copy or move assignment, as the constructors.
  KvCache& operator=(KvCache o) noexcept {
    swap(o);
    return *this;
  }

  /// Shape: layers, kv heads, head size, slots per layer, and the slots in use.
  ///@{
  index_t layers() const noexcept { return kv_.layers(); }
  index_t kv_heads() const noexcept { return kv_.kv_heads(); }
  index_t head_dim() const noexcept { return kv_.head_dim(); }
  index_t capacity() const noexcept { return kv_.capacity(); }
  index_t size() const noexcept { return kv_.size(); }
  ///@}
  /// Bytes of K and V held for the cached tokens (all layers), scales included.
  std::size_t bytes_used() const noexcept {
    const std::size_t rows = std::size_t(2 * layers() * kv_heads() * size());
    return rows * std::size_t(head_dim()) * sizeof(T) + (is_quantized_v<T> ? rows * sizeof(float) : 0);
  }

  /// Keys or values of one layer, tokens [0, size()) (qint8: with their scales).
  ///@{
  HeadsView<T> keys(index_t layer) noexcept { return kv_.keys(layer); }
  HeadsView<T> values(index_t layer) noexcept { return kv_.values(layer); }
  HeadsView<const T> keys(index_t layer) const noexcept { return kv_.keys(layer); }
  HeadsView<const T> values(index_t layer) const noexcept { return kv_.values(layer); }
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
    if (count == 0 && capacity() == 0) return 0;
    return layout().append(count, positions, token_index, slots_out);
  }
  /// Undoes an append of these slots.
  void unappend(const index_t* slots, index_t count) noexcept { kv_.unappend(slots, count); }

  /// Removes the slots of `ranges` (sorted, disjoint, within [0, size())) from every layer and
  /// compacts the rest in place, keeping order, positions and token indices. On error the
  /// cache is unchanged.
  EvictStats evict(TokenRanges ranges) {
    if (capacity() == 0 && ranges.empty()) return {};
    return layout().evict(ranges);
  }
  /// Keeps only the slots listed in `keep` (strictly increasing), compacting in place.
  EvictStats gather(const std::vector<index_t>& keep) { return layout().gather(keep); }
  /// Drops the tokens from slot `n` on (e.g. to undo an append, or rejected speculative tokens).
  EvictStats truncate(index_t n) {
    if (capacity() == 0 && n == 0) return {};
    return layout().truncate(n);
  }
  /// Forgets every token (capacity is kept).
  void clear() noexcept { kv_.clear(); }

  /// Slots attention runs over (= size(): a KvCache has no holes), whether slot s is live, room
  /// for appends and the last token index (-1: empty), as every KV layout (kv/layout.hpp).
  ///@{
  static constexpr bool has_holes = false;
  index_t slots() const noexcept { return kv_.slots(); }
  bool live(index_t s) const noexcept { return kv_.live(s); }
  index_t room() const noexcept { return kv_.room(); }
  index_t last_token_index() const noexcept { return kv_.last_token_index(); }
  ///@}
  /// The ContiguousKv handle over this cache's memory, which every operation goes through (its
  /// errors name KvCache). A default-constructed KvCache has no layout (capacity 0): an error.
  ContiguousKv<T>& layout() {
    CTXCOMP_CHECK(capacity() > 0, "KvCache: the cache has no capacity (default-constructed)");
    return kv_;
  }

  /// Exchanges two caches (memory and handles).
  void swap(KvCache& o) noexcept {
    keys_.swap(o.keys_), values_.swap(o.values_), key_scales_.swap(o.key_scales_);
    value_scales_.swap(o.value_scales_), positions_.swap(o.positions_), token_index_.swap(o.token_index_);
    std::swap(kv_, o.kv_);  // the handles point at the buffers, which moved with them
  }

 private:
  // The handle over the owned buffers, head-major [layers x kv_heads x capacity x head_dim].
  void bind(KvShape s, index_t capacity, index_t size) {
    kv_ = ContiguousKv<T>(s, KvBuffers<T>::head_major(keys_.data(), values_.data(), s, capacity, key_scales_.data(),
                                                       value_scales_.data()),
                          capacity, positions_.data(), token_index_.data(), size);
    kv_.as_kv_cache();
  }
  // After a copy or move from `o`: the same shape and size over this cache's buffers.
  void rebind(const KvCache& o) {
    if (o.capacity() > 0) bind({o.layers(), o.kv_heads(), o.head_dim()}, o.capacity(), o.size());
  }

  std::vector<T, HugePageAllocator<T>> keys_, values_;  // 2 MB pages where the OS offers them
  std::vector<float> key_scales_, value_scales_;  // qint8: [layers x kv_heads x capacity]
  std::vector<std::int64_t> positions_;
  std::vector<index_t> token_index_;
  ContiguousKv<T> kv_;  // every query and operation goes through it
};

}  // namespace ctxcomp
