// ContiguousKv: a contiguous, compacted K/V cache over caller memory (slots [0, size()) are the
// cached tokens in order; eviction moves the kept runs left). KvCache owns its memory and works
// through this handle.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../core/error.hpp"
#include "../core/views.hpp"
#include "buffers.hpp"
#include "compact.hpp"

namespace ctxcomp {

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

}  // namespace ctxcomp
