// Sentinel-token span folding for a token stream: <CL> opens a span, <CR> closes it; the tracker
// assigns roles and position ids as tokens arrive, builds the attention mask of new tokens
// against a (possibly folded) KvCache, and fold() evicts every closed span's <CL> and inner
// tokens from all layers, keeping <CR> as the span's compact entry. Semantics: the official
// sentinel-token mask and position ids (tests/data/fixtures/sentinel/README).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../attention/masks.hpp"
#include "../kv/cells.hpp"
#include "../kv/kv_cache.hpp"
#include "../kv/layout.hpp"
#include "roles.hpp"

namespace ctxcomp::fold {

/// Roles, position ids and masks of a sentinel-token stream (see the top of this file).
class SpanTracker {
 public:
  /// `vocab` > 0 makes ids outside [0, vocab) an error.
  SpanTracker(std::int64_t cl_id, std::int64_t cr_id, std::int64_t vocab = -1) : cl_(cl_id), cr_(cr_id), vocab_(vocab) {
    CTXCOMP_CHECK(cl_id != cr_id, "SpanTracker: <CL> and <CR> ids are both ", cl_id);
    CTXCOMP_CHECK(vocab < 0 || (cl_id >= 0 && cl_id < vocab && cr_id >= 0 && cr_id < vocab), "SpanTracker: <CL> (",
                  cl_id, ") or <CR> (", cr_id, ") is outside the vocabulary of ", vocab);
  }

  /// Appends tokens, writing their position ids (ordinary tokens count 0, 1, 2, ...; a sentinel
  /// repeats the position of the token before it, 0 at the start). Errors (a `<CR>` with no open
  /// span, a `<CL>` inside a span, an id outside the vocabulary) name the stream index; on error
  /// nothing is appended.
  void push(const std::int64_t* ids, index_t count, std::int64_t* positions_out) {
    // Validate the whole input on a copy of the state first, then commit: no rollback is needed,
    // so this also holds when built with -fno-exceptions (positions_out is untouched on error).
    const std::size_t first = roles_.size();
    SentinelRoleState check = state_;
    for (index_t i = 0; i < count; ++i) {
      const std::int64_t id = ids[i];
      CTXCOMP_CHECK(vocab_ < 0 || (id >= 0 && id < vocab_), "fold: token id ", id, " at index ", index_t(first) + i,
                    " is outside the vocabulary [0, ", vocab_, ")");
      check.next(id, cl_, cr_, index_t(first) + i, "fold");
    }
    roles_.reserve(first + std::size_t(count));
    for (index_t i = 0; i < count; ++i) {
      const std::int64_t id = ids[i];
      roles_.push_back(state_.next(id, cl_, cr_, index_t(first) + i, "fold"));
      if (roles_.back().role == SpanRole::Open) span_begin_.push_back(index_t(first) + i);
      const bool sentinel = id == cl_ || id == cr_;
      positions_out[i] = sentinel ? std::max<std::int64_t>(ordinary_ - 1, 0) : ordinary_++;
    }
  }

  /// Tokens pushed so far.
  index_t size() const noexcept { return index_t(roles_.size()); }
  /// The role of every token pushed so far.
  const std::vector<TokenRole>& roles() const noexcept { return roles_; }
  /// Number of closed spans so far; a span is open between its `<CL>` and `<CR>`.
  std::int32_t closed_spans() const noexcept { return state_.span; }
  /// Whether a span is open (its `<CR>` has not arrived).
  bool span_open() const noexcept { return state_.open; }

  /// Stream index of span j's `<CL>` (j < the spans opened so far).
  index_t span_begin(std::int32_t j) const noexcept { return span_begin_[std::size_t(j)]; }

  /// Mask for new tokens starting at stream index `first` against the cache's slots (whose
  /// logical token indices are cache.token_index()): SentinelSpans for a compacted layout
  /// (KvCache, ContiguousKv, PagedKv), CellSentinel for a cell cache (free cells hidden).
  template <class Kv>
  auto mask(index_t first, const Kv& cache) const noexcept {
    if constexpr (Kv::has_holes)
      return CellSentinel{roles_.data(), size(), first, cache.meta(), cache.token_index(), cache.sequence()};
    else
      return SentinelSpans{roles_.data(), size(), first, cache.token_index()};
  }

  /// A point of the stream to come back to: what the tracker had seen there (a few integers;
  /// copy or store it with the session). For speculative decoding (draft tokens pushed, then the
  /// rejected ones rolled back) and for saved sessions.
  struct Checkpoint {
    index_t tokens = 0;              ///< tokens pushed at that point
    std::size_t spans_opened = 0;    ///< `<CL>`s among them
    SentinelRoleState state{};       ///< span state after them
    std::int64_t ordinary = 0;       ///< ordinary tokens among them (the next position id)
  };
  /// The current point.
  Checkpoint checkpoint() const noexcept { return {size(), span_begin_.size(), state_, ordinary_}; }
  /// Forgets every token pushed after `cp`, as if they had never arrived: the next push continues
  /// from there (roles, position ids, spans). A checkpoint past the tokens pushed, or one that
  /// does not describe this tracker's stream at that point, is an error and nothing changes.
  /// The cache is the host's: truncate it to the same tokens (`kv::truncate_logical(cache,
  /// cp.tokens)`). K/V a fold already evicted cannot come back, so roll back only to a point
  /// after the `<CR>` of every span folded since (a span still open, or closed and not yet
  /// folded, is fine).
  void rollback(const Checkpoint& cp) {
    CTXCOMP_CHECK(cp.tokens >= 0 && cp.tokens <= size(), "SpanTracker::rollback: the checkpoint is at token ",
                  cp.tokens, ", the tracker holds ", size());
    const std::size_t opened = std::size_t(
        std::lower_bound(span_begin_.begin(), span_begin_.end(), cp.tokens) - span_begin_.begin());
    std::int64_t ordinary = 0;  // sentinels (<CL>, <CR>) take no position of their own
    for (index_t t = 0; t < cp.tokens; ++t) {
      const SpanRole r = roles_[std::size_t(t)].role;
      ordinary += (r == SpanRole::Open || r == SpanRole::Close) ? 0 : 1;
    }
    const SpanRole last = cp.tokens > 0 ? roles_[std::size_t(cp.tokens - 1)].role : SpanRole::Ordinary;
    const bool open = last == SpanRole::Open || last == SpanRole::Inner;
    const std::int32_t closed = std::int32_t(opened) - (open ? 1 : 0);
    CTXCOMP_CHECK(cp.spans_opened == opened && cp.ordinary == ordinary && cp.state.open == open &&
                      cp.state.span == closed,
                  "SpanTracker::rollback: the checkpoint does not describe this stream at token ", cp.tokens,
                  " (from another tracker?)");
    roles_.resize(std::size_t(cp.tokens));
    span_begin_.resize(opened);
    state_ = cp.state;
    ordinary_ = cp.ordinary;
  }

  /// Whether stream token t may be evicted: a `<CL>` or inner token of a closed span.
  bool evictable(index_t t) const noexcept {
    const TokenRole& r = roles_[std::size_t(t)];
    return (r.role == SpanRole::Open || r.role == SpanRole::Inner) && r.span < state_.span;
  }

 private:
  std::int64_t cl_, cr_, vocab_;
  std::vector<TokenRole> roles_;
  std::vector<index_t> span_begin_;  // stream index of each span's <CL>
  SentinelRoleState state_;
  std::int64_t ordinary_ = 0;
};

namespace detail {
/// Whether cache slot s holds a live token of span `first_span`'s `<CL>` or later that folding
/// evicts (`since`: that `<CL>`'s stream index); a live slot whose token the tracker has not seen
/// is an error.
template <class Kv>
bool fold_evicts(const Kv& cache, const SpanTracker& spans, index_t since, index_t s) {
  if (!cache.live(s)) return false;
  const index_t t = cache.token_index()[s];
  CTXCOMP_CHECK(t >= 0 && t < spans.size(), "fold: cache slot ", s, " holds stream token ", t,
                " which the tracker has not seen");
  return t >= since && spans.evictable(t);
}

/// The frame both folds share: nothing to do before span `first_span` has closed; otherwise
/// `collect(since, drop)` adds the slots to evict (in increasing order, checking before anything
/// changes) and the cache evicts them in one call.
template <class Kv, class Collect>
index_t fold_slots(Kv& cache, const SpanTracker& spans, std::int32_t first_span, EvictStats* stats, Collect collect) {
  CTXCOMP_CHECK(first_span >= 0, "fold: negative first span (", first_span, ")");
  EvictStats st;
  if (first_span < spans.closed_spans()) {
    RangeCollector drop;  // no allocation for the runs of a span or a few
    collect(spans.span_begin(first_span), drop);
    st = cache.evict(drop.ranges());
  }
  if (stats) *stats = st;
  return st.tokens;
}
}  // namespace detail

/// Evicts from every layer the cached `<CL>` and inner tokens of every closed span from span
/// `first_span` on (the spans before it are taken as folded already), keeping each `<CR>`.
/// Works on any KV layout (kv/layout.hpp): a compacted cache moves the tokens after the first
/// evicted one, a cell cache frees cells, a paged cache also returns emptied pages. Returns how
/// many tokens were evicted (`stats`, when given, receives the whole EvictStats). Folding after
/// each `<CR>` or in one batch later evicts the same tokens. A compacted cache is searched from
/// span `first_span`'s `<CL>` on (binary search, then the tail), so folding the span that just
/// closed costs the tail, not the cache; a cell cache scans its cells' metadata (the overload
/// below takes the cells from the host instead).
template <class Kv>
index_t fold(Kv& cache, const SpanTracker& spans, std::int32_t first_span = 0, EvictStats* stats = nullptr) {
  return detail::fold_slots(cache, spans, first_span, stats, [&](index_t since, RangeCollector& drop) {
    const index_t* idx = cache.token_index();
    auto visit = [&](index_t s) {
      if (detail::fold_evicts(cache, spans, since, s)) drop.add(s);
    };
    if constexpr (!Kv::has_holes) {  // token indices increase: start at the span's <CL>
      for (index_t s = index_t(std::lower_bound(idx, idx + cache.size(), since) - idx); s < cache.slots(); ++s) visit(s);
    } else {  // cells in any order: a branch-free pass over blocks of 64 token indices finds candidates
      const index_t n = cache.slots();
      for (index_t b = 0; b < n; b += 64) {
        const index_t e = std::min(n, b + 64);
        std::uint64_t hits = 0;
        for (index_t s = b; s < e; ++s) hits |= std::uint64_t(idx[s] >= since) << (s - b);
        if (hits)
          for (index_t s = b; s < e; ++s)
            if ((hits >> (s - b)) & 1u) visit(s);
      }
    }
  });
}

/// fold for a cell cache whose host knows where the tokens from span `first_span`'s `<CL>` on
/// live: `cells[0, count)` (in any order, repeats allowed), e.g. the slots its appends returned
/// since that `<CL>` was appended. Only those cells are visited, so folding the span that just
/// closed costs the span, not a scan of every cell. Listed cells that are free, of another
/// sequence, or hold a token that folding keeps are left alone; an evictable cell missing from
/// the list stays (list every cell written since that `<CL>`). The same tokens are evicted as by
/// fold() when the list is complete. A cell outside [0, capacity()) is an error; on any error
/// nothing is evicted.
template <class T>
index_t fold(CellKv<T>& cache, const SpanTracker& spans, std::int32_t first_span, const index_t* cells,
             index_t count, EvictStats* stats = nullptr) {
  CTXCOMP_CHECK(count >= 0, "fold: negative count of listed cells (", count, ")");
  CTXCOMP_CHECK(count == 0 || cells != nullptr, "fold: ", count, " cells listed in a null array");
  return detail::fold_slots(cache, spans, first_span, stats, [&](index_t since, RangeCollector& drop) {
    constexpr index_t kInline = 64;  // a span's cells or a few spans': no allocation
    index_t local[kInline];
    std::vector<index_t> heap;
    index_t* hit = local;
    if (count > kInline) heap.resize(std::size_t(count)), hit = heap.data();
    index_t hits = 0;
    for (index_t i = 0; i < count; ++i) {
      const index_t c = cells[i];
      CTXCOMP_CHECK(c >= 0 && c < cache.capacity(), "fold: listed cell ", c, " (entry ", i, ") is outside the ",
                    cache.capacity(), " cells");
      if (c < cache.slots() && detail::fold_evicts(cache, spans, since, c)) hit[hits++] = c;
    }
    std::sort(hit, hit + hits);  // RangeCollector takes increasing slots
    for (index_t i = 0; i < hits; ++i)
      if (i == 0 || hit[i] != hit[i - 1]) drop.add(hit[i]);
  });
}

}  // namespace ctxcomp::fold
