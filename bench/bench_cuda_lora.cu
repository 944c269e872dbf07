// bench_cuda_lora — GPU timings of the CUDA backend (needs an NVIDIA GPU; builds without one).
//
// For each shape (M tokens, D = in = out features, LoRA rank r), in float (default) or with 16-bit storage
// (--dtype=bf16 | --dtype=half: fp32 accumulation), no bias, eval mode (no dropout):
//   cublas_ms        plain cuBLAS y = x Wᵀ on the same row-major buffers (own handle, default math): cublasSgemm,
//                    or cublasGemmEx with CUBLAS_COMPUTE_32F for 16-bit storage
//   base_ms          Linear<float, CudaBackend>::forward (the same GEMM through peft++)
//   base_eff         cublas_ms / base_ms                      (target ≥ 0.95)
//   lora_ms          Adapted<Linear<float, CudaBackend>, Lora>::forward with rank r
//   lora_over_base   lora_ms / base_ms                        (target ≤ 1.05 at M = 4096, D = 4096, r = 16)
//   base_fb_ms       base forward + backward (dx only: frozen weight)
//   lora_fb_ms       LoRA forward + backward (dx, dA, dB)
//   fb_over_base     lora_fb_ms / base_fb_ms
//   base_TFLOPs      2·M·D·D / base_ms
// Shapes: the CPU benchmark's (M = 32/512/2048, D = 256/1024/4096, r = 8/16) and M = 4096, D = 4096/8192,
// r = 16/64. Each time is the median of 7 means over `iters` launches after a warm-up, measured with CUDA
// events on the current stream. --tf32: float GEMMs on TF32 tensor cores, in peft++ (cuda::set_allow_tf32)
// and in the cuBLAS baseline (CUBLAS_TF32_TENSOR_OP_MATH) alike.
//
//   bench_cuda_lora [--large-only] [--iters=N] [--dtype=float|bf16|half] [--tf32]
#define EIGEN_NO_CUDA  // Eigen (the CPU backend, included by the layer headers) as plain host code
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <peft/adapted.hpp>
#include <peft/adapter/lora.hpp>
#include <peft/backend/cuda.hpp>
#include <peft/layer/linear.hpp>

namespace {

using Gpu = peft::CudaBackend;
using peft::Index;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}
void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "%s: %s\n", what, cublasGetStatusString(s));
    std::exit(1);
  }
}

/// Milliseconds per call of f(): the median over 7 repetitions of the mean over `iters` calls, after `warm`
/// calls.
template <class F>
double time_ms(F&& f, int iters, int warm = 3) {
  for (int i = 0; i < warm; ++i) f();
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "cudaEventCreate");
  check(cudaEventCreate(&b), "cudaEventCreate");
  std::vector<double> reps;
  for (int rep = 0; rep < 7; ++rep) {
    check(cudaEventRecord(a, peft::cuda::current_stream()), "cudaEventRecord");
    for (int i = 0; i < iters; ++i) f();
    check(cudaEventRecord(b, peft::cuda::current_stream()), "cudaEventRecord");
    check(cudaEventSynchronize(b), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    reps.push_back(double(ms) / iters);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::nth_element(reps.begin(), reps.begin() + 3, reps.end());
  return reps[3];
}

struct Shape {
  int m, d;
  std::vector<int> ranks;
};

template <class T>
void run_shape(const Shape& s, int iters) {
  const Index m = s.m, d = s.d;
  peft::Generator gen(42);
  // one weight for every layer of this shape (borrowed), one input, one upstream gradient
  peft::DeviceBuffer<T> w(std::size_t(d * d)), x(std::size_t(m * d)), dy(std::size_t(m * d)), y(std::size_t(m * d)),
      dx(std::size_t(m * d));
  Gpu::random_uniform(gen, w.view(d, d), -0.02, 0.02);
  Gpu::random_uniform(gen, x.view(m, d), -1.0, 1.0);
  Gpu::random_uniform(gen, dy.view(m, d), -1.0, 1.0);

  // plain cuBLAS: row-major y = x Wᵀ is column-major yᵀ = W xᵀ
  cublasHandle_t h;
  check(cublasCreate(&h), "cublasCreate");
  check(cublasSetStream(h, peft::cuda::current_stream()), "cublasSetStream");
  if (peft::cuda::allow_tf32()) check(cublasSetMathMode(h, CUBLAS_TF32_TENSOR_OP_MATH), "cublasSetMathMode");
  const float one = 1, zero = 0;
  auto cublas_fwd = [&] {
    if constexpr (std::is_same_v<T, float>) {
      check(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, int(d), int(m), int(d), &one, w.data(), int(d), x.data(), int(d), &zero, y.data(), int(d)),
            "cublasSgemm");
    } else {
      const cudaDataType_t type = std::is_same_v<T, peft::bf16> ? CUDA_R_16BF : CUDA_R_16F;
      check(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(d), int(m), int(d), &one, w.data(), type, int(d), x.data(), type, int(d), &zero,
                         y.data(), type, int(d), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            "cublasGemmEx");
    }
  };
  const double t_cublas = time_ms(cublas_fwd, iters);

  auto base = peft::Linear<T, Gpu>::borrow(w.view(d, d));
  auto bctx = base.make_context(m);
  const double t_base = time_ms([&] { base.forward(bctx, x.view(m, d), y.view(m, d)); }, iters);
  const double t_base_fb = time_ms(
      [&] {
        base.forward(bctx, x.view(m, d), y.view(m, d));
        base.backward(bctx, dy.view(m, d), dx.view(m, d), peft::GradMode::overwrite);
      },
      iters);

  for (int r : s.ranks) {
    peft::Adapted<peft::Linear<T, Gpu>, peft::Lora> layer(peft::Linear<T, Gpu>::borrow(w.view(d, d)));
    peft::LoraConfig cfg;
    cfg.r = r;
    cfg.lora_alpha = 2.0 * r;
    cfg.init_lora_weights = peft::LoraInit::off;
    layer.add_adapter("default", cfg, gen);
    layer.eval();
    auto ctx = layer.make_context(m);
    const double t_lora = time_ms([&] { layer.forward(ctx, x.view(m, d), y.view(m, d)); }, iters);
    const double t_lora_fb = time_ms(
        [&] {
          layer.forward(ctx, x.view(m, d), y.view(m, d));
          layer.backward(ctx, dy.view(m, d), dx.view(m, d), peft::GradMode::overwrite);
        },
        iters);
    std::printf("| %5d | %5d | %3d | %9.4f | %9.4f | %8.3f | %9.4f | %14.3f | %10.4f | %10.4f | %12.3f | %11.1f |\n", s.m, s.d, r, t_cublas, t_base,
                t_cublas / t_base, t_lora, t_lora / t_base, t_base_fb, t_lora_fb, t_lora_fb / t_base_fb,
                2.0 * double(m) * double(d) * double(d) / (t_base * 1e-3) / 1e12);
    std::fflush(stdout);
  }
  cublasDestroy(h);
}

}  // namespace

int main(int argc, char** argv) {
  bool large_only = false;
  int iters = 20;
  std::string dtype = "float";
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--large-only") == 0) large_only = true;
    else if (std::strncmp(argv[i], "--iters=", 8) == 0) iters = std::max(1, std::atoi(argv[i] + 8));
    else if (std::strncmp(argv[i], "--dtype=", 8) == 0 && (std::string(argv[i] + 8) == "float" || std::string(argv[i] + 8) == "bf16" ||
                                                           std::string(argv[i] + 8) == "half"))
      dtype = argv[i] + 8;
    else if (std::strcmp(argv[i], "--tf32") == 0) peft::cuda::set_allow_tf32(true);
    else {
      std::fprintf(stderr, "usage: %s [--large-only] [--iters=N] [--dtype=float|bf16|half] [--tf32]\n", argv[0]);
      return 2;
    }
  }
  if (peft::cuda::device_count() == 0) {
    std::fprintf(stderr, "bench_cuda_lora: no CUDA device; nothing measured\n");
    return 1;
  }
  std::printf("device: %s, storage: %s%s, iterations per timing: %d (median of 7)\n\n", peft::cuda::device_name().c_str(), dtype.c_str(),
              peft::cuda::allow_tf32() && dtype == "float" ? " (TF32 GEMMs)" : "", iters);
  std::printf("|     M |     D |   r | cublas_ms |   base_ms | base_eff |   lora_ms | lora_over_base | base_fb_ms | lora_fb_ms | fb_over_base | base_TFLOPs |\n");
  std::printf("|------:|------:|----:|----------:|----------:|---------:|----------:|---------------:|-----------:|-----------:|-------------:|------------:|\n");
  std::vector<Shape> shapes;
  if (!large_only)
    for (int m : {32, 512, 2048})
      for (int d : {256, 1024, 4096}) shapes.push_back({m, d, {8, 16}});
  for (int d : {4096, 8192}) shapes.push_back({4096, d, {16, 64}});
  try {
    for (const auto& s : shapes) {
      if (dtype == "bf16") run_shape<peft::bf16>(s, iters);
      else if (dtype == "half") run_shape<peft::half>(s, iters);
      else run_shape<float>(s, iters);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_lora: %s\n", e.what());
    return 1;
  }
  return 0;
}
