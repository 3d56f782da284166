// The added tokens of a Hugging Face tokenizer directory (what `tokenizer.add_tokens([...])` and
// `save_pretrained` write): content -> id, read from every file that records them, so a
// checkpoint trained with sentinel tokens names its own `<CL>` / `<CR>` ids.
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "checkpoint.hpp"

namespace ctxcomp::io {

/// Added tokens of a tokenizer directory, from whichever of these files it holds:
/// - `tokenizer.json`: `added_tokens`, a list of objects with `id` and `content`;
/// - `added_tokens.json`: an object mapping content to id;
/// - `tokenizer_config.json`: `added_tokens_decoder`, an object mapping the id (as a string) to
///   an object with `content`.
///
/// A file that is absent is skipped; one that is present but not shaped as above is an error
/// naming it, and so is a token that two files (or two entries) give different ids, or an id
/// given to two contents.
class AddedTokens {
 public:
  /// Reads the added tokens of directory `dir` (none if it holds none of the files).
  static AddedTokens load(const std::string& dir) {
    AddedTokens t;
    const std::filesystem::path d(dir);
    if (const auto p = d / "tokenizer.json"; std::filesystem::exists(p)) {
      const auto j = read_json(p.string());
      if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
        if (!j["added_tokens"].is_array()) fail(p.string(), ": 'added_tokens' is not a list");
        for (const auto& e : j["added_tokens"]) {
          if (!e.is_object() || !e.contains("id") || !e["id"].is_number_integer() || !e.contains("content") ||
              !e["content"].is_string())
            fail(p.string(), ": an entry of 'added_tokens' has no integer 'id' and string 'content': ", e.dump());
          t.add(e["content"].get<std::string>(), e["id"].get<std::int64_t>(), p.string());
        }
      }
      t.sources_.push_back(p.string());
    }
    if (const auto p = d / "added_tokens.json"; std::filesystem::exists(p)) {
      const auto j = read_json(p.string());
      if (!j.is_object()) fail(p.string(), ": not an object mapping token contents to ids");
      for (const auto& [content, id] : j.items()) {
        if (!id.is_number_integer()) fail(p.string(), ": the id of '", content, "' is not an integer: ", id.dump());
        t.add(content, id.get<std::int64_t>(), p.string());
      }
      t.sources_.push_back(p.string());
    }
    if (const auto p = d / "tokenizer_config.json"; std::filesystem::exists(p)) {
      const auto j = read_json(p.string());
      if (j.contains("added_tokens_decoder") && !j["added_tokens_decoder"].is_null()) {
        const auto& dec = j["added_tokens_decoder"];
        if (!dec.is_object()) fail(p.string(), ": 'added_tokens_decoder' is not an object mapping ids to tokens");
        for (const auto& [key, e] : dec.items()) {
          std::int64_t id = 0;
          std::size_t used = 0;
          bool number = !key.empty() && key.find_first_not_of("0123456789") == std::string::npos && key.size() < 19;
          if (number) id = std::stoll(key, &used);
          if (!number || used != key.size())
            fail(p.string(), ": 'added_tokens_decoder' has the key '", key, "', which is not a token id");
          if (!e.is_object() || !e.contains("content") || !e["content"].is_string())
            fail(p.string(), ": 'added_tokens_decoder' entry ", key, " has no string 'content'");
          t.add(e["content"].get<std::string>(), id, p.string());
        }
      }
      t.sources_.push_back(p.string());
    }
    return t;
  }

  /// The id of the added token `content`, if one of the files adds it.
  std::optional<std::int64_t> id_of(const std::string& content) const {
    const auto it = ids_.find(content);
    if (it == ids_.end()) return std::nullopt;
    return it->second;
  }
  /// Number of distinct added tokens.
  std::size_t size() const noexcept { return ids_.size(); }
  /// The files read (those of the three that exist), in the order above.
  const std::vector<std::string>& sources() const noexcept { return sources_; }

 private:
  void add(const std::string& content, std::int64_t id, const std::string& file) {
    if (id < 0) fail(file, ": the added token '", content, "' has the negative id ", id);
    const auto [it, fresh] = ids_.emplace(content, id);
    if (!fresh && it->second != id)
      fail(file, ": the added token '", content, "' has id ", id, ", but ", where_.at(content), " gives it id ",
           it->second);
    const auto [jt, fresh_id] = contents_.emplace(id, content);
    if (!fresh_id && jt->second != content)
      fail(file, ": id ", id, " is given to '", content, "', but also to '", jt->second, "'");
    where_.emplace(content, file);
  }
  std::map<std::string, std::int64_t> ids_;
  std::map<std::int64_t, std::string> contents_;
  std::map<std::string, std::string> where_;
  std::vector<std::string> sources_;
};

/// The `<CL>` / `<CR>` ids the sentinel-token method's training script adds
/// (`tokenizer.add_tokens(['<CL>', '<CR>'])`), from the added tokens of the tokenizer in `dir`.
/// `cl` / `cr` given (e.g. from command-line flags) take precedence over the files. Errors name
/// what is missing: a token neither given nor added by the files, or the same id for both.
inline std::pair<std::int64_t, std::int64_t> sentinel_ids(const std::string& dir, std::optional<std::int64_t> cl,
                                                          std::optional<std::int64_t> cr) {
  if (!cl || !cr) {
    const AddedTokens t = AddedTokens::load(dir);
    std::string files;
    for (const auto& f : t.sources()) files += (files.empty() ? "" : ", ") + f;
    auto missing = [&](const char* token, const char* flag) {
      fail("no id for ", token, ": ", flag, " is not given and ",
           t.sources().empty() ? std::string("the checkpoint directory '") + dir +
                                     "' holds no tokenizer files (tokenizer.json, added_tokens.json, "
                                     "tokenizer_config.json)"
                               : "none of " + files + " adds it",
           "; pass ", flag, " ID (the id the training script's tokenizer.add_tokens gave ", token, ")");
    };
    if (!cl) {
      cl = t.id_of("<CL>");
      if (!cl) missing("<CL>", "--cl");
    }
    if (!cr) {
      cr = t.id_of("<CR>");
      if (!cr) missing("<CR>", "--cr");
    }
  }
  if (*cl == *cr) fail("<CL> and <CR> have the same id ", *cl);
  return {*cl, *cr};
}

}  // namespace ctxcomp::io
