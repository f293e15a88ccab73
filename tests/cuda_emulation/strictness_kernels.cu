// Small kernels that break the CUDA execution model on purpose, and the fp16/bf16 conversions, for
// test_emulated_strictness.py: the emulator must stop each violation with the kernel's name instead of
// hanging or carrying on.
//
//   strictness_kernels SCENARIO            runs one kernel (see main)
//   strictness_kernels convert IN OUT      float32 values in IN -> their fp16 and bf16 bits in OUT
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/ls_launch.cuh"

namespace {

__global__ void lanes_skip_a_shuffle(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 32 >= 16) return;  // half of each warp exits before the full-mask shuffle
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void barrier_inside_a_shuffle_branch(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 32 == 0) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

__global__ void two_different_barriers(float* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void barrier_while_a_thread_spins(volatile int* flag) {
  if (threadIdx.x == 0) {
    while (*flag == 0) {
    }
  }
  __syncthreads();
}

// The correct uses of the same primitives: they must pass.
__global__ void butterfly_and_barriers(float* out) {
  __shared__ float partial[4];
  float v = float(threadIdx.x);
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = partial[0] + partial[1] + partial[2] + partial[3];
  if (threadIdx.x >= 64) return;  // exited threads do not hold up later barriers
  __syncthreads();
  if (threadIdx.x == 0) out[1] = out[0];
}

__global__ void failing_assert(float* out) {
  if (threadIdx.x == 5) __assert_fail("threadIdx.x != 5", __FILE__, __LINE__, __func__);
  out[threadIdx.x] = 1.0f;
}

int convert(const char* in_path, const char* out_path) {
  FILE* in = std::fopen(in_path, "rb");
  std::vector<float> values;
  float f;
  while (in != nullptr && std::fread(&f, sizeof f, 1, in) == 1) values.push_back(f);
  if (in != nullptr) std::fclose(in);
  FILE* out = std::fopen(out_path, "wb");
  if (out == nullptr) return 2;
  for (const float v : values) {
    const uint16_t bits[2] = {__float2half_rn(v).bits, __float2bfloat16_rn(v).bits};
    const float back[2] = {__half2float(__half{bits[0]}), __bfloat162float(__nv_bfloat16{bits[1]})};
    std::fwrite(bits, sizeof bits, 1, out);
    std::fwrite(back, sizeof back, 1, out);
  }
  std::fclose(out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  using labelsmooth::cuda::launch_kernel;
  const std::string scenario = argc > 1 ? argv[1] : "";
  if (scenario == "convert" && argc == 4) return convert(argv[2], argv[3]);
  static float out[128];
  static volatile int flag = 0;
  cudaError_t status = cudaErrorInvalidValue;
  if (scenario == "lanes_skip_a_shuffle") status = launch_kernel<lanes_skip_a_shuffle>(1, 128, nullptr, out);
  if (scenario == "barrier_inside_a_shuffle_branch") {
    status = launch_kernel<barrier_inside_a_shuffle_branch>(1, 128, nullptr, out);
  }
  if (scenario == "two_different_barriers") status = launch_kernel<two_different_barriers>(1, 128, nullptr, out);
  if (scenario == "barrier_while_a_thread_spins") {
    status = launch_kernel<barrier_while_a_thread_spins>(1, 64, nullptr, &flag);
  }
  if (scenario == "butterfly_and_barriers") {
    status = launch_kernel<butterfly_and_barriers>(2, 128, nullptr, out);
    if (status == cudaSuccess && (out[0] != 8128.0f || out[1] != 8128.0f)) {
      std::fprintf(stderr, "wrong sums %g %g\n", out[0], out[1]);
      return 1;
    }
  }
  if (scenario == "failing_assert") status = launch_kernel<failing_assert>(1, 32, nullptr, out);
  std::printf("%s\n", cudaGetErrorString(status));
  return status == cudaSuccess ? 0 : 3;
}
