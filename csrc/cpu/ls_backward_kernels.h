// CPU backward: one read of the logits and one write of the gradient, from the lse (and, for probability
// targets, the target mass) the forward saved. Every gradient element depends only on its row's constants, so
// the work splits freely over threads. Compiled once per instruction set, like the forward (see
// ls_isa_kernels.h).
#pragma once

namespace labelsmooth::cpu::LS_CPU_ISA {
namespace {

// What each row's gradient needs besides the logits: the upstream gradient of its loss (grad_loss[r] for
// 'none', grad_loss / denominator for 'mean'), of its lse (0 when absent), the lse and the target mass.
template <typename acc_t>
struct RowGrad {
  const acc_t* grad_loss;
  acc_t scale;
  bool per_row;
  const acc_t* grad_lse;  // nullptr: no gradient reaches the lse
  const acc_t* lse;
  const acc_t* mass;  // probability targets only

  acc_t loss(int64_t r) const { return per_row ? grad_loss[r] : grad_loss[0] * scale; }
  acc_t of_lse(int64_t r) const { return grad_lse == nullptr ? acc_t(0) : grad_lse[r]; }
};

// Gradient of logits [begin, begin + n) of row r (class-index target).
template <bool kSoftcap, typename scalar_t, typename acc_t>
LS_INLINE void class_index_grad_chunk(const RowProblem<scalar_t, int64_t, acc_t>& p, int64_t r, int64_t begin,
                                      int64_t n, const RowGrad<acc_t>& g, scalar_t* out) {
  const int64_t y = p.target[r];
  if (y == p.ignore_index) {
    for (int64_t j = 0; j < n; ++j) out[j] = store_from_acc<scalar_t, acc_t>(acc_t(0));
    return;
  }
  const scalar_t* z = p.row_logits(r, 0);
  const acc_t w_y = p.weight == nullptr ? acc_t(1) : p.weight[y];
  const acc_t row_lse = g.lse[r];
  const auto coefs = class_index_coefs_of_row(p, g.loss(r), g.of_lse(r), w_y);
  chunk_class_index_grad<kSoftcap, scalar_t, acc_t>(z + begin, p.weight == nullptr ? nullptr : p.weight + begin, out,
                                                    n, row_lse, coefs, p.softcap, p.inverse_softcap);
  if (y >= begin && y < begin + n) {  // the target's own term, same formula with [j = y] = 1
    acc_t derivative;
    const acc_t x = read_logit<kSoftcap>(acc_t(load_as_acc(z[y])), p.softcap, p.inverse_softcap, &derivative);
    acc_t grad = class_index_grad_fused(coefs, exp_vectorizable(x - row_lse), w_y, true);
    if constexpr (kSoftcap) grad = grad * derivative;
    out[y - begin] = store_from_acc<scalar_t, acc_t>(grad);
  }
}

// Chunk tasks [begin, end) (task = row * chunks + chunk) of an (N, C) gradient.
template <typename scalar_t, typename target_t, typename acc_t, bool kProbability, bool kSoftcap>
void backward_chunk_range(const RowProblem<scalar_t, target_t, acc_t>& p, int64_t begin, int64_t end,
                          const RowGrad<acc_t>& g, scalar_t* grad) {
  const int64_t chunks = ceil_div(p.classes, kChunkElements);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t r = task / chunks;
    const int64_t chunk_begin = (task % chunks) * kChunkElements;
    const int64_t n = std::min(kChunkElements, p.classes - chunk_begin);
    scalar_t* out = grad + r * p.classes + chunk_begin;
    if constexpr (kProbability) {
      const acc_t upstream = g.loss(r);
      chunk_probability_grad<kSoftcap, scalar_t, target_t, acc_t>(
          p.row_logits(r, 0) + chunk_begin, p.row_target(r, 0) + chunk_begin,
          p.weight == nullptr ? nullptr : p.weight + chunk_begin, out, n, g.lse[r],
          upstream * g.mass[r] + g.of_lse(r), upstream, p.eps, p.classes, p.softcap, p.inverse_softcap);
    } else {
      class_index_grad_chunk<kSoftcap>(p, r, chunk_begin, n, g, out);
    }
  }
}

template <typename scalar_t, typename target_t, typename acc_t, bool kProbability, bool kSoftcap>
void backward_rows(const RowProblem<scalar_t, target_t, acc_t>& p, const RowGrad<acc_t>& g, scalar_t* grad) {
  const int64_t chunks = ceil_div(p.classes, kChunkElements);
  const int64_t grain = chunks > 1 ? 1 : row_grain(p.classes);
  at::parallel_for(0, p.rows() * chunks, grain, [&](int64_t begin, int64_t end) {
    backward_chunk_range<scalar_t, target_t, acc_t, kProbability, kSoftcap>(p, begin, end, g, grad);
  });
}

// One tile of rows (see forward_tile and TileAddressing), gradient written class by class. The
// gradient is contiguous, so it is addressed like the probability targets.
template <typename scalar_t, typename target_t, typename acc_t, bool kProbability, bool kSoftcap, bool kRowLanes>
void backward_tile(const RowProblem<scalar_t, target_t, acc_t>& p, int64_t o, int64_t i0, int64_t lanes,
                   const RowGrad<acc_t>& g, scalar_t* grad) {
  TileAddressing at = tile_addressing<kRowLanes>(p, o, i0);
  const scalar_t* base = p.logits + at.logits_base;
  const target_t* target_base = p.target + at.target_base;
  scalar_t* out_base = grad + at.target_base;
  // Short (N, C) rows (at most kShortRowClassesBackward classes, backward_problem): the logits are read
  // from, and the gradient written to, class-major local tiles (stage_row_tile), so that every load and
  // store of the loop below is contiguous; the gradient tile is copied out at the end (unstage_row_tile).
  constexpr int64_t kStaged = kRowLanes ? kShortRowClassesBackward * kTileLanes : 1;
  scalar_t staged[kStaged], staged_out[kStaged];
  int64_t out_class = at.target_class, out_lane = at.target_lane;
  if constexpr (kRowLanes) {
    base = stage_row_tile(base, at.logits_lane, p.classes, lanes, staged);
    at.logits_class = kTileLanes;
    at.logits_lane = 1;
    out_class = kTileLanes;
    out_lane = 1;
  }
  // Each row's constants. The class-index coefficients are computed for all lanes at once, from arrays of
  // each row's inputs: their double-precision formulas cost as much as the rest of a tile of few classes
  // when computed one row at a time.
  acc_t row_lse[kTileLanes], upstream[kTileLanes], prob_scale[kTileLanes];
  acc_t smooth_scale[kTileLanes], target_scale[kTileLanes], w_target[kTileLanes], lse_grad[kTileLanes];
  // The target class of each row (-1 where ignored). The loop below compares it with the class in every lane:
  // for short rows (at most kShortRowClassesBackward classes, so any class fits) it is an int32 beside fp32
  // lanes, as 64-bit compares there cost that loop 14% at 10 classes.
  using lane_int_t = std::conditional_t<kRowLanes && sizeof(acc_t) == 4, int32_t, int64_t>;
  lane_int_t target_class[kTileLanes];
  ClassIndexGradCoefs<acc_t> coefs[kTileLanes];
  // Gathered by loops with the per-call choices taken outside them, so that they vectorize: asked for each lane
  // (is the upstream per row, is there a gradient of the lse, are there weights, is the row ignored), they had
  // taken a tenth of a tile's time at 10 classes.
  const int64_t first = at.first_row;
  for (int64_t l = 0; l < lanes; ++l) row_lse[l] = g.lse[first + l];
  if (g.per_row) {
    for (int64_t l = 0; l < lanes; ++l) upstream[l] = g.grad_loss[first + l];
  } else {
    const acc_t shared_upstream = g.loss(0);
    for (int64_t l = 0; l < lanes; ++l) upstream[l] = shared_upstream;
  }
  for (int64_t l = 0; l < lanes; ++l) lse_grad[l] = g.grad_lse == nullptr ? acc_t(0) : g.grad_lse[first + l];
  if constexpr (kProbability) {
    for (int64_t l = 0; l < lanes; ++l) prob_scale[l] = upstream[l] * g.mass[first + l] + lse_grad[l];
  } else {
    const int64_t* target = p.target + first;
    const int64_t ignore_index = p.ignore_index;
    for (int64_t l = 0; l < lanes; ++l) {
      target_class[l] = static_cast<lane_int_t>(target[l] != ignore_index ? target[l] : -1);
    }
    if (p.weight == nullptr) {
      for (int64_t l = 0; l < lanes; ++l) w_target[l] = acc_t(1);
    } else {
      for (int64_t l = 0; l < lanes; ++l) w_target[l] = target_class[l] < 0 ? acc_t(1) : p.weight[target_class[l]];
    }
  }
  if constexpr (!kProbability) {
#pragma omp simd
    for (int64_t l = 0; l < lanes; ++l) {
      const auto coefs = class_index_coefs_of_row(p, upstream[l], lse_grad[l], w_target[l]);
      // Ignored rows get all-zero coefficients and a zero gradient. Their saved lse is 0; +inf instead keeps
      // the exp below (computed for every lane, then discarded) within its range: z - inf <= 0.
      const bool active = target_class[l] >= 0;
      prob_scale[l] = active ? coefs.prob_scale : acc_t(0);
      smooth_scale[l] = active ? coefs.smooth_scale : acc_t(0);
      target_scale[l] = active ? coefs.target_scale : acc_t(0);
      row_lse[l] = active ? row_lse[l] : acc_t(INFINITY);
    }
    // The loop below reads them as one array of structs: with three arrays, GCC leaves it scalar.
    for (int64_t l = 0; l < lanes; ++l) coefs[l] = {prob_scale[l], smooth_scale[l], target_scale[l]};
  }
  for (int64_t c = 0; c < p.classes; ++c) {
    const scalar_t* zc = base + c * at.logits_class;
    scalar_t* out = (kRowLanes ? staged_out : out_base) + c * out_class;
    const acc_t w_c = p.weight == nullptr ? acc_t(1) : p.weight[c];
#pragma omp simd
    for (int64_t l = 0; l < lanes; ++l) {
      acc_t derivative;
      const acc_t x =
          read_logit<kSoftcap>(acc_t(load_as_acc(zc[l * at.logits_lane])), p.softcap, p.inverse_softcap, &derivative);
      const acc_t prob = exp_vectorizable(x - row_lse[l]);
      acc_t value;
      if constexpr (kProbability) {
        const acc_t t = load_as_acc(target_base[c * at.target_class + l * at.target_lane]);
        value = prob_scale[l] * prob - upstream[l] * (w_c * smoothed_probability(t, p.eps, p.classes));
      } else {
        const bool is_target = static_cast<lane_int_t>(c) == target_class[l];
        value = target_class[l] < 0 ? acc_t(0) : class_index_grad_fused(coefs[l], prob, w_c, is_target);
      }
      if constexpr (kSoftcap) value = value * derivative;
      out[l * out_lane] = store_from_acc<scalar_t, acc_t>(value);
    }
  }
  if constexpr (kRowLanes) unstage_row_tile(staged_out, p.classes, lanes, out_base, at.target_lane);
}

template <typename scalar_t, typename target_t, typename acc_t, bool kProbability, bool kSoftcap>
void backward_tiles(const RowProblem<scalar_t, target_t, acc_t>& p, const RowGrad<acc_t>& g, scalar_t* grad) {
  if (p.inner == 1) {  // short (N, C) rows: the rows are the lanes
    for_each_tile(1, p.classes, p.rows(), [&](int64_t, int64_t i0, int64_t lanes) {
      backward_tile<scalar_t, target_t, acc_t, kProbability, kSoftcap, true>(p, 0, i0, lanes, g, grad);
    });
    return;
  }
  for_each_tile(p.outer, p.classes, p.inner, [&](int64_t o, int64_t i0, int64_t lanes) {
    backward_tile<scalar_t, target_t, acc_t, kProbability, kSoftcap, false>(p, o, i0, lanes, g, grad);
  });
}

// The row schedule (long (N, C) rows) or the tile schedule, with or without soft-capping.
template <typename scalar_t, typename target_t, typename acc_t, bool kProbability>
void backward_problem(const RowProblem<scalar_t, target_t, acc_t>& p, const RowGrad<acc_t>& g, scalar_t* grad) {
  const bool rows = p.inner == 1 && p.classes > kShortRowClassesBackward;
  if (p.softcap > acc_t(0)) {
    rows ? backward_rows<scalar_t, target_t, acc_t, kProbability, true>(p, g, grad)
         : backward_tiles<scalar_t, target_t, acc_t, kProbability, true>(p, g, grad);
  } else {
    rows ? backward_rows<scalar_t, target_t, acc_t, kProbability, false>(p, g, grad)
         : backward_tiles<scalar_t, target_t, acc_t, kProbability, false>(p, g, grad);
  }
}

}  // namespace

at::Tensor backward_cpu(const BackwardInputs& grads, const PreparedInputs& in, const LossOptions& options) {
  const ProblemLayout& layout = in.layout;
  at::Tensor grad = at::empty(in.input.sizes(), in.input.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad.numel() == 0) return grad;
  advise_huge_pages(grad);

  dispatch_logits_dtype(in.input.scalar_type(), [&](auto* scalar_tag) {
    using scalar_t = std::remove_pointer_t<decltype(scalar_tag)>;
    using acc_t = acc_type<scalar_t>;
    scalar_t* grad_data = mutable_data_as<scalar_t>(grad);
    RowGrad<acc_t> g{data_as<acc_t>(grads.grad_loss),
                     acc_t(1),
                     options.reduction == kReductionNone,
                     grads.grad_lse.defined() ? data_as<acc_t>(grads.grad_lse) : nullptr,
                     data_as<acc_t>(grads.lse),
                     layout.probability_target ? data_as<acc_t>(grads.target_mass) : nullptr};
    if (layout.probability_target) {
      if (options.reduction == kReductionMean) g.scale = acc_t(1) / static_cast<acc_t>(layout.rows());
      dispatch_target_dtype<scalar_t>(in.target, in.input.scalar_type(), [&](auto* target_tag) {
        using target_t = std::remove_pointer_t<decltype(target_tag)>;
        backward_problem<scalar_t, target_t, acc_t, true>(make_row_problem<scalar_t, target_t, acc_t>(in, options), g,
                                                          grad_data);
      });
      return;
    }
    const auto p = make_row_problem<scalar_t, int64_t, acc_t>(in, options);
    check_class_indices(p.target, p.rows(), p.classes, p.ignore_index);
    if (options.reduction == kReductionMean) {
      // All rows ignored: the denominator is 0, but no row uses the scale then.
      g.scale = acc_t(1) / class_index_mean_denominator(p.target, p.rows(), p.weight, p.ignore_index);
    }
    backward_problem<scalar_t, int64_t, acc_t, false>(p, g, grad_data);
  });
  return grad;
}

}  // namespace labelsmooth::cpu::LS_CPU_ISA
