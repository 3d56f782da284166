// Engine-side storage for the three KV layouts (kv/layout.hpp): the buffers and metadata an
// engine would own, and the layout handle over them. The CLI's --kv-layout / --block-size, the
// tests and the examples use it; an engine keeps its own buffers and builds the handles the
// same way.
#pragma once
#include <algorithm>
#include <string>
#include <vector>

#include <ctxcomp/kv/layout.hpp>

namespace ctxcomp::host {

/// How a host keeps its cache.
enum class KvLayout { contiguous, cells, paged };

/// "contiguous", "cells" or "paged".
inline KvLayout parse_kv_layout(const std::string& s) {
  if (s == "contiguous") return KvLayout::contiguous;
  if (s == "cells") return KvLayout::cells;
  if (s == "paged") return KvLayout::paged;
  fail("unknown KV layout '", s, "' (expected contiguous, cells or paged)");
}

/// The name parse_kv_layout reads.
inline const char* kv_layout_name(KvLayout l) noexcept {
  return l == KvLayout::cells ? "cells" : l == KvLayout::paged ? "paged" : "contiguous";
}

/// llama.cpp-style storage: per layer [cells x kv_heads*head_dim] K and V, per cell position
/// (-1: free), token index and sequence id; `kv` is the handle (sequence 0).
template <class C>
struct CellStorage {
  std::vector<C, HugePageAllocator<C>> keys, values;  ///< [layers][cells][kv_heads*head_dim]
  std::vector<float> key_scales, value_scales;   ///< qint8: [layers][cells][kv_heads]
  std::vector<std::int64_t> pos;                 ///< per cell; -1 free
  std::vector<index_t> token_index;              ///< per cell
  std::vector<std::int32_t> seq;                 ///< per cell
  CellKv<C> kv;                                  ///< the layout handle

  CellStorage(KvShape s, index_t cells)
      : keys(std::size_t(s.layers * cells * s.kv_heads * s.head_dim)),
        values(keys.size()),
        key_scales(is_quantized_v<C> ? std::size_t(s.layers * cells * s.kv_heads) : 0),
        value_scales(key_scales.size()),
        pos(std::size_t(cells), -1),
        token_index(std::size_t(cells), 0),
        seq(std::size_t(cells), 0),
        kv(s, KvBuffers<C>::token_major(keys.data(), values.data(), s, cells, key_scales.data(), value_scales.data()),
           cells, pos.data(), token_index.data(), seq.data(), 0) {}
  CellStorage(const CellStorage&) = delete;             // the handle points into the buffers
  CellStorage& operator=(const CellStorage&) = delete;  ///< not copyable
};

/// A paged pool sized for `tokens` tokens in pages of `page_size` (plus `spare_pages`), its free
/// list (shuffled with a fixed seed, so that a sequence's pages are scattered as in a busy
/// engine), one sequence's page table and per-token metadata; `kv` is the handle. `hnd` picks
/// HND pages, else NHD.
template <class C>
struct PagedStorage {
  std::vector<C, HugePageAllocator<C>> keys, values;  ///< the pool
  std::vector<float> key_scales, value_scales;
  std::vector<index_t> free_pages, pages, token_index;
  std::vector<std::int64_t> pos;
  PagePool pool;
  PagedKv<C> kv;

  PagedStorage(KvShape s, index_t tokens, index_t page_size, bool hnd = false, index_t spare_pages = 0)
      : keys(std::size_t(s.layers * pool_pages(tokens, page_size, spare_pages) * page_size * s.kv_heads * s.head_dim)),
        values(keys.size()),
        key_scales(is_quantized_v<C>
                       ? std::size_t(s.layers * pool_pages(tokens, page_size, spare_pages) * page_size * s.kv_heads)
                       : 0),
        value_scales(key_scales.size()),
        free_pages(shuffled(pool_pages(tokens, page_size, spare_pages))),
        pages(std::size_t(pool_pages(tokens, page_size, spare_pages))),
        token_index(std::size_t(pool_pages(tokens, page_size, spare_pages) * page_size)),
        pos(token_index.size()),
        pool{free_pages.data(), index_t(free_pages.size()), index_t(free_pages.size())},
        kv(s, buffers(s, page_size, hnd), &pool, pages.data(), index_t(pages.size()), pos.data(), token_index.data()) {}
  PagedStorage(const PagedStorage&) = delete;             // the handle points into the buffers
  PagedStorage& operator=(const PagedStorage&) = delete;  ///< not copyable

 private:
  static index_t pool_pages(index_t tokens, index_t page_size, index_t spare) {
    CTXCOMP_CHECK(page_size > 0, "paged cache: the block size (", page_size, ") must be positive");
    return std::max<index_t>((tokens + page_size - 1) / page_size, 1) + spare;
  }
  static std::vector<index_t> shuffled(index_t n) {
    std::vector<index_t> p(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) p[std::size_t(i)] = i;
    std::uint64_t x = 0x9E3779B97F4A7C15ull;  // fixed-seed Fisher-Yates (xorshift)
    for (index_t i = n - 1; i > 0; --i) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      std::swap(p[std::size_t(i)], p[std::size_t(x % std::uint64_t(i + 1))]);
    }
    return p;
  }
  PagedBuffers<C> buffers(KvShape s, index_t page_size, bool hnd) {
    const index_t n = index_t(free_pages.size());
    return hnd ? PagedBuffers<C>::hnd(keys.data(), values.data(), s, n, page_size, key_scales.data(), value_scales.data())
               : PagedBuffers<C>::nhd(keys.data(), values.data(), s, n, page_size, key_scales.data(), value_scales.data());
  }
};

/// Calls f(cache) with a fresh, empty cache of `layout` for `tokens` tokens of shape `s` (pages
/// of `block_size` tokens for paged): a KvCache, a CellStorage's CellKv or a PagedStorage's
/// PagedKv.
template <class C, class F>
decltype(auto) with_kv_layout(KvLayout layout, KvShape s, index_t tokens, index_t block_size, F&& f) {
  CTXCOMP_CHECK(block_size > 0, "--block-size (", block_size, ") must be positive");
  switch (layout) {
    case KvLayout::cells: {
      CellStorage<C> st(s, tokens);
      return f(st.kv);
    }
    case KvLayout::paged: {
      PagedStorage<C> st(s, tokens, block_size);
      return f(st.kv);
    }
    case KvLayout::contiguous:
    default: {
      KvCache<C> cache(s.layers, s.kv_heads, s.head_dim, tokens);
      return f(cache);
    }
  }
}

}  // namespace ctxcomp::host
