// The compile-time probe of issue 34: a consumer file that includes the umbrella header and makes
// one attention() call with bf16 K/V (the README's example). CI prints how long it takes to
// compile at -O2 (`.ci/run`, stage "consumer compile time"); it is not a test.
#include <ctxcomp/ctxcomp.hpp>

#include <vector>

int main() {
  using namespace ctxcomp;
  const index_t n = 64;
  std::vector<float> q(32 * n * 128, 0.01f), out(q.size());
  std::vector<bf16> k(8 * n * 128, bf16(0.02f)), v(k.size(), bf16(0.03f));
  Workspace ws;
  attention(HeadsView<const float>::contiguous(q.data(), 32, n, 128), HeadsView<const bf16>::contiguous(k.data(), 8, n, 128),
            HeadsView<const bf16>::contiguous(v.data(), 8, n, 128), Causal(0),
            HeadsView<float>::contiguous(out.data(), 32, n, 128), {}, ws);
  return out[0] == out[0] ? 0 : 1;
}
