// The one place that names xsimd: a float vector type `Vec` with the handful of operations the
// kernels use, and its scalar twin `ScalarVec` (width 1). Kernels are templates over either, so
// every vector kernel has a scalar reference built from the same source.
// xsimd 8.1 spells a horizontal sum `hadd` and has no reduce_max; newer xsimd renamed these —
// keep such calls here. Define CTXCOMP_NO_SIMD to force the scalar path.
// xsimd 8.1 has no fp16 / bf16 / int8 batches: `load` from those storage types widens to fp32 in
// registers with the few intrinsics below (AVX-512F: vcvtph2ps, a 16-bit shift for bf16,
// vpmovsxbd + vcvtdq2ps for int8; AVX2 + F16C likewise at width 8); other targets widen lane by
// lane; ScalarVec is the scalar twin.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "types.hpp"

#if !defined(CTXCOMP_NO_SIMD) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

#if !defined(CTXCOMP_NO_SIMD)
#include <xsimd/xsimd.hpp>
#if XSIMD_VERSION_MAJOR >= 8
#define CTXCOMP_HAS_XSIMD 1
#endif
#endif

namespace ctxcomp::simd {

/// Scalar twin of the vector type: width 1, plain float arithmetic.
struct ScalarVec {
  /// The vector interface every kernel is written against (XsimdVec has the same members):
  /// the register type, its width in floats and the register count, loads (widening bf16 /
  /// fp16 / qint8), store, broadcast, zero, fma, max, pin (keep in a register), exp2, exp, erf, div,
  /// horizontal sum and max, and the instruction set's name.
  ///@{
  using type = float;
  static constexpr int width = 1;
  static constexpr int registers = 16;
  static type load(const float* p) noexcept { return *p; }
  static type load(const bf16* p) noexcept { return to_float(*p); }
  static type load(const fp16* p) noexcept { return to_float(*p); }
  static type load(const qint8* p) noexcept { return static_cast<float>(p->v); }
  static void store(float* p, type v) noexcept { *p = v; }
  static type broadcast(float x) noexcept { return x; }
  static type zero() noexcept { return 0.f; }
  /// One rounding where the target has FMA (as the vector kernels), whatever the optimisation
  /// level (a * b + c is only contracted to an FMA at some levels); two roundings elsewhere.
  static type fma(type a, type b, type c) noexcept {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
    return std::fma(a, b, c);
#else
    return a * b + c;
#endif
  }
  static type max(type a, type b) noexcept { return a > b ? a : b; }
  static type pin(type v) noexcept { return v; }
  static type exp2(type x) noexcept { return std::exp2(x); }
  static type exp(type x) noexcept { return std::exp(x); }
  static type erf(type x) noexcept { return std::erf(x); }
  static type div(type a, type b) noexcept { return a / b; }
  static float reduce_add(type v) noexcept { return v; }
  /// What reduce_add_lanes needs to put its sums in row order (nothing for one lane).
  struct LaneOrder {};
  static const LaneOrder& lane_order() noexcept {
    static const LaneOrder order{};
    return order;
  }
  /// Lane i of the result = horizontal sum of accs[i], for i < width.
  static type reduce_add_lanes(const type* accs, const LaneOrder&) noexcept { return accs[0]; }
  static float reduce_max(type v) noexcept { return v; }
  /// Transposes the width x width block held in r[0..width) (element j of r[i] <-> element i of r[j]).
  static void transpose(type*) noexcept {}
  static const char* name() noexcept { return "scalar"; }
  ///@}
};

#if defined(CTXCOMP_HAS_XSIMD)
namespace detail {
using arch = xsimd::default_arch;
inline constexpr bool has_arch = !std::is_same_v<arch, xsimd::unavailable>;
}  // namespace detail
#endif

#if defined(CTXCOMP_HAS_XSIMD)
/// xsimd batch of float for an architecture (by default the one the compiler targets).
template <class Arch>
struct XsimdVec {
  using arch = Arch;
  using type = xsimd::batch<float, arch>;
  static constexpr int width = static_cast<int>(type::size);
  // AVX-512 has 32 vector registers, AVX2 and SSE 16.
  static constexpr int registers = width >= 16 ? 32 : 16;
  static type load(const float* p) noexcept { return xsimd::load_unaligned(p); }
  /// `width` stored values widened to fp32 (exact; qint8 without its scale).
  static type load(const fp16* p) noexcept {
#if defined(__AVX512F__)
    if constexpr (width == 16) return type(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#endif
#if defined(__F16C__) && defined(__AVX__)
    if constexpr (width == 8) return type(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#endif
    return widen_lanes(p);
  }
  static type load(const bf16* p) noexcept {
#if defined(__AVX512F__)
    if constexpr (width == 16)
      return type(_mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16)));
#endif
#if defined(__AVX2__)
    if constexpr (width == 8)
      return type(_mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16)));
#endif
    return widen_lanes(p);
  }
  static type load(const qint8* p) noexcept {
#if defined(__AVX512F__)
    if constexpr (width == 16)
      return type(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#endif
#if defined(__AVX2__)
    if constexpr (width == 8)
      return type(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#endif
    return widen_lanes(p);
  }
  static void store(float* p, type v) noexcept { v.store_unaligned(p); }
  static type broadcast(float x) noexcept { return type(x); }
  static type zero() noexcept { return type(0.f); }
  /// a * b + c with one rounding. xsimd 8.1 has no AVX-512 fma kernel: its generic `a * b + c`
  /// became an FMA only where the compiler contracts (GCC at -O2, not at -O1), so results
  /// depended on the optimisation level; the FMA instructions are named here instead.
  static type fma(type a, type b, type c) noexcept {
#if defined(__AVX512F__)
    if constexpr (width == 16) return type(_mm512_fmadd_ps(a, b, c));
#endif
#if defined(__FMA__)
    if constexpr (width == 8) return type(_mm256_fmadd_ps(a, b, c));
    if constexpr (width == 4) return type(_mm_fmadd_ps(a, b, c));
#endif
    return xsimd::fma(a, b, c);
  }
  static type max(type a, type b) noexcept { return xsimd::max(a, b); }
  /// v, held in a register from here on: the compiler may not fold its load into each use. A
  /// row loaded once and used by several FMAs is otherwise re-read from L1 by every one of them
  /// (GCC does so), and the loads, not the FMAs, then bound the loop.
  static type pin(type v) noexcept {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    auto r = static_cast<typename type::register_type>(v);
    __asm__("" : "+v"(r));
    return type(r);
#else
    return v;
#endif
  }
  static type exp2(type x) noexcept { return xsimd::exp2(x); }
  static type exp(type x) noexcept { return xsimd::exp(x); }
  static type erf(type x) noexcept { return xsimd::erf(x); }
  static type div(type a, type b) noexcept { return a / b; }
  static float reduce_add(type v) noexcept { return xsimd::hadd(v); }  // xsimd >= 9: reduce_add
  /// The lane permutation that puts haddp's sums in row order. xsimd 8.1's AVX-512 haddp returns
  /// them permuted (lanes 2,3 <-> 4,5 and 10,11 <-> 12,13); the order is measured once and
  /// undone, so a fixed xsimd works unchanged. A kernel that reduces in a loop fetches it before
  /// the loop and passes it to reduce_add_lanes: a function-local static's guard inside the loop
  /// made clang keep every accumulator of the loop in memory (docs/performance.md). (A reference: a
  /// copy held in a register costs GCC a spill in the loop.)
  struct LaneOrder {
    alignas(64) std::int32_t lane[width];  ///< result lane i takes haddp's lane lane[i]
    bool identity;                         ///< haddp already gives row order
  };
  static const LaneOrder& lane_order() noexcept {
    static const LaneOrder order = [] {
      type rows[width];
      for (int i = 0; i < width; ++i) rows[i] = type(static_cast<float>(i));
      alignas(64) float sums[width];
      xsimd::haddp(rows).store_aligned(sums);
      LaneOrder o{};
      for (int j = 0; j < width; ++j) o.lane[static_cast<int>(sums[j] / width + 0.5f)] = j;
      o.identity = true;
      for (int i = 0; i < width; ++i) o.identity = o.identity && o.lane[i] == i;
      return o;
    }();
    return order;
  }
  /// Lane i of the result = horizontal sum of accs[i], for i < width (xsimd's haddp, in row order;
  /// on AVX-512 the same sum tree with half the shuffles, see fold16).
  static type reduce_add_lanes(const type* accs, const LaneOrder& order) noexcept {
#if defined(__AVX512F__)
    if constexpr (width == 16) return type(fold16(accs));
#endif
    const type sums = xsimd::haddp(accs);
    if (order.identity) return sums;
    alignas(64) float lanes[width], out[width];
    sums.store_aligned(lanes);
    for (int i = 0; i < width; ++i) out[i] = lanes[order.lane[i]];
    return xsimd::load_aligned(out);
  }
  static float reduce_max(type v) noexcept {                          // xsimd 8.1 has none
    alignas(64) float lanes[width];
    v.store_aligned(lanes);
    float m = lanes[0];
    for (int i = 1; i < width; ++i) m = lanes[i] > m ? lanes[i] : m;
    return m;
  }
  /// Transposes the width x width block held in r[0..width): in registers (AVX-512 16 x 16,
  /// AVX 8 x 8), elsewhere through memory.
  static void transpose(type* r) noexcept {
#if defined(__AVX512F__)
    if constexpr (width == 16) {
      __m512 x[16], t[16];
      for (int i = 0; i < 16; ++i) x[i] = r[i];
      for (int i = 0; i < 16; i += 2) {  // pairs of rows: (a0 b0 a1 b1 | a4 b4 a5 b5 | ...), (a2 b2 a3 b3 | ...)
        t[i] = _mm512_unpacklo_ps(x[i], x[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(x[i], x[i + 1]);
      }
      for (int i = 0; i < 16; i += 4) {  // quads of rows: (a0 b0 c0 d0 | a4 b4 c4 d4 | ...), ... (a3 .. d3 | ...)
        const __m512d t0 = _mm512_castps_pd(t[i]), t1 = _mm512_castps_pd(t[i + 1]);
        const __m512d t2 = _mm512_castps_pd(t[i + 2]), t3 = _mm512_castps_pd(t[i + 3]);
        x[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
        x[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
        x[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
        x[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
      }
      for (int h = 0; h < 16; h += 8)  // rows a..h, then i..p: columns c and c + 8 in 128-bit lanes
        for (int c = 0; c < 4; ++c) {
          t[h + c] = _mm512_shuffle_f32x4(x[h + c], x[h + 4 + c], 0x88);      // (a..d c, a..d c+8, e..h c, e..h c+8)
          t[h + 4 + c] = _mm512_shuffle_f32x4(x[h + c], x[h + 4 + c], 0xdd);  // the same for c + 4, c + 12
        }
      for (int c = 0; c < 8; ++c) {
        r[c] = type(_mm512_shuffle_f32x4(t[c], t[8 + c], 0x88));
        r[c + 8] = type(_mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd));
      }
      return;
    }
#endif
#if defined(__AVX__)
    if constexpr (width == 8) {
      __m256 t[8], u[8];
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int c = 0; c < 4; ++c) {
        r[c] = type(_mm256_permute2f128_ps(u[c], u[4 + c], 0x20));
        r[c + 4] = type(_mm256_permute2f128_ps(u[c], u[4 + c], 0x31));
      }
      return;
    }
#endif
    alignas(64) float m[width][width];
    for (int i = 0; i < width; ++i) r[i].store_aligned(m[i]);
    for (int i = 0; i < width; ++i)
      for (int j = 0; j < i; ++j) std::swap(m[i][j], m[j][i]);
    for (int i = 0; i < width; ++i) r[i] = xsimd::load_aligned(m[i]);
  }
  static const char* name() noexcept { return arch::name(); }

 private:
#if defined(__AVX512F__)
  /// One level of the sum tree over two vectors of partial sums: every lane adds its partner lane
  /// l ^ S; a's sums go to the lanes with bit S clear, b's to those with bit S set. One two-source
  /// permute and two adds (haddp spends two shuffles per output vector).
  template <int S>
  static __m512 fold_pair(__m512 a, __m512 b) noexcept {
    constexpr auto lane = [](int l) { return (l & S) ? (l ^ S) : (l ^ S) + 16; };  // <16: b, else a
    const __m512i idx = _mm512_setr_epi32(lane(0), lane(1), lane(2), lane(3), lane(4), lane(5), lane(6), lane(7),
                                          lane(8), lane(9), lane(10), lane(11), lane(12), lane(13), lane(14), lane(15));
    constexpr int mask = [] {  // the lanes with bit S (where b's sums go)
      int m = 0;
      for (int l = 0; l < 16; ++l) m |= (l & S) ? 1 << l : 0;
      return m;
    }();
    const __m512 y = _mm512_permutex2var_ps(b, idx, a);  // each lane's partner
    return _mm512_mask_add_ps(_mm512_add_ps(a, y), __mmask16(mask), b, y);
  }
  /// haddp's sum tree, pair for pair (lanes l, l+8; then l, l+4; then neighbours; then pairs of
  /// pairs), so the sums are the same bits; the pairing of the inputs puts row i in lane i.
  static __m512 fold16(const type* r) noexcept {
    __m512 a[8], b[4];
    for (int i = 0; i < 8; ++i) a[i] = fold_pair<8>(r[i], r[i + 8]);
    for (int i = 0; i < 4; ++i) b[i] = fold_pair<4>(a[i], a[i + 4]);
    return fold_pair<2>(fold_pair<1>(b[0], b[1]), fold_pair<1>(b[2], b[3]));
  }
#endif
  template <class T>
  static type widen_lanes(const T* p) noexcept {
    alignas(64) float lanes[width];
    for (int i = 0; i < width; ++i) lanes[i] = ScalarVec::load(p + i);
    return xsimd::load_aligned(lanes);
  }
};
#endif

#if defined(CTXCOMP_HAS_XSIMD)
/// The vector type kernels use by default: xsimd's best architecture, or scalar when none.
using Vec = std::conditional_t<detail::has_arch, XsimdVec<detail::arch>, ScalarVec>;
#else
using Vec = ScalarVec;
#endif

/// Where a prefetch hint asks a line to go: L1 (x86 prefetcht0) or L2 (prefetcht1). Data read
/// soon, in a small window (the next page of a paged cache), goes to L1; data a tile or more
/// ahead goes to L2, where the reads in between do not evict it.
enum class PrefetchTo : int { l2 = 2, l1 = 3 };

/// Asks for the cache line holding `p` (a hint: `p` need not be valid; nothing is read
/// architecturally).
template <PrefetchTo To = PrefetchTo::l1>
inline void prefetch(const void* p) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, int(To));
#else
  (void)p;
#endif
}

/// Asks for the cache lines of the `Bytes` bytes from `p` (unrolled: no loop in the caller).
template <int Bytes, PrefetchTo To = PrefetchTo::l1>
inline void prefetch_bytes(const void* p) noexcept {
  const char* c = static_cast<const char*>(p);
#pragma GCC unroll 16
  for (int b = 0; b < Bytes; b += 64) prefetch<To>(c + b);
}

/// prefetch into a cache level chosen at run time (for loops whose other work keeps no vector
/// accumulators live across the hint; in the register-blocked FMA loops the branch makes GCC
/// keep the accumulators on the stack, so those take the level as a template argument).
inline void prefetch(const void* p, PrefetchTo to) noexcept {
  if (to == PrefetchTo::l1) prefetch<PrefetchTo::l1>(p);
  else prefetch<PrefetchTo::l2>(p);
}

/// Name of the instruction set the default kernels were compiled for ("avx512bw", "scalar", ...).
inline const char* active_isa() noexcept { return Vec::name(); }

}  // namespace ctxcomp::simd
