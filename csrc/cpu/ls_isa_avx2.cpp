// The CPU kernels for x86-64-v3: AVX2, FMA, F16C (and BMI, BMI2, POPCNT).
// -ffp-contract=off (setup.py) keeps the compiler from fusing multiply-adds, so FMA changes no result.
#include "cpu/ls_isa_prelude.h"

#if LS_CPU_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#define LS_CPU_ISA avx2
#define LS_CPU_VECTOR_BYTES 32
#include "cpu/ls_isa_kernels.h"
#pragma GCC pop_options
#endif
