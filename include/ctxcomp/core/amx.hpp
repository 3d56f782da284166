// Intel AMX (Advanced Matrix Extensions) for the bf16 compute path: the one place that knows
// about tile registers. It holds the build switch, the run-time grant (Linux hands the tile
// data state to a process only after arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)), the
// tile configuration, and the tile block kernel with its scalar twin.
//
// Operand layouts are those of the vector bf16 kernels (core/tile_gemm.hpp), which are AMX's:
// A is row-major bf16 (row i holds its pairs along k), B is in VNNI layout (pair-row p holds N
// pairs; element (k, j) at B[(k / 2) * ldb + 2 * j + k % 2]). The callers' packing (the
// attention's K / V tiles, gemm_nt_bf16's activation panels) already writes these layouts into
// their workspace; nothing here allocates.
//
// Arithmetic: inputs are the bf16 operands of Compute::bf16 (the same rounding), accumulation is
// fp32, bf16 subnormals count as zero and fp32 subnormal results are flushed. The order differs
// from the vector kernels: one TDPBF16PS adds the 32 products of a 16-pair step to each fp32
// accumulator as one operation, where vdpbf16ps rounds after every product (two roundings per
// pair). Its internal rounding is not documented and matches none of the simple models we tried
// (bench/probe_amx_bf16.cpp: sequential fused steps in either order, one rounding per pair or
// per step to nearest or toward zero, alignment to the largest term with 23-30 bits), so the
// AMX results are not the vector kernels' bits. Measured on Sapphire Rapids, the error of one
// step stays below 7 * 2^-24 * (|acc| + sum |products|); the library assumes at most
// kStepErrorUlps (32) such units, what 32 sequential fp32 additions could lose, and the
// a-priori bounds of docs/bf16.md hold unchanged under it. The scalar twin (`tile_block_twin`)
// walks the same steps with one exact-sum rounding per step; tests hold the twin, the tiles and
// the vector kernels to the same bound against an exact reference.
// For a given shape the blocking does not depend on the thread count, so results are
// deterministic on one machine; they differ in the last bits between AMX and non-AMX machines.
//
// Build: compiled in when the host compiles with AMX-TILE and AMX-BF16 (e.g.
// -march=sapphirerapids, or -mamx-tile -mamx-bf16) on Linux x86-64; define CTXCOMP_NO_AMX to
// leave it out. Run time: used only when the CPU reports AMX-BF16 and the kernel grants the tile
// state; otherwise (or after amx::set_enabled(false), or with CTXCOMP_AMX=0 in the environment)
// the vector kernels run and nothing fails.
#pragma once
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "types.hpp"

#if !defined(CTXCOMP_NO_AMX) && !defined(CTXCOMP_NO_SIMD) && defined(__linux__) && defined(__x86_64__) && \
    defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define CTXCOMP_HAS_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ctxcomp::amx {

/// Rows of a tile, pairs along k per tile step, and fp32 columns of an accumulator tile.
inline constexpr index_t kTileRows = 16;
inline constexpr index_t kTilePairs = 16;
inline constexpr index_t kTileCols = 16;
/// The error the library assumes for one TDPBF16PS step, in units of 2^-24 (|acc| + sum of the
/// step's |products|): measured below 7 (docs/bf16.md).
inline constexpr int kStepErrorUlps = 32;

/// Whether this build contains the AMX kernels (the host's compile flags decide).
inline constexpr bool compiled() noexcept {
#if defined(CTXCOMP_HAS_AMX)
  return true;
#else
  return false;
#endif
}

namespace detail {
/// The CPU reports AMX-TILE and AMX-BF16, and the kernel grants the tile data state to this
/// process (asked once; the grant is per process, so every thread may then use the tiles).
inline bool granted() noexcept {
#if defined(CTXCOMP_HAS_AMX)
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 24)) || !(d & (1u << 22))) return false;  // AMX-TILE, AMX-BF16
    constexpr long kReqXcompPerm = 0x1023, kGetXcompPerm = 0x1022, kXtiledata = 18;
    if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) != 0) return false;
    unsigned long long mask = 0;
    if (syscall(SYS_arch_prctl, kGetXcompPerm, &mask) != 0) return false;
    return (mask & (1ull << kXtiledata)) != 0;
  }();
  return ok;
#else
  return false;
#endif
}
inline std::atomic<int>& switch_state() noexcept {
  // 1 on, 0 off; starts from the environment (CTXCOMP_AMX=0 turns AMX off).
  static std::atomic<int> on{[] {
    const char* e = std::getenv("CTXCOMP_AMX");
    return (e && e[0] == '0' && e[1] == '\0') ? 0 : 1;
  }()};
  return on;
}
}  // namespace detail

/// Whether the AMX kernels run now: compiled in, granted by the CPU and the OS, and not switched
/// off. Cheap after the first call.
inline bool enabled() noexcept {
  return compiled() && detail::switch_state().load(std::memory_order_relaxed) != 0 && detail::granted();
}

/// Switches the AMX kernels off (the vector kernels run) or back on where they are available,
/// for the whole process; returns the previous setting. For A/B timing and for tests that want
/// the vector kernels' bits; not meant to be flipped while bf16 kernels run on other threads.
inline bool set_enabled(bool on) noexcept {
  return detail::switch_state().exchange(on ? 1 : 0, std::memory_order_relaxed) != 0;
}

#if defined(CTXCOMP_HAS_AMX)
namespace detail {
/// The one tile configuration (palette 1): every tile 16 rows x 64 bytes. tmm0-3 accumulate
/// fp32 (16 x 16), tmm4-5 hold A (16 rows x 16 pairs), tmm6-7 hold B (16 pair-rows x 16 pairs).
struct alignas(64) TileConfig {
  std::uint8_t palette = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  std::uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

/// Loads the configuration into this thread's tile state unless it is already there (another
/// AMX user in the same thread, oneDNN say, may have loaded its own in between).
inline void configure() noexcept {
  static const TileConfig want{};
  TileConfig now;
  _tile_storeconfig(&now);
  if (std::memcmp(&now, &want, sizeof now) != 0) _tile_loadconfig(&want);
}
}  // namespace detail
#endif

/// One AMX block: C[16 NA x 16 NB] = (Accumulate ? C : 0) + A[16 NA rows] * B over k2 pairs
/// (k2 a multiple of 16; layouts at the top; strides in elements). Only where enabled().
template <int NA, int NB>
inline void tile_block(const bf16* A, index_t lda, const bf16* B, index_t ldb, float* C, index_t ldc, index_t k2,
                       bool accumulate) noexcept {
  static_assert(NA >= 1 && NA <= 2 && NB >= 1 && NB <= 2, "blocks of 1-2 x 1-2 tiles");
#if defined(CTXCOMP_HAS_AMX)
  detail::configure();
  const long sa = static_cast<long>(lda * sizeof(bf16)), sb = static_cast<long>(ldb * sizeof(bf16)),
             sc = static_cast<long>(ldc * sizeof(float));
  float* c10 = C + kTileRows * ldc;
  if (accumulate) {
    _tile_loadd(0, C, sc);
    if constexpr (NB == 2) _tile_loadd(1, C + kTileCols, sc);
    if constexpr (NA == 2) _tile_loadd(2, c10, sc);
    if constexpr (NA == 2 && NB == 2) _tile_loadd(3, c10 + kTileCols, sc);
  } else {
    _tile_zero(0);
    if constexpr (NB == 2) _tile_zero(1);
    if constexpr (NA == 2) _tile_zero(2);
    if constexpr (NA == 2 && NB == 2) _tile_zero(3);
  }
  for (index_t p = 0; p < k2; p += kTilePairs) {
    _tile_loadd(4, A + 2 * p, sa);
    _tile_loadd(6, B + p * ldb, sb);
    if constexpr (NB == 2) _tile_loadd(7, B + p * ldb + 2 * kTileCols, sb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NA == 2) {
      _tile_loadd(5, A + kTileRows * lda + 2 * p, sa);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NB == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, C, sc);
  if constexpr (NB == 2) _tile_stored(1, C + kTileCols, sc);
  if constexpr (NA == 2) _tile_stored(2, c10, sc);
  if constexpr (NA == 2 && NB == 2) _tile_stored(3, c10 + kTileCols, sc);
#else
  (void)A, (void)lda, (void)B, (void)ldb, (void)C, (void)ldc, (void)k2, (void)accumulate;
#endif
}

/// Scalar twin of `tile_block`, in its order: C (or zero) plus, for each 16-pair step in turn,
/// the sum of the step's 32 products, rounded once to fp32 per step (the sum formed exactly:
/// each product of two bf16 is exact in double, and the step's sum is accumulated with
/// Neumaier's compensation, exact for these terms up to a final double rounding far below fp32's
/// unit). Operands as Compute::bf16 reads them (subnormals as zero); results flushed. It follows
/// the accumulation order, not TDPBF16PS's undocumented internal rounding (see the top).
inline void tile_block_twin(int na, int nb, const bf16* A, index_t lda, const bf16* B, index_t ldb, float* C,
                            index_t ldc, index_t k2, bool accumulate) noexcept {
  auto operand = [](bf16 x) {  // as simd::bf16_operand, without the simd header
    std::uint16_t h;
    std::memcpy(&h, &x, sizeof h);
    const std::uint32_t bits = std::uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return (f != f || std::fabs(f) >= 1.17549435e-38f) ? f : std::copysign(0.f, f);
  };
  auto flush = [](float f) { return (f != f || std::fabs(f) >= 1.17549435e-38f) ? f : std::copysign(0.f, f); };
  for (index_t i = 0; i < na * kTileRows; ++i)
    for (index_t j = 0; j < nb * kTileCols; ++j) {
      float acc = accumulate ? flush(C[i * ldc + j]) : 0.f;
      for (index_t p0 = 0; p0 < k2; p0 += kTilePairs) {
        double s = acc, comp = 0;  // Neumaier: s + comp is the running sum
        for (index_t p = p0; p < p0 + kTilePairs; ++p)
          for (int e = 0; e < 2; ++e) {
            const double t = double(operand(A[i * lda + 2 * p + e])) * double(operand(B[p * ldb + 2 * j + e]));
            const double u = s + t;
            comp += std::fabs(s) >= std::fabs(t) ? (s - u) + t : (t - u) + s;
            s = u;
          }
        acc = flush(static_cast<float>(s + comp));
      }
      C[i * ldc + j] = acc;
    }
}

}  // namespace ctxcomp::amx
