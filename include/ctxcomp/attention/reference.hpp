// Reference attention: scalar, double accumulation, materialises each score row. Written to be
// obviously right; the fused kernel is tested against it, it is tested against the fixtures.
// Layout and semantics as ctxcomp::attention (attention/options.hpp).
#pragma once
#include <cmath>
#include <limits>
#include <vector>

#include "../core/rows.hpp"
#include "masks.hpp"
#include "options.hpp"

namespace ctxcomp::reference {

template <class Q, class K, class V, class O, class Mask>
void attention(HeadsView<Q> q, HeadsView<K> k, HeadsView<V> v, const Mask& mask, HeadsView<O> out,
               const AttentionOptions& opt = {}) {
  ctxcomp::detail::check_attention_args(q, k, v, out, mask, opt, "reference::attention");
  const index_t group = q.heads / k.heads, d = q.head_dim;
  const double scale = ctxcomp::detail::effective_scale(opt, d);
  std::vector<double> p(static_cast<std::size_t>(k.tokens)), acc(static_cast<std::size_t>(d));
  for (index_t h = 0; h < q.heads; ++h) {
    const index_t kh = h / group;
    for (index_t i = 0; i < q.tokens; ++i) {
      double mx = -std::numeric_limits<double>::infinity();
      for (index_t j = 0; j < k.tokens; ++j) {
        if (!mask.visible(i, j)) {
          p[j] = -std::numeric_limits<double>::infinity();
          continue;
        }
        double s = 0;
        for (index_t t = 0; t < d; ++t) s += double(to_float(q(h, i, t))) * element_value(k, kh, j, t);
        p[j] = s * scale;
        mx = std::max(mx, p[j]);
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      double sum = 0;
      if (mx > -std::numeric_limits<double>::infinity()) {
        for (index_t j = 0; j < k.tokens; ++j) {
          if (!mask.visible(i, j)) continue;  // a hidden key adds nothing, whatever it holds
          const double e = std::exp(p[j] - mx);
          sum += e;
          for (index_t t = 0; t < d; ++t) acc[t] += e * element_value(v, kh, j, t);
        }
      }
      for (index_t t = 0; t < d; ++t)  // a row with no visible key is zero
        out(h, i, t) = from_float<std::remove_const_t<O>>(sum > 0 ? float(acc[t] / sum) : 0.f);
    }
  }
}

}  // namespace ctxcomp::reference
