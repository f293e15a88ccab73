// The CPU implementations of the two labelsmooth ops (arguments already checked by ls_op_common).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "cpu/ls_cpu_common.h"
#include "cpu/ls_cpu_isa.h"
#include "kernels/ls_row_math.h"
#include "ls_op_common.h"

namespace labelsmooth::cpu {

// Rows of the logits as the kernels address them: row r = (o, i) starts at o * outer_stride + i and
// steps by inner between classes. Probability targets are contiguous: o * classes * inner + i.
template <typename scalar_t, typename target_t, typename acc_t>
struct RowProblem {
  const scalar_t* logits;
  const target_t* target;
  const acc_t* weight;  // nullptr: all weights 1
  int64_t outer;
  int64_t classes;
  int64_t inner;
  int64_t outer_stride;
  acc_t weight_total;
  acc_t eps;  // in the uniform convention (LossOptions)
  // The same eps unrounded, for the per-row constants: with 'others' near eps = 1 the uniform eps exceeds 1, and
  // 1 - eps taken from an fp32 eps would keep only a few correct bits.
  double eps_fp64;
  int64_t ignore_index;
  acc_t softcap;          // 0: logits not capped
  acc_t inverse_softcap;  // 1 / softcap (0 when not capped)

  int64_t rows() const { return outer * inner; }
  const scalar_t* row_logits(int64_t o, int64_t i) const { return logits + o * outer_stride + i; }
  const target_t* row_target(int64_t o, int64_t i) const { return target + o * classes * inner + i; }
};

// The per-row constants of the class-index loss and gradient (ls_row_math.h), computed in double from the
// unrounded eps (see RowProblem::eps_fp64) and rounded once.
template <typename acc_t, typename Problem>
LS_INLINE acc_t class_index_loss_of_row(const Problem& p, acc_t lse, acc_t z_target, acc_t w_target,
                                        acc_t shifted_weighted_sum, acc_t pivot) {
  return static_cast<acc_t>(class_index_row_loss<double>(lse, z_target, w_target, p.weight_total,
                                                         shifted_weighted_sum, pivot, p.eps_fp64, p.classes));
}

template <typename acc_t, typename Problem>
LS_INLINE ClassIndexGradCoefs<acc_t> class_index_coefs_of_row(const Problem& p, acc_t g, acc_t grad_lse,
                                                              acc_t w_target) {
  const auto c = class_index_grad_coefs<double>(g, grad_lse, w_target, p.weight_total, p.eps_fp64, p.classes);
  return ClassIndexGradCoefs<acc_t>{static_cast<acc_t>(c.prob_scale), static_cast<acc_t>(c.smooth_scale),
                                    static_cast<acc_t>(c.target_scale)};
}

// Rows whose class-index target is ignore_index contribute nothing (probability rows always count).
template <typename scalar_t, typename target_t, typename acc_t, bool kProbability>
LS_INLINE bool row_is_active(const RowProblem<scalar_t, target_t, acc_t>& p, int64_t r) {
  if constexpr (kProbability) {
    return true;
  } else {
    return p.target[r] != p.ignore_index;
  }
}

// Where the tile of rows i0 .. i0 + lanes - 1 (of outer index o) lives: element (lane l, class c) of the
// logits is at logits_base + c * logits_class + l * logits_lane, likewise for probability targets (and
// for the contiguous gradient, which has the targets' layout). With kRowLanes the lanes are rows of
// an (N, C) problem; otherwise they are adjacent positions of an (N, C, d1, ...) problem.
struct TileAddressing {
  int64_t first_row;
  int64_t logits_base, logits_class, logits_lane;
  int64_t target_base, target_class, target_lane;
};

template <bool kRowLanes, typename Problem>
LS_INLINE TileAddressing tile_addressing(const Problem& p, int64_t o, int64_t i0) {
  if constexpr (kRowLanes) {
    return TileAddressing{i0, i0 * p.outer_stride, 1, p.outer_stride, i0 * p.classes, 1, p.classes};
  } else {
    return TileAddressing{o * p.inner + i0, o * p.outer_stride + i0, p.inner, 1, o * p.classes * p.inner + i0,
                          p.inner, 1};
  }
}

template <typename scalar_t, typename target_t, typename acc_t>
RowProblem<scalar_t, target_t, acc_t> make_row_problem(const PreparedInputs& in, const LossOptions& options) {
  const ProblemLayout& layout = in.layout;
  const acc_t* weight = in.weight.defined() ? reinterpret_cast<const acc_t*>(in.weight.const_data_ptr()) : nullptr;
  return RowProblem<scalar_t, target_t, acc_t>{reinterpret_cast<const scalar_t*>(in.input.const_data_ptr()),
                                               reinterpret_cast<const target_t*>(in.target.const_data_ptr()),
                                               weight,
                                               layout.outer,
                                               layout.classes,
                                               layout.inner,
                                               layout.outer_stride,
                                               weight_total(weight, layout.classes),
                                               static_cast<acc_t>(options.eps),
                                               options.eps,
                                               options.ignore_index,
                                               static_cast<acc_t>(options.softcap),
                                               options.softcap > 0 ? static_cast<acc_t>(1.0 / options.softcap)
                                                                   : acc_t(0)};
}

// The two ops' CPU implementations for one instruction set (arguments already checked). The forward returns
// (loss, lse, target_mass), the backward the gradient with respect to the logits.
struct IsaKernels {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*forward)(const PreparedInputs& in, const LossOptions& options);
  at::Tensor (*backward)(const BackwardInputs& grads, const PreparedInputs& in, const LossOptions& options);
};

// One copy of the kernels per instruction set, each defined by its ls_isa_<name>.cpp (the x86 ones only
// where the compiler can target them: LS_CPU_X86_VARIANTS). ls_cpu_isa.h says which one runs.
namespace baseline {
extern const IsaKernels kernels;
}
#if LS_CPU_X86_VARIANTS
namespace avx2 {
extern const IsaKernels kernels;
}
namespace avx512 {
extern const IsaKernels kernels;
}
#endif

}  // namespace labelsmooth::cpu
