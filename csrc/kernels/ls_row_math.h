// The row formulas of label-smoothed cross-entropy, shared by the CPU and CUDA kernels.
//
// One definition of the math (DESIGN.md §2), so that every backend computes the same thing in the
// same order. Plain C++: no torch headers, usable from host code and from CUDA device code.
//
// Notation for one row: logits z (K classes), target y, smoothing eps, class weights w (all 1 when
// absent, W = sum w), lse = log sum exp z. Sums over the row are taken relative to a "pivot" (the
// row's first logit when finite, else 0): sum (z_c - pivot) instead of sum z_c. The smoothing term
// only needs lse - mean(z), and the shift keeps large common offsets (logits around 1000) from
// cancelling catastrophically in fp32.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LS_HOST_DEVICE inline
#endif

namespace labelsmooth {

// Same numbering as at::Reduction, so the op's `int reduction` argument needs no translation.
enum Reduction : int64_t { kReductionNone = 0, kReductionMean = 1, kReductionSum = 2 };

// The op's `int smoothing`: where the smoothing mass eps goes. kSmoothingUniform is PyTorch's convention,
// q = (1 - eps) [c = y] + eps / K (the true class gets eps / K too); kSmoothingOthers is fairseq's and
// Megatron's, q = (1 - eps) [c = y] + eps / (K - 1) [c != y] (class indices only).
enum SmoothingConvention : int64_t { kSmoothingUniform = 0, kSmoothingOthers = 1 };

// 'others' is 'uniform' with eps * K / (K - 1): then eps_u / K = eps / (K - 1) on every other class and
// (1 - eps_u) + eps_u / K = 1 - eps on the true one. Every row formula below takes the uniform eps; hosts
// convert once (labelsmooth_ext/reference.py mirrors this).
inline double uniform_smoothing(double eps, int64_t convention, int64_t num_classes) {
  return convention == kSmoothingOthers && num_classes > 1 ? eps * double(num_classes) / double(num_classes - 1)
                                                           : eps;
}

// Logit soft-capping (Gemma 2): every logit z is read as z' = cap * tanh(z / cap), and the loss is that of
// z'. Chain rule: dL/dz = dL/dz' * d z'/dz = dL/dz' * (1 - tanh^2(z / cap)) = dL/dz' * (1 - (z' / cap)^2),
// so the backward needs only the capped value it recomputes. tanh is passed in so that each backend uses
// its own (a vectorizable one on CPU, the hardware's on CUDA).
template <typename acc_t>
LS_HOST_DEVICE acc_t softcap_derivative(acc_t capped, acc_t cap) {
  const acc_t t = capped / cap;
  // (1 - t)(1 + t) rather than 1 - t^2: no cancellation where the tanh saturates (t near +-1).
  return (acc_t(1) - t) * (acc_t(1) + t);
}

// A gradient reaching a row's lse (z-loss, a returned lse) flows on to the logits as grad_lse * p_j, since
// d lse / d z_j = p_j. z-loss adds z * lse^2 per row (z_loss * w_y * lse^2 with class weights), so its
// grad_lse is 2 * z_loss * w_y * lse * g: the kernels only ever see grad_lse, which folds into the
// coefficient of p_j below (prob_scale), at no cost per element.

// Running max and sum of exp(z - max) over part of a row; partial states merge in any grouping, and
// the kernels merge them in a fixed order so results do not depend on the thread count.
template <typename acc_t>
struct SoftmaxState {
  acc_t max;
  acc_t sum;
};

template <typename acc_t>
LS_HOST_DEVICE acc_t ls_exp(acc_t x) {
  return std::exp(x);
}

template <typename acc_t>
LS_HOST_DEVICE SoftmaxState<acc_t> softmax_state_merge(SoftmaxState<acc_t> a, SoftmaxState<acc_t> b) {
  // -inf maxima (empty or all -inf parts) must not produce exp(-inf - -inf) = NaN.
  if (a.max == -INFINITY) return b;
  if (b.max == -INFINITY) return a;
  const acc_t m = a.max > b.max ? a.max : b.max;
  // NaN logits: keep NaN flowing into the lse, as PyTorch does.
  if (m != m) return SoftmaxState<acc_t>{m, m};
  return SoftmaxState<acc_t>{m, a.sum * ls_exp<acc_t>(a.max - m) + b.sum * ls_exp<acc_t>(b.max - m)};
}

// An all -inf row has lse = -inf (its sum is 0). A +inf logit makes the sum NaN (inf - inf), so the lse
// is NaN, which is what PyTorch's log_softmax gives there too.
template <typename acc_t>
LS_HOST_DEVICE acc_t softmax_state_lse(SoftmaxState<acc_t> s) {
  if (s.max == -INFINITY) return s.max;
  return s.max + std::log(s.sum);
}

// The pivot the sums are taken relative to (see the file comment).
template <typename acc_t>
LS_HOST_DEVICE acc_t row_pivot(acc_t first_logit) {
  return (first_logit - first_logit == acc_t(0)) ? first_logit : acc_t(0);  // finite ? z_0 : 0
}

// Loss of one valid row with a class-index target:
//   (1 - eps) * w_y * (lse - z_y) + (eps / K) * (W * lse - sum_c w_c z_c)
// with the second sum given relative to the pivot (shifted_weighted_sum = sum_c w_c (z_c - pivot)).
// eps == 0 skips the smoothing term, as PyTorch does (it would turn a -inf logit into NaN).
template <typename acc_t>
LS_HOST_DEVICE acc_t class_index_row_loss(acc_t lse, acc_t z_target, acc_t w_target, acc_t weight_total,
                                          acc_t shifted_weighted_sum, acc_t pivot, acc_t eps,
                                          int64_t num_classes) {
  acc_t loss = (acc_t(1) - eps) * w_target * (lse - z_target);
  if (eps > acc_t(0)) {
    loss += (eps / acc_t(num_classes)) * (weight_total * (lse - pivot) - shifted_weighted_sum);
  }
  return loss;
}

// Per-row constants of the class-index gradient. With p_j = exp(z_j - lse) and g the row's upstream
// gradient:  dL/dz_j = g * [ (1-eps) w_y (p_j - [j=y]) + (eps/K) (W p_j - w_j) ]
//                    = prob_scale * p_j - smooth_scale * w_j - [j = y] * target_scale
template <typename acc_t>
struct ClassIndexGradCoefs {
  acc_t prob_scale;
  acc_t smooth_scale;
  acc_t target_scale;
};

template <typename acc_t>
LS_HOST_DEVICE ClassIndexGradCoefs<acc_t> class_index_grad_coefs(acc_t g, acc_t grad_lse, acc_t w_target,
                                                                 acc_t weight_total, acc_t eps, int64_t num_classes) {
  const acc_t smooth = eps / acc_t(num_classes);
  return ClassIndexGradCoefs<acc_t>{g * ((acc_t(1) - eps) * w_target + smooth * weight_total) + grad_lse,
                                    g * smooth, g * (acc_t(1) - eps) * w_target};
}

template <typename acc_t>
LS_HOST_DEVICE acc_t class_index_grad(ClassIndexGradCoefs<acc_t> c, acc_t prob, acc_t w_j, bool is_target) {
  acc_t grad = c.prob_scale * prob - c.smooth_scale * w_j;
  if (is_target) grad -= c.target_scale;
  return grad;
}

// Probability targets: t'_c = (1 - eps) t_c + eps / K.
template <typename acc_t>
LS_HOST_DEVICE acc_t smoothed_probability(acc_t t, acc_t eps, int64_t num_classes) {
  return (acc_t(1) - eps) * t + eps / acc_t(num_classes);
}

// Loss of one row with probability targets: sum_c w_c t'_c (lse - z_c)
//   = mass * (lse - pivot) - sum_c w_c t'_c (z_c - pivot),   mass = sum_c w_c t'_c.
// Computed this way (not as mass*lse - sum w t' z) so that a -inf logit with zero target mass gives
// NaN exactly where PyTorch's -(log_softmax * t') does.
template <typename acc_t>
LS_HOST_DEVICE acc_t probability_row_loss(acc_t lse, acc_t mass, acc_t shifted_weighted_target_dot, acc_t pivot) {
  return mass * (lse - pivot) - shifted_weighted_target_dot;
}

// dL/dz_j = g * (mass * p_j - w_j t'_j) + grad_lse * p_j. The mass is the forward's (saved per row).
template <typename acc_t>
LS_HOST_DEVICE acc_t probability_grad(acc_t g, acc_t grad_lse, acc_t mass, acc_t prob,
                                      acc_t weighted_smoothed_target) {
  return (g * mass + grad_lse) * prob - g * weighted_smoothed_target;
}

}  // namespace labelsmooth
