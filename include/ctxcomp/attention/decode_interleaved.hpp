// Interleaved decode: split decode over K/V that keep every kv head of a token side by side
// (token-major: llama.cpp cells, NHD pages) or of a page (HND pages). Read head by head, such
// caches jump between pages and strides that restart the hardware prefetchers at every page, so
// one work item here is a query block and a key split of every kv head, and each tile is read
// run by run (what lies within one page), every head's rows of a run in turn: memory is read
// page after page. Each head keeps its queries and scores in its own rows of the worker's
// buffers and its running state in its own partial slot, and every head's arithmetic is the
// per-head path's in the same order: the same bits.
#pragma once
#include <algorithm>
#include <utility>

#include "../core/kernels.hpp"
#include "../core/kv_views.hpp"
#include "../core/simd.hpp"
#include "../core/tile_gemm.hpp"
#include "../core/types.hpp"
#include "kv_tiles.hpp"
#include "masks.hpp"
#include "softmax_state.hpp"
#include "work_item.hpp"

namespace ctxcomp::detail {

/// Whether a call decodes interleaved: fp32 compute, one row group, few rows per task, keys
/// split so that every kv head's state has a partial slot, and both views keep heads together.
template <class V, class KView, class VView>
bool decodes_interleaved(const AttentionTiling<V>& call, const AttentionTiling<V>& group0, index_t group_count,
                         bool bf16, const KView& k, const VView& v) noexcept {
  return !bf16 && group_count == 1 && call.interleave_heads == k.heads && group0.rows < AttentionTiling<V>::few_rows &&
         heads_together(k) && heads_together(v);
}

/// Head-major pages shorter than a tile are read one kernel call per head and tile, the rows
/// gathered through the page table (offsets from the pool, one lookup per page), so a head's
/// output block is loaded and stored once per tile, not once per page; each row read asks for
/// the same head's row one tile on. This keeps the offsets of the current tile and the next.
struct GatherOffsets {
  index_t *ko, *kn, *vo, *vn;  ///< K rows of this tile and the next, then V's
  index_t next_tile = -1;      ///< first key of the tile kn / vn describe (-1: none)

  GatherOffsets(index_t* off, index_t Bk) noexcept : ko(off), kn(off + Bk), vo(off + 2 * Bk), vn(off + 3 * Bk) {}

  /// The offsets of the tile at k0 (nk keys) and of the next one, kv_len keys in all.
  template <class KView, class VView>
  void advance(const KView& k, const VView& v, index_t k0, index_t nk, index_t Bk, index_t kv_len) noexcept {
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
  }
};

/// Runs one interleaved work item (the dot-product form: few rows): every kv head, tile by tile.
template <class V, bool BF16, class Q, class KView, class VView, class O, class Mask>
void run_interleaved(const WorkItem<V, BF16, Q, KView, VView, O, Mask>& it) {
  constexpr bool paged = WorkItem<V, BF16, Q, KView, VView, O, Mask>::paged;
  const KView& k = it.c.k;
  const VView& v = it.c.v;
  const AttentionBuffers& b = it.b;
  const index_t Bk = it.Bk, d = it.d, dp = it.dp, rows = it.rows, heads = k.heads, kv_len = k.tokens;
  for (index_t h = 0; h < heads; ++h) it.start(h);
  if (dp != d)  // padding columns of V stay zero for the whole item
    for (index_t kk = 0; kk < Bk; ++kk) std::fill(b.vp + kk * dp + d, b.vp + (kk + 1) * dp, 0.f);
  // Token-major rows (cells, NHD pages) hold every head's row of a token side by side: runs of at
  // most 16 tokens keep the heads' reads close together. Head-major pages (HND) hold each head's
  // rows of a page together: a whole page per head is read in order, with a run's output block
  // loaded and stored once (shorter runs cost more: docs/performance.md). Token-major rows keep
  // their page-by-page runs even on short pages: read tile by tile per head, their lines would
  // be fetched once per head.
  constexpr index_t kRun = 16;
  const index_t krun = k.token_stride < k.head_stride ? Bk : kRun;
  const index_t vrun = v.token_stride < v.head_stride ? Bk : kRun;
  GatherOffsets off(b.off, Bk);
  SeenKeys seen{b.seen};
  auto out_of = [&](index_t h) { return it.state(h).o; };

  for (index_t k0 = it.kb; k0 < it.ke; k0 += Bk) {
    const index_t k1 = std::min(it.ke, k0 + Bk), nk = k1 - k0;
    const TileVisibility vis = it.mask.tile(it.blk.r0, it.blk.r1, k0, k1);
    if (vis == TileVisibility::None) continue;
    seen.all(nk);
    const TilePrefetch<paged> pre(it.T, rows, k0, kv_len);

    // Scores of every head: gathered through the page table, or run by run.
    if (it.c.gather) {
      off.advance(k, v, k0, nk, Bk, kv_len);
      if constexpr (paged)
        for (index_t h = 0; h < heads; ++h)
          kernels::tile_gemm_nt_gathered<V>(it.queries(h), d, k.pool + h * k.head_stride, off.ko, off.kn, it.scores(h),
                                            Bk, rows, nk, d, simd::PrefetchTo::l1);
    } else {
      for (index_t j = 0, n; j < nk; j += n) {
        n = std::min(k.run(k0 + j, nk - j), krun);
        for (index_t h = 0; h < heads; ++h)
          kernels::tile_gemm_nt<V>(it.queries(h), d, k.row(h, k0 + j), k.token_stride, it.scores(h) + j, Bk, rows, n,
                                   d, pre.next_run(k, h, k0 + j, n), it.c.pf_to);
      }
    }
    // Softmax of every head, into its own state.
    for (index_t h = 0; h < heads; ++h) it.softmax(it.scores(h), it.state(h), h, k0, nk, vis);
    // P V of every head: gathered, run by run, or widened (head_dim off the vector width).
    const bool guard = vis == TileVisibility::Mixed && hides_unwritten_v<Mask>;
    guarded_pv<V>(
        guard, 0, heads, rows * dp, b.o_saved, out_of, [&] { seen.find(it.mask, it.blk, k0, nk); },
        [&] {
          if (dp != d) {
            for (index_t h = 0; h < heads; ++h)
              pv_widened<V>(v, h, k0, seen, it.scores(h), out_of(h), b.vp, Bk, rows, d, dp);
          } else if (it.c.gather && seen.whole(nk)) {
            if constexpr (paged)
              for (index_t h = 0; h < heads; ++h)
                kernels::tile_gemm_gathered<true, V>(it.scores(h), Bk, v.pool + h * v.head_stride, off.vo, off.vn,
                                                     out_of(h), dp, rows, dp, nk, simd::PrefetchTo::l1);
          } else {
            seen.for_each(v, k0, vrun, [&](index_t j, index_t n) {
              for (index_t h = 0; h < heads; ++h)
                kernels::tile_gemm<true, V>(it.scores(h) + j, Bk, v.row(h, k0 + j), v.token_stride, out_of(h), dp,
                                            rows, dp, n, pre.next_run(v, h, k0 + j, n), it.c.pf_to);
            });
          }
        });
  }
  // The states are in the partial slots already; the merge writes the outputs.
}

}  // namespace ctxcomp::detail
