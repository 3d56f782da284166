// A llama.cpp-style cell cache, as the engine owns it: per layer one K and one V buffer of
// [kv_size x kv_heads*head_dim] cells (viewed with HeadsView::token_major), and per cell its
// position (negative: free) and sequence id. Removing tokens only marks their cells free; new
// tokens go into free cells wherever they are; attention hides free cells and other sequences
// through `CellCausal`, which answers per 64-key tile so that tiles without a live cell of the
// sequence cost nothing. Nothing here owns memory: the metadata arrays are the engine's.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>

#include "../attention/masks.hpp"
#include "../core/error.hpp"
#include "../core/types.hpp"

namespace ctxcomp {

/// Per-cell metadata of a cell cache (the engine's arrays).
struct CellMeta {
  std::int64_t* pos = nullptr;        ///< [cells] position of the cell's token; negative: free
  const std::int32_t* seq = nullptr;  ///< [cells] sequence of the cell's token, or null (one sequence)
  index_t cells = 0;                  ///< number of cells (kv_size)

  /// Whether cell c holds a token of sequence `s` (live, and of that sequence when there are several).
  bool live(index_t c, std::int32_t s) const noexcept { return pos[c] >= 0 && (!seq || seq[c] == s); }
};

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

/// llama.cpp's KQ mask over a cell cache: query row i, of sequence `seq` at position q_pos[i],
/// sees cell c iff the cell is live, holds a token of `seq` (or the cache has one sequence), and
/// pos[c] <= q_pos[i]. Per tile: None when no cell of the tile is live for `seq` or all of them
/// come after the rows' positions; All when every cell is live for `seq` and at or before the
/// rows' earliest position; otherwise Mixed (free cells are masked inside the tile).
struct CellCausal {
  /// Hidden keys may be free cells the host never wrote: attention leaves them out of P V.
  static constexpr bool hides_unwritten = true;
  CellMeta meta;                          ///< the cache's cells
  const std::int64_t* q_pos = nullptr;    ///< [q_len] positions of the query rows
  index_t q_len = 0;                      ///< query rows described by q_pos
  std::int32_t seq = 0;                   ///< the queries' sequence

  /// Whether cell c holds a token of this sequence.
  bool live(index_t c) const noexcept { return meta.live(c, seq); }
  /// The mask concept (attention/masks.hpp): tile and element visibility, and the call check.
  ///@{
  TileVisibility tile(index_t q0, index_t q1, index_t k0, index_t k1) const noexcept {
    std::int64_t qmin = std::numeric_limits<std::int64_t>::max(), qmax = std::numeric_limits<std::int64_t>::min();
    for (index_t q = q0; q < q1; ++q) qmin = std::min(qmin, q_pos[q]), qmax = std::max(qmax, q_pos[q]);
    index_t n = 0;
    std::int64_t pmin = std::numeric_limits<std::int64_t>::max(), pmax = std::numeric_limits<std::int64_t>::min();
    for (index_t c = k0; c < k1; ++c)
      if (live(c)) ++n, pmin = std::min(pmin, meta.pos[c]), pmax = std::max(pmax, meta.pos[c]);
    if (n == 0 || pmin > qmax) return TileVisibility::None;
    if (n == k1 - k0 && pmax <= qmin) return TileVisibility::All;
    return TileVisibility::Mixed;
  }
  bool visible(index_t q, index_t k) const noexcept { return live(k) && meta.pos[k] <= q_pos[q]; }
  void check(index_t rows, index_t kv_len, const char* fn) const {
    CTXCOMP_CHECK(meta.pos != nullptr && q_pos != nullptr, fn, ": CellCausal needs the cells' and the queries' positions");
    CTXCOMP_CHECK(kv_len <= meta.cells, fn, ": the cell metadata covers ", meta.cells, " cells but the cache has ",
                  kv_len);
    CTXCOMP_CHECK(rows <= q_len, fn, ": ", rows, " query rows but positions for ", q_len);
  }
  ///@}
};

/// The sentinel-token mask over a cell cache: as SentinelSpans, with key k the cell k (its
/// stream index token_index[k], in any order), free cells and other sequences hidden. Per tile:
/// None when no cell is live or every live cell comes after the rows; All when every cell is
/// live, public and at or before the first row, and the rows are ordinary; otherwise Mixed.
struct CellSentinel {
  /// Hidden keys may be free cells the host never wrote: attention leaves them out of P V.
  static constexpr bool hides_unwritten = true;
  const TokenRole* roles = nullptr;      ///< role of every stream token so far
  index_t role_count = 0;                ///< number of roles
  index_t q_offset = 0;                  ///< stream index of the first query
  CellMeta meta;                         ///< the cells (positions: negative = free; sequences)
  const index_t* token_index = nullptr;  ///< [cells] stream index of each cell's token
  std::int32_t seq = 0;                  ///< the queries' sequence

  /// Whether cell c holds a token of this sequence.
  bool live(index_t c) const noexcept { return meta.live(c, seq); }
  /// The mask concept (attention/masks.hpp).
  ///@{
  bool visible(index_t q, index_t k) const noexcept {
    if (!live(k)) return false;
    const index_t tq = q + q_offset, tk = token_index[k];
    return sentinel_visible(roles[tq], roles[tk], tq, tk);
  }
  TileVisibility tile(index_t q0, index_t q1, index_t k0, index_t k1) const noexcept {
    const index_t t0 = q0 + q_offset, t1 = q1 - 1 + q_offset;
    index_t n = 0, kmin = std::numeric_limits<index_t>::max(), kmax = -1;
    bool hidden_role = false;
    for (index_t c = k0; c < k1; ++c)
      if (live(c)) {
        ++n, kmin = std::min(kmin, token_index[c]), kmax = std::max(kmax, token_index[c]);
        const SpanRole r = roles[token_index[c]].role;
        hidden_role |= r != SpanRole::Ordinary && r != SpanRole::Close;
      }
    if (n == 0 || kmin > t1) return TileVisibility::None;
    if (n < k1 - k0 || kmax > t0 || hidden_role) return TileVisibility::Mixed;
    for (index_t t = t0; t <= t1; ++t)
      if (roles[t].role != SpanRole::Ordinary) return TileVisibility::Mixed;
    return TileVisibility::All;
  }
  void check(index_t q_len, index_t kv_len, const char* fn) const {
    CTXCOMP_CHECK(meta.pos != nullptr && token_index != nullptr && (roles != nullptr || role_count == 0), fn,
                  ": CellSentinel needs the roles and the cells' positions and token indices");
    CTXCOMP_CHECK(q_offset >= 0 && q_offset + q_len <= role_count, fn, ": CellSentinel covers ", role_count,
                  " tokens but queries reach token ", q_offset + q_len - 1);
    CTXCOMP_CHECK(kv_len <= meta.cells, fn, ": the cell metadata covers ", meta.cells, " cells but the cache has ",
                  kv_len);
    for (index_t c = 0; c < kv_len; ++c)
      if (live(c))
        CTXCOMP_CHECK(token_index[c] >= 0 && token_index[c] < role_count, fn, ": cell ", c, " holds stream token ",
                      token_index[c], ", outside the ", role_count, " tokens of the roles");
  }
  ///@}
};

/// Causal order by logical token index over a cell cache: query row i (token index q_index[i])
/// sees the live cells of its sequence whose token index is at or before its own. What
/// Causal(m) is for a compacted cache, for cells filled in any order.
struct CellOrder {
  /// Hidden keys may be free cells the host never wrote: attention leaves them out of P V.
  static constexpr bool hides_unwritten = true;
  CellMeta meta;                         ///< the cells
  const index_t* token_index = nullptr;  ///< [cells] logical index of each cell's token
  const index_t* q_index = nullptr;      ///< [q_len] logical indices of the query rows
  index_t q_len = 0;                     ///< query rows described by q_index
  std::int32_t seq = 0;                  ///< the queries' sequence

  /// Whether cell c holds a token of this sequence.
  bool live(index_t c) const noexcept { return meta.live(c, seq); }
  /// The mask concept (attention/masks.hpp).
  ///@{
  bool visible(index_t q, index_t k) const noexcept { return live(k) && token_index[k] <= q_index[q]; }
  TileVisibility tile(index_t q0, index_t q1, index_t k0, index_t k1) const noexcept {
    index_t qmin = std::numeric_limits<index_t>::max(), qmax = -1;
    for (index_t q = q0; q < q1; ++q) qmin = std::min(qmin, q_index[q]), qmax = std::max(qmax, q_index[q]);
    index_t n = 0, kmin = std::numeric_limits<index_t>::max(), kmax = -1;
    for (index_t c = k0; c < k1; ++c)
      if (live(c)) ++n, kmin = std::min(kmin, token_index[c]), kmax = std::max(kmax, token_index[c]);
    if (n == 0 || kmin > qmax) return TileVisibility::None;
    if (n == k1 - k0 && kmax <= qmin) return TileVisibility::All;
    return TileVisibility::Mixed;
  }
  void check(index_t rows, index_t kv_len, const char* fn) const {
    CTXCOMP_CHECK(meta.pos != nullptr && token_index != nullptr && q_index != nullptr, fn,
                  ": CellOrder needs the cells' positions and token indices and the queries' indices");
    CTXCOMP_CHECK(kv_len <= meta.cells, fn, ": the cell metadata covers ", meta.cells, " cells but the cache has ",
                  kv_len);
    CTXCOMP_CHECK(rows <= q_len, fn, ": ", rows, " query rows but indices for ", q_len);
  }
  ///@}
};

}  // namespace ctxcomp
