// Scalar types: index_t, the storage types bf16 / fp16 (Eigen's bfloat16 and half) and their
// round-to-nearest-even conversions to and from fp32. Arithmetic is always done in fp32.
// Semantics: IEEE binary16 and bfloat16 (truncated binary32), RNE as in PyTorch's .to().
#pragma once
#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace ctxcomp {

using index_t = std::ptrdiff_t;
using bf16 = Eigen::bfloat16;
using fp16 = Eigen::half;

/// Symmetric int8 KV storage: one signed byte per element; the row's fp32 scale lives beside the
/// data (HeadsView::scales), value = scale * v. Quantised by `quantize_row` (scale = max|x| / 127,
/// round to nearest even, |x - value| <= scale / 2). Only K/V caches use it; activations and
/// weights stay float / bf16 / fp16.
struct qint8 {
  std::int8_t v = 0;  ///< the quantised value (times the row's scale)
};

template <class T>
inline constexpr bool is_storage_type_v =
    std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;
/// Storage types a KV cache may hold: the float types and qint8.
template <class T>
inline constexpr bool is_kv_type_v = is_storage_type_v<T> || std::is_same_v<T, qint8>;
/// Whether rows of T carry a scale (qint8).
template <class T>
inline constexpr bool is_quantized_v = std::is_same_v<std::remove_const_t<T>, qint8>;

/// Widens one stored value to fp32 (exact for bf16 and fp16).
template <class T>
inline float to_float(T x) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, bf16>) {
    std::uint32_t bits = static_cast<std::uint32_t>(Eigen::numext::bit_cast<std::uint16_t>(x)) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  } else {
    static_assert(std::is_same_v<T, fp16>, "storage type must be float, bf16 or fp16");
    return static_cast<float>(x);
  }
}

/// Narrows fp32 to the storage type, rounding to nearest even (NaN stays NaN).
template <class T>
inline T from_float(float x) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    static_assert(is_storage_type_v<T>, "storage type must be float, bf16 or fp16");
    return T(x);
  }
}

/// Name of a storage type, for messages.
template <class T>
constexpr const char* type_name() noexcept {
  if constexpr (std::is_same_v<T, float>) return "f32";
  else if constexpr (std::is_same_v<T, bf16>) return "bf16";
  else if constexpr (std::is_same_v<T, fp16>) return "f16";
  else if constexpr (std::is_same_v<T, double>) return "f64";
  else if constexpr (std::is_same_v<T, qint8>) return "int8";
  else return "?";
}

}  // namespace ctxcomp
