// peft++ — parameter handles shared by layers, adapters, model helpers and optimizers.
#pragma once

#include <cstddef>
#include <string>

namespace peft {

/// A non-owning handle to one parameter tensor and its gradient, as handed to optimizers.
///
/// `value` and `grad` point to `size` contiguous elements owned by a layer or adapter. `name` is the
/// parameter's name inside its layer (for LoRA "lora_A.<adapter>", "lora_B.<adapter>"; for a base layer
/// "weight", "bias"), prefixed by model-level helpers with the path of the layer. `trainable` tells
/// whether the parameter currently receives gradients (PEFT's `requires_grad`). A frozen parameter may
/// have `grad == nullptr`. `host_accessible` tells whether host code may read `value` and `grad` (false for
/// a device backend's memory: `Backend::host_accessible` of the layer that owns them); optimizers and
/// gradient clipping for one backend refuse parameters of another.
template <class T>
struct ParamRef {
  std::string name;
  T* value = nullptr;
  T* grad = nullptr;
  std::size_t size = 0;
  bool trainable = false;
  bool host_accessible = true;
};

}  // namespace peft
