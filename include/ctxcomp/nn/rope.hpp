// Rotary position embedding for arbitrary per-token position ids, in Llama's rotate_half form
// (dimension i pairs with i + rotary_dim/2) or GPT-J's interleaved form (2i pairs with 2i+1),
// with theta, linear position scaling and Llama 3.x frequency scaling (from a config's
// rope_scaling, or as llama.cpp's per-frequency factors from a GGUF). Layout: HeadsView
// [heads x tokens x head_dim], in place. Source: transformers' LlamaRotaryEmbedding /
// apply_rotary_pos_emb and `_compute_llama3_parameters` (inv_freq in fp32, as there).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../core/error.hpp"
#include "../core/views.hpp"

namespace ctxcomp {

enum class RopeStyle { RotateHalf, Interleaved };

/// Llama 3.x frequency scaling (rope_type "llama3"): with wavelen = 2*pi / inv_freq,
/// low_wavelen = original_max / low_freq_factor and high_wavelen = original_max / high_freq_factor,
/// a frequency with wavelen > low_wavelen is divided by `factor`, one with wavelen < high_wavelen
/// is kept, and one in between is blended:
///   smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor),
///   inv_freq' = (1 - smooth) * inv_freq / factor + smooth * inv_freq.
/// `factor` <= 0 (the default) means no Llama 3 scaling.
struct Llama3Scaling {
  double factor = 0.0;                              ///< scale of the low frequencies (<= 0: off)
  double low_freq_factor = 1.0;                     ///< low_freq_factor
  double high_freq_factor = 4.0;                    ///< high_freq_factor
  double original_max_position_embeddings = 8192.0; ///< the pre-training context
  /// Whether the rule applies.
  bool enabled() const noexcept { return factor > 0.0; }
};

/// Rotary embedding settings (a config's rope_theta / rope_scaling).
struct RopeConfig {
  double theta = 10000.0;                   ///< rope_theta
  double linear_scaling = 1.0;              ///< positions are divided by this factor (rope_scaling type "linear")
  RopeStyle style = RopeStyle::RotateHalf;  ///< which dimensions pair up
  index_t rotary_dim = 0;                   ///< rotated dimensions; 0 = the whole head_dim
  Llama3Scaling llama3{};                   ///< rope_type "llama3" (disabled by default)
  /// Per-frequency divisors, as llama.cpp's `rope_freqs` tensor holds Llama 3 scaling in a GGUF:
  /// inv_freq[i] is divided by freq_factors[i] (rotary_dim / 2 positive values); empty: none.
  std::vector<float> freq_factors;
};

/// The rotary frequencies inv_freq[i] = 1 / theta^(2i / rotary_dim), i < rotary_dim / 2, in fp32
/// as transformers computes them, then the Llama 3 rule when `cfg.llama3` is enabled (also in
/// fp32, the order of transformers' tensor expression), then the division by `cfg.freq_factors`
/// when given (llama.cpp's rope_freqs; checked: rotary_dim / 2 positive finite values).
inline std::vector<float> rope_inv_freq(const RopeConfig& cfg, index_t rotary_dim) {
  std::vector<float> f(static_cast<std::size_t>(rotary_dim / 2));
  for (index_t i = 0; i < rotary_dim / 2; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(rotary_dim);
    f[std::size_t(i)] = 1.0f / std::pow(static_cast<float>(cfg.theta), e);
  }
  if (cfg.llama3.enabled()) {
    const auto& l = cfg.llama3;
    const float factor = static_cast<float>(l.factor), low = static_cast<float>(l.low_freq_factor),
                high = static_cast<float>(l.high_freq_factor), old = static_cast<float>(l.original_max_position_embeddings);
    const float low_wavelen = static_cast<float>(l.original_max_position_embeddings / l.low_freq_factor);
    const float high_wavelen = static_cast<float>(l.original_max_position_embeddings / l.high_freq_factor);
    const float two_pi = static_cast<float>(2.0 * 3.14159265358979323846);
    for (auto& x : f) {
      const float wavelen = two_pi / x;
      if (wavelen > low_wavelen) {
        x = x / factor;
      } else if (!(wavelen < high_wavelen)) {
        const float smooth = (old / wavelen - low) / (high - low);
        x = (1.f - smooth) * x / factor + smooth * x;
      }
    }
  }
  if (!cfg.freq_factors.empty()) {
    CTXCOMP_CHECK(cfg.freq_factors.size() == f.size(), "Rope: ", cfg.freq_factors.size(),
                  " frequency factors for ", f.size(), " rotary frequencies");
    for (std::size_t i = 0; i < f.size(); ++i) {
      const float q = cfg.freq_factors[i];
      CTXCOMP_CHECK(std::isfinite(q) && q > 0.f, "Rope: frequency factor ", i, " (", q, ") must be positive");
      f[i] = f[i] / q;
    }
  }
  return f;
}

/// Llama 3 scaling (`cfg.llama3`) as per-frequency divisors, the way llama.cpp's converter writes
/// them into a GGUF (`rope_freqs`, computed in double from the fp32 base frequencies): 1 for a
/// kept frequency, `factor` for a scaled one, 1 / ((1 - smooth) / factor + smooth) between.
/// RopeConfig::freq_factors takes them back.
inline std::vector<float> llama3_freq_factors(const RopeConfig& cfg, index_t rotary_dim) {
  const auto& l = cfg.llama3;
  CTXCOMP_CHECK(l.enabled(), "llama3_freq_factors: the config has no Llama 3 scaling");
  RopeConfig plain = cfg;
  plain.llama3 = {};
  plain.freq_factors.clear();
  const std::vector<float> f = rope_inv_freq(plain, rotary_dim);
  std::vector<float> factors;
  const double low_wavelen = l.original_max_position_embeddings / l.low_freq_factor;
  const double high_wavelen = l.original_max_position_embeddings / l.high_freq_factor;
  for (float x : f) {
    const double wavelen = 2 * 3.14159265358979323846 / double(x);
    if (wavelen < high_wavelen) {
      factors.push_back(1.f);
    } else if (wavelen > low_wavelen) {
      factors.push_back(static_cast<float>(l.factor));
    } else {
      const double smooth = (l.original_max_position_embeddings / wavelen - l.low_freq_factor) /
                            (l.high_freq_factor - l.low_freq_factor);
      factors.push_back(static_cast<float>(1.0 / ((1 - smooth) / l.factor + smooth)));
    }
  }
  return factors;
}

/// Cos/sin table for positions [0, size()) of one head_dim; grows on demand (the only
/// allocation), so a host keeps one per model and steady-state calls never allocate.
class Rope {
 public:
  /// Positions are below this bound (2^22 = 4,194,304 tokens): the cos/sin table grows to the
  /// largest position seen, so a corrupt position id must be an error, not a huge allocation.
  static constexpr index_t kMaxPosition = index_t(1) << 22;

  /// A table for `cfg` and heads of `head_dim` (settings checked).
  Rope(const RopeConfig& cfg, index_t head_dim) : cfg_(cfg), head_dim_(head_dim) {
    rot_ = cfg.rotary_dim > 0 ? cfg.rotary_dim : head_dim;
    CTXCOMP_CHECK(head_dim > 0 && rot_ <= head_dim && rot_ % 2 == 0, "Rope: rotary_dim (", rot_,
                  ") must be even and at most head_dim (", head_dim, ")");
    CTXCOMP_CHECK(cfg.theta > 0 && std::isfinite(cfg.theta), "Rope: theta (", cfg.theta, ") must be positive");
    CTXCOMP_CHECK(cfg.linear_scaling > 0 && std::isfinite(cfg.linear_scaling), "Rope: linear_scaling (",
                  cfg.linear_scaling, ") must be positive");
    if (cfg.llama3.enabled()) {
      const auto& l = cfg.llama3;
      CTXCOMP_CHECK(std::isfinite(l.factor) && l.factor >= 1.0, "Rope: llama3 factor (", l.factor, ") must be >= 1");
      CTXCOMP_CHECK(std::isfinite(l.low_freq_factor) && std::isfinite(l.high_freq_factor) && l.low_freq_factor > 0 &&
                        l.high_freq_factor > l.low_freq_factor,
                    "Rope: llama3 needs 0 < low_freq_factor < high_freq_factor (got ", l.low_freq_factor, ", ",
                    l.high_freq_factor, ")");
      CTXCOMP_CHECK(std::isfinite(l.original_max_position_embeddings) && l.original_max_position_embeddings > 0,
                    "Rope: llama3 original_max_position_embeddings (", l.original_max_position_embeddings,
                    ") must be positive");
    }
    inv_freq_ = rope_inv_freq(cfg, rot_);
  }

  /// The settings.
  const RopeConfig& config() const noexcept { return cfg_; }
  /// The head size.
  index_t head_dim() const noexcept { return head_dim_; }
  /// Positions the cos/sin table covers.
  index_t size() const noexcept { return size_; }
  /// The rotary frequencies in use (rotary_dim / 2 of them).
  const std::vector<float>& inv_freq() const noexcept { return inv_freq_; }

  /// Makes the table cover positions [0, n), n <= kMaxPosition.
  void reserve_positions(index_t n) {
    if (n <= size_) return;
    CTXCOMP_CHECK(n <= kMaxPosition, "Rope::reserve_positions: ", n, " positions exceed the RoPE range (", kMaxPosition, ")");
    const index_t half = rot_ / 2;
    index_t cap = std::min(kMaxPosition, std::max<index_t>(n, 2 * size_));
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
      CTXCOMP_CHECK(positions[t] >= 0 && positions[t] < P(kMaxPosition), "Rope::apply: position ids must be in [0, ",
                    kMaxPosition, ") (token ", t, " has ", static_cast<long long>(positions[t]), ")");
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
