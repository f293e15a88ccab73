// The CPU kernels for x86-64-v4: x86-64-v3 plus AVX-512 F, BW, CD, DQ, VL, with 512-bit vectors.
#include "cpu/ls_isa_prelude.h"

#if LS_CPU_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt,avx512f,avx512bw,avx512cd,avx512dq,avx512vl")
#pragma GCC target("prefer-vector-width=512")
#define LS_CPU_ISA avx512
#define LS_CPU_FMA 1
#define LS_CPU_VECTOR_BYTES 64
#include "cpu/ls_isa_kernels.h"
#pragma GCC pop_options
#endif
