// Vector kernels vs their scalar twins and double-precision references on awkward sizes
// (0, 1, lane count +- 1, large); transformer pieces (RMSNorm, linear, SwiGLU, RoPE) vs
// straightforward double loops.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>

#include "catch.hpp"
#include "common.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_core_kernels {

using namespace ctxcomp;
using ctxcomp::test::random_vector;
using ctxcomp::test::relative_error;

namespace {
std::vector<index_t> awkward_sizes() {
  const index_t W = simd::Vec::width;
  return {0, 1, 2, W - 1, W, W + 1, 2 * W - 1, 2 * W + 1, 3 * W + 5, 1000};
}
}  // namespace

TEST_CASE("vector kernels match scalar twins and double references", "[kernels]") {
  for (index_t n : awkward_sizes()) {
    if (n < 0) continue;
    INFO("n = " << n << ", isa " << simd::active_isa());
    auto a = random_vector(std::size_t(n), 1, -3.f, 3.f), b = random_vector(std::size_t(n), 2);
    double dot = 0, sum = 0, mx = -INFINITY;
    for (index_t i = 0; i < n; ++i) dot += double(a[i]) * b[i], sum += a[i], mx = std::max(mx, double(a[i]));
    const double tol = 1e-6 * (1 + std::sqrt(double(n)));
    CHECK(std::abs(kernels::dot(a.data(), b.data(), n) - dot) <= tol * 3);
    CHECK(std::abs(kernels::dot<simd::ScalarVec>(a.data(), b.data(), n) - dot) <= tol * 3);
    CHECK(std::abs(kernels::row_sum(a.data(), n) - sum) <= tol * 3);
    CHECK(kernels::row_max(a.data(), n) == float(mx));
    CHECK(kernels::row_max<simd::ScalarVec>(a.data(), n) == float(mx));

    auto y = b, y2 = b;
    kernels::axpy(0.75f, a.data(), y.data(), n);
    kernels::axpy<simd::ScalarVec>(0.75f, a.data(), y2.data(), n);
    for (index_t i = 0; i < n; ++i) {
      REQUIRE(std::abs(y[i] - (b[i] + 0.75 * a[i])) <= 1e-6);
      REQUIRE(std::abs(y2[i] - (b[i] + 0.75 * a[i])) <= 1e-6);
    }
    auto e = a, e2 = a;
    const float s1 = kernels::exp2_shifted(e.data(), 1.5f, n), s2 = kernels::exp2_shifted<simd::ScalarVec>(e2.data(), 1.5f, n);
    double es = 0;
    for (index_t i = 0; i < n; ++i) {
      const double ref = std::exp2(double(a[i]) - 1.5);
      es += ref;
      REQUIRE(std::abs(e[i] - ref) <= 4e-7 * ref);
      REQUIRE(std::abs(e2[i] - ref) <= 4e-7 * ref);
    }
    CHECK(std::abs(s1 - es) <= 1e-6 * (1 + es));
    CHECK(std::abs(s2 - es) <= 1e-6 * (1 + es));
    auto g = a, g2 = a;
    kernels::silu_mul(g.data(), b.data(), n);
    kernels::silu_mul<simd::ScalarVec>(g2.data(), b.data(), n);
    for (index_t i = 0; i < n; ++i) {
      const double ref = double(a[i]) / (1 + std::exp(-double(a[i]))) * b[i];
      REQUIRE(std::abs(g[i] - ref) <= 1e-6);
      REQUIRE(std::abs(g2[i] - ref) <= 1e-6);
    }
  }
  float inf_row[3] = {-INFINITY, -INFINITY, 0.f};
  CHECK(kernels::exp2_shifted(inf_row, 0.f, 3) == 1.f);
  CHECK(inf_row[0] == 0.f);
}

TEST_CASE("storage conversions round to nearest even and widen exactly", "[kernels]") {
  for (index_t n : awkward_sizes()) {
    auto a = random_vector(std::size_t(n), 3, -100.f, 100.f);
    std::vector<bf16> b(static_cast<std::size_t>(n));
    std::vector<fp16> h(static_cast<std::size_t>(n));
    std::vector<float> back(static_cast<std::size_t>(n)), back_h(static_cast<std::size_t>(n));
    kernels::convert(a.data(), b.data(), n);
    kernels::convert(a.data(), h.data(), n);
    kernels::convert(b.data(), back.data(), n);
    kernels::convert(h.data(), back_h.data(), n);
    for (index_t i = 0; i < n; ++i) {
      REQUIRE(std::abs(back[i] - a[i]) <= std::ldexp(std::abs(a[i]), -8));
      REQUIRE(std::abs(back_h[i] - a[i]) <= std::ldexp(std::abs(a[i]), -11));
      REQUIRE(to_float(b[i]) == back[i]);
    }
  }
  // 1 + 2^-8 is halfway between two bf16 values: ties go to even (1.0).
  CHECK(to_float(from_float<bf16>(1.f + std::ldexp(1.f, -8))) == 1.f);
  CHECK(to_float(from_float<bf16>(1.f + 3 * std::ldexp(1.f, -8))) == 1.f + std::ldexp(1.f, -6));
  CHECK(std::isnan(to_float(from_float<bf16>(NAN))));
}

TEST_CASE("tile GEMM matches a double GEMM on ragged shapes", "[kernels]") {
  const index_t W = simd::Vec::width;
  for (index_t M : {1, 5, 6, 7, 13, 96})
    for (index_t N : {W, 3 * W, 4 * W, 7 * W})
      for (index_t K : {0, 1, 17, 128})
        for (bool acc : {false, true}) {
          auto A = random_vector(std::size_t(M * K + 1), 4), B = random_vector(std::size_t(K * N + 1), 5);
          auto C = random_vector(std::size_t(M * N), 6), C2 = C;
          if (acc) {
            kernels::tile_gemm<true>(A.data(), K, B.data(), N, C.data(), N, M, N, K);
          } else {
            kernels::tile_gemm<false>(A.data(), K, B.data(), N, C.data(), N, M, N, K);
          }
          for (index_t i = 0; i < M; ++i)
            for (index_t j = 0; j < N; ++j) {
              double r = acc ? C2[std::size_t(i * N + j)] : 0.0;
              for (index_t k = 0; k < K; ++k) r += double(A[std::size_t(i * K + k)]) * B[std::size_t(k * N + j)];
              REQUIRE(std::abs(C[std::size_t(i * N + j)] - r) <= 1e-5);
            }
        }
}

TEST_CASE("tile GEMM: every C element is one FMA chain over k in order, whatever block it falls in", "[kernels]") {
  // The register blocks (MR x NV, and the lower / narrower blocks for the rows and columns left
  // over) change which lanes compute an element, never its chain: C(i, j) = fma(A(i, k), B(k, j),
  // ...) for k = 0, 1, ... from C (accumulate) or 0, with the kernels' fma (one rounding where
  // the target has FMA, a * b + c where it has not: simd::ScalarVec::fma). Rows 1..13 and 1..9
  // vectors of columns reach every block shape; fp32 and bf16 B (widened exactly), with and
  // without prefetch hints, strided and gathered rows.
  const index_t W = simd::Vec::width;
  for (index_t M = 1; M <= 13; ++M)
    for (index_t nvec = 1; nvec <= 9; ++nvec)
      for (index_t K : {1, 5, 33}) {
        const index_t N = nvec * W;
        INFO("M " << M << " N " << N << " K " << K);
        const auto A = random_vector(std::size_t(M * K), unsigned(M * 100 + nvec)), B = random_vector(std::size_t(K * N), 7);
        std::vector<bf16> Bh(B.size());
        for (std::size_t x = 0; x < B.size(); ++x) Bh[x] = bf16(B[x]);
        const auto C0 = random_vector(std::size_t(M * N), 8);
        std::vector<index_t> off(static_cast<std::size_t>(K));
        for (index_t k = 0; k < K; ++k) off[std::size_t(k)] = k * N;
        for (bool acc : {false, true})
          for (bool half : {false, true}) {
            auto chain = C0;
            for (index_t i = 0; i < M; ++i)
              for (index_t j = 0; j < N; ++j) {
                float c = acc ? C0[std::size_t(i * N + j)] : 0.f;
                for (index_t k = 0; k < K; ++k) {
                  const std::size_t kb = std::size_t(k * N + j);
                  c = simd::ScalarVec::fma(A[std::size_t(i * K + k)], half ? to_float(Bh[kb]) : B[kb], c);
                }
                chain[std::size_t(i * N + j)] = c;
              }
            for (int variant = 0; variant < 4; ++variant) {
              INFO("acc " << acc << " bf16 B " << half << " variant " << variant);
              auto C = C0;
              auto run = [&](const auto* b) {
                const index_t pf = variant == 0 ? 0 : 1;
                const auto to = variant == 1 ? simd::PrefetchTo::l1 : simd::PrefetchTo::l2;
                if (variant == 3) {
                  if (acc) kernels::tile_gemm_gathered<true>(A.data(), K, b, off.data(), nullptr, C.data(), N, M, N, K);
                  else kernels::tile_gemm_gathered<false>(A.data(), K, b, off.data(), nullptr, C.data(), N, M, N, K);
                } else if (acc) {
                  kernels::tile_gemm<true>(A.data(), K, b, N, C.data(), N, M, N, K, pf, to);
                } else {
                  kernels::tile_gemm<false>(A.data(), K, b, N, C.data(), N, M, N, K, pf, to);
                }
              };
              if (half) run(Bh.data());
              else run(B.data());
              REQUIRE(std::memcmp(C.data(), chain.data(), C.size() * sizeof(float)) == 0);
            }
          }
      }
}

namespace {
/// tile_gemm_n<Acc, N> against tile_gemm (N at run time), and tile_gemm_bf16_n against
/// tile_gemm_bf16: the same blocks, so the same bits, on ragged row counts.
template <index_t N>
void check_fixed_columns() {
  for (index_t M : {1, 5, 6, 7, 13})
    for (index_t K : {0, 1, 17, 128}) {
      INFO("M " << M << " N " << N << " K " << K);
      auto A = random_vector(std::size_t(M * K + 1), 14), B = random_vector(std::size_t(K * N + 1), 15);
      const auto C0 = random_vector(std::size_t(M * N), 16);
      auto c1 = C0, c2 = C0, c3 = C0, c4 = C0;
      kernels::tile_gemm<false>(A.data(), K, B.data(), N, c1.data(), N, M, N, K);
      kernels::tile_gemm_n<false, N>(A.data(), K, B.data(), N, c2.data(), N, M, K);
      kernels::tile_gemm<true>(A.data(), K, B.data(), N, c3.data(), N, M, N, K, 1, simd::PrefetchTo::l1);
      kernels::tile_gemm_n<true, N>(A.data(), K, B.data(), N, c4.data(), N, M, K, 1, simd::PrefetchTo::l1);
      CHECK(std::memcmp(c1.data(), c2.data(), c1.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(c3.data(), c4.data(), c3.size() * sizeof(float)) == 0);
      const index_t K2 = (K + 1) / 2;
      std::vector<bf16> Ab(std::size_t(M * 2 * K2)), Bb(std::size_t(K2 * 2 * N));
      for (std::size_t x = 0; x < Ab.size(); ++x) Ab[x] = bf16(A[x % A.size()]);
      for (std::size_t x = 0; x < Bb.size(); ++x) Bb[x] = bf16(B[x % B.size()]);
      auto b1 = C0, b2 = C0;
      kernels::tile_gemm_bf16<true>(Ab.data(), 2 * K2, Bb.data(), 2 * N, b1.data(), N, M, N, K2);
      kernels::tile_gemm_bf16_n<true, N>(Ab.data(), 2 * K2, Bb.data(), 2 * N, b2.data(), N, M, K2);
      CHECK(std::memcmp(b1.data(), b2.data(), b1.size() * sizeof(float)) == 0);
    }
}
}  // namespace

TEST_CASE("tile GEMMs with the column count fixed at compile time equal the run-time ones bit for bit",
          "[kernels][bf16]") {
  constexpr index_t W = simd::Vec::width;
  check_fixed_columns<64>();  // the attention's kv tile
  check_fixed_columns<W>();
  check_fixed_columns<5 * W>();
  check_fixed_columns<7 * W>();
}

TEST_CASE("dot-product tile GEMM (decode Q*K^T) matches a double GEMM on ragged shapes", "[kernels]") {
  const index_t W = simd::Vec::width;
  for (index_t M : {1, 2, 4, 5, 9})
    for (index_t N : {index_t(1), index_t(3), W, W + 1, index_t(64)})
      for (index_t K : {1, 17, 64, 80, 128}) {
        INFO("M " << M << " N " << N << " K " << K);
        auto A = random_vector(std::size_t(M * K), 7), Bf = random_vector(std::size_t(N * K), 8);
        std::vector<fp16> B(Bf.begin(), Bf.end());
        std::vector<float> C(std::size_t(M * (N + 3)), -7.f);
        kernels::tile_gemm_nt(A.data(), K, B.data(), K, C.data(), N + 3, M, N, K);
        for (index_t i = 0; i < M; ++i) {
          for (index_t j = 0; j < N; ++j) {
            double r = 0;
            for (index_t k = 0; k < K; ++k) r += double(A[std::size_t(i * K + k)]) * double(to_float(B[std::size_t(j * K + k)]));
            REQUIRE(std::abs(C[std::size_t(i * (N + 3) + j)] - r) <= 1e-6 * (1 + std::sqrt(double(K))) * 3);
          }
          for (index_t j = N; j < N + 3; ++j) REQUIRE(C[std::size_t(i * (N + 3) + j)] == -7.f);  // ldc padding untouched
        }
      }
}

TEST_CASE("gathered tile GEMMs (rows through a page table) equal the strided ones bit for bit", "[kernels]") {
  // B rows scattered in a pool at shuffled offsets (as pages leave them), against the same rows
  // packed contiguously: the same bits from tile_gemm_nt / tile_gemm, with and without hints,
  // whose rows (next) may be any existing rows. Columns of C past N are untouched.
  const index_t W = simd::Vec::width;
  for (index_t M : {1, 2, 4, 7})
    for (index_t N : {index_t(1), index_t(5), W, index_t(64)})
      for (index_t K : {index_t(17), index_t(80), index_t(128)}) {
        INFO("M " << M << " N " << N << " K " << K);
        const index_t rows = std::max(N, K), stride = K + 3, Np = (K + W - 1) / W * W;
        auto pool_f = random_vector(std::size_t(3 * rows * stride + Np), 21);
        std::vector<fp16> pool(pool_f.begin(), pool_f.end());
        std::vector<index_t> slot(std::size_t(3 * rows));
        std::iota(slot.begin(), slot.end(), index_t(0));
        std::shuffle(slot.begin(), slot.end(), std::mt19937(unsigned(M * 131 + N * 7 + K)));
        std::vector<index_t> off(static_cast<std::size_t>(rows)), next(static_cast<std::size_t>(rows));
        for (index_t r = 0; r < rows; ++r)
          off[std::size_t(r)] = slot[std::size_t(r)] * stride, next[std::size_t(r)] = slot[std::size_t(rows + r)] * stride;
        const auto A = random_vector(std::size_t(M * std::max(K, N)), 22);
        // Q * K^T over N gathered rows of length K.
        std::vector<fp16> packed(std::size_t(N * K));
        for (index_t j = 0; j < N; ++j)
          std::copy(pool.begin() + off[std::size_t(j)], pool.begin() + off[std::size_t(j)] + K, packed.begin() + j * K);
        std::vector<float> want(std::size_t(M * (N + 3)), -7.f), got = want, got_pf = want;
        kernels::tile_gemm_nt(A.data(), K, packed.data(), K, want.data(), N + 3, M, N, K);
        kernels::tile_gemm_nt_gathered(A.data(), K, pool.data(), off.data(), nullptr, got.data(), N + 3, M, N, K);
        kernels::tile_gemm_nt_gathered(A.data(), K, pool.data(), off.data(), next.data(), got_pf.data(), N + 3, M, N, K,
                                       simd::PrefetchTo::l1);
        REQUIRE(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)) == 0);
        REQUIRE(std::memcmp(got_pf.data(), want.data(), want.size() * sizeof(float)) == 0);
        // C += P * V over K gathered rows of Np (padded) columns.
        std::vector<fp16> vpacked(std::size_t(K * Np));
        for (index_t k = 0; k < K; ++k)
          std::copy(pool.begin() + off[std::size_t(k)], pool.begin() + off[std::size_t(k)] + Np, vpacked.begin() + k * Np);
        const auto C0 = random_vector(std::size_t(M * (Np + W)), 23);
        auto cw = C0, cg = C0, cgp = C0;
        kernels::tile_gemm<true>(A.data(), K, vpacked.data(), Np, cw.data(), Np + W, M, Np, K);
        kernels::tile_gemm_gathered<true>(A.data(), K, pool.data(), off.data(), nullptr, cg.data(), Np + W, M, Np, K);
        kernels::tile_gemm_gathered<true>(A.data(), K, pool.data(), off.data(), next.data(), cgp.data(), Np + W, M, Np, K,
                                          simd::PrefetchTo::l1);
        REQUIRE(std::memcmp(cg.data(), cw.data(), cw.size() * sizeof(float)) == 0);
        REQUIRE(std::memcmp(cgp.data(), cw.data(), cw.size() * sizeof(float)) == 0);
        // and the strided form itself against a double GEMM (so the comparison is not circular)
        for (index_t i = 0; i < M; ++i)
          for (index_t j = 0; j < Np; ++j) {
            double r = C0[std::size_t(i * (Np + W) + j)], a = std::abs(r);
            for (index_t k = 0; k < K; ++k) {
              const double t = double(A[std::size_t(i * K + k)]) * double(to_float(vpacked[std::size_t(k * Np + j)]));
              r += t, a += std::abs(t);
            }
            REQUIRE(std::abs(double(cw[std::size_t(i * (Np + W) + j)]) - r) <= a * double(K + 1) * std::ldexp(1.0, -24));
          }
        for (index_t i = 0; i < M; ++i)
          for (index_t j = Np; j < Np + W; ++j)
            REQUIRE(cg[std::size_t(i * (Np + W) + j)] == C0[std::size_t(i * (Np + W) + j)]);  // past N untouched
      }
}

TEST_CASE("reduce_add_lanes sums each vector into its lane, by xsimd's haddp tree", "[kernels]") {
  using V = simd::Vec;
  constexpr int W = V::width;
  // Values of mixed magnitude, so that the order of the additions shows in the bits.
  auto x = random_vector(std::size_t(W * W), 9, -1.f, 1.f);
  for (std::size_t i = 0; i < x.size(); i += 3) x[i] *= 1e6f;
  typename V::type acc[W];
  for (int r = 0; r < W; ++r) acc[r] = V::load(x.data() + r * W);
  alignas(64) float got[W];
  V::store(got, V::reduce_add_lanes(acc, V::lane_order()));
  for (int r = 0; r < W; ++r) {
    double s = 0, a = 0;
    for (int l = 0; l < W; ++l) s += x[std::size_t(r * W + l)], a += std::abs(x[std::size_t(r * W + l)]);
    REQUIRE(std::abs(got[r] - s) <= a * W * std::ldexp(1.0, -24));
  }
#if defined(CTXCOMP_HAS_XSIMD)
  if constexpr (W > 1) {  // the same bits as haddp's sums put in row order
    alignas(64) float h[W];
    xsimd::haddp(acc).store_aligned(h);
    const auto& order = V::lane_order();
    for (int r = 0; r < W; ++r) REQUIRE(std::memcmp(&got[r], &h[order.lane[r]], sizeof(float)) == 0);
  }
#endif
}

namespace {
template <class T>
void check_widen_transposed() {
  const index_t W = simd::Vec::width;
  for (index_t n : {index_t(0), index_t(1), W - 1, W, W + 1, 2 * W + 3, index_t(64)})
    for (index_t d : {index_t(1), W - 1, W, index_t(72), index_t(80), index_t(128)})
      for (bool scaled : {false, true}) {
        if (scaled && !is_quantized_v<T>) continue;
        INFO("n " << n << " d " << d << " scaled " << scaled);
        const index_t lds = d + 5, ldd = n + 2;
        auto f = random_vector(std::size_t(std::max<index_t>(1, n * lds)), 10, -3.f, 3.f);
        std::vector<T> src(f.size());
        for (std::size_t i = 0; i < f.size(); ++i) {
          if constexpr (is_quantized_v<T>) src[i].v = std::int8_t(std::lround(f[i] * 40.f));
          else src[i] = T(f[i]);
        }
        auto scales = random_vector(std::size_t(std::max<index_t>(1, n)), 11, 0.001f, 0.1f);
        std::vector<float> dst(std::size_t(std::max<index_t>(1, d * ldd)), -9.f);
        // (prefetch hints on some calls: they must not change anything)
        kernels::widen_transposed(src.data(), lds, n, d, scaled ? scales.data() : nullptr, dst.data(), ldd, n % 2 ? 0 : 1);
        std::vector<float> dst2(dst.size(), -9.f);  // the scalar twin writes the same values
        kernels::widen_transposed<simd::ScalarVec>(src.data(), lds, n, d, scaled ? scales.data() : nullptr, dst2.data(), ldd);
        REQUIRE(std::memcmp(dst.data(), dst2.data(), dst.size() * sizeof(float)) == 0);
        for (index_t i = 0; i < d; ++i)
          for (index_t j = 0; j < ldd; ++j) {
            const float got = dst[std::size_t(i * ldd + j)];
            if (j >= n) {
              REQUIRE(got == -9.f);  // columns past n untouched
              continue;
            }
            const T& e = src[std::size_t(j * lds + i)];
            double x;
            if constexpr (is_quantized_v<T>) x = e.v;
            else x = double(to_float(e));
            // one fp32 rounding of the exact product (exact when unscaled)
            REQUIRE(got == float(scaled ? x * double(scales[std::size_t(j)]) : x));
          }
      }
}
}  // namespace

TEST_CASE("widen_transposed widens, scales and transposes rows exactly", "[kernels]") {
  check_widen_transposed<float>();
  check_widen_transposed<fp16>();
  check_widen_transposed<bf16>();
  check_widen_transposed<qint8>();
}

TEST_CASE("packed linear GEMM matches a double GEMM and its scalar FMA chain", "[kernels][gemm][threads]") {
  // Ragged shapes around the panel width (MI rows), the register tile (NJ columns), the task
  // width (96 columns) and the k-blocking; strided operands; fp32 and bf16 weights.
  using S = kernels::GemmNtShape<simd::Vec>;
  const index_t MI = S::MI;
  Workspace ws;
  for (index_t M : {index_t(1), index_t(2), MI - 1, MI, MI + 1, 2 * MI + 3, index_t(130)})
    for (index_t N : {1, 5, 7, 95, 97, 200})
      for (index_t K : {0, 1, 17, 700}) {
        const index_t lda = K + 3, ldb = K + 1, ldc = N + 2;
        auto A = random_vector(std::size_t(M * lda), 12), B = random_vector(std::size_t(N * ldb), 13);
        std::vector<float> C(std::size_t(M * ldc), -7.f), R(C.size(), -7.f);
        kernels::gemm_nt<float>(A.data(), lda, B.data(), ldb, C.data(), ldc, M, N, K, ws);
        kernels::gemm_nt_reference<float>(A.data(), lda, B.data(), ldb, R.data(), ldc, M, N, K);
        const double gamma = double(K) * 0x1p-24 / (1 - double(K) * 0x1p-24);
        for (index_t i = 0; i < M; ++i) {
          for (index_t j = 0; j < N; ++j) {
            double r = 0, mag = 0;
            for (index_t k = 0; k < K; ++k) {
              const double p = double(A[std::size_t(i * lda + k)]) * B[std::size_t(j * ldb + k)];
              r += p, mag += std::abs(p);
            }
            // The a-priori bound of any order of K float multiply-adds.
            REQUIRE(std::abs(C[std::size_t(i * ldc + j)] - r) <= gamma * mag);
          }
          for (index_t j = N; j < ldc; ++j) REQUIRE(C[std::size_t(i * ldc + j)] == -7.f);  // padding untouched
        }
#if defined(__FMA__)
        // With fused multiply-adds the kernel is exactly the sequential chain over k.
        if (simd::Vec::width > 1) REQUIRE(std::memcmp(C.data(), R.data(), C.size() * sizeof(float)) == 0);
#endif
        // bf16 weights: exactly the fp32 product of the widened weights.
        std::vector<bf16> Bb(B.size());
        std::vector<float> Bw(B.size()), Cb(C.size(), -7.f), Cw(C.size(), -7.f);
        kernels::convert(B.data(), Bb.data(), index_t(B.size()));
        kernels::convert(Bb.data(), Bw.data(), index_t(B.size()));
        kernels::gemm_nt<bf16>(A.data(), lda, Bb.data(), ldb, Cb.data(), ldc, M, N, K, ws);
        kernels::gemm_nt<float>(A.data(), lda, Bw.data(), ldb, Cw.data(), ldc, M, N, K, ws);
        REQUIRE(std::memcmp(Cb.data(), Cw.data(), Cb.size() * sizeof(float)) == 0);
        std::vector<float> C2(C.size(), -7.f);
        kernels::gemm_nt<float>(A.data(), lda, B.data(), ldb, C2.data(), ldc, M, N, K, ws, test::two_threads());
        REQUIRE(std::memcmp(C.data(), C2.data(), C.size() * sizeof(float)) == 0);
      }
  // Steady state: the same shape again takes no new memory.
  const index_t M = 70, N = 300, K = 500;
  auto A = random_vector(std::size_t(M * K), 14), B = random_vector(std::size_t(N * K), 15);
  std::vector<float> C(std::size_t(M * N));
  Workspace w2;
  kernels::gemm_nt<float>(A.data(), K, B.data(), K, C.data(), N, M, N, K, w2);
  const auto allocs = w2.allocations();
  kernels::gemm_nt<float>(A.data(), K, B.data(), K, C.data(), N, M, N, K, w2);
  CHECK(w2.allocations() == allocs);
  CHECK(w2.capacity() == kernels::gemm_nt_workspace_bytes<float>(M, N, K, 1));
}



TEST_CASE("all_finite finds a NaN or an Inf anywhere, vector body or tail", "[kernels]") {
  for (index_t n : {1, 15, 16, 17, 100}) {
    std::vector<float> x(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) x[std::size_t(i)] = (i % 3 == 0 ? -1.f : 1.f) * std::ldexp(1.f, int(i % 120));
    REQUIRE(kernels::all_finite(x.data(), n));  // large finite values, negative zeros below
    x[0] = -0.f;
    REQUIRE(kernels::all_finite(x.data(), n));
    REQUIRE(kernels::all_finite<simd::ScalarVec>(x.data(), n));
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                      -std::numeric_limits<float>::infinity()})
      for (index_t at : {index_t(0), n / 2, n - 1}) {
        auto y = x;
        y[std::size_t(at)] = bad;
        INFO("n " << n << " at " << at << " value " << bad);
        REQUIRE_FALSE(kernels::all_finite(y.data(), n));
        REQUIRE_FALSE(kernels::all_finite<simd::ScalarVec>(y.data(), n));
      }
  }
}

}  // namespace test_core_kernels
