// Checks shared by the tests that reproduce sentinel-format fixtures (sentinel/ and
// checkpoints/): a cache layer as floats, the host-with-folding run against a case file, and a
// `ctxcomp fold` output file against one.
#pragma once
#include <string>
#include <vector>

#include <ctxcomp/io/safetensors.hpp>

#include "catch.hpp"
#include "common.hpp"
#include "fold_driver.hpp"
#include "kv_storage.hpp"

namespace ctxcomp::test {

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

}  // namespace ctxcomp::test
