// The CPU kernels of one instruction set. Each ls_isa_<name>.cpp includes ls_isa_prelude.h, then this
// file between a `#pragma GCC target` for its instruction set and the matching pop, with LS_CPU_ISA
// naming it. Everything defined here is compiled for that instruction set and lives in namespace
// labelsmooth::cpu::LS_CPU_ISA, so the copies never share a symbol; the baseline helpers of the prelude
// are inlined into each copy and take its instruction set there.
#ifndef LS_CPU_ISA
#error "define LS_CPU_ISA (the instruction set's namespace) before including ls_isa_kernels.h"
#endif

#include "cpu/ls_chunk_kernels.h"
#include "cpu/ls_tile_transpose.h"
#include "cpu/ls_forward_kernels.h"
#include "cpu/ls_backward_kernels.h"

namespace labelsmooth::cpu::LS_CPU_ISA {

extern const IsaKernels kernels;
const IsaKernels kernels{&forward_cpu, &backward_cpu};

}  // namespace labelsmooth::cpu::LS_CPU_ISA
