// Element loads/stores and a vectorizable exp for the CPU kernels.
//
// The hot loops are written as plain `#pragma omp simd` loops over these inline functions, and each
// loop function is compiled for several instruction sets at once (LS_CPU_TARGET_CLONES): the loader
// picks AVX-512, AVX2+FMA+F16C or the SSE2 baseline at run time, so one build is fast on new CPUs and
// still runs on old ones. Nothing here calls a library function, so the vectorizer can inline it all.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LS_CPU_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LS_CPU_TARGET_CLONES
#endif

// Helpers called from inside the cloned loops must be inlined there to get the clone's instruction set.
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

// exp(x) for float, branch-free so that loops calling it vectorize. Cephes' expf polynomial: about
// 1 ulp on the range the kernels use (x <= 0: arguments are z - max or z - lse). Arguments below
// -87.3 give exactly 0 (as a -inf logit must: whatever the polynomial made of them is replaced);
// NaN stays NaN through the arithmetic; the top is clamped at 88 (never reached here).
LS_INLINE float exp_vectorizable(float x) {
  constexpr float kLowest = -87.33654475f;
  constexpr float kHighest = 88.0f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float xc = x > kHighest ? kHighest : x;
  const float n = (xc * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float poly = p * r * r + r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof(scale));
  return x < kLowest ? 0.0f : poly * scale;
}

// fp64 is the reference-precision path: the library exp keeps it exact rather than fast.
LS_INLINE double exp_vectorizable(double x) { return __builtin_exp(x); }

}  // namespace labelsmooth::cpu
