// Reference host: a Llama-architecture (and GPT-NeoX) forward pass built only from ctxcomp
// blocks (embeddings, RMSNorm or LayerNorm, RoPE, grouped-query attention through the fused
// kernel, SwiGLU or GELU MLP, lm head), loading Hugging Face checkpoints (config.json + model.safetensors or sharded
// model-0000k-of-0000N.safetensors with model.safetensors.index.json; F32/F16/BF16) and running
// prefill or token-by-token decode over a KvCache. The worked example of embedding ctxcomp in an
// engine: small on purpose. Semantics: transformers' LlamaForCausalLM, MistralForCausalLM (no
// sliding window), Qwen2ForCausalLM (q/k/v biases) and Qwen3ForCausalLM (per-head q/k RMSNorm
// before RoPE) and GPTNeoXForCausalLM (LayerNorm with bias, fused query_key_value, partial
// rotary, parallel or sequential residual, exact GELU), eager attention; tied or untied
// embeddings; Llama 3 RoPE. Loading is strict: a
// checkpoint tensor the host would not use is an error, never silently dropped. A PEFT LoRA
// adapter (a directory, or a checkpoint in the LoRA-injected layout) is merged at load time
// (io/lora.hpp).
#pragma once
#include <ctxcomp/ctxcomp.hpp>
#include <ctxcomp/io/checkpoint.hpp>
#include <ctxcomp/io/gguf.hpp>
#include <ctxcomp/io/lora.hpp>
#include <ctxcomp/kv/kv_cache.hpp>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ctxcomp::host {

struct LlamaConfig {
  index_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0, layers = 0, vocab = 0;
  float rms_eps = 1e-6f;
  RopeConfig rope{};
  io::DecoderArch arch{"LlamaForCausalLM"};  // family, biases, q/k norm, tied embeddings
};

template <class T>
struct LlamaLayerWeights {
  const T* input_norm = nullptr;
  const T* post_attention_norm = nullptr;
  WeightView<T> q, k, v, o;  // biases in WeightView::bias where the family has them
  SwiGLUWeights<T> mlp;
  const T* q_norm = nullptr;  // [head_dim], Qwen3: RMSNorm of each query head before RoPE
  const T* k_norm = nullptr;  // [head_dim], likewise for keys
  // GPT-NeoX: LayerNorm biases (the norms are LayerNorms when these are set), the fused
  // query_key_value [3 * heads * head_dim x hidden] (per head [q | k | v]; q, k, v then empty),
  // `o` = attention.dense, and the GELU MLP in place of `mlp`.
  const T* input_norm_bias = nullptr;
  const T* post_attention_norm_bias = nullptr;
  WeightView<T> qkv;
  GeluMlpWeights<T> gelu_mlp;
};

/// A loaded checkpoint: config and weights (owned, converted to T).
template <class T = float>
struct LlamaModel {
  LlamaConfig config;
  const T* embed = nullptr;  // [vocab x hidden]
  std::vector<LlamaLayerWeights<T>> layers;
  const T* final_norm = nullptr;
  const T* final_norm_bias = nullptr;  // GPT-NeoX's final_layer_norm bias (a LayerNorm)
  WeightView<T> lm_head;
  std::shared_ptr<io::TensorStore<T>> store;
  std::shared_ptr<io::LoraAdapter> lora;  // the merged LoRA adapter, if any

  /// Loads checkpoint `dir` (a directory, or a GGUF file of the llama / qwen2 / qwen3
  /// architecture: io::GgufCheckpoint); with `adapter_dir`, merges that PEFT LoRA adapter directory into its
  /// weights (fp32 merge before any conversion to T). A checkpoint in the LoRA-injected layout
  /// merges its own LoRA; it cannot take a second adapter.
  static LlamaModel load(const std::string& dir, const std::string& adapter_dir = {}) {
    LlamaModel m;
    // A GGUF file (io/gguf.hpp) stands for a checkpoint directory: its config and tensors.
    const bool gguf = io::is_gguf_path(dir);
    std::optional<io::GgufCheckpoint> g;
    if (gguf) g.emplace(io::GgufCheckpoint::open(dir));
    const std::string cp = gguf ? dir : dir + "/config.json";
    const auto j = gguf ? g->config() : io::read_json(cp);
    auto& c = m.config;
    c.arch = io::decoder_arch(j, cp);
    const io::TransformerDims t = c.arch.gpt_neox ? io::gpt_neox_dims(j, cp) : io::transformer_dims(j, cp);
    c.hidden = t.hidden, c.heads = t.heads, c.kv_heads = t.kv_heads, c.head_dim = t.head_dim;
    c.intermediate = t.intermediate, c.layers = t.layers, c.rms_eps = t.rms_eps, c.rope = t.rope;
    if (gguf) c.rope.freq_factors = g->rope_freq_factors();  // Llama 3 RoPE in a GGUF (rope_freqs)
    c.vocab = io::config_int(j, "vocab_size", cp);
    CTXCOMP_CHECK(c.vocab > 0, cp, ": vocab_size (", c.vocab, ") must be positive");  // the rest: transformer_dims
    m.store = gguf ? std::make_shared<io::TensorStore<T>>(g->tensors(), dir)
                   : std::make_shared<io::TensorStore<T>>(io::TensorStore<T>::open_dir(dir));
    auto& st = *m.store;
    if (!gguf) m.lora = io::LoraAdapter::injected(st, dir);
    if (m.lora && !adapter_dir.empty())
      fail(dir, ": the checkpoint already holds a LoRA (injected layout); it cannot take the adapter '", adapter_dir, "' too");
    if (!adapter_dir.empty()) m.lora = io::LoraAdapter::load(adapter_dir);
    if (m.lora) {
      m.lora->note_base_model(j.contains("_name_or_path") && j["_name_or_path"].is_string()
                                  ? j["_name_or_path"].get<std::string>() : std::string());
      if (c.arch.gpt_neox) m.lora->rename_replacement("lm_head.weight", "embed_out.weight");
      st.set_overlay(m.lora);
      // An adapter trained with added tokens stores the resized embeddings: its vocabulary.
      if (m.lora->replacement(embed_name(c.arch)).second) {
        const auto es = st.shape_of(embed_name(c.arch));
        if (es.size() == 2) c.vocab = es[0];  // (its width is checked as it loads)
      }
    }
    const auto& a = c.arch;
    const std::int64_t d = c.hidden;
    auto wv = [&](const std::string& p, std::int64_t o, std::int64_t i, bool bias) {
      return st.load_weight(p + ".weight", o, i, bias ? p + ".bias" : std::string());
    };
    m.embed = st.load(embed_name(a), {c.vocab, d});
    if (a.gpt_neox) {
      load_gpt_neox_layers(m, st);
    } else {
      load_llama_layers(m, st);
    }
    const std::string head = a.gpt_neox ? "embed_out" : "lm_head";
    if (!a.tied_embeddings) {
      m.lm_head = wv(head, c.vocab, d, false);
    } else {
      // Tied: the output layer is the embedding matrix. A stored output layer must then be a copy of it.
      m.lm_head = WeightView<T>{m.embed, c.vocab, d};
      if (const T* h = st.load_if_present(head + ".weight", {c.vocab, d}))
        CTXCOMP_CHECK(std::equal(h, h + c.vocab * d, m.embed, [](T x, T y) { return to_float(x) == to_float(y); }),
                      cp, ": tie_word_embeddings is true but ", head, ".weight differs from ", embed_name(a));
    }
    st.check_all_consumed(a.name, io::harmless_extra_tensor);
    if (m.lora) m.lora->check_all_used(a.name);
    return m;
  }

 private:
  static std::string embed_name(const io::DecoderArch& a) {
    return a.gpt_neox ? "gpt_neox.embed_in.weight" : "model.embed_tokens.weight";
  }

  static void load_llama_layers(LlamaModel& m, io::TensorStore<T>& st) {
    const auto& c = m.config;
    const auto& a = c.arch;
    const std::int64_t d = c.hidden, qd = c.heads * c.head_dim, kd = c.kv_heads * c.head_dim, in = c.intermediate;
    auto wv = [&](const std::string& p, std::int64_t o, std::int64_t i, bool bias) {
      return st.load_weight(p + ".weight", o, i, bias ? p + ".bias" : std::string());
    };
    for (index_t i = 0; i < c.layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      LlamaLayerWeights<T> l;
      l.input_norm = st.load(p + "input_layernorm.weight", {d});
      l.post_attention_norm = st.load(p + "post_attention_layernorm.weight", {d});
      l.q = wv(p + "self_attn.q_proj", qd, d, a.qkv_bias);
      l.k = wv(p + "self_attn.k_proj", kd, d, a.qkv_bias);
      l.v = wv(p + "self_attn.v_proj", kd, d, a.qkv_bias);
      l.o = wv(p + "self_attn.o_proj", d, qd, a.o_bias);
      if (a.qk_norm) {
        l.q_norm = st.load(p + "self_attn.q_norm.weight", {c.head_dim});
        l.k_norm = st.load(p + "self_attn.k_norm.weight", {c.head_dim});
      }
      l.mlp = {wv(p + "mlp.gate_proj", in, d, a.mlp_bias), wv(p + "mlp.up_proj", in, d, a.mlp_bias),
               wv(p + "mlp.down_proj", d, in, a.mlp_bias)};
      m.layers.push_back(l);
    }
    m.final_norm = st.load("model.norm.weight", {d});
  }

  // GPT-NeoX: gpt_neox.layers.N.{input_layernorm, post_attention_layernorm}.{weight, bias},
  // attention.query_key_value / attention.dense, mlp.dense_h_to_4h / dense_4h_to_h, and
  // gpt_neox.final_layer_norm.
  static void load_gpt_neox_layers(LlamaModel& m, io::TensorStore<T>& st) {
    const auto& c = m.config;
    const auto& a = c.arch;
    const std::int64_t d = c.hidden, qd = c.heads * c.head_dim, in = c.intermediate;
    auto wv = [&](const std::string& p, std::int64_t o, std::int64_t i, bool bias) {
      return st.load_weight(p + ".weight", o, i, bias ? p + ".bias" : std::string());
    };
    for (index_t i = 0; i < c.layers; ++i) {
      const std::string p = "gpt_neox.layers." + std::to_string(i) + ".";
      LlamaLayerWeights<T> l;
      l.input_norm = st.load(p + "input_layernorm.weight", {d});
      l.input_norm_bias = st.load(p + "input_layernorm.bias", {d});
      l.post_attention_norm = st.load(p + "post_attention_layernorm.weight", {d});
      l.post_attention_norm_bias = st.load(p + "post_attention_layernorm.bias", {d});
      l.qkv = wv(p + "attention.query_key_value", 3 * qd, d, a.qkv_bias);
      l.o = wv(p + "attention.dense", d, qd, a.o_bias);
      l.gelu_mlp = {wv(p + "mlp.dense_h_to_4h", in, d, true), wv(p + "mlp.dense_4h_to_h", d, in, true)};
      m.layers.push_back(l);
    }
    m.final_norm = st.load("gpt_neox.final_layer_norm.weight", {d});
    m.final_norm_bias = st.load("gpt_neox.final_layer_norm.bias", {d});
  }
};

/// Runs a LlamaModel over a KvCache. Scratch is owned and reused: steady-state decode
/// allocates nothing of ctxcomp's.
template <class T = float, class C = float>
class LlamaHost {
 public:
  explicit LlamaHost(const LlamaModel<T>& model) : m_(model), rope_(model.config.rope, model.config.head_dim) {}

  const LlamaConfig& config() const noexcept { return m_.config; }

  /// Arithmetic of forward()'s projections, MLP and attention (fp32 by default; Compute::bf16:
  /// bf16 operands, fp32 accumulation) and of logits().
  Compute compute() const noexcept { return compute_; }
  /// Sets the arithmetic of later calls.
  void set_compute(Compute c) noexcept { compute_ = c; }

  /// A cache sized for this model.
  KvCache<C> make_cache(index_t capacity) const {
    return KvCache<C>(m_.config.layers, m_.config.kv_heads, m_.config.head_dim, capacity);
  }

  /// x[t] = embedding of ids[t].
  void embed(const std::int64_t* ids, index_t count, MatrixView<float> x) const {
    CTXCOMP_CHECK(x.rows() == count && x.cols() == m_.config.hidden, "LlamaHost::embed: x is ", x.rows(), " x ", x.cols());
    for (index_t t = 0; t < count; ++t) {
      CTXCOMP_CHECK(ids[t] >= 0 && ids[t] < m_.config.vocab, "LlamaHost::embed: token id ", ids[t],
                    " at index ", t, " is outside the vocabulary [0, ", m_.config.vocab, ")");
      for (index_t i = 0; i < m_.config.hidden; ++i) x(t, i) = to_float(m_.embed[ids[t] * m_.config.hidden + i]);
    }
  }

  /// Runs every layer over new tokens' input embeddings x [t x hidden] (replaced by the final
  /// normed hidden states), at `positions`, with logical indices `token_index`. Their K/V are
  /// appended to `cache`; attention rows are the new tokens, columns the cache slots after the
  /// append, visibility from `mask` (e.g. Causal(cache.size()) for plain prefill). `layers`
  /// may replace the model's layer weights (same shapes), e.g. a LoRA-merged copy.
  template <class Mask, class Kv, class Exec = SerialExecutor>
  void forward(MatrixView<float> x, const std::int64_t* positions, const index_t* token_index, const Mask& mask,
               Kv& cache, const Exec& exec = {}, const std::vector<LlamaLayerWeights<T>>* layers = nullptr) {
    static_assert(std::is_same_v<typename decltype(cache.keys(0))::element_type, C>,
                  "LlamaHost::forward: the cache's storage type is not the host's C");
    const auto& c = m_.config;
    const auto& L = layers ? *layers : m_.layers;
    const index_t t = x.rows();
    CTXCOMP_CHECK(t > 0 && x.cols() == c.hidden, "LlamaHost::forward: x is ", x.rows(), " x ", x.cols(),
                  ", expected t x ", c.hidden, " with t > 0");
    CTXCOMP_CHECK(index_t(L.size()) == c.layers, "LlamaHost::forward: ", L.size(), " layers given, model has ", c.layers);
    CTXCOMP_CHECK(cache.layers() == c.layers && cache.kv_heads() == c.kv_heads && cache.head_dim() == c.head_dim,
                  "LlamaHost::forward: the cache's shape does not match the model");
    for (index_t i = 0; i < t; ++i)
      CTXCOMP_CHECK(positions[i] >= 0, "LlamaHost::forward: negative position id at ", i);
    // The mask may read the new slots' token indices: append the metadata, check, undo on error.
    // New tokens go to the slots the layout picks (a cell cache: its first free cells).
    slots_.resize(std::size_t(t));
    index_t* slots = slots_.data();
    cache.append(t, positions, token_index, slots);
    {
      RollbackScope undo([&cache, slots, t] { cache.unappend(slots, t); });
      mask.check(t, cache.slots(), "LlamaHost::forward");
      undo.dismiss();
    }

    const index_t hd = c.head_dim, kd = c.kv_heads * hd;
    const LayerScratch sc = take_scratch(t);
    AttentionOptions aopt;
    aopt.compute = compute_;
    for (index_t l = 0; l < c.layers; ++l) {
      const auto& w = L[std::size_t(l)];
      project(w, const_view(x), positions, sc, exec);
      // Keys (after RoPE) and values go into the cache in its storage type.
      const auto kc = cache.keys(l), vc = cache.values(l);
      for (index_t hh = 0; hh < c.kv_heads; ++hh)
        for (index_t i = 0; i < t; ++i) {
          store_row(kc, hh, slots[i], sc.k + i * kd + hh * hd);  // converted, or quantised for qint8
          store_row(vc, hh, slots[i], sc.v + i * kd + hh * hd);
        }
      attention(HeadsView<const float>::token_major(sc.q, t, c.heads, hd), read_only(kc), read_only(vc), mask,
                HeadsView<float>::token_major(sc.att, t, c.heads, hd), aopt, attn_ws_, exec);
      finish_layer(w, x, sc, exec);
    }
    norm(const_view(x), m_.final_norm, m_.final_norm_bias, x);
  }

  /// logits [t x vocab] = lm_head(hidden), hidden being forward()'s output.
  template <class Exec = SerialExecutor>
  void logits(MatrixView<const float> hidden, MatrixView<float> out, const Exec& exec = {}) {
    linear(hidden, m_.lm_head, out, lin_ws_, exec, compute_);
  }

  /// The cache slots the last forward() put its tokens in, in token order (a cell cache: the
  /// cells it took, which a host keeps to fold a span over cells without a scan).
  const std::vector<index_t>& last_slots() const noexcept { return slots_; }

 private:
  // forward()'s buffers for t tokens, taken from ws_ (reserved once per call).
  struct LayerScratch {
    index_t t;
    float *h, *tmp, *q, *att, *k, *v;
    float* qkv;      // GPT-NeoX: the fused projection's output
    float* mlp_out;  // parallel residual: the MLP beside attention
  };
  LayerScratch take_scratch(index_t t) {
    const auto& c = m_.config;
    const index_t qd = c.heads * c.head_dim, kd = c.kv_heads * c.head_dim, d = c.hidden;
    const bool neox = c.arch.gpt_neox;
    ws_.reserve(Workspace::bytes_for<float>(t * d) * 2 + Workspace::bytes_for<float>(t * qd) * 2 +
                Workspace::bytes_for<float>(t * kd) * 2 +
                (neox ? Workspace::bytes_for<float>(t * 3 * qd) + Workspace::bytes_for<float>(t * d) : 0));
    LayerScratch sc{t, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
    sc.h = ws_.take<float>(t * d);
    sc.tmp = ws_.take<float>(t * d);
    sc.q = ws_.take<float>(t * qd);
    sc.att = ws_.take<float>(t * qd);
    sc.k = ws_.take<float>(t * kd);
    sc.v = ws_.take<float>(t * kd);
    sc.qkv = neox ? ws_.take<float>(t * 3 * qd) : nullptr;
    sc.mlp_out = neox ? ws_.take<float>(t * d) : nullptr;
    return sc;
  }

  // The first half of a layer: normed input, q / k / v projections (per-head q / k norms), RoPE
  // at `positions`; q, k, v in sc token-major. The same for every mask and cache type, so it is
  // compiled once per executor, not once per forward() instance.
  template <class Exec>
  CTXCOMP_NOINLINE void project(const LlamaLayerWeights<T>& w, MatrixView<const float> x, const std::int64_t* positions,
                                const LayerScratch& sc, const Exec& exec) {
    const auto& c = m_.config;
    const index_t t = sc.t, hd = c.head_dim, qd = c.heads * hd, kd = c.kv_heads * hd, d = c.hidden;
    norm(x, w.input_norm, w.input_norm_bias, matrix_view(sc.h, t, d));
    if (w.qkv.data) {  // GPT-NeoX: one projection, then per token and head [q | k | v]
      linear(matrix_view<const float>(sc.h, t, d), w.qkv, matrix_view(sc.qkv, t, 3 * qd), lin_ws_, exec, compute_);
      for (index_t i = 0; i < t; ++i)
        for (index_t hh = 0; hh < c.heads; ++hh) {
          const float* src = sc.qkv + i * 3 * qd + hh * 3 * hd;
          std::copy(src, src + hd, sc.q + i * qd + hh * hd);
          std::copy(src + hd, src + 2 * hd, sc.k + i * kd + hh * hd);
          std::copy(src + 2 * hd, src + 3 * hd, sc.v + i * kd + hh * hd);
        }
    } else {
      linear(matrix_view<const float>(sc.h, t, d), w.q, matrix_view(sc.q, t, qd), lin_ws_, exec, compute_);
      linear(matrix_view<const float>(sc.h, t, d), w.k, matrix_view(sc.k, t, kd), lin_ws_, exec, compute_);
      linear(matrix_view<const float>(sc.h, t, d), w.v, matrix_view(sc.v, t, kd), lin_ws_, exec, compute_);
    }
    if (w.q_norm) rmsnorm_heads(HeadsView<float>::token_major(sc.q, t, c.heads, hd), w.q_norm, hd, c.rms_eps);
    if (w.k_norm) rmsnorm_heads(HeadsView<float>::token_major(sc.k, t, c.kv_heads, hd), w.k_norm, hd, c.rms_eps);
    rope_.apply(HeadsView<float>::token_major(sc.q, t, c.heads, hd), positions);
    rope_.apply(HeadsView<float>::token_major(sc.k, t, c.kv_heads, hd), positions);
  }

  // The second half: output projection of the attention in sc.att, residual, MLP (sequential,
  // or GPT-NeoX's parallel residual) into x. Compiled once per executor, like project().
  template <class Exec>
  CTXCOMP_NOINLINE void finish_layer(const LlamaLayerWeights<T>& w, MatrixView<float> x, const LayerScratch& sc,
                                     const Exec& exec) {
    const index_t t = sc.t, qd = m_.config.heads * m_.config.head_dim, d = m_.config.hidden;
    linear(matrix_view<const float>(sc.att, t, qd), w.o, matrix_view(sc.tmp, t, d), lin_ws_, exec, compute_);
    if (m_.config.arch.parallel_residual) {  // GPT-NeoX: x = (mlp(ln2(x)) + attn(ln1(x))) + x, transformers' order
      norm(const_view(x), w.post_attention_norm, w.post_attention_norm_bias, matrix_view(sc.h, t, d));
      mlp(w, matrix_view<const float>(sc.h, t, d), matrix_view(sc.mlp_out, t, d), exec);
      auto m = matrix_view(sc.mlp_out, t, d);
      m += matrix_view<const float>(sc.tmp, t, d);
      x += const_view(m);
      return;
    }
    x += matrix_view<const float>(sc.tmp, t, d);
    norm(const_view(x), w.post_attention_norm, w.post_attention_norm_bias, matrix_view(sc.h, t, d));
    mlp(w, matrix_view<const float>(sc.h, t, d), matrix_view(sc.tmp, t, d), exec);
    x += matrix_view<const float>(sc.tmp, t, d);
  }

  // RMSNorm, or LayerNorm when the model gives a bias (GPT-NeoX).
  void norm(MatrixView<const float> in, const T* weight, const T* bias, MatrixView<float> out) const {
    if (bias)
      layernorm(in, weight, bias, m_.config.hidden, m_.config.rms_eps, out);
    else
      rmsnorm(in, weight, m_.config.hidden, m_.config.rms_eps, out);
  }
  // The layer's MLP: SwiGLU, or GPT-NeoX's GELU MLP.
  template <class Exec>
  void mlp(const LlamaLayerWeights<T>& w, MatrixView<const float> in, MatrixView<float> out, const Exec& exec) {
    if (w.gelu_mlp.up.data)
      gelu_mlp(in, w.gelu_mlp, out, mlp_ws_, lin_ws_, exec, compute_);
    else
      swiglu(in, w.mlp, out, mlp_ws_, lin_ws_, exec, compute_);
  }

  const LlamaModel<T>& m_;
  Rope rope_;
  Compute compute_ = Compute::fp32;
  Workspace ws_, attn_ws_, mlp_ws_, lin_ws_;
  std::vector<index_t> slots_;  // slots of the tokens being appended
};

}  // namespace ctxcomp::host
