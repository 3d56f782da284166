// Sentinel-token span folding for a token stream: <CL> opens a span, <CR> closes it; the tracker
// assigns roles and position ids as tokens arrive, builds the attention mask of new tokens
// against a (possibly folded) KvCache, and fold() evicts every closed span's <CL> and inner
// tokens from all layers, keeping <CR> as the span's compact entry. Semantics: the official
// sentinel-token mask and position ids (tests/data/fixtures/sentinel/README).
#pragma once
#include <cstdint>
#include <vector>

#include "../attention/masks.hpp"
#include "../kv/kv_cache.hpp"

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

  /// Mask for new tokens starting at stream index `first` against the cache's slots (whose
  /// logical token indices are cache.token_index()).
  template <class C>
  SentinelSpans mask(index_t first, const KvCache<C>& cache) const noexcept {
    return SentinelSpans{roles_.data(), size(), first, cache.token_index()};
  }

  /// Whether stream token t may be evicted: a `<CL>` or inner token of a closed span.
  bool evictable(index_t t) const noexcept {
    const TokenRole& r = roles_[std::size_t(t)];
    return (r.role == SpanRole::Open || r.role == SpanRole::Inner) && r.span < state_.span;
  }

 private:
  std::int64_t cl_, cr_, vocab_;
  std::vector<TokenRole> roles_;
  SentinelRoleState state_;
  std::int64_t ordinary_ = 0;
};

/// Evicts from every layer the cached `<CL>` and inner tokens of every closed span, keeping each
/// `<CR>`. Returns how many slots were freed. Folding after each `<CR>` or in one batch later
/// evicts the same tokens.
template <class C>
index_t fold(KvCache<C>& cache, const SpanTracker& spans) {
  std::vector<TokenRange> drop;
  const index_t* idx = cache.token_index();
  for (index_t s = 0; s < cache.size(); ++s) {
    CTXCOMP_CHECK(idx[s] >= 0 && idx[s] < spans.size(), "fold: cache slot ", s, " holds stream token ", idx[s],
                  " which the tracker has not seen");
    if (!spans.evictable(idx[s])) continue;
    if (!drop.empty() && drop.back().end == s) drop.back().end = s + 1;
    else drop.push_back({s, s + 1});
  }
  index_t freed = 0;
  for (const auto& r : drop) freed += r.end - r.begin;
  cache.evict(drop);
  return freed;
}

}  // namespace ctxcomp::fold
