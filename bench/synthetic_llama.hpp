// A Llama-architecture model with random weights, by default the shape of Llama-2-7B (hidden
// 4096, 32 heads of 128, intermediate 11008) with only the layers a benchmark needs, or any
// `LlamaShape` (e.g. Llama-3.2-1B); its weights are owned here. CTXCOMP_BENCH_SMOKE=1 shrinks
// the default shape (hidden 256, 4 heads of 64).
#pragma once
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "../examples/llama_host.hpp"
#include "bench_common.hpp"

namespace ctxcomp::bench {

/// Deterministic pseudo-random fill, fast enough for billions of weights.
template <class T>
void fill(std::vector<T>& v, std::uint32_t seed, float scale) {
  std::uint32_t s = seed * 2654435761u + 1;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = from_float<T>((float(s >> 8) / float(1 << 24) - 0.5f) * 2.f * scale);
  }
}

/// The sizes of a synthetic model.
struct LlamaShape {
  index_t hidden, heads, kv_heads, head_dim, intermediate, layers, vocab;
  RopeConfig rope{};
  bool tied = false;

  /// Llama-2-7B's layer shape (smoke: hidden 256, 4 heads of 64) with `layers` layers.
  static LlamaShape llama2_7b(index_t layers, index_t vocab) {
    const bool s = smoke();
    return {s ? 256 : 4096, s ? 4 : 32, s ? 4 : 32, s ? 64 : 128, s ? 688 : 11008, layers, vocab};
  }
  /// Llama-3.2-1B (the SAC paper's base model): hidden 2048, 32 heads over 8 kv heads of 64, 16
  /// layers, intermediate 8192, vocab 128256, tied embeddings, llama3 RoPE (theta 500000, factor 32,
  /// low 1, high 4, original 8192). Smoke: hidden 128, 4 heads over 2 of 32, 2 layers, vocab 512.
  static LlamaShape llama32_1b() {
    const bool s = smoke();
    LlamaShape r{s ? 128 : 2048, s ? 4 : 32, s ? 2 : 8, s ? 32 : 64, s ? 256 : 8192, s ? 2 : 16, s ? 512 : 128256};
    r.rope.theta = 500000.0;
    r.rope.llama3 = {32.0, 1.0, 4.0, 8192.0};
    r.tied = true;
    return r;
  }
};

template <class T = float>
struct SyntheticLlama {
  host::LlamaModel<T> model;
  std::vector<std::vector<T>> storage;

  explicit SyntheticLlama(index_t layers, index_t vocab = 1) : SyntheticLlama(LlamaShape::llama2_7b(layers, vocab)) {}

  explicit SyntheticLlama(const LlamaShape& shape) {
    auto& c = model.config;
    c.hidden = shape.hidden;
    c.heads = shape.heads;
    c.kv_heads = shape.kv_heads;
    c.head_dim = shape.head_dim;
    c.intermediate = shape.intermediate;
    c.layers = shape.layers;
    c.vocab = shape.vocab;
    c.rope = shape.rope;
    c.arch.tied_embeddings = shape.tied;
    storage.reserve(std::size_t(9 * c.layers + 3));
    const index_t d = c.hidden, in = c.intermediate, qd = c.heads * c.head_dim, kd = c.kv_heads * c.head_dim;
    auto wv = [&](index_t o, index_t i) { return WeightView<T>{add(std::size_t(o * i), 0.02f, 0.f), o, i}; };
    for (index_t l = 0; l < c.layers; ++l) {
      host::LlamaLayerWeights<T> w;
      w.input_norm = add(std::size_t(d), 0.1f, 1.f);
      w.post_attention_norm = add(std::size_t(d), 0.1f, 1.f);
      w.q = wv(qd, d), w.k = wv(kd, d), w.v = wv(kd, d), w.o = wv(d, qd);
      w.mlp = {wv(in, d), wv(in, d), wv(d, in)};
      model.layers.push_back(w);
    }
    model.final_norm = add(std::size_t(d), 0.f, 1.f);
    model.embed = add(std::size_t(c.vocab * d), 1.f, 0.f);
    model.lm_head = shape.tied ? WeightView<T>{model.embed, c.vocab, d}
                               : WeightView<T>{add(std::size_t(c.vocab * d), 0.02f, 0.f), c.vocab, d};
  }
  /// FLOPs of one layer's forward over n new tokens whose attention sees `pairs` (query, key) pairs.
  double layer_flops(double n, double pairs) const {
    const auto& c = model.config;
    const double d = double(c.hidden), in = double(c.intermediate), qd = double(c.heads * c.head_dim),
                 kd = double(c.kv_heads * c.head_dim);
    return 2 * n * d * (2 * qd + 2 * kd) + 3 * 2 * n * d * in + 4 * qd * pairs;
  }

  /// Writes the model as a Hugging Face checkpoint directory (config.json and model.safetensors,
  /// weights in T), e.g. for io::convert_to_gguf. Llama-family names; the layout the loaders read.
  void write_checkpoint(const std::string& dir) const {
    const auto& c = model.config;
    nlohmann::json j = {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"},
                        {"hidden_size", c.hidden}, {"intermediate_size", c.intermediate},
                        {"num_attention_heads", c.heads}, {"num_key_value_heads", c.kv_heads},
                        {"head_dim", c.head_dim}, {"num_hidden_layers", c.layers}, {"vocab_size", c.vocab},
                        {"rms_norm_eps", c.rms_eps}, {"rope_theta", c.rope.theta}, {"hidden_act", "silu"},
                        {"max_position_embeddings", 131072}, {"tie_word_embeddings", c.arch.tied_embeddings}};
    if (c.rope.llama3.enabled())
      j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", c.rope.llama3.factor},
                           {"low_freq_factor", c.rope.llama3.low_freq_factor},
                           {"high_freq_factor", c.rope.llama3.high_freq_factor},
                           {"original_max_position_embeddings", c.rope.llama3.original_max_position_embeddings}};
    std::filesystem::create_directories(dir);
    std::ofstream(dir + "/config.json") << j.dump(2);
    std::vector<io::TensorOut> t;
    auto put = [&](const std::string& name, std::vector<std::int64_t> shape, const T* data) {
      t.push_back(io::TensorOut::of(name, std::move(shape), data));
    };
    const std::int64_t d = c.hidden, in = c.intermediate, qd = c.heads * c.head_dim, kd = c.kv_heads * c.head_dim;
    put("model.embed_tokens.weight", {c.vocab, d}, model.embed);
    for (index_t l = 0; l < c.layers; ++l) {
      const auto& w = model.layers[std::size_t(l)];
      const std::string h = "model.layers." + std::to_string(l) + ".";
      put(h + "input_layernorm.weight", {d}, w.input_norm);
      put(h + "self_attn.q_proj.weight", {qd, d}, w.q.data);
      put(h + "self_attn.k_proj.weight", {kd, d}, w.k.data);
      put(h + "self_attn.v_proj.weight", {kd, d}, w.v.data);
      put(h + "self_attn.o_proj.weight", {d, qd}, w.o.data);
      put(h + "post_attention_layernorm.weight", {d}, w.post_attention_norm);
      put(h + "mlp.gate_proj.weight", {in, d}, w.mlp.gate.data);
      put(h + "mlp.up_proj.weight", {in, d}, w.mlp.up.data);
      put(h + "mlp.down_proj.weight", {d, in}, w.mlp.down.data);
    }
    put("model.norm.weight", {d}, model.final_norm);
    if (!c.arch.tied_embeddings) put("lm_head.weight", {c.vocab, d}, model.lm_head.data);
    io::write_safetensors(dir + "/model.safetensors", t);
  }

 private:
  T* add(std::size_t n, float scale, float offset) {
    storage.emplace_back(n);
    fill(storage.back(), std::uint32_t(storage.size() + 100), scale);
    for (auto& x : storage.back()) x = from_float<T>(to_float(x) + offset);
    return storage.back().data();
  }
};

/// The Llama-3.2-1B-shaped model, built once (about 2.5 GB of bf16 weights).
inline const SyntheticLlama<bf16>& llama32_1b() {
  static const SyntheticLlama<bf16> m(LlamaShape::llama32_1b());
  return m;
}

/// The SAC paper's configuration: a 2040-token context in chunks of 510 at ratio 5.
inline constexpr index_t kPaperTokens = 2040, kPaperChunk = 510, kPaperRatio = 5;

/// The token ids of that context (the same in every benchmark that runs it).
inline std::vector<std::int64_t> paper_ids(index_t vocab) {
  std::vector<std::int64_t> ids(static_cast<std::size_t>(kPaperTokens));
  for (index_t i = 0; i < kPaperTokens; ++i) ids[std::size_t(i)] = (i * 7919 + 13) % vocab;
  return ids;
}

}  // namespace ctxcomp::bench
