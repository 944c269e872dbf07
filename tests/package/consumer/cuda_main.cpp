// Links peft::cuda from a plain C++ program (no nvcc): the CUDA backend's layer types and its library.
#include <iostream>
#include <peft/backend/cuda.hpp>
#include <peft/peft.hpp>

int main() {
  using Layer = peft::Adapted<peft::Linear<peft::bf16, peft::Cuda>, peft::Lora>;
  static_assert(!Layer::backend_type::host_accessible);
  std::cout << "CUDA devices: " << peft::cuda::device_count() << "\n";
  return 0;
}
