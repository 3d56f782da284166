// The plan of one attention call (FlashInfer's scheduler, in small): how the queries and keys
// are cut into tiles, tasks and key splits (AttentionTiling), which query rows a task covers
// (TaskGrid, QueryBlock, row groups of masks that split their rows), and the per-worker buffers
// carved from the caller's workspace (AttentionBuffers). Tasks and splits depend on the shapes
// only, never on the thread count, which is what makes results bit-identical for any executor.
#pragma once
#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <utility>

#include "../core/types.hpp"
#include "../core/workspace.hpp"
#include "options.hpp"

namespace ctxcomp {

namespace detail {

/// Tile geometry of one attention call. A task is (kv head, block of queries); its rows are the
/// block's queries times the group's query heads (row = query * group + head-in-group), so all
/// query heads that share a kv head read each K/V tile once. Decode-like calls (few rows per
/// task, or fewer tasks than kMinTasks) also cut the key range into splits of split_len keys
/// (flash-decoding); splits are fixed by the shapes, never by the thread count.
template <class V>
struct AttentionTiling {
  static constexpr index_t kv_tile = 64;
  static constexpr index_t target_rows = 96;
  // Below this many rows (decode), scores are dot products against K rows read in place;
  // above, K tiles are transposed once and reused by every row (outer-product GEMM).
  static constexpr index_t few_rows = 16;
  static constexpr index_t split_len = 512;  // keys per split, a multiple of kv_tile
  static constexpr index_t min_tasks = 8;    // calls with fewer tasks are split too
  // Decode with several rows per task asks for the K/V rows this far ahead (one tile): on a
  // one-row task (MHA decode) the hints cost more than they save.
  static constexpr index_t prefetch_rows = kv_tile;
  index_t group, q_block, rows, head_dim, dim_padded;
  index_t q_blocks, tasks, kv_tiles, splits;
  bool bf16 = false;  // Compute::bf16: K and V tiles packed as bf16 pairs, every row count
  index_t dim_even = 0;  // head_dim rounded up to whole pairs (bf16 compute)
  // kv heads whose queries and scores a worker holds at once: all of them for split few-row fp32
  // tasks (decode over token-major or paged K/V may interleave the heads), else one.
  index_t interleave_heads = 1;

  AttentionTiling(index_t heads, index_t kv_heads, index_t q_len, index_t d, index_t kv_len, bool split_keys = true,
                  Compute compute = Compute::fp32) {
    bf16 = compute == Compute::bf16;
    dim_even = (d + 1) / 2 * 2;
    group = heads / kv_heads;
    q_block = std::min(q_len, std::max<index_t>(1, target_rows / group));
    rows = q_block * group;
    head_dim = d;
    dim_padded = (d + V::width - 1) / V::width * V::width;
    q_blocks = (q_len + q_block - 1) / q_block;
    tasks = kv_heads * q_blocks;
    kv_tiles = (kv_len + kv_tile - 1) / kv_tile;
    splits = split_keys && kv_len > split_len && (rows < few_rows || tasks < min_tasks)
                 ? (kv_len + split_len - 1) / split_len
                 : 1;
    interleave_heads = !bf16 && splits > 1 && rows < few_rows ? kv_heads : 1;
  }
  /// Whether workers keep every transposed K tile of a kv head (see kt_tiles).
  bool keeps_k_tiles() const { return q_blocks > 1; }
  /// Many-row tasks transpose K tiles. With several query blocks per kv head, every transposed
  /// tile of the head is kept (reused by the next task of the same head); with one (decode, short
  /// chunks) no later task can reuse a tile, so one tile's room is re-used tile after tile (a
  /// fraction of the workspace; docs/performance.md). Few-row tasks read K in place.
  index_t kt_tiles() const { return rows < few_rows || bf16 ? 0 : keeps_k_tiles() ? kv_tiles : 1; }
  /// bf16 compute: every K and V tile of a kv head is packed once per worker and reused.
  index_t packed_tiles() const { return bf16 ? kv_tiles : 0; }
  std::size_t worker_bytes() const {
    return (bf16 ? Workspace::bytes_for<ctxcomp::bf16>(rows * dim_even)         // bf16 queries
                       + Workspace::bytes_for<ctxcomp::bf16>(packed_tiles() * kv_tile * (dim_even + dim_padded))
                       + Workspace::bytes_for<ctxcomp::bf16>(rows * kv_tile)  // bf16 probabilities
                       + Workspace::bytes_for<ctxcomp::bf16>(dim_padded + dim_even)  // one rounded row
                 : 0) +
           Workspace::bytes_for<float>(interleave_heads * rows * head_dim)  // packed, pre-scaled queries
           + Workspace::bytes_for<float>(head_dim * kv_tile * kt_tiles())  // transposed K tiles (many rows)
           + Workspace::bytes_for<index_t>(kv_tiles)                     // kv head each transposed tile holds
           + Workspace::bytes_for<index_t>(4 * kv_tile)                  // paged: offsets of K / V tile rows
           + Workspace::bytes_for<index_t>(kv_tile + 2)                  // runs of a tile's seen keys
           + Workspace::bytes_for<float>(interleave_heads * rows * dim_padded)  // outputs before a guarded P V
           + Workspace::bytes_for<float>(kv_tile * dim_padded)           // V tile (padded head_dim) / K row
           + Workspace::bytes_for<float>(2 * kv_tile)                    // K and V scales of a tile (qint8)
           + Workspace::bytes_for<float>(interleave_heads * rows * kv_tile)  // scores / probabilities
           + Workspace::bytes_for<float>(rows * dim_padded)              // output accumulator
           + 2 * Workspace::bytes_for<float>(rows);                      // running max and sum
  }
  /// Floats of one split's partial result: running max, sum and the unnormalised output.
  index_t partial_floats() const { return rows * (dim_padded + 2); }
};

}  // namespace detail

/// Bytes of workspace `attention` reserves for these shapes and concurrency.
template <class V = simd::Vec>
std::size_t attention_workspace_bytes(index_t heads, index_t kv_heads, index_t q_len, index_t kv_len, index_t head_dim,
                                      index_t concurrency = 1, bool split_keys = true,
                                      Compute compute = Compute::fp32);

namespace detail {

/// Per-worker tile buffers carved from the workspace.
struct AttentionBuffers {
  float *qp, *kt, *vp, *ks, *vs, *s, *o, *m, *l;
  index_t* kt_head;  // kt_head[tile] = kv head whose K tile `tile` is transposed in kt, or -1
  index_t* off;      // paged interleaved decode: row offsets of this and the next K tile, then V's
  index_t* seen;     // runs [seen[2i], seen[2i+1]) of a tile's keys that some row of the block sees
  float* o_saved;    // the outputs of the heads being computed, kept across a guarded P V
  // bf16 compute: queries, packed K tiles [dim_even / 2][kv_tile][2], packed V tiles
  // [kv_tile / 2][dim_padded][2] (both cached per kv head, marked in kt_head), probabilities, a row.
  ctxcomp::bf16 *qb, *ktb, *vtb, *pb, *rowb;
};

/// Carves one worker's buffers for a call tiled as T from `ws` (reserved beforehand).
template <class V>
AttentionBuffers carve_buffers(const AttentionTiling<V>& T, Workspace& ws) {
  AttentionBuffers b;
  b.qp = ws.take<float>(T.interleave_heads * T.rows * T.head_dim);
  b.kt = ws.take<float>(T.head_dim * T.kv_tile * T.kt_tiles());
  b.vp = ws.take<float>(T.kv_tile * T.dim_padded);
  b.ks = ws.take<float>(2 * T.kv_tile);
  b.vs = b.ks + T.kv_tile;
  b.s = ws.take<float>(T.interleave_heads * T.rows * T.kv_tile);
  b.o = ws.take<float>(T.rows * T.dim_padded);
  b.m = ws.take<float>(T.rows);
  b.l = ws.take<float>(T.rows);
  b.kt_head = ws.take<index_t>(T.kv_tiles);
  b.off = ws.take<index_t>(4 * T.kv_tile);
  b.seen = ws.take<index_t>(T.kv_tile + 2);
  b.o_saved = ws.take<float>(T.interleave_heads * T.rows * T.dim_padded);
  std::fill(b.kt_head, b.kt_head + T.kv_tiles, index_t(-1));
  b.qb = b.ktb = b.vtb = b.pb = b.rowb = nullptr;
  if (T.bf16) {
    b.qb = ws.take<bf16>(T.rows * T.dim_even);
    b.ktb = ws.take<bf16>(T.packed_tiles() * T.kv_tile * T.dim_even);
    b.vtb = ws.take<bf16>(T.packed_tiles() * T.kv_tile * T.dim_padded);
    b.pb = ws.take<bf16>(T.rows * T.kv_tile);
    b.rowb = ws.take<bf16>(T.dim_padded + T.dim_even);
  }
  return b;
}

/// Masks may split their query rows into groups that each have a simpler mask (e.g. SAC's
/// anchor mask: anchor rows see everything, the others are causal), so that no tile is computed
/// for a row that cannot see it. Such a mask provides
///   index_t row_groups() const
///   index_t group_rows(index_t g, index_t q_len, index_t* rows) const  // increasing; returns count;
///                                         // the groups partition the rows [0, q_len)
///   Mask'   group_mask(index_t g) const   // tile() exact or conservative over any subset of the
///                                         // group's rows between its bounds
template <class M, class = void>
struct has_row_groups : std::false_type {};
template <class M>
struct has_row_groups<M, std::void_t<decltype(std::declval<const M&>().row_groups())>> : std::true_type {};
/// Whether keys the mask hides may hold memory the host never wrote (masks over cell caches
/// declare `static constexpr bool hides_unwritten = true`; see attention/masks.hpp).
template <class M, class = void>
struct hides_unwritten : std::false_type {};
template <class M>
struct hides_unwritten<M, std::void_t<decltype(M::hides_unwritten)>> : std::bool_constant<M::hides_unwritten> {};
template <class M>
inline constexpr bool hides_unwritten_v = hides_unwritten<M>::value;

/// A set of query rows with one mask: rows[0, n) (rows == nullptr: 0, 1, ..., n-1).
template <class Mask>
struct RowGroup {
  const index_t* rows = nullptr;
  index_t n = 0;
  Mask mask{};
};
inline constexpr index_t kMaxRowGroups = 4;

/// Upper bound of the task count of any row grouping of a call tiled as T (a group's q_block is
/// never larger than the whole call's, and each group adds at most one partial block).
template <class V>
index_t max_tasks(const AttentionTiling<V>& T, index_t kv_heads) {
  return kv_heads * (T.q_blocks + kMaxRowGroups);
}

/// The tasks of one call: per row group its tiling, and the query blocks of one kv head over all
/// groups (per_head). Task t is block t % per_head of kv head t / per_head, so the tasks of a
/// head run together and reuse its transposed K tiles (AttentionTiling::kt_tiles).
template <class V, class Mask>
struct TaskGrid {
  AttentionTiling<V> tilings[kMaxRowGroups];
  const RowGroup<Mask>* groups = nullptr;
  index_t group_count = 0;
  index_t per_head = 0;

  TaskGrid(index_t heads, index_t kv_heads, index_t head_dim, index_t kv_len, const RowGroup<Mask>* g, index_t count,
           Compute compute)
      : tilings{{heads, kv_heads, 1, head_dim, kv_len},
                {heads, kv_heads, 1, head_dim, kv_len},
                {heads, kv_heads, 1, head_dim, kv_len},
                {heads, kv_heads, 1, head_dim, kv_len}},
        groups(g),
        group_count(count) {
    for (index_t gi = 0; gi < count; ++gi) {
      tilings[gi] = AttentionTiling<V>(heads, kv_heads, g[gi].n, head_dim, kv_len, true, compute);
      per_head += tilings[gi].q_blocks;
    }
  }
  /// The row group and its local block index of task `task`.
  void locate(index_t task, index_t& gi, index_t& local) const {
    local = task % per_head;
    gi = 0;
    while (local >= tilings[gi].q_blocks) local -= tilings[gi++].q_blocks;
  }
};

/// The query rows of one task: block `local` of a row group, queries [q0, q1) of the group
/// (rows_of maps them to the call's rows; null: the identity), nq * group rows in all, all of
/// them within the call's rows [r0, r1).
struct QueryBlock {
  const index_t* rows_of = nullptr;
  index_t q0 = 0, q1 = 0, nq = 0, rows = 0, r0 = 0, r1 = 0;

  template <class V, class Mask>
  QueryBlock(const AttentionTiling<V>& T, const RowGroup<Mask>& g, index_t local)
      : rows_of(g.rows), q0(local * T.q_block), q1(std::min(g.n, q0 + T.q_block)), nq(q1 - q0), rows(nq * T.group) {
    r0 = row(q0), r1 = row(q1 - 1) + 1;
  }
  /// The call's query row of the group's query i.
  index_t row(index_t i) const noexcept { return rows_of ? rows_of[i] : i; }
};

}  // namespace detail

template <class V>
std::size_t attention_workspace_bytes(index_t heads, index_t kv_heads, index_t q_len, index_t kv_len, index_t head_dim,
                                      index_t concurrency, bool split_keys, Compute compute) {
  detail::AttentionTiling<V> t(heads, kv_heads, q_len, head_dim, kv_len, split_keys, compute);
  const index_t items = detail::max_tasks(t, kv_heads) * t.splits;
  return static_cast<std::size_t>(std::max<index_t>(1, concurrency)) * t.worker_bytes() +
         (t.splits > 1 ? Workspace::bytes_for<float>(items * t.partial_floats()) : 0) +
         Workspace::bytes_for<index_t>(q_len);
}

}  // namespace ctxcomp
