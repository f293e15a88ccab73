// The emulator's interface to the host driver: global buffers and the traffic of each launch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace ls_emulation {

// Exit status of a program stopped by the emulator (a barrier, shuffle or memory access that a GPU
// would punish); sanitizers and device-side asserts report their own ways.
constexpr int kEmulationFailure = 86;

// Declares [begin, begin + bytes) a global buffer the kernels may use. The guard bytes around it
// (allocated by the caller) are out of bounds: touching them stops the program.
void register_buffer(const char* name, const void* begin, size_t bytes, size_t guard_before, size_t guard_after);
void unregister_buffer(const void* begin);

struct BufferTraffic {
  std::string buffer;
  uint64_t read, written;
};
struct LaunchTraffic {
  std::string kernel;
  std::vector<BufferTraffic> buffers;  // those the launch touched
};

// One entry per launch, in launch order. Counted only in the counting build (LS_EMULATION_COUNT_ACCESSES).
const std::vector<LaunchTraffic>& traffic();

void begin_counting(const char* kernel);
void end_counting();

}  // namespace ls_emulation
