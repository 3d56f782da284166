// The `ctxcomp` command-line tool: `demo`, and one subcommand per compressor. Reads and writes
// safetensors; errors go to stderr with a non-zero exit.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <optional>
#include <thread>
#include <algorithm>
#include <tuple>
#include <type_traits>
#include <ctxcomp/ctxcomp.hpp>
#include <ctxcomp/io/icformer_checkpoint.hpp>
#include <ctxcomp/io/gguf.hpp>
#include <ctxcomp/io/tokenizer.hpp>
#ifdef CTXCOMP_WITH_LLAMACPP
#include "llamacpp_driver.hpp"
#endif

#include <unistd.h>

#include "demo.hpp"
#include "fold_driver.hpp"
#include "kv_storage.hpp"
#include "sac_driver.hpp"

using namespace ctxcomp;

namespace {

template <class F>
void with_threads(int threads, F&& f) {
#if defined(_OPENMP)
  if (threads > 1) return f(OpenMPExecutor(threads));
#else
  if (threads > 1) std::fprintf(stderr, "ctxcomp: built without OpenMP; running on one thread\n");
#endif
  f(SerialExecutor{});
}

struct DemoArgs {
  demo::Options opt;
  bool json = false;
};

/// `ctxcomp demo`: the three compressors on the built-in context; a table, or JSON for scripts.
int run_demo(DemoArgs a) {
  const bool tty = isatty(fileno(stderr)) != 0;
  if (tty)
    a.opt.progress = [](const std::string& stage, int done, int total) {
      const int width = 30, filled = total > 0 ? width * done / total : width;
      std::fprintf(stderr, "\r[%.*s%*s] %d/%d %-24s", filled, "##############################", width - filled, "", done,
                   total, stage.c_str());
      if (done == total) std::fprintf(stderr, "\n");
      std::fflush(stderr);
    };
  std::vector<demo::Row> rows;
  with_threads(a.opt.threads, [&](const auto& exec) { rows = demo::run(a.opt, exec); });
  const char* note =
      "The compressors' learned parts are random here, with or without --model / --checkpoint: the IC-Former "
      "digest embeddings (its encoder too, unless --checkpoint), the SAC anchor embeddings, and a host never "
      "trained with <CL>/<CR> sentinels (random itself unless --model). So max|dlog| and KL only show that each "
      "method runs end to end and changes the next-token distribution; they do not measure what a trained "
      "compressor keeps. Sizes, ratios and timings are real.";
  // Timings the machine disturbed: the middle three of the 5 timed decode steps spread over 1.5x.
  constexpr double kSpreadLimit = 1.5;
  bool disturbed = false;
  for (const auto& r : rows)
    disturbed = disturbed || r.decode_spread_full > kSpreadLimit || r.decode_spread_compressed > kSpreadLimit;
  if (a.json) {
    nlohmann::json j;
    j["tokens"] = a.opt.tokens;
    j["threads"] = a.opt.threads;
    j["isa"] = simd::active_isa();
    j["bf16_compute"] = simd::bf16_compute_kernels();
    j["note"] = note;
    for (const auto& r : rows)
      j["rows"].push_back({{"method", r.method}, {"context_tokens", r.context_tokens},
                           {"compressed_entries", r.compressed_entries}, {"compression_ratio", r.compression_ratio},
                           {"compress_seconds", r.compress_seconds}, {"compress_tokens_per_s", r.compress_tokens_per_s},
                           {"kv_bytes_before", r.kv_bytes_before}, {"kv_bytes_after", r.kv_bytes_after},
                           {"decode_ms_full", r.decode_ms_full}, {"decode_ms_compressed", r.decode_ms_compressed},
                           {"decode_spread_full", r.decode_spread_full},
                           {"decode_spread_compressed", r.decode_spread_compressed},
                           {"logits_max_abs", r.logits_max_abs}, {"logits_kl", r.logits_kl}});
    j["timings_disturbed"] = disturbed;
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("ctxcomp demo: %td-token context, %d thread%s, %s kernels, bf16 compute: %s\n\n", a.opt.tokens,
              a.opt.threads, a.opt.threads == 1 ? "" : "s", simd::active_isa(), simd::bf16_compute_kernels());
  std::printf("%-9s %8s %8s %7s %10s %11s %10s %10s %9s %9s %10s %10s\n", "method", "tokens", "entries", "ratio",
              "compress", "tokens/s", "KV before", "KV after", "dec full", "dec comp", "max|dlog|", "KL");
  for (const auto& r : rows)
    std::printf("%-9s %8td %8td %6.1fx %8.1fms %11.0f %9.2fM %9.2fM %7.3fms%s%7.3fms%s%10.3g %10.3g\n", r.method.c_str(),
                r.context_tokens, r.compressed_entries, r.compression_ratio, r.compress_seconds * 1e3,
                r.compress_tokens_per_s, double(r.kv_bytes_before) / 1e6, double(r.kv_bytes_after) / 1e6,
                r.decode_ms_full, r.decode_spread_full > kSpreadLimit ? "!" : " ", r.decode_ms_compressed,
                r.decode_spread_compressed > kSpreadLimit ? "!" : " ", r.logits_max_abs, r.logits_kl);
  std::printf("\nratio = context tokens per kept entry (r, as sac's --ratio and the sac_r<r> rows); KV bytes are the host's cache (all layers); decode = one token, median "
              "of 5;\nmax|dlog| and KL compare the next-token logits with the uncompressed run.\n* %s\n", note);
  if (disturbed)
    std::printf("! the middle three of this figure's 5 timed decode steps spread over %.1fx (slowest / fastest): the "
                "cores were not steady while it was measured (another process, or the hypervisor); rerun on an idle "
                "machine before comparing it.\n", kSpreadLimit);
  return 0;
}

/// A [rows x cols] float tensor from a safetensors file, with a message naming file and tensor.
std::vector<float> read_matrix(const io::SafeTensors& st, const std::string& name, index_t& rows, index_t& cols) {
  const auto& t = st.info(name);
  if (t.shape.size() != 2) fail(st.path(), ": tensor '", name, "' must be 2-D, found ", io::SafeTensors::shape_str(t.shape));
  rows = t.shape[0];
  cols = t.shape[1];
  return st.read<float>(name);
}

/// A 1-D token-id tensor (I64 or I32) from a safetensors file, with a message naming file and tensor.
std::vector<std::int64_t> read_ids(const io::SafeTensors& st, const std::string& name) {
  const auto& t = st.info(name);
  if (t.shape.size() != 1) fail(st.path(), ": ", name, " must be 1-D, found ", io::SafeTensors::shape_str(t.shape));
  return st.read<std::int64_t>(name);
}

struct IcformerArgs {
  std::string checkpoint, digests, input, output;
  index_t max_chunk_len = 512;
  bool no_chunk = false;
  int threads = 1;
  std::string compute = "fp32";
  std::string kv_layout = "contiguous";
  index_t block_size = 16;
};

Compute parse_compute(const std::string& s) { return s == "bf16" ? Compute::bf16 : Compute::fp32; }

/// Opens the safetensors file given with `flag`; a file that is not one is an error naming both.
io::SafeTensors open_input(const char* flag, const std::string& path) {
  try {
    return io::SafeTensors::open(path);
  } catch (const ctxcomp::Error& e) {
    fail(flag, " '", path, "' is not a readable safetensors file: ", e.what());
  }
}

/// "fp32 compute", or "bf16 compute (<kernels>)" with the kernels this build runs for it.
std::string compute_note(const std::string& s) {
  return s == "bf16" ? std::string("bf16 compute (") + simd::bf16_compute_kernels() + " kernels)" : "fp32 compute";
}

int run_icformer(const IcformerArgs& a) {
  auto ckpt = io::IcformerCheckpoint<float>::load(a.checkpoint);
  const auto& cfg = ckpt.config();
  auto in = open_input("--input", a.input);
  auto dg = open_input("--digests", a.digests);
  index_t n, dc, k, dd;
  const auto context = read_matrix(in, "context_embeds", n, dc);
  const auto digests = read_matrix(dg, "digest_embeds", k, dd);
  if (dc != cfg.hidden) fail(a.input, ": context_embeds has ", dc, " features, the checkpoint expects ", cfg.hidden);
  if (dd != cfg.hidden) fail(a.digests, ": digest_embeds has ", dd, " features, the checkpoint expects ", cfg.hidden);
  auto enc = ckpt.encoder();
  digest::IcformerOptions eo;
  eo.compute = parse_compute(a.compute);
  enc.set_options(eo);
  const auto cv = matrix_view<const float>(context.data(), n, dc);
  const auto dv = matrix_view<const float>(digests.data(), k, dd);
  const index_t chunks = a.no_chunk ? 1 : digest::Chunking::of(n, a.max_chunk_len).count;
  std::vector<float> out(std::size_t(chunks * k * cfg.hidden));
  const auto t0 = std::chrono::steady_clock::now();
  with_threads(a.threads, [&](const auto& exec) {
    if (a.no_chunk) {
      enc.compress(cv, dv, matrix_view(out.data(), k, cfg.hidden), exec);
    } else {
      const bool tty = isatty(fileno(stderr)) != 0;  // a log gets the closing line only
      enc.compress_chunked(cv, dv, a.max_chunk_len, matrix_view(out.data(), chunks * k, cfg.hidden), exec,
                           [&](index_t done, index_t total) {
                             if (!tty || total <= 1) return;
                             std::fprintf(stderr, "\rctxcomp icformer: chunk %td/%td", done, total);
                             if (done == total) std::fprintf(stderr, "\n");
                           });
    }
  });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  io::write_safetensors(a.output, {io::TensorOut::of("soft_prompt", {chunks * k, cfg.hidden}, out.data())},
                        {{"method", "icformer"}, {"n", std::to_string(n)}, {"chunks", std::to_string(chunks)},
                         {"compute", a.compute}, {"kv_layout", a.kv_layout}});
  std::fprintf(stderr, "ctxcomp icformer: %td context tokens -> %td digests (%td chunk%s) in %.3f s, %s\n", n,
               chunks * k, chunks, chunks == 1 ? "" : "s", secs, compute_note(a.compute).c_str());
  return 0;
}

/// Appends layer{i}_k / layer{i}_v [kv_heads x m x head_dim] F32 of every cached token, in
/// logical order whatever the layout, to `outs` (`bufs` holds the copied data until written).
template <class Kv>
void add_cache_tensors(const Kv& cache, std::vector<std::vector<float>>& bufs, std::vector<io::TensorOut>& outs) {
  const auto order = kv::logical_order(cache);
  const index_t m = index_t(order.size());
  bufs.resize(std::size_t(2 * cache.layers()));
  for (index_t l = 0; l < cache.layers(); ++l)
    for (int which = 0; which < 2; ++which) {
      const auto v = which ? cache.values(l) : cache.keys(l);
      auto& buf = bufs[std::size_t(2 * l + which)];
      buf.clear();
      for (index_t hh = 0; hh < v.heads; ++hh)
        for (index_t t : order)
          for (index_t i = 0; i < v.head_dim; ++i) buf.push_back(static_cast<float>(element_value(v, hh, t, i)));
      outs.push_back(io::TensorOut::of("layer" + std::to_string(l) + (which ? "_v" : "_k"),
                                       {cache.kv_heads(), m, cache.head_dim()}, buf.data()));
    }
}

/// Calls f(tag) with tag::type the K/V storage type --kv-type names: fp32 (float), fp16, bf16 or
/// int8 (qint8: symmetric, one fp32 scale per row).
template <class T>
struct TypeTag {
  using type = T;
};
template <class F>
void with_kv_type(const std::string& t, F&& f) {
  if (t == "fp32") return f(TypeTag<float>{});
  if (t == "fp16") return f(TypeTag<fp16>{});
  if (t == "bf16") return f(TypeTag<bf16>{});
  if (t == "int8") return f(TypeTag<qint8>{});
  fail("--kv-type '", t, "' is not one of fp32, fp16, bf16, int8");
}

/// --engine and the llama.cpp engine's options (fold and sac).
struct EngineArgs {
  std::string engine = "ctxcomp", gguf, cache_type = "f32", flash_attn = "off";
};

/// Adds --engine, --gguf, --cache-type and --flash-attn to `cmd`.
void add_engine_options(CLI::App* cmd, EngineArgs& e) {
  cmd->add_option("--engine", e.engine,
                  "Who runs the model: ctxcomp (its reference host) or llama.cpp (stock llama.cpp through its public "
                  "API; ctxcomp still compresses; needs a ctxcomp built with -DCTXCOMP_LLAMACPP=ON, the llamacpp preset)")
      ->default_val("ctxcomp")->check(CLI::IsMember({"ctxcomp", "llama.cpp"}));
  cmd->add_option("--gguf", e.gguf, "--engine llama.cpp: the model as a GGUF file (default: --model converted to a "
                                    "temporary f32 GGUF)")->check(CLI::ExistingFile);
  cmd->add_option("--cache-type", e.cache_type, "--engine llama.cpp: llama.cpp's K/V cache type")
      ->default_val("f32")->check(CLI::IsMember({"f32", "f16", "bf16", "q8_0"}));
  cmd->add_option("--flash-attn", e.flash_attn, "--engine llama.cpp: flash attention (on casts K/V to f16 in llama.cpp's CPU path)")
      ->default_val("off")->check(CLI::IsMember({"on", "off"}));
}

#ifdef CTXCOMP_WITH_LLAMACPP
host::llamacpp::EngineOptions engine_options(const EngineArgs& e, const std::string& model, const std::string& adapter,
                                             int threads) {
  host::llamacpp::EngineOptions o;
  o.gguf = e.gguf, o.model_dir = model, o.adapter_dir = adapter, o.cache_type = e.cache_type;
  o.flash_attn = e.flash_attn == "on", o.threads = threads;
  return o;
}
#endif

/// Fails unless this build has the llama.cpp engine.
void require_llamacpp(const char* cmd) {
#ifndef CTXCOMP_WITH_LLAMACPP
  fail(cmd, ": --engine llama.cpp needs a ctxcomp built with llama.cpp (configure with -DCTXCOMP_LLAMACPP=ON, or "
            "`cmake --preset llamacpp`)");
#else
  (void)cmd;
#endif
}

struct FoldArgs {
  EngineArgs e;
  std::string model, adapter, input, output;
  std::int64_t cl = -1, cr = -1;  // given with --cl / --cr, else from the checkpoint's tokenizer files
  bool cl_given = false, cr_given = false;
  bool every_span = false, at_end = false;
  int threads = 1;
  std::string kv_layout = "contiguous", kv_type = "fp32";
  index_t block_size = 16;
};

/// Prints the notes a LoRA adapter left (a base model name that differs, ...) to stderr.
template <class Model>
void print_adapter_notes(const Model& model, const char* cmd) {
  if (!model.lora) return;
  std::fprintf(stderr, "ctxcomp %s: merged LoRA adapter '%s' (%zu weights, r %lld, scale %g)\n", cmd,
               model.lora->origin().c_str(), model.lora->pairs(), static_cast<long long>(model.lora->config().r),
               model.lora->config().scale());
  for (const auto& w : model.lora->warnings()) std::fprintf(stderr, "ctxcomp %s: warning: %s\n", cmd, w.c_str());
}

int run_fold(FoldArgs a) {
  if (a.e.engine == "llama.cpp") require_llamacpp("fold");
  if (a.e.engine == "llama.cpp" && a.kv_type != "fp32")
    fail("fold: --kv-type is ctxcomp's cache storage; with --engine llama.cpp the cache is llama.cpp's (--cache-type)");
  const auto model = host::LlamaModel<float>::load(a.model, a.adapter);
  print_adapter_notes(model, "fold");
  const auto& c = model.config;
  // The sentinels are tokens the training script added: the adapter's tokenizer files (saved
  // beside it) when it has them, else the checkpoint's.
  const std::string tok_dir =
      !a.adapter.empty() && io::AddedTokens::load(a.adapter).size() > 0 ? a.adapter : a.model;
  std::tie(a.cl, a.cr) = io::sentinel_ids(tok_dir, a.cl_given ? std::optional<std::int64_t>(a.cl) : std::nullopt,
                                          a.cr_given ? std::optional<std::int64_t>(a.cr) : std::nullopt);
  auto in = open_input("--input", a.input);
  const auto ids = read_ids(in, "input_ids");
  const index_t n = index_t(ids.size());
  // A span still open at the end of the input would be computed but never folded: report it.
  index_t open_at = -1;
  for (index_t i = 0; i < n; ++i) {
    if (ids[std::size_t(i)] == a.cl) open_at = i;
    else if (ids[std::size_t(i)] == a.cr) open_at = -1;
  }
  if (open_at >= 0)
    fail(a.input, ": input_ids ends inside a span: the <CL> (id ", a.cl, ") at token ", open_at,
         " has no <CR> (id ", a.cr, ") after it");
  if (a.e.engine == "llama.cpp") {
    require_llamacpp("fold");
#ifdef CTXCOMP_WITH_LLAMACPP
    std::vector<float> logits;
    std::vector<std::int64_t> kept;
    std::vector<std::vector<float>> kv;
    const auto t0 = std::chrono::steady_clock::now();
    host::llamacpp::fold(engine_options(a.e, a.model, a.adapter, a.threads), ids, a.cl, a.cr, logits, kept, kv);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const index_t m = index_t(kept.size());
    std::vector<io::TensorOut> outs{io::TensorOut::of("logits", {n, c.vocab}, logits.data()),
                                    io::TensorOut::of("kept_index", {m}, kept.data())};
    for (index_t l = 0; l < c.layers; ++l)
      for (int which = 0; which < 2; ++which)
        outs.push_back(io::TensorOut::of("layer" + std::to_string(l) + (which ? "_v" : "_k"), {c.kv_heads, m, c.head_dim},
                                         kv[std::size_t(2 * l + which)].data()));
    io::write_safetensors(a.output, outs, {{"method", "sentinel"}, {"cl_id", std::to_string(a.cl)},
                                           {"cr_id", std::to_string(a.cr)}, {"engine", "llama.cpp"},
                                           {"cache_type", a.e.cache_type}, {"flash_attn", a.e.flash_attn}});
    std::fprintf(stderr, "ctxcomp fold: %td tokens through llama.cpp, cache %td -> %td entries in %.3f s\n", n, n, m, secs);
    return 0;
#endif
  }
  fold::SpanTracker spans(a.cl, a.cr, c.vocab);
  std::vector<float> logits;
  std::vector<std::int64_t> kept;
  std::vector<std::vector<float>> kv;
  std::vector<io::TensorOut> outs;
  double secs = 0;
  with_kv_type(a.kv_type, [&](auto tag) {
    using C = typename decltype(tag)::type;
    host::LlamaHost<float, C> h(model);
    host::with_kv_layout<C>(host::parse_kv_layout(a.kv_layout), KvShape{c.layers, c.kv_heads, c.head_dim},
                            std::max<index_t>(n, 1), a.block_size, [&](auto& cache) {
      const auto t0 = std::chrono::steady_clock::now();
      with_threads(a.threads, [&](const auto& exec) {
        logits = host::run_with_folding(h, ids.data(), n, spans, cache,
                                        a.at_end ? host::FoldSchedule::AtEnd : host::FoldSchedule::EverySpan, exec);
      });
      secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      for (index_t s : kv::logical_order(cache)) kept.push_back(cache.token_index()[s]);
      outs = {io::TensorOut::of("logits", {n, c.vocab}, logits.data()),
              io::TensorOut::of("kept_index", {index_t(kept.size())}, kept.data())};
      add_cache_tensors(cache, kv, outs);
    });
  });
  const index_t m = index_t(kept.size());
  io::write_safetensors(a.output, outs, {{"method", "sentinel"}, {"cl_id", std::to_string(a.cl)}, {"cr_id", std::to_string(a.cr)},
                                         {"kv_layout", a.kv_layout}, {"kv_type", a.kv_type}});
  std::fprintf(stderr, "ctxcomp fold: %td tokens, %d spans folded, cache %td -> %td entries in %.3f s\n", n,
               int(spans.closed_spans()), n, m, secs);
  return 0;
}


struct SacArgs {
  EngineArgs e;
  std::string model, adapter, sac_adapter, anchor_embeds, input, output, mask = "full";
  index_t chunk_size = 0, ratio = 0;
  int threads = 1;
  std::string compute = "fp32";
  std::string kv_layout = "contiguous", kv_type = "fp32";
  index_t block_size = 16;
};

int run_sac(const SacArgs& a) {
  if (a.e.engine == "llama.cpp") require_llamacpp("sac");
  if (a.e.engine == "llama.cpp" && a.kv_type != "fp32")
    fail("sac: --kv-type is ctxcomp's cache storage; with --engine llama.cpp the compressed cache goes into llama.cpp's "
         "(--cache-type)");
  const auto model = host::LlamaModel<float>::load(a.model, a.adapter);
  print_adapter_notes(model, "sac");
  const auto& c = model.config;
  // SAC's compressing LoRA (--sac-adapter): merged into a copy of the layers that compress only.
  std::optional<host::SacCompressingWeights<float>> sac_w;
  if (!a.sac_adapter.empty()) {
    sac_w.emplace(host::SacCompressingWeights<float>::load(model, a.sac_adapter));
    std::fprintf(stderr, "ctxcomp sac: compressing with the LoRA of '%s' (decoding with the model's own weights)\n",
                 a.sac_adapter.c_str());
  }
  const bool embeds_from_adapter = sac_w && sac_w->has_embeddings() && a.anchor_embeds.empty();
  if (a.anchor_embeds.empty() && !embeds_from_adapter)
    fail("sac: --anchor-embeds is required (role_tokens and special_tokens), unless --sac-adapter is a converted "
         "adapter.pt that holds them");
  auto in = open_input("--input", a.input);
  const auto ids = read_ids(in, "input_ids");
  const index_t n = index_t(ids.size());
  if (n == 0) fail(a.input, ": input_ids is empty; there is no context to compress");
  const bool has_targets = in.contains("lm_target_ids");
  const auto targets = has_targets ? read_ids(in, "lm_target_ids") : std::vector<std::int64_t>{};
  index_t mem, dr, ns, ds;
  std::vector<float> roles, special;
  if (embeds_from_adapter) {
    const auto rv = sac_w->role_tokens();
    mem = rv.rows(), dr = rv.cols(), ns = 2, ds = c.hidden;
    roles.assign(rv.data(), rv.data() + mem * dr);
    special = sac_w->special_tokens();
  } else {
    auto ae = open_input("--anchor-embeds", a.anchor_embeds);
    roles = read_matrix(ae, "role_tokens", mem, dr);
    special = read_matrix(ae, "special_tokens", ns, ds);
  }
  const std::string embeds_file = embeds_from_adapter ? a.sac_adapter : a.anchor_embeds;
  if (dr != c.hidden) fail(embeds_file, ": role_tokens has ", dr, " features, the model's hidden size is ", c.hidden);
  if (ns != 2 || ds != c.hidden)
    fail(embeds_file, ": special_tokens must be [2 x ", c.hidden, "], found [", ns, " x ", ds, "]");
  const auto plan = anchor::AnchorPlan::uniform(n, a.chunk_size, a.ratio);
  const auto mask = a.mask == "anchor" ? anchor::ChunkMask::Anchor : anchor::ChunkMask::Full;
  const index_t t = index_t(targets.size());
  std::vector<float> logits;
  std::vector<std::vector<float>> kv;
  std::vector<io::TensorOut> outs;
  const auto positions = plan.anchor_position_ids();
  index_t m = 0;
  double secs = 0;
  with_kv_type(a.kv_type, [&](auto tag) {
    using C = typename decltype(tag)::type;
    host::LlamaHost<float, C> h(model);
    host::with_kv_layout<C>(host::parse_kv_layout(a.kv_layout), KvShape{c.layers, c.kv_heads, c.head_dim},
                            plan.anchor_count() + (has_targets ? t + 1 : 0) + 1, a.block_size, [&](auto& cache) {
      const auto t0 = std::chrono::steady_clock::now();
      const bool llama = a.e.engine == "llama.cpp";
      with_threads(a.threads, [&](const auto& exec) {
        host::sac_compress(h, plan, ids.data(), matrix_view<const float>(roles.data(), mem, dr), mask, cache, exec,
                           sac_w ? &sac_w->layers() : nullptr, parse_compute(a.compute));
        if (has_targets && !llama)
          logits = host::sac_decode(h, plan, cache, special.data() + c.hidden, targets.data(), t, exec);
      });
      m = cache.size();
      outs = {io::TensorOut::of("anchor_position_ids", {m}, positions.data())};
      if (llama) {  // the cache written into llama.cpp, decoded there and read back from it
#ifdef CTXCOMP_WITH_LLAMACPP
        if constexpr (std::is_same_v<C, float>) {  // (--kv-type is refused with llama.cpp's cache)
          logits = host::llamacpp::sac_decode(engine_options(a.e, a.model, a.adapter, a.threads), plan, cache,
                                              special.data() + c.hidden, targets, kv);
          if (!has_targets) logits.clear();
          for (index_t l = 0; l < c.layers; ++l)
            for (int which = 0; which < 2; ++which)
              outs.push_back(io::TensorOut::of("layer" + std::to_string(l) + (which ? "_v" : "_k"),
                                               {c.kv_heads, m, c.head_dim}, kv[std::size_t(2 * l + which)].data()));
        }
#endif
      } else {
        add_cache_tensors(cache, kv, outs);
      }
      secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    });
  });
  if (!logits.empty()) outs.push_back(io::TensorOut::of("decode_logits", {t + 1, c.vocab}, logits.data()));
  io::write_safetensors(a.output, outs,
                        {{"method", "sac"}, {"chunk_size", std::to_string(a.chunk_size)},
                         {"compress_ratio", std::to_string(a.ratio)}, {"mask", a.mask}, {"end_idx", std::to_string(n)},
                         {"compute", a.compute}, {"kv_layout", a.kv_layout}, {"kv_type", a.kv_type},
                         {"engine", a.e.engine}});
  std::fprintf(stderr, "ctxcomp sac: %td context tokens -> %td anchors (%td chunk%s, %s mask) in %.3f s, %s\n", n, m,
               plan.chunks(), plan.chunks() == 1 ? "" : "s", a.mask.c_str(), secs, compute_note(a.compute).c_str());
  return 0;
}

/// Edit distance (insertions, deletions, substitutions) between two names.
std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diag = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

/// " (did you mean 'x'?)" for the closest of `known` within a third of the name's length.
std::string suggestion(const std::string& name, const std::vector<std::string>& known) {
  std::string best;
  std::size_t bd = std::max<std::size_t>(2, name.size() / 3) + 1;
  for (const auto& k : known) {
    const std::size_t d = edit_distance(name, k);
    if (d < bd) bd = d, best = k;
  }
  return best.empty() ? std::string() : " (did you mean '" + best + "'?)";
}

/// CLI11's exit code for an unknown subcommand, option or argument (CLI::ExitCodes::ExtrasError).
constexpr int kUsageUnknown = static_cast<int>(CLI::ExitCodes::ExtrasError);

/// Names an unknown subcommand or option, as git does, before CLI11 parses (CLI11 would report
/// the first missing required option instead). Returns the exit code, or -1 to go on.
int check_names(const CLI::App& app, int argc, char** argv) {
  if (argc < 2 || argv[1][0] == '-') return -1;  // top-level flags: CLI11's own handling
  const std::string cmd = argv[1];
  std::vector<std::string> subs;
  const CLI::App* sub = nullptr;
  for (const CLI::App* s : app.get_subcommands([](const CLI::App*) { return true; })) {
    subs.push_back(s->get_name());
    if (s->get_name() == cmd) sub = s;
  }
  if (!sub) {
    std::string list;
    for (const auto& n : subs) list += (list.empty() ? "" : ", ") + n;
    std::fprintf(stderr, "ctxcomp: '%s' is not a ctxcomp subcommand%s; the subcommands are %s (ctxcomp --help)\n",
                 cmd.c_str(), suggestion(cmd, subs).c_str(), list.c_str());
    return kUsageUnknown;
  }
  std::vector<std::string> names = {"--help"};
  for (const CLI::Option* o : sub->get_options())
    for (const auto& l : o->get_lnames()) names.push_back("--" + l);
  for (int i = 2; i < argc; ++i) {
    const std::string tok = argv[i];
    if (tok.size() < 3 || tok.compare(0, 2, "--") != 0) continue;  // values, short flags
    const std::string name = tok.substr(0, tok.find('='));
    if (std::find(names.begin(), names.end(), name) != names.end()) continue;
    std::fprintf(stderr, "ctxcomp %s: unknown option '%s'%s (ctxcomp %s --help lists them)\n", cmd.c_str(),
                 name.c_str(), suggestion(name, names).c_str(), cmd.c_str());
    return kUsageUnknown;
  }
  return -1;
}

/// The exit codes, for --help and docs/errors.md.
constexpr const char* kExitCodes =
    "Exit codes: 0 success; 1 an error while running (the message names the file or flag at fault); "
    "104 a value of the wrong type; 105 a value outside its allowed set or range, or a file or directory "
    "that does not exist; 106 a required option is missing; 107 / 108 an option given without one it "
    "needs / with one it excludes; 109 an unknown subcommand, option or argument.";

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ctxcomp: LLM context compression (IC-Former digests, sentinel KV folding, SAC anchors)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("ctxcomp ") + std::to_string(CTXCOMP_VERSION_MAJOR) + "." +
                                        std::to_string(CTXCOMP_VERSION_MINOR) + "." +
                                        std::to_string(CTXCOMP_VERSION_PATCH));
  app.footer(kExitCodes);
  // Worker threads: every core this process may use, unless --threads says otherwise.
  const int all_cores = std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, 64);
  const std::string threads_help = "Worker threads (default: all " + std::to_string(all_cores) +
                                   " cores here; results are identical for any count)";
  DemoArgs da;
  auto* demo = app.add_subcommand("demo",
                                  "Run IC-Former, sentinel folding and SAC end to end on a built-in context with small "
                                  "seeded models, and print what each did");
  demo->add_option("--tokens", da.opt.tokens, "Context tokens")->default_val(2048)->check(CLI::Range(64, 1 << 20));
  demo->add_option("--threads", da.opt.threads, threads_help)->default_val(all_cores)->check(CLI::Range(1, 64));
  demo->add_flag("--json", da.json, "Print the rows as JSON");
  demo->add_option("--model", da.opt.model_dir, "Use this Hugging Face checkpoint (directory, or a llama / qwen2 / qwen3 GGUF file) as the host model")
      ->check(CLI::ExistingPath);
  demo->add_option("--checkpoint", da.opt.checkpoint_dir, "Use this IC-Former checkpoint (hidden size of the host)")
      ->check(CLI::ExistingDirectory);

  IcformerArgs ic;
  auto* icf = app.add_subcommand("icformer", "Compress context embeddings into IC-Former digests (soft prompt)");
  icf->add_option("--checkpoint", ic.checkpoint, "Official IC-Former checkpoint directory (config.json + model.safetensors)")
      ->required()->check(CLI::ExistingDirectory);
  icf->add_option("--digests", ic.digests, "safetensors file with tensor digest_embeds [k x hidden] (e.g. converted param.pt)")
      ->required()->check(CLI::ExistingFile);
  icf->add_option("--input", ic.input, "safetensors file with tensor context_embeds [n x hidden] (may be the --digests file)")
      ->required()->check(CLI::ExistingFile);
  icf->add_option("--output", ic.output, "Output safetensors file; receives soft_prompt [chunks*k x hidden] F32")->required();
  icf->add_option("--max-chunk-len", ic.max_chunk_len,
                  "Longest chunk: the context is cut into ceil(n / N) equal chunks, each giving k digests")
      ->default_val(512)->check(CLI::PositiveNumber);
  icf->add_flag("--no-chunk", ic.no_chunk, "Compress the whole context as one chunk (k digests)");
  icf->add_option("--threads", ic.threads, threads_help)
      ->default_val(all_cores)->check(CLI::Range(1, 64));
  icf->add_option("--compute", ic.compute,
                  "Arithmetic of the projections, MLP and attention: fp32 (official results) or bf16 (bf16 operands, "
                  "fp32 accumulation; AVX512-BF16 where available, the same results elsewhere; error bound in docs/bf16.md)")
      ->default_val("fp32")->check(CLI::IsMember({"fp32", "bf16"}));

  FoldArgs fa;
  auto* fo = app.add_subcommand("fold", "Run a checkpoint (Llama, Mistral, Qwen2, Qwen3, GPT-NeoX) over input_ids, folding every <CL>...<CR> span into its <CR>");
  fo->add_option("--model", fa.model, "Hugging Face checkpoint directory: Llama, Mistral, Qwen2, Qwen3 or GPT-NeoX (config.json + model.safetensors, or shards with model.safetensors.index.json), or a llama / qwen2 / qwen3 GGUF file")
      ->required()->check(CLI::ExistingPath);
  fo->add_option("--adapter", fa.adapter, "PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) merged into --model's weights at load time")
      ->check(CLI::ExistingDirectory);
  fo->add_option("--input", fa.input, "safetensors file with tensor input_ids [n] (I64 or I32)")->required()->check(CLI::ExistingFile);
  fo->add_option("--output", fa.output,
                 "Output safetensors: logits [n x vocab] F32, kept_index [m] I64, layer{i}_k / layer{i}_v [kv_heads x m x head_dim] F32")
      ->required();
  auto* cl_opt = fo->add_option("--cl", fa.cl,
                                "Token id of <CL>, which opens a span (default: the id the checkpoint's tokenizer files "
                                "add for '<CL>': tokenizer.json, added_tokens.json or tokenizer_config.json)");
  auto* cr_opt = fo->add_option("--cr", fa.cr,
                                "Token id of <CR>, which closes a span and becomes its compact entry (default: from the "
                                "tokenizer files, as --cl)");
  auto* every = fo->add_flag("--fold-every-span", fa.every_span, "Evict each span right after its <CR> (default)");
  fo->add_flag("--fold-at-end", fa.at_end, "Process everything first, evict all closed spans at the end")->excludes(every);
  fo->add_option("--threads", fa.threads, threads_help)
      ->default_val(all_cores)->check(CLI::Range(1, 64));
  fo->add_option("--kv-layout", fa.kv_layout,
                 "How the cache is kept: contiguous (compacted; default), cells (llama.cpp-style cells with holes: "
                 "eviction frees cells, new tokens fill them) or paged (pages of --block-size tokens through a page "
                 "table). Outputs are the same for every layout (cells: up to fp32 summation order)")
      ->default_val("contiguous")->check(CLI::IsMember({"contiguous", "cells", "paged"}));
  fo->add_option("--kv-type", fa.kv_type,
                 "Storage of the K/V cache with --engine ctxcomp: fp32 (default; the official results), fp16, bf16, or int8 "
                 "(symmetric, one fp32 scale per row); arithmetic stays fp32. Error bounds: docs/integration.md")
      ->default_val("fp32")->check(CLI::IsMember({"fp32", "fp16", "bf16", "int8"}));
  add_engine_options(fo, fa.e);
  fo->add_option("--block-size", fa.block_size, "Tokens per page of --kv-layout paged")
      ->default_val(16)->check(CLI::Range(1, 1 << 20));

  SacArgs sa;
  auto* sc = app.add_subcommand("sac", "Compress input_ids into the K/V of SAC anchor tokens with a checkpoint (Llama family or GPT-NeoX), then decode");
  sc->add_option("--model", sa.model, "Hugging Face checkpoint directory: Llama, Mistral, Qwen2, Qwen3 or GPT-NeoX (config.json + model.safetensors, or shards with model.safetensors.index.json), or a llama / qwen2 / qwen3 GGUF file")
      ->required()->check(CLI::ExistingPath);
  sc->add_option("--adapter", sa.adapter, "PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) merged into --model's weights at load time (compressing and decoding)")
      ->check(CLI::ExistingDirectory);
  sc->add_option("--sac-adapter", sa.sac_adapter,
                 "SAC's compressing LoRA, applied to the compressing pass only (decoding uses the model's weights): "
                 "adapter.pt converted by examples/convert_sac_adapter.py (its role_tokens / special_tokens make "
                 "--anchor-embeds optional), or a PEFT LoRA adapter directory")
      ->check(CLI::ExistingPath);
  sc->add_option("--anchor-embeds", sa.anchor_embeds,
                 "safetensors file with role_tokens [anchors per chunk x hidden] and special_tokens [2 x hidden] F32 "
                 "(required unless --sac-adapter holds them; given, it takes precedence)")
      ->check(CLI::ExistingFile);
  sc->add_option("--input", sa.input, "safetensors file with input_ids [n] and optionally lm_target_ids [t] (I64 or I32)")
      ->required()->check(CLI::ExistingFile);
  sc->add_option("--output", sa.output,
                 "Output safetensors: anchor_position_ids [m] I64, layer{i}_k / layer{i}_v [kv_heads x m x head_dim] F32, "
                 "decode_logits [t+1 x vocab] F32 when targets were given")
      ->required();
  sc->add_option("--chunk-size", sa.chunk_size, "Tokens per chunk; each chunk is compressed on its own")->required();
  sc->add_option("--ratio", sa.ratio, "Compression ratio r: one anchor every r tokens of a chunk")->required();
  sc->add_option("--mask", sa.mask, "Attention inside a chunk: full (every token sees the chunk; official) or anchor "
                                    "(anchors see the chunk, the others are causal)")
      ->default_val("full")->check(CLI::IsMember({"full", "anchor"}));
  sc->add_option("--threads", sa.threads, threads_help)
      ->default_val(all_cores)->check(CLI::Range(1, 64));
  sc->add_option("--compute", sa.compute,
                 "Arithmetic of the compressing forward passes: fp32 (official results) or bf16 (bf16 operands, fp32 "
                 "accumulation; error bound in docs/bf16.md). Decoding stays fp32")
      ->default_val("fp32")->check(CLI::IsMember({"fp32", "bf16"}));
  sc->add_option("--kv-layout", sa.kv_layout,
                 "How the cache is kept: contiguous (compacted; default), cells (llama.cpp-style cells with holes: "
                 "eviction frees cells, new tokens fill them) or paged (pages of --block-size tokens through a page "
                 "table). Outputs are the same for every layout (cells: up to fp32 summation order)")
      ->default_val("contiguous")->check(CLI::IsMember({"contiguous", "cells", "paged"}));
  sc->add_option("--kv-type", sa.kv_type,
                 "Storage of the K/V cache with --engine ctxcomp: fp32 (default; the official results), fp16, bf16, or int8 "
                 "(symmetric, one fp32 scale per row); arithmetic stays fp32. Error bounds: docs/integration.md")
      ->default_val("fp32")->check(CLI::IsMember({"fp32", "fp16", "bf16", "int8"}));
  add_engine_options(sc, sa.e);
  sc->add_option("--block-size", sa.block_size, "Tokens per page of --kv-layout paged")
      ->default_val(16)->check(CLI::Range(1, 1 << 20));

  std::string cv_model, cv_adapter, cv_output, cv_type = "f32";
  auto* cv = app.add_subcommand("convert", "Write a Hugging Face checkpoint (Llama, Mistral, Qwen2, Qwen3) as a GGUF file "
                                           "that stock llama.cpp loads (io/gguf.hpp)");
  cv->add_option("--model", cv_model, "Hugging Face checkpoint directory (config.json + model.safetensors or shards)")
      ->required()->check(CLI::ExistingDirectory);
  cv->add_option("--adapter", cv_adapter, "PEFT LoRA adapter directory merged into the weights first")
      ->check(CLI::ExistingDirectory);
  cv->add_option("--output", cv_output, "Output .gguf file")->required();
  cv->add_option("--type", cv_type, "Type of the weight matrices (norms and biases stay f32)")
      ->default_val("f32")->check(CLI::IsMember({"f32", "f16", "bf16"}));

  for (CLI::App* s : app.get_subcommands([](const CLI::App*) { return true; })) s->footer(kExitCodes);
  if (const int rc = check_names(app, argc, argv); rc >= 0) return rc;
  CLI11_PARSE(app, argc, argv);
  try {
    if (*demo) return run_demo(da);
    if (*icf) return run_icformer(ic);
    if (*fo) {
      fa.cl_given = cl_opt->count() > 0, fa.cr_given = cr_opt->count() > 0;
      return run_fold(fa);
    }
    if (*sc) return run_sac(sa);
    if (*cv) {
      io::convert_to_gguf(cv_model, cv_output, io::parse_gguf_weight_type(cv_type), cv_adapter);
      std::fprintf(stderr, "ctxcomp convert: wrote %s\n", cv_output.c_str());
      return 0;
    }
  } catch (const ctxcomp::Error& e) {
    std::fprintf(stderr, "ctxcomp: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ctxcomp: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
