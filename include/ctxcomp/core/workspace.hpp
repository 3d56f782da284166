// Workspace: library-owned scratch memory so that hot loops never allocate. A kernel first asks
// for the total bytes it needs (`reserve`, which allocates only when the workspace must grow),
// then carves aligned arrays out of it. Repeated calls of the same size allocate nothing.
#pragma once
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

#include "error.hpp"
#include "types.hpp"

namespace ctxcomp {

/// Scratch memory a kernel reserves and carves; reused across calls (see the top of this file).
class Workspace {
 public:
  static constexpr std::size_t alignment = 64;  ///< bytes every carved array is aligned to

  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  Workspace(Workspace&&) noexcept = default;             ///< moves the buffer
  Workspace& operator=(Workspace&&) noexcept = default;  ///< moves the buffer

  /// Bytes needed for an array of n T, including alignment padding.
  template <class T>
  static constexpr std::size_t bytes_for(index_t n) noexcept {
    return (static_cast<std::size_t>(n) * sizeof(T) + alignment - 1) / alignment * alignment;
  }

  /// Makes room for `bytes` and rewinds: previously carved pointers become invalid.
  void reserve(std::size_t bytes) {
    if (bytes > capacity_) {
      std::size_t cap = (bytes + alignment - 1) / alignment * alignment;
      void* p = std::aligned_alloc(alignment, cap);
      if (!p) fail("Workspace: cannot allocate ", cap, " bytes");
      buffer_.reset(static_cast<std::byte*>(p));
      capacity_ = cap;
      ++allocations_;
    }
    used_ = 0;
  }

  /// Takes an aligned array of n T from the reserved space (uninitialised).
  template <class T>
  T* take(index_t n) {
    std::size_t b = bytes_for<T>(n);
    CTXCOMP_CHECK(used_ + b <= capacity_, "Workspace: take(", b, " bytes) beyond the reserved ", capacity_,
                  " bytes (", used_, " in use); reserve() first");
    T* p = reinterpret_cast<T*>(buffer_.get() + used_);
    used_ += b;
    return p;
  }

  /// Bytes reserved.
  std::size_t capacity() const noexcept { return capacity_; }
  /// How many times the workspace has allocated (for tests of the no-allocation promise).
  std::size_t allocations() const noexcept { return allocations_; }

 private:
  struct Free {
    void operator()(std::byte* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<std::byte[], Free> buffer_;
  std::size_t capacity_ = 0, used_ = 0, allocations_ = 0;
};

}  // namespace ctxcomp
