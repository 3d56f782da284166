// Includes the umbrella header and runs one attention call: the smallest real use.
#include <ctxcomp/ctxcomp.hpp>
#include <cstdio>
#include <vector>

int main() {
  using namespace ctxcomp;
  std::vector<float> q(2 * 3 * 8, 0.5f), k(1 * 3 * 8, 0.25f), v(1 * 3 * 8, 2.f), out(q.size());
  Workspace ws;
  attention(HeadsView<const float>::contiguous(q.data(), 2, 3, 8), HeadsView<const float>::contiguous(k.data(), 1, 3, 8),
            HeadsView<const float>::contiguous(v.data(), 1, 3, 8), Causal(0), HeadsView<float>::contiguous(out.data(), 2, 3, 8),
            {}, ws);
  std::printf("consumer: out[0] = %g (expected 2)\n", out[0]);
  return out[0] == 2.f ? 0 : 1;
}
