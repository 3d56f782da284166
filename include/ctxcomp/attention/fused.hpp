// Fused multi-head attention: grouped-query heads, tiles of queries x keys with an online
// softmax (no score matrix larger than a tile), hidden tiles skipped through the structured
// mask. Layout: q/out [heads x q_len x head_dim], k/v [kv_heads x kv_len x head_dim] in float,
// bf16, fp16 or qint8 (widened in registers; fp32 accumulation); decode-like calls split the key
// range (flash-decoding) and merge the splits by log-sum-exp. Semantics: attention/options.hpp.
//
// The parts, FlashInfer's in small: the plan (attention/plan.hpp: tiling, tasks, workspace),
// the softmax state with its merge (softmax_state.hpp), the K/V tile sources (kv_tiles.hpp:
// contiguous, paged and cell caches; staging, widening, prefetch), one work item's queries and
// softmax step (work_item.hpp), the interleaved decode (decode_interleaved.hpp) and the
// epilogue (epilogue.hpp). This file holds the per-head tile loop, which reads as scores ->
// softmax -> P V, then the epilogue, and the `attention` entry points.
#pragma once
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>

#include "../core/executor.hpp"
#include "../core/kernels.hpp"
#include "../core/kv_views.hpp"
#include "../core/tile_gemm.hpp"
#include "../core/workspace.hpp"
#include "decode_interleaved.hpp"
#include "epilogue.hpp"
#include "kv_tiles.hpp"
#include "masks.hpp"
#include "options.hpp"
#include "plan.hpp"
#include "softmax_state.hpp"
#include "work_item.hpp"

namespace ctxcomp {

namespace detail {

/// Scores of the item's kv head over keys [k0, k0 + nk) into b.s: bf16 pairs (K and V tiles
/// packed once per worker and head), the dot-product form for few rows (K rows read in place,
/// widened in registers; qint8 scales go on the finished scores), or a transposed K tile reused
/// by every row (outer-product GEMM).
template <class Item, class Prefetch>
void score_tile(const Item& it, index_t k0, index_t nk, const Prefetch& pre) {
  const auto& k = it.c.k;
  const AttentionBuffers& b = it.b;
  const index_t Bk = it.Bk, d = it.d, rows = it.rows, kh = it.kh;
  if constexpr (Item::bf16_compute) {
    const ctxcomp::bf16* ktb = stage_bf16_tiles<typename Item::Vec>(k, it.c.v, kh, k0, nk, it.T, b);
    kernels::tile_gemm_bf16_n<false, Item::Bk, typename Item::Vec>(b.qb, it.d2, ktb, 2 * Bk, b.s, Bk, rows, it.d2 / 2);
  } else if (rows < it.T.few_rows) {
    for (index_t j = 0, n; j < nk; j += n) {  // one call for a contiguous view
      n = k.run(k0 + j, nk - j);
      kernels::tile_gemm_nt<typename Item::Vec>(b.qp, d, k.row(kh, k0 + j), k.token_stride, b.s + j, Bk, rows, n, d,
                                                pre.ahead(k, kh, k0 + j), it.c.pf_to);
    }
  } else {
    const float* kt = stage_k_transposed<typename Item::Vec>(k, kh, k0, nk, it.T, b, it.c.keep_kt, pre.stream);
    kernels::tile_gemm_n<false, Item::Bk, typename Item::Vec>(b.qp, d, kt, Bk, b.s, Bk, rows, d);
  }
}

/// P V over V rows used in place (widened in registers) or, head_dim off the vector width,
/// widened rows (pv_tile's fp32 cases other than paged staging).
template <class Item, class Prefetch>
void pv_in_place_or_widened(const Item& it, index_t k0, index_t nk, const SeenKeys& seen, float* o,
                            const Prefetch& pre) {
  using V = typename Item::Vec;
  const auto& v = it.c.v;
  const AttentionBuffers& b = it.b;
  const index_t Bk = it.Bk, d = it.d, dp = it.dp, rows = it.rows, kh = it.kh;
  if (dp == d) {
    seen.for_each(v, k0, nk, [&](index_t j, index_t n) {
      kernels::tile_gemm<true, V>(b.s + j, Bk, v.row(kh, k0 + j), v.token_stride, o, dp, rows, dp, n,
                                  pre.ahead(v, kh, k0 + j), pre.stream ? simd::PrefetchTo::l2 : it.c.pf_to);
    });
  } else {
    pv_widened<V>(v, kh, k0, seen, b.s, o, b.vp, Bk, rows, d, dp);
  }
}

/// P V of the item's kv head over the keys of `seen` into the state's output: bf16 pairs, paged
/// V staged for many rows, V rows used in place (widened in registers; splitting the keys
/// continues each output's FMA chain in order: the same bits), or widened rows (head_dim off
/// the vector width).
template <class Item, class Prefetch>
void pv_tile(const Item& it, index_t k0, index_t nk, const SeenKeys& seen, float* o, const Prefetch& pre) {
  using V = typename Item::Vec;
  const auto& v = it.c.v;
  const AttentionBuffers& b = it.b;
  const index_t Bk = it.Bk, d = it.d, dp = it.dp, rows = it.rows, kh = it.kh;
  if constexpr (Item::bf16_compute) {  // P rounded to bf16 pairs along the keys; V packed with K
    for (index_t r = 0; r < rows; ++r) simd::round_row_bf16<V>(b.s + r * Bk, b.pb + r * Bk, Bk);
    kernels::tile_gemm_bf16<true, V>(b.pb, Bk, b.vtb + (k0 / Bk) * Bk * dp, 2 * dp, o, dp, rows, dp, Bk / 2);
    (void)nk, (void)seen, (void)pre, (void)d;
  } else {
    if constexpr (Item::paged) {  // (compiled for paged views only)
      if (dp == d && rows >= it.T.few_rows) return pv_staged<V>(v, kh, k0, seen, b.s, o, b.vp, Bk, rows, d, dp);
    }
    pv_in_place_or_widened(it, k0, nk, seen, o, pre);
  }
}

/// Runs one work item of one kv head: for every tile of its key split that the mask does not
/// hide, scores -> softmax -> P V; then the epilogue (the normalised rows, or the state left in
/// the item's partial slot for the merge).
template <class V, bool BF16, class Q, class KView, class VView, class O, class Mask>
void run_per_head(const WorkItem<V, BF16, Q, KView, VView, O, Mask>& it) {
  using Item = WorkItem<V, BF16, Q, KView, VView, O, Mask>;
  const AttentionBuffers& b = it.b;
  const index_t Bk = it.Bk, d = it.d, dp = it.dp, rows = it.rows;
  it.start(it.kh);
  if (dp != d)  // padding columns of V stay zero for the whole item
    for (index_t kk = 0; kk < Bk; ++kk) std::fill(b.vp + kk * dp + d, b.vp + (kk + 1) * dp, 0.f);
  const SoftmaxState st = it.state(it.kh);
  SeenKeys seen{b.seen};

  for (index_t k0 = it.kb; k0 < it.ke; k0 += Bk) {
    const index_t k1 = std::min(it.ke, k0 + Bk), nk = k1 - k0;
    const TileVisibility vis = it.mask.tile(it.blk.r0, it.blk.r1, k0, k1);
    if (vis == TileVisibility::None) continue;
    seen.all(nk);
    const TilePrefetch<Item::paged> pre(it.T, rows, k0, it.c.k.tokens);

    score_tile(it, k0, nk, pre);
    it.softmax(b.s, st, it.kh, k0, nk, vis);
    const bool guard = !BF16 && vis == TileVisibility::Mixed && hides_unwritten_v<Mask>;
    guarded_pv<V>(
        guard, it.kh, it.kh + 1, rows * dp, b.o_saved, [&](index_t) { return st.o; },
        [&] { seen.find(it.mask, it.blk, k0, nk); }, [&] { pv_tile(it, k0, nk, seen, st.o, pre); });
  }

  if (it.c.splits > 1) st.save(it.c.partial + (it.task * it.c.splits + it.split) * it.c.slot, rows, dp);
  else store_block(st, it.c.out, it.kh, it.g, it.blk, d, dp);
}

/// The fused kernel over row groups, with buffers sized for all q rows. Tasks run kv-head by
/// kv-head across the groups, so every group's tasks of a head reuse its transposed K tiles
/// (when the call has several query blocks; see AttentionTiling::kt_tiles). With splits > 1
/// each (task, split) work item covers one key range and leaves its state in `partial`; a
/// log-sum-exp merge then writes `out`.
template <class V, bool BF16, class Q, class KView, class VView, class O, class Mask>
void attention_rows(HeadsView<Q> q, KView k, VView v, const RowGroup<Mask>* groups, index_t group_count,
                    HeadsView<O> out, float qscale, const AttentionBuffers* buf, index_t splits, float* partial,
                    ExecutorRef exec) {
  constexpr bool paged = WorkItem<V, BF16, Q, KView, VView, O, Mask>::paged;
  const Compute compute = BF16 ? Compute::bf16 : Compute::fp32;
  const TaskGrid<V, Mask> grid(q.heads, k.heads, q.head_dim, k.tokens, groups, group_count, compute);
  // Every partial slot has room for the largest task (the whole call's tiling, whose buffers the
  // workers have).
  const AttentionTiling<V> whole(q.heads, k.heads, q.tokens, q.head_dim, k.tokens, splits > 1, compute);
  AttentionCall<V, Q, KView, VView, O, Mask> c{q, k, v, out, qscale, buf, &grid, splits,
                                               splits > 1 ? AttentionTiling<V>::split_len : k.tokens, partial,
                                               whole.partial_floats(), whole.keeps_k_tiles(), false, false,
                                               simd::PrefetchTo::l1};
  c.interleave = decodes_interleaved(whole, grid.tilings[0], group_count, BF16, k, v);
  // Where decode's prefetch hints send the lines (docs/performance.md): L1 for a head-major cache
  // (one tile ahead in the head's own stream) and for pages (the next page); L2 for interleaved
  // token-major rows, whose next run is far enough away in the reads of the other heads that L1
  // would evict it first.
  c.pf_to = c.interleave && !paged ? simd::PrefetchTo::l2 : simd::PrefetchTo::l1;
  c.gather = paged && c.interleave && short_head_major_pages(k, AttentionTiling<V>::kv_tile) &&
             short_head_major_pages(v, AttentionTiling<V>::kv_tile);

  const index_t items = (c.interleave ? 1 : k.heads) * grid.per_head * splits;
  exec.parallel_for(items, [&](index_t item, index_t worker) {
    const WorkItem<V, BF16, Q, KView, VView, O, Mask> it(c, item, worker);
    if constexpr (!BF16)
      if (c.interleave) return run_interleaved(it);
    run_per_head(it);
  });
  if (splits > 1) merge_splits(grid, k.heads, out, partial, splits, c.slot, buf, exec);
}

}  // namespace detail

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
  for (index_t w = 0; w < workers; ++w) buf[w] = detail::carve_buffers(T, ws);
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
