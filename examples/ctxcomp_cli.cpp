// The `ctxcomp` command-line tool.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <ctxcomp/ctxcomp.hpp>

using namespace ctxcomp;

static int run_demo() {
  // The attention core on a built-in example: 8 query heads over 2 kv heads, causal, 300 tokens.
  const index_t heads = 8, kvh = 2, n = 300, d = 64;
  std::vector<float> q(std::size_t(heads * n * d)), k(std::size_t(kvh * n * d)), v(k.size()), out(q.size()), ref(q.size());
  std::uint32_t s = 1;
  auto rnd = [&] { s = s * 1664525u + 1013904223u; return float(s >> 8) / float(1 << 24) - 0.5f; };
  for (auto* b : {&q, &k, &v})
    for (auto& x : *b) x = rnd();
  Workspace ws;
  auto t0 = std::chrono::steady_clock::now();
  attention(HeadsView<const float>::contiguous(q.data(), heads, n, d), HeadsView<const float>::contiguous(k.data(), kvh, n, d),
            HeadsView<const float>::contiguous(v.data(), kvh, n, d), Causal(0), HeadsView<float>::contiguous(out.data(), heads, n, d), {}, ws);
  auto t1 = std::chrono::steady_clock::now();
  reference::attention(HeadsView<const float>::contiguous(q.data(), heads, n, d), HeadsView<const float>::contiguous(k.data(), kvh, n, d),
                       HeadsView<const float>::contiguous(v.data(), kvh, n, d), Causal(0), HeadsView<float>::contiguous(ref.data(), heads, n, d));
  double err = 0, mx = 0;
  for (std::size_t i = 0; i < out.size(); ++i) err = std::max(err, double(std::abs(out[i] - ref[i]))), mx = std::max(mx, double(std::abs(ref[i])));
  std::printf("ctxcomp demo: fused causal attention, %td query heads / %td kv heads, %td tokens, head_dim %td (%s)\n", heads, kvh, n, d,
              simd::active_isa());
  std::printf("  fused kernel: %.3f ms; relative error vs double reference: %.2e\n",
              std::chrono::duration<double, std::milli>(t1 - t0).count(), err / mx);
  return err / mx <= 1e-5 ? 0 : 1;
}

int main(int argc, char** argv) {
  CLI::App app{"ctxcomp: LLM context compression (IC-Former digests, sentinel KV folding, SAC anchors)"};
  app.require_subcommand(1);
  auto* demo = app.add_subcommand("demo", "Run the attention core on a built-in example and print what it did");
  CLI11_PARSE(app, argc, argv);
  try {
    if (*demo) return run_demo();
  } catch (const ctxcomp::Error& e) {
    std::fprintf(stderr, "ctxcomp: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
