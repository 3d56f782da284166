// Built with -fno-exceptions: every public header and the library parts of the examples
// compile without exceptions, and an error reaches the handler installed with
// ctxcomp::set_error_handler with the outputs and caches as they were before the call.
// `noexcept_check <scenario>` makes one bad call; the handler compares the outputs with their
// saved copies and exits 0 when they are untouched (1 if not). Returning from the bad call is
// exit 2. `noexcept_check default <scenario>` keeps the default handler (message, abort).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <ctxcomp/ctxcomp.hpp>

#include "demo.hpp"
#include "fold_driver.hpp"
#include "llama_host.hpp"
#include "sac_driver.hpp"

#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
#error "noexcept_check must be compiled with -fno-exceptions"
#endif

using namespace ctxcomp;

namespace {
std::function<bool()> g_untouched;  // compares the outputs with their saved copies

void handler(const char* message) {
  const bool ok = g_untouched && g_untouched();
  std::printf("handler reached: %s\noutputs untouched: %s\n", message, ok ? "yes" : "NO");
  std::fflush(stdout);
  std::_Exit(ok ? 0 : 1);
}

template <class T>
std::vector<T> snapshot(const KvCache<T>& c) {
  std::vector<T> s;
  for (index_t l = 0; l < c.layers(); ++l)
    for (const T* p : {c.keys(l).data, c.values(l).data}) s.insert(s.end(), p, p + c.size() * c.kv_heads() * c.head_dim());
  return s;
}

int run(const std::string& what) {
  if (what == "attention") {  // 6 query heads over 4 kv heads
    std::vector<float> q(6 * 3 * 8, 0.5f), k(4 * 3 * 8, 0.25f), out(q.size(), 7.f);
    const auto saved = out;
    g_untouched = [&] { return out == saved; };
    Workspace ws;
    attention(HeadsView<const float>::contiguous(q.data(), 6, 3, 8), HeadsView<const float>::contiguous(k.data(), 4, 3, 8),
              HeadsView<const float>::contiguous(k.data(), 4, 3, 8), Causal(0),
              HeadsView<float>::contiguous(out.data(), 6, 3, 8), {}, ws);
  } else if (what == "spans") {  // a <CR> that closes no span, after good tokens
    fold::SpanTracker tracker(1, 2);
    std::vector<std::int64_t> good = {5, 1, 6, 2, 7}, bad = {8, 2, 9}, pos(5), out(3, -7);
    tracker.push(good.data(), 5, pos.data());
    g_untouched = [&] { return tracker.size() == 5 && out == std::vector<std::int64_t>(3, -7); };
    tracker.push(bad.data(), 3, out.data());
  } else if (what == "evict") {  // an eviction range past the cache's end
    KvCache<fp16> cache(2, 2, 8, 16);
    std::vector<std::int64_t> pos = {0, 1, 2, 3};
    std::vector<index_t> idx = {0, 1, 2, 3};
    cache.append(4, pos.data(), idx.data());
    for (index_t l = 0; l < 2; ++l)
      for (index_t i = 0; i < 4 * 2 * 8; ++i) cache.keys(l).data[i] = fp16(float(i)), cache.values(l).data[i] = fp16(float(-i));
    const auto saved = snapshot(cache);
    g_untouched = [&] { return cache.size() == 4 && snapshot(cache) == saved; };
    cache.evict({{1, 2}, {3, 9}});
  } else if (what == "safetensors") {  // a header length past the end of the bytes
    std::vector<std::uint8_t> bytes = {200, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    g_untouched = [] { return true; };
    (void)io::SafeTensors::from_bytes(bytes);
  } else if (what == "host") {  // the mask check fails after the host appended the new slots
    demo::SeededLlama llama;
    host::LlamaHost<float> host(llama.model);
    auto cache = host.make_cache(8);
    std::vector<float> x(2 * 256, 0.1f);
    std::vector<std::int64_t> pos = {0, 1};
    std::vector<index_t> idx = {0, 1}, idx2 = {2, 3};
    host.forward(matrix_view(x.data(), 2, 256), pos.data(), idx.data(), Causal(0), cache);
    const auto saved = snapshot(cache);
    g_untouched = [&] { return cache.size() == 2 && snapshot(cache) == saved; };
    std::vector<TokenRole> roles(3);  // covers 3 tokens: the 2 cached and 1 of the 2 new
    std::vector<std::int64_t> pos2 = {2, 3};
    host.forward(matrix_view(x.data(), 2, 256), pos2.data(), idx2.data(), SentinelSpans{roles.data(), 3, 2, nullptr}, cache);
  } else if (what == "anchor") {  // chunk_size 0
    g_untouched = [] { return true; };
    (void)anchor::AnchorPlan::uniform(100, 0, 4);
  } else {
    std::fprintf(stderr, "unknown scenario '%s'\n", what.c_str());
    return 3;
  }
  std::printf("the bad call returned\n");
  return 2;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "default") return run(argv[2]);
  if (argc != 2) return 3;
  set_error_handler(&handler);
  return run(argv[1]);
}
