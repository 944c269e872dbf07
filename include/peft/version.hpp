#pragma once

#define PEFT_VERSION_MAJOR 0
#define PEFT_VERSION_MINOR 1
#define PEFT_VERSION_PATCH 0

namespace peft {
inline constexpr const char* version = "0.1.0";
}
