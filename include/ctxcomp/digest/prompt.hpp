// Where the decoder takes IC-Former's soft prompt: the layout of its input sequence, as the
// official inference code builds it (ICFormerQA; `inference` in its test script):
//
//   [pre ; soft prompt ; FT ; prompt ; post]  then the answer, decoded greedily
//
//   pre     the tokens of "<s>[INST] Response the Prompt based on the below text:\n\n"
//   soft    the encoder's output, chunks * k digest vectors, fed as input embeddings
//   FT      one learned embedding (param.pt's `FT`; the pretraining stage's autoencoding
//           input is [soft prompt ; AE ; text] with param.pt's `AE` instead, and no pre / post)
//   prompt  the question's tokens
//   post    the tokens of "[/INST]"
//
// Every part is one row of the decoder's input and takes one position, in order: the official
// code runs the language model on the concatenated embeddings with the default position ids
// 0, 1, 2, ... So the soft prompt takes positions pre .. pre + chunks*k - 1 of the decoder,
// whatever positions the encoder used internally, and a sequence that continues after
// `offset` cached positions (a system prompt, earlier turns) shifts all of them by `offset`.
// The decoder attends causally over the whole input; nothing else about the decoder changes.
#pragma once
#include <cstdint>

#include "../core/error.hpp"
#include "../core/types.hpp"

namespace ctxcomp::digest {

/// The decoder's input around a soft prompt (see the file comment): row counts of each part
/// and the position of the first row. Rows [0, pre) are `pre`, then `soft`, `marker` (FT or
/// AE: 1 in the official code, 0 for none), `prompt`, `post`; position of row r = offset + r.
struct PromptLayout {
  index_t offset = 0;  ///< positions already in the decoder's cache before `pre` (0: a fresh sequence)
  index_t pre = 0;     ///< tokens before the soft prompt
  index_t soft = 0;    ///< soft-prompt rows (chunks * digests)
  index_t marker = 1;  ///< the learned FT (or AE) embedding after the soft prompt
  index_t prompt = 0;  ///< the question's tokens
  index_t post = 0;    ///< tokens after the question

  /// Checks the counts (none negative, a soft prompt present, marker 0 or 1).
  void validate() const {
    CTXCOMP_CHECK(offset >= 0 && pre >= 0 && prompt >= 0 && post >= 0, "digest::PromptLayout: negative count (offset ",
                  offset, ", pre ", pre, ", prompt ", prompt, ", post ", post, ")");
    CTXCOMP_CHECK(soft > 0, "digest::PromptLayout: the soft prompt is empty (soft = ", soft, ")");
    CTXCOMP_CHECK(marker == 0 || marker == 1, "digest::PromptLayout: marker must be 0 or 1 (", marker, ")");
  }
  /// Rows of the input, all parts together.
  index_t rows() const noexcept { return pre + soft + marker + prompt + post; }
  /// First row of each part.
  ///@{
  index_t soft_row() const noexcept { return pre; }
  index_t marker_row() const noexcept { return pre + soft; }
  index_t prompt_row() const noexcept { return pre + soft + marker; }
  index_t post_row() const noexcept { return pre + soft + marker + prompt; }
  ///@}
  /// Position id of input row r.
  std::int64_t position(index_t r) const noexcept { return std::int64_t(offset) + r; }
  /// Position of the first decoded (answer) token.
  std::int64_t decode_position() const noexcept { return position(rows()); }
};

}  // namespace ctxcomp::digest
