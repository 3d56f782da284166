// libFuzzer target: checkpoint config parsing. The bytes are parsed as JSON; a valid document
// goes through every config reader a loader uses: io::decoder_arch (Llama / Mistral / Qwen2 /
// Qwen3), io::transformer_dims with io::rope_from_config (both RoPE layouts: v5 rope_parameters
// and top-level rope_theta / rope_scaling), and the IC-Former config. Accepted RoPE settings
// must give finite, positive inverse frequencies. Errors are accepted outcomes.
#include <cmath>
#include <cstdint>
#include <string>

#include <ctxcomp/io/icformer_checkpoint.hpp>

namespace {
void check_rope(const ctxcomp::RopeConfig& rope) {
  for (ctxcomp::index_t dim : {2, 64, 128}) {
    const auto f = ctxcomp::rope_inv_freq(rope, dim);
    for (float x : f)
      if (!std::isfinite(x) || !(x > 0.f)) __builtin_trap();
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  const std::string file = "config.json";
  try {
    (void)ctxcomp::io::decoder_arch(j, file);
  } catch (const ctxcomp::Error&) {
  }
  try {
    check_rope(ctxcomp::io::rope_from_config(j, file));
  } catch (const ctxcomp::Error&) {
  }
  try {
    const auto t = ctxcomp::io::transformer_dims(j, file);
    if (t.hidden <= 0 || t.heads <= 0 || t.kv_heads <= 0 || t.head_dim <= 0) __builtin_trap();
  } catch (const ctxcomp::Error&) {
  }
  try {
    const auto cfg = ctxcomp::io::IcformerCheckpoint<float>::config_from_json(j, file);
    if (cfg.heads % cfg.kv_heads != 0) __builtin_trap();  // validate() guarantees it
  } catch (const ctxcomp::Error&) {
  }
  return 0;
}
