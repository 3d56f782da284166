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

namespace ctxcomp::test {

/// Layer l's keys (or values) of every cached token, [kv_heads x size x head_dim], as floats.
template <class C>
std::vector<float> layer_kv(const KvCache<C>& cache, index_t l, bool values) {
  auto v = values ? cache.values(l) : cache.keys(l);
  std::vector<float> out;
  for (index_t h = 0; h < v.heads; ++h)
    for (index_t t = 0; t < v.tokens; ++t)
      for (index_t i = 0; i < v.head_dim; ++i) out.push_back(float(element_value(v, h, t, i)));
  return out;
}

/// Runs `model` with folding over the case's input_ids (<CL>/<CR> from its metadata) and checks
/// the logits, the kept token indices and every layer's folded K/V against the case's float64
/// tensors (1e-5 relative). Returns the logits' relative error.
template <class T>
double check_fold_case(const host::LlamaModel<T>& model, const std::string& case_file, host::FoldSchedule schedule) {
  auto st = io::SafeTensors::open(case_file);
  const auto ids = st.read<std::int64_t>("input_ids");
  host::LlamaHost<T> h(model);
  auto cache = h.make_cache(index_t(ids.size()));
  fold::SpanTracker spans(std::stoll(st.meta("cl_id")), std::stoll(st.meta("cr_id")), model.config.vocab);
  const auto logits = host::run_with_folding(h, ids.data(), index_t(ids.size()), spans, cache, schedule);
  const auto expect = st.read<double>("logits");
  const double err = relative_error(logits.data(), expect.data(), logits.size());
  CHECK(err <= 1e-5);
  const auto kept = st.read<std::int64_t>("kept_index");
  REQUIRE(cache.size() == index_t(kept.size()));
  for (std::size_t s = 0; s < kept.size(); ++s) CHECK(cache.token_index()[s] == kept[s]);
  for (index_t l = 0; l < model.config.layers; ++l) {
    const auto k = layer_kv(cache, l, false), v = layer_kv(cache, l, true);
    const auto ek = st.read<double>("layer" + std::to_string(l) + "_k"), ev = st.read<double>("layer" + std::to_string(l) + "_v");
    CHECK(relative_error(k.data(), ek.data(), k.size()) <= 1e-5);
    CHECK(relative_error(v.data(), ev.data(), v.size()) <= 1e-5);
  }
  return err;
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
