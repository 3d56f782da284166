// The epilogue of attention: a finished state's rows normalised (o / l, zeros where a row saw
// no key) and written to the output in its storage type; or, for calls whose keys were split,
// the states the splits left in the partial buffer merged by log-sum-exp (softmax_state.hpp)
// task by task, in split order, then written the same way.
#pragma once
#include <algorithm>
#include <type_traits>

#include "../core/executor.hpp"
#include "../core/types.hpp"
#include "../core/views.hpp"
#include "plan.hpp"
#include "softmax_state.hpp"

namespace ctxcomp::detail {

/// Writes query row (kh * g + hh, call row) of `out` from an unnormalised output row `src`
/// [head_dim] and its scale inv (1 / l, or 0 when the row saw nothing).
template <class O>
inline void store_out_row(HeadsView<O> out, index_t head, index_t row, const float* src, float inv,
                          index_t d) noexcept {
  using OS = std::remove_const_t<O>;
  auto* dst = out.row(head, row);
  for (index_t i = 0; i < d; ++i) dst[i] = from_float<OS>(src[i] * inv);
}

/// Writes the block's rows of a finished state (one pass over the keys, no split): row
/// r = qi * g + hh is query qi of the block in query head kh * g + hh.
template <class O>
void store_block(const SoftmaxState& st, HeadsView<O> out, index_t kh, index_t g, const QueryBlock& blk, index_t d,
                 index_t dp) noexcept {
  for (index_t qi = 0; qi < blk.nq; ++qi)
    for (index_t hh = 0; hh < g; ++hh) {
      const index_t r = qi * g + hh;
      const float inv = st.l[r] > 0.f ? 1.f / st.l[r] : 0.f;  // no visible key: zeros, never NaN
      store_out_row(out, kh * g + hh, blk.row(blk.q0 + qi), st.o + r * dp, inv, d);
    }
}

/// Merges the key splits of every task of the grid (slots (task * splits + split) * slot of
/// `partial`) and writes the outputs; each worker merges into its own buffer `acc` (buf[w].o).
template <class V, class O, class Mask>
void merge_splits(const TaskGrid<V, Mask>& grid, index_t kv_heads, HeadsView<O> out, const float* partial,
                  index_t splits, index_t slot, const AttentionBuffers* buf, ExecutorRef exec) {
  exec.parallel_for(kv_heads * grid.per_head, [&](index_t task, index_t worker) {
    const index_t kh = task / grid.per_head;
    index_t gi, local;
    grid.locate(task, gi, local);
    const AttentionTiling<V>& T = grid.tilings[gi];
    const QueryBlock blk(T, grid.groups[gi], local);
    const index_t g = T.group, d = T.head_dim, dp = T.dim_padded;
    float* acc = buf[worker].o;
    for (index_t r = 0; r < blk.rows; ++r) {
      const float inv = merge_splits_row<V>(partial + task * splits * slot, slot, splits, blk.rows, r, dp, acc);
      store_out_row(out, kh * g + r % g, blk.row(blk.q0 + r / g), acc, inv, d);
    }
  });
}

}  // namespace ctxcomp::detail
