// A llama.cpp-style cell cache, as the engine owns it: per layer one K and one V buffer of
// [kv_size x kv_heads*head_dim] cells (viewed with KvBuffers::token_major), and per cell its
// position (negative: free), logical token index and sequence id (CellMeta, core/kv_views.hpp).
// Removing tokens only marks their cells free; new tokens go into free cells wherever they are;
// attention hides free cells and other sequences through the cell masks (CellCausal,
// CellSentinel, CellOrder in attention/masks.hpp), which answer per 64-key tile so that tiles
// without a live cell of the sequence cost nothing. Nothing here owns memory: the metadata
// arrays are the engine's.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../core/error.hpp"
#include "../core/kv_views.hpp"
#include "../core/types.hpp"
#include "../core/views.hpp"
#include "buffers.hpp"
#include "compact.hpp"

namespace ctxcomp {

namespace cells {

/// Marks cells [begin, end) free (llama_memory_seq_rm on a range of cells). No K/V moves.
inline void free_range(const CellMeta& m, index_t begin, index_t end) {
  CTXCOMP_CHECK(m.pos != nullptr, "cells::free_range: no position array");
  CTXCOMP_CHECK(begin >= 0 && begin <= end && end <= m.cells, "cells::free_range: [", begin, ", ", end,
                ") is outside the ", m.cells, " cells");
  std::fill(m.pos + begin, m.pos + end, std::int64_t(-1));
}

/// The first `count` free cells from cell `from` on, in order, into `slots` (appends fill free
/// cells first). Returns false, writing nothing, when fewer than `count` of them are free. Costs
/// the cells scanned up to the last one taken, so a caller that knows every cell below `from` is
/// occupied (CellKv) pays for the cells it takes, not for the cache.
inline bool find_free(const CellMeta& m, index_t count, index_t* slots, index_t from = 0) {
  CTXCOMP_CHECK(m.pos != nullptr && (count == 0 || slots != nullptr), "cells::find_free: null array");
  CTXCOMP_CHECK(from >= 0 && from <= m.cells, "cells::find_free: start cell ", from, " is outside [0, ", m.cells, "]");
  index_t found = 0;
  for (index_t c = from; c < m.cells && found < count; ++c) found += m.pos[c] < 0;
  if (found < count) return false;
  for (index_t c = from, k = 0; k < count; ++c)
    if (m.pos[c] < 0) slots[k++] = c;
  return true;
}

}  // namespace cells

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

}  // namespace ctxcomp
