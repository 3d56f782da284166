// Packed GEMM for linear layers: C[M x N] = A[M x K] * B[N x K]^T, with B a weight matrix in
// PyTorch's layout [out_features x in_features] (float, or bf16/fp16 widened as they are read).
//
// Why not Eigen: a linear layer of a compressor multiplies a few hundred token rows (128 digests,
// 640 context + digest rows) by weights of 4096 x 4096 or 11008 x 4096. Eigen repacks both
// operands for every product and, at M = 128, reaches only about half of the FMA peak here.
// This kernel vectorises along the token rows instead: A is packed once per call into
// column panels (A^T, MI rows wide), the weight rows are read in place and broadcast, so the
// large operand is never repacked. Each output element is one sequential FMA chain over k in
// order 0..K-1, whatever the blocking and the thread count: `gemm_nt_reference` (scalar
// std::fma in the same order) reproduces it bit for bit.
//
// Threading: tasks are fixed blocks of output columns (independent of the executor), each with
// a worker-owned scratch of its output tile. All memory comes from the caller's Workspace.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "amx.hpp"
#include "bf16dot.hpp"
#include "executor.hpp"
#include "simd.hpp"
#include "types.hpp"
#include "workspace.hpp"

namespace ctxcomp::kernels {

/// Register block of the linear-layer GEMM for a vector type: MV vectors of token rows x NJ
/// weight rows of accumulators (AVX-512: 4 x 6 of 32 registers; AVX2/SSE: 2 x 6 of 16).
template <class V>
struct GemmNtShape {
  /// Register tile: MV vectors of token rows (MI = MV * width rows) by NJ output features.
  ///@{
  static constexpr int MV = V::width == 1 ? 4 : (V::registers >= 32 ? 4 : 2);
  static constexpr int NJ = V::width == 1 ? 4 : 6;
  static constexpr int MI = MV * V::width;  // token rows per packed panel
  ///@}
};

namespace detail {
/// Output columns per task: a multiple of every NJ, fixed so results do not depend on threads.
inline constexpr index_t kGemmTaskCols = 96;

/// k-block length for M padded rows: the packed A block (Mpad x kc floats) stays near 256 KB
/// so it remains in L2 while every weight tile of the task passes over it.
inline index_t gemm_kc(index_t mpad, index_t K) noexcept {
  index_t kc = (65536 / std::max<index_t>(mpad, 1)) / 16 * 16;
  kc = std::clamp<index_t>(kc, 64, 1024);
  return std::min(kc, K);
}

/// acc[j][v] over k in [0, kc): acc = fma(A^T panel, broadcast(w_j[k]), acc) for the first MV
/// vectors of a panel MI floats wide; weights of type WT are widened as they are broadcast (one
/// scalar widening per weight element per panel, off the FMA ports); the NJ x MV*W tile of C^T at ct (row stride ldct) is loaded
/// first unless `first`, and stored back.
template <class V, int MV, int NJ, int MI, class WT = float>
inline void gemm_nt_micro(const float* ap, const WT* const* w, index_t kc, float* ct, index_t ldct,
                          bool first) noexcept {
  constexpr int W = V::width;
  typename V::type acc[NJ][MV];
  for (int j = 0; j < NJ; ++j)
    for (int v = 0; v < MV; ++v) acc[j][v] = first ? V::zero() : V::load(ct + j * ldct + v * W);
  const WT* wj[NJ];
  for (int j = 0; j < NJ; ++j) wj[j] = w[j];
  for (index_t k = 0; k < kc; ++k) {
    typename V::type a[MV];
    for (int v = 0; v < MV; ++v) a[v] = V::load(ap + k * MI + v * W);
    for (int j = 0; j < NJ; ++j) {
      const auto b = V::broadcast(to_float(wj[j][k]));
      for (int v = 0; v < MV; ++v) acc[j][v] = V::fma(a[v], b, acc[j][v]);
    }
  }
  for (int j = 0; j < NJ; ++j)
    for (int v = 0; v < MV; ++v) V::store(ct + j * ldct + v * W, acc[j][v]);
}
}  // namespace detail

namespace detail {
/// Runs micro<MV'>() with MV' the vectors a panel of `rows` token rows needs (a last panel with
/// few rows runs only those): micro is a generic lambda taking std::integral_constant<int, MV'>.
template <class V, int MV, class Micro>
inline void with_panel_vectors(index_t rows, Micro&& micro) {
  const index_t vecs = std::min<index_t>(MV, (rows + V::width - 1) / V::width);
  if (vecs == MV || MV == 1) micro(std::integral_constant<int, MV>{});
  else if (vecs == 1) micro(std::integral_constant<int, 1>{});
  else if (vecs == 2 || MV <= 3) micro(std::integral_constant<int, (MV > 2 ? 2 : MV)>{});
  else micro(std::integral_constant<int, (MV > 3 ? 3 : MV)>{});
}

/// The task's transposed output tile (nb columns of mpad rows) into C's columns [o0, o0 + nb).
inline void store_ct(const float* cw, index_t mpad, float* C, index_t ldc, index_t M, index_t o0, index_t nb) noexcept {
  for (index_t i0 = 0; i0 < M; i0 += 8) {
    const index_t ie = std::min(M, i0 + 8);
    for (index_t j = 0; j < nb; ++j) {
      const float* src = cw + j * mpad;
      for (index_t i = i0; i < ie; ++i) C[i * ldc + o0 + j] = src[i];
    }
  }
}
}  // namespace detail

/// Workspace bytes `gemm_nt` needs for M token rows, N outputs, K inputs and weights of type T:
/// the packed A^T (M padded to whole panels x K) and one output tile per worker. N and T do
/// not change it; they are parameters so that callers need not know.
template <class T, class V = simd::Vec>
std::size_t gemm_nt_workspace_bytes(index_t M, index_t N, index_t K, index_t concurrency) {
  using S = GemmNtShape<V>;
  (void)N;
  const index_t mpad = (M + S::MI - 1) / S::MI * S::MI, workers = std::max<index_t>(1, concurrency);
  return Workspace::bytes_for<float>(mpad * K) +
         static_cast<std::size_t>(workers) * Workspace::bytes_for<float>(detail::kGemmTaskCols * mpad);
}

namespace detail {
/// The body of gemm_nt (the executor type-erased: compiled once for every executor).
template <class T, class V>
void gemm_nt_impl(const float* A, index_t lda, const T* B, index_t ldb, float* C, index_t ldc, index_t M, index_t N,
                  index_t K, Workspace& ws, ExecutorRef exec) {
  using S = GemmNtShape<V>;
  constexpr int MV = S::MV, NJ = S::NJ, MI = S::MI;
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (index_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  const index_t panels = (M + MI - 1) / MI, mpad = panels * MI, kc = detail::gemm_kc(mpad, K);
  const index_t tasks = (N + detail::kGemmTaskCols - 1) / detail::kGemmTaskCols;
  const index_t workers = std::max<index_t>(1, exec.concurrency());  // any worker slot may run a task
  CTXCOMP_CHECK(workers <= 64, "gemm_nt: executor concurrency (", workers, ") above the supported 64");
  ws.reserve(gemm_nt_workspace_bytes<T, V>(M, N, K, workers));
  float* ap = ws.take<float>(mpad * K);
  float* ct[64] = {};
  for (index_t w = 0; w < workers; ++w) ct[w] = ws.take<float>(detail::kGemmTaskCols * mpad);

  // Pack A^T: panel p holds rows [p*MI, p*MI + MI) as [K][MI] (rows past M are zero).
  constexpr index_t KB = 16;
  exec.parallel_for(panels * ((K + 255) / 256), [&](index_t t, index_t) {
    const index_t p = t % panels, k0 = t / panels * 256, k1 = std::min(K, k0 + 256);
    float* dst = ap + p * K * MI;
    const index_t rows = std::min<index_t>(MI, M - p * MI);
    for (index_t kb = k0; kb < k1; kb += KB) {
      const index_t ke = std::min(k1, kb + KB);
      for (index_t r = 0; r < rows; ++r) {
        const float* src = A + (p * MI + r) * lda;
        for (index_t k = kb; k < ke; ++k) dst[k * MI + r] = src[k];
      }
      for (index_t r = rows; r < MI; ++r)
        for (index_t k = kb; k < ke; ++k) dst[k * MI + r] = 0.f;
    }
  });

  exec.parallel_for(tasks, [&](index_t t, index_t worker) {
    const index_t o0 = t * detail::kGemmTaskCols, nb = std::min(detail::kGemmTaskCols, N - o0);
    float* cw = ct[worker];
    for (index_t k0 = 0; k0 < K; k0 += kc) {
      const index_t kl = std::min(kc, K - k0);
      for (index_t j0 = 0; j0 < nb; j0 += NJ) {
        // Rows past the task's edge repeat its last row; their results are never read.
        const T* w[NJ];
        for (int j = 0; j < NJ; ++j) w[j] = B + (o0 + std::min<index_t>(j0 + j, nb - 1)) * ldb + k0;
        for (index_t p = 0; p < panels; ++p) {
          const float* a = ap + p * K * MI + k0 * MI;
          float* c = cw + j0 * mpad + p * MI;
          detail::with_panel_vectors<V, MV>(M - p * MI, [&](auto mv) {
            detail::gemm_nt_micro<V, decltype(mv)::value, NJ, MI, T>(a, w, kl, c, mpad, k0 == 0);
          });
        }
      }
    }
    detail::store_ct(cw, mpad, C, ldc, M, o0, nb);  // C^T tile -> C
  });
}
}  // namespace detail

/// C = A * B^T: A [M x K] (row stride lda), B [N x K] weights (row stride ldb), C [M x N] (row
/// stride ldc). Reserves and uses `ws`; no other allocation.
template <class T, class V = simd::Vec, class Exec = SerialExecutor>
void gemm_nt(const float* A, index_t lda, const T* B, index_t ldb, float* C, index_t ldc, index_t M, index_t N,
             index_t K, Workspace& ws, const Exec& exec = {}) {
  detail::gemm_nt_impl<T, V>(A, lda, B, ldb, C, ldc, M, N, K, ws, exec);
}

/// Scalar reference of gemm_nt: the same sequential FMA chain per element (bit-identical).
template <class T>
void gemm_nt_reference(const float* A, index_t lda, const T* B, index_t ldb, float* C, index_t ldc, index_t M,
                       index_t N, index_t K) {
  for (index_t i = 0; i < M; ++i)
    for (index_t j = 0; j < N; ++j) {
      float c = 0.f;
      for (index_t k = 0; k < K; ++k) c = std::fma(A[i * lda + k], to_float(B[j * ldb + k]), c);
      C[i * ldc + j] = c;
    }
}

// ---- bf16 compute (core/bf16dot.hpp) ----
// C = A * B^T with A rounded to bf16 and B as bf16 (bf16 weights are read in place; float / fp16
// weights are rounded block by block into a worker scratch), pairs of products accumulated in fp32
// as vdpbf16ps does. Each output element is one chain over the pairs p = 0..ceil(K/2)-1 in order
// (an odd K pads the last pair with zeros), whatever the blocking, the vector width or the thread
// count: `gemm_nt_bf16_reference` reproduces it bit for bit on every target. Where AMX runs
// (core/amx.hpp) whole 16-pair steps go through the tiles: the same order of steps and error
// bound, AMX's last bits (still independent of the thread count).

namespace detail {
/// acc[j][v] chains over kc2 pairs: A^T panel pairs (MI rows, 2 bf16 each) times the broadcast
/// weight pair w_j[2p], w_j[2p + 1]; the NJ x MV*W tile of C^T at ct is loaded first unless `first`.
template <class V, int MV, int NJ, int MI>
CTXCOMP_NOINLINE void gemm_nt_bf16_micro(const bf16* ap, const bf16* const* w, index_t kc2, float* ct, index_t ldct,
                               bool first) noexcept {
  using D = simd::Bf16Dot<V>;
  constexpr int W = V::width;
  typename V::type acc[NJ][MV];
  for (int j = 0; j < NJ; ++j)
    for (int v = 0; v < MV; ++v) acc[j][v] = first ? V::zero() : V::load(ct + j * ldct + v * W);
  const bf16* wj[NJ];
  for (int j = 0; j < NJ; ++j) wj[j] = w[j];
  for (index_t p = 0; p < kc2; ++p) {
    typename D::pairs a[MV];
#pragma GCC unroll 8
    for (int v = 0; v < MV; ++v) a[v] = D::load(ap + (p * MI + v * W) * 2);
#pragma GCC unroll 8
    for (int j = 0; j < NJ; ++j) {
      const auto b = D::broadcast(wj[j] + 2 * p);
#pragma GCC unroll 8
      for (int v = 0; v < MV; ++v) acc[j][v] = D::dot(acc[j][v], a[v], b);
    }
  }
  for (int j = 0; j < NJ; ++j)
    for (int v = 0; v < MV; ++v) V::store(ct + j * ldct + v * W, acc[j][v]);
}

/// Whether gemm_nt_bf16 runs on AMX tiles (core/amx.hpp): where they run for V and there is at
/// least one whole 16-pair step.
template <class V, int MI>
inline bool gemm_bf16_amx_runs(index_t K2) noexcept {
  if constexpr (amx::compiled() && simd::Bf16Dot<V>::native && V::width == amx::kTileCols && MI % 32 == 0)
    return K2 >= amx::kTilePairs && amx::enabled();
  else
    return (void)K2, false;
}

/// gemm_nt_bf16 on AMX for one task's block of pairs [q0, q0 + ql): C^T rows (weights, 16 per
/// tile, read in place with stride wld) times the activation panels (their [pairs][MI][2]
/// layout is the tiles' VNNI B layout), blocks of 32 x 32. Whole 16-row groups and whole
/// 16-pair steps run on the tiles; the pairs past the last step continue each chain on the
/// vector kernel, four rows at a time, in order (the blocking depends on the shape alone, not
/// on the thread count). Returns the first row left to the vector kernel (nb rounded down to 16).
template <class V, int MV, int MI>
inline index_t gemm_nt_bf16_amx_block(const bf16* wrow0, index_t wld, const bf16* ap, index_t K2, index_t q0,
                                      index_t ql, float* cw, index_t mpad, index_t M, index_t nb,
                                      index_t panels) noexcept {
  constexpr index_t R = amx::kTileRows;
  const index_t nb16 = nb / R * R, ql16 = ql / amx::kTilePairs * amx::kTilePairs;
  if (nb16 == 0) return 0;
  for (index_t j0 = 0; j0 < nb16 && ql16 > 0; j0 += 2 * R) {
    const bf16* w = wrow0 + j0 * wld;
    for (index_t p = 0; p < panels; ++p) {
      const bf16* a = ap + (p * K2 + q0) * MI * 2;
      for (index_t c0 = 0; c0 < MI; c0 += 2 * amx::kTileCols) {
        float* c = cw + j0 * mpad + p * MI + c0;
        if (j0 + 2 * R <= nb16) amx::tile_block<2, 2>(w, wld, a + 2 * c0, MI * 2, c, mpad, ql16, q0 > 0);
        else amx::tile_block<1, 2>(w, wld, a + 2 * c0, MI * 2, c, mpad, ql16, q0 > 0);
      }
    }
  }
  if (ql16 < ql) {
    constexpr int NJ4 = 4;  // divides 16: the groups stay inside the AMX rows
    for (index_t j0 = 0; j0 < nb16; j0 += NJ4) {
      const bf16* w[NJ4];
      for (int j = 0; j < NJ4; ++j) w[j] = wrow0 + (j0 + j) * wld + 2 * ql16;
      for (index_t p = 0; p < panels; ++p) {
        const bf16* a = ap + (p * K2 + q0 + ql16) * MI * 2;
        float* c = cw + j0 * mpad + p * MI;
        with_panel_vectors<V, MV>(M - p * MI, [&](auto mv) {
          gemm_nt_bf16_micro<V, decltype(mv)::value, NJ4, MI>(a, w, ql - ql16, c, mpad, q0 == 0 && ql16 == 0);
        });
      }
    }
  }
  return nb16;
}

/// Whether gemm_nt_bf16 reads these weights in place (bf16 with whole pairs per row).
template <class T>
inline bool gemm_bf16_in_place(index_t K) noexcept {
  return std::is_same_v<T, bf16> && K % 2 == 0;
}
}  // namespace detail

/// Workspace bytes `gemm_nt_bf16` needs: the packed bf16 A^T, one output tile per worker, and
/// per worker a rounded weight block unless the weights are read in place.
template <class T, class V = simd::Vec>
std::size_t gemm_nt_bf16_workspace_bytes(index_t M, index_t N, index_t K, index_t concurrency) {
  using S = GemmNtShape<V>;
  (void)N;
  const index_t mpad = (M + S::MI - 1) / S::MI * S::MI, workers = std::max<index_t>(1, concurrency);
  const index_t K2 = (K + 1) / 2;
  const std::size_t wblock =
      detail::gemm_bf16_in_place<T>(K) ? 0 : Workspace::bytes_for<bf16>(detail::kGemmTaskCols * 2 * K2);
  return Workspace::bytes_for<bf16>(mpad * 2 * K2) +
         static_cast<std::size_t>(workers) * (Workspace::bytes_for<float>(detail::kGemmTaskCols * mpad) + wblock);
}

namespace detail {
/// The body of gemm_nt_bf16 (the executor type-erased: compiled once for every executor).
template <class T, class V>
void gemm_nt_bf16_impl(const float* A, index_t lda, const T* B, index_t ldb, float* C, index_t ldc, index_t M, index_t N,
                       index_t K, Workspace& ws, ExecutorRef exec) {
  using S = GemmNtShape<V>;
  constexpr int MV = S::MV, NJ = S::NJ, MI = S::MI;
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (index_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  const index_t K2 = (K + 1) / 2, panels = (M + MI - 1) / MI, mpad = panels * MI;
  const index_t kc2 = std::max<index_t>(1, detail::gemm_kc(mpad, K) / 2);
  const index_t tasks = (N + detail::kGemmTaskCols - 1) / detail::kGemmTaskCols;
  const index_t workers = std::max<index_t>(1, exec.concurrency());
  CTXCOMP_CHECK(workers <= 64, "gemm_nt_bf16: executor concurrency (", workers, ") above the supported 64");
  const bool in_place = detail::gemm_bf16_in_place<T>(K);
  const bool use_amx = detail::gemm_bf16_amx_runs<V, MI>(K2);
  ws.reserve(gemm_nt_bf16_workspace_bytes<T, V>(M, N, K, workers));
  bf16* ap = ws.take<bf16>(mpad * 2 * K2);
  float* ct[64] = {};
  bf16* wb[64] = {};
  for (index_t w = 0; w < workers; ++w) {
    ct[w] = ws.take<float>(detail::kGemmTaskCols * mpad);
    if (!in_place) wb[w] = ws.take<bf16>(detail::kGemmTaskCols * 2 * K2);
  }

  // Pack A: panel p holds rows [p*MI, p*MI + MI) as [K2][MI][2] bf16 (rows past M and the pad of
  // an odd K are zero).
  constexpr index_t QB = 128;  // pairs per packing task
  exec.parallel_for(panels * ((K2 + QB - 1) / QB), [&](index_t t, index_t) {
    const index_t p = t % panels, q0 = t / panels * QB, q1 = std::min(K2, q0 + QB);
    bf16* dst = ap + p * K2 * MI * 2;
    const index_t rows = std::min<index_t>(MI, M - p * MI);
    alignas(64) bf16 row[2 * QB];
    for (index_t r = 0; r < MI; ++r) {
      // The row's pairs rounded in order (zeros past K or past M), then one 4-byte pair each.
      const index_t ne = r < rows ? std::min(K, 2 * q1) - 2 * q0 : 0;
      if (ne > 0) simd::round_row_bf16<V>(A + (p * MI + r) * lda + 2 * q0, row, ne);
      std::fill(row + std::max<index_t>(ne, 0), row + 2 * (q1 - q0), bf16(0.f));
      for (index_t q = q0; q < q1; ++q) std::memcpy(dst + (q * MI + r) * 2, row + 2 * (q - q0), 2 * sizeof(bf16));
    }
  });

  exec.parallel_for(tasks, [&](index_t t, index_t worker) {
    const index_t o0 = t * detail::kGemmTaskCols, nb = std::min(detail::kGemmTaskCols, N - o0);
    float* cw = ct[worker];
    for (index_t q0 = 0; q0 < K2; q0 += kc2) {
      const index_t ql = std::min(kc2, K2 - q0);
      // Weight rows of this block as bf16 pairs: in place, or rounded into the worker's block.
      const bf16* wrow0 = nullptr;
      index_t wld = 0;
      if constexpr (std::is_same_v<T, bf16>) {
        if (in_place) wrow0 = B + o0 * ldb + 2 * q0, wld = ldb;
      }
      if (!in_place) {
        bf16* dst = wb[worker];
        for (index_t j = 0; j < nb; ++j)
          for (index_t k = 2 * q0; k < 2 * (q0 + ql); ++k)
            dst[j * 2 * kc2 + (k - 2 * q0)] = k < K ? simd::round_bf16(to_float(B[(o0 + j) * ldb + k])) : bf16(0.f);
        wrow0 = dst, wld = 2 * kc2;
      }
      index_t j_vec = 0;  // the vector kernel's first row of C^T (past the AMX rows)
      if (use_amx) j_vec = detail::gemm_nt_bf16_amx_block<V, MV, MI>(wrow0, wld, ap, K2, q0, ql, cw, mpad, M, nb, panels);
      for (index_t j0 = j_vec; j0 < nb; j0 += NJ) {
        // Rows past the task's edge repeat its last row; their results are never read.
        const bf16* w[NJ];
        for (int j = 0; j < NJ; ++j) w[j] = wrow0 + std::min<index_t>(j0 + j, nb - 1) * wld;
        for (index_t p = 0; p < panels; ++p) {
          const bf16* a = ap + (p * K2 + q0) * MI * 2;
          float* c = cw + j0 * mpad + p * MI;
          detail::with_panel_vectors<V, MV>(M - p * MI, [&](auto mv) {
            detail::gemm_nt_bf16_micro<V, decltype(mv)::value, NJ, MI>(a, w, ql, c, mpad, q0 == 0);
          });
        }
      }
    }
    detail::store_ct(cw, mpad, C, ldc, M, o0, nb);
  });
}
}  // namespace detail

/// C = A * B^T in bf16 compute: A [M x K] float (row stride lda) rounded to bf16, B [N x K]
/// weights (row stride ldb), C [M x N] (row stride ldc). Reserves and uses `ws`; no other
/// allocation. Tasks are fixed blocks of output columns, as gemm_nt's.
template <class T, class V = simd::Vec, class Exec = SerialExecutor>
void gemm_nt_bf16(const float* A, index_t lda, const T* B, index_t ldb, float* C, index_t ldc, index_t M, index_t N,
                  index_t K, Workspace& ws, const Exec& exec = {}) {
  detail::gemm_nt_bf16_impl<T, V>(A, lda, B, ldb, C, ldc, M, N, K, ws, exec);
}

/// Scalar definition of gemm_nt_bf16: per element, simd::dot_bf16_pair over the pairs in order
/// with A and B rounded by simd::round_bf16 (bit-identical to the vector kernels).
template <class T>
void gemm_nt_bf16_reference(const float* A, index_t lda, const T* B, index_t ldb, float* C, index_t ldc, index_t M,
                            index_t N, index_t K) {
  auto ra = [&](index_t i, index_t k) { return k < K ? simd::round_bf16(A[i * lda + k]) : bf16(0.f); };
  auto rb = [&](index_t j, index_t k) { return k < K ? simd::round_bf16(to_float(B[j * ldb + k])) : bf16(0.f); };
  for (index_t i = 0; i < M; ++i)
    for (index_t j = 0; j < N; ++j) {
      float c = 0.f;
      for (index_t k = 0; k < K; k += 2) c = simd::dot_bf16_pair(c, ra(i, k), ra(i, k + 1), rb(j, k), rb(j, k + 1));
      C[i * ldc + j] = c;
    }
}

}  // namespace ctxcomp::kernels
