// Fused multi-head attention: grouped-query heads, tiles of queries x keys with an online
// softmax (no score matrix larger than a tile), hidden tiles skipped through the structured
// mask. Layout: q/out [heads x q_len x head_dim], k/v [kv_heads x kv_len x head_dim] in float,
// bf16 or fp16 (converted per tile; fp32 accumulation). Semantics: attention/options.hpp.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

#include "../core/executor.hpp"
#include "../core/kernels.hpp"
#include "../core/tile_gemm.hpp"
#include "../core/workspace.hpp"
#include "masks.hpp"
#include "options.hpp"

namespace ctxcomp {

namespace detail {

/// Tile geometry of one attention call. A task is (kv head, block of queries); its rows are the
/// block's queries times the group's query heads (row = query * group + head-in-group), so all
/// query heads that share a kv head read each K/V tile once.
template <class V>
struct AttentionTiling {
  static constexpr index_t kv_tile = 64;
  static constexpr index_t target_rows = 96;
  // Below this many rows (decode), scores are dot products against K rows read in place;
  // above, K tiles are transposed once and reused by every row (outer-product GEMM).
  static constexpr index_t few_rows = 16;
  index_t group, q_block, rows, head_dim, dim_padded;
  index_t q_blocks, tasks, kv_tiles;

  AttentionTiling(index_t heads, index_t kv_heads, index_t q_len, index_t d, index_t kv_len) {
    group = heads / kv_heads;
    q_block = std::min(q_len, std::max<index_t>(1, target_rows / group));
    rows = q_block * group;
    head_dim = d;
    dim_padded = (d + V::width - 1) / V::width * V::width;
    q_blocks = (q_len + q_block - 1) / q_block;
    tasks = kv_heads * q_blocks;
    kv_tiles = (kv_len + kv_tile - 1) / kv_tile;
  }
  /// Many-row tasks keep every transposed K tile of their kv head (reused by the next task of
  /// the same head); few-row tasks only widen one tile at a time.
  index_t kt_tiles() const { return rows < few_rows ? 1 : kv_tiles; }
  std::size_t worker_bytes() const {
    return Workspace::bytes_for<float>(rows * head_dim)          // packed, pre-scaled queries
           + Workspace::bytes_for<float>(head_dim * kv_tile * kt_tiles())  // K tiles (transposed for many rows)
           + Workspace::bytes_for<index_t>(kv_tiles)                // kv head each transposed tile holds
           + Workspace::bytes_for<float>(kv_tile * dim_padded)   // V tile
           + Workspace::bytes_for<float>(rows * kv_tile)         // scores / probabilities
           + Workspace::bytes_for<float>(rows * dim_padded)      // output accumulator
           + 2 * Workspace::bytes_for<float>(rows);              // running max and sum
  }
};

template <class T>
inline void load_row(const T* src, float* dst, index_t n) noexcept {
  kernels::convert<std::remove_const_t<T>, float>(src, dst, n);
}

}  // namespace detail

/// Bytes of workspace `attention` reserves for these shapes and concurrency.
template <class V = simd::Vec>
std::size_t attention_workspace_bytes(index_t heads, index_t kv_heads, index_t q_len, index_t kv_len, index_t head_dim,
                                      index_t concurrency = 1) {
  detail::AttentionTiling<V> t(heads, kv_heads, q_len, head_dim, kv_len);
  return static_cast<std::size_t>(std::max<index_t>(1, std::min(concurrency, t.tasks))) * t.worker_bytes();
}

namespace detail {

/// Per-worker tile buffers carved from the workspace.
struct AttentionBuffers {
  float *qp, *kt, *vp, *s, *o, *m, *l;
  index_t* kt_head;  // kt_head[tile] = kv head whose K tile `tile` is transposed in kt, or -1
};

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

/// A set of query rows with one mask: rows[0, n) (rows == nullptr: 0, 1, ..., n-1).
template <class Mask>
struct RowGroup {
  const index_t* rows = nullptr;
  index_t n = 0;
  Mask mask{};
};
inline constexpr index_t kMaxRowGroups = 4;

/// The fused kernel over row groups, with buffers sized for all q rows. Tasks run kv-head by
/// kv-head across the groups, so every group's tasks of a head reuse its transposed K tiles.
template <class V, class Q, class K, class Vt, class O, class Mask, class Exec>
void attention_rows(HeadsView<Q> q, HeadsView<K> k, HeadsView<Vt> v, const RowGroup<Mask>* groups,
                    index_t group_count, HeadsView<O> out, float qscale, const AttentionBuffers* buf,
                    const Exec& exec) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  AttentionTiling<V> tilings[kMaxRowGroups] = {
      {q.heads, k.heads, 1, q.head_dim, k.tokens}, {q.heads, k.heads, 1, q.head_dim, k.tokens},
      {q.heads, k.heads, 1, q.head_dim, k.tokens}, {q.heads, k.heads, 1, q.head_dim, k.tokens}};
  index_t per_head = 0;
  for (index_t gi = 0; gi < group_count; ++gi) {
    tilings[gi] = AttentionTiling<V>(q.heads, k.heads, groups[gi].n, q.head_dim, k.tokens);
    per_head += tilings[gi].q_blocks;
  }
  const index_t kv_len = k.tokens;

  exec.parallel_for(k.heads * per_head, [&](index_t task, index_t worker) {
    const AttentionBuffers& b = buf[worker];
    const index_t kh = task / per_head;
    index_t local = task % per_head, gi = 0;
    while (local >= tilings[gi].q_blocks) local -= tilings[gi++].q_blocks;
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

    for (index_t qi = 0; qi < nq; ++qi)
      for (index_t hh = 0; hh < g; ++hh) {
        float* dst = b.qp + (qi * g + hh) * d;
        load_row(q.row(kh * g + hh, row(q0 + qi)), dst, d);
        kernels::scale<V>(dst, qscale, d);
      }
    std::fill(b.o, b.o + rows * dp, 0.f);
    std::fill(b.m, b.m + rows, kNegInf);
    std::fill(b.l, b.l + rows, 0.f);
    if (dp != d)  // padding columns of V stay zero for the whole task
      for (index_t kk = 0; kk < Bk; ++kk) std::fill(b.vp + kk * dp + d, b.vp + (kk + 1) * dp, 0.f);

    for (index_t k0 = 0; k0 < kv_len; k0 += Bk) {
      const index_t k1 = std::min(kv_len, k0 + Bk), nk = k1 - k0;
      const TileVisibility vis = mask.tile(r0, r1, k0, k1);
      if (vis == TileVisibility::None) continue;

      if (rows < T.few_rows) {
        // Dot-product form: K rows as stored (fp32) or widened row by row.
        const float* kr;
        index_t ldk;
        if constexpr (std::is_same_v<std::remove_const_t<K>, float>) {
          kr = k.row(kh, k0);
          ldk = k.token_stride;
        } else {
          for (index_t kk = 0; kk < nk; ++kk) load_row(k.row(kh, k0 + kk), b.kt + kk * d, d);
          b.kt_head[0] = -1;  // tile 0's transposed copy (if any) is overwritten
          kr = b.kt;
          ldk = d;
        }
        kernels::tile_gemm_nt<V>(b.qp, d, kr, ldk, b.s, Bk, rows, nk, d);
      } else {
        // K tile, transposed to [d x Bk] (columns past the last key are zero), once per kv head
        // and worker: later tasks of the same head reuse it.
        const index_t tile = k0 / Bk;
        float* kt = b.kt + tile * d * Bk;
        if (b.kt_head[tile] != kh) {
          for (index_t kk = 0; kk < nk; ++kk) {
            const auto* src = k.row(kh, k0 + kk);
            for (index_t i = 0; i < d; ++i) kt[i * Bk + kk] = to_float(src[i]);
          }
          if (nk < Bk)
            for (index_t i = 0; i < d; ++i) std::fill(kt + i * Bk + nk, kt + (i + 1) * Bk, 0.f);
          b.kt_head[tile] = kh;
        }
        kernels::tile_gemm<false, V>(b.qp, d, kt, Bk, b.s, Bk, rows, Bk, d);
      }

      if (vis == TileVisibility::Mixed) {
        for (index_t qi = 0; qi < nq; ++qi) {
          const index_t r = row(q0 + qi);
          for (index_t kk = 0; kk < nk; ++kk)
            if (!mask.visible(r, k0 + kk))
              for (index_t hh = 0; hh < g; ++hh) b.s[(qi * g + hh) * Bk + kk] = kNegInf;
        }
      }
      if (nk < Bk)
        for (index_t r = 0; r < rows; ++r) std::fill(b.s + r * Bk + nk, b.s + (r + 1) * Bk, kNegInf);

      // Online softmax: rescale what was accumulated when the running max grows.
      for (index_t r = 0; r < rows; ++r) {
        float* s = b.s + r * Bk;
        const float mt = kernels::row_max<V>(s, Bk);
        if (mt == kNegInf) {  // nothing visible in this tile for this row
          std::fill(s, s + Bk, 0.f);
          continue;
        }
        const float mnew = std::max(b.m[r], mt);
        const float alpha = simd::ScalarVec::exp2(b.m[r] - mnew);
        const float sum = kernels::exp2_shifted<V>(s, mnew, Bk);
        b.l[r] = b.l[r] * alpha + sum;
        if (alpha != 1.f) kernels::scale<V>(b.o + r * dp, alpha, dp);
        b.m[r] = mnew;
      }

      if constexpr (std::is_same_v<std::remove_const_t<Vt>, float>) {
        if (dp == d) {  // V rows used in place
          kernels::tile_gemm<true, V>(b.s, Bk, v.row(kh, k0), v.token_stride, b.o, dp, rows, dp, nk);
          continue;
        }
      }
      for (index_t kk = 0; kk < nk; ++kk) load_row(v.row(kh, k0 + kk), b.vp + kk * dp, d);
      kernels::tile_gemm<true, V>(b.s, Bk, b.vp, dp, b.o, dp, rows, dp, nk);
    }

    for (index_t qi = 0; qi < nq; ++qi)
      for (index_t hh = 0; hh < g; ++hh) {
        const index_t r = qi * g + hh;
        const float inv = b.l[r] > 0.f ? 1.f / b.l[r] : 0.f;  // no visible key: zeros, never NaN
        auto* dst = out.row(kh * g + hh, row(q0 + qi));
        const float* src = b.o + r * dp;
        for (index_t i = 0; i < d; ++i) dst[i] = from_float<std::remove_const_t<O>>(src[i] * inv);
      }
  });
}

}  // namespace detail

/// out = softmax(scale * q k^T | mask) v. heads % kv_heads == 0, else ctxcomp::Error. A query row
/// with no visible key gets zeros. On error nothing is written. Results do not depend on the
/// executor's thread count (tasks are fixed by the shapes; each writes its own rows).
/// V selects the vector type (simd::Vec, or simd::ScalarVec for the scalar twin).
template <class V = simd::Vec, class Q, class K, class Vt, class O, class Mask, class Exec = SerialExecutor>
void attention(HeadsView<Q> q, HeadsView<K> k, HeadsView<Vt> v, const Mask& mask, HeadsView<O> out,
               const AttentionOptions& opt, Workspace& ws, const Exec& exec = {}) {
  static_assert(!std::is_const_v<O>, "attention: out must be writable");
  detail::check_attention_args(q, k, v, out, mask, opt, "attention");
  constexpr float kLog2e = 1.4426950408889634f;
  // Buffers sized for all q rows fit any subset of them (a group's tiling is never larger).
  const detail::AttentionTiling<V> T(q.heads, k.heads, q.tokens, q.head_dim, k.tokens);
  const float qscale = detail::effective_scale(opt, T.head_dim) * kLog2e;  // softmax in base 2
  const index_t workers = std::max<index_t>(1, std::min(exec.concurrency(), T.tasks));
  CTXCOMP_CHECK(workers <= 64, "attention: executor concurrency (", workers, ") above the supported 64");
  constexpr bool split = detail::has_row_groups<Mask>::value;
  ws.reserve(static_cast<std::size_t>(workers) * T.worker_bytes() +
             (split ? Workspace::bytes_for<index_t>(q.tokens) : 0));
  detail::AttentionBuffers buf[64];
  for (index_t w = 0; w < workers; ++w) {
    buf[w].qp = ws.take<float>(T.rows * T.head_dim);
    buf[w].kt = ws.take<float>(T.head_dim * T.kv_tile * T.kt_tiles());
    buf[w].vp = ws.take<float>(T.kv_tile * T.dim_padded);
    buf[w].s = ws.take<float>(T.rows * T.kv_tile);
    buf[w].o = ws.take<float>(T.rows * T.dim_padded);
    buf[w].m = ws.take<float>(T.rows);
    buf[w].l = ws.take<float>(T.rows);
    buf[w].kt_head = ws.take<index_t>(T.kv_tiles);
    std::fill(buf[w].kt_head, buf[w].kt_head + T.kv_tiles, index_t(-1));
  }
  if constexpr (split) {
    using GroupMask = decltype(mask.group_mask(0));
    CTXCOMP_CHECK(mask.row_groups() <= detail::kMaxRowGroups, "attention: the mask has ", mask.row_groups(),
                  " row groups, above the supported ", detail::kMaxRowGroups);
    index_t* rows = ws.take<index_t>(q.tokens);
    detail::RowGroup<GroupMask> groups[detail::kMaxRowGroups];
    index_t count = 0, used = 0;
    for (index_t grp = 0; grp < mask.row_groups(); ++grp) {
      const index_t n = mask.group_rows(grp, q.tokens, rows + used);
      if (n > 0) groups[count++] = {rows + used, n, mask.group_mask(grp)};
      used += n;
    }
    detail::attention_rows<V>(q, k, v, groups, count, out, qscale, buf, exec);
  } else {
    const detail::RowGroup<Mask> all{nullptr, q.tokens, mask};
    detail::attention_rows<V>(q, k, v, &all, 1, out, qscale, buf, exec);
  }
}

}  // namespace ctxcomp
