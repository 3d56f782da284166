// Checkpoint loading shared by the model loaders: config.json parsing (both RoPE layouts of
// transformers: `rope_parameters` (v5) and top-level `rope_theta` / `rope_scaling` (older)),
// and a tensor store that loads named tensors with expected shapes into owned storage.
#pragma once
#include <fstream>
#include <map>
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
  try {
    return nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    fail("'", path, "' is not valid JSON (", e.what(), ")");
  }
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

/// RoPE settings from a transformers config: v5 `rope_parameters` {rope_theta, rope_type,
/// factor} or the older top-level `rope_theta` and `rope_scaling` {type|rope_type, factor}.
/// Only "default" and "linear" scaling are supported; others are an error, not a guess.
inline RopeConfig rope_from_config(const nlohmann::json& j, const std::string& file) {
  RopeConfig r;
  const nlohmann::json* scaling = nullptr;
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    const auto& p = j["rope_parameters"];
    r.theta = config_number(p, "rope_theta", file, 10000.0);
    scaling = &p;
  } else {
    r.theta = config_number(j, "rope_theta", file, 10000.0);
    if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) scaling = &j["rope_scaling"];
  }
  if (scaling) {
    std::string type = "default";
    if (scaling->contains("rope_type") && (*scaling)["rope_type"].is_string()) type = (*scaling)["rope_type"];
    else if (scaling->contains("type") && (*scaling)["type"].is_string()) type = (*scaling)["type"];
    if (type == "linear") r.linear_scaling = config_number(*scaling, "factor", file, 1.0);
    else if (type != "default") fail(file, ": unsupported RoPE scaling type '", type, "' (supported: default, linear)");
  }
  return r;
}

/// The sizes every Llama-style transformer config.json gives (head_dim defaults to
/// hidden / heads, kv heads to heads, rms_norm_eps to 1e-6), with the RoPE settings.
struct TransformerDims {
  index_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0, layers = 0;
  float rms_eps = 1e-6f;
  RopeConfig rope{};
};
inline TransformerDims transformer_dims(const nlohmann::json& j, const std::string& file) {
  TransformerDims t;
  t.hidden = config_int(j, "hidden_size", file);
  t.heads = config_int(j, "num_attention_heads", file);
  t.kv_heads = config_int_or(j, "num_key_value_heads", file, t.heads);
  t.head_dim = j.contains("head_dim") && j["head_dim"].is_number_integer() ? j["head_dim"].get<index_t>()
                                                                          : (t.heads ? t.hidden / t.heads : 0);
  t.intermediate = config_int(j, "intermediate_size", file);
  t.layers = config_int(j, "num_hidden_layers", file);
  t.rms_eps = static_cast<float>(config_number(j, "rms_norm_eps", file, 1e-6));
  t.rope = rope_from_config(j, file);
  return t;
}

/// Owned tensors loaded from a safetensors file, converted to T, each checked for its shape.
template <class T>
class TensorStore {
 public:
  explicit TensorStore(const std::string& path) : file_(SafeTensors::open(path)) {}

  /// Loads `name` with `shape`; the error names the missing or mis-shaped tensor.
  const T* load(const std::string& name, const std::vector<std::int64_t>& shape) {
    const TensorInfo* t = file_.find(name);
    if (!t) fail(file_.path(), ": missing tensor '", name, "'");
    if (t->shape != shape)
      fail(file_.path(), ": tensor '", name, "' has shape ", SafeTensors::shape_str(t->shape), ", expected ",
           SafeTensors::shape_str(shape));
    auto& v = tensors_[name];
    v = file_.read<T>(name);
    return v.data();
  }
  /// A [out_features x in_features] weight (PyTorch Linear layout).
  WeightView<T> load_weight(const std::string& name, std::int64_t out_features, std::int64_t in_features) {
    return WeightView<T>{load(name, {out_features, in_features}), out_features, in_features};
  }
  bool contains(const std::string& name) const { return file_.contains(name); }
  const SafeTensors& file() const noexcept { return file_; }

 private:
  SafeTensors file_;
  std::map<std::string, std::vector<T>> tensors_;  // node-based: pointers stay valid
};

}  // namespace ctxcomp::io
