// ctxcomp_bench: every microbenchmark in one executable. Names are <block>/<impl>/<case>;
// counters GFLOPS (useful work), GBps or tokens_per_s; baselines live beside each case.
#include <benchmark/benchmark.h>
#include <ctxcomp/core/simd.hpp>

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("ctxcomp_isa", ctxcomp::simd::active_isa());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
