// Checkpoint loading shared by the model loaders: config.json parsing (both RoPE layouts of
// transformers: `rope_parameters` (v5) and top-level `rope_theta` / `rope_scaling` (older)),
// and a tensor store that loads named tensors with expected shapes into owned storage.
#pragma once
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

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
  bool contains(const std::string& name) const { return file_.contains(name); }
  const SafeTensors& file() const noexcept { return file_; }

 private:
  SafeTensors file_;
  std::map<std::string, std::vector<T>> tensors_;  // node-based: pointers stay valid
};

}  // namespace ctxcomp::io
