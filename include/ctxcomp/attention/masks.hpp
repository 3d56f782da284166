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
///                                              // wrote (cell caches); P V then leaves out the
///                                              // keys no row of a query block sees

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

/// Role assignment one token at a time, carrying an open span across calls (a stream):
/// `cl` opens a span, `cr` closes it. Errors name the token's index `at` and the caller `fn`.
struct SentinelRoleState {
  bool open = false;      ///< a span is open
  std::int32_t span = 0;  ///< number of the open span, or of the next one (= spans closed so far)

  /// The role of the next token `id` (stream index `at`); errors name `fn`.
  template <class Id>
  TokenRole next(Id id, Id cl, Id cr, index_t at, const char* fn) {
    if (id == cl) {
      CTXCOMP_CHECK(!open, fn, ": <CL> at index ", at, " opens a span inside the span opened before it",
                    " (nested spans are not supported)");
      open = true;
      return {SpanRole::Open, span};
    }
    if (id == cr) {
      CTXCOMP_CHECK(open, fn, ": <CR> at index ", at, " closes no open span");
      open = false;
      return {SpanRole::Close, span++};
    }
    return open ? TokenRole{SpanRole::Inner, span} : TokenRole{};
  }
};

/// Assigns sentinel roles to a token sequence: `cl` opens a span, `cr` closes it. Errors name
/// the offending index: a `<CR>` with no open span, a `<CL>` inside an open span (nested spans are
/// not part of the scheme). A span still open at the end is allowed (text still streaming).
template <class Id>
std::vector<TokenRole> sentinel_roles(const Id* ids, index_t n, Id cl, Id cr, std::int32_t first_span = 0) {
  std::vector<TokenRole> roles(static_cast<std::size_t>(n));
  SentinelRoleState state{false, first_span};
  for (index_t i = 0; i < n; ++i) roles[std::size_t(i)] = state.next(ids[i], cl, cr, i, "sentinel_roles");
  return roles;
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

}  // namespace ctxcomp
