// IC-Former digest-token encoder: learnable digests cross-attend to the context embeddings in a
// small transformer of its own (cost linear in the context length); long contexts are cut into
// equal chunks compressed independently. Layout: context [n x hidden], digests [k x hidden],
// output [k x hidden] (or [chunks*k x hidden]), token-major. Semantics: official
// ICFormer.get_soft_prompt / ICFormerModel, as pinned by tests/data/fixtures/icformer/README.
#pragma once
#include <functional>
#include <vector>

#include "../attention/fused.hpp"
#include "../nn/linear.hpp"
#include "../nn/rmsnorm.hpp"
#include "../nn/rope.hpp"
#include "../nn/swiglu.hpp"

namespace ctxcomp::digest {

/// The encoder's sizes and settings (an official IC-Former config.json).
struct IcformerConfig {
  index_t hidden = 0;  ///< hidden_size (= context_hidden_size: digests live in the LLM's embedding space)
  /// Query heads, key/value heads and the head size.
  ///@{
  index_t heads = 0, kv_heads = 0, head_dim = 0;
  ///@}
  index_t intermediate = 0;               ///< SwiGLU width
  index_t layers = 0;                     ///< encoder layers
  index_t cross_attention_frequency = 1;  ///< layer i is cross-attention iff i % frequency == 0
  index_t num_digests = 0;                ///< num_query_tokens
  float rms_eps = 1e-6f;                  ///< RMSNorm epsilon
  RopeConfig rope{};                      ///< rotary embedding settings

  /// Whether layer `layer` cross-attends to the context.
  bool is_cross(index_t layer) const noexcept { return layer % cross_attention_frequency == 0; }
  /// Checks the sizes (positive, heads a multiple of kv_heads).
  void validate() const {
    CTXCOMP_CHECK(hidden > 0 && heads > 0 && kv_heads > 0 && head_dim > 0 && intermediate > 0 && layers > 0,
                  "IcformerConfig: sizes must be positive (hidden ", hidden, ", heads ", heads, ", kv_heads ", kv_heads,
                  ", head_dim ", head_dim, ", intermediate ", intermediate, ", layers ", layers, ")");
    CTXCOMP_CHECK(heads % kv_heads == 0, "IcformerConfig: heads (", heads, ") is not a multiple of kv_heads (",
                  kv_heads, ")");
    CTXCOMP_CHECK(cross_attention_frequency > 0, "IcformerConfig: cross_attention_frequency (",
                  cross_attention_frequency, ") must be positive");
  }
};

/// One layer's weights (views; PyTorch layouts). A cross-attention layer uses `query_norm` =
/// cross_input_layernorm and `context_norm`; a self-attention layer uses `query_norm` =
/// input_layernorm and no context_norm.
template <class T>
struct IcformerLayerWeights {
  const T* query_norm = nullptr;           ///< [hidden] cross_input_layernorm or input_layernorm
  const T* context_norm = nullptr;         ///< [hidden] context_layernorm (cross-attention layers)
  const T* post_attention_norm = nullptr;  ///< [hidden]
  /// Attention projections (PyTorch layout).
  ///@{
  WeightView<T> q, k, v, o;
  ///@}
  SwiGLUWeights<T> mlp;  ///< the MLP
};

/// All of an encoder's weights (views).
template <class T>
struct IcformerWeights {
  std::vector<IcformerLayerWeights<T>> layers;  ///< one per layer
  const T* final_norm = nullptr;                ///< [hidden] encoder.norm
};

/// Number of chunks and chunk size of the official chunking: chunk_num = ceil(n / max_len),
/// chunk_size = ceil(n / chunk_num); chunk i is [i*size, min((i+1)*size, n)).
struct Chunking {
  /// Number of chunks and tokens per chunk (the last may be shorter).
  ///@{
  index_t count = 0, size = 0;
  ///@}
  /// The chunking of n tokens with chunks of at most max_chunk_len.
  static Chunking of(index_t n, index_t max_chunk_len) {
    CTXCOMP_CHECK(n > 0, "icformer: empty context");
    CTXCOMP_CHECK(max_chunk_len > 0, "icformer: max_chunk_len (", max_chunk_len, ") must be positive");
    Chunking c;
    c.count = (n + max_chunk_len - 1) / max_chunk_len;
    c.size = (n + c.count - 1) / c.count;
    return c;
  }
  /// First token of chunk i.
  index_t begin(index_t i) const noexcept { return i * size; }
  /// Tokens of chunk i of an n-token context.
  index_t length(index_t i, index_t n) const noexcept { return std::min(size, n - i * size); }
};

/// Options of an encoder.
struct IcformerOptions {
  /// Arithmetic of the projections, the MLP and the attention: fp32 (default, the official
  /// results) or bf16 operands with fp32 accumulation (norms, RoPE, softmax, residuals stay fp32;
  /// bf16 weights are read in place, float weights rounded block by block). Bound: docs/bf16.md.
  Compute compute = Compute::fp32;
};

/// The encoder over one set of weights. Holds only scratch; steady-state calls of the same
/// shapes allocate nothing.
template <class T>
class IcformerEncoder {
 public:
  /// An encoder over these weights (checked against the config).
  IcformerEncoder(const IcformerConfig& cfg, IcformerWeights<T> weights, IcformerOptions options = {})
      : cfg_(cfg), w_(std::move(weights)), rope_(cfg.rope, cfg.head_dim), opt_(options) {
    cfg_.validate();
    CTXCOMP_CHECK(index_t(w_.layers.size()) == cfg_.layers, "IcformerEncoder: ", w_.layers.size(),
                  " layer weights for ", cfg_.layers, " layers");
    CTXCOMP_CHECK(w_.final_norm != nullptr, "IcformerEncoder: no final norm weight");
    const index_t qd = cfg_.heads * cfg_.head_dim, kd = cfg_.kv_heads * cfg_.head_dim;
    for (index_t i = 0; i < cfg_.layers; ++i) {
      const auto& l = w_.layers[std::size_t(i)];
      auto shape_ok = [](const WeightView<T>& w, index_t o, index_t in) {
        return w.data && w.out_features == o && w.in_features == in;
      };
      CTXCOMP_CHECK(shape_ok(l.q, qd, cfg_.hidden) && shape_ok(l.k, kd, cfg_.hidden) && shape_ok(l.v, kd, cfg_.hidden) &&
                        shape_ok(l.o, cfg_.hidden, qd),
                    "IcformerEncoder: layer ", i, " attention projections do not match the config");
      CTXCOMP_CHECK(shape_ok(l.mlp.gate, cfg_.intermediate, cfg_.hidden) &&
                        shape_ok(l.mlp.up, cfg_.intermediate, cfg_.hidden) &&
                        shape_ok(l.mlp.down, cfg_.hidden, cfg_.intermediate),
                    "IcformerEncoder: layer ", i, " MLP weights do not match the config");
      CTXCOMP_CHECK(l.query_norm && l.post_attention_norm && (!cfg_.is_cross(i) || l.context_norm),
                    "IcformerEncoder: layer ", i, " lacks a norm weight");
    }
  }

  /// The configuration.
  const IcformerConfig& config() const noexcept { return cfg_; }
  /// The options (compute precision).
  const IcformerOptions& options() const noexcept { return opt_; }
  /// Changes the compute precision of later calls.
  void set_options(const IcformerOptions& options) noexcept { opt_ = options; }

  /// One layer, in place on the digests' hidden states [k x hidden]. Cross-attention layers
  /// take keys/values from [context ; digests] where `digests` are the encoder's INPUT digests
  /// (the official ICFormerModel concatenates once, before the layers), not the hidden states.
  template <class Exec = SerialExecutor>
  void layer(index_t i, MatrixView<const float> context, MatrixView<const float> digests, MatrixView<float> hidden,
             const Exec& exec = {}) {
    CTXCOMP_CHECK(i >= 0 && i < cfg_.layers, "icformer: layer ", i, " out of range [0, ", cfg_.layers, ")");
    check_shapes(context, digests);
    CTXCOMP_CHECK(hidden.rows() == digests.rows() && hidden.cols() == cfg_.hidden, "icformer layer: hidden is ",
                  hidden.rows(), " x ", hidden.cols(), ", expected ", digests.rows(), " x ", cfg_.hidden);
    run_layer(i, context, digests, hidden, exec);
  }

  /// The final RMSNorm, in place.
  void final_norm(MatrixView<float> hidden) const {
    rmsnorm(const_view(hidden), w_.final_norm, cfg_.hidden, cfg_.rms_eps, hidden);
  }

  /// Compresses one context [n x hidden] into out [k x hidden] (k = digests.rows()).
  template <class Exec = SerialExecutor>
  void compress(MatrixView<const float> context, MatrixView<const float> digests, MatrixView<float> out,
                const Exec& exec = {}) {
    check_shapes(context, digests);
    CTXCOMP_CHECK(out.rows() == digests.rows() && out.cols() == cfg_.hidden, "icformer compress: out is ",
                  out.rows(), " x ", out.cols(), ", expected ", digests.rows(), " x ", cfg_.hidden);
    encode(context, digests, out, exec);
  }

  /// Official chunked compression: out [chunks*k x hidden], chunks compressed independently with
  /// the same digests and concatenated in order. `progress(done, total)` after each chunk.
  template <class Exec = SerialExecutor>
  void compress_chunked(MatrixView<const float> context, MatrixView<const float> digests, index_t max_chunk_len,
                        MatrixView<float> out, const Exec& exec = {},
                        const std::function<void(index_t, index_t)>& progress = {}) {
    const Chunking ch = Chunking::of(context.rows(), max_chunk_len);
    check_shapes(context, digests);
    const index_t k = digests.rows();
    CTXCOMP_CHECK(out.rows() == ch.count * k && out.cols() == cfg_.hidden, "icformer compress_chunked: out is ",
                  out.rows(), " x ", out.cols(), ", expected ", ch.count * k, " x ", cfg_.hidden, " (", ch.count,
                  " chunks of ", k, " digests)");
    for (index_t c = 0; c < ch.count; ++c) {
      MatrixView<float> o(out.data() + c * k * out.outerStride(), k, cfg_.hidden, Eigen::OuterStride<>(out.outerStride()));
      MatrixView<const float> ctx(context.data() + ch.begin(c) * context.outerStride(), ch.length(c, context.rows()),
                                  cfg_.hidden, Eigen::OuterStride<>(context.outerStride()));
      encode(ctx, digests, o, exec);
      if (progress) progress(c + 1, ch.count);
    }
  }

 private:
  void check_shapes(const MatrixView<const float>& context, const MatrixView<const float>& digests) const {
    CTXCOMP_CHECK(context.rows() > 0, "icformer: empty context");
    CTXCOMP_CHECK(context.cols() == cfg_.hidden, "icformer: context has ", context.cols(),
                  " features but the encoder's hidden size is ", cfg_.hidden);
    CTXCOMP_CHECK(digests.rows() > 0 && digests.cols() == cfg_.hidden, "icformer: digests are ", digests.rows(), " x ",
                  digests.cols(), ", expected k x ", cfg_.hidden, " with k > 0");
  }

  // Every layer and the final norm over one (checked) context: out starts as the digests.
  template <class Exec>
  void encode(MatrixView<const float> context, MatrixView<const float> digests, MatrixView<float> out,
              const Exec& exec) {
    out = digests;
    for (index_t i = 0; i < cfg_.layers; ++i) run_layer(i, context, digests, out, exec);
    final_norm(out);
  }

  template <class Exec>
  void run_layer(index_t i, MatrixView<const float> context, MatrixView<const float> digests, MatrixView<float> hidden,
                 const Exec& exec) {
    const auto& L = w_.layers[std::size_t(i)];
    const bool cross = cfg_.is_cross(i);
    const index_t k = hidden.rows(), n = cross ? context.rows() : 0, rows = n + k, d = cfg_.hidden;
    const index_t hd = cfg_.head_dim, qd = cfg_.heads * hd, kd = cfg_.kv_heads * hd;
    ws_.reserve(Workspace::bytes_for<float>(rows * d) + Workspace::bytes_for<float>(k * d) +
                Workspace::bytes_for<float>(k * qd) * 2 + Workspace::bytes_for<float>(rows * kd) * 2 +
                Workspace::bytes_for<index_t>(rows));
    float* kv_in = ws_.take<float>(rows * d);  // normed [context ; digests] (cross) or normed digests
    float* q_in = ws_.take<float>(k * d);
    float* q = ws_.take<float>(k * qd);
    float* attn = ws_.take<float>(k * qd);
    float* kb = ws_.take<float>(rows * kd);
    float* vb = ws_.take<float>(rows * kd);
    index_t* pos = ws_.take<index_t>(rows);
    auto kv_in_v = matrix_view(kv_in, rows, d);
    const MatrixView<const float> hidden_c = const_view(hidden);
    if (cross) {
      rmsnorm(context, L.context_norm, d, cfg_.rms_eps, matrix_view(kv_in, n, d));
      rmsnorm(digests, L.context_norm, d, cfg_.rms_eps, matrix_view(kv_in + n * d, k, d));
      rmsnorm(hidden_c, L.query_norm, d, cfg_.rms_eps, matrix_view(q_in, k, d));
    } else {
      rmsnorm(hidden_c, L.query_norm, d, cfg_.rms_eps, kv_in_v);
      std::copy(kv_in, kv_in + k * d, q_in);
    }
    linear(matrix_view<const float>(q_in, k, d), L.q, matrix_view(q, k, qd), lin_ws_, exec, opt_.compute);
    linear(const_view(kv_in_v), L.k, matrix_view(kb, rows, kd), lin_ws_, exec, opt_.compute);
    linear(const_view(kv_in_v), L.v, matrix_view(vb, rows, kd), lin_ws_, exec, opt_.compute);
    // Keys at positions 0..rows-1; the queries take the last k of them (official IC-Former).
    for (index_t j = 0; j < rows; ++j) pos[j] = j;
    auto qh = HeadsView<float>::token_major(q, k, cfg_.heads, hd);
    auto kh = HeadsView<float>::token_major(kb, rows, cfg_.kv_heads, hd);
    auto vh = HeadsView<const float>::token_major(vb, rows, cfg_.kv_heads, hd);
    rope_.apply(qh, pos + n);
    rope_.apply(kh, pos);
    AttentionOptions aopt;
    aopt.compute = opt_.compute;
    attention(HeadsView<const float>(qh), HeadsView<const float>(kh), vh, CrossWithCausalTail(n),
              HeadsView<float>::token_major(attn, k, cfg_.heads, hd), aopt, attn_ws_, exec);
    // Residual: hidden += o_proj(attn). q_in is free again and takes the projection.
    linear(matrix_view<const float>(attn, k, qd), L.o, matrix_view(q_in, k, d), lin_ws_, exec, opt_.compute);
    hidden += matrix_view<const float>(q_in, k, d);
    rmsnorm(hidden_c, L.post_attention_norm, d, cfg_.rms_eps, matrix_view(q_in, k, d));
    swiglu(matrix_view<const float>(q_in, k, d), L.mlp, matrix_view(kv_in, k, d), mlp_ws_, lin_ws_, exec,
           opt_.compute);
    hidden += matrix_view<const float>(kv_in, k, d);
  }

  IcformerConfig cfg_;
  IcformerWeights<T> w_;
  Rope rope_;
  IcformerOptions opt_;
  Workspace ws_, attn_ws_, mlp_ws_, lin_ws_;
};

}  // namespace ctxcomp::digest
