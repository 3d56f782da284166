// Compaction, the one routine every compacted layout (ContiguousKv, KvCache, PagedKv) evicts
// with: checks the eviction ranges, finds the runs of kept slots that move left, and moves their
// rows (scales included) in as few block moves as the strides allow, page run by page run for
// paged views.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../core/error.hpp"
#include "../core/kv_views.hpp"
#include "../core/views.hpp"
#include "buffers.hpp"

namespace ctxcomp {

namespace detail {

/// Checks eviction ranges: sorted, disjoint, within [0, limit).
inline void check_ranges(TokenRanges ranges, index_t limit, const char* fn) {
  index_t last = 0;
  for (const auto& r : ranges) {
    CTXCOMP_CHECK(r.begin >= last && r.begin <= r.end && r.end <= limit, fn, ": range [", r.begin, ", ", r.end,
                  ") is out of [0, ", limit, ") or overlaps / precedes the previous range");
    last = r.end;
  }
}

/// The complement of `keep` (strictly increasing slots in [0, limit)) as ranges.
inline std::vector<TokenRange> ranges_outside(const std::vector<index_t>& keep, index_t limit, const char* fn) {
  std::vector<TokenRange> drop;
  index_t next = 0;
  for (std::size_t i = 0; i < keep.size(); ++i) {
    CTXCOMP_CHECK(keep[i] >= next && keep[i] < limit, fn, ": slot ", keep[i], " is out of range or not increasing");
    if (keep[i] > next) drop.push_back({next, keep[i]});
    next = keep[i] + 1;
  }
  if (next < limit) drop.push_back({next, limit});
  return drop;
}

/// Calls move(src, dst, n) for each run of kept slots that must move left when `ranges` (checked)
/// are removed from [0, size); returns the number of slots kept.
template <class F>
index_t for_each_moved_run(TokenRanges ranges, index_t size, F&& move) {
  index_t dst = 0, src = 0;
  for (const auto& r : ranges) {
    if (r.begin > src && src != dst) move(src, dst, r.begin - src);
    dst += r.begin - src;
    src = r.end;
  }
  if (size > src && src != dst) move(src, dst, size - src);
  return dst + (size - src);
}

/// Moves the rows of tokens [src, src + n) of every head to [dst, dst + n) (dst < src, or any
/// non-overlapping pair), scales included, in as few block moves as the strides allow. Paged
/// views are moved page run by page run. Returns the bytes moved.
template <class View>
std::size_t move_tokens(const View& v, index_t src, index_t dst, index_t n) noexcept {
  using T = typename View::element_type;
  const std::size_t row = std::size_t(v.head_dim) * sizeof(T);
  std::size_t bytes = 0;
  while (n > 0) {
    const index_t m = std::min(v.run(src, n), v.run(dst, n));
    if (v.token_stride == v.head_dim || v.heads == 1) {  // each head's rows are one block
      for (index_t h = 0; h < v.heads; ++h)
        if (m == 1 || v.token_stride == v.head_dim) std::memmove(v.row(h, dst), v.row(h, src), std::size_t(m) * row);
        else
          for (index_t t = 0; t < m; ++t) std::memmove(v.row(h, dst + t), v.row(h, src + t), row);
    } else if (v.head_stride == v.head_dim) {  // token-major: a token's heads are one block
      if (v.token_stride == v.heads * v.head_dim)
        std::memmove(v.row(0, dst), v.row(0, src), std::size_t(m) * std::size_t(v.heads) * row);
      else
        for (index_t t = 0; t < m; ++t) std::memmove(v.row(0, dst + t), v.row(0, src + t), std::size_t(v.heads) * row);
    } else {
      for (index_t h = 0; h < v.heads; ++h)
        for (index_t t = 0; t < m; ++t) std::memmove(v.row(h, dst + t), v.row(h, src + t), row);
    }
    bytes += std::size_t(m) * std::size_t(v.heads) * row;
    if constexpr (is_quantized_v<T>) {
      for (index_t h = 0; h < v.heads; ++h)
        for (index_t t = 0; t < m; ++t) v.scale(h, dst + t) = v.scale(h, src + t);
      bytes += std::size_t(m) * std::size_t(v.heads) * sizeof(float);
    }
    src += m, dst += m, n -= m;
  }
  return bytes;
}

/// Compacts a dense (hole-free) layout: removes `ranges` (checked) from every layer's K and V
/// and from the per-slot metadata. Returns the stats; the caller sets its new size.
template <class Kv>
EvictStats compact_dense(Kv& kv, TokenRanges ranges, std::int64_t* pos, index_t* idx) {
  EvictStats st;
  for (index_t l = 0; l < kv.layers(); ++l)
    for (const auto& view : {kv.keys(l), kv.values(l)})
      for_each_moved_run(ranges, kv.size(), [&](index_t src, index_t dst, index_t n) {
        st.bytes_moved += move_tokens(view, src, dst, n);
      });
  const index_t kept = for_each_moved_run(ranges, kv.size(), [&](index_t src, index_t dst, index_t n) {
    std::memmove(pos + dst, pos + src, std::size_t(n) * sizeof(std::int64_t));
    std::memmove(idx + dst, idx + src, std::size_t(n) * sizeof(index_t));
  });
  st.tokens = kv.size() - kept;
  return st;
}

}  // namespace detail

}  // namespace ctxcomp
