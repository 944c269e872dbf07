// peft++ — exception types. Every check on user input throws one of these with a message that names
// the tensor, the layer or the adapter, and the shapes involved.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace peft {

/// Shapes of views, layers and adapters that do not fit together.
struct ShapeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

/// A configuration value that is out of range (rank <= 0, dropout outside [0, 1), ...).
struct ConfigError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

/// An adapter name that does not exist, or one that exists already.
struct AdapterError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

/// An operation that is not valid in the layer's current state (merging twice, backward while merged,
/// a context made before the adapters changed, backward without forward).
struct StateError : std::logic_error {
  using std::logic_error::logic_error;
};

/// A file whose contents are malformed (a bad safetensors header, offsets outside the file, ...).
/// The message names the file, then the tensor, field or byte offset at fault.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Args>
std::string cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

}  // namespace detail
}  // namespace peft
