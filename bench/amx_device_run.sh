#!/usr/bin/env bash
# The AMX runs of issue 36 on a Sapphire Rapids (or later) machine, from binaries built here with
# the amx preset (cmake --preset amx && cmake --build --preset amx --target ctxcomp_tests
# ctxcomp_bench) and copied with their shared libraries into DIR (DIR/lib: libbenchmark, libgomp):
#   bash bench/amx_device_run.sh DIR OUTDIR
# Prints the CPU, the probe of TDPBF16PS / VDPBF16PS arithmetic (compiled there if a compiler is
# present), the [bf16] tests (without the CLI ones, which need the tool at its build path) and
# the bf16 / fp32 / decode benchmarks at 1 and 16 threads (medians of 3), then bench/ratios.py.
set -uo pipefail
dir=$1 out=$2
export LD_LIBRARY_PATH="$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | sed 's/Flags:.*\(amx[a-z_0-9 ]*\).*/Flags (amx): \1/'
if command -v g++ >/dev/null; then
  g++ -O2 -std=c++17 -march=sapphirerapids bench/probe_amx_bf16.cpp -o "$out/probe_amx_bf16" && "$out/probe_amx_bf16" 3000
fi
# the tests read the fixtures at the path they were built with
src=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$dir/CMakeCache.txt" 2>/dev/null || true)
if [ -n "$src" ] && [ ! -e "$src" ]; then mkdir -p "$(dirname "$src")" && ln -s "$PWD" "$src"; fi
"$dir/ctxcomp_tests" "[bf16]~[cli]" 2>&1 | tail -4
"$dir/ctxcomp_tests" "[amx]" -s 2>&1 | grep -E "AMX|error / bound" | sort -u | head -5
CTXCOMP_BENCH_THREADS=1,16 "$dir/ctxcomp_bench" \
  --benchmark_filter='^(attention/fused(_bf16|_bf16_noamx)?/causal_2048(_t16)?|gemm/ctxcomp_(fp32|bf16dot|bf16dot_noamx)/128x4096x4096(_t16)?|icformer/(fp32|bf16dot|bf16dot_noamx)/chunk512(_t16)?|attention/fused/decode_4096_fp16(_t16)?|memread/baseline/decode_4096_fp16(_t16)?|peak/(fma|bf16dot)(_t16)?)/' \
  --benchmark_repetitions=3 --benchmark_report_aggregates_only=true --benchmark_min_time=0.2 \
  --benchmark_out="$out/amx_bench.json" --benchmark_out_format=json 2>&1 | grep -E "median|^Run|CPU" | head -60
python3 bench/ratios.py "$out/amx_bench.json"
