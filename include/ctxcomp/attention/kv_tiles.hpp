// The K/V tile sources of attention: how a tile of keys and values is read from a contiguous
// view, a paged view (PagedHeadsView) or a cell cache (a contiguous view whose mask hides free
// cells), staged for the kernels that need it (K transposed and widened for many-row tiles,
// K/V packed as bf16 pairs for bf16 compute, paged V rows gathered), which keys of a tile some
// query row sees (SeenKeys, for masks over memory the host never wrote), and how far ahead
// decode asks for rows (TilePrefetch, tile_offsets). The arithmetic is core/tile_gemm.hpp's.
#pragma once
#include <algorithm>
#include <type_traits>

#include "../core/kernels.hpp"
#include "../core/kv_views.hpp"
#include "../core/simd.hpp"
#include "../core/tile_gemm.hpp"
#include "../core/types.hpp"
#include "masks.hpp"
#include "plan.hpp"
#include "softmax_state.hpp"

namespace ctxcomp::detail {

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

/// bf16 compute: the K and V tiles at keys [k0, k0 + nk) of kv head kh packed as bf16 pairs,
/// K as [dim_even / 2][Bk][2] and V as [Bk / 2][dim_padded][2] (keys past nk zero), once per
/// worker and kv head (b.kt_head marks the head a tile holds; exact for bf16 storage, others
/// rounded; qint8 K dequantised first, qint8 V kept as its integers, exact in bf16, its scale
/// going into the probabilities). Returns the packed K tile.
template <class V, class KView, class VView>
const ctxcomp::bf16* stage_bf16_tiles(const KView& k, const VView& v, index_t kh, index_t k0, index_t nk,
                                      const AttentionTiling<V>& T, const AttentionBuffers& b) noexcept {
  using KS = std::remove_const_t<typename KView::element_type>;
  const index_t Bk = T.kv_tile, d = T.head_dim, d2 = T.dim_even, dp = T.dim_padded;
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
  return ktb;
}

/// Many-row tiles: the K tile at keys [k0, k0 + nk) of kv head kh transposed to [d x Bk]
/// (columns past the last key zero) and widened by vector loads (qint8: dequantised), into the
/// tile's own room when the workers keep every tile of a head (`keep`: later tasks of the same
/// head reuse it, b.kt_head says which head it holds), else into the one tile's room. `stream`
/// asks for the next tile's rows into L2 while this one is read. Returns the transposed tile.
template <class V, class KView>
float* stage_k_transposed(const KView& k, index_t kh, index_t k0, index_t nk, const AttentionTiling<V>& T,
                          const AttentionBuffers& b, bool keep, bool stream) noexcept {
  using KS = std::remove_const_t<typename KView::element_type>;
  const index_t Bk = T.kv_tile, d = T.head_dim;
  const index_t tile = k0 / Bk;
  float* kt = b.kt + (keep ? tile : 0) * d * Bk;
  if (!keep || b.kt_head[tile] != kh) {
    if constexpr (is_quantized_v<KS>)
      for (index_t kk = 0; kk < nk; ++kk) b.ks[kk] = k.scale(kh, k0 + kk);
    for (index_t j = 0, n; j < nk; j += n) {  // one call per run of rows (a page)
      n = k.run(k0 + j, nk - j);
      kernels::widen_transposed<V>(k.row(kh, k0 + j), k.token_stride, n, d, is_quantized_v<KS> ? b.ks + j : nullptr,
                                   kt + j, Bk, stream ? Bk : 0);
    }
    if (nk < Bk)
      for (index_t i = 0; i < d; ++i) std::fill(kt + i * Bk + nk, kt + (i + 1) * Bk, 0.f);
    if (keep) b.kt_head[tile] = kh;
  }
  return kt;
}

/// The keys of a tile that P V reads, as runs [runs[2i], runs[2i + 1]) of tile offsets: the
/// whole tile, or (after `find`) only the keys some row of the query block sees.
struct SeenKeys {
  index_t* runs = nullptr;  ///< room for kv_tile + 2 offsets (AttentionBuffers::seen)
  index_t count = 0;

  /// Every key of a tile of nk keys.
  void all(index_t nk) noexcept {
    count = 1;
    runs[0] = 0, runs[1] = nk;
  }
  /// Whether the runs are the whole tile of nk keys.
  bool whole(index_t nk) const noexcept { return count == 1 && runs[0] == 0 && runs[1] == nk; }
  /// The keys [k0, k0 + nk) that some row of the block sees under `mask`: the tile answer for one
  /// key, else row by row.
  template <class Mask>
  void find(const Mask& mask, const QueryBlock& blk, index_t k0, index_t nk) noexcept {
    auto key_seen = [&](index_t key) {
      if (blk.nq == 1) return mask.visible(blk.r0, key);
      const TileVisibility kv = mask.tile(blk.r0, blk.r1, key, key + 1);
      if (kv != TileVisibility::Mixed) return kv == TileVisibility::All;
      for (index_t qi = blk.nq; qi-- > 0;)
        if (mask.visible(blk.row(blk.q0 + qi), key)) return true;
      return false;
    };
    count = 0;
    for (index_t kk = 0; kk < nk;) {
      while (kk < nk && !key_seen(k0 + kk)) ++kk;
      if (kk == nk) break;
      runs[2 * count] = kk;
      while (kk < nk && key_seen(k0 + kk)) ++kk;
      runs[2 * count++ + 1] = kk;
    }
  }
  /// Calls f(j, n) for consecutive stretches [j, j + n) of the runs, each within one run of the
  /// view x (a page) from key k0 on and at most `cap` keys long.
  template <class View, class F>
  void for_each(const View& x, index_t k0, index_t cap, F&& f) const {
    for (index_t i = 0; i < count; ++i)
      for (index_t j = runs[2 * i], e = runs[2 * i + 1], n; j < e; j += n) {
        n = std::min(x.run(k0 + j, e - j), cap);
        f(j, n);
      }
  }
};

/// P V of kv heads [hb, he) under the guard of masks whose hidden keys may be memory the host
/// never wrote (cell caches: free cells, another sequence's cells). Scores are always computed
/// over whole runs (a hidden key's score becomes -inf whatever it held), and P V first runs over
/// the whole tile; if an output it touched turned non-finite (probability 0 times NaN is NaN),
/// the outputs are restored and P V runs again over the keys some row sees (`seen.find`). Their
/// terms are exact zeros: without them every output's FMA chain keeps its other terms in order,
/// the same bits for finite data. `out_of(h)` is head h's output block of n floats; `saved` has
/// room for (he - hb) blocks; `pv()` reads the runs of `seen`.
template <class V, class OutOf, class Refind, class PV>
void guarded_pv(bool guard, index_t hb, index_t he, index_t n, float* saved, OutOf&& out_of, Refind&& refind,
                PV&& pv) {
  if (!guard) return pv();
  for (index_t h = hb; h < he; ++h) std::copy(out_of(h), out_of(h) + n, saved + (h - hb) * n);
  pv();
  bool finite = true;
  for (index_t h = hb; h < he && finite; ++h) finite = kernels::all_finite<V>(out_of(h), n);
  if (finite) return;
  for (index_t h = hb; h < he; ++h) std::copy(saved + (h - hb) * n, saved + (h + 1 - hb) * n, out_of(h));
  refind();
  pv();
}

/// P V for kv head h with V rows widened into `buf` (head_dim off the vector width: padded rows
/// [Bk x dp], padding columns zero), one call per run of seen keys.
template <class V, class View>
void pv_widened(const View& x, index_t h, index_t k0, const SeenKeys& seen, const float* p, float* o, float* buf,
                index_t Bk, index_t rows, index_t d, index_t dp) noexcept {
  for (index_t i = 0; i < seen.count; ++i) {
    const index_t j0 = seen.runs[2 * i], j1 = seen.runs[2 * i + 1];
    for (index_t kk = j0; kk < j1; ++kk) kernels::widen<V>(x.row(h, k0 + kk), buf + kk * dp, d);
    kernels::tile_gemm<true, V>(p + j0, Bk, buf + j0 * dp, dp, o, dp, rows, dp, j1 - j0);
  }
}

/// Many rows over paged V: the tile's seen rows staged contiguously (as stored) in `buf`, so the
/// output block is loaded and stored once per run of seen keys, not once per page.
template <class V, class View>
void pv_staged(const View& x, index_t h, index_t k0, const SeenKeys& seen, const float* p, float* o, float* buf,
               index_t Bk, index_t rows, index_t d, index_t dp) noexcept {
  using VS = std::remove_const_t<typename View::element_type>;
  VS* staged = reinterpret_cast<VS*>(buf);
  for (index_t i = 0; i < seen.count; ++i) {
    const index_t j0 = seen.runs[2 * i], j1 = seen.runs[2 * i + 1];
    for (index_t kk = j0; kk < j1; ++kk) std::copy(x.row(h, k0 + kk), x.row(h, k0 + kk) + d, staged + kk * d);
    kernels::tile_gemm<true, V>(p + j0, Bk, staged + j0 * d, d, o, dp, rows, dp, j1 - j0);
  }
}

/// How far ahead (in rows of the view) the kernels of one tile at keys [k0, k0 + Bk) ask for
/// rows. Few-row decode streams K and V from memory: each row read asks for the row one tile on
/// within its kv head, so its lines arrive while this tile is computed. Paged decode asks through
/// the page table, since the rows one tile on lie in other pages where the hardware prefetchers
/// start over (exact when the page size divides the tile; a hint either way). Many rows in one
/// block per kv head (decode with many query heads per kv head) use each K and V tile once,
/// streamed from memory: the next one is asked for (into L2).
template <bool Paged>
struct TilePrefetch {
  bool few = false;     ///< few-row (dot-product) tiles
  bool stream = false;  ///< many rows, one block per kv head, contiguous
  index_t pf = 0;       ///< contiguous few-row decode: rows ahead
  index_t Bk = 0, kv_len = 0;

  template <class V>
  TilePrefetch(const AttentionTiling<V>& T, index_t rows, index_t k0, index_t kv_len_)
      : few(rows < T.few_rows),
        stream(!Paged && !few && T.q_blocks == 1 && k0 + 2 * T.kv_tile <= kv_len_),
        pf(!Paged && few && k0 + T.prefetch_rows + T.kv_tile <= kv_len_ ? T.prefetch_rows : 0),
        Bk(T.kv_tile),
        kv_len(kv_len_) {}

  /// Rows from row (h, t) to row (h, u) of a view, when they lie whole rows apart; else 0.
  template <class View>
  static index_t rows_to(const View& x, index_t h, index_t t, index_t u) noexcept {
    const index_t off = index_t(x.row(h, u) - x.row(h, t));
    return off % x.token_stride == 0 ? off / x.token_stride : 0;
  }
  /// Rows ahead for a kernel reading rows of kv head h from key t on.
  template <class View>
  index_t ahead(const View& x, index_t h, index_t t) const noexcept {
    if (stream) return Bk;
    if (!Paged) return pf;
    return few && t + Bk < kv_len ? rows_to(x, h, t, t + Bk) : 0;
  }
  /// Interleaved decode: a run of n rows from key t asks for the next run (the next page), which
  /// is read once every head's share of this run has been.
  template <class View>
  index_t next_run(const View& x, index_t h, index_t t, index_t n) const noexcept {
    if (t + 2 * n > kv_len) return 0;
    return Paged ? rows_to(x, h, t, t + n) : n;
  }
};

/// Offsets from the pool of head 0's rows t0 .. t0 + n - 1 of a paged view (one page-table
/// lookup per page); nothing for a contiguous view.
template <class View>
void tile_offsets(const View& x, index_t t0, index_t n, index_t* off) noexcept {
  if constexpr (is_paged_view_v<View>) {
    for (index_t j = 0, r; j < n; j += r) {
      r = x.run(t0 + j, n - j);
      const index_t o = index_t(x.row(0, t0 + j) - x.pool);
      for (index_t i = 0; i < r; ++i) off[j + i] = o + i * x.token_stride;
    }
  } else {
    (void)x, (void)t0, (void)n, (void)off;
  }
}

/// Whether a view keeps every kv head of a token (token-major: cells, NHD pages) or of a page
/// (HND pages) close together, so that reading head by head would jump between pages.
template <class View>
bool heads_together(const View& x) noexcept {
  if constexpr (is_paged_view_v<View>) return x.heads > 1 && (x.heads - 1) * x.head_stride < x.page_stride;
  else return x.heads > 1 && x.head_stride < x.token_stride;
}

/// Whether a view is of head-major pages (HND) shorter than a tile.
template <class View>
bool short_head_major_pages(const View& x, index_t kv_tile) noexcept {
  if constexpr (is_paged_view_v<View>) return x.token_stride < x.head_stride && x.page_size < kv_tile;
  else return (void)x, (void)kv_tile, false;
}

}  // namespace ctxcomp::detail
