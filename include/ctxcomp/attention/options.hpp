// Options shared by the fused and the reference attention, and the argument checks both run.
// Layout: q/out [heads x q_len x head_dim], k/v [kv_heads x kv_len x head_dim] (HeadsView).
// Semantics: softmax(scale * q.k^T + mask) v with grouped-query heads (query head h uses kv head
// h / (heads / kv_heads), as Hugging Face's repeat_kv).
// Numerics: the softmax subtracts the running maximum, so scores of any finite magnitude are
// safe (tested at |score| ~ 1e4 against the double reference within the a-priori bound
// e^{2 delta} - 1, delta = |s|max (head_dim + 4) 2^-24). A query row that sees no key gets zeros
// (never NaN), also on the split-K path. Finite inputs never give NaN or Inf. A NaN or Inf in q
// makes its rows NaN; in K, exactly the rows that see that key; in V, its dimension in the rows
// that see it, and possibly also in rows of the same query block (up to 96 rows) that evaluate
// its 64-key tile without seeing it (probability 0 times NaN is NaN). Inputs are not scanned.
// Under masks over cell caches (CellCausal, CellSentinel, CellOrder: `hides_unwritten`), what
// a key that no row of a query block sees (a free cell, another sequence's cell) holds (stale
// or never-written memory, NaN) cannot reach the output: its score is replaced by -inf, and a
// tile's P V that turned an output non-finite is redone without such keys (the same bits as
// zeros there). The reference ignores hidden keys under every mask. Exception: Compute::bf16
// packs whole tiles, and P V over them multiplies such keys by probability 0.
#pragma once
#include <cmath>

#include "../core/bf16dot.hpp"
#include "../core/error.hpp"
#include "../core/views.hpp"

namespace ctxcomp {

/// Options of `attention` and `reference::attention`.
struct AttentionOptions {
  float scale = 0.f;  ///< softmax scale; 0 means 1/sqrt(head_dim)
  /// Split the key range of decode-like calls (few rows per task or few tasks) into fixed
  /// 512-key splits merged by log-sum-exp, so that every core has work (flash-decoding). The
  /// splits follow the shapes only; `false` keeps one pass over the keys (results then differ
  /// from the split ones by fp32 reordering only).
  bool split_keys = true;
  /// Arithmetic of Q.K^T and P.V. `Compute::bf16`: the pre-scaled queries (q * scale * log2 e),
  /// K, V and the probabilities P are rounded to bf16 (simd::round_bf16; qint8 K is dequantised
  /// first, qint8 V keeps its integers and its scale multiplies P before rounding), products are
  /// accumulated in fp32 pairs as vdpbf16ps does (core/bf16dot.hpp), the softmax and its
  /// normaliser (the sum of the unrounded P) stay fp32. Every call then packs K and V tiles, so
  /// decode (few query rows, memory-bound) gains nothing from it. Error bound: docs/bf16.md.
  Compute compute = Compute::fp32;
};

namespace detail {
/// The checks of attention's arguments (K / V views: HeadsView or PagedHeadsView).
template <class Q, class KView, class VView, class O, class Mask>
void check_attention_args(const HeadsView<Q>& q, const KView& k, const VView& v, const HeadsView<O>& out,
                          const Mask& mask, const AttentionOptions& opt, const char* fn) {
  check_heads_view(q, fn, "q");
  check_heads_view(k, fn, "k");
  check_heads_view(v, fn, "v");
  check_heads_view(out, fn, "out");
  CTXCOMP_CHECK(q.heads > 0 && q.tokens > 0 && q.head_dim > 0, fn, ": q is empty (heads ", q.heads, ", tokens ",
                q.tokens, ", head_dim ", q.head_dim, ")");
  CTXCOMP_CHECK(k.heads > 0 && k.tokens > 0, fn, ": k is empty (kv_heads ", k.heads, ", tokens ", k.tokens, ")");
  CTXCOMP_CHECK(q.heads % k.heads == 0, fn, ": heads (", q.heads, ") is not a multiple of kv_heads (", k.heads, ")");
  CTXCOMP_CHECK(k.head_dim == q.head_dim, fn, ": k head_dim (", k.head_dim, ") differs from q head_dim (",
                q.head_dim, ")");
  CTXCOMP_CHECK(v.heads == k.heads && v.tokens == k.tokens && v.head_dim == k.head_dim, fn, ": v is [", v.heads,
                " x ", v.tokens, " x ", v.head_dim, "] but k is [", k.heads, " x ", k.tokens, " x ", k.head_dim, "]");
  CTXCOMP_CHECK(out.heads == q.heads && out.tokens == q.tokens && out.head_dim == q.head_dim, fn, ": out is [",
                out.heads, " x ", out.tokens, " x ", out.head_dim, "] but q is [", q.heads, " x ", q.tokens, " x ",
                q.head_dim, "]");
  CTXCOMP_CHECK(std::isfinite(opt.scale) && opt.scale >= 0.f, fn, ": scale (", opt.scale,
                ") must be finite and >= 0 (0 = 1/sqrt(head_dim))");
  mask.check(q.tokens, k.tokens, fn);
}

inline float effective_scale(const AttentionOptions& opt, index_t head_dim) {
  return opt.scale > 0.f ? opt.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
}
}  // namespace detail

}  // namespace ctxcomp
