// The CPU kernels for the baseline instruction set (SSE2 on x86-64): what any CPU runs.
#include "cpu/ls_isa_prelude.h"

#define LS_CPU_ISA baseline
#define LS_CPU_FMA 0
#define LS_CPU_VECTOR_BYTES 16
#include "cpu/ls_isa_kernels.h"
