// Measures what AMX's TDPBF16PS and AVX512-BF16's VDPBF16PS compute, bit for bit, against
// candidate scalar models. Run on the machine with AMX (Sapphire Rapids or later); the result
// decides the scalar twin of the AMX kernels (core/amx.hpp) and is quoted in docs/bf16.md.
//
//   g++ -O2 -std=c++17 -march=sapphirerapids bench/probe_amx_bf16.cpp -o probe_amx_bf16
//   ./probe_amx_bf16 [trials]
//
// Models of one accumulation step over a pair (a0, a1) x (b0, b1) into acc, all with bf16
// subnormal operands as zero (DAZ) and subnormal results flushed (FTZ):
//   odd_first   acc = fma(a0, b0, fma(a1, b1, acc))   (vdpbf16ps on Zen 5; the library's model)
//   even_first  acc = fma(a1, b1, fma(a0, b0, acc))
//   pair_exact  acc = round(acc + a0 b0 + a1 b1)        (one rounding of the exact sum)
//   pair_sum    acc = round(acc + round(a0 b0 + a1 b1))
// A tile step chains the 16 pairs of a row in order; each model is applied the same way.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <random>

namespace {

float f_of(std::uint32_t b) { float x; std::memcpy(&x, &b, 4); return x; }
std::uint32_t b_of(float x) { std::uint32_t b; std::memcpy(&b, &x, 4); return b; }
float ftz(float x) { return std::fabs(x) < FLT_MIN ? f_of(b_of(x) & 0x80000000u) : x; }
float op(std::uint16_t h) { return ftz(f_of(std::uint32_t(h) << 16)); }

// Exact a0 b0 + a1 b1 + c rounded once: long double has 64 bits, enough for the sum of two
// 16-bit-significand products and a 24-bit value only when exponents are close; use a two-step
// error-free sum instead (TwoSum on doubles, the products exact in double).
float round_sum3(double p, double q, double c) {
  // p, q exact products (16 bits each), c fp32: sort by magnitude and sum with error compensation.
  double s = p + q;
  double e = (std::fabs(p) >= std::fabs(q)) ? (p - s) + q : (q - s) + p;
  double t = s + c;
  double e2 = (std::fabs(s) >= std::fabs(c)) ? (s - t) + c : (c - t) + s;
  double err = e + e2;
  double r = t + err;  // nearly exact; ties are rare enough for a probe
  return ftz(static_cast<float>(r));
}

enum Model { odd_first, even_first, pair_exact, pair_sum, n_models };
const char* model_name[] = {"odd_first", "even_first", "pair_exact", "pair_sum"};

float step(Model m, float acc, std::uint16_t a0, std::uint16_t a1, std::uint16_t b0, std::uint16_t b1) {
  const float x0 = op(a0), x1 = op(a1), y0 = op(b0), y1 = op(b1);
  acc = ftz(acc);
  switch (m) {
    case odd_first: return ftz(std::fma(x0, y0, ftz(std::fma(x1, y1, acc))));
    case even_first: return ftz(std::fma(x1, y1, ftz(std::fma(x0, y0, acc))));
    case pair_exact: return round_sum3(double(x0) * y0, double(x1) * y1, acc);
    case pair_sum: return ftz(ftz(float(double(x0) * y0 + double(x1) * y1)) + acc);
    default: return 0;
  }
}

std::uint16_t random_bf16(std::mt19937& g, int range) {
  // range 0: normal values near 1 (exponent 120..134); 1: the whole exponent range.
  const std::uint32_t sign = g() & 1u, mant = g() & 0x7fu;
  std::uint32_t ex = range == 0 ? 120 + g() % 15 : g() % 256;
  if (range == 1 && ex == 255 && (g() % 4)) ex = 254;  // fewer inf/NaN
  return static_cast<std::uint16_t>((sign << 15) | (ex << 7) | mant);
}

// Alignment models (as measured for GPU tensor cores): the terms of one step are aligned to the
// largest exponent, each truncated toward zero F bits below it, summed exactly, then rounded to
// fp32 (to nearest even, or toward zero). A step is one pair (chained 16 times) or all 16 pairs.
int exponent_of(double x) { int e; std::frexp(x, &e); return e - 1; }
double trunc_to(double x, int lsb) { return std::trunc(std::ldexp(x, -lsb)) * std::ldexp(1.0, lsb); }
float to_f32(double x, bool rz) {
  float f = static_cast<float>(x);
  if (rz && std::fabs(double(f)) > std::fabs(x)) f = std::nextafter(f, 0.f);
  return ftz(f);
}
float aligned_sum(const double* t, int n, int F, bool rz) {
  int emax = -100000;
  for (int i = 0; i < n; ++i) if (t[i] != 0) emax = std::max(emax, exponent_of(t[i]));
  if (emax == -100000) return 0.f;
  double s = 0;
  for (int i = 0; i < n; ++i) s += trunc_to(t[i], emax - F);
  return to_f32(s, rz);
}
struct AlignModel { int F; bool rz; bool per_step; };
float run_align(const AlignModel& m, float c, const std::uint16_t* a, const std::uint16_t (*B)[32], int n) {
  if (m.per_step) {
    double t[33]; t[0] = ftz(c);
    for (int k = 0; k < 16; ++k) t[1 + 2 * k] = double(op(a[2 * k])) * op(B[k][2 * n]), t[2 + 2 * k] = double(op(a[2 * k + 1])) * op(B[k][2 * n + 1]);
    return aligned_sum(t, 33, m.F, m.rz);
  }
  float acc = c;
  for (int k = 0; k < 16; ++k) {
    double t[3] = {double(ftz(acc)), double(op(a[2 * k])) * op(B[k][2 * n]), double(op(a[2 * k + 1])) * op(B[k][2 * n + 1])};
    acc = aligned_sum(t, 3, m.F, m.rz);
  }
  return acc;
}

struct alignas(64) TileConfig {
  std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

bool same(float a, float b) { return b_of(a) == b_of(b) || (std::isnan(a) && std::isnan(b)); }

}  // namespace

int main(int argc, char** argv) {
  const long trials = argc > 1 ? std::atol(argv[1]) : 20000;
  if (syscall(SYS_arch_prctl, 0x1023 /*ARCH_REQ_XCOMP_PERM*/, 18 /*XFEATURE_XTILEDATA*/) != 0) {
    std::printf("AMX permission refused\n");
    return 1;
  }
  TileConfig cfg;
  for (int t = 0; t < 3; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);

  std::mt19937 g(1234);
  AlignModel align[40];
  std::size_t n_align = 0;
  for (int F : {23, 24, 25, 26, 27, 30})
    for (bool rz : {false, true})
      for (bool ps : {false, true}) align[n_align++] = {F, rz, ps};
  double worst_err_u[2] = {0, 0}, worst_err_vdp[2] = {0, 0};
  for (int range = 0; range < 2; ++range) {
    long amx_mismatch[n_models] = {}, vdp_mismatch[n_models] = {}, lanes = 0;
    long amx_vs_vdp = 0;
    long align_mismatch[40] = {};
    double max_rel_amx_odd = 0;
    int shown = 0;
    for (long tr = 0; tr < trials; ++tr) {
      alignas(64) std::uint16_t A[16][32], B[16][32];  // A row-major [m][k]; B VNNI [k/2][n][2]
      alignas(64) float C0[16][16], C[16][16];
      for (auto& r : A) for (auto& x : r) x = random_bf16(g, range);
      for (auto& r : B) for (auto& x : r) x = random_bf16(g, range);
      for (auto& r : C0) for (auto& x : r) x = range == 0 ? float(int(g() % 2001) - 1000) / 64.f : f_of(b_of(op(random_bf16(g, 1))) | (g() & 0xffffu));
      std::memcpy(C, C0, sizeof C);
      _tile_loadd(0, C, 64);
      _tile_loadd(1, A, 64);
      _tile_loadd(2, B, 64);
      _tile_dpbf16ps(0, 1, 2);
      _tile_stored(0, C, 64);
      for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 16; ++n) {
          // vdpbf16ps chain over the same 16 pairs (lane 0 of a 512-bit op, one pair per call).
          float v = C0[m][n];
          for (int k = 0; k < 16; ++k) {
            std::uint32_t pa, pb;
            std::memcpy(&pa, &A[m][2 * k], 4);
            std::uint16_t bb[2] = {B[k][2 * n], B[k][2 * n + 1]};
            std::memcpy(&pb, bb, 4);
            __m512 acc = _mm512_set1_ps(v);
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(int(pa)), (__m512bh)_mm512_set1_epi32(int(pb)));
            v = _mm512_cvtss_f32(acc);
          }
          ++lanes;
          if (!same(v, C[m][n])) ++amx_vs_vdp;
          {
            // error of the AMX result against the exact value, per unit of |c| + sum |products|
            double exact = ftz(C0[m][n]), mag = std::fabs(double(ftz(C0[m][n])));
            for (int k = 0; k < 16; ++k) {
              const double p0 = double(op(A[m][2 * k])) * op(B[k][2 * n]), p1 = double(op(A[m][2 * k + 1])) * op(B[k][2 * n + 1]);
              exact += p0 + p1, mag += std::fabs(p0) + std::fabs(p1);
            }
            if (std::isfinite(mag) && mag > 0 && std::isfinite(C[m][n]) && mag < 1e30) {
              const double e = std::fabs(double(C[m][n]) - exact) / mag * 16777216.0;
              if (e > worst_err_u[range]) worst_err_u[range] = e;
              const double ev = std::fabs(double(v) - exact) / mag * 16777216.0;
              if (ev > worst_err_vdp[range]) worst_err_vdp[range] = ev;
            }
          }
          if (range == 0)
            for (std::size_t am = 0; am < n_align; ++am)
              if (!same(run_align(align[am], C0[m][n], A[m], B, n), C[m][n])) ++align_mismatch[am];
          for (int md = 0; md < n_models; ++md) {
            float r = C0[m][n];
            for (int k = 0; k < 16; ++k) r = step(Model(md), r, A[m][2 * k], A[m][2 * k + 1], B[k][2 * n], B[k][2 * n + 1]);
            if (!same(r, C[m][n])) {
              ++amx_mismatch[md];
              if (md == odd_first && std::isfinite(r) && std::isfinite(C[m][n]) && r != 0) {
                double rel = std::fabs(double(r) - C[m][n]) / std::fabs(double(r));
                if (rel > max_rel_amx_odd) max_rel_amx_odd = rel;
              }
              if (md == odd_first && range == 0 && shown < 3) {
                ++shown;
                std::printf("  range0 example m%d n%d: amx %.9g (0x%08x) odd_first %.9g (0x%08x)\n", m, n, C[m][n],
                            b_of(C[m][n]), r, b_of(r));
              }
            }
            if (!same(r, v)) ++vdp_mismatch[md];
          }
        }
    }
    std::printf("range %s: %ld lanes of 16-pair chains\n", range == 0 ? "normal" : "full", lanes);
    std::printf("  amx vs vdpbf16ps chain: %ld mismatches\n", amx_vs_vdp);
    for (int md = 0; md < n_models; ++md)
      std::printf("  %-10s  amx mismatches %ld   vdpbf16ps mismatches %ld\n", model_name[md], amx_mismatch[md],
                  vdp_mismatch[md]);
    std::printf("  max relative |amx - odd_first| (finite, nonzero) %.3g\n", max_rel_amx_odd);
    std::printf("  worst |result - exact| / (|c| + sum |products|), in units of 2^-24: amx %.3f, vdpbf16ps %.3f\n",
                worst_err_u[range], worst_err_vdp[range]);
    if (range == 0)
      for (std::size_t am = 0; am < n_align; ++am)
        std::printf("  align F=%d %s %s: amx mismatches %ld\n", align[am].F, align[am].rz ? "rz " : "rne",
                    align[am].per_step ? "per 16-pair step" : "per pair", align_mismatch[am]);
  }
  _tile_release();
  return 0;
}
