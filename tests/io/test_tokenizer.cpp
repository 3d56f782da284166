// Added tokens of a tokenizer directory (io/tokenizer.hpp) in the three file layouts Hugging Face
// writes, and the <CL> / <CR> ids the sentinel method's training script adds: found in any of
// them, given ids taking precedence, conflicts and malformed files refused by name.
#include <filesystem>
#include <fstream>

#include <ctxcomp/io/tokenizer.hpp>

#include "catch.hpp"
#include "common.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_io_tokenizer {

using namespace ctxcomp;
using Catch::Matchers::Contains;

namespace {
/// A fresh, empty directory under the temporary directory.
std::string fresh_dir(const std::string& name) {
  const auto d = std::filesystem::path(test::tmp(name));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d.string();
}
void write(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

// What transformers writes for `tokenizer.add_tokens(['<CL>', '<CR>'], special_tokens=False)`
// on a 50277-token vocabulary (abridged to the fields read here plus one that is not).
const char* kTokenizerJson =
    R"({"version": "1.0", "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": true},
        {"id": 50277, "content": "<CL>", "single_word": false, "special": false},
        {"id": 50278, "content": "<CR>", "single_word": false, "special": false}], "model": {"type": "BPE"}})";
const char* kAddedTokensJson = R"({"<CL>": 50277, "<CR>": 50278})";
const char* kTokenizerConfigJson =
    R"({"added_tokens_decoder": {"0": {"content": "<|endoftext|>", "special": true},
        "50277": {"content": "<CL>", "special": false}, "50278": {"content": "<CR>", "special": false}},
        "model_max_length": 2048})";
}  // namespace

TEST_CASE("sentinel ids come from whichever tokenizer file a checkpoint holds", "[io][tokenizer]") {
  for (const char* file : {"tokenizer.json", "added_tokens.json", "tokenizer_config.json"}) {
    INFO(file);
    const std::string d = fresh_dir("ctxcomp_tok_one");
    const std::string f = file;
    write(d + "/" + f, f == "tokenizer.json" ? kTokenizerJson : f == "added_tokens.json" ? kAddedTokensJson
                                                                                          : kTokenizerConfigJson);
    const auto t = io::AddedTokens::load(d);
    CHECK(t.id_of("<CL>") == std::optional<std::int64_t>(50277));
    CHECK(t.id_of("<CR>") == std::optional<std::int64_t>(50278));
    CHECK(!t.id_of("<CM>").has_value());
    CHECK(t.sources() == std::vector<std::string>{(std::filesystem::path(d) / f).string()});
    CHECK(io::sentinel_ids(d, std::nullopt, std::nullopt) == std::pair<std::int64_t, std::int64_t>{50277, 50278});
    // Given ids take precedence, one at a time.
    CHECK(io::sentinel_ids(d, 7, std::nullopt) == std::pair<std::int64_t, std::int64_t>{7, 50278});
    CHECK(io::sentinel_ids(d, std::nullopt, 9) == std::pair<std::int64_t, std::int64_t>{50277, 9});
  }
  // All three together, agreeing: read from each.
  const std::string d = fresh_dir("ctxcomp_tok_all");
  write(d + "/tokenizer.json", kTokenizerJson);
  write(d + "/added_tokens.json", kAddedTokensJson);
  write(d + "/tokenizer_config.json", kTokenizerConfigJson);
  const auto t = io::AddedTokens::load(d);
  CHECK(t.sources().size() == 3);
  CHECK(t.size() == 3);
  CHECK(io::sentinel_ids(d, std::nullopt, std::nullopt) == std::pair<std::int64_t, std::int64_t>{50277, 50278});
}

TEST_CASE("tokenizer files that disagree or are malformed are refused by name", "[io][tokenizer][errors]") {
  const std::string d = fresh_dir("ctxcomp_tok_bad");
  // No files: nothing added, and sentinel ids must be given.
  CHECK(io::AddedTokens::load(d).size() == 0);
  CHECK_THROWS_WITH(io::sentinel_ids(d, std::nullopt, std::nullopt),
                    Contains("no id for <CL>: --cl is not given") && Contains("holds no tokenizer files"));
  CHECK(io::sentinel_ids(d, 126, 127) == std::pair<std::int64_t, std::int64_t>{126, 127});
  CHECK_THROWS_WITH(io::sentinel_ids(d, 5, 5), Contains("<CL> and <CR> have the same id 5"));
  // A tokenizer without the sentinels.
  write(d + "/added_tokens.json", R"({"<pad>": 3})");
  CHECK_THROWS_WITH(io::sentinel_ids(d, std::nullopt, std::nullopt),
                    Contains("no id for <CL>") && Contains("added_tokens.json adds it"));
  CHECK_THROWS_WITH(io::sentinel_ids(d, 1, std::nullopt), Contains("no id for <CR>: --cr is not given"));
  // Two files giving <CL> different ids.
  write(d + "/added_tokens.json", kAddedTokensJson);
  write(d + "/tokenizer.json", R"({"added_tokens": [{"id": 12, "content": "<CL>"}]})");
  CHECK_THROWS_WITH(io::AddedTokens::load(d), Contains("the added token '<CL>' has id 50277") &&
                                                  Contains("tokenizer.json gives it id 12"));
  // One id given to two contents.
  write(d + "/tokenizer.json", R"({"added_tokens": [{"id": 50277, "content": "<CX>"}]})");
  CHECK_THROWS_WITH(io::AddedTokens::load(d), Contains("id 50277 is given to '<CL>', but also to '<CX>'"));
  std::filesystem::remove(d + "/tokenizer.json");
  // Malformed shapes, each named with its file.
  write(d + "/added_tokens.json", R"(["<CL>", "<CR>"])");
  CHECK_THROWS_WITH(io::AddedTokens::load(d), Contains("added_tokens.json: not an object"));
  write(d + "/added_tokens.json", R"({"<CL>": "50277"})");
  CHECK_THROWS_WITH(io::AddedTokens::load(d), Contains("the id of '<CL>' is not an integer"));
  write(d + "/added_tokens.json", R"({"<CL>": -4})");
  CHECK_THROWS_WITH(io::AddedTokens::load(d), Contains("negative id -4"));
  write(d + "/added_tokens.json", R"({"<CL>": 5)");
  CHECK_THROWS_WITH(io::AddedTokens::load(d), Contains("added_tokens.json' is not valid JSON"));
  std::filesystem::remove(d + "/added_tokens.json");
  write(d + "/tokenizer.json", R"({"added_tokens": {"<CL>": 5}})");
  CHECK_THROWS_WITH(io::AddedTokens::load(d), Contains("tokenizer.json: 'added_tokens' is not a list"));
  write(d + "/tokenizer.json", R"({"added_tokens": [{"content": "<CL>"}]})");
  CHECK_THROWS_WITH(io::AddedTokens::load(d), Contains("has no integer 'id' and string 'content'"));
  std::filesystem::remove(d + "/tokenizer.json");
  write(d + "/tokenizer_config.json", R"({"added_tokens_decoder": {"x1": {"content": "<CL>"}}})");
  CHECK_THROWS_WITH(io::AddedTokens::load(d), Contains("the key 'x1', which is not a token id"));
  write(d + "/tokenizer_config.json", R"({"added_tokens_decoder": {"5": {"special": true}}})");
  CHECK_THROWS_WITH(io::AddedTokens::load(d), Contains("entry 5 has no string 'content'"));
  write(d + "/tokenizer_config.json", R"({"added_tokens_decoder": [5]})");
  CHECK_THROWS_WITH(io::AddedTokens::load(d), Contains("'added_tokens_decoder' is not an object"));
  // Files without the fields are fine (a tokenizer with nothing added).
  write(d + "/tokenizer_config.json", R"({"model_max_length": 2048})");
  write(d + "/tokenizer.json", R"({"version": "1.0", "added_tokens": []})");
  CHECK(io::AddedTokens::load(d).size() == 0);
  std::filesystem::remove_all(d);
}

}  // namespace test_io_tokenizer
