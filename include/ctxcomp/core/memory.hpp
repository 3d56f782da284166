// HugePageAllocator: a standard allocator for large buffers that are streamed whole, such as a
// KV cache that every decode step reads from end to end. Blocks of 2 MB or more are 2 MB aligned
// and, on Linux, advised for transparent huge pages (madvise MADV_HUGEPAGE) before anything
// touches them, so the kernel backs them with 2 MB pages where it offers them (THP `always` or
// `madvise` mode): 512 times fewer pages for the core to translate. Only whole 2 MB pages inside
// the block are advised, so a block never takes more memory than it asks for. Smaller blocks,
// other systems, and THP `never` get ordinary 64-byte aligned memory; the advice never fails an
// allocation.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <limits>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ctxcomp {

/// Allocates as described at the top of this file; stateless, so any two compare equal.
template <class T>
struct HugePageAllocator {
  using value_type = T;  ///< the element type
  static constexpr std::size_t huge_page = std::size_t(2) << 20;  ///< bytes of a huge page (x86-64, AArch64 4K)
  static constexpr std::size_t alignment = 64;                    ///< alignment of blocks below huge_page

  HugePageAllocator() noexcept = default;  ///< stateless
  /// Rebinding: stateless, nothing to copy.
  template <class U>
  HugePageAllocator(const HugePageAllocator<U>&) noexcept {}

  /// Memory for n T, uninitialised (see the top of this file); std::bad_alloc when there is none.
  T* allocate(std::size_t n) {
    if (n > (std::numeric_limits<std::size_t>::max() - huge_page) / sizeof(T)) out_of_memory();
    const std::size_t bytes = n * sizeof(T);
    const std::size_t align = bytes >= huge_page ? huge_page : alignment;
    // aligned_alloc wants a non-zero multiple of the alignment; the rounding is never touched.
    void* p = std::aligned_alloc(align, std::max<std::size_t>(1, (bytes + align - 1) / align) * align);
    if (!p) out_of_memory();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align == huge_page) (void)::madvise(p, bytes / huge_page * huge_page, MADV_HUGEPAGE);  // a hint
#endif
    return static_cast<T*>(p);
  }
  /// Frees a block from allocate.
  void deallocate(T* p, std::size_t) noexcept { std::free(p); }

  /// As std::allocator: std::bad_alloc, or (under -fno-exceptions) abort.
  [[noreturn]] static void out_of_memory() {
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
    throw std::bad_alloc();
#else
    std::abort();
#endif
  }

  /// Any two are equal (either frees the other's blocks).
  ///@{
  friend bool operator==(const HugePageAllocator&, const HugePageAllocator&) noexcept { return true; }
  friend bool operator!=(const HugePageAllocator&, const HugePageAllocator&) noexcept { return false; }
  ///@}
};

}  // namespace ctxcomp
