// GGUF v3 writing (and reading back, GgufCheckpoint at the end): a checkpoint directory (Llama, Mistral, Qwen2, Qwen3; F32 / F16 / BF16
// weights, a PEFT LoRA merged when given) as a GGUF file that stock llama.cpp loads, the way
// llama.cpp's convert_hf_to_gguf.py writes it:
// - metadata `general.architecture` (llama for Llama and Mistral, qwen2, qwen3) and
//   `<arch>.{context_length, embedding_length, block_count, feed_forward_length,
//   attention.head_count, attention.head_count_kv, attention.key_length, attention.value_length,
//   rope.dimension_count, rope.freq_base, attention.layer_norm_rms_epsilon, vocab_size}`, linear
//   RoPE scaling as `rope.scaling.type` / `rope.scaling.factor`, and `tokenizer.ggml.model`
//   "none" (placeholder tokens: ctxcomp works on token ids);
// - tensors `token_embd`, `output_norm`, `output` (absent when tied), `rope_freqs` (Llama 3 RoPE:
//   the factor each frequency is divided by), `blk.N.{attn_norm, attn_q, attn_k, attn_v,
//   attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}` with `attn_{q,k,v}.bias` and
//   `attn_{q,k}_norm` where the family has them;
// - for the llama architecture the rows of attn_q / attn_k are permuted within each head
//   (row 2j + a <- row a * head_dim / 2 + j), as llama.cpp's converter does for its NORM RoPE:
//   keys in llama.cpp's cache are then the Hugging Face keys permuted the same way
//   (`gguf_permute_row`).
// Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian; strings as a
// u64 length and bytes; tensor dims innermost first; data aligned to `general.alignment` = 32).
#pragma once
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint.hpp"
#include "lora.hpp"

namespace ctxcomp::io {

/// ggml tensor types GGUF files hold here (the values of ggml's `enum ggml_type`).
enum class GgmlType : std::uint32_t { f32 = 0, f16 = 1, q8_0 = 8, bf16 = 30 };

inline const char* ggml_type_name(GgmlType t) noexcept {
  switch (t) {
    case GgmlType::f32: return "f32";
    case GgmlType::f16: return "f16";
    case GgmlType::q8_0: return "q8_0";
    default: return "bf16";
  }
}

/// "f32", "f16" or "bf16" (the weight types the writer converts to).
inline GgmlType parse_gguf_weight_type(const std::string& s) {
  if (s == "f32") return GgmlType::f32;
  if (s == "f16") return GgmlType::f16;
  if (s == "bf16") return GgmlType::bf16;
  fail("GGUF weight type '", s, "' is not one of f32, f16, bf16");
}

/// Builds a GGUF v3 file in memory: key-value metadata, then tensors (F32 / F16 / BF16 from fp32
/// values), written atomically by `write`.
class GgufWriter {
 public:
  static constexpr std::uint32_t kAlignment = 32;  ///< general.alignment

  /// Metadata `key` = v (GGUF value types STRING, UINT32, FLOAT32, BOOL).
  ///@{
  void add_string(const std::string& key, const std::string& v) { kv(key, 8), str(meta_, v); }
  void add_u32(const std::string& key, std::uint32_t v) { kv(key, 4), pod(meta_, v); }
  void add_f32(const std::string& key, float v) { kv(key, 6), pod(meta_, v); }
  void add_bool(const std::string& key, bool v) { kv(key, 7), pod(meta_, std::uint8_t(v ? 1 : 0)); }
  ///@}

  /// Tensor `name` of PyTorch shape `shape` (outermost first) from fp32 `values`, stored as `type`.
  void add_tensor(const std::string& name, const std::vector<std::int64_t>& shape, const float* values, GgmlType type) {
    CTXCOMP_CHECK(type != GgmlType::q8_0, "GgufWriter: q8_0 weights are not written");
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    Tensor t{name, shape, type, {}};
    const std::size_t es = type == GgmlType::f32 ? 4 : 2;
    t.data.resize(std::size_t(n) * es);
    for (std::int64_t i = 0; i < n; ++i) {
      if (type == GgmlType::f32) {
        std::memcpy(t.data.data() + i * 4, &values[i], 4);
      } else if (type == GgmlType::f16) {
        const fp16 h = from_float<fp16>(values[i]);
        std::memcpy(t.data.data() + i * 2, &h, 2);
      } else {
        const bf16 b = from_float<bf16>(values[i]);
        std::memcpy(t.data.data() + i * 2, &b, 2);
      }
    }
    tensors_.push_back(std::move(t));
  }

  /// Tensor `name` of PyTorch shape `shape` with its bytes as stored (`type` Q8_0: blocks of 32
  /// values, an fp16 scale then 32 int8), e.g. one quantised elsewhere.
  void add_raw_tensor(const std::string& name, const std::vector<std::int64_t>& shape, GgmlType type,
                      std::vector<char> data) {
    tensors_.push_back({name, shape, type, std::move(data)});
  }

  /// The file's bytes.
  std::vector<char> bytes() const {
    std::vector<char> out;
    pod(out, std::uint32_t(0x46554747));  // "GGUF"
    pod(out, std::uint32_t(3));
    pod(out, std::uint64_t(tensors_.size()));
    pod(out, std::uint64_t(n_kv_ + 1));
    out.insert(out.end(), meta_.begin(), meta_.end());
    str(out, "general.alignment"), pod(out, std::uint32_t(4)), pod(out, kAlignment);
    std::uint64_t offset = 0;
    for (const auto& t : tensors_) {
      str(out, t.name);
      pod(out, std::uint32_t(t.shape.size()));
      for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) pod(out, std::uint64_t(*it));  // innermost first
      pod(out, static_cast<std::uint32_t>(t.type));
      pod(out, offset);
      offset += (t.data.size() + kAlignment - 1) / kAlignment * kAlignment;
    }
    out.resize((out.size() + kAlignment - 1) / kAlignment * kAlignment, 0);
    for (const auto& t : tensors_) {
      out.insert(out.end(), t.data.begin(), t.data.end());
      out.resize((out.size() + kAlignment - 1) / kAlignment * kAlignment, 0);
    }
    return out;
  }

  /// Writes the file (through a temporary beside it, renamed at the end).
  void write(const std::string& path) const {
    const auto b = bytes();
    const std::string tmp = path + ".tmp";
    {
      std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
      if (!f) fail("GGUF writer: cannot create '", tmp, "'");
      f.write(b.data(), std::streamsize(b.size()));
      if (!f) fail("GGUF writer: cannot write '", tmp, "'");
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) fail("GGUF writer: cannot rename '", tmp, "' to '", path, "'");
  }

 private:
  struct Tensor {
    std::string name;
    std::vector<std::int64_t> shape;
    GgmlType type;
    std::vector<char> data;
  };
  template <class T>
  static void pod(std::vector<char>& out, T v) {
    const char* p = reinterpret_cast<const char*>(&v);
    out.insert(out.end(), p, p + sizeof(T));
  }
  static void str(std::vector<char>& out, const std::string& s) {
    pod(out, std::uint64_t(s.size()));
    out.insert(out.end(), s.begin(), s.end());
  }
  void kv(const std::string& key, std::uint32_t type) {
    str(meta_, key);
    pod(meta_, type);
    ++n_kv_;
  }
  std::vector<char> meta_;
  std::uint64_t n_kv_ = 0;
  std::vector<Tensor> tensors_;
};

/// The row of a llama-architecture GGUF's attn_q / attn_k (and of llama.cpp's cached keys) that
/// holds Hugging Face row `row` of a head of `head_dim` rows: 2j + a for row a * head_dim / 2 + j.
/// `head_dim` must be even and positive (the reader refuses other head sizes by name).
inline index_t gguf_permute_row(index_t row, index_t head_dim) noexcept {
  const index_t h = row / head_dim, r = row % head_dim, half = head_dim / 2;
  return h * head_dim + 2 * (r % half) + r / half;
}

/// The GGUF architecture of a checkpoint's DecoderArch: llama (Llama, Mistral), qwen2, qwen3.
inline std::string gguf_architecture(const DecoderArch& a, const std::string& file) {
  if (a.name == "LlamaForCausalLM" || a.name == "MistralForCausalLM") return "llama";
  if (a.name == "Qwen2ForCausalLM") return "qwen2";
  if (a.name == "Qwen3ForCausalLM") return "qwen3";
  fail(file, ": ", a.name, " is not converted to GGUF (llama, mistral, qwen2 and qwen3 are)");
}

/// Converts checkpoint directory `dir` (with PEFT adapter `adapter_dir` merged, if given) into a
/// GGUF file at `out` with weights of `type` (norms and biases stay F32, as llama.cpp's converter
/// keeps 1-D tensors). Every tensor of the checkpoint must be used, as for the loaders.
inline void convert_to_gguf(const std::string& dir, const std::string& out, GgmlType type,
                            const std::string& adapter_dir = {}) {
  const std::string cp = dir + "/config.json";
  const auto j = read_json(cp);
  const DecoderArch a = decoder_arch(j, cp);
  const std::string arch = gguf_architecture(a, cp);
  const TransformerDims t = transformer_dims(j, cp);
  index_t vocab = config_int(j, "vocab_size", cp);
  auto st = TensorStore<float>::open_dir(dir);
  auto lora = LoraAdapter::injected(st, dir);
  if (lora && !adapter_dir.empty())
    fail(dir, ": the checkpoint already holds a LoRA (injected layout); it cannot take the adapter '", adapter_dir, "' too");
  if (!adapter_dir.empty()) lora = LoraAdapter::load(adapter_dir);
  if (lora) {
    st.set_overlay(lora);
    if (lora->replacement("model.embed_tokens.weight").second) vocab = st.shape_of("model.embed_tokens.weight").at(0);
  }
  const std::int64_t d = t.hidden, hd = t.head_dim, qd = t.heads * hd, kd = t.kv_heads * hd, in = t.intermediate;
  GgufWriter w;
  w.add_string("general.architecture", arch);
  w.add_string("general.name", j.contains("_name_or_path") && j["_name_or_path"].is_string()
                                   ? j["_name_or_path"].get<std::string>() : std::string("ctxcomp"));
  const std::string p = arch + ".";
  w.add_u32(p + "context_length", std::uint32_t(config_int_or(j, "max_position_embeddings", cp, 4096)));
  w.add_u32(p + "embedding_length", std::uint32_t(d));
  w.add_u32(p + "block_count", std::uint32_t(t.layers));
  w.add_u32(p + "feed_forward_length", std::uint32_t(in));
  w.add_u32(p + "attention.head_count", std::uint32_t(t.heads));
  w.add_u32(p + "attention.head_count_kv", std::uint32_t(t.kv_heads));
  w.add_u32(p + "attention.key_length", std::uint32_t(hd));
  w.add_u32(p + "attention.value_length", std::uint32_t(hd));
  w.add_u32(p + "rope.dimension_count", std::uint32_t(hd));
  w.add_f32(p + "rope.freq_base", static_cast<float>(t.rope.theta));
  w.add_f32(p + "attention.layer_norm_rms_epsilon", t.rms_eps);
  w.add_u32(p + "vocab_size", std::uint32_t(vocab));
  if (t.rope.linear_scaling != 1.0) {
    w.add_string(p + "rope.scaling.type", "linear");
    w.add_f32(p + "rope.scaling.factor", static_cast<float>(t.rope.linear_scaling));
  }
  w.add_string("tokenizer.ggml.model", "none");

  auto put = [&](const std::string& from, const std::string& to, std::vector<std::int64_t> shape, bool permute_heads,
                 index_t heads) {
    std::vector<float> v = st.load_f32(from, shape);
    st.mark_consumed(from);
    if (permute_heads && arch == "llama") {
      const std::int64_t cols = shape.size() == 2 ? shape[1] : 1;
      std::vector<float> perm(v.size());
      for (index_t r = 0; r < heads * hd; ++r)
        std::memcpy(perm.data() + gguf_permute_row(r, hd) * cols, v.data() + r * cols, std::size_t(cols) * sizeof(float));
      v.swap(perm);
    }
    w.add_tensor(to, shape, v.data(), shape.size() == 1 ? GgmlType::f32 : type);
  };
  put("model.embed_tokens.weight", "token_embd.weight", {vocab, d}, false, 0);
  for (index_t l = 0; l < t.layers; ++l) {
    const std::string h = "model.layers." + std::to_string(l) + ".", b = "blk." + std::to_string(l) + ".";
    put(h + "input_layernorm.weight", b + "attn_norm.weight", {d}, false, 0);
    put(h + "self_attn.q_proj.weight", b + "attn_q.weight", {qd, d}, true, t.heads);
    put(h + "self_attn.k_proj.weight", b + "attn_k.weight", {kd, d}, true, t.kv_heads);
    put(h + "self_attn.v_proj.weight", b + "attn_v.weight", {kd, d}, false, 0);
    put(h + "self_attn.o_proj.weight", b + "attn_output.weight", {d, qd}, false, 0);
    if (a.qkv_bias) {
      put(h + "self_attn.q_proj.bias", b + "attn_q.bias", {qd}, true, t.heads);
      put(h + "self_attn.k_proj.bias", b + "attn_k.bias", {kd}, true, t.kv_heads);
      put(h + "self_attn.v_proj.bias", b + "attn_v.bias", {kd}, false, 0);
    }
    if (a.o_bias) put(h + "self_attn.o_proj.bias", b + "attn_output.bias", {d}, false, 0);
    if (a.qk_norm) {
      put(h + "self_attn.q_norm.weight", b + "attn_q_norm.weight", {hd}, false, 0);
      put(h + "self_attn.k_norm.weight", b + "attn_k_norm.weight", {hd}, false, 0);
    }
    put(h + "post_attention_layernorm.weight", b + "ffn_norm.weight", {d}, false, 0);
    put(h + "mlp.gate_proj.weight", b + "ffn_gate.weight", {in, d}, false, 0);
    put(h + "mlp.up_proj.weight", b + "ffn_up.weight", {in, d}, false, 0);
    put(h + "mlp.down_proj.weight", b + "ffn_down.weight", {d, in}, false, 0);
    if (a.mlp_bias) {
      put(h + "mlp.gate_proj.bias", b + "ffn_gate.bias", {in}, false, 0);
      put(h + "mlp.up_proj.bias", b + "ffn_up.bias", {in}, false, 0);
      put(h + "mlp.down_proj.bias", b + "ffn_down.bias", {d}, false, 0);
    }
  }
  put("model.norm.weight", "output_norm.weight", {d}, false, 0);
  if (!a.tied_embeddings) {
    put("lm_head.weight", "output.weight", {vocab, d}, false, 0);
  } else if (st.contains("lm_head.weight")) {
    (void)st.load("lm_head.weight", {vocab, d});  // a stored copy of the tied embeddings
  }
  if (t.rope.llama3.enabled()) {  // convert_hf_to_gguf's rope_freqs: what each frequency is divided by
    const std::vector<float> factors = llama3_freq_factors(t.rope, hd);
    w.add_tensor("rope_freqs.weight", {std::int64_t(factors.size())}, factors.data(), GgmlType::f32);
  }
  st.check_all_consumed(a.name, harmless_extra_tensor);
  if (lora) lora->check_all_used(a.name);
  w.write(out);
}

}  // namespace ctxcomp::io

namespace ctxcomp::io {

/// A GGUF file read back as a checkpoint: the transformers config.json it stands for and its
/// tensors under the Hugging Face names, in PyTorch layout (attn_q / attn_k rows un-permuted for
/// the llama architecture), F32 / F16 / BF16 as stored and Q8_0 dequantised to F32. Reads GGUF
/// v2 and v3 of the llama, qwen2 and qwen3 architectures as convert_to_gguf and llama.cpp's
/// converter write them. Strict: an unknown `<arch>.` key or tensor, a missing one, a shape that
/// does not fit, another architecture, another tensor type, and any offset or size outside the
/// file are errors naming the file and the item. Llama 3 RoPE factors (`rope_freqs`) are kept
/// apart: rope_freq_factors().
class GgufCheckpoint {
 public:
  /// Reads and checks `path` (held in memory while converting; the result owns its tensors).
  static GgufCheckpoint open(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) fail("GGUF: cannot open '", path, "'");
    std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    return from_bytes(bytes, path);
  }

  /// Parses a GGUF file held in memory (named `path` in messages).
  static GgufCheckpoint from_bytes(const std::vector<std::uint8_t>& b, const std::string& path) {
    GgufCheckpoint g;
    g.path_ = path;
    Reader r{b.data(), b.size(), path};
    const auto magic = r.get<std::uint32_t>("the magic");
    if (magic != 0x46554747u) fail(path, ": not a GGUF file (magic ", magic, ")");
    const auto version = r.get<std::uint32_t>("the version");
    if (version != 2 && version != 3) fail(path, ": GGUF version ", version, " is not read (2 and 3 are)");
    const auto n_tensors = r.get<std::uint64_t>("the tensor count");
    const auto n_kv = r.get<std::uint64_t>("the key count");
    if (n_tensors > (1u << 20) || n_kv > (1u << 20)) fail(path, ": ", n_tensors, " tensors and ", n_kv, " keys is not a plausible GGUF header");
    nlohmann::json meta = nlohmann::json::object();
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      const std::string key = r.str("a key");
      meta[key] = r.value(r.get<std::uint32_t>("a value type"), key, 0);
    }
    std::uint64_t align = 32;
    if (meta.contains("general.alignment")) {
      if (!meta["general.alignment"].is_number_unsigned() || meta["general.alignment"].get<std::uint64_t>() == 0 ||
          meta["general.alignment"].get<std::uint64_t>() > 4096)
        fail(path, ": general.alignment ", meta["general.alignment"].dump(), " is not a positive alignment");
      align = meta["general.alignment"].get<std::uint64_t>();
    }
    struct Info {
      std::string name;
      std::vector<std::int64_t> ne;  // innermost first
      std::uint32_t type;
      std::uint64_t offset;
    };
    std::vector<Info> infos;
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      Info t;
      t.name = r.str("a tensor name");
      const auto nd = r.get<std::uint32_t>("a tensor's dimension count");
      if (nd == 0 || nd > 4) fail(path, ": tensor '", t.name, "' has ", nd, " dimensions");
      for (std::uint32_t d = 0; d < nd; ++d) {
        const auto e = r.get<std::uint64_t>("a tensor dimension");
        if (e == 0 || e > (std::uint64_t(1) << 32)) fail(path, ": tensor '", t.name, "' has dimension ", e);
        t.ne.push_back(std::int64_t(e));
      }
      t.type = r.get<std::uint32_t>("a tensor type");
      t.offset = r.get<std::uint64_t>("a tensor offset");
      infos.push_back(std::move(t));
    }
    const std::uint64_t data = (r.at + align - 1) / align * align;
    g.config_ = config_of(meta, path);
    const std::string arch = meta["general.architecture"].get<std::string>();
    const index_t hd = g.config_["head_dim"].get<index_t>();
    std::vector<TensorOut> outs;
    std::vector<std::vector<std::uint8_t>> bufs;
    bufs.reserve(infos.size());
    std::int64_t vocab = -1;
    bool has_output = false;
    for (const auto& t : infos) {
      std::int64_t n = 1;
      for (auto e : t.ne) {
        if (n > (std::int64_t(1) << 40) / e) fail(path, ": tensor '", t.name, "' is too large");
        n *= e;
      }
      std::uint64_t bytes = 0;
      DType dt = DType::F32;
      switch (t.type) {
        case 0: bytes = std::uint64_t(n) * 4, dt = DType::F32; break;
        case 1: bytes = std::uint64_t(n) * 2, dt = DType::F16; break;
        case 30: bytes = std::uint64_t(n) * 2, dt = DType::BF16; break;
        case 8:
          if (t.ne[0] % 32 != 0) fail(path, ": Q8_0 tensor '", t.name, "' has rows of ", t.ne[0], " (not a multiple of 32)");
          bytes = std::uint64_t(n) / 32 * 34, dt = DType::F32;
          break;
        default: fail(path, ": tensor '", t.name, "' has ggml type ", t.type, " (F32, F16, BF16 and Q8_0 are read)");
      }
      if (t.offset % align != 0 || t.offset > b.size() || data > b.size() || bytes > b.size() - data ||
          t.offset > b.size() - data - bytes)
        fail(path, ": tensor '", t.name, "' (", bytes, " bytes at offset ", t.offset, ") lies outside the file (",
             b.size(), " bytes)");
      const std::uint8_t* src = b.data() + data + t.offset;
      if (t.name == "rope_freqs.weight") {  // Llama 3 RoPE: what each rotary frequency is divided by
        if (t.type != 0 || t.ne.size() != 1 || t.ne[0] != hd / 2)
          fail(path, ": tensor 'rope_freqs.weight' must hold ", hd / 2, " F32 values (half the head size ", hd, ")");
        g.rope_freq_factors_.resize(std::size_t(hd / 2));
        std::memcpy(g.rope_freq_factors_.data(), src, bytes);
        for (std::size_t i = 0; i < g.rope_freq_factors_.size(); ++i)
          if (!(std::isfinite(g.rope_freq_factors_[i]) && g.rope_freq_factors_[i] > 0.f))
            fail(path, ": rope_freqs.weight[", i, "] (", g.rope_freq_factors_[i], ") is not a positive factor");
        continue;
      }
      const std::string hf = hf_name(t.name, path);
      std::vector<std::int64_t> shape(t.ne.rbegin(), t.ne.rend());  // PyTorch order
      if (t.name == "token_embd.weight") vocab = shape[0];
      if (t.name == "output.weight") has_output = true;
      std::vector<std::uint8_t> buf;
      if (t.type == 8) {  // Q8_0: blocks of 32: fp16 scale, 32 int8
        buf.resize(std::size_t(n) * 4);
        for (std::int64_t blk = 0; blk < n / 32; ++blk) {
          fp16 d;
          std::memcpy(&d, src + blk * 34, 2);
          for (int i = 0; i < 32; ++i) {
            const float v = to_float(d) * float(static_cast<std::int8_t>(src[blk * 34 + 2 + i]));
            std::memcpy(buf.data() + (blk * 32 + i) * 4, &v, 4);
          }
        }
      } else {
        buf.assign(src, src + bytes);
      }
      const bool perm = arch == "llama" && (t.name.find(".attn_q.") != std::string::npos || t.name.find(".attn_k.") != std::string::npos);
      if (perm) {  // un-permute the rows: HF row r sits at row gguf_permute_row(r)
        const std::size_t es = dtype_size(dt), row = std::size_t(shape.size() == 2 ? shape[1] : 1) * es;
        if (shape[0] % hd != 0) fail(path, ": tensor '", t.name, "' has ", shape[0], " rows, not a multiple of head_dim ", hd);
        std::vector<std::uint8_t> un(buf.size());
        for (index_t r0 = 0; r0 < shape[0]; ++r0)
          std::memcpy(un.data() + std::size_t(r0) * row, buf.data() + std::size_t(gguf_permute_row(r0, hd)) * row, row);
        buf.swap(un);
      }
      bufs.push_back(std::move(buf));
      outs.push_back({hf, dt, shape, bufs.back().data()});
    }
    if (vocab < 0) fail(path, ": no token_embd.weight");
    g.config_["vocab_size"] = vocab;
    g.config_["tie_word_embeddings"] = !has_output;
    for (const auto& o : outs) {  // biases the loaders must expect
      if (o.name.find("self_attn.q_proj.bias") != std::string::npos) g.config_["attention_bias"] = true;
      if (o.name.find("mlp.gate_proj.bias") != std::string::npos) g.config_["mlp_bias"] = true;
    }
    g.tensors_ = std::make_shared<SafeTensors>(SafeTensors::from_bytes(to_safetensors_bytes(outs), path));
    return g;
  }

  /// The config.json this file stands for.
  const nlohmann::json& config() const noexcept { return config_; }
  /// Its tensors, Hugging Face names and layout.
  const SafeTensors& tensors() const noexcept { return *tensors_; }
  /// The file.
  const std::string& path() const noexcept { return path_; }
  /// Llama 3 RoPE as llama.cpp stores it (tensor `rope_freqs`): rotary frequency i is divided by
  /// factor i (RopeConfig::freq_factors); empty when the file has none. Not a config.json key.
  const std::vector<float>& rope_freq_factors() const noexcept { return rope_freq_factors_; }

 private:
  struct Reader {
    const std::uint8_t* p;
    std::size_t n;
    const std::string& path;
    std::size_t at = 0;
    template <class T>
    T get(const char* what) {
      if (n - at < sizeof(T)) fail(path, ": the file ends inside ", what, " (", n, " bytes)");
      T v;
      std::memcpy(&v, p + at, sizeof(T));
      at += sizeof(T);
      return v;
    }
    std::string str(const char* what) {
      const auto len = get<std::uint64_t>(what);
      if (len > n - at || len > (1u << 20)) fail(path, ": ", what, " of ", len, " bytes does not fit in the file");
      std::string s(reinterpret_cast<const char*>(p + at), std::size_t(len));
      at += std::size_t(len);
      return s;
    }
    nlohmann::json value(std::uint32_t type, const std::string& key, int depth) {
      switch (type) {
        case 0: return get<std::uint8_t>(key.c_str());
        case 1: return get<std::int8_t>(key.c_str());
        case 2: return get<std::uint16_t>(key.c_str());
        case 3: return get<std::int16_t>(key.c_str());
        case 4: return get<std::uint32_t>(key.c_str());
        case 5: return get<std::int32_t>(key.c_str());
        case 6: return get<float>(key.c_str());
        case 7: return get<std::uint8_t>(key.c_str()) != 0;
        case 8: return str(key.c_str());
        case 10: return get<std::uint64_t>(key.c_str());
        case 11: return get<std::int64_t>(key.c_str());
        case 12: return get<double>(key.c_str());
        case 9: {
          if (depth > 0) fail(path, ": key '", key, "' holds nested arrays");
          const auto et = get<std::uint32_t>(key.c_str());
          const auto count = get<std::uint64_t>(key.c_str());
          if (count > n - at) fail(path, ": key '", key, "' has ", count, " elements, more than the file holds");
          nlohmann::json a = nlohmann::json::array();
          for (std::uint64_t i = 0; i < count; ++i) a.push_back(value(et, key, depth + 1));
          return a;
        }
        default: fail(path, ": key '", key, "' has value type ", type);
      }
    }
  };

  static std::string hf_name(const std::string& g, const std::string& path) {
    static const std::map<std::string, std::string> top{{"token_embd.weight", "model.embed_tokens.weight"},
                                                        {"output_norm.weight", "model.norm.weight"},
                                                        {"output.weight", "lm_head.weight"}};
    if (auto it = top.find(g); it != top.end()) return it->second;
    static const std::map<std::string, std::string> blk{
        {"attn_norm.weight", "input_layernorm.weight"},       {"ffn_norm.weight", "post_attention_layernorm.weight"},
        {"attn_q.weight", "self_attn.q_proj.weight"},         {"attn_k.weight", "self_attn.k_proj.weight"},
        {"attn_v.weight", "self_attn.v_proj.weight"},         {"attn_output.weight", "self_attn.o_proj.weight"},
        {"attn_q.bias", "self_attn.q_proj.bias"},             {"attn_k.bias", "self_attn.k_proj.bias"},
        {"attn_v.bias", "self_attn.v_proj.bias"},             {"attn_output.bias", "self_attn.o_proj.bias"},
        {"attn_q_norm.weight", "self_attn.q_norm.weight"},    {"attn_k_norm.weight", "self_attn.k_norm.weight"},
        {"ffn_gate.weight", "mlp.gate_proj.weight"},          {"ffn_up.weight", "mlp.up_proj.weight"},
        {"ffn_down.weight", "mlp.down_proj.weight"},          {"ffn_gate.bias", "mlp.gate_proj.bias"},
        {"ffn_up.bias", "mlp.up_proj.bias"},                  {"ffn_down.bias", "mlp.down_proj.bias"}};
    if (g.compare(0, 4, "blk.") == 0) {
      const auto dot = g.find('.', 4);
      if (dot != std::string::npos && dot > 4 && g.find_first_not_of("0123456789", 4) == dot)
        if (auto it = blk.find(g.substr(dot + 1)); it != blk.end())
          return "model.layers." + g.substr(4, dot - 4) + "." + it->second;
    }
    fail(path, ": tensor '", g, "' is not one this reader maps (llama, qwen2, qwen3 tensors)");
  }

  static nlohmann::json config_of(const nlohmann::json& meta, const std::string& path) {
    if (!meta.contains("general.architecture") || !meta["general.architecture"].is_string())
      fail(path, ": no general.architecture");
    const std::string arch = meta["general.architecture"].get<std::string>();
    static const std::map<std::string, std::pair<std::string, std::string>> kArch{
        {"llama", {"LlamaForCausalLM", "llama"}}, {"qwen2", {"Qwen2ForCausalLM", "qwen2"}},
        {"qwen3", {"Qwen3ForCausalLM", "qwen3"}}};
    auto a = kArch.find(arch);
    if (a == kArch.end()) fail(path, ": GGUF architecture '", arch, "' is not read (llama, qwen2, qwen3 are)");
    const std::string p = arch + ".";
    static const std::set<std::string> known{
        "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.dimension_count",
        "rope.freq_base", "attention.layer_norm_rms_epsilon", "vocab_size", "rope.scaling.type",
        "rope.scaling.factor"};
    for (auto it = meta.begin(); it != meta.end(); ++it)
      if (it.key().compare(0, p.size(), p) == 0 && !known.count(it.key().substr(p.size())))
        fail(path, ": GGUF key '", it.key(), "' is not one this reader implements (it may change the computation)");
    auto num = [&](const std::string& k, bool required, double fallback) -> double {
      if (!meta.contains(p + k)) {
        if (required) fail(path, ": missing GGUF key '", p + k, "'");
        return fallback;
      }
      if (!meta[p + k].is_number()) fail(path, ": GGUF key '", p + k, "' is not a number");
      const double v = meta[p + k].get<double>();  // finite and in range before any integer cast
      if (!std::isfinite(v) || std::abs(v) > 9007199254740992.0)
        fail(path, ": GGUF key '", p + k, "' (", v, ") is not a finite number in range");
      return v;
    };
    nlohmann::json c;
    c["architectures"] = {a->second.first};
    c["model_type"] = a->second.second;
    c["hidden_size"] = index_t(num("embedding_length", true, 0));
    c["num_hidden_layers"] = index_t(num("block_count", true, 0));
    c["intermediate_size"] = index_t(num("feed_forward_length", true, 0));
    const auto heads = index_t(num("attention.head_count", true, 0));
    c["num_attention_heads"] = heads;
    c["num_key_value_heads"] = index_t(num("attention.head_count_kv", false, double(heads)));
    const auto hd = index_t(num("attention.key_length", false, heads > 0 ? num("embedding_length", true, 0) / double(heads) : 0));
    if (hd <= 0 || hd % 2 != 0)  // RoPE rotates pairs of features (and llama's K rows are permuted in halves)
      fail(path, ": head size ", hd, " is not a positive even number");
    if (index_t(num("attention.value_length", false, double(hd))) != hd)
      fail(path, ": attention.value_length differs from key_length (not supported)");
    if (index_t(num("rope.dimension_count", false, double(hd))) != hd)
      fail(path, ": rope.dimension_count (", num("rope.dimension_count", false, 0), ") is not the head size ", hd,
           " (partial rotary is not read)");
    c["head_dim"] = hd;
    c["rms_norm_eps"] = num("attention.layer_norm_rms_epsilon", true, 0);
    c["rope_theta"] = num("rope.freq_base", false, 10000.0);
    c["max_position_embeddings"] = index_t(num("context_length", false, 4096));
    if (meta.contains(p + "rope.scaling.type")) {
      const auto t = meta[p + "rope.scaling.type"];
      if (!t.is_string() || (t != "none" && t != "linear"))
        fail(path, ": RoPE scaling type ", t.dump(), " is not read (none, linear)");
      if (t == "linear") c["rope_scaling"] = {{"rope_type", "linear"}, {"factor", num("rope.scaling.factor", true, 1)}};
    }
    c["_name_or_path"] = meta.contains("general.name") && meta["general.name"].is_string()
                             ? meta["general.name"].get<std::string>() : std::string();
    return c;
  }

  std::string path_;
  nlohmann::json config_;
  std::shared_ptr<SafeTensors> tensors_;
  std::vector<float> rope_freq_factors_;
};

/// Whether `path` names a GGUF file (a regular file whose name ends in .gguf).
inline bool is_gguf_path(const std::string& path) {
  return path.size() > 5 && path.compare(path.size() - 5, 5, ".gguf") == 0 && !std::filesystem::is_directory(path);
}

}  // namespace ctxcomp::io
