// Rotary position embedding for arbitrary per-token position ids, in Llama's rotate_half form
// (dimension i pairs with i + rotary_dim/2) or GPT-J's interleaved form (2i pairs with 2i+1),
// with theta and linear position scaling. Layout: HeadsView [heads x tokens x head_dim], in place.
// Source: transformers' LlamaRotaryEmbedding / apply_rotary_pos_emb (inv_freq in fp32, as there).
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "../core/error.hpp"
#include "../core/views.hpp"

namespace ctxcomp {

enum class RopeStyle { RotateHalf, Interleaved };

struct RopeConfig {
  double theta = 10000.0;
  double linear_scaling = 1.0;  // positions are divided by this factor (rope_scaling type "linear")
  RopeStyle style = RopeStyle::RotateHalf;
  index_t rotary_dim = 0;       // 0 = the whole head_dim
};

/// Cos/sin table for positions [0, size()) of one head_dim; grows on demand (the only
/// allocation), so a host keeps one per model and steady-state calls never allocate.
class Rope {
 public:
  Rope(const RopeConfig& cfg, index_t head_dim) : cfg_(cfg), head_dim_(head_dim) {
    rot_ = cfg.rotary_dim > 0 ? cfg.rotary_dim : head_dim;
    CTXCOMP_CHECK(head_dim > 0 && rot_ <= head_dim && rot_ % 2 == 0, "Rope: rotary_dim (", rot_,
                  ") must be even and at most head_dim (", head_dim, ")");
    CTXCOMP_CHECK(cfg.theta > 0 && std::isfinite(cfg.theta), "Rope: theta (", cfg.theta, ") must be positive");
    CTXCOMP_CHECK(cfg.linear_scaling > 0 && std::isfinite(cfg.linear_scaling), "Rope: linear_scaling (",
                  cfg.linear_scaling, ") must be positive");
    inv_freq_.resize(static_cast<std::size_t>(rot_ / 2));
    for (index_t i = 0; i < rot_ / 2; ++i) {
      // As transformers: inv_freq = 1 / theta^(2i/dim), evaluated in float32.
      const float e = static_cast<float>(2 * i) / static_cast<float>(rot_);
      inv_freq_[i] = 1.0f / std::pow(static_cast<float>(cfg.theta), e);
    }
  }

  const RopeConfig& config() const noexcept { return cfg_; }
  index_t head_dim() const noexcept { return head_dim_; }
  index_t size() const noexcept { return size_; }

  /// Makes the table cover positions [0, n).
  void reserve_positions(index_t n) {
    if (n <= size_) return;
    const index_t half = rot_ / 2;
    index_t cap = std::max<index_t>(n, 2 * size_);
    cos_.resize(static_cast<std::size_t>(cap * half));
    sin_.resize(static_cast<std::size_t>(cap * half));
    for (index_t p = size_; p < cap; ++p)
      for (index_t i = 0; i < half; ++i) {
        // Angle and its cos/sin in double, rounded once to fp32.
        const double a = (static_cast<double>(p) / cfg_.linear_scaling) * static_cast<double>(inv_freq_[i]);
        cos_[p * half + i] = static_cast<float>(std::cos(a));
        sin_[p * half + i] = static_cast<float>(std::sin(a));
      }
    size_ = cap;
  }

  /// Rotates every head of every token of x in place; token t has position positions[t] >= 0.
  template <class T, class P>
  void apply(HeadsView<T> x, const P* positions) {
    static_assert(!std::is_const_v<T>, "Rope::apply rotates in place");
    CTXCOMP_CHECK(x.head_dim == head_dim_, "Rope::apply: head_dim ", x.head_dim, " but the table is for ", head_dim_);
    if (x.empty()) return;
    CTXCOMP_CHECK(positions != nullptr, "Rope::apply: no positions");
    index_t max_pos = -1;
    for (index_t t = 0; t < x.tokens; ++t) {
      CTXCOMP_CHECK(positions[t] >= 0, "Rope::apply: position ids must be >= 0 (token ", t, " has ",
                    static_cast<long long>(positions[t]), ")");
      max_pos = std::max<index_t>(max_pos, static_cast<index_t>(positions[t]));
    }
    reserve_positions(max_pos + 1);
    const index_t half = rot_ / 2;
    for (index_t h = 0; h < x.heads; ++h)
      for (index_t t = 0; t < x.tokens; ++t) {
        T* r = x.row(h, t);
        const float* c = cos_.data() + static_cast<index_t>(positions[t]) * half;
        const float* s = sin_.data() + static_cast<index_t>(positions[t]) * half;
        if (cfg_.style == RopeStyle::RotateHalf) {
          for (index_t i = 0; i < half; ++i) {
            const float x1 = to_float(r[i]), x2 = to_float(r[i + half]);
            r[i] = from_float<T>(x1 * c[i] - x2 * s[i]);
            r[i + half] = from_float<T>(x2 * c[i] + x1 * s[i]);
          }
        } else {
          for (index_t i = 0; i < half; ++i) {
            const float x1 = to_float(r[2 * i]), x2 = to_float(r[2 * i + 1]);
            r[2 * i] = from_float<T>(x1 * c[i] - x2 * s[i]);
            r[2 * i + 1] = from_float<T>(x2 * c[i] + x1 * s[i]);
          }
        }
      }
  }

 private:
  RopeConfig cfg_;
  index_t head_dim_ = 0, rot_ = 0, size_ = 0;
  std::vector<float> inv_freq_, cos_, sin_;
};

}  // namespace ctxcomp
