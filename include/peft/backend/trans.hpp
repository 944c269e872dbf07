// peft++ — the GEMM transposition flag shared by every backend policy.
#pragma once

namespace peft {

/// Whether a GEMM operand is used as stored or transposed (a template argument, so only the variants a
/// layer uses are instantiated).
enum class Trans : bool { no = false, yes = true };

}  // namespace peft
