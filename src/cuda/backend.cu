// peft++ — the compiled part of the CUDA backend (include/peft/backend/cuda.hpp): device memory, streams,
// the per-thread cuBLAS handles, the GEMM and the element-wise and reduction kernels, with explicit
// instantiations for float and double.
//
// Built with --expt-relaxed-constexpr: the dropout kernel calls peft's constexpr counter-based generator
// (peft/rng.hpp) itself, so its masks are the CPU backend's, bit for bit.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <vector>

#include "peft/backend/cuda.hpp"
#include "conv_index.hpp"

namespace peft {
namespace cuda {
namespace detail {
namespace {

void check(cudaError_t e, const char* call, const char* file, int line) {
  if (e != cudaSuccess)
    throw CudaError(peft::detail::cat(call, " failed: ", cudaGetErrorString(e), " (", cudaGetErrorName(e), ") at ", file, ":", line));
}
void check(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw CudaError(peft::detail::cat(call, " failed: ", cublasGetStatusString(s), " (cublasStatus_t ", int(s), ") at ", file, ":", line));
}

std::atomic<std::uint64_t> g_allocations{0};
thread_local Stream g_stream = nullptr;

/// A kernel launch: reports a bad configuration or an earlier asynchronous error now, naming the kernel.
void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw CudaError(peft::detail::cat("CUDA kernel ", what, " failed to launch: ", cudaGetErrorString(e), " (", cudaGetErrorName(e), ")"));
}

}  // namespace
}  // namespace detail
}  // namespace cuda
}  // namespace peft

#define PEFT_CUDA_CHECK(call) ::peft::cuda::detail::check((call), #call, __FILE__, __LINE__)

namespace peft {
namespace cuda {

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // no device or no driver: clear the sticky-free error and report none
    return 0;
  }
  return n;
}

std::string device_name() {
  int d = 0;
  PEFT_CUDA_CHECK(cudaGetDevice(&d));
  cudaDeviceProp p{};
  PEFT_CUDA_CHECK(cudaGetDeviceProperties(&p, d));
  return p.name;
}

MemInfo mem_info() {
  MemInfo m;
  PEFT_CUDA_CHECK(cudaMemGetInfo(&m.free, &m.total));
  return m;
}

std::uint64_t allocation_count() noexcept { return detail::g_allocations.load(std::memory_order_relaxed); }
Stream current_stream() noexcept { return detail::g_stream; }
void set_current_stream(Stream s) noexcept { detail::g_stream = s; }
void synchronize() { PEFT_CUDA_CHECK(cudaStreamSynchronize(detail::g_stream)); }

namespace detail {

void* alloc(std::size_t bytes) {
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    throw CudaError(peft::detail::cat("cudaMalloc(", bytes, " bytes) failed: ", cudaGetErrorString(e), " (", cudaGetErrorName(e), ")"));
  }
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  return p;
}
void free(void* p) noexcept {
  if (p) (void)cudaFree(p);  // errors at shutdown (the runtime unloading) are not actionable here
}
void zero(void* p, std::size_t bytes) { PEFT_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, g_stream)); }
void copy_device(void* dst, const void* src, std::size_t bytes) {
  PEFT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, g_stream));
}
void upload_bytes(void* dst, const void* src, std::size_t bytes) {
  PEFT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, g_stream));
  // From pageable memory the call returns once the bytes are staged, so the caller may reuse them; from
  // page-locked memory the copy is truly asynchronous: wait for it.
  cudaPointerAttributes at{};
  if (cudaPointerGetAttributes(&at, src) != cudaSuccess) (void)cudaGetLastError();
  else if (at.type == cudaMemoryTypeHost) PEFT_CUDA_CHECK(cudaStreamSynchronize(g_stream));
}
void copy_2d(void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width, std::size_t height, CopyKind kind) {
  const cudaMemcpyKind k = kind == CopyKind::host_to_device   ? cudaMemcpyHostToDevice
                           : kind == CopyKind::device_to_host ? cudaMemcpyDeviceToHost
                                                              : cudaMemcpyDeviceToDevice;
  PEFT_CUDA_CHECK(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, k, g_stream));
  if (kind != CopyKind::device_to_device) PEFT_CUDA_CHECK(cudaStreamSynchronize(g_stream));  // the host memory is usable on return
}

/// One cuBLAS handle with its own workspace, for one (thread, device).
struct BlasHandle {
  cublasHandle_t handle = nullptr;
  int device = -1;
  const void* owner = nullptr;  ///< the owning thread's handle table
  Stream bound = nullptr;       ///< the stream the handle is set to
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
};

namespace {
/// cuBLAS's recommended workspace for Hopper; fixed, so no GEMM allocates on its own.
constexpr std::size_t kWorkspaceBytes = std::size_t(32) << 20;

struct HandleTable {
  std::vector<BlasHandle*> by_device;
  ~HandleTable() {  // thread exit (the main thread's runs before the CUDA runtime tears down)
    for (BlasHandle* h : by_device)
      if (h) {
        (void)cudaSetDevice(h->device);
        (void)cublasDestroy(h->handle);
        free(h->workspace);
        delete h;
      }
  }
};
thread_local HandleTable g_handles;

/// Points the handle at `s`. cublasSetStream resets the workspace to cuBLAS's own pool, so ours is set again.
void bind_stream(BlasHandle& h, Stream s) {
  PEFT_CUDA_CHECK(cublasSetStream(h.handle, s));
  PEFT_CUDA_CHECK(cublasSetWorkspace(h.handle, h.workspace, h.workspace_bytes));
  h.bound = s;
}
}  // namespace

BlasHandle* blas_handle() {
  int d = 0;
  PEFT_CUDA_CHECK(cudaGetDevice(&d));
  auto& t = g_handles;
  if (t.by_device.size() <= std::size_t(d)) t.by_device.resize(std::size_t(d) + 1, nullptr);
  if (BlasHandle* h = t.by_device[std::size_t(d)]) return h;
  auto* h = new BlasHandle;
  h->device = d;
  h->owner = &t;
  try {
    PEFT_CUDA_CHECK(cublasCreate(&h->handle));
    h->workspace = alloc(kWorkspaceBytes);
    h->workspace_bytes = kWorkspaceBytes;
    bind_stream(*h, g_stream);
  } catch (...) {
    if (h->handle) (void)cublasDestroy(h->handle);
    free(h->workspace);
    delete h;
    throw;
  }
  t.by_device[std::size_t(d)] = h;
  return h;
}

namespace {
/// The handle a GEMM uses: the scratch's, if it belongs to this thread and the current device; otherwise
/// this thread's (made now if needed, which allocates: reserve_gemm at context creation avoids that).
cublasHandle_t gemm_handle(BlasHandle* h) {
  int d = 0;
  PEFT_CUDA_CHECK(cudaGetDevice(&d));
  if (!h || h->owner != &g_handles || h->device != d) h = blas_handle();
  if (h->bound != g_stream) bind_stream(*h, g_stream);
  return h->handle;
}

int to_int(Index v, const char* what) {
  if (v < 0 || v > Index(INT_MAX)) throw ShapeError(peft::detail::cat("CudaBackend::gemm: ", what, " = ", v, " does not fit cuBLAS's int"));
  return int(v);
}

// ---- kernels ----------------------------------------------------------------------------------------------

/// f(i, j) for every element of a [rows, cols] matrix (2-D grid-stride loops; x runs along a row).
template <class F>
__global__ void k_each(Index rows, Index cols, F f) {
  for (Index i = Index(blockIdx.y) * blockDim.y + threadIdx.y; i < rows; i += Index(gridDim.y) * blockDim.y)
    for (Index j = Index(blockIdx.x) * blockDim.x + threadIdx.x; j < cols; j += Index(gridDim.x) * blockDim.x) f(i, j);
}
template <class F>
void each(Index rows, Index cols, const F& f, const char* what) {
  if (rows <= 0 || cols <= 0) return;
  const dim3 block(32, 8);
  const dim3 grid(unsigned(std::min<Index>((cols + 31) / 32, 4096)), unsigned(std::min<Index>((rows + 7) / 8, 65535)));
  k_each<<<grid, block, 0, g_stream>>>(rows, cols, f);
  check_launch(what);
}

/// store(j, Σ_i load(i, j)) for every column j: a block of 32 x 8 threads owns 32 columns, each of its 8
/// rows of threads sums every 8th row, then the 8 partial sums are added in a fixed order (deterministic).
template <class T, class Load, class Store>
__global__ void k_col_reduce(Index rows, Index cols, Load load, Store store) {
  __shared__ T part[8][33];
  const Index j = Index(blockIdx.x) * 32 + threadIdx.x;
  T acc = T(0);
  if (j < cols)
    for (Index i = threadIdx.y; i < rows; i += 8) acc += load(i, j);
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < cols) {
    T s = T(0);
    for (int y = 0; y < 8; ++y) s += part[y][threadIdx.x];
    store(j, s);
  }
}
template <class T, class Load, class Store>
void col_reduce(Index rows, Index cols, const Load& load, const Store& store, const char* what) {
  if (cols <= 0) return;
  k_col_reduce<T><<<unsigned((cols + 31) / 32), dim3(32, 8), 0, g_stream>>>(rows, cols, load, store);
  check_launch(what);
}

/// store(i, Σ_j load(i, j)) for every row i: one warp per row, a shuffle reduction (deterministic).
template <class T, class Load, class Store>
__global__ void k_row_reduce(Index rows, Index cols, Load load, Store store) {
  const Index i = Index(blockIdx.x) * blockDim.y + threadIdx.y;
  if (i >= rows) return;  // the whole warp leaves together (blockDim.x == 32)
  T acc = T(0);
  for (Index j = threadIdx.x; j < cols; j += 32) acc += load(i, j);
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
  if (threadIdx.x == 0) store(i, acc);
}
template <class T, class Load, class Store>
void row_reduce(Index rows, Index cols, const Load& load, const Store& store, const char* what) {
  if (rows <= 0) return;
  k_row_reduce<T><<<unsigned((rows + 7) / 8), dim3(32, 8), 0, g_stream>>>(rows, cols, load, store);
  check_launch(what);
}

// element access of a view inside a kernel
template <class T>
struct Mat {
  T* p;
  Index s;
  __device__ T& operator()(Index i, Index j) const { return p[i * s + j]; }
};
template <class T>
Mat<T> dev(MatrixView<T> v) { return {v.data, v.stride}; }

template <class T> struct SetOp { Mat<T> y; T v; __device__ void operator()(Index i, Index j) const { y(i, j) = v; } };
template <class T> struct ScaleOp { Mat<T> y; T b; __device__ void operator()(Index i, Index j) const { y(i, j) *= b; } };
template <class T> struct AxpyOp { T a; Mat<const T> x; Mat<T> y; __device__ void operator()(Index i, Index j) const { y(i, j) += a * x(i, j); } };
template <class T> struct AxOp { T a; Mat<const T> x; Mat<T> y; __device__ void operator()(Index i, Index j) const { y(i, j) = a * x(i, j); } };
template <class T> struct AxpbyOp {
  T a; Mat<const T> x; T b; Mat<T> y;
  __device__ void operator()(Index i, Index j) const { y(i, j) = a * x(i, j) + b * y(i, j); }
};
template <class T> struct AddRowOp { Mat<T> y; const T* v; T a; __device__ void operator()(Index i, Index j) const { y(i, j) += a * v[j]; } };
template <class T> struct AddColOp { Mat<T> y; const T* v; T a; __device__ void operator()(Index i, Index j) const { y(i, j) += a * v[i]; } };
template <class T> struct ScaleColsOp { Mat<T> y; const T* v; __device__ void operator()(Index i, Index j) const { y(i, j) *= v[j]; } };
template <class T> struct ScaleRowsOp { Mat<T> y; const T* v; __device__ void operator()(Index i, Index j) const { y(i, j) *= v[i]; } };
template <class T> struct ScaledColsOp {
  Mat<const T> x; const T* v; T b; Mat<T> y;
  __device__ void operator()(Index i, Index j) const { y(i, j) = b == T(0) ? x(i, j) * v[j] : b * y(i, j) + x(i, j) * v[j]; }
};
template <class T> struct MulOp { Mat<const T> a; Mat<T> y; __device__ void operator()(Index i, Index j) const { y(i, j) *= a(i, j); } };
template <class T> struct DivOp { Mat<const T> a, b; Mat<T> y; __device__ void operator()(Index i, Index j) const { y(i, j) = a(i, j) / b(i, j); } };
template <class T> struct DropoutOp {
  Mat<const T> x; Mat<T> y; Index cols; double p; std::uint64_t seed, stream; T keep_scale;
  __device__ void operator()(Index i, Index j) const {
    const bool keep = peft::detail::uniform01(seed, stream, std::uint64_t(i * cols + j)) >= p;  // EigenCpu::dropout's test
    y(i, j) = keep ? x(i, j) * keep_scale : T(0);
  }
};
template <class T> struct FiniteOp {
  Mat<const T> x; int* bad;
  __device__ void operator()(Index i, Index j) const { if (!isfinite(x(i, j))) *bad = 1; }
};

template <class T> struct LoadX { Mat<const T> x; __device__ T operator()(Index i, Index j) const { return x(i, j); } };
template <class T> struct LoadSq { Mat<const T> x; __device__ T operator()(Index i, Index j) const { const T v = x(i, j); return v * v; } };
template <class T> struct LoadMul { Mat<const T> a, b; __device__ T operator()(Index i, Index j) const { return a(i, j) * b(i, j); } };
template <class T> struct StoreAxpby {
  T* out; T alpha, beta;
  __device__ void operator()(Index k, T s) const { out[k] = (beta == T(0) ? T(0) : beta * out[k]) + alpha * s; }
};
template <class T> struct StoreSqrt { T* out; __device__ void operator()(Index k, T s) const { out[k] = sqrt(s); } };

// ---- token ids ----------------------------------------------------------------------------------------

template <class T> struct GatherRowsOp {
  Mat<const T> table; const std::int64_t* ids; T alpha, beta; Mat<T> out;
  __device__ void operator()(Index i, Index j) const {
    const T v = alpha * table(Index(ids[i]), j);
    out(i, j) = beta == T(0) ? v : beta * out(i, j) + v;
  }
};
template <class T> struct GatherColsOp {
  Mat<const T> a; const std::int64_t* ids; Mat<T> out;
  __device__ void operator()(Index i, Index k) const { out(i, k) = a(k, Index(ids[i])); }
};

/// The deterministic scatter-add behind scatter_add_rows (by_col = false: dst[ids[i], j] += alpha · src[i, j])
/// and scatter_add_cols (by_col = true: dst[j, ids[i]] += alpha · src[i, j]). Thread x owns column j of src;
/// block row y owns the ids in [y·span, (y+1)·span). Every thread reads all n ids in order and adds those of
/// its range, so each destination element is written by one thread, in the order of i (EigenCpu's), without
/// atomics.
template <class T, bool by_col>
__global__ void k_scatter_add(Index n, Index cols, const std::int64_t* ids, std::int64_t skip, Index span, Mat<const T> src, T alpha,
                              Mat<T> dst) {
  const Index j = Index(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  const Index lo = Index(blockIdx.y) * span, hi = lo + span;
  for (Index i = 0; i < n; ++i) {
    const Index id = Index(ids[i]);
    if (id == skip || id < lo || id >= hi) continue;
    if constexpr (by_col) dst(j, id) += alpha * src(i, j);
    else dst(id, j) += alpha * src(i, j);
  }
}
template <class T, bool by_col>
void scatter_add(Index n, Index cols, Index table_size, const std::int64_t* ids, std::int64_t skip, Mat<const T> src, T alpha, Mat<T> dst,
                 const char* what) {
  if (n <= 0 || cols <= 0 || table_size <= 0) return;
  constexpr unsigned threads = 128;
  const Index bx = (cols + threads - 1) / threads;
  // about 512 blocks in all: enough to fill a GPU, few enough that the repeated reads of ids stay cheap
  const Index ranges = std::clamp<Index>(512 / bx, 1, std::min<Index>(table_size, 65535));
  const Index span = (table_size + ranges - 1) / ranges;
  const dim3 grid(unsigned(bx), unsigned((table_size + span - 1) / span));
  k_scatter_add<T, by_col><<<grid, threads, 0, g_stream>>>(n, cols, ids, skip, span, src, alpha, dst);
  check_launch(what);
}

// ---- Kronecker products -----------------------------------------------------------------------------------

template <class T> struct KronOp {
  T alpha; Mat<const T> a, b; Index br, bc; T beta; Mat<T> c; bool transposed;
  __device__ void operator()(Index r, Index s) const {  // element (r, s) of c
    const Index row = transposed ? s : r, col = transposed ? r : s;  // its place in kron(a, b)
    const T v = alpha * (a(row / br, col / bc) * b(row % br, col % bc));
    c(r, s) = beta == T(0) ? v : beta * c(r, s) + v;
  }
};
/// One block of 256 threads per element (i, j) of da: strided partial sums over the b.rows · b.cols terms,
/// then a tree reduction in shared memory (a fixed order: deterministic).
template <class T>
__global__ void k_kron_grad_a(Mat<const T> g, Mat<const T> b, Index br, Index bc, T beta, Mat<T> da, Index da_cols) {
  __shared__ T part[256];
  const Index i = Index(blockIdx.x) / da_cols, j = Index(blockIdx.x) % da_cols;
  T acc = T(0);
  for (Index t = threadIdx.x; t < br * bc; t += 256) {
    const Index p = t / bc, q = t % bc;
    acc += g(i * br + p, j * bc + q) * b(p, q);
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int w = 128; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) da(i, j) = beta == T(0) ? part[0] : beta * da(i, j) + part[0];
}
template <class T> struct KronGradBOp {
  Mat<const T> g, a; Index ar, ac, br, bc; T beta; Mat<T> db;
  __device__ void operator()(Index p, Index q) const {
    T acc = beta == T(0) ? T(0) : beta * db(p, q);
    for (Index i = 0; i < ar; ++i)
      for (Index j = 0; j < ac; ++j) acc += a(i, j) * g(i * br + p, j * bc + q);
    db(p, q) = acc;
  }
};

// ---- Conv2d -----------------------------------------------------------------------------------------------

template <class T> struct Im2colOp {
  ConvShape s; const T* x; Mat<T> cols;
  __device__ void operator()(Index r, Index p) const { cols(r, p) = im2col_at(s, x, r, p); }
};
/// One thread per input element (c, ih·W + iw) of dx viewed as [C, H·W].
template <class T> struct Col2imOp {
  ConvShape s; const T* dcols; Index ld; T beta; T* dx;
  __device__ void operator()(Index c, Index hw) const {
    T* o = dx + c * s.H * s.W + hw;
    *o = col2im_at(s, dcols, ld, c, hw / s.W, hw % s.W, beta == T(0) ? T(0) : beta * *o);
  }
};
template <class T> struct ScaledRowsOp {
  Mat<const T> x; const T* v; T b; Mat<T> y;
  __device__ void operator()(Index i, Index j) const { y(i, j) = b == T(0) ? v[i] * x(i, j) : b * y(i, j) + v[i] * x(i, j); }
};
template <class T> struct CopyScaleRowsOp {
  Mat<T> y; const T* v; Mat<T> keep;
  __device__ void operator()(Index i, Index j) const {
    const T t = y(i, j);
    keep(i, j) = t;
    y(i, j) = t * v[i];
  }
};
template <class T> struct RescaleRowsOp {
  Mat<T> q, y; const T *shift, *gain, *offset;
  __device__ void operator()(Index i, Index j) const {
    const T qq = q(i, j) + (y(i, j) - (shift ? shift[i] : T(0)));
    q(i, j) = qq;
    y(i, j) = gain[i] * qq + (offset ? offset[i] : T(0));
  }
};

}  // namespace
}  // namespace detail
}  // namespace cuda

using cuda::detail::dev;
using cuda::detail::each;

template <Trans TA, Trans TB, class T>
void CudaBackend::gemm(GemmScratch<T>& scratch, std::type_identity_t<T> alpha, std::type_identity_t<ConstMatrixView<T>> a,
                       std::type_identity_t<ConstMatrixView<T>> b, std::type_identity_t<T> beta, std::type_identity_t<MatrixView<T>> c) {
  const Index m = c.rows, n = c.cols;
  const Index k = TA == Trans::no ? a.cols : a.rows;
  if (m == 0 || n == 0) return;
  if (k == 0 || alpha == T(0)) { scale(c, beta); return; }
  using cuda::detail::to_int;
  const int im = to_int(m, "m"), in = to_int(n, "n"), ik = to_int(k, "k");
  const int lda = to_int(std::max<Index>(a.stride, 1), "lda"), ldb = to_int(std::max<Index>(b.stride, 1), "ldb"),
            ldc = to_int(std::max<Index>(c.stride, 1), "ldc");
  // Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ, and a row-major X is the column-major Xᵀ:
  // so B comes first, each operand transposed exactly when the row-major product transposes it.
  const cublasOperation_t opa = TA == Trans::no ? CUBLAS_OP_N : CUBLAS_OP_T;
  const cublasOperation_t opb = TB == Trans::no ? CUBLAS_OP_N : CUBLAS_OP_T;
  cublasHandle_t h = cuda::detail::gemm_handle(scratch.blas);
  const T al = alpha, be = beta;
  if constexpr (std::is_same_v<T, float>)
    PEFT_CUDA_CHECK(cublasSgemm(h, opb, opa, in, im, ik, &al, b.data, ldb, a.data, lda, &be, c.data, ldc));
  else
    PEFT_CUDA_CHECK(cublasDgemm(h, opb, opa, in, im, ik, &al, b.data, ldb, a.data, lda, &be, c.data, ldc));
}

template <class T>
void CudaBackend::scale(MatrixView<T> y, std::type_identity_t<T> beta) {
  if (beta == T(1) || y.empty()) return;
  if (beta == T(0)) each(y.rows, y.cols, cuda::detail::SetOp<T>{dev(y), T(0)}, "scale");
  else each(y.rows, y.cols, cuda::detail::ScaleOp<T>{dev(y), beta}, "scale");
}
template <class T>
void CudaBackend::fill(MatrixView<T> y, std::type_identity_t<T> value) {
  each(y.rows, y.cols, cuda::detail::SetOp<T>{dev(y), value}, "fill");
}
template <class T>
void CudaBackend::copy(std::type_identity_t<ConstMatrixView<T>> x, MatrixView<T> y) {
  same_shape(x, y, "CudaBackend::copy");
  if (y.empty()) return;
  cuda::detail::copy_2d(y.data, std::size_t(y.stride) * sizeof(T), x.data, std::size_t(x.stride) * sizeof(T), std::size_t(y.cols) * sizeof(T),
                        std::size_t(y.rows), cuda::detail::CopyKind::device_to_device);
}
template <class T>
void CudaBackend::axpby(std::type_identity_t<T> alpha, std::type_identity_t<ConstMatrixView<T>> x, std::type_identity_t<T> beta, MatrixView<T> y) {
  if (y.empty()) return;
  if (beta == T(0)) each(y.rows, y.cols, cuda::detail::AxOp<T>{alpha, dev(x), dev(y)}, "axpby");
  else if (beta == T(1)) each(y.rows, y.cols, cuda::detail::AxpyOp<T>{alpha, dev(x), dev(y)}, "axpby");
  else each(y.rows, y.cols, cuda::detail::AxpbyOp<T>{alpha, dev(x), beta, dev(y)}, "axpby");
}
template <class T>
void CudaBackend::add_row_vector(MatrixView<T> y, const std::type_identity_t<T>* v, std::type_identity_t<T> alpha) {
  each(y.rows, y.cols, cuda::detail::AddRowOp<T>{dev(y), v, alpha}, "add_row_vector");
}
template <class T>
void CudaBackend::add_col_vector(MatrixView<T> y, const std::type_identity_t<T>* v, std::type_identity_t<T> alpha) {
  each(y.rows, y.cols, cuda::detail::AddColOp<T>{dev(y), v, alpha}, "add_col_vector");
}
template <class T>
void CudaBackend::scale_cols(MatrixView<T> y, const std::type_identity_t<T>* v) {
  each(y.rows, y.cols, cuda::detail::ScaleColsOp<T>{dev(y), v}, "scale_cols");
}
template <class T>
void CudaBackend::scale_rows(MatrixView<T> y, const std::type_identity_t<T>* v) {
  each(y.rows, y.cols, cuda::detail::ScaleRowsOp<T>{dev(y), v}, "scale_rows");
}
template <class T>
void CudaBackend::add_scaled_cols(std::type_identity_t<ConstMatrixView<T>> x, const std::type_identity_t<T>* v, std::type_identity_t<T> beta,
                                  MatrixView<T> y) {
  each(y.rows, y.cols, cuda::detail::ScaledColsOp<T>{dev(x), v, beta, dev(y)}, "add_scaled_cols");
}
template <class T>
void CudaBackend::mul(std::type_identity_t<ConstMatrixView<T>> a, MatrixView<T> y) {
  each(y.rows, y.cols, cuda::detail::MulOp<T>{dev(a), dev(y)}, "mul");
}
template <class T>
void CudaBackend::div(std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b, MatrixView<T> y) {
  each(y.rows, y.cols, cuda::detail::DivOp<T>{dev(a), dev(b), dev(y)}, "div");
}
template <class T>
void CudaBackend::sum_cols(std::type_identity_t<ConstMatrixView<T>> x, T* out, std::type_identity_t<T> alpha, std::type_identity_t<T> beta) {
  cuda::detail::row_reduce<T>(x.rows, x.cols, cuda::detail::LoadX<T>{dev(x)}, cuda::detail::StoreAxpby<T>{out, alpha, beta}, "sum_cols");
}
template <class T>
void CudaBackend::sum_rows(std::type_identity_t<ConstMatrixView<T>> x, T* out, std::type_identity_t<T> alpha, std::type_identity_t<T> beta) {
  cuda::detail::col_reduce<T>(x.rows, x.cols, cuda::detail::LoadX<T>{dev(x)}, cuda::detail::StoreAxpby<T>{out, alpha, beta}, "sum_rows");
}
template <class T>
void CudaBackend::sum_rows_mul(std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b, T* out,
                               std::type_identity_t<T> alpha, std::type_identity_t<T> beta) {
  cuda::detail::col_reduce<T>(a.rows, a.cols, cuda::detail::LoadMul<T>{dev(a), dev(b)}, cuda::detail::StoreAxpby<T>{out, alpha, beta},
                              "sum_rows_mul");
}
template <class T>
void CudaBackend::row_norms(std::type_identity_t<ConstMatrixView<T>> x, T* out) {
  cuda::detail::row_reduce<T>(x.rows, x.cols, cuda::detail::LoadSq<T>{dev(x)}, cuda::detail::StoreSqrt<T>{out}, "row_norms");
}
template <class T>
void CudaBackend::col_norms(std::type_identity_t<ConstMatrixView<T>> x, T* out) {
  cuda::detail::col_reduce<T>(x.rows, x.cols, cuda::detail::LoadSq<T>{dev(x)}, cuda::detail::StoreSqrt<T>{out}, "col_norms");
}
template <class T>
void CudaBackend::dropout(std::type_identity_t<ConstMatrixView<T>> x, MatrixView<T> y, double p, std::uint64_t seed, std::uint64_t stream) {
  same_shape(x, y, "CudaBackend::dropout");
  each(y.rows, y.cols, cuda::detail::DropoutOp<T>{dev(x), dev(y), x.cols, p, seed, stream, T(1.0 / (1.0 - p))}, "dropout");
}

template <class T>
void CudaBackend::random_uniform(Generator& gen, MatrixView<T> y, double lo, double hi) {
  if (!y.contiguous()) throw ShapeError("CudaBackend::random_uniform: the view must be contiguous");
  std::vector<T> host(std::size_t(y.size()));
  gen.uniform(host.data(), host.size(), lo, hi);
  upload<T>(ConstMatrixView<T>(host.data(), y.rows, y.cols), y);
}
template <class T>
void CudaBackend::random_normal(Generator& gen, MatrixView<T> y, double mean, double std) {
  if (!y.contiguous()) throw ShapeError("CudaBackend::random_normal: the view must be contiguous");
  std::vector<T> host(std::size_t(y.size()));
  gen.normal(host.data(), host.size(), mean, std);
  upload<T>(ConstMatrixView<T>(host.data(), y.rows, y.cols), y);
}
template <class T>
bool CudaBackend::all_finite(ConstMatrixView<T> x) {
  if (x.empty()) return true;
  DeviceBuffer<int> flag(1);
  each(x.rows, x.cols, cuda::detail::FiniteOp<T>{dev(x), flag.data()}, "all_finite");
  int bad = 0;
  download<int>(flag.view(1, 1), MatrixView<int>(&bad, 1, 1));
  return bad == 0;
}

template <class T>
void CudaBackend::kron(std::type_identity_t<T> alpha, std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b,
                       std::type_identity_t<T> beta, MatrixView<T> c, bool transposed) {
  const Index rows = a.rows * b.rows, cols = a.cols * b.cols;
  if (c.rows != (transposed ? cols : rows) || c.cols != (transposed ? rows : cols))
    throw ShapeError(detail::cat("CudaBackend::kron: c is [", c.rows, ", ", c.cols, "], kron(a, b) is [", rows, ", ", cols, "]",
                                 transposed ? " (transposed)" : ""));
  each(c.rows, c.cols, cuda::detail::KronOp<T>{alpha, dev(a), dev(b), b.rows, b.cols, beta, dev(c), transposed}, "kron");
}
template <class T>
void CudaBackend::kron_grad_a(std::type_identity_t<ConstMatrixView<T>> g, std::type_identity_t<ConstMatrixView<T>> b, std::type_identity_t<T> beta,
                              MatrixView<T> da) {
  if (da.empty()) return;
  if (da.rows * da.cols > Index(INT_MAX)) throw ShapeError("CudaBackend::kron_grad_a: too many elements for one grid");
  cuda::detail::k_kron_grad_a<T><<<unsigned(da.rows * da.cols), 256, 0, cuda::detail::g_stream>>>(dev(g), dev(b), b.rows, b.cols, beta, dev(da),
                                                                                                  da.cols);
  cuda::detail::check_launch("kron_grad_a");
}
template <class T>
void CudaBackend::kron_grad_b(std::type_identity_t<ConstMatrixView<T>> g, std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<T> beta,
                              MatrixView<T> db) {
  each(db.rows, db.cols, cuda::detail::KronGradBOp<T>{dev(g), dev(a), a.rows, a.cols, db.rows, db.cols, beta, dev(db)}, "kron_grad_b");
}
template <class T>
void CudaBackend::gather_rows(std::type_identity_t<ConstMatrixView<T>> table, const std::int64_t* ids, std::type_identity_t<T> alpha,
                              std::type_identity_t<T> beta, MatrixView<T> out) {
  each(out.rows, out.cols, cuda::detail::GatherRowsOp<T>{dev(table), ids, alpha, beta, dev(out)}, "gather_rows");
}
template <class T>
void CudaBackend::scatter_add_rows(std::type_identity_t<ConstMatrixView<T>> src, const std::int64_t* ids, std::type_identity_t<T> alpha,
                                   MatrixView<T> table, std::int64_t skip) {
  cuda::detail::scatter_add<T, false>(src.rows, src.cols, table.rows, ids, skip, dev(src), alpha, dev(table), "scatter_add_rows");
}
template <class T>
void CudaBackend::gather_cols(std::type_identity_t<ConstMatrixView<T>> a, const std::int64_t* ids, MatrixView<T> out) {
  each(out.rows, out.cols, cuda::detail::GatherColsOp<T>{dev(a), ids, dev(out)}, "gather_cols");
}
template <class T>
void CudaBackend::scatter_add_cols(std::type_identity_t<ConstMatrixView<T>> src, const std::int64_t* ids, std::type_identity_t<T> alpha,
                                   MatrixView<T> a, std::int64_t skip) {
  cuda::detail::scatter_add<T, true>(src.rows, src.cols, a.cols, ids, skip, dev(src), alpha, dev(a), "scatter_add_cols");
}
template <class T>
void CudaBackend::im2col(const Conv2dGeometry& g, const std::type_identity_t<T>* x, MatrixView<T> cols) {
  const auto s = cuda::detail::ConvShape::of(g);
  if (cols.rows != g.patch() || cols.cols != s.Ho * s.Wo)
    throw ShapeError(detail::cat("CudaBackend::im2col: cols is [", cols.rows, ", ", cols.cols, "], the geometry needs [", g.patch(), ", ",
                                 s.Ho * s.Wo, "]"));
  each(cols.rows, cols.cols, cuda::detail::Im2colOp<T>{s, x, dev(cols)}, "im2col");
}
template <class T>
void CudaBackend::col2im(const Conv2dGeometry& g, std::type_identity_t<ConstMatrixView<T>> dcols, std::type_identity_t<T> beta, T* dx) {
  const auto s = cuda::detail::ConvShape::of(g);
  if (dcols.rows != g.patch() || dcols.cols != s.Ho * s.Wo)
    throw ShapeError(detail::cat("CudaBackend::col2im: dcols is [", dcols.rows, ", ", dcols.cols, "], the geometry needs [", g.patch(), ", ",
                                 s.Ho * s.Wo, "]"));
  each(g.in_channels, g.in_h * g.in_w, cuda::detail::Col2imOp<T>{s, dcols.data, dcols.stride, beta, dx}, "col2im");
}
template <class T>
void CudaBackend::add_scaled_rows(std::type_identity_t<ConstMatrixView<T>> x, const std::type_identity_t<T>* v, std::type_identity_t<T> beta,
                                  MatrixView<T> y) {
  each(y.rows, y.cols, cuda::detail::ScaledRowsOp<T>{dev(x), v, beta, dev(y)}, "add_scaled_rows");
}
template <class T>
void CudaBackend::sum_cols_mul(std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b, T* out,
                               std::type_identity_t<T> alpha, std::type_identity_t<T> beta) {
  cuda::detail::row_reduce<T>(a.rows, a.cols, cuda::detail::LoadMul<T>{dev(a), dev(b)}, cuda::detail::StoreAxpby<T>{out, alpha, beta},
                              "sum_cols_mul");
}
template <class T>
void CudaBackend::copy_scale_rows(MatrixView<T> y, const std::type_identity_t<T>* v, MatrixView<T> keep) {
  each(y.rows, y.cols, cuda::detail::CopyScaleRowsOp<T>{dev(y), v, dev(keep)}, "copy_scale_rows");
}
template <class T>
void CudaBackend::rescale_rows(MatrixView<T> q, MatrixView<T> y, const std::type_identity_t<T>* shift, const std::type_identity_t<T>* gain,
                               const std::type_identity_t<T>* offset) {
  each(q.rows, q.cols, cuda::detail::RescaleRowsOp<T>{dev(q), dev(y), shift, gain, offset}, "rescale_rows");
}

// ---- explicit instantiations ------------------------------------------------------------------------------

#define PEFT_CUDA_INSTANTIATE(T)                                                                                                   \
  template void CudaBackend::gemm<Trans::no, Trans::no, T>(GemmScratch<T>&, T, ConstMatrixView<T>, ConstMatrixView<T>, T, MatrixView<T>); \
  template void CudaBackend::gemm<Trans::no, Trans::yes, T>(GemmScratch<T>&, T, ConstMatrixView<T>, ConstMatrixView<T>, T, MatrixView<T>); \
  template void CudaBackend::gemm<Trans::yes, Trans::no, T>(GemmScratch<T>&, T, ConstMatrixView<T>, ConstMatrixView<T>, T, MatrixView<T>); \
  template void CudaBackend::gemm<Trans::yes, Trans::yes, T>(GemmScratch<T>&, T, ConstMatrixView<T>, ConstMatrixView<T>, T, MatrixView<T>); \
  template void CudaBackend::scale<T>(MatrixView<T>, T);                                                                            \
  template void CudaBackend::fill<T>(MatrixView<T>, T);                                                                             \
  template void CudaBackend::copy<T>(ConstMatrixView<T>, MatrixView<T>);                                                            \
  template void CudaBackend::axpby<T>(T, ConstMatrixView<T>, T, MatrixView<T>);                                                     \
  template void CudaBackend::add_row_vector<T>(MatrixView<T>, const T*, T);                                                         \
  template void CudaBackend::add_col_vector<T>(MatrixView<T>, const T*, T);                                                         \
  template void CudaBackend::scale_cols<T>(MatrixView<T>, const T*);                                                                \
  template void CudaBackend::scale_rows<T>(MatrixView<T>, const T*);                                                                \
  template void CudaBackend::add_scaled_cols<T>(ConstMatrixView<T>, const T*, T, MatrixView<T>);                                    \
  template void CudaBackend::mul<T>(ConstMatrixView<T>, MatrixView<T>);                                                             \
  template void CudaBackend::div<T>(ConstMatrixView<T>, ConstMatrixView<T>, MatrixView<T>);                                         \
  template void CudaBackend::sum_cols<T>(ConstMatrixView<T>, T*, T, T);                                                             \
  template void CudaBackend::sum_rows<T>(ConstMatrixView<T>, T*, T, T);                                                             \
  template void CudaBackend::sum_rows_mul<T>(ConstMatrixView<T>, ConstMatrixView<T>, T*, T, T);                                     \
  template void CudaBackend::row_norms<T>(ConstMatrixView<T>, T*);                                                                  \
  template void CudaBackend::col_norms<T>(ConstMatrixView<T>, T*);                                                                  \
  template void CudaBackend::dropout<T>(ConstMatrixView<T>, MatrixView<T>, double, std::uint64_t, std::uint64_t);                   \
  template void CudaBackend::random_uniform<T>(Generator&, MatrixView<T>, double, double);                                          \
  template void CudaBackend::random_normal<T>(Generator&, MatrixView<T>, double, double);                                           \
  template bool CudaBackend::all_finite<T>(ConstMatrixView<T>);                                                                    \
  template void CudaBackend::kron<T>(T, ConstMatrixView<T>, ConstMatrixView<T>, T, MatrixView<T>, bool);                            \
  template void CudaBackend::kron_grad_a<T>(ConstMatrixView<T>, ConstMatrixView<T>, T, MatrixView<T>);                               \
  template void CudaBackend::kron_grad_b<T>(ConstMatrixView<T>, ConstMatrixView<T>, T, MatrixView<T>);                               \
  template void CudaBackend::gather_rows<T>(ConstMatrixView<T>, const std::int64_t*, T, T, MatrixView<T>);                           \
  template void CudaBackend::scatter_add_rows<T>(ConstMatrixView<T>, const std::int64_t*, T, MatrixView<T>, std::int64_t);           \
  template void CudaBackend::gather_cols<T>(ConstMatrixView<T>, const std::int64_t*, MatrixView<T>);                                 \
  template void CudaBackend::scatter_add_cols<T>(ConstMatrixView<T>, const std::int64_t*, T, MatrixView<T>, std::int64_t);           \
  template void CudaBackend::im2col<T>(const Conv2dGeometry&, const T*, MatrixView<T>);                                              \
  template void CudaBackend::col2im<T>(const Conv2dGeometry&, ConstMatrixView<T>, T, T*);                                            \
  template void CudaBackend::add_scaled_rows<T>(ConstMatrixView<T>, const T*, T, MatrixView<T>);                                     \
  template void CudaBackend::sum_cols_mul<T>(ConstMatrixView<T>, ConstMatrixView<T>, T*, T, T);                                      \
  template void CudaBackend::copy_scale_rows<T>(MatrixView<T>, const T*, MatrixView<T>);                                             \
  template void CudaBackend::rescale_rows<T>(MatrixView<T>, MatrixView<T>, const T*, const T*, const T*);

PEFT_CUDA_INSTANTIATE(float)
PEFT_CUDA_INSTANTIATE(double)

}  // namespace peft
