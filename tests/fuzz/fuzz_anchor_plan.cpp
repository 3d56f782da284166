// libFuzzer target: anchor::AnchorPlan from arbitrary sizes and token lists. The first bytes
// give tokens, chunk_size and ratio (int16 / 8, signed: zero and negative values must be errors); the rest
// is a list of anchor tokens for from_tokens. Accepted plans are checked against their
// definition: anchors strictly increasing inside [0, tokens), every chunk's anchors inside the
// chunk and the chunk offsets covering the anchor list in order; uniform() puts the anchors at
// the official positions (first at s + (ratio - 1) / 2, then every ratio-th; the chunk start
// when the chunk is shorter).
#include <cstdint>
#include <cstring>
#include <vector>

#include <ctxcomp/anchor/anchors.hpp>

namespace {
using ctxcomp::index_t;
void check_plan(const ctxcomp::anchor::AnchorPlan& p) {
  const auto& a = p.anchors();
  index_t seen = 0;
  for (index_t c = 0; c < p.chunks(); ++c) {
    const auto ch = p.chunk(c);
    const auto ca = p.chunk_anchors(c);
    if (ch.begin != c * p.chunk_size() || ch.end != std::min(p.tokens(), ch.begin + p.chunk_size())) __builtin_trap();
    if (ca.begin != seen || ca.end < ca.begin) __builtin_trap();
    for (index_t i = ca.begin; i < ca.end; ++i)
      if (a[std::size_t(i)] < ch.begin || a[std::size_t(i)] >= ch.end) __builtin_trap();
    seen = ca.end;
  }
  if (seen != p.anchor_count()) __builtin_trap();
  for (std::size_t i = 1; i < a.size(); ++i)
    if (a[i] <= a[i - 1]) __builtin_trap();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 6) return 0;
  std::int16_t v[3];
  std::memcpy(v, data, sizeof v);
  // Sizes in [-4096, 4096): zero and negative values stay reachable, plans stay small enough
  // for many executions per second.
  const index_t tokens = v[0] / 8, chunk = v[1] / 8, ratio = v[2] / 8;
  try {
    const auto p = ctxcomp::anchor::AnchorPlan::uniform(tokens, chunk, ratio);
    if (tokens <= 0 || chunk <= 0 || ratio <= 0) __builtin_trap();  // must have been refused
    check_plan(p);
    for (index_t c = 0; c < p.chunks(); ++c) {  // the official positions, recomputed
      const auto ch = p.chunk(c);
      std::vector<index_t> want;
      for (index_t t = ch.begin + (ratio - 1) / 2; t < ch.end; t += ratio) want.push_back(t);
      if (want.empty()) want.push_back(ch.begin);
      const auto ca = p.chunk_anchors(c);
      if (std::size_t(ca.end - ca.begin) != want.size()) __builtin_trap();
      for (std::size_t i = 0; i < want.size(); ++i)
        if (p.anchors()[std::size_t(ca.begin) + i] != want[i]) __builtin_trap();
    }
  } catch (const ctxcomp::Error&) {
  }
  std::vector<index_t> list;
  for (std::size_t i = 6; i + 2 <= size; i += 2) {
    std::int16_t t;
    std::memcpy(&t, data + i, 2);
    list.push_back(t / 8);
  }
  try {
    const auto p = ctxcomp::anchor::AnchorPlan::from_tokens(tokens, chunk, list);
    if (tokens <= 0 || chunk <= 0) __builtin_trap();
    check_plan(p);
    if (p.anchors() != list) __builtin_trap();
  } catch (const ctxcomp::Error&) {
  }
  return 0;
}
