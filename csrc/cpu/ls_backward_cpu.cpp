// CPU backward: one read of the logits and one write of the gradient, from the lse the forward saved.
// Every gradient element depends only on its row's constants, so the work splits freely over threads.
#include <ATen/ATen.h>

#include <vector>

#include "cpu/ls_chunk_kernels.h"
#include "cpu/ls_cpu_common.h"
#include "cpu/ls_cpu_kernels.h"

namespace labelsmooth::cpu {
namespace {

constexpr int64_t kTileLanes = 32;

// Upstream gradient of each row: grad_loss[r] for 'none', grad_loss / denominator for 'mean'.
template <typename acc_t>
struct RowGrad {
  const acc_t* grad_loss;
  acc_t scale;
  bool per_row;

  acc_t operator()(int64_t r) const { return per_row ? grad_loss[r] : grad_loss[0] * scale; }
};

// Runs fn(r, begin, n) over every chunk of every row, rows and chunks spread over the threads.
template <typename Fn>
void for_each_row_chunk(int64_t rows, int64_t classes, Fn fn) {
  const int64_t chunks = std::max<int64_t>(1, ceil_div(classes, kChunkElements));
  const int64_t grain = chunks > 1 ? 1 : row_grain(classes);
  at::parallel_for(0, rows * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk_begin = (task % chunks) * kChunkElements;
      fn(task / chunks, chunk_begin, std::min(kChunkElements, classes - chunk_begin));
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_class_index_rows(const RowProblem<scalar_t, int64_t, acc_t>& p, const acc_t* lse, RowGrad<acc_t> g,
                               scalar_t* grad) {
  for_each_row_chunk(p.rows(), p.classes, [&](int64_t r, int64_t begin, int64_t n) {
    scalar_t* out = grad + r * p.classes + begin;
    const int64_t y = p.target[r];
    if (y == p.ignore_index) {
      std::fill(out, out + n, store_from_acc<scalar_t, acc_t>(acc_t(0)));
      return;
    }
    const scalar_t* z = p.row_logits(r, 0);
    const acc_t w_y = p.weight == nullptr ? acc_t(1) : p.weight[y];
    const auto coefs = class_index_grad_coefs(g(r), w_y, p.weight_total, p.eps, p.classes);
    chunk_class_index_grad<scalar_t, acc_t>(z + begin, p.weight == nullptr ? nullptr : p.weight + begin, out, n,
                                            lse[r], coefs);
    if (y >= begin && y < begin + n) {
      const acc_t prob = exp_vectorizable(acc_t(load_as_acc(z[y])) - lse[r]);
      out[y - begin] = store_from_acc<scalar_t, acc_t>(class_index_grad(coefs, prob, w_y, true));
    }
  });
}

template <typename target_t, typename acc_t>
acc_t row_target_mass(const target_t* t, const acc_t* weight, int64_t classes, acc_t eps) {
  acc_t mass = 0;
  for (int64_t begin = 0; begin < classes; begin += kChunkElements) {
    mass += chunk_target_mass<target_t, acc_t>(t + begin, weight == nullptr ? nullptr : weight + begin,
                                               std::min(kChunkElements, classes - begin), eps, classes);
  }
  return mass;
}

template <typename scalar_t, typename target_t, typename acc_t>
void backward_probability_rows(const RowProblem<scalar_t, target_t, acc_t>& p, const acc_t* lse, RowGrad<acc_t> g,
                               scalar_t* grad) {
  // The gradient of a row needs its whole target mass before the first element is written.
  std::vector<acc_t> mass(p.rows());
  at::parallel_for(0, p.rows(), row_grain(p.classes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) mass[r] = row_target_mass(p.row_target(r, 0), p.weight, p.classes, p.eps);
  });
  for_each_row_chunk(p.rows(), p.classes, [&](int64_t r, int64_t begin, int64_t n) {
    chunk_probability_grad<scalar_t, target_t, acc_t>(p.row_logits(r, 0) + begin, p.row_target(r, 0) + begin,
                                                      p.weight == nullptr ? nullptr : p.weight + begin,
                                                      grad + r * p.classes + begin, n, lse[r], g(r), mass[r], p.eps,
                                                      p.classes);
  });
}

// One tile of the (N, C, d1, ...) layout (see ls_forward_cpu.cpp), gradient written class by class.
template <typename scalar_t, typename target_t, typename acc_t, bool kProbability>
LS_CPU_TARGET_CLONES void backward_tile(const RowProblem<scalar_t, target_t, acc_t>& p, int64_t o, int64_t i0,
                                        int64_t lanes, const acc_t* lse, RowGrad<acc_t> g, scalar_t* grad) {
  const scalar_t* base = p.row_logits(o, i0);
  scalar_t* out_base = grad + o * p.classes * p.inner + i0;
  acc_t row_lse[kTileLanes], scale[kTileLanes], mass[kTileLanes];
  int64_t target_class[kTileLanes];
  ClassIndexGradCoefs<acc_t> coefs[kTileLanes];
  for (int64_t l = 0; l < lanes; ++l) {
    const int64_t r = o * p.inner + i0 + l;
    row_lse[l] = lse[r];
    scale[l] = g(r);
    mass[l] = acc_t(0);
    if constexpr (!kProbability) {
      const int64_t y = p.target[r];
      const bool active = y != p.ignore_index;
      target_class[l] = active ? y : -1;
      const acc_t w_y = !active ? acc_t(0) : (p.weight == nullptr ? acc_t(1) : p.weight[y]);
      // Ignored rows get all-zero coefficients and a zero gradient (their lse is 0, never used).
      coefs[l] = active ? class_index_grad_coefs(scale[l], w_y, p.weight_total, p.eps, p.classes)
                        : ClassIndexGradCoefs<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
    }
  }
  if constexpr (kProbability) {
    for (int64_t c = 0; c < p.classes; ++c) {
      const target_t* tc = p.row_target(o, i0) + c * p.inner;
      const acc_t w_c = p.weight == nullptr ? acc_t(1) : p.weight[c];
#pragma omp simd
      for (int64_t l = 0; l < lanes; ++l) mass[l] += w_c * smoothed_probability(acc_t(load_as_acc(tc[l])), p.eps, p.classes);
    }
  }
  for (int64_t c = 0; c < p.classes; ++c) {
    const scalar_t* zc = base + c * p.inner;
    scalar_t* out = out_base + c * p.inner;
    const acc_t w_c = p.weight == nullptr ? acc_t(1) : p.weight[c];
#pragma omp simd
    for (int64_t l = 0; l < lanes; ++l) {
      const acc_t prob = exp_vectorizable(acc_t(load_as_acc(zc[l])) - row_lse[l]);
      acc_t value;
      if constexpr (kProbability) {
        const acc_t tw = w_c * smoothed_probability(acc_t(load_as_acc(p.row_target(o, i0)[c * p.inner + l])), p.eps,
                                                    p.classes);
        value = probability_grad(scale[l], mass[l], prob, tw);
      } else {
        value = target_class[l] < 0 ? acc_t(0) : class_index_grad(coefs[l], prob, w_c, c == target_class[l]);
      }
      out[l] = store_from_acc<scalar_t, acc_t>(value);
    }
  }
}

template <typename scalar_t, typename target_t, typename acc_t, bool kProbability>
void backward_tiles(const RowProblem<scalar_t, target_t, acc_t>& p, const acc_t* lse, RowGrad<acc_t> g,
                    scalar_t* grad) {
  const int64_t tiles_per_outer = ceil_div(p.inner, kTileLanes);
  const int64_t grain = std::max<int64_t>(1, row_grain(p.classes) / kTileLanes);
  at::parallel_for(0, p.outer * tiles_per_outer, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / tiles_per_outer;
      const int64_t i0 = (task % tiles_per_outer) * kTileLanes;
      backward_tile<scalar_t, target_t, acc_t, kProbability>(p, o, i0, std::min(kTileLanes, p.inner - i0), lse, g,
                                                             grad);
    }
  });
}

}  // namespace

at::Tensor backward_cpu(const at::Tensor& grad_loss, const PreparedInputs& in, const at::Tensor& lse,
                        double label_smoothing, int64_t ignore_index, int64_t reduction) {
  const ProblemLayout& layout = in.layout;
  at::Tensor grad = at::empty(in.input.sizes(), in.input.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad.numel() == 0) return grad;
  const at::Tensor lse_c = lse.contiguous();

  dispatch_logits_dtype(in.input.scalar_type(), [&](auto* scalar_tag) {
    using scalar_t = std::remove_pointer_t<decltype(scalar_tag)>;
    using acc_t = acc_type<scalar_t>;
    scalar_t* grad_data = mutable_data_as<scalar_t>(grad);
    const acc_t* lse_data = data_as<acc_t>(lse_c);
    RowGrad<acc_t> g{data_as<acc_t>(grad_loss), acc_t(1), reduction == kReductionNone};
    if (layout.probability_target) {
      if (reduction == kReductionMean) g.scale = acc_t(1) / static_cast<acc_t>(layout.rows());
      dispatch_target_dtype<scalar_t>(in.target, in.input.scalar_type(), [&](auto* target_tag) {
        using target_t = std::remove_pointer_t<decltype(target_tag)>;
        const auto p = make_row_problem<scalar_t, target_t, acc_t>(in, label_smoothing, ignore_index);
        if (layout.inner == 1) {
          backward_probability_rows(p, lse_data, g, grad_data);
        } else {
          backward_tiles<scalar_t, target_t, acc_t, true>(p, lse_data, g, grad_data);
        }
      });
      return;
    }
    const auto p = make_row_problem<scalar_t, int64_t, acc_t>(in, label_smoothing, ignore_index);
    check_class_indices(p.target, p.rows(), p.classes, ignore_index);
    if (reduction == kReductionMean) {
      // All rows ignored: the denominator is 0, but no row uses the scale then.
      g.scale = acc_t(1) / class_index_mean_denominator(p.target, p.rows(), p.weight, ignore_index);
    }
    if (layout.inner == 1) {
      backward_class_index_rows(p, lse_data, g, grad_data);
    } else {
      backward_tiles<scalar_t, int64_t, acc_t, false>(p, lse_data, g, grad_data);
    }
  });
  return grad;
}

}  // namespace labelsmooth::cpu
