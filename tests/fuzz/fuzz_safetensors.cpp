// libFuzzer target: io::SafeTensors::from_bytes over arbitrary bytes, then every tensor read
// back as float and as int64 (a conversion the dtype does not allow is an error, not a crash).
// Any ctxcomp::Error is an accepted outcome; a crash, a sanitizer report or a hang is a finding.
#include <cstdint>
#include <vector>

#include <ctxcomp/io/safetensors.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto st = ctxcomp::io::SafeTensors::from_bytes(std::vector<std::uint8_t>(data, data + size), "fuzz");
    for (const auto& t : st.tensors()) {
      // A parsed tensor lies inside the data section: its byte range is consistent.
      if (t.end < t.begin) __builtin_trap();
      try {
        const auto f = st.read<float>(t.name);
        if (static_cast<std::int64_t>(f.size()) != t.numel()) __builtin_trap();
      } catch (const ctxcomp::Error&) {
      }
      try {
        (void)st.read<std::int64_t>(t.name);
      } catch (const ctxcomp::Error&) {
      }
    }
  } catch (const ctxcomp::Error&) {
  }
  return 0;
}
