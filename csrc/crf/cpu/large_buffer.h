// Memory for the CPU dense CRF's buffers of megabytes: marginal rows, lattice tables
// and lattice values.
//
// Fresh memory costs one page fault per 4 KiB page at first touch, and in a virtual
// machine a fault costs about two microseconds: for one 500x375 image with 21 labels
// that was a fifth of the whole call, and clearing fresh pages costs as much again.
// Blocks of 1 MiB or more therefore come from a pool: 2 MiB-aligned and marked for
// transparent huge pages (MADV_HUGEPAGE: Linux's default THP mode, "madvise", grants
// them only on request), and kept for reuse once released, so that a run over a
// dataset of images faults in its buffers once, not once per image. The pool keeps at
// most kLargeBlockPoolLimit bytes of released blocks; the oldest go first.
#pragma once

#include <cstddef>
#include <new>
#include <utility>
#include <vector>

namespace wsss_fast {
namespace crf {

constexpr size_t kLargeBlockPoolLimit = size_t{256} << 20;

// A block of `bytes`, aligned to at least a cache line; release it with release_large
// and the same `bytes`.
void* allocate_large(size_t bytes);
void release_large(void* block, size_t bytes) noexcept;

// std::vector allocator over allocate_large. Elements added without a value are
// default-initialised, i.e. left unwritten for plain numbers: every buffer that uses
// it is written in full before it is read, and a zero fill would touch each page once
// more for nothing. Pass the value (resize(n, 0)) where zeros are needed.
template <typename T>
struct LargeBufferAllocator {
  using value_type = T;

  LargeBufferAllocator() = default;
  template <typename U>
  LargeBufferAllocator(const LargeBufferAllocator<U>&) noexcept {}

  T* allocate(size_t count) { return static_cast<T*>(allocate_large(count * sizeof(T))); }
  void deallocate(T* block, size_t count) noexcept { release_large(block, count * sizeof(T)); }

  template <typename U>
  void construct(U* place) noexcept {
    ::new (static_cast<void*>(place)) U;
  }
  template <typename U, typename... Args>
  void construct(U* place, Args&&... args) {
    ::new (static_cast<void*>(place)) U(std::forward<Args>(args)...);
  }

  template <typename U>
  bool operator==(const LargeBufferAllocator<U>&) const noexcept {
    return true;
  }
};

template <typename T>
using LargeBuffer = std::vector<T, LargeBufferAllocator<T>>;

}  // namespace crf
}  // namespace wsss_fast
