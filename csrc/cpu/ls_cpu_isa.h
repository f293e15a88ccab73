// Which instruction-set copy of the CPU kernels runs.
//
// The kernels are compiled several times (ls_isa_<name>.cpp): for AVX-512 (x86-64-v4), for AVX2 + FMA +
// F16C (x86-64-v3) and for the baseline (SSE2 on x86-64). By default the best one the CPU supports
// runs. LABELSMOOTH_CPU_ISA=avx512|avx2|baseline (read at the first call) or set_active_isa() force
// one, so that every path can be tested and benchmarked on one machine. Asking for a path this CPU (or
// this build) cannot run is an error naming what it supports, never a silent fallback.
#pragma once

#include <string>
#include <vector>

// The x86 copies need GCC's `#pragma GCC target`; other compilers and CPUs get the baseline copy only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LS_CPU_X86_VARIANTS 1
#else
#define LS_CPU_X86_VARIANTS 0
#endif

namespace labelsmooth::cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

constexpr const char* kIsaEnvironmentVariable = "LABELSMOOTH_CPU_ISA";

const char* isa_name(Isa isa);

// The copies this build has and this CPU can run, best first (the baseline is always there).
std::vector<Isa> supported_isas();

// The copy the ops run: the one forced by set_active_isa() or LABELSMOOTH_CPU_ISA, else the best
// supported. Raises c10::ValueError when the variable names an unknown or unsupported copy.
Isa active_isa();

// Forces a copy by name ("avx512", "avx2", "baseline"; "auto" for the best supported), for every
// later call in the process. Raises c10::ValueError for an unknown or unsupported name.
void set_active_isa(const std::string& name);

}  // namespace labelsmooth::cpu
