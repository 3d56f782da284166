// An engine with a llama.cpp-style cell cache folds sentinel spans while text streams in, then
// decodes. The engine owns everything: per layer one K and one V buffer of [kv_size x
// kv_heads*head_dim] fp16 cells, and per cell its position (-1: free), token index and sequence.
// ctxcomp::CellKv is only a handle over that memory: folding marks the span's cells free (no
// K/V moves; the engine names the cells its appends took since the span's <CL>, so a fold costs
// the span, not a scan of the cells), the next tokens go into the freed cells, and attention
// hides free cells.
//   engine_cells [--quiet]
#include <cstring>

#include "engine_loop.hpp"

using namespace ctxcomp;

int main(int argc, char** argv) {
  const bool verbose = !(argc > 1 && std::strcmp(argv[1], "--quiet") == 0);
  const demo::SeededLlama seeded;  // a small Llama with seeded weights (4 layers, 2 kv heads of 64)
  const auto& c = seeded.model.config;
  const index_t n = 400, steps = 8, piece = 16;
  const auto ids = example::stream_with_spans(n, c.vocab);

  // The engine's cache: far fewer cells than the stream has tokens, since folding frees cells.
  const index_t kv_size = 320;
  const KvShape shape{c.layers, c.kv_heads, c.head_dim};
  // (HugePageAllocator: 2 MB pages where the OS offers them, once the buffers are that large)
  std::vector<fp16, HugePageAllocator<fp16>> k(std::size_t(c.layers * kv_size * c.kv_heads * c.head_dim)), v(k.size());
  std::vector<std::int64_t> cell_pos(static_cast<std::size_t>(kv_size), -1);
  std::vector<index_t> cell_token(static_cast<std::size_t>(kv_size));
  std::vector<std::int32_t> cell_seq(static_cast<std::size_t>(kv_size), 0);
  CellKv<fp16> cache(shape, KvBuffers<fp16>::token_major(k.data(), v.data(), shape, kv_size), kv_size, cell_pos.data(),
                     cell_token.data(), cell_seq.data(), /*seq_id=*/0);

  host::LlamaHost<float, fp16> h(seeded.model);
  std::printf("engine_cells: %td-token stream, %td cells of fp16 K/V\n", n, kv_size);
  const auto r = example::stream_fold_decode(h, cache, ids, piece, steps, verbose);
  index_t holes = 0;
  for (index_t cell = 0; cell < cache.slots(); ++cell) holes += !cache.live(cell);
  std::printf("end: %td tokens folded away; %td live cells, %td free cells below the last live one\n", r.folded,
              cache.size(), holes);
  const EvictStats st = cache.compact();  // optional: dense tiles again
  std::printf("compact(): %zu bytes moved, cells in use now [0, %td)\n", st.bytes_moved, cache.slots());
  return example::compare_with_contiguous<fp16>(seeded.model, ids, piece, steps, r);
}
