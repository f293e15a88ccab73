// Choosing the instruction-set copy of the CPU kernels (see ls_cpu_isa.h).
#include "cpu/ls_cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <sstream>

namespace labelsmooth::cpu {
namespace {

constexpr Isa kAllIsas[] = {Isa::kAvx512, Isa::kAvx2, Isa::kBaseline};

bool cpu_can_run(Isa isa) {
#if LS_CPU_X86_VARIANTS
  // The features the `#pragma GCC target` lines of ls_isa_avx2.cpp and ls_isa_avx512.cpp enable;
  // __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers.
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") &&
                  __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  switch (isa) {
    case Isa::kBaseline: return true;
    case Isa::kAvx2: return v3;
    case Isa::kAvx512:
      return v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512cd");
  }
  return false;
#else
  return isa == Isa::kBaseline;
#endif
}

std::string supported_names() {
  std::ostringstream names;
  for (Isa isa : supported_isas()) names << (names.tellp() > 0 ? ", " : "") << isa_name(isa);
  return names.str();
}

// `what` names where the request came from, for the error message.
Isa parse_isa(const std::string& name, const std::string& what) {
  if (name.empty() || name == "auto") return supported_isas().front();
  for (Isa isa : kAllIsas) {
    if (name != isa_name(isa)) continue;
    TORCH_CHECK_VALUE(cpu_can_run(isa), what, " asks for the ", name, " kernels, which ",
                      LS_CPU_X86_VARIANTS ? "this CPU cannot run" : "this build does not have",
                      "; supported here: ", supported_names(), " (or auto)");
    return isa;
  }
  TORCH_CHECK_VALUE(false, what, " is not a known instruction set: expected one of avx512, avx2, baseline or auto");
  return Isa::kBaseline;  // not reached
}

// -1 until chosen; an Isa value afterwards.
std::atomic<int> chosen_isa{-1};

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kBaseline: return "baseline";
  }
  return "unknown";
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> isas;
  for (Isa isa : kAllIsas) {
    if (cpu_can_run(isa)) isas.push_back(isa);
  }
  return isas;
}

Isa active_isa() {
  int chosen = chosen_isa.load(std::memory_order_relaxed);
  if (chosen < 0) {
    // A bad value raises on every call (nothing is stored), so it cannot go unnoticed.
    const char* requested = std::getenv(kIsaEnvironmentVariable);
    const std::string name = requested == nullptr ? "" : requested;
    chosen = static_cast<int>(parse_isa(name, std::string(kIsaEnvironmentVariable) + "=" + name));
    chosen_isa.store(chosen, std::memory_order_relaxed);
  }
  return static_cast<Isa>(chosen);
}

void set_active_isa(const std::string& name) {
  chosen_isa.store(static_cast<int>(parse_isa(name, "'" + name + "'")), std::memory_order_relaxed);
}

}  // namespace labelsmooth::cpu
