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
// - SentinelSpans::tile never says All over an invisible pair or None over a visible one.
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
