// Checkpoint loading shared by the model loaders: config.json parsing (both RoPE layouts of
// transformers: `rope_parameters` (v5) and top-level `rope_theta` / `rope_scaling` (older)),
// and a tensor store that loads named tensors with expected shapes into owned storage.
#pragma once
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <deque>
#include <limits>
#include <map>
#include <memory>
#include <utility>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../nn/linear.hpp"
#include "../nn/rope.hpp"
#include "safetensors.hpp"

namespace ctxcomp::io {

inline nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  if (!f) fail("cannot open '", path, "'");
  // Parsed without exceptions (so this also builds with -fno-exceptions); errors are ours.
  auto j = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) fail("'", path, "' is not valid JSON");
  return j;
}

/// A required integer / number from a config, with the file named in errors.
inline index_t config_int(const nlohmann::json& j, const char* key, const std::string& file) {
  if (!j.contains(key) || !j[key].is_number_integer()) fail(file, ": missing integer '", key, "'");
  return j[key].get<index_t>();
}
inline double config_number(const nlohmann::json& j, const char* key, const std::string& file, double fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_number()) fail(file, ": '", key, "' is not a number");
  return j[key].get<double>();
}

/// An optional integer: `fallback` when absent.
inline index_t config_int_or(const nlohmann::json& j, const char* key, const std::string& file, index_t fallback) {
  return j.contains(key) ? config_int(j, key, file) : fallback;
}

/// RoPE settings from a transformers config: v5 `rope_parameters` {rope_theta, rope_type, ...}
/// or the older top-level `rope_theta` and `rope_scaling` {type|rope_type, ...}. Supported
/// types: "default", "linear" (factor) and "llama3" (factor, low_freq_factor, high_freq_factor,
/// original_max_position_embeddings, all required). Any other type is an error naming it.
inline RopeConfig rope_from_config(const nlohmann::json& j, const std::string& file) {
  RopeConfig r;
  const nlohmann::json* scaling = nullptr;
  if (j.contains("rope_parameters") && !j["rope_parameters"].is_null()) {
    if (!j["rope_parameters"].is_object()) fail(file, ": 'rope_parameters' is not an object");
    const auto& p = j["rope_parameters"];
    r.theta = config_number(p, "rope_theta", file, 10000.0);
    scaling = &p;
  } else {
    r.theta = config_number(j, "rope_theta", file, 10000.0);
    if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
      if (!j["rope_scaling"].is_object()) fail(file, ": 'rope_scaling' is not an object");
      scaling = &j["rope_scaling"];
    }
  }
  // The frequencies are evaluated in fp32 (as transformers does): theta must be a finite fp32
  // value above 1, or they collapse to 0 / inf (found by fuzz_config: rope_theta 1e57).
  if (!(r.theta > 1) || !(r.theta <= double(std::numeric_limits<float>::max())))
    fail(file, ": rope_theta (", r.theta, ") must be above 1 and finite in fp32");
  if (!scaling) return r;
  std::string type = "default";
  for (const char* key : {"rope_type", "type"})
    if (scaling->contains(key) && !(*scaling)[key].is_null()) {
      if (!(*scaling)[key].is_string()) fail(file, ": RoPE '", key, "' is not a string");
      type = (*scaling)[key].get<std::string>();
      break;
    }
  auto required = [&](const char* key) {
    if (!scaling->contains(key) || !(*scaling)[key].is_number())
      fail(file, ": RoPE scaling type '", type, "' needs a number '", key, "'");
    return (*scaling)[key].get<double>();
  };
  if (type == "default") {
  } else if (type == "linear") {
    r.linear_scaling = required("factor");
    // Bounded so that every fp32 frequency stays positive and finite (fuzz_config: 3e100 gave 0).
    if (!(r.linear_scaling >= 1.0 / 65536 && r.linear_scaling <= 65536))
      fail(file, ": RoPE linear factor (", r.linear_scaling, ") must be in [2^-16, 2^16]");
  } else if (type == "llama3") {
    r.llama3.factor = required("factor");
    r.llama3.low_freq_factor = required("low_freq_factor");
    r.llama3.high_freq_factor = required("high_freq_factor");
    r.llama3.original_max_position_embeddings = required("original_max_position_embeddings");
    const auto& l = r.llama3;
    if (!(l.factor >= 1 && l.factor <= 65536))
      fail(file, ": RoPE llama3 factor (", l.factor, ") must be in [1, 2^16]");
    if (!(l.low_freq_factor > 0) || !(l.high_freq_factor > l.low_freq_factor) || !std::isfinite(l.high_freq_factor))
      fail(file, ": RoPE llama3 needs 0 < low_freq_factor < high_freq_factor (got ", l.low_freq_factor, ", ",
           l.high_freq_factor, ")");
    if (!(l.original_max_position_embeddings > 0) || !std::isfinite(l.original_max_position_embeddings))
      fail(file, ": RoPE llama3 original_max_position_embeddings (", l.original_max_position_embeddings,
           ") must be positive");
  } else {
    fail(file, ": unsupported RoPE scaling type '", type, "' (supported: default, linear, llama3)");
  }
  return r;
}

/// The sizes every Llama-style transformer config.json gives (head_dim defaults to
/// hidden / heads, kv heads to heads, rms_norm_eps to 1e-6), with the RoPE settings.
struct TransformerDims {
  /// hidden_size, num_attention_heads, num_key_value_heads, head_dim, intermediate_size, num_hidden_layers.
  ///@{
  index_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0, layers = 0;
  ///@}
  float rms_eps = 1e-6f;  ///< rms_norm_eps
  RopeConfig rope{};      ///< the RoPE rule
};
inline TransformerDims transformer_dims(const nlohmann::json& j, const std::string& file) {
  TransformerDims t;
  t.hidden = config_int(j, "hidden_size", file);
  t.heads = config_int(j, "num_attention_heads", file);
  t.kv_heads = config_int_or(j, "num_key_value_heads", file, t.heads);
  if (j.contains("head_dim") && !j["head_dim"].is_null()) {
    t.head_dim = config_int(j, "head_dim", file);  // explicit, may differ from hidden / heads (Qwen3, Gemma)
  } else {
    if (t.heads <= 0 || t.hidden % t.heads != 0)
      fail(file, ": hidden_size (", t.hidden, ") is not a multiple of num_attention_heads (", t.heads,
           ") and no head_dim is given");
    t.head_dim = t.hidden / t.heads;
  }
  t.intermediate = config_int(j, "intermediate_size", file);
  t.layers = config_int(j, "num_hidden_layers", file);
  t.rms_eps = static_cast<float>(config_number(j, "rms_norm_eps", file, 1e-6));
  for (const auto& [key, value] : {std::pair<const char*, index_t>{"hidden_size", t.hidden},
                                   {"num_attention_heads", t.heads}, {"num_key_value_heads", t.kv_heads},
                                   {"head_dim", t.head_dim}, {"intermediate_size", t.intermediate},
                                   {"num_hidden_layers", t.layers}})
    if (value <= 0) fail(file, ": ", key, " (", value, ") must be positive");
  if (t.heads % t.kv_heads != 0)
    fail(file, ": num_attention_heads (", t.heads, ") is not a multiple of num_key_value_heads (", t.kv_heads, ")");
  if (!(t.rms_eps >= 0.f) || !std::isfinite(t.rms_eps))
    fail(file, ": rms_norm_eps (", t.rms_eps, ") must be finite and not negative");
  t.rope = rope_from_config(j, file);
  return t;
}

/// An optional boolean: `fallback` when absent or null.
inline bool config_bool_or(const nlohmann::json& j, const char* key, const std::string& file, bool fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_boolean()) fail(file, ": '", key, "' is not a boolean");
  return j[key].get<bool>();
}

/// The architecture named by a config: `architectures` (exactly one entry) and `model_type`,
/// which must agree with each other and with one of `supported` ({architecture, model_type}).
/// Returns the index into `supported`.
inline std::size_t config_architecture(const nlohmann::json& j, const std::string& file,
                                       const std::vector<std::pair<std::string, std::string>>& supported) {
  std::string list;
  for (const auto& [a, m] : supported) list += (list.empty() ? "" : ", ") + a;
  std::string arch, type;
  if (j.contains("architectures") && !j["architectures"].is_null()) {
    const auto& a = j["architectures"];
    if (!a.is_array() || a.size() != 1 || !a[0].is_string())
      fail(file, ": 'architectures' must list exactly one architecture (supported: ", list, ")");
    arch = a[0].get<std::string>();
  }
  if (j.contains("model_type") && !j["model_type"].is_null()) {
    if (!j["model_type"].is_string()) fail(file, ": 'model_type' is not a string");
    type = j["model_type"].get<std::string>();
  }
  if (arch.empty() && type.empty()) fail(file, ": neither 'architectures' nor 'model_type' names the model (supported: ", list, ")");
  for (std::size_t i = 0; i < supported.size(); ++i) {
    const bool arch_ok = arch.empty() || arch == supported[i].first;
    const bool type_ok = type.empty() || type == supported[i].second;
    if (arch_ok && type_ok) return i;
  }
  fail(file, ": unsupported architecture '", arch.empty() ? "?" : arch, "' (model_type '", type.empty() ? "?" : type,
       "'; supported: ", list, ")");
}

/// What a decoder-only causal LM config asks of the block, for the families a Llama-style host
/// runs: LlamaForCausalLM (attention_bias, mlp_bias), MistralForCausalLM (no sliding window),
/// Qwen2ForCausalLM (q/k/v biases), Qwen3ForCausalLM (per-head q/k RMSNorm before RoPE,
/// attention_bias). Everything else about the block is Llama's (RMSNorm, SwiGLU with silu,
/// rotate_half RoPE). GPTNeoXForCausalLM is its own block (DecoderArch::gpt_neox), and its config
/// may hold only the keys gpt_neox_config_keys() lists. Settings that would change the
/// computation in a way the host does not implement (sliding windows, another activation,
/// non-full attention layers) are errors.
struct DecoderArch {
  std::string name;              ///< e.g. "Qwen3ForCausalLM"
  bool qkv_bias = false;         ///< q/k/v projections carry a bias
  bool o_bias = false;           ///< o_proj carries a bias
  bool mlp_bias = false;         ///< gate/up/down carry a bias
  bool qk_norm = false;          ///< RMSNorm over each head of q and k (weight [head_dim]) before RoPE
  bool tied_embeddings = false;  ///< the output layer is the embedding matrix
  /// GPTNeoXForCausalLM (gpt_neox_arch): LayerNorm with bias instead of RMSNorm, one fused
  /// query_key_value projection (per head [q | k | v]), the exact-GELU MLP dense_h_to_4h /
  /// dense_4h_to_h with biases, partial rotary (RopeConfig::rotary_dim), and the tensor names
  /// gpt_neox.* / embed_out.
  bool gpt_neox = false;
  bool parallel_residual = false;  ///< GPT-NeoX use_parallel_residual: x + attn(ln1(x)) + mlp(ln2(x))
};

/// The keys a GPT-NeoX config.json may hold (GPTNeoXConfig's own, transformers 4.x and 5.x, and
/// the generic PretrainedConfig ones that do not change the computation). Any other key is an
/// error naming it: a setting this host does not implement must not be dropped silently.
inline const std::set<std::string>& gpt_neox_config_keys() {
  static const std::set<std::string> keys{
      // GPTNeoXConfig
      "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
      "rotary_pct", "partial_rotary_factor", "rotary_emb_base", "rope_theta", "rope_scaling", "rope_parameters",
      "attention_dropout", "hidden_dropout", "classifier_dropout", "max_position_embeddings", "initializer_range",
      "layer_norm_eps", "use_cache", "tie_word_embeddings", "use_parallel_residual", "attention_bias",
      // PretrainedConfig (identity, dtype, tokens, outputs, generation defaults of 4.x)
      "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
      "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "is_decoder",
      "is_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder",
      "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
      "pruned_heads", "chunk_size_feed_forward", "finetuning_task", "id2label", "label2id", "tokenizer_class",
      "prefix", "task_specific_params", "problem_type", "max_length", "min_length", "do_sample", "early_stopping",
      "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
      "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
      "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
      "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
      "begin_suppress_tokens", "gradient_checkpointing", "_attn_implementation", "attn_implementation"};
  return keys;
}

/// A GPT-NeoX config's rotary settings, as transformers reads them: transformers 5's
/// `rope_parameters` {rope_theta, rope_type, partial_rotary_factor}, or the older top-level
/// `rotary_emb_base` (or `rope_theta`), `rotary_pct` (or `partial_rotary_factor`) and
/// `rope_scaling`; defaults base 10000 and factor 0.25 (GPTNeoXConfig's). The rotated dims are
/// int(head_dim * factor), in the rotate_half (NEOX) form over the first of them; an odd count
/// is an error.
inline RopeConfig gpt_neox_rope(const nlohmann::json& j, index_t head_dim, const std::string& file) {
  auto both = [&](const nlohmann::json& o, const char* a, const char* b, double fallback) {
    const double va = config_number(o, a, file, std::nan("")), vb = config_number(o, b, file, std::nan(""));
    if (!std::isnan(va) && !std::isnan(vb) && va != vb)
      fail(file, ": '", a, "' (", va, ") and '", b, "' (", vb, ") disagree");
    return !std::isnan(va) ? va : !std::isnan(vb) ? vb : fallback;
  };
  nlohmann::json view = j;  // rope_from_config reads rope_theta / rope_scaling / rope_parameters
  double factor;
  if (j.contains("rope_parameters") && !j["rope_parameters"].is_null()) {
    if (!j["rope_parameters"].is_object()) fail(file, ": 'rope_parameters' is not an object");
    factor = config_number(j["rope_parameters"], "partial_rotary_factor", file, 1.0);
    for (const char* k : {"rotary_pct", "partial_rotary_factor", "rotary_emb_base"})
      if (j.contains(k) && !j[k].is_null())
        fail(file, ": '", k, "' at the top level and 'rope_parameters' both given (one layout or the other)");
  } else {
    factor = both(j, "rotary_pct", "partial_rotary_factor", 0.25);
    view["rope_theta"] = both(j, "rotary_emb_base", "rope_theta", 10000.0);
  }
  RopeConfig r = rope_from_config(view, file);
  if (!(factor > 0 && factor <= 1)) fail(file, ": the rotary fraction (", factor, ") must be in (0, 1]");
  const auto dims = static_cast<index_t>(static_cast<double>(head_dim) * factor);  // int() in transformers
  if (dims <= 0 || dims % 2 != 0)
    fail(file, ": rotary fraction ", factor, " of head_dim ", head_dim, " gives ", dims,
         " rotary dims, which must be even and positive");
  r.rotary_dim = dims;
  r.style = RopeStyle::RotateHalf;
  return r;
}

/// The sizes of a GPT-NeoX config (head_dim = hidden / heads, no grouped-query heads,
/// layer_norm_eps default 1e-5 in TransformerDims::rms_eps) and its rotary settings.
inline TransformerDims gpt_neox_dims(const nlohmann::json& j, const std::string& file) {
  TransformerDims t;
  t.hidden = config_int(j, "hidden_size", file);
  t.heads = config_int(j, "num_attention_heads", file);
  t.intermediate = config_int(j, "intermediate_size", file);
  t.layers = config_int(j, "num_hidden_layers", file);
  for (const auto& [key, value] : {std::pair<const char*, index_t>{"hidden_size", t.hidden},
                                   {"num_attention_heads", t.heads}, {"intermediate_size", t.intermediate},
                                   {"num_hidden_layers", t.layers}})
    if (value <= 0) fail(file, ": ", key, " (", value, ") must be positive");
  if (t.hidden % t.heads != 0)
    fail(file, ": hidden_size (", t.hidden, ") is not a multiple of num_attention_heads (", t.heads, ")");
  t.kv_heads = t.heads;
  t.head_dim = t.hidden / t.heads;
  t.rms_eps = static_cast<float>(config_number(j, "layer_norm_eps", file, 1e-5));
  if (!(t.rms_eps >= 0.f) || !std::isfinite(t.rms_eps))
    fail(file, ": layer_norm_eps (", t.rms_eps, ") must be finite and not negative");
  t.rope = gpt_neox_rope(j, t.head_dim, file);
  return t;
}

inline DecoderArch decoder_arch(const nlohmann::json& j, const std::string& file) {
  static const std::vector<std::pair<std::string, std::string>> kSupported{{"LlamaForCausalLM", "llama"},
                                                                           {"MistralForCausalLM", "mistral"},
                                                                           {"Qwen2ForCausalLM", "qwen2"},
                                                                           {"Qwen3ForCausalLM", "qwen3"},
                                                                           {"GPTNeoXForCausalLM", "gpt_neox"}};
  const std::size_t which = config_architecture(j, file, kSupported);
  DecoderArch a;
  a.name = kSupported[which].first;
  if (which == 4) {  // GPT-NeoX: strict about every key (gpt_neox_config_keys)
    for (auto it = j.begin(); it != j.end(); ++it)
      if (!gpt_neox_config_keys().count(it.key()))
        fail(file, ": unknown GPTNeoXForCausalLM setting '", it.key(), "' (", it.value().dump(),
             "); this loader implements GPTNeoXConfig's settings only");
    if (j.contains("hidden_act") && !j["hidden_act"].is_null() &&
        (!j["hidden_act"].is_string() || j["hidden_act"].get<std::string>() != "gelu"))
      fail(file, ": hidden_act ", j["hidden_act"].dump(),
           " is not supported for GPTNeoXForCausalLM (only \"gelu\", the exact erf form)");
    a.gpt_neox = true;
    a.qkv_bias = a.o_bias = config_bool_or(j, "attention_bias", file, true);
    a.mlp_bias = true;
    a.parallel_residual = config_bool_or(j, "use_parallel_residual", file, true);
    a.tied_embeddings = config_bool_or(j, "tie_word_embeddings", file, false);
    return a;
  }
  const bool attention_bias = config_bool_or(j, "attention_bias", file, false);
  switch (which) {
    case 0:  // Llama: attention_bias covers q/k/v/o, mlp_bias gate/up/down
      a.qkv_bias = a.o_bias = attention_bias;
      a.mlp_bias = config_bool_or(j, "mlp_bias", file, false);
      break;
    case 1:  // Mistral: no biases; a sliding window changes the mask, which this host does not do
      if (j.contains("sliding_window") && !j["sliding_window"].is_null())
        fail(file, ": MistralForCausalLM with a sliding window (sliding_window ", j["sliding_window"].dump(),
             ") is not supported");
      break;
    case 2:  // Qwen2: q/k/v biases, none on o_proj
      a.qkv_bias = true;
      break;
    default:  // Qwen3: q/k norm, attention_bias on q/k/v/o
      a.qkv_bias = a.o_bias = attention_bias;
      a.qk_norm = true;
      break;
  }
  if (which >= 2 && config_bool_or(j, "use_sliding_window", file, false))
    fail(file, ": ", a.name, " with use_sliding_window true is not supported");
  if (j.contains("layer_types") && !j["layer_types"].is_null()) {
    if (!j["layer_types"].is_array()) fail(file, ": 'layer_types' is not an array");
    for (const auto& t : j["layer_types"])
      if (!t.is_string() || t.get<std::string>() != "full_attention")
        fail(file, ": layer type ", t.dump(), " is not supported (only full_attention)");
  }
  if (j.contains("hidden_act") && !j["hidden_act"].is_null() &&
      (!j["hidden_act"].is_string() || j["hidden_act"].get<std::string>() != "silu"))
    fail(file, ": hidden_act ", j["hidden_act"].dump(), " is not supported (the SwiGLU MLP uses silu)");
  a.tied_embeddings = config_bool_or(j, "tie_word_embeddings", file, false);
  return a;
}

/// Tensors a checkpoint may hold that no loader consumes because they are recomputed
/// (the rotary frequency buffers older transformers saved, and GPT-NeoX's causal-mask buffers
/// `attention.bias` / `attention.masked_bias` that transformers 4.x checkpoints carry).
inline bool harmless_extra_tensor(const std::string& name) {
  auto ends_with = [&](const std::string& suffix) {
    return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (ends_with("rotary_emb.inv_freq")) return true;
  return name.compare(0, 16, "gpt_neox.layers.") == 0 && (ends_with(".attention.bias") || ends_with(".attention.masked_bias"));
}

/// The safetensors files of a checkpoint directory as `save_pretrained` writes them: one
/// `model.safetensors`, or shards `model-0000k-of-0000N.safetensors` listed by
/// `model.safetensors.index.json` (`weight_map`: tensor name -> shard file). Every shard is
/// mapped, and the index is checked against the shards: a shard that is missing or named outside
/// the directory, a tensor the index lists in a shard that does not hold it, a tensor stored in a
/// shard the index does not list it in (or in none, or in two shards) are errors naming the file
/// and the tensor.
class CheckpointFiles {
 public:
  static constexpr const char* kSingle = "model.safetensors";           ///< an unsharded checkpoint
  static constexpr const char* kIndex = "model.safetensors.index.json";  ///< the shard index

  /// Opens (maps) the checkpoint files of `dir`, checking the index against the shards.
  static CheckpointFiles open(const std::string& dir) {
    namespace fs = std::filesystem;
    CheckpointFiles c;
    c.dir_ = dir;
    const fs::path d(dir);
    if (fs::exists(d / kSingle)) {
      c.files_.push_back(SafeTensors::open((d / kSingle).string()));
    } else if (fs::exists(d / kIndex)) {
      c.open_sharded((d / kIndex).string());
    } else {
      fail(dir, ": no '", kSingle, "' and no '", kIndex, "' (a checkpoint directory as save_pretrained writes it)");
    }
    for (std::size_t f = 0; f < c.files_.size(); ++f)
      for (const auto& t : c.files_[f].tensors()) c.where_.emplace(t.name, f);  // unique: the index was checked
    return c;
  }

  /// The checkpoint directory.
  const std::string& dir() const noexcept { return dir_; }
  /// The opened files (one, or the shards in index order).
  const std::vector<SafeTensors>& files() const noexcept { return files_; }
  /// The file that holds tensor `name`, or nullptr.
  const SafeTensors* file_of(const std::string& name) const {
    auto it = where_.find(name);
    return it == where_.end() ? nullptr : &files_[it->second];
  }
  /// Every tensor name, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> r;
    for (const auto& [n, e] : where_) r.push_back(n);
    return r;
  }

 private:
  void open_sharded(const std::string& index_path) {
    const auto j = read_json(index_path);
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      fail(index_path, ": no 'weight_map' object (tensor name -> shard file)");
    std::map<std::string, std::size_t> shard_of_file;
    std::vector<std::string> shard_names;
    std::map<std::string, std::string> listed;  // tensor -> shard file
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it->is_string()) fail(index_path, ": weight_map entry of '", it.key(), "' is not a file name");
      const std::string f = it->get<std::string>();
      if (f.empty() || f == "." || f == ".." || f.find('/') != std::string::npos || f.find('\\') != std::string::npos)
        fail(index_path, ": tensor '", it.key(), "' is mapped to '", f,
             "', which is not a file in the checkpoint directory");
      listed[it.key()] = f;
      if (shard_of_file.emplace(f, shard_names.size()).second) shard_names.push_back(f);
    }
    if (shard_names.empty()) fail(index_path, ": weight_map is empty");
    for (const auto& f : shard_names) {
      const std::string path = (std::filesystem::path(dir_) / f).string();
      if (!std::filesystem::exists(path)) {
        std::string first;
        for (const auto& [n, s] : listed)
          if (s == f) { first = n; break; }
        fail(index_path, ": missing shard '", f, "' (listed for tensor '", first, "')");
      }
      files_.push_back(SafeTensors::open(path));
    }
    for (std::size_t s = 0; s < files_.size(); ++s)
      for (const auto& t : files_[s].tensors()) {
        auto it = listed.find(t.name);
        if (it == listed.end())
          fail(index_path, ": tensor '", t.name, "' is stored in shard '", shard_names[s],
               "' but the index lists it in no shard");
        if (it->second != shard_names[s])
          fail(index_path, ": tensor '", t.name, "' is listed in shard '", it->second, "' but stored in '",
               shard_names[s], "'");
      }
    for (const auto& [n, f] : listed)
      if (!files_[shard_of_file[f]].contains(n))
        fail(index_path, ": the index lists tensor '", n, "' in shard '", f, "', which does not hold it");
  }

  std::string dir_;
  std::vector<SafeTensors> files_;
  std::map<std::string, std::size_t> where_;  // tensor -> index into files_
};

/// What an adapter changes in a checkpoint's tensors as a loader reads them (io/lora.hpp: LoRA).
class TensorOverlay {
 public:
  virtual ~TensorOverlay() = default;
  /// The tensor the adapter stores whole in place of the checkpoint's `name` (a resized
  /// embedding, a module saved with the adapter), or {nullptr, nullptr}.
  virtual std::pair<const SafeTensors*, const TensorInfo*> replacement(const std::string& name) const = 0;
  /// Whether the adapter updates weight `name`.
  virtual bool updates(const std::string& name) const = 0;
  /// Adds the adapter's update to weight `name` ([rows x cols] fp32, in place), checking its shape.
  virtual void merge(const std::string& name, float* w, std::int64_t rows, std::int64_t cols) = 0;
  /// Whether the checkpoint's own tensor `name` belongs to the adapter (a LoRA-injected layout's
  /// `lora_A.default` / `lora_B.default`) and was used.
  virtual bool used_checkpoint_tensor(const std::string& name) const = 0;
};

/// Owned tensors loaded from a checkpoint (one file, or a sharded directory), converted to T,
/// each checked for its shape. The store records which tensors were loaded, so a loader can
/// refuse a checkpoint that holds weights it did not consume (`check_all_consumed`). With an
/// overlay (`set_overlay`, e.g. a LoRA adapter), replaced tensors come from the adapter and
/// updated weights are merged in fp32 before the conversion to T. A checkpoint in PEFT's
/// LoRA-injected layout stores a module's weight and bias as `<module>.base_layer.weight` /
/// `.bias`: `load` of `<module>.weight` / `.bias` finds them there.
template <class T>
class TensorStore {
 public:
  /// One safetensors file.
  explicit TensorStore(const std::string& path) : origin_(path) {
    files_.push_back(SafeTensors::open(path));
    index_files();
  }
  /// Tensors already parsed (e.g. a GGUF file's, renamed: io/gguf.hpp), named `origin` in messages.
  TensorStore(SafeTensors tensors, std::string origin) : origin_(std::move(origin)) {
    files_.push_back(std::move(tensors));
    index_files();
  }
  /// A checkpoint directory: `model.safetensors` or the shards of `model.safetensors.index.json`.
  static TensorStore open_dir(const std::string& dir) { return TensorStore(CheckpointFiles::open(dir)); }
  /// Moves the store (deque and map nodes do not move: pointers stay valid).
  TensorStore(TensorStore&&) noexcept = default;
  TensorStore(const TensorStore&) = delete;
  TensorStore& operator=(const TensorStore&) = delete;

  /// Loads `name` with `shape`; the error names the missing or mis-shaped tensor.
  const T* load(const std::string& name, const std::vector<std::int64_t>& shape) {
    auto [file, t] = locate(name);
    if (!t) fail(origin_, ": missing tensor '", name, "'");
    if (t->shape != shape)
      fail(file->path(), ": tensor '", t->name, "' has shape ", SafeTensors::shape_str(t->shape), ", expected ",
           SafeTensors::shape_str(shape));
    auto& v = tensors_[name];
    if (overlay_ && overlay_->updates(name)) {  // merged in fp32, then converted once
      CTXCOMP_CHECK(shape.size() == 2, origin_, ": adapter update of '", name, "', which is not a matrix");
      std::vector<float> w(static_cast<std::size_t>(t->numel()));
      file->convert_into(*t, w.data());
      overlay_->merge(name, w.data(), shape[0], shape[1]);
      v.resize(w.size());
      for (std::size_t i = 0; i < w.size(); ++i) v[i] = from_float<T>(w[i]);
    } else {
      v.resize(static_cast<std::size_t>(t->numel()));
      file->convert_into(*t, v.data());
    }
    return v.data();
  }
  /// The fp32 values `load` would convert to T (the adapter's update merged), without keeping
  /// them: for a second set of weights derived from the same tensor (e.g. a LoRA of one pass).
  std::vector<float> load_f32(const std::string& name, const std::vector<std::int64_t>& shape) const {
    auto [file, t] = locate(name);
    if (!t) fail(origin_, ": missing tensor '", name, "'");
    if (t->shape != shape)
      fail(file->path(), ": tensor '", t->name, "' has shape ", SafeTensors::shape_str(t->shape), ", expected ",
           SafeTensors::shape_str(shape));
    std::vector<float> w(static_cast<std::size_t>(t->numel()));
    file->convert_into(*t, w.data());
    if (overlay_ && overlay_->updates(name)) overlay_->merge(name, w.data(), shape[0], shape[1]);
    return w;
  }
  /// Records `name` as used without keeping its values (a writer that streams it elsewhere,
  /// e.g. the GGUF converter after load_f32).
  void mark_consumed(const std::string& name) { tensors_[name]; }
  /// `load` when the checkpoint holds `name`, nullptr otherwise.
  const T* load_if_present(const std::string& name, const std::vector<std::int64_t>& shape) {
    return contains(name) ? load(name, shape) : nullptr;
  }
  /// The shape of `name` as `load` would find it (the adapter's replacement first), or empty.
  std::vector<std::int64_t> shape_of(const std::string& name) const {
    const TensorInfo* t = locate(name).second;
    return t ? t->shape : std::vector<std::int64_t>{};
  }
  /// Applies `overlay` to the tensors loaded from now on (nullptr: none).
  void set_overlay(std::shared_ptr<TensorOverlay> overlay) { overlay_ = std::move(overlay); }
  /// The files of the checkpoint (for an adapter that reads an injected layout's own tensors).
  const std::deque<SafeTensors>& files() const noexcept { return files_; }
  /// A [out_features x in_features] weight (PyTorch Linear layout), with its [out_features] bias
  /// when `bias` names one (empty: no bias).
  WeightView<T> load_weight(const std::string& name, std::int64_t out_features, std::int64_t in_features,
                            const std::string& bias = {}) {
    WeightView<T> w{load(name, {out_features, in_features}), out_features, in_features};
    if (!bias.empty()) w.bias = load(bias, {out_features});
    return w;
  }
  /// Whether the checkpoint (or the adapter in its place) holds `name`.
  bool contains(const std::string& name) const { return locate(name).second != nullptr; }
  /// Whether the checkpoint's tensor `name` was loaded (under its own name, as the base layer of
  /// an injected LoRA module, or as the adapter's part of one).
  bool consumed(const std::string& name) const {
    if (tensors_.count(name) != 0) return true;
    for (const char* part : {"weight", "bias"}) {
      const std::string base = std::string(".base_layer.") + part;
      if (name.size() > base.size() && name.compare(name.size() - base.size(), base.size(), base) == 0 &&
          tensors_.count(name.substr(0, name.size() - base.size()) + "." + part) != 0)
        return true;
    }
    return overlay_ && overlay_->used_checkpoint_tensor(name);
  }
  /// Where the tensors come from (a file or a directory), for messages.
  const std::string& origin() const noexcept { return origin_; }

  /// Fails, naming the tensors, when the checkpoint holds a tensor that was not loaded and that
  /// `harmless` does not accept (a loader that silently drops weights computes something else).
  void check_all_consumed(const std::string& loader, const std::function<bool(const std::string&)>& harmless) const {
    std::vector<std::string> extra;
    for (const auto& [name, e] : where_)
      if (!consumed(name) && !harmless(name)) extra.push_back(name);
    if (extra.empty()) return;
    std::string list;
    for (std::size_t i = 0; i < extra.size() && i < 5; ++i) list += (i ? "', '" : "'") + extra[i];
    list += "'";
    if (extra.size() > 5) list += " and " + std::to_string(extra.size() - 5) + " more";
    fail(origin_, ": checkpoint tensor ", list, " ", extra.size() == 1 ? "is" : "are", " not used by the ", loader,
         " loader (refusing to drop weights; unsupported architecture variant?)");
  }

 private:
  explicit TensorStore(const CheckpointFiles& files)
      : origin_(files.dir()), files_(files.files().begin(), files.files().end()) {
    index_files();
  }
  void index_files() {
    for (const auto& f : files_)
      for (const auto& t : f.tensors()) where_[t.name] = {&f, &t};
  }
  /// Where `name` is read from: the adapter's replacement, the checkpoint's own tensor, or
  /// (`<module>.weight` / `.bias`) the base layer of a LoRA-injected module.
  std::pair<const SafeTensors*, const TensorInfo*> locate(const std::string& name) const {
    if (overlay_) {
      auto r = overlay_->replacement(name);
      if (r.second) return r;
    }
    auto it = where_.find(name);
    if (it != where_.end()) return it->second;
    for (const char* part : {"weight", "bias"}) {
      const std::string w = std::string(".") + part;
      if (name.size() > w.size() && name.compare(name.size() - w.size(), w.size(), w) == 0) {
        it = where_.find(name.substr(0, name.size() - w.size()) + ".base_layer." + part);
        if (it != where_.end()) return it->second;
      }
    }
    return {nullptr, nullptr};
  }

  std::string origin_;
  std::shared_ptr<TensorOverlay> overlay_;
  std::deque<SafeTensors> files_;  // stable addresses for where_
  std::map<std::string, std::pair<const SafeTensors*, const TensorInfo*>> where_;
  std::map<std::string, std::vector<T>> tensors_;  // node-based: pointers stay valid
};

}  // namespace ctxcomp::io
