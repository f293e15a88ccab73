// The element types of the CPU kernels and their scalar loads/stores (ls_lanes.h has the vector forms).
//
// These are compiled for the baseline instruction set and always inlined into the kernels, which are
// compiled once per instruction set (ls_isa_kernels.h): inlined, they take the caller's instruction set.
#pragma once

#include <cstdint>
#include <cstring>

// Helpers called from inside the per-instruction-set kernels must be inlined there to get its instructions.
#if defined(__GNUC__)
#define LS_INLINE inline __attribute__((always_inline))
#else
#define LS_INLINE inline
#endif

namespace labelsmooth::cpu {

// bfloat16 storage as the kernels see it: the upper half of a float32.
struct bf16_bits {
  uint16_t bits;
};

// fp16 storage. GCC's _Float16 converts with F16C instructions where the CPU has them.
using fp16_bits = _Float16;

LS_INLINE float load_as_acc(float x) { return x; }
LS_INLINE double load_as_acc(double x) { return x; }
LS_INLINE float load_as_acc(fp16_bits x) { return static_cast<float>(x); }
LS_INLINE float load_as_acc(bf16_bits x) {
  const uint32_t widened = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &widened, sizeof(f));
  return f;
}

template <typename scalar_t, typename acc_t>
LS_INLINE scalar_t store_from_acc(acc_t x);

template <>
LS_INLINE float store_from_acc<float, float>(float x) { return x; }
template <>
LS_INLINE double store_from_acc<double, double>(double x) { return x; }
template <>
LS_INLINE fp16_bits store_from_acc<fp16_bits, float>(float x) { return static_cast<fp16_bits>(x); }
template <>
LS_INLINE bf16_bits store_from_acc<bf16_bits, float>(float x) {
  // Round to nearest even, as c10::BFloat16 does; NaN stays a (quiet) NaN.
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return bf16_bits{static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded)};
}

}  // namespace labelsmooth::cpu
