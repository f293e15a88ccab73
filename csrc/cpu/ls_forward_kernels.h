// CPU forward: per-row lse and loss, then the reduction. Compiled once per instruction set (see
// ls_isa_kernels.h), so everything here lives in namespace labelsmooth::cpu::LS_CPU_ISA.
//
// Every row is cut into the same chunks and their results merged in the same order whichever thread
// computes them: same bits for any thread count.
#pragma once

namespace labelsmooth::cpu::LS_CPU_ISA {
namespace {

// Summary of logits [begin, begin + n) of row r: max and sum of exp, and the target-dependent sums.
// Never inlined: the whole-row and the split-row schedules must run the very same machine code on a
// chunk (an inlined copy may be vectorized differently), or results would depend on the thread count.
// Where the forward writes each row's results. mass: sum_c w_c t'_c (probability targets only).
template <typename acc_t>
struct RowOutputs {
  acc_t* lse;
  acc_t* loss;
  acc_t* mass;
};

// Logit c of a row as the loss reads it (capped when kSoftcap).
template <bool kSoftcap, typename scalar_t, typename target_t, typename acc_t>
LS_INLINE acc_t row_logit(const RowProblem<scalar_t, target_t, acc_t>& p, const scalar_t* row, int64_t c) {
  return read_logit<kSoftcap>(acc_t(load_as_acc(row[c])), p.softcap, p.inverse_softcap);
}

// The chunk's sums over logits z (of any storage type; the capped ones come as acc_t).
template <typename scalar_t, typename target_t, typename acc_t, bool kProbability, typename logit_t>
LS_INLINE ChunkPartial<acc_t> chunk_partial(const RowProblem<scalar_t, target_t, acc_t>& p, int64_t r, int64_t begin,
                                            int64_t n, const logit_t* z, acc_t pivot) {
  const acc_t* w = p.weight == nullptr ? nullptr : p.weight + begin;
  const scalar_t* next = p.row_logits(r, 0) + begin + n;
  ChunkPartial<acc_t> partial{};
  acc_t m;
  if constexpr (kProbability) {
    chunk_target_sums<logit_t, target_t, acc_t>(z, p.row_target(r, 0) + begin, w, n, pivot, p.eps, p.classes, &m,
                                                &partial.mass, &partial.shifted_sum);
  } else {
    chunk_max_and_shifted_sum<logit_t, acc_t>(z, w, n, pivot, &m, &partial.shifted_sum);
  }
  partial.softmax = SoftmaxState<acc_t>{m, chunk_sum_exp<logit_t, acc_t>(z, n, m, next)};
  return partial;
}

template <typename scalar_t, typename target_t, typename acc_t, bool kProbability, bool kSoftcap>
__attribute__((noinline)) ChunkPartial<acc_t> row_chunk_partial(const RowProblem<scalar_t, target_t, acc_t>& p,
                                                                int64_t r, int64_t begin, int64_t n) {
  const scalar_t* row = p.row_logits(r, 0);
  // The pivot is a capped logit too: capped logits lie in [-softcap, softcap], a raw one may lie far outside.
  const acc_t pivot = row_pivot(row_logit<kSoftcap>(p, row, 0));
  if constexpr (kSoftcap) {
    acc_t capped[kChunkElements];  // 32 KiB (fp32): both passes read it from cache, each tanh is computed once
    chunk_capped_logits<scalar_t, acc_t>(row + begin, n, p.softcap, p.inverse_softcap, capped);
    return chunk_partial<scalar_t, target_t, acc_t, kProbability>(p, r, begin, n, capped, pivot);
  } else {
    return chunk_partial<scalar_t, target_t, acc_t, kProbability>(p, r, begin, n, row + begin, pivot);
  }
}

template <typename scalar_t, typename target_t, typename acc_t, bool kProbability, bool kSoftcap>
LS_INLINE void finish_row(const RowProblem<scalar_t, target_t, acc_t>& p, int64_t r, const ChunkPartial<acc_t>& merged,
                          RowOutputs<acc_t> out) {
  const scalar_t* row = p.row_logits(r, 0);
  const acc_t pivot = row_pivot(row_logit<kSoftcap>(p, row, 0));
  const acc_t lse = softmax_state_lse(merged.softmax);
  out.lse[r] = lse;
  if constexpr (kProbability) {
    out.loss[r] = probability_row_loss(lse, merged.mass, merged.shifted_sum, pivot);
    out.mass[r] = merged.mass;
  } else {
    const int64_t y = p.target[r];
    const acc_t w_y = p.weight == nullptr ? acc_t(1) : p.weight[y];
    out.loss[r] = class_index_loss_of_row(p, lse, row_logit<kSoftcap>(p, row, y), w_y, merged.shifted_sum, pivot);
  }
}

LS_INLINE int64_t chunk_length(int64_t classes, int64_t chunk) {
  return std::min(kChunkElements, classes - chunk * kChunkElements);
}

// Whole rows [begin, end), one thread: every chunk of a row, merged in chunk order.
template <typename scalar_t, typename target_t, typename acc_t, bool kProbability, bool kSoftcap>
void forward_row_range(const RowProblem<scalar_t, target_t, acc_t>& p, int64_t begin, int64_t end,
                       RowOutputs<acc_t> out) {
  const int64_t chunks = ceil_div(p.classes, kChunkElements);
  for (int64_t r = begin; r < end; ++r) {
    if (!row_is_active<scalar_t, target_t, acc_t, kProbability>(p, r)) continue;
    auto merged =
        row_chunk_partial<scalar_t, target_t, acc_t, kProbability, kSoftcap>(p, r, 0, chunk_length(p.classes, 0));
    for (int64_t c = 1; c < chunks; ++c) {
      merged = merge_chunk_partials(merged, row_chunk_partial<scalar_t, target_t, acc_t, kProbability, kSoftcap>(
                                                p, r, c * kChunkElements, chunk_length(p.classes, c)));
    }
    finish_row<scalar_t, target_t, acc_t, kProbability, kSoftcap>(p, r, merged, out);
  }
}

// Chunk tasks [begin, end) of the split-row schedule (task = row * chunks + chunk).
template <typename scalar_t, typename target_t, typename acc_t, bool kProbability, bool kSoftcap>
void forward_chunk_range(const RowProblem<scalar_t, target_t, acc_t>& p, int64_t begin, int64_t end,
                         ChunkPartial<acc_t>* partials) {
  const int64_t chunks = ceil_div(p.classes, kChunkElements);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t r = task / chunks, c = task % chunks;
    if (!row_is_active<scalar_t, target_t, acc_t, kProbability>(p, r)) continue;
    partials[task] = row_chunk_partial<scalar_t, target_t, acc_t, kProbability, kSoftcap>(
        p, r, c * kChunkElements, chunk_length(p.classes, c));
  }
}

// (N, C) layout. Threads take whole rows; when rows are fewer than threads and long, they take chunks
// of rows instead, and each row's chunk results are merged afterwards in the same order as above.
template <typename scalar_t, typename target_t, typename acc_t, bool kProbability, bool kSoftcap>
void forward_rows(const RowProblem<scalar_t, target_t, acc_t>& p, RowOutputs<acc_t> out) {
  const int64_t chunks = ceil_div(p.classes, kChunkElements);
  if (chunks > 1 && p.rows() < at::get_num_threads()) {
    std::vector<ChunkPartial<acc_t>> partials(p.rows() * chunks);
    at::parallel_for(0, p.rows() * chunks, 1, [&](int64_t begin, int64_t end) {
      forward_chunk_range<scalar_t, target_t, acc_t, kProbability, kSoftcap>(p, begin, end, partials.data());
    });
    for (int64_t r = 0; r < p.rows(); ++r) {
      if (!row_is_active<scalar_t, target_t, acc_t, kProbability>(p, r)) continue;
      ChunkPartial<acc_t> merged = partials[r * chunks];
      for (int64_t c = 1; c < chunks; ++c) merged = merge_chunk_partials(merged, partials[r * chunks + c]);
      finish_row<scalar_t, target_t, acc_t, kProbability, kSoftcap>(p, r, merged, out);
    }
    return;
  }
  at::parallel_for(0, p.rows(), row_grain(p.classes), [&](int64_t begin, int64_t end) {
    forward_row_range<scalar_t, target_t, acc_t, kProbability, kSoftcap>(p, begin, end, out);
  });
}

// One tile of `lanes` rows, read class by class with the lanes side by side, so that the loops run
// across rows: (N, C, d1, ...) layout (kRowLanes false): rows i0 .. i0 + lanes - 1 of outer index o,
// adjacent in memory, so every load is contiguous; short (N, C) rows (kRowLanes true): rows
// i0 .. i0 + lanes - 1, where per-row loops of a few classes would be all prologue and epilogue, first
// copied class-major into a local tile (stage_row_tile) so that loads are contiguous too. Two passes (max
// and sums, then sum of exp) over a tile that stays in cache; with soft-capping, each pass caps the logits
// it reads.
template <typename scalar_t, typename target_t, typename acc_t, bool kProbability, bool kSoftcap, bool kRowLanes>
void forward_tile(const RowProblem<scalar_t, target_t, acc_t>& p, int64_t o, int64_t i0, int64_t lanes,
                  RowOutputs<acc_t> out) {
  TileAddressing at = tile_addressing<kRowLanes>(p, o, i0);
  const scalar_t* base = p.logits + at.logits_base;
  const target_t* target_base = p.target + at.target_base;
  scalar_t staged[kRowLanes ? kShortRowClassesForward * kTileLanes : 1];
  if constexpr (kRowLanes) {  // rows of at most kShortRowClassesForward classes (forward_problem)
    base = stage_row_tile(base, at.logits_lane, p.classes, lanes, staged);
    at.logits_class = kTileLanes;
    at.logits_lane = 1;
  }
  acc_t pivot[kTileLanes], m[kTileLanes], s[kTileLanes], shifted[kTileLanes], mass[kTileLanes];
  for (int64_t l = 0; l < lanes; ++l) {
    pivot[l] = row_pivot(row_logit<kSoftcap>(p, base + l * at.logits_lane, 0));
    m[l] = -INFINITY;
    s[l] = shifted[l] = mass[l] = acc_t(0);
  }
  for (int64_t c = 0; c < p.classes; ++c) {
    const scalar_t* zc = base + c * at.logits_class;
    const acc_t w_c = p.weight == nullptr ? acc_t(1) : p.weight[c];
#pragma omp simd
    for (int64_t l = 0; l < lanes; ++l) {
      const acc_t x = row_logit<kSoftcap>(p, zc, l * at.logits_lane);
      m[l] = x > m[l] ? x : m[l];
      if constexpr (kProbability) {
        const acc_t t = load_as_acc(target_base[c * at.target_class + l * at.target_lane]);
        const acc_t tw = w_c * smoothed_probability(t, p.eps, p.classes);
        mass[l] += tw;
        shifted[l] += tw * (x - pivot[l]);
      } else {
        shifted[l] += w_c * (x - pivot[l]);
      }
    }
  }
  // A row of only -inf logits is shifted by 0 instead of its max: its exps are then exp(-inf) = 0, where
  // exp(-inf - -inf) would be NaN, without a select in the loop over every logit.
  acc_t shift[kTileLanes];
  for (int64_t l = 0; l < lanes; ++l) shift[l] = m[l] == -INFINITY ? acc_t(0) : m[l];
  for (int64_t c = 0; c < p.classes; ++c) {
    const scalar_t* zc = base + c * at.logits_class;
#pragma omp simd
    for (int64_t l = 0; l < lanes; ++l) {
      s[l] += exp_vectorizable(row_logit<kSoftcap>(p, zc, l * at.logits_lane) - shift[l]);
    }
  }
  // lse = max + log(sum), as softmax_state_lse, with a log that vectorizes across the lanes (an all -inf
  // row keeps lse = -inf).
  acc_t lse[kTileLanes];
#pragma omp simd
  for (int64_t l = 0; l < lanes; ++l) lse[l] = m[l] == -INFINITY ? m[l] : m[l] + log_at_least_one(s[l]);
  acc_t* row_lse = out.lse + at.first_row;
  acc_t* row_loss = out.loss + at.first_row;
  if constexpr (kProbability) {
    acc_t* row_mass = out.mass + at.first_row;
#pragma omp simd
    for (int64_t l = 0; l < lanes; ++l) {
      row_lse[l] = lse[l];
      row_loss[l] = probability_row_loss(lse[l], mass[l], shifted[l], pivot[l]);
      row_mass[l] = mass[l];
    }
  } else {
    // The target's logit and weight of each row (those of class 0 in ignored rows, so that every lane
    // reads something), then the loss of every lane at once: its double-precision formula costs as much
    // as the rest of a tile of few classes when computed one row at a time. Ignored rows get 0.
    // (As in backward_tile, whether there are weights is asked once, not for each lane.)
    acc_t z_target[kTileLanes], w_target[kTileLanes], active[kTileLanes];  // active: 1, or 0 where ignored
    int64_t safe_target[kTileLanes];
    const int64_t* target = p.target + at.first_row;
    const int64_t ignore_index = p.ignore_index;
    for (int64_t l = 0; l < lanes; ++l) {
      active[l] = target[l] != ignore_index ? acc_t(1) : acc_t(0);
      safe_target[l] = target[l] != ignore_index ? target[l] : 0;
    }
    for (int64_t l = 0; l < lanes; ++l) {
      z_target[l] = row_logit<kSoftcap>(p, base + l * at.logits_lane, safe_target[l] * at.logits_class);
    }
    if (p.weight == nullptr) {
      for (int64_t l = 0; l < lanes; ++l) w_target[l] = acc_t(1);
    } else {
      for (int64_t l = 0; l < lanes; ++l) w_target[l] = p.weight[safe_target[l]];
    }
#pragma omp simd
    for (int64_t l = 0; l < lanes; ++l) {
      const acc_t loss = class_index_loss_of_row(p, lse[l], z_target[l], w_target[l], shifted[l], pivot[l]);
      row_lse[l] = active[l] != acc_t(0) ? lse[l] : acc_t(0);
      row_loss[l] = active[l] != acc_t(0) ? loss : acc_t(0);
    }
  }
}

template <typename scalar_t, typename target_t, typename acc_t, bool kProbability, bool kSoftcap>
void forward_tiles(const RowProblem<scalar_t, target_t, acc_t>& p, RowOutputs<acc_t> out) {
  if (p.inner == 1) {  // short (N, C) rows: the rows are the lanes
    for_each_tile(1, p.classes, p.rows(), [&](int64_t, int64_t i0, int64_t lanes) {
      forward_tile<scalar_t, target_t, acc_t, kProbability, kSoftcap, true>(p, 0, i0, lanes, out);
    });
    return;
  }
  for_each_tile(p.outer, p.classes, p.inner, [&](int64_t o, int64_t i0, int64_t lanes) {
    forward_tile<scalar_t, target_t, acc_t, kProbability, kSoftcap, false>(p, o, i0, lanes, out);
  });
}

// The row schedule (long (N, C) rows) or the tile schedule, with or without soft-capping.
template <typename scalar_t, typename target_t, typename acc_t, bool kProbability>
void forward_problem(const RowProblem<scalar_t, target_t, acc_t>& p, RowOutputs<acc_t> out) {
  const bool rows = p.inner == 1 && p.classes > kShortRowClassesForward;
  if (p.softcap > acc_t(0)) {
    rows ? forward_rows<scalar_t, target_t, acc_t, kProbability, true>(p, out)
         : forward_tiles<scalar_t, target_t, acc_t, kProbability, true>(p, out);
  } else {
    rows ? forward_rows<scalar_t, target_t, acc_t, kProbability, false>(p, out)
         : forward_tiles<scalar_t, target_t, acc_t, kProbability, false>(p, out);
  }
}

template <typename acc_t>
acc_t sum_in_fixed_order(const acc_t* values, int64_t n) {
  return static_cast<acc_t>(interleaved_sum(n, [&](int64_t i) { return static_cast<double>(values[i]); }));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const PreparedInputs& in, const LossOptions& options) {
  const ProblemLayout& layout = in.layout;
  const auto acc_dtype = accumulation_dtype(in.input.scalar_type());
  const auto tensor_options = in.input.options().dtype(acc_dtype);
  // Ignored rows are never read: their lse and loss stay 0.
  at::Tensor lse = at::zeros(layout.row_shape, tensor_options);
  at::Tensor row_loss = at::zeros(layout.row_shape, tensor_options);
  // The backward of probability targets reads each row's sum_c w_c t'_c from here instead of summing again.
  at::Tensor target_mass =
      layout.probability_target ? at::zeros(layout.row_shape, tensor_options) : at::empty({0}, tensor_options);
  at::Tensor denominator;

  dispatch_logits_dtype(in.input.scalar_type(), [&](auto* scalar_tag) {
    using scalar_t = std::remove_pointer_t<decltype(scalar_tag)>;
    using acc_t = acc_type<scalar_t>;
    const RowOutputs<acc_t> out{mutable_data_as<acc_t>(lse), mutable_data_as<acc_t>(row_loss),
                                layout.probability_target ? mutable_data_as<acc_t>(target_mass) : nullptr};
    if (layout.probability_target) {
      dispatch_target_dtype<scalar_t>(in.target, in.input.scalar_type(), [&](auto* target_tag) {
        using target_t = std::remove_pointer_t<decltype(target_tag)>;
        forward_problem<scalar_t, target_t, acc_t, true>(make_row_problem<scalar_t, target_t, acc_t>(in, options),
                                                         out);
      });
      denominator = at::scalar_tensor(static_cast<double>(layout.rows()), tensor_options);
      return;
    }
    const auto p = make_row_problem<scalar_t, int64_t, acc_t>(in, options);
    check_class_indices(p.target, p.rows(), p.classes, p.ignore_index);
    // With no classes every row is ignored (the check above allows nothing else): nothing to read.
    if (p.classes > 0) forward_problem<scalar_t, int64_t, acc_t, false>(p, out);
    if (options.reduction == kReductionMean) {
      denominator = at::scalar_tensor(class_index_mean_denominator(p.target, p.rows(), p.weight, p.ignore_index),
                                      tensor_options);
    }
  });

  if (options.reduction == kReductionNone) return {row_loss, lse, target_mass};
  at::Tensor total = at::empty({}, tensor_options);
  dispatch_logits_dtype(in.input.scalar_type(), [&](auto* scalar_tag) {
    using acc_t = acc_type<std::remove_pointer_t<decltype(scalar_tag)>>;
    total.fill_(sum_in_fixed_order(row_loss.const_data_ptr<acc_t>(), row_loss.numel()));
  });
  if (options.reduction == kReductionMean) total = total / denominator;
  return {total, lse, target_mass};
}

}  // namespace labelsmooth::cpu::LS_CPU_ISA
