// SAC compression driver: for each chunk of the context, embed its tokens, add the anchor
// embeddings, run the host's layers over the chunk alone (1-based positions, shifted by the
// plan's position offset when the document follows a cached prefix; bidirectional
// mask) into a scratch cache, and keep only the anchors' per-layer K/V (keys after RoPE at
// their original positions) in the caller's cache (any KV layout: kv/layout.hpp). The host's layers are a callable, so the
// compressing weights (e.g. with the official LoRA on q_proj/v_proj merged) can differ from the
// weights the host decodes with. Semantics: tests/data/fixtures/README.md, section sac.
//
// Decoding afterwards is the host's own loop: the first decoded input (officially
// special_tokens[1]) goes at position plan.decode_position() (= n + offset), the next after it; each
// sees the whole compressed cache and the decoded inputs before it, i.e. Causal(m) with m the
// number of cached anchors.
#pragma once
#include <cstdint>
#include <vector>

#include "../attention/masks.hpp"
#include "../kv/kv_cache.hpp"
#include "../kv/layout.hpp"
#include "anchors.hpp"

namespace ctxcomp::anchor {

/// Attention inside a chunk while compressing.
enum class ChunkMask {
  Full,    // every token sees the whole chunk (the official SAC branch; FullBidirectional)
  Anchor,  // anchors see the whole chunk, the other tokens are causal (AnchorBidirectional)
};

/// Owns the scratch cache and buffers of the chunk loop, so that compressing allocates nothing
/// once the first call of a given chunk size has run. C is the cache's storage type.
template <class C>
class Compressor {
 public:
  /// A compressor for a host of these cache shapes, chunks of up to `chunk_size` tokens.
  Compressor(index_t layers, index_t kv_heads, index_t head_dim, index_t hidden, index_t chunk_size)
      : scratch_(layers, kv_heads, head_dim, chunk_size), hidden_(hidden) {
    CTXCOMP_CHECK(hidden > 0, "anchor::Compressor: hidden size (", hidden, ") must be positive");
    x_.resize(std::size_t(chunk_size * hidden));
    for (auto* v : {&pos_, &pos_kept_}) v->resize(std::size_t(chunk_size));
    for (auto* v : {&idx_, &idx_kept_, &rows_, &slots_}) v->resize(std::size_t(chunk_size));
  }

  /// Longest chunk the scratch cache holds.
  index_t chunk_capacity() const noexcept { return scratch_.capacity(); }

  /// Compresses context `ids` [plan.tokens()] into `out`, appending the anchors of every chunk in
  /// order (positions plan.anchor_position_ids(), token indices token_base + anchor token;
  /// token_base < 0: right after the cache's last token index, 0 for an empty cache).
  /// `role_tokens` [>= anchors per chunk x hidden] are the anchor embeddings.
  ///   embed(const std::int64_t* ids, index_t count, MatrixView<float> x)        x = embeddings
  ///   forward(MatrixView<float> x, const std::int64_t* positions, const index_t* token_index,
  ///           const Mask& mask, KvCache<C>& cache)   runs every layer over x, appending its K/V
  ///                                                  to cache (Mask: FullBidirectional or
  ///                                                  AnchorBidirectional)
  /// `out` is any KV layout of storage type C (KvCache, ContiguousKv, CellKv, PagedKv).
  /// Returns the number of anchors appended. On error `out` is left as it was.
  template <class Embed, class Forward, class Out>
  index_t compress(const AnchorPlan& plan, const std::int64_t* ids, MatrixView<const float> role_tokens,
                   ChunkMask mask, Embed&& embed, Forward&& forward, Out& out, index_t token_base = -1) {
    const char* fn = "anchor::Compressor::compress";
    CTXCOMP_CHECK(plan.tokens() > 0, fn, ": the context is empty");
    CTXCOMP_CHECK(plan.max_anchors_per_chunk() <= role_tokens.rows(), fn, ": a chunk has ",
                  plan.max_anchors_per_chunk(), " anchors but there are only ", role_tokens.rows(),
                  " role (anchor) embeddings; use a larger ratio or a smaller chunk");
    CTXCOMP_CHECK(role_tokens.cols() == hidden_, fn, ": role embeddings have ", role_tokens.cols(),
                  " features, the hidden size is ", hidden_);
    CTXCOMP_CHECK(std::min(plan.chunk_size(), plan.tokens()) <= scratch_.capacity(), fn, ": chunks of ",
                  plan.chunk_size(), " tokens exceed the compressor's chunk capacity of ", scratch_.capacity());
    CTXCOMP_CHECK(out.layers() == scratch_.layers() && out.kv_heads() == scratch_.kv_heads() &&
                      out.head_dim() == scratch_.head_dim(),
                  fn, ": the output cache is ", out.layers(), " layers x ", out.kv_heads(), " kv heads x ",
                  out.head_dim(), ", the compressor's ", scratch_.layers(), " x ", scratch_.kv_heads(), " x ",
                  scratch_.head_dim());
    CTXCOMP_CHECK(out.room() >= plan.anchor_count(), fn, ": ", plan.anchor_count(),
                  " anchors do not fit in the output cache (", out.size(), " of ", out.capacity(), " slots used, room for ",
                  out.room(), ")");
    const index_t next_index = out.last_token_index() + 1;
    if (token_base < 0) token_base = next_index;
    CTXCOMP_CHECK(token_base >= next_index, fn, ": token_base (", token_base,
                  ") must be past the output cache's last token index (", next_index - 1, ")");

    appended_.clear();
    appended_.reserve(std::size_t(plan.anchor_count()));
    const auto& anchors = plan.anchors();
    index_t c = 0;
    auto run_chunks = [&] {  // advances c: on error it names the failing chunk
      for (; c < plan.chunks(); ++c) {
        const auto [s, e] = plan.chunk(c);
        const auto [a0, a1] = plan.chunk_anchors(c);
        const index_t t = e - s, count = a1 - a0;
        if (count == 0) continue;  // chunks are independent: one without anchors keeps nothing
        auto x = matrix_view(x_.data(), t, hidden_);
        embed(ids + s, t, x);
        for (index_t j = 0; j < count; ++j) rows_[std::size_t(j)] = anchors[std::size_t(a0 + j)] - s;
        add_anchor_embeddings(x, rows_.data(), count, role_tokens);
        for (index_t i = 0; i < t; ++i)
          pos_[std::size_t(i)] = plan.position(s + i), idx_[std::size_t(i)] = s + i;
        scratch_.clear();
        if (mask == ChunkMask::Full)
          forward(x, pos_.data(), idx_.data(), FullBidirectional{}, scratch_);
        else
          forward(x, pos_.data(), idx_.data(), AnchorBidirectional{rows_.data(), count, 0}, scratch_);
        CTXCOMP_CHECK(scratch_.size() == t, fn, ": the host's forward left ", scratch_.size(),
                      " tokens in the chunk's cache, expected ", t);
        keep_anchors(count, out, token_base);
      }
    };
    // An error inside the host's callbacks leaves `out` as it was (RollbackScope: unwinding
    // with exceptions, before the error handler without).
    RollbackScope undo([&out, this] { out.unappend(appended_.data(), index_t(appended_.size())); });
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
    try {
      run_chunks();
    } catch (const Error& err) {  // the host's message, with the chunk it came from
      fail(fn, ": chunk ", c, " (tokens [", plan.chunk(c).begin, ", ", plan.chunk(c).end, ")): ", err.what());
    }
#else
    run_chunks();
#endif
    undo.dismiss();
    return index_t(appended_.size());
  }

 private:
  // Appends the scratch slots rows_[0, count) to `out` with their positions and token indices.
  template <class Out>
  void keep_anchors(index_t count, Out& out, index_t token_base) {
    for (index_t j = 0; j < count; ++j) {
      const index_t r = rows_[std::size_t(j)];
      pos_kept_[std::size_t(j)] = scratch_.positions()[r];
      idx_kept_[std::size_t(j)] = token_base + scratch_.token_index()[r];
    }
    // One append per chunk; its slots are remembered for the rollback once it succeeded.
    index_t* slots = slots_.data();
    out.append(count, pos_kept_.data(), idx_kept_.data(), slots);
    appended_.insert(appended_.end(), slots, slots + count);
    for (index_t l = 0; l < out.layers(); ++l)
      for (bool v : {false, true}) {
        const auto src = read_only(v ? scratch_.values(l) : scratch_.keys(l));
        const auto dst = v ? out.values(l) : out.keys(l);
        for (index_t h = 0; h < out.kv_heads(); ++h)
          for (index_t j = 0; j < count; ++j) copy_row(src, h, rows_[std::size_t(j)], dst, h, slots[j]);  // scales too
      }
  }

  KvCache<C> scratch_;
  index_t hidden_;
  std::vector<float> x_;
  std::vector<std::int64_t> pos_, pos_kept_;
  std::vector<index_t> idx_, idx_kept_, rows_, slots_, appended_;
};

}  // namespace ctxcomp::anchor
