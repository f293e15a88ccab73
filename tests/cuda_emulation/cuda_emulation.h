// The CUDA programming model on CPU threads, for the emulated CUDA test suite.
//
// The kernel files under csrc/cuda are compiled unmodified by a host C++ compiler with this header
// (through the stub <cuda_runtime.h>, <cuda_fp16.h> and <cuda_bf16.h> next to it). It declares what
// the kernels use: the qualifiers, dim3/uint4, threadIdx & co., __shared__, __syncthreads, warp
// shuffles, __ldg, __half/__nv_bfloat16 with round-to-nearest-even conversions, the device-side assert,
// and the launch (labelsmooth::cuda::launch_kernel calls ls_emulation::launch). The execution engine
// behind it is emulator.cpp: every thread of a block is a real thread (so ThreadSanitizer sees shared
// memory races), blocks run one after another, and barriers and shuffles are strict: one that not
// every live thread (or lane) reaches stops the program with the kernel's name instead of hanging.
#pragma once

#define LS_CUDA_EMULATION 1

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// Kernel qualifiers: everything runs on the host.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Shared memory: blocks run one at a time, so a function-local static is one block's shared memory.
#define __shared__ static
// The kernels call the C library's assertion handler for their device-side asserts; the emulated one
// records the failure for the launch and returns, so code after a failed assert runs (and is checked
// by the sanitizers) exactly where a GPU trap would have stopped it.
#define __assert_fail ls_emulated_device_assert

extern "C" void ls_emulated_device_assert(const char* assertion, const char* file, unsigned int line,
                                          const char* function) noexcept;

// ---------------------------------------------------------------------------------------------
// Runtime types.

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719, cudaErrorAssert = 710 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetLastError();

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

// ---------------------------------------------------------------------------------------------
// Half and bfloat16: storage types with the round-to-nearest-even conversions of cuda_fp16.h/cuda_bf16.h.

namespace ls_emulation {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // NaN stays a (quiet) NaN
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);                        // ties to even
  return uint16_t((u + rounding) >> 16);
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (magnitude >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (magnitude < 0x38800000u) {                                  // below half's smallest normal 2^-14
    // Subnormal half: the value in units of 2^-24, rounded to nearest even (fp32 arithmetic is exact here).
    const float scaled = bits_float(magnitude) * 16777216.0f;    // 2^24
    return uint16_t(sign | uint16_t(std::nearbyint(scaled)));    // default rounding mode: to nearest even
  }
  const uint32_t rounding = 0xfffu + ((magnitude >> 13) & 1u);
  return uint16_t(sign | uint16_t((magnitude - 0x38000000u + rounding) >> 13));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) return bits_float(sign) + (sign ? -1.0f : 1.0f) * float(mantissa) * 5.9604644775390625e-8f;
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

}  // namespace ls_emulation

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) { return ls_emulation::half_bits_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{ls_emulation::float_to_half_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return ls_emulation::bits_float(uint32_t(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{ls_emulation::float_to_bfloat16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16_rz(float f) {  // toward zero: drops the low 16 bits (NaN stays NaN)
  const uint32_t u = ls_emulation::float_bits(f);
  return __nv_bfloat16{uint16_t((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x0040u : u >> 16)};
}

// ---------------------------------------------------------------------------------------------
// Device intrinsics.

inline float __expf(float x) { return std::exp(x); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

namespace ls_emulation {
// The engine's side of barriers and shuffles (emulator.cpp). `site` is the source line of the call,
// so threads that wait at different barriers or shuffles are reported instead of matched.
void syncthreads(unsigned site);
uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask, unsigned site);
}  // namespace ls_emulation

inline void __syncthreads(unsigned site = __builtin_LINE()) { ls_emulation::syncthreads(site); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32, unsigned site = __builtin_LINE()) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of a register value");
  (void)width;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = ls_emulation::shuffle_xor(mask, bits, lane_mask, site);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// ---------------------------------------------------------------------------------------------
// Launch.

namespace ls_emulation {

// Runs `body` once per thread of every block of the grid; returns the launch's error status.
using ThreadBody = void (*)(const void* closure);
cudaError_t run_grid(const char* kernel_name, dim3 grid, dim3 block, ThreadBody body, const void* closure);

// The kernel's name from the compiler's signature of launch<kKernel> (template arguments included).
const char* kernel_name_of(const char* pretty_function);

template <auto kKernel, typename... Args>
cudaError_t launch(dim3 grid, dim3 block, cudaStream_t, Args&&... args) {
  static const char* const name = kernel_name_of(__PRETTY_FUNCTION__);
  // Every thread gets its own copy of the arguments, as every GPU thread reads its own parameters.
  auto closure = std::make_tuple(std::decay_t<Args>(args)...);
  using Closure = decltype(closure);
  const ThreadBody body = [](const void* c) {
    std::apply([](auto... a) { kKernel(a...); }, *static_cast<const Closure*>(c));
  };
  return run_grid(name, grid, block, body, &closure);
}

}  // namespace ls_emulation
