// The `ctxcomp` command-line tool: `demo`, and one subcommand per compressor. Reads and writes
// safetensors; errors go to stderr with a non-zero exit.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <ctxcomp/ctxcomp.hpp>
#include <ctxcomp/io/icformer_checkpoint.hpp>

#include "fold_driver.hpp"

using namespace ctxcomp;

namespace {

int run_demo() {
  // The attention core on a built-in example: 8 query heads over 2 kv heads, causal, 300 tokens.
  const index_t heads = 8, kvh = 2, n = 300, d = 64;
  std::vector<float> q(std::size_t(heads * n * d)), k(std::size_t(kvh * n * d)), v(k.size()), out(q.size()), ref(q.size());
  std::uint32_t s = 1;
  auto rnd = [&] {
    s = s * 1664525u + 1013904223u;
    return float(s >> 8) / float(1 << 24) - 0.5f;
  };
  for (auto* b : {&q, &k, &v})
    for (auto& x : *b) x = rnd();
  auto qv = HeadsView<const float>::contiguous(q.data(), heads, n, d);
  auto kv = HeadsView<const float>::contiguous(k.data(), kvh, n, d);
  auto vv = HeadsView<const float>::contiguous(v.data(), kvh, n, d);
  Workspace ws;
  const auto t0 = std::chrono::steady_clock::now();
  attention(qv, kv, vv, Causal(0), HeadsView<float>::contiguous(out.data(), heads, n, d), {}, ws);
  const auto t1 = std::chrono::steady_clock::now();
  reference::attention(qv, kv, vv, Causal(0), HeadsView<float>::contiguous(ref.data(), heads, n, d));
  double err = 0, mx = 0;
  for (std::size_t i = 0; i < out.size(); ++i)
    err = std::max(err, double(std::abs(out[i] - ref[i]))), mx = std::max(mx, double(std::abs(ref[i])));
  std::printf("ctxcomp demo: fused causal attention, %td query heads over %td kv heads, %td tokens, head_dim %td (%s)\n",
              heads, kvh, n, d, simd::active_isa());
  std::printf("  fused kernel: %.3f ms; relative error vs the double-precision reference: %.2e\n",
              std::chrono::duration<double, std::milli>(t1 - t0).count(), err / mx);
  return err / mx <= 1e-5 ? 0 : 1;
}

template <class F>
void with_threads(int threads, F&& f) {
#if defined(_OPENMP)
  if (threads > 1) return f(OpenMPExecutor(threads));
#else
  if (threads > 1) std::fprintf(stderr, "ctxcomp: built without OpenMP; running on one thread\n");
#endif
  f(SerialExecutor{});
}

/// A [rows x cols] float tensor from a safetensors file, with a message naming file and tensor.
std::vector<float> read_matrix(const io::SafeTensors& st, const std::string& name, index_t& rows, index_t& cols) {
  const auto& t = st.info(name);
  if (t.shape.size() != 2) fail(st.path(), ": tensor '", name, "' must be 2-D, found ", io::SafeTensors::shape_str(t.shape));
  rows = t.shape[0];
  cols = t.shape[1];
  return st.read<float>(name);
}

struct IcformerArgs {
  std::string checkpoint, digests, input, output;
  index_t max_chunk_len = 512;
  bool no_chunk = false;
  int threads = 1;
};

int run_icformer(const IcformerArgs& a) {
  auto ckpt = io::IcformerCheckpoint<float>::load(a.checkpoint);
  const auto& cfg = ckpt.config();
  auto in = io::SafeTensors::open(a.input);
  auto dg = io::SafeTensors::open(a.digests);
  index_t n, dc, k, dd;
  const auto context = read_matrix(in, "context_embeds", n, dc);
  const auto digests = read_matrix(dg, "digest_embeds", k, dd);
  if (dc != cfg.hidden) fail(a.input, ": context_embeds has ", dc, " features, the checkpoint expects ", cfg.hidden);
  if (dd != cfg.hidden) fail(a.digests, ": digest_embeds has ", dd, " features, the checkpoint expects ", cfg.hidden);
  auto enc = ckpt.encoder();
  const auto cv = matrix_view<const float>(context.data(), n, dc);
  const auto dv = matrix_view<const float>(digests.data(), k, dd);
  const index_t chunks = a.no_chunk ? 1 : digest::Chunking::of(n, a.max_chunk_len).count;
  std::vector<float> out(std::size_t(chunks * k * cfg.hidden));
  const auto t0 = std::chrono::steady_clock::now();
  with_threads(a.threads, [&](const auto& exec) {
    if (a.no_chunk) {
      enc.compress(cv, dv, matrix_view(out.data(), k, cfg.hidden), exec);
    } else {
      enc.compress_chunked(cv, dv, a.max_chunk_len, matrix_view(out.data(), chunks * k, cfg.hidden), exec,
                           [&](index_t done, index_t total) {
                             if (total > 1) std::fprintf(stderr, "\rctxcomp icformer: chunk %td/%td", done, total);
                             if (total > 1 && done == total) std::fprintf(stderr, "\n");
                           });
    }
  });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  io::write_safetensors(a.output, {io::TensorOut::of("soft_prompt", {chunks * k, cfg.hidden}, out.data())},
                        {{"method", "icformer"}, {"n", std::to_string(n)}, {"chunks", std::to_string(chunks)}});
  std::fprintf(stderr, "ctxcomp icformer: %td context tokens -> %td digests (%td chunk%s) in %.3f s\n", n, chunks * k,
               chunks, chunks == 1 ? "" : "s", secs);
  return 0;
}

struct FoldArgs {
  std::string model, input, output;
  std::int64_t cl = 126, cr = 127;
  bool every_span = false, at_end = false;
  int threads = 1;
};

int run_fold(const FoldArgs& a) {
  const auto model = host::LlamaModel<float>::load(a.model);
  const auto& c = model.config;
  auto in = io::SafeTensors::open(a.input);
  const auto& info = in.info("input_ids");
  if (info.shape.size() != 1) fail(a.input, ": input_ids must be 1-D, found ", io::SafeTensors::shape_str(info.shape));
  const auto ids = in.read<std::int64_t>("input_ids");
  const index_t n = index_t(ids.size());
  host::LlamaHost<float> h(model);
  auto cache = h.make_cache(std::max<index_t>(n, 1));
  fold::SpanTracker spans(a.cl, a.cr, c.vocab);
  std::vector<float> logits;
  const auto t0 = std::chrono::steady_clock::now();
  with_threads(a.threads, [&](const auto& exec) {
    logits = host::run_with_folding(h, ids.data(), n, spans, cache,
                                    a.at_end ? host::FoldSchedule::AtEnd : host::FoldSchedule::EverySpan, exec);
  });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const index_t m = cache.size();
  std::vector<std::int64_t> kept(cache.token_index(), cache.token_index() + m);
  std::vector<std::vector<float>> kv(std::size_t(2 * c.layers));
  std::vector<io::TensorOut> outs{io::TensorOut::of("logits", {n, c.vocab}, logits.data()),
                                  io::TensorOut::of("kept_index", {m}, kept.data())};
  for (index_t l = 0; l < c.layers; ++l)
    for (int which = 0; which < 2; ++which) {
      auto v = which ? cache.values(l) : cache.keys(l);
      auto& buf = kv[std::size_t(2 * l + which)];
      for (index_t hh = 0; hh < v.heads; ++hh)
        buf.insert(buf.end(), v.row(hh, 0), v.row(hh, 0) + m * v.head_dim);
      outs.push_back(io::TensorOut::of("layer" + std::to_string(l) + (which ? "_v" : "_k"), {c.kv_heads, m, c.head_dim}, buf.data()));
    }
  io::write_safetensors(a.output, outs, {{"method", "sentinel"}, {"cl_id", std::to_string(a.cl)}, {"cr_id", std::to_string(a.cr)}});
  std::fprintf(stderr, "ctxcomp fold: %td tokens, %d spans folded, cache %td -> %td entries in %.3f s\n", n,
               int(spans.closed_spans()), n, m, secs);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ctxcomp: LLM context compression (IC-Former digests, sentinel KV folding, SAC anchors)"};
  app.require_subcommand(1);
  auto* demo = app.add_subcommand("demo", "Run the attention core on a built-in example and print what it did");

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
  icf->add_option("--threads", ic.threads, "Worker threads (results are identical for any count)")
      ->default_val(1)->check(CLI::Range(1, 64));

  FoldArgs fa;
  auto* fo = app.add_subcommand("fold", "Run a Llama checkpoint over input_ids, folding every <CL>...<CR> span into its <CR>");
  fo->add_option("--model", fa.model, "Hugging Face Llama checkpoint directory (config.json + model.safetensors)")
      ->required()->check(CLI::ExistingDirectory);
  fo->add_option("--input", fa.input, "safetensors file with tensor input_ids [n] (I64 or I32)")->required()->check(CLI::ExistingFile);
  fo->add_option("--output", fa.output,
                 "Output safetensors: logits [n x vocab] F32, kept_index [m] I64, layer{i}_k / layer{i}_v [kv_heads x m x head_dim] F32")
      ->required();
  fo->add_option("--cl", fa.cl, "Token id of <CL>, which opens a span")->default_val(126);
  fo->add_option("--cr", fa.cr, "Token id of <CR>, which closes a span and becomes its compact entry")->default_val(127);
  auto* every = fo->add_flag("--fold-every-span", fa.every_span, "Evict each span right after its <CR> (default)");
  fo->add_flag("--fold-at-end", fa.at_end, "Process everything first, evict all closed spans at the end")->excludes(every);
  fo->add_option("--threads", fa.threads, "Worker threads (results are identical for any count)")
      ->default_val(1)->check(CLI::Range(1, 64));

  CLI11_PARSE(app, argc, argv);
  try {
    if (*demo) return run_demo();
    if (*icf) return run_icformer(ic);
    if (*fo) return run_fold(fa);
  } catch (const ctxcomp::Error& e) {
    std::fprintf(stderr, "ctxcomp: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ctxcomp: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
