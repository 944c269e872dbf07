// Shared helpers for the file and checkpoint tests: scratch directories, whole-file text I/O, captured
// warnings, exception-message checks, and where the golden PEFT checkpoints are.
#pragma once

#include <catch2/catch.hpp>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <peft/io/adapter_config.hpp>
#include <string>
#include <unistd.h>
#include <vector>

#ifndef PEFT_CHECKPOINT_DIR
#define PEFT_CHECKPOINT_DIR PEFT_TEST_DATA_DIR "/../checkpoints"
#endif

namespace peft::test {

/// A fresh temporary directory (unique per process and object), removed with everything in it.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& prefix = "peft_test") {
    static std::atomic<int> n{0};
    path = std::filesystem::temp_directory_path() / (prefix + "_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::filesystem::path operator/(const std::string& s) const { return path / s; }
};

inline void write_text(const std::filesystem::path& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }
inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

/// Collects the library's warnings for the life of the object.
struct CaptureWarnings {
  std::vector<std::string> got;
  io::WarningSink old;
  CaptureWarnings() { old = io::set_warning_sink([this](const std::string& m) { got.push_back(m); }); }
  ~CaptureWarnings() { io::set_warning_sink(old); }
};

/// f() must throw E with a message containing every one of `parts`.
template <class E>
void require_throws_with(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
    FAIL("no exception");
  } catch (const E& e) {
    const std::string m = e.what();
    CAPTURE(m);
    for (const auto& p : parts) CHECK(m.find(p) != std::string::npos);
  }
}

/// The committed golden checkpoints written by real PEFT (tests/reference/checkpoints).
inline std::string committed_checkpoints() { return PEFT_CHECKPOINT_DIR; }
/// Where the golden cases are read from: PEFT_GOLDEN_CHECKPOINT_DIR when set (the optional `python` ctests
/// regenerate them into the build tree and point it there), else the committed ones.
inline std::string golden_checkpoints() {
  const char* env = std::getenv("PEFT_GOLDEN_CHECKPOINT_DIR");
  return env && *env ? std::string(env) : committed_checkpoints();
}

}  // namespace peft::test
