// The host loop of SAC: compress a context into the anchors' K/V with the reference Llama host
// (optionally with separate compressing layer weights, e.g. LoRA-merged), then decode from the
// compressed cache: special_tokens[1] at position n, then the target tokens at n+1, n+2, ...
// What an engine's own loop would do.
#pragma once
#include <ctxcomp/anchor/compress.hpp>
#include <deque>
#include <filesystem>

#include "llama_host.hpp"

namespace ctxcomp::host {

namespace detail {
/// T in a non-deduced context (so that `nullptr` may be passed for a pointer to T's weights).
template <class T>
struct identity {
  using type = T;  ///< T itself
};
}  // namespace detail

/// The weights of SAC's compressing pass when it has its own LoRA (decoding keeps the model's):
/// the model's layers with q_proj / v_proj replaced by merged copies (fp32 merge from the
/// checkpoint's values, then one conversion to T), for sac_compress's `compress_layers`.
/// `adapter` is SAC's converted adapter.pt (a safetensors file from
/// examples/convert_sac_adapter.py: y = x W^T + 2 x A B, and the anchor and special embeddings)
/// or a PEFT LoRA adapter directory (io/lora.hpp; no embeddings).
template <class T>
class SacCompressingWeights {
 public:
  /// Merges `adapter` into a copy of `model`'s compressing layers.
  static SacCompressingWeights load(const LlamaModel<T>& model, const std::string& adapter) {
    SacCompressingWeights w;
    const auto& c = model.config;
    w.layers_ = model.layers;
    if (std::filesystem::is_directory(adapter)) {  // PEFT: the model loaded again with the adapter merged
      if (model.lora)
        fail(adapter, ": a PEFT adapter for the compressing pass applies to the base checkpoint, which already has "
                      "the LoRA '", model.lora->origin(), "' merged; convert one of them or merge it into the checkpoint");
      w.peft_ = std::make_shared<LlamaModel<T>>(LlamaModel<T>::load(model.store->origin(), adapter));
      w.layers_ = w.peft_->layers;
      return w;
    }
    const io::SacLora sac = io::SacLora::open(adapter);
    if (c.arch.gpt_neox)
      fail(adapter, ": a converted SAC adapter holds q_proj / v_proj LoRA matrices (Llama-family models); ",
           c.arch.name, " has one fused query_key_value instead (a PEFT adapter directory targeting it works)");
    if (sac.layers() > c.layers)
      fail(adapter, ": holds a LoRA for layer ", sac.layers() - 1, ", the model has ", c.layers,
           " layers (an adapter.pt of another model?)");
    if (sac.layers() == 0) fail(adapter, ": holds no LoRA matrices");
    const std::int64_t d = c.hidden, qd = c.heads * c.head_dim, kd = c.kv_heads * c.head_dim;
    for (index_t l = 0; l < c.layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
      for (auto [proj, out] : {std::pair<const char*, std::int64_t>{"q_proj", qd}, {"v_proj", kd}}) {
        std::vector<float> f = model.store->load_f32(p + proj + ".weight", {out, d});
        if (!sac.merge(l, proj, f.data(), out, d)) continue;
        std::vector<T> owned(f.size());
        for (std::size_t i = 0; i < f.size(); ++i) owned[i] = from_float<T>(f[i]);
        WeightView<T>& wv = std::string(proj) == "q_proj" ? w.layers_[std::size_t(l)].q : w.layers_[std::size_t(l)].v;
        wv.data = owned.data();
        w.owned_.push_back(std::move(owned));
      }
    }
    if (sac.has_embeddings()) {
      w.roles_ = sac.matrix("role_tokens", w.role_rows_, w.role_cols_);
      index_t r2 = 0, c2 = 0;
      w.special_ = sac.matrix("special_tokens", r2, c2);
      if (w.role_cols_ != d) fail(adapter, ": role_tokens has ", w.role_cols_, " features, the model's hidden size is ", d);
      if (r2 != 2 || c2 != d) fail(adapter, ": special_tokens must be [2 x ", d, "], found [", r2, " x ", c2, "]");
    }
    return w;
  }

  SacCompressingWeights(SacCompressingWeights&&) noexcept = default;  ///< moves (the merged copies stay put)
  SacCompressingWeights(const SacCompressingWeights&) = delete;
  SacCompressingWeights& operator=(const SacCompressingWeights&) = delete;

  /// The compressing pass's layers (for sac_compress).
  const std::vector<LlamaLayerWeights<T>>& layers() const noexcept { return layers_; }
  /// Whether the adapter brought role_tokens and special_tokens.
  bool has_embeddings() const noexcept { return !roles_.empty(); }
  /// role_tokens [rows x hidden] (empty without).
  MatrixView<const float> role_tokens() const { return matrix_view<const float>(roles_.data(), role_rows_, role_cols_); }
  /// special_tokens [2 x hidden] (empty without).
  const std::vector<float>& special_tokens() const noexcept { return special_; }

 private:
  SacCompressingWeights() = default;
  std::vector<LlamaLayerWeights<T>> layers_;
  std::deque<std::vector<T>> owned_;  // merged q / v (stable addresses)
  std::shared_ptr<LlamaModel<T>> peft_;
  std::vector<float> roles_, special_;
  index_t role_rows_ = 0, role_cols_ = 0;
};

/// Compresses ids [plan.tokens()] into `cache` (appending the anchors). `compress_layers`, when
/// given, replaces the model's layer weights while compressing only; `compute` is the arithmetic
/// of the compressing forward passes (the host's own setting is restored afterwards, also on
/// error). Builds a Compressor (its scratch cache and buffers) per call; an engine compressing
/// repeatedly keeps one instead.
template <class T, class C, class Kv, class Exec = SerialExecutor>
index_t sac_compress(LlamaHost<T, C>& host, const anchor::AnchorPlan& plan, const std::int64_t* ids,
                     MatrixView<const float> role_tokens, anchor::ChunkMask mask, Kv& cache,
                     const Exec& exec = {},
                     const std::vector<LlamaLayerWeights<typename detail::identity<T>::type>>* compress_layers = nullptr,
                     Compute compute = Compute::fp32) {
  const auto& c = host.config();
  const Compute before = host.compute();
  host.set_compute(compute);
  RollbackScope restore([&host, before] { host.set_compute(before); });
  anchor::Compressor<C> comp(c.layers, c.kv_heads, c.head_dim, c.hidden, std::min(plan.chunk_size(), plan.tokens()));
  const index_t kept = comp.compress(
      plan, ids, role_tokens, mask, [&](const std::int64_t* p, index_t n, MatrixView<float> x) { host.embed(p, n, x); },
      [&](MatrixView<float> x, const std::int64_t* pos, const index_t* idx, const auto& m, KvCache<C>& scratch) {
        host.forward(x, pos, idx, m, scratch, exec, compress_layers);
      },
      cache);
  restore.dismiss();
  host.set_compute(before);
  return kept;
}

/// Decodes from a compressed cache of `plan`'s context: inputs [first_embed ; embed(targets)]
/// at positions n, n+1, ..., each seeing the whole cache and the inputs before it. Returns
/// logits [t + 1 x vocab]; the cache (any KV layout) is left holding the compressed context only.
template <class T, class C, class Kv, class Exec = SerialExecutor>
std::vector<float> sac_decode(LlamaHost<T, C>& host, const anchor::AnchorPlan& plan, Kv& cache,
                              const float* first_embed, const std::int64_t* targets, index_t t,
                              const Exec& exec = {}) {
  const auto& c = host.config();
  const index_t m = cache.size(), rows = t + 1;
  CTXCOMP_CHECK(t >= 0, "sac: negative number of target tokens (", t, ")");
  CTXCOMP_CHECK(cache.room() >= rows, "sac: the cache has room for ", cache.room(), " decoded tokens, ", rows,
                " needed");
  std::vector<float> x(std::size_t(rows * c.hidden)), logits(std::size_t(rows * c.vocab));
  std::copy(first_embed, first_embed + c.hidden, x.begin());
  if (t > 0) host.embed(targets, t, matrix_view(x.data() + c.hidden, t, c.hidden));
  std::vector<std::int64_t> pos(static_cast<std::size_t>(rows));
  std::vector<index_t> idx(static_cast<std::size_t>(rows));
  const index_t base = std::max<index_t>(plan.tokens(), cache.last_token_index() + 1);
  for (index_t i = 0; i < rows; ++i) pos[std::size_t(i)] = plan.decode_position() + i, idx[std::size_t(i)] = base + i;
  auto xv = matrix_view(x.data(), rows, c.hidden);
  if constexpr (Kv::has_holes)  // Causal(m) in logical order: the cells' token indices
    host.forward(xv, pos.data(), idx.data(),
                 CellOrder{cache.meta(), cache.token_index(), idx.data(), rows, cache.sequence()}, cache, exec);
  else
    host.forward(xv, pos.data(), idx.data(), Causal(m), cache, exec);
  kv::truncate_logical(cache, base);
  host.logits(const_view(xv), matrix_view(logits.data(), rows, c.vocab), exec);
  return logits;
}

}  // namespace ctxcomp::host
