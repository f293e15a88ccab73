// CPU backward: one read of the logits and one write of the gradient, from the lse the forward saved.
// Every gradient element depends only on its row's constants, so the work splits freely over threads.
// Compiled once per instruction set, like the forward (see ls_isa_kernels.h).
#pragma once

namespace labelsmooth::cpu::LS_CPU_ISA {
namespace {

// Upstream gradient of each row: grad_loss[r] for 'none', grad_loss / denominator for 'mean'.
template <typename acc_t>
struct RowGrad {
  const acc_t* grad_loss;
  acc_t scale;
  bool per_row;

  acc_t operator()(int64_t r) const { return per_row ? grad_loss[r] : grad_loss[0] * scale; }
};

// Gradient of logits [begin, begin + n) of row r (class-index target).
template <typename scalar_t, typename acc_t>
LS_INLINE void class_index_grad_chunk(const RowProblem<scalar_t, int64_t, acc_t>& p, int64_t r, int64_t begin,
                                      int64_t n, acc_t row_lse, acc_t g, scalar_t* out) {
  const int64_t y = p.target[r];
  if (y == p.ignore_index) {
    for (int64_t j = 0; j < n; ++j) out[j] = store_from_acc<scalar_t, acc_t>(acc_t(0));
    return;
  }
  const scalar_t* z = p.row_logits(r, 0);
  const acc_t w_y = p.weight == nullptr ? acc_t(1) : p.weight[y];
  const auto coefs = class_index_grad_coefs(g, w_y, p.weight_total, p.eps, p.classes);
  chunk_class_index_grad<scalar_t, acc_t>(z + begin, p.weight == nullptr ? nullptr : p.weight + begin, out, n,
                                          row_lse, coefs);
  if (y >= begin && y < begin + n) {  // the target's own term, same formula with [j = y] = 1
    const acc_t prob = exp_vectorizable(acc_t(load_as_acc(z[y])) - row_lse);
    out[y - begin] = store_from_acc<scalar_t, acc_t>(class_index_grad(coefs, prob, w_y, true));
  }
}

// Chunk tasks [begin, end) (task = row * chunks + chunk) of an (N, C) gradient. mass: per-row target
// mass (probability targets only).
template <typename scalar_t, typename target_t, typename acc_t, bool kProbability>
void backward_chunk_range(const RowProblem<scalar_t, target_t, acc_t>& p, int64_t begin,
                                               int64_t end, const acc_t* lse, RowGrad<acc_t> g, const acc_t* mass,
                                               scalar_t* grad) {
  const int64_t chunks = ceil_div(p.classes, kChunkElements);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t r = task / chunks;
    const int64_t chunk_begin = (task % chunks) * kChunkElements;
    const int64_t n = std::min(kChunkElements, p.classes - chunk_begin);
    scalar_t* out = grad + r * p.classes + chunk_begin;
    if constexpr (kProbability) {
      chunk_probability_grad<scalar_t, target_t, acc_t>(
          p.row_logits(r, 0) + chunk_begin, p.row_target(r, 0) + chunk_begin,
          p.weight == nullptr ? nullptr : p.weight + chunk_begin, out, n, lse[r], g(r), mass[r], p.eps, p.classes);
    } else {
      class_index_grad_chunk(p, r, chunk_begin, n, lse[r], g(r), out);
    }
  }
}

// sum_c w_c t'_c of rows [begin, end): the probability-target gradient needs it before its first write.
template <typename scalar_t, typename target_t, typename acc_t>
void target_mass_range(const RowProblem<scalar_t, target_t, acc_t>& p, int64_t begin,
                                            int64_t end, acc_t* mass) {
  for (int64_t r = begin; r < end; ++r) {
    acc_t total = 0;
    for (int64_t c = 0; c < p.classes; c += kChunkElements) {
      total += chunk_target_mass<target_t, acc_t>(p.row_target(r, 0) + c, p.weight == nullptr ? nullptr : p.weight + c,
                                                  std::min(kChunkElements, p.classes - c), p.eps, p.classes);
    }
    mass[r] = total;
  }
}

template <typename scalar_t, typename target_t, typename acc_t, bool kProbability>
void backward_rows(const RowProblem<scalar_t, target_t, acc_t>& p, const acc_t* lse, RowGrad<acc_t> g,
                   scalar_t* grad) {
  std::vector<acc_t> mass;
  if constexpr (kProbability) {
    mass.resize(p.rows());
    at::parallel_for(0, p.rows(), row_grain(p.classes), [&](int64_t begin, int64_t end) {
      target_mass_range(p, begin, end, mass.data());
    });
  }
  const int64_t chunks = ceil_div(p.classes, kChunkElements);
  const int64_t grain = chunks > 1 ? 1 : row_grain(p.classes);
  at::parallel_for(0, p.rows() * chunks, grain, [&](int64_t begin, int64_t end) {
    backward_chunk_range<scalar_t, target_t, acc_t, kProbability>(p, begin, end, lse, g, mass.data(), grad);
  });
}

// One tile of rows (see forward_tile and TileAddressing), gradient written class by class. The
// gradient is contiguous, so it is addressed like the probability targets.
template <typename scalar_t, typename target_t, typename acc_t, bool kProbability, bool kRowLanes>
void backward_tile(const RowProblem<scalar_t, target_t, acc_t>& p, int64_t o, int64_t i0,
                                        int64_t lanes, const acc_t* lse, RowGrad<acc_t> g, scalar_t* grad) {
  const TileAddressing at = tile_addressing<kRowLanes>(p, o, i0);
  const scalar_t* base = p.logits + at.logits_base;
  const target_t* target_base = p.target + at.target_base;
  scalar_t* out_base = grad + at.target_base;
  acc_t row_lse[kTileLanes], scale[kTileLanes], mass[kTileLanes];
  int64_t target_class[kTileLanes];
  ClassIndexGradCoefs<acc_t> coefs[kTileLanes];
  for (int64_t l = 0; l < lanes; ++l) {
    const int64_t r = at.first_row + l;
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
      const target_t* tc = target_base + c * at.target_class;
      const acc_t w_c = p.weight == nullptr ? acc_t(1) : p.weight[c];
#pragma omp simd
      for (int64_t l = 0; l < lanes; ++l) {
        mass[l] += w_c * smoothed_probability(acc_t(load_as_acc(tc[l * at.target_lane])), p.eps, p.classes);
      }
    }
  }
  for (int64_t c = 0; c < p.classes; ++c) {
    const scalar_t* zc = base + c * at.logits_class;
    scalar_t* out = out_base + c * at.target_class;
    const acc_t w_c = p.weight == nullptr ? acc_t(1) : p.weight[c];
#pragma omp simd
    for (int64_t l = 0; l < lanes; ++l) {
      const acc_t prob = exp_vectorizable(acc_t(load_as_acc(zc[l * at.logits_lane])) - row_lse[l]);
      acc_t value;
      if constexpr (kProbability) {
        const acc_t t = load_as_acc(target_base[c * at.target_class + l * at.target_lane]);
        value = probability_grad(scale[l], mass[l], prob, w_c * smoothed_probability(t, p.eps, p.classes));
      } else {
        value = target_class[l] < 0 ? acc_t(0) : class_index_grad(coefs[l], prob, w_c, c == target_class[l]);
      }
      out[l * at.target_lane] = store_from_acc<scalar_t, acc_t>(value);
    }
  }
}

template <typename scalar_t, typename target_t, typename acc_t, bool kProbability>
void backward_tiles(const RowProblem<scalar_t, target_t, acc_t>& p, const acc_t* lse, RowGrad<acc_t> g,
                    scalar_t* grad) {
  if (p.inner == 1) {  // short (N, C) rows: the rows are the lanes
    for_each_tile(1, p.classes, p.rows(), [&](int64_t, int64_t i0, int64_t lanes) {
      backward_tile<scalar_t, target_t, acc_t, kProbability, true>(p, 0, i0, lanes, lse, g, grad);
    });
    return;
  }
  for_each_tile(p.outer, p.classes, p.inner, [&](int64_t o, int64_t i0, int64_t lanes) {
    backward_tile<scalar_t, target_t, acc_t, kProbability, false>(p, o, i0, lanes, lse, g, grad);
  });
}

}  // namespace

at::Tensor backward_cpu(const at::Tensor& grad_loss, const PreparedInputs& in, const at::Tensor& lse,
                        double label_smoothing, int64_t ignore_index, int64_t reduction) {
  const ProblemLayout& layout = in.layout;
  at::Tensor grad = at::empty(in.input.sizes(), in.input.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad.numel() == 0) return grad;
  advise_huge_pages(grad);
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
        if (layout.inner == 1 && layout.classes > kShortRowClassesBackward) {
          backward_rows<scalar_t, target_t, acc_t, true>(p, lse_data, g, grad_data);
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
    if (layout.inner == 1 && layout.classes > kShortRowClassesBackward) {
      backward_rows<scalar_t, int64_t, acc_t, false>(p, lse_data, g, grad_data);
    } else {
      backward_tiles<scalar_t, int64_t, acc_t, false>(p, lse_data, g, grad_data);
    }
  });
  return grad;
}

}  // namespace labelsmooth::cpu::LS_CPU_ISA
