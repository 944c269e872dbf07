// peft++ — safetensors reader and writer (the format of Hugging Face checkpoints and of PEFT's
// adapter_model.safetensors).
//
// Opt-in: `#include <peft/io/safetensors.hpp>` (needs nlohmann-json; POSIX). See docs/interop.md.
//
//   peft::safetensors::File f("model.safetensors");       // mmap + full header validation
//   peft::ConstMatrixView<float> w = f.tensor_f32("lin0.weight");   // zero-copy for aligned F32
//   std::vector<double> b(f.info("lin0.bias").numel());
//   f.read_as<double>("lin0.bias", b);                      // F32/F16/BF16/F64 -> double
//
//   peft::safetensors::write("adapter_model.safetensors",
//                            {{"lora_A.weight", A_view}, {"lora_B.weight", B_view}});
//
// File layout: 8 bytes little-endian header length N, N bytes of UTF-8 JSON, then the data section;
// every tensor's `data_offsets` are relative to the data section (file offset 8 + N).
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "peft/buffer.hpp"
#include "peft/errors.hpp"
#include "peft/half.hpp"
#include "peft/io/file.hpp"
#include "peft/view.hpp"

namespace peft::safetensors {

static_assert(std::endian::native == std::endian::little,
              "peft/io/safetensors.hpp reads little-endian data in place and needs a little-endian host");

// ---------------------------------------------------------------------------------------------
// Dtypes

/// Every dtype of the safetensors format (0.8), in the order of the reference implementation's enum (the
/// writer orders tensors by it, as the reference does: largest items first, so every tensor is aligned).
enum class Dtype : std::uint8_t {
  BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ,
  I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64,
};

namespace detail {
struct DtypeDesc {
  std::string_view name;
  std::uint32_t bits;
};
inline constexpr DtypeDesc dtype_table[] = {
    {"BOOL", 8},        {"F4", 4},          {"F6_E2M3", 6}, {"F6_E3M2", 6}, {"U8", 8},   {"I8", 8},
    {"F8_E5M2", 8},     {"F8_E4M3", 8},     {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8},
    {"I16", 16},        {"U16", 16},        {"F16", 16},    {"BF16", 16},   {"I32", 32}, {"U32", 32},
    {"F32", 32},        {"C64", 64},        {"F64", 64},    {"I64", 64},    {"U64", 64},
};
}  // namespace detail

/// "F32", "BF16", ...
constexpr std::string_view name(Dtype d) noexcept { return detail::dtype_table[std::size_t(d)].name; }
/// Size of one element in bits (4 and 6 for the sub-byte float formats).
constexpr std::uint32_t bit_size(Dtype d) noexcept { return detail::dtype_table[std::size_t(d)].bits; }
/// The dtype spelled exactly `s` (case-sensitive, as the format), or nothing.
constexpr std::optional<Dtype> dtype_from_string(std::string_view s) noexcept {
  for (std::size_t i = 0; i < std::size(detail::dtype_table); ++i)
    if (detail::dtype_table[i].name == s) return Dtype(i);
  return std::nullopt;
}
/// F32, F16, BF16 and F64: the dtypes `tensor_f32`, `tensor_f64` and `read_as` convert.
constexpr bool is_convertible(Dtype d) noexcept {
  return d == Dtype::F32 || d == Dtype::F16 || d == Dtype::BF16 || d == Dtype::F64;
}

// ---------------------------------------------------------------------------------------------
// Half-precision conversions (exact in the widening direction, round-to-nearest-even when narrowing)

/// IEEE binary16 -> float, exact: signed zeros, subnormals and infinities are kept; a NaN keeps its sign
/// and payload and comes out quiet (as PyTorch and the F16C instruction do), so all 65536 values convert
/// bit for bit as `torch.float16 -> float32` does.
constexpr float half_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u);  // inf, or a quiet NaN with its payload
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: mant * 2^-24, renormalised
    std::uint32_t e = 113;
    while (!(mant & 0x400u)) { mant <<= 1; --e; }
    bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  return std::bit_cast<float>(bits);
}

/// bfloat16 -> float, exact (bfloat16 is the upper half of a float).
constexpr float bfloat16_to_float(std::uint16_t b) noexcept { return std::bit_cast<float>(std::uint32_t(b) << 16); }

/// float -> IEEE binary16, round to nearest even; overflow gives infinity, NaN stays NaN (the payload's top
/// bits kept, so half -> float -> half is the identity on every value but signaling NaNs, which come back
/// quiet).
constexpr std::uint16_t float_to_half(float f) noexcept {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const std::uint16_t sign = std::uint16_t((x >> 16) & 0x8000u);
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {
    if (ax == 0x7f800000u) return sign | 0x7c00u;
    const std::uint16_t m = std::uint16_t((ax >> 13) & 0x3ffu);
    return sign | 0x7c00u | (m ? m : 0x200u);
  }
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (ax < 0x38800000u) {                       // below 2^-14: a half subnormal or zero
    const std::uint32_t e = ax >> 23;
    if (e < 102) return sign;                    // < 2^-25 (a float subnormal too): rounds to zero
    const std::uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126 - e;         // 14..24
    std::uint32_t h = mant >> shift;
    const std::uint32_t rem = mant & ((1u << shift) - 1);
    const std::uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    return std::uint16_t(sign | h);
  }
  std::uint32_t h = (ax >> 13) - (112u << 10);
  const std::uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return std::uint16_t(sign | h);
}

/// float -> bfloat16, round to nearest even (as PyTorch); NaN stays a (quiet) NaN.
constexpr std::uint16_t float_to_bfloat16(float f) noexcept {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((x >> 16) | 0x40u);
  return std::uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// ---------------------------------------------------------------------------------------------
// Reading

/// One tensor's header entry.
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::uint64_t> shape;  ///< every entry <= 2^63 - 1
  std::uint64_t begin = 0;           ///< data_offsets[0], relative to the data section
  std::uint64_t end = 0;             ///< data_offsets[1]

  std::uint64_t nbytes() const noexcept { return end - begin; }
  std::uint64_t numel() const noexcept {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  /// The 2-D shape of `tensor_f32`'s view: a scalar is [1, 1], a vector [n] is [1, n], and
  /// [d0, d1, ..., dk] is [d0, d1 * ... * dk].
  Index rows() const noexcept { return shape.size() < 2 ? 1 : Index(shape[0]); }
  Index cols() const noexcept {
    if (shape.empty()) return 1;
    if (shape.size() == 1) return Index(shape[0]);
    std::uint64_t c = 1;
    for (std::size_t i = 1; i < shape.size(); ++i) c *= shape[i];
    return Index(c);
  }
};

struct TensorRef;

namespace detail {

using peft::detail::cat;

inline std::uint64_t load_le64(const std::byte* p) noexcept {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

/// A name for an error message: quoted, control bytes escaped, long names cut.
inline std::string quote(std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out = "'";
  const std::size_t n = std::min<std::size_t>(s.size(), 120);
  for (std::size_t i = 0; i < n; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f || c == '\\' || c == '\'') {
      out += '\\';
      if (c == '\\' || c == '\'') out += char(c);
      else { out += 'x'; out += hex[c >> 4]; out += hex[c & 15]; }
    } else {
      out += char(c);
    }
  }
  if (n < s.size()) out += "...";
  out += '\'';
  return out;
}

inline std::string shape_string(const std::vector<std::uint64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// Offset of the first byte that makes `s` invalid UTF-8 (as Rust's str::from_utf8: no overlong forms,
/// no surrogates, nothing above U+10FFFF), or nothing when `s` is valid.
inline std::optional<std::size_t> utf8_error(std::string_view s) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) { ++i; continue; }
    std::size_t len;
    unsigned lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) len = 2;
    else if (c == 0xe0) { len = 3; lo = 0xa0; }
    else if (c >= 0xe1 && c <= 0xec) len = 3;
    else if (c == 0xed) { len = 3; hi = 0x9f; }
    else if (c >= 0xee && c <= 0xef) len = 3;
    else if (c == 0xf0) { len = 4; lo = 0x90; }
    else if (c >= 0xf1 && c <= 0xf3) len = 4;
    else if (c == 0xf4) { len = 4; hi = 0x8f; }
    else return i;
    if (i + len > n) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k)
      if (p[i + k] < 0x80 || p[i + k] > 0xbf) return i;
    i += len;
  }
  return std::nullopt;
}

/// Element count and byte size of `shape` x `dtype`; the error text (without the tensor) on overflow,
/// on a dimension above 2^63 - 1 or on a sub-byte dtype that does not end on a byte boundary.
struct SizeResult {
  std::uint64_t numel = 0;
  std::uint64_t nbytes = 0;
  std::string error;
};
inline SizeResult tensor_size(Dtype dtype, const std::vector<std::uint64_t>& shape) {
  constexpr std::uint64_t imax = std::uint64_t(std::numeric_limits<std::int64_t>::max());
  SizeResult r;
  std::uint64_t numel = 1, nonzero = 1;
  bool overflow = false;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    const std::uint64_t d = shape[i];
    if (d > imax) {
      r.error = cat("shape[", i, "] is ", d, ", above 2^63 - 1");
      return r;
    }
    if (d == 0) { numel = 0; continue; }
    if (nonzero > imax / d) overflow = true;
    else nonzero *= d;
    if (numel != 0) numel = nonzero;
  }
  if (overflow) {
    r.error = cat("shape ", shape_string(shape), " overflows: its element count does not fit in 63 bits");
    return r;
  }
  const std::uint64_t bits = bit_size(dtype);
  if (numel > std::numeric_limits<std::uint64_t>::max() / bits) {
    r.error = cat("shape ", shape_string(shape), " x ", name(dtype), " overflows: its size does not fit in 64 bits");
    return r;
  }
  const std::uint64_t nbits = numel * bits;
  if (nbits % 8 != 0) {
    r.error = cat("shape ", shape_string(shape), " x ", name(dtype), " is ", nbits, " bits, not a whole number of bytes");
    return r;
  }
  r.numel = numel;
  r.nbytes = nbits / 8;
  return r;
}

inline std::string json_snippet(const nlohmann::json& j) {
  std::string s = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (s.size() > 40) s = s.substr(0, 40) + "...";
  return s;
}

/// A non-negative JSON integer (nlohmann keeps those in number_unsigned; "-0" is number_integer 0).
inline std::optional<std::uint64_t> json_u64(const nlohmann::json& j) {
  if (j.is_number_unsigned()) return j.get<std::uint64_t>();
  if (j.is_number_integer() && j.get<std::int64_t>() >= 0) return std::uint64_t(j.get<std::int64_t>());
  return std::nullopt;
}

struct Parsed {
  std::uint64_t header_len = 0;
  std::map<std::string, TensorInfo, std::less<>> tensors;
  std::map<std::string, std::string, std::less<>> metadata;
};

/// Parses and validates a whole safetensors image. `file` names it in messages. Throws FormatError.
inline Parsed parse(std::span<const std::byte> buf, const std::string& file, std::uint64_t max_header, int max_depth) {
  auto fail = [&](auto&&... a) { return FormatError(cat(file, ": ", std::forward<decltype(a)>(a)...)); };
  Parsed out;
  const std::uint64_t size = buf.size();
  if (size < 8) throw fail("file is ", size, " bytes, too short for the 8-byte header length");
  const std::uint64_t n = load_le64(buf.data());
  out.header_len = n;
  if (n > max_header) throw fail("header length ", n, " exceeds the limit of ", max_header, " bytes");
  if (n > size - 8)
    throw fail("header length ", n, " runs past the end of the file (the header would end at byte ", 8 + n,
               ", the file is ", size, " bytes)");
  if (n == 0) throw fail("header length is 0 (the header must be a JSON object)");
  const char* hb = reinterpret_cast<const char*>(buf.data() + 8);
  const std::string_view header(hb, n);
  if (auto bad = utf8_error(header))
    throw fail("header is not valid UTF-8 at header byte ", *bad, " (file offset ", 8 + *bad, ")");

  // Two things nlohmann accepts and JSON (RFC 8259) and the reference do not: a leading UTF-8 byte order
  // mark (skipped), and a NUL byte (taken as the end of the input, so "{...}\0junk" would parse). A NUL
  // can never be part of valid JSON text, not even inside a string.
  if (header.starts_with("\xef\xbb\xbf")) throw fail("header is not valid JSON (file offset 8): it starts with a UTF-8 byte order mark");
  if (auto z = header.find('\0'); z != std::string_view::npos)
    throw fail("header is not valid JSON (header byte ", z, ", file offset ", 8 + z, "): a NUL byte");

  // Duplicate keys (nlohmann keeps the last one silently) and the nesting depth are checked during the
  // parse; depth is what serde_json (the reference) limits too, and it bounds the parser's memory.
  struct Level {  // one per nesting depth
    std::unordered_set<std::string> keys;  // keys seen in the object open at this depth
    std::string last_key;
    bool is_object = false;
  };
  std::vector<Level> levels;
  using json = nlohmann::json;
  json::parser_callback_t cb = [&](int depth, json::parse_event_t ev, json& parsed) -> bool {
    const auto d = std::size_t(depth < 0 ? 0 : depth);
    switch (ev) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (depth >= max_depth) throw fail("header JSON nests deeper than ", max_depth, " levels");
        if (levels.size() <= d) levels.resize(d + 1);
        levels[d].keys.clear();
        levels[d].last_key.clear();
        levels[d].is_object = ev == json::parse_event_t::object_start;
        break;
      case json::parse_event_t::key: {  // `depth` counts the object the key belongs to
        if (d < 1 || levels.size() < d) break;
        Level& lv = levels[d - 1];
        const std::string& key = parsed.get_ref<const std::string&>();
        if (!lv.keys.insert(key).second) {
          const bool in_root = d == 1 || (d == 2 && levels[0].is_object);
          if (d == 1 && key == "__metadata__") throw fail("duplicate key '__metadata__' in the header");
          if (d == 1) throw fail("duplicate tensor name ", quote(key), " in the header");
          const std::string& parent = levels[d - 2].last_key;
          if (in_root && parent == "__metadata__") throw fail("__metadata__: duplicate key ", quote(key));
          if (in_root) throw fail("tensor ", quote(parent), ": duplicate field ", quote(key));
          throw fail("duplicate key ", quote(key), " in the header");
        }
        lv.last_key = key;
        break;
      }
      case json::parse_event_t::object_end:
        if (d < levels.size() && d > 0) levels[d].keys.clear();  // free inner key sets early
        break;
      default:
        break;
    }
    return true;
  };
  json j;
  try {
    j = json::parse(hb, hb + n, cb, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const json::parse_error& e) {
    std::string what = e.what();
    if (auto p = what.find(": "); p != std::string::npos) what = what.substr(p + 2);
    throw fail("header is not valid JSON (near header byte ", e.byte, ", file offset ", 8 + e.byte, "): ", what);
  } catch (const json::exception& e) {
    std::string what = e.what();
    if (auto p = what.find("] "); p != std::string::npos) what = what.substr(p + 2);
    throw fail("header is not valid JSON: ", what);
  }
  levels.clear();
  levels.shrink_to_fit();
  if (!j.is_object()) throw fail("header is a JSON ", j.type_name(), ", not an object");

  for (auto& [key, val] : j.items()) {
    if (key == "__metadata__") {
      if (val.is_null()) continue;  // as the reference: __metadata__ is optional, null means absent
      if (!val.is_object()) throw fail("__metadata__ is a JSON ", val.type_name(), ", not an object of strings");
      for (auto& [mk, mv] : val.items()) {
        if (!mv.is_string())
          throw fail("__metadata__: value of ", quote(mk), " is a JSON ", mv.type_name(), " (", json_snippet(mv), "), not a string");
        out.metadata.emplace(mk, mv.get<std::string>());
      }
      continue;
    }
    const std::string tname = "tensor " + quote(key);
    if (!val.is_object()) throw fail(tname, ": entry is a JSON ", val.type_name(), ", not an object");
    TensorInfo info;
    info.name = key;
    // dtype
    auto it = val.find("dtype");
    if (it == val.end()) throw fail(tname, ": missing field 'dtype'");
    if (!it->is_string()) throw fail(tname, ": field 'dtype' is a JSON ", it->type_name(), ", not a string");
    const auto& ds = it->get_ref<const std::string&>();
    const auto dt = dtype_from_string(ds);
    if (!dt) throw fail(tname, ": unknown dtype ", quote(ds));
    info.dtype = *dt;
    // shape
    it = val.find("shape");
    if (it == val.end()) throw fail(tname, ": missing field 'shape'");
    if (!it->is_array()) throw fail(tname, ": field 'shape' is a JSON ", it->type_name(), ", not an array");
    for (std::size_t i = 0; i < it->size(); ++i) {
      const auto d = json_u64((*it)[i]);
      if (!d) throw fail(tname, ": shape[", i, "] is ", json_snippet((*it)[i]), ", not a non-negative 64-bit integer");
      info.shape.push_back(*d);
    }
    // data_offsets
    it = val.find("data_offsets");
    if (it == val.end()) throw fail(tname, ": missing field 'data_offsets'");
    if (!it->is_array())
      throw fail(tname, ": field 'data_offsets' is a JSON ", it->type_name(), ", not an array of two integers");
    if (it->size() != 2) throw fail(tname, ": field 'data_offsets' has ", it->size(), " entries, not 2");
    for (std::size_t i = 0; i < 2; ++i) {
      const auto o = json_u64((*it)[i]);
      if (!o) throw fail(tname, ": data_offsets[", i, "] is ", json_snippet((*it)[i]), ", not a non-negative 64-bit integer");
      (i == 0 ? info.begin : info.end) = *o;
    }
    // unknown fields are ignored, as the reference implementation does
    if (info.end < info.begin) throw fail(tname, ": data_offsets [", info.begin, ", ", info.end, ") are descending");
    const SizeResult sz = tensor_size(info.dtype, info.shape);
    if (!sz.error.empty()) throw fail(tname, ": ", sz.error);
    if (info.end - info.begin != sz.nbytes)
      throw fail(tname, ": data_offsets [", info.begin, ", ", info.end, ") do not match shape ", shape_string(info.shape),
                 " x ", name(info.dtype), " = ", sz.nbytes, " bytes");
    out.tensors.emplace(key, std::move(info));
  }

  // The data section must be covered exactly: no range past its end, no overlap, no gap, no unused tail.
  const std::uint64_t data_start = 8 + n, data_size = size - data_start;
  std::vector<const TensorInfo*> order;
  order.reserve(out.tensors.size());
  for (const auto& [k, t] : out.tensors) {
    if (t.end > data_size)
      throw fail("tensor ", quote(k), ": data_offsets [", t.begin, ", ", t.end, ") end beyond the data section, which is ",
                 data_size, " bytes (file offsets [", data_start, ", ", size, "))");
    order.push_back(&t);
  }
  std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : (a->end != b->end ? a->end < b->end : a->name < b->name);
  });
  std::uint64_t cursor = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo* t : order) {
    if (t->begin < cursor)
      throw fail("tensors ", quote(prev->name), " [", prev->begin, ", ", prev->end, ") and ", quote(t->name), " [", t->begin,
                 ", ", t->end, ") overlap");
    if (t->begin > cursor)
      throw fail("bytes [", cursor, ", ", t->begin, ") of the data section (file offsets [", data_start + cursor, ", ",
                 data_start + t->begin, ")) belong to no tensor: a gap before tensor ", quote(t->name));
    cursor = t->end;
    prev = t;
  }
  if (cursor != data_size)
    throw fail("unused trailing bytes: bytes [", cursor, ", ", data_size, ") of the data section (file offsets [",
               data_start + cursor, ", ", size, ")) belong to no tensor");
  return out;
}

}  // namespace detail

/// A validated safetensors file.
///
/// Opening maps the file (read-only, MAP_PRIVATE) and validates the whole header (see docs/interop.md
/// for the rules); nothing of the data section is read. Tensor bytes are read from disk only when used:
/// `tensor_f32` of an F32 tensor whose data is 4-byte aligned is a view straight into the mapping (the
/// writer here and the reference writer always align). Any other case of `tensor_f32` / `tensor_f64`
/// (another dtype, or data at an unaligned file offset) converts once into a buffer the File keeps, so
/// every returned view lives as long as the File. `read_as` converts into the caller's memory instead.
///
/// All const member functions may be called from several threads at once.
class File {
 public:
  /// The reference implementation's header size limit.
  static constexpr std::uint64_t max_header_bytes = 100'000'000;
  /// serde_json's default recursion limit, which the reference inherits.
  static constexpr int max_json_depth = 128;

  File() = default;
  /// Maps and validates `path`. Throws FormatError for a malformed file, std::system_error when the
  /// file cannot be opened or mapped.
  explicit File(const std::filesystem::path& path) : name_(path.string()), map_(path) {
    bytes_ = map_.bytes();
    init();
  }
  /// Validates an in-memory image without copying it: `bytes` must outlive the File. `name` labels errors.
  static File from_bytes(std::span<const std::byte> bytes, std::string name = "<memory>") {
    File f;
    f.name_ = std::move(name);
    f.bytes_ = bytes;
    f.init();
    return f;
  }

  File(File&&) noexcept = default;
  File& operator=(File&&) noexcept = default;

  /// The path (or label) the File was opened with.
  const std::string& path() const noexcept { return name_; }
  /// Total size in bytes.
  std::uint64_t size() const noexcept { return bytes_.size(); }
  /// The header length N (the JSON, with its padding).
  std::uint64_t header_size() const noexcept { return header_len_; }
  /// File offset of the data section (8 + N); a tensor's bytes start at data_offset() + info.begin.
  std::uint64_t data_offset() const noexcept { return bytes_.empty() ? 0 : 8 + header_len_; }

  /// Tensor names, sorted.
  const std::vector<std::string>& names() const noexcept { return names_; }
  bool contains(std::string_view name) const { return tensors_.find(name) != tensors_.end(); }
  /// Throws std::out_of_range for a name that is not in the file.
  const TensorInfo& info(std::string_view name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end())
      throw std::out_of_range(detail::cat(name_, ": no tensor ", detail::quote(name), " (the file has ", names_.size(), ")"));
    return it->second;
  }
  /// The `__metadata__` map (empty when the file has none).
  const std::map<std::string, std::string, std::less<>>& metadata() const noexcept { return metadata_; }

  /// The tensor's raw little-endian bytes, in the mapping (any dtype, any alignment).
  std::span<const std::byte> bytes(std::string_view name) const {
    const TensorInfo& t = info(name);
    return bytes_.subspan(data_offset() + t.begin, t.nbytes());
  }
  /// Whether `tensor_f32(name)` is a view into the mapping (F32 and 4-byte aligned) rather than a copy.
  bool zero_copy_f32(std::string_view name) const { return zero_copy<float>(info(name)); }

  /// The tensor as a [rows, cols] float view (see TensorInfo::rows). Zero-copy for aligned F32; F16, BF16,
  /// F64 and unaligned F32 are converted once and kept by the File. Throws std::invalid_argument for
  /// other dtypes, std::out_of_range for an unknown name.
  ConstMatrixView<float> tensor_f32(std::string_view name) const { return tensor<float>(name); }
  /// The same in double (zero-copy for 8-byte aligned F64).
  ConstMatrixView<double> tensor_f64(std::string_view name) const { return tensor<double>(name); }

  /// Converts the tensor (F32, F16, BF16 or F64) into `out` (float, double, or the 16-bit storage types
  /// peft::bf16 and peft::half), which must hold exactly numel() elements (ShapeError otherwise). Narrowing
  /// conversions round to nearest, ties to even (F64 -> bf16/half through float).
  template <class T>
    requires(std::same_as<T, float> || std::same_as<T, double> || is_half_precision_v<T>)
  void read_as(std::string_view name, std::span<T> out) const {
    const TensorInfo& t = info(name);
    check_convertible(t, "read_as");
    if (out.size() != t.numel())
      throw ShapeError(detail::cat(name_, ": tensor ", detail::quote(t.name), " has ", t.numel(), " elements ",
                                   detail::shape_string(t.shape), ", the output holds ", out.size()));
    convert(t, out.data());
  }
  template <class T>
    requires(std::same_as<T, float> || std::same_as<T, double> || is_half_precision_v<T>)
  void read_as(std::string_view name, std::vector<T>& out) const { read_as<T>(name, std::span<T>(out)); }

  /// A writer record of this file's tensor `name`, pointing at the mapped bytes (no copy), for saving
  /// tensors unchanged into another file.
  TensorRef ref(std::string_view name) const;

 private:
  void init() {
    detail::Parsed p = detail::parse(bytes_, name_, max_header_bytes, max_json_depth);
    header_len_ = p.header_len;
    tensors_ = std::move(p.tensors);
    metadata_ = std::move(p.metadata);
    names_.reserve(tensors_.size());
    for (const auto& [k, v] : tensors_) names_.push_back(k);
    cache_ = std::make_unique<Cache>();
  }

  template <class T>
  static constexpr Dtype native_dtype = std::same_as<T, float> ? Dtype::F32 : Dtype::F64;

  template <class T>
  bool zero_copy(const TensorInfo& t) const {
    if (t.dtype != native_dtype<T>) return false;
    const auto addr = reinterpret_cast<std::uintptr_t>(bytes_.data() + data_offset() + t.begin);
    return addr % alignof(T) == 0;
  }

  void check_convertible(const TensorInfo& t, std::string_view what) const {
    if (!is_convertible(t.dtype))
      throw std::invalid_argument(detail::cat(name_, ": tensor ", detail::quote(t.name), " has dtype ", name(t.dtype), "; ",
                                              what, " converts F32, F16, BF16 and F64 only"));
  }

  template <class T>
  ConstMatrixView<T> tensor(std::string_view name) const {
    const TensorInfo& t = info(name);
    check_convertible(t, std::same_as<T, float> ? "tensor_f32" : "tensor_f64");
    const Index rows = t.rows(), cols = t.cols();
    if (zero_copy<T>(t)) {
      const T* p = t.nbytes() ? reinterpret_cast<const T*>(bytes_.data() + data_offset() + t.begin) : nullptr;
      return ConstMatrixView<T>(p, rows, cols);
    }
    std::lock_guard lock(cache_->mutex);
    auto& store = cache_->get<T>();
    auto it = store.find(name);
    if (it == store.end()) {
      HostBuffer<T> buf(std::size_t(t.numel()));
      convert(t, buf.data());
      it = store.emplace(std::string(name), std::move(buf)).first;
    }
    return ConstMatrixView<T>(it->second.size() ? it->second.data() : nullptr, rows, cols);
  }

  template <class T>
  void convert(const TensorInfo& t, T* out) const {
    const std::byte* src = bytes_.data() + data_offset() + t.begin;
    const std::size_t n = std::size_t(t.numel());
    switch (t.dtype) {
      case Dtype::F32:
        if constexpr (std::same_as<T, float>) {
          if (n) std::memcpy(out, src, n * 4);
        } else {
          for (std::size_t i = 0; i < n; ++i) { float v; std::memcpy(&v, src + 4 * i, 4); out[i] = T(v); }
        }
        break;
      case Dtype::F64:
        if constexpr (std::same_as<T, double>) {
          if (n) std::memcpy(out, src, n * 8);
        } else {
          for (std::size_t i = 0; i < n; ++i) { double v; std::memcpy(&v, src + 8 * i, 8); out[i] = T(v); }
        }
        break;
      case Dtype::F16:
        if constexpr (std::same_as<T, half>) {
          if (n) std::memcpy(out, src, n * 2);
        } else {
          for (std::size_t i = 0; i < n; ++i) { std::uint16_t h; std::memcpy(&h, src + 2 * i, 2); out[i] = T(half_to_float(h)); }
        }
        break;
      case Dtype::BF16:
        if constexpr (std::same_as<T, bf16>) {
          if (n) std::memcpy(out, src, n * 2);
        } else {
          for (std::size_t i = 0; i < n; ++i) { std::uint16_t h; std::memcpy(&h, src + 2 * i, 2); out[i] = T(bfloat16_to_float(h)); }
        }
        break;
      default:
        check_convertible(t, "conversion");
    }
  }

  struct Cache {
    std::mutex mutex;
    std::map<std::string, HostBuffer<float>, std::less<>> f32;
    std::map<std::string, HostBuffer<double>, std::less<>> f64;
    template <class T>
    auto& get() {
      if constexpr (std::same_as<T, float>) return f32;
      else return f64;
    }
  };

  std::string name_;
  io::MappedFile map_;
  std::span<const std::byte> bytes_;
  std::uint64_t header_len_ = 0;
  std::map<std::string, TensorInfo, std::less<>> tensors_;
  std::map<std::string, std::string, std::less<>> metadata_;
  std::vector<std::string> names_;
  std::unique_ptr<Cache> cache_ = std::make_unique<Cache>();
};

// ---------------------------------------------------------------------------------------------
// Writing

/// A tensor to write: its name, dtype, shape and where its little-endian bytes are. The bytes are
/// `rows` runs of `row_bytes`, `stride_bytes` apart (one run for contiguous data), so strided views are
/// written without a copy. Nothing is owned: the memory must stay valid until `write` returns.
struct TensorRef {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::uint64_t> shape;
  const std::byte* data = nullptr;
  std::size_t rows = 1;
  std::size_t row_bytes = 0;
  std::size_t stride_bytes = 0;

  TensorRef() = default;
  /// Raw bytes of any dtype (numel x itemsize bytes, C order, little-endian).
  TensorRef(std::string n, Dtype dt, std::vector<std::uint64_t> shp, std::span<const std::byte> bytes)
      : name(std::move(n)), dtype(dt), shape(std::move(shp)), data(bytes.data()), rows(1), row_bytes(bytes.size()),
        stride_bytes(bytes.size()) {}
  /// A float view as F32, shape [rows, cols].
  TensorRef(std::string n, ConstMatrixView<float> v) { from_view(std::move(n), v, {std::uint64_t(v.rows), std::uint64_t(v.cols)}); }
  /// A float view as F32 with another shape of the same element count: {n} for a bias held in a [1, n]
  /// view, {} for a scalar.
  TensorRef(std::string n, ConstMatrixView<float> v, std::vector<std::uint64_t> shp) { from_view(std::move(n), v, std::move(shp)); }
  /// A double view as F64 (same two forms).
  TensorRef(std::string n, ConstMatrixView<double> v) { from_view(std::move(n), v, {std::uint64_t(v.rows), std::uint64_t(v.cols)}); }
  TensorRef(std::string n, ConstMatrixView<double> v, std::vector<std::uint64_t> shp) { from_view(std::move(n), v, std::move(shp)); }
  /// A peft::bf16 view as BF16 and a peft::half view as F16 (same two forms; the bits as they are).
  TensorRef(std::string n, ConstMatrixView<bf16> v) { from_view(std::move(n), v, {std::uint64_t(v.rows), std::uint64_t(v.cols)}); }
  TensorRef(std::string n, ConstMatrixView<bf16> v, std::vector<std::uint64_t> shp) { from_view(std::move(n), v, std::move(shp)); }
  TensorRef(std::string n, ConstMatrixView<half> v) { from_view(std::move(n), v, {std::uint64_t(v.rows), std::uint64_t(v.cols)}); }
  TensorRef(std::string n, ConstMatrixView<half> v, std::vector<std::uint64_t> shp) { from_view(std::move(n), v, std::move(shp)); }

  std::uint64_t byte_size() const noexcept { return std::uint64_t(rows) * row_bytes; }

 private:
  template <class T>
  void from_view(std::string n, ConstMatrixView<T> v, std::vector<std::uint64_t> shp) {
    name = std::move(n);
    dtype = std::same_as<T, float> ? Dtype::F32 : std::same_as<T, double> ? Dtype::F64 : std::same_as<T, bf16> ? Dtype::BF16 : Dtype::F16;
    shape = std::move(shp);
    data = reinterpret_cast<const std::byte*>(v.data);
    if (v.contiguous()) {
      rows = 1;
      row_bytes = stride_bytes = std::size_t(v.size()) * sizeof(T);
    } else {
      rows = std::size_t(v.rows);
      row_bytes = std::size_t(v.cols) * sizeof(T);
      stride_bytes = std::size_t(v.stride) * sizeof(T);
    }
  }
};

inline TensorRef File::ref(std::string_view name) const {
  const TensorInfo& t = info(name);
  return TensorRef(t.name, t.dtype, t.shape, bytes(name));
}

/// Options of `write`.
struct WriteOptions {
  /// fsync the file before the rename and the directory after it (durability across power loss).
  bool sync = true;
  /// Data is written in pieces of at most this many bytes; `on_chunk` runs after each.
  std::size_t chunk_bytes = std::size_t(16) << 20;
  /// Called after each piece with (bytes written so far, total file size). An exception thrown here
  /// aborts the save: the temporary file is removed, the previous file is untouched, and the exception
  /// propagates. (Also the hook the tests use to kill a save half-way.)
  std::function<void(std::uint64_t written, std::uint64_t total)> on_chunk;
};

namespace detail {

/// The header (length prefix included) and the data order for `tensors`; validates the input.
struct Plan {
  std::string header;  // 8-byte length + JSON + padding
  std::vector<const TensorRef*> order;
  std::uint64_t total = 0;
};

inline std::string json_string(std::string_view s) { return nlohmann::json(std::string(s)).dump(); }

inline Plan plan(std::span<const TensorRef> tensors, const std::map<std::string, std::string>& user_metadata) {
  auto bad = [](auto&&... a) { return std::invalid_argument(cat("safetensors::write: ", std::forward<decltype(a)>(a)...)); };
  std::map<std::string, std::string> metadata{{"format", "pt"}};
  for (const auto& [k, v] : user_metadata) {
    if (utf8_error(k) || utf8_error(v)) throw bad("metadata entry ", quote(k), " is not valid UTF-8");
    metadata[k] = v;
  }
  Plan p;
  std::unordered_set<std::string_view> seen;
  for (const TensorRef& t : tensors) {
    if (utf8_error(t.name)) throw bad("tensor name ", quote(t.name), " is not valid UTF-8");
    if (t.name == "__metadata__") throw bad("'__metadata__' cannot be a tensor name");
    if (!seen.insert(t.name).second) throw bad("duplicate tensor name ", quote(t.name));
    if (std::size_t(t.dtype) >= std::size(dtype_table)) throw bad("tensor ", quote(t.name), ": invalid dtype");
    const SizeResult sz = tensor_size(t.dtype, t.shape);
    if (!sz.error.empty()) throw ShapeError(cat("safetensors::write: tensor ", quote(t.name), ": ", sz.error));
    if (t.rows > 1 && t.stride_bytes < t.row_bytes)
      throw ShapeError(cat("safetensors::write: tensor ", quote(t.name), ": row stride ", t.stride_bytes, " bytes < row size ", t.row_bytes));
    if (sz.nbytes != t.byte_size())
      throw ShapeError(cat("safetensors::write: tensor ", quote(t.name), ": shape ", shape_string(t.shape), " x ",
                           name(t.dtype), " = ", sz.nbytes, " bytes, but the data holds ", t.byte_size()));
    if (t.byte_size() && !t.data) throw ShapeError(cat("safetensors::write: tensor ", quote(t.name), ": null data"));
    p.order.push_back(&t);
  }
  // The reference writer's order: dtype descending (largest items first), then name. With the header
  // padded to 8 bytes, every tensor then starts at a multiple of its item size.
  std::stable_sort(p.order.begin(), p.order.end(), [](const TensorRef* a, const TensorRef* b) {
    return a->dtype != b->dtype ? a->dtype > b->dtype : a->name < b->name;
  });
  std::string h = "{\"__metadata__\":{";
  bool first = true;
  for (const auto& [k, v] : metadata) {
    if (!first) h += ',';
    first = false;
    h += json_string(k);
    h += ':';
    h += json_string(v);
  }
  h += '}';
  std::uint64_t offset = 0;
  for (const TensorRef* t : p.order) {
    h += ',';
    h += json_string(t->name);
    h += ":{\"dtype\":\"";
    h += name(t->dtype);
    h += "\",\"shape\":[";
    for (std::size_t i = 0; i < t->shape.size(); ++i) {
      if (i) h += ',';
      h += std::to_string(t->shape[i]);
    }
    h += "],\"data_offsets\":[";
    h += std::to_string(offset);
    h += ',';
    offset += t->byte_size();
    h += std::to_string(offset);
    h += "]}";
  }
  h += '}';
  h.append((8 - h.size() % 8) % 8, ' ');
  if (h.size() > File::max_header_bytes) throw bad("the header would be ", h.size(), " bytes, above the limit of ", File::max_header_bytes);
  const std::uint64_t len = h.size();
  p.header.resize(8);
  std::memcpy(p.header.data(), &len, 8);
  p.header += h;
  p.total = p.header.size() + offset;
  return p;
}

/// Streams the plan's bytes to `sink(std::span<const std::byte>)` in pieces of at most `chunk` bytes
/// (small runs are gathered), calling `progress(written)` after each piece.
template <class Sink, class Progress>
void emit(const Plan& p, std::size_t chunk, Sink&& sink, Progress&& progress) {
  chunk = std::max<std::size_t>(chunk, 4096);
  std::vector<std::byte> stage;
  std::uint64_t written = 0;
  auto flush = [&] {
    if (stage.empty()) return;
    sink(std::span<const std::byte>(stage));
    written += stage.size();
    stage.clear();
    progress(written);
  };
  auto put = [&](const std::byte* src, std::size_t n) {
    while (n > 0) {
      if (stage.empty() && n >= chunk) {  // large runs go straight from the caller's memory
        sink(std::span<const std::byte>(src, chunk));
        written += chunk;
        src += chunk;
        n -= chunk;
        progress(written);
        continue;
      }
      if (stage.capacity() < chunk) stage.reserve(chunk);
      const std::size_t k = std::min(n, chunk - stage.size());
      stage.insert(stage.end(), src, src + k);
      src += k;
      n -= k;
      if (stage.size() == chunk) flush();
    }
  };
  put(reinterpret_cast<const std::byte*>(p.header.data()), p.header.size());
  for (const TensorRef* t : p.order)
    for (std::size_t r = 0; r < t->rows; ++r) put(t->data + r * t->stride_bytes, t->row_bytes);
  flush();
}

}  // namespace detail

/// The safetensors image of `tensors` in memory (same bytes as `write` puts in a file).
inline std::vector<std::byte> serialize(std::span<const TensorRef> tensors, const std::map<std::string, std::string>& metadata = {}) {
  const detail::Plan p = detail::plan(tensors, metadata);
  std::vector<std::byte> out;
  out.reserve(std::size_t(p.total));
  detail::emit(p, std::size_t(1) << 20, [&](std::span<const std::byte> b) { out.insert(out.end(), b.begin(), b.end()); },
               [](std::uint64_t) {});
  return out;
}
inline std::vector<std::byte> serialize(std::initializer_list<TensorRef> tensors, const std::map<std::string, std::string>& metadata = {}) {
  return serialize(std::span<const TensorRef>(tensors.begin(), tensors.size()), metadata);
}

/// Writes a safetensors file atomically: `__metadata__` is {"format": "pt"} plus `metadata` (which may
/// override "format"); header keys in the reference writer's order, offsets contiguous, the header
/// padded with spaces to a multiple of 8 bytes. The bytes go to `<path>.tmp.<pid>.<n>`, which is
/// fsync'd and renamed over `path` (then the directory is fsync'd): a reader of `path` sees the old file
/// or the complete new one, never a partial one; on any error the temporary file is removed.
///
/// Throws std::invalid_argument (ShapeError for sizes) for bad input before anything is created, and
/// std::system_error for I/O failures.
inline void write(const std::filesystem::path& path, std::span<const TensorRef> tensors,
                  const std::map<std::string, std::string>& metadata = {}, const WriteOptions& options = {}) {
  const detail::Plan p = detail::plan(tensors, metadata);
  io::AtomicFile f(path, options.sync);
  detail::emit(p, options.chunk_bytes, [&](std::span<const std::byte> b) { f.write(b); },
               [&](std::uint64_t written) { if (options.on_chunk) options.on_chunk(written, p.total); });
  f.commit();
}
inline void write(const std::filesystem::path& path, std::initializer_list<TensorRef> tensors,
                  const std::map<std::string, std::string>& metadata = {}, const WriteOptions& options = {}) {
  write(path, std::span<const TensorRef>(tensors.begin(), tensors.size()), metadata, options);
}

}  // namespace peft::safetensors
