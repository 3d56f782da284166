// The online-softmax state of a block of query rows (FlashInfer's state_t): the running maximum
// m, the running sum l and the unnormalised output o, in base 2 (scores arrive pre-scaled by
// log2 e). `update` absorbs one tile of scores; `merge_splits_row` combines the states that key
// splits of the same rows left behind (flash-decoding's log-sum-exp merge), in split order, so
// the result does not depend on which worker ran which split.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>

#include "../core/kernels.hpp"
#include "../core/simd.hpp"
#include "../core/types.hpp"

namespace ctxcomp::detail {

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

/// Running state of `rows` query rows over the keys seen so far: m [rows], l [rows] and
/// o [rows x dp] (dp: head_dim padded to the vector width). A view: the memory is a worker's
/// buffers or a split's slot in the partial buffer (m, then l, then o).
struct SoftmaxState {
  float* m = nullptr;
  float* l = nullptr;
  float* o = nullptr;

  /// The state stored in a partial slot: m at slot, l after `rows` floats, o after 2 * rows.
  static SoftmaxState in_slot(float* slot, index_t rows) noexcept { return {slot, slot + rows, slot + 2 * rows}; }

  /// No key seen yet: o = 0, m = -inf, l = 0.
  void reset(index_t rows, index_t dp) const noexcept {
    std::fill(o, o + rows * dp, 0.f);
    std::fill(m, m + rows, kNegInf);
    std::fill(l, l + rows, 0.f);
  }

  /// Absorbs a tile of scores s [rows x Bk] (hidden keys -inf), which become the tile's
  /// probabilities 2^(s - m): where a row's maximum grows, what the row accumulated is rescaled
  /// first (an unchanged finite maximum rescales by exactly 1: no call).
  template <class V>
  void update(float* s_tile, index_t rows, index_t Bk, index_t dp) const noexcept {
    float* const bm = m;
    float* const bl = l;
    float* const bo = o;
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
      const float alpha = bm[r] == mnew && std::isfinite(mnew) ? 1.f : simd::ScalarVec::exp2(bm[r] - mnew);
      const float sum = kernels::exp2_shifted<V>(s, mnew, Bk);
      bl[r] = bl[r] * alpha + sum;
      if (alpha != 1.f) kernels::scale<V>(bo + r * dp, alpha, dp);
      bm[r] = mnew;
    }
  }

  /// Copies the state into a partial slot (layout of in_slot).
  void save(float* slot, index_t rows, index_t dp) const noexcept {
    std::copy(m, m + rows, slot);
    std::copy(l, l + rows, slot + rows);
    std::copy(o, o + rows * dp, slot + 2 * rows);
  }
};

/// Log-sum-exp merge of row r over `splits` states in consecutive partial slots (`first`, then
/// every `slot` floats), in split order: M = max m_s, L = sum l_s 2^(m_s - M), acc [dp] =
/// sum o_s 2^(m_s - M). Returns 1 / L, or 0 when no split saw a key for the row (zeros, never NaN).
template <class V>
float merge_splits_row(const float* first, index_t slot, index_t splits, index_t rows, index_t r, index_t dp,
                       float* acc) noexcept {
  float mx = kNegInf;
  for (index_t sp = 0; sp < splits; ++sp) mx = std::max(mx, first[sp * slot + r]);
  std::fill(acc, acc + dp, 0.f);
  float total = 0.f;
  if (mx != kNegInf)
    for (index_t sp = 0; sp < splits; ++sp) {
      const float* p = first + sp * slot;
      if (p[r] == kNegInf) continue;  // the split saw nothing for this row
      const float w = simd::ScalarVec::exp2(p[r] - mx);
      total += p[rows + r] * w;
      kernels::axpy<V>(w, p + 2 * rows + r * dp, acc, dp);
    }
  return total > 0.f ? 1.f / total : 0.f;
}

}  // namespace ctxcomp::detail
