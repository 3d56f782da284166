// The bf16 compute path (core/bf16dot.hpp, docs/bf16.md): rounding and the pair dot against their
// scalar definitions and known answers; the vector kernels (vdpbf16ps where the target has it,
// the emulation forced by NoNativeBf16, the scalar twin) bit for bit; thread-count determinism;
// and the a-priori error bounds of the GEMM and the attention against double-precision
// references, on random shapes and on the golden fixtures' weights and inputs.
#include <cfloat>
#include <cstring>
#include <random>
#include <string>
#include <tuple>

#include <ctxcomp/io/icformer_checkpoint.hpp>

#include "catch.hpp"
#include "common.hpp"
#include "llama_host.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_core_bf16 {

using namespace ctxcomp;

namespace {
using Emu = simd::NoNativeBf16<simd::Vec>;
constexpr double kUb = 1.0 / 256;       // bf16 unit roundoff, 2^-8
constexpr double kU = 1.0 / 16777216;   // fp32 unit roundoff, 2^-24
double gamma_n(double n) { return n * kU / (1 - n * kU); }

bool same(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return std::memcmp(&a, &b, sizeof a) == 0;
}
bool same(bf16 a, bf16 b) { return same(to_float(a), to_float(b)); }
template <class T>
bool same_all(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!same(a[i], b[i])) return false;
  return true;
}

float float_bits(std::uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}
/// Any bf16 bit pattern: zeros, subnormals, normals of every exponent, infinities, NaNs.
bf16 any_bf16(std::mt19937& g) { return Eigen::numext::bit_cast<bf16>(static_cast<std::uint16_t>(g())); }
/// bf16 of moderate exponent (products and sums stay finite and normal), some subnormals.
bf16 moderate_bf16(std::mt19937& g) {
  const std::uint32_t sign = g() & 1u, e = g() % 8 == 0 ? 0u : 110u + g() % 30u, man = g() & 0x7fu;
  return Eigen::numext::bit_cast<bf16>(static_cast<std::uint16_t>((sign << 15) | (e << 7) | man));
}

/// The vector kernels' bits for the scope of a test: AMX switched off, then back as it was.
struct AmxOff {
  bool was = amx::set_enabled(false);
  ~AmxOff() { amx::set_enabled(was); }
};

template <class V>
std::vector<bf16> round_with(const std::vector<float>& x) {
  constexpr int W = V::width;
  std::vector<bf16> y(x.size());
  for (std::size_t i = 0; i + W <= x.size(); i += W) simd::Bf16Dot<V>::store_rounded(y.data() + i, V::load(x.data() + i));
  return y;
}
}  // namespace

TEST_CASE("bf16 rounding: nearest even, subnormals flushed, the same on every path", "[bf16][kernels]") {
  std::mt19937 g(11);
  std::vector<float> x(16 * 4096);
  for (auto& v : x) v = float_bits(static_cast<std::uint32_t>(g()));
  for (std::size_t i = 0; i < x.size(); i += 7) x[i] = float_bits(static_cast<std::uint32_t>(g()) & 0x807fffffu);  // subnormals
  for (std::size_t i = 3; i < x.size(); i += 11) x[i] = float(std::ldexp(double(g() % 4096), int(g() % 40) - 20));
  for (float v : x) {
    const bf16 r = simd::round_bf16(v);
    if (std::isnan(v)) {
      CHECK(std::isnan(to_float(r)));
    } else if (std::fabs(v) < FLT_MIN) {  // flushed to a zero of its sign
      CHECK(Eigen::numext::bit_cast<std::uint16_t>(r) == (std::signbit(v) ? 0x8000u : 0u));
    } else {  // Eigen's (PyTorch's) round to nearest even
      REQUIRE(same(r, bf16(v)));
    }
  }
  std::vector<bf16> ref(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) ref[i] = simd::round_bf16(x[i]);
  CHECK(same_all(round_with<simd::Vec>(x), ref));
  CHECK(same_all(round_with<Emu>(x), ref));
  CHECK(same_all(round_with<simd::ScalarVec>(x), ref));
}

TEST_CASE("bf16 pair dot: known answers, and every path equal to the definition", "[bf16][kernels]") {
  auto b = [](double v) { return bf16(float(v)); };
  // Exact small integers: 1 + 3*4 + 2*5 = 23.
  CHECK(simd::dot_bf16_pair(1.f, b(2), b(3), b(5), b(4)) == 23.f);
  // The odd products first: 2^24 + (-2^24) = 0, then + 1 = 1 (even first would lose the 1).
  CHECK(simd::dot_bf16_pair(16777216.f, b(1), b(-1), b(1), b(16777216)) == 1.f);
  // Fused products: 2^100 * 2^100 overflows fp32 only as an intermediate; with -inf it is -inf.
  CHECK(simd::dot_bf16_pair(-INFINITY, b(0), b(std::ldexp(1.0, 100)), b(0), b(std::ldexp(1.0, 100))) == -INFINITY);
  // A subnormal result is flushed: FLT_MIN - 2^-127 = 2^-127 -> 0.
  CHECK(simd::dot_bf16_pair(FLT_MIN, b(0), b(-std::ldexp(1.0, -64)), b(0), b(std::ldexp(1.0, -63))) == 0.f);
  // A subnormal operand counts as zero.
  CHECK(simd::dot_bf16_pair(1.f, b(std::ldexp(1.0, -130)), b(0), b(std::ldexp(1.0, 120)), b(0)) == 1.f);

  std::mt19937 g(12);
  constexpr int W = simd::Vec::width;
  for (int it = 0; it < 20000; ++it) {
    alignas(64) bf16 a[2 * W], p[2];
    alignas(64) float acc[W], out[W], out_emu[W];
    const bool wild = it % 2 == 0;
    for (auto& v : a) v = wild ? any_bf16(g) : moderate_bf16(g);
    p[0] = wild ? any_bf16(g) : moderate_bf16(g), p[1] = wild ? any_bf16(g) : moderate_bf16(g);
    for (auto& v : acc) v = wild ? float_bits(static_cast<std::uint32_t>(g())) : to_float(moderate_bf16(g)) * 3.f;
    using D = simd::Bf16Dot<simd::Vec>;
    using E = simd::Bf16Dot<Emu>;
    simd::Vec::store(out, D::dot(simd::Vec::load(acc), D::load(a), D::broadcast(p)));
    simd::Vec::store(out_emu, E::dot(simd::Vec::load(acc), E::load(a), E::broadcast(p)));
    for (int i = 0; i < W; ++i) {
      const float def = simd::dot_bf16_pair(acc[i], a[2 * i], a[2 * i + 1], p[0], p[1]);
      using S = simd::Bf16Dot<simd::ScalarVec>;
      const float sc = S::dot(acc[i], S::load(a + 2 * i), S::broadcast(p));
      INFO("lane " << i << " acc " << acc[i] << " a " << to_float(a[2 * i]) << "," << to_float(a[2 * i + 1]) << " b "
                   << to_float(p[0]) << "," << to_float(p[1]));
      REQUIRE(same(out[i], def));
      REQUIRE(same(out_emu[i], def));
      REQUIRE(same(sc, def));
    }
  }
  UNSCOPED_INFO("bf16 pair dot: " << (simd::Bf16Dot<simd::Vec>::native ? "vdpbf16ps (AVX512-BF16)" : "emulated") << " on "
                         << simd::active_isa());
}

TEST_CASE("tile_gemm_bf16: native, emulated and scalar kernels equal the reference bit for bit", "[bf16][kernels]") {
  AmxOff vector_kernels;  // AMX tiles have their own bits (checked against the bound below)
  constexpr index_t W = simd::Vec::width;
  std::mt19937 g(13);
  for (index_t M : {1, 5, 6, 7, 13, 96})
    for (index_t N : {W, 4 * W, 5 * W})
      for (index_t K2 : {1, 3, 40, 64}) {
        INFO("M " << M << " N " << N << " K2 " << K2);
        std::vector<bf16> A(std::size_t(M * 2 * K2)), B(std::size_t(K2 * 2 * N));
        for (auto& v : A) v = moderate_bf16(g);
        for (auto& v : B) v = g() % 50 == 0 ? any_bf16(g) : moderate_bf16(g);
        std::vector<float> C0(std::size_t(M * N));
        for (auto& c : C0) c = to_float(moderate_bf16(g));
        for (bool acc : {false, true}) {
          auto ref = C0, nat = C0, emu = C0, sc = C0;
          auto run = [&](auto&& f) {
            if (acc) f(std::true_type{});
            else f(std::false_type{});
          };
          run([&](auto a) {
            constexpr bool Acc = decltype(a)::value;
            kernels::tile_gemm_bf16_reference<Acc>(A.data(), 2 * K2, B.data(), 2 * N, ref.data(), N, M, N, K2);
            kernels::tile_gemm_bf16<Acc>(A.data(), 2 * K2, B.data(), 2 * N, nat.data(), N, M, N, K2);
            kernels::tile_gemm_bf16<Acc, Emu>(A.data(), 2 * K2, B.data(), 2 * N, emu.data(), N, M, N, K2);
            kernels::tile_gemm_bf16<Acc, simd::ScalarVec>(A.data(), 2 * K2, B.data(), 2 * N, sc.data(), N, M, N, K2);
          });
          CHECK(same_all(nat, ref));
          CHECK(same_all(emu, ref));
          CHECK(same_all(sc, ref));
        }
      }
}

TEST_CASE("gemm_nt_bf16 equals its reference bit for bit on every path and thread count", "[bf16][kernels][threads]") {
  AmxOff vector_kernels;  // AMX tiles have their own bits (checked against the bound below)
  std::mt19937 g(14);
  std::normal_distribution<float> nd;
  struct S {
    index_t M, N, K;
  };
  for (S s : {S{1, 5, 1}, S{7, 96, 17}, S{65, 200, 64}, S{130, 97, 301}, S{3, 300, 2048}}) {
    INFO("M " << s.M << " N " << s.N << " K " << s.K);
    std::vector<float> A(std::size_t(s.M * s.K)), Wf(std::size_t(s.N * s.K));
    for (auto& v : A) v = nd(g);
    for (auto& v : Wf) v = nd(g) * 0.05f;
    std::vector<bf16> Wb(Wf.size());
    std::vector<fp16> Wh(Wf.size());
    for (std::size_t i = 0; i < Wf.size(); ++i) Wb[i] = bf16(Wf[i]), Wh[i] = fp16(Wf[i]);
    auto check = [&](const auto* w) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(w)>>;
      INFO("weights " << type_name<T>());
      std::vector<float> ref(std::size_t(s.M * s.N)), nat(ref.size()), emu(ref.size()), sc(ref.size()), t2(ref.size());
      Workspace ws;
      kernels::gemm_nt_bf16_reference(A.data(), s.K, w, s.K, ref.data(), s.N, s.M, s.N, s.K);
      kernels::gemm_nt_bf16<T>(A.data(), s.K, w, s.K, nat.data(), s.N, s.M, s.N, s.K, ws);
      kernels::gemm_nt_bf16<T, Emu>(A.data(), s.K, w, s.K, emu.data(), s.N, s.M, s.N, s.K, ws);
      kernels::gemm_nt_bf16<T, simd::ScalarVec>(A.data(), s.K, w, s.K, sc.data(), s.N, s.M, s.N, s.K, ws);
      kernels::gemm_nt_bf16<T>(A.data(), s.K, w, s.K, t2.data(), s.N, s.M, s.N, s.K, ws, test::two_threads());
      CHECK(same_all(nat, ref));
      CHECK(same_all(emu, ref));
      CHECK(same_all(sc, ref));
      CHECK(same_all(t2, ref));
    };
    check(Wf.data());
    check(Wb.data());
    check(Wh.data());
  }
}

namespace {
/// Largest |C - exact| / bound over a tile product C = C0 (or 0) + A * B over k2 pairs, where
/// exact is formed in double from the operands as read (subnormals as zero) and the bound is
/// ((1 + 2u)^k2 - 1) (|c| + sum |products|) + flush slack: two roundings of at most u per pair
/// (the vector chain), one of at most u per 16-pair step (the twin) or of at most 32 u per step
/// (AMX, amx::kStepErrorUlps) all fit it.
/// Element (i, j) of C0 (or 0) + A * B over k2 pairs in double, from the operands as read
/// (subnormals as zero), with |c| + sum |products| (the double sum's own error is below
/// 2 k2 * 2^-53 * mag).
struct Exact {
  double value, mag;
};
Exact exact_element(const std::vector<bf16>& A, index_t lda, const std::vector<bf16>& B, index_t ldb,
                    const std::vector<float>& C0, index_t ldc, index_t i, index_t j, index_t k2, bool acc) {
  const double c0 = acc ? double(simd::flush_subnormal(C0[std::size_t(i * ldc + j)])) : 0.0;
  Exact e{c0, std::abs(c0)};
  for (index_t p = 0; p < 2 * k2; ++p) {
    const double t = double(simd::bf16_operand(A[std::size_t(i * lda + p)])) *
                     double(simd::bf16_operand(B[std::size_t((p / 2) * ldb + 2 * j + p % 2)]));
    e.value += t, e.mag += std::abs(t);
  }
  return e;
}

double tile_bound_ratio(const std::vector<bf16>& A, index_t lda, const std::vector<bf16>& B, index_t ldb,
                        const std::vector<float>& C0, const std::vector<float>& C, index_t ldc, index_t M, index_t N,
                        index_t k2, bool acc) {
  double worst = 0;
  for (index_t i = 0; i < M; ++i)
    for (index_t j = 0; j < N; ++j) {
      const Exact e = exact_element(A, lda, B, ldb, C0, ldc, i, j, k2, acc);
      const double bound = (std::pow(1 + 2 * kU, double(k2)) - 1) * e.mag + double(2 * k2 + 1) * double(FLT_MIN);
      worst = std::max(worst, std::abs(double(C[std::size_t(i * ldc + j)]) - e.value) / bound);
    }
  return worst;
}
}  // namespace

TEST_CASE("AMX tiles: the scalar twin and the tiles within the vector kernels' bound; AMX on and off",
          "[bf16][kernels][amx]") {
  // The twin (amx::tile_block_twin) walks TDPBF16PS's 16-pair steps with one rounding each; the
  // tiles round inside a step in their own way (core/amx.hpp). Both, and the vector chain, must
  // stay within one bound of the exact products (tile_bound_ratio). Where AMX runs, the tiles
  // and every bf16 kernel with AMX on are checked too; elsewhere the INFO says AMX did not run.
  std::mt19937 g(41);
  const bool amx_runs = amx::enabled();
  INFO("AMX " << (amx_runs ? "runs" : amx::compiled() ? "compiled in, not granted here" : "not compiled in"));
  double worst_twin = 0, worst_tiles = 0, worst_chain = 0;
  for (auto [na, nb, k2] : {std::tuple{1, 1, 16}, {2, 2, 64}, {1, 2, 32}, {2, 1, 48}, {2, 2, 256}}) {
    const index_t M = na * amx::kTileRows, N = nb * amx::kTileCols, ldc = N + 3;
    const index_t lda = 2 * k2 + 2, ldb = 2 * N + 4;  // strides wider than the tiles
    INFO("tiles " << na << " x " << nb << ", " << k2 << " pairs");
    std::vector<bf16> A(std::size_t(M * lda)), B(std::size_t(k2 * ldb));
    for (auto& v : A) v = moderate_bf16(g);
    for (auto& v : B) v = moderate_bf16(g);
    std::vector<float> C0(std::size_t(M * ldc));
    for (auto& c : C0) c = to_float(moderate_bf16(g)) * 64.f;
    for (bool acc : {false, true}) {
      auto chain = C0, twin = C0;
      if (acc) kernels::tile_gemm_bf16_reference<true>(A.data(), lda, B.data(), ldb, chain.data(), ldc, M, N, k2);
      else kernels::tile_gemm_bf16_reference<false>(A.data(), lda, B.data(), ldb, chain.data(), ldc, M, N, k2);
      amx::tile_block_twin(na, nb, A.data(), lda, B.data(), ldb, twin.data(), ldc, k2, acc);
      worst_chain = std::max(worst_chain, tile_bound_ratio(A, lda, B, ldb, C0, chain, ldc, M, N, k2, acc));
      worst_twin = std::max(worst_twin, tile_bound_ratio(A, lda, B, ldb, C0, twin, ldc, M, N, k2, acc));
      if (k2 == amx::kTilePairs) {  // one step: the twin is the exact sum rounded once (<= u |exact|)
        for (index_t i = 0; i < M; ++i)
          for (index_t j = 0; j < N; ++j) {
            const Exact e = exact_element(A, lda, B, ldb, C0, ldc, i, j, k2, acc);
            CHECK(std::abs(double(twin[std::size_t(i * ldc + j)]) - e.value) <=
                  kU * std::abs(e.value) + 40 * std::ldexp(e.mag, -53) + double(FLT_MIN));
          }
      }
      if (amx_runs) {
        auto tiles = C0;
        if (na == 2 && nb == 2) amx::tile_block<2, 2>(A.data(), lda, B.data(), ldb, tiles.data(), ldc, k2, acc);
        if (na == 1 && nb == 2) amx::tile_block<1, 2>(A.data(), lda, B.data(), ldb, tiles.data(), ldc, k2, acc);
        if (na == 2 && nb == 1) amx::tile_block<2, 1>(A.data(), lda, B.data(), ldb, tiles.data(), ldc, k2, acc);
        if (na == 1 && nb == 1) amx::tile_block<1, 1>(A.data(), lda, B.data(), ldb, tiles.data(), ldc, k2, acc);
        worst_tiles = std::max(worst_tiles, tile_bound_ratio(A, lda, B, ldb, C0, tiles, ldc, M, N, k2, acc));
        // the whole kernel with AMX (rows and pairs off the tile sizes go to the vector chain)
        auto whole = C0;
        const index_t Mw = M - 3, k2w = k2 - (k2 > 16 ? 5 : 0);
        kernels::tile_gemm_bf16<true>(A.data(), lda, B.data(), ldb, whole.data(), ldc, Mw, N, k2w);
        worst_tiles = std::max(worst_tiles, tile_bound_ratio(A, lda, B, ldb, C0, whole, ldc, Mw, N, k2w, true));
      }
    }
  }
  CHECK(worst_chain <= 1.0);
  CHECK(worst_twin <= 1.0);
  CHECK(worst_tiles <= 1.0);
  UNSCOPED_INFO("error / bound: vector chain " << worst_chain << ", twin " << worst_twin << ", AMX tiles " << worst_tiles);

  // gemm_nt_bf16 with AMX on (where it runs) against the bound, deterministic over thread
  // counts; with AMX off, the reference's bits.
  struct S {
    index_t M, N, K;
  };
  for (S s : {S{16, 32, 32}, S{47, 96, 90}, S{130, 200, 600}}) {
    INFO("gemm_nt_bf16 M " << s.M << " N " << s.N << " K " << s.K);
    std::normal_distribution<float> nd;
    std::vector<float> A(std::size_t(s.M * s.K)), Wf(std::size_t(s.N * s.K));
    for (auto& v : A) v = nd(g);
    for (auto& v : Wf) v = nd(g) * 0.05f;
    std::vector<bf16> Wb(Wf.size());
    for (std::size_t i = 0; i < Wf.size(); ++i) Wb[i] = bf16(Wf[i]);
    std::vector<float> ref(std::size_t(s.M * s.N)), on(ref.size()), on2(ref.size()), off(ref.size());
    Workspace ws;
    kernels::gemm_nt_bf16_reference(A.data(), s.K, Wb.data(), s.K, ref.data(), s.N, s.M, s.N, s.K);
    kernels::gemm_nt_bf16(A.data(), s.K, Wb.data(), s.K, on.data(), s.N, s.M, s.N, s.K, ws);
    kernels::gemm_nt_bf16(A.data(), s.K, Wb.data(), s.K, on2.data(), s.N, s.M, s.N, s.K, ws, test::two_threads());
    CHECK(same_all(on, on2));
    {
      AmxOff vector_only;
      CHECK(std::string(simd::bf16_compute_kernels()) != "amx");
      kernels::gemm_nt_bf16(A.data(), s.K, Wb.data(), s.K, off.data(), s.N, s.M, s.N, s.K, ws);
    }
    CHECK(same_all(off, ref));
    // both within the a-priori bound of a K-long dot product (rows of A against rows of W)
    double worst = 0;
    for (index_t i = 0; i < s.M; ++i)
      for (index_t j = 0; j < s.N; ++j) {
        double exact = 0, mag = 0;
        for (index_t k = 0; k < s.K; ++k) {
          const double t = double(simd::bf16_operand(simd::round_bf16(A[std::size_t(i * s.K + k)]))) *
                           double(simd::bf16_operand(Wb[std::size_t(j * s.K + k)]));
          exact += t, mag += std::abs(t);
        }
        const double bound = (std::pow(1 + 2 * kU, double((s.K + 1) / 2)) - 1) * mag + double(s.K + 1) * double(FLT_MIN);
        worst = std::max(worst, std::abs(double(on[std::size_t(i * s.N + j)]) - exact) / bound);
      }
    CHECK(worst <= 1.0);
  }
  CHECK(std::string(simd::bf16_compute_kernels()) ==
        (amx_runs ? "amx" : simd::Bf16Dot<simd::Vec>::native ? "avx512-bf16" : "emulated"));
}

namespace {
/// The a-priori bound of one bf16-compute dot product of length K (docs/bf16.md):
///   |y~ - y| <= ((1 + u_b)^2 (1 + gamma_K) - 1) * sum |x_k| |w_k|  (+ K * 2^-126 for flushes).
/// u_b = 2^-8 covers the rounding of each operand; exact products; K fp32 additions.
double gemm_bound(index_t K, double abs_dot) {
  return ((1 + kUb) * (1 + kUb) * (1 + gamma_n(double(K))) - 1) * abs_dot + double(K) * 2 * double(FLT_MIN);
}

/// max over outputs of |y - exact| / bound; y from linear(..., Compute::bf16).
template <class T>
double gemm_bound_ratio(const std::vector<float>& x, index_t M, WeightView<T> w) {
  const index_t K = w.in_features, N = w.out_features;
  std::vector<float> y(std::size_t(M * N));
  Workspace ws;
  linear(matrix_view<const float>(x.data(), M, K), w, matrix_view(y.data(), M, N), ws, SerialExecutor{}, Compute::bf16);
  double worst = 0;
  for (index_t i = 0; i < M; ++i)
    for (index_t j = 0; j < N; ++j) {
      double exact = 0, abs_dot = 0;
      for (index_t k = 0; k < K; ++k) {
        const double p = double(x[std::size_t(i * K + k)]) * double(to_float(w.row(j)[k]));
        exact += p, abs_dot += std::abs(p);
      }
      if (w.bias) exact += double(to_float(w.bias[j]));
      worst = std::max(worst, std::abs(double(y[std::size_t(i * N + j)]) - exact) / gemm_bound(K, abs_dot));
    }
  return worst;
}
}  // namespace

TEST_CASE("bf16 linear layers stay within the a-priori bound (random and fixture weights)", "[bf16][icformer][sac]") {
  {  // Llama-like K = 4096 with random activations
    std::mt19937 g(15);
    std::normal_distribution<float> nd;
    const index_t M = 9, N = 64, K = 4096;
    std::vector<float> x(std::size_t(M * K)), w(std::size_t(N * K));
    for (auto& v : x) v = nd(g);
    for (auto& v : w) v = nd(g) * 0.02f;
    const double r = gemm_bound_ratio(x, M, WeightView<float>{w.data(), N, K});
    CHECK(r <= 1.0);
    UNSCOPED_INFO("bf16 linear, random 9 x 64 x 4096: error / a-priori bound = " << r);
  }
  {  // IC-Former fixture: every projection of every layer on the fixture's context embeddings
    auto ckpt = io::IcformerCheckpoint<float>::load(test::fixtures_dir() + "/icformer/icformer_gqa_selfattn/model");
    auto st = io::SafeTensors::open(test::fixtures_dir() + "/icformer/icformer_gqa_selfattn/case.safetensors");
    const auto ctx = st.read<float>("context_embeds");
    const auto& w = ckpt.weights();
    double worst = 0;
    const index_t M = index_t(ctx.size()) / ckpt.config().hidden;
    for (const auto& l : w.layers)
      for (const auto* lin : {&l.q, &l.k, &l.v, &l.mlp.gate, &l.mlp.up}) worst = std::max(worst, gemm_bound_ratio(ctx, M, *lin));
    CHECK(worst <= 1.0);
    UNSCOPED_INFO("bf16 linear, IC-Former fixture projections: error / a-priori bound = " << worst);
  }
  {  // The SAC / sentinel host model: every projection on its embeddings of tokens 0..127
    const auto model = host::LlamaModel<float>::load(test::fixtures_dir() + "/models/llama");
    const index_t d = model.config.hidden, M = model.config.vocab;
    std::vector<float> x(std::size_t(M * d));
    for (index_t i = 0; i < M * d; ++i) x[std::size_t(i)] = to_float(model.embed[std::size_t(i)]);
    double worst = 0;
    for (const auto& l : model.layers)
      for (const auto* lin : {&l.q, &l.k, &l.v, &l.mlp.gate, &l.mlp.up}) worst = std::max(worst, gemm_bound_ratio(x, M, *lin));
    CHECK(worst <= 1.0);
    UNSCOPED_INFO("bf16 linear, host model projections: error / a-priori bound = " << worst);
  }
}

namespace {
/// The attention's a-priori bound (docs/bf16.md), relative to max |v|: with q' = q * scale * log2 e,
///   Delta = ((1 + u)^2 (1 + u_b)^2 (1 + gamma_d) - 1) * max_j sum_i |q'_i k_ji|   (score error, log2 units)
///   |o~ - o| <= (2^(2 Delta) (1 + u_b)^2 (1 + gamma_n) - 1 + e^(2 delta) - 1 + 1e-5) * max |v|
/// the last terms being the fp32 softmax's own bound (attention/options.hpp).
template <class K, class V>
double attention_bound(const std::vector<float>& q, index_t heads, index_t ql, HeadsView<const K> k, HeadsView<const V> v,
                       index_t d, index_t h, index_t i) {
  const index_t kh = h / (heads / k.heads);
  const double c = (1.0 / std::sqrt(double(d))) * 1.4426950408889634;
  double sum_max = 0, s_max = 0, vmax = 0;
  for (index_t j = 0; j < k.tokens; ++j) {
    double a = 0, s = 0;
    for (index_t t = 0; t < d; ++t) {
      const double p = double(q[std::size_t((h * ql + i) * d + t)]) * c * element_value(k, kh, j, t);
      a += std::abs(p), s += p;
      vmax = std::max(vmax, std::abs(element_value(v, kh, j, t)));
    }
    sum_max = std::max(sum_max, a), s_max = std::max(s_max, std::abs(s) / 1.4426950408889634);
  }
  const double delta_b = ((1 + kU) * (1 + kU) * (1 + kUb) * (1 + kUb) * (1 + gamma_n(double(d))) - 1) * sum_max;
  const double delta32 = s_max * double(d + 4) * kU;
  return (std::exp2(2 * delta_b) * (1 + kUb) * (1 + kUb) * (1 + gamma_n(double(k.tokens + 2))) - 1 +
          std::expm1(2 * delta32) + 1e-5) *
             vmax +
         vmax * kU;  // the reference's own rounding to fp32
}

template <class T>
struct TypedKv {
  std::vector<T> k, v;
  std::vector<float> ks, vs;
  HeadsView<const T> kv(bool value, index_t heads, index_t tokens, index_t d) const {
    auto r = HeadsView<const T>::contiguous(value ? v.data() : k.data(), heads, tokens, d);
    if constexpr (is_quantized_v<T>) {
      r.scales = value ? vs.data() : ks.data();
      r.scale_head_stride = tokens, r.scale_token_stride = 1;
    }
    return r;
  }
};

template <class T>
TypedKv<T> make_kv(const std::vector<float>& k, const std::vector<float>& v, index_t heads, index_t tokens, index_t d) {
  TypedKv<T> r;
  r.k.resize(k.size()), r.v.resize(v.size());
  r.ks.resize(std::size_t(heads * tokens)), r.vs.resize(r.ks.size());
  for (bool value : {false, true}) {
    auto view = HeadsView<T>::contiguous(value ? r.v.data() : r.k.data(), heads, tokens, d);
    if constexpr (is_quantized_v<T>) {
      view.scales = value ? r.vs.data() : r.ks.data();
      view.scale_head_stride = tokens, view.scale_token_stride = 1;
    }
    for (index_t h = 0; h < heads; ++h)
      for (index_t t = 0; t < tokens; ++t) store_row(view, h, t, (value ? v : k).data() + (h * tokens + t) * d);
  }
  return r;
}

template <class T, class Mask>
void check_bf16_attention(index_t d, index_t ql, index_t kvl, const Mask& mask, unsigned seed, double& worst) {
  const index_t H = 4, KH = 2;
  INFO("kv type " << type_name<T>() << " head_dim " << d << " q " << ql << " kv " << kvl);
  const auto q = test::random_vector(std::size_t(H * ql * d), seed, -2.f, 2.f);
  const auto kf = test::random_vector(std::size_t(KH * kvl * d), seed + 1, -2.f, 2.f);
  const auto vf = test::random_vector(std::size_t(KH * kvl * d), seed + 2);
  const auto kv = make_kv<T>(kf, vf, KH, kvl, d);
  const auto K = kv.kv(false, KH, kvl, d), V = kv.kv(true, KH, kvl, d);
  const auto qv = HeadsView<const float>::contiguous(q.data(), H, ql, d);
  AttentionOptions opt;
  opt.compute = Compute::bf16;
  std::vector<float> out(q.size()), vec(q.size()), emu(q.size()), t2(q.size(), 3.f), ref(q.size());
  Workspace ws;
  attention(qv, K, V, mask, HeadsView<float>::contiguous(out.data(), H, ql, d), opt, ws);  // AMX where it runs
  attention<Emu>(qv, K, V, mask, HeadsView<float>::contiguous(emu.data(), H, ql, d), opt, ws);
  attention(qv, K, V, mask, HeadsView<float>::contiguous(t2.data(), H, ql, d), opt, ws, test::two_threads());
  {
    AmxOff vector_kernels;
    attention(qv, K, V, mask, HeadsView<float>::contiguous(vec.data(), H, ql, d), opt, ws);
  }
  CHECK(same_all(vec, emu));  // the native vector kernel equals the emulation, softmax included
  if (!amx::enabled()) CHECK(same_all(out, vec));
  CHECK(same_all(out, t2));
  std::vector<float> refd(q.size());  // double accumulation, rounded once to fp32 (u << the bound)
  reference::attention(qv, K, V, mask, HeadsView<float>::contiguous(refd.data(), H, ql, d));
  for (index_t h = 0; h < H; ++h)
    for (index_t i = 0; i < ql; i += std::max<index_t>(1, ql / 7)) {
      double err = 0;
      for (index_t t = 0; t < d; ++t) {
        const std::size_t x = std::size_t((h * ql + i) * d + t);
        err = std::max(err, std::abs(double(out[x]) - double(refd[x])));
      }
      const double bound = attention_bound(q, H, ql, K, V, d, h, i);
      INFO("head " << h << " row " << i << " error " << err << " bound " << bound);
      CHECK(err <= bound);
      worst = std::max(worst, err / bound);
    }
}
}  // namespace

TEST_CASE("bf16-compute attention stays within its a-priori bound; native = emulated; 1 = 2 threads",
          "[bf16][attention][threads]") {
  double worst = 0;
  unsigned seed = 100;
  struct L {
    index_t q, kv;
  };
  for (index_t d : {64, 80, 96, 128, 256})
    for (L s : {L{1, 1}, L{1, 1500}, L{37, 63}, L{200, 700}, L{3, 1100}}) {
      const Causal causal(s.kv - std::min(s.q, s.kv));
      switch (seed++ % 4) {
        case 0: check_bf16_attention<float>(d, s.q, s.kv, causal, seed, worst); break;
        case 1: check_bf16_attention<bf16>(d, s.q, s.kv, causal, seed, worst); break;
        case 2: check_bf16_attention<fp16>(d, s.q, s.kv, causal, seed, worst); break;
        default: check_bf16_attention<qint8>(d, s.q, s.kv, causal, seed, worst); break;
      }
    }
  // IC-Former's cross mask (digests as the trailing tokens) and SAC's anchor mask.
  check_bf16_attention<float>(64, 32, 160, CrossWithCausalTail(128), 7, worst);
  const index_t anchors[] = {3, 9, 40, 77};
  check_bf16_attention<bf16>(128, 100, 100, AnchorBidirectional{anchors, 4, 0}, 8, worst);
  UNSCOPED_INFO("bf16-compute attention: largest error / a-priori bound = " << worst);
}

TEST_CASE("bf16 compute is opt-in: the default options give the fp32 results", "[bf16][attention]") {
  const index_t H = 4, KH = 2, ql = 50, kvl = 90, d = 64;
  const auto q = test::random_vector(std::size_t(H * ql * d), 1), k = test::random_vector(std::size_t(KH * kvl * d), 2),
             v = test::random_vector(std::size_t(KH * kvl * d), 3);
  std::vector<float> a(q.size()), b(q.size());
  Workspace ws;
  auto run = [&](std::vector<float>& o, const AttentionOptions& opt) {
    attention(HeadsView<const float>::contiguous(q.data(), H, ql, d), HeadsView<const float>::contiguous(k.data(), KH, kvl, d),
              HeadsView<const float>::contiguous(v.data(), KH, kvl, d), Causal(kvl - ql),
              HeadsView<float>::contiguous(o.data(), H, ql, d), opt, ws);
  };
  AttentionOptions fp32, bf;
  bf.compute = Compute::bf16;
  run(a, fp32);
  run(b, bf);
  CHECK(AttentionOptions{}.compute == Compute::fp32);
  const double diff = test::relative_error(b.data(), a.data(), a.size());
  CHECK(diff > 1e-5);  // the bf16 path really rounds
  CHECK(diff < 2e-2);
}

}  // namespace test_core_bf16
