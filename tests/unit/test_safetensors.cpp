// safetensors reader and writer: Python interop (files written by safetensors.torch, byte-identical
// output), the hostile corpus, conversions, atomic and interrupted saves, zero-copy loading.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <random>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "io_test_util.hpp"
#include "peft/io/safetensors.hpp"

namespace fs = std::filesystem;
namespace st = peft::safetensors;
using nlohmann::json;
using peft::test::TempDir;

namespace {

fs::path data_dir() {
  // PEFT_TEST_DATA_DIR is tests/reference/data; the corpus lives in tests/data/safetensors.
  return fs::path(PEFT_TEST_DATA_DIR).parent_path().parent_path() / "data" / "safetensors";
}

std::vector<std::byte> read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  REQUIRE(in);
  std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(c.size());
  if (!c.empty()) std::memcpy(out.data(), c.data(), c.size());
  return out;
}

json read_json(const fs::path& p) {
  std::ifstream in(p);
  REQUIRE(in);
  return json::parse(in);
}


std::uint32_t bits(float f) { return std::bit_cast<std::uint32_t>(f); }
std::uint64_t bits(double d) { return std::bit_cast<std::uint64_t>(d); }

template <class T>
std::span<const std::byte> as_bytes(const std::vector<T>& v) { return std::as_bytes(std::span<const T>(v)); }

/// Compares converted values with expected bit patterns; NaN only needs to be NaN of the same sign.
template <class T, class U>
void check_bits(const T* got, std::size_t n, const json& expected, const std::string& what) {
  REQUIRE(expected.size() == n);
  for (std::size_t i = 0; i < n; ++i) {
    const U want = expected[i].get<U>();
    const T want_value = std::bit_cast<T>(want);
    INFO(what << "[" << i << "]");
    if (std::isnan(want_value)) {
      CHECK(std::isnan(got[i]));
      CHECK(std::signbit(got[i]) == std::signbit(want_value));
    } else {
      CHECK(bits(got[i]) == want);
    }
  }
}

/// Checks one file against its expectation record (see make_python_files.py / make_corpus.py).
void check_file(const fs::path& path, const json& exp) {
  INFO(path.string());
  const st::File f(path);
  // names: sorted, same set
  std::vector<std::string> want_names;
  for (auto& [k, v] : exp["tensors"].items()) want_names.push_back(k);
  std::sort(want_names.begin(), want_names.end());
  CHECK(f.names() == want_names);
  // metadata
  std::map<std::string, std::string> want_meta = exp["metadata"].get<std::map<std::string, std::string>>();
  CHECK(std::map<std::string, std::string>(f.metadata().begin(), f.metadata().end()) == want_meta);
  for (auto& [name, e] : exp["tensors"].items()) {
    INFO("tensor " << name);
    const st::TensorInfo& t = f.info(name);
    CHECK(st::name(t.dtype) == e["dtype"].get<std::string>());
    CHECK(t.shape == e["shape"].get<std::vector<std::uint64_t>>());
    CHECK(t.begin == e["data_offsets"][0].get<std::uint64_t>());
    CHECK(t.end == e["data_offsets"][1].get<std::uint64_t>());
    CHECK(f.bytes(name).size() == t.nbytes());
    if (!e.contains("f32_bits")) {
      if (st::is_convertible(t.dtype)) CHECK_NOTHROW(f.tensor_f32(name));
      else CHECK_THROWS_AS(f.tensor_f32(name), std::invalid_argument);
      continue;
    }
    const std::size_t n = std::size_t(t.numel());
    // zero-copy view (or converted copy) in float
    const peft::ConstMatrixView<float> v = f.tensor_f32(name);
    CHECK(v.rows == t.rows());
    CHECK(v.cols == t.cols());
    CHECK(std::size_t(v.size()) == n);
    if (n) check_bits<float, std::uint32_t>(v.data, n, e["f32_bits"], "tensor_f32");
    const bool zc = f.zero_copy_f32(name);
    CHECK(zc == (t.dtype == st::Dtype::F32 && (f.data_offset() + t.begin) % 4 == 0));
    if (e.contains("zero_copy_f32")) CHECK(zc == e["zero_copy_f32"].get<bool>());
    if (zc && n) {
      CHECK(static_cast<const void*>(v.data) == static_cast<const void*>(f.bytes(name).data()));
    }
    CHECK(f.tensor_f32(name).data == v.data);  // converted copies are cached: same view again
    // read_as into the caller's memory
    std::vector<float> out32(n, -1.0f);
    f.read_as<float>(name, out32);
    if (n) check_bits<float, std::uint32_t>(out32.data(), n, e["f32_bits"], "read_as<float>");
    std::vector<double> out64(n, -1.0);
    f.read_as<double>(name, out64);
    if (n && e.contains("f64_bits")) check_bits<double, std::uint64_t>(out64.data(), n, e["f64_bits"], "read_as<double>");
    const peft::ConstMatrixView<double> v64 = f.tensor_f64(name);
    if (n) CHECK(std::memcmp(v64.data, out64.data(), n * sizeof(double)) == 0);
  }
}

/// Reference decode of binary16, independent of the bit manipulation in the header.
double half_reference(std::uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 31, mant = h & 1023;
  double v;
  if (exp == 0) v = std::ldexp(double(mant), -24);
  else if (exp == 31) v = mant ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else v = std::ldexp(double(mant + 1024), exp - 25);
  return sign ? -v : v;
}

/// Nearest-even rounding of `x` onto the values `decode(h)`, by brute force over the two neighbours
/// in the encoding (h + 1 is the next larger magnitude, h - 1 the next smaller).
template <class Decode>
bool is_nearest_even(float x, std::uint16_t h, Decode decode) {
  const double got = decode(h);
  if (std::isnan(got) || std::isinf(got)) return false;  // callers keep x inside the finite range
  const double dx = x;
  const double err = std::abs(got - dx);
  for (int d : {-1, 1}) {
    const double other = decode(std::uint16_t(h + d));
    if (std::isnan(other)) continue;
    const double oerr = std::abs(other - dx);
    if (oerr < err) return false;
    if (oerr == err && (h & 1)) return false;
  }
  return true;
}

std::size_t rss_bytes() {
  std::ifstream in("/proc/self/statm");
  std::size_t size = 0, resident = 0;
  in >> size >> resident;
  return resident * std::size_t(::sysconf(_SC_PAGESIZE));
}

}  // namespace

// ---------------------------------------------------------------------------------------------

TEST_CASE("dtype names and sizes follow the safetensors format", "[safetensors]") {
  CHECK(st::name(st::Dtype::F32) == "F32");
  CHECK(st::name(st::Dtype::BF16) == "BF16");
  CHECK(st::bit_size(st::Dtype::F4) == 4);
  CHECK(st::bit_size(st::Dtype::F6_E2M3) == 6);
  CHECK(st::bit_size(st::Dtype::C64) == 64);
  for (int i = 0; i <= int(st::Dtype::U64); ++i) CHECK(st::dtype_from_string(st::name(st::Dtype(i))) == st::Dtype(i));
  CHECK_FALSE(st::dtype_from_string("f32"));
  CHECK_FALSE(st::dtype_from_string("F31"));
  CHECK_FALSE(st::dtype_from_string(""));
  STATIC_REQUIRE(st::half_to_float(0x3c00) == 1.0f);
  STATIC_REQUIRE(st::float_to_bfloat16(1.0f) == 0x3f80);
}

TEST_CASE("half and bfloat16 conversions are exact when widening and round to nearest even", "[safetensors]") {
  SECTION("binary16: all 65536 values, against an independent decode, and the round trip") {
    // (checked by hand against torch 1.13's float16 -> float32 for all 65536 values: bit-identical)
    for (std::uint32_t i = 0; i < 65536; ++i) {
      const auto h = std::uint16_t(i);
      const float f = st::half_to_float(h);
      const double ref = half_reference(h);
      if (std::isnan(ref)) {
        REQUIRE(std::isnan(f));
        REQUIRE(std::signbit(f) == bool(h >> 15));
      } else {
        REQUIRE(double(f) == ref);
        REQUIRE(std::signbit(f) == std::signbit(ref));
      }
      const bool signaling = (h & 0x7c00) == 0x7c00 && (h & 0x3ff) && !(h & 0x200);
      REQUIRE(st::float_to_half(f) == (signaling ? (h | 0x200) : h));  // NaN payloads kept; sNaN comes back quiet
    }
    CHECK(st::half_to_float(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
    CHECK(st::half_to_float(0x03ff) == 1023 * std::ldexp(1.0f, -24));
    CHECK(st::half_to_float(0x7bff) == 65504.0f);
    CHECK(std::isinf(st::half_to_float(0x7c00)));
    CHECK(st::half_to_float(0x8000) == 0.0f);
    CHECK(std::signbit(st::half_to_float(0x8000)));
  }
  SECTION("float -> binary16 rounding") {
    CHECK(st::float_to_half(65504.0f) == 0x7bff);
    CHECK(st::float_to_half(65519.996f) == 0x7bff);
    CHECK(st::float_to_half(65520.0f) == 0x7c00);  // the tie rounds to even: infinity
    CHECK(st::float_to_half(1e10f) == 0x7c00);
    CHECK(st::float_to_half(-1e10f) == 0xfc00);
    CHECK(st::float_to_half(std::ldexp(1.0f, -25)) == 0x0000);            // tie between 0 and the smallest subnormal
    CHECK(st::float_to_half(std::ldexp(1.0f, -25) * 1.0001f) == 0x0001);
    CHECK(st::float_to_half(std::ldexp(3.0f, -25)) == 0x0002);            // 1.5 units: tie, to even
    CHECK(st::float_to_half(std::ldexp(5.0f, -25)) == 0x0002);            // 2.5 units: tie, to even
    CHECK(st::float_to_half(std::ldexp(2047.0f, -25)) == 0x0400);          // rounds up into the normals
    CHECK(st::float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);    // tie, to even
    CHECK(st::float_to_half(1.0f + std::ldexp(3.0f, -11)) == 0x3c02);    // tie, to even (up)
    CHECK(st::float_to_half(1e-30f) == 0x0000);
    CHECK(st::float_to_half(-1e-30f) == 0x8000);
    CHECK(std::isnan(st::half_to_float(st::float_to_half(std::numeric_limits<float>::quiet_NaN()))));
    std::mt19937 rng(7);
    for (int i = 0; i < 200000; ++i) {
      const float x = std::bit_cast<float>(std::uint32_t(rng()));
      if (std::isnan(x) || std::abs(x) >= 65504.0f) continue;
      const std::uint16_t h = st::float_to_half(x);
      INFO(x);
      REQUIRE(is_nearest_even(x, h, half_reference));
      // and the same in the [-2, 2] range where most weights live
      const float y = std::ldexp(float(rng()) / 4294967296.0f - 0.5f, int(rng() % 40) - 36);
      REQUIRE(is_nearest_even(y, st::float_to_half(y), half_reference));
    }
  }
  SECTION("bfloat16") {
    auto bf = [](std::uint16_t b) { return double(st::bfloat16_to_float(b)); };
    for (std::uint32_t i = 0; i < 65536; ++i) {
      const auto b = std::uint16_t(i);
      const float f = st::bfloat16_to_float(b);
      REQUIRE(bits(f) == std::uint32_t(b) << 16);
      if (!std::isnan(f) || (b & 0x40)) REQUIRE(st::float_to_bfloat16(f) == b);
      else REQUIRE(std::isnan(st::bfloat16_to_float(st::float_to_bfloat16(f))));
    }
    CHECK(st::float_to_bfloat16(std::numeric_limits<float>::max()) == 0x7f80);  // rounds to infinity, as torch
    CHECK(st::float_to_bfloat16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);       // tie, to even
    CHECK(st::float_to_bfloat16(1.0f + std::ldexp(3.0f, -8)) == 0x3f82);
    std::mt19937 rng(11);
    for (int i = 0; i < 200000; ++i) {
      const float x = std::bit_cast<float>(std::uint32_t(rng()));
      if (std::isnan(x) || std::abs(x) >= 3.38e38f) continue;
      REQUIRE(is_nearest_even(x, st::float_to_bfloat16(x), bf));
    }
  }
}

TEST_CASE("files written by Python's safetensors read correctly", "[safetensors][interop]") {
  const json all = read_json(data_dir() / "valid" / "python.json");
  REQUIRE(all["files"].size() >= 6);
  for (auto& [file, exp] : all["files"].items()) check_file(data_dir() / "valid" / file, exp);
  // the reference writer aligns every tensor: F32 data is always a view into the mapping
  const st::File f(data_dir() / "valid" / "py_mixed.safetensors");
  CHECK(f.zero_copy_f32("lin.weight"));
  CHECK_FALSE(f.zero_copy_f32("lin.bias"));  // F16: converted
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().at("note") == "mixed dtypes");
  CHECK(st::File(data_dir() / "valid" / "py_no_metadata.safetensors").metadata().empty());
}

TEST_CASE("crafted valid files: unaligned data, key order, empty tensors, every dtype", "[safetensors]") {
  const json all = read_json(data_dir() / "valid" / "crafted.json");
  REQUIRE(all.size() >= 7);
  for (auto& [file, exp] : all.items()) check_file(data_dir() / "valid" / file, exp);

  SECTION("unaligned F32 is copied, and the copy is 4-byte aligned") {
    const st::File f(data_dir() / "valid" / "crafted_unaligned_f32.safetensors");
    CHECK(f.data_offset() % 4 == 2);
    const auto v = f.tensor_f32("w");
    CHECK(reinterpret_cast<std::uintptr_t>(v.data) % alignof(float) == 0);
    CHECK(v.rows == 2);
    CHECK(v.cols == 3);
    CHECK(v(1, 2) == 7.75f);
  }
  SECTION("every dtype is described, sub-byte ones included") {
    const st::File f(data_dir() / "valid" / "crafted_all_dtypes.safetensors");
    CHECK(f.names().size() == 22);
    CHECK(f.info("t_F4").nbytes() == 2);
    CHECK(f.info("t_F6_E3M2").nbytes() == 3);
    CHECK(f.info("t_C64").nbytes() == 32);
    CHECK_THROWS_WITH(f.tensor_f32("t_I64"), Catch::Contains("tensor 't_I64' has dtype I64; tensor_f32 converts F32, F16, BF16 and F64 only"));
    std::vector<double> out(4);
    CHECK_THROWS_AS(f.read_as<double>("t_U8", out), std::invalid_argument);
  }
  SECTION("empty files and metadata-only files") {
    CHECK(st::File(data_dir() / "valid" / "crafted_empty.safetensors").names().empty());
    const st::File m(data_dir() / "valid" / "crafted_metadata_only.safetensors");
    CHECK(m.names().empty());
    CHECK(m.metadata().at("k") == "v \xc3\xa9\n");
  }
}

TEST_CASE("every hostile file is rejected with a precise FormatError", "[safetensors][hostile]") {
  const fs::path dir = data_dir() / "bad";
  const json manifest = read_json(dir / "manifest.json");
  REQUIRE(manifest.size() >= 30);
  std::set<std::string> classes;
  std::size_t files = 0;
  for (auto& [file, e] : manifest.items()) {
    const fs::path p = dir / file;
    const std::string expect = e["error"].get<std::string>();
    INFO(file << ": expecting \"" << expect << "\"");
    REQUIRE(fs::exists(p));
    // from disk (mmap), the message starts with the path
    try {
      st::File f(p);
      FAIL("accepted a bad file");
    } catch (const peft::FormatError& err) {
      const std::string msg = err.what();
      INFO("message: " << msg);
      CHECK(msg.rfind(p.string() + ": ", 0) == 0);
      CHECK_THAT(msg, Catch::Contains(expect));
    }
    // and the same from memory
    const std::vector<std::byte> bytes = read_all(p);
    try {
      st::File::from_bytes(bytes, file);
      FAIL("accepted a bad image");
    } catch (const peft::FormatError& err) {
      CHECK_THAT(err.what(), Catch::Contains(file + ": ") && Catch::Contains(expect));
    }
    classes.insert(e["class"].get<std::string>());
    ++files;
  }
  CHECK(files == manifest.size());
  CHECK(classes.size() >= 10);
  // every file in bad/ is in the manifest
  std::size_t on_disk = 0;
  for (const auto& de : fs::directory_iterator(dir)) on_disk += de.path().extension() == ".safetensors";
  CHECK(on_disk == manifest.size());
}

TEST_CASE("truncated and bit-flipped files are rejected or parsed, never crash", "[safetensors][hostile]") {
  const std::vector<std::byte> good = read_all(data_dir() / "valid" / "py_mixed.safetensors");
  REQUIRE_NOTHROW(st::File::from_bytes(good));
  SECTION("every strict prefix is rejected") {
    for (std::size_t n = 0; n < good.size(); ++n) {
      INFO("prefix of " << n << " bytes");
      std::vector<std::byte> cut(good.begin(), good.begin() + std::ptrdiff_t(n));  // own allocation: ASan sees overreads
      REQUIRE_THROWS_AS(st::File::from_bytes(cut), peft::FormatError);
    }
  }
  SECTION("single-bit flips in the length and the header") {
    const std::uint64_t n = st::File::from_bytes(good).header_size();
    std::size_t rejected = 0, accepted = 0;
    for (std::size_t i = 0; i < 8 + n; ++i) {
      for (int b = 0; b < 8; ++b) {
        std::vector<std::byte> m = good;
        m[i] ^= std::byte(1u << b);
        try {
          const st::File f = st::File::from_bytes(m);
          for (const auto& name : f.names()) {
            const auto& t = f.info(name);
            REQUIRE(f.data_offset() + t.end <= m.size());
            if (st::is_convertible(t.dtype)) {
              std::vector<double> out(std::size_t(t.numel()));
              f.read_as<double>(name, out);
            }
          }
          ++accepted;
        } catch (const peft::FormatError&) {
          ++rejected;
        }
      }
    }
    CHECK(rejected > 0);
    CHECK(accepted > 0);  // flips inside names and values keep the file valid
  }
}

TEST_CASE("views, lookups and errors", "[safetensors]") {
  const st::File f(data_dir() / "valid" / "py_f32.safetensors");
  CHECK(f.tensor_f32("scalar").rows == 1);
  CHECK(f.tensor_f32("scalar").cols == 1);
  CHECK(f.tensor_f32("scalar")(0, 0) == 2.5f);
  CHECK(f.tensor_f32("b").rows == 1);  // [8] -> [1, 8]
  CHECK(f.tensor_f32("b").cols == 8);
  CHECK(f.tensor_f32("t3").rows == 2);  // [2, 3, 4] -> [2, 12]
  CHECK(f.tensor_f32("t3").cols == 12);
  CHECK(f.tensor_f32("empty").rows == 0);
  CHECK(f.tensor_f32("empty").cols == 5);
  CHECK(f.tensor_f32("empty").empty());
  CHECK(f.contains("w"));
  CHECK_FALSE(f.contains("nope"));
  CHECK_THROWS_AS(f.info("nope"), std::out_of_range);
  CHECK_THROWS_WITH(f.tensor_f32("nope"), Catch::Contains("no tensor 'nope'"));
  std::vector<float> small(3);
  CHECK_THROWS_AS(f.read_as<float>("w", small), peft::ShapeError);
  CHECK_THROWS_WITH(f.read_as<float>("w", small), Catch::Contains("tensor 'w' has 32 elements [4, 8], the output holds 3"));
  CHECK(f.size() == fs::file_size(data_dir() / "valid" / "py_f32.safetensors"));
  CHECK(f.data_offset() == 8 + f.header_size());
  CHECK(f.header_size() % 8 == 0);

  SECTION("views stay valid after the File is moved") {
    st::File a(data_dir() / "valid" / "py_f16.safetensors");
    const auto v = a.tensor_f32("rand");  // a converted copy
    const float first = v(0, 0);
    st::File b = std::move(a);
    CHECK(v(0, 0) == first);
    CHECK(b.tensor_f32("rand").data == v.data);
  }
  SECTION("opening a missing file or a directory is a system_error") {
    CHECK_THROWS_AS(st::File(data_dir() / "valid" / "does_not_exist.safetensors"), std::system_error);
    CHECK_THROWS_AS(st::File(data_dir()), std::system_error);
  }
  SECTION("concurrent conversions of one tensor give one copy") {
    const st::File h(data_dir() / "valid" / "py_f16.safetensors");
    std::vector<const float*> seen(8);
    std::vector<std::thread> th;
    for (int i = 0; i < 8; ++i) th.emplace_back([&, i] { seen[std::size_t(i)] = h.tensor_f32("rand").data; });
    for (auto& t : th) t.join();
    for (auto* p : seen) CHECK(p == seen[0]);
  }
}

// ---------------------------------------------------------------------------------------------
// Writer

namespace {
struct Golden {
  std::vector<float> bw, ab{1.0f, -2.0f, 3.5f, 0.125f}, odd{7.0f}, scalar{3.5f};
  std::vector<std::uint16_t> half, bf;
  std::vector<double> dbl{std::numbers::pi, -1.0 / 3.0, 1e-300, std::ldexp(1.0, 60)};
  std::vector<std::int64_t> ids{1, -2, 3};
  std::vector<st::TensorRef> refs;
  Golden() {
    for (int i = 0; i < 12; ++i) bw.push_back(float(i) * 0.25f - 1.0f);
    for (int i = 0; i < 6; ++i) half.push_back(st::float_to_half(float(i) / 8.0f));
    for (float x : {-1.5f, 0.0f, 2.0f, 1024.0f, -0.0078125f}) bf.push_back(st::float_to_bfloat16(x));
    refs.emplace_back("b.weight", peft::view(bw.data(), 3, 4));
    refs.emplace_back("a.bias", peft::view(ab.data(), 1, 4), std::vector<std::uint64_t>{4});
    refs.emplace_back("half", st::Dtype::F16, std::vector<std::uint64_t>{2, 3}, as_bytes(half));
    refs.emplace_back("bf", st::Dtype::BF16, std::vector<std::uint64_t>{5}, as_bytes(bf));
    refs.emplace_back("dbl", peft::view(dbl.data(), 2, 2));
    refs.emplace_back("odd/\xc3\xa9\n\x01\"name", peft::view(odd.data(), 1, 1), std::vector<std::uint64_t>{1});
    refs.emplace_back("empty", st::Dtype::F32, std::vector<std::uint64_t>{0, 3}, std::span<const std::byte>{});
    refs.emplace_back("scalar", st::Dtype::F32, std::vector<std::uint64_t>{}, as_bytes(scalar));
    refs.emplace_back("ids", st::Dtype::I64, std::vector<std::uint64_t>{3}, as_bytes(ids));
  }
};
}  // namespace

TEST_CASE("the writer's output is byte-identical to Python's safetensors", "[safetensors][interop]") {
  const Golden g;
  const std::vector<std::byte> want = read_all(data_dir() / "valid" / "py_golden.safetensors");
  const std::vector<std::byte> got = st::serialize(g.refs, {{"format", "pt"}});
  CHECK(got.size() == want.size());
  CHECK(got == want);
  if (got != want) {
    const auto h = [](const std::vector<std::byte>& b) { return std::string(reinterpret_cast<const char*>(b.data()), std::min<std::size_t>(b.size(), 400)); };
    WARN("expected: " << h(want) << "\ngot:      " << h(got));
  }
  // {"format": "pt"} is the default metadata, and the file on disk holds the same bytes
  CHECK(st::serialize(g.refs) == want);
  TempDir dir;
  st::write(dir / "golden.safetensors", g.refs);
  CHECK(read_all(dir / "golden.safetensors") == want);
}

TEST_CASE("write then read: dtypes, strided views, metadata, alignment", "[safetensors]") {
  TempDir dir;
  const fs::path path = dir / "model.safetensors";
  std::vector<float> big(7 * 10);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = float(i) - 3.5f;
  const peft::ConstMatrixView<float> strided(big.data() + 2, 7, 5, 10);  // columns 2..6 of a [7, 10] matrix
  std::vector<double> d{1.0, -2.0, 1e-310};
  std::vector<std::uint16_t> h{st::float_to_half(0.5f), st::float_to_half(-65504.0f), 0x7c00};
  std::vector<std::uint8_t> u{1, 2, 3};  // 3 bytes: the next tensors would be misaligned without the ordering
  std::vector<float> bias{1, 2, 3};
  st::write(path,
            {{"strided", strided},
             {"bias", peft::view(bias.data(), 1, 3), {3}},
             {"d", peft::view(d.data(), 3, 1)},
             {"h", st::Dtype::F16, {3}, as_bytes(h)},
             {"u", st::Dtype::U8, {3}, as_bytes(u)},
             {"scalar", peft::view(bias.data(), 1, 1), std::vector<std::uint64_t>{}}},
            {{"base_model", "org/model"}});
  const st::File f(path);
  CHECK(f.names() == std::vector<std::string>{"bias", "d", "h", "scalar", "strided", "u"});
  CHECK(f.info("scalar").shape.empty());
  CHECK(f.tensor_f32("scalar")(0, 0) == 1.0f);
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().at("base_model") == "org/model");
  CHECK(f.header_size() % 8 == 0);
  for (const auto& n : f.names()) {
    const auto& t = f.info(n);
    INFO(n);
    CHECK((f.data_offset() + t.begin) % std::max<std::uint32_t>(1, st::bit_size(t.dtype) / 8) == 0);
  }
  const auto s = f.tensor_f32("strided");
  CHECK(f.zero_copy_f32("strided"));
  REQUIRE(s.rows == 7);
  REQUIRE(s.cols == 5);
  for (int i = 0; i < 7; ++i)
    for (int j = 0; j < 5; ++j) CHECK(s(i, j) == strided(i, j));
  CHECK(f.info("bias").shape == std::vector<std::uint64_t>{3});
  CHECK(f.info("strided").shape == std::vector<std::uint64_t>{7, 5});
  std::vector<double> dd(3);
  f.read_as<double>("d", dd);
  CHECK(dd == d);
  CHECK(f.tensor_f64("d").data == reinterpret_cast<const double*>(f.bytes("d").data()));  // aligned F64: zero-copy too
  const auto hv = f.tensor_f32("h");
  CHECK(hv(0, 0) == 0.5f);
  CHECK(hv(0, 1) == -65504.0f);
  CHECK(std::isinf(hv(0, 2)));
  CHECK(std::memcmp(f.bytes("u").data(), u.data(), 3) == 0);

  SECTION("user metadata may override format; a rewrite from the File's own tensors round-trips") {
    std::vector<st::TensorRef> refs;
    for (const auto& n : f.names()) refs.push_back(f.ref(n));
    st::write(path, refs, {{"format", "np"}});  // replaces the file f still maps
    CHECK(s(6, 4) == strided(6, 4));           // the old mapping is untouched by the rename
    const st::File g(path);
    CHECK(g.metadata().size() == 1);
    CHECK(g.metadata().at("format") == "np");
    for (const auto& n : f.names()) {
      INFO(n);
      CHECK(std::ranges::equal(g.bytes(n), f.bytes(n)));
      CHECK(g.info(n).shape == f.info(n).shape);
    }
  }
}

TEST_CASE("16-bit storage types: bf16 and half views write as BF16 and F16, read_as converts into them", "[safetensors]") {
  TempDir dir;
  const fs::path path = dir / "half.safetensors";
  const std::vector<float> vals{1.0f, -0.333333f, 65504.0f, 1e-6f, 3.14159f, -0.0f};
  std::vector<peft::bf16> b(vals.begin(), vals.end());
  std::vector<peft::half> h(vals.begin(), vals.end());
  std::vector<float> f32(vals);
  st::write(path, {{"b", peft::ConstMatrixView<peft::bf16>(b.data(), 2, 3)},
                   {"h", peft::ConstMatrixView<peft::half>(h.data(), 1, 6), {6}},
                   {"f", peft::view(f32.data(), 2, 3)}});
  const st::File f(path);
  CHECK(f.info("b").dtype == st::Dtype::BF16);
  CHECK(f.info("b").shape == std::vector<std::uint64_t>{2, 3});
  CHECK(f.info("h").dtype == st::Dtype::F16);
  CHECK(f.info("h").shape == std::vector<std::uint64_t>{6});
  CHECK(std::memcmp(f.bytes("b").data(), b.data(), 12) == 0);  // the bits as they are
  CHECK(std::memcmp(f.bytes("h").data(), h.data(), 12) == 0);
  std::vector<peft::bf16> rb(6);
  std::vector<peft::half> rh(6);
  std::vector<float> rf(6);
  f.read_as<peft::bf16>("b", rb);  // BF16 -> bf16: a copy
  f.read_as<peft::half>("h", rh);  // F16 -> half: a copy
  f.read_as<float>("b", rf);       // BF16 -> float: exact
  for (std::size_t i = 0; i < 6; ++i) {
    INFO("element " << i);
    CHECK(rb[i].bits == b[i].bits);
    CHECK(rh[i].bits == h[i].bits);
    CHECK(rf[i] == float(b[i]));
  }
  f.read_as<peft::bf16>("f", rb);  // F32 -> bf16 and F16 -> bf16: rounded to nearest even, as the constructor
  for (std::size_t i = 0; i < 6; ++i) CHECK(rb[i].bits == peft::bf16(vals[i]).bits);
  f.read_as<peft::bf16>("h", rb);
  for (std::size_t i = 0; i < 6; ++i) CHECK(rb[i].bits == peft::bf16(float(h[i])).bits);
  f.read_as<peft::half>("f", rh);  // F32 -> half: 1e-6 becomes a subnormal, 65504 stays finite
  for (std::size_t i = 0; i < 6; ++i) CHECK(rh[i].bits == peft::half(vals[i]).bits);
  std::vector<peft::half> wrong(5);
  CHECK_THROWS_AS(f.read_as<peft::half>("f", wrong), peft::ShapeError);
}

TEST_CASE("the writer refuses bad input before creating anything", "[safetensors]") {
  TempDir dir;
  const fs::path path = dir / "x.safetensors";
  std::vector<float> v(4, 1.0f);
  const auto bytes = as_bytes(v);
  CHECK_THROWS_WITH(st::write(path, {{"a", st::Dtype::F32, {2}, bytes}}), Catch::Contains("tensor 'a': shape [2] x F32 = 8 bytes, but the data holds 16"));
  CHECK_THROWS_AS(st::write(path, {{"a", st::Dtype::F32, {2}, bytes}}), peft::ShapeError);
  CHECK_THROWS_WITH(st::write(path, {{"a", st::Dtype::F32, {4}, bytes}, {"a", st::Dtype::F32, {4}, bytes}}), Catch::Contains("duplicate tensor name 'a'"));
  CHECK_THROWS_WITH(st::write(path, {{"__metadata__", st::Dtype::F32, {4}, bytes}}), Catch::Contains("'__metadata__' cannot be a tensor name"));
  CHECK_THROWS_WITH(st::write(path, {{"bad\xff", st::Dtype::F32, {4}, bytes}}), Catch::Contains("is not valid UTF-8"));
  CHECK_THROWS_WITH(st::write(path, {{"a", st::Dtype::F32, {4}, bytes}}, {{"k", "\xc0\xaf"}}), Catch::Contains("metadata entry 'k' is not valid UTF-8"));
  CHECK_THROWS_WITH(st::write(path, {{"a", st::Dtype::F4, {3}, bytes}}), Catch::Contains("12 bits, not a whole number of bytes"));
  CHECK(fs::is_empty(dir.path));
  // an unwritable destination: system_error, nothing left behind
  CHECK_THROWS_AS(st::write(dir / "no_such_dir" / "x.safetensors", {{"a", st::Dtype::F32, {4}, bytes}}), std::system_error);
  // a directory in the way: the rename fails, the temporary file is removed
  fs::create_directories(dir / "taken.safetensors" / "sub");
  CHECK_THROWS_AS(st::write(dir / "taken.safetensors", {{"a", st::Dtype::F32, {4}, bytes}}), std::system_error);
  for (const auto& de : fs::directory_iterator(dir.path)) CHECK(de.path().filename() == "taken.safetensors");
}

TEST_CASE("a save aborted by an exception leaves the previous checkpoint intact", "[safetensors][atomic]") {
  TempDir dir;
  const fs::path path = dir / "ckpt.safetensors";
  std::vector<float> old_w{1, 2, 3, 4};
  st::write(path, {{"w", peft::view(old_w.data(), 2, 2)}});
  const std::vector<std::byte> before = read_all(path);
  std::vector<float> big(1 << 20, 5.0f);  // 4 MiB
  st::WriteOptions opt;
  opt.chunk_bytes = 1 << 16;
  int calls = 0;
  opt.on_chunk = [&](std::uint64_t written, std::uint64_t total) {
    CHECK(written <= total);
    if (++calls == 10) throw std::runtime_error("disk full (simulated)");
  };
  CHECK_THROWS_WITH(st::write(path, {{"w", peft::view(big.data(), 1024, 1024)}}, {}, opt), "disk full (simulated)");
  CHECK(calls == 10);
  CHECK(read_all(path) == before);
  std::size_t entries = 0;
  for (const auto& de : fs::directory_iterator(dir.path)) { ++entries; CHECK(de.path() == path); }
  CHECK(entries == 1);
  CHECK(st::File(path).tensor_f32("w")(1, 1) == 4.0f);
}

TEST_CASE("a save killed mid-write (SIGKILL) leaves the previous checkpoint intact", "[safetensors][atomic]") {
  TempDir dir;
  const fs::path path = dir / "ckpt.safetensors";
  const bool had_old = GENERATE(true, false);
  INFO((had_old ? "over an existing checkpoint" : "with no previous checkpoint"));
  std::vector<float> old_w{1, 2, 3, 4, 5, 6};
  if (had_old) st::write(path, {{"w", peft::view(old_w.data(), 2, 3)}}, {{"step", "100"}});
  const std::vector<std::byte> before = had_old ? read_all(path) : std::vector<std::byte>{};

  int pfd[2];
  REQUIRE(::pipe(pfd) == 0);
  const std::uint64_t expected_total = 8 * 1024 * 1024;
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {  // child: start a 32 MiB save and stop in the middle of it, waiting to be killed
    ::close(pfd[0]);
    std::vector<float> big(expected_total, 0.25f);
    st::WriteOptions opt;
    opt.chunk_bytes = 1 << 20;
    opt.on_chunk = [&](std::uint64_t written, std::uint64_t total) {
      if (written >= total / 3) {
        const char c = 'x';
        (void)!::write(pfd[1], &c, 1);
        for (;;) ::pause();
      }
    };
    try {
      st::write(path, {{"w", peft::view(big.data(), 1024, peft::Index(expected_total / 1024))}}, {{"step", "200"}}, opt);
    } catch (...) {
      ::_exit(2);
    }
    ::_exit(3);  // not reached: the parent kills us first
  }
  ::close(pfd[1]);
  char c = 0;
  const ssize_t got = ::read(pfd[0], &c, 1);
  ::close(pfd[0]);
  REQUIRE(got == 1);  // the child is in the middle of writing
  REQUIRE(::kill(pid, SIGKILL) == 0);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFSIGNALED(status));
  REQUIRE(WTERMSIG(status) == SIGKILL);

  // the final name holds the old checkpoint, byte for byte, or nothing at all
  if (had_old) {
    CHECK(read_all(path) == before);
    const st::File f(path);
    CHECK(f.metadata().at("step") == "100");
    CHECK(f.tensor_f32("w")(1, 2) == 6.0f);
  } else {
    CHECK_FALSE(fs::exists(path));
  }
  // the partial data went to the child's temporary file only
  std::size_t temps = 0;
  for (const auto& de : fs::directory_iterator(dir.path)) {
    if (de.path() == path) continue;
    ++temps;
    const std::string name = de.path().filename().string();
    CHECK(name.rfind("ckpt.safetensors.tmp." + std::to_string(pid) + ".", 0) == 0);
    CHECK(fs::file_size(de.path()) > 0);
    CHECK(fs::file_size(de.path()) < expected_total * 4);
    CHECK_THROWS_AS(st::File(de.path()), peft::FormatError);  // a partial file is never mistaken for a good one
  }
  CHECK(temps == 1);
  // and the next save succeeds
  std::vector<float> w2{9, 9};
  st::write(path, {{"w", peft::view(w2.data(), 1, 2)}});
  CHECK(st::File(path).tensor_f32("w")(0, 1) == 9.0f);
}

TEST_CASE("loading is zero-copy: untouched tensors are never read", "[safetensors][zero_copy]") {
  TempDir dir;
  const fs::path path = dir / "base.safetensors";
  constexpr std::size_t big_n = std::size_t(16) << 20;  // 64 MiB of F32
  {
    std::vector<float> big(big_n, 1.0f), small(1024, 2.0f);
    st::WriteOptions opt;
    opt.sync = false;
    st::write(path, {{"big", peft::view(big.data(), 4096, peft::Index(big_n / 4096))}, {"small", peft::view(small.data(), 1, 1024)}}, {}, opt);
  }  // the source buffers are freed here
  const std::size_t r0 = rss_bytes();
  const st::File f(path);
  const std::size_t r1 = rss_bytes();
  const auto v = f.tensor_f32("small");
  REQUIRE(f.zero_copy_f32("small"));
  double sum = 0;
  for (peft::Index j = 0; j < v.cols; ++j) sum += v(0, j);
  CHECK(sum == 2048.0);
  const std::size_t r2 = rss_bytes();
  const auto grown = [](std::size_t a, std::size_t b) { return b > a ? b - a : 0; };
  INFO("RSS growth: open " << grown(r0, r1) / 1024 << " KiB, touching one small tensor " << grown(r1, r2) / 1024
                           << " KiB; file " << fs::file_size(path) / (1024 * 1024) << " MiB");
  // Not zero: the header page is mapped, and kernels with large page-cache folios (Linux 6.x on ext4)
  // map a whole folio of up to 2 MiB of the just-written, cached file on one fault. Bounded per touched
  // place, not proportional to the file (docs/interop.md has the cold-cache 1 GiB numbers).
  CHECK(grown(r0, r2) < (std::size_t(8) << 20));
  // control: touching the big tensor does grow RSS by about its size, so the measurement can see reads
  const auto b = f.tensor_f32("big");
  REQUIRE(f.zero_copy_f32("big"));
  double s2 = 0;
  const float* p = b.data;
  for (std::size_t i = 0; i < big_n; i += 1024) s2 += p[i];  // one float per 4 KiB page
  CHECK(s2 == double(big_n / 1024));
  const std::size_t r3 = rss_bytes();
  INFO("RSS after touching the 64 MiB tensor: +" << grown(r2, r3) / (1024 * 1024) << " MiB");
  CHECK(grown(r2, r3) > (std::size_t(48) << 20));
}

// Hidden (not run by ctest): writes files for the Python-side check of the writer,
//   PEFT_SAFETENSORS_EXPORT_DIR=/tmp/x tests/test_safetensors "[.export]"
//   python tests/data/safetensors/check_cpp_output.py /tmp/x
TEST_CASE("export files for the Python check", "[.export]") {
  const char* env = std::getenv("PEFT_SAFETENSORS_EXPORT_DIR");
  if (!env) {
    WARN("PEFT_SAFETENSORS_EXPORT_DIR is not set; nothing exported");
    return;
  }
  const fs::path out(env);
  fs::create_directories(out);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> w(64 * 48);
  for (auto& x : w) x = nd(rng);
  const peft::ConstMatrixView<float> strided(w.data() + 5, 64, 40, 48);
  std::vector<std::uint16_t> h, b;
  std::vector<float> hf, bfv;
  for (int i = 0; i < 37; ++i) {
    const float x = nd(rng) * 100.0f;
    h.push_back(st::float_to_half(x));
    b.push_back(st::float_to_bfloat16(x));
  }
  for (std::uint16_t s : {0x0001, 0x8000, 0x7c00, 0xfc00, 0x7e00, 0x7bff, 0x03ff}) h.push_back(s);
  std::vector<double> d{std::numbers::pi, -1e300, 5e-324, 0.0};
  std::vector<std::int64_t> ids{-1, 0, 1, std::numeric_limits<std::int64_t>::max()};
  std::vector<std::uint8_t> mask{1, 0, 1};
  std::vector<float> scalar{42.0f};
  json expected;
  auto record = [&](const std::string& name, const std::string& dtype, std::vector<std::uint64_t> shape, json values) {
    expected["tensors"][name] = {{"dtype", dtype}, {"shape", shape}, {"values", values}};
  };
  json sv = json::array();
  for (peft::Index i = 0; i < strided.rows; ++i)
    for (peft::Index j = 0; j < strided.cols; ++j) sv.push_back(strided(i, j));
  record("model.layers.0.q_proj.lora_A.weight", "float32", {64, 40}, sv);
  json hv = json::array(), bv = json::array();
  for (auto x : h) hv.push_back(x);
  for (auto x : b) bv.push_back(x);
  record("half", "float16_bits", {h.size()}, hv);
  record("bf", "bfloat16_bits", {b.size()}, bv);
  record("dbl", "float64", {2, 2}, d);
  record("ids", "int64", {4}, ids);
  record("mask", "bool", {3}, json::array({true, false, true}));
  record("scalar", "float32", {}, json::array({42.0}));
  record("empty", "float32", {0, 7}, json::array());
  record("\xc3\xa9t\xc3\xa9/\"q\"", "float32", {1}, json::array({42.0}));
  expected["metadata"] = {{"format", "pt"}, {"peft_version", "peft++ 0.1"}, {"note", "line1\nline2 \xe2\x9c\x93"}};
  st::write(out / "cpp_written.safetensors",
            {{"model.layers.0.q_proj.lora_A.weight", strided},
             {"half", st::Dtype::F16, {h.size()}, as_bytes(h)},
             {"bf", st::Dtype::BF16, {b.size()}, as_bytes(b)},
             {"dbl", peft::view(d.data(), 2, 2)},
             {"ids", st::Dtype::I64, {4}, as_bytes(ids)},
             {"mask", st::Dtype::BOOL, {3}, as_bytes(mask)},
             {"scalar", peft::view(scalar.data(), 1, 1), std::vector<std::uint64_t>{}},
             {"empty", st::Dtype::F32, {0, 7}, std::span<const std::byte>{}},
             {"\xc3\xa9t\xc3\xa9/\"q\"", peft::view(scalar.data(), 1, 1), {1}}},
            {{"peft_version", "peft++ 0.1"}, {"note", "line1\nline2 \xe2\x9c\x93"}});
  std::ofstream(out / "cpp_written.json") << expected.dump(1);
  // and the golden tensors, which must equal py_golden.safetensors byte for byte
  const Golden g;
  st::write(out / "cpp_golden.safetensors", g.refs);
}
