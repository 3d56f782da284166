// Executors: how a kernel spreads independent tasks over threads. A kernel partitions its work
// into tasks independently of the thread count and every task writes disjoint outputs, so
// results are bit-identical for any number of threads. Provided: SerialExecutor (default),
// OpenMPExecutor (when compiled with OpenMP) and HostExecutor (the host's own thread pool).
#pragma once
#include <functional>
#include <type_traits>
#include <utility>

#include "error.hpp"
#include "types.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ctxcomp {

/// The executor concept: `concurrency()` is the number of distinct worker slots, and
/// `parallel_for(n, f)` calls f(task, worker) once for every task in [0, n), with
/// 0 <= worker < concurrency() and no two concurrent calls sharing a worker slot.
/// It returns when all tasks are done. Kernels size per-worker scratch by concurrency().
struct SerialExecutor {
  /// One worker.
  index_t concurrency() const noexcept { return 1; }
  /// Runs the tasks in order on the calling thread.
  template <class F>
  void parallel_for(index_t n, F&& f) const {
    for (index_t i = 0; i < n; ++i) f(i, index_t{0});
  }
};

#if defined(_OPENMP)
/// OpenMP work sharing with a fixed team size (dynamic schedule, one task at a time).
struct OpenMPExecutor {
  int threads = 1;
  explicit OpenMPExecutor(int n = omp_get_max_threads()) : threads(n < 1 ? 1 : n) {}
  index_t concurrency() const noexcept { return threads; }
  template <class F>
  void parallel_for(index_t n, F&& f) const {
    if (threads == 1 || n <= 1) {
      for (index_t i = 0; i < n; ++i) f(i, index_t{0});
      return;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (index_t i = 0; i < n; ++i) f(i, static_cast<index_t>(omp_get_thread_num()));
  }
};
#endif

/// Adapter for a host's thread pool. `run(n, task)` must call task(i, worker) for each i in
/// [0, n) with worker in [0, workers), never two concurrent calls on one worker, and return
/// when all are done. Exceptions must not escape `task` (ctxcomp checks inputs before it
/// starts parallel work).
struct HostExecutor {
  using Task = std::function<void(index_t task, index_t worker)>;  ///< one task: (task index, worker slot)
  index_t workers = 1;                                             ///< worker slots of the pool
  std::function<void(index_t n, const Task& task)> run;            ///< the pool's parallel loop

  /// The pool's worker slots.
  index_t concurrency() const noexcept { return workers; }
  /// Runs the tasks through `run` (serially when no pool is set).
  template <class F>
  void parallel_for(index_t n, F&& f) const {
    if (!run) {
      for (index_t i = 0; i < n; ++i) f(i, index_t{0});
      return;
    }
    run(n, Task(std::ref(f)));
  }
};

/// A non-owning, type-erased reference to any executor, itself an executor. Kernels take their
/// executor through it, so each kernel is compiled once for every executor type (SerialExecutor,
/// OpenMPExecutor, HostExecutor, a host's own) instead of once per type. Dispatch costs one
/// indirect call per task, not per tile. The referenced executor must outlive the reference.
class ExecutorRef {
 public:
  /// References `exec` (any type modelling the executor concept).
  template <class Exec, class = std::enable_if_t<!std::is_same_v<std::decay_t<Exec>, ExecutorRef>>>
  ExecutorRef(const Exec& exec) noexcept  // NOLINT: implicit, as a reference
      : exec_(&exec), concurrency_(exec.concurrency()), run_(&run_with<Exec>) {}

  /// The referenced executor's worker slots.
  index_t concurrency() const noexcept { return concurrency_; }
  /// Calls f(task, worker) for every task in [0, n) through the referenced executor.
  template <class F>
  void parallel_for(index_t n, F&& f) const {
    using Fn = std::remove_reference_t<F>;
    run_(exec_, n, [](void* fn, index_t task, index_t worker) { (*static_cast<Fn*>(fn))(task, worker); },
         const_cast<void*>(static_cast<const void*>(&f)));
  }

 private:
  using Body = void (*)(void* fn, index_t task, index_t worker);
  template <class Exec>
  static void run_with(const void* exec, index_t n, Body body, void* fn) {
    static_cast<const Exec*>(exec)->parallel_for(n, [body, fn](index_t task, index_t worker) { body(fn, task, worker); });
  }
  const void* exec_;
  index_t concurrency_;
  void (*run_)(const void* exec, index_t n, Body body, void* fn);
};

}  // namespace ctxcomp
