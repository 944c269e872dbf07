// peft++ — the compiled part of the CUDA backend (include/peft/backend/cuda.hpp): device memory, streams,
// the per-thread cuBLAS handles, the GEMM and the element-wise and reduction kernels, with explicit
// instantiations for float and double.
//
// Built with --expt-relaxed-constexpr: the dropout kernel calls peft's constexpr counter-based generator
// (peft/rng.hpp) itself, so its masks are the CPU backend's, bit for bit.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <optional>
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
thread_local bool g_tf32 = false;

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
bool allow_tf32() noexcept { return detail::g_tf32; }
void set_allow_tf32(bool allow) noexcept { detail::g_tf32 = allow; }

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
void zero_new(void* p, std::size_t bytes) {
  zero(p, bytes);
  PEFT_CUDA_CHECK(cudaStreamSynchronize(g_stream));  // zero before any stream (a non-blocking one too) uses it
}
void copy_device(void* dst, const void* src, std::size_t bytes) {
  PEFT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, g_stream));
}
void upload_bytes(void* dst, const void* src, std::size_t bytes) {
  PEFT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, g_stream));
  // From pageable memory the driver stages the bytes (or copies synchronously) before the call returns, so
  // the caller may reuse them; from page-locked or managed memory the copy is truly asynchronous: wait for it.
  cudaPointerAttributes at{};
  if (cudaPointerGetAttributes(&at, src) != cudaSuccess) (void)cudaGetLastError();
  else if (at.type == cudaMemoryTypeHost || at.type == cudaMemoryTypeManaged) PEFT_CUDA_CHECK(cudaStreamSynchronize(g_stream));
}
void copy_2d(void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width, std::size_t height, CopyKind kind) {
  const cudaMemcpyKind k = kind == CopyKind::host_to_device   ? cudaMemcpyHostToDevice
                           : kind == CopyKind::device_to_host ? cudaMemcpyDeviceToHost
                                                              : cudaMemcpyDeviceToDevice;
  if (height == 1 || (dpitch == width && spitch == width))  // contiguous: one plain copy (no pitch limits)
    PEFT_CUDA_CHECK(cudaMemcpyAsync(dst, src, width * height, k, g_stream));
  else
    PEFT_CUDA_CHECK(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, k, g_stream));
  if (kind != CopyKind::device_to_device) PEFT_CUDA_CHECK(cudaStreamSynchronize(g_stream));  // the host memory is usable on return
}

/// One cuBLAS handle for one (thread, device), with one workspace per stream it has run GEMMs on: a GEMM
/// queued on one stream may still be using its workspace when the thread queues another on a second stream.
struct BlasHandle {
  cublasHandle_t handle = nullptr;
  int device = -1;
  std::optional<Stream> bound;  ///< the stream the handle and its workspace are set to (none yet: cuBLAS's own pool)
  bool tf32 = false;       ///< the math mode the handle is set to (CUBLAS_TF32_TENSOR_OP_MATH or default)
  std::vector<std::pair<Stream, void*>> workspaces;
};

namespace {
/// cuBLAS's recommended workspace for Hopper, per stream; fixed, so no GEMM allocates on its own.
constexpr std::size_t kWorkspaceBytes = std::size_t(32) << 20;

std::atomic<std::uint64_t> g_next_table{1};

struct HandleTable {
  std::uint64_t id = g_next_table.fetch_add(1, std::memory_order_relaxed);  ///< never reused by a later thread
  std::vector<BlasHandle*> by_device;
  ~HandleTable() {  // thread exit (the main thread's runs before the CUDA runtime tears down)
    for (BlasHandle* h : by_device)
      if (h) {
        (void)cudaSetDevice(h->device);
        (void)cublasDestroy(h->handle);
        for (auto& w : h->workspaces) free(w.second);
        delete h;
      }
  }
};
thread_local HandleTable g_handles;

/// The handle's workspace for stream `s`, allocated on first use.
void* workspace_for(BlasHandle& h, Stream s) {
  for (auto& w : h.workspaces)
    if (w.first == s) return w.second;
  h.workspaces.reserve(h.workspaces.size() + 1);  // before the allocation: nothing can leak it
  void* w = alloc(kWorkspaceBytes);
  h.workspaces.emplace_back(s, w);
  return w;
}

/// Points the handle at `s` and its workspace (cublasSetStream resets the workspace to cuBLAS's own pool).
void bind_stream(BlasHandle& h, Stream s) {
  void* w = workspace_for(h, s);
  PEFT_CUDA_CHECK(cublasSetStream(h.handle, s));
  PEFT_CUDA_CHECK(cublasSetWorkspace(h.handle, w, kWorkspaceBytes));
  h.bound = s;
}

/// This thread's handle for the current device `d`, made on first use.
BlasHandle* thread_handle(int d) {
  auto& t = g_handles;
  if (t.by_device.size() <= std::size_t(d)) t.by_device.resize(std::size_t(d) + 1, nullptr);
  if (BlasHandle* h = t.by_device[std::size_t(d)]) return h;
  auto* h = new BlasHandle;
  h->device = d;
  try {
    PEFT_CUDA_CHECK(cublasCreate(&h->handle));
  } catch (...) {
    delete h;
    throw;
  }
  t.by_device[std::size_t(d)] = h;
  return h;
}

int current_device() {
  int d = 0;
  PEFT_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}
}  // namespace

void reserve_blas(BlasRef& ref) {
  const int d = current_device();
  BlasHandle* h = thread_handle(d);
  if (h->bound != g_stream) bind_stream(*h, g_stream);  // the current stream's workspace now, not in the first forward
  ref = BlasRef{h, g_handles.id, d};
}

namespace {
/// The handle a GEMM uses: the scratch's, if it was reserved by this thread for the current device (it is
/// not dereferenced otherwise: another thread's handle dies with that thread); otherwise this thread's (made
/// now if needed, which allocates: reserve_gemm at context creation avoids that). Bound to the current
/// stream and its workspace.
cublasHandle_t gemm_handle(const BlasRef& ref) {
  const int d = current_device();
  BlasHandle* h = ref.handle != nullptr && ref.table == g_handles.id && ref.device == d ? ref.handle : thread_handle(d);
  if (h->bound != g_stream) bind_stream(*h, g_stream);
  if (h->tf32 != g_tf32) {
    PEFT_CUDA_CHECK(cublasSetMathMode(h->handle, g_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    h->tf32 = g_tf32;
  }
  return h->handle;
}

int to_int(Index v, const char* what) {
  if (v < 0 || v > Index(INT_MAX)) throw ShapeError(peft::detail::cat("CudaBackend::gemm: ", what, " = ", v, " does not fit cuBLAS's int"));
  return int(v);
}

// ---- kernels ----------------------------------------------------------------------------------------------
//
// Every kernel reads its operands through Mat::operator() / ld, which give the accumulator type (float for
// bf16 and half storage, T otherwise), computes in it, and writes through Mat::set / st (rounding to the
// storage type, round to nearest even). Reductions keep their partial sums in the accumulator type.

template <class T> struct Num {
  using acc = T;
  __device__ static acc ld(T v) { return v; }
  __device__ static T st(acc v) { return v; }
};
template <> struct Num<bf16> {
  using acc = float;
  __device__ static float ld(bf16 v) { return __bfloat162float(__ushort_as_bfloat16(v.bits)); }
  __device__ static bf16 st(float v) { return bf16::from_bits(__bfloat16_as_ushort(__float2bfloat16_rn(v))); }
};
template <> struct Num<half> {
  using acc = float;
  __device__ static float ld(half v) { return __half2float(__ushort_as_half(v.bits)); }
  __device__ static half st(float v) { return half::from_bits(__half_as_ushort(__float2half_rn(v))); }
};
template <class T> using acc_t = typename Num<std::remove_const_t<T>>::acc;
template <class T> __device__ acc_t<T> ld(T v) { return Num<std::remove_const_t<T>>::ld(v); }

/// f(i, j) for every element of a [rows, cols] matrix (2-D grid-stride loops; x runs along a row).
template <class F>
__global__ void k_each(Index rows, Index cols, F f) {
  for (Index i = Index(blockIdx.y) * blockDim.y + threadIdx.y; i < rows; i += Index(gridDim.y) * blockDim.y)
    for (Index j = Index(blockIdx.x) * blockDim.x + threadIdx.x; j < cols; j += Index(gridDim.x) * blockDim.x) f(i, j);
}
template <class F>
void each(Index rows, Index cols, const F& f, const char* what) {
  if (rows <= 0 || cols <= 0) return;
  if (rows == 1) {  // one row (flat buffers: zero_grad, the optimizers' views): every thread of a block on it
    k_each<<<unsigned(std::min<Index>((cols + 255) / 256, 8192)), dim3(256, 1), 0, g_stream>>>(rows, cols, f);
    check_launch(what);
    return;
  }
  const dim3 block(32, 8);
  const dim3 grid(unsigned(std::min<Index>((cols + 31) / 32, 4096)), unsigned(std::min<Index>((rows + 7) / 8, 65535)));
  k_each<<<grid, block, 0, g_stream>>>(rows, cols, f);
  check_launch(what);
}

/// store(j, Σ_i load(i, j)) for every column j: a block of 32 x 8 threads owns 32 columns, each of its 8
/// rows of threads sums every 8th row, then the 8 partial sums are added in a fixed order (deterministic).
template <class A, class Load, class Store>
__global__ void k_col_reduce(Index rows, Index cols, Load load, Store store) {
  __shared__ A part[8][33];
  const Index j = Index(blockIdx.x) * 32 + threadIdx.x;
  A acc = A(0);
  if (j < cols)
    for (Index i = threadIdx.y; i < rows; i += 8) acc += load(i, j);
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < cols) {
    A s = A(0);
    for (int y = 0; y < 8; ++y) s += part[y][threadIdx.x];
    store(j, s);
  }
}
template <class A, class Load, class Store>
void col_reduce(Index rows, Index cols, const Load& load, const Store& store, const char* what) {
  if (cols <= 0) return;
  k_col_reduce<A><<<unsigned((cols + 31) / 32), dim3(32, 8), 0, g_stream>>>(rows, cols, load, store);
  check_launch(what);
}

/// store(i, Σ_j load(i, j)) for every row i: one warp per row, a shuffle reduction (deterministic).
template <class A, class Load, class Store>
__global__ void k_row_reduce(Index rows, Index cols, Load load, Store store) {
  const Index i = Index(blockIdx.x) * blockDim.y + threadIdx.y;
  if (i >= rows) return;  // the whole warp leaves together (blockDim.x == 32)
  A acc = A(0);
  for (Index j = threadIdx.x; j < cols; j += 32) acc += load(i, j);
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
  if (threadIdx.x == 0) store(i, acc);
}
template <class A, class Load, class Store>
void row_reduce(Index rows, Index cols, const Load& load, const Store& store, const char* what) {
  if (rows <= 0) return;
  k_row_reduce<A><<<unsigned((rows + 7) / 8), dim3(32, 8), 0, g_stream>>>(rows, cols, load, store);
  check_launch(what);
}

/// Element access of a view inside a kernel: (i, j) reads in the accumulator type, set(i, j, v) stores.
template <class T>
struct Mat {
  T* p;
  Index s;
  using S = std::remove_const_t<T>;
  using A = acc_t<S>;
  __device__ A operator()(Index i, Index j) const { return Num<S>::ld(p[i * s + j]); }
  __device__ void set(Index i, Index j, A v) const { p[i * s + j] = Num<S>::st(v); }
};
template <class T>
Mat<T> dev(MatrixView<T> v) { return {v.data, v.stride}; }

template <class T> using A_ = acc_t<T>;

template <class T> struct SetOp { Mat<T> y; A_<T> v; __device__ void operator()(Index i, Index j) const { y.set(i, j, v); } };
template <class T> struct ScaleOp { Mat<T> y; A_<T> b; __device__ void operator()(Index i, Index j) const { y.set(i, j, y(i, j) * b); } };
template <class T> struct AxpyOp {
  A_<T> a; Mat<const T> x; Mat<T> y;
  __device__ void operator()(Index i, Index j) const { y.set(i, j, y(i, j) + a * x(i, j)); }
};
template <class T> struct AxOp { A_<T> a; Mat<const T> x; Mat<T> y; __device__ void operator()(Index i, Index j) const { y.set(i, j, a * x(i, j)); } };
template <class T> struct AxpbyOp {
  A_<T> a; Mat<const T> x; A_<T> b; Mat<T> y;
  __device__ void operator()(Index i, Index j) const { y.set(i, j, a * x(i, j) + b * y(i, j)); }
};
template <class T> struct AddRowOp {
  Mat<T> y; const T* v; A_<T> a;
  __device__ void operator()(Index i, Index j) const { y.set(i, j, y(i, j) + a * ld(v[j])); }
};
template <class T> struct AddColOp {
  Mat<T> y; const T* v; A_<T> a;
  __device__ void operator()(Index i, Index j) const { y.set(i, j, y(i, j) + a * ld(v[i])); }
};
template <class T> struct ScaleColsOp { Mat<T> y; const T* v; __device__ void operator()(Index i, Index j) const { y.set(i, j, y(i, j) * ld(v[j])); } };
template <class T> struct ScaleRowsOp { Mat<T> y; const T* v; __device__ void operator()(Index i, Index j) const { y.set(i, j, y(i, j) * ld(v[i])); } };
template <class T> struct ScaledColsOp {
  Mat<const T> x; const T* v; A_<T> b; Mat<T> y;
  __device__ void operator()(Index i, Index j) const {
    y.set(i, j, b == A_<T>(0) ? x(i, j) * ld(v[j]) : b * y(i, j) + x(i, j) * ld(v[j]));
  }
};
template <class T> struct MulOp { Mat<const T> a; Mat<T> y; __device__ void operator()(Index i, Index j) const { y.set(i, j, y(i, j) * a(i, j)); } };
template <class T> struct DivOp { Mat<const T> a, b; Mat<T> y; __device__ void operator()(Index i, Index j) const { y.set(i, j, a(i, j) / b(i, j)); } };
template <class T> struct DropoutOp {
  Mat<const T> x; Mat<T> y; Index cols; double p; std::uint64_t seed, stream; A_<T> keep_scale;
  __device__ void operator()(Index i, Index j) const {
    const bool keep = peft::detail::uniform01(seed, stream, std::uint64_t(i * cols + j)) >= p;  // EigenCpu::dropout's test
    y.set(i, j, keep ? x(i, j) * keep_scale : A_<T>(0));
  }
};
template <class T> struct FiniteOp {
  Mat<const T> x; int* bad;
  __device__ void operator()(Index i, Index j) const { if (!isfinite(x(i, j))) *bad = 1; }
};

template <class T> struct LoadX { Mat<const T> x; __device__ A_<T> operator()(Index i, Index j) const { return x(i, j); } };
template <class T> struct LoadSq { Mat<const T> x; __device__ A_<T> operator()(Index i, Index j) const { const A_<T> v = x(i, j); return v * v; } };
template <class T> struct LoadMul { Mat<const T> a, b; __device__ A_<T> operator()(Index i, Index j) const { return a(i, j) * b(i, j); } };
template <class T> struct StoreAxpby {
  T* out; A_<T> alpha, beta;
  __device__ void operator()(Index k, A_<T> s) const {
    out[k] = Num<T>::st((beta == A_<T>(0) ? A_<T>(0) : beta * ld(out[k])) + alpha * s);
  }
};
template <class T> struct StoreSqrt { T* out; __device__ void operator()(Index k, A_<T> s) const { out[k] = Num<T>::st(sqrt(s)); } };

// ---- token ids ----------------------------------------------------------------------------------------

template <class T> struct GatherRowsOp {
  Mat<const T> table; const std::int64_t* ids; A_<T> alpha, beta; Mat<T> out;
  __device__ void operator()(Index i, Index j) const {
    const A_<T> v = alpha * table(Index(ids[i]), j);
    out.set(i, j, beta == A_<T>(0) ? v : beta * out(i, j) + v);
  }
};
template <class T> struct GatherColsOp {
  Mat<const T> a; const std::int64_t* ids; Mat<T> out;
  __device__ void operator()(Index i, Index k) const { out.p[i * out.s + k] = a.p[k * a.s + Index(ids[i])]; }
};

/// The deterministic scatter-add behind scatter_add_rows (by_col = false: dst[ids[i], j] += alpha · src[i, j])
/// and scatter_add_cols (by_col = true: dst[j, ids[i]] += alpha · src[i, j]). Thread x owns column j of src;
/// block row y owns the ids in [y·span, (y+1)·span). Every thread reads all n ids in order and adds those of
/// its range, so each destination element is written by one thread, in the order of i (EigenCpu's), without
/// atomics. (With 16-bit storage each addition is rounded to the table's type.)
template <class T, bool by_col>
__global__ void k_scatter_add(Index n, Index cols, const std::int64_t* ids, std::int64_t skip, Index span, Mat<const T> src, A_<T> alpha,
                              Mat<T> dst) {
  const Index j = Index(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  const Index lo = Index(blockIdx.y) * span, hi = lo + span;
  for (Index i = 0; i < n; ++i) {
    const Index id = Index(ids[i]);
    if (id == skip || id < lo || id >= hi) continue;
    if constexpr (by_col) dst.set(j, id, dst(j, id) + alpha * src(i, j));
    else dst.set(id, j, dst(id, j) + alpha * src(i, j));
  }
}
template <class T, bool by_col>
void scatter_add(Index n, Index cols, Index table_size, const std::int64_t* ids, std::int64_t skip, Mat<const T> src, A_<T> alpha, Mat<T> dst,
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
  A_<T> alpha; Mat<const T> a, b; Index br, bc; A_<T> beta; Mat<T> c; bool transposed;
  __device__ void operator()(Index r, Index s) const {  // element (r, s) of c
    const Index row = transposed ? s : r, col = transposed ? r : s;  // its place in kron(a, b)
    const A_<T> v = alpha * (a(row / br, col / bc) * b(row % br, col % bc));
    c.set(r, s, beta == A_<T>(0) ? v : beta * c(r, s) + v);
  }
};
/// One block of 256 threads per element (i, j) of da: strided partial sums over the b.rows · b.cols terms,
/// then a tree reduction in shared memory (a fixed order: deterministic).
template <class T>
__global__ void k_kron_grad_a(Mat<const T> g, Mat<const T> b, Index br, Index bc, A_<T> beta, Mat<T> da, Index da_cols) {
  __shared__ A_<T> part[256];
  const Index i = Index(blockIdx.x) / da_cols, j = Index(blockIdx.x) % da_cols;
  A_<T> acc = A_<T>(0);
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
  if (threadIdx.x == 0) da.set(i, j, beta == A_<T>(0) ? part[0] : beta * da(i, j) + part[0]);
}
template <class T> struct KronGradBOp {
  Mat<const T> g, a; Index ar, ac, br, bc; A_<T> beta; Mat<T> db;
  __device__ void operator()(Index p, Index q) const {
    A_<T> acc = beta == A_<T>(0) ? A_<T>(0) : beta * db(p, q);
    for (Index i = 0; i < ar; ++i)
      for (Index j = 0; j < ac; ++j) acc += a(i, j) * g(i * br + p, j * bc + q);
    db.set(p, q, acc);
  }
};

// ---- activations and the LSTM cell ----------------------------------------------------------------------

template <class T> struct ReluOp {
  Mat<T> z;
  __device__ void operator()(Index i, Index j) const { if (z(i, j) < A_<T>(0)) z.set(i, j, A_<T>(0)); }
};
template <class T> struct ReluBackOp {
  Mat<const T> z; Mat<T> dz;
  __device__ void operator()(Index i, Index j) const { if (!(z(i, j) > A_<T>(0))) dz.set(i, j, A_<T>(0)); }
};
template <class T> struct TanhOp { Mat<const T> x; Mat<T> y; __device__ void operator()(Index i, Index j) const { y.set(i, j, tanh(x(i, j))); } };
template <class T> struct TanhBackOp {
  Mat<const T> y; Mat<T> dy;
  __device__ void operator()(Index i, Index j) const { dy.set(i, j, dy(i, j) * (A_<T>(1) - y(i, j) * y(i, j))); }
};
template <class A> __device__ A sigmoid(A x) { return A(1) / (A(1) + exp(-x)); }
/// Hidden unit j of one LSTM step (the same expressions as EigenCpu::lstm_cell).
template <class T> struct LstmCellOp {
  Mat<T> gates; Mat<const T> rec, cprev; Mat<T> c, tc, h; Index n;
  __device__ void operator()(Index, Index j) const {
    using A = A_<T>;
    const A ig = sigmoid(gates(0, j) + rec(0, j)), fg = sigmoid(gates(0, n + j) + rec(0, n + j));
    const A gg = tanh(gates(0, 2 * n + j) + rec(0, 2 * n + j)), og = sigmoid(gates(0, 3 * n + j) + rec(0, 3 * n + j));
    gates.set(0, j, ig);
    gates.set(0, n + j, fg);
    gates.set(0, 2 * n + j, gg);
    gates.set(0, 3 * n + j, og);
    const A cc = fg * cprev(0, j) + ig * gg;
    c.set(0, j, cc);
    tc.set(0, j, tanh(cc));
    h.set(0, j, og * tanh(cc));
  }
};
template <class T> struct LstmCellBackOp {
  Mat<const T> gates, tc, cprev, dy, dh; Mat<T> dcn, dg; Index n;
  __device__ void operator()(Index, Index j) const {
    using A = A_<T>;
    const A ig = gates(0, j), fg = gates(0, n + j), gg = gates(0, 2 * n + j), og = gates(0, 3 * n + j);
    const A dht = dy(0, j) + dh(0, j);
    const A dc = dcn(0, j) + dht * og * (A(1) - tc(0, j) * tc(0, j));
    dg.set(0, j, dc * gg * ig * (A(1) - ig));
    dg.set(0, n + j, dc * cprev(0, j) * fg * (A(1) - fg));
    dg.set(0, 2 * n + j, dc * ig * (A(1) - gg * gg));
    dg.set(0, 3 * n + j, dht * tc(0, j) * og * (A(1) - og));
    dcn.set(0, j, dc * fg);
  }
};

// ---- Conv2d -----------------------------------------------------------------------------------------------

template <class T> struct Im2colOp {
  ConvShape s; const T* x; Mat<T> cols;
  __device__ void operator()(Index r, Index p) const { cols.p[r * cols.s + p] = im2col_at(s, x, r, p); }
};
/// One thread per input element (c, ih·W + iw) of dx viewed as [C, H·W].
template <class T> struct Col2imOp {
  ConvShape s; const T* dcols; Index ld_; A_<T> beta; T* dx;
  __device__ void operator()(Index c, Index hw) const {
    T* o = dx + c * s.H * s.W + hw;
    const A_<T> init = beta == A_<T>(0) ? A_<T>(0) : beta * ld(*o);
    *o = Num<T>::st(col2im_at(s, dcols, ld_, c, hw / s.W, hw % s.W, init, [](T v) { return ld(v); }));
  }
};
template <class T> struct ScaledRowsOp {
  Mat<const T> x; const T* v; A_<T> b; Mat<T> y;
  __device__ void operator()(Index i, Index j) const {
    y.set(i, j, b == A_<T>(0) ? ld(v[i]) * x(i, j) : b * y(i, j) + ld(v[i]) * x(i, j));
  }
};
template <class T> struct CopyScaleRowsOp {
  Mat<T> y; const T* v; Mat<T> keep;
  __device__ void operator()(Index i, Index j) const {
    keep.p[i * keep.s + j] = y.p[i * y.s + j];
    y.set(i, j, y(i, j) * ld(v[i]));
  }
};
template <class T> struct RescaleRowsOp {
  Mat<T> q, y; const T *shift, *gain, *offset;
  __device__ void operator()(Index i, Index j) const {
    using A = A_<T>;
    const A qq = q(i, j) + (y(i, j) - (shift ? ld(shift[i]) : A(0)));
    q.set(i, j, qq);
    y.set(i, j, ld(gain[i]) * Num<T>::ld(Num<T>::st(qq)) + (offset ? ld(offset[i]) : A(0)));
  }
};

// ---- the transformer blocks' kernels (NnKernels<CudaBackend>) ---------------------------------------------

constexpr int kRowThreads = 256;
/// The sum of v over the block's 256 threads, in a fixed tree order; every thread gets it.
template <class A>
__device__ A block_sum(A v, A* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int w = kRowThreads / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  const A r = sh[0];
  __syncthreads();
  return r;
}
template <class A>
__device__ A block_max(A v, A* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int w = kRowThreads / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) sh[threadIdx.x] = sh[threadIdx.x + w] > sh[threadIdx.x] ? sh[threadIdx.x + w] : sh[threadIdx.x];
    __syncthreads();
  }
  const A r = sh[0];
  __syncthreads();
  return r;
}

/// One block per row: mean, biased variance (two passes), y = (x − mean) · rstd · gamma + beta.
template <class T>
__global__ void k_layer_norm_fwd(Mat<const T> x, Index d, const T* gamma, const T* beta, A_<T> eps, Mat<T> y, compute_type_t<T>* mean,
                                 compute_type_t<T>* rstd) {
  using A = A_<T>;
  __shared__ A sh[kRowThreads];
  const Index i = blockIdx.x;
  A s = A(0);
  for (Index j = threadIdx.x; j < d; j += kRowThreads) s += x(i, j);
  const A mu = block_sum(s, sh) / A(d);
  A v = A(0);
  for (Index j = threadIdx.x; j < d; j += kRowThreads) {
    const A t = x(i, j) - mu;
    v += t * t;
  }
  const A r = A(1) / sqrt(block_sum(v, sh) / A(d) + eps);
  if (threadIdx.x == 0) {
    mean[i] = compute_type_t<T>(mu);  // float for 16-bit storage: no rounding between forward and backward
    rstd[i] = compute_type_t<T>(r);
  }
  for (Index j = threadIdx.x; j < d; j += kRowThreads) y.set(i, j, (x(i, j) - mu) * r * ld(gamma[j]) + ld(beta[j]));
}
/// One block per row: dx = beta_dx · dx + rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)), g = dy ⊙ gamma.
template <class T>
__global__ void k_layer_norm_bwd_dx(Mat<const T> x, Mat<const T> dy, Index d, const T* gamma, const compute_type_t<T>* mean,
                                    const compute_type_t<T>* rstd, Mat<T> dx,
                                    A_<T> beta_dx) {
  using A = A_<T>;
  __shared__ A sh[kRowThreads];
  const Index i = blockIdx.x;
  const A mu = ld(mean[i]), r = ld(rstd[i]);
  A mg = A(0), mgx = A(0);
  for (Index j = threadIdx.x; j < d; j += kRowThreads) {
    const A g = dy(i, j) * ld(gamma[j]);
    mg += g;
    mgx += g * (x(i, j) - mu) * r;
  }
  mg = block_sum(mg, sh) / A(d);
  mgx = block_sum(mgx, sh) / A(d);
  for (Index j = threadIdx.x; j < d; j += kRowThreads) {
    const A g = dy(i, j) * ld(gamma[j]);
    const A v = r * (g - mg - (x(i, j) - mu) * r * mgx);
    dx.set(i, j, beta_dx == A(0) ? v : beta_dx * dx(i, j) + v);
  }
}
template <class T> struct LoadDyXhat {
  Mat<const T> x, dy; const compute_type_t<T> *mean, *rstd;
  __device__ A_<T> operator()(Index i, Index j) const { return dy(i, j) * (x(i, j) - ld(mean[i])) * ld(rstd[i]); }
};

template <class A> __device__ A gelu_of(A x, nn::GeluApproximate a) {
  if (a == nn::GeluApproximate::none) return A(0.5) * x * (A(1) + erf(x * A(0.70710678118654752440)));
  const A k = A(0.79788456080286535588);  // √(2/π)
  return A(0.5) * x * (A(1) + tanh(k * (x + A(0.044715) * x * x * x)));
}
template <class A> __device__ A gelu_grad_of(A x, nn::GeluApproximate a) {
  if (a == nn::GeluApproximate::none) {
    const A cdf = A(0.5) * (A(1) + erf(x * A(0.70710678118654752440)));
    const A pdf = exp(A(-0.5) * x * x) * A(0.39894228040143267794);  // 1/√(2π)
    return cdf + x * pdf;
  }
  const A k = A(0.79788456080286535588);
  const A t = tanh(k * (x + A(0.044715) * x * x * x));
  return A(0.5) * (A(1) + t) + A(0.5) * x * (A(1) - t * t) * k * (A(1) + A(3 * 0.044715) * x * x);
}
template <class T> struct GeluOp {
  Mat<const T> x; Mat<T> y; nn::GeluApproximate a;
  __device__ void operator()(Index i, Index j) const { y.set(i, j, gelu_of(x(i, j), a)); }
};
template <class T> struct GeluBackOp {
  Mat<const T> x, dy; Mat<T> dx; A_<T> beta; nn::GeluApproximate a;
  __device__ void operator()(Index i, Index j) const {
    const A_<T> v = dy(i, j) * gelu_grad_of(x(i, j), a);
    dx.set(i, j, beta == A_<T>(0) ? v : beta * dx(i, j) + v);
  }
};

/// One block per query row s: the softmax over the keys it may see (j <= past + s and mask[j] != 0), zero
/// elsewhere; a row that sees nothing becomes zeros.
template <class T>
__global__ void k_masked_causal_softmax(Mat<T> sc, Index len, Index past, const std::int64_t* mask) {
  using A = A_<T>;
  __shared__ A sh[kRowThreads];
  const Index s = blockIdx.x;
  const Index last = len < past + s + 1 ? len : past + s + 1;
  A mx = -INFINITY;
  for (Index j = threadIdx.x; j < last; j += kRowThreads)
    if (!mask || mask[j] != 0) mx = sc(s, j) > mx ? sc(s, j) : mx;
  mx = block_max(mx, sh);
  if (mx == A(-INFINITY)) {
    for (Index j = threadIdx.x; j < len; j += kRowThreads) sc.set(s, j, A(0));
    return;
  }
  A sum = A(0);
  for (Index j = threadIdx.x; j < len; j += kRowThreads) {
    const bool vis = j < last && (!mask || mask[j] != 0);
    const A e = vis ? exp(sc(s, j) - mx) : A(0);
    sc.set(s, j, e);
    sum += e;
  }
  const A inv = A(1) / block_sum(sum, sh);
  for (Index j = threadIdx.x; j < len; j += kRowThreads) sc.set(s, j, sc(s, j) * inv);
}
/// One block per row: dp = scale · p ⊙ (dp − Σ_j p ⊙ dp).
template <class T>
__global__ void k_softmax_backward(Mat<const T> p, Mat<T> dp, Index len, A_<T> scale) {
  using A = A_<T>;
  __shared__ A sh[kRowThreads];
  const Index s = blockIdx.x;
  A dot = A(0);
  for (Index j = threadIdx.x; j < len; j += kRowThreads) dot += p(s, j) * dp(s, j);
  dot = block_sum(dot, sh);
  for (Index j = threadIdx.x; j < len; j += kRowThreads) dp.set(s, j, scale * p(s, j) * (dp(s, j) - dot));
}


// ---- the training kernels (TrainKernels<CudaBackend>) ----------------------------------------------------

/// f(i) for i in [0, n) (1-D grid-stride loop).
template <class F>
__global__ void k_each1(std::size_t n, F f) {
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x) f(i);
}
template <class F>
void each1(std::size_t n, const F& f, const char* what) {
  if (n == 0) return;
  const unsigned grid = unsigned(std::min<std::size_t>((n + 255) / 256, 8192));
  k_each1<<<grid, 256, 0, g_stream>>>(n, f);
  check_launch(what);
}

/// Adam/AdamW on one element: the CPU loop's operations in the accumulator type, each operand stored once
/// (nvcc contracts multiply-adds into FMAs: float and double results agree with the CPU's to rounding).
/// The value an optimizer step starts from (TrainKernels' contract): the master, unless the parameter no longer
/// equals the master rounded to T (written outside the optimizer, or the master new: zero).
template <class T, class S> __device__ A_<S> start_value(const S* master, std::size_t i, T value) {
  const A_<S> cur = ld(value);
  if (master == nullptr) return cur;
  const A_<S> p = ld(master[i]);
  return ld(Num<T>::st(p)) == cur ? p : cur;
}
template <class T, class S> struct AdamOp {
  using A = A_<S>;
  T* value; const T* grad; S* master; S *m, *v, *vmax;
  A decay, wd, beta1, omb1, beta2, omb2, bc2_sqrt, eps, neg_step_size;
  bool decoupled, use_wd, amsgrad;
  __device__ void operator()(std::size_t i) const {
    A g = ld(grad[i]), p = start_value(master, i, value[i]), mm = ld(m[i]), vv = ld(v[i]);
    if (decoupled) p = p * decay;
    else if (use_wd) g = g + wd * p;
    mm = mm * beta1;
    mm = mm + omb1 * g;
    vv = vv * beta2;
    vv = vv + omb2 * g * g;
    A denom;
    if (amsgrad) {
      A vm = ld(vmax[i]);
      if (vv > vm || isnan(vv)) vm = vv;
      vmax[i] = Num<S>::st(vm);
      denom = sqrt(vm) / bc2_sqrt + eps;
    } else {
      denom = sqrt(vv) / bc2_sqrt + eps;
    }
    p = p + neg_step_size * mm / denom;
    m[i] = Num<S>::st(mm);
    v[i] = Num<S>::st(vv);
    if (master) master[i] = Num<S>::st(p);
    value[i] = Num<T>::st(p);
  }
};
template <class T, class S> struct SgdOp {
  using A = A_<S>;
  T* value; const T* grad; S* master; S* buf;
  A wd, momentum, omd, neg_lr;
  bool use_wd, use_momentum, first, nesterov;
  __device__ void operator()(std::size_t i) const {
    A p = start_value(master, i, value[i]);
    A d = ld(grad[i]);
    if (use_wd) d = d + wd * p;
    if (use_momentum) {
      A b = first ? d : ld(buf[i]) * momentum;
      if (!first) b = b + omd * d;
      buf[i] = Num<S>::st(b);
      d = nesterov ? d + momentum * b : b;
    }
    p = p + neg_lr * d;
    if (master) master[i] = Num<S>::st(p);
    value[i] = Num<T>::st(p);
  }
};
template <class T> struct ScaleFlatOp {
  T* g; A_<T> c;
  __device__ void operator()(std::size_t i) const { g[i] = Num<T>::st(ld(g[i]) * c); }
};
template <class T> struct ClampOp {
  T* g; A_<T> lo, hi;
  __device__ void operator()(std::size_t i) const {
    const A_<T> x = ld(g[i]);
    if (x < lo) g[i] = Num<T>::st(lo);
    else if (x > hi) g[i] = Num<T>::st(hi);
  }
};

/// Gradient-norm partials: kind 0 max |g| (NaN propagates), 1 Σ|g|, 2 Σ g², 3 Σ |g|^p. Block b of the
/// kNormBlocks writes out[b]; each thread accumulates a strided share in double, then a fixed tree order.
constexpr int kNormBlocks = 64;
__device__ double norm_combine(double a, double b, int kind) {
  if (kind != 0) return a + b;
  return (b > a || isnan(b)) ? b : a;
}
template <class T>
__global__ void k_norm_partials(const T* g, std::size_t n, int kind, double p, double* out) {
  __shared__ double sh[kRowThreads];
  double acc = 0.0;
  for (std::size_t i = std::size_t(blockIdx.x) * kRowThreads + threadIdx.x; i < n; i += std::size_t(kNormBlocks) * kRowThreads) {
    const double a = fabs(double(ld(g[i])));
    const double t = kind == 0 ? a : kind == 1 ? a : kind == 2 ? a * a : pow(a, p);
    acc = norm_combine(acc, t, kind);
  }
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kRowThreads / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) sh[threadIdx.x] = norm_combine(sh[threadIdx.x], sh[threadIdx.x + w], kind);
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = sh[0];
}

/// The grow-only scratch of grad_norm's partials, per thread and device (device memory and its host copy).
struct NormScratch {
  struct Slot {
    double* dev = nullptr;
    std::size_t capacity = 0;
  };
  std::vector<Slot> by_device;
  std::vector<double> host;
  ~NormScratch() {
    for (std::size_t d = 0; d < by_device.size(); ++d)
      if (by_device[d].dev) {
        (void)cudaSetDevice(int(d));
        peft::cuda::detail::free(by_device[d].dev);
      }
  }
  /// Room for n partials on the current device.
  double* reserve(std::size_t n) {
    int d = 0;
    PEFT_CUDA_CHECK(cudaGetDevice(&d));
    if (by_device.size() <= std::size_t(d)) by_device.resize(std::size_t(d) + 1);
    Slot& s = by_device[std::size_t(d)];
    if (n > s.capacity) {
      peft::cuda::detail::free(s.dev);
      s.dev = nullptr;
      s.capacity = 0;
      s.dev = static_cast<double*>(peft::cuda::detail::alloc(n * sizeof(double)));
      s.capacity = n;
    }
    if (host.size() < n) host.resize(n);
    return s.dev;
  }
};
thread_local NormScratch g_norm_scratch;

/// One block per row of logits [n, V]: the row's loss −log softmax(row)[t] in double, and dlogits =
/// (softmax − onehot(t)) · inv_count (zero rows and zero loss where t == ignore_index).
template <class T>
__global__ void k_cross_entropy(Mat<const T> x, Index V, const std::int64_t* targets, std::int64_t ignore, double inv, Mat<T> dx, bool with_dx,
                                double* row_loss) {
  __shared__ double sh[kRowThreads];
  const Index i = blockIdx.x;
  const std::int64_t t = targets[i];
  if (t == ignore) {
    if (threadIdx.x == 0) row_loss[i] = 0.0;
    if (with_dx)
      for (Index j = threadIdx.x; j < V; j += kRowThreads) dx.set(i, j, A_<T>(0));
    return;
  }
  const double xt = double(x(i, Index(t)));  // read by every thread before any writes dx (it may alias x)
  double mx = -INFINITY;
  for (Index j = threadIdx.x; j < V; j += kRowThreads) mx = fmax(mx, double(x(i, j)));
  sh[threadIdx.x] = mx;
  __syncthreads();
  for (int w = kRowThreads / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) sh[threadIdx.x] = fmax(sh[threadIdx.x], sh[threadIdx.x + w]);
    __syncthreads();
  }
  mx = sh[0];
  __syncthreads();
  double sum = 0.0;
  for (Index j = threadIdx.x; j < V; j += kRowThreads) sum += exp(double(x(i, j)) - mx);
  sum = block_sum(sum, sh);
  if (threadIdx.x == 0) row_loss[i] = log(sum) + mx - xt;
  if (with_dx)
    for (Index j = threadIdx.x; j < V; j += kRowThreads)
      dx.set(i, j, A_<T>((exp(double(x(i, j)) - mx) / sum - (j == Index(t) ? 1.0 : 0.0)) * inv));
}
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
  if constexpr (std::is_same_v<T, float>) {
    PEFT_CUDA_CHECK(cublasSgemm(h, opb, opa, in, im, ik, &al, b.data, ldb, a.data, lda, &be, c.data, ldc));
  } else if constexpr (std::is_same_v<T, double>) {
    PEFT_CUDA_CHECK(cublasDgemm(h, opb, opa, in, im, ik, &al, b.data, ldb, a.data, lda, &be, c.data, ldc));
  } else {  // 16-bit storage, fp32 accumulation (alpha and beta in float, as CUBLAS_COMPUTE_32F wants)
    const cudaDataType_t type = std::is_same_v<T, bf16> ? CUDA_R_16BF : CUDA_R_16F;
    const float alf = float(alpha), bef = float(beta);
    PEFT_CUDA_CHECK(cublasGemmEx(h, opb, opa, in, im, ik, &alf, b.data, type, ldb, a.data, type, lda, &bef, c.data, type, ldc,
                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
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
  if (y.empty() || (x.data == y.data && x.stride == y.stride)) return;  // onto itself (cudaMemcpy must not overlap)
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
  cuda::detail::row_reduce<cuda::detail::acc_t<T>>(x.rows, x.cols, cuda::detail::LoadX<T>{dev(x)}, cuda::detail::StoreAxpby<T>{out, alpha, beta}, "sum_cols");
}
template <class T>
void CudaBackend::sum_rows(std::type_identity_t<ConstMatrixView<T>> x, T* out, std::type_identity_t<T> alpha, std::type_identity_t<T> beta) {
  cuda::detail::col_reduce<cuda::detail::acc_t<T>>(x.rows, x.cols, cuda::detail::LoadX<T>{dev(x)}, cuda::detail::StoreAxpby<T>{out, alpha, beta}, "sum_rows");
}
template <class T>
void CudaBackend::sum_rows_mul(std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b, T* out,
                               std::type_identity_t<T> alpha, std::type_identity_t<T> beta) {
  cuda::detail::col_reduce<cuda::detail::acc_t<T>>(a.rows, a.cols, cuda::detail::LoadMul<T>{dev(a), dev(b)}, cuda::detail::StoreAxpby<T>{out, alpha, beta},
                              "sum_rows_mul");
}
template <class T>
void CudaBackend::row_norms(std::type_identity_t<ConstMatrixView<T>> x, T* out) {
  cuda::detail::row_reduce<cuda::detail::acc_t<T>>(x.rows, x.cols, cuda::detail::LoadSq<T>{dev(x)}, cuda::detail::StoreSqrt<T>{out}, "row_norms");
}
template <class T>
void CudaBackend::col_norms(std::type_identity_t<ConstMatrixView<T>> x, T* out) {
  cuda::detail::col_reduce<cuda::detail::acc_t<T>>(x.rows, x.cols, cuda::detail::LoadSq<T>{dev(x)}, cuda::detail::StoreSqrt<T>{out}, "col_norms");
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
void CudaBackend::relu_forward(MatrixView<T> z) {
  each(z.rows, z.cols, cuda::detail::ReluOp<T>{dev(z)}, "relu_forward");
}
template <class T>
void CudaBackend::relu_backward(std::type_identity_t<ConstMatrixView<T>> z, MatrixView<T> dz) {
  each(z.rows, z.cols, cuda::detail::ReluBackOp<T>{dev(z), dev(dz)}, "relu_backward");
}
template <class T>
void CudaBackend::tanh_forward(std::type_identity_t<ConstMatrixView<T>> x, MatrixView<T> y) {
  each(x.rows, x.cols, cuda::detail::TanhOp<T>{dev(x), dev(y)}, "tanh_forward");
}
template <class T>
void CudaBackend::tanh_backward(std::type_identity_t<ConstMatrixView<T>> y, MatrixView<T> dy) {
  each(y.rows, y.cols, cuda::detail::TanhBackOp<T>{dev(y), dev(dy)}, "tanh_backward");
}
template <class T>
void CudaBackend::lstm_cell(MatrixView<T> gates, std::type_identity_t<ConstMatrixView<T>> rec, std::type_identity_t<ConstMatrixView<T>> cprev,
                            MatrixView<T> c, MatrixView<T> tc, MatrixView<T> h) {
  if (gates.rows != 1 || gates.cols != 4 * c.cols) throw ShapeError("CudaBackend::lstm_cell: gates must be [1, 4h]");
  each(1, c.cols, cuda::detail::LstmCellOp<T>{dev(gates), dev(rec), dev(cprev), dev(c), dev(tc), dev(h), c.cols}, "lstm_cell");
}
template <class T>
void CudaBackend::lstm_cell_backward(std::type_identity_t<ConstMatrixView<T>> gates, std::type_identity_t<ConstMatrixView<T>> tc,
                                     std::type_identity_t<ConstMatrixView<T>> cprev, std::type_identity_t<ConstMatrixView<T>> dy,
                                     std::type_identity_t<ConstMatrixView<T>> dh, MatrixView<T> dcn, MatrixView<T> dg) {
  if (dg.rows != 1 || dg.cols != 4 * tc.cols) throw ShapeError("CudaBackend::lstm_cell_backward: dg must be [1, 4h]");
  each(1, tc.cols, cuda::detail::LstmCellBackOp<T>{dev(gates), dev(tc), dev(cprev), dev(dy), dev(dh), dev(dcn), dev(dg), tc.cols},
       "lstm_cell_backward");
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
  cuda::detail::row_reduce<cuda::detail::acc_t<T>>(a.rows, a.cols, cuda::detail::LoadMul<T>{dev(a), dev(b)}, cuda::detail::StoreAxpby<T>{out, alpha, beta},
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

// ---- NnKernels<CudaBackend> -------------------------------------------------------------------------------

namespace {
void check_rows(Index rows, const char* what) {
  if (rows > Index(INT_MAX)) throw ShapeError(detail::cat("NnKernels<CudaBackend>::", what, ": ", rows, " rows exceed one grid"));
}
}  // namespace

template <class T>
void nn::NnKernels<CudaBackend>::layer_norm_forward(ConstMatrixView<T> x, const T* gamma, const T* beta, double eps, MatrixView<T> y,
                                                    compute_type_t<T>* mean, compute_type_t<T>* rstd) {
  if (x.rows == 0) return;
  check_rows(x.rows, "layer_norm_forward");
  cuda::detail::k_layer_norm_fwd<T><<<unsigned(x.rows), cuda::detail::kRowThreads, 0, cuda::detail::g_stream>>>(
      dev(x), x.cols, gamma, beta, cuda::detail::acc_t<T>(eps), dev(y), mean, rstd);
  cuda::detail::check_launch("layer_norm_forward");
}
template <class T>
void nn::NnKernels<CudaBackend>::layer_norm_backward(ConstMatrixView<T> x, ConstMatrixView<T> dy, const T* gamma, const compute_type_t<T>* mean,
                                                     const compute_type_t<T>* rstd,
                                                     MatrixView<T> dx, T beta_dx, T* dgamma, T* dbeta, T beta_p) {
  using A = cuda::detail::acc_t<T>;
  if (dgamma) {
    cuda::detail::col_reduce<A>(x.rows, x.cols, cuda::detail::LoadDyXhat<T>{dev(x), dev(dy), mean, rstd},
                                cuda::detail::StoreAxpby<T>{dgamma, A(1), A(beta_p)}, "layer_norm_backward (dgamma)");
    if (dbeta)
      cuda::detail::col_reduce<A>(x.rows, x.cols, cuda::detail::LoadX<T>{dev(dy)}, cuda::detail::StoreAxpby<T>{dbeta, A(1), A(beta_p)},
                                  "layer_norm_backward (dbeta)");
  }
  if (dx.empty() || x.rows == 0) return;
  check_rows(x.rows, "layer_norm_backward");
  cuda::detail::k_layer_norm_bwd_dx<T><<<unsigned(x.rows), cuda::detail::kRowThreads, 0, cuda::detail::g_stream>>>(
      dev(x), dev(dy), x.cols, gamma, mean, rstd, dev(dx), A(beta_dx));
  cuda::detail::check_launch("layer_norm_backward");
}
template <class T>
void nn::NnKernels<CudaBackend>::gelu_forward(ConstMatrixView<T> x, MatrixView<T> y, GeluApproximate a) {
  each(x.rows, x.cols, cuda::detail::GeluOp<T>{dev(x), dev(y), a}, "gelu_forward");
}
template <class T>
void nn::NnKernels<CudaBackend>::gelu_backward(ConstMatrixView<T> x, ConstMatrixView<T> dy, MatrixView<T> dx, T beta, GeluApproximate a) {
  each(x.rows, x.cols, cuda::detail::GeluBackOp<T>{dev(x), dev(dy), dev(dx), cuda::detail::acc_t<T>(beta), a}, "gelu_backward");
}
template <class T>
void nn::NnKernels<CudaBackend>::masked_causal_softmax(MatrixView<T> scores, Index past, const std::int64_t* mask) {
  if (scores.rows == 0) return;
  check_rows(scores.rows, "masked_causal_softmax");
  cuda::detail::k_masked_causal_softmax<T><<<unsigned(scores.rows), cuda::detail::kRowThreads, 0, cuda::detail::g_stream>>>(
      dev(scores), scores.cols, past, mask);
  cuda::detail::check_launch("masked_causal_softmax");
}
template <class T>
void nn::NnKernels<CudaBackend>::softmax_backward(ConstMatrixView<T> p, MatrixView<T> dp, T scale) {
  if (p.rows == 0) return;
  check_rows(p.rows, "softmax_backward");
  cuda::detail::k_softmax_backward<T><<<unsigned(p.rows), cuda::detail::kRowThreads, 0, cuda::detail::g_stream>>>(
      dev(p), dev(dp), p.cols, cuda::detail::acc_t<T>(scale));
  cuda::detail::check_launch("softmax_backward");
}

// ---- TrainKernels<CudaBackend> ------------------------------------------------------------------------------

template <class T, class S>
void TrainKernels<CudaBackend>::adam_update(T* value, const T* grad, S* master, S* m, S* v, S* vmax, std::size_t n, const AdamStepScalars& s) {
  using A = cuda::detail::acc_t<S>;
  cuda::detail::AdamOp<T, S> op{value, grad, master, m, v, vmax,
                             A(1.0 - s.lr * s.weight_decay), A(s.weight_decay), A(s.beta1), A(1.0 - s.beta1), A(s.beta2), A(1.0 - s.beta2),
                             A(s.bias_correction2_sqrt), A(s.eps), A(-s.step_size),
                             s.decoupled, s.weight_decay != 0.0, s.amsgrad};
  cuda::detail::each1(n, op, "adam_update");
}
template <class T, class S>
void TrainKernels<CudaBackend>::sgd_update(T* value, const T* grad, S* master, S* buf, std::size_t n, const SgdStepScalars& s) {
  using A = cuda::detail::acc_t<S>;
  cuda::detail::SgdOp<T, S> op{value, grad, master, buf, A(s.weight_decay), A(s.momentum), A(1.0 - s.dampening), A(-s.lr),
                            s.weight_decay != 0.0, s.momentum != 0.0, s.first, s.nesterov};
  cuda::detail::each1(n, op, "sgd_update");
}
template <class T>
double TrainKernels<CudaBackend>::grad_norm(std::span<const ParamRef<T>> params, double norm_type) {
  using cuda::detail::kNormBlocks;
  const int kind = std::isinf(norm_type) ? 0 : norm_type == 1.0 ? 1 : norm_type == 2.0 ? 2 : 3;
  std::size_t tensors = 0;
  for (const auto& p : params)
    if (p.trainable && p.size) ++tensors;
  if (tensors == 0) return 0.0;
  auto& sc = cuda::detail::g_norm_scratch;
  double* out = sc.reserve(tensors * kNormBlocks);
  std::size_t k = 0;
  for (const auto& p : params) {
    if (!p.trainable || !p.size) continue;
    cuda::detail::k_norm_partials<T><<<kNormBlocks, cuda::detail::kRowThreads, 0, cuda::detail::g_stream>>>(p.grad, p.size, kind, norm_type,
                                                                                                            out + k * kNormBlocks);
    cuda::detail::check_launch("grad_norm");
    ++k;
  }
  const std::size_t bytes = tensors * kNormBlocks * sizeof(double);
  cuda::detail::copy_2d(sc.host.data(), bytes, out, bytes, bytes, 1, cuda::detail::CopyKind::device_to_host);  // waits for the stream
  double total = 0.0;
  for (std::size_t i = 0; i < tensors * kNormBlocks; ++i) {
    const double t = sc.host[i];
    if (kind == 0) total = (t > total || std::isnan(t)) ? t : total;
    else total += t;
  }
  if (kind == 2) total = std::sqrt(total);
  else if (kind == 3) total = std::pow(total, 1.0 / norm_type);
  return total;
}
template <class T>
void TrainKernels<CudaBackend>::scale(T* g, std::size_t n, double coef) {
  cuda::detail::each1(n, cuda::detail::ScaleFlatOp<T>{g, cuda::detail::acc_t<T>(coef)}, "scale");
}
template <class T>
void TrainKernels<CudaBackend>::clamp(T* g, std::size_t n, double lo, double hi) {
  using A = cuda::detail::acc_t<T>;
  cuda::detail::each1(n, cuda::detail::ClampOp<T>{g, A(lo), A(hi)}, "clamp");
}
template <class T>
void TrainKernels<CudaBackend>::cross_entropy_rows(ConstMatrixView<T> logits, const std::int64_t* targets, std::int64_t ignore_index,
                                                   double inv_count, MatrixView<T> dlogits, double* row_loss) {
  if (logits.rows == 0) return;
  check_rows(logits.rows, "cross_entropy_rows");
  cuda::detail::k_cross_entropy<T><<<unsigned(logits.rows), cuda::detail::kRowThreads, 0, cuda::detail::g_stream>>>(
      dev(logits), logits.cols, targets, ignore_index, inv_count, dev(dlogits), !dlogits.empty(), row_loss);
  cuda::detail::check_launch("cross_entropy_rows");
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
  template void CudaBackend::relu_forward<T>(MatrixView<T>);                                                                         \
  template void CudaBackend::relu_backward<T>(ConstMatrixView<T>, MatrixView<T>);                                                    \
  template void CudaBackend::tanh_forward<T>(ConstMatrixView<T>, MatrixView<T>);                                                     \
  template void CudaBackend::tanh_backward<T>(ConstMatrixView<T>, MatrixView<T>);                                                    \
  template void CudaBackend::lstm_cell<T>(MatrixView<T>, ConstMatrixView<T>, ConstMatrixView<T>, MatrixView<T>, MatrixView<T>, MatrixView<T>); \
  template void CudaBackend::lstm_cell_backward<T>(ConstMatrixView<T>, ConstMatrixView<T>, ConstMatrixView<T>, ConstMatrixView<T>,   \
                                                   ConstMatrixView<T>, MatrixView<T>, MatrixView<T>);                                \
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

#define PEFT_CUDA_INSTANTIATE_NN(T)                                                                                                \
  template void nn::NnKernels<CudaBackend>::layer_norm_forward<T>(ConstMatrixView<T>, const T*, const T*, double, MatrixView<T>,            \
                                                                  compute_type_t<T>*, compute_type_t<T>*);                                \
  template void nn::NnKernels<CudaBackend>::layer_norm_backward<T>(ConstMatrixView<T>, ConstMatrixView<T>, const T*,                      \
                                                                   const compute_type_t<T>*, const compute_type_t<T>*, MatrixView<T>, T, \
                                                                   T*, T*, T);                                                           \
  template void nn::NnKernels<CudaBackend>::gelu_forward<T>(ConstMatrixView<T>, MatrixView<T>, nn::GeluApproximate);                     \
  template void nn::NnKernels<CudaBackend>::gelu_backward<T>(ConstMatrixView<T>, ConstMatrixView<T>, MatrixView<T>, T, nn::GeluApproximate); \
  template void nn::NnKernels<CudaBackend>::masked_causal_softmax<T>(MatrixView<T>, Index, const std::int64_t*);                        \
  template void nn::NnKernels<CudaBackend>::softmax_backward<T>(ConstMatrixView<T>, MatrixView<T>, T);

PEFT_CUDA_INSTANTIATE_NN(float)
PEFT_CUDA_INSTANTIATE_NN(double)
PEFT_CUDA_INSTANTIATE_NN(bf16)
PEFT_CUDA_INSTANTIATE_NN(half)

PEFT_CUDA_INSTANTIATE(float)
PEFT_CUDA_INSTANTIATE(double)
PEFT_CUDA_INSTANTIATE(bf16)
PEFT_CUDA_INSTANTIATE(half)

#define PEFT_CUDA_INSTANTIATE_TRAIN(T)                                                                                             \
  template void TrainKernels<CudaBackend>::adam_update<T, optimizer_state_t<T>>(T*, const T*, optimizer_state_t<T>*, optimizer_state_t<T>*,  \
                                                                              optimizer_state_t<T>*, optimizer_state_t<T>*, std::size_t,   \
                                                                              const AdamStepScalars&);                                     \
  template void TrainKernels<CudaBackend>::sgd_update<T, optimizer_state_t<T>>(T*, const T*, optimizer_state_t<T>*, optimizer_state_t<T>*,   \
                                                                             std::size_t, const SgdStepScalars&);                          \
  template double TrainKernels<CudaBackend>::grad_norm<T>(std::span<const ParamRef<T>>, double);                                     \
  template void TrainKernels<CudaBackend>::scale<T>(T*, std::size_t, double);                                                        \
  template void TrainKernels<CudaBackend>::clamp<T>(T*, std::size_t, double, double);                                                \
  template void TrainKernels<CudaBackend>::cross_entropy_rows<T>(ConstMatrixView<T>, const std::int64_t*, std::int64_t, double,      \
                                                                 MatrixView<T>, double*);

PEFT_CUDA_INSTANTIATE_TRAIN(float)
PEFT_CUDA_INSTANTIATE_TRAIN(double)
PEFT_CUDA_INSTANTIATE_TRAIN(bf16)
PEFT_CUDA_INSTANTIATE_TRAIN(half)

}  // namespace peft
