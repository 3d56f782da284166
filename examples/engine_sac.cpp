// An engine compresses a document with SAC into a K/V cache it owns, after a system prompt it
// has already cached, then decodes from the compressed cache. The engine owns everything: one K
// and one V buffer per layer (allocated apart, as llama.cpp and vLLM do), fp16,
// [kv_heads x capacity x head_dim], and per slot a position and a token index.
// ctxcomp::ContiguousKv is only a handle over that memory. The model is demo::SeededLlama
// through examples/llama_host.hpp; an engine calls its own layers where this calls `host`.
// docs/integration.md shows the marked parts ("guide:" comments) as its SAC listing.
//   engine_sac [--quiet]
#include <cstdio>
#include <cstring>

#include "demo.hpp"

using namespace ctxcomp;

int main(int argc, char** argv) {
  const bool verbose = !(argc > 1 && std::strcmp(argv[1], "--quiet") == 0);
  const demo::SeededLlama seeded;  // a small Llama with seeded weights (4 layers, 2 kv heads of 64)
  const auto& c = seeded.model.config;
  host::LlamaHost<float, fp16> host(seeded.model);
  const index_t prefix = 24, n = 300, steps = 8;  // system prompt, document, decoded tokens
  const auto system_ids = demo::seeded_ids(prefix, c.vocab, 3), doc = demo::seeded_ids(n, c.vocab, 11);
  // SAC's learned embeddings (adapter.pt's role_tokens and special_tokens; seeded here).
  demo::SeededWeights learned{{}, 300};
  const index_t max_roles = 32;
  const float* role_tokens = learned.add(max_roles * c.hidden, 0.02f, 0.f);
  const float* special_tokens = learned.add(2 * c.hidden, 0.02f, 0.f);

  // [guide:sac-cache]
  // The engine's cache: a K and a V buffer per layer, fp16, [kv_heads x capacity x head_dim].
  const index_t capacity = 256;
  const KvShape shape{c.layers, c.kv_heads, c.head_dim};
  std::vector<std::vector<fp16>> k(static_cast<std::size_t>(c.layers)), v(k.size());
  std::vector<fp16*> k_layer, v_layer;
  for (std::size_t l = 0; l < k.size(); ++l) {
    k[l].resize(std::size_t(c.kv_heads * capacity * c.head_dim)), v[l].resize(k[l].size());
    k_layer.push_back(k[l].data()), v_layer.push_back(v[l].data());
  }
  KvBuffers<fp16> buffers = KvBuffers<fp16>::head_major(nullptr, nullptr, shape, capacity);  // one layer's strides
  buffers.layer_keys = k_layer.data(), buffers.layer_values = v_layer.data();
  std::vector<std::int64_t> slot_position(static_cast<std::size_t>(capacity));
  std::vector<index_t> slot_token(static_cast<std::size_t>(capacity));  // token index: the order tokens arrived in
  ContiguousKv<fp16> cache(shape, buffers, capacity, slot_position.data(), slot_token.data());
  // [guide:end]

  std::vector<float> x(std::size_t(prefix * c.hidden)), logits(std::size_t(c.vocab));
  std::vector<std::int64_t> pos(static_cast<std::size_t>(prefix));
  std::vector<index_t> idx(static_cast<std::size_t>(prefix));
  for (index_t t = 0; t < prefix; ++t) pos[std::size_t(t)] = t, idx[std::size_t(t)] = t;
  // The system prompt, as the engine caches any prompt: positions and token indices 0 .. prefix-1.
  host.embed(system_ids.data(), prefix, matrix_view(x.data(), prefix, c.hidden));
  host.forward(matrix_view(x.data(), prefix, c.hidden), pos.data(), idx.data(), Causal(0), cache);

  // [guide:sac-compress]
  // The document (n tokens) after the cached system prompt (prefix positions and token indices).
  auto plan = anchor::AnchorPlan::uniform(n, /*chunk_size=*/100, /*ratio=*/4);  // every 4th token per chunk
  plan.set_position_offset(prefix);  // document token t at position prefix + t + 1
  anchor::Compressor<fp16> compressor(c.layers, c.kv_heads, c.head_dim, c.hidden, plan.chunk_size());
  compressor.compress(
      plan, doc.data(), matrix_view<const float>(role_tokens, max_roles, c.hidden), anchor::ChunkMask::Full,
      // embed: x [count x hidden] = the embeddings of ids [count]
      [&](const std::int64_t* ids, index_t count, MatrixView<float> xs) { host.embed(ids, count, xs); },
      // forward: every layer over x (one chunk, x.rows() tokens) with the compressing weights,
      // appending exactly x.rows() K/V rows to `scratch` (the compressor's own KvCache) and
      // attending under `mask` (FullBidirectional or AnchorBidirectional, over scratch's slots)
      [&](MatrixView<float> xs, const std::int64_t* positions, const index_t* token_index, const auto& mask,
          KvCache<fp16>& scratch) { host.forward(xs, positions, token_index, mask, scratch); },
      cache, /*token_base=*/prefix);  // the anchors get token indices prefix + their token
  // [guide:end]
  const index_t after_compress = cache.size();

  // [guide:sac-decode]
  // Decode: the first input is special_tokens[1] at plan.decode_position() (= prefix + n); each
  // input sees every cached entry (system prompt and anchors) and the inputs before it.
  std::vector<std::int64_t> decoded;
  std::vector<std::vector<float>> step_logits;
  std::int64_t position = plan.decode_position();
  index_t token = prefix + n;  // token indices continue after the document's
  for (index_t s = 0; s < steps; ++s, ++position, ++token) {
    auto xs = matrix_view(x.data(), 1, c.hidden);
    if (s == 0) std::copy(special_tokens + c.hidden, special_tokens + 2 * c.hidden, x.begin());
    else host.embed(&decoded.back(), 1, xs);
    host.forward(xs, &position, &token, Causal(cache.size()), cache);
    host.logits(const_view(xs), matrix_view(logits.data(), 1, c.vocab));
    decoded.push_back(demo::argmax(logits.data(), c.vocab));
    step_logits.push_back(logits);
  }
  // [guide:end]

  if (verbose)
    std::printf("engine_sac: %td-token system prompt + %td-token document -> %td cache entries (%td anchors), "
                "%td tokens decoded\n",
                prefix, n, after_compress, after_compress - prefix, steps);

  // The reference: the same steps through the owning KvCache and examples/sac_driver.hpp, the
  // decoded tokens fed back (teacher forcing): the cached K/V and every step's logits compared.
  auto ref = host.make_cache(capacity);
  std::vector<float> xr(std::size_t(prefix * c.hidden));
  host.embed(system_ids.data(), prefix, matrix_view(xr.data(), prefix, c.hidden));
  host.forward(matrix_view(xr.data(), prefix, c.hidden), pos.data(), idx.data(), Causal(0), ref);
  host::sac_compress(host, plan, doc.data(), matrix_view<const float>(role_tokens, max_roles, c.hidden),
                     anchor::ChunkMask::Full, ref);
  const std::vector<std::int64_t> targets(decoded.begin(), decoded.end() - 1);
  const auto ref_logits = host::sac_decode(host, plan, ref, special_tokens + c.hidden, targets.data(), steps - 1);
  bool same_kv = ref.size() == after_compress;
  for (index_t l = 0; l < c.layers && same_kv; ++l)
    for (index_t h = 0; h < c.kv_heads; ++h)
      for (index_t t = 0; t < after_compress; ++t)
        for (index_t i = 0; i < c.head_dim; ++i)
          same_kv = same_kv && element_value(cache.keys(l), h, t, i) == element_value(ref.keys(l), h, t, i) &&
                    element_value(cache.values(l), h, t, i) == element_value(ref.values(l), h, t, i);
  double diff = 0;
  bool same_tokens = true;
  for (index_t s = 0; s < steps; ++s) {
    const float* row = ref_logits.data() + s * c.vocab;
    for (index_t t = 0; t < c.vocab; ++t)
      diff = std::max(diff, double(std::abs(row[t] - step_logits[std::size_t(s)][std::size_t(t)])));
    same_tokens = same_tokens && demo::argmax(row, c.vocab) == decoded[std::size_t(s)];
  }
  std::printf("decoded:");
  for (auto t : decoded) std::printf(" %lld", static_cast<long long>(t));
  std::printf("\nreference (KvCache, sac_compress / sac_decode): cached K/V bit for bit %s, same tokens %s, "
              "max |logit difference| %.3g\n",
              same_kv ? "yes" : "NO", same_tokens ? "yes" : "NO", diff);
  return same_kv && same_tokens && diff <= 1e-3 ? 0 : 1;
}
