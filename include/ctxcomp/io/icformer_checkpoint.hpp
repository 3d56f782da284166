// Loader of an official IC-Former checkpoint directory (config.json + model.safetensors, or
// shards with model.safetensors.index.json, written by save_pretrained; tensor names of the
// official ICFormerModel state dict; strict: an unused tensor is an error) into an
// IcformerConfig and owned weights of type T (float or bf16). Digests come separately
// (the official param.pt, converted with tools/convert_param_pt.py).
#pragma once
#include <memory>
#include <string>

#include "../digest/icformer.hpp"
#include "checkpoint.hpp"

namespace ctxcomp::io {

/// An official IC-Former checkpoint: its config and owned weights of type T.
template <class T = float>
class IcformerCheckpoint {
 public:
  /// The encoder configuration a config.json holds (`file` names it in errors): architecture
  /// ICFormerModel / icformer, no attention bias, silu, one width for context and digests.
  static digest::IcformerConfig config_from_json(const nlohmann::json& j, const std::string& cfg_path) {
    config_architecture(j, cfg_path, {{"ICFormerModel", "icformer"}});
    if (config_bool_or(j, "attention_bias", cfg_path, false))
      fail(cfg_path, ": attention_bias true is not supported by the IC-Former encoder (the official model has none)");
    if (j.contains("hidden_act") && !j["hidden_act"].is_null() &&
        (!j["hidden_act"].is_string() || j["hidden_act"].get<std::string>() != "silu"))
      fail(cfg_path, ": hidden_act ", j["hidden_act"].dump(), " is not supported (the SwiGLU MLP uses silu)");
    digest::IcformerConfig cfg;
    const TransformerDims t = transformer_dims(j, cfg_path);
    cfg.hidden = t.hidden, cfg.heads = t.heads, cfg.kv_heads = t.kv_heads, cfg.head_dim = t.head_dim;
    cfg.intermediate = t.intermediate, cfg.layers = t.layers, cfg.rms_eps = t.rms_eps, cfg.rope = t.rope;
    const index_t ctx_hidden = config_int_or(j, "context_hidden_size", cfg_path, cfg.hidden);
    if (ctx_hidden != cfg.hidden)
      fail(cfg_path, ": context_hidden_size (", ctx_hidden, ") differs from hidden_size (", cfg.hidden,
           "): keys come from [context ; digests], which needs one width");
    cfg.cross_attention_frequency = config_int_or(j, "cross_attention_frequency", cfg_path, 1);
    cfg.num_digests = config_int_or(j, "num_query_tokens", cfg_path, 0);
    cfg.validate();
    return cfg;
  }

  /// Loads `dir` (config.json and the safetensors), strictly: unused tensors are errors.
  static IcformerCheckpoint load(const std::string& dir) {
    IcformerCheckpoint c;
    const std::string cfg_path = dir + "/config.json";
    c.config_ = config_from_json(read_json(cfg_path), cfg_path);
    const auto& cfg = c.config_;

    c.store_ = std::make_unique<TensorStore<T>>(TensorStore<T>::open_dir(dir));
    auto& st = *c.store_;
    const std::int64_t d = cfg.hidden, qd = cfg.heads * cfg.head_dim, kd = cfg.kv_heads * cfg.head_dim,
                       inter = cfg.intermediate;
    auto wv = [&](const std::string& name, std::int64_t o, std::int64_t i) { return st.load_weight(name, o, i); };
    for (index_t i = 0; i < cfg.layers; ++i) {
      const std::string p = "encoder.layers." + std::to_string(i) + ".";
      digest::IcformerLayerWeights<T> l;
      const std::string attn = cfg.is_cross(i) ? "cross_attn." : "self_attn.";
      if (cfg.is_cross(i)) {
        l.query_norm = st.load(p + "cross_input_layernorm.weight", {d});
        l.context_norm = st.load(p + "context_layernorm.weight", {d});
      } else {
        l.query_norm = st.load(p + "input_layernorm.weight", {d});
      }
      l.post_attention_norm = st.load(p + "post_attention_layernorm.weight", {d});
      l.q = wv(p + attn + "q_proj.weight", qd, d);
      l.k = wv(p + attn + "k_proj.weight", kd, d);
      l.v = wv(p + attn + "v_proj.weight", kd, d);
      l.o = wv(p + attn + "o_proj.weight", d, qd);
      l.mlp.gate = wv(p + "mlp.gate_proj.weight", inter, d);
      l.mlp.up = wv(p + "mlp.up_proj.weight", inter, d);
      l.mlp.down = wv(p + "mlp.down_proj.weight", d, inter);
      c.weights_.layers.push_back(l);
    }
    c.weights_.final_norm = st.load("encoder.norm.weight", {d});
    st.check_all_consumed("ICFormerModel", harmless_extra_tensor);
    return c;
  }

  /// The encoder configuration.
  const digest::IcformerConfig& config() const noexcept { return config_; }
  /// Views into this checkpoint's storage: keep the checkpoint alive while they are used.
  const digest::IcformerWeights<T>& weights() const noexcept { return weights_; }
  /// An encoder over this checkpoint's weights (keep the checkpoint alive while it is used).
  digest::IcformerEncoder<T> encoder() const { return digest::IcformerEncoder<T>(config_, weights_); }

 private:
  digest::IcformerConfig config_;
  digest::IcformerWeights<T> weights_;
  std::unique_ptr<TensorStore<T>> store_;
};

}  // namespace ctxcomp::io
