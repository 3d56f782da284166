// Fused attention vs the double-precision reference: random shapes, every mask, GQA groups,
// storage types, scalar twin, thread counts; error paths leave outputs untouched.
#include <cstring>

#include "catch.hpp"
#include "common.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_attention_attention {

using namespace ctxcomp;
using ctxcomp::test::random_vector;
using ctxcomp::test::relative_error;

namespace {

struct Problem {
  index_t heads, kv_heads, q_len, kv_len, d;
  std::vector<float> q, k, v;
  Problem(index_t h, index_t kvh, index_t ql, index_t kl, index_t dim, unsigned seed)
      : heads(h), kv_heads(kvh), q_len(ql), kv_len(kl), d(dim) {
    q = random_vector(std::size_t(h * ql * dim), seed, -2.f, 2.f);
    k = random_vector(std::size_t(kvh * kl * dim), seed + 1, -2.f, 2.f);
    v = random_vector(std::size_t(kvh * kl * dim), seed + 2);
  }
  HeadsView<const float> qv() const { return HeadsView<const float>::contiguous(q.data(), heads, q_len, d); }
  HeadsView<const float> kv() const { return HeadsView<const float>::contiguous(k.data(), kv_heads, kv_len, d); }
  HeadsView<const float> vv() const { return HeadsView<const float>::contiguous(v.data(), kv_heads, kv_len, d); }
};

template <class Mask>
void check_against_reference(const Problem& p, const Mask& mask, const char* what) {
  std::vector<float> expect(p.q.size()), got(p.q.size(), 99.f), got_scalar(p.q.size(), 99.f);
  reference::attention(p.qv(), p.kv(), p.vv(), mask, HeadsView<float>::contiguous(expect.data(), p.heads, p.q_len, p.d));
  Workspace ws;
  attention(p.qv(), p.kv(), p.vv(), mask, HeadsView<float>::contiguous(got.data(), p.heads, p.q_len, p.d), {}, ws);
  attention<simd::ScalarVec>(p.qv(), p.kv(), p.vv(), mask,
                             HeadsView<float>::contiguous(got_scalar.data(), p.heads, p.q_len, p.d), {}, ws);
  INFO(what << ": heads " << p.heads << " kv_heads " << p.kv_heads << " q " << p.q_len << " kv " << p.kv_len << " d "
            << p.d << " isa " << simd::active_isa());
  CHECK(relative_error(got.data(), expect.data(), got.size()) <= 1e-5);
  CHECK(relative_error(got_scalar.data(), expect.data(), got.size()) <= 1e-5);
}

std::vector<TokenRole> random_roles(index_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::vector<int> ids(static_cast<std::size_t>(n));
  bool open = false;
  for (auto& id : ids) {
    const int r = int(gen() % 10);
    if (!open && r == 0) id = -1, open = true;
    else if (open && r < 3) id = -2, open = false;
    else id = r;
  }
  return sentinel_roles(ids.data(), n, -1, -2);
}

}  // namespace

TEST_CASE("fused attention matches the reference for every mask and shape", "[attention]") {
  const index_t dims[] = {64, 80, 128};
  const index_t groups[] = {1, 2, 4, 8};
  unsigned seed = 1;
  for (index_t d : dims)
    for (index_t g : groups) {
      const index_t kvh = g == 8 ? 1 : 2, heads = kvh * g;
      for (index_t q_len : {1, 7, 67}) {
        const index_t off = q_len == 1 ? 130 : 29;
        {
          Problem p(heads, kvh, q_len, q_len + off, d, seed++);
          check_against_reference(p, Causal(off), "causal+offset");
          check_against_reference(p, Full{}, "full");
          check_against_reference(p, CrossWithCausalTail(off), "cross");
          check_against_reference(p, ChunkDiagonal{13, true, off}, "chunk-causal");
          check_against_reference(p, ChunkDiagonal{13, false, off}, "chunk-bidir");
          std::vector<index_t> anchors{3};  // a cached key's position: no query row
          for (index_t a = off + 1; a < off + q_len; a += 4) anchors.push_back(a);
          check_against_reference(p, AnchorBidirectional{anchors.data(), index_t(anchors.size()), off}, "anchor");
          auto roles = random_roles(q_len + off, seed);
          check_against_reference(p, SentinelSpans{roles.data(), index_t(roles.size()), off, nullptr}, "sentinel");
          std::vector<std::uint8_t> dense(std::size_t(q_len * (q_len + off)));
          std::mt19937 gen(seed);
          for (auto& x : dense) x = std::uint8_t(gen() % 3 != 0);
          check_against_reference(p, DenseMask<std::uint8_t>{dense.data(), q_len, q_len + off, q_len + off}, "dense");
        }
        {
          Problem p(heads, kvh, q_len, q_len, d, seed++);
          check_against_reference(p, Causal(0), "causal");
          check_against_reference(p, FullBidirectional{}, "bidirectional");
        }
      }
    }
}

TEST_CASE("sentinel mask with a key index (folded cache) matches the reference", "[attention]") {
  const index_t n = 90;
  auto roles = random_roles(n, 7);
  std::vector<index_t> kept;  // keys: every token except span members before the last 20
  for (index_t t = 0; t < n; ++t)
    if (t >= n - 20 || roles[t].role == SpanRole::Ordinary || roles[t].role == SpanRole::Close) kept.push_back(t);
  Problem p(4, 2, 20, index_t(kept.size()), 64, 3);
  check_against_reference(p, SentinelSpans{roles.data(), n, n - 20, kept.data()}, "sentinel+key_index");
}

TEST_CASE("a query row with no visible key yields zeros", "[attention]") {
  Problem p(2, 1, 5, 9, 16, 11);
  std::vector<std::uint8_t> dense(5 * 9, 1);
  std::fill(dense.begin() + 2 * 9, dense.begin() + 3 * 9, 0);  // row 2 sees nothing
  DenseMask<std::uint8_t> mask{dense.data(), 5, 9, 9};
  std::vector<float> out(p.q.size(), 5.f);
  Workspace ws;
  attention(p.qv(), p.kv(), p.vv(), mask, HeadsView<float>::contiguous(out.data(), 2, 5, 16), {}, ws);
  for (index_t h = 0; h < 2; ++h)
    for (index_t i = 0; i < 16; ++i) {
      CHECK(out[std::size_t((h * 5 + 2) * 16 + i)] == 0.f);
      CHECK(std::isfinite(out[std::size_t((h * 5 + 1) * 16 + i)]));
    }
}

TEST_CASE("strided token-major views give the same result as contiguous heads", "[attention]") {
  const index_t heads = 4, kvh = 2, n = 37, d = 64, ld = heads * d + 8;
  Problem p(heads, kvh, n, n, d, 21);
  std::vector<float> qtm(std::size_t(n * ld), NAN);
  for (index_t h = 0; h < heads; ++h)
    for (index_t t = 0; t < n; ++t)
      std::memcpy(&qtm[std::size_t(t * ld + h * d)], &p.q[std::size_t((h * n + t) * d)], sizeof(float) * std::size_t(d));
  std::vector<float> a(p.q.size()), b(std::size_t(n * ld), -3.f);
  Workspace ws;
  attention(p.qv(), p.kv(), p.vv(), Causal(0), HeadsView<float>::contiguous(a.data(), heads, n, d), {}, ws);
  attention(HeadsView<const float>::token_major(qtm.data(), n, heads, d, ld), p.kv(), p.vv(), Causal(0),
            HeadsView<float>::token_major(b.data(), n, heads, d, ld), {}, ws);
  for (index_t h = 0; h < heads; ++h)
    for (index_t t = 0; t < n; ++t)
      for (index_t i = 0; i < d; ++i) REQUIRE(a[std::size_t((h * n + t) * d + i)] == b[std::size_t(t * ld + h * d + i)]);
  for (index_t t = 0; t < n; ++t) CHECK(b[std::size_t(t * ld + heads * d)] == -3.f);  // padding untouched
}

template <class S>
void check_storage(double out_tol) {
  Problem p(8, 2, 33, 70, 128, 5);
  std::vector<S> qs(p.q.size()), ks(p.k.size()), vs(p.v.size());
  kernels::convert(p.q.data(), qs.data(), index_t(qs.size()));
  kernels::convert(p.k.data(), ks.data(), index_t(ks.size()));
  kernels::convert(p.v.data(), vs.data(), index_t(vs.size()));
  auto q = HeadsView<const S>::contiguous(qs.data(), 8, 33, 128);
  auto k = HeadsView<const S>::contiguous(ks.data(), 2, 70, 128);
  auto v = HeadsView<const S>::contiguous(vs.data(), 2, 70, 128);
  std::vector<float> expect(p.q.size()), got(p.q.size());
  std::vector<S> got_s(p.q.size());
  reference::attention(q, k, v, Causal(37), HeadsView<float>::contiguous(expect.data(), 8, 33, 128));
  Workspace ws;
  attention(q, k, v, Causal(37), HeadsView<float>::contiguous(got.data(), 8, 33, 128), {}, ws);
  attention(q, k, v, Causal(37), HeadsView<S>::contiguous(got_s.data(), 8, 33, 128), {}, ws);
  INFO("storage " << type_name<S>());
  // Same stored inputs: fp32 output within fp32 rounding; stored output within its own rounding.
  CHECK(relative_error(got.data(), expect.data(), got.size()) <= 1e-5);
  std::vector<float> widened(got_s.size());
  kernels::convert(got_s.data(), widened.data(), index_t(got_s.size()));
  CHECK(relative_error(widened.data(), expect.data(), got.size()) <= out_tol);
}

TEST_CASE("bf16 and fp16 storage stay within the storage rounding", "[attention]") {
  check_storage<bf16>(std::ldexp(1.0, -8));
  check_storage<fp16>(std::ldexp(1.0, -11));
}

TEST_CASE("results are bit-identical for any thread count", "[attention][threads]") {
  Problem p(8, 2, 300, 300, 128, 9);
  std::vector<float> one(p.q.size()), two(p.q.size()), host(p.q.size());
  Workspace ws;
  auto out = [&](std::vector<float>& o) { return HeadsView<float>::contiguous(o.data(), 8, 300, 128); };
  attention(p.qv(), p.kv(), p.vv(), Causal(0), out(one), {}, ws, SerialExecutor{});
  attention(p.qv(), p.kv(), p.vv(), Causal(0), out(two), {}, ws, test::two_threads());
  CHECK(std::memcmp(one.data(), two.data(), one.size() * sizeof(float)) == 0);
  // A host pool that runs tasks in reverse order on three "workers".
  HostExecutor exec{3, [](index_t n, const HostExecutor::Task& f) {
                      for (index_t i = n - 1; i >= 0; --i) f(i, i % 3);
                    }};
  attention(p.qv(), p.kv(), p.vv(), Causal(0), out(host), {}, ws, exec);
  CHECK(std::memcmp(one.data(), host.data(), one.size() * sizeof(float)) == 0);
}

TEST_CASE("repeated calls of the same shape do not allocate", "[attention]") {
  Problem p(4, 2, 50, 50, 64, 13);
  std::vector<float> o(p.q.size());
  Workspace ws;
  auto out = HeadsView<float>::contiguous(o.data(), 4, 50, 64);
  attention(p.qv(), p.kv(), p.vv(), Causal(0), out, {}, ws);
  const auto allocs = ws.allocations();
  for (int i = 0; i < 3; ++i) attention(p.qv(), p.kv(), p.vv(), Causal(0), out, {}, ws);
  CHECK(ws.allocations() == allocs);
}

TEST_CASE("bad attention arguments raise clear errors and leave outputs untouched", "[attention][errors]") {
  Problem p(6, 4, 5, 9, 16, 17);
  std::vector<float> o(std::size_t(6 * 5 * 16), 42.f);
  auto out = HeadsView<float>::contiguous(o.data(), 6, 5, 16);
  Workspace ws;
  auto untouched = [&] { return std::all_of(o.begin(), o.end(), [](float x) { return x == 42.f; }); };
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(attention(p.qv(), p.kv(), p.vv(), Causal(0), out, {}, ws),
                    Contains("heads (6) is not a multiple of kv_heads (4)"));
  Problem ok(4, 2, 5, 9, 16, 18);
  auto out4 = HeadsView<float>::contiguous(o.data(), 4, 5, 16);
  auto k_short = HeadsView<const float>::contiguous(ok.k.data(), 2, 8, 16);
  CHECK_THROWS_WITH(attention(ok.qv(), ok.kv(), k_short, Full{}, out4, {}, ws), Contains("v is [2 x 8 x 16]"));
  auto q_empty = HeadsView<const float>::contiguous(ok.q.data(), 4, 0, 16);
  CHECK_THROWS_WITH(attention(q_empty, ok.kv(), ok.vv(), Full{}, out4, {}, ws), Contains("q is empty"));
  auto k_bad_stride = HeadsView<const float>{ok.k.data(), 2, 9, 16, 9 * 16, 8};
  CHECK_THROWS_WITH(attention(ok.qv(), k_bad_stride, ok.vv(), Full{}, out4, {}, ws),
                    Contains("token_stride (8) is smaller than head_dim (16)"));
  auto out_wrong = HeadsView<float>::contiguous(o.data(), 4, 4, 16);
  CHECK_THROWS_WITH(attention(ok.qv(), ok.kv(), ok.vv(), Full{}, out_wrong, {}, ws), Contains("out is [4 x 4 x 16]"));
  CHECK_THROWS_WITH(attention(ok.qv(), ok.kv(), ok.vv(), Causal(-1), out4, {}, ws), Contains("q_offset (-1)"));
  std::vector<std::uint8_t> small(4 * 9, 1);
  CHECK_THROWS_WITH(attention(ok.qv(), ok.kv(), ok.vv(), DenseMask<std::uint8_t>{small.data(), 4, 9, 9}, out4, {}, ws),
                    Contains("DenseMask is 4 x 9"));
  AttentionOptions nan_scale;
  nan_scale.scale = NAN;
  CHECK_THROWS_WITH(attention(ok.qv(), ok.kv(), ok.vv(), Full{}, out4, nan_scale, ws), Contains("scale"));
  CHECK(untouched());
  CHECK_THROWS_AS(reference::attention(p.qv(), p.kv(), p.vv(), Causal(0), out), ctxcomp::Error);
  CHECK(untouched());
}

}  // namespace test_attention_attention
