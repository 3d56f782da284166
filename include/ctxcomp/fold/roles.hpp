// Sentinel roles of a token stream: which tokens open (<CL>), fill and close (<CR>) a span, one
// token at a time (SentinelRoleState, carrying an open span across calls) or for a whole
// sequence (sentinel_roles). The roles feed the sentinel masks (attention/masks.hpp) and the
// span tracker (fold/spans.hpp).
#pragma once
#include <cstdint>
#include <vector>

#include "../attention/masks.hpp"
#include "../core/error.hpp"
#include "../core/types.hpp"

namespace ctxcomp {

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

}  // namespace ctxcomp
