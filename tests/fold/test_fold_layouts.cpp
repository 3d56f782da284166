// Folding in every KV layout (contiguous, cells with holes, paged): a just-closed span moves only
// the tail of a paged cache, a cell fold from the host's list of cells evicts what the scan
// evicts, every sentinel fixture through the host in all three layouts, and paged folding bit
// for bit against contiguous.
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <ctxcomp/io/safetensors.hpp>

#include "common.hpp"
#include "kv_storage.hpp"
#include "sac_driver.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_fold_layouts {

using namespace ctxcomp;
using Catch::Matchers::Contains;
using test::kLayouts;
using test::layer_kv;

TEST_CASE("paged folding of a just-closed span moves only the tail", "[layouts][fold]") {
  const KvShape s{2, 2, 16};
  for (index_t n : {200, 800}) {
    host::PagedStorage<fp16> st(s, n, 16);
    // Stream: ordinary tokens, then <CL> + 18 inner + <CR> at the very end.
    std::vector<std::int64_t> ids(std::size_t(n), 5);
    ids[std::size_t(n - 20)] = 1, ids[std::size_t(n - 1)] = 2;
    fold::SpanTracker spans(1, 2);
    std::vector<std::int64_t> pos(ids.size());
    spans.push(ids.data(), n, pos.data());
    std::vector<index_t> idx(ids.size()), slots(ids.size());
    std::iota(idx.begin(), idx.end(), 0);
    st.kv.append(n, pos.data(), idx.data(), slots.data());
    EvictStats es;
    CHECK(fold::fold(st.kv, spans, 0, &es) == 19);
    // Only the <CR> row moved: 1 token x kv_heads x (K, V) x layers.
    CHECK(es.bytes_moved == std::size_t(1 * 2 * 2 * 2 * 16) * sizeof(fp16));
    CHECK(st.kv.size() == n - 19);
    CHECK(es.pages_freed == (n + 15) / 16 - (n - 19 + 15) / 16);
  }
}

TEST_CASE("cell folding from the host's list of cells evicts what the scan evicts", "[layouts][fold][cells]") {
  // Two identical cell caches take the same stream in pieces, with spans folded as they close:
  // one by fold's scan of every cell, the other by the cells the host's appends returned (listed
  // shuffled, with repeats and with cells that must stay). Cells freed by a fold are reused, so
  // logical order is not cell order.
  const KvShape s{2, 2, 16};
  const index_t n = 100, cells_n = 72;
  std::vector<std::int64_t> ids(std::size_t(n), 5);
  for (auto [b, e] : {std::pair<index_t, index_t>{10, 20}, {30, 45}, {60, 65}, {80, 99}})
    ids[std::size_t(b)] = 1, ids[std::size_t(e)] = 2;
  host::CellStorage<float> a(s, cells_n), b(s, cells_n);
  fold::SpanTracker spans(1, 2);
  std::vector<index_t> cell_of(std::size_t(n), -1);
  std::mt19937 g(3);
  std::int32_t unfolded = 0;
  index_t folded = 0;
  for (index_t first = 0; first < n; first += 7) {
    const index_t m = std::min<index_t>(7, n - first);
    const auto mm = static_cast<std::size_t>(m);
    std::vector<std::int64_t> pos(mm);
    std::vector<index_t> idx(mm), sa(mm), sb(mm);
    spans.push(ids.data() + first, m, pos.data());
    std::iota(idx.begin(), idx.end(), first);
    a.kv.append(m, pos.data(), idx.data(), sa.data());
    b.kv.append(m, pos.data(), idx.data(), sb.data());
    REQUIRE(sa == sb);
    for (index_t i = 0; i < m; ++i) cell_of[std::size_t(first + i)] = sb[std::size_t(i)];
    if (spans.closed_spans() == unfolded) continue;
    std::vector<index_t> list(cell_of.begin() + spans.span_begin(unfolded), cell_of.begin() + first + m);
    list.push_back(list.front());                  // a repeat
    list.push_back(cell_of[std::size_t(first)]);   // the piece's first token: kept unless evictable
    list.push_back(cell_of[0]);                    // an ordinary token before the span: kept
    std::shuffle(list.begin(), list.end(), g);
    EvictStats ea, eb;
    const index_t got_a = fold::fold(a.kv, spans, unfolded, &ea);
    const index_t got_b = fold::fold(b.kv, spans, unfolded, list.data(), index_t(list.size()), &eb);
    CHECK(got_a == got_b);
    CHECK(ea.tokens == eb.tokens);
    CHECK(eb.bytes_moved == 0);
    CHECK(a.pos == b.pos);
    CHECK(a.kv.size() == b.kv.size());
    folded += got_b;
    unfolded = spans.closed_spans();
  }
  CHECK(folded == 10 + 15 + 5 + 19);
  const auto order = kv::logical_order(b.kv);
  CHECK_FALSE(std::is_sorted(order.begin(), order.end()));

  // A list that leaves out an evictable cell leaves that cell live; a cell outside the cache is
  // an error that evicts nothing.
  host::CellStorage<float> c(s, 40);
  fold::SpanTracker sc(1, 2);
  std::vector<std::int64_t> cid(30, 5), cpos(cid.size());
  cid[20] = 1, cid[29] = 2;
  sc.push(cid.data(), 30, cpos.data());
  std::vector<index_t> cidx(cid.size()), slots(cid.size());
  std::iota(cidx.begin(), cidx.end(), 0);
  c.kv.append(30, cpos.data(), cidx.data(), slots.data());
  const auto before = c.pos;
  for (index_t bad : {index_t(-1), index_t(40)}) {
    const index_t list[] = {20, bad, 21};
    CHECK_THROWS_WITH(fold::fold(c.kv, sc, 0, list, 3), Contains("listed cell") && Contains("outside the 40 cells"));
    CHECK(c.pos == before);
    CHECK(c.kv.size() == 30);
  }
  CHECK_THROWS_WITH(fold::fold(c.kv, sc, 0, nullptr, 2), Contains("2 cells listed in a null array"));
  CHECK_THROWS_WITH(fold::fold(c.kv, sc, 0, slots.data(), -1), Contains("negative count of listed cells (-1)"));
  CHECK(c.pos == before);
  std::vector<index_t> partial(slots.begin() + 20, slots.end());
  partial.erase(partial.begin() + 3);  // token 23's cell is not listed
  CHECK(fold::fold(c.kv, sc, 0, partial.data(), index_t(partial.size())) == 8);
  CHECK(c.kv.live(slots[23]));
  CHECK(c.kv.size() == 22);
  CHECK(fold::fold(c.kv, sc, 0, &slots[23], 1) == 1);  // folding again takes the rest
  CHECK(c.kv.size() == 21);
}

TEST_CASE("every sentinel fixture through the host in every KV layout", "[layouts][fold][fixtures]") {
  const auto model = host::LlamaModel<float>::load(test::fixtures_dir() + "/models/llama");
  for (const char* c : {"sentinel_one_span", "sentinel_three_spans", "sentinel_span_at_start", "sentinel_adjacent_spans"})
    for (auto layout : kLayouts)
      for (auto schedule : {host::FoldSchedule::EverySpan, host::FoldSchedule::AtEnd}) {
        INFO(c << " in " << host::kv_layout_name(layout) << (schedule == host::FoldSchedule::AtEnd ? ", fold at end" : ""));
        test::check_fold_case(model, test::fixtures_dir() + "/sentinel/" + c + ".safetensors", schedule, layout, 4);
      }
}

TEST_CASE("paged folding is bit-identical to contiguous; cells reuse freed cells", "[layouts][fold]") {
  const auto model = host::LlamaModel<float>::load(test::fixtures_dir() + "/models/llama");
  const auto& c = model.config;
  auto st = io::SafeTensors::open(test::fixtures_dir() + "/sentinel/sentinel_three_spans.safetensors");
  const auto ids = st.read<std::int64_t>("input_ids");
  const index_t n = index_t(ids.size());
  const KvShape s{c.layers, c.kv_heads, c.head_dim};
  host::LlamaHost<float> h(model);
  KvCache<float> contiguous(s.layers, s.kv_heads, s.head_dim, n);
  fold::SpanTracker sa(126, 127, 128), sb(126, 127, 128), sc(126, 127, 128);
  const auto la = host::run_with_folding(h, ids.data(), n, sa, contiguous, host::FoldSchedule::EverySpan);
  for (bool hnd : {false, true}) {
    host::PagedStorage<float> paged(s, n, 3, hnd);
    fold::SpanTracker sp(126, 127, 128);
    const auto lp = host::run_with_folding(h, ids.data(), n, sp, paged.kv, host::FoldSchedule::EverySpan);
    CHECK(lp == la);
    for (index_t l = 0; l < c.layers; ++l) CHECK(test::layer_kv(paged.kv, l, false) == test::layer_kv(contiguous, l, false));
  }
  host::CellStorage<float> cells(s, n);
  const auto lc = host::run_with_folding(h, ids.data(), n, sc, cells.kv, host::FoldSchedule::EverySpan);
  CHECK(test::relative_error(lc.data(), la.data(), la.size()) <= 1e-6);
  // Tokens after the first span went into its freed cells: logical order is not cell order.
  const auto order = kv::logical_order(cells.kv);
  CHECK_FALSE(std::is_sorted(order.begin(), order.end()));
  CHECK(test::kept_tokens(cells.kv) == test::kept_tokens(contiguous));
}

}  // namespace test_fold_layouts
