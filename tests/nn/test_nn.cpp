// The nn blocks (RMSNorm, LayerNorm, linear with and without bias, SwiGLU, the GELU MLP, RoPE in
// every variant, partial rotary included) against double-precision references written from
// their definitions, and the vector kernels against their scalar twins.
#include <cmath>
#include <vector>

#include "common.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_nn_nn {

using namespace ctxcomp;
using ctxcomp::test::random_vector;
using ctxcomp::test::relative_error;
using Catch::Matchers::Contains;

namespace {
/// The Llama 3 rule in double precision, transcribed from the fixtures README.
std::vector<double> llama3_inv_freq_double(double theta, index_t dim, double factor, double low, double high,
                                           double original_max) {
  const double pi = 3.14159265358979323846;
  std::vector<double> f;
  for (index_t i = 0; i < dim / 2; ++i) {
    const double inv = 1.0 / std::pow(theta, double(2 * i) / double(dim));
    const double wavelen = 2 * pi / inv;
    const double low_wavelen = original_max / low, high_wavelen = original_max / high;
    if (wavelen > low_wavelen) f.push_back(inv / factor);
    else if (wavelen < high_wavelen) f.push_back(inv);
    else {
      const double smooth = (original_max / wavelen - low) / (high - low);
      f.push_back((1 - smooth) * inv / factor + smooth * inv);
    }
  }
  return f;
}
}  // namespace


TEST_CASE("RMSNorm, linear and SwiGLU match double references", "[nn][threads]") {
  const index_t T = 19, H = 72, I = 150;
  auto x = random_vector(std::size_t(T * H), 7, -2.f, 2.f), w = random_vector(std::size_t(H), 8, 0.5f, 1.5f);
  std::vector<float> y(std::size_t(T * H));
  rmsnorm(matrix_view<const float>(x.data(), T, H), w.data(), H, 1e-6f, matrix_view(y.data(), T, H));
  for (index_t t = 0; t < T; ++t) {
    double ss = 0;
    for (index_t i = 0; i < H; ++i) ss += double(x[std::size_t(t * H + i)]) * x[std::size_t(t * H + i)];
    const double r = 1 / std::sqrt(ss / H + 1e-6);
    for (index_t i = 0; i < H; ++i) REQUIRE(std::abs(y[std::size_t(t * H + i)] - w[i] * x[std::size_t(t * H + i)] * r) <= 2e-6 * 4);
  }

  auto wg = random_vector(std::size_t(I * H), 9), wu = random_vector(std::size_t(I * H), 10),
       wd = random_vector(std::size_t(H * I), 11);
  SwiGLUWeights<float> mlp{{wg.data(), I, H}, {wu.data(), I, H}, {wd.data(), H, I}};
  std::vector<float> out(std::size_t(T * H)), out_t2(std::size_t(T * H)), ref(std::size_t(T * H));
  for (index_t t = 0; t < T; ++t) {
    std::vector<double> h(static_cast<std::size_t>(I));
    for (index_t j = 0; j < I; ++j) {
      double g = 0, u = 0;
      for (index_t i = 0; i < H; ++i)
        g += double(x[std::size_t(t * H + i)]) * wg[std::size_t(j * H + i)], u += double(x[std::size_t(t * H + i)]) * wu[std::size_t(j * H + i)];
      h[std::size_t(j)] = g / (1 + std::exp(-g)) * u;
    }
    for (index_t o = 0; o < H; ++o) {
      double s = 0;
      for (index_t j = 0; j < I; ++j) s += h[std::size_t(j)] * wd[std::size_t(o * I + j)];
      ref[std::size_t(t * H + o)] = float(s);
    }
  }
  Workspace ws, lws;
  swiglu(matrix_view<const float>(x.data(), T, H), mlp, matrix_view(out.data(), T, H), ws, lws);
  CHECK(relative_error(out.data(), ref.data(), out.size()) <= 1e-5);
  swiglu(matrix_view<const float>(x.data(), T, H), mlp, matrix_view(out_t2.data(), T, H), ws, lws, test::two_threads());
  CHECK(std::memcmp(out.data(), out_t2.data(), out.size() * sizeof(float)) == 0);

  // bf16 weights give exactly the fp32 result of the bf16-rounded weights.
  std::vector<bf16> wgb(wg.size()), wub(wu.size()), wdb(wd.size());
  kernels::convert(wg.data(), wgb.data(), index_t(wg.size()));
  kernels::convert(wu.data(), wub.data(), index_t(wu.size()));
  kernels::convert(wd.data(), wdb.data(), index_t(wd.size()));
  std::vector<float> wgr(wg.size()), wur(wu.size()), wdr(wd.size());
  kernels::convert(wgb.data(), wgr.data(), index_t(wg.size()));
  kernels::convert(wub.data(), wur.data(), index_t(wu.size()));
  kernels::convert(wdb.data(), wdr.data(), index_t(wd.size()));
  SwiGLUWeights<bf16> mlp_b{{wgb.data(), I, H}, {wub.data(), I, H}, {wdb.data(), H, I}};
  SwiGLUWeights<float> mlp_r{{wgr.data(), I, H}, {wur.data(), I, H}, {wdr.data(), H, I}};
  std::vector<float> ob(out.size()), orr(out.size());
  swiglu(matrix_view<const float>(x.data(), T, H), mlp_b, matrix_view(ob.data(), T, H), ws, lws);
  swiglu(matrix_view<const float>(x.data(), T, H), mlp_r, matrix_view(orr.data(), T, H), ws, lws);
  CHECK(std::memcmp(ob.data(), orr.data(), ob.size() * sizeof(float)) == 0);

  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(linear(matrix_view<const float>(x.data(), T, H), WeightView<float>{wg.data(), I, H + 1},
                           matrix_view(out.data(), T, I), ws),
                    Contains("x has 72 features but the weight expects 73"));
  CHECK_THROWS_WITH(rmsnorm(matrix_view<const float>(x.data(), T, H), w.data(), H - 1, 1e-6f, matrix_view(y.data(), T, H)),
                    Contains("weight has 71 elements"));
}


TEST_CASE("RoPE rotate_half and interleaved match the double formula", "[nn]") {
  const index_t heads = 3, T = 11, d = 16;
  for (RopeStyle style : {RopeStyle::RotateHalf, RopeStyle::Interleaved})
    for (double scaling : {1.0, 4.0}) {
      auto x = random_vector(std::size_t(heads * T * d), 12);
      auto y = x;
      std::vector<std::int64_t> pos{0, 5, 5, 1, 2, 3, 100, 7, 8, 4095, 9};
      RopeConfig cfg;
      cfg.theta = 500000;
      cfg.style = style;
      cfg.linear_scaling = scaling;
      Rope rope(cfg, d);
      rope.apply(HeadsView<float>::contiguous(y.data(), heads, T, d), pos.data());
      for (index_t h = 0; h < heads; ++h)
        for (index_t t = 0; t < T; ++t)
          for (index_t i = 0; i < d / 2; ++i) {
            // transformers evaluates inv_freq in float32; the angle and cos/sin here in double.
            const double inv = 1.0f / std::pow(500000.f, float(2 * i) / float(d));
            const double a = double(pos[std::size_t(t)]) / scaling * inv;
            const index_t i1 = style == RopeStyle::RotateHalf ? i : 2 * i, i2 = style == RopeStyle::RotateHalf ? i + d / 2 : 2 * i + 1;
            const double x1 = x[std::size_t((h * T + t) * d + i1)], x2 = x[std::size_t((h * T + t) * d + i2)];
            REQUIRE(std::abs(y[std::size_t((h * T + t) * d + i1)] - (x1 * std::cos(a) - x2 * std::sin(a))) <= 2e-6 * (1 + std::abs(a) * 1e-3));
            REQUIRE(std::abs(y[std::size_t((h * T + t) * d + i2)] - (x2 * std::cos(a) + x1 * std::sin(a))) <= 2e-6 * (1 + std::abs(a) * 1e-3));
          }
    }
  Rope rope(RopeConfig{}, 8);
  std::vector<float> z(8);
  std::int64_t bad = -1;
  CHECK_THROWS_WITH(rope.apply(HeadsView<float>::contiguous(z.data(), 1, 1, 8), &bad), Catch::Matchers::Contains("position ids must be in [0, 4194304) (token 0 has -1)"));
}


TEST_CASE("llama3 RoPE frequencies match a double-precision transcription of the rule", "[rope][checkpoints]") {
  struct Case {
    double theta;
    index_t dim;
    double factor, low, high, original;
  };
  // The fixture's setting (all three bands at head_dim 16) and Llama-3.2-1B's (head_dim 64).
  for (const Case c : {Case{500000, 16, 8, 1, 4, 64}, Case{500000, 64, 32, 1, 4, 8192}, Case{500000, 128, 8, 1, 4, 8192}}) {
    INFO("head_dim " << c.dim << " factor " << c.factor);
    RopeConfig cfg;
    cfg.theta = c.theta;
    cfg.llama3 = {c.factor, c.low, c.high, c.original};
    Rope rope(cfg, c.dim);
    const auto expect = llama3_inv_freq_double(c.theta, c.dim, c.factor, c.low, c.high, c.original);
    REQUIRE(rope.inv_freq().size() == expect.size());
    int scaled = 0, kept = 0, blended = 0;
    for (std::size_t i = 0; i < expect.size(); ++i) {
      const double plain = 1.0 / std::pow(c.theta, double(2 * i) / double(c.dim));
      // fp32 evaluation of a handful of operations: within 1e-6 relative of the exact rule.
      CHECK(std::abs(rope.inv_freq()[i] - expect[i]) <= 1e-6 * expect[i]);
      if (std::abs(expect[i] - plain / c.factor) <= 1e-12 * plain) ++scaled;
      else if (std::abs(expect[i] - plain) <= 1e-12 * plain) ++kept;
      else ++blended;
    }
    if (c.dim == 16) CHECK((scaled > 0 && kept > 0 && blended > 0));
    // The same rule as llama.cpp's per-frequency divisors (a GGUF's rope_freqs).
    RopeConfig by_factors;
    by_factors.theta = c.theta;
    by_factors.freq_factors = llama3_freq_factors(cfg, c.dim);
    Rope rf(by_factors, c.dim);
    for (std::size_t i = 0; i < expect.size(); ++i) CHECK(std::abs(rf.inv_freq()[i] - expect[i]) <= 1e-6 * expect[i]);
  }
  {
    RopeConfig bad;
    bad.freq_factors = {1.f, 2.f};
    CHECK_THROWS_WITH(Rope(bad, 8), Contains("Rope: 2 frequency factors for 4 rotary frequencies"));
    bad.freq_factors = {1.f, 2.f, -1.f, 4.f};
    CHECK_THROWS_WITH(Rope(bad, 8), Contains("Rope: frequency factor 2 (-1) must be positive"));
  }
  // Both config layouts give the same rule; other types are named in the error.
  nlohmann::json old_layout = {{"rope_theta", 500000.0},
                               {"rope_scaling",
                                {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                                 {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 64}}}};
  nlohmann::json v5 = {{"rope_parameters",
                        {{"rope_type", "llama3"}, {"rope_theta", 500000.0}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 64}}}};
  const auto a = io::rope_from_config(old_layout, "a.json"), b = io::rope_from_config(v5, "b.json");
  CHECK(Rope(a, 16).inv_freq() == Rope(b, 16).inv_freq());
  CHECK(a.llama3.factor == 8.0);
  CHECK(b.theta == 500000.0);
  auto yarn = v5;
  yarn["rope_parameters"]["rope_type"] = "yarn";
  CHECK_THROWS_WITH(io::rope_from_config(yarn, "c.json"), Contains("unsupported RoPE scaling type 'yarn'"));
  auto missing = old_layout;
  missing["rope_scaling"].erase("low_freq_factor");
  CHECK_THROWS_WITH(io::rope_from_config(missing, "d.json"), Contains("needs a number 'low_freq_factor'"));
}


TEST_CASE("linear bias and per-head RMSNorm match double references", "[nn][checkpoints]") {
  const index_t out_f = 37, in_f = 29;
  const auto w = test::random_vector(std::size_t(out_f * in_f), 1), b = test::random_vector(std::size_t(out_f), 2);
  for (index_t rows : {1, 5}) {
    INFO("rows " << rows);
    const auto x = test::random_vector(std::size_t(rows * in_f), 3);
    std::vector<float> y(std::size_t(rows * out_f));
    Workspace ws;
    linear(matrix_view<const float>(x.data(), rows, in_f), WeightView<float>{w.data(), out_f, in_f, b.data()},
           matrix_view(y.data(), rows, out_f), ws);
    std::vector<double> ref(y.size());
    for (index_t t = 0; t < rows; ++t)
      for (index_t o = 0; o < out_f; ++o) {
        double s = b[std::size_t(o)], mag = std::abs(b[std::size_t(o)]);
        for (index_t i = 0; i < in_f; ++i) {
          s += double(x[std::size_t(t * in_f + i)]) * w[std::size_t(o * in_f + i)];
          mag += std::abs(double(x[std::size_t(t * in_f + i)]) * w[std::size_t(o * in_f + i)]);
        }
        ref[std::size_t(t * out_f + o)] = s;
        // A priori: (in_f + 1) roundings of fp32 accumulation, gamma_n * sum |terms|.
        const double u = std::ldexp(1.0, -24), gamma = (in_f + 1) * u / (1 - (in_f + 1) * u);
        CHECK(std::abs(y[std::size_t(t * out_f + o)] - s) <= gamma * mag);
      }
  }
  // rmsnorm_heads: each head vector normalised on its own, weight [head_dim].
  const index_t tokens = 3, heads = 4, hd = 8;
  auto x = test::random_vector(std::size_t(tokens * heads * hd), 4);
  const auto orig = x;
  const auto g = test::random_vector(std::size_t(hd), 5, 0.5f, 1.5f);
  rmsnorm_heads(HeadsView<float>::token_major(x.data(), tokens, heads, hd), g.data(), hd, 1e-6f);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t h = 0; h < heads; ++h) {
      const float* r = orig.data() + t * heads * hd + h * hd;
      double ms = 0;
      for (index_t i = 0; i < hd; ++i) ms += double(r[i]) * r[i];
      const double inv = 1 / std::sqrt(ms / hd + 1e-6);
      for (index_t i = 0; i < hd; ++i)
        CHECK(std::abs(x[std::size_t(t * heads * hd + h * hd + i)] - g[std::size_t(i)] * r[i] * inv) <=
              1e-6 * std::abs(g[std::size_t(i)] * r[i] * inv) + 1e-7);
    }
  CHECK_THROWS_WITH(rmsnorm_heads(HeadsView<float>::token_major(x.data(), tokens, heads, hd), g.data(), hd - 1, 1e-6f),
                    Contains("head_dim 8"));
}

TEST_CASE("LayerNorm matches a double reference; its vector kernel matches its scalar twin", "[nn][gpt_neox]") {
  const index_t T = 9, H = 77;  // a width that leaves a remainder after every vector width
  auto x = random_vector(std::size_t(T * H), 21, -3.f, 5.f), w = random_vector(std::size_t(H), 22, 0.5f, 1.5f),
       b = random_vector(std::size_t(H), 23, -0.3f, 0.3f);
  std::vector<float> y(std::size_t(T * H)), ys(std::size_t(T * H)), inplace = x;
  layernorm(matrix_view<const float>(x.data(), T, H), w.data(), b.data(), H, 1e-5f, matrix_view(y.data(), T, H));
  layernorm<float, simd::ScalarVec>(matrix_view<const float>(x.data(), T, H), w.data(), b.data(), H, 1e-5f,
                                    matrix_view(ys.data(), T, H));
  layernorm(matrix_view<const float>(inplace.data(), T, H), w.data(), b.data(), H, 1e-5f,
            matrix_view(inplace.data(), T, H));
  CHECK(inplace == y);  // out may alias x
  for (index_t t = 0; t < T; ++t) {
    double mean = 0, var = 0;
    for (index_t i = 0; i < H; ++i) mean += x[std::size_t(t * H + i)];
    mean /= H;
    for (index_t i = 0; i < H; ++i) var += (x[std::size_t(t * H + i)] - mean) * (x[std::size_t(t * H + i)] - mean);
    var /= H;
    for (index_t i = 0; i < H; ++i) {
      const double ref = (x[std::size_t(t * H + i)] - mean) / std::sqrt(var + 1e-5) * w[i] + b[i];
      REQUIRE(std::abs(y[std::size_t(t * H + i)] - ref) <= 4e-6 * (1 + std::abs(ref)));
      REQUIRE(std::abs(ys[std::size_t(t * H + i)] - ref) <= 4e-6 * (1 + std::abs(ref)));
    }
  }
  // A constant row has variance 0: y = bias exactly (eps keeps the scale finite).
  std::vector<float> flat(static_cast<std::size_t>(H), 2.5f), fy(static_cast<std::size_t>(H));
  layernorm(matrix_view<const float>(flat.data(), 1, H), w.data(), b.data(), H, 1e-5f, matrix_view(fy.data(), 1, H));
  CHECK(fy == b);
  CHECK_THROWS_WITH(layernorm(matrix_view<const float>(x.data(), T, H), w.data(), b.data(), H - 1, 1e-5f,
                              matrix_view(y.data(), T, H)),
                    Contains("layernorm: weight and bias have 76 elements but x has 77 features"));
  CHECK_THROWS_WITH(layernorm(matrix_view<const float>(x.data(), T, H), w.data(), static_cast<const float*>(nullptr), H,
                              1e-5f, matrix_view(y.data(), T, H)),
                    Contains("layernorm: weight and bias"));
}

TEST_CASE("exact GELU and the GELU MLP match double references", "[nn][gpt_neox][threads]") {
  // The kernel (xsimd's erf) against its scalar twin (std::erf) and the double definition.
  std::vector<float> g = random_vector(1003, 31, -8.f, 8.f);
  g.insert(g.end(), {0.f, -0.f, 1e-30f, -1e-30f, 30.f, -30.f});
  std::vector<float> gv = g, gs = g;
  kernels::gelu(gv.data(), index_t(gv.size()));
  kernels::gelu<simd::ScalarVec>(gs.data(), index_t(gs.size()));
  for (std::size_t i = 0; i < g.size(); ++i) {
    const double ref = 0.5 * double(g[i]) * (1 + std::erf(double(g[i]) / std::sqrt(2.0)));
    INFO("x = " << g[i]);
    // The formula's own fp32 error (torch's is the same formula): erf within 2 ulp of 1 in
    // absolute terms, which 1 + erf cancels for x << 0, scaled by x / 2; plus the roundings of
    // the products.
    const double bound = 0.5 * std::abs(double(g[i])) * 2 * 0x1p-24 + 4 * 0x1p-24 * std::abs(ref) + 1e-37;
    REQUIRE(std::abs(gv[i] - ref) <= bound);
    REQUIRE(std::abs(gs[i] - ref) <= bound);
  }

  const index_t T = 13, H = 40, I = 150;
  auto x = random_vector(std::size_t(T * H), 32, -2.f, 2.f), wu = random_vector(std::size_t(I * H), 33),
       bu = random_vector(std::size_t(I), 34), wd = random_vector(std::size_t(H * I), 35),
       bd = random_vector(std::size_t(H), 36);
  GeluMlpWeights<float> w{{wu.data(), I, H, bu.data()}, {wd.data(), H, I, bd.data()}};
  std::vector<float> out(std::size_t(T * H)), out2(std::size_t(T * H)), ref(std::size_t(T * H));
  for (index_t t = 0; t < T; ++t) {
    std::vector<double> h(static_cast<std::size_t>(I));
    for (index_t j = 0; j < I; ++j) {
      double u = bu[std::size_t(j)];
      for (index_t i = 0; i < H; ++i) u += double(x[std::size_t(t * H + i)]) * wu[std::size_t(j * H + i)];
      h[std::size_t(j)] = 0.5 * u * (1 + std::erf(u / std::sqrt(2.0)));
    }
    for (index_t o = 0; o < H; ++o) {
      double s = bd[std::size_t(o)];
      for (index_t j = 0; j < I; ++j) s += h[std::size_t(j)] * wd[std::size_t(o * I + j)];
      ref[std::size_t(t * H + o)] = float(s);
    }
  }
  Workspace ws, lws;
  gelu_mlp(matrix_view<const float>(x.data(), T, H), w, matrix_view(out.data(), T, H), ws, lws);
  CHECK(relative_error(out.data(), ref.data(), out.size()) <= 1e-5);
  gelu_mlp(matrix_view<const float>(x.data(), T, H), w, matrix_view(out2.data(), T, H), ws, lws, test::two_threads());
  CHECK(out == out2);
  GeluMlpWeights<float> bad{{wu.data(), I, H, bu.data()}, {wd.data(), H, I - 1, bd.data()}};
  CHECK_THROWS_WITH(gelu_mlp(matrix_view<const float>(x.data(), T, H), bad, matrix_view(out.data(), T, H), ws, lws),
                    Contains("gelu_mlp: down is 40 x 149, expected 40 x 150"));
}

TEST_CASE("partial rotary (GPT-NeoX rotary_pct) rotates the first dims and leaves the rest", "[nn][rope][gpt_neox]") {
  const index_t heads = 3, tokens = 5, hd = 16;
  for (index_t rot : {4, 8, 16}) {
    INFO("rotary_dim " << rot);
    RopeConfig cfg;
    cfg.rotary_dim = rot;
    Rope rope(cfg, hd);
    auto x = random_vector(std::size_t(heads * tokens * hd), 41 + rot);
    const auto before = x;
    const std::int64_t pos[tokens] = {0, 3, 17, 250, 4095};
    rope.apply(HeadsView<float>::token_major(x.data(), tokens, heads, hd), pos);
    for (index_t t = 0; t < tokens; ++t)
      for (index_t h = 0; h < heads; ++h) {
        const float* in = before.data() + (t * heads + h) * hd;
        const float* out = x.data() + (t * heads + h) * hd;
        for (index_t i = 0; i < rot / 2; ++i) {  // transformers: inv_freq over the rotary dims only
          const double f = 1.0 / std::pow(10000.0, double(2 * i) / double(rot)), a = double(pos[t]) * f;
          const double r1 = in[i] * std::cos(a) - in[i + rot / 2] * std::sin(a);
          const double r2 = in[i + rot / 2] * std::cos(a) + in[i] * std::sin(a);
          REQUIRE(std::abs(out[i] - r1) <= 2e-6 * (1 + double(pos[t]) * f));
          REQUIRE(std::abs(out[i + rot / 2] - r2) <= 2e-6 * (1 + double(pos[t]) * f));
        }
        for (index_t i = rot; i < hd; ++i) REQUIRE(out[i] == in[i]);  // the pass-through dims
      }
  }
}

}  // namespace test_nn_nn
