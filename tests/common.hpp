// Shared test helpers: seeded random data, relative error, fixture paths.
#pragma once
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <ctxcomp/ctxcomp.hpp>

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

}  // namespace ctxcomp::test
