// libFuzzer target: fold::SpanTracker over an arbitrary token stream pushed in arbitrary pieces.
// Each byte is a token (0 = <CL>, 1 = <CR>, else ordinary) or, with the high bit, a piece
// boundary. Checked against the definitions, written out here independently of the library:
// - a rejected push leaves the tracker and the position ids untouched, and it is rejected
//   exactly when the piece has a <CR> with no open span or a <CL> inside an open span;
// - positions: ordinary tokens count 0, 1, 2, ...; a sentinel repeats the position of the
//   token before it (0 at the start);
// - the mask (tests/data/fixtures/sentinel/README): a token sees itself; ordinary tokens see
//   earlier ordinary tokens and earlier <CR>; span tokens see the same plus earlier inner tokens
//   of their own span; <CL> sees only itself; <CR> sees its own <CL> and span;
// - SentinelSpans::tile never says All over an invisible pair or None over a visible one;
// - folding while streaming (each accepted piece appended, then the spans it closed folded) in
//   the three KV layouts (contiguous KvCache, CellKv, PagedKv with pages of 3) keeps exactly the
//   tokens that are not <CL> or inner tokens of a closed span, with their K/V; over the cells
//   (freed cells refilled by later pieces), CellSentinel agrees with the definition and its
//   tiles never contradict it.
#include <cstdint>
#include <vector>

#include <ctxcomp/fold/spans.hpp>

namespace {
enum Kind { Ord, Open, Inner, Close };
struct Ref {
  Kind kind;
  int span;
};

bool ref_visible(const std::vector<Ref>& r, std::size_t q, std::size_t k) {
  if (k > q) return false;
  if (k == q) return true;
  const Ref a = r[q], b = r[k];
  const bool pub = b.kind == Ord || b.kind == Close;
  if (a.kind == Open) return false;
  if (a.kind == Close) return (b.kind == Open || b.kind == Inner) && b.span == a.span;
  if (a.kind == Inner) return pub || (b.kind == Inner && b.span == a.span);
  return pub;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > 512) return 0;  // the mask check is quadratic
  using ctxcomp::index_t;
  constexpr std::int64_t kCl = 0, kCr = 1;
  ctxcomp::fold::SpanTracker tracker(kCl, kCr);
  std::vector<Ref> ref;   // accepted tokens, roles by the definition
  std::vector<std::int64_t> pos_ref;
  bool open = false;
  int spans = 0;
  std::int64_t ordinary = 0;
  std::vector<std::int64_t> piece, out;
  std::vector<std::vector<std::int64_t>> accepted_pieces;
  std::size_t i = 0;
  while (i <= size) {
    piece.clear();
    for (; i < size && !(data[i] & 0x80); ++i) piece.push_back(data[i] % 4 == 0 ? kCl : data[i] % 4 == 1 ? kCr : 2 + data[i]);
    ++i;
    // The reference verdict for the piece, on copies of the state.
    bool ok = true, o = open;
    for (auto id : piece) {
      if (id == kCl) ok = ok && !o, o = true;
      else if (id == kCr) ok = ok && o, o = false;
    }
    out.assign(piece.size(), -7);
    const index_t before = tracker.size();
    bool accepted = true;
    try {
      tracker.push(piece.data(), index_t(piece.size()), out.data());
    } catch (const ctxcomp::Error&) {
      accepted = false;
    }
    if (accepted != ok) __builtin_trap();
    if (accepted) accepted_pieces.push_back(piece);
    if (!accepted) {
      if (tracker.size() != before) __builtin_trap();
      for (auto p : out)
        if (p != -7) __builtin_trap();
      continue;
    }
    for (std::size_t t = 0; t < piece.size(); ++t) {
      const auto id = piece[t];
      std::int64_t p;
      if (id == kCl) {
        ref.push_back({Open, spans}), open = true, p = ordinary > 0 ? ordinary - 1 : 0;
      } else if (id == kCr) {
        ref.push_back({Close, spans++}), open = false, p = ordinary > 0 ? ordinary - 1 : 0;
      } else {
        ref.push_back({open ? Inner : Ord, open ? spans : -1}), p = ordinary++;
      }
      if (out[t] != p) __builtin_trap();
    }
  }
  const index_t n = tracker.size();
  if (std::size_t(n) != ref.size() || tracker.span_open() != open || tracker.closed_spans() != spans) __builtin_trap();
  if (n == 0) return 0;
  const ctxcomp::SentinelSpans mask{tracker.roles().data(), n, 0, nullptr};
  for (index_t q = 0; q < n; ++q)
    for (index_t k = 0; k < n; ++k)
      if (mask.visible(q, k) != ref_visible(ref, std::size_t(q), std::size_t(k))) __builtin_trap();
  // Folding while streaming, in every layout (metadata and one K/V element per token).
  {
    using namespace ctxcomp;
    const KvShape shape{1, 1, 1};
    const index_t cap = n + 1, page = 3, pages = (cap + page - 1) / page + 1;
    KvCache<float> contiguous(1, 1, 1, cap);
    std::vector<float> ck(static_cast<std::size_t>(cap)), cv(static_cast<std::size_t>(cap));
    std::vector<std::int64_t> cpos(static_cast<std::size_t>(cap), -1);
    std::vector<index_t> cidx(static_cast<std::size_t>(cap));
    CellKv<float> cells(shape, KvBuffers<float>::token_major(ck.data(), cv.data(), shape, cap), cap, cpos.data(), cidx.data());
    std::vector<float> pk(static_cast<std::size_t>(pages * page)), pv(pk.size());
    std::vector<index_t> free_list(static_cast<std::size_t>(pages)), table(static_cast<std::size_t>(pages)), pidx(static_cast<std::size_t>(pages * page));
    for (index_t p = 0; p < pages; ++p) free_list[std::size_t(p)] = (p ^ 1) < pages ? (p ^ 1) : p;  // pairs swapped
    std::vector<std::int64_t> ppos(pidx.size());
    PagePool pool{free_list.data(), pages, pages};
    PagedKv<float> paged(shape, PagedBuffers<float>::nhd(pk.data(), pv.data(), shape, pages, page), &pool, table.data(),
                         pages, ppos.data(), pidx.data());
    fold::SpanTracker stream(kCl, kCr);
    std::int32_t unfolded = 0;
    auto feed = [&](auto& kv, const std::vector<std::int64_t>& ids, index_t first, const std::int64_t* p) {
      std::vector<index_t> idx(ids.size()), slots(ids.size());
      for (std::size_t t = 0; t < ids.size(); ++t) idx[t] = first + index_t(t);
      kv.append(index_t(ids.size()), p, idx.data(), slots.data());
      for (std::size_t t = 0; t < ids.size(); ++t) {
        const float x = float(first + index_t(t));
        store_row(kv.keys(0), 0, slots[t], &x);
        store_row(kv.values(0), 0, slots[t], &x);
      }
      fold::fold(kv, stream, unfolded);
    };
    for (const auto& pc : accepted_pieces) {
      const index_t first = stream.size();
      std::vector<std::int64_t> p(pc.size());
      stream.push(pc.data(), index_t(pc.size()), p.data());
      feed(contiguous, pc, first, p.data());
      feed(cells, pc, first, p.data());
      feed(paged, pc, first, p.data());
      unfolded = stream.closed_spans();
    }
    std::vector<index_t> expect;
    for (index_t t = 0; t < n; ++t) {
      const Ref r = ref[std::size_t(t)];
      if (!((r.kind == Open || r.kind == Inner) && r.span < spans)) expect.push_back(t);
    }
    auto check = [&](const auto& kv) {
      const auto order = kv::logical_order(kv);
      if (order.size() != expect.size()) __builtin_trap();
      for (std::size_t j = 0; j < order.size(); ++j)
        if (kv.token_index()[order[j]] != expect[j] || kv.keys(0)(0, order[j], 0) != float(expect[j]) ||
            kv.values(0)(0, order[j], 0) != float(expect[j]))
          __builtin_trap();
    };
    check(contiguous);
    check(cells);
    check(paged);
    // CellSentinel over the refilled cells: every stream token as a query against every cell.
    const auto cm = stream.mask(0, cells);
    const index_t slots = cells.slots();
    for (index_t q = 0; q < n; ++q)
      for (index_t k = 0; k < slots; ++k)
        if (cm.visible(q, k) != (cells.live(k) && ref_visible(ref, std::size_t(q), std::size_t(cidx[std::size_t(k)]))))
          __builtin_trap();
    for (index_t q0 = 0; q0 < n; q0 += 4)
      for (index_t k0 = 0; k0 < slots; k0 += 8) {
        const index_t q1 = std::min(n, q0 + 4), k1 = std::min(slots, k0 + 8);
        const auto vis = cm.tile(q0, q1, k0, k1);
        for (index_t q = q0; q < q1; ++q)
          for (index_t k = k0; k < k1; ++k)
            if ((vis == TileVisibility::All && !cm.visible(q, k)) || (vis == TileVisibility::None && cm.visible(q, k)))
              __builtin_trap();
      }
  }
  // Tiles: every tile of a 4 x 8 grid, checked against the elements.
  for (index_t q0 = 0; q0 < n; q0 += 4)
    for (index_t k0 = 0; k0 < n; k0 += 8) {
      const index_t q1 = std::min(n, q0 + 4), k1 = std::min(n, k0 + 8);
      const auto vis = mask.tile(q0, q1, k0, k1);
      for (index_t q = q0; q < q1; ++q)
        for (index_t k = k0; k < k1; ++k) {
          const bool v = ref_visible(ref, std::size_t(q), std::size_t(k));
          if ((vis == ctxcomp::TileVisibility::All && !v) || (vis == ctxcomp::TileVisibility::None && v)) __builtin_trap();
        }
    }
  return 0;
}
