// PEFT LoRA adapters, merged into a checkpoint's weights as a loader reads them.
//
// Two layouts, both as PEFT writes them:
// - an adapter directory (`PeftModel.save_pretrained`): `adapter_config.json` and
//   `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` [r x in] and
//   `.lora_B.weight` [out x r]; whole tensors saved beside them (`base_model.model.<name>`: the
//   embeddings and output layer of a resized vocabulary, `modules_to_save`) replace the base's;
// - a checkpoint in the LoRA-injected layout (`model.base_model.save_pretrained`): the module's
//   weight at `<module>.base_layer.weight`, the pair at `<module>.lora_A.default.weight` /
//   `.lora_B.default.weight`, with `adapter_config.json` in the same directory for the scale.
//
// Merge: W' = W + scale * B A with scale = lora_alpha / r (use_rslora: lora_alpha / sqrt(r)),
// formed in double and rounded once to fp32, before any conversion of W' to bf16 / fp16.
// Strict: other PEFT types, DoRA, LoRA biases, per-module rank / alpha patterns, LoRA on
// embeddings, pickled `adapter_model.bin`, a target that matches no module of the model, a pair
// whose rank or shape does not fit, and a tensor no loader used are named errors. A
// `base_model_name_or_path` other than the checkpoint's `_name_or_path` is only a warning
// (`warnings()`): the same weights are often saved under another name.
#pragma once
#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint.hpp"

namespace ctxcomp::io {

/// What the library reads from a LoRA adapter_config.json.
struct LoraConfig {
  index_t r = 0;                          ///< rank
  double alpha = 0;                       ///< lora_alpha
  bool rslora = false;                    ///< use_rslora: scale alpha / sqrt(r)
  std::vector<std::string> target_list;   ///< target_modules as a list (matched against name ends)
  std::string target_regex;               ///< or as one regular expression (matched in full)
  std::string base_model;                 ///< base_model_name_or_path (may be empty)
  bool fan_in_fan_out = false;            ///< as written (meaningless for Linear layers)

  /// alpha / r, or alpha / sqrt(r) with use_rslora.
  double scale() const { return rslora ? alpha / std::sqrt(double(r)) : alpha / double(r); }

  /// Whether PEFT injects a LoRA into the module with this dotted name: a list entry equal to
  /// the name or to its last dotted parts, or the regular expression matching the whole name.
  bool targets(const std::string& module) const {
    if (!target_regex.empty()) return std::regex_match(module, std::regex(target_regex));
    for (const auto& t : target_list)
      if (module == t || (module.size() > t.size() && module.compare(module.size() - t.size(), t.size(), t) == 0 &&
                          module[module.size() - t.size() - 1] == '.'))
        return true;
    return false;
  }

  /// Parses and checks adapter_config.json (errors name the file and the key).
  static LoraConfig parse(const std::string& path) {
    const auto j = read_json(path);
    if (!j.is_object()) fail(path, ": not a JSON object");
    auto str = [&](const char* k) -> std::string {
      return j.contains(k) && j[k].is_string() ? j[k].get<std::string>() : std::string();
    };
    const std::string type = str("peft_type");
    if (type != "LORA")
      fail(path, ": peft_type '", type.empty() ? "(missing)" : type, "' is not supported (only LORA adapters load)");
    if (j.contains("use_dora") && j["use_dora"].is_boolean() && j["use_dora"].get<bool>())
      fail(path, ": use_dora is true: DoRA adapters are not supported (only plain LoRA)");
    if (j.contains("bias") && !(j["bias"].is_string() && j["bias"].get<std::string>() == "none"))
      fail(path, ": bias '", j["bias"].dump(), "' is not supported (LoRA adapters trained with bias \"none\" load)");
    for (const char* k : {"rank_pattern", "alpha_pattern"})
      if (j.contains(k) && !j[k].is_null() && !(j[k].is_object() && j[k].empty()))
        fail(path, ": ", k, " (per-module ranks or alphas) is not supported");
    for (const char* k : {"layers_to_transform", "layers_pattern"})
      if (j.contains(k) && !j[k].is_null() && !(j[k].is_array() && j[k].empty()))
        fail(path, ": ", k, " is not supported");
    LoraConfig c;
    if (!j.contains("r") || !j["r"].is_number_integer() || j["r"].get<long long>() <= 0)
      fail(path, ": 'r' must be a positive integer");
    c.r = j["r"].get<index_t>();
    if (!j.contains("lora_alpha") || !j["lora_alpha"].is_number()) fail(path, ": missing number 'lora_alpha'");
    c.alpha = j["lora_alpha"].get<double>();
    if (j.contains("use_rslora") && j["use_rslora"].is_boolean()) c.rslora = j["use_rslora"].get<bool>();
    if (j.contains("fan_in_fan_out") && j["fan_in_fan_out"].is_boolean()) c.fan_in_fan_out = j["fan_in_fan_out"].get<bool>();
    c.base_model = str("base_model_name_or_path");
    if (!j.contains("target_modules") || j["target_modules"].is_null())
      fail(path, ": missing 'target_modules' (a list of module names or a regular expression)");
    const auto& t = j["target_modules"];
    if (t.is_string()) {
      c.target_regex = t.get<std::string>();
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
      try {
        (void)std::regex(c.target_regex);
      } catch (const std::regex_error&) {
        fail(path, ": target_modules '", c.target_regex, "' is not a valid regular expression");
      }
#endif  // (without exceptions, std::regex itself ends the program on an invalid expression)
    } else if (t.is_array() && !t.empty()) {
      for (const auto& e : t) {
        if (!e.is_string()) fail(path, ": target_modules holds a non-string entry");
        c.target_list.push_back(e.get<std::string>());
      }
    } else {
      fail(path, ": target_modules must be a non-empty list or a regular expression string");
    }
    return c;
  }
};

/// A LoRA adapter as a TensorOverlay of a checkpoint's TensorStore (see the top).
class LoraAdapter final : public TensorOverlay {
 public:
  static constexpr const char* kConfig = "adapter_config.json";         ///< the adapter's config
  static constexpr const char* kWeights = "adapter_model.safetensors";  ///< its tensors

  /// Loads a PEFT adapter directory.
  static std::shared_ptr<LoraAdapter> load(const std::string& dir) {
    namespace fs = std::filesystem;
    const fs::path d(dir);
    if (!fs::is_directory(d)) fail("LoRA adapter '", dir, "': not a directory (expected ", kConfig, " and ", kWeights, ")");
    if (!fs::exists(d / kConfig)) fail(dir, ": no '", kConfig, "' (a PEFT adapter directory as save_pretrained writes it)");
    if (!fs::exists(d / kWeights)) {
      if (fs::exists(d / "adapter_model.bin"))
        fail(dir, ": adapter_model.bin (a pickle) is not read; convert it once with\n  python3 -c \"import torch; "
                  "from safetensors.torch import save_file; save_file(torch.load('",
             (d / "adapter_model.bin").string(), "', map_location='cpu'), '", (d / kWeights).string(), "')\"");
      fail(dir, ": no '", kWeights, "'");
    }
    auto a = std::shared_ptr<LoraAdapter>(new LoraAdapter);
    a->origin_ = dir;
    a->config_ = LoraConfig::parse((d / kConfig).string());
    a->own_ = SafeTensors::open((d / kWeights).string());
    const std::string prefix = "base_model.model.";
    for (const auto& t : a->own_->tensors()) {
      if (t.name.compare(0, prefix.size(), prefix) != 0)
        fail(a->own_->path(), ": tensor '", t.name, "' is not under '", prefix, "' (not a PEFT LoRA adapter file?)");
      const std::string rest = t.name.substr(prefix.size());
      if (a->add_lora_part(rest, ".lora_A.weight", ".lora_B.weight", &*a->own_, &t)) continue;
      a->refuse_unsupported(rest, a->own_->path());
      a->replacements_[rest] = {&*a->own_, &t};
    }
    a->check_pairs(a->own_->path());
    return a;
  }

  /// The LoRA of a checkpoint in PEFT's injected layout (`store` opened from `dir`), or nullptr
  /// when it holds no `lora_A.default` / `lora_B.default` tensors.
  template <class T>
  static std::shared_ptr<LoraAdapter> injected(const TensorStore<T>& store, const std::string& dir) {
    auto a = std::shared_ptr<LoraAdapter>(new LoraAdapter);
    a->origin_ = dir;
    a->injected_ = true;
    for (const auto& f : store.files())
      for (const auto& t : f.tensors()) {
        if (a->add_lora_part(t.name, ".lora_A.default.weight", ".lora_B.default.weight", &f, &t)) continue;
        if (t.name.find(".lora_") != std::string::npos) a->refuse_unsupported(t.name, f.path());
      }
    if (a->pairs_.empty()) return nullptr;
    const std::string cfg = (std::filesystem::path(dir) / kConfig).string();
    if (!std::filesystem::exists(cfg))
      fail(dir, ": the checkpoint holds LoRA-injected tensors (e.g. '", a->pairs_.begin()->second.a->name,
           "') but no '", kConfig, "', so the LoRA scale (lora_alpha / r) is unknown");
    a->config_ = LoraConfig::parse(cfg);
    a->check_pairs(dir);
    return a;
  }

  /// The parsed adapter_config.json.
  const LoraConfig& config() const noexcept { return config_; }
  /// Where the adapter came from (its directory).
  const std::string& origin() const noexcept { return origin_; }
  /// Whether it came from a LoRA-injected checkpoint rather than an adapter directory.
  bool is_injected() const noexcept { return injected_; }
  /// Notes for the user that do not stop the load (a base model name that differs, ...).
  const std::vector<std::string>& warnings() const noexcept { return warnings_; }
  /// Number of LoRA pairs (updated weights).
  std::size_t pairs() const noexcept { return pairs_.size(); }

  /// Records the checkpoint's `_name_or_path` (config.json) and warns when the adapter names
  /// another base model.
  void note_base_model(const std::string& checkpoint_name) {
    if (!config_.base_model.empty() && !checkpoint_name.empty() && config_.base_model != checkpoint_name)
      warnings_.push_back("LoRA adapter '" + origin_ + "' was trained on '" + config_.base_model +
                          "', the checkpoint says it is '" + checkpoint_name + "'");
  }

  /// Moves a whole-tensor replacement stored as `from` to the checkpoint name `to` (PEFT under
  /// transformers 5 saves GPT-NeoX's output layer under its module name `lm_head`, where the
  /// checkpoint says `embed_out`). Both present is an error naming them.
  void rename_replacement(const std::string& from, const std::string& to) {
    auto it = replacements_.find(from);
    if (it == replacements_.end()) return;
    if (replacements_.count(to))
      fail(origin_, ": the adapter holds both '", it->second.second->name, "' and a tensor for '", to,
           "' (two output layers)");
    replacements_[to] = it->second;
    replacements_.erase(it);
  }

  std::pair<const SafeTensors*, const TensorInfo*> replacement(const std::string& name) const override {
    auto it = replacements_.find(name);
    if (it == replacements_.end()) return {nullptr, nullptr};
    replaced_used_.insert(name);
    return it->second;
  }
  bool updates(const std::string& name) const override {
    asked_.insert(name);
    return pairs_.count(name) != 0;
  }
  void merge(const std::string& name, float* w, std::int64_t rows, std::int64_t cols) override {
    Pair& p = pairs_.at(name);
    const std::int64_t r = p.a->shape[0];
    if (p.a->shape[1] != cols || p.b->shape[0] != rows)
      fail(p.file->path(), ": LoRA pair of '", name, "' (A ", SafeTensors::shape_str(p.a->shape), ", B ",
           SafeTensors::shape_str(p.b->shape), ") does not fit the weight [", rows, ", ", cols, "]");
    const std::vector<double> A = p.file->read<double>(p.a->name), B = p.file->read<double>(p.b->name);
    const double s = config_.scale();
    std::vector<double> row(static_cast<std::size_t>(cols));
    for (std::int64_t o = 0; o < rows; ++o) {
      std::fill(row.begin(), row.end(), 0.0);
      for (std::int64_t k = 0; k < r; ++k) {
        const double b = B[std::size_t(o * r + k)];
        const double* a = A.data() + k * cols;
        for (std::int64_t i = 0; i < cols; ++i) row[std::size_t(i)] += b * a[i];
      }
      for (std::int64_t i = 0; i < cols; ++i)
        w[o * cols + i] = static_cast<float>(double(w[o * cols + i]) + s * row[std::size_t(i)]);
    }
    p.used = true;
  }
  bool used_checkpoint_tensor(const std::string& name) const override {
    if (!injected_) return false;
    for (const auto& [w, p] : pairs_)
      if (p.used && (p.a->name == name || p.b->name == name)) return true;
    return false;
  }

  /// After a loader has read the model: every pair merged, every replacement used, every
  /// target matched by a module the loader read, and no pair outside the targets; else a named
  /// error (`model`: the architecture, for messages).
  void check_all_used(const std::string& model) const {
    for (const auto& [w, p] : pairs_) {
      const std::string module = w.substr(0, w.size() - 7);  // minus ".weight"
      if (!config_.targets(module))
        fail(origin_, ": LoRA tensors for '", module, "', which target_modules does not name");
      if (!p.used)
        fail(origin_, ": LoRA pair for '", module, "' matches no weight of the ", model,
             " model (an adapter for another architecture?)");
    }
    for (const auto& [n, t] : replacements_)
      if (!replaced_used_.count(n))
        fail(origin_, ": adapter tensor '", t.second->name, "' replaces '", n, "', which the ", model,
             " model does not have");
    auto matched = [&](auto&& pred) {
      for (const auto& n : asked_)
        if (pred(n.substr(0, n.size() - 7))) return true;
      return false;
    };
    if (!config_.target_regex.empty()) {
      if (!matched([&](const std::string& m) { return config_.targets(m); }))
        fail(origin_, ": target_modules '", config_.target_regex, "' matches no module of the ", model, " model");
    } else {
      for (const auto& t : config_.target_list) {
        LoraConfig one;
        one.target_list = {t};
        if (!matched([&](const std::string& m) { return one.targets(m); }))
          fail(origin_, ": target_modules entry '", t, "' matches no module of the ", model, " model");
      }
    }
  }

 private:
  LoraAdapter() = default;
  struct Pair {
    const SafeTensors* file = nullptr;
    const TensorInfo* a = nullptr;  // [r x in]
    const TensorInfo* b = nullptr;  // [out x r]
    bool used = false;
  };

  // Records `name` when it ends with a_suffix / b_suffix (the module's pair); false otherwise.
  bool add_lora_part(const std::string& name, const std::string& a_suffix, const std::string& b_suffix,
                     const SafeTensors* file, const TensorInfo* t) {
    for (int which = 0; which < 2; ++which) {
      const std::string& sfx = which == 0 ? a_suffix : b_suffix;
      if (name.size() <= sfx.size() || name.compare(name.size() - sfx.size(), sfx.size(), sfx) != 0) continue;
      Pair& p = pairs_[name.substr(0, name.size() - sfx.size()) + ".weight"];
      p.file = file;
      (which == 0 ? p.a : p.b) = t;
      return true;
    }
    return false;
  }
  void refuse_unsupported(const std::string& name, const std::string& file) const {
    if (name.find("lora_magnitude_vector") != std::string::npos)
      fail(file, ": tensor '", name, "' is a DoRA magnitude: DoRA adapters are not supported");
    if (name.find("lora_embedding_") != std::string::npos)
      fail(file, ": tensor '", name, "' is a LoRA on an embedding layer, which is not supported");
    if (name.find(".lora_") != std::string::npos)
      fail(file, ": tensor '", name, "' is not a LoRA A / B weight this loader reads (LoRA biases are not supported)");
  }
  void check_pairs(const std::string& where) {
    for (const auto& [w, p] : pairs_) {
      const std::string module = w.substr(0, w.size() - 7);
      if (!p.a || !p.b)
        fail(where, ": LoRA of '", module, "' has ", p.a ? "lora_A" : "lora_B", " but no ", p.a ? "lora_B" : "lora_A");
      if (p.a->shape.size() != 2 || p.b->shape.size() != 2)
        fail(where, ": LoRA of '", module, "': A and B must be matrices (A ", SafeTensors::shape_str(p.a->shape), ", B ",
             SafeTensors::shape_str(p.b->shape), ")");
      if (p.a->shape[0] != p.b->shape[1])
        fail(where, ": LoRA of '", module, "': the rank differs between A ", SafeTensors::shape_str(p.a->shape),
             " and B ", SafeTensors::shape_str(p.b->shape));
      if (p.a->shape[0] != config_.r)
        fail(where, ": LoRA of '", module, "' has rank ", p.a->shape[0], ", adapter_config.json says r = ", config_.r);
    }
    if (config_.fan_in_fan_out)
      warnings_.push_back("adapter_config.json sets fan_in_fan_out, which applies to Conv1D layers only; these "
                          "layers are Linear, so it is ignored (as PEFT does)");
  }

  std::string origin_;
  bool injected_ = false;
  LoraConfig config_;
  std::optional<SafeTensors> own_;  // the adapter file (adapter directories)
  std::map<std::string, Pair> pairs_;  // by the weight's name, "<module>.weight"
  std::map<std::string, std::pair<const SafeTensors*, const TensorInfo*>> replacements_;
  mutable std::set<std::string> replaced_used_;
  mutable std::set<std::string> asked_;  // weights the loader read
  std::vector<std::string> warnings_;
};

/// SAC's compressing LoRA (lx-Meteors/SAC), as examples/convert_sac_adapter.py writes it from
/// adapter.pt: `role_tokens` [mem x hidden], `special_tokens` [2 x hidden], and per layer
/// `layers.N.{q,v}_proj.lora_A` [in x r] / `.lora_B` [r x out], for y = x W^T + 2 x A B. The
/// scale 2 is SAC's LinearLoraLayer's (its model/lora.py is not public; the same authors'
/// related code fixes it at 2: an assumption, stated in the README).
class SacLora {
 public:
  static constexpr double kScale = 2.0;  ///< LinearLoraLayer's fixed scale

  /// Opens and checks a converted adapter: known names only, complete pairs, one rank.
  static SacLora open(const std::string& path) {
    SacLora a;
    a.file_ = std::make_shared<SafeTensors>(SafeTensors::open(path));
    const std::regex lora(R"(layers\.(\d+)\.(q_proj|v_proj)\.lora_(A|B))");
    for (const auto& t : a.file_->tensors()) {
      std::smatch m;
      if (t.name == "role_tokens" || t.name == "special_tokens") {
        if (t.shape.size() != 2) fail(path, ": '", t.name, "' must be a matrix, found ", SafeTensors::shape_str(t.shape));
        continue;
      }
      if (!std::regex_match(t.name, m, lora))
        fail(path, ": tensor '", t.name, "' is not one convert_sac_adapter.py writes (role_tokens, special_tokens, "
                   "layers.N.{q,v}_proj.lora_A / lora_B)");
      if (t.shape.size() != 2) fail(path, ": '", t.name, "' must be a matrix, found ", SafeTensors::shape_str(t.shape));
      a.layers_ = std::max<index_t>(a.layers_, std::stoll(m[1].str()) + 1);
    }
    for (const auto& t : a.file_->tensors()) {
      if (t.name.size() < 6 || t.name.compare(t.name.size() - 6, 6, "lora_A") != 0) continue;
      const std::string b = t.name.substr(0, t.name.size() - 1) + "B";
      const TensorInfo* tb = a.file_->find(b);
      if (!tb) fail(path, ": '", t.name, "' has no '", b, "'");
      if (t.shape[1] != tb->shape[0])
        fail(path, ": the rank differs between '", t.name, "' ", SafeTensors::shape_str(t.shape), " and '", b, "' ",
             SafeTensors::shape_str(tb->shape));
    }
    for (const auto& t : a.file_->tensors())
      if (t.name.size() >= 6 && t.name.compare(t.name.size() - 6, 6, "lora_B") == 0 &&
          !a.file_->contains(t.name.substr(0, t.name.size() - 1) + "A"))
        fail(path, ": '", t.name, "' has no lora_A");
    return a;
  }

  /// The file.
  const std::string& path() const noexcept { return file_->path(); }
  /// Whether it holds the anchor and special embeddings.
  bool has_embeddings() const { return file_->contains("role_tokens") && file_->contains("special_tokens"); }
  /// `role_tokens` or `special_tokens` as F32, with its shape.
  std::vector<float> matrix(const std::string& name, index_t& rows, index_t& cols) const {
    const TensorInfo& t = file_->info(name);
    rows = t.shape[0], cols = t.shape[1];
    return file_->read<float>(name);
  }
  /// Highest layer index + 1 among the LoRA matrices (0: none).
  index_t layers() const noexcept { return layers_; }

  /// Adds 2 (A B)^T to layer `layer`'s `proj` weight w [out x in] (fp32, formed in double and
  /// rounded once); false when the file has no LoRA for it. A shape that does not fit is an
  /// error naming the file (an adapter converted from another model).
  bool merge(index_t layer, const std::string& proj, float* w, std::int64_t out, std::int64_t in) const {
    const std::string p = "layers." + std::to_string(layer) + "." + proj + ".lora_";
    const TensorInfo* ta = file_->find(p + "A");
    if (!ta) return false;
    const TensorInfo& tb = file_->info(p + "B");
    if (ta->shape[0] != in || tb.shape[1] != out)
      fail(file_->path(), ": '", p, "A' ", SafeTensors::shape_str(ta->shape), " and '", p, "B' ",
           SafeTensors::shape_str(tb.shape), " do not fit the model's ", proj, " [", out, " x ", in,
           "] (an adapter.pt of another model?)");
    const std::int64_t r = ta->shape[1];
    const std::vector<double> A = file_->read<double>(p + "A"), B = file_->read<double>(p + "B");
    for (std::int64_t o = 0; o < out; ++o)
      for (std::int64_t i = 0; i < in; ++i) {
        double d = 0;
        for (std::int64_t k = 0; k < r; ++k) d += A[std::size_t(i * r + k)] * B[std::size_t(k * out + o)];
        w[o * in + i] = static_cast<float>(double(w[o * in + i]) + kScale * d);
      }
    return true;
  }

 private:
  std::shared_ptr<SafeTensors> file_;
  index_t layers_ = 0;
};

}  // namespace ctxcomp::io
