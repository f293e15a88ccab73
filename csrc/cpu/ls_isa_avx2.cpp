// The CPU kernels for x86-64-v3: AVX2, FMA, F16C (and BMI, BMI2, POPCNT).
// -ffp-contract=off (setup.py) keeps the compiler from fusing multiply-adds on its own: only the ones that
// ls_lanes.h asks for are fused (LS_CPU_FMA), the same ones as in the AVX-512 copy.
#include "cpu/ls_isa_prelude.h"

#if LS_CPU_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#define LS_CPU_ISA avx2
#define LS_CPU_FMA 1
#define LS_CPU_VECTOR_BYTES 32
#include "cpu/ls_isa_kernels.h"
#pragma GCC pop_options
#endif
