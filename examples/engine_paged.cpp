// An engine with a paged KV cache (vLLM / FlashInfer style) folds sentinel spans while text
// streams in, then decodes. The engine owns everything: per layer a pool of fp16 pages in NHD
// order ([page][slot][kv_head][head_dim]), the free-page list, the sequence's page table and
// per-token metadata. ctxcomp::PagedKv is only a handle over that memory: appends take pages
// from the free list, folding compacts the tokens after the span through the page table and
// gives the pages it empties back, attention reads K/V through the page table.
//   engine_paged [--quiet]
#include <cstring>

#include "engine_loop.hpp"

using namespace ctxcomp;

int main(int argc, char** argv) {
  const bool verbose = !(argc > 1 && std::strcmp(argv[1], "--quiet") == 0);
  const demo::SeededLlama seeded;  // a small Llama with seeded weights (4 layers, 2 kv heads of 64)
  const auto& c = seeded.model.config;
  const index_t n = 400, steps = 8, piece = 16;
  const auto ids = example::stream_with_spans(n, c.vocab);

  // The engine's pool: 20 pages of 16 tokens (320 tokens), fewer than the stream needs unfolded.
  const index_t page_size = 16, pool_pages = 20;
  const KvShape shape{c.layers, c.kv_heads, c.head_dim};
  // (HugePageAllocator: 2 MB pages where the OS offers them, once the buffers are that large)
  std::vector<fp16, HugePageAllocator<fp16>> k(std::size_t(c.layers * pool_pages * page_size * c.kv_heads * c.head_dim)), v(k.size());
  std::vector<index_t> free_list;
  for (index_t p = 0; p < pool_pages; ++p) free_list.push_back((p * 7) % pool_pages);  // any order
  PagePool pool{free_list.data(), pool_pages, pool_pages};
  std::vector<index_t> page_table(static_cast<std::size_t>(pool_pages));
  std::vector<std::int64_t> positions(std::size_t(pool_pages * page_size));
  std::vector<index_t> token_index(positions.size());
  PagedKv<fp16> cache(shape, PagedBuffers<fp16>::nhd(k.data(), v.data(), shape, pool_pages, page_size), &pool,
                      page_table.data(), pool_pages, positions.data(), token_index.data());

  host::LlamaHost<float, fp16> h(seeded.model);
  std::printf("engine_paged: %td-token stream, pool of %td pages x %td tokens (fp16, NHD)\n", n, pool_pages, page_size);
  const auto r = example::stream_fold_decode(h, cache, ids, piece, steps, verbose);
  std::printf("end: %td tokens folded away; %td tokens in %td pages (last holds %td), %td pages free\n", r.folded,
              cache.size(), cache.page_count(), cache.last_page_len(), pool.free_count);
  return example::compare_with_contiguous<fp16>(seeded.model, ids, piece, steps, r);
}
