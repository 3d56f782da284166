// GGUF v3 writing: a checkpoint directory (Llama, Mistral, Qwen2, Qwen3; F32 / F16 / BF16
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
#include <fstream>
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
    const auto& l = t.rope.llama3;
    RopeConfig plain = t.rope;
    plain.llama3 = {};
    const std::vector<float> f = rope_inv_freq(plain, hd);
    std::vector<float> factors;
    const double low_wavelen = l.original_max_position_embeddings / l.low_freq_factor;
    const double high_wavelen = l.original_max_position_embeddings / l.high_freq_factor;
    for (float x : f) {
      const double wavelen = 2 * 3.14159265358979323846 / double(x);
      if (wavelen < high_wavelen) {
        factors.push_back(1.f);
      } else if (wavelen > low_wavelen) {
        factors.push_back(static_cast<float>(l.factor));
      } else {
        const double smooth = (l.original_max_position_embeddings / wavelen - l.low_freq_factor) /
                              (l.high_freq_factor - l.low_freq_factor);
        factors.push_back(static_cast<float>(1.0 / ((1 - smooth) / l.factor + smooth)));
      }
    }
    w.add_tensor("rope_freqs.weight", {std::int64_t(factors.size())}, factors.data(), GgmlType::f32);
  }
  st.check_all_consumed(a.name, harmless_extra_tensor);
  if (lora) lora->check_all_used(a.name);
  w.write(out);
}

}  // namespace ctxcomp::io
