// The two-thread executor of the tests: OpenMPExecutor where the build has OpenMP, otherwise a
// HostExecutor over std::thread (what the tsan preset uses: ThreadSanitizer cannot see inside
// libgomp, so its OpenMP runs would report the runtime's own synchronisation).
#pragma once
#include <atomic>
#include <thread>
#include <vector>

#include <ctxcomp/core/executor.hpp>

namespace ctxcomp::test {

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

}  // namespace ctxcomp::test
