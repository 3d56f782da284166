// The host loop of sentinel-token folding: feed a token stream through the reference host in
// segments that end at each <CR>, folding the cache after each (or once at the end), and
// collect the logits of every position. What an engine's own loop would do.
#pragma once
#include <ctxcomp/fold/spans.hpp>

#include "llama_host.hpp"

namespace ctxcomp::host {

enum class FoldSchedule { EverySpan, AtEnd };

/// Runs ids[0, n) after whatever `spans` and `cache` already hold; returns logits [n x vocab].
/// `cache` is any KV layout (KvCache, ContiguousKv, CellKv, PagedKv: kv/layout.hpp). Each fold
/// looks only at the spans closed since the previous one.
template <class T, class C, class Kv, class Exec = SerialExecutor>
std::vector<float> run_with_folding(LlamaHost<T, C>& host, const std::int64_t* ids, index_t n, fold::SpanTracker& spans,
                                    Kv& cache, FoldSchedule schedule, const Exec& exec = {}) {
  const auto& c = host.config();
  CTXCOMP_CHECK(n > 0, "fold: empty input");
  std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
  const index_t base = spans.size();
  std::vector<float> logits(static_cast<std::size_t>(n * c.vocab)), x;
  std::vector<index_t> token_index(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) token_index[std::size_t(i)] = base + i;
  std::int32_t unfolded = spans.closed_spans();  // spans closed before this call were folded by it
  spans.push(ids, n, pos.data());  // validates the whole input before any compute
  index_t s = 0;
  while (s < n) {
    index_t e = s;
    if (schedule == FoldSchedule::EverySpan) {
      while (e < n && spans.roles()[std::size_t(base + e)].role != SpanRole::Close) ++e;
      e = std::min(n, e + 1);  // the segment ends with its <CR>
    } else {
      e = n;
    }
    const index_t t = e - s;
    x.resize(std::size_t(t * c.hidden));
    auto xv = matrix_view(x.data(), t, c.hidden);
    host.embed(ids + s, t, xv);
    host.forward(xv, pos.data() + s, token_index.data() + s, spans.mask(base + s, cache), cache, exec);
    host.logits(const_view(xv), matrix_view(logits.data() + s * c.vocab, t, c.vocab), exec);
    if (schedule == FoldSchedule::EverySpan) {
      fold::fold(cache, spans, unfolded);
      const TokenRole& last = spans.roles()[std::size_t(base + e - 1)];
      if (last.role == SpanRole::Close) unfolded = last.span + 1;  // spans up to it are folded
    }
    s = e;
  }
  if (schedule == FoldSchedule::AtEnd) fold::fold(cache, spans, unfolded);
  return logits;
}

}  // namespace ctxcomp::host
