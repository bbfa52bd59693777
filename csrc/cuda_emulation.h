// An emulation of the CUDA execution model on the CPU, enough to run csrc/routing_cuda.cu as
// plain C++ (tests/test_cuda_emulated.py, tests/cuda_emulated_sanitize.cpp). Nothing here is
// used by the real CUDA build: csrc/cuda_compat.h includes this header only when
// CAPSNET_FUSED_CUDA_EMULATION is defined.
//
// What is emulated: __global__/__device__/__host__, threadIdx/blockIdx/blockDim/gridDim,
// dynamic shared memory per block (filled with 0xFF bytes, NaN for float and double, when a
// block starts, so that reading shared memory nobody wrote shows up), __syncthreads,
// __syncwarp, __shfl_sync/__shfl_xor_sync on 4- and 8-byte values, integer atomicAdd, the few
// runtime calls the launchers make, and a launch that runs every block of the grid.
//
// Threads are fibers, not OS threads. Every CUDA thread of a block is a fiber with its own stack
// on one OS thread; a fiber runs until it reaches a barrier (or a shuffle, which is a warp
// barrier here) and then yields to the block's scheduler, which resumes the fibers whose barrier
// is complete. Why fibers rather than one std::thread per CUDA thread:
//   - a shuffle is a barrier of 32 threads; the kernels do tens of them per capsule. A fiber
//     switch costs tens of nanoseconds, an OS-thread barrier of 32..256 threads on 2 cores
//     costs tens of microseconds: the test matrix would take hours instead of a minute;
//   - the order in which threads run between barriers is chosen, not left to the OS, so a
//     missing barrier shows up reproducibly: CUDA_EMU_SCHEDULE=forward|reverse|random:SEED runs
//     the runnable threads in that order (tests run the kernels in more than one order and
//     demand identical results);
//   - ThreadSanitizer still sees every CUDA thread as a thread of its own through its fiber
//     interface (__tsan_create_fiber / __tsan_switch_to_fiber with no_sync), and the only
//     happens-before edges it is told about are CUDA's: __syncthreads and __syncwarp, kernel
//     begin and end. So two CUDA threads that touch the same shared or global memory without a
//     barrier in between are reported as a race, as they would be racing on a GPU. Shuffles
//     exchange values but, as in CUDA, order no memory.
// Blocks are independent and run on CUDA_EMU_THREADS OS threads (default: the hardware
// threads, at most one per block); each OS thread runs one block at a time.
//
// Fiber switches use a small assembly routine on x86-64 (glibc's swapcontext makes a
// sigprocmask system call per switch: about 800 ns on a Zen 3 (AMD EPYC family 25) VM, 40 times
// slower) and ucontext elsewhere. Sanitizers are told about every stack switch (ASan's and
// TSan's fiber APIs).
//
// Checks that report an error from the launch (cudaErrorLaunchFailure, with a message from
// cudaGetErrorString) instead of hanging: a barrier that not every thread of the block (or
// warp) reaches, __syncthreads after some threads of the block returned, __syncwarp mixed with
// a shuffle at the same step, warp operations in a partial warp, masks other than all lanes.
//
// Other environment variables: CUDA_EMU_LOG=PATH appends one line per launch
// ("name grid.x grid.y grid.z block.x block.y block.z shared_bytes"), which the tests compare
// with bench/cuda_traffic.py.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_EMU_ASAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define CUDA_EMU_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CUDA_EMU_TSAN 1
#endif
#endif
#ifdef CUDA_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#ifdef CUDA_EMU_TSAN
#include <sanitizer/tsan_interface.h>
#endif

// CUDA's function and variable qualifiers. __shared__ variables are per block because one OS
// thread runs the fibers of one block at a time (the kernels here use dynamic shared memory).
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };

constexpr int warpSize = 32;

namespace cuda_emu {

// The emulated device: an sm_90's limits (the launchers size tiles from them).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxSharedBytesOptin = 227 * 1024;
constexpr unsigned kFullMask = 0xffffffffu;

namespace detail {

enum class State : int { kReady, kBlockBarrier, kWarpBarrier, kDone };
enum class WarpSync : int { kNone, kSyncwarp, kShuffle };

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while suspended (x86-64 switch)
#if !defined(__x86_64__)
  ucontext_t context;
#endif
  char* stack_lo = nullptr;
  size_t stack_size = 0;
  uint3 thread_idx{0, 0, 0};
  unsigned warp = 0, lane = 0;
  std::atomic<int> state{0};
  std::atomic<unsigned> wait_generation{0};
  unsigned shuffles = 0;  // parity of the shuffle slot to use next
  void* tsan_fiber = nullptr;
  void* asan_fake_stack = nullptr;
};

struct Warp {
  unsigned size = 0;  // lanes that exist (the last warp of a block may be partial)
  std::atomic<unsigned> arrived{0};
  std::atomic<unsigned> generation{0};
  std::atomic<int> kind{0};
  // Shuffle values, double-buffered so that one barrier per shuffle suffices: shuffle n+2
  // writes slot set n % 2 only after every lane passed the barrier of shuffle n+1, that is
  // after every lane read its value of shuffle n.
  std::atomic<uint64_t> slots[2][32];
  char tsan_token[2] = {0, 0};
};

struct Worker;

struct Block {
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};
  unsigned threads = 0;
  unsigned char* shared = nullptr;
  std::atomic<unsigned> arrived{0};
  std::atomic<unsigned> generation{0};
  std::atomic<unsigned> exited{0};
  std::vector<Warp> warps;
  const std::function<void()>* body = nullptr;
  std::string error;
  char tsan_token[2] = {0, 0};
};

// One OS thread running blocks: the fibers (one per CUDA thread), their stacks, shared memory.
struct Worker {
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  size_t stacks_bytes = 0;
  size_t stack_size = 0;
  std::vector<unsigned char> shared_storage;
  unsigned char* shared = nullptr;
  void* main_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t main_context;
#endif
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
  void* main_fake_stack = nullptr;
  void* main_tsan_fiber = nullptr;
  Block* block = nullptr;
  // ThreadSanitizer: released by the scheduler when a block starts, acquired by its threads
  // first thing; released by each thread at its end, acquired by the scheduler after the block.
  // Blocks that one worker runs are therefore ordered (its stacks and shared memory are reused);
  // blocks on different workers (CUDA_EMU_THREADS >= 2) are not.
  char tsan_begin = 0, tsan_end = 0;

  Worker() = default;
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
  ~Worker();
};

// The worker of this OS thread and the running fiber. Atomic only for ThreadSanitizer's sake: a
// fiber reads them before it can acquire anything, and the switch into a fiber, on purpose,
// tells TSan of no ordering between the scheduler and the fiber.
inline thread_local std::atomic<Worker*> tl_worker{nullptr};
inline thread_local std::atomic<Fiber*> tl_fiber{nullptr};

inline Worker& current_worker() { return *tl_worker.load(std::memory_order_relaxed); }
inline Fiber& current_fiber() { return *tl_fiber.load(std::memory_order_relaxed); }
inline thread_local std::string tl_last_error;
inline thread_local int tl_last_code = 0;

inline void tsan_release(void* addr) {
#ifdef CUDA_EMU_TSAN
  __tsan_release(addr);
#else
  (void)addr;
#endif
}

inline void tsan_acquire(void* addr) {
#ifdef CUDA_EMU_TSAN
  __tsan_acquire(addr);
#else
  (void)addr;
#endif
}

#if defined(__x86_64__)
// Saves the callee-saved registers and the SSE/x87 control words on the current stack, stores
// the stack pointer in *from and continues on the stack `to` (which was saved the same way, or
// prepared by start_fiber).
__attribute__((naked, noinline)) static void switch_stack(void** /*from*/, void* /*to*/) {
  asm volatile(
      "pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}
#endif

// Fiber -> scheduler. `final` when the fiber has finished (its fake stack is released).
inline void to_scheduler(Fiber& f, bool final) {
  Worker& w = current_worker();
  void* const target = w.main_sp;
#ifdef CUDA_EMU_TSAN
  // With synchronisation: the scheduler may read what the fiber wrote (its bookkeeping); the
  // switch back into a fiber has none, so no order between CUDA threads comes from here.
  __tsan_switch_to_fiber(w.main_tsan_fiber, 0);
#endif
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(final ? nullptr : &f.asan_fake_stack, w.main_stack_bottom,
                                 w.main_stack_size);
#else
  (void)final;
#endif
#if defined(__x86_64__)
  switch_stack(&f.sp, target);
#else
  swapcontext(&f.context, &w.main_context);
#endif
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, nullptr, nullptr);
#endif
}

// Scheduler -> fiber f, back when f yields or finishes.
inline void to_fiber(Worker& w, Fiber& f) {
  // Read before __tsan_switch_to_fiber: TSan counts every access after it as the fiber's.
  void* const target = f.sp;
  tl_fiber.store(&f, std::memory_order_relaxed);
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(&w.main_fake_stack, f.stack_lo, f.stack_size);
#endif
#ifdef CUDA_EMU_TSAN
  __tsan_switch_to_fiber(f.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__x86_64__)
  switch_stack(&w.main_sp, target);
#else
  swapcontext(&w.main_context, &f.context);
#endif
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(w.main_fake_stack, nullptr, nullptr);
#endif
  tl_fiber.store(nullptr, std::memory_order_relaxed);
}

// Ends the calling CUDA thread with an error that the launch returns. Takes C strings: the
// fiber never resumes, so a std::string temporary of the caller would never be destroyed.
[[noreturn]] inline void fail(const char* what, const char* detail = "") {
  Fiber& f = current_fiber();
  {
    Block& b = *current_worker().block;
    if (b.error.empty()) {
      b.error = std::string(what) + detail + " (block " + std::to_string(b.block_idx.x) + "," +
                std::to_string(b.block_idx.y) + "," + std::to_string(b.block_idx.z) +
                ", thread " + std::to_string(f.thread_idx.x) + "," +
                std::to_string(f.thread_idx.y) + "," + std::to_string(f.thread_idx.z) + ")";
    }
  }
  f.state.store(static_cast<int>(State::kDone), std::memory_order_relaxed);
  to_scheduler(f, true);
  std::abort();  // never resumed
}

[[noreturn]] inline void fiber_main() {
  Worker& w = current_worker();
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &w.main_stack_bottom, &w.main_stack_size);
#endif
  tsan_acquire(&w.tsan_begin);
  Fiber& f = current_fiber();
  Block& b = *w.block;
  (*b.body)();
  tsan_release(&w.tsan_end);
  b.exited.fetch_add(1, std::memory_order_relaxed);
  f.state.store(static_cast<int>(State::kDone), std::memory_order_relaxed);
  to_scheduler(f, true);
  std::abort();  // never resumed
}

#if !defined(__x86_64__)
inline void fiber_main_ucontext() { fiber_main(); }
#endif

inline void init_fiber(Worker& w, Fiber& f) {
#ifdef CUDA_EMU_ASAN
  // Frames of the previous block's fibers that never returned leave poisoned shadow behind.
  __asan_unpoison_memory_region(f.stack_lo, f.stack_size);
#endif
#if defined(__x86_64__)
  auto* top = reinterpret_cast<uint64_t*>(f.stack_lo + f.stack_size);
  // The frame that switch_stack pops: control words, six callee-saved registers, then the
  // return address fiber_main, entered with the stack 8 below a 16-byte boundary as after a
  // call.
  uint32_t control[2];
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
  top[-1] = 0;
  top[-2] = reinterpret_cast<uint64_t>(&fiber_main);
  for (int r = 3; r <= 8; ++r) top[-r] = 0;
  std::memcpy(&top[-9], control, sizeof(uint64_t));
  f.sp = &top[-9];
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack_lo;
  f.context.uc_stack.ss_size = f.stack_size;
  f.context.uc_link = nullptr;
  makecontext(&f.context, &fiber_main_ucontext, 0);
#endif
  (void)w;
#ifdef CUDA_EMU_TSAN
  // Kept from block to block: blocks that one worker runs are ordered anyway (run_block).
  if (f.tsan_fiber == nullptr) f.tsan_fiber = __tsan_create_fiber(0);
#endif
  f.asan_fake_stack = nullptr;
  f.state.store(static_cast<int>(State::kReady), std::memory_order_relaxed);
  f.shuffles = 0;
}

inline void yield_until_released(Fiber& f, State state, unsigned generation) {
  f.wait_generation.store(generation, std::memory_order_relaxed);
  f.state.store(static_cast<int>(state), std::memory_order_relaxed);
  to_scheduler(f, false);
}

// __syncthreads: every thread of the block arrives, then all continue.
inline void sync_block() {
  Worker& w = current_worker();
  Block& b = *w.block;
  Fiber& f = current_fiber();
  if (b.exited.load(std::memory_order_relaxed) != 0) {
    fail("__syncthreads reached after some threads of the block returned");
  }
  const unsigned gen = b.generation.load(std::memory_order_relaxed);
  tsan_release(&b.tsan_token[gen & 1]);
  if (b.arrived.fetch_add(1, std::memory_order_relaxed) + 1 == b.threads) {
    b.arrived.store(0, std::memory_order_relaxed);
    b.generation.store(gen + 1, std::memory_order_relaxed);
  }
  // Every thread yields, the last one too, so that the scheduler's order decides who runs first
  // after the barrier.
  yield_until_released(f, State::kBlockBarrier, gen);
  tsan_acquire(&b.tsan_token[gen & 1]);
}

inline Warp& checked_warp(unsigned mask, const char* what) {
  Block& b = *current_worker().block;
  Fiber& f = current_fiber();
  if (mask != kFullMask) fail(what, " with a mask other than 0xffffffff");
  Warp& warp = b.warps[f.warp];
  if (warp.size != 32) fail(what, " in a partial warp");
  return warp;
}

// A barrier of the 32 lanes of the caller's warp; `memory_order` when it orders memory
// (__syncwarp) rather than only exchanging values (shuffles).
inline void sync_warp_lanes(Warp& warp, WarpSync kind) {
  Fiber& f = current_fiber();
  const unsigned gen = warp.generation.load(std::memory_order_relaxed);
  const bool orders_memory = kind == WarpSync::kSyncwarp;
  if (orders_memory) tsan_release(&warp.tsan_token[gen & 1]);
  const unsigned arrived = warp.arrived.fetch_add(1, std::memory_order_relaxed);
  if (arrived == 0) {
    warp.kind.store(static_cast<int>(kind), std::memory_order_relaxed);
  } else if (warp.kind.load(std::memory_order_relaxed) != static_cast<int>(kind)) {
    fail("lanes of one warp reached different warp operations (__syncwarp and a shuffle)");
  }
  if (arrived + 1 == warp.size) {
    warp.arrived.store(0, std::memory_order_relaxed);
    warp.generation.store(gen + 1, std::memory_order_relaxed);
  }
  yield_until_released(f, State::kWarpBarrier, gen);
  if (orders_memory) tsan_acquire(&warp.tsan_token[gen & 1]);
}

template <typename T>
inline T shuffle(unsigned mask, T value, unsigned src_lane, const char* what) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles of 4- and 8-byte values");
  static_assert(std::is_trivially_copyable_v<T>);
  Warp& warp = checked_warp(mask, what);
  Fiber& f = current_fiber();
  const unsigned set = f.shuffles++ & 1;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp.slots[set][f.lane].store(bits, std::memory_order_relaxed);
  sync_warp_lanes(warp, WarpSync::kShuffle);
  bits = warp.slots[set][src_lane & 31].load(std::memory_order_relaxed);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Blocks run in this order of their threads after each barrier (CUDA_EMU_SCHEDULE).
struct Schedule {
  enum Kind { kForward, kReverse, kRandom } kind = kForward;
  uint64_t seed = 0;
};

inline Schedule schedule_from_env() {
  Schedule s;
  const char* env = std::getenv("CUDA_EMU_SCHEDULE");
  if (env == nullptr || std::strcmp(env, "forward") == 0 || env[0] == '\0') return s;
  if (std::strcmp(env, "reverse") == 0) {
    s.kind = Schedule::kReverse;
  } else if (std::strncmp(env, "random:", 7) == 0) {
    s.kind = Schedule::kRandom;
    s.seed = std::strtoull(env + 7, nullptr, 10);
  } else {
    std::fprintf(stderr, "cuda_emulation: unknown CUDA_EMU_SCHEDULE=%s, using forward\n", env);
  }
  return s;
}

inline bool runnable(const Block& b, const Fiber& f) {
  switch (static_cast<State>(f.state.load(std::memory_order_relaxed))) {
    case State::kReady:
      return true;
    case State::kBlockBarrier:
      return b.generation.load(std::memory_order_relaxed) !=
             f.wait_generation.load(std::memory_order_relaxed);
    case State::kWarpBarrier:
      return b.warps[f.warp].generation.load(std::memory_order_relaxed) !=
             f.wait_generation.load(std::memory_order_relaxed);
    case State::kDone:
      return false;
  }
  return false;
}

// Runs every thread of block `b` on worker `w` to completion; false (b.error set) on an error.
inline bool run_block(Worker& w, Block& b, const Schedule& schedule) {
  w.block = &b;
  const unsigned n = b.threads;
  std::vector<unsigned> order(n);
  for (unsigned t = 0; t < n; ++t) order[t] = schedule.kind == Schedule::kReverse ? n - 1 - t : t;
  std::mt19937_64 rng(schedule.seed * 0x9E3779B97F4A7C15ull + b.block_idx.x +
                      (uint64_t{b.block_idx.y} << 21) + (uint64_t{b.block_idx.z} << 42));
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = w.fibers[t];
    f.thread_idx = {t % b.block.x, (t / b.block.x) % b.block.y, t / (b.block.x * b.block.y)};
    f.warp = t / 32;
    f.lane = t % 32;
    init_fiber(w, f);
  }
  // Kernel start: everything written so far happens before every CUDA thread of the block.
  tsan_release(&w.tsan_begin);
  unsigned done = 0;
  while (done < n) {
    if (schedule.kind == Schedule::kRandom) std::shuffle(order.begin(), order.end(), rng);
    bool progressed = false;
    done = 0;
    for (unsigned t : order) {
      Fiber& f = w.fibers[t];
      if (static_cast<State>(f.state.load(std::memory_order_relaxed)) == State::kDone) {
        ++done;
        continue;
      }
      if (!runnable(b, f)) continue;
      f.state.store(static_cast<int>(State::kReady), std::memory_order_relaxed);
      to_fiber(w, f);
      progressed = true;
      if (!b.error.empty()) break;
      if (static_cast<State>(f.state.load(std::memory_order_relaxed)) == State::kDone) ++done;
    }
    if (!b.error.empty()) break;
    if (!progressed && done < n) {
      b.error = "deadlock: a barrier (__syncthreads, __syncwarp or a shuffle) that not every "
                "thread of the block or warp reaches (block " +
                std::to_string(b.block_idx.x) + "," + std::to_string(b.block_idx.y) + "," +
                std::to_string(b.block_idx.z) + ")";
      break;
    }
  }
  tsan_acquire(&w.tsan_end);
  w.block = nullptr;
  return b.error.empty();
}

inline size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

inline void destroy_fibers(Worker& w) {
#ifdef CUDA_EMU_TSAN
  for (Fiber& f : w.fibers) {
    if (f.tsan_fiber != nullptr) __tsan_destroy_fiber(f.tsan_fiber);
    f.tsan_fiber = nullptr;
  }
#endif
  if (w.stacks != nullptr) munmap(w.stacks, w.stacks_bytes);
  w.stacks = nullptr;
}

inline Worker::~Worker() { destroy_fibers(*this); }

// Stacks for `threads` fibers, each above a guard page so that an overflow faults, and
// `shared_bytes` of shared memory. A worker keeps them from launch to launch: mapping and first
// touching stacks for every launch cost milliseconds.
inline bool prepare_worker(Worker& w, unsigned threads, size_t shared_bytes) {
  if (w.fibers.size() < threads) {
    destroy_fibers(w);
    w.stacks = nullptr;
#if defined(CUDA_EMU_ASAN) || defined(CUDA_EMU_TSAN)
    w.stack_size = 512 * 1024;
#else
    w.stack_size = 128 * 1024;
#endif
    const size_t page = page_size();
    const size_t slot = w.stack_size + page;
    w.stacks_bytes = slot * threads;
    void* mem = mmap(nullptr, w.stacks_bytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) return false;
    w.stacks = static_cast<char*>(mem);
    w.fibers = std::vector<Fiber>(threads);
    for (unsigned t = 0; t < threads; ++t) {
      char* base = w.stacks + slot * t;
      mprotect(base, page, PROT_NONE);
      w.fibers[t].stack_lo = base + page;
      w.fibers[t].stack_size = w.stack_size;
    }
  }
  if (w.shared_storage.size() < shared_bytes + 256) w.shared_storage.assign(shared_bytes + 256, 0);
  const uintptr_t raw = reinterpret_cast<uintptr_t>(w.shared_storage.data());
  w.shared = reinterpret_cast<unsigned char*>((raw + 255) & ~uintptr_t{255});
#ifdef CUDA_EMU_TSAN
  w.main_tsan_fiber = __tsan_get_current_fiber();
#endif
  return true;
}

inline void log_launch(const char* name, dim3 grid, dim3 block, size_t shared) {
  const char* path = std::getenv("CUDA_EMU_LOG");
  if (path == nullptr || path[0] == '\0') return;
  static std::mutex log_mutex;
  const std::lock_guard<std::mutex> lock(log_mutex);
  if (FILE* file = std::fopen(path, "a")) {
    std::fprintf(file, "%s %u %u %u %u %u %u %zu\n", name, grid.x, grid.y, grid.z, block.x,
                 block.y, block.z, shared);
    std::fclose(file);
  }
}

inline int set_error(int code, const std::string& message) {
  tl_last_code = code;
  tl_last_error = message;
  return code;
}

inline unsigned worker_count(uint64_t blocks) {
  unsigned n = std::max(1u, std::thread::hardware_concurrency());
  if (const char* env = std::getenv("CUDA_EMU_THREADS")) {
    n = static_cast<unsigned>(std::max(1, std::atoi(env)));
  }
  return static_cast<unsigned>(std::min<uint64_t>(n, blocks));
}

// One launch: the blocks left to run, shared by the workers that run them.
struct Job {
  const char* name;
  dim3 grid, block;
  uint64_t threads, blocks;
  size_t shared_bytes;
  const std::function<void()>* body;
  Schedule schedule;
  std::atomic<uint64_t> next{0};
  std::mutex error_mutex;
  std::string error;
};

inline void run_job(Worker& w, Job& job) {
  if (!prepare_worker(w, static_cast<unsigned>(job.threads), job.shared_bytes)) {
    const std::lock_guard<std::mutex> lock(job.error_mutex);
    job.error = "cannot allocate fiber stacks";
    return;
  }
  for (uint64_t id = job.next.fetch_add(1); id < job.blocks; id = job.next.fetch_add(1)) {
    Block b;
    b.grid = job.grid;
    b.block = job.block;
    b.block_idx = {static_cast<unsigned>(id % job.grid.x),
                   static_cast<unsigned>((id / job.grid.x) % job.grid.y),
                   static_cast<unsigned>(id / (uint64_t{job.grid.x} * job.grid.y))};
    b.threads = static_cast<unsigned>(job.threads);
    b.warps = std::vector<Warp>((job.threads + 31) / 32);
    for (size_t k = 0; k < b.warps.size(); ++k) {
      b.warps[k].size = static_cast<unsigned>(std::min<uint64_t>(32, job.threads - 32 * k));
    }
    b.body = job.body;
    // CUDA leaves shared memory uninitialised: all-ones bytes are NaN in float and double.
    std::memset(w.shared, 0xFF, job.shared_bytes);
    b.shared = w.shared;
    if (!run_block(w, b, job.schedule)) {
      const std::lock_guard<std::mutex> lock(job.error_mutex);
      if (job.error.empty()) job.error = b.error;
      job.next.store(job.blocks);
      break;
    }
  }
}

// OS threads that run blocks besides the launching thread. They live as long as the process
// (never destroyed: no shutdown ordering to get wrong) and keep their workers, so fibers and
// stacks are made once per thread; ThreadSanitizer then also sees every fiber created by the
// thread that runs it.
struct ThreadPool {
  std::mutex launch_mutex;  // one multi-threaded launch at a time
  std::mutex mutex;
  std::condition_variable wake, done;
  std::vector<std::thread> threads;
  Job* job = nullptr;
  uint64_t generation = 0;
  unsigned wanted = 0, finished = 0;

  void loop(unsigned index) {
    Worker w;
    tl_worker.store(&w, std::memory_order_relaxed);
    uint64_t seen = 0;
    for (;;) {
      Job* current = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex);
        wake.wait(lock, [&] { return generation != seen; });
        seen = generation;
        if (index >= wanted) continue;
        current = job;
      }
      run_job(w, *current);
      const std::lock_guard<std::mutex> lock(mutex);
      if (++finished == wanted) done.notify_all();
    }
  }

  // Runs `job` on `helpers` pool threads while the caller runs it on `caller`.
  void run(Job& j, unsigned helpers, Worker& caller) {
    const std::lock_guard<std::mutex> serial(launch_mutex);
    {
      const std::lock_guard<std::mutex> lock(mutex);
      while (threads.size() < helpers) {
        const unsigned index = static_cast<unsigned>(threads.size());
        threads.emplace_back([this, index] { loop(index); });
        threads.back().detach();
      }
      job = &j;
      wanted = helpers;
      finished = 0;
      ++generation;
    }
    wake.notify_all();
    run_job(caller, j);
    std::unique_lock<std::mutex> lock(mutex);
    done.wait(lock, [&] { return finished == wanted; });
  }
};

inline ThreadPool& thread_pool() {
  static ThreadPool* pool = new ThreadPool();
  return *pool;
}

// Runs body() as every thread of every block of the grid.
inline int run_grid(const char* name, dim3 grid, dim3 block, size_t shared_bytes,
                    const std::function<void()>& body) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  // As on a GPU, an empty grid is an error, not a no-op.
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64 || blocks == 0 ||
      grid.y > 65535 || grid.z > 65535 || shared_bytes > kMaxSharedBytesOptin) {
    return set_error(cudaErrorInvalidConfiguration,
                     std::string("invalid configuration of ") + name + ": " +
                         std::to_string(blocks) + " blocks of " + std::to_string(threads) +
                         " threads, " + std::to_string(shared_bytes) + " bytes of shared memory");
  }
  log_launch(name, grid, block, shared_bytes);
  Job job;
  job.name = name;
  job.grid = grid;
  job.block = block;
  job.threads = threads;
  job.blocks = blocks;
  job.shared_bytes = shared_bytes;
  job.body = &body;
  job.schedule = schedule_from_env();
  // The launching thread is a worker too, with its own fibers.
  static thread_local Worker caller;
  Worker* const outer = tl_worker.load(std::memory_order_relaxed);
  tl_worker.store(&caller, std::memory_order_relaxed);
  const unsigned workers = worker_count(blocks);
  if (workers <= 1) {
    run_job(caller, job);
  } else {
    thread_pool().run(job, workers - 1, caller);
  }
  tl_worker.store(outer, std::memory_order_relaxed);
  if (!job.error.empty()) {
    return set_error(cudaErrorLaunchFailure, std::string(name) + ": " + job.error);
  }
  return cudaSuccess;
}

}  // namespace detail

// The launch the kernels' host code uses in the emulated build (see cuda_compat.h): runs
// kernel(args...) as every thread of a grid x block launch with `shared_bytes` of dynamic
// shared memory per block.
template <typename... Params, typename... Args>
int launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
           size_t shared_bytes, Args... args) {
  const std::function<void()> body = [&]() { kernel(args...); };
  return detail::run_grid(name, grid, block, shared_bytes, body);
}

inline unsigned char* dynamic_shared() { return detail::current_worker().block->shared; }

inline const uint3& thread_idx() { return detail::current_fiber().thread_idx; }
inline const uint3& block_idx() { return detail::current_worker().block->block_idx; }
inline const dim3& block_dim() { return detail::current_worker().block->block; }
inline const dim3& grid_dim() { return detail::current_worker().block->grid; }

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())

inline void __syncthreads() { ::cuda_emu::detail::sync_block(); }

inline void __syncwarp(unsigned mask = ::cuda_emu::kFullMask) {
  ::cuda_emu::detail::Warp& warp = ::cuda_emu::detail::checked_warp(mask, "__syncwarp");
  ::cuda_emu::detail::sync_warp_lanes(warp, ::cuda_emu::detail::WarpSync::kSyncwarp);
}

template <typename T>
inline T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize) {
  if (width != warpSize) ::cuda_emu::detail::fail("__shfl_sync with width != 32");
  return ::cuda_emu::detail::shuffle(mask, value, static_cast<unsigned>(src_lane),
                                     "__shfl_sync");
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize) {
  if (width != warpSize) ::cuda_emu::detail::fail("__shfl_xor_sync with width != 32");
  const unsigned lane = ::cuda_emu::detail::current_fiber().lane;
  return ::cuda_emu::detail::shuffle(mask, value, lane ^ static_cast<unsigned>(lane_mask),
                                     "__shfl_xor_sync");
}

inline int atomicAdd(int* address, int value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}

inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}

inline cudaError_t cudaGetLastError() {
  const int code = ::cuda_emu::detail::tl_last_code;
  ::cuda_emu::detail::tl_last_code = 0;
  return static_cast<cudaError_t>(code);
}

inline const char* cudaGetErrorString(cudaError_t code) {
  if (code == cudaSuccess) return "no error";
  if (!::cuda_emu::detail::tl_last_error.empty()) return ::cuda_emu::detail::tl_last_error.c_str();
  return "emulated CUDA error";
}

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) {
  return cudaSuccess;
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = static_cast<int>(::cuda_emu::kMaxSharedBytesOptin);
  return cudaSuccess;
}
