// One way to launch a kernel, for nvcc and for the host compiler of the emulated test suite.
//
// Under nvcc this is the `<<<grid, block, 0, stream>>>` launch followed by cudaGetLastError(). The
// emulated CUDA suite (tests/cuda_emulation) compiles the unmodified kernel files with a host C++
// compiler, which cannot parse `<<<...>>>`; there (LS_CUDA_EMULATION) the same call runs the grid on
// CPU threads through the emulator. Keeping the kernel as a template argument lets the emulator name
// the kernel in its reports.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace labelsmooth {
namespace cuda {

template <auto kKernel, typename... Args>
cudaError_t launch_kernel(dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
#if defined(LS_CUDA_EMULATION)
  return ls_emulation::launch<kKernel>(grid, block, stream, std::forward<Args>(args)...);
#else
  kKernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

}  // namespace cuda
}  // namespace labelsmooth
