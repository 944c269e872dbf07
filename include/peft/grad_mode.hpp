// peft++ — the gradient write rule, an argument of every backward pass.
#pragma once

namespace peft {

/// How backward writes a gradient buffer.
///  - overwrite:  grad = computed gradient (the previous contents are never read, so NaN there is harmless);
///  - accumulate: grad += computed gradient (PyTorch's `.grad` semantics; gradient accumulation over
///    micro-batches, weight sharing).
enum class GradMode { overwrite, accumulate };

}  // namespace peft
