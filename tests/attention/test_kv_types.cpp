// Attention over the caches engines keep: fp16 / bf16 / qint8 K/V against the double reference
// on awkward shapes (head_dim 64..256, kv lengths off the tile and split grid, 1 to 32 query
// heads per kv head), scalar twin and vector kernel, 1 and 2 threads bit-identical; split-K
// against one pass within the fp32 reordering bound; qint8 within its a-priori bound; the
// sentinel mask stays per tile on a folded cache; KvCache<qint8> eviction and the compressors.
#include <cstring>

#include <ctxcomp/io/safetensors.hpp>

#include "catch.hpp"
#include "common.hpp"
#include "fold_driver.hpp"
#include "sac_driver.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_attention_kv_types {

using namespace ctxcomp;
using ctxcomp::test::random_vector;
using ctxcomp::test::relative_error;

namespace {

/// K/V of one storage type built from fp32 values (qint8: quantised per row with scales).
template <class T>
struct StoredKv {
  index_t heads, tokens, d;
  std::vector<T> k, v;
  std::vector<float> ks, vs;
  StoredKv(const std::vector<float>& kf, const std::vector<float>& vf, index_t h, index_t n, index_t dim)
      : heads(h), tokens(n), d(dim), k(kf.size()), v(vf.size()), ks(std::size_t(h * n)), vs(std::size_t(h * n)) {
    for (index_t hh = 0; hh < h; ++hh)
      for (index_t t = 0; t < n; ++t) {
        store_row(view(k, ks), hh, t, kf.data() + (hh * n + t) * dim);
        store_row(view(v, vs), hh, t, vf.data() + (hh * n + t) * dim);
      }
  }
  template <class E, class S>
  HeadsView<E> make(E* x, S* sc) const {
    auto r = HeadsView<E>::contiguous(x, heads, tokens, d);
    if constexpr (is_quantized_v<T>) r.scales = sc, r.scale_head_stride = tokens, r.scale_token_stride = 1;
    return r;
  }
  HeadsView<T> view(std::vector<T>& x, std::vector<float>& sc) { return make(x.data(), sc.data()); }
  HeadsView<const T> kv() const { return make(k.data(), ks.data()); }
  HeadsView<const T> vv() const { return make(v.data(), vs.data()); }
};

template <class T, class Mask>
void check_type(index_t heads, index_t kv_heads, index_t q_len, index_t kv_len, index_t d, const Mask& mask,
                unsigned seed) {
  const auto q = random_vector(std::size_t(heads * q_len * d), seed, -2.f, 2.f);
  const auto kf = random_vector(std::size_t(kv_heads * kv_len * d), seed + 1, -2.f, 2.f);
  const auto vf = random_vector(kf.size(), seed + 2);
  const StoredKv<T> s(kf, vf, kv_heads, kv_len, d);
  const auto qv = HeadsView<const float>::contiguous(q.data(), heads, q_len, d);
  std::vector<float> expect(q.size()), got(q.size(), 9.f), got2(q.size(), 9.f), scalar(q.size(), 9.f);
  auto ov = [&](std::vector<float>& o) { return HeadsView<float>::contiguous(o.data(), heads, q_len, d); };
  reference::attention(qv, s.kv(), s.vv(), mask, ov(expect));  // on the stored values, in double
  Workspace ws;
  attention(qv, s.kv(), s.vv(), mask, ov(got), {}, ws);
  attention<simd::ScalarVec>(qv, s.kv(), s.vv(), mask, ov(scalar), {}, ws);
  attention(qv, s.kv(), s.vv(), mask, ov(got2), {}, ws, test::two_threads());
  INFO(type_name<T>() << ": heads " << heads << "/" << kv_heads << " q " << q_len << " kv " << kv_len << " d " << d);
  CHECK(relative_error(got.data(), expect.data(), got.size()) <= 1e-5);
  CHECK(relative_error(scalar.data(), expect.data(), got.size()) <= 1e-5);
  CHECK(std::memcmp(got.data(), got2.data(), got.size() * sizeof(float)) == 0);  // 1 vs 2 threads
}

}  // namespace

TEST_CASE("attention over fp16, bf16 and qint8 caches matches the double reference", "[attention][kv_types][threads]") {
  unsigned seed = 100;
  for (index_t d : {64, 80, 96, 128, 256})
    for (index_t kv_len : {1, 63, 130, 1000, 1537}) {
      for (auto [heads, kvh] : {std::pair<index_t, index_t>{4, 4}, {8, 2}, {32, 1}}) {
        if (d == 256 && heads == 32 && kv_len > 200) continue;  // keeps the run short; covered at d 128
        check_type<fp16>(heads, kvh, 1, kv_len, d, Causal(kv_len - 1), seed++);
        check_type<bf16>(heads, kvh, 1, kv_len, d, Causal(kv_len - 1), seed++);
        check_type<qint8>(heads, kvh, 1, kv_len, d, Causal(kv_len - 1), seed++);
      }
      if (kv_len >= 63) {  // prefill: many rows, transposed K tiles widened by vector loads
        check_type<fp16>(8, 2, 37, kv_len, d, Causal(kv_len - 37), seed++);
        check_type<bf16>(8, 2, 37, kv_len, d, Causal(kv_len - 37), seed++);
        check_type<qint8>(4, 1, 37, kv_len, d, Causal(kv_len - 37), seed++);
      }
    }
  // Masks with row groups and sentinel spans over typed caches.
  std::vector<index_t> anchors{2, 40, 41, 90};
  check_type<fp16>(8, 2, 60, 100, 64, AnchorBidirectional{anchors.data(), 4, 40}, seed++);
  check_type<qint8>(8, 2, 60, 100, 64, ChunkDiagonal{17, true, 40}, seed++);
  // One query block per kv head (16 query heads each, 5 queries) in two row groups over five K
  // tiles: every group's task transposes each tile again into the one tile's room.
  std::vector<index_t> few{3, 296, 298};
  check_type<fp16>(32, 2, 5, 300, 64, AnchorBidirectional{few.data(), 3, 295}, seed++);
  check_type<qint8>(32, 2, 5, 300, 64, AnchorBidirectional{few.data(), 3, 295}, seed++);
}

TEST_CASE("split-K decode equals one pass within the fp32 reordering bound", "[attention][kv_types]") {
  for (index_t kv_len : {513, 1537, 4100}) {
    const index_t heads = 32, kvh = 1, d = 128;
    const auto q = random_vector(std::size_t(heads * d), 7, -2.f, 2.f);
    const auto k = random_vector(std::size_t(kvh * kv_len * d), 8, -2.f, 2.f), v = random_vector(k.size(), 9);
    const auto qv = HeadsView<const float>::contiguous(q.data(), heads, 1, d);
    const auto kv = HeadsView<const float>::contiguous(k.data(), kvh, kv_len, d);
    const auto vv = HeadsView<const float>::contiguous(v.data(), kvh, kv_len, d);
    std::vector<float> split(q.size()), one(q.size()), expect(q.size());
    Workspace ws;
    AttentionOptions no_split;
    no_split.split_keys = false;
    attention(qv, kv, vv, Causal(kv_len - 1), HeadsView<float>::contiguous(split.data(), heads, 1, d), {}, ws);
    attention(qv, kv, vv, Causal(kv_len - 1), HeadsView<float>::contiguous(one.data(), heads, 1, d), no_split, ws);
    reference::attention(qv, kv, vv, Causal(kv_len - 1), HeadsView<float>::contiguous(expect.data(), heads, 1, d));
    // Both sum the same terms in another order: the sums of l and of each output column see at
    // most (tiles + splits) reordered additions, plus the rescaling by 2^(m_s - M) (one rounding
    // per split) and the final division: |split - one| <= 2 (tiles + splits + 2) u max|v|.
    const double u = std::ldexp(1.0, -24), tiles = double((kv_len + 63) / 64), splits = double((kv_len + 511) / 512);
    double vmax = 0, diff = 0;
    for (float x : v) vmax = std::max(vmax, double(std::abs(x)));
    for (std::size_t i = 0; i < one.size(); ++i) diff = std::max(diff, double(std::abs(split[i] - one[i])));
    INFO("kv " << kv_len << " max |split - one pass| " << diff);
    CHECK(diff <= 2 * (tiles + splits + 2) * u * vmax);
    CHECK(relative_error(split.data(), expect.data(), split.size()) <= 1e-5);
    CHECK(relative_error(one.data(), expect.data(), one.size()) <= 1e-5);
  }
}

TEST_CASE("qint8 attention stays within its a-priori bound of the fp32 cache", "[attention][kv_types]") {
  // Quantisation moves each key element by at most s_k / 2, so a score by at most
  // delta_j = scale * sum_i |q_i| * s_kj / 2 (<= Delta); softmax weights then change by at most
  // e^(2 Delta) - 1 in total, and values by at most s_v / 2:
  //   |out - out_fp32| <= (e^(2 Delta) - 1) max|v| + max_j s_vj / 2   (+ the fp32 kernel's 1e-5).
  struct Shape {
    index_t heads, kvh, q_len, kv_len, d;
  };
  for (const Shape sh : {Shape{4, 2, 1, 35, 16}, Shape{4, 2, 25, 25, 32}, Shape{32, 8, 1, 4096, 128}, Shape{8, 8, 40, 300, 64}}) {
    const auto q = random_vector(std::size_t(sh.heads * sh.q_len * sh.d), 21, -1.f, 1.f);
    const auto kf = random_vector(std::size_t(sh.kvh * sh.kv_len * sh.d), 22, -1.f, 1.f), vf = random_vector(kf.size(), 23);
    const StoredKv<qint8> s(kf, vf, sh.kvh, sh.kv_len, sh.d);
    const auto qv = HeadsView<const float>::contiguous(q.data(), sh.heads, sh.q_len, sh.d);
    std::vector<float> got(q.size()), ref(q.size());
    Workspace ws;
    const Causal mask(sh.kv_len - sh.q_len);
    attention(qv, s.kv(), s.vv(), mask, HeadsView<float>::contiguous(got.data(), sh.heads, sh.q_len, sh.d), {}, ws);
    reference::attention(qv, HeadsView<const float>::contiguous(kf.data(), sh.kvh, sh.kv_len, sh.d),
                         HeadsView<const float>::contiguous(vf.data(), sh.kvh, sh.kv_len, sh.d), mask,
                         HeadsView<float>::contiguous(ref.data(), sh.heads, sh.q_len, sh.d));
    const double scale = 1.0 / std::sqrt(double(sh.d));
    double vmax = 0, svmax = 0;
    for (float x : vf) vmax = std::max(vmax, double(std::abs(x)));
    for (float x : s.vs) svmax = std::max(svmax, double(x));
    double worst = 0;
    for (index_t h = 0; h < sh.heads; ++h)
      for (index_t i = 0; i < sh.q_len; ++i) {
        const index_t kh = h / (sh.heads / sh.kvh);
        double q1 = 0, delta = 0;
        for (index_t t = 0; t < sh.d; ++t) q1 += std::abs(q[std::size_t((h * sh.q_len + i) * sh.d + t)]);
        for (index_t j = 0; j < sh.kv_len; ++j) delta = std::max(delta, scale * q1 * s.ks[std::size_t(kh * sh.kv_len + j)] / 2);
        const double bound = std::expm1(2 * delta) * vmax + svmax / 2 + 1e-5 * vmax;
        for (index_t t = 0; t < sh.d; ++t) {
          const std::size_t at = std::size_t((h * sh.q_len + i) * sh.d + t);
          const double err = std::abs(double(got[at]) - ref[at]);
          worst = std::max(worst, err / bound);
          CHECK(err <= bound);
        }
      }
    UNSCOPED_INFO("qint8 heads " << sh.heads << "/" << sh.kvh << " q " << sh.q_len << " kv " << sh.kv_len << " d " << sh.d
                        << ": worst error / a-priori bound " << worst);
  }
  // quantize_row itself: |x - s q| <= s / 2 (one fp32 rounding of x / s aside), zero and
  // non-finite rows.
  const auto x = random_vector(300, 5, -3.f, 3.f);
  std::vector<qint8> qq(300);
  const float sc = kernels::quantize_row(x.data(), qq.data(), 300);
  for (std::size_t i = 0; i < x.size(); ++i) CHECK(std::abs(double(x[i]) - double(sc) * qq[i].v) <= sc * 0.5 * (1 + 1e-6));
  std::vector<float> zeros(8, 0.f), bad(8, 1.f);
  bad[3] = std::numeric_limits<float>::infinity();
  CHECK(kernels::quantize_row(zeros.data(), qq.data(), 8) == 0.f);
  CHECK(std::isnan(kernels::quantize_row(bad.data(), qq.data(), 8)));
}

TEST_CASE("the sentinel mask answers whole tiles on a folded cache", "[attention][kv_types][fold]") {
  fold::SpanTracker spans(126, 127);
  std::vector<std::int64_t> ids;
  for (int i = 0; i < 600; ++i) ids.push_back(i % 50 == 10 ? 126 : i % 50 == 30 ? 127 : i % 100);
  std::vector<std::int64_t> pos(ids.size());
  spans.push(ids.data(), index_t(ids.size()), pos.data());
  KvCache<fp16> cache(1, 1, 8, 700);
  std::vector<index_t> idx(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) idx[i] = index_t(i);
  cache.append(index_t(ids.size()), pos.data(), idx.data());
  fold::fold(cache, spans);
  // The next ordinary token decodes against the folded cache (its own slot last): every tile All.
  const std::int64_t next = 7;
  std::int64_t p;
  spans.push(&next, 1, &p);
  const index_t t = spans.size() - 1;
  cache.append(1, &p, &t);
  const auto mask = spans.mask(t, cache);
  for (index_t k0 = 0; k0 < cache.size(); k0 += 64)
    CHECK(mask.tile(0, 1, k0, std::min(cache.size(), k0 + 64)) == TileVisibility::All);
  CHECK(count_visible(mask, 1, cache.size()) == cache.size());
}


TEST_CASE("folding and SAC run on a qint8 cache; layer 0 holds the quantised fp32 rows", "[kv_types][fold][sac]") {
  // Layer 0's K/V depend on the embeddings only, so the qint8 cache must hold exactly the
  // quantisation of the fp32 cache's layer-0 rows, for the tokens each method keeps.
  const auto model = host::LlamaModel<float>::load(test::fixtures_dir() + "/models/llama");
  auto same_layer0 = [&](const KvCache<float>& f, const KvCache<qint8>& q) {
    REQUIRE(f.size() == q.size());
    bool same = true;
    for (index_t s = 0; s < f.size(); ++s) same = same && f.token_index()[s] == q.token_index()[s];
    for (bool v : {false, true}) {
      const auto fv = v ? f.values(0) : f.keys(0);
      const auto qv = v ? q.values(0) : q.keys(0);
      std::vector<qint8> qq(std::size_t(fv.head_dim));
      for (index_t h = 0; h < fv.heads; ++h)
        for (index_t t = 0; t < fv.tokens; ++t) {
          const float sc = kernels::quantize_row(fv.row(h, t), qq.data(), fv.head_dim);
          same = same && qv.scale(h, t) == sc;
          for (index_t i = 0; i < fv.head_dim; ++i) same = same && qv(h, t, i).v == qq[std::size_t(i)].v;
        }
    }
    return same;
  };
  {
    auto st = io::SafeTensors::open(test::fixtures_dir() + "/sentinel/sentinel_three_spans.safetensors");
    const auto ids = st.read<std::int64_t>("input_ids");
    host::LlamaHost<float, float> hf(model);
    host::LlamaHost<float, qint8> hq(model);
    auto cf = hf.make_cache(64);
    auto cq = hq.make_cache(64);
    fold::SpanTracker sf(126, 127, 128), sq(126, 127, 128);
    host::run_with_folding(hf, ids.data(), index_t(ids.size()), sf, cf, host::FoldSchedule::EverySpan);
    const auto logits = host::run_with_folding(hq, ids.data(), index_t(ids.size()), sq, cq, host::FoldSchedule::EverySpan);
    CHECK(same_layer0(cf, cq));
    for (float x : logits) REQUIRE(std::isfinite(x));
  }
  {
    auto st = io::SafeTensors::open(test::fixtures_dir() + "/sac/sac_multichunk.safetensors");
    const auto ids = st.read<std::int64_t>("input_ids");
    const auto roles = st.read<float>("role_tokens");
    const auto plan = anchor::AnchorPlan::uniform(index_t(ids.size()), std::stoll(st.meta("chunk_size")),
                                                  std::stoll(st.meta("compress_ratio")));
    host::LlamaHost<float, float> hf(model);
    host::LlamaHost<float, qint8> hq(model);
    auto cf = hf.make_cache(plan.anchor_count());
    auto cq = hq.make_cache(plan.anchor_count());
    const auto rv = matrix_view<const float>(roles.data(), index_t(roles.size()) / 64, 64);
    host::sac_compress(hf, plan, ids.data(), rv, anchor::ChunkMask::Full, cf);
    host::sac_compress(hq, plan, ids.data(), rv, anchor::ChunkMask::Full, cq);
    CHECK(same_layer0(cf, cq));
  }
}

}  // namespace test_attention_kv_types
