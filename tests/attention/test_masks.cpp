// Every mask's per-tile answers agree with its per-element answers, on tiles of awkward sizes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <numeric>
#include <random>

#include "common.hpp"

using namespace ctxcomp;

namespace {
template <class Mask>
void check_tiles(const Mask& mask, index_t q_len, index_t kv_len, const char* what) {
  INFO(what);
  mask.check(q_len, kv_len, "test");
  index_t all = 0, none = 0;
  for (index_t tq : {1, 3, 16, 29})
    for (index_t tk : {1, 5, 32, 64})
      for (index_t q0 = 0; q0 < q_len; q0 += tq)
        for (index_t k0 = 0; k0 < kv_len; k0 += tk) {
          const index_t q1 = std::min(q_len, q0 + tq), k1 = std::min(kv_len, k0 + tk);
          const TileVisibility t = mask.tile(q0, q1, k0, k1);
          if (t == TileVisibility::Mixed) continue;
          (t == TileVisibility::All ? all : none)++;
          for (index_t q = q0; q < q1; ++q)
            for (index_t k = k0; k < k1; ++k) REQUIRE(mask.visible(q, k) == (t == TileVisibility::All));
        }
  CHECK(all + none > 0);  // the shortcut is actually taken somewhere
  // The exports for an engine's own kernel: over the whole call and a sub-range, dense (with a
  // row stride wider than the range) and as bits, each element equal to visible().
  struct R {
    index_t q0, q1, k0, k1;
  };
  for (R r : {R{0, q_len, 0, kv_len}, R{q_len / 3, q_len - q_len / 4, kv_len / 5, kv_len - 1}}) {
    const index_t w = r.k1 - r.k0, ld = w + 2, words = (w + 63) / 64 + 1;
    std::vector<float> dense(std::size_t((r.q1 - r.q0) * ld), 7.f);
    std::vector<std::uint64_t> bits(std::size_t((r.q1 - r.q0) * words), ~std::uint64_t(0));
    export_mask(mask, r.q0, r.q1, r.k0, r.k1, dense.data(), ld, 0.f, -INFINITY, 16);
    export_mask_bits(mask, r.q0, r.q1, r.k0, r.k1, bits.data(), words, 16);
    for (index_t q = r.q0; q < r.q1; ++q) {
      const float* row = dense.data() + (q - r.q0) * ld;
      const std::uint64_t* brow = bits.data() + (q - r.q0) * words;
      for (index_t k = r.k0; k < r.k1; ++k) {
        const bool v = mask.visible(q, k), b = (brow[(k - r.k0) / 64] >> ((k - r.k0) % 64)) & 1u;
        REQUIRE(row[k - r.k0] == (v ? 0.f : -INFINITY));
        REQUIRE(b == v);
      }
      REQUIRE(row[w] == 7.f);  // past the range: untouched
      for (index_t k = w; k < 64 * words; ++k) REQUIRE(((brow[k / 64] >> (k % 64)) & 1u) == 0u);
    }
  }
}
}  // namespace

TEST_CASE("per-tile answers agree with per-element answers", "[masks]") {
  check_tiles(Full{}, 50, 70, "full");
  check_tiles(FullBidirectional{}, 50, 50, "bidirectional");
  check_tiles(Causal(0), 130, 130, "causal");
  check_tiles(Causal(17), 61, 78, "causal offset");
  check_tiles(CrossWithCausalTail(40), 9, 49, "cross");
  check_tiles(ChunkDiagonal{24, false, 0}, 61, 61, "chunk");
  check_tiles(ChunkDiagonal{24, true, 5}, 56, 61, "chunk causal");
  std::vector<index_t> anchors{2, 6, 10, 14, 18, 22, 40, 41, 42, 43, 44, 45};
  check_tiles(AnchorBidirectional{anchors.data(), index_t(anchors.size()), 0}, 60, 60, "anchor");
  std::vector<int> ids(120);
  for (int i = 0; i < 120; ++i) ids[std::size_t(i)] = (i % 17 == 3) ? -1 : (i % 17 == 9 ? -2 : i);
  auto roles = sentinel_roles(ids.data(), 120, -1, -2);
  check_tiles(SentinelSpans{roles.data(), 120, 0, nullptr}, 120, 120, "sentinel");
  check_tiles(SentinelSpans{roles.data(), 120, 70, nullptr}, 50, 120, "sentinel offset");
  std::vector<std::uint8_t> dense(40 * 40);
  for (index_t q = 0; q < 40; ++q)
    for (index_t k = 0; k < 40; ++k) dense[std::size_t(q * 40 + k)] = (k <= q) && (k % 7 != 3);
  check_tiles(DenseMask<std::uint8_t>{dense.data(), 40, 40, 40}, 40, 40, "dense");

  // The cell masks over 100 cells: the first 40 hold stream tokens 0..39 in order (whole live
  // tiles), the rest tokens 40..99 in shuffled order, with every 7th cell free and every 5th of
  // another sequence.
  const index_t cells = 100;
  std::vector<std::int64_t> pos(cells);
  std::vector<std::int32_t> seq(cells);
  std::vector<index_t> tok(cells);
  std::iota(tok.begin(), tok.end(), index_t(0));
  std::shuffle(tok.begin() + 40, tok.end(), std::mt19937(11));
  for (index_t c = 0; c < cells; ++c) {
    const bool tail = c >= 40;
    pos[std::size_t(c)] = tail && c % 7 == 3 ? -1 : std::int64_t(tok[std::size_t(c)]);
    seq[std::size_t(c)] = tail && c % 5 == 1 ? 1 : 0;
  }
  const CellMeta meta{pos.data(), seq.data(), cells};
  std::vector<std::int64_t> q_pos(50);
  std::vector<index_t> q_index(50);
  for (index_t q = 0; q < 50; ++q) q_pos[std::size_t(q)] = 2 * q, q_index[std::size_t(q)] = 2 * q + 1;
  check_tiles(CellCausal{meta, q_pos.data(), 50, 0}, 50, cells, "cell causal");
  check_tiles(CellCausal{meta, q_pos.data(), 50, 1}, 50, cells, "cell causal, second sequence");
  check_tiles(CellOrder{meta, tok.data(), q_index.data(), 50, 0}, 50, cells, "cell order");
  check_tiles(CellSentinel{roles.data(), 120, 0, meta, tok.data(), 0}, 120, cells, "cell sentinel");
  check_tiles(CellSentinel{roles.data(), 120, 20, meta, tok.data(), 0}, 100, cells, "cell sentinel offset");
}

TEST_CASE("mask exports refuse bad ranges and strides by name, writing nothing", "[masks][errors]") {
  std::vector<float> out(64, 5.f);
  auto err = [&](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  using Catch::Matchers::Contains;
  CHECK_THAT(err([&] { export_mask(Causal(0), 4, 2, 0, 4, out.data(), 4, 1.f, 0.f); }), Contains("export_mask: rows [4, 2)"));
  CHECK_THAT(err([&] { export_mask(Causal(0), 0, 2, 0, 8, out.data(), 4, 1.f, 0.f); }), Contains("row stride 4 is below the 8"));
  std::uint64_t w = 0;
  CHECK_THAT(err([&] { export_mask_bits(Causal(0), 0, 1, 0, 130, &w, 2); }), Contains("export_mask_bits: row stride 2"));
  std::vector<int> ids{1, -1, 2, -2};
  auto roles = sentinel_roles(ids.data(), 4, -1, -2);  // roles for 4 tokens; a range of 6 keys
  CHECK_THAT(err([&] { export_mask(SentinelSpans{roles.data(), 4, 0, nullptr}, 0, 4, 0, 6, out.data(), 6, 1.f, 0.f); }),
             Contains("export_mask"));
  CHECK(std::all_of(out.begin(), out.end(), [](float x) { return x == 5.f; }));
}

TEST_CASE("count_visible counts the causal triangle", "[masks]") {
  CHECK(count_visible(Causal(0), 100, 100) == 100 * 101 / 2);
  CHECK(count_visible(Causal(10), 5, 15) == 11 + 12 + 13 + 14 + 15);
  CHECK(count_visible(Full{}, 7, 9) == 63);
}

TEST_CASE("sentinel roles reject malformed spans", "[masks][errors]") {
  using Catch::Matchers::Contains;
  std::vector<int> cr_first{1, 2, -2, 3};
  CHECK_THROWS_WITH(sentinel_roles(cr_first.data(), 4, -1, -2), Contains("<CR> at index 2 closes no open span"));
  std::vector<int> nested{-1, 2, -1, 3, -2};
  CHECK_THROWS_WITH(sentinel_roles(nested.data(), 5, -1, -2), Contains("<CL> at index 2"));
  std::vector<int> open_end{1, -1, 2};
  auto roles = sentinel_roles(open_end.data(), 3, -1, -2);
  CHECK(roles[2].role == SpanRole::Inner);
}

#include <ctxcomp/io/safetensors.hpp>

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_attention_masks {

TEST_CASE("SentinelSpans equals the official attention_mask of every sentinel fixture", "[masks][fixtures]") {
  for (const char* c : {"sentinel_one_span", "sentinel_three_spans", "sentinel_span_at_start", "sentinel_adjacent_spans"}) {
    INFO(c);
    auto st = io::SafeTensors::open(test::fixtures_dir() + "/sentinel/" + c + ".safetensors");
    const auto ids = st.read<std::int64_t>("input_ids");
    const auto mask = st.read<std::int64_t>("attention_mask");
    const index_t n = index_t(ids.size());
    REQUIRE(mask.size() == std::size_t(n * n));
    const std::int64_t cl = std::stoll(st.meta("cl_id")), cr = std::stoll(st.meta("cr_id"));
    auto roles = sentinel_roles(ids.data(), n, cl, cr);
    SentinelSpans m{roles.data(), n, 0, nullptr};
    for (index_t q = 0; q < n; ++q)
      for (index_t k = 0; k < n; ++k) REQUIRE(m.visible(q, k) == (mask[std::size_t(q * n + k)] != 0));
    check_tiles(m, n, n, c);
  }
}

}  // namespace test_attention_masks
