// One work item of an attention call: a query block of one kv head (or, in interleaved decode,
// of every kv head) over one key split. AttentionCall is what every item of a call shares;
// WorkItem holds the item's geometry and does the per-item steps the kernels share: load the
// block's queries (pre-scaled, bf16-rounded for bf16 compute), give each kv head its softmax
// state, and turn a tile of scores into probabilities (qint8 K scales, the mask, the online
// softmax, qint8 V scales). The tile loops are attention/fused.hpp's (one kv head) and
// attention/decode_interleaved.hpp's (every kv head).
#pragma once
#include <algorithm>
#include <type_traits>

#include "../core/kernels.hpp"
#include "../core/kv_views.hpp"
#include "../core/simd.hpp"
#include "../core/types.hpp"
#include "../core/views.hpp"
#include "masks.hpp"
#include "plan.hpp"
#include "softmax_state.hpp"

namespace ctxcomp::detail {

/// What every work item of one call shares: the operands, the plan and the partial buffer.
template <class V, class Q, class KView, class VView, class O, class Mask>
struct AttentionCall {
  HeadsView<Q> q;
  KView k;
  VView v;
  HeadsView<O> out;
  float qscale;                     ///< softmax scale times log2 e (the softmax runs in base 2)
  const AttentionBuffers* buf;      ///< per worker slot
  const TaskGrid<V, Mask>* grid;
  index_t splits;                   ///< key splits per task (1: no split)
  index_t split_len;                ///< keys per split (the whole range when not split)
  float* partial;                   ///< splits > 1: the states of every (task, split), `slot` floats each
  index_t slot;
  bool keep_kt;                     ///< workers keep every transposed K tile of a head
  bool interleave;                  ///< decode reads every kv head per tile (decode_interleaved.hpp)
  bool gather;                      ///< interleaved over head-major pages shorter than a tile
  simd::PrefetchTo pf_to;           ///< where decode's prefetch hints send the lines
};

/// One work item: task `item / splits` (kv head kh and a query block), key split `item % splits`.
template <class V, bool BF16, class Q, class KView, class VView, class O, class Mask>
struct WorkItem {
  using Call = AttentionCall<V, Q, KView, VView, O, Mask>;
  using Vec = V;                                  ///< the vector type of the kernels
  static constexpr bool bf16_compute = BF16;      ///< Compute::bf16
  using KS = std::remove_const_t<typename KView::element_type>;
  using VS = std::remove_const_t<typename VView::element_type>;
  /// Paged K/V: the in-place kernels run once per stretch of rows within a page, and decode's
  /// prefetch hints go through the page table.
  static constexpr bool paged = is_paged_view_v<KView> || is_paged_view_v<VView>;

  const Call& c;
  const AttentionBuffers& b;
  index_t split, task, kh;
  struct Located {
    index_t group, local;  ///< the task's row group, and its block within the group
  } at;
  AttentionTiling<V> T;  // a local copy: no reloads after stores in the loops
  Mask mask;
  QueryBlock blk;
  /// Keys per tile: a compile-time constant, so the tile kernels are specialised for it.
  static constexpr index_t Bk = AttentionTiling<V>::kv_tile;
  index_t d, dp, d2, g, rows, kb, ke;

  WorkItem(const Call& call, index_t item, index_t worker)
      : c(call),
        b(call.buf[worker]),
        split(item % call.splits),
        task(item / call.splits),
        kh(task / call.grid->per_head),
        at(locate(call, task)),
        T(call.grid->tilings[at.group]),
        mask(call.grid->groups[at.group].mask),
        blk(T, call.grid->groups[at.group], at.local),
        d(T.head_dim),
        dp(T.dim_padded),
        d2(T.dim_even),
        g(T.group),
        rows(blk.rows),
        kb(split * call.split_len),
        ke(std::min(call.k.tokens, kb + call.split_len)) {}

  /// Queries and scores of kv head h: the worker's rows (interleaved: head h's own rows).
  float* queries(index_t h) const noexcept { return c.interleave ? b.qp + h * rows * d : b.qp; }
  float* scores(index_t h) const noexcept { return c.interleave ? b.s + h * rows * Bk : b.s; }
  /// The running state of kv head h: the worker's buffers, or (interleaved) its partial slot.
  SoftmaxState state(index_t h) const noexcept {
    if (!c.interleave) return {b.m, b.l, b.o};
    return SoftmaxState::in_slot(c.partial + ((h * c.grid->per_head + at.local) * c.splits + split) * c.slot, rows);
  }

  /// Kv head h starts: its state reset and the block's queries of its query heads loaded,
  /// pre-scaled (bf16 compute: the pre-scaled query is the rounded operand).
  void start(index_t h) const noexcept {
    state(h).reset(rows, dp);
    for (index_t qi = 0; qi < blk.nq; ++qi)
      for (index_t hh = 0; hh < g; ++hh) {
        float* dst = queries(h) + (qi * g + hh) * d;
        kernels::widen<V>(c.q.row(h * g + hh, blk.row(blk.q0 + qi)), dst, d);
        kernels::scale<V>(dst, c.qscale, d);
        if constexpr (BF16) {
          ctxcomp::bf16* qb = b.qb + (qi * g + hh) * d2;
          simd::round_row_bf16<V>(dst, qb, d);
          std::fill(qb + d, qb + d2, ctxcomp::bf16(0.f));
        }
      }
  }

  /// The scores s of kv head h over keys [k0, k0 + nk) (tile visibility vis) become
  /// probabilities: qint8 K scales (dot-product form: on the finished scores), the mask (hidden
  /// keys and keys past the tile -inf), the online softmax into `st`, qint8 V scales
  /// (p * (scale * q) = (p * scale) * q).
  void softmax(float* s_tile, const SoftmaxState& st, index_t h, index_t k0, index_t nk, TileVisibility vis) const {
    if constexpr (!BF16 && is_quantized_v<KS>) {
      if (rows < T.few_rows) {
        for (index_t kk = 0; kk < nk; ++kk) b.ks[kk] = c.k.scale(h, k0 + kk);
        for (index_t r = 0; r < rows; ++r) kernels::mul<V>(s_tile + r * Bk, b.ks, nk);
      }
    }
    if (vis == TileVisibility::Mixed) {
      for (index_t qi = 0; qi < blk.nq; ++qi) {
        const index_t r = blk.row(blk.q0 + qi);
        for (index_t kk = 0; kk < nk; ++kk)
          if (!mask.visible(r, k0 + kk))
            for (index_t hh = 0; hh < g; ++hh) s_tile[(qi * g + hh) * Bk + kk] = kNegInf;
      }
    }
    if (nk < Bk)
      for (index_t r = 0; r < rows; ++r) std::fill(s_tile + r * Bk + nk, s_tile + (r + 1) * Bk, kNegInf);
    st.update<V>(s_tile, rows, Bk, dp);
    if constexpr (is_quantized_v<VS>) {
      for (index_t kk = 0; kk < nk; ++kk) b.vs[kk] = c.v.scale(h, k0 + kk);
      for (index_t r = 0; r < rows; ++r)
        for (index_t kk = 0; kk < nk; ++kk) s_tile[r * Bk + kk] *= b.vs[kk];
    }
  }

 private:
  static Located locate(const Call& call, index_t task) noexcept {
    Located l;
    call.grid->locate(task, l.group, l.local);
    return l;
  }
};

}  // namespace ctxcomp::detail
