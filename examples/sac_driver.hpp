// The host loop of SAC: compress a context into the anchors' K/V with the reference Llama host
// (optionally with separate compressing layer weights, e.g. LoRA-merged), then decode from the
// compressed cache: special_tokens[1] at position n, then the target tokens at n+1, n+2, ...
// What an engine's own loop would do.
#pragma once
#include <ctxcomp/anchor/compress.hpp>

#include "llama_host.hpp"

namespace ctxcomp::host {

namespace detail {
/// T in a non-deduced context (so that `nullptr` may be passed for a pointer to T's weights).
template <class T>
struct identity {
  using type = T;  ///< T itself
};
}  // namespace detail

/// Compresses ids [plan.tokens()] into `cache` (appending the anchors). `compress_layers`, when
/// given, replaces the model's layer weights while compressing only; `compute` is the arithmetic
/// of the compressing forward passes (the host's own setting is restored afterwards, also on
/// error). Builds a Compressor (its scratch cache and buffers) per call; an engine compressing
/// repeatedly keeps one instead.
template <class T, class C, class Kv, class Exec = SerialExecutor>
index_t sac_compress(LlamaHost<T, C>& host, const anchor::AnchorPlan& plan, const std::int64_t* ids,
                     MatrixView<const float> role_tokens, anchor::ChunkMask mask, Kv& cache,
                     const Exec& exec = {},
                     const std::vector<LlamaLayerWeights<typename detail::identity<T>::type>>* compress_layers = nullptr,
                     Compute compute = Compute::fp32) {
  const auto& c = host.config();
  const Compute before = host.compute();
  host.set_compute(compute);
  RollbackScope restore([&host, before] { host.set_compute(before); });
  anchor::Compressor<C> comp(c.layers, c.kv_heads, c.head_dim, c.hidden, std::min(plan.chunk_size(), plan.tokens()));
  const index_t kept = comp.compress(
      plan, ids, role_tokens, mask, [&](const std::int64_t* p, index_t n, MatrixView<float> x) { host.embed(p, n, x); },
      [&](MatrixView<float> x, const std::int64_t* pos, const index_t* idx, const auto& m, KvCache<C>& scratch) {
        host.forward(x, pos, idx, m, scratch, exec, compress_layers);
      },
      cache);
  restore.dismiss();
  host.set_compute(before);
  return kept;
}

/// Decodes from a compressed cache of `plan`'s context: inputs [first_embed ; embed(targets)]
/// at positions n, n+1, ..., each seeing the whole cache and the inputs before it. Returns
/// logits [t + 1 x vocab]; the cache (any KV layout) is left holding the compressed context only.
template <class T, class C, class Kv, class Exec = SerialExecutor>
std::vector<float> sac_decode(LlamaHost<T, C>& host, const anchor::AnchorPlan& plan, Kv& cache,
                              const float* first_embed, const std::int64_t* targets, index_t t,
                              const Exec& exec = {}) {
  const auto& c = host.config();
  const index_t m = cache.size(), rows = t + 1;
  CTXCOMP_CHECK(t >= 0, "sac: negative number of target tokens (", t, ")");
  CTXCOMP_CHECK(cache.room() >= rows, "sac: the cache has room for ", cache.room(), " decoded tokens, ", rows,
                " needed");
  std::vector<float> x(std::size_t(rows * c.hidden)), logits(std::size_t(rows * c.vocab));
  std::copy(first_embed, first_embed + c.hidden, x.begin());
  if (t > 0) host.embed(targets, t, matrix_view(x.data() + c.hidden, t, c.hidden));
  std::vector<std::int64_t> pos(static_cast<std::size_t>(rows));
  std::vector<index_t> idx(static_cast<std::size_t>(rows));
  const index_t base = std::max<index_t>(plan.tokens(), cache.last_token_index() + 1);
  for (index_t i = 0; i < rows; ++i) pos[std::size_t(i)] = plan.decode_position() + i, idx[std::size_t(i)] = base + i;
  auto xv = matrix_view(x.data(), rows, c.hidden);
  if constexpr (Kv::has_holes)  // Causal(m) in logical order: the cells' token indices
    host.forward(xv, pos.data(), idx.data(),
                 CellOrder{cache.meta(), cache.token_index(), idx.data(), rows, cache.sequence()}, cache, exec);
  else
    host.forward(xv, pos.data(), idx.data(), Causal(m), cache, exec);
  kv::truncate_logical(cache, base);
  host.logits(const_view(xv), matrix_view(logits.data(), rows, c.vocab), exec);
  return logits;
}

}  // namespace ctxcomp::host
