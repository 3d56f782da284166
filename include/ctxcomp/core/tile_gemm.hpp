// Register-blocked GEMM on small row-major tiles held in cache: C[M x N] (+)= A[M x K] * B[K x N].
// The building block of the fused attention (scores = Q * K^T with K^T packed, out += P * V).
// N must be a multiple of the vector width (callers pad); M and K are arbitrary. B may be stored
// as float, bf16, fp16 or qint8 (without scales): it is widened in registers as it is loaded.
#pragma once
#include <algorithm>
#include <type_traits>

#include "amx.hpp"
#include "bf16dot.hpp"
#include "simd.hpp"
#include "types.hpp"

namespace ctxcomp::kernels {

/// Register block for a vector type: MR rows x NV vectors of accumulators, chosen to use most
/// of the register file (AVX-512: 6 x 4 of 32 registers; AVX2/SSE: 4 x 3 of 16; scalar: 4 x 4).
template <class V>
struct TileGemmShape {
  static constexpr int MR = V::registers >= 32 ? 6 : 4;  ///< rows of C per block
  static constexpr int NV = V::registers >= 32 ? 4 : (V::width == 1 ? 4 : 3);  ///< vectors of columns per block
};

/// Where the kernels find row k of B: one stride apart (a packed tile, a head-major cache), or
/// at offsets from a base (a tile gathered through a page table). `ahead` is the row a prefetch
/// hint names: `pf` rows further on, or the offsets' own list of rows to ask for.
template <class TB>
struct StridedRows {
  const TB* base;  ///< row 0
  index_t ld;      ///< elements from one row to the next
  /// Row k.
  const TB* row(index_t k) const noexcept { return base + k * ld; }
  /// The row a hint names while row k is read: pf rows on (need not exist; never dereferenced).
  const TB* ahead(index_t k, index_t pf) const noexcept { return base + (k + pf) * ld; }
  /// The same rows from column j on.
  StridedRows cols(index_t j) const noexcept { return {base + j, ld}; }
};
/// Rows at base + off[k]; with hints, the rows at base + next[k] are asked for (next non-null).
template <class TB>
struct GatheredRows {
  const TB* base;        ///< what the offsets count from
  const index_t* off;    ///< off[k]: elements from base to row k
  const index_t* next;   ///< next[k]: the row a hint names while row k is read, or null
  /// Row k.
  const TB* row(index_t k) const noexcept { return base + off[k]; }
  /// The row a hint names while row k is read.
  const TB* ahead(index_t k, index_t) const noexcept { return base + next[k]; }
  /// The same rows from column j on.
  GatheredRows cols(index_t j) const noexcept { return {base + j, off, next}; }
};

namespace detail {
/// Prefetch: 0 none, else the rows pf on are asked for, into simd::PrefetchTo(Prefetch). The
/// level is a template argument on purpose: with a run-time test in this loop GCC keeps the
/// accumulators on the stack (measured: the fp32 causal prefill 1.9x slower).
template <class V, int MR, int NV, bool Accumulate, int Prefetch, class R>
inline void tile_gemm_block_rows(const float* A, index_t lda, R B, float* C, index_t ldc, index_t K,
                                 index_t pf) noexcept {
  using TB = std::remove_const_t<std::remove_pointer_t<decltype(B.row(0))>>;
  constexpr int W = V::width;
  typename V::type acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = Accumulate ? V::load(C + i * ldc + j * W) : V::zero();
  for (index_t kk = 0; kk < K; ++kk) {
    typename V::type b[NV];
    if constexpr (Prefetch != 0)
      simd::prefetch_bytes<NV * W * int(sizeof(TB)), simd::PrefetchTo(Prefetch)>(B.ahead(kk, pf));
    // pin: one load per vector, not one per FMA (compilers otherwise fold the fp32 B loads and
    // the broadcasts into every FMA that uses them, and the loads bound the loop).
    const TB* bk = B.row(kk);
    for (int j = 0; j < NV; ++j) b[j] = V::pin(V::load(bk + j * W));
    for (int i = 0; i < MR; ++i) {
      const auto a = V::pin(V::broadcast(A[i * lda + kk]));
      for (int j = 0; j < NV; ++j) acc[i][j] = V::fma(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) V::store(C + i * ldc + j * W, acc[i][j]);
}
}  // namespace detail

/// One register block: C[MR x NV vectors] (+)= A[MR x K] * B[K x NV vectors].
/// Prefetch: 0 none, else the rows pf on are asked for, into simd::PrefetchTo(Prefetch).
template <class V, int MR, int NV, bool Accumulate, int Prefetch = 0, class TB>
inline void tile_gemm_block(const float* A, index_t lda, const TB* B, index_t ldb, float* C, index_t ldc,
                            index_t K, index_t pf = 0) noexcept {
  detail::tile_gemm_block_rows<V, MR, NV, Accumulate, Prefetch>(A, lda, StridedRows<TB>{B, ldb}, C, ldc, K, pf);
}

namespace detail {
/// The narrower blocks that take the columns left after the blocks of NV vectors: 8 -> 4 -> 2
/// -> 1, 4 -> 2 -> 1, 3 -> 2 -> 1 (a rest of 7 vectors is blocks of 4, 2 and 1, each reading
/// its own columns of B), so fewer block shapes are compiled. Each C element is one chain over
/// k whatever its block: the same bits.
template <int NV>
constexpr int narrower_cols() noexcept {
  return NV <= 3 ? NV - 1 : NV / 2;
}
/// The lower blocks that take the rows left after the blocks of MR rows: 6 -> 4 -> 2 -> 1,
/// 4 -> 2 -> 1 (a rest of 5 rows is a block of 4 and one of 1; B is then in cache).
template <int MR>
constexpr int lower_rows() noexcept {
  return MR > 4 ? 4 : MR / 2;
}

/// MR rows of C, nvec vectors of columns: blocks of NV vectors, then narrower blocks for the
/// rest. With NVec > 0, nvec == NVec is known at compile time and only the blocks it needs are
/// compiled.
template <class V, int MR, bool Acc, int PF, int NV = TileGemmShape<V>::NV, int NVec = 0, class R>
inline void tile_gemm_cols(const float* A, index_t lda, R B, float* C, index_t ldc, index_t nvec, index_t K,
                           index_t pf) noexcept {
  constexpr int W = V::width;
  if constexpr (NVec > 0) {
    constexpr int full = NVec / NV, rest = NVec % NV;
    for (int j = 0; j < full * NV; j += NV)
      tile_gemm_block_rows<V, MR, NV, Acc, PF>(A, lda, B.cols(j * W), C + j * W, ldc, K, pf);
    if constexpr (rest > 0)
      tile_gemm_block_rows<V, MR, rest, Acc, PF>(A, lda, B.cols(full * NV * W), C + full * NV * W, ldc, K, pf);
    (void)nvec;
    return;
  }
  index_t j = 0;
  for (; j + NV <= nvec; j += NV) tile_gemm_block_rows<V, MR, NV, Acc, PF>(A, lda, B.cols(j * W), C + j * W, ldc, K, pf);
  if constexpr (NV > 1) {
    if (j < nvec)
      tile_gemm_cols<V, MR, Acc, PF, narrower_cols<NV>()>(A, lda, B.cols(j * W), C + j * W, ldc, nvec - j, K, pf);
  }
}
template <class V, bool Acc, int PF, int NVec, int MR = TileGemmShape<V>::MR, class R>
inline void tile_gemm_rows(const float* A, index_t lda, R B, float* C, index_t ldc, index_t M, index_t nvec,
                           index_t K, index_t pf) noexcept {
  index_t i = 0;
  if (M >= MR) {  // the first block of rows asks for the B rows ahead; the others find B in cache
    constexpr int NV = TileGemmShape<V>::NV;
    tile_gemm_cols<V, MR, Acc, PF, NV, NVec>(A, lda, B, C, ldc, nvec, K, pf);
    for (i = MR; i + MR <= M; i += MR)
      tile_gemm_cols<V, MR, Acc, 0, NV, NVec>(A + i * lda, lda, B, C + i * ldc, ldc, nvec, K, 0);
  }
  if constexpr (MR > 1) {
    constexpr int lower = lower_rows<MR>();
    if (i < M) {
      if (i == 0) tile_gemm_rows<V, Acc, PF, NVec, lower>(A, lda, B, C, ldc, M, nvec, K, pf);
      else tile_gemm_rows<V, Acc, 0, NVec, lower>(A + i * lda, lda, B, C + i * ldc, ldc, M - i, nvec, K, 0);
    }
  }
}

/// A product over K == 0: C = 0 (Accumulate = false) or C unchanged, the bits the blocks would
/// store, without touching B (an empty operand may be a null pointer, and no offset may be
/// applied to one).
template <bool Accumulate>
inline void tile_gemm_empty_k(float* C, index_t ldc, index_t M, index_t N) noexcept {
  if constexpr (!Accumulate)
    for (index_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
}

/// tile_gemm over any row source (StridedRows, GatheredRows); pf != 0 turns the hints on.
/// NVec > 0: N == NVec * V::width, known at compile time.
template <bool Accumulate, class V, int NVec = 0, class R>
inline void tile_gemm_any(const float* A, index_t lda, R B, float* C, index_t ldc, index_t M, index_t N, index_t K,
                          index_t pf, simd::PrefetchTo to) noexcept {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) return tile_gemm_empty_k<Accumulate>(C, ldc, M, N);
  constexpr int L1 = int(simd::PrefetchTo::l1), L2 = int(simd::PrefetchTo::l2);
  const index_t nvec = N / V::width;
  // One row (decode): up to 8 vectors of columns per block, so a B row (e.g. a V row of 128
  // dims) is read whole and 8 independent FMA chains hide the FMA latency.
  if (M == 1 && V::registers >= 32) {
    if (pf == 0) return tile_gemm_cols<V, 1, Accumulate, 0, 8, NVec>(A, lda, B, C, ldc, nvec, K, 0);
    if (to == simd::PrefetchTo::l1) return tile_gemm_cols<V, 1, Accumulate, L1, 8, NVec>(A, lda, B, C, ldc, nvec, K, pf);
    return tile_gemm_cols<V, 1, Accumulate, L2, 8, NVec>(A, lda, B, C, ldc, nvec, K, pf);
  }
  if (pf == 0) return tile_gemm_rows<V, Accumulate, 0, NVec>(A, lda, B, C, ldc, M, nvec, K, 0);
  if (to == simd::PrefetchTo::l1) return tile_gemm_rows<V, Accumulate, L1, NVec>(A, lda, B, C, ldc, M, nvec, K, pf);
  tile_gemm_rows<V, Accumulate, L2, NVec>(A, lda, B, C, ldc, M, nvec, K, pf);
}
}  // namespace detail

/// C = A * B (Accumulate = false) or C += A * B. N % V::width == 0. With `prefetch_rows` != 0,
/// each B row read also asks for the row that many rows further on, into cache level `to` (a
/// hint for B streamed from memory, e.g. a V cache; the addresses need not be valid).
template <bool Accumulate, class V = simd::Vec, class TB>
inline void tile_gemm(const float* A, index_t lda, const TB* B, index_t ldb, float* C, index_t ldc, index_t M,
                      index_t N, index_t K, index_t prefetch_rows = 0,
                      simd::PrefetchTo to = simd::PrefetchTo::l2) noexcept {
  detail::tile_gemm_any<Accumulate, V>(A, lda, StridedRows<TB>{B, ldb}, C, ldc, M, N, K, prefetch_rows, to);
}

/// tile_gemm with N a compile-time constant (a multiple of V::width, e.g. the attention's kv
/// tile): the same blocks and bits as tile_gemm, with only the column blocks N needs compiled.
template <bool Accumulate, index_t N, class V = simd::Vec, class TB>
inline void tile_gemm_n(const float* A, index_t lda, const TB* B, index_t ldb, float* C, index_t ldc, index_t M,
                        index_t K, index_t prefetch_rows = 0, simd::PrefetchTo to = simd::PrefetchTo::l2) noexcept {
  static_assert(N > 0 && N % V::width == 0, "N must be a positive multiple of the vector width");
  detail::tile_gemm_any<Accumulate, V, int(N / V::width)>(A, lda, StridedRows<TB>{B, ldb}, C, ldc, M, N, K,
                                                          prefetch_rows, to);
}

/// tile_gemm with B row k at `base + off[k]` (K offsets; e.g. a V tile read through a page
/// table), each C element's FMA chain over k in the same order as the strided form: the same
/// bits. With `next` non-null, each row read asks for the row at `base + next[k]` into `to`.
template <bool Accumulate, class V = simd::Vec, class TB>
inline void tile_gemm_gathered(const float* A, index_t lda, const TB* base, const index_t* off, const index_t* next,
                               float* C, index_t ldc, index_t M, index_t N, index_t K,
                               simd::PrefetchTo to = simd::PrefetchTo::l2) noexcept {
  detail::tile_gemm_any<Accumulate, V>(A, lda, GatheredRows<TB>{base, off, next}, C, ldc, M, N, K, next ? 1 : 0, to);
}

namespace detail {
/// Blocks of RB rows x CB columns of C = A * B^T fill one vector of W partial sums each, reduced
/// together; rows / columns past the edge repeat the last one and are not stored.
template <class V, int RB, int CB, class R>
inline void tile_gemm_nt_blocks(const float* A, index_t lda, R B, float* C, index_t ldc, index_t M, index_t N,
                                index_t K, index_t pf, simd::PrefetchTo to) noexcept {
  using TB = std::remove_const_t<std::remove_pointer_t<decltype(B.row(0))>>;
  constexpr int W = V::width;
  static_assert(RB * CB == W, "one accumulator per lane");
  const index_t kv = K / W * W;
  const auto& order = V::lane_order();  // fetched here, not in the loop (see lane_order)
  for (index_t i0 = 0; i0 < M; i0 += RB)
    for (index_t j0 = 0; j0 < N; j0 += CB) {
      const float* a[RB];
      const TB* b[CB];
      for (int r = 0; r < RB; ++r) a[r] = A + std::min<index_t>(i0 + r, M - 1) * lda;
      for (int c = 0; c < CB; ++c) b[c] = B.row(std::min<index_t>(j0 + c, N - 1));
      typename V::type acc[W];
      for (int x = 0; x < W; ++x) acc[x] = V::zero();
      if constexpr (RB == 1) {
        // One row: each B row is read whole before the next (one sequential stream through the
        // tile; the row chains are independent, so out-of-order execution overlaps them). With
        // hints, each row first asks for the lines of the row it names (decode from memory: an
        // MHA int8 step read 0.61-0.68 of memread without them, 0.80-0.87 with).
        for (int c = 0; c < CB; ++c) {
          const TB* pb = b[c];
          if (pf && j0 + c < N) {
            const char* ahead = reinterpret_cast<const char*>(B.ahead(j0 + c, pf));
            for (index_t x = 0; x < K * index_t(sizeof(TB)); x += 64) simd::prefetch(ahead + x, to);
          }
          auto x0 = V::zero(), x1 = V::zero();
          index_t k = 0;
          for (; k + 2 * W <= kv; k += 2 * W) {
            x0 = V::fma(V::load(a[0] + k), V::load(pb + k), x0);
            x1 = V::fma(V::load(a[0] + k + W), V::load(pb + k + W), x1);
          }
          if (k < kv) x0 = V::fma(V::load(a[0] + k), V::load(pb + k), x0);
          acc[c] = x0 + x1;
        }
      } else {
        // All CB rows of B at once: per step CB widened B loads and RB A loads feed RB * CB
        // FMAs into RB * CB accumulators, which stay in registers (loops fully unrolled).
        constexpr index_t line = 64 / index_t(sizeof(TB));  // elements of B per cache line
        // The first rows' pass asks for the B rows ahead: strided rows a fixed distance on,
        // gathered rows from their own list.
        constexpr bool strided = std::is_same_v<R, StridedRows<TB>>;
        const bool ask = i0 == 0 && pf;
        index_t pfk = 0;
        const TB* ahead[strided ? 1 : CB];
        if constexpr (strided) pfk = ask ? pf * B.ld : 0;
        else
          for (int c = 0; c < CB; ++c) ahead[c] = ask ? B.ahead(std::min<index_t>(j0 + c, N - 1), pf) : b[c];
        for (index_t k = 0; k < kv; k += W) {
          if (ask && k % line == 0)
#pragma GCC unroll 16
            for (int c = 0; c < CB; ++c) {
              if constexpr (strided) simd::prefetch(b[c] + pfk + k, to);
              else simd::prefetch(ahead[c] + k, to);
            }
          typename V::type bv[CB];
#pragma GCC unroll 16
          for (int c = 0; c < CB; ++c) bv[c] = V::pin(V::load(b[c] + k));  // (fp32 B: not re-read per FMA)
#pragma GCC unroll 16
          for (int r = 0; r < RB; ++r) {
            const auto va = V::pin(V::load(a[r] + k));  // one load for CB FMAs
#pragma GCC unroll 16
            for (int c = 0; c < CB; ++c) acc[r * CB + c] = V::fma(va, bv[c], acc[r * CB + c]);
          }
        }
      }
      const auto red = V::reduce_add_lanes(acc, order);
      if (i0 + RB <= M && j0 + CB <= N && kv == K) {  // a whole block: lanes go straight to C
        if constexpr (RB == 1) {
          V::store(C + i0 * ldc + j0, red);
        } else {
          alignas(64) float sums[W];
          V::store(sums, red);
#pragma GCC unroll 16
          for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
            for (int c = 0; c < CB; ++c) C[(i0 + r) * ldc + j0 + c] = sums[r * CB + c];
        }
        continue;
      }
      alignas(64) float sums[W];
      V::store(sums, red);
      for (int r = 0; r < RB && i0 + r < M; ++r)
        for (int c = 0; c < CB && j0 + c < N; ++c) {
          float s = sums[r * CB + c];
          for (index_t k = kv; k < K; ++k) s += a[r][k] * simd::ScalarVec::load(b[c] + k);
          C[(i0 + r) * ldc + j0 + c] = s;
        }
    }
}
}  // namespace detail

namespace detail {
template <class V, class R>
inline void tile_gemm_nt_any(const float* A, index_t lda, R B, float* C, index_t ldc, index_t M, index_t N, index_t K,
                             index_t pf, simd::PrefetchTo to) noexcept {
  constexpr int W = V::width, CB = W >= 4 ? 4 : 1;
  if (M == 1) tile_gemm_nt_blocks<V, 1, W>(A, lda, B, C, ldc, M, N, K, pf, to);
  else tile_gemm_nt_blocks<V, W / CB, CB>(A, lda, B, C, ldc, M, N, K, pf, to);
}
}  // namespace detail

/// C[M x N] = A[M x K] * B[N x K]^T, both operands row-major along K (dot-product form: no
/// transposition, for few rows such as decode, where B is read once straight from a cache and
/// widened in registers). With `prefetch_rows` != 0, the rows that many rows past each B row
/// read are asked for into cache level `to` (a hint for B streamed from memory; the addresses
/// need not be valid).
/// One row (decode with one query head per kv head) takes W columns per block, several rows
/// W / 4 rows x 4 columns, so no lane computes a repeated row.
template <class V = simd::Vec, class TB>
inline void tile_gemm_nt(const float* A, index_t lda, const TB* B, index_t ldb, float* C, index_t ldc, index_t M,
                         index_t N, index_t K, index_t prefetch_rows = 0,
                         simd::PrefetchTo to = simd::PrefetchTo::l2) noexcept {
  detail::tile_gemm_nt_any<V>(A, lda, StridedRows<TB>{B, ldb}, C, ldc, M, N, K, prefetch_rows, to);
}

/// tile_gemm_nt with B row j at `base + off[j]` (N offsets; e.g. a K tile read through a page
/// table): every dot product as in the strided form, the same bits. With `next` non-null, the
/// row at `base + next[j]` is asked for into cache level `to` as row j is read.
template <class V = simd::Vec, class TB>
inline void tile_gemm_nt_gathered(const float* A, index_t lda, const TB* base, const index_t* off, const index_t* next,
                                  float* C, index_t ldc, index_t M, index_t N, index_t K,
                                  simd::PrefetchTo to = simd::PrefetchTo::l2) noexcept {
  detail::tile_gemm_nt_any<V>(A, lda, GatheredRows<TB>{base, off, next}, C, ldc, M, N, K, next ? 1 : 0, to);
}

// ---- bf16 compute (core/bf16dot.hpp): C (+)= A * B over bf16 pairs, fp32 accumulation ----
// A: row i holds K2 pairs along k at A + i * lda (bf16 elements); B: pair-row p holds N pairs
// (element (k, j) at B[(k / 2) * ldb + 2 * j + k % 2]), the layout vdpbf16ps reads; C fp32.
// Each C element is one chain over p = 0..K2-1 of Bf16Dot::dot, whatever the vector width, so
// every target and the scalar twin give the same bits. Where AMX runs (core/amx.hpp) the tiles
// take whole 16-pair steps instead: the same order of steps and error bound, other last bits.

namespace detail {
template <class V, int MR, int NV, bool Accumulate>
inline void tile_gemm_bf16_block(const bf16* A, index_t lda, const bf16* B, index_t ldb, float* C, index_t ldc,
                                 index_t K2) noexcept {
  using D = simd::Bf16Dot<V>;
  constexpr int W = V::width;
  typename V::type acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = Accumulate ? V::load(C + i * ldc + j * W) : V::zero();
  for (index_t p = 0; p < K2; ++p) {
    typename D::pairs b[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) b[j] = D::load(B + p * ldb + 2 * j * W);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const auto a = D::broadcast(A + i * lda + 2 * p);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = D::dot(acc[i][j], a, b[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) V::store(C + i * ldc + j * W, acc[i][j]);
}

template <class V, int MR, bool Acc, int NVec = 0, int NV = TileGemmShape<V>::NV>
inline void tile_gemm_bf16_cols(const bf16* A, index_t lda, const bf16* B, index_t ldb, float* C, index_t ldc,
                                index_t nvec, index_t K2) noexcept {
  constexpr int W = V::width;
  if constexpr (NVec > 0) {  // nvec == NVec, known at compile time (see tile_gemm_cols)
    constexpr int full = NVec / NV, rest = NVec % NV;
    for (int j = 0; j < full * NV; j += NV)
      tile_gemm_bf16_block<V, MR, NV, Acc>(A, lda, B + 2 * j * W, ldb, C + j * W, ldc, K2);
    if constexpr (rest > 0)
      tile_gemm_bf16_block<V, MR, rest, Acc>(A, lda, B + 2 * full * NV * W, ldb, C + full * NV * W, ldc, K2);
    (void)nvec;
    return;
  }
  index_t j = 0;
  for (; j + NV <= nvec; j += NV) tile_gemm_bf16_block<V, MR, NV, Acc>(A, lda, B + 2 * j * W, ldb, C + j * W, ldc, K2);
  if constexpr (NV > 1) {
    if (j < nvec)
      tile_gemm_bf16_cols<V, MR, Acc, 0, narrower_cols<NV>()>(A, lda, B + 2 * j * W, ldb, C + j * W, ldc, nvec - j, K2);
  }
}
}  // namespace detail

namespace detail {
template <bool Accumulate, class V, int NVec>
inline void tile_gemm_bf16_any(const bf16* A, index_t lda, const bf16* B, index_t ldb, float* C, index_t ldc, index_t M,
                               index_t N, index_t K2) noexcept {
  if (M <= 0 || N <= 0) return;
  if (K2 <= 0) return tile_gemm_empty_k<Accumulate>(C, ldc, M, N);
  constexpr int MR = TileGemmShape<V>::MR;
  const index_t nvec = N / V::width;
  index_t i = 0;
  for (; i + MR <= M; i += MR) tile_gemm_bf16_cols<V, MR, Accumulate, NVec>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, nvec, K2);
  for (; i < M; ++i) tile_gemm_bf16_cols<V, 1, Accumulate, NVec>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, nvec, K2);
}
}  // namespace detail

namespace detail {
/// AMX (core/amx.hpp), where it runs: whole 16-row groups and whole 16-pair steps on the tiles
/// (blocks of up to 32 x 32), then the pairs past the last whole step and the rows past the last
/// whole group on the vector kernel, each chain continuing in pair order where the tiles left
/// it. The error bound is the vector kernel's (amx.hpp); the bits are AMX's. Returns false
/// (nothing done) where AMX does not run for V (only for the native AVX512-BF16 vector type) or
/// the tile is too small.
template <bool Accumulate, class V, int NVec>
inline bool tile_gemm_bf16_amx(const bf16* A, index_t lda, const bf16* B, index_t ldb, float* C, index_t ldc, index_t M,
                               index_t N, index_t K2) noexcept {
  if constexpr (!amx::compiled() || !simd::Bf16Dot<V>::native || V::width != amx::kTileCols) {
    (void)A, (void)lda, (void)B, (void)ldb, (void)C, (void)ldc, (void)M, (void)N, (void)K2;
    return false;
  } else {
    if (M < amx::kTileRows || K2 < amx::kTilePairs || !amx::enabled()) return false;
    constexpr index_t R = amx::kTileRows, T = amx::kTileCols;
    const index_t M16 = M / R * R, K16 = K2 / amx::kTilePairs * amx::kTilePairs;
    for (index_t i = 0; i < M16; i += 2 * R) {
      const bool two_rows = i + 2 * R <= M16;
      for (index_t j = 0; j < N; j += 2 * T) {
        const bool two_cols = j + 2 * T <= N;
        const bf16* a = A + i * lda;
        const bf16* b = B + 2 * j;
        float* c = C + i * ldc + j;
        if (two_rows && two_cols) amx::tile_block<2, 2>(a, lda, b, ldb, c, ldc, K16, Accumulate);
        else if (two_rows) amx::tile_block<2, 1>(a, lda, b, ldb, c, ldc, K16, Accumulate);
        else if (two_cols) amx::tile_block<1, 2>(a, lda, b, ldb, c, ldc, K16, Accumulate);
        else amx::tile_block<1, 1>(a, lda, b, ldb, c, ldc, K16, Accumulate);
      }
    }
    if (K16 < K2) tile_gemm_bf16_any<true, V, NVec>(A + 2 * K16, lda, B + K16 * ldb, ldb, C, ldc, M16, N, K2 - K16);
    if (M16 < M) tile_gemm_bf16_any<Accumulate, V, NVec>(A + M16 * lda, lda, B, ldb, C + M16 * ldc, ldc, M - M16, N, K2);
    return true;
  }
}
}  // namespace detail

/// C[M x N] = A * B (Accumulate = false) or C += A * B over K2 bf16 pairs (layouts above).
/// N % V::width == 0. On AMX tiles where they run (core/amx.hpp: the same bound, AMX's bits).
template <bool Accumulate, class V = simd::Vec>
inline void tile_gemm_bf16(const bf16* A, index_t lda, const bf16* B, index_t ldb, float* C, index_t ldc, index_t M,
                           index_t N, index_t K2) noexcept {
  if (K2 > 0 && detail::tile_gemm_bf16_amx<Accumulate, V, 0>(A, lda, B, ldb, C, ldc, M, N, K2)) return;
  detail::tile_gemm_bf16_any<Accumulate, V, 0>(A, lda, B, ldb, C, ldc, M, N, K2);
}

/// tile_gemm_bf16 with N a compile-time constant (a multiple of V::width): the same blocks and
/// bits, with only the column blocks N needs compiled.
template <bool Accumulate, index_t N, class V = simd::Vec>
inline void tile_gemm_bf16_n(const bf16* A, index_t lda, const bf16* B, index_t ldb, float* C, index_t ldc, index_t M,
                             index_t K2) noexcept {
  static_assert(N > 0 && N % V::width == 0, "N must be a positive multiple of the vector width");
  if (K2 > 0 && detail::tile_gemm_bf16_amx<Accumulate, V, int(N / V::width)>(A, lda, B, ldb, C, ldc, M, N, K2)) return;
  detail::tile_gemm_bf16_any<Accumulate, V, int(N / V::width)>(A, lda, B, ldb, C, ldc, M, N, K2);
}

/// Scalar definition of tile_gemm_bf16 (simd::dot_bf16_pair per element, p in order): the
/// vector kernels reproduce it bit for bit.
template <bool Accumulate>
inline void tile_gemm_bf16_reference(const bf16* A, index_t lda, const bf16* B, index_t ldb, float* C, index_t ldc,
                                     index_t M, index_t N, index_t K2) noexcept {
  for (index_t i = 0; i < M; ++i)
    for (index_t j = 0; j < N; ++j) {
      float acc = Accumulate ? C[i * ldc + j] : 0.f;
      for (index_t p = 0; p < K2; ++p) {
        const bf16* a = A + i * lda + 2 * p;
        const bf16* b = B + p * ldb + 2 * j;
        acc = simd::dot_bf16_pair(acc, a[0], a[1], b[0], b[1]);
      }
      C[i * ldc + j] = acc;
    }
}

}  // namespace ctxcomp::kernels
