// peft++ — small POSIX file helpers for checkpoint I/O: a read-only memory mapping and an atomic
// (temporary file + fsync + rename) writer. Opt-in: nothing in <peft/peft.hpp> includes this header.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include "peft/errors.hpp"

namespace peft {


namespace io {

namespace detail {

[[noreturn]] inline void throw_errno(int err, std::string_view what, const std::filesystem::path& path) {
  throw std::system_error(err, std::generic_category(), peft::detail::cat(what, " ", path.string()));
}

inline int retry_open(const char* path, int flags, mode_t mode = 0) {
  for (;;) {
    const int fd = ::open(path, flags, mode);
    if (fd >= 0 || errno != EINTR) return fd;
  }
}

}  // namespace detail

/// A whole file mapped read-only (`PROT_READ`, `MAP_PRIVATE`). Pages are read from disk when first
/// touched, so mapping a large file costs neither time nor resident memory until its bytes are used.
/// The file descriptor is closed right after mapping. Move-only; the mapping lives until destruction.
///
/// Caveat of every mmap reader: if another process truncates the file while it is mapped, touching the
/// lost pages raises SIGBUS. Files replaced through `atomic_write` (rename) are safe: the mapping keeps the
/// old inode alive.
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::filesystem::path& path) {
    const int fd = detail::retry_open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) detail::throw_errno(errno, "cannot open", path);
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      detail::throw_errno(err, "cannot stat", path);
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw std::system_error(std::make_error_code(std::errc::invalid_argument),
                              peft::detail::cat("not a regular file: ", path.string()));
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        detail::throw_errno(err, "cannot mmap", path);
      }
      data_ = static_cast<const std::byte*>(p);
    }
    ::close(fd);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  MappedFile& operator=(MappedFile&& o) noexcept {
    if (this != &o) {
      unmap();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~MappedFile() { unmap(); }

  const std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }

 private:
  void unmap() noexcept {
    if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
    size_ = 0;
  }
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

/// An open, not yet visible temporary file next to `path`, written through `write()`, made visible under
/// `path` by `commit()` (fsync, close, rename over `path`, fsync of the directory). If `commit()` is never
/// reached (an exception, an early return), the destructor removes the temporary file, and whatever was
/// at `path` before is untouched. If the process dies instead (SIGKILL, power loss), the temporary file
/// `<path>.tmp.<pid>.<n>` may remain, but `path` itself is either the old file or the complete new one.
///
/// The new file is created with mode 0666 minus the umask; it replaces `path` itself (if `path` is a
/// symbolic link, the link is replaced, not its target).
class AtomicFile {
 public:
  explicit AtomicFile(std::filesystem::path path, bool sync = true) : path_(std::move(path)), sync_(sync) {
    static std::atomic<unsigned long> counter{0};
    tmp_ = path_;
    tmp_ += peft::detail::cat(".tmp.", ::getpid(), ".", counter.fetch_add(1));
    fd_ = detail::retry_open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ < 0) detail::throw_errno(errno, "cannot create", tmp_);
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile() { abandon(); }

  const std::filesystem::path& path() const noexcept { return path_; }
  const std::filesystem::path& temp_path() const noexcept { return tmp_; }

  /// Writes all of `bytes` (retrying short writes and EINTR); throws std::system_error on failure.
  void write(std::span<const std::byte> bytes) {
    if (fd_ < 0) throw std::logic_error("AtomicFile::write after commit");
    const std::byte* p = bytes.data();
    std::size_t left = bytes.size();
    while (left > 0) {
      const ssize_t n = ::write(fd_, p, std::min<std::size_t>(left, std::size_t(1) << 30));
      if (n < 0) {
        if (errno == EINTR) continue;
        detail::throw_errno(errno, "cannot write", tmp_);
      }
      p += n;
      left -= static_cast<std::size_t>(n);
    }
  }

  /// fsync, close, rename over the final path, fsync the directory. After a successful commit the
  /// destructor does nothing; if commit throws, the temporary file is removed.
  void commit() {
    if (fd_ < 0) throw std::logic_error("AtomicFile::commit twice");
    if (sync_ && ::fsync(fd_) != 0) detail::throw_errno(errno, "cannot fsync", tmp_);
    const int fd = std::exchange(fd_, -1);
    if (::close(fd) != 0 && errno != EINTR) {
      const int err = errno;
      ::unlink(tmp_.c_str());
      detail::throw_errno(err, "cannot close", tmp_);
    }
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
      const int err = errno;
      ::unlink(tmp_.c_str());
      detail::throw_errno(err, peft::detail::cat("cannot rename ", tmp_.string(), " to"), path_);
    }
    committed_ = true;
    if (sync_) {
      // Make the rename itself durable. Some file systems refuse fsync on directories (EINVAL): the
      // data is already safe there, so that is not an error.
      std::filesystem::path dir = path_.parent_path();
      if (dir.empty()) dir = ".";
      const int dfd = detail::retry_open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      if (dfd >= 0) {
        const int rc = ::fsync(dfd);
        const int err = errno;
        ::close(dfd);
        if (rc != 0 && err != EINVAL && err != EROFS) detail::throw_errno(err, "cannot fsync directory", dir);
      }
    }
  }

 private:
  void abandon() noexcept {
    if (fd_ >= 0) ::close(std::exchange(fd_, -1));
    if (!committed_ && !tmp_.empty()) ::unlink(tmp_.c_str());
    committed_ = true;
  }
  std::filesystem::path path_;
  std::filesystem::path tmp_;
  int fd_ = -1;
  bool sync_ = true;
  bool committed_ = false;
};

}  // namespace io
}  // namespace peft
