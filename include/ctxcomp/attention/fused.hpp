// Fused multi-head attention: grouped-query heads, tiles of queries x keys with an online
// softmax (no score matrix larger than a tile), hidden tiles skipped through the structured
// mask. Layout: q/out [heads x q_len x head_dim], k/v [kv_heads x kv_len x head_dim] in float,
// bf16, fp16 or qint8 (widened in registers; fp32 accumulation); decode-like calls split the key
// range (flash-decoding) and merge the splits by log-sum-exp. Semantics: attention/options.hpp.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

#include "../core/executor.hpp"
#include "../core/kernels.hpp"
#include "../core/kv_views.hpp"
#include "../core/tile_gemm.hpp"
#include "../core/workspace.hpp"
#include "masks.hpp"
#include "options.hpp"

namespace ctxcomp {

namespace detail {

/// Tile geometry of one attention call. A task is (kv head, block of queries); its rows are the
/// block's queries times the group's query heads (row = query * group + head-in-group), so all
/// query heads that share a kv head read each K/V tile once. Decode-like calls (few rows per
/// task, or fewer tasks than kMinTasks) also cut the key range into splits of split_len keys
/// (flash-decoding); splits are fixed by the shapes, never by the thread count.
template <class V>
struct AttentionTiling {
  static constexpr index_t kv_tile = 64;
  static constexpr index_t target_rows = 96;
  // Below this many rows (decode), scores are dot products against K rows read in place;
  // above, K tiles are transposed once and reused by every row (outer-product GEMM).
  static constexpr index_t few_rows = 16;
  static constexpr index_t split_len = 512;  // keys per split, a multiple of kv_tile
  static constexpr index_t min_tasks = 8;    // calls with fewer tasks are split too
  // Decode with several rows per task asks for the K/V rows this far ahead (one tile): on a
  // one-row task (MHA decode) the hints cost more than they save.
  static constexpr index_t prefetch_rows = kv_tile;
  index_t group, q_block, rows, head_dim, dim_padded;
  index_t q_blocks, tasks, kv_tiles, splits;
  bool bf16 = false;  // Compute::bf16: K and V tiles packed as bf16 pairs, every row count
  index_t dim_even = 0;  // head_dim rounded up to whole pairs (bf16 compute)
  // kv heads whose queries and scores a worker holds at once: all of them for split few-row fp32
  // tasks (decode over token-major or paged K/V may interleave the heads), else one.
  index_t interleave_heads = 1;

  AttentionTiling(index_t heads, index_t kv_heads, index_t q_len, index_t d, index_t kv_len, bool split_keys = true,
                  Compute compute = Compute::fp32) {
    bf16 = compute == Compute::bf16;
    dim_even = (d + 1) / 2 * 2;
    group = heads / kv_heads;
    q_block = std::min(q_len, std::max<index_t>(1, target_rows / group));
    rows = q_block * group;
    head_dim = d;
    dim_padded = (d + V::width - 1) / V::width * V::width;
    q_blocks = (q_len + q_block - 1) / q_block;
    tasks = kv_heads * q_blocks;
    kv_tiles = (kv_len + kv_tile - 1) / kv_tile;
    splits = split_keys && kv_len > split_len && (rows < few_rows || tasks < min_tasks)
                 ? (kv_len + split_len - 1) / split_len
                 : 1;
    interleave_heads = !bf16 && splits > 1 && rows < few_rows ? kv_heads : 1;
  }
  /// Whether workers keep every transposed K tile of a kv head (see kt_tiles).
  bool keeps_k_tiles() const { return q_blocks > 1; }
  /// Many-row tasks transpose K tiles. With several query blocks per kv head, every transposed
  /// tile of the head is kept (reused by the next task of the same head); with one (decode, short
  /// chunks) no later task can reuse a tile, so one tile's room is re-used tile after tile (a
  /// fraction of the workspace; docs/performance.md). Few-row tasks read K in place.
  index_t kt_tiles() const { return rows < few_rows || bf16 ? 0 : keeps_k_tiles() ? kv_tiles : 1; }
  /// bf16 compute: every K and V tile of a kv head is packed once per worker and reused.
  index_t packed_tiles() const { return bf16 ? kv_tiles : 0; }
  std::size_t worker_bytes() const {
    return (bf16 ? Workspace::bytes_for<ctxcomp::bf16>(rows * dim_even)         // bf16 queries
                       + Workspace::bytes_for<ctxcomp::bf16>(packed_tiles() * kv_tile * (dim_even + dim_padded))
                       + Workspace::bytes_for<ctxcomp::bf16>(rows * kv_tile)  // bf16 probabilities
                       + Workspace::bytes_for<ctxcomp::bf16>(dim_padded + dim_even)  // one rounded row
                 : 0) +
           Workspace::bytes_for<float>(interleave_heads * rows * head_dim)  // packed, pre-scaled queries
           + Workspace::bytes_for<float>(head_dim * kv_tile * kt_tiles())  // transposed K tiles (many rows)
           + Workspace::bytes_for<index_t>(kv_tiles)                     // kv head each transposed tile holds
           + Workspace::bytes_for<index_t>(4 * kv_tile)                  // paged: offsets of K / V tile rows
           + Workspace::bytes_for<index_t>(kv_tile + 2)                  // runs of a tile's seen keys
           + Workspace::bytes_for<float>(interleave_heads * rows * dim_padded)  // outputs before a guarded P V
           + Workspace::bytes_for<float>(kv_tile * dim_padded)           // V tile (padded head_dim) / K row
           + Workspace::bytes_for<float>(2 * kv_tile)                    // K and V scales of a tile (qint8)
           + Workspace::bytes_for<float>(interleave_heads * rows * kv_tile)  // scores / probabilities
           + Workspace::bytes_for<float>(rows * dim_padded)              // output accumulator
           + 2 * Workspace::bytes_for<float>(rows);                      // running max and sum
  }
  /// Floats of one split's partial result: running max, sum and the unnormalised output.
  index_t partial_floats() const { return rows * (dim_padded + 2); }
};

}  // namespace detail

/// Bytes of workspace `attention` reserves for these shapes and concurrency.
template <class V = simd::Vec>
std::size_t attention_workspace_bytes(index_t heads, index_t kv_heads, index_t q_len, index_t kv_len, index_t head_dim,
                                      index_t concurrency = 1, bool split_keys = true,
                                      Compute compute = Compute::fp32);

namespace detail {

/// Per-worker tile buffers carved from the workspace.
struct AttentionBuffers {
  float *qp, *kt, *vp, *ks, *vs, *s, *o, *m, *l;
  index_t* kt_head;  // kt_head[tile] = kv head whose K tile `tile` is transposed in kt, or -1
  index_t* off;      // paged interleaved decode: row offsets of this and the next K tile, then V's
  index_t* seen;     // runs [seen[2i], seen[2i+1]) of a tile's keys that some row of the block sees
  float* o_saved;    // the outputs of the heads being computed, kept across a guarded P V
  // bf16 compute: queries, packed K tiles [dim_even / 2][kv_tile][2], packed V tiles
  // [kv_tile / 2][dim_padded][2] (both cached per kv head, marked in kt_head), probabilities, a row.
  ctxcomp::bf16 *qb, *ktb, *vtb, *pb, *rowb;
};

/// bf16 compute: one stored row (head_dim values of any KV type, qint8 with its scale) as
/// rounded bf16 operands in `out` (width `padded`, zeros past d); `tmp` holds d floats. A bf16
/// row of even length is used in place.
template <class V, class T>
inline const ctxcomp::bf16* operand_row(const T* row, float scale, index_t d, index_t padded, float* tmp,
                                        ctxcomp::bf16* out) noexcept {
  if constexpr (std::is_same_v<T, ctxcomp::bf16>) {
    (void)scale, (void)tmp;
    if (d == padded) return row;
    std::copy(row, row + d, out);
  } else {
    kernels::widen<V>(row, tmp, d);
    if constexpr (is_quantized_v<T>) kernels::scale<V>(tmp, scale, d);
    else (void)scale;
    simd::round_row_bf16<V>(tmp, out, d);
  }
  std::fill(out + d, out + padded, ctxcomp::bf16(0.f));
  return out;
}

/// Masks may split their query rows into groups that each have a simpler mask (e.g. SAC's
/// anchor mask: anchor rows see everything, the others are causal), so that no tile is computed
/// for a row that cannot see it. Such a mask provides
///   index_t row_groups() const
///   index_t group_rows(index_t g, index_t q_len, index_t* rows) const  // increasing; returns count;
///                                         // the groups partition the rows [0, q_len)
///   Mask'   group_mask(index_t g) const   // tile() exact or conservative over any subset of the
///                                         // group's rows between its bounds
template <class M, class = void>
struct has_row_groups : std::false_type {};
template <class M>
struct has_row_groups<M, std::void_t<decltype(std::declval<const M&>().row_groups())>> : std::true_type {};
/// Whether keys the mask hides may hold memory the host never wrote (masks over cell caches
/// declare `static constexpr bool hides_unwritten = true`; see attention/masks.hpp).
template <class M, class = void>
struct hides_unwritten : std::false_type {};
template <class M>
struct hides_unwritten<M, std::void_t<decltype(M::hides_unwritten)>> : std::bool_constant<M::hides_unwritten> {};
template <class M>
inline constexpr bool hides_unwritten_v = hides_unwritten<M>::value;

/// A set of query rows with one mask: rows[0, n) (rows == nullptr: 0, 1, ..., n-1).
template <class Mask>
struct RowGroup {
  const index_t* rows = nullptr;
  index_t n = 0;
  Mask mask{};
};
inline constexpr index_t kMaxRowGroups = 4;

/// Upper bound of the task count of any row grouping of a call tiled as T (a group's q_block is
/// never larger than the whole call's, and each group adds at most one partial block).
template <class V>
index_t max_tasks(const AttentionTiling<V>& T, index_t kv_heads) {
  return kv_heads * (T.q_blocks + kMaxRowGroups);
}

/// The fused kernel over row groups, with buffers sized for all q rows. Tasks run kv-head by
/// kv-head across the groups, so every group's tasks of a head reuse its transposed K tiles
/// (when the call has several query blocks; see AttentionTiling::kt_tiles).
/// With T.splits > 1 each (task, split) work item covers one key range and leaves its running
/// max, sum and unnormalised output in `partial`; a log-sum-exp merge then writes `out`.
/// K and V of any storage type are widened in registers (qint8: scales folded into the scores
/// and the probabilities).
template <class V, bool BF16, class Q, class KView, class VView, class O, class Mask>
void attention_rows(HeadsView<Q> q, KView k, VView v, const RowGroup<Mask>* groups,
                    index_t group_count, HeadsView<O> out, float qscale, const AttentionBuffers* buf,
                    index_t splits, float* partial, ExecutorRef exec) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  using KS = std::remove_const_t<typename KView::element_type>;
  using VS = std::remove_const_t<typename VView::element_type>;
  // Paged K/V: the in-place kernels run once per stretch of rows within a page, and decode's
  // prefetch hints go through the page table (paged_pf below), not a fixed stride.
  constexpr bool paged = is_paged_view_v<KView> || is_paged_view_v<VView>;
  using OS = std::remove_const_t<O>;
  AttentionTiling<V> tilings[kMaxRowGroups] = {
      {q.heads, k.heads, 1, q.head_dim, k.tokens}, {q.heads, k.heads, 1, q.head_dim, k.tokens},
      {q.heads, k.heads, 1, q.head_dim, k.tokens}, {q.heads, k.heads, 1, q.head_dim, k.tokens}};
  index_t per_head = 0;
  for (index_t gi = 0; gi < group_count; ++gi) {
    tilings[gi] = AttentionTiling<V>(q.heads, k.heads, groups[gi].n, q.head_dim, k.tokens, true,
                                     BF16 ? Compute::bf16 : Compute::fp32);
    per_head += tilings[gi].q_blocks;
  }
  const index_t kv_len = k.tokens;
  const index_t split_len = splits > 1 ? AttentionTiling<V>::split_len : kv_len;
  // Every partial slot has room for the largest task (the whole call's tiling, whose buffers the
  // workers have).
  const AttentionTiling<V> call(q.heads, k.heads, q.tokens, q.head_dim, k.tokens, splits > 1,
                                 BF16 ? Compute::bf16 : Compute::fp32);
  const index_t slot = call.partial_floats();
  const bool keep_kt = call.keeps_k_tiles();  // the workers' buffers hold every transposed K tile

  // Which group and block a task is.
  auto locate = [&](index_t task, index_t& gi, index_t& local) {
    local = task % per_head;
    gi = 0;
    while (local >= tilings[gi].q_blocks) local -= tilings[gi++].q_blocks;
  };

  // Token-major K/V (a token's heads side by side: llama.cpp cells, NHD pages) and pages that
  // hold every head of their tokens (HND) read head by head jump between pages and strides that
  // restart the hardware prefetchers at every page. Split decode over such caches runs
  // interleaved instead: one item is a block and a key split of every kv head, and each tile is
  // read run by run (what lies within one page; see kRun below), every head's rows of a run
  // in turn, so that memory is read page after page. Each head keeps its queries and scores in
  // its own rows of the worker's buffers and its running state in its own partial slot; every
  // head's arithmetic is the per-head path's, in the same order: the same bits.
  auto heads_together = [](const auto& x) {
    if constexpr (is_paged_view_v<std::decay_t<decltype(x)>>) return x.heads > 1 && (x.heads - 1) * x.head_stride < x.page_stride;
    else return x.heads > 1 && x.head_stride < x.token_stride;
  };
  const bool interleave = !BF16 && group_count == 1 && call.interleave_heads == k.heads &&
                          tilings[0].rows < AttentionTiling<V>::few_rows && heads_together(k) && heads_together(v);
  // Where decode's prefetch hints send the lines (docs/performance.md): L1 for a head-major cache
  // (one tile ahead in the head's own stream) and for pages (the next page); L2 for interleaved
  // token-major rows, whose next run is far enough away in the reads of the other heads that L1
  // would evict it first.
  const simd::PrefetchTo pf_to = interleave && !paged ? simd::PrefetchTo::l2 : simd::PrefetchTo::l1;
  // Interleaved decode over head-major pages (HND: a head's rows of a page side by side) shorter
  // than a tile reads each head's whole tile in one call, its rows gathered through the page
  // table (offsets from the pool, one lookup per page), so a head's output block is loaded and
  // stored once per tile, not once per page; each row read asks for the same head's row one tile
  // on. Pages of a tile or more keep whole-page runs (one call per page already). Token-major
  // rows (NHD pages, cells) keep the page-by-page runs: read tile by tile per head, their lines
  // would be fetched once per head. Figures: docs/performance.md.
  auto short_pages = [&](const auto& x) {
    if constexpr (is_paged_view_v<std::decay_t<decltype(x)>>)
      return x.token_stride < x.head_stride && x.page_size < AttentionTiling<V>::kv_tile;
    else
      return (void)x, false;
  };
  const bool gather = paged && interleave && short_pages(k) && short_pages(v);

  exec.parallel_for(interleave ? per_head * splits : k.heads * per_head * splits, [&](index_t item, index_t worker) {
    const AttentionBuffers& b = buf[worker];
    const index_t split = item % splits;
    const index_t task = item / splits;  // interleaved: the block's task of kv head 0
    index_t kh = task / per_head;        // interleaved: the head being finished
    index_t gi, local;
    locate(task, gi, local);
    const AttentionTiling<V> T = tilings[gi];  // local copies: no reloads after stores in the loops
    const Mask mask = groups[gi].mask;
    const index_t* rows_of = groups[gi].rows;
    const index_t nrows = groups[gi].n;
    const index_t Bk = T.kv_tile, d = T.head_dim, dp = T.dim_padded, g = T.group;
    auto row = [rows_of](index_t i) { return rows_of ? rows_of[i] : i; };
    const index_t q0 = local * T.q_block, q1 = std::min(nrows, q0 + T.q_block);
    const index_t nq = q1 - q0, rows = nq * g;
    // The block's query rows lie within [r0, r1) (all of them when rows_of is null).
    const index_t r0 = row(q0), r1 = row(q1 - 1) + 1;
    const index_t kb = split * split_len, ke = std::min(kv_len, kb + split_len);
    const index_t h0 = interleave ? 0 : kh, h1 = interleave ? k.heads : kh + 1;  // the heads computed

    const index_t d2 = T.dim_even;
    // Queries and scores of kv head h: the worker's rows (interleaved: head h's own rows).
    auto qp_of = [&](index_t h) { return interleave ? b.qp + h * rows * d : b.qp; };
    auto s_of = [&](index_t h) { return interleave ? b.s + h * rows * Bk : b.s; };
    auto load_queries = [&](index_t h) {  // the block's queries of kv head h, pre-scaled
      for (index_t qi = 0; qi < nq; ++qi)
        for (index_t hh = 0; hh < g; ++hh) {
          float* dst = qp_of(h) + (qi * g + hh) * d;
          kernels::widen<V>(q.row(h * g + hh, row(q0 + qi)), dst, d);
          kernels::scale<V>(dst, qscale, d);
          if constexpr (BF16) {  // the pre-scaled query is the rounded operand
            ctxcomp::bf16* qb = b.qb + (qi * g + hh) * d2;
            simd::round_row_bf16<V>(dst, qb, d);
            std::fill(qb + d, qb + d2, ctxcomp::bf16(0.f));
          }
        }
    };
    // The running state of kv head h: the worker's buffers, or (interleaved) its partial slot.
    float *m_ = b.m, *l_ = b.l, *o_ = b.o;
    auto state_of = [&](index_t h) {
      if (!interleave) return;
      float* p = partial + ((h * per_head + local) * splits + split) * slot;
      m_ = p, l_ = p + rows, o_ = p + 2 * rows;
    };
    for (index_t h = h0; h < h1; ++h) {
      state_of(h);
      std::fill(o_, o_ + rows * dp, 0.f);
      std::fill(m_, m_ + rows, kNegInf);
      std::fill(l_, l_ + rows, 0.f);
      load_queries(h);
    }
    if (dp != d)  // padding columns of V stay zero for the whole task
      for (index_t kk = 0; kk < Bk; ++kk) std::fill(b.vp + kk * dp + d, b.vp + (kk + 1) * dp, 0.f);

    // The scores s of kv head kh over keys [k0, k0 + nk) (tile visibility vis) become
    // probabilities: qint8 K scales, the mask, the online softmax into the state (m_, l_, o_),
    // qint8 V scales.
    auto softmax_tile = [&](float* s_tile, index_t k0, index_t nk, TileVisibility vis) {
      float* const bm = m_;
      float* const bl = l_;
      float* const bo = o_;
      if constexpr (!BF16 && is_quantized_v<KS>) {
        if (rows < T.few_rows) {  // the dot-product form leaves the scales to the finished scores
          for (index_t kk = 0; kk < nk; ++kk) b.ks[kk] = k.scale(kh, k0 + kk);
          for (index_t r = 0; r < rows; ++r) kernels::mul<V>(s_tile + r * Bk, b.ks, nk);
        }
      }
      if (vis == TileVisibility::Mixed) {
        for (index_t qi = 0; qi < nq; ++qi) {
          const index_t r = row(q0 + qi);
          for (index_t kk = 0; kk < nk; ++kk)
            if (!mask.visible(r, k0 + kk))
              for (index_t hh = 0; hh < g; ++hh) s_tile[(qi * g + hh) * Bk + kk] = kNegInf;
        }
      }
      if (nk < Bk)
        for (index_t r = 0; r < rows; ++r) std::fill(s_tile + r * Bk + nk, s_tile + (r + 1) * Bk, kNegInf);

      // Online softmax: rescale what was accumulated when the running max grows.
      for (index_t r = 0; r < rows; ++r) {
        float* s = s_tile + r * Bk;
        const float mt = kernels::row_max<V>(s, Bk);
        // Nothing visible in this tile for this row, unless the maximum is -inf because a NaN
        // score swallowed the visible ones (max(NaN, -inf) is -inf on some paths): a NaN goes on
        // and propagates as documented.
        if (mt == kNegInf && std::none_of(s, s + Bk, [](float x) { return x != x; })) {
          std::fill(s, s + Bk, 0.f);
          continue;
        }
        const float mnew = std::max(bm[r], mt);
        // An unchanged finite maximum rescales by exp2(0) = 1 exactly: no call (most decode tiles).
        const float alpha = bm[r] == mnew && std::isfinite(mnew) ? 1.f : simd::ScalarVec::exp2(bm[r] - mnew);
        const float sum = kernels::exp2_shifted<V>(s, mnew, Bk);
        bl[r] = bl[r] * alpha + sum;
        if (alpha != 1.f) kernels::scale<V>(bo + r * dp, alpha, dp);
        bm[r] = mnew;
      }
      if constexpr (is_quantized_v<VS>) {  // p * (scale * q) = (p * scale) * q
        for (index_t kk = 0; kk < nk; ++kk) b.vs[kk] = v.scale(kh, k0 + kk);
        for (index_t r = 0; r < rows; ++r)
          for (index_t kk = 0; kk < nk; ++kk) s_tile[r * Bk + kk] *= b.vs[kk];
      }
    };

    // Paged interleaved decode: offsets of this tile's rows and the next tile's (K, then V),
    // and the first key of the tile the next ones are of (-1: none).
    index_t *ko = b.off, *kn = ko + Bk, *vo = kn + Bk, *vn = vo + Bk;
    index_t next_tile = -1;
    // Offsets from the pool of head 0's rows t0 .. t0 + n - 1 of a paged view: one page-table
    // lookup per page.
    auto tile_offsets = [](const auto& x, index_t t0, index_t n, index_t* off) {
      if constexpr (is_paged_view_v<std::decay_t<decltype(x)>>) {
        for (index_t j = 0, r; j < n; j += r) {
          r = x.run(t0 + j, n - j);
          const index_t o = index_t(x.row(0, t0 + j) - x.pool);
          for (index_t i = 0; i < r; ++i) off[j + i] = o + i * x.token_stride;
        }
      } else {
        (void)x, (void)t0, (void)n, (void)off;
      }
    };

    for (index_t k0 = kb; k0 < ke; k0 += Bk) {
      const index_t k1 = std::min(ke, k0 + Bk), nk = k1 - k0;
      const TileVisibility vis = mask.tile(r0, r1, k0, k1);
      if (vis == TileVisibility::None) continue;
      // The keys of the tile that P V reads, as runs of tile offsets: the whole tile. Under a
      // mask whose hidden keys may be memory the host never wrote (cell caches: free cells,
      // another sequence's cells), a Mixed tile's P V is guarded: if an output it touched turns
      // non-finite, the outputs are restored and P V runs again over the keys some row of the
      // block sees (find_seen), so what hidden keys hold (stale or never-written memory, NaN)
      // does not reach the output (probability 0 times NaN is NaN). Their terms are exact zeros:
      // without them every output's FMA chain keeps its other terms in order, the same bits for
      // finite data. Scores are always computed over whole runs (a hidden key's score becomes
      // -inf whatever it was). Leaving hidden keys out every time cost more than the guard: V
      // was no longer read as one stream (docs/performance.md).
      index_t* const seen = b.seen;
      index_t nseen = 1;
      seen[0] = 0, seen[1] = nk;
      const bool guard = vis == TileVisibility::Mixed && hides_unwritten_v<Mask>;
      auto find_seen = [&] {
        auto key_seen = [&](index_t key) {  // the tile answer for the one key, else row by row
          if (nq == 1) return mask.visible(r0, key);
          const TileVisibility kv = mask.tile(r0, r1, key, key + 1);
          if (kv != TileVisibility::Mixed) return kv == TileVisibility::All;
          for (index_t qi = nq; qi-- > 0;)
            if (mask.visible(row(q0 + qi), key)) return true;
          return false;
        };
        nseen = 0;
        for (index_t kk = 0; kk < nk;) {
          while (kk < nk && !key_seen(k0 + kk)) ++kk;
          if (kk == nk) break;
          seen[2 * nseen] = kk;
          while (kk < nk && key_seen(k0 + kk)) ++kk;
          seen[2 * nseen++ + 1] = kk;
        }
      };
      auto whole = [&] { return nseen == 1 && seen[0] == 0 && seen[1] == nk; };
      // Runs pv() (P V of kv heads [hb, he)) under the guard described above.
      auto guarded = [&](index_t hb, index_t he, auto&& pv) {
        if (!guard) return pv();
        const index_t n = rows * dp;
        for (index_t h = hb; h < he; ++h) {
          state_of(h);
          std::copy(o_, o_ + n, b.o_saved + (h - hb) * n);
        }
        pv();
        bool finite = true;
        for (index_t h = hb; h < he && finite; ++h) {
          state_of(h);
          finite = kernels::all_finite<V>(o_, n);
        }
        if (finite) return;
        for (index_t h = hb; h < he; ++h) {
          state_of(h);
          std::copy(b.o_saved + (h - hb) * n, b.o_saved + (h + 1 - hb) * n, o_);
        }
        find_seen();
        pv();
      };
      // Calls f(j, n) for consecutive stretches [j, j + n) of the seen keys, each within one
      // run of the view (a page) and at most `cap` keys long.
      auto for_seen = [&](const auto& x, index_t cap, auto&& f) {
        for (index_t i = 0; i < nseen; ++i)
          for (index_t j = seen[2 * i], e = seen[2 * i + 1], n; j < e; j += n) {
            n = std::min(x.run(k0 + j, e - j), cap);
            f(j, n);
          }
      };
      // P V for kv head h with V rows widened into b.vp (head_dim off the vector width: padded
      // rows), one call per run of seen keys.
      auto pv_widened = [&](const auto& x, index_t h, const float* p, float* o) {
        for (index_t i = 0; i < nseen; ++i) {
          const index_t j0 = seen[2 * i], j1 = seen[2 * i + 1];
          for (index_t kk = j0; kk < j1; ++kk) kernels::widen<V>(x.row(h, k0 + kk), b.vp + kk * dp, d);
          kernels::tile_gemm<true, V>(p + j0, Bk, b.vp + j0 * dp, dp, o, dp, rows, dp, j1 - j0);
        }
      };
      // Few-row decode streams K and V from memory: each row read asks for the row one tile on
      // (within its kv head), so its lines arrive while this tile is computed.
      const index_t pf =
          !paged && rows < T.few_rows && k0 + T.prefetch_rows + Bk <= kv_len ? T.prefetch_rows : 0;
      // Paged decode: the rows one tile on lie in other pages, where the hardware prefetchers
      // start over. Each stretch of rows within a page asks for the stretch one tile on through
      // the page table (exact when the page size divides the tile; a hint either way).
      auto rows_to = [](const auto& x, index_t h, index_t t, index_t u) -> index_t {  // row (h, u) - row (h, t)
        const index_t off = index_t(x.row(h, u) - x.row(h, t));
        return off % x.token_stride == 0 ? off / x.token_stride : 0;
      };
      // Many rows in one block per kv head (decode with many query heads per kv head): each K
      // and V tile is used once, streamed from memory; the next one is asked for into L2.
      const bool stream = !paged && rows >= T.few_rows && T.q_blocks == 1 && k0 + 2 * Bk <= kv_len;
      auto prefetch = [&](const auto& x, index_t h, index_t t) -> index_t {
        if (stream) return Bk;
        if (!paged) return pf;
        return rows < T.few_rows && t + Bk < kv_len ? rows_to(x, h, t, t + Bk) : 0;
      };
      // Interleaved decode: a run of n rows asks for the next run (the next page), which is read
      // once every head's share of this run has been.
      auto next_run = [&](const auto& x, index_t h, index_t t, index_t n) -> index_t {
        if (t + 2 * n > kv_len) return 0;
        return paged ? rows_to(x, h, t, t + n) : n;
      };

      if constexpr (!BF16) {
        if (interleave) {  // (few rows: the dot-product form) every head, run by run
          // Token-major rows (cells, NHD pages) hold every head's row of a token side by side:
          // runs of at most 16 tokens keep the heads' reads close together. Head-major pages
          // (HND) hold each head's rows of a page together: a whole page per head is read in
          // order, with a run's output block loaded and stored once (shorter runs cost more:
          // docs/performance.md).
          // Head-major pages shorter than a tile: see `gather` above. Per head, every dot
          // product and every output's FMA chain is the per-head path's: the same bits.
          constexpr index_t kRun = 16;
          auto run_cap = [&](const auto& x) { return x.token_stride < x.head_stride ? Bk : kRun; };
          const index_t krun = run_cap(k), vrun = run_cap(v);
          if (gather) {
            if (next_tile == k0) {  // this tile's offsets are the previous tile's next ones
              std::swap(ko, kn), std::swap(vo, vn);
            } else {
              tile_offsets(k, k0, nk, ko);
              tile_offsets(v, k0, nk, vo);
            }
            const index_t nn = std::min(Bk, kv_len - k0 - Bk);  // rows of the next tile (<= 0: none)
            if (nn > 0) {
              tile_offsets(k, k0 + Bk, nn, kn);
              tile_offsets(v, k0 + Bk, nn, vn);
            }
            for (index_t i = std::max<index_t>(nn, 0); i < nk; ++i)  // hints name rows that exist
              kn[i] = nn > 0 ? kn[nn - 1] : ko[i], vn[i] = nn > 0 ? vn[nn - 1] : vo[i];
            next_tile = nn > 0 ? k0 + Bk : -1;
            if constexpr (paged)
              for (index_t h = 0; h < k.heads; ++h)
                kernels::tile_gemm_nt_gathered<V>(qp_of(h), d, k.pool + h * k.head_stride, ko, kn, s_of(h), Bk, rows,
                                                  nk, d, simd::PrefetchTo::l1);
          } else {
            for (index_t j = 0, n; j < nk; j += n) {
              n = std::min(k.run(k0 + j, nk - j), krun);
              for (index_t h = 0; h < k.heads; ++h)
                kernels::tile_gemm_nt<V>(qp_of(h), d, k.row(h, k0 + j), k.token_stride, s_of(h) + j, Bk, rows, n, d,
                                         next_run(k, h, k0 + j, n), pf_to);
            }
          }
          for (index_t h = 0; h < k.heads; ++h) {
            kh = h;
            state_of(h);
            softmax_tile(s_of(h), k0, nk, vis);
          }
          guarded(0, k.heads, [&] {
            if (dp != d) {
              for (index_t h = 0; h < k.heads; ++h) {
                state_of(h);
                pv_widened(v, h, s_of(h), o_);
              }
            } else if (gather && whole()) {
              if constexpr (paged)
                for (index_t h = 0; h < k.heads; ++h) {
                  state_of(h);
                  kernels::tile_gemm_gathered<true, V>(s_of(h), Bk, v.pool + h * v.head_stride, vo, vn, o_, dp, rows,
                                                       dp, nk, simd::PrefetchTo::l1);
                }
            } else {
              for_seen(v, vrun, [&](index_t j, index_t n) {
                for (index_t h = 0; h < k.heads; ++h) {
                  state_of(h);
                  kernels::tile_gemm<true, V>(s_of(h) + j, Bk, v.row(h, k0 + j), v.token_stride, o_, dp, rows, dp, n,
                                              next_run(v, h, k0 + j, n), pf_to);
                }
              });
            }
          });
          continue;
        }
      }

      if constexpr (BF16) {
        // bf16 compute: K and V tiles of this kv head packed as bf16 pairs once per worker
        // (exact for bf16 storage; others rounded; qint8 K dequantised first, qint8 V kept as
        // its integers, exact in bf16, its scale going into the probabilities below).
        const index_t tile = k0 / Bk;
        ctxcomp::bf16* ktb = b.ktb + tile * Bk * d2;
        ctxcomp::bf16* vtb = b.vtb + tile * Bk * dp;
        if (b.kt_head[tile] != kh) {
          for (index_t kk = 0; kk < Bk; ++kk) {
            if (kk < nk) {
              const float ks = is_quantized_v<KS> ? k.scale(kh, k0 + kk) : 1.f;
              const ctxcomp::bf16* kr = operand_row<V>(k.row(kh, k0 + kk), ks, d, d2, b.vp, b.rowb);
              for (index_t p = 0; p < d2 / 2; ++p) std::copy(kr + 2 * p, kr + 2 * p + 2, ktb + (p * Bk + kk) * 2);
              const ctxcomp::bf16* vr = operand_row<V>(v.row(kh, k0 + kk), 1.f, d, dp, b.vp, b.rowb);
              ctxcomp::bf16* vd = vtb + (kk / 2) * dp * 2 + kk % 2;
              for (index_t j = 0; j < dp; ++j) vd[2 * j] = vr[j];
            } else {
              for (index_t p = 0; p < d2 / 2; ++p) std::fill(ktb + (p * Bk + kk) * 2, ktb + (p * Bk + kk) * 2 + 2, ctxcomp::bf16(0.f));
              ctxcomp::bf16* vd = vtb + (kk / 2) * dp * 2 + kk % 2;
              for (index_t j = 0; j < dp; ++j) vd[2 * j] = ctxcomp::bf16(0.f);
            }
          }
          b.kt_head[tile] = kh;
        }
        kernels::tile_gemm_bf16<false, V>(b.qb, d2, ktb, 2 * Bk, b.s, Bk, rows, Bk, d2 / 2);
      } else if (rows < T.few_rows) {
        // Dot-product form: K rows read in place from the cache, widened in registers; qint8
        // scales multiply the finished dot products (softmax_tile).
        for (index_t j = 0, n; j < nk; j += n) {  // one call for a contiguous view
          n = k.run(k0 + j, nk - j);
          kernels::tile_gemm_nt<V>(b.qp, d, k.row(kh, k0 + j), k.token_stride, b.s + j, Bk, rows, n, d,
                                   prefetch(k, kh, k0 + j), pf_to);
        }
      } else {
        // K tile, transposed to [d x Bk] (columns past the last key are zero), once per kv head
        // and worker when the buffers keep every tile (kt_tiles): later tasks of the same head
        // reuse it; else into the one tile's room, every time. Rows are widened by vector loads.
        const index_t tile = k0 / Bk;
        float* kt = b.kt + (keep_kt ? tile : 0) * d * Bk;
        if (!keep_kt || b.kt_head[tile] != kh) {
          if constexpr (is_quantized_v<KS>)
            for (index_t kk = 0; kk < nk; ++kk) b.ks[kk] = k.scale(kh, k0 + kk);
          for (index_t j = 0, n; j < nk; j += n) {  // one call per run of rows (a page)
            n = k.run(k0 + j, nk - j);
            kernels::widen_transposed<V>(k.row(kh, k0 + j), k.token_stride, n, d,
                                         is_quantized_v<KS> ? b.ks + j : nullptr, kt + j, Bk, stream ? Bk : 0);
          }
          if (nk < Bk)
            for (index_t i = 0; i < d; ++i) std::fill(kt + i * Bk + nk, kt + (i + 1) * Bk, 0.f);
          if (keep_kt) b.kt_head[tile] = kh;
        }
        kernels::tile_gemm<false, V>(b.qp, d, kt, Bk, b.s, Bk, rows, Bk, d);
      }

      softmax_tile(b.s, k0, nk, vis);

      if constexpr (BF16) {  // P rounded to bf16 pairs along the keys; V packed above
        for (index_t r = 0; r < rows; ++r) simd::round_row_bf16<V>(b.s + r * Bk, b.pb + r * Bk, Bk);
        kernels::tile_gemm_bf16<true, V>(b.pb, Bk, b.vtb + (k0 / Bk) * Bk * dp, 2 * dp, b.o, dp, rows, dp, Bk / 2);
        continue;
      }
      guarded(kh, kh + 1, [&] {
        if (dp == d && paged && rows >= T.few_rows) {
          // Many rows over paged V: the tile's rows staged contiguously (as stored) in b.vp,
          // free here, so the output block is loaded and stored once per tile (per run of seen
          // keys when guarded), not once per page.
          VS* staged = reinterpret_cast<VS*>(b.vp);
          for (index_t i = 0; i < nseen; ++i) {
            const index_t j0 = seen[2 * i], j1 = seen[2 * i + 1];
            for (index_t kk = j0; kk < j1; ++kk) std::copy(v.row(kh, k0 + kk), v.row(kh, k0 + kk) + d, staged + kk * d);
            kernels::tile_gemm<true, V>(b.s + j0, Bk, staged + j0 * d, d, b.o, dp, rows, dp, j1 - j0);
          }
        } else if (dp == d) {  // V rows used in place, widened in registers
          // Splitting the keys continues each output's FMA chain in order: the same bits.
          for_seen(v, nk, [&](index_t j, index_t n) {
            kernels::tile_gemm<true, V>(b.s + j, Bk, v.row(kh, k0 + j), v.token_stride, b.o, dp, rows, dp, n,
                                        prefetch(v, kh, k0 + j), stream ? simd::PrefetchTo::l2 : pf_to);
          });
        } else {
          pv_widened(v, kh, b.s, b.o);
        }
      });
    }

    if (interleave) return;  // the state is in the partial slots already
    if (splits > 1) {  // leave the partial result for the merge
      float* p = partial + item * slot;
      std::copy(b.m, b.m + rows, p);
      std::copy(b.l, b.l + rows, p + rows);
      std::copy(b.o, b.o + rows * dp, p + 2 * rows);
      return;
    }
    for (index_t qi = 0; qi < nq; ++qi)
      for (index_t hh = 0; hh < g; ++hh) {
        const index_t r = qi * g + hh;
        const float inv = b.l[r] > 0.f ? 1.f / b.l[r] : 0.f;  // no visible key: zeros, never NaN
        auto* dst = out.row(kh * g + hh, row(q0 + qi));
        const float* src = b.o + r * dp;
        for (index_t i = 0; i < d; ++i) dst[i] = from_float<OS>(src[i] * inv);
      }
  });
  if (splits == 1) return;

  // Log-sum-exp merge of the splits of every task, in split order (fixed: bit-identical for any
  // thread count): M = max m_s, L = sum l_s 2^(m_s - M), out = sum o_s 2^(m_s - M) / L.
  exec.parallel_for(k.heads * per_head, [&](index_t task, index_t worker) {
    const AttentionBuffers& b = buf[worker];
    const index_t kh = task / per_head;
    index_t gi, local;
    locate(task, gi, local);
    const AttentionTiling<V>& T = tilings[gi];
    const index_t* rows_of = groups[gi].rows;
    const index_t q0 = local * T.q_block, q1 = std::min(groups[gi].n, q0 + T.q_block);
    const index_t nq = q1 - q0, g = T.group, rows = nq * g, d = T.head_dim, dp = T.dim_padded;
    for (index_t r = 0; r < rows; ++r) {
      float mx = kNegInf;
      for (index_t sp = 0; sp < splits; ++sp) mx = std::max(mx, partial[(task * splits + sp) * slot + r]);
      float* acc = b.o;
      std::fill(acc, acc + dp, 0.f);
      float total = 0.f;
      if (mx != kNegInf)
        for (index_t sp = 0; sp < splits; ++sp) {
          const float* p = partial + (task * splits + sp) * slot;
          if (p[r] == kNegInf) continue;  // the split saw nothing for this row
          const float w = simd::ScalarVec::exp2(p[r] - mx);
          total += p[rows + r] * w;
          kernels::axpy<V>(w, p + 2 * rows + r * dp, acc, dp);
        }
      const float inv = total > 0.f ? 1.f / total : 0.f;
      const index_t qi = r / g, hh = r % g;
      auto* dst = out.row(kh * g + hh, rows_of ? rows_of[q0 + qi] : q0 + qi);
      for (index_t i = 0; i < d; ++i) dst[i] = from_float<OS>(acc[i] * inv);
    }
  });
}

}  // namespace detail

template <class V>
std::size_t attention_workspace_bytes(index_t heads, index_t kv_heads, index_t q_len, index_t kv_len, index_t head_dim,
                                      index_t concurrency, bool split_keys, Compute compute) {
  detail::AttentionTiling<V> t(heads, kv_heads, q_len, head_dim, kv_len, split_keys, compute);
  const index_t items = detail::max_tasks(t, kv_heads) * t.splits;
  return static_cast<std::size_t>(std::max<index_t>(1, concurrency)) * t.worker_bytes() +
         (t.splits > 1 ? Workspace::bytes_for<float>(items * t.partial_floats()) : 0) +
         Workspace::bytes_for<index_t>(q_len);
}

namespace detail {
/// The body of both `attention` overloads (K / V as HeadsView or PagedHeadsView).
template <class V, class Q, class KView, class VView, class O, class Mask>
void attention_impl(HeadsView<Q> q, KView k, VView v, const Mask& mask, HeadsView<O> out, const AttentionOptions& opt,
                    Workspace& ws, ExecutorRef exec) {
  static_assert(!std::is_const_v<O>, "attention: out must be writable");
  detail::check_attention_args(q, k, v, out, mask, opt, "attention");
  constexpr float kLog2e = 1.4426950408889634f;
  // Buffers sized for all q rows fit any subset of them (a group's tiling is never larger).
  const detail::AttentionTiling<V> T(q.heads, k.heads, q.tokens, q.head_dim, k.tokens, opt.split_keys, opt.compute);
  const float qscale = detail::effective_scale(opt, T.head_dim) * kLog2e;  // softmax in base 2
  const index_t items = detail::max_tasks(T, k.heads) * T.splits;
  // One buffer set per worker slot the executor may use (any slot may run any task).
  const index_t workers = std::max<index_t>(1, exec.concurrency());
  CTXCOMP_CHECK(workers <= 64, "attention: executor concurrency (", workers, ") above the supported 64");
  ws.reserve(attention_workspace_bytes<V>(q.heads, k.heads, q.tokens, k.tokens, q.head_dim, workers, opt.split_keys,
                                          opt.compute));
  detail::AttentionBuffers buf[64];
  for (index_t w = 0; w < workers; ++w) {
    buf[w].qp = ws.take<float>(T.interleave_heads * T.rows * T.head_dim);
    buf[w].kt = ws.take<float>(T.head_dim * T.kv_tile * T.kt_tiles());
    buf[w].vp = ws.take<float>(T.kv_tile * T.dim_padded);
    buf[w].ks = ws.take<float>(2 * T.kv_tile);
    buf[w].vs = buf[w].ks + T.kv_tile;
    buf[w].s = ws.take<float>(T.interleave_heads * T.rows * T.kv_tile);
    buf[w].o = ws.take<float>(T.rows * T.dim_padded);
    buf[w].m = ws.take<float>(T.rows);
    buf[w].l = ws.take<float>(T.rows);
    buf[w].kt_head = ws.take<index_t>(T.kv_tiles);
    buf[w].off = ws.take<index_t>(4 * T.kv_tile);
    buf[w].seen = ws.take<index_t>(T.kv_tile + 2);
    buf[w].o_saved = ws.take<float>(T.interleave_heads * T.rows * T.dim_padded);
    std::fill(buf[w].kt_head, buf[w].kt_head + T.kv_tiles, index_t(-1));
    buf[w].qb = buf[w].ktb = buf[w].vtb = buf[w].pb = buf[w].rowb = nullptr;
    if (T.bf16) {
      buf[w].qb = ws.take<bf16>(T.rows * T.dim_even);
      buf[w].ktb = ws.take<bf16>(T.packed_tiles() * T.kv_tile * T.dim_even);
      buf[w].vtb = ws.take<bf16>(T.packed_tiles() * T.kv_tile * T.dim_padded);
      buf[w].pb = ws.take<bf16>(T.rows * T.kv_tile);
      buf[w].rowb = ws.take<bf16>(T.dim_padded + T.dim_even);
    }
  }
  float* partial = T.splits > 1 ? ws.take<float>(items * T.partial_floats()) : nullptr;
  if constexpr (detail::has_row_groups<Mask>::value) {
    index_t* rows = ws.take<index_t>(q.tokens);
    using GroupMask = decltype(mask.group_mask(0));
    CTXCOMP_CHECK(mask.row_groups() <= detail::kMaxRowGroups, "attention: the mask has ", mask.row_groups(),
                  " row groups, above the supported ", detail::kMaxRowGroups);
    detail::RowGroup<GroupMask> groups[detail::kMaxRowGroups];
    index_t count = 0, used = 0;
    for (index_t grp = 0; grp < mask.row_groups(); ++grp) {
      const index_t n = mask.group_rows(grp, q.tokens, rows + used);
      if (n > 0) groups[count++] = {rows + used, n, mask.group_mask(grp)};
      used += n;
    }
    if (T.bf16) detail::attention_rows<V, true>(q, k, v, groups, count, out, qscale, buf, T.splits, partial, exec);
    else detail::attention_rows<V, false>(q, k, v, groups, count, out, qscale, buf, T.splits, partial, exec);
  } else {
    const detail::RowGroup<Mask> all{nullptr, q.tokens, mask};
    if (T.bf16) detail::attention_rows<V, true>(q, k, v, &all, 1, out, qscale, buf, T.splits, partial, exec);
    else detail::attention_rows<V, false>(q, k, v, &all, 1, out, qscale, buf, T.splits, partial, exec);
  }
}

}  // namespace detail

/// out = softmax(scale * q k^T | mask) v. heads % kv_heads == 0, else ctxcomp::Error. A query row
/// with no visible key gets zeros. On error nothing is written. Results do not depend on the
/// executor's thread count (tasks and key splits are fixed by the shapes; each writes its own
/// rows or partial slot, and splits are merged in a fixed order). K and V may be float, bf16,
/// fp16 or qint8 (widened or dequantised in registers; fp32 accumulation).
/// V selects the vector type (simd::Vec, or simd::ScalarVec for the scalar twin).
template <class V = simd::Vec, class Q, class K, class Vt, class O, class Mask, class Exec = SerialExecutor>
void attention(HeadsView<Q> q, HeadsView<K> k, HeadsView<Vt> v, const Mask& mask, HeadsView<O> out,
               const AttentionOptions& opt, Workspace& ws, const Exec& exec = {}) {
  detail::attention_impl<V>(q, k, v, mask, out, opt, ws, exec);
}

/// The same over paged K/V (kv/paged.hpp): K and V tiles are read through the page table, every
/// mask, storage type and option as above, and the results are bit-identical to a contiguous
/// copy of the same keys and values.
template <class V = simd::Vec, class Q, class K, class Vt, class O, class Mask, class Exec = SerialExecutor>
void attention(HeadsView<Q> q, PagedHeadsView<K> k, PagedHeadsView<Vt> v, const Mask& mask, HeadsView<O> out,
               const AttentionOptions& opt, Workspace& ws, const Exec& exec = {}) {
  detail::attention_impl<V>(q, k, v, mask, out, opt, ws, exec);
}

}  // namespace ctxcomp
