// Host driver of the emulated CUDA suite: runs the forward and backward launch functions of
// csrc/cuda/ls_cross_entropy_kernels.cuh on inputs written by the Python tests, as the CUDA op does.
//
//   driver DIR key=value...
//
// Keys: dtype (f32 f64 f16 bf16), target (index | probability), target_dtype (logits | accumulation, for
// probability targets), outer, classes, inner, outer_stride, offset (elements the logits start after a
// 16-byte boundary), ignore_index, eps, smoothing (0 uniform, 1 others: converted as the op does), softcap
// (0 none), reduction (0 none, 1 mean, 2 sum), weight (0/1), grad_lse (0/1), backward (0/1).
// Inputs in DIR: logits.bin (the logits' storage from their first element), target.bin (int64 class
// indices or probabilities), weight.bin, grad_loss.bin and grad_lse.bin (accumulation type). Outputs in
// DIR: loss.bin, lse.bin, target_mass.bin (probability targets), grad.bin and traffic.txt (per launch:
// "launch KERNEL", then "BUFFER READ WRITTEN" lines).
// Every buffer is allocated exactly, with guard bytes around it that the emulator treats as out of bounds.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cuda/ls_cross_entropy_kernels.cuh"
#include "emulator.h"
#include "kernels/ls_row_math.h"

namespace {

using labelsmooth::cuda::acc_type;
using labelsmooth::cuda::Problem;

// Wide enough that a read at a typical negative ignore_index (-100) lands in it.
constexpr size_t kGuardBytes = 4096;
constexpr int kLaunchFailed = 3;

std::map<std::string, std::string> args;
std::string dir;

int64_t int_arg(const char* key) {
  const auto it = args.find(key);
  if (it == args.end()) {
    std::fprintf(stderr, "driver: missing argument %s=...\n", key);
    std::exit(2);
  }
  return std::strtoll(it->second.c_str(), nullptr, 10);
}

std::vector<char> read_file(const std::string& name) {
  std::vector<char> bytes;
  FILE* f = std::fopen((dir + "/" + name).c_str(), "rb");
  if (f == nullptr) return bytes;
  char chunk[65536];
  size_t n;
  while ((n = std::fread(chunk, 1, sizeof chunk, f)) > 0) bytes.insert(bytes.end(), chunk, chunk + n);
  std::fclose(f);
  return bytes;
}

void write_file(const std::string& name, const void* data, size_t bytes) {
  FILE* f = std::fopen((dir + "/" + name).c_str(), "wb");
  if (f == nullptr || std::fwrite(data, 1, bytes, f) != bytes) {
    std::fprintf(stderr, "driver: cannot write %s\n", name.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

// A global buffer of exactly `bytes` bytes that starts `misalign` bytes after a 16-byte boundary.
struct Buffer {
  Buffer(const char* name, size_t bytes_, size_t misalign = 0) : bytes(bytes_) {
    storage.reset(static_cast<char*>(std::aligned_alloc(16, (2 * kGuardBytes + misalign + bytes + 15) / 16 * 16)));
    data = storage.get() + kGuardBytes + misalign;
    ls_emulation::register_buffer(name, data, bytes, kGuardBytes + misalign, kGuardBytes);
  }
  Buffer(const char* name, const std::vector<char>& contents, size_t misalign = 0)
      : Buffer(name, contents.size(), misalign) {
    if (bytes != 0) std::memcpy(data, contents.data(), bytes);
  }
  template <typename T>
  T* as() const {
    return bytes == 0 ? nullptr : reinterpret_cast<T*>(data);
  }
  ~Buffer() { ls_emulation::unregister_buffer(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> storage;
  char* data;
  size_t bytes;
};

void check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  std::fprintf(stderr, "driver: %s failed: %s\n", what, cudaGetErrorString(status));
  std::exit(kLaunchFailed);
}

template <typename T>
void run_problem(const Problem& p, bool probability, bool target_in_logits_type) {
  using acc_t = acc_type<T>;
  const int64_t rows = p.outer * p.inner;
  const bool backward = int_arg("backward") != 0;
  const bool reduce = p.reduction != 0;  // not reduction none
  const Buffer logits("logits", read_file("logits.bin"), size_t(int_arg("offset")) * sizeof(T));
  const Buffer target("target", read_file("target.bin"));
  const Buffer weight("weight", int_arg("weight") != 0 ? read_file("weight.bin") : std::vector<char>());
  const Buffer grad_loss("grad_loss", backward ? read_file("grad_loss.bin") : std::vector<char>());
  const Buffer grad_lse("grad_lse", backward && int_arg("grad_lse") != 0 ? read_file("grad_lse.bin")
                                                                          : std::vector<char>());
  const Buffer loss("loss", sizeof(acc_t) * (reduce ? 1 : rows));
  const Buffer lse("lse", sizeof(acc_t) * rows);
  const Buffer target_mass("target_mass", probability ? sizeof(acc_t) * rows : 0);
  const T* z = logits.as<T>();
  const acc_t* w = weight.as<acc_t>();

  if (probability) {
    const Buffer scratch("scratch", sizeof(acc_t) * labelsmooth::cuda::forward_scratch_elements(p, sizeof(T)));
    const auto forward = [&](auto* target_type) {
      using target_t = std::remove_pointer_t<decltype(target_type)>;
      check(labelsmooth::cuda::launch_forward_probability<T, target_t>(p, z, target.as<target_t>(), w,
                                                                         loss.as<acc_t>(), lse.as<acc_t>(),
                                                                         target_mass.as<acc_t>(),
                                                                         scratch.as<acc_t>(), nullptr),
            "forward");
    };
    target_in_logits_type ? forward(static_cast<T*>(nullptr)) : forward(static_cast<acc_t*>(nullptr));
  } else {
    const Buffer scratch("scratch", sizeof(acc_t) * labelsmooth::cuda::forward_scratch_elements(p, sizeof(T)));
    check(labelsmooth::cuda::launch_forward_class_index<T>(p, z, target.as<int64_t>(), w, loss.as<acc_t>(),
                                                           lse.as<acc_t>(), scratch.as<acc_t>(), nullptr),
          "forward");
  }
  write_file("loss.bin", loss.data, loss.bytes);
  write_file("lse.bin", lse.data, lse.bytes);
  write_file("target_mass.bin", target_mass.data, target_mass.bytes);
  if (!backward) return;

  const Buffer grad("grad", sizeof(T) * p.outer * p.classes * p.inner);
  if (probability) {
    const auto run = [&](auto* target_type) {
      using target_t = std::remove_pointer_t<decltype(target_type)>;
      check(labelsmooth::cuda::launch_backward_probability<T, target_t>(
                p, grad_loss.as<acc_t>(), grad_lse.as<acc_t>(), z, target.as<target_t>(), w, lse.as<acc_t>(),
                target_mass.as<acc_t>(), grad.as<T>(), nullptr),
            "backward");
    };
    target_in_logits_type ? run(static_cast<T*>(nullptr)) : run(static_cast<acc_t*>(nullptr));
  } else {
    const Buffer scratch("scratch", sizeof(acc_t) * labelsmooth::cuda::backward_class_index_scratch_elements(p));
    check(labelsmooth::cuda::launch_backward_class_index<T>(p, grad_loss.as<acc_t>(), grad_lse.as<acc_t>(), z,
                                                            target.as<int64_t>(), w, lse.as<acc_t>(), grad.as<T>(),
                                                            scratch.as<acc_t>(), nullptr),
          "backward");
  }
  write_file("grad.bin", grad.data, grad.bytes);
}

void write_traffic() {
  std::string text;
  for (const ls_emulation::LaunchTraffic& launch : ls_emulation::traffic()) {
    text += "launch " + launch.kernel + "\n";
    for (const ls_emulation::BufferTraffic& b : launch.buffers) {
      text += b.buffer + " " + std::to_string(b.read) + " " + std::to_string(b.written) + "\n";
    }
  }
  write_file("traffic.txt", text.data(), text.size());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s DIR key=value...\n", argv[0]);
    return 2;
  }
  dir = argv[1];
  for (int i = 2; i < argc; ++i) {
    const char* eq = std::strchr(argv[i], '=');
    if (eq == nullptr) {
      std::fprintf(stderr, "driver: argument %s is not key=value\n", argv[i]);
      return 2;
    }
    args[std::string(argv[i], size_t(eq - argv[i]))] = eq + 1;
  }
  Problem p;
  p.outer = int_arg("outer");
  p.classes = int_arg("classes");
  p.inner = int_arg("inner");
  p.outer_stride = int_arg("outer_stride");
  p.ignore_index = int_arg("ignore_index");
  p.eps = labelsmooth::uniform_smoothing(std::strtod(args["eps"].c_str(), nullptr), int_arg("smoothing"), p.classes);
  p.softcap = std::strtod(args["softcap"].c_str(), nullptr);
  p.reduction = int_arg("reduction");
  const bool probability = args["target"] == "probability";
  const bool target_in_logits_type = args["target_dtype"] == "logits";
  const std::string dtype = args["dtype"];
  if (dtype == "f32") {
    run_problem<float>(p, probability, target_in_logits_type);
  } else if (dtype == "f64") {
    run_problem<double>(p, probability, target_in_logits_type);
  } else if (dtype == "f16") {
    run_problem<__half>(p, probability, target_in_logits_type);
  } else if (dtype == "bf16") {
    run_problem<__nv_bfloat16>(p, probability, target_in_logits_type);
  } else {
    std::fprintf(stderr, "driver: unknown dtype '%s'\n", dtype.c_str());
    return 2;
  }
  write_traffic();
  return 0;
}
