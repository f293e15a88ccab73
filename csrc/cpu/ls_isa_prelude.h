// What the per-instruction-set kernels use from outside themselves, included by each ls_isa_<name>.cpp
// before its `#pragma GCC target`: ATen, the standard library and the shared helpers are then compiled
// for the baseline only (an inline function compiled for AVX2 in one file and for the baseline in
// another would be one symbol to the linker, which might keep the AVX2 one for a baseline CPU).
// ls_isa_kernels.h must include nothing that is not already included here.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // the AVX2 copy's bf16 conversions (ls_lanes.h)
#endif

#include "cpu/ls_cpu_common.h"
#include "cpu/ls_cpu_kernels.h"
#include "cpu/ls_simd.h"
#include "kernels/ls_row_math.h"
#include "ls_op_common.h"
