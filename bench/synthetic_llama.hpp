// A Llama-architecture model with random weights and the shape of Llama-2-7B (hidden 4096, 32
// heads of 128, intermediate 11008) but only the layers a benchmark needs; its weights are
// owned here. CTXCOMP_BENCH_SMOKE=1 shrinks it (hidden 256, 4 heads of 64).
#pragma once
#include <cstdlib>
#include <memory>

#include "../examples/llama_host.hpp"
#include "bench_common.hpp"

namespace ctxcomp::bench {

inline bool smoke() { return std::getenv("CTXCOMP_BENCH_SMOKE") != nullptr; }

/// Deterministic pseudo-random fill, fast enough for billions of weights.
template <class T>
void fill(std::vector<T>& v, std::uint32_t seed, float scale) {
  std::uint32_t s = seed * 2654435761u + 1;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = from_float<T>((float(s >> 8) / float(1 << 24) - 0.5f) * 2.f * scale);
  }
}

template <class T = float>
struct SyntheticLlama {
  host::LlamaModel<T> model;
  std::vector<std::vector<T>> storage;

  explicit SyntheticLlama(index_t layers, index_t vocab = 1) {
    const bool s = smoke();
    auto& c = model.config;
    c.hidden = s ? 256 : 4096;
    c.heads = c.kv_heads = s ? 4 : 32;
    c.head_dim = s ? 64 : 128;
    c.intermediate = s ? 688 : 11008;
    c.layers = layers;
    c.vocab = vocab;
    storage.reserve(std::size_t(9 * layers + 3));
    const index_t d = c.hidden, in = c.intermediate;
    auto wv = [&](index_t o, index_t i) { return WeightView<T>{add(std::size_t(o * i), 0.02f, 0.f), o, i}; };
    for (index_t l = 0; l < layers; ++l) {
      host::LlamaLayerWeights<T> w;
      w.input_norm = add(std::size_t(d), 0.1f, 1.f);
      w.post_attention_norm = add(std::size_t(d), 0.1f, 1.f);
      w.q = wv(d, d), w.k = wv(d, d), w.v = wv(d, d), w.o = wv(d, d);
      w.mlp = {wv(in, d), wv(in, d), wv(d, in)};
      model.layers.push_back(w);
    }
    model.final_norm = add(std::size_t(d), 0.f, 1.f);
    model.embed = add(std::size_t(vocab * d), 1.f, 0.f);
    model.lm_head = {add(std::size_t(vocab * d), 0.02f, 0.f), vocab, d};
  }
  /// FLOPs of one layer's forward over n new tokens whose attention sees `pairs` (query, key) pairs.
  double layer_flops(double n, double pairs) const {
    const auto& c = model.config;
    const double d = double(c.hidden), in = double(c.intermediate);
    return 2 * n * d * d * 4 + 3 * 2 * n * d * in + 4 * double(c.head_dim * c.heads) * pairs;
  }

 private:
  T* add(std::size_t n, float scale, float offset) {
    storage.emplace_back(n);
    fill(storage.back(), std::uint32_t(storage.size() + 100), scale);
    for (auto& x : storage.back()) x = from_float<T>(to_float(x) + offset);
    return storage.back().data();
  }
};

}  // namespace ctxcomp::bench
