// Fixed-width SIMD lanes for the CPU kernels, and the exp that vector and scalar code share.
//
// Lanes<T> is 64 bytes of T (16 fp32 or 8 fp64 lanes) held as native vectors of the instruction set
// being compiled (LS_CPU_VECTOR_BYTES: one zmm, two ymm or four xmm; GCC's own lowering of 64-byte
// generic vectors turns comparisons into scalar code on AVX2). Lane l is always element l of a block, so
// the per-lane partial sums are the same on every instruction set; with -ffp-contract=off and the same
// explicit fused multiply-adds (mul_add), every result is the same bits in the copies with FMA (AVX2 and
// AVX-512), and the baseline's differs from theirs only by the roundings those fused steps save. Part of
// the per-instruction-set kernels (ls_isa_kernels.h).
#pragma once

#ifndef LS_CPU_VECTOR_BYTES
#error "define LS_CPU_VECTOR_BYTES (the native vector width) before including ls_lanes.h"
#endif
#ifndef LS_CPU_FMA
#error "define LS_CPU_FMA (1 where the instruction set has fused multiply-adds) before including ls_lanes.h"
#endif

namespace labelsmooth::cpu::LS_CPU_ISA {

// A scalar operand of a Lanes operator takes its type from the Lanes operand (1.0f with Lanes<float>).
template <typename T>
struct NonDeducedType {
  using type = T;
};
template <typename T>
using NonDeduced = typename NonDeducedType<T>::type;

template <typename T>
struct Native;
template <>
struct Native<float> {
  typedef float type __attribute__((vector_size(LS_CPU_VECTOR_BYTES)));
};
template <>
struct Native<double> {
  typedef double type __attribute__((vector_size(LS_CPU_VECTOR_BYTES)));
};
template <>
struct Native<int32_t> {
  typedef int32_t type __attribute__((vector_size(LS_CPU_VECTOR_BYTES)));
};
template <>
struct Native<int64_t> {
  typedef int64_t type __attribute__((vector_size(LS_CPU_VECTOR_BYTES)));
};
typedef uint32_t u32_native __attribute__((vector_size(LS_CPU_VECTOR_BYTES)));
typedef uint16_t u16_half_native __attribute__((vector_size(LS_CPU_VECTOR_BYTES / 2)));

constexpr int64_t kBlockBytes = 64;

template <typename T>
constexpr int64_t kLaneCount = kBlockBytes / sizeof(T);

template <typename T>
struct Lanes {
  static constexpr int kParts = kBlockBytes / LS_CPU_VECTOR_BYTES;
  typename Native<T>::type part[kParts];
};

// What comparing lanes of T gives: all ones where true, in integers of T's width.
template <typename T>
using MaskOf = Lanes<std::conditional_t<sizeof(T) == 4, int32_t, int64_t>>;

#define LS_LANES_OPERATOR(op)                                                                    \
  template <typename T>                                                                          \
  LS_INLINE Lanes<T> operator op(Lanes<T> a, Lanes<T> b) {                                       \
    for (int i = 0; i < Lanes<T>::kParts; ++i) a.part[i] = a.part[i] op b.part[i];               \
    return a;                                                                                    \
  }                                                                                              \
  template <typename T>                                                                          \
  LS_INLINE Lanes<T> operator op(Lanes<T> a, NonDeduced<T> b) {                        \
    for (int i = 0; i < Lanes<T>::kParts; ++i) a.part[i] = a.part[i] op b;                       \
    return a;                                                                                    \
  }                                                                                              \
  template <typename T>                                                                          \
  LS_INLINE Lanes<T> operator op(NonDeduced<T> a, Lanes<T> b) {                        \
    for (int i = 0; i < Lanes<T>::kParts; ++i) b.part[i] = a op b.part[i];                       \
    return b;                                                                                    \
  }
LS_LANES_OPERATOR(+)
LS_LANES_OPERATOR(-)
LS_LANES_OPERATOR(*)
LS_LANES_OPERATOR(/)
#undef LS_LANES_OPERATOR

template <typename T>
LS_INLINE Lanes<T>& operator+=(Lanes<T>& a, Lanes<T> b) { return a = a + b; }
template <typename T>
LS_INLINE Lanes<T>& operator-=(Lanes<T>& a, Lanes<T> b) { return a = a - b; }

template <typename T>
LS_INLINE Lanes<T> operator<<(Lanes<T> a, int bits) {
  for (int i = 0; i < Lanes<T>::kParts; ++i) a.part[i] = a.part[i] << bits;
  return a;
}

#define LS_LANES_COMPARISON(op)                                                                    \
  template <typename T>                                                                            \
  LS_INLINE MaskOf<T> operator op(Lanes<T> a, Lanes<T> b) {                                        \
    MaskOf<T> m;                                                                                   \
    for (int i = 0; i < Lanes<T>::kParts; ++i) m.part[i] = a.part[i] op b.part[i];                 \
    return m;                                                                                      \
  }                                                                                                \
  template <typename T>                                                                            \
  LS_INLINE MaskOf<T> operator op(Lanes<T> a, NonDeduced<T> b) {                         \
    MaskOf<T> m;                                                                                   \
    for (int i = 0; i < Lanes<T>::kParts; ++i) m.part[i] = a.part[i] op b;                         \
    return m;                                                                                      \
  }
LS_LANES_COMPARISON(<)
LS_LANES_COMPARISON(>)
#undef LS_LANES_COMPARISON

// mask ? a : b, lane by lane (and the scalar form, so that scalar and vector code share templates).
template <typename T>
LS_INLINE Lanes<T> select(MaskOf<T> mask, Lanes<T> a, Lanes<T> b) {
  for (int i = 0; i < Lanes<T>::kParts; ++i) a.part[i] = mask.part[i] ? a.part[i] : b.part[i];
  return a;
}
template <typename T>
LS_INLINE Lanes<T> select(MaskOf<T> mask, NonDeduced<T> a, Lanes<T> b) {
  for (int i = 0; i < Lanes<T>::kParts; ++i) b.part[i] = mask.part[i] ? a : b.part[i];
  return b;
}
LS_INLINE float select(bool mask, float a, float b) { return mask ? a : b; }

template <typename T>
LS_INLINE Lanes<T> broadcast(T x) {
  Lanes<T> v{};
  return v + x;
}

// Lanes [0, n) true: where a partial block at the end of a chunk holds data.
template <typename T>
LS_INLINE MaskOf<T> first_lanes(int64_t n) {
  using mask_t = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  mask_t bits[kLaneCount<T>];
  for (int64_t l = 0; l < kLaneCount<T>; ++l) bits[l] = l < n ? -1 : 0;
  MaskOf<T> m;
  std::memcpy(&m, bits, sizeof(m));
  return m;
}

// Sum and max over the lanes, always in lane order, so they too are the same on every instruction set.
// Lanes are read by subscript, not copied out with memcpy: a memcpy of the whole block keeps GCC from
// holding its parts in registers, and the accumulators of the loops around went through the stack.
template <typename T>
LS_INLINE T lane(Lanes<T> v, int64_t l) {
  constexpr int64_t kPartLanes = kLaneCount<T> / Lanes<T>::kParts;
  return v.part[l / kPartLanes][l % kPartLanes];
}
template <typename T>
LS_INLINE T sum_lanes(Lanes<T> v) {
  T s = lane(v, 0);
  for (int64_t l = 1; l < kLaneCount<T>; ++l) s += lane(v, l);
  return s;
}
template <typename T>
LS_INLINE T max_lanes(Lanes<T> v) {
  T m = lane(v, 0);
  for (int64_t l = 1; l < kLaneCount<T>; ++l) m = lane(v, l) > m ? lane(v, l) : m;
  return m;
}

// One block of consecutive elements, widened to the accumulation type. Every copy is one native vector
// at a time: a 64-byte memcpy would go through the stack in smaller pieces and stall the loads after it.
template <typename T>
LS_INLINE Lanes<T> load_lanes(const T* p) {  // float, double
  Lanes<T> v;
  constexpr int64_t kPartLanes = kLaneCount<T> / Lanes<T>::kParts;
  for (int i = 0; i < Lanes<T>::kParts; ++i) std::memcpy(&v.part[i], p + i * kPartLanes, sizeof(v.part[i]));
  return v;
}
LS_INLINE Lanes<float> load_lanes(const bf16_bits* p) {
  Lanes<float> v;
  for (int i = 0; i < Lanes<float>::kParts; ++i) {
    u16_half_native half;
    std::memcpy(&half, p + i * sizeof(half) / 2, sizeof(half));
#if LS_CPU_VECTOR_BYTES == 32
    // One vpmovzxwd: GCC lowers the generic conversion below as two 128-bit halves and an insert.
    const __m256i widened = _mm256_cvtepu16_epi32(reinterpret_cast<__m128i>(half));
    v.part[i] = reinterpret_cast<Native<float>::type>(_mm256_slli_epi32(widened, 16));
#else
    v.part[i] = reinterpret_cast<Native<float>::type>(__builtin_convertvector(half, u32_native) << 16);
#endif
  }
  return v;
}
LS_INLINE Lanes<float> load_lanes(const fp16_bits* p) {
  float lanes[kLaneCount<float>];
  for (int64_t l = 0; l < kLaneCount<float>; ++l) lanes[l] = load_as_acc(p[l]);
  return load_lanes(lanes);
}

// The first n (< a block) elements; the other lanes hold zeros.
template <typename scalar_t>
LS_INLINE auto load_first_lanes(const scalar_t* p, int64_t n) {
  scalar_t buffer[kLaneCount<acc_type<scalar_t>>] = {};
  std::memcpy(buffer, p, n * sizeof(scalar_t));
  return load_lanes(buffer);
}

// Stores one block, rounded to the storage type as store_from_acc does.
template <typename T>
LS_INLINE void store_lanes(T* p, Lanes<T> v) {  // float, double
  constexpr int64_t kPartLanes = kLaneCount<T> / Lanes<T>::kParts;
  for (int i = 0; i < Lanes<T>::kParts; ++i) std::memcpy(p + i * kPartLanes, &v.part[i], sizeof(v.part[i]));
}
LS_INLINE void store_lanes(bf16_bits* p, Lanes<float> v) {
  // Round to nearest even; NaN stays a (quiet) NaN, found by one unordered comparison.
  u32_native bits[Lanes<float>::kParts];
  for (int i = 0; i < Lanes<float>::kParts; ++i) {
    const u32_native u = reinterpret_cast<u32_native>(v.part[i]);
    const u32_native rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const auto is_nan = v.part[i] != v.part[i];
    bits[i] = is_nan ? 0x7FC0u : rounded;
  }
#if LS_CPU_VECTOR_BYTES == 32
  // Both parts packed at once (values fit 16 bits, so unsigned saturation changes none), which interleaves
  // their 64-bit quarters, then one permute puts the quarters in order for one 32-byte store: GCC's
  // lowering of the generic narrowing conversion takes several more shuffles per part.
  const __m256i packed = _mm256_packus_epi32(reinterpret_cast<__m256i>(bits[0]), reinterpret_cast<__m256i>(bits[1]));
  const __m256i ordered = _mm256_permute4x64_epi64(packed, 0xD8);
  std::memcpy(p, &ordered, sizeof(ordered));
#else
  for (int i = 0; i < Lanes<float>::kParts; ++i) {
    const u16_half_native half = __builtin_convertvector(bits[i], u16_half_native);
    std::memcpy(p + i * sizeof(half) / 2, &half, sizeof(half));
  }
#endif
}
LS_INLINE void store_lanes(fp16_bits* p, Lanes<float> v) {
  float lanes[kLaneCount<float>];
  store_lanes(lanes, v);
  for (int64_t l = 0; l < kLaneCount<float>; ++l) p[l] = store_from_acc<fp16_bits, float>(lanes[l]);
}

template <typename scalar_t, typename V>
LS_INLINE void store_first_lanes(scalar_t* p, V v, int64_t n) {
  scalar_t buffer[kLaneCount<acc_type<scalar_t>>];
  store_lanes(buffer, v);
  std::memcpy(p, buffer, n * sizeof(scalar_t));
}

LS_INLINE float bits_as_float(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
LS_INLINE int32_t float_as_bits(float f) {
  int32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}
// 2^n for -126 <= n <= 127, from the low bits of shifted = n + 1.5 * 2^23 (exp_vectorizable): they hold n in two's
// complement with an offset of 2^22, which the shift into the exponent field pushes out.
LS_INLINE float power_of_two_from_shifted(float shifted) {
  const uint32_t biased = static_cast<uint32_t>(float_as_bits(shifted)) + 127u;
  return bits_as_float(static_cast<int32_t>(biased << 23));
}
LS_INLINE Lanes<float> power_of_two_from_shifted(Lanes<float> shifted) {
  for (int i = 0; i < Lanes<float>::kParts; ++i) {
    const u32_native biased = reinterpret_cast<u32_native>(shifted.part[i]) + 127u;
    shifted.part[i] = reinterpret_cast<Native<float>::type>(biased << 23);
  }
  return shifted;
}

// a * b + c, with one rounding (a fused multiply-add) in the copies for CPUs with FMA (LS_CPU_FMA: AVX2 and
// AVX-512), with two elsewhere. The polynomials of exp and tanh use it, where the multiply-adds are most of the
// work (fused, the exp takes 30% less time, and each fused step is the more accurate), and so do the gradients.
// Explicit, rather than left to the compiler (-ffp-contract=off), so that every copy with FMA fuses the very
// same operations: they give the same bits as each other, and scalar and vector code the same bits too.
#if LS_CPU_FMA
LS_INLINE float mul_add(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
#else
LS_INLINE float mul_add(float a, float b, float c) { return a * b + c; }
#endif
// fp64, the reference-precision path, is never fused.
LS_INLINE double mul_add(double a, double b, double c) { return a * b + c; }

LS_INLINE Native<float>::type mul_add_part(Native<float>::type a, Native<float>::type b, Native<float>::type c) {
#if LS_CPU_FMA && LS_CPU_VECTOR_BYTES == 64
  return reinterpret_cast<Native<float>::type>(
      _mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(c)));
#elif LS_CPU_FMA && LS_CPU_VECTOR_BYTES == 32
  return reinterpret_cast<Native<float>::type>(
      _mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b), reinterpret_cast<__m256>(c)));
#else
  return a * b + c;
#endif
}
LS_INLINE Native<float>::type part_of(Lanes<float> v, int i) { return v.part[i]; }
LS_INLINE Native<float>::type part_of(float x, int) {
  Native<float>::type v{};
  return v + x;
}
template <typename B, typename C>
LS_INLINE Lanes<float> mul_add(Lanes<float> a, B b, C c) {
  for (int i = 0; i < Lanes<float>::kParts; ++i) a.part[i] = mul_add_part(a.part[i], part_of(b, i), part_of(c, i));
  return a;
}
template <typename B, typename C>
LS_INLINE Lanes<double> mul_add(Lanes<double> a, B b, C c) {
  return a * b + c;
}

// exp(x) for a float or fp32 lanes, branch-free, for x <= 88: every caller passes z - max or z - lse, <= 0 up
// to rounding (beyond 88 the scale's exponent would overflow). Cephes' expf polynomial: about 1 ulp there.
// Arguments below -87.3 give exactly 0 (as a -inf logit must: whatever the polynomial made of them is
// replaced); NaN stays NaN through the arithmetic. The polynomial is evaluated by Estrin's scheme, not
// Horner's: 6 dependent steps instead of 10 (a clamp at the top cost another 8%). One template for both, so
// that scalar and vector code round identically.
template <typename V>
LS_INLINE V exp_vectorizable(V x) {
  constexpr float kLowest = -87.33654475f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  // shifted = n + 1.5 * 2^23 for the integer n nearest x / ln 2: 2^n is made from its bits, with no conversion.
  const V shifted = mul_add(x, kLog2e, kRoundMagic);
  const V n = shifted - kRoundMagic;
  const V r = mul_add(n, -kLn2Lo, mul_add(n, -kLn2Hi, x));  // x - n ln 2, ln 2 in two parts
  const V r2 = r * r;
  // p = c0 + c1 r + ... + c5 r^5, as (c0 + c1 r) + r^2 ((c2 + c3 r) + r^2 (c4 + c5 r))
  const V low = mul_add(r, 1.6666665459e-1f, 5.0000001201e-1f);
  const V middle = mul_add(r, 8.3334519073e-3f, 4.1665795894e-2f);
  const V high = mul_add(r, 1.9875691500e-4f, 1.3981999507e-3f);
  const V p = mul_add(r2, mul_add(r2, high, middle), low);
  const V poly = mul_add(p, r2, r) + 1.0f;
  const V scale = power_of_two_from_shifted(shifted);
  return select(x < kLowest, 0.0f, poly * scale);
}

// log(x) for x >= 1 or NaN, branch-free and vectorizable by the `omp simd` loops that call it: the log of a
// row's sum of exp(z - max), which holds the max's own exp(0) = 1. Cephes' logf (x = 2^e f with f in
// [sqrt(1/2), sqrt(2)), a degree-8 polynomial in f - 1): at most 0.77 ulp on [1, 64], exactly 0 at 1. The
// library's scalar log was a fifth of the tile forward's time at 10 classes.
LS_INLINE float log_at_least_one(float x) {
  const int32_t bits = float_as_bits(x);
  const float mantissa = bits_as_float((bits & 0x007FFFFF) | 0x3F000000);  // in [1/2, 1), x = mantissa 2^e
  const bool below_sqrt_half = mantissa < 0.70710678118654752440f;
  const float e = static_cast<float>((bits >> 23) - 126 - (below_sqrt_half ? 1 : 0));
  const float f = below_sqrt_half ? (mantissa + mantissa) - 1.0f : mantissa - 1.0f;
  const float f2 = f * f;
  float p = f * 7.0376836292e-2f + -1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f + -1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f + -1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f + -2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float y = ((p * f * f2 + e * -2.12194440e-4f) + f2 * -0.5f);
  const float log_x = (f + y) + e * 0.693359375f;
  return x != x ? x : log_x;
}
// fp64: the library log, as for exp.
LS_INLINE double log_at_least_one(double x) { return __builtin_log(x); }

// fp64 is the reference-precision path: the library exp keeps it exact rather than fast.
LS_INLINE double exp_vectorizable(double x) { return __builtin_exp(x); }
LS_INLINE Lanes<double> exp_vectorizable(Lanes<double> x) {
  double lanes[kLaneCount<double>];
  std::memcpy(lanes, &x, sizeof(x));
  for (int64_t l = 0; l < kLaneCount<double>; ++l) lanes[l] = __builtin_exp(lanes[l]);
  return load_lanes(lanes);
}

// tanh(x) for a float or fp32 lanes, branch-free, for logit soft-capping: the [13/6] odd rational approximation
// that Eigen uses for float, within about 3 ulp (measured against fp64 tanh over [-10, 10]), with no exp: the
// softmax's exp is already the costliest step of the kernels. Beyond |x| = 7.9053 tanh rounds to +-1 in fp32,
// so x is clamped there (+-inf too); below |x| = 4e-4, tanh(x) rounds to x. NaN stays NaN (the comparisons
// are false for it). One template for scalar and vector code, like exp_vectorizable.
template <typename V>
LS_INLINE V tanh_vectorizable(V x) {
  constexpr float kSaturation = 7.90531110763549805f;
  const V clamped = select(x < -kSaturation, -kSaturation, select(x > kSaturation, kSaturation, x));
  const V x2 = clamped * clamped;
  V p = mul_add(x2, -2.76076847742355e-16f, 2.00018790482477e-13f);
  p = mul_add(p, x2, -8.60467152213735e-11f);
  p = mul_add(p, x2, 5.12229709037114e-08f);
  p = mul_add(p, x2, 1.48572235717979e-05f);
  p = mul_add(p, x2, 6.37261928875436e-04f);
  p = mul_add(p, x2, 4.89352455891786e-03f);
  p = p * clamped;
  V q = mul_add(x2, 1.19825839466702e-06f, 1.18534705686654e-04f);
  q = mul_add(q, x2, 2.26843463243900e-03f);
  q = mul_add(q, x2, 4.89352518554385e-03f);
  return select(x2 < 1.6e-7f, clamped, p / q);  // 4e-4 squared
}

// fp64: the library tanh, as for exp.
LS_INLINE double tanh_vectorizable(double x) { return __builtin_tanh(x); }
LS_INLINE Lanes<double> tanh_vectorizable(Lanes<double> x) {
  double lanes[kLaneCount<double>];
  std::memcpy(lanes, &x, sizeof(x));
  for (int64_t l = 0; l < kLaneCount<double>; ++l) lanes[l] = __builtin_tanh(lanes[l]);
  return load_lanes(lanes);
}

// Row formulas of ls_row_math.h on lanes (its templates are compiled for the baseline, so they cannot take the
// lanes' operators): the same operations in the same order, but for the gradients' multiply-add, fused where
// mul_add is.
template <typename acc_t>
LS_INLINE Lanes<acc_t> smoothed_probability_lanes(Lanes<acc_t> t, acc_t eps, int64_t num_classes) {
  return (acc_t(1) - eps) * t + eps / acc_t(num_classes);
}

// class_index_grad as one multiply-add (fused where mul_add is), for lanes or one element of classes that are not
// the target; the next overload adds the target's term. Every CPU kernel computes class-index gradients with these.
template <typename acc_t, typename V>
LS_INLINE V class_index_grad_fused(ClassIndexGradCoefs<acc_t> c, V prob, V w_j) {
  return mul_add(prob, c.prob_scale, -c.smooth_scale * w_j);
}
template <typename acc_t>
LS_INLINE acc_t class_index_grad_fused(ClassIndexGradCoefs<acc_t> c, acc_t prob, acc_t w_j, bool is_target) {
  const acc_t grad = class_index_grad_fused(c, prob, w_j);
  return is_target ? grad - c.target_scale : grad;
}

// probability_grad with its per-row factor prob_scale = g * mass + grad_lse computed once per row.
template <typename acc_t>
LS_INLINE Lanes<acc_t> probability_grad_lanes(acc_t prob_scale, acc_t g, Lanes<acc_t> prob,
                                              Lanes<acc_t> weighted_smoothed_target) {
  return mul_add(prob, prob_scale, -g * weighted_smoothed_target);
}

}  // namespace labelsmooth::cpu::LS_CPU_ISA
