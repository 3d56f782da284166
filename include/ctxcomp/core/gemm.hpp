// Packed GEMM for linear layers: C[M x N] = A[M x K] * B[N x K]^T, with B a weight matrix in
// PyTorch's layout [out_features x in_features] (float, or bf16/fp16 widened block by block).
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
#include <type_traits>

#include "executor.hpp"
#include "kernels.hpp"
#include "simd.hpp"
#include "types.hpp"
#include "workspace.hpp"

namespace ctxcomp::kernels {

/// Register block of the linear-layer GEMM for a vector type: MV vectors of token rows x NJ
/// weight rows of accumulators (AVX-512: 4 x 6 of 32 registers; AVX2/SSE: 2 x 6 of 16).
template <class V>
struct GemmNtShape {
  static constexpr int MV = V::width == 1 ? 4 : (V::registers >= 32 ? 4 : 2);
  static constexpr int NJ = V::width == 1 ? 4 : 6;
  static constexpr int MI = MV * V::width;  // token rows per packed panel
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
/// vectors of a panel MI floats wide; the NJ x MV*W tile of C^T at ct (row stride ldct) is loaded
/// first unless `first`, and stored back.
template <class V, int MV, int NJ, int MI>
inline void gemm_nt_micro(const float* ap, const float* const* w, index_t kc, float* ct, index_t ldct,
                          bool first) noexcept {
  constexpr int W = V::width;
  typename V::type acc[NJ][MV];
  for (int j = 0; j < NJ; ++j)
    for (int v = 0; v < MV; ++v) acc[j][v] = first ? V::zero() : V::load(ct + j * ldct + v * W);
  const float* wj[NJ];
  for (int j = 0; j < NJ; ++j) wj[j] = w[j];
  for (index_t k = 0; k < kc; ++k) {
    typename V::type a[MV];
    for (int v = 0; v < MV; ++v) a[v] = V::load(ap + k * MI + v * W);
    for (int j = 0; j < NJ; ++j) {
      const auto b = V::broadcast(wj[j][k]);
      for (int v = 0; v < MV; ++v) acc[j][v] = V::fma(a[v], b, acc[j][v]);
    }
  }
  for (int j = 0; j < NJ; ++j)
    for (int v = 0; v < MV; ++v) V::store(ct + j * ldct + v * W, acc[j][v]);
}
}  // namespace detail

/// Workspace bytes `gemm_nt` needs for M token rows, N outputs, K inputs and weights of type T.
template <class T, class V = simd::Vec>
std::size_t gemm_nt_workspace_bytes(index_t M, index_t N, index_t K, index_t concurrency) {
  using S = GemmNtShape<V>;
  const index_t mpad = (M + S::MI - 1) / S::MI * S::MI, kc = detail::gemm_kc(mpad, K);
  const index_t workers = std::max<index_t>(1, concurrency);
  std::size_t per_worker = Workspace::bytes_for<float>(detail::kGemmTaskCols * mpad);
  if constexpr (!std::is_same_v<T, float>) per_worker += Workspace::bytes_for<float>(S::NJ * kc);
  (void)N;
  return Workspace::bytes_for<float>(mpad * K) + static_cast<std::size_t>(workers) * per_worker;
}

/// C = A * B^T: A [M x K] (row stride lda), B [N x K] weights (row stride ldb), C [M x N] (row
/// stride ldc). Reserves and uses `ws`; no other allocation.
template <class T, class V = simd::Vec, class Exec = SerialExecutor>
void gemm_nt(const float* A, index_t lda, const T* B, index_t ldb, float* C, index_t ldc, index_t M, index_t N,
             index_t K, Workspace& ws, const Exec& exec = {}) {
  using S = GemmNtShape<V>;
  constexpr int MV = S::MV, NJ = S::NJ, MI = S::MI;
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (index_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  const index_t panels = (M + MI - 1) / MI, mpad = panels * MI, kc = detail::gemm_kc(mpad, K);
  const index_t tasks = (N + detail::kGemmTaskCols - 1) / detail::kGemmTaskCols;
  const index_t workers = std::max<index_t>(1, std::min(exec.concurrency(), tasks));
  CTXCOMP_CHECK(workers <= 64, "gemm_nt: executor concurrency (", workers, ") above the supported 64");
  ws.reserve(gemm_nt_workspace_bytes<T, V>(M, N, K, workers));
  float* ap = ws.take<float>(mpad * K);
  float* ct[64] = {};
  float* wconv[64] = {};
  for (index_t w = 0; w < workers; ++w) {
    ct[w] = ws.take<float>(detail::kGemmTaskCols * mpad);
    if constexpr (!std::is_same_v<T, float>) wconv[w] = ws.take<float>(NJ * kc);
  }

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
        // The tile's weight rows as float: in place, or widened into the worker's L1 scratch.
        // Rows past the task's edge repeat its last row; their results are never read.
        const float* w[NJ];
        for (int j = 0; j < NJ; ++j) {
          const index_t row = o0 + std::min<index_t>(j0 + j, nb - 1);
          if constexpr (std::is_same_v<T, float>) {
            w[j] = B + row * ldb + k0;
          } else {
            float* dst = wconv[worker] + j * kc;
            if (j0 + j < nb) convert<T, float>(B + row * ldb + k0, dst, kl);
            w[j] = j0 + j < nb ? dst : w[j - 1];
          }
        }
        if constexpr (!std::is_same_v<T, float>) {
          // Narrow rows are converted up front rather than streamed by the kernel, so fetch the
          // next tile's rows while this one computes (the hardware prefetcher ramps up too late
          // on row pieces of a few lines).
          const index_t n0 = j0 + NJ < nb ? j0 + NJ : 0, nk = j0 + NJ < nb ? k0 : k0 + kc;
          if (nk < K)
            for (index_t j = n0; j < std::min<index_t>(nb, n0 + NJ); ++j) {
              const char* row = reinterpret_cast<const char*>(B + (o0 + j) * ldb + nk);
              const index_t bytes = std::min(kc, K - nk) * index_t(sizeof(T));
              for (index_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 3);
            }
        }
        for (index_t p = 0; p < panels; ++p) {
          const float* a = ap + p * K * MI + k0 * MI;
          float* c = cw + j0 * mpad + p * MI;
          // A last panel with few rows runs only the vectors it needs.
          const index_t vecs = std::min<index_t>(MV, (M - p * MI + V::width - 1) / V::width);
          if (vecs == MV || MV == 1) detail::gemm_nt_micro<V, MV, NJ, MI>(a, w, kl, c, mpad, k0 == 0);
          else if (vecs == 1) detail::gemm_nt_micro<V, 1, NJ, MI>(a, w, kl, c, mpad, k0 == 0);
          else if (vecs == 2 || MV <= 3) detail::gemm_nt_micro<V, (MV > 2 ? 2 : MV), NJ, MI>(a, w, kl, c, mpad, k0 == 0);
          else detail::gemm_nt_micro<V, (MV > 3 ? 3 : MV), NJ, MI>(a, w, kl, c, mpad, k0 == 0);
        }
      }
    }
    // C^T tile -> C.
    for (index_t i0 = 0; i0 < M; i0 += 8) {
      const index_t ie = std::min(M, i0 + 8);
      for (index_t j = 0; j < nb; ++j) {
        const float* src = cw + j * mpad;
        for (index_t i = i0; i < ie; ++i) C[i * ldc + o0 + j] = src[i];
      }
    }
  });
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

}  // namespace ctxcomp::kernels
