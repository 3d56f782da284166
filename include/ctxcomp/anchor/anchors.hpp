// SAC anchor plans: which context tokens become anchors, chunk by chunk, and the addition of
// the learned anchor (role) embeddings to their input embeddings.
// Conventions (tests/data/fixtures/README.md, section sac): the context [0, n) is cut into
// chunks [s, e) of chunk_size tokens (the last one may be shorter); context position ids are
// 1-based, token t has position t + 1 (plus a position offset when the document follows a cached
// prefix: AnchorPlan::set_position_offset); the official uniform rule puts a chunk's anchors at
// positions s+1+(r-1)/2, s+1+(r-1)/2+r, ... up to e, or at s+1 alone when the first of these
// is past e. Anchor j of a chunk (j from 0) gets role_tokens[j] added to its embedding.
#pragma once
#include <cstdint>
#include <vector>

#include "../core/error.hpp"
#include "../core/views.hpp"
#include "../kv/kv_cache.hpp"

namespace ctxcomp::anchor {

/// The anchors of a context of `tokens` tokens in chunks of `chunk_size`.
class AnchorPlan {
 public:
  AnchorPlan() = default;

  /// Context tokens.
  index_t tokens() const noexcept { return tokens_; }
  /// Tokens per chunk.
  index_t chunk_size() const noexcept { return chunk_size_; }
  /// Number of chunks.
  index_t chunks() const noexcept { return tokens_ == 0 ? 0 : (tokens_ + chunk_size_ - 1) / chunk_size_; }
  /// Token range [begin, end) of chunk c.
  TokenRange chunk(index_t c) const noexcept {
    return {c * chunk_size_, std::min(tokens_, (c + 1) * chunk_size_)};
  }
  /// Every anchor's token index (0-based, increasing), all chunks in order.
  const std::vector<index_t>& anchors() const noexcept { return anchors_; }
  /// Anchors over all chunks.
  index_t anchor_count() const noexcept { return index_t(anchors_.size()); }
  /// Anchors of chunk c: anchors()[chunk_anchors(c).begin, chunk_anchors(c).end).
  TokenRange chunk_anchors(index_t c) const noexcept { return {first_[std::size_t(c)], first_[std::size_t(c) + 1]}; }
  /// Largest number of anchors in one chunk (the role embeddings needed).
  index_t max_anchors_per_chunk() const noexcept {
    index_t m = 0;
    for (index_t c = 0; c < chunks(); ++c) m = std::max(m, chunk_anchors(c).end - chunk_anchors(c).begin);
    return m;
  }
  /// Position id of context token t in the official numbering (1-based).
  static std::int64_t position_of(index_t t) noexcept { return std::int64_t(t) + 1; }
  /// Shifts every position id of this plan by `offset` >= 0, for a document that follows
  /// `offset` positions already in the cache (a system prompt, earlier turns): token t then has
  /// position offset + t + 1 and decoding starts at offset + n. The compressed K/V are those of
  /// the document at those positions (RoPE is applied there); 0, the default, is the official
  /// numbering.
  void set_position_offset(std::int64_t offset) {
    CTXCOMP_CHECK(offset >= 0, "anchor::AnchorPlan::set_position_offset: offset (", offset, ") must be >= 0");
    offset_ = offset;
  }
  /// The offset set_position_offset gave (0: none).
  std::int64_t position_offset() const noexcept { return offset_; }
  /// Position id of context token t: position_offset() + t + 1.
  std::int64_t position(index_t t) const noexcept { return offset_ + position_of(t); }
  /// Position ids of the anchors (what the compressed cache stores).
  std::vector<std::int64_t> anchor_position_ids() const {
    std::vector<std::int64_t> p(anchors_.size());
    for (std::size_t i = 0; i < p.size(); ++i) p[i] = position(anchors_[i]);
    return p;
  }
  /// Position id of the first token decoded after the compressed context: n (plus the offset),
  /// the position of the last context token (the official decoding restarts there with
  /// special_tokens[1]).
  std::int64_t decode_position() const noexcept { return offset_ + std::int64_t(tokens_); }

  /// The official uniform rule with compression ratio `ratio` (see the file comment).
  static AnchorPlan uniform(index_t tokens, index_t chunk_size, index_t ratio) {
    check_shape(tokens, chunk_size, "anchor::AnchorPlan::uniform");
    CTXCOMP_CHECK(ratio > 0, "anchor::AnchorPlan::uniform: compression ratio (", ratio, ") must be positive");
    AnchorPlan p(tokens, chunk_size);
    for (index_t c = 0; c < p.chunks(); ++c) {
      const auto [s, e] = p.chunk(c);
      const std::int64_t first = std::int64_t(s) + 1 + (ratio - 1) / 2;  // a position id
      if (first >= std::int64_t(e) + 1) {
        p.anchors_.push_back(s);
      } else {
        for (std::int64_t pos = first; pos < std::int64_t(e) + 1; pos += ratio) p.anchors_.push_back(index_t(pos - 1));
      }
      p.first_.push_back(index_t(p.anchors_.size()));
    }
    return p;
  }

  /// A host-supplied list of anchor token indices (0-based, strictly increasing, < tokens). A
  /// chunk may have no anchor; it then contributes nothing to the compressed cache.
  static AnchorPlan from_tokens(index_t tokens, index_t chunk_size, const std::vector<index_t>& anchor_tokens) {
    check_shape(tokens, chunk_size, "anchor::AnchorPlan::from_tokens");
    for (std::size_t i = 0; i < anchor_tokens.size(); ++i) {
      CTXCOMP_CHECK(anchor_tokens[i] >= 0 && anchor_tokens[i] < tokens, "anchor::AnchorPlan::from_tokens: anchor ",
                    i, " is token ", anchor_tokens[i], ", outside the context [0, ", tokens, ")");
      CTXCOMP_CHECK(i == 0 || anchor_tokens[i] > anchor_tokens[i - 1], "anchor::AnchorPlan::from_tokens: anchors must "
                    "be strictly increasing (", anchor_tokens[i - 1], " then ", anchor_tokens[i], ")");
    }
    AnchorPlan p(tokens, chunk_size);
    p.anchors_ = anchor_tokens;
    std::size_t a = 0;
    for (index_t c = 0; c < p.chunks(); ++c) {
      while (a < p.anchors_.size() && p.anchors_[a] < p.chunk(c).end) ++a;
      p.first_.push_back(index_t(a));
    }
    return p;
  }

 private:
  AnchorPlan(index_t tokens, index_t chunk_size) : tokens_(tokens), chunk_size_(chunk_size), first_{0} {}
  static void check_shape(index_t tokens, index_t chunk_size, const char* fn) {
    CTXCOMP_CHECK(tokens > 0, fn, ": the context is empty");
    CTXCOMP_CHECK(chunk_size > 0, fn, ": chunk_size (", chunk_size, ") must be positive");
  }

  index_t tokens_ = 0, chunk_size_ = 1;
  std::int64_t offset_ = 0;
  std::vector<index_t> anchors_;
  std::vector<index_t> first_{0};  // chunks() + 1 offsets into anchors_
};

/// x[rows[j]] += role_tokens[j] for j < count: the anchor embeddings of one chunk, whose input
/// embeddings are x [chunk tokens x hidden] and whose anchors sit at rows (within the chunk).
inline void add_anchor_embeddings(MatrixView<float> x, const index_t* rows, index_t count,
                                  MatrixView<const float> role_tokens) {
  CTXCOMP_CHECK(count <= role_tokens.rows(), "anchor::add_anchor_embeddings: ", count,
                " anchors in a chunk but only ", role_tokens.rows(), " role (anchor) embeddings");
  CTXCOMP_CHECK(role_tokens.cols() == x.cols(), "anchor::add_anchor_embeddings: role embeddings have ",
                role_tokens.cols(), " features, the hidden size is ", x.cols());
  for (index_t j = 0; j < count; ++j)
    CTXCOMP_CHECK(rows[j] >= 0 && rows[j] < x.rows(), "anchor::add_anchor_embeddings: anchor row ", rows[j],
                  " is outside the chunk's ", x.rows(), " tokens");
  for (index_t j = 0; j < count; ++j) x.row(rows[j]) += role_tokens.row(j);
}

}  // namespace ctxcomp::anchor
