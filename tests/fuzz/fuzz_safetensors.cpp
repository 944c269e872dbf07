// libFuzzer target for the safetensors parser (include/peft/io/safetensors.hpp).
//
// Every input must either parse, or be refused with peft::FormatError; anything else (a crash, a
// sanitizer report, another exception) is a finding. For inputs that parse, the target also reads every
// float tensor and checks that write(read(x)) reads back to the same tensors.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "peft/io/safetensors.hpp"

namespace st = peft::safetensors;

namespace {
[[noreturn]] void fail(const char* what) {
  __builtin_trap();
  (void)what;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  st::File f;
  try {
    f = st::File::from_bytes(bytes, "<fuzz>");
  } catch (const peft::FormatError&) {
    return 0;
  }
  // Invariants of a file that was accepted.
  std::uint64_t covered = 0;
  std::vector<st::TensorRef> refs;
  for (const auto& name : f.names()) {
    const st::TensorInfo& t = f.info(name);
    if (t.end < t.begin || f.data_offset() + t.end > size) fail("range outside the file");
    covered += t.nbytes();
    const auto b = f.bytes(name);
    if (b.size() != t.nbytes()) fail("bytes() size");
    if (st::is_convertible(t.dtype)) {
      std::vector<double> out(static_cast<std::size_t>(t.numel()));
      f.read_as<double>(name, out);
      const auto v = f.tensor_f32(name);
      if (static_cast<std::uint64_t>(v.size()) != t.numel()) fail("view size");
      volatile float sink = 0;
      for (peft::Index i = 0; i < v.rows; ++i)
        for (peft::Index j = 0; j < v.cols; ++j) sink = sink + v(i, j);
    }
    refs.push_back(f.ref(name));
  }
  if (f.data_offset() + covered != size) fail("data section not covered exactly");

  // Round trip through the writer.
  std::map<std::string, std::string> meta(f.metadata().begin(), f.metadata().end());
  const std::vector<std::byte> again = st::serialize(refs, meta);
  const st::File g = st::File::from_bytes(again, "<fuzz round trip>");
  if (g.names() != f.names()) fail("round trip: names");
  if (!meta.count("format")) meta["format"] = "pt";
  if (std::map<std::string, std::string>(g.metadata().begin(), g.metadata().end()) != meta) fail("round trip: metadata");
  for (const auto& name : f.names()) {
    const auto& a = f.info(name);
    const auto& b = g.info(name);
    if (a.dtype != b.dtype || a.shape != b.shape) fail("round trip: info");
    const auto x = f.bytes(name), y = g.bytes(name);
    if (x.size() != y.size() || (x.size() && std::memcmp(x.data(), y.data(), x.size()) != 0)) fail("round trip: bytes");
  }
  return 0;
}
