// The tests' shared helpers, one header: seeded random data, relative error and fixture paths;
// the two-thread executor of the [threads] tests (OpenMPExecutor where the build has OpenMP,
// otherwise a HostExecutor over std::thread, what the tsan preset uses: ThreadSanitizer cannot
// see inside libgomp, so its OpenMP runs would report the runtime's own synchronisation); the
// runner of the `ctxcomp` tool built with the tests; and the checks shared by the tests that
// reproduce sentinel-format fixtures (a cache layer as floats, the host-with-folding run against
// a case file, a `ctxcomp fold` output file against one).
#pragma once
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <ctxcomp/ctxcomp.hpp>
#include <ctxcomp/io/checkpoint.hpp>
#include <ctxcomp/io/safetensors.hpp>

#include "catch.hpp"
#include "fold_driver.hpp"
#include "kv_storage.hpp"

namespace ctxcomp::test {

inline std::vector<float> random_vector(std::size_t n, unsigned seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

/// max |a - b| / max |b| (b is the reference).
template <class A, class B>
double relative_error(const A* a, const B* b, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double x = double(a[i]), y = double(b[i]);
    if (std::isnan(x) != std::isnan(y)) return INFINITY;
    num = std::max(num, std::abs(x - y));
    den = std::max(den, std::abs(y));
  }
  return den > 0 ? num / den : num;
}

/// Directory of the golden fixtures copied into the repository.
inline std::string fixtures_dir() { return CTXCOMP_FIXTURES_DIR; }

/// Every KV layout the reference host runs (examples/kv_storage.hpp).
inline constexpr host::KvLayout kLayouts[] = {host::KvLayout::contiguous, host::KvLayout::cells,
                                              host::KvLayout::paged};

// ---- threads

/// A HostExecutor whose `run` starts `workers` std::threads that take tasks from a shared
/// counter (worker w only ever runs on thread w).
inline HostExecutor std_thread_executor(index_t workers) {
  return HostExecutor{workers, [workers](index_t n, const HostExecutor::Task& task) {
                        std::atomic<index_t> next{0};
                        std::vector<std::thread> pool;
                        for (index_t w = 0; w < workers; ++w)
                          pool.emplace_back([&, w] {
                            for (index_t i = next++; i < n; i = next++) task(i, w);
                          });
                        for (auto& t : pool) t.join();
                      }};
}

#if defined(_OPENMP)
inline OpenMPExecutor two_threads() { return OpenMPExecutor(2); }
#else
inline HostExecutor two_threads() { return std_thread_executor(2); }
#endif

// ---- the ctxcomp tool

struct CliRun {
  int status;
  std::string err;
  std::string out;  ///< stdout
};

/// Path of a scratch file in the temporary directory.
inline std::string tmp(const std::string& name) { return (std::filesystem::temp_directory_path() / name).string(); }

inline CliRun run_cli(const std::string& args) {
  // Per process: the suite's shards run side by side (ctest -L shard -j 2) and both run the tool.
  const std::string id = std::to_string(::getpid());
  const std::string errf = tmp("ctxcomp_cli_stderr_" + id + ".txt"), outf = tmp("ctxcomp_cli_stdout_" + id + ".txt");
  const std::string cmd = std::string(CTXCOMP_CLI_PATH) + " " + args + " 2> " + errf + " > " + outf;
  const int rc = std::system(cmd.c_str());
  auto slurp = [](const std::string& p) {
    std::ifstream f(p);
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  };
  CliRun r{rc, slurp(errf), slurp(outf)};
  std::remove(errf.c_str());  // (the temp directory would otherwise keep two files per test process)
  std::remove(outf.c_str());
  return r;
}

// ---- sentinel-format fixtures

/// Layer l's keys (or values) of every cached token in logical order, [kv_heads x size x
/// head_dim], as floats, from any KV layout.
template <class Kv>
std::vector<float> layer_kv(const Kv& cache, index_t l, bool values) {
  const auto order = kv::logical_order(cache);
  auto v = values ? cache.values(l) : cache.keys(l);
  std::vector<float> out;
  for (index_t h = 0; h < v.heads; ++h)
    for (index_t t : order)
      for (index_t i = 0; i < v.head_dim; ++i) out.push_back(float(element_value(v, h, t, i)));
  return out;
}

/// The cached token indices in logical order.
template <class Kv>
std::vector<std::int64_t> kept_tokens(const Kv& cache) {
  std::vector<std::int64_t> out;
  for (index_t s : kv::logical_order(cache)) out.push_back(cache.token_index()[s]);
  return out;
}

/// Runs `model` with folding over the case's input_ids (<CL>/<CR> from its metadata) and checks
/// the logits, the kept token indices and every layer's folded K/V against the case's float64
/// tensors (1e-5 relative). Returns the logits' relative error.
template <class T>
double check_fold_case(const host::LlamaModel<T>& model, const std::string& case_file, host::FoldSchedule schedule,
                       host::KvLayout layout = host::KvLayout::contiguous, index_t block_size = 16) {
  auto st = io::SafeTensors::open(case_file);
  const auto ids = st.read<std::int64_t>("input_ids");
  host::LlamaHost<T> h(model);
  const auto& c = model.config;
  return host::with_kv_layout<float>(layout, KvShape{c.layers, c.kv_heads, c.head_dim}, index_t(ids.size()), block_size,
                                     [&](auto& cache) {
    fold::SpanTracker spans(std::stoll(st.meta("cl_id")), std::stoll(st.meta("cr_id")), c.vocab);
    const auto logits = host::run_with_folding(h, ids.data(), index_t(ids.size()), spans, cache, schedule);
    const auto expect = st.read<double>("logits");
    const double err = relative_error(logits.data(), expect.data(), logits.size());
    CHECK(err <= 1e-5);
    CHECK(kept_tokens(cache) == st.read<std::int64_t>("kept_index"));
    for (index_t l = 0; l < c.layers; ++l) {
      const auto k = layer_kv(cache, l, false), v = layer_kv(cache, l, true);
      const auto ek = st.read<double>("layer" + std::to_string(l) + "_k"), ev = st.read<double>("layer" + std::to_string(l) + "_v");
      REQUIRE(k.size() == ek.size());
      CHECK(relative_error(k.data(), ek.data(), k.size()) <= 1e-5);
      CHECK(relative_error(v.data(), ev.data(), v.size()) <= 1e-5);
    }
    return err;
  });
}

/// Checks a `ctxcomp fold` output file against a sentinel-format case file: kept_index exactly,
/// logits and the two layers' K/V within 1e-5 relative of the float64 tensors.
inline void check_fold_output(const std::string& out, const std::string& case_file) {
  auto es = io::SafeTensors::open(case_file);
  auto os = io::SafeTensors::open(out);
  CHECK(os.read<std::int64_t>("kept_index") == es.read<std::int64_t>("kept_index"));
  for (const char* t : {"logits", "layer0_k", "layer0_v", "layer1_k", "layer1_v"}) {
    INFO(t);
    const auto got = os.read<float>(t, es.info(t).shape);
    const auto expect = es.read<double>(t);
    CHECK(relative_error(got.data(), expect.data(), got.size()) <= 1e-5);
  }
}

/// Checks a `ctxcomp sac` output file against a SAC-format case file: decode_logits and every
/// layer's compressed K/V within 1e-5 relative of the float64 tensors.
inline void check_sac_output(const std::string& out, const std::string& case_file) {
  auto es = io::SafeTensors::open(case_file);
  auto os = io::SafeTensors::open(out);
  std::vector<std::string> names{"decode_logits"};
  for (const auto& t : es.tensors())
    if (t.name.rfind("layer", 0) == 0) names.push_back(t.name);
  REQUIRE(names.size() > 1);
  for (const auto& t : names) {
    INFO(t);
    const auto got = os.read<float>(t, es.info(t).shape);
    const auto expect = es.read<double>(t);
    CHECK(relative_error(got.data(), expect.data(), got.size()) <= 1e-5);
  }
}

/// The checkpoints fixtures (tests/io, tests/cli): case directories and scratch copies to break.
namespace checkpoints {
namespace fs = std::filesystem;
inline const char* kCheckpointCases[] = {"llama3_tied_sharded_bf16", "qwen2_bias_fp16", "qwen3_qknorm_bf16"};
inline std::string case_dir(const std::string& c) { return test::fixtures_dir() + "/checkpoints/" + c; }

/// A scratch copy of a fixture directory that a test may modify.
inline std::string scratch_copy(const std::string& from, const std::string& name) {
  const fs::path to = fs::temp_directory_path() / ("ctxcomp_ckpt_" + name);
  fs::remove_all(to);
  fs::copy(from, to, fs::copy_options::recursive);
  for (auto& e : fs::recursive_directory_iterator(to))
    fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
  return to.string();
}

inline nlohmann::json read_json_file(const std::string& p) { return io::read_json(p); }

/// The error LlamaModel<float>::load(dir, adapter) reports, or "(loaded without error)".
inline std::string load_error(const std::string& dir, const std::string& adapter = {}) {
  try {
    host::LlamaModel<float>::load(dir, adapter);
  } catch (const Error& e) {
    return e.what();
  }
  return "(loaded without error)";
}
inline void write_json_file(const std::string& p, const nlohmann::json& j) { std::ofstream(p) << j.dump(2); }

/// Rewrites a safetensors file keeping every tensor whose name `keep` accepts, plus `extra`.
inline void rewrite(const std::string& path, const std::function<bool(const std::string&)>& keep,
             const std::vector<io::TensorOut>& extra = {}) {
  auto st = io::SafeTensors::open(path, io::SafeTensors::Mode::Read);
  std::vector<io::TensorOut> outs;
  for (const auto& t : st.tensors())
    if (keep(t.name)) outs.push_back({t.name, t.dtype, t.shape, st.raw(t)});
  outs.insert(outs.end(), extra.begin(), extra.end());
  io::write_safetensors(path, outs, st.metadata());
}

/// Rewrites a scratch directory's config to name another architecture.
inline void set_arch(const std::string& dir, const std::string& arch, const std::string& model_type) {
  auto j = read_json_file(dir + "/config.json");
  j["architectures"] = {arch};
  j["model_type"] = model_type;
  write_json_file(dir + "/config.json", j);
}
}  // namespace checkpoints

/// The SAC fixtures (tests/anchor, tests/cli): the cases and their reader.
namespace sac {
inline const char* kCases[] = {"sac_basic", "sac_multichunk", "sac_ratio5", "sac_anchor_bidir_multichunk"};
inline std::string llama_dir() { return test::fixtures_dir() + "/models/llama"; }
inline std::string case_path(const char* c) { return test::fixtures_dir() + "/sac/" + c + ".safetensors"; }

/// A SAC fixture case: inputs, options and the official per-layer K/V.
struct Fixture {
  io::SafeTensors st;
  std::vector<std::int64_t> ids, targets;
  std::vector<float> roles, special;
  index_t chunk, ratio;
  anchor::ChunkMask mask;
  explicit Fixture(const char* c) : st(io::SafeTensors::open(case_path(c))) {
    ids = st.read<std::int64_t>("input_ids");
    targets = st.read<std::int64_t>("lm_target_ids");
    roles = st.read<float>("role_tokens");
    special = st.read<float>("special_tokens");
    chunk = std::stoll(st.meta("chunk_size"));
    ratio = std::stoll(st.meta("compress_ratio"));
    mask = st.meta("mask") == "anchor" ? anchor::ChunkMask::Anchor : anchor::ChunkMask::Full;
  }
  index_t n() const { return index_t(ids.size()); }
  MatrixView<const float> role_view() const {
    return matrix_view<const float>(roles.data(), index_t(roles.size() / 64), 64);
  }
  void check_cache(const KvCache<float>& cache, index_t layers) const {
    for (index_t l = 0; l < layers; ++l) {
      INFO("layer " << l);
      const auto k = layer_kv(cache, l, false), v = layer_kv(cache, l, true);
      const auto ek = st.read<double>("layer" + std::to_string(l) + "_k");
      const auto ev = st.read<double>("layer" + std::to_string(l) + "_v");
      REQUIRE(k.size() == ek.size());
      CHECK(test::relative_error(k.data(), ek.data(), k.size()) <= 1e-5);
      CHECK(test::relative_error(v.data(), ev.data(), v.size()) <= 1e-5);
    }
  }
};
}  // namespace sac

}  // namespace ctxcomp::test
