// peft++ — the CUDA backend policy: device memory through RAII buffers (cudaMalloc, never managed memory),
// cuBLAS for GEMMs, peft's own kernels for the element-wise steps and reductions.
//
//   using GpuLoraLinear = peft::Adapted<peft::Linear<float, peft::CudaBackend>, peft::Lora>;
//
// This header is plain C++ (no CUDA headers, no device code): it compiles with g++ and only declares what
// the compiled `peft::cuda` library (src/cuda/*.cu, CMake option PEFT_ENABLE_CUDA) defines. Views have the
// same type as on the CPU; on this backend their pointer is a device pointer. Host and device memory meet
// only through the explicit copies `upload` and `download`.
//
// Streams: every operation runs on the calling thread's current stream (`cuda::set_current_stream`, default
// the legacy default stream). cuBLAS handles are per (thread, device), made at context creation
// (`GemmScratch::reserve_gemm`) with a fixed workspace, so forward and backward make no device allocation.
//
// Scalar types: float, double, and the 16-bit storage types peft::bf16 and peft::half (peft/half.hpp) are
// compiled in the library. With 16-bit storage every kernel computes in float and GEMMs run through
// cublasGemmEx with CUBLAS_COMPUTE_32F (fp32 accumulation). double serves the tight comparisons with the CPU
// backend in the tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "peft/backend/trans.hpp"
#include "peft/conv_geometry.hpp"
#include "peft/errors.hpp"
#include "peft/half.hpp"
#include "peft/backend/nn_kernels.hpp"
#include "peft/backend/train_kernels.hpp"
#include "peft/param.hpp"
#include "peft/rng.hpp"
#include "peft/view.hpp"

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace peft {

/// A CUDA runtime or cuBLAS call that failed. The message names the call, the error and the source line.
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace cuda {

/// A CUDA stream (the same type as cudaStream_t); nullptr is the legacy default stream.
using Stream = CUstream_st*;

/// Number of CUDA devices; 0 when there is none or no usable driver (never throws).
int device_count() noexcept;
/// The name of the current device ("NVIDIA H200", ...).
std::string device_name();
/// Free and total memory of the current device, in bytes (cudaMemGetInfo).
struct MemInfo {
  std::size_t free = 0, total = 0;
};
MemInfo mem_info();
/// Number of device allocations (cudaMalloc calls) made by peft's buffers and cuBLAS workspaces since the
/// process started. Tests read it before and after forward/backward: the hot path allocates nothing.
std::uint64_t allocation_count() noexcept;
/// The calling thread's current stream; every peft operation of this thread runs on it.
Stream current_stream() noexcept;
void set_current_stream(Stream s) noexcept;
/// Waits until the current stream has finished its work; throws CudaError for an earlier asynchronous failure.
void synchronize();
/// Whether the calling thread's float GEMMs may use TF32 tensor cores (cuBLAS's CUBLAS_TF32_TENSOR_OP_MATH:
/// inputs rounded to 10-bit mantissas, fp32 accumulation). Default false, as PyTorch's
/// torch.backends.cuda.matmul.allow_tf32; double and 16-bit GEMMs are unaffected.
bool allow_tf32() noexcept;
void set_allow_tf32(bool allow) noexcept;

namespace detail {
void* alloc(std::size_t bytes);
void free(void* p) noexcept;
void zero(void* p, std::size_t bytes);
/// zero() of a new allocation, complete on return: a buffer made while one stream is current may be used
/// from another (a non-blocking stream does not wait for the first).
void zero_new(void* p, std::size_t bytes);
void copy_device(void* dst, const void* src, std::size_t bytes);
/// host → device, asynchronous on the current stream; the host memory may be reused on return (pageable copy).
void upload_bytes(void* dst, const void* src, std::size_t bytes);
enum class CopyKind { host_to_device, device_to_host, device_to_device };
/// A strided copy of `height` rows of `width` bytes; host copies are complete when it returns.
void copy_2d(void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width, std::size_t height, CopyKind kind);
/// Which cuBLAS handle a GemmScratch uses: the handle of the thread (`table`, an id never reused) and device
/// that reserved it. Another thread, or another device, uses its own handle instead.
struct BlasHandle;
struct BlasRef {
  BlasHandle* handle = nullptr;
  std::uint64_t table = 0;
  int device = -1;
};
/// Makes (on first use: allocates) the calling thread's handle for the current device and its workspace for
/// the current stream, and points `ref` at it.
void reserve_blas(BlasRef& ref);
}  // namespace detail

}  // namespace cuda

/// A resizable, zero-initialised array of trivially copyable `T` in device memory (cudaMalloc). Copies are
/// deep (device to device). Only construction, `resize` and copy allocate. There is no element access from
/// the host: use CudaBackend::upload / download.
template <class T>
class DeviceBuffer {
  static_assert(std::is_trivially_copyable_v<T>);

 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) { resize(n); }
  DeviceBuffer(const DeviceBuffer& o) : DeviceBuffer(o.size_) {
    if (size_) cuda::detail::copy_device(data_, o.data_, size_ * sizeof(T));
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  DeviceBuffer& operator=(const DeviceBuffer& o) {
    if (this != &o) {
      DeviceBuffer t(o);
      swap(t);
    }
    return *this;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    DeviceBuffer t(std::move(o));
    swap(t);
    return *this;
  }
  ~DeviceBuffer() { cuda::detail::free(data_); }

  /// Resizes to `n` elements, all zero (previous contents are discarded).
  void resize(std::size_t n) {
    if (n == size_) { zero(); return; }
    cuda::detail::free(std::exchange(data_, nullptr));
    size_ = 0;
    if (n == 0) return;
    data_ = static_cast<T*>(cuda::detail::alloc(n * sizeof(T)));
    size_ = n;
    cuda::detail::zero_new(data_, n * sizeof(T));
  }
  /// Sets every element to zero bits (asynchronous on the current stream).
  void zero() { if (size_) cuda::detail::zero(data_, size_ * sizeof(T)); }

  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }

  /// The first rows*cols elements as a row-major [rows, cols] view of device memory.
  MatrixView<T> view(Index rows, Index cols) { check(rows, cols); return {data(), rows, cols}; }
  ConstMatrixView<T> view(Index rows, Index cols) const { check(rows, cols); return {data(), rows, cols}; }

  void swap(DeviceBuffer& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
  }

 private:
  void check(Index rows, Index cols) const {
    if (rows < 0 || cols < 0 || std::size_t(rows * cols) > size_)
      throw ShapeError(detail::cat("DeviceBuffer: a [", rows, ", ", cols, "] view does not fit in ", size_, " elements"));
  }
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

/// The CUDA backend policy: the operations of EigenCpu over device memory. Stateless; operations are
/// asynchronous on the current stream and allocate nothing (except `all_finite` and the random fills,
/// which are for merging and initialisation). Compiled for T = float, double, bf16 and half.
struct CudaBackend {
  static constexpr const char* name = "cuda";
  /// Buffers hold device memory: host code must not dereference their pointers (use upload / download).
  static constexpr bool host_accessible = false;

  template <class T>
  using buffer = DeviceBuffer<T>;

  /// What a GEMM needs besides its operands: the calling thread's cuBLAS handle for the current device
  /// (shared by every scratch of the thread, with a fixed 32 MiB workspace per stream it runs GEMMs on).
  /// `reserve_gemm` makes the handle and the current stream's workspace on first use, at context creation,
  /// so the GEMMs of forward and backward allocate nothing (a GEMM on a stream new to the thread allocates
  /// that stream's workspace once).
  template <class T>
  struct GemmScratch {
    cuda::detail::BlasRef blas;
    void reserve_gemm(Index m, Index n, Index k) {
      (void)m, (void)n, (void)k;
      cuda::detail::reserve_blas(blas);
    }
  };

  // ---- explicit copies between host and device memory ---------------------------------------------------

  /// device = host (same shapes; strided views allowed). Complete when it returns.
  template <class T>
  static void upload(std::type_identity_t<ConstMatrixView<T>> host, MatrixView<T> device) {
    same_shape(host, device, "CudaBackend::upload");
    if (!device.empty())
      cuda::detail::copy_2d(device.data, std::size_t(device.stride) * sizeof(T), host.data, std::size_t(host.stride) * sizeof(T),
                            std::size_t(device.cols) * sizeof(T), std::size_t(device.rows), cuda::detail::CopyKind::host_to_device);
  }
  /// host = device (same shapes; strided views allowed). Waits for the current stream's earlier work.
  template <class T>
  static void download(std::type_identity_t<ConstMatrixView<T>> device, MatrixView<T> host) {
    same_shape(device, host, "CudaBackend::download");
    if (!host.empty())
      cuda::detail::copy_2d(host.data, std::size_t(host.stride) * sizeof(T), device.data, std::size_t(device.stride) * sizeof(T),
                            std::size_t(host.cols) * sizeof(T), std::size_t(host.rows), cuda::detail::CopyKind::device_to_host);
  }

  // ---- the backend operations (see EigenCpu for the contract of each) ----------------------------------

  /// c = alpha * op(a) * op(b) + beta * c through cuBLAS (row-major operands, passed as their column-major
  /// transposes). beta == 0 never reads c.
  template <Trans TA, Trans TB, class T>
  static void gemm(GemmScratch<T>& scratch, std::type_identity_t<T> alpha, std::type_identity_t<ConstMatrixView<T>> a,
                   std::type_identity_t<ConstMatrixView<T>> b, std::type_identity_t<T> beta, std::type_identity_t<MatrixView<T>> c);

  template <class T>
  static void scale(MatrixView<T> y, std::type_identity_t<T> beta);
  template <class T>
  static void fill(MatrixView<T> y, std::type_identity_t<T> value);
  template <class T>
  static void copy(std::type_identity_t<ConstMatrixView<T>> x, MatrixView<T> y);
  template <class T>
  static void axpby(std::type_identity_t<T> alpha, std::type_identity_t<ConstMatrixView<T>> x, std::type_identity_t<T> beta, MatrixView<T> y);
  /// v is a device pointer to y.cols elements.
  template <class T>
  static void add_row_vector(MatrixView<T> y, const std::type_identity_t<T>* v, std::type_identity_t<T> alpha);
  /// v is a device pointer to y.rows elements.
  template <class T>
  static void add_col_vector(MatrixView<T> y, const std::type_identity_t<T>* v, std::type_identity_t<T> alpha);
  template <class T>
  static void scale_cols(MatrixView<T> y, const std::type_identity_t<T>* v);
  template <class T>
  static void scale_rows(MatrixView<T> y, const std::type_identity_t<T>* v);
  template <class T>
  static void add_scaled_cols(std::type_identity_t<ConstMatrixView<T>> x, const std::type_identity_t<T>* v, std::type_identity_t<T> beta,
                              MatrixView<T> y);
  template <class T>
  static void mul(std::type_identity_t<ConstMatrixView<T>> a, MatrixView<T> y);
  template <class T>
  static void div(std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b, MatrixView<T> y);
  /// out (device, x.rows elements) = beta * out + alpha * row sums.
  template <class T>
  static void sum_cols(std::type_identity_t<ConstMatrixView<T>> x, T* out, std::type_identity_t<T> alpha, std::type_identity_t<T> beta);
  /// out (device, x.cols elements) = beta * out + alpha * column sums.
  template <class T>
  static void sum_rows(std::type_identity_t<ConstMatrixView<T>> x, T* out, std::type_identity_t<T> alpha, std::type_identity_t<T> beta);
  template <class T>
  static void sum_rows_mul(std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b, T* out,
                           std::type_identity_t<T> alpha, std::type_identity_t<T> beta);
  template <class T>
  static void row_norms(std::type_identity_t<ConstMatrixView<T>> x, T* out);
  template <class T>
  static void col_norms(std::type_identity_t<ConstMatrixView<T>> x, T* out);
  /// Inverted dropout with the CPU's counter-based mask: element (i, j) is kept iff
  /// uniform01(seed, stream, i * cols + j) >= p, so masks agree bit for bit with EigenCpu::dropout.
  template <class T>
  static void dropout(std::type_identity_t<ConstMatrixView<T>> x, MatrixView<T> y, double p, std::uint64_t seed, std::uint64_t stream);

  /// y = Generator::uniform numbers (drawn on the host, so they equal the CPU backend's, then uploaded).
  template <class T>
  static void random_uniform(Generator& gen, MatrixView<T> y, double lo, double hi);
  /// y = Generator::normal numbers (drawn on the host, then uploaded).
  template <class T>
  static void random_normal(Generator& gen, MatrixView<T> y, double mean, double std);
  /// Whether every element is finite (synchronises; for safe merging).
  template <class T>
  static bool all_finite(ConstMatrixView<T> x);

  // ---- Kronecker products (LoKr) ------------------------------------------------------------------------

  /// c = alpha · kron(a, b) + beta · c (or its transpose), one thread per element of c.
  template <class T>
  static void kron(std::type_identity_t<T> alpha, std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b,
                   std::type_identity_t<T> beta, MatrixView<T> c, bool transposed);
  /// da(i, j) (per beta) = Σ_{p,q} g(i·b.rows + p, j·b.cols + q) · b(p, q): one block per element of da, a
  /// fixed-order tree reduction over its b.rows · b.cols terms (deterministic).
  template <class T>
  static void kron_grad_a(std::type_identity_t<ConstMatrixView<T>> g, std::type_identity_t<ConstMatrixView<T>> b, std::type_identity_t<T> beta,
                          MatrixView<T> da);
  /// db(p, q) (per beta) = Σ_{i,j} g(i·b.rows + p, j·b.cols + q) · a(i, j): one thread per element of db,
  /// summing over a in EigenCpu's order.
  template <class T>
  static void kron_grad_b(std::type_identity_t<ConstMatrixView<T>> g, std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<T> beta,
                          MatrixView<T> db);

  // ---- activations and the LSTM cell (prompt encoders; see EigenCpu for the contracts) --------------------
  template <class T>
  static void relu_forward(MatrixView<T> z);
  template <class T>
  static void relu_backward(std::type_identity_t<ConstMatrixView<T>> z, MatrixView<T> dz);
  template <class T>
  static void tanh_forward(std::type_identity_t<ConstMatrixView<T>> x, MatrixView<T> y);
  template <class T>
  static void tanh_backward(std::type_identity_t<ConstMatrixView<T>> y, MatrixView<T> dy);
  /// One time step of one row, one thread per hidden unit.
  template <class T>
  static void lstm_cell(MatrixView<T> gates, std::type_identity_t<ConstMatrixView<T>> rec, std::type_identity_t<ConstMatrixView<T>> cprev,
                        MatrixView<T> c, MatrixView<T> tc, MatrixView<T> h);
  template <class T>
  static void lstm_cell_backward(std::type_identity_t<ConstMatrixView<T>> gates, std::type_identity_t<ConstMatrixView<T>> tc,
                                 std::type_identity_t<ConstMatrixView<T>> cprev, std::type_identity_t<ConstMatrixView<T>> dy,
                                 std::type_identity_t<ConstMatrixView<T>> dh, MatrixView<T> dcn, MatrixView<T> dg);

  // ---- token ids (Embedding, LoRA on embeddings) -------------------------------------------------------

  /// Where gather/scatter find token ids: a device copy of the caller's host ids, made by `stage` (forward)
  /// into memory reserved at context creation, read again by `staged` (backward). The upload is an
  /// asynchronous copy from pageable memory: the host ids may change once `stage` returns.
  struct IndexStage {
    DeviceBuffer<std::int64_t> dev;
    Index count = 0;
    void reserve(Index max_ids) {
      if (Index(dev.size()) < max_ids) dev.resize(std::size_t(max_ids));
    }
    const std::int64_t* stage(std::span<const std::int64_t> ids) {
      if (ids.size() > dev.size())
        throw ShapeError(detail::cat("CudaBackend::IndexStage: ", ids.size(), " ids exceed the ", dev.size(), " reserved at make_context"));
      if (!ids.empty()) cuda::detail::upload_bytes(dev.data(), ids.data(), ids.size() * sizeof(std::int64_t));
      count = Index(ids.size());
      return dev.data();
    }
    const std::int64_t* staged() const noexcept { return dev.data(); }
  };

  /// out[i, :] = alpha · table[ids[i], :] + beta · out[i, :]; ids: device pointer (IndexStage), range-checked.
  template <class T>
  static void gather_rows(std::type_identity_t<ConstMatrixView<T>> table, const std::int64_t* ids, std::type_identity_t<T> alpha,
                          std::type_identity_t<T> beta, MatrixView<T> out);
  /// table[ids[i], :] += alpha · src[i, :], rows equal to `skip` left alone. Deterministic: each element of the
  /// table adds its contributions in the order of i, as EigenCpu does (no atomics).
  template <class T>
  static void scatter_add_rows(std::type_identity_t<ConstMatrixView<T>> src, const std::int64_t* ids, std::type_identity_t<T> alpha,
                               MatrixView<T> table, std::int64_t skip = -1);
  /// out[i, k] = a[k, ids[i]].
  template <class T>
  static void gather_cols(std::type_identity_t<ConstMatrixView<T>> a, const std::int64_t* ids, MatrixView<T> out);
  /// a[k, ids[i]] += alpha · src[i, k] (deterministic, in the order of i).
  template <class T>
  static void scatter_add_cols(std::type_identity_t<ConstMatrixView<T>> src, const std::int64_t* ids, std::type_identity_t<T> alpha,
                               MatrixView<T> a, std::int64_t skip = -1);

  // ---- Conv2d: patches of one image, and the per-channel steps on [channels, positions] views ---------------

  /// cols [C·kh·kw, Ho·Wo] = the patches of one image x [C·H·W] (device pointers; zero outside the border).
  template <class T>
  static void im2col(const Conv2dGeometry& g, const std::type_identity_t<T>* x, MatrixView<T> cols);
  /// dx [C·H·W] = beta · dx + Σ of the patch gradients dcols: one thread per input element gathers its
  /// (ki, kj) terms in EigenCpu's order (deterministic, no atomics).
  template <class T>
  static void col2im(const Conv2dGeometry& g, std::type_identity_t<ConstMatrixView<T>> dcols, std::type_identity_t<T> beta, T* dx);
  template <class T>
  static void add_scaled_rows(std::type_identity_t<ConstMatrixView<T>> x, const std::type_identity_t<T>* v, std::type_identity_t<T> beta,
                              MatrixView<T> y);
  template <class T>
  static void sum_cols_mul(std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b, T* out,
                           std::type_identity_t<T> alpha, std::type_identity_t<T> beta);
  template <class T>
  static void copy_scale_rows(MatrixView<T> y, const std::type_identity_t<T>* v, MatrixView<T> keep);
  template <class T>
  static void rescale_rows(MatrixView<T> q, MatrixView<T> y, const std::type_identity_t<T>* shift, const std::type_identity_t<T>* gain,
                           const std::type_identity_t<T>* offset);

 private:
  template <class A, class B>
  static void same_shape(const MatrixView<A>& a, const MatrixView<B>& b, const char* where) {
    if (a.rows != b.rows || a.cols != b.cols)
      throw ShapeError(detail::cat(where, ": source is [", a.rows, ", ", a.cols, "], destination is [", b.rows, ", ", b.cols, "]"));
  }
};

/// The name docs/design.md uses for this policy.
using Cuda = CudaBackend;

/// The transformer blocks' kernels on the GPU (see NnKernels<EigenCpu> in peft/nn/kernels.hpp for each
/// contract): LayerNorm forward/backward (one block per row, float accumulation for 16-bit and float storage,
/// the parameter gradients as column reductions), GELU, the masked causal softmax (one block per row; `mask`
/// is a device pointer) and its backward. Compiled for float, double, bf16 and half.
template <>
struct nn::NnKernels<CudaBackend> {
  template <class T>
  static void layer_norm_forward(ConstMatrixView<T> x, const T* gamma, const T* beta, double eps, MatrixView<T> y, compute_type_t<T>* mean,
                                 compute_type_t<T>* rstd);
  template <class T>
  static void layer_norm_backward(ConstMatrixView<T> x, ConstMatrixView<T> dy, const T* gamma, const compute_type_t<T>* mean,
                                  const compute_type_t<T>* rstd, MatrixView<T> dx,
                                  T beta_dx, T* dgamma, T* dbeta, T beta_p);
  template <class T>
  static void gelu_forward(ConstMatrixView<T> x, MatrixView<T> y, GeluApproximate a);
  template <class T>
  static void gelu_backward(ConstMatrixView<T> x, ConstMatrixView<T> dy, MatrixView<T> dx, T beta, GeluApproximate a);
  template <class T>
  static void masked_causal_softmax(MatrixView<T> scores, Index past, const std::int64_t* mask);
  template <class T>
  static void softmax_backward(ConstMatrixView<T> p, MatrixView<T> dp, T scale);
};

/// The training kernels on the GPU (see TrainKernels<EigenCpu> in peft/train/kernels.hpp for each contract):
/// the Adam/AdamW and SGD updates (one thread per element, every operand read and written once, computed in
/// the state type S = optimizer_state_t<T>: float state and fp32 master weights for 16-bit parameters), the gradient norm
/// (per tensor, fixed-size blocks of double partial sums, downloaded together and added on the host in a
/// fixed order: deterministic; the first call on a thread, or one with more tensors, allocates the partials),
/// scale and clamp, and the per-row cross-entropy (one block per row, double accumulation; `targets` and
/// `row_loss` are device pointers). Compiled for float, double, bf16 and half.
template <>
struct TrainKernels<CudaBackend> {
  template <class T, class S>
  static void adam_update(T* value, const T* grad, S* master, S* m, S* v, S* vmax, std::size_t n, const AdamStepScalars& s);
  template <class T, class S>
  static void sgd_update(T* value, const T* grad, S* master, S* buf, std::size_t n, const SgdStepScalars& s);
  template <class T>
  static double grad_norm(std::span<const ParamRef<T>> params, double norm_type);
  template <class T>
  static void scale(T* g, std::size_t n, double coef);
  template <class T>
  static void clamp(T* g, std::size_t n, double lo, double hi);
  template <class T>
  static void cross_entropy_rows(ConstMatrixView<T> logits, const std::int64_t* targets, std::int64_t ignore_index, double inv_count,
                                 MatrixView<T> dlogits, double* row_loss);
};

}  // namespace peft
