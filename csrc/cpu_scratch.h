// Scratch memory and the floating-point mode of the CPU kernels (routing_cpu.cpp and
// routing_cpu_shared.cpp): one pool of large blocks for both (ScratchPool::get() is an inline
// function's static, so the two translation units share it, and cpp_release_scratch frees it).
#pragma once

#include <pthread.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "routing_common.h"

namespace capsnet_fused {

// Large scratch blocks, kept between calls. glibc's malloc hands freed large blocks back to the
// system (it unmaps them or trims the heap), and in some processes it did so after every call:
// the backward's buffers and outputs (about 12 MB at the MNIST shape, B = 128) then came back
// as fresh pages, about 3000 page faults per call, and the backward took 1.2x its time in a
// process without them (Zen 5 VM; `python bench/ab_yardstick.py OLD NEW --default-malloc`).
// Buffers of at least kPooledBytes are therefore taken from this pool (the smallest free
// block that fits, from any thread) and given back to it, which keeps at most kPoolCapBytes
// of free blocks; cpp_release_scratch() frees them. With the pool the torch outputs stopped
// faulting too (glibc no longer trimmed the heap they come from).
constexpr size_t kPooledBytes = size_t{64} << 10;
constexpr size_t kPoolCapBytes = size_t{64} << 20;

class ScratchPool {
 public:
  static ScratchPool& get() {
    static ScratchPool pool;
    return pool;
  }
  ScratchPool(const ScratchPool&) = delete;
  ScratchPool& operator=(const ScratchPool&) = delete;
  ~ScratchPool() { release_all(); }

  // A 64-byte aligned block of at least `bytes` (a multiple of 64); *got: its size.
  void* acquire(size_t bytes, size_t* got) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->bytes >= bytes && (best == free_.end() || it->bytes < best->bytes)) best = it;
      }
      // A block more than twice the size asked for stays free for a larger request.
      if (best != free_.end() && best->bytes <= 2 * bytes) {
        void* p = best->data;
        *got = best->bytes;
        free_bytes_ -= best->bytes;
        free_.erase(best);
        return p;
      }
    }
    *got = bytes;
    return std::aligned_alloc(64, bytes);
  }

  void release(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (free_bytes_ + bytes <= kPoolCapBytes) {
        free_.push_back({p, bytes});
        free_bytes_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  // Frees every free block; returns their bytes.
  size_t release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t bytes = free_bytes_;
    for (const Block& b : free_) std::free(b.data);
    free_.clear();
    free_bytes_ = 0;
    return bytes;
  }

 private:
  // fork() while another thread holds the lock would leave it locked forever in the child (a
  // DataLoader worker, say): the forking thread takes it first and both sides release it.
  ScratchPool() {
    pthread_atfork([] { get().mutex_.lock(); }, [] { get().mutex_.unlock(); },
                   [] { get().mutex_.unlock(); });
  }
  struct Block {
    void* data;
    size_t bytes;
  };
  std::mutex mutex_;
  std::vector<Block> free_;
  size_t free_bytes_ = 0;
};

// A 64-byte aligned array of V: vectors of float32 / float64 lanes (std::vector<V> returned
// 16-byte aligned storage here and the aligned vector stores crashed) or scalars (the
// shared-logits kernels); large ones from the ScratchPool.
template <typename V>
class Buffer {
 public:
  explicit Buffer(int64_t n = 0) { resize(n); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { deallocate(); }
  // Contents are unspecified after a resize that grows the buffer.
  void resize(int64_t n) {
    if (n > capacity_) {
      deallocate();
      const size_t bytes = (static_cast<size_t>(n) * sizeof(V) + 63) / 64 * 64;
      if (bytes >= kPooledBytes) {
        data_ = static_cast<V*>(ScratchPool::get().acquire(bytes, &bytes_));
      } else {
        data_ = static_cast<V*>(std::aligned_alloc(64, bytes));
        bytes_ = bytes;
      }
      TORCH_CHECK(data_ != nullptr, "capsnet_fused: out of memory (", bytes, " bytes)");
      capacity_ = static_cast<int64_t>(bytes_ / sizeof(V));
      // Under the tests' poisoning, scratch starts as NaN (all bits set) too: a value read
      // before it is written then shows, whether the block is fresh or from the pool.
      if (poison_outputs()) std::memset(static_cast<void*>(data_), 0xFF, bytes_);
    }
    size_ = n;
  }
  void assign(int64_t n, const V& x) {
    resize(n);
    std::fill(data_, data_ + n, x);
  }
  void zero() { std::fill(begin(), end(), V{}); }
  V* data() { return data_; }
  const V* data() const { return data_; }
  V* begin() { return data_; }
  V* end() { return data_ + size_; }
  V& operator[](int64_t k) { return data_[k]; }
  const V& operator[](int64_t k) const { return data_[k]; }

 private:
  void deallocate() {
    if (data_ == nullptr) return;
    if (bytes_ >= kPooledBytes) {
      ScratchPool::get().release(data_, bytes_);
    } else {
      std::free(data_);
    }
    data_ = nullptr;
    capacity_ = 0;
  }
  V* data_ = nullptr;
  size_t bytes_ = 0;
  int64_t size_ = 0, capacity_ = 0;
};

// Flush-to-zero and denormals-are-zero for the lifetime of the object, on the calling thread.
// Saturated couplings (c near e^-87) times u_hat (or u) give float32 denormals, which cost
// this CPU about a hundred cycles each: one sweep with them ran at half speed. Values below 1.2e-38
// (float32) or 2.2e-308 (float64) become 0, far below the kernels' rounding error.
class FlushDenormals {
 public:
#if defined(__SSE__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

}  // namespace capsnet_fused
