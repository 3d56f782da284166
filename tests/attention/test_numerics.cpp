// Numerics under stress: scores of magnitude 1e4 against the double reference within an
// a-priori bound, fully masked rows (zeros, also on the split-K decode path), NaN in the
// inputs (propagated as documented in attention/options.hpp, never a crash).
#include <cmath>
#include <limits>

#include "catch.hpp"
#include "common.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_attention_numerics {

using namespace ctxcomp;
using ctxcomp::test::random_vector;

namespace {
auto hv(std::vector<float>& x, index_t h, index_t t, index_t d) { return HeadsView<float>::contiguous(x.data(), h, t, d); }
auto cv(const std::vector<float>& x, index_t h, index_t t, index_t d) {
  return HeadsView<const float>::contiguous(x.data(), h, t, d);
}
}  // namespace

TEST_CASE("scores of magnitude 1e4 stay within the a-priori bound of the double reference", "[numerics][attention]") {
  // q, k of magnitude ~ sqrt(1e4 * sqrt(d) / d) each: |scale * q.k| reaches ~1e4.
  const index_t heads = 4, kv_heads = 2, d = 64;
  for (index_t q_len : {index_t(1), index_t(37)}) {
    const index_t kv_len = 1500;
    auto q = random_vector(std::size_t(heads * q_len * d), 11, -100.f, 100.f);
    auto k = random_vector(std::size_t(kv_heads * kv_len * d), 12, -100.f, 100.f);
    const auto v = random_vector(k.size(), 13);
    std::vector<float> got(q.size()), two(q.size());
    std::vector<float> ref(q.size());  // double accumulation, rounded once to fp32
    const Causal mask(kv_len - q_len);
    Workspace ws;
    attention(cv(q, heads, q_len, d), cv(k, kv_heads, kv_len, d), cv(v, kv_heads, kv_len, d), mask, hv(got, heads, q_len, d), {}, ws);
    attention(cv(q, heads, q_len, d), cv(k, kv_heads, kv_len, d), cv(v, kv_heads, kv_len, d), mask, hv(two, heads, q_len, d), {}, ws,
              test::two_threads());
    reference::attention(cv(q, heads, q_len, d), cv(k, kv_heads, kv_len, d), cv(v, kv_heads, kv_len, d), mask,
                         hv(ref, heads, q_len, d));
    // Bound: every score (natural-log units, largest |s| = smax) carries an absolute error of at
    // most delta = smax * (d + 4) * u (the scaled dot product and the base-2 conversion, u = 2^-24);
    // softmax weights then change by a factor within e^{+-2 delta}, so each output moves by at
    // most (e^{2 delta} - 1) max|v|, plus the fp32 rounding of the weighted sum (1e-5 max|v|).
    double smax = 0;
    const double scale = 1.0 / std::sqrt(double(d));
    for (index_t h = 0; h < heads; ++h)
      for (index_t i = 0; i < q_len; ++i)
        for (index_t j = 0; j < kv_len; ++j) {
          double s = 0;
          for (index_t x = 0; x < d; ++x)
            s += double(q[std::size_t((h * q_len + i) * d + x)]) * double(k[std::size_t(((h / (heads / kv_heads)) * kv_len + j) * d + x)]);
          smax = std::max(smax, std::abs(s * scale));
        }
    REQUIRE(smax > 5e3);  // the stress actually happens
    const double delta = smax * double(d + 4) * std::ldexp(1.0, -24);
    const double bound = std::expm1(2 * delta) + 1e-5;  // max|v| = 1 (the fp32-rounded reference adds 6e-8)
    double err = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      REQUIRE(std::isfinite(got[i]));
      err = std::max(err, std::abs(double(got[i]) - ref[i]));
    }
    INFO("q_len " << q_len << ": smax " << smax << ", max error " << err << ", bound " << bound);
    CHECK(err <= bound);
    CHECK(got == two);  // 1 and 2 threads bit-identical
  }
}

TEST_CASE("fully masked rows give zeros, also on the split-K decode path", "[numerics][attention]") {
  const index_t heads = 2, d = 32;
  for (index_t kv_len : {index_t(40), index_t(3000)}) {  // 3000 keys: decode splits the key range
    const index_t q_len = 3;
    const auto q = random_vector(std::size_t(heads * q_len * d), 21);
    const auto k = random_vector(std::size_t(heads * kv_len * d), 22), v = random_vector(k.size(), 23);
    std::vector<std::uint8_t> m(std::size_t(q_len * kv_len), 1);
    std::fill(m.begin() + kv_len, m.begin() + 2 * kv_len, std::uint8_t(0));  // row 1 sees nothing
    const DenseMask<std::uint8_t> mask{m.data(), q_len, kv_len, kv_len};
    std::vector<float> got(q.size(), 7.f);
    std::vector<float> ref(q.size());  // double accumulation, rounded once to fp32
    Workspace ws;
    attention(cv(q, heads, q_len, d), cv(k, heads, kv_len, d), cv(v, heads, kv_len, d), mask, hv(got, heads, q_len, d), {}, ws);
    reference::attention(cv(q, heads, q_len, d), cv(k, heads, kv_len, d), cv(v, heads, kv_len, d), mask,
                         hv(ref, heads, q_len, d));
    for (index_t h = 0; h < heads; ++h)
      for (index_t i = 0; i < q_len; ++i)
        for (index_t x = 0; x < d; ++x) {
          const std::size_t at = std::size_t((h * q_len + i) * d + x);
          if (i == 1) REQUIRE(got[at] == 0.f);
          else REQUIRE(std::abs(got[at] - ref[at]) <= 1e-5);
        }
  }
}

// The documented contract (attention/options.hpp): a NaN key makes NaN exactly the rows that see
// it; a NaN value makes NaN its dimension in the rows that see it, and may also reach rows of the
// same query block that evaluate its 64-key tile without seeing it (their probability 0 times
// NaN); other heads, other dimensions and query blocks that skip the tile stay finite.
TEST_CASE("NaN in K or V reaches the rows that see it, as documented", "[numerics][attention]") {
  const index_t heads = 2, d = 32, n = 300;
  for (bool in_v : {false, true})
    for (index_t q_len : {index_t(1), n}) {
      const auto q = random_vector(std::size_t(heads * q_len * d), 31);
      auto k = random_vector(std::size_t(heads * n * d), 32), v = random_vector(k.size(), 33);
      const index_t bad = 150;  // key 150 of head 0 carries a NaN
      (in_v ? v : k)[std::size_t(bad * d + 5)] = std::numeric_limits<float>::quiet_NaN();
      std::vector<float> got(q.size(), 7.f);
      const Causal mask(n - q_len);
      Workspace ws;
      attention(cv(q, heads, q_len, d), cv(k, heads, n, d), cv(v, heads, n, d), mask, hv(got, heads, q_len, d), {}, ws);
      for (index_t h = 0; h < heads; ++h)
        for (index_t i = 0; i < q_len; ++i) {
          const bool sees = h == 0 && i + (n - q_len) >= bad;
          for (index_t x = 0; x < d; ++x) {
            const float o = got[std::size_t((h * q_len + i) * d + x)];
            INFO("nan in " << (in_v ? "V" : "K") << ", q_len " << q_len << ", head " << h << ", row " << i << ", dim " << x);
            if (sees && (!in_v || x == 5)) REQUIRE(std::isnan(o));
            else if (in_v && h == 0 && x == 5 && q_len == n && i >= 96) continue;  // shares the tile: either
            else REQUIRE(std::isfinite(o));
          }
        }
    }
}

}  // namespace test_attention_numerics
