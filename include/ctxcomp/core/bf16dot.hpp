// The bf16 compute path's arithmetic: operands rounded to bf16, pairs of products accumulated in
// fp32, exactly as AVX512-BF16's `vdpbf16ps` does it, on every target.
//
// Rounding (`round_bf16`): an fp32 subnormal becomes a signed zero, then round to nearest even;
// NaN stays NaN (quiet). This is `vcvtneps2bf16`.
// Pair dot (`Bf16Dot<V>::dot`): for each fp32 lane, with a, b holding the pairs (a0, a1), (b0, b1):
//     acc = ftz(fma(a0, b0, ftz(fma(a1, b1, daz(acc)))))
// where each fma rounds the exact a * b + c once to nearest even (the product of two bf16 fits
// fp32's 24-bit significand, but not always its exponent range: it must be fused), daz / ftz flush subnormal inputs / results to signed zero, and bf16
// subnormal operands count as zero. This is `vdpbf16ps` as measured on AMD Zen 5 (2 x 10^7
// random lanes, wide exponent range incl. subnormals, bit for bit; the odd pair element first, as
// Intel's pseudocode writes it).
//
// Dispatch is at compile time: the `vdpbf16ps` / `vcvtneps2bf16` kernel where the target has
// AVX512-BF16 (__AVX512BF16__, width 16), elsewhere the same rounding built from widening and an
// FMA (exact, since the product is exact), with explicit flushes. Results are therefore identical
// on every target for the same inputs; only speed differs. `NoNativeBf16<V>` forces the emulation
// for a vector type (tests check the native kernel against it and against the scalar twin).
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "amx.hpp"
#include "simd.hpp"
#include "types.hpp"

/// Keeps a register-blocked micro-kernel out of its caller: inlined into a large caller, GCC
/// re-loads the kernel's operands from memory instead of keeping them in registers.
#if defined(__GNUC__) || defined(__clang__)
#define CTXCOMP_NOINLINE __attribute__((noinline))
#else
#define CTXCOMP_NOINLINE
#endif

namespace ctxcomp {

/// Arithmetic of the dot products (Q.K^T, P.V, linear layers): fp32 (the default; bit for bit
/// the established results) or bf16 operands with fp32 accumulation (core/bf16dot.hpp; softmax,
/// norms and residuals stay fp32).
enum class Compute {
  fp32,  ///< fp32 operands and FMAs
  bf16,  ///< operands rounded to bf16, pairs of products accumulated in fp32 (vdpbf16ps)
};

/// "fp32" or "bf16".
inline const char* compute_name(Compute c) noexcept { return c == Compute::bf16 ? "bf16" : "fp32"; }

}  // namespace ctxcomp

namespace ctxcomp::simd {

namespace detail {
inline std::uint32_t bits_of(float x) noexcept {
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
inline float float_of(std::uint32_t b) noexcept {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}
inline std::uint16_t bf16_bits(bf16 x) noexcept { return Eigen::numext::bit_cast<std::uint16_t>(x); }
}  // namespace detail

/// A subnormal becomes a zero of its sign; other values (NaN included) are unchanged.
inline float flush_subnormal(float x) noexcept {
  return std::fabs(x) < FLT_MIN ? detail::float_of(detail::bits_of(x) & 0x80000000u) : x;
}

/// fp32 -> bf16 as the bf16 compute path rounds: subnormal -> signed zero, then round to nearest
/// even; NaN -> quiet NaN of the same sign (vcvtneps2bf16).
inline bf16 round_bf16(float x) noexcept {
  std::uint32_t b = detail::bits_of(flush_subnormal(x));
  std::uint16_t r;
  if (std::isnan(x)) r = static_cast<std::uint16_t>((b >> 16) | 0x0040u);
  else r = static_cast<std::uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
  return Eigen::numext::bit_cast<bf16>(r);
}

/// The value of a bf16 operand as vdpbf16ps reads it (subnormals as zero), in fp32.
inline float bf16_operand(bf16 x) noexcept {
  return flush_subnormal(detail::float_of(std::uint32_t(detail::bf16_bits(x)) << 16));
}

/// The scalar definition of one lane of Bf16Dot::dot: acc + a1 b1, then + a0 b0 (see the top).
inline float dot_bf16_pair(float acc, bf16 a0, bf16 a1, bf16 b0, bf16 b1) noexcept {
  // Fused: the product is exact (it may exceed the fp32 range before the sum brings it back).
  const float t = flush_subnormal(std::fma(bf16_operand(a1), bf16_operand(b1), flush_subnormal(acc)));
  return flush_subnormal(std::fma(bf16_operand(a0), bf16_operand(b0), t));
}

/// V with the bf16 dot products emulated even where the target has vdpbf16ps (for tests).
template <class V>
struct NoNativeBf16 : V {};

/// The emulated primitives (widen + FMA + flushes) for any vector type: the reference the
/// native kernel matches bit for bit. Members as in Bf16Dot.
template <class V>
struct Bf16DotEmulated {
  using type = typename V::type;          ///< V's register type
  static constexpr int width = V::width;  ///< fp32 lanes
  static constexpr bool native = false;   ///< not the AVX512-BF16 instructions
  /// W pairs: the first (even) and second (odd) elements, widened to fp32 with subnormals zeroed.
  struct pairs {
    type even;  ///< pair element 0 of each lane
    type odd;   ///< pair element 1 of each lane
  };

  /// Lanes' pairs from 2W consecutive bf16 (lane i: p[2i], p[2i + 1]).
  static pairs load(const bf16* p) noexcept {
    if constexpr (width == 1) {
      return {bf16_operand(p[0]), bf16_operand(p[1])};
    } else {
      alignas(64) float e[width], o[width];
      for (int i = 0; i < width; ++i) e[i] = bf16_operand(p[2 * i]), o[i] = bf16_operand(p[2 * i + 1]);
      return {V::load(e), V::load(o)};
    }
  }
  /// The pair (p[0], p[1]) in every lane.
  static pairs broadcast(const bf16* p) noexcept {
    return {V::broadcast(bf16_operand(p[0])), V::broadcast(bf16_operand(p[1]))};
  }
  /// acc + a.odd * b.odd + a.even * b.even per lane, rounded and flushed as vdpbf16ps.
  static type dot(type acc, const pairs& a, const pairs& b) noexcept {
    return ftz(fma(a.even, b.even, ftz(fma(a.odd, b.odd, ftz(acc)))));
  }
  /// Rounds W floats to bf16 (round_bf16) and stores them at p.
  static void store_rounded(bf16* p, type v) noexcept {
    if constexpr (width == 1) {
      *p = round_bf16(v);
    } else {
      alignas(64) float lanes[width];
      V::store(lanes, v);
      for (int i = 0; i < width; ++i) p[i] = round_bf16(lanes[i]);
    }
  }

 private:
  // One rounding on every target: the FMA instruction where there is one, else std::fma per lane.
  static type fma(type a, type b, type c) noexcept {
    if constexpr (width == 1) {
      return std::fma(a, b, c);
    } else {
#if defined(__FMA__) || defined(__AVX512F__) || defined(__ARM_FEATURE_FMA)
      return V::fma(a, b, c);
#else
      alignas(64) float x[width], y[width], z[width];
      V::store(x, a), V::store(y, b), V::store(z, c);
      for (int i = 0; i < width; ++i) z[i] = std::fma(x[i], y[i], z[i]);
      return V::load(z);
#endif
    }
  }
  static type ftz(type x) noexcept {
#if defined(CTXCOMP_HAS_XSIMD)
    if constexpr (width > 1) {
      const type sign = x & type(-0.f);
      return xsimd::select(xsimd::abs(x) < type(FLT_MIN), sign, x);
    } else
#endif
    {
      return flush_subnormal(x);
    }
  }
};

/// The bf16 compute primitives for vector type V: `pairs` (W bf16 pairs in registers), `load`,
/// `broadcast`, `dot` and `store_rounded` as in Bf16DotEmulated, and `native` (whether they are
/// the AVX512-BF16 instructions).
template <class V>
struct Bf16Dot : Bf16DotEmulated<V> {};

template <class V>
struct Bf16Dot<NoNativeBf16<V>> : Bf16DotEmulated<V> {};

#if defined(CTXCOMP_HAS_XSIMD) && defined(__AVX512BF16__) && defined(__AVX512F__)
/// AVX512-BF16: vdpbf16ps and vcvtneps2bf16 (the same results as the emulation, faster).
template <class A>
struct Bf16Dot<XsimdVec<A>> {
  using V = XsimdVec<A>;                  ///< the vector type
  using type = typename V::type;          ///< its register type
  static constexpr int width = V::width;  ///< fp32 lanes
  static_assert(width == 16, "AVX512-BF16 kernels expect 16 fp32 lanes");
  static constexpr bool native = true;  ///< vdpbf16ps / vcvtneps2bf16
  /// 16 bf16 pairs in one register.
  struct pairs {
    __m512bh v;  ///< the 32 bf16 values, pairs adjacent
  };
  /// Lanes' pairs from 32 consecutive bf16.
  static pairs load(const bf16* p) noexcept { return {(__m512bh)_mm512_loadu_si512(p)}; }
  /// The pair (p[0], p[1]) in every lane.
  static pairs broadcast(const bf16* p) noexcept {
    std::int32_t v;
    std::memcpy(&v, p, sizeof v);
    return {(__m512bh)_mm512_set1_epi32(v)};
  }
  /// acc + a.odd * b.odd + a.even * b.even per lane (vdpbf16ps).
  static type dot(type acc, const pairs& a, const pairs& b) noexcept {
    return type(_mm512_dpbf16_ps(acc, a.v, b.v));
  }
  /// Rounds 16 floats to bf16 (vcvtneps2bf16) and stores them at p.
  static void store_rounded(bf16* p, type v) noexcept {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
  }
};
#endif

/// Which kernels `Compute::bf16` runs (the host's compile flags choose what is compiled in; the
/// CPU and the OS what runs): "amx" (AMX tiles for the many-row products, core/amx.hpp: compiled
/// with AMX-TILE and AMX-BF16, e.g. -march=sapphirerapids, and granted at run time), else
/// "avx512-bf16" (vdpbf16ps and vcvtneps2bf16, with AVX512-BF16 enabled, e.g. -march=znver4),
/// else "emulated" (fp32 arithmetic that gives vdpbf16ps's bits). The vector kernels give the
/// same bits everywhere; AMX tiles round inside each 16-pair step in their own way, within the
/// same error bound (docs/bf16.md). The CLI prints it.
inline const char* bf16_compute_kernels() noexcept {
  if (Bf16Dot<Vec>::native && amx::enabled()) return "amx";
  return Bf16Dot<Vec>::native ? "avx512-bf16" : "emulated";
}

/// y[i] = round_bf16(x[i]) for i < n, W lanes at a time (Bf16Dot<V>::store_rounded).
template <class V>
inline void round_row_bf16(const float* x, bf16* y, index_t n) noexcept {
  constexpr int W = V::width;
  index_t i = 0;
  for (const index_t nv = n / W * W; i < nv; i += W) Bf16Dot<V>::store_rounded(y + i, V::load(x + i));
  for (; i < n; ++i) y[i] = round_bf16(x[i]);
}

}  // namespace ctxcomp::simd
