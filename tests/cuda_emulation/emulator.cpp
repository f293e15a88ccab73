// The execution engine of the CUDA emulation (see cuda_emulation.h): blocks, barriers, shuffles, the
// device-side assert, and the counting of global memory traffic per launch.
//
// Model. A launch runs its blocks one after another; the threads of a block are real threads, started
// in a seeded random order, that also yield at random (seeded) before every barrier, shuffle and counted
// memory access, so results that depend on thread timing differ between seeds. Every wait is strict:
//   * __syncthreads releases once every live (not yet exited) thread of the block waits at it; a thread
//     that waits at a different __syncthreads, or whose warp has a lane waiting at a shuffle, is an error;
//   * a full-mask shuffle releases once all 32 lanes of the warp wait at it; a lane that has exited,
//     waits at __syncthreads or at a different shuffle is an error;
//   * a wait longer than LS_EMULATION_TIMEOUT seconds (default 120) is an error.
// Errors print the kernel, block and thread and end the process with kEmulationFailure.
#include "cuda_emulation.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "emulator.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

namespace ls_emulation {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

enum class ThreadState { kRunning, kAtBarrier, kAtShuffle, kExited };

struct Warp {
  int waiting = 0;
  uint64_t generation = 0;
  // Double-buffered exchange: a lane reads slots[g % 2] after release g, and nobody writes them again
  // before release g + 1, which needs that lane to arrive once more.
  uint64_t slots[2][kWarpSize] = {};
  std::condition_variable released;
};

struct Block {
  explicit Block(int threads_)
      : threads(threads_), live(threads_), state(threads_, ThreadState::kRunning), site(threads_, 0),
        warps((threads_ + kWarpSize - 1) / kWarpSize) {}
  const int threads;
  int live;
  std::vector<ThreadState> state;
  std::vector<unsigned> site;
  std::mutex mutex;
  int barrier_waiting = 0;
  uint64_t barrier_generation = 0;
  std::condition_variable barrier_released;
  std::vector<Warp> warps;
};

struct Launch {
  const char* kernel = "";
  uint3 block_index{0, 0, 0};
  uint64_t number = 0;  // launches so far, part of the interleaving seed
  Block* block = nullptr;
};

Launch current;
cudaError_t sticky_error = cudaSuccess;
std::atomic<bool> assert_failed{false};

thread_local int thread_rank = -1;  // linear thread index within the block; -1 outside a kernel
thread_local std::mt19937_64 thread_random;

uint64_t env_u64(const char* name, uint64_t fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::strtoull(value, nullptr, 10) : fallback;
}

const uint64_t seed = env_u64("LS_EMULATION_SEED", 1);
const auto timeout = std::chrono::seconds(env_u64("LS_EMULATION_TIMEOUT", 120));

[[noreturn]] void fail(const char* format, ...) {
  char message[1024];
  va_list args;
  va_start(args, format);
  std::vsnprintf(message, sizeof message, format, args);
  va_end(args);
  std::fprintf(stderr, "emulated CUDA error in kernel %s, block (%u, %u, %u), thread %d: %s\n", current.kernel,
               current.block_index.x, current.block_index.y, current.block_index.z, thread_rank, message);
  std::fflush(stderr);
  std::_Exit(kEmulationFailure);
}

// Gives other threads a chance to run here, with a seeded probability of 1 / 2^log2_odds.
void maybe_yield(int log2_odds) {
  if (thread_rank >= 0 && (thread_random() & ((uint64_t(1) << log2_odds) - 1)) == 0) std::this_thread::yield();
}

const char* state_name(ThreadState s) {
  switch (s) {
    case ThreadState::kRunning:
      return "running";
    case ThreadState::kAtBarrier:
      return "waiting at __syncthreads";
    case ThreadState::kAtShuffle:
      return "waiting at a shuffle";
    case ThreadState::kExited:
      return "exited";
  }
  return "?";
}

// Called with the block's mutex held by a thread that is about to wait: if no thread runs any more,
// nothing can release the waits.
void check_progress(const Block& b) {
  for (int t = 0; t < b.threads; ++t) {
    if (b.state[t] == ThreadState::kRunning) return;
  }
  fail("deadlock: every live thread waits (at __syncthreads: %d of %d live threads)", b.barrier_waiting, b.live);
}

template <typename Released>
void wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv, Released released,
                const char* what, unsigned site) {
  if (!cv.wait_for(lock, timeout, released)) {
    fail("timed out after %llds waiting at %s (line %u)", static_cast<long long>(timeout.count()), what, site);
  }
}

void release_barrier(Block& b) {
  for (int t = 0; t < b.threads; ++t) {
    if (b.state[t] == ThreadState::kAtBarrier) b.state[t] = ThreadState::kRunning;
  }
  b.barrier_waiting = 0;
  ++b.barrier_generation;
  b.barrier_released.notify_all();
}

void check_no_lane_at_shuffle(const Block& b, const char* doing) {
  const int first = thread_rank / kWarpSize * kWarpSize;
  for (int t = first; t < first + kWarpSize && t < b.threads; ++t) {
    if (b.state[t] == ThreadState::kAtShuffle) {
      fail("%s while lane %d of its warp waits at a full-mask shuffle (line %u)", doing, t % kWarpSize, b.site[t]);
    }
  }
}

void exit_thread(Block& b) {
  std::unique_lock<std::mutex> lock(b.mutex);
  b.state[thread_rank] = ThreadState::kExited;
  --b.live;
  check_no_lane_at_shuffle(b, "exits");
  if (b.barrier_waiting > 0) {
    if (b.barrier_waiting == b.live) {
      release_barrier(b);
    } else {
      check_progress(b);
    }
  }
}

void run_block(Block& b, dim3 block, ThreadBody body, const void* closure) {
  std::vector<int> order(b.threads);
  for (int t = 0; t < b.threads; ++t) order[t] = t;
  std::mt19937_64 block_random(seed ^ (current.number * 0x9e3779b97f4a7c15ull) ^
                               (uint64_t(current.block_index.x) << 20) ^ current.block_index.y);
  std::shuffle(order.begin(), order.end(), block_random);
  std::vector<std::thread> workers;
  workers.reserve(b.threads);
  const uint3 block_index = current.block_index;
  for (const int t : order) {
    workers.emplace_back([&b, block, body, closure, block_index, t, stream = block_random()] {
      thread_rank = t;
      thread_random.seed(stream);
      threadIdx = uint3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
      blockIdx = block_index;
      maybe_yield(1);
      body(closure);
      exit_thread(b);
      thread_rank = -1;
    });
  }
  for (std::thread& w : workers) w.join();
}

}  // namespace

void syncthreads(unsigned site) {
  maybe_yield(2);
  Block& b = *current.block;
  std::unique_lock<std::mutex> lock(b.mutex);
  check_no_lane_at_shuffle(b, "reaches __syncthreads");
  for (int t = 0; t < b.threads; ++t) {
    if (b.state[t] == ThreadState::kAtBarrier && b.site[t] != site) {
      fail("reaches __syncthreads at line %u while thread %d waits at the one at line %u", site, t, b.site[t]);
    }
  }
  b.state[thread_rank] = ThreadState::kAtBarrier;
  b.site[thread_rank] = site;
  if (++b.barrier_waiting == b.live) {
    release_barrier(b);
    return;
  }
  check_progress(b);
  const uint64_t generation = b.barrier_generation;
  wait_until(lock, b.barrier_released, [&] { return b.barrier_generation != generation; }, "__syncthreads", site);
}

uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask, unsigned site) {
  maybe_yield(2);
  Block& b = *current.block;
  std::unique_lock<std::mutex> lock(b.mutex);
  if (mask != kFullMask) fail("shuffle with mask %#x at line %u: only full-mask shuffles are modelled", mask, site);
  if (lane_mask < 0 || lane_mask >= kWarpSize) fail("shuffle lane mask %d out of [0, 32) at line %u", lane_mask, site);
  const int lane = thread_rank % kWarpSize;
  const int first = thread_rank - lane;
  for (int l = 0; l < kWarpSize; ++l) {
    const int t = first + l;
    if (t >= b.threads) fail("full-mask shuffle at line %u in a warp of %d threads", site, b.threads - first);
    const ThreadState s = b.state[t];
    if (s == ThreadState::kExited || s == ThreadState::kAtBarrier ||
        (s == ThreadState::kAtShuffle && b.site[t] != site)) {
      fail("full-mask shuffle at line %u while lane %d is %s (line %u)", site, l, state_name(s), b.site[t]);
    }
  }
  Warp& w = b.warps[thread_rank / kWarpSize];
  const int parity = int(w.generation & 1);
  w.slots[parity][lane] = bits;
  b.state[thread_rank] = ThreadState::kAtShuffle;
  b.site[thread_rank] = site;
  if (++w.waiting == kWarpSize) {
    for (int t = first; t < first + kWarpSize; ++t) b.state[t] = ThreadState::kRunning;
    w.waiting = 0;
    ++w.generation;
    w.released.notify_all();
  } else {
    check_progress(b);
    const uint64_t generation = w.generation;
    wait_until(lock, w.released, [&] { return w.generation != generation; }, "a shuffle", site);
  }
  return w.slots[parity][lane ^ lane_mask];
}

const char* kernel_name_of(const char* pretty_function) {
  // g++: "cudaError_t ls_emulation::launch(...) [with auto kKernel = <kernel>; Args = {...}]"
  const std::string text(pretty_function);
  const std::string key = "kKernel = ";
  const size_t begin = text.find(key);
  if (begin == std::string::npos) return strdup(pretty_function);
  size_t end = text.find("; Args", begin);
  if (end == std::string::npos) end = text.size() - 1;
  return strdup(text.substr(begin + key.size(), end - begin - key.size()).c_str());
}

cudaError_t run_grid(const char* kernel_name, dim3 grid, dim3 block, ThreadBody body, const void* closure) {
  if (sticky_error != cudaSuccess) return sticky_error;
  current.kernel = kernel_name;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
    fail("invalid launch configuration: grid (%u, %u, %u), block (%u, %u, %u)", grid.x, grid.y, grid.z, block.x,
         block.y, block.z);
  }
  gridDim = grid;
  blockDim = block;
  begin_counting(kernel_name);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b(static_cast<int>(threads));
        current.block = &b;
        current.block_index = uint3{x, y, z};
        run_block(b, block, body, closure);
      }
    }
  }
  current.block = nullptr;
  ++current.number;
  end_counting();
  if (assert_failed.load()) sticky_error = cudaErrorAssert;
  return sticky_error;
}

// ---------------------------------------------------------------------------------------------
// Global memory: the buffers a kernel may touch, and the bytes each launch reads and writes in them.

namespace {

struct Region {
  std::string name;
  uintptr_t guard_begin, begin, end, guard_end;
  std::atomic<uint64_t> read{0}, written{0};
};

std::vector<std::unique_ptr<Region>> regions;
std::vector<LaunchTraffic> traffic_log;
std::string counting_kernel;

}  // namespace

void register_buffer(const char* name, const void* begin, size_t bytes, size_t guard_before, size_t guard_after) {
  const uintptr_t b = reinterpret_cast<uintptr_t>(begin);
  regions.push_back(std::unique_ptr<Region>(new Region{name, b - guard_before, b, b + bytes, b + bytes + guard_after}));
#if defined(__SANITIZE_ADDRESS__)
  ASAN_POISON_MEMORY_REGION(reinterpret_cast<const char*>(begin) - guard_before, guard_before);
  ASAN_POISON_MEMORY_REGION(reinterpret_cast<const char*>(begin) + bytes, guard_after);
#endif
}

void unregister_buffer(const void* begin) {
  for (size_t i = 0; i < regions.size(); ++i) {
    const Region* r = regions[i].get();
    if (r->begin != reinterpret_cast<uintptr_t>(begin)) continue;
#if defined(__SANITIZE_ADDRESS__)
    ASAN_UNPOISON_MEMORY_REGION(reinterpret_cast<void*>(r->guard_begin), r->guard_end - r->guard_begin);
#endif
    regions.erase(regions.begin() + i);
    return;
  }
}

void begin_counting(const char* kernel) {
  counting_kernel = kernel;
  for (const auto& r : regions) r->read = r->written = 0;
}

void end_counting() {
  LaunchTraffic launch{counting_kernel, {}};
  for (const auto& r : regions) {
    if (r->read != 0 || r->written != 0) launch.buffers.push_back({r->name, r->read.load(), r->written.load()});
  }
  traffic_log.push_back(launch);
}

const std::vector<LaunchTraffic>& traffic() { return traffic_log; }

void count_access(uintptr_t address, size_t size, bool write) {
  if (thread_rank < 0) return;  // host code of the launch functions
  maybe_yield(5);
  for (const auto& r : regions) {
    if (address >= r->guard_end || address + size <= r->guard_begin) continue;
    if (address < r->begin || address + size > r->end) {
      fail("out-of-bounds %s of %zu bytes at byte %lld of buffer '%s' (%llu bytes)", write ? "write" : "read", size,
           static_cast<long long>(address - r->begin), r->name.c_str(),
           static_cast<unsigned long long>(r->end - r->begin));
    }
    (write ? r->written : r->read) += size;
    return;
  }
}

}  // namespace ls_emulation

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorAssert:
      return "device-side assert triggered";
    case cudaErrorInvalidValue:
      return "invalid argument";
    default:
      return "unspecified launch failure";
  }
}

cudaError_t cudaGetLastError() { return ls_emulation::sticky_error; }

extern "C" void ls_emulated_device_assert(const char* assertion, const char* file, unsigned int line,
                                          const char* function) noexcept {
  std::fprintf(stderr, "device-side assert in kernel %s, block (%u, %u, %u), thread %d: %s:%u: %s: %s\n",
               ls_emulation::current.kernel, ls_emulation::current.block_index.x,
               ls_emulation::current.block_index.y, ls_emulation::current.block_index.z,
               ls_emulation::thread_rank, file, line, function, assertion);
  ls_emulation::assert_failed = true;
}

// The counting build instruments the kernel file's loads and stores with -fsanitize=kernel-address,
// which turns each into a call of these (the _noabort names unless sanitizer recovery is off).
#if defined(LS_EMULATION_COUNT_ACCESSES)
extern "C" {
#define LS_ACCESS_CALLBACKS(suffix)                                                                   \
  void __asan_load1##suffix(uintptr_t a) { ls_emulation::count_access(a, 1, false); }              \
  void __asan_load2##suffix(uintptr_t a) { ls_emulation::count_access(a, 2, false); }              \
  void __asan_load4##suffix(uintptr_t a) { ls_emulation::count_access(a, 4, false); }              \
  void __asan_load8##suffix(uintptr_t a) { ls_emulation::count_access(a, 8, false); }              \
  void __asan_load16##suffix(uintptr_t a) { ls_emulation::count_access(a, 16, false); }            \
  void __asan_loadN##suffix(uintptr_t a, size_t n) { ls_emulation::count_access(a, n, false); }    \
  void __asan_store1##suffix(uintptr_t a) { ls_emulation::count_access(a, 1, true); }              \
  void __asan_store2##suffix(uintptr_t a) { ls_emulation::count_access(a, 2, true); }              \
  void __asan_store4##suffix(uintptr_t a) { ls_emulation::count_access(a, 4, true); }              \
  void __asan_store8##suffix(uintptr_t a) { ls_emulation::count_access(a, 8, true); }              \
  void __asan_store16##suffix(uintptr_t a) { ls_emulation::count_access(a, 16, true); }            \
  void __asan_storeN##suffix(uintptr_t a, size_t n) { ls_emulation::count_access(a, n, true); }
LS_ACCESS_CALLBACKS()
LS_ACCESS_CALLBACKS(_noabort)
#undef LS_ACCESS_CALLBACKS
void __asan_handle_no_return() {}
}
#endif
