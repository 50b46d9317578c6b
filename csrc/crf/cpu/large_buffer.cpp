#include "crf/cpu/large_buffer.h"

#include <cstdlib>
#include <mutex>
#include <unordered_map>

#if defined(__unix__)
#include <pthread.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace wsss_fast {
namespace crf {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kCacheLine = 64;
constexpr size_t kLargeBlock = kHugePage / 2;  // smaller blocks are not pooled

struct LargeBlockPool {
  std::mutex mutex;
  std::unordered_map<void*, size_t> capacity;  // every pooled block, in use or idle
  std::vector<std::pair<void*, size_t>> idle;  // released blocks, oldest first
  size_t idle_bytes = 0;
};

// Never destroyed: tensors holding pooled blocks may be released during exit. The
// mutex is held across fork() (DataLoader workers fork while other threads may be
// running a CRF with the GIL released), so a child never inherits it locked.
LargeBlockPool& pool() {
  static LargeBlockPool* instance = [] {
    auto* created = new LargeBlockPool;
#if defined(__unix__)
    pthread_atfork([] { pool().mutex.lock(); }, [] { pool().mutex.unlock(); },
                   [] { pool().mutex.unlock(); });
#endif
    return created;
  }();
  return *instance;
}

}  // namespace

void* allocate_large(size_t bytes) {
  if (bytes < kLargeBlock) {
    // Cache-line aligned, so that rows of whole vectors never straddle two lines.
    void* block = std::aligned_alloc(kCacheLine, (bytes + kCacheLine) / kCacheLine * kCacheLine);
    if (block == nullptr) throw std::bad_alloc();
    return block;
  }
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  LargeBlockPool& blocks = pool();
  {
    // The smallest idle block that fits and wastes at most half of itself.
    std::lock_guard<std::mutex> lock(blocks.mutex);
    size_t best = blocks.idle.size();
    for (size_t i = 0; i < blocks.idle.size(); ++i) {
      const size_t size = blocks.idle[i].second;
      if (size >= rounded && size <= 2 * rounded &&
          (best == blocks.idle.size() || size < blocks.idle[best].second)) {
        best = i;
      }
    }
    if (best < blocks.idle.size()) {
      void* block = blocks.idle[best].first;
      blocks.idle_bytes -= blocks.idle[best].second;
      blocks.idle.erase(blocks.idle.begin() + static_cast<std::ptrdiff_t>(best));
      return block;
    }
  }
  void* block = std::aligned_alloc(kHugePage, rounded);
  if (block == nullptr) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
  madvise(block, rounded, MADV_HUGEPAGE);  // a hint: where refused, ordinary pages serve
#endif
  std::lock_guard<std::mutex> lock(blocks.mutex);
  blocks.capacity.emplace(block, rounded);
  return block;
}

void release_large(void* block, size_t bytes) noexcept {
  if (block == nullptr) return;
  if (bytes < kLargeBlock) {
    std::free(block);
    return;
  }
  LargeBlockPool& blocks = pool();
  std::lock_guard<std::mutex> lock(blocks.mutex);
  blocks.idle.emplace_back(block, blocks.capacity.at(block));
  blocks.idle_bytes += blocks.idle.back().second;
  size_t evicted = 0;
  while (blocks.idle_bytes > kLargeBlockPoolLimit) {
    auto [oldest, size] = blocks.idle[evicted++];
    blocks.idle_bytes -= size;
    blocks.capacity.erase(oldest);
    std::free(oldest);
  }
  blocks.idle.erase(blocks.idle.begin(), blocks.idle.begin() + static_cast<std::ptrdiff_t>(evicted));
}

}  // namespace crf
}  // namespace wsss_fast
