// libFuzzer target for the adapter_config.json parser (include/peft/io/adapter_config.hpp).
//
// Every input must either parse, or be refused with peft::FormatError; anything else (a crash, a
// sanitizer report, a stack overflow, another exception such as std::regex_error or std::out_of_range)
// is a finding. For inputs that parse, the target also
//   * asks the config which of a few module paths it targets (this compiles the user's regexes for
//     target_modules, exclude_modules, modules_to_save and layers_pattern, and reads layer indices);
//   * writes the config and parses the text again: the second parse must succeed and give the same JSON
//     (write(read(x)) is a fixed point).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "peft/io/adapter_config.hpp"

namespace {
[[noreturn]] void fail(const char* what) {
  (void)what;
  __builtin_trap();
}

// Module paths the selection code is asked about: plain, nested, numbered layers (some with huge or
// odd indices), and the names the config itself lists.
const char* const fixed_paths[] = {
    "lin0", "model.layers.0.self_attn.q_proj", "model.layers.12.mlp.down_proj", "h.3.attn.c_attn",
    "model.layers.99999999999999999999999.q_proj", "a..b", "", ".", "layers.-1.x", "classifier.dense",
};
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  peft::io::set_warning_sink(nullptr);  // warnings are expected; keep the fuzzer's output readable
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  peft::io::AdapterConfig c;
  try {
    c = peft::io::parse_adapter_config(text, "<fuzz>");
  } catch (const peft::FormatError&) {
    return 0;
  }

  // Selection on accepted configs must not throw.
  std::vector<std::string> paths(std::begin(fixed_paths), std::end(fixed_paths));
  if (c.target_modules.names)
    for (const auto& n : *c.target_modules.names) {
      paths.push_back(n);
      paths.push_back("model.layers.1." + n);
    }
  volatile bool sink = false;
  for (const auto& p : paths) sink = sink ^ c.targets(p);
  (void)c.peft_type();

  // Round trip: what peft++ writes must read back to the same config.
  const std::string once = peft::io::format_adapter_config(c);
  peft::io::AdapterConfig d;
  try {
    d = peft::io::parse_adapter_config(once, "<fuzz round trip>");
  } catch (const peft::FormatError&) {
    fail("round trip: the written config does not parse");
  }
  if (peft::io::format_adapter_config(d) != once) fail("round trip: written configs differ");
  return 0;
}
