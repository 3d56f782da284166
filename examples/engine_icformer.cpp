// An engine answers a question about a context through IC-Former: the encoder turns the
// context's word embeddings into a soft prompt, and the engine's model decodes after it in the
// official layout [pre ; soft prompt ; FT ; prompt ; post] (include/ctxcomp/digest/prompt.hpp),
// continuing a sequence whose system prompt it has already cached. The engine owns its cache:
// one K and one V buffer per layer, bf16, token-major [capacity x kv_heads*head_dim], and per
// slot a position and a token index. The models are demo::SeededLlama and demo::SeededIcformer;
// an engine calls its own layers where this calls `host`.
// docs/integration.md shows the marked parts ("guide:" comments) as its IC-Former listing.
//   engine_icformer [--quiet]
#include <cstdio>
#include <cstring>

#include <ctxcomp/digest/prompt.hpp>

#include "demo.hpp"

using namespace ctxcomp;

namespace {

/// The engine's cache: a K and a V buffer per layer, bf16, token-major.
struct EngineCache {
  std::vector<std::vector<bf16>> k, v;
  std::vector<bf16*> k_layer, v_layer;
  std::vector<std::int64_t> slot_position;
  std::vector<index_t> slot_token;
  ContiguousKv<bf16> kv;

  EngineCache(const KvShape& shape, index_t capacity)
      : k(static_cast<std::size_t>(shape.layers)), v(k.size()), slot_position(static_cast<std::size_t>(capacity)),
        slot_token(static_cast<std::size_t>(capacity)) {
    for (std::size_t l = 0; l < k.size(); ++l) {
      k[l].resize(std::size_t(capacity * shape.kv_heads * shape.head_dim)), v[l].resize(k[l].size());
      k_layer.push_back(k[l].data()), v_layer.push_back(v[l].data());
    }
    auto buffers = KvBuffers<bf16>::token_major(nullptr, nullptr, shape, capacity);  // one layer's strides
    buffers.layer_keys = k_layer.data(), buffers.layer_values = v_layer.data();
    kv = ContiguousKv<bf16>(shape, buffers, capacity, slot_position.data(), slot_token.data());
  }
};

}  // namespace

int main(int argc, char** argv) {
  const bool verbose = !(argc > 1 && std::strcmp(argv[1], "--quiet") == 0);
  const demo::SeededLlama seeded;  // a small Llama with seeded weights (4 layers, 2 kv heads of 64)
  const auto& c = seeded.model.config;
  host::LlamaHost<float, bf16> host(seeded.model);
  const demo::SeededIcformer encoder_weights(c.hidden);  // 2 cross-attention layers, 32 digests
  digest::IcformerEncoder<float> encoder(encoder_weights.config, encoder_weights.weights);
  // param.pt's digest_embeddings [k x hidden] and FT [1 x hidden] (seeded here).
  demo::SeededWeights learned{{}, 202};
  const index_t k = encoder_weights.config.num_digests;
  const float* digest_embeds = learned.add(k * c.hidden, 1.f, 0.f);
  const float* ft = learned.add(c.hidden, 1.f, 0.f);
  // Token ids: with a real tokenizer, pre_ids and post_ids are the official template's
  // "<s>[INST] Response the Prompt based on the below text:\n\n" and "[/INST]".
  const index_t system = 20, n = 700, steps = 8;
  const auto system_ids = demo::seeded_ids(system, c.vocab, 3), context_ids = demo::seeded_ids(n, c.vocab, 11);
  const auto pre_ids = demo::seeded_ids(14, c.vocab, 5), prompt_ids = demo::seeded_ids(9, c.vocab, 7),
             post_ids = demo::seeded_ids(4, c.vocab, 9);
  const KvShape shape{c.layers, c.kv_heads, c.head_dim};
  EngineCache engine(shape, 256);
  ContiguousKv<bf16>& cache = engine.kv;

  std::vector<float> x(std::size_t(256 * c.hidden));
  std::vector<std::int64_t> pos(256);
  std::vector<index_t> idx(256);
  for (index_t t = 0; t < system; ++t) pos[std::size_t(t)] = t, idx[std::size_t(t)] = t;
  // The system prompt, as the engine caches any prompt: positions and token indices 0 .. system-1.
  host.embed(system_ids.data(), system, matrix_view(x.data(), system, c.hidden));
  host.forward(matrix_view(x.data(), system, c.hidden), pos.data(), idx.data(), Causal(0), cache);

  // [guide:icformer-compress]
  // The soft prompt: the context's word embeddings (the decoder's own embedding table) through
  // the encoder, in chunks of at most 512 tokens, k digests each.
  std::vector<float> context(std::size_t(n * c.hidden));
  host.embed(context_ids.data(), n, matrix_view(context.data(), n, c.hidden));
  const index_t chunks = digest::Chunking::of(n, /*max_chunk_len=*/512).count;
  std::vector<float> soft(std::size_t(chunks * k * c.hidden));
  encoder.compress_chunked(matrix_view<const float>(context.data(), n, c.hidden),
                           matrix_view<const float>(digest_embeds, k, c.hidden), 512,
                           matrix_view(soft.data(), chunks * k, c.hidden));
  // [guide:end]

  // [guide:icformer-decode]
  // The decoder's input in the official layout, after the `system` cached positions: one row
  // and one position each, in order (positions lay.position(r), token indices system + r).
  digest::PromptLayout lay;
  lay.offset = system, lay.pre = index_t(pre_ids.size()), lay.soft = chunks * k, lay.marker = 1,
  lay.prompt = index_t(prompt_ids.size()), lay.post = index_t(post_ids.size());
  lay.validate();
  auto write_input = [&](float* in) {  // the lay.rows() input rows, from `in` on
    auto rows = [&](index_t first, index_t count) { return matrix_view(in + first * c.hidden, count, c.hidden); };
    host.embed(pre_ids.data(), lay.pre, rows(0, lay.pre));
    std::copy(soft.begin(), soft.end(), rows(lay.soft_row(), lay.soft).data());
    std::copy(ft, ft + c.hidden, rows(lay.marker_row(), 1).data());
    host.embed(prompt_ids.data(), lay.prompt, rows(lay.prompt_row(), lay.prompt));
    host.embed(post_ids.data(), lay.post, rows(lay.post_row(), lay.post));
  };
  write_input(x.data());
  for (index_t r = 0; r < lay.rows(); ++r) pos[std::size_t(r)] = lay.position(r), idx[std::size_t(r)] = system + r;
  host.forward(matrix_view(x.data(), lay.rows(), c.hidden), pos.data(), idx.data(), Causal(cache.size()), cache);
  std::vector<float> logits(std::size_t(c.vocab));
  host.logits(matrix_view<const float>(x.data() + (lay.rows() - 1) * c.hidden, 1, c.hidden),
              matrix_view(logits.data(), 1, c.vocab));
  // Then the answer, greedily: positions lay.decode_position(), +1, ...
  std::vector<std::int64_t> answer;
  std::int64_t position = lay.decode_position();
  index_t token = system + lay.rows();
  for (index_t s = 0; s < steps; ++s, ++position, ++token) {
    answer.push_back(demo::argmax(logits.data(), c.vocab));
    if (s + 1 == steps) break;
    auto xs = matrix_view(x.data(), 1, c.hidden);
    host.embed(&answer.back(), 1, xs);
    host.forward(xs, &position, &token, Causal(cache.size()), cache);
    host.logits(const_view(xs), matrix_view(logits.data(), 1, c.vocab));
  }
  // [guide:end]

  if (verbose)
    std::printf("engine_icformer: %td-token context -> %td digests (%td chunks); decoder input %td rows at "
                "positions %lld..%lld after a %td-token system prompt\n",
                n, chunks * k, chunks, lay.rows(), static_cast<long long>(lay.position(0)),
                static_cast<long long>(lay.position(lay.rows() - 1)), system);

  // The reference: the whole sequence [system ; layout ; answer] run at once from an empty cache
  // (positions 0, 1, 2, ...): what the official code does with the same embeddings. Both store
  // the same bf16 K/V, so its greedy tokens must be the engine's and its logits differ only by
  // the order of fp32 sums (one call over all rows against one per piece).
  EngineCache whole(shape, 256);
  const index_t total = system + lay.rows() + steps - 1;
  std::vector<float> xw(std::size_t(total * c.hidden));
  host.embed(system_ids.data(), system, matrix_view(xw.data(), system, c.hidden));
  write_input(xw.data() + system * c.hidden);
  host.embed(answer.data(), steps - 1, matrix_view(xw.data() + (system + lay.rows()) * c.hidden, steps - 1, c.hidden));
  std::vector<std::int64_t> pw(static_cast<std::size_t>(total));
  std::vector<index_t> iw(pw.size());
  for (index_t t = 0; t < total; ++t) pw[std::size_t(t)] = t, iw[std::size_t(t)] = t;
  host.forward(matrix_view(xw.data(), total, c.hidden), pw.data(), iw.data(), Causal(0), whole.kv);
  std::vector<float> lw(std::size_t(steps * c.vocab));
  host.logits(matrix_view<const float>(xw.data() + (total - steps) * c.hidden, steps, c.hidden),
              matrix_view(lw.data(), steps, c.vocab));
  bool same = true;
  for (index_t s = 0; s < steps; ++s) same = same && demo::argmax(lw.data() + s * c.vocab, c.vocab) == answer[std::size_t(s)];
  double diff = 0;
  for (index_t t = 0; t < c.vocab; ++t)
    diff = std::max(diff, double(std::abs(lw[std::size_t((steps - 1) * c.vocab + t)] - logits[std::size_t(t)])));
  std::printf("answer:");
  for (auto t : answer) std::printf(" %lld", static_cast<long long>(t));
  std::printf("\nreference (the whole sequence at once, positions from 0): same tokens %s, "
              "max |logit difference| of the last step %.3g\n",
              same ? "yes" : "NO", diff);
  return same && diff <= 1e-3 ? 0 : 1;
}
