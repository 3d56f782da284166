// Structured attention masks: each answers per tile ("all visible / none / mixed") and per
// element, so the fused kernel skips hidden tiles and no n x n array is ever built.
// Coordinates: query row q in [0, q_len), key column k in [0, kv_len) of one attention call.
// Semantics: Llama causal masking; IC-Former cross mask; SAC bidirectional masks; the sentinel
// rules as defined by shared/fixtures/sentinel (see SentinelSpans).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../core/error.hpp"
#include "../core/kv_views.hpp"
#include "../core/types.hpp"

namespace ctxcomp {

enum class TileVisibility : std::uint8_t { None, Mixed, All };

/// The mask concept, as the attention kernels use it:
///   TileVisibility tile(q0, q1, k0, k1) const  // rows [q0,q1) x columns [k0,k1), both non-empty;
///                                              // All / None only when true of every element
///   bool visible(q, k) const
///   void check(q_len, kv_len, fn) const        // throws ctxcomp::Error if the mask cannot
///                                              // describe a q_len x kv_len call
/// and optionally
///   static constexpr bool hides_unwritten      // true: hidden keys may be memory the host never
///                                              // wrote (cell caches); P V then keeps what
///                                              // they hold out of the outputs: a tile whose
///                                              // outputs turn non-finite is redone over the
///                                              // keys some row of the block sees

/// Every key visible to every query (cross-attention to a whole context).
struct Full {
  /// The mask concept (see the top of this file): tile and element visibility, and the call check.
  ///@{
  TileVisibility tile(index_t, index_t, index_t, index_t) const noexcept { return TileVisibility::All; }
  bool visible(index_t, index_t) const noexcept { return true; }
  void check(index_t, index_t, const char*) const {}
  ///@}
};

/// Every token of a chunk sees every token of the chunk: SAC's official `full` mask when the
/// call covers one chunk. The same answers as Full; the name says the intent.
struct FullBidirectional : Full {};

/// Query q sits at key position q + q_offset and sees keys k <= q + q_offset. q_offset is the
/// number of cached keys before the first query (0 for a plain prefill).
struct Causal {
  index_t q_offset = 0;  ///< cached keys before the first query
  Causal() = default;
  /// Queries start at key position `offset`.
  explicit Causal(index_t offset) : q_offset(offset) {}
  /// The mask concept (see the top of this file): tile and element visibility, and the call check.
  ///@{
  TileVisibility tile(index_t q0, index_t q1, index_t k0, index_t k1) const noexcept {
    if (k1 - 1 <= q0 + q_offset) return TileVisibility::All;
    if (k0 > q1 - 1 + q_offset) return TileVisibility::None;
    return TileVisibility::Mixed;
  }
  bool visible(index_t q, index_t k) const noexcept { return k <= q + q_offset; }
  void check(index_t, index_t, const char* fn) const {
    CTXCOMP_CHECK(q_offset >= 0, fn, ": Causal q_offset (", q_offset, ") is negative");
  }
  ///@}
};

/// IC-Former's cross mask: keys are [context (context_len) ; queries' own tokens]; every query
/// sees the whole context, and among the trailing tokens sees them causally (digest i sees
/// digests 0..i), as the official ICFormerModel builds it. Equal to Causal(context_len).
struct CrossWithCausalTail : Causal {
  /// Keys are `context_len` context rows followed by the queries' own rows.
  explicit CrossWithCausalTail(index_t context_len) : Causal(context_len) {}
  /// Context rows before the queries' own keys.
  index_t context_len() const noexcept { return q_offset; }
};

/// Block-diagonal: query q (at key position q + q_offset) sees keys of its own chunk of
/// `chunk` positions; with `causal`, only those at or before itself.
struct ChunkDiagonal {
  index_t chunk = 1;      ///< positions per chunk
  bool causal = false;    ///< causal inside a chunk
  index_t q_offset = 0;   ///< key position of the first query
  /// The mask concept (see the top of this file): tile and element visibility, and the call check.
  ///@{
  TileVisibility tile(index_t q0, index_t q1, index_t k0, index_t k1) const noexcept {
    const index_t p0 = q0 + q_offset, p1 = q1 - 1 + q_offset;
    const index_t cq0 = p0 / chunk, cq1 = p1 / chunk, ck0 = k0 / chunk, ck1 = (k1 - 1) / chunk;
    if (ck1 < cq0 || ck0 > cq1) return TileVisibility::None;
    if (causal && k0 > p1) return TileVisibility::None;
    if (cq0 == cq1 && ck0 == ck1 && cq0 == ck0 && (!causal || k1 - 1 <= p0)) return TileVisibility::All;
    return TileVisibility::Mixed;
  }
  bool visible(index_t q, index_t k) const noexcept {
    const index_t p = q + q_offset;
    return p / chunk == k / chunk && (!causal || k <= p);
  }
  void check(index_t, index_t, const char* fn) const {
    CTXCOMP_CHECK(chunk > 0, fn, ": ChunkDiagonal chunk (", chunk, ") must be positive");
    CTXCOMP_CHECK(q_offset >= 0, fn, ": ChunkDiagonal q_offset (", q_offset, ") is negative");
  }
  ///@}
};

/// SAC's anchor mask: anchor rows see every key of the call (the whole chunk), all other rows
/// are causal. `anchors` are sorted, distinct key positions (query q is at q + q_offset); the
/// array is the caller's and must outlive the mask.
struct AnchorBidirectional {
  const index_t* anchors = nullptr;  ///< sorted, distinct anchor key positions (the caller's array)
  index_t anchor_count = 0;          ///< number of anchors
  index_t q_offset = 0;              ///< key position of the first query

  /// Whether key position p is an anchor.
  bool is_anchor(index_t p) const noexcept { return std::binary_search(anchors, anchors + anchor_count, p); }
  /// The mask concept (see the top of this file): tile and element visibility, and the call check.
  ///@{
  TileVisibility tile(index_t q0, index_t q1, index_t k0, index_t k1) const noexcept {
    const index_t p0 = q0 + q_offset, p1 = q1 - 1 + q_offset;
    if (k1 - 1 <= p0) return TileVisibility::All;
    const index_t* lo = std::lower_bound(anchors, anchors + anchor_count, p0);
    const index_t* hi = std::upper_bound(lo, anchors + anchor_count, p1);
    if (hi - lo == p1 - p0 + 1) return TileVisibility::All;  // every row is an anchor
    if (hi == lo && k0 > p1) return TileVisibility::None;
    return TileVisibility::Mixed;
  }
  bool visible(index_t q, index_t k) const noexcept { return k <= q + q_offset || is_anchor(q + q_offset); }
  ///@}

  // Row groups for the fused kernel: group 0 the causal (non-anchor) rows, group 1 the anchor
  // rows, which see everything; so a tile is computed only for rows that see part of it and the
  // cost follows the visible pairs rather than the square.
  /// Two row groups: 0 = causal rows, 1 = anchor rows.
  index_t row_groups() const noexcept { return 2; }
  /// Writes the query rows of group g (increasing) to `rows`; returns how many.
  index_t group_rows(index_t g, index_t q_len, index_t* rows) const noexcept {
    index_t n = 0;
    const index_t* a = std::lower_bound(anchors, anchors + anchor_count, q_offset);
    const index_t* const end = anchors + anchor_count;
    for (index_t q = 0; q < q_len; ++q) {
      while (a != end && *a < q + q_offset) ++a;
      const bool anchor = a != end && *a == q + q_offset;
      if (anchor == (g == 1)) rows[n++] = q;
    }
    return n;
  }
  /// The mask of one row group: every key (anchors) or causal (the others).
  struct Group {
    bool all = false;      ///< every key visible (anchor rows)
    index_t q_offset = 0;  ///< key position of the first query
    /// The mask concept (see the top of this file): tile and element visibility, and the call check.
  ///@{
    TileVisibility tile(index_t q0, index_t q1, index_t k0, index_t k1) const noexcept {
      return all ? TileVisibility::All : Causal(q_offset).tile(q0, q1, k0, k1);
    }
    bool visible(index_t q, index_t k) const noexcept { return all || k <= q + q_offset; }
    void check(index_t, index_t, const char*) const {}
    ///@}
  };
  /// The mask of row group g.
  Group group_mask(index_t g) const noexcept { return Group{g == 1, q_offset}; }

  /// Checks the anchors are sorted and distinct.
  void check(index_t, index_t, const char* fn) const {
    CTXCOMP_CHECK(anchor_count >= 0 && (anchor_count == 0 || anchors != nullptr), fn,
                  ": AnchorBidirectional has ", anchor_count, " anchors but no array");
    for (index_t i = 1; i < anchor_count; ++i)
      CTXCOMP_CHECK(anchors[i] > anchors[i - 1], fn, ": AnchorBidirectional anchors must be sorted and distinct (",
                    anchors[i - 1], " then ", anchors[i], ")");
  }
};

/// Role of a token under the sentinel-token scheme.
enum class SpanRole : std::uint8_t { Ordinary, Open /* <CL> */, Inner, Close /* <CR> */ };
/// A token's role and span under the sentinel-token scheme.
struct TokenRole {
  SpanRole role = SpanRole::Ordinary;  ///< ordinary, `<CL>`, inside a span, or `<CR>`
  std::int32_t span = -1;              ///< span number for Open / Inner / Close, -1 for Ordinary
};

/// Whether logical token `q` sees logical token `k` under the official sentinel rules
/// (shared/fixtures/sentinel/README): ordinary tokens see earlier ordinary tokens and every
/// earlier `<CR>`; span tokens see the same plus the earlier tokens of their own span, but not
/// their `<CL>`; `<CL>` sees only itself; `<CR>` sees its own `<CL>`, its span and itself.
inline bool sentinel_visible(const TokenRole& rq, const TokenRole& rk, index_t q, index_t k) noexcept {
  if (k > q) return false;
  if (k == q) return true;
  const bool k_public = rk.role == SpanRole::Ordinary || rk.role == SpanRole::Close;
  switch (rq.role) {
    case SpanRole::Open: return false;
    case SpanRole::Close: return (rk.role == SpanRole::Open || rk.role == SpanRole::Inner) && rk.span == rq.span;
    case SpanRole::Inner: return k_public || (rk.role == SpanRole::Inner && rk.span == rq.span);
    case SpanRole::Ordinary: default: return k_public;
  }
}

/// Sentinel-token mask over a sequence of roles indexed by logical token position. Query q is
/// logical token q + q_offset; key k is logical token key_index[k] (strictly increasing; the
/// cache's kept tokens after folding), or k itself when key_index is null. Arrays are the
/// caller's and must outlive the mask. O(n) memory, never n x n.
struct SentinelSpans {
  const TokenRole* roles = nullptr;    ///< role of every stream token so far
  index_t role_count = 0;              ///< number of roles
  index_t q_offset = 0;                ///< stream index of the first query
  const index_t* key_index = nullptr;  ///< stream index of each key (the cache's token_index), or null

  /// Stream index of key k.
  index_t key_token(index_t k) const noexcept { return key_index ? key_index[k] : k; }
  /// The mask concept (see the top of this file): tile and element visibility, and the call check.
  ///@{
  bool visible(index_t q, index_t k) const noexcept {
    const index_t tq = q + q_offset, tk = key_token(k);
    return sentinel_visible(roles[tq], roles[tk], tq, tk);
  }
  TileVisibility tile(index_t q0, index_t q1, index_t k0, index_t k1) const noexcept {
    const index_t t0 = q0 + q_offset, t1 = q1 - 1 + q_offset;
    const index_t first_key = key_token(k0), last_key = key_token(k1 - 1);
    if (first_key > t1) return TileVisibility::None;
    if (last_key > t0) return TileVisibility::Mixed;
    // Every key is at or before the first query (a decode step's own key included): all visible
    // iff the queries are ordinary and the keys public (the first query, being ordinary, is).
    // A role scan, never a per-element visible(): a folded cache decodes with All tiles only.
    for (index_t t = t0; t <= t1; ++t)
      if (roles[t].role != SpanRole::Ordinary) return TileVisibility::Mixed;
    for (index_t k = k0; k < k1; ++k) {
      const SpanRole r = roles[key_token(k)].role;
      if (r != SpanRole::Ordinary && r != SpanRole::Close) return TileVisibility::Mixed;
    }
    return TileVisibility::All;
  }
  void check(index_t q_len, index_t kv_len, const char* fn) const {
    CTXCOMP_CHECK(roles != nullptr || role_count == 0, fn, ": SentinelSpans has no roles array");
    CTXCOMP_CHECK(q_offset >= 0 && q_offset + q_len <= role_count, fn, ": SentinelSpans covers ", role_count,
                  " tokens but queries reach token ", q_offset + q_len - 1);
    if (kv_len == 0) return;
    if (!key_index) {
      CTXCOMP_CHECK(kv_len <= role_count, fn, ": SentinelSpans covers ", role_count, " tokens but there are ",
                    kv_len, " keys");
      return;
    }
    for (index_t k = 0; k < kv_len; ++k) {
      CTXCOMP_CHECK(key_index[k] >= 0 && key_index[k] < role_count, fn, ": SentinelSpans key_index[", k, "] = ",
                    key_index[k], " is outside [0, ", role_count, ")");
      CTXCOMP_CHECK(k == 0 || key_index[k] > key_index[k - 1], fn, ": SentinelSpans key_index must increase (",
                    key_index[k - 1], " then ", key_index[k], ")");
    }
  }
  ///@}
};

/// Adapter for a host's explicit mask: element (q, k) at data[q * ld + k], nonzero = visible.
/// The host owns the memory; tiles are scanned so uniform tiles are still skipped.
template <class T = std::uint8_t>
struct DenseMask {
  const T* data = nullptr;  ///< element (q, k) at data[q * ld + k], nonzero = visible
  /// Rows, columns and row stride of the mask array.
  ///@{
  index_t rows = 0, cols = 0, ld = 0;
  ///@}
  /// The mask concept (see the top of this file): tile and element visibility, and the call check.
  ///@{
  bool visible(index_t q, index_t k) const noexcept { return data[q * ld + k] != T(0); }
  TileVisibility tile(index_t q0, index_t q1, index_t k0, index_t k1) const noexcept {
    bool any = false, all = true;
    for (index_t q = q0; q < q1; ++q)
      for (index_t k = k0; k < k1; ++k) {
        const bool v = visible(q, k);
        any |= v;
        all &= v;
      }
    return all ? TileVisibility::All : any ? TileVisibility::Mixed : TileVisibility::None;
  }
  void check(index_t q_len, index_t kv_len, const char* fn) const {
    CTXCOMP_CHECK(data != nullptr || q_len == 0 || kv_len == 0, fn, ": DenseMask has no data");
    CTXCOMP_CHECK(rows >= q_len && cols >= kv_len && ld >= cols, fn, ": DenseMask is ", rows, " x ", cols, " (ld ",
                  ld, ") but the call is ", q_len, " x ", kv_len);
  }
  ///@}
};

/// Number of visible (query, key) pairs of a q_len x kv_len call (useful work for counters).
template <class Mask>
index_t count_visible(const Mask& mask, index_t q_len, index_t kv_len, index_t tile = 64) {
  index_t n = 0;
  for (index_t q0 = 0; q0 < q_len; q0 += tile)
    for (index_t k0 = 0; k0 < kv_len; k0 += tile) {
      const index_t q1 = std::min(q_len, q0 + tile), k1 = std::min(kv_len, k0 + tile);
      switch (mask.tile(q0, q1, k0, k1)) {
        case TileVisibility::None: break;
        case TileVisibility::All: n += (q1 - q0) * (k1 - k0); break;
        case TileVisibility::Mixed:
          for (index_t q = q0; q < q1; ++q)
            for (index_t k = k0; k < k1; ++k) n += mask.visible(q, k) ? 1 : 0;
      }
    }
  return n;
}

namespace detail {
/// Checks an export range against the mask and the output; `fn` names the caller.
template <class Mask>
void check_export(const Mask& mask, index_t q0, index_t q1, index_t k0, index_t k1, const void* out, index_t ld,
                  index_t min_ld, const char* fn) {
  CTXCOMP_CHECK(0 <= q0 && q0 <= q1 && 0 <= k0 && k0 <= k1, fn, ": rows [", q0, ", ", q1, ") x columns [", k0, ", ",
                k1, ") is not a range");
  CTXCOMP_CHECK(ld >= min_ld, fn, ": row stride ", ld, " is below the ", min_ld, " the range needs");
  CTXCOMP_CHECK(out != nullptr || q0 == q1 || k0 == k1, fn, ": null output");
  if (q1 > 0 && k1 > 0) mask.check(q1, k1, fn);
}
/// Calls f(q, k0, k1, value) for runs of one value over rows [q0, q1) x columns [k0, k1): whole
/// tiles from mask.tile(), per element inside mixed tiles.
template <class Mask, class F>
void for_each_run(const Mask& mask, index_t q0, index_t q1, index_t k0, index_t k1, index_t tile, F&& f) {
  for (index_t a = q0; a < q1; a += tile)
    for (index_t b = k0; b < k1; b += tile) {
      const index_t a1 = std::min(q1, a + tile), b1 = std::min(k1, b + tile);
      const TileVisibility v = mask.tile(a, a1, b, b1);
      for (index_t q = a; q < a1; ++q) {
        if (v != TileVisibility::Mixed) {
          f(q, b, b1, v == TileVisibility::All);
          continue;
        }
        for (index_t k = b; k < b1; ++k) f(q, k, k + 1, mask.visible(q, k));
      }
    }
}
}  // namespace detail

/// Writes `mask` over rows [q0, q1) x columns [k0, k1) into out[(q - q0) * ld + (k - k0)] as
/// `on` (visible) or `off` (hidden): 0 and -inf for an additive mask, 1 and 0 for a boolean
/// one. For an engine that keeps its own attention kernel and takes only the mask: any mask of
/// this file (structured, sentinel, cells), over a tile range the caller chooses, into the
/// caller's memory (nothing allocated; whole tiles come from mask.tile()). The range must lie
/// inside a call the mask can describe (its check(q1, k1)); errors name export_mask.
template <class Mask, class T>
void export_mask(const Mask& mask, index_t q0, index_t q1, index_t k0, index_t k1, T* out, index_t ld, T on, T off,
                 index_t tile = 64) {
  detail::check_export(mask, q0, q1, k0, k1, out, ld, k1 - k0, "export_mask");
  detail::for_each_run(mask, q0, q1, k0, k1, std::max<index_t>(1, tile), [&](index_t q, index_t a, index_t b, bool v) {
    std::fill(out + (q - q0) * ld + (a - k0), out + (q - q0) * ld + (b - k0), v ? on : off);
  });
}

/// Writes `mask` over rows [q0, q1) x columns [k0, k1) as bits: row q - q0 is `words` 64-bit
/// words from out + (q - q0) * words, bit (k - k0) % 64 of word (k - k0) / 64 set when key k is
/// visible (least significant bit first, as FlashInfer packs its custom masks; bits past k1
/// are 0). `words` >= ceil((k1 - k0) / 64). Otherwise as export_mask.
template <class Mask>
void export_mask_bits(const Mask& mask, index_t q0, index_t q1, index_t k0, index_t k1, std::uint64_t* out,
                      index_t words, index_t tile = 64) {
  detail::check_export(mask, q0, q1, k0, k1, out, words, (k1 - k0 + 63) / 64, "export_mask_bits");
  for (index_t q = q0; q < q1; ++q) std::fill(out + (q - q0) * words, out + (q - q0 + 1) * words, std::uint64_t(0));
  detail::for_each_run(mask, q0, q1, k0, k1, std::max<index_t>(1, tile), [&](index_t q, index_t a, index_t b, bool v) {
    if (!v) return;
    std::uint64_t* row = out + (q - q0) * words;
    for (index_t k = a - k0; k < b - k0; ++k) row[k / 64] |= std::uint64_t(1) << (k % 64);
  });
}

/// llama.cpp's KQ mask over a cell cache: query row i, of sequence `seq` at position q_pos[i],
/// sees cell c iff the cell is live, holds a token of `seq` (or the cache has one sequence), and
/// pos[c] <= q_pos[i]. Per tile: None when no cell of the tile is live for `seq` or all of them
/// come after the rows' positions; All when every cell is live for `seq` and at or before the
/// rows' earliest position; otherwise Mixed (free cells are masked inside the tile).
struct CellCausal {
  /// Hidden keys may be free cells the host never wrote: what they hold never reaches the outputs.
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
  /// Hidden keys may be free cells the host never wrote: what they hold never reaches the outputs.
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
  /// Hidden keys may be free cells the host never wrote: what they hold never reaches the outputs.
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
