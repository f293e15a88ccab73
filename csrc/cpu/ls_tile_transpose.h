// Copies between short (N, C) rows and the class-major local tiles the tile kernels work on (kTileLanes
// lanes per class). Element by element, such a copy costs one load and one store per logit, as much as
// a tile pass of few classes; blocks of 8 rows x 8 classes go through registers instead (8 vector loads,
// 24 shuffles, 8 vector stores). Moves bits only, so the results are those of the element copy on every
// instruction set. Part of the per-instruction-set kernels (ls_isa_kernels.h).
#pragma once

namespace labelsmooth::cpu::LS_CPU_ISA {

constexpr int64_t kTransposeBlock = 8;

// The bits of 8 elements of a 2- or 4-byte storage type, as one vector.
template <typename scalar_t>
struct TransposeVector {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint16_t>;
  typedef bits_t type __attribute__((vector_size(kTransposeBlock * sizeof(scalar_t))));
};

// Blocks are used for 2- and 4-byte elements (fp32, bf16, fp16) and rows of at least a block of classes:
// shorter rows would make a block read past the end of the last row.
template <typename scalar_t>
constexpr bool kTransposesInBlocks = sizeof(scalar_t) == 2 || sizeof(scalar_t) == 4;

// v[i] element j -> v[j] element i. The classic three steps: interleave pairs of vectors, then pairs of
// pairs within each half, then swap halves.
template <typename V>
LS_INLINE void transpose_block(V v[kTransposeBlock]) {
  using M = decltype(v[0] - v[0]);
  V t[kTransposeBlock];
  for (int i = 0; i < kTransposeBlock; i += 2) {
    t[i] = __builtin_shuffle(v[i], v[i + 1], M{0, 8, 1, 9, 4, 12, 5, 13});
    t[i + 1] = __builtin_shuffle(v[i], v[i + 1], M{2, 10, 3, 11, 6, 14, 7, 15});
  }
  V u[kTransposeBlock];
  for (int i = 0; i < kTransposeBlock; i += 4) {
    u[i] = __builtin_shuffle(t[i], t[i + 2], M{0, 1, 8, 9, 4, 5, 12, 13});
    u[i + 1] = __builtin_shuffle(t[i], t[i + 2], M{2, 3, 10, 11, 6, 7, 14, 15});
    u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], M{0, 1, 8, 9, 4, 5, 12, 13});
    u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], M{2, 3, 10, 11, 6, 7, 14, 15});
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = __builtin_shuffle(u[i], u[i + 4], M{0, 1, 2, 3, 8, 9, 10, 11});
    v[i + 4] = __builtin_shuffle(u[i], u[i + 4], M{4, 5, 6, 7, 12, 13, 14, 15});
  }
}

// Where element (lane l, class c) of a tile lives in the rows (row_stride apart) and in the class-major tile.
LS_INLINE int64_t row_offset(int64_t row_stride, int64_t l, int64_t c) { return l * row_stride + c; }
LS_INLINE int64_t tile_offset(int64_t l, int64_t c) { return c * kTileLanes + l; }

// Copies `lanes` rows of `classes` elements from `from` to `to`: rows (row_stride apart) to a class-major
// tile when kToTile, the reverse otherwise. Whole blocks of 8 rows go through transpose_block, the last
// block of classes overlapping the one before it where the classes are not a multiple of 8 (it copies
// some elements twice, the same bits both times); the rows left over are copied element by element.
template <bool kToTile, typename scalar_t>
LS_INLINE void copy_row_tile(const scalar_t* from, scalar_t* to, int64_t row_stride, int64_t classes, int64_t lanes) {
  const auto from_offset = [&](int64_t l, int64_t c) {
    return kToTile ? row_offset(row_stride, l, c) : tile_offset(l, c);
  };
  const auto to_offset = [&](int64_t l, int64_t c) {
    return kToTile ? tile_offset(l, c) : row_offset(row_stride, l, c);
  };
  int64_t l0 = 0;
  if (kTransposesInBlocks<scalar_t> && classes >= kTransposeBlock) {
    using V = typename TransposeVector<scalar_t>::type;
    for (; l0 + kTransposeBlock <= lanes; l0 += kTransposeBlock) {
      for (int64_t c0 = 0; c0 < classes; c0 += kTransposeBlock) {
        const int64_t c = std::min(c0, classes - kTransposeBlock);
        // Vector i holds row l0 + i (from rows) or class c + i (from a tile); after the transpose, the other.
        // Unrolled, so that the block stays in registers: as a loop, GCC copies it through the stack in
        // 16-byte halves, and each 32-byte read of such a copy waits for both halves to be written.
        V v[kTransposeBlock];
#pragma GCC unroll 8
        for (int64_t i = 0; i < kTransposeBlock; ++i) {
          std::memcpy(&v[i], from + (kToTile ? from_offset(l0 + i, c) : from_offset(l0, c + i)), sizeof(V));
        }
        transpose_block(v);
#pragma GCC unroll 8
        for (int64_t i = 0; i < kTransposeBlock; ++i) {
          std::memcpy(to + (kToTile ? to_offset(l0, c + i) : to_offset(l0 + i, c)), &v[i], sizeof(V));
        }
      }
    }
  }
  for (int64_t l = l0; l < lanes; ++l) {
    for (int64_t c = 0; c < classes; ++c) to[to_offset(l, c)] = from[from_offset(l, c)];
  }
}

// A tile of short (N, C) rows (`lanes` rows of `classes` logits, row_stride apart) copied into `staged`
// class by class, kTileLanes apart: the tile's passes then load one class of every row as one contiguous
// vector instead of gathering it element by element, once per pass. Returns the copy.
template <typename scalar_t>
LS_INLINE const scalar_t* stage_row_tile(const scalar_t* rows, int64_t row_stride, int64_t classes, int64_t lanes,
                                         scalar_t* staged) {
  copy_row_tile<true>(rows, staged, row_stride, classes, lanes);
  return staged;
}

// The reverse: a class-major tile written out to `lanes` rows of `classes` elements, row_stride apart.
template <typename scalar_t>
LS_INLINE void unstage_row_tile(const scalar_t* staged, int64_t classes, int64_t lanes, scalar_t* rows,
                                int64_t row_stride) {
  copy_row_tile<false>(staged, rows, row_stride, classes, lanes);
}

}  // namespace labelsmooth::cpu::LS_CPU_ISA
