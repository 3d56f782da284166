// The KV-layout layer: one small interface over the three ways engines keep a K/V cache, all over
// caller-owned memory (buffers and metadata arrays belong to the engine; a layout object is a
// handle that holds only pointers, strides and counts):
//   ContiguousKv  per layer [kv_heads x capacity x head_dim] (or any strides), compacted by
//                 moving the kept runs (what KvCache owns);
//   CellKv        llama.cpp's cell cache (kv/cells.hpp): eviction marks cells free, appends fill
//                 free cells first, attention masks the holes;
//   PagedKv       vLLM / FlashInfer pages (kv/paged.hpp) through one sequence's page table;
//                 eviction compacts the tail through the table and returns emptied pages.
// Every layout answers the same calls, which the host, `fold::fold` and the SAC compressor are
// written against:
//   layers() kv_heads() head_dim()      shape
//   size()                              cached tokens
//   slots()                             slots attention runs over (cells: up to the last live cell)
//   capacity()                          slots in all
//   keys(l) values(l)                   HeadsView / PagedHeadsView over slots [0, slots())
//   positions() token_index()           per slot (a free cell: position < 0)
//   live(s)                             whether slot s holds a token of this cache
//   append(count, pos, idx, slots_out)  reserves slots (written to slots_out), metadata set;
//                                       on error nothing changes
//   unappend(slots, count)              undoes an append
//   evict(ranges) gather(keep) truncate(n)   drop tokens (slot ranges); return EvictStats
// `has_holes` tells whether slots may be free between live ones (then masks come from the
// layout's own adaptors, see fold::SpanTracker::mask).
// Each kind has its own header (kv/contiguous.hpp, kv/cells.hpp, kv/paged.hpp), on top of the
// slot ranges and buffers (kv/buffers.hpp) and the compaction (kv/compact.hpp). This header
// includes them all and adds what works on any layout.
#pragma once
#include <algorithm>
#include <vector>

#include "buffers.hpp"
#include "cells.hpp"
#include "compact.hpp"
#include "contiguous.hpp"
#include "paged.hpp"

namespace ctxcomp {

namespace kv {

/// The live slots of a cache in logical order (by token index): how to read any layout as a
/// compacted cache (outputs, tests). Allocates; not for hot loops.
template <class Kv>
std::vector<index_t> logical_order(const Kv& cache) {
  std::vector<index_t> s;
  s.reserve(std::size_t(cache.size()));
  for (index_t c = 0; c < cache.slots(); ++c)
    if (cache.live(c)) s.push_back(c);
  const index_t* idx = cache.token_index();
  std::sort(s.begin(), s.end(), [idx](index_t a, index_t b) { return idx[a] < idx[b]; });
  return s;
}

/// Drops every cached token whose logical index is `token_index` or later (undoing decoded
/// tokens in any layout: a compacted cache truncates, a cell cache frees their cells).
template <class Kv>
EvictStats truncate_logical(Kv& cache, index_t token_index) {
  const index_t* idx = cache.token_index();
  if constexpr (!Kv::has_holes) {
    return cache.truncate(index_t(std::lower_bound(idx, idx + cache.size(), token_index) - idx));
  } else {
    RangeCollector drop;
    for (index_t c = 0; c < cache.slots(); ++c)
      if (cache.live(c) && idx[c] >= token_index) drop.add(c);
    return cache.evict(drop.ranges());
  }
}

}  // namespace kv

}  // namespace ctxcomp
