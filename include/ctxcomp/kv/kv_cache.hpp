// KvCache: per-layer keys and values [kv_heads x capacity x head_dim] in float, bf16, fp16 or
// qint8 (symmetric int8 with one fp32 scale per token per kv head, kept beside the data and moved
// with it), with each cached token's position id and logical token index (its place in the stream).
// Appending reserves slots in every layer; eviction removes token ranges and compacts in place
// by block moves of the kept runs (no reallocation), keeping positions. Semantics: llama.cpp's
// KV-cache operations; the sentinel and SAC rules decide what to evict or keep.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/views.hpp"
#include "rows.hpp"

namespace ctxcomp {

/// A half-open range of cache slots [begin, end).
struct TokenRange {
  index_t begin = 0;  ///< first slot
  index_t end = 0;    ///< one past the last slot
};

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
  HeadsView<T> keys(index_t layer) noexcept { return view(keys_.data(), key_scales_.data(), layer, size_); }
  HeadsView<T> values(index_t layer) noexcept { return view(values_.data(), value_scales_.data(), layer, size_); }
  HeadsView<const T> keys(index_t layer) const noexcept { return view(keys_.data(), key_scales_.data(), layer, size_); }
  HeadsView<const T> values(index_t layer) const noexcept {
    return view(values_.data(), value_scales_.data(), layer, size_);
  }
  ///@}
  /// Position id and logical token index of each cached token.
  ///@{
  const std::int64_t* positions() const noexcept { return positions_.data(); }
  const index_t* token_index() const noexcept { return token_index_.data(); }
  ///@}

  /// Reserves `count` slots at the end in every layer for tokens with these positions and
  /// logical indices (the caller then writes their K/V, layer by layer, into
  /// keys(l).slice_tokens(begin, count), e.g. with `store_row`, which quantises for qint8).
  /// Returns the first new slot. On error nothing changes.
  index_t append(index_t count, const std::int64_t* positions, const index_t* token_index) {
    CTXCOMP_CHECK(count >= 0, "KvCache::append: negative count (", count, ")");
    CTXCOMP_CHECK(count == 0 || (positions != nullptr && token_index != nullptr),
                  "KvCache::append: positions and token_index must point to ", count, " values (one is null)");
    CTXCOMP_CHECK(size_ + count <= capacity_, "KvCache::append: ", count, " tokens do not fit (", size_, " of ",
                  capacity_, " slots used)");
    for (index_t i = 0; i < count; ++i) {
      const index_t prev = size_ + i > 0 ? (i > 0 ? token_index[i - 1] : token_index_[std::size_t(size_ - 1)]) : -1;
      CTXCOMP_CHECK(token_index[i] > prev, "KvCache::append: token indices must increase (", prev, " then ",
                    token_index[i], ")");
    }
    std::copy(positions, positions + count, positions_.begin() + size_);
    std::copy(token_index, token_index + count, token_index_.begin() + size_);
    const index_t first = size_;
    size_ += count;
    return first;
  }

  /// Removes the slots of `ranges` (sorted, disjoint, within [0, size())) from every layer and
  /// compacts the rest in place, keeping order, positions and token indices. On error the
  /// cache is unchanged.
  void evict(const std::vector<TokenRange>& ranges) {
    index_t last = 0;
    for (const auto& r : ranges) {
      CTXCOMP_CHECK(r.begin >= last && r.begin <= r.end && r.end <= size_, "KvCache::evict: range [", r.begin, ", ",
                    r.end, ") is out of [0, ", size_, ") or overlaps / precedes the previous range");
      last = r.end;
    }
    // Kept runs: [prev_end, r.begin) for each range, then the tail.
    auto for_each_kept_run = [&](auto&& move) {
      index_t dst = 0, src = 0;
      for (const auto& r : ranges) {
        if (r.begin > src) move(src, dst, r.begin - src);
        dst += r.begin - src;
        src = r.end;
      }
      if (size_ > src) move(src, dst, size_ - src);
      return dst + (size_ - src);
    };
    for (index_t l = 0; l < layers_; ++l)
      for (index_t h = 0; h < kv_heads_; ++h) {
        for (auto* buf : {&keys_, &values_}) {
          T* base = buf->data() + (l * kv_heads_ + h) * capacity_ * head_dim_;
          for_each_kept_run([&](index_t src, index_t dst, index_t n) {
            if (src != dst) std::memmove(base + dst * head_dim_, base + src * head_dim_, std::size_t(n * head_dim_) * sizeof(T));
          });
        }
        if constexpr (is_quantized_v<T>)
          for (auto* sc : {&key_scales_, &value_scales_}) {
            float* base = sc->data() + (l * kv_heads_ + h) * capacity_;
            for_each_kept_run([&](index_t src, index_t dst, index_t n) {
              if (src != dst) std::memmove(base + dst, base + src, std::size_t(n) * sizeof(float));
            });
          }
      }
    size_ = for_each_kept_run([&](index_t src, index_t dst, index_t n) {
      std::memmove(positions_.data() + dst, positions_.data() + src, std::size_t(n) * sizeof(std::int64_t));
      std::memmove(token_index_.data() + dst, token_index_.data() + src, std::size_t(n) * sizeof(index_t));
    });
  }

  /// Keeps only the slots listed in `keep` (strictly increasing), compacting in place.
  void gather(const std::vector<index_t>& keep) {
    std::vector<TokenRange> drop;
    index_t next = 0;
    for (std::size_t i = 0; i < keep.size(); ++i) {
      CTXCOMP_CHECK(keep[i] >= next && keep[i] < size_, "KvCache::gather: slot ", keep[i],
                    " is out of range or not increasing");
      if (keep[i] > next) drop.push_back({next, keep[i]});
      next = keep[i] + 1;
    }
    if (next < size_) drop.push_back({next, size_});
    evict(drop);
  }

  /// Drops the tokens from slot `n` on (e.g. to undo an append, or rejected speculative tokens).
  void truncate(index_t n) {
    CTXCOMP_CHECK(n >= 0 && n <= size_, "KvCache::truncate: ", n, " is outside [0, ", size_, "]");
    size_ = n;
  }

  /// Forgets every token (capacity is kept).
  void clear() noexcept { size_ = 0; }

 private:
  // Layer `layer` of a [layers x kv_heads x capacity x head_dim] buffer, its first `tokens` slots.
  template <class E, class S>
  HeadsView<E> view(E* data, S* scales, index_t layer, index_t tokens) const noexcept {
    HeadsView<E> v{data + layer * kv_heads_ * capacity_ * head_dim_, kv_heads_, tokens, head_dim_,
                   capacity_ * head_dim_, head_dim_};
    if constexpr (is_quantized_v<T>) {
      v.scales = scales + layer * kv_heads_ * capacity_;
      v.scale_head_stride = capacity_;
      v.scale_token_stride = 1;
    }
    return v;
  }

  index_t layers_ = 0, kv_heads_ = 0, head_dim_ = 0, capacity_ = 0, size_ = 0;
  std::vector<T> keys_, values_;
  std::vector<float> key_scales_, value_scales_;  // qint8: [layers x kv_heads x capacity]
  std::vector<std::int64_t> positions_;
  std::vector<index_t> token_index_;
};

}  // namespace ctxcomp
