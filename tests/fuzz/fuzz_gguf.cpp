// libFuzzer target: io::GgufCheckpoint::from_bytes over arbitrary bytes (a GGUF file read back as
// a checkpoint: header, keys, tensor infos, offsets, Q8_0 blocks, the name and key mapping), then
// every tensor read back as float. Any ctxcomp::Error is an accepted outcome; a crash, a
// sanitizer report or a hang is a finding.
#include <cstdint>
#include <vector>

#include <ctxcomp/io/gguf.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto g = ctxcomp::io::GgufCheckpoint::from_bytes(std::vector<std::uint8_t>(data, data + size), "fuzz");
    for (const auto& t : g.tensors().tensors()) {
      const auto f = g.tensors().read<float>(t.name);
      if (static_cast<std::int64_t>(f.size()) != t.numel()) __builtin_trap();
    }
    if (!g.config().contains("vocab_size")) __builtin_trap();
  } catch (const ctxcomp::Error&) {
  }
  return 0;
}
