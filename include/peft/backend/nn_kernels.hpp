// peft++ — the transformer blocks' extension point per backend: the GELU variants and the NnKernels<Backend>
// template that each backend specialises next to its policy (the CPU's in peft/nn/kernels.hpp, CUDA's in
// peft/backend/cuda.hpp). Free of Eigen and of CUDA headers.
#pragma once

namespace peft::nn {

/// GELU variants, as torch.nn.functional.gelu's `approximate` argument.
enum class GeluApproximate {
  none,  ///< exact: 0.5 x (1 + erf(x / √2))
  tanh,  ///< 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))), GPT-2's "gelu_new"
};

template <class Backend>
struct NnKernels;  // specialised per backend

}  // namespace peft::nn
