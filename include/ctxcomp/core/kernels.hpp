// Vector kernels over contiguous float rows: dot, axpy, scale, row max / sum, exp, and storage
// conversions (bf16 / fp16 <-> fp32). Each is a template over the vector type (simd::Vec or its
// scalar twin simd::ScalarVec) with a scalar tail, so both paths come from one source.
#pragma once
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>

#include "simd.hpp"
#include "types.hpp"

namespace ctxcomp::kernels {

/// sum_i a[i] * b[i], fp32 accumulation in W lanes then a horizontal sum.
template <class V = simd::Vec>
inline float dot(const float* a, const float* b, index_t n) noexcept {
  constexpr int W = V::width;
  typename V::type acc0 = V::zero(), acc1 = V::zero();
  index_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    acc0 = V::fma(V::load(a + i), V::load(b + i), acc0);
    acc1 = V::fma(V::load(a + i + W), V::load(b + i + W), acc1);
  }
  for (const index_t nv = n / W * W; i < nv; i += W) acc0 = V::fma(V::load(a + i), V::load(b + i), acc0);
  float s = V::reduce_add(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

/// y[i] += alpha * x[i].
template <class V = simd::Vec>
inline void axpy(float alpha, const float* x, float* y, index_t n) noexcept {
  constexpr int W = V::width;
  const auto va = V::broadcast(alpha);
  index_t i = 0;
  for (const index_t nv = n / W * W; i < nv; i += W) V::store(y + i, V::fma(va, V::load(x + i), V::load(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

/// x[i] *= alpha.
template <class V = simd::Vec>
inline void scale(float* x, float alpha, index_t n) noexcept {
  constexpr int W = V::width;
  const auto va = V::broadcast(alpha);
  index_t i = 0;
  for (const index_t nv = n / W * W; i < nv; i += W) V::store(x + i, V::load(x + i) * va);
  for (; i < n; ++i) x[i] *= alpha;
}

/// Whether x[0..n) are all finite (no NaN, no Inf): their products with zero sum to zero.
template <class V = simd::Vec>
inline bool all_finite(const float* x, index_t n) noexcept {
  constexpr int W = V::width;
  auto acc = V::zero();
  const auto zero = V::zero();
  index_t i = 0;
  for (const index_t nv = n / W * W; i < nv; i += W) acc = V::fma(V::load(x + i), zero, acc);
  float r = V::reduce_add(acc);
  for (; i < n; ++i) r += x[i] * 0.f;
  return r == 0.f;
}

/// x[i] *= y[i].
template <class V = simd::Vec>
inline void mul(float* x, const float* y, index_t n) noexcept {
  constexpr int W = V::width;
  index_t i = 0;
  for (const index_t nv = n / W * W; i < nv; i += W) V::store(x + i, V::load(x + i) * V::load(y + i));
  for (; i < n; ++i) x[i] *= y[i];
}

/// max_i x[i]; -inf for n == 0.
template <class V = simd::Vec>
inline float row_max(const float* x, index_t n) noexcept {
  constexpr int W = V::width;
  float m = -std::numeric_limits<float>::infinity();
  index_t i = 0;
  if (n >= W) {
    auto vm = V::load(x);
    const index_t nv = n / W * W;  // (not i + W <= n: GCC then warns of an overflowing index)
    for (i = W; i < nv; i += W) vm = V::max(vm, V::load(x + i));
    m = V::reduce_max(vm);
  }
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

/// sum_i x[i].
template <class V = simd::Vec>
inline float row_sum(const float* x, index_t n) noexcept {
  constexpr int W = V::width;
  auto acc = V::zero();
  index_t i = 0;
  for (const index_t nv = n / W * W; i < nv; i += W) acc = acc + V::load(x + i);
  float s = V::reduce_add(acc);
  for (; i < n; ++i) s += x[i];
  return s;
}

/// x[i] = 2^(x[i] - shift) in place; returns the sum of the results. exp2(-inf) = 0.
template <class V = simd::Vec>
inline float exp2_shifted(float* x, float shift, index_t n) noexcept {
  constexpr int W = V::width;
  const auto vs = V::broadcast(shift);
  auto acc = V::zero();
  index_t i = 0;
  for (const index_t nv = n / W * W; i < nv; i += W) {
    auto e = V::exp2(V::load(x + i) - vs);
    V::store(x + i, e);
    acc = acc + e;
  }
  float s = V::reduce_add(acc);
  for (; i < n; ++i) {
    x[i] = simd::ScalarVec::exp2(x[i] - shift);
    s += x[i];
  }
  return s;
}

/// x[i] = e^(x[i]) in place.
template <class V = simd::Vec>
inline void exp_inplace(float* x, index_t n) noexcept {
  constexpr int W = V::width;
  index_t i = 0;
  for (const index_t nv = n / W * W; i < nv; i += W) V::store(x + i, V::exp(V::load(x + i)));
  for (; i < n; ++i) x[i] = simd::ScalarVec::exp(x[i]);
}

/// g[i] = silu(g[i]) * u[i] with silu(x) = x / (1 + e^-x): SwiGLU's gate, as torch's F.silu.
template <class V = simd::Vec>
inline void silu_mul(float* g, const float* u, index_t n) noexcept {
  constexpr int W = V::width;
  const auto one = V::broadcast(1.f);
  index_t i = 0;
  for (const index_t nv = n / W * W; i < nv; i += W) {
    const auto x = V::load(g + i);
    V::store(g + i, V::div(x, one + V::exp(V::zero() - x)) * V::load(u + i));
  }
  for (; i < n; ++i) g[i] = g[i] / (1.f + simd::ScalarVec::exp(-g[i])) * u[i];
}

/// x[i] = gelu(x[i]) in place, the exact form x / 2 * (1 + erf(x / sqrt(2))) (torch's
/// F.gelu with approximate "none", GPT-NeoX's hidden_act "gelu").
template <class V = simd::Vec>
inline void gelu(float* x, index_t n) noexcept {
  constexpr int W = V::width;
  constexpr float kInvSqrt2 = 0.70710678118654752440f;
  const auto half = V::broadcast(0.5f), one = V::broadcast(1.f), s = V::broadcast(kInvSqrt2);
  index_t i = 0;
  for (const index_t nv = n / W * W; i < nv; i += W) {
    const auto v = V::load(x + i);
    V::store(x + i, v * half * (one + V::erf(v * s)));
  }
  for (; i < n; ++i) x[i] = x[i] * 0.5f * (1.f + simd::ScalarVec::erf(x[i] * kInvSqrt2));
}

/// dst[i] = float(src[i]) for float, bf16, fp16 or qint8 (without its scale), widened in
/// registers by V::load.
template <class V = simd::Vec, class T>
inline void widen(const T* src, float* dst, index_t n) noexcept {
  constexpr int W = V::width;
  index_t i = 0;
  for (const index_t nv = n / W * W; i < nv; i += W) V::store(dst + i, V::load(src + i));
  for (; i < n; ++i) dst[i] = simd::ScalarVec::load(src + i);
}

/// dst[i * ldd + j] = float(src[j * lds + i]) (times scales[j] when scales is not null), for j < n
/// and i < d: n stored rows of d values widened into the columns of dst (a K tile transposed for
/// the outer-product GEMM). Blocks of W x W are widened, scaled and transposed in registers; the
/// edges element by element, with the same products. With `prefetch_rows` != 0, the rows that
/// many rows past those read are asked for into L2 as the reads go (a hint for rows streamed from
/// memory; the addresses need not be valid).
template <class V = simd::Vec, class T>
inline void widen_transposed(const T* src, index_t lds, index_t n, index_t d, const float* scales, float* dst,
                             index_t ldd, index_t prefetch_rows = 0) noexcept {
  constexpr int W = V::width;
  const index_t nb = n / W * W, db = d / W * W;  // the rows and dims of whole W x W blocks
  for (index_t j = 0; j < nb; j += W)
    for (index_t i = 0; i < db; i += W) {
      if (prefetch_rows && (i * index_t(sizeof(T))) % 64 == 0)
        for (int x = 0; x < W; ++x) simd::prefetch<simd::PrefetchTo::l2>(src + (j + x + prefetch_rows) * lds + i);
      typename V::type r[W];
      for (int x = 0; x < W; ++x) {
        r[x] = V::load(src + (j + x) * lds + i);
        if (scales) r[x] = r[x] * V::broadcast(scales[j + x]);
      }
      V::transpose(r);
      for (int x = 0; x < W; ++x) V::store(dst + (i + x) * ldd + j, r[x]);
    }
  // Edges: the dims past db of the block rows, then whole rows past nb.
  for (index_t j = 0; j < n; ++j)
    for (index_t i = j < nb ? db : 0; i < d; ++i) {
      const float x = simd::ScalarVec::load(src + j * lds + i);
      dst[i * ldd + j] = scales ? x * scales[j] : x;
    }
}

/// Symmetric int8 quantisation of one row of n values: scale = max|x| / 127 (0 for a zero row),
/// q[i] = x[i] / scale rounded to nearest even, so |x[i] - scale * q[i]| <= scale / 2 (up to one
/// fp32 rounding of x[i] / scale). A row holding NaN or Inf gets a NaN scale (its attention
/// output is NaN: propagated, as fp32 would). Returns the scale.
inline float quantize_row(const float* x, qint8* q, index_t n) noexcept {
  float amax = 0.f;
  bool finite = true;
  for (index_t i = 0; i < n; ++i) {
    finite = finite && std::isfinite(x[i]);
    amax = std::max(amax, std::abs(x[i]));
  }
  if (!finite) {
    for (index_t i = 0; i < n; ++i) q[i].v = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  if (amax == 0.f) {
    for (index_t i = 0; i < n; ++i) q[i].v = 0;
    return 0.f;
  }
  const float scale = amax / 127.f;
  for (index_t i = 0; i < n; ++i) {
    const float r = std::nearbyint(x[i] / scale);
    q[i].v = static_cast<std::int8_t>(std::min(127.f, std::max(-127.f, r)));
  }
  return scale;
}

/// dst[i] = Dst(src[i]) between float, bf16, fp16 (and double), rounding to nearest even.
/// Uses Eigen's packet casts (AVX-512 / F16C paths where the target has them).
template <class Src, class Dst>
inline void convert(const Src* src, Dst* dst, index_t n) noexcept {
  if constexpr (std::is_same_v<Src, Dst>) {
    if (n > 0 && src != dst) std::copy(src, src + n, dst);
  } else if constexpr (std::is_same_v<Src, bf16> && std::is_same_v<Dst, float>) {
    // bf16 -> f32 is a 16-bit shift; this loop vectorises on every target.
    for (index_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
  } else {
    using ArrS = Eigen::Array<Src, Eigen::Dynamic, 1>;
    using ArrD = Eigen::Array<Dst, Eigen::Dynamic, 1>;
    Eigen::Map<ArrD>(dst, n) = Eigen::Map<const ArrS>(src, n).template cast<Dst>();
  }
}

}  // namespace ctxcomp::kernels
