// Reading Fashion-MNIST (or MNIST) from the IDX files, gzip-compressed or not, with zlib.
//
// IDX: a 4-byte magic (0, 0, type, number of dimensions; type 0x08 = unsigned byte), the dimensions as
// big-endian 32-bit integers, then the data in C order. Images are [n, 28, 28] (magic 0x00000803), labels
// [n] (magic 0x00000801). Every problem throws std::runtime_error with a message that names the file and
// what is wrong: missing, not gzip/IDX, wrong magic or dimensions, truncated, trailing bytes, labels out
// of range, image and label counts that disagree.
#pragma once

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace fashion {

inline constexpr int kRows = 28, kCols = 28, kPixels = kRows * kCols;

/// Images as bytes (row i = pixels [i·784, (i+1)·784)) and their labels 0–9.
struct Dataset {
  std::vector<std::uint8_t> pixels;
  std::vector<int> labels;
  std::size_t size() const { return labels.size(); }
  const std::uint8_t* image(std::size_t i) const { return pixels.data() + i * kPixels; }
};

/// A gzip (or plain) file read with zlib; every failure names the file.
class GzReader {
 public:
  explicit GzReader(std::string path) : path_(std::move(path)) {
    if (!std::filesystem::exists(path_))
      throw std::runtime_error(path_ + ": file not found (Fashion-MNIST is Debian's dataset-fashion-mnist package: "
                                       "sudo apt-get install dataset-fashion-mnist; or pass --data-dir)");
    f_ = gzopen(path_.c_str(), "rb");
    if (!f_) throw std::runtime_error(path_ + ": cannot open: " + std::strerror(errno));
    gzbuffer(f_, 1 << 16);
  }
  GzReader(const GzReader&) = delete;
  GzReader& operator=(const GzReader&) = delete;
  ~GzReader() {
    if (f_) gzclose(f_);
  }

  /// Reads up to n bytes; returns how many were read (short only at the end of the data).
  std::size_t read(void* out, std::size_t n) {
    std::size_t done = 0;
    while (done < n) {
      const unsigned chunk = unsigned(std::min<std::size_t>(n - done, 1u << 30));
      const int got = gzread(f_, static_cast<char*>(out) + done, chunk);
      if (got < 0) {
        int code = 0;
        const char* msg = gzerror(f_, &code);
        throw std::runtime_error(path_ + ": corrupt or unreadable gzip data (" + (msg ? msg : "unknown zlib error") + ")");
      }
      if (got == 0) break;
      done += std::size_t(got);
    }
    return done;
  }
  /// Reads exactly n bytes or throws, naming what was being read.
  void read_exact(void* out, std::size_t n, const std::string& what) {
    const std::size_t got = read(out, n);
    if (got != n)
      throw std::runtime_error(path_ + ": truncated: the file ends inside " + what + " (" + std::to_string(got) + " of " + std::to_string(n) +
                               " bytes)");
  }
  /// Throws if any byte follows the expected data.
  void expect_end(const std::string& after) {
    char c;
    if (read(&c, 1) != 0) throw std::runtime_error(path_ + ": unexpected trailing bytes after " + after);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  gzFile f_ = nullptr;
};

inline std::uint32_t be32(const unsigned char* p) { return std::uint32_t(p[0]) << 24 | std::uint32_t(p[1]) << 16 | std::uint32_t(p[2]) << 8 | p[3]; }

inline std::string hex32(std::uint32_t v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

/// Reads an IDX header with `ndims` dimensions and magic 0x000008<ndims>; returns the dimensions.
inline std::vector<std::uint32_t> read_idx_header(GzReader& f, int ndims, const char* kind) {
  unsigned char head[4];
  f.read_exact(head, 4, "the IDX magic number");
  const std::uint32_t magic = be32(head), expected = 0x00000800u | std::uint32_t(ndims);
  if (magic != expected) {
    std::string hint;
    if (head[0] == 0x1f && head[1] == 0x8b) hint = " (still gzip-compressed inside: compressed twice?)";
    else if ((magic & 0xffffff00u) == 0x00000800u) hint = " (an IDX file, but with " + std::to_string(magic & 0xff) + " dimensions: the wrong file?)";
    throw std::runtime_error(f.path() + ": not an IDX " + kind + " file: magic number " + hex32(magic) + ", expected " + hex32(expected) + hint);
  }
  std::vector<std::uint32_t> dims(static_cast<std::size_t>(ndims));
  for (auto& d : dims) {
    unsigned char b[4];
    f.read_exact(b, 4, "the IDX dimensions");
    d = be32(b);
  }
  return dims;
}

/// The path of `name` in `dir`: `name` + ".gz" if it exists, else `name` uncompressed if that exists, else
/// the .gz path (so that the error names what was looked for).
inline std::string find_file(const std::string& dir, const std::string& name) {
  const auto gz = std::filesystem::path(dir) / (name + ".gz");
  if (std::filesystem::exists(gz)) return gz.string();
  const auto plain = std::filesystem::path(dir) / name;
  if (std::filesystem::exists(plain)) return plain.string();
  return gz.string();
}

/// Checks that both files of a split exist and start with valid IDX headers that agree (cheap: reads
/// 16 bytes of each); returns the number of examples. Throws with a clear message otherwise.
inline std::size_t check_split(const std::string& dir, const std::string& split) {
  GzReader li(find_file(dir, split + "-labels-idx1-ubyte"));
  const auto ld = read_idx_header(li, 1, "label");
  GzReader ii(find_file(dir, split + "-images-idx3-ubyte"));
  const auto id = read_idx_header(ii, 3, "image");
  if (id[1] != kRows || id[2] != kCols)
    throw std::runtime_error(ii.path() + ": images are " + std::to_string(id[1]) + "x" + std::to_string(id[2]) + ", expected 28x28");
  if (id[0] != ld[0])
    throw std::runtime_error(ii.path() + " holds " + std::to_string(id[0]) + " images but " + li.path() + " holds " + std::to_string(ld[0]) + " labels");
  return id[0];
}

/// Reads split "train" or "t10k" from `dir`, keeping the examples whose label satisfies `keep`, at most
/// `limit` of them (0: all), in file order. Images are streamed, so only the kept ones are in memory.
inline Dataset load_split(const std::string& dir, const std::string& split, const std::function<bool(int)>& keep, std::size_t limit = 0) {
  GzReader li(find_file(dir, split + "-labels-idx1-ubyte"));
  const auto ld = read_idx_header(li, 1, "label");
  std::vector<std::uint8_t> labels(ld[0]);
  li.read_exact(labels.data(), labels.size(), "the labels (header says " + std::to_string(ld[0]) + ")");
  li.expect_end(std::to_string(ld[0]) + " labels");
  for (std::size_t i = 0; i < labels.size(); ++i)
    if (labels[i] > 9) throw std::runtime_error(li.path() + ": label " + std::to_string(labels[i]) + " at index " + std::to_string(i) + " is not in 0..9");

  GzReader ii(find_file(dir, split + "-images-idx3-ubyte"));
  const auto id = read_idx_header(ii, 3, "image");
  if (id[1] != kRows || id[2] != kCols)
    throw std::runtime_error(ii.path() + ": images are " + std::to_string(id[1]) + "x" + std::to_string(id[2]) + ", expected 28x28");
  if (id[0] != ld[0])
    throw std::runtime_error(ii.path() + " holds " + std::to_string(id[0]) + " images but " + li.path() + " holds " + std::to_string(ld[0]) + " labels");

  Dataset d;
  std::size_t kept = 0;  // reserve exactly: no reallocation, no transient second copy
  for (std::size_t i = 0; i < labels.size(); ++i) kept += keep(labels[i]) && (!limit || kept < limit);
  d.pixels.reserve(kept * kPixels);
  d.labels.reserve(kept);
  std::vector<std::uint8_t> img(kPixels);
  for (std::size_t i = 0; i < labels.size(); ++i) {
    ii.read_exact(img.data(), img.size(), "image " + std::to_string(i) + " of " + std::to_string(id[0]));
    if (!keep(labels[i]) || (limit && d.size() >= limit)) continue;
    d.pixels.insert(d.pixels.end(), img.begin(), img.end());
    d.labels.push_back(labels[i]);
  }
  ii.expect_end(std::to_string(id[0]) + " images of 28x28");
  return d;
}

}  // namespace fashion
