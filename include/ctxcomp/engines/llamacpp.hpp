// Stock llama.cpp decodes what ctxcomp compresses, through llama.cpp's public API only (opt-in:
// this header includes <llama.h>; nothing else in ctxcomp depends on it). Tested against
// llama.cpp v0.4.0 (ggml 0.23.0, the release node-llama-cpp@3.21.1 ships).
//
// A compressed cache (any ctxcomp KV layout, fp32 / fp16 / bf16 storage) goes into a
// llama_context as one sequence's saved state (`llama_state_seq_set_data`), and a sequence's
// state comes back as K/V in the checkpoint's own layout. The state blob, packed little-endian:
//   u32 0xaf143cd8, i32 seq_id, u32 n_stream (1); u32 cell_count; per cell i32 pos, u32 n_seq_id
//   (1), i32 seq_id; u32 v_trans, u32 n_layer; per layer K: i32 ggml_type, u64 row bytes, then
//   cell_count rows [kv_head][head_dim] (keys after RoPE); all V layers after all K layers, in
//   K's form (v_trans 0) or as i32 type, u32 element size, u32 n_embd_v_gqa and cell_count
//   elements per feature (v_trans 1, llama.cpp's layout without flash attention).
// llama.cpp checks stream count, layer count, capacity, types and row sizes on loading, not the
// positions: they drive only its mask (a query sees the cells of its sequence whose position is
// at most its own) and the continuity check (the next decode position must be the largest cell
// position + 1). `decode_positions` relabels a compressed cache's positions for that rule; the
// keys keep the rotation of their original positions.
//
// For the llama architecture (Llama, Mistral GGUFs), llama.cpp's converter permutes q/k rows
// within each head (io/gguf.hpp `gguf_permute_row`), so its cached keys are the Hugging Face
// keys permuted the same way: the blob writer applies it and the reader undoes it.
// Quantised caches (q8_0, ...) are refused by name: llama.cpp rotates them (Hadamard) when the
// head size is a multiple of 64, which this writer does not reproduce.
#pragma once
#include <llama.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../core/rows.hpp"
#include "../fold/spans.hpp"
#include "../kv/layout.hpp"

namespace ctxcomp::engines::llamacpp {

inline constexpr std::uint32_t kStateMagic = 0xaf143cd8;  ///< llama.cpp's sequence-state magic

/// What the blob of one sequence of a llama_context looks like: its cache types, V layout, the
/// K permutation of the model's architecture, and the sizes it checks.
struct CacheFormat {
  ggml_type type_k = GGML_TYPE_F32;  ///< the context's type_k
  ggml_type type_v = GGML_TYPE_F32;  ///< the context's type_v
  bool v_trans = true;               ///< V stored transposed (flash attention off)
  bool permute_k = false;            ///< llama architecture: K rows permuted within each head
  index_t layers = 0;                ///< n_layer
  index_t kv_heads = 0;              ///< key/value heads
  index_t head_dim = 0;              ///< key (= value) length
  index_t capacity = 0;              ///< cells one sequence may hold (llama_n_ctx_seq)
};

namespace detail {
inline std::string model_meta(const llama_model* model, const std::string& key) {
  char buf[256];
  const int n = llama_model_meta_val_str(model, key.c_str(), buf, sizeof(buf));
  return n < 0 ? std::string() : std::string(buf);
}
inline std::size_t type_size(ggml_type t, const char* what) {
  switch (t) {
    case GGML_TYPE_F32: return 4;
    case GGML_TYPE_F16: case GGML_TYPE_BF16: return 2;
    default:
      fail("llama.cpp state: ", what, " type ", ggml_type_name(t),
           " is not supported (f32, f16, bf16; quantised caches are rotated by llama.cpp and not written)");
  }
}
inline void put_value(std::uint8_t* dst, ggml_type t, double v) {
  if (t == GGML_TYPE_F32) {
    const float f = static_cast<float>(v);
    std::memcpy(dst, &f, 4);
  } else if (t == GGML_TYPE_F16) {
    const fp16 h = from_float<fp16>(static_cast<float>(v));
    std::memcpy(dst, &h, 2);
  } else {
    const bf16 b = from_float<bf16>(static_cast<float>(v));
    std::memcpy(dst, &b, 2);
  }
}
inline float get_value(const std::uint8_t* src, ggml_type t) {
  if (t == GGML_TYPE_F32) {
    float f;
    std::memcpy(&f, src, 4);
    return f;
  }
  if (t == GGML_TYPE_F16) {
    fp16 h;
    std::memcpy(&h, src, 2);
    return to_float(h);
  }
  bf16 b;
  std::memcpy(&b, src, 2);
  return to_float(b);
}
/// The Hugging Face row that row i of a head holds in llama.cpp's K order: row 2j + a holds
/// row a * head_dim / 2 + j (the inverse of io::gguf_permute_row within a head).
inline index_t hf_row(index_t i, index_t head_dim, bool permute) noexcept {
  return permute ? (i % 2) * (head_dim / 2) + i / 2 : i;
}
template <class T>
void put(std::vector<std::uint8_t>& b, T v) {
  const auto* p = reinterpret_cast<const std::uint8_t*>(&v);
  b.insert(b.end(), p, p + sizeof(T));
}
/// A bounds-checked reader of a blob; errors name the field.
struct Reader {
  const std::uint8_t* p;
  std::size_t n, at = 0;
  template <class T>
  T get(const char* what) {
    if (n - at < sizeof(T)) fail("llama.cpp state: the blob ends inside ", what, " (", n, " bytes)");
    T v;
    std::memcpy(&v, p + at, sizeof(T));
    at += sizeof(T);
    return v;
  }
  const std::uint8_t* bytes(std::size_t k, const char* what) {
    if (n - at < k) fail("llama.cpp state: the blob ends inside ", what, " (", n, " bytes)");
    const std::uint8_t* r = p + at;
    at += k;
    return r;
  }
};
}  // namespace detail

/// The format of `ctx`'s sequence state, from the parameters it was created with. Flash
/// attention must be ENABLED or DISABLED (AUTO decides the V layout at run time).
inline CacheFormat cache_format(const llama_context* ctx, const llama_context_params& params) {
  CTXCOMP_CHECK(ctx != nullptr, "llama.cpp: no context");
  CTXCOMP_CHECK(params.flash_attn_type != LLAMA_FLASH_ATTN_TYPE_AUTO,
                "llama.cpp: flash_attn_type is AUTO; set it to ENABLED or DISABLED (the state's V layout depends on it)");
  const llama_model* model = llama_get_model(ctx);
  CacheFormat f;
  f.type_k = params.type_k, f.type_v = params.type_v;
  detail::type_size(f.type_k, "type_k"), detail::type_size(f.type_v, "type_v");
  f.v_trans = params.flash_attn_type == LLAMA_FLASH_ATTN_TYPE_DISABLED;
  const std::string arch = detail::model_meta(model, "general.architecture");
  f.permute_k = arch == "llama";
  f.layers = llama_model_n_layer(model);
  f.kv_heads = llama_model_n_head_kv(model);
  const std::string kl = detail::model_meta(model, arch + ".attention.key_length");
  f.head_dim = kl.empty() ? llama_model_n_embd(model) / llama_model_n_head(model) : std::stoll(kl);
  f.capacity = llama_n_ctx_seq(ctx);
  return f;
}

/// Positions for a compressed cache whose next query sits at `next`: every cell keeps its own
/// position when that is below `next`, others (and the last cell, so that the largest is
/// `next - 1`, llama.cpp's continuity rule) are relabelled `next - 1`. The mask then lets every
/// later query see every cell; the keys keep the rotation of their original positions.
inline std::vector<std::int64_t> decode_positions(std::vector<std::int64_t> pos, std::int64_t next) {
  CTXCOMP_CHECK(next >= 1, "llama.cpp: the next decode position (", next, ") must be at least 1");
  for (auto& p : pos) p = std::min(p, next - 1);
  if (!pos.empty()) pos.back() = next - 1;
  return pos;
}

namespace detail {
/// The blob of n cells at `positions` for sequence `seq`; get(l, values, h, c, i) gives element
/// i of head h of cell c of layer l in the checkpoint's layout.
template <class Get>
std::vector<std::uint8_t> encode(index_t n, const std::vector<std::int64_t>& positions, llama_seq_id seq,
                                 const CacheFormat& f, const Get& get) {
  CTXCOMP_CHECK(index_t(positions.size()) == n, "llama.cpp state: ", positions.size(), " positions for ", n, " cells");
  CTXCOMP_CHECK(n <= f.capacity, "llama.cpp state: ", n, " cells exceed the context's ", f.capacity,
                " cells per sequence");
  for (std::size_t i = 0; i < positions.size(); ++i)
    CTXCOMP_CHECK(positions[i] >= 0 && positions[i] <= INT32_MAX, "llama.cpp state: position ", positions[i],
                  " of cell ", i, " is out of llama_pos range");
  const std::size_t ek = type_size(f.type_k, "type_k"), ev = type_size(f.type_v, "type_v");
  const index_t hd = f.head_dim, kd = f.kv_heads * hd;
  std::vector<std::uint8_t> b;
  put(b, kStateMagic), put(b, std::int32_t(seq)), put(b, std::uint32_t(1));
  put(b, std::uint32_t(n));
  for (index_t i = 0; i < n; ++i)
    put(b, std::int32_t(positions[std::size_t(i)])), put(b, std::uint32_t(1)), put(b, std::int32_t(seq));
  if (n == 0) return b;
  put(b, std::uint32_t(f.v_trans ? 1 : 0)), put(b, std::uint32_t(f.layers));
  for (index_t l = 0; l < f.layers; ++l) {
    put(b, std::int32_t(f.type_k)), put(b, std::uint64_t(kd * index_t(ek)));
    const std::size_t at = b.size();
    b.resize(at + std::size_t(n * kd) * ek);
    for (index_t c = 0; c < n; ++c)
      for (index_t h = 0; h < f.kv_heads; ++h)
        for (index_t i = 0; i < hd; ++i)
          put_value(b.data() + at + std::size_t(c * kd + h * hd + i) * ek, f.type_k,
                    get(l, false, h, c, hf_row(i, hd, f.permute_k)));
  }
  for (index_t l = 0; l < f.layers; ++l) {
    put(b, std::int32_t(f.type_v));
    if (f.v_trans) {
      put(b, std::uint32_t(ev)), put(b, std::uint32_t(kd));
    } else {
      put(b, std::uint64_t(kd * index_t(ev)));
    }
    const std::size_t at = b.size();
    b.resize(at + std::size_t(n * kd) * ev);
    for (index_t c = 0; c < n; ++c)
      for (index_t h = 0; h < f.kv_heads; ++h)
        for (index_t i = 0; i < hd; ++i) {
          const index_t j = h * hd + i;
          const std::size_t off = f.v_trans ? std::size_t(j * n + c) : std::size_t(c * kd + j);
          put_value(b.data() + at + off * ev, f.type_v, get(l, true, h, c, i));
        }
  }
  return b;
}
}  // namespace detail

/// The state blob of `cache` (any ctxcomp layout; cells in logical order) as sequence `seq` of a
/// context of format `f`, with cell positions `positions` (logical order, one per cell).
template <class Kv>
std::vector<std::uint8_t> encode_state(const Kv& cache, const std::vector<std::int64_t>& positions, llama_seq_id seq,
                                       const CacheFormat& f) {
  const auto k0 = cache.keys(0);
  CTXCOMP_CHECK(cache.layers() == f.layers, "llama.cpp state: the cache has ", cache.layers(),
                " layers, the model ", f.layers);
  CTXCOMP_CHECK(k0.heads == f.kv_heads && k0.head_dim == f.head_dim, "llama.cpp state: the cache has ", k0.heads,
                " kv heads of ", k0.head_dim, ", the model ", f.kv_heads, " of ", f.head_dim);
  const auto order = kv::logical_order(cache);
  std::vector<decltype(cache.keys(0))> keys, values;  // one view per layer, not per element
  for (index_t l = 0; l < f.layers; ++l) keys.push_back(cache.keys(l)), values.push_back(cache.values(l));
  return detail::encode(cache.size(), positions, seq, f, [&](index_t l, bool v, index_t h, index_t c, index_t i) {
    return element_value((v ? values : keys)[std::size_t(l)], h, order[std::size_t(c)], i);
  });
}

/// One sequence's cache as llama.cpp holds it, in the checkpoint's layout: positions, and per
/// layer K and V [kv_heads x cells x head_dim] (K un-permuted), widened to fp32.
struct SequenceState {
  std::vector<std::int64_t> positions;         ///< per cell
  /// Per layer [kv_heads x cells x head_dim].
  ///@{
  std::vector<std::vector<float>> keys, values;
  ///@}
  /// The number of cells.
  index_t cells() const noexcept { return index_t(positions.size()); }
};

/// The blob of `s` (as read_state returns it, positions possibly changed) for sequence `seq`.
inline std::vector<std::uint8_t> encode_state(const SequenceState& s, llama_seq_id seq, const CacheFormat& f) {
  const index_t n = s.cells(), hd = f.head_dim;
  CTXCOMP_CHECK(n == 0 || (index_t(s.keys.size()) == f.layers && index_t(s.values.size()) == f.layers),
                "llama.cpp state: ", s.keys.size(), " layers given, the model has ", f.layers);
  for (index_t l = 0; l < index_t(s.keys.size()); ++l)
    CTXCOMP_CHECK(index_t(s.keys[std::size_t(l)].size()) == n * f.kv_heads * hd &&
                      index_t(s.values[std::size_t(l)].size()) == n * f.kv_heads * hd,
                  "llama.cpp state: layer ", l, " does not hold ", n, " cells of ", f.kv_heads, " x ", hd);
  return detail::encode(n, s.positions, seq, f, [&](index_t l, bool values, index_t h, index_t c, index_t i) {
    return double((values ? s.values : s.keys)[std::size_t(l)][std::size_t((h * n + c) * hd + i)]);
  });
}

/// Parses a state blob of format `f` (errors name the field that does not match). With
/// `with_values` false the blob is only checked: positions are read, K/V are left empty.
inline SequenceState decode_state(const std::uint8_t* data, std::size_t size, const CacheFormat& f,
                                  bool with_values = true) {
  detail::Reader r{data, size};
  const auto magic = r.get<std::uint32_t>("the magic");
  CTXCOMP_CHECK(magic == kStateMagic, "llama.cpp state: magic ", magic, " is not 0xaf143cd8 (", kStateMagic, ")");
  (void)r.get<std::int32_t>("the sequence id");
  const auto streams = r.get<std::uint32_t>("the stream count");
  CTXCOMP_CHECK(streams == 1, "llama.cpp state: ", streams, " streams (one is read)");
  const auto n = r.get<std::uint32_t>("the cell count");
  CTXCOMP_CHECK(index_t(n) <= f.capacity, "llama.cpp state: ", n, " cells exceed the context's ", f.capacity);
  SequenceState s;
  for (std::uint32_t c = 0; c < n; ++c) {
    s.positions.push_back(r.get<std::int32_t>("a cell's position"));
    const auto ns = r.get<std::uint32_t>("a cell's sequence count");
    for (std::uint32_t i = 0; i < ns; ++i) (void)r.get<std::int32_t>("a cell's sequence id");
  }
  if (n == 0) return s;
  const bool v_trans = r.get<std::uint32_t>("v_trans") != 0;
  CTXCOMP_CHECK(v_trans == f.v_trans, "llama.cpp state: v_trans ", v_trans, " but the context's is ", f.v_trans);
  const auto layers = r.get<std::uint32_t>("the layer count");
  CTXCOMP_CHECK(index_t(layers) == f.layers, "llama.cpp state: ", layers, " layers, the model has ", f.layers);
  const index_t hd = f.head_dim, kd = f.kv_heads * hd;
  for (index_t l = 0; l < f.layers; ++l) {
    const auto t = static_cast<ggml_type>(r.get<std::int32_t>("a K type"));
    CTXCOMP_CHECK(t == f.type_k, "llama.cpp state: layer ", l, " K type ", ggml_type_name(t), ", the context's is ",
                  ggml_type_name(f.type_k));
    const std::size_t ek = detail::type_size(t, "K");
    const auto row = r.get<std::uint64_t>("a K row size");
    CTXCOMP_CHECK(row == std::uint64_t(kd) * ek, "llama.cpp state: layer ", l, " K rows of ", row, " bytes, expected ",
                  kd * index_t(ek), " (", f.kv_heads, " heads of ", hd, ")");
    const std::uint8_t* p = r.bytes(std::size_t(n) * row, "the keys");
    if (!with_values) continue;
    std::vector<float> k(std::size_t(n * kd));
    for (index_t c = 0; c < index_t(n); ++c)
      for (index_t h = 0; h < f.kv_heads; ++h)
        for (index_t i = 0; i < hd; ++i)
          k[std::size_t((h * n + c) * hd + detail::hf_row(i, hd, f.permute_k))] =
              detail::get_value(p + std::size_t(c * kd + h * hd + i) * ek, t);
    s.keys.push_back(std::move(k));
  }
  for (index_t l = 0; l < f.layers; ++l) {
    const auto t = static_cast<ggml_type>(r.get<std::int32_t>("a V type"));
    CTXCOMP_CHECK(t == f.type_v, "llama.cpp state: layer ", l, " V type ", ggml_type_name(t), ", the context's is ",
                  ggml_type_name(f.type_v));
    const std::size_t ev = detail::type_size(t, "V");
    if (v_trans) {
      const auto es = r.get<std::uint32_t>("a V element size");
      const auto nv = r.get<std::uint32_t>("a V width");
      CTXCOMP_CHECK(es == ev && index_t(nv) == kd, "llama.cpp state: layer ", l, " V of ", nv, " features of ", es,
                    " bytes, expected ", kd, " of ", ev);
    } else {
      const auto row = r.get<std::uint64_t>("a V row size");
      CTXCOMP_CHECK(row == std::uint64_t(kd) * ev, "llama.cpp state: layer ", l, " V rows of ", row,
                    " bytes, expected ", kd * index_t(ev));
    }
    const std::uint8_t* p = r.bytes(std::size_t(n * kd) * ev, "the values");
    if (!with_values) continue;
    std::vector<float> v(std::size_t(n * kd));
    for (index_t c = 0; c < index_t(n); ++c)
      for (index_t h = 0; h < f.kv_heads; ++h)
        for (index_t i = 0; i < hd; ++i) {
          const index_t j = h * hd + i;
          const std::size_t off = v_trans ? std::size_t(j * index_t(n) + c) : std::size_t(c * kd + j);
          v[std::size_t((h * n + c) * hd + i)] = detail::get_value(p + off * ev, t);
        }
    s.values.push_back(std::move(v));
  }
  CTXCOMP_CHECK(r.at == size, "llama.cpp state: ", size - r.at, " bytes after the last layer");
  return s;
}

/// Loads blob `b` into sequence `seq` of `ctx` (format `f`). The blob is checked against the
/// format first; a blob llama.cpp still refuses leaves the sequence as it was before the call
/// (its previous state is saved and put back). Errors name the mismatch.
inline void load_state(llama_context* ctx, llama_seq_id seq, const std::vector<std::uint8_t>& b, const CacheFormat& f) {
  (void)decode_state(b.data(), b.size(), f, /*with_values=*/false);  // named errors before llama.cpp sees it
  std::vector<std::uint8_t> before(llama_state_seq_get_size(ctx, seq));
  if (!before.empty()) before.resize(llama_state_seq_get_data(ctx, before.data(), before.size(), seq));
  llama_memory_seq_rm(llama_get_memory(ctx), seq, -1, -1);
  if (llama_state_seq_set_data(ctx, b.data(), b.size(), seq) != b.size()) {
    llama_memory_seq_rm(llama_get_memory(ctx), seq, -1, -1);
    if (!before.empty()) llama_state_seq_set_data(ctx, before.data(), before.size(), seq);
    fail("llama.cpp refused the state of sequence ", seq, " (", b.size(), " bytes; see its log)");
  }
}

/// Sequence `seq` of `ctx` as ctxcomp reads it (format `f`).
inline SequenceState read_state(llama_context* ctx, llama_seq_id seq, const CacheFormat& f) {
  std::vector<std::uint8_t> b(llama_state_seq_get_size(ctx, seq));
  b.resize(llama_state_seq_get_data(ctx, b.data(), b.size(), seq));
  return decode_state(b.data(), b.size(), f);
}

/// Runs `n` inputs of sequence `seq` through `ctx` at `positions` — token ids (`ids`) or input
/// embeddings (`embd`, n x n_embd; one of the two) — and writes the logits of every input to
/// `logits` (n x n_vocab; nullptr: none are computed).
inline void decode(llama_context* ctx, llama_seq_id seq, const llama_token* ids, const float* embd, index_t n,
                   const std::int64_t* positions, float* logits) {
  CTXCOMP_CHECK((ids == nullptr) != (embd == nullptr), "llama.cpp decode: give token ids or embeddings, not both");
  CTXCOMP_CHECK(n > 0, "llama.cpp decode: no inputs");
  const llama_model* model = llama_get_model(ctx);
  const index_t d = llama_model_n_embd(model);
  llama_batch batch = llama_batch_init(std::int32_t(n), embd ? std::int32_t(d) : 0, 1);
  struct Free {
    llama_batch& b;
    ~Free() { llama_batch_free(b); }
  } free_batch{batch};
  for (index_t i = 0; i < n; ++i) {
    if (ids) batch.token[i] = ids[i];
    else std::memcpy(batch.embd + i * d, embd + i * d, std::size_t(d) * sizeof(float));
    batch.pos[i] = static_cast<llama_pos>(positions[i]);
    batch.n_seq_id[i] = 1;
    batch.seq_id[i][0] = seq;
    batch.logits[i] = logits != nullptr;
  }
  batch.n_tokens = std::int32_t(n);
  const int rc = llama_decode(ctx, batch);
  CTXCOMP_CHECK(rc == 0, "llama.cpp decode failed (llama_decode returned ", rc, "; see its log)");
  if (!logits) return;
  const index_t vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
  for (index_t i = 0; i < n; ++i) {
    const float* l = llama_get_logits_ith(ctx, std::int32_t(i));
    CTXCOMP_CHECK(l != nullptr, "llama.cpp decode: no logits for input ", i);
    std::copy(l, l + vocab, logits + i * vocab);
  }
}

/// IC-Former's digests (or any soft prompt) as llama.cpp input embeddings: rows [k x n_embd] of
/// sequence `seq` at positions first, first + 1, ...; their logits into `logits` (k x n_vocab)
/// unless null. A batch holds embeddings or tokens, not both: the prompt that follows goes into
/// its own `decode` call, from the returned position on.
inline std::int64_t feed_digests(llama_context* ctx, llama_seq_id seq, const float* digests, index_t k,
                                 std::int64_t first, float* logits = nullptr) {
  std::vector<std::int64_t> pos(static_cast<std::size_t>(k));
  for (index_t i = 0; i < k; ++i) pos[std::size_t(i)] = first + i;
  decode(ctx, seq, nullptr, digests, k, pos.data(), logits);
  return first + k;
}

/// Sentinel-token folding over a llama_context: streams token ids through llama.cpp with the
/// official sentinel mask and position ids (fold::SpanTracker), and evicts every closed span (its
/// `<CL>` and inner tokens) from llama.cpp's cache, keeping the `<CR>` as the span's compact
/// entry. llama.cpp's mask compares positions within a sequence and has no custom mask, so the
/// roles use three sequences of a context created with `kv_unified = true` and `n_seq_max >= 3`:
/// - ordinary tokens and inner tokens go into the main sequence (they see its kept cells and the
///   span's earlier tokens, not the `<CL>`);
/// - a `<CL>` is decoded alone in the first scratch sequence (it sees only itself);
/// - at a `<CR>` (position q), the span's inner cells are copied to the second scratch sequence
///   (`llama_memory_seq_cp`, a range of positions) and read back as state; the first scratch
///   sequence is rewritten as `<CL>` + inner cells with positions min(p, q - 1) (the keys keep
///   their rotation; positions only drive the mask and the continuity rule), and the `<CR>` is
///   decoded there at q (it sees its `<CL>`, its span and itself); then the inner cells leave
///   the main sequence (`llama_memory_seq_rm`), the `<CR>` cell joins it (`seq_cp` of position
///   q) and the scratch sequences are cleared.
/// A fold costs a state round trip of the span only. A span whose `<CR>` sits at position 0
/// (one inner token at the very start of the stream) cannot be relabelled and is an error.
class SentinelFolder {
 public:
  /// Folds over `ctx` (created with `params`: kv_unified, n_seq_max >= 3, flash attention set)
  /// with sentinel ids `cl` / `cr`; `main` holds the stream, `scratch_cl` and `scratch_span` are
  /// used during a fold only (they must be otherwise unused).
  SentinelFolder(llama_context* ctx, const llama_context_params& params, std::int64_t cl, std::int64_t cr,
                 llama_seq_id main = 0, llama_seq_id scratch_cl = 1, llama_seq_id scratch_span = 2)
      : ctx_(ctx), fmt_(cache_format(ctx, params)), tracker_(cl, cr, llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx)))),
        main_(main), s1_(scratch_cl), s2_(scratch_span) {
    CTXCOMP_CHECK(params.kv_unified, "SentinelFolder: the context needs kv_unified = true (spans are copied between "
                                     "sequences by position range)");
    CTXCOMP_CHECK(params.n_seq_max >= 3 && main >= 0 && scratch_cl >= 0 && scratch_span >= 0 &&
                      std::uint32_t(std::max({main, scratch_cl, scratch_span})) < params.n_seq_max &&
                      main != scratch_cl && main != scratch_span && scratch_cl != scratch_span,
                  "SentinelFolder: three distinct sequence ids below n_seq_max (", params.n_seq_max, ") are needed");
  }

  /// Feeds ids[0, n) after what came before; writes the logits of every token to `logits`
  /// (n x n_vocab) and folds each span whose `<CR>` arrives. Errors (a bad stream, a span llama.cpp
  /// cannot hold) name the token; the tracker validates the whole input before anything runs.
  void push(const std::int64_t* ids, index_t n, float* logits) {
    const index_t base = tracker_.size();
    std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
    tracker_.push(ids, n, pos.data());
    const index_t vocab = llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx_)));
    std::vector<llama_token> tok(ids, ids + n);
    index_t i = 0;
    while (i < n) {
      const SpanRole role = tracker_.roles()[std::size_t(base + i)].role;
      if (role == SpanRole::Ordinary || role == SpanRole::Inner) {  // a run into the main sequence
        index_t e = i;
        while (e < n && tracker_.roles()[std::size_t(base + e)].role == role) ++e;
        if (role == SpanRole::Inner && inner_ == 0) first_inner_ = pos[std::size_t(i)];
        if (role == SpanRole::Inner) inner_ += e - i;
        decode(ctx_, main_, tok.data() + i, nullptr, e - i, pos.data() + i, logits + i * vocab);
        i = e;
      } else if (role == SpanRole::Open) {
        llama_memory_seq_rm(llama_get_memory(ctx_), s1_, -1, -1);
        decode(ctx_, s1_, tok.data() + i, nullptr, 1, pos.data() + i, logits + i * vocab);
        inner_ = 0;
        ++i;
      } else {
        close_span(tok[std::size_t(i)], pos[std::size_t(i)], logits + i * vocab, base + i);
        ++i;
      }
    }
  }

  /// The span tracker (roles and positions of everything pushed).
  const fold::SpanTracker& tracker() const noexcept { return tracker_; }
  /// The context's state format.
  const CacheFormat& format() const noexcept { return fmt_; }

 private:
  void close_span(llama_token cr, std::int64_t q, float* logits, index_t at) {
    CTXCOMP_CHECK(q >= 1, "SentinelFolder: the <CR> at token ", at, " has position 0 (a one-token span at the start "
                          "of the stream), which llama.cpp's continuity rule cannot hold");
    llama_memory_t mem = llama_get_memory(ctx_);
    SequenceState span = read_state(ctx_, s1_, fmt_);  // the <CL>
    CTXCOMP_CHECK(span.cells() == 1, "SentinelFolder: scratch sequence ", s1_, " holds ", span.cells(),
                  " cells, expected the <CL> only (is it used elsewhere?)");
    if (inner_ > 0) {
      llama_memory_seq_rm(mem, s2_, -1, -1);
      llama_memory_seq_cp(mem, main_, s2_, static_cast<llama_pos>(first_inner_), static_cast<llama_pos>(q + 1));
      const SequenceState inner = read_state(ctx_, s2_, fmt_);
      llama_memory_seq_rm(mem, s2_, -1, -1);
      CTXCOMP_CHECK(inner.cells() == inner_, "SentinelFolder: the span holds ", inner.cells(), " cells, expected ", inner_);
      std::vector<std::size_t> order(static_cast<std::size_t>(inner.cells()));  // by position
      for (std::size_t c = 0; c < order.size(); ++c) order[c] = c;
      std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return inner.positions[a] < inner.positions[b]; });
      span = concat(span, inner, order);
    }
    for (auto& p : span.positions) p = std::min<std::int64_t>(p, q - 1);
    load_state(ctx_, s1_, encode_state(span, s1_, fmt_), fmt_);
    decode(ctx_, s1_, &cr, nullptr, 1, &q, logits);
    if (inner_ > 0) llama_memory_seq_rm(mem, main_, static_cast<llama_pos>(first_inner_), -1);
    CTXCOMP_CHECK(llama_memory_seq_pos_max(mem, main_) < q, "SentinelFolder: the main sequence holds positions at or "
                                                              "after the <CR>'s (", q, ")");
    llama_memory_seq_cp(mem, s1_, main_, static_cast<llama_pos>(q), static_cast<llama_pos>(q + 1));
    llama_memory_seq_rm(mem, s1_, -1, -1);
    inner_ = 0;
  }

  // `a`'s cells, then `b`'s in `order` (cells per layer [kv_heads x cells x head_dim]).
  SequenceState concat(const SequenceState& a, const SequenceState& b, const std::vector<std::size_t>& order) const {
    const index_t na = a.cells(), nb = b.cells(), n = na + nb, hd = fmt_.head_dim;
    SequenceState s;
    s.positions = a.positions;
    for (std::size_t c : order) s.positions.push_back(b.positions[c]);
    for (int which = 0; which < 2; ++which)
      for (index_t l = 0; l < fmt_.layers; ++l) {
        const auto& xa = (which ? a.values : a.keys)[std::size_t(l)];
        const auto& xb = (which ? b.values : b.keys)[std::size_t(l)];
        std::vector<float> x(static_cast<std::size_t>(fmt_.kv_heads * n * hd));
        for (index_t h = 0; h < fmt_.kv_heads; ++h) {
          std::copy(xa.begin() + (h * na) * hd, xa.begin() + (h * na + na) * hd, x.begin() + (h * n) * hd);
          for (index_t c = 0; c < nb; ++c) {
            const auto src = xb.begin() + (h * nb + index_t(order[std::size_t(c)])) * hd;
            std::copy(src, src + hd, x.begin() + (h * n + na + c) * hd);
          }
        }
        (which ? s.values : s.keys).push_back(std::move(x));
      }
    return s;
  }

  llama_context* ctx_;
  CacheFormat fmt_;
  fold::SpanTracker tracker_;
  llama_seq_id main_, s1_, s2_;
  index_t inner_ = 0;             // inner tokens of the open span so far
  std::int64_t first_inner_ = 0;  // position of its first inner token
};

}  // namespace ctxcomp::engines::llamacpp
