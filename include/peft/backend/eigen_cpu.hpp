// peft++ — the CPU backend: Eigen for element-wise work and small or skinny products, OpenBLAS for large
// GEMMs when the build found it (PEFT_WITH_OPENBLAS). Every operation works on row-major views and
// allocates nothing: Eigen's GEMM packs into a caller-provided scratch buffer (see GemmScratch).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <strings.h>
#include <type_traits>
#include <utility>

#include "peft/backend/trans.hpp"
#include "peft/buffer.hpp"
#include "peft/conv_geometry.hpp"
#include "peft/errors.hpp"
#include "peft/rng.hpp"
#include "peft/view.hpp"

#if defined(PEFT_WITH_OPENBLAS)
#include <cblas.h>
#endif

#if !(EIGEN_WORLD_VERSION == 3 && EIGEN_MAJOR_VERSION == 4)
#error "peft++ needs Eigen 3.4 (its GEMM is driven with caller-provided packing buffers)"
#endif

namespace peft {

namespace detail {

template <class T>
using EigenRowMap = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, Eigen::Unaligned,
                               Eigen::OuterStride<>>;
template <class T>
using EigenConstRowMap = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>,
                                    Eigen::Unaligned, Eigen::OuterStride<>>;

template <class T>
EigenRowMap<T> emap(MatrixView<T> v) { return EigenRowMap<T>(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.stride)); }
template <class T>
EigenConstRowMap<T> emap(ConstMatrixView<T> v) {
  return EigenConstRowMap<T>(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.stride));
}

/// Eigen's cache blocking for one GEMM, with the packing buffers pointed into caller memory instead of
/// the stack or the heap (Eigen 3.4's `level3_blocking` protocol: a non-null blockA()/blockB() is used).
template <class T>
class ScratchBlocking : public Eigen::internal::level3_blocking<T, T> {
 public:
  /// For a row-major result [m, n] with inner dimension k. Eigen transposes a row-major product into a
  /// column-major one, so its "rows" are our n and its "cols" our m.
  ScratchBlocking(Index m, Index n, Index k) {
    this->m_mc = n;
    this->m_nc = m;
    this->m_kc = k;
    Eigen::internal::computeProductBlockingSizes<T, T, 1, Index>(this->m_kc, this->m_mc, this->m_nc, Index(1));
  }
  static constexpr std::size_t pad(std::size_t n) { return (n + 15) / 16 * 16; }
  /// Elements of scratch needed: packed panels of both operands.
  std::size_t required() const { return pad(std::size_t(this->m_kc * this->m_mc)) + pad(std::size_t(this->m_kc * this->m_nc)); }
  void bind(T* scratch) {
    this->m_blockA = scratch;
    this->m_blockB = scratch + pad(std::size_t(this->m_kc * this->m_mc));
  }
};

#if defined(PEFT_WITH_OPENBLAS)
/// Whether OpenBLAS runs real kernels for this CPU. OpenBLAS builds that do not recognise a CPU fall back to
/// generic SSE kernels (0.3.21 does this on recent Xeons: "Prescott", ~10-15 GFLOP/s), which are several
/// times slower than Eigen's; then every GEMM stays in Eigen. PEFT_GEMM=eigen|blas|auto overrides the
/// choice (read once).
inline bool blas_is_fast() {
  static const bool fast = [] {
    if (const char* env = std::getenv("PEFT_GEMM")) {
      if (std::strcmp(env, "eigen") == 0) return false;
      if (std::strcmp(env, "blas") == 0) return true;
    }
    const char* core = openblas_get_corename();
    if (!core) return false;
    for (const char* generic : {"prescott", "core2", "atom", "katmai", "coppermine", "northwood", "banias", "penryn", "dunnington",
                                "nehalem", "opteron", "barcelona", "generic", "unknown"})
      if (strcasecmp(core, generic) == 0) return false;
    return true;
  }();
  return fast;
}
#endif

/// Routing of one product C[m, n] = A[m, k] B[k, n]: OpenBLAS for large, fat products when its kernels are
/// real; Eigen otherwise. Eigen stays faster when the inner dimension is small (a LoRA rank: OpenBLAS
/// reaches ~19 GFLOP/s at k = 8) and on small products, where OpenBLAS's threading costs more than it gains.
inline bool use_blas(Index m, Index n, Index k) {
#if defined(PEFT_WITH_OPENBLAS)
  return k >= 64 && std::min(m, n) >= 32 && double(m) * double(n) * double(k) >= double(1 << 24) && blas_is_fast();
#else
  (void)m, (void)n, (void)k;
  return false;
#endif
}

}  // namespace detail

/// The CPU backend policy. Stateless; all operations are static and allocation-free.
struct EigenCpu {
  static constexpr const char* name = "eigen-cpu";
  /// Buffers hold host memory (host-only algorithms such as AdaLoRA's rank allocator need this).
  static constexpr bool host_accessible = true;

  /// Owning storage in this backend's memory space.
  template <class T>
  using buffer = HostBuffer<T>;

  /// Packing scratch for GEMMs. Sized once (by `reserve_gemm`) for the largest product a context runs.
  template <class T>
  struct GemmScratch {
    HostBuffer<T> data;
    /// Grows the scratch so that a [m, n] x k product fits. Allocates; call at context creation only.
    void reserve_gemm(Index m, Index n, Index k) {
      if (m <= 0 || n <= 0 || k <= 0) return;
      // Reserved for the Eigen route even when this shape goes to OpenBLAS: a smaller batch may not.
      // Eigen's block sizes are not monotonic in the dimensions (kc is cut once k passes its cap), and any
      // one of m, n, k may be the batch, so take the maximum over every smaller size of each dimension.
      std::size_t need = 0;
      for (Index v = 1; v <= m; ++v) need = std::max(need, detail::ScratchBlocking<T>(v, n, k).required());
      for (Index v = 1; v <= n; ++v) need = std::max(need, detail::ScratchBlocking<T>(m, v, k).required());
      for (Index v = 1; v <= k; ++v) need = std::max(need, detail::ScratchBlocking<T>(m, n, v).required());
      if (need > data.size()) data.resize(need);
    }
  };

  /// c = alpha * op(a) * op(b) + beta * c, with op(x) = x or xᵀ per TA/TB. c must not alias a or b.
  /// beta == 0 never reads c (a NaN there does not survive). Shapes are checked by the caller.
  template <Trans TA, Trans TB, class T>
  static void gemm(GemmScratch<T>& scratch, std::type_identity_t<T> alpha, std::type_identity_t<ConstMatrixView<T>> a,
                   std::type_identity_t<ConstMatrixView<T>> b, std::type_identity_t<T> beta, std::type_identity_t<MatrixView<T>> c) {
    const Index m = c.rows, n = c.cols;
    const Index k = TA == Trans::no ? a.cols : a.rows;
    if (m == 0 || n == 0) return;
    if (k == 0 || alpha == T(0)) { scale(c, beta); return; }
#if defined(PEFT_WITH_OPENBLAS)
    if (detail::use_blas(m, n, k)) {
      const auto ta = TA == Trans::no ? CblasNoTrans : CblasTrans;
      const auto tb = TB == Trans::no ? CblasNoTrans : CblasTrans;
      const int lda = int(std::max<Index>(a.stride, 1)), ldb = int(std::max<Index>(b.stride, 1)), ldc = int(std::max<Index>(c.stride, 1));
      if constexpr (std::is_same_v<T, float>)
        cblas_sgemm(CblasRowMajor, ta, tb, int(m), int(n), int(k), alpha, a.data, lda, b.data, ldb, beta, c.data, ldc);
      else
        cblas_dgemm(CblasRowMajor, ta, tb, int(m), int(n), int(k), alpha, a.data, lda, b.data, ldb, beta, c.data, ldc);
      return;
    }
#endif
    scale(c, beta);
    detail::ScratchBlocking<T> blocking(m, n, k);
    if (blocking.required() > scratch.data.size())
      throw StateError(detail::cat("EigenCpu::gemm: scratch of ", scratch.data.size(), " elements is too small for a [", m, ", ", n,
                                   "] x ", k, " product (needs ", blocking.required(), "); the context was sized for smaller shapes"));
    blocking.bind(scratch.data.data());
    constexpr int lhs_order = TA == Trans::no ? Eigen::RowMajor : Eigen::ColMajor;
    constexpr int rhs_order = TB == Trans::no ? Eigen::RowMajor : Eigen::ColMajor;
    Eigen::internal::general_matrix_matrix_product<Index, T, lhs_order, false, T, rhs_order, false, Eigen::RowMajor, 1>::run(
        m, n, k, a.data, std::max<Index>(a.stride, 1), b.data, std::max<Index>(b.stride, 1), c.data, 1,
        std::max<Index>(c.stride, 1), alpha, blocking);
  }

  /// y = beta * y (beta == 0 assigns zeros without reading y).
  template <class T>
  static void scale(MatrixView<T> y, std::type_identity_t<T> beta) {
    if (beta == T(1) || y.empty()) return;
    if (beta == T(0)) {  // row by row: a strided Map's setZero is ~8x slower than a plain fill
      if (y.contiguous()) std::fill_n(y.data, y.size(), T(0));
      else for (Index i = 0; i < y.rows; ++i) std::fill_n(y.data + i * y.stride, y.cols, T(0));
      return;
    }
    detail::emap(y) *= beta;
  }
  /// y = value everywhere.
  template <class T>
  static void fill(MatrixView<T> y, std::type_identity_t<T> value) { if (!y.empty()) detail::emap(y).setConstant(value); }
  /// device = host: on this backend both are host memory, so a copy (the CUDA backend's upload, same contract).
  template <class T>
  static void upload(std::type_identity_t<ConstMatrixView<T>> host, MatrixView<T> device) { copy<T>(host, device); }
  /// host = device (a copy here).
  template <class T>
  static void download(std::type_identity_t<ConstMatrixView<T>> device, MatrixView<T> host) { copy<T>(device, host); }
  /// y = x.
  template <class T>
  static void copy(std::type_identity_t<ConstMatrixView<T>> x, MatrixView<T> y) { if (!y.empty()) detail::emap(y) = detail::emap(x); }
  /// y = alpha * x + beta * y (beta == 0 does not read y).
  template <class T>
  static void axpby(std::type_identity_t<T> alpha, std::type_identity_t<ConstMatrixView<T>> x, std::type_identity_t<T> beta, MatrixView<T> y) {
    if (y.empty()) return;
    auto ym = detail::emap(y);
    if (beta == T(0)) ym.noalias() = alpha * detail::emap(x);
    else if (beta == T(1)) ym.noalias() += alpha * detail::emap(x);
    else ym = alpha * detail::emap(x) + beta * ym;
  }
  /// y[i, :] += alpha * v for every row i; v has y.cols elements.
  template <class T>
  static void add_row_vector(MatrixView<T> y, const std::type_identity_t<T>* v, std::type_identity_t<T> alpha) {
    if (y.empty()) return;
    Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>> vm(v, y.cols);
    auto ym = detail::emap(y);
    for (Index i = 0; i < y.rows; ++i) ym.row(i) += alpha * vm;  // `rowwise() += alpha * v` would evaluate a temporary
  }
  /// y[i, j] *= v[j] for every row i; v has y.cols elements.
  template <class T>
  static void scale_cols(MatrixView<T> y, const std::type_identity_t<T>* v) {
    if (y.empty()) return;
    Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>> vm(v, y.cols);
    auto ym = detail::emap(y);
    for (Index i = 0; i < y.rows; ++i) ym.row(i).array() *= vm;
  }
  /// y = beta * y + x ⊙ v (v broadcast over rows; beta == 0 does not read y).
  template <class T>
  static void add_scaled_cols(std::type_identity_t<ConstMatrixView<T>> x, const std::type_identity_t<T>* v, std::type_identity_t<T> beta,
                              MatrixView<T> y) {
    if (y.empty()) return;
    Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>> vm(v, y.cols);
    auto ym = detail::emap(y);
    auto xm = detail::emap(x);
    for (Index i = 0; i < y.rows; ++i) {
      if (beta == T(0)) ym.row(i).array() = xm.row(i).array() * vm;
      else ym.row(i).array() = beta * ym.row(i).array() + xm.row(i).array() * vm;
    }
  }
  /// y ⊙= a (element-wise).
  template <class T>
  static void mul(std::type_identity_t<ConstMatrixView<T>> a, MatrixView<T> y) {
    if (!y.empty()) detail::emap(y).array() *= detail::emap(a).array();
  }
  /// Where gather/scatter find token ids: on the CPU, the caller's memory itself (a device backend copies them
  /// into memory reserved at context creation). `stage` in forward, `staged` in backward (the same ids).
  struct IndexStage {
    const std::int64_t* ids = nullptr;
    void reserve(Index) noexcept {}
    const std::int64_t* stage(std::span<const std::int64_t> v) noexcept { return ids = v.data(); }
    const std::int64_t* staged() const noexcept { return ids; }
  };
  /// out[i, :] = alpha · table[ids[i], :] + beta · out[i, :] (embedding lookup; ids already range-checked).
  template <class T>
  static void gather_rows(std::type_identity_t<ConstMatrixView<T>> table, const std::int64_t* ids, std::type_identity_t<T> alpha,
                          std::type_identity_t<T> beta, MatrixView<T> out) {
    auto om = detail::emap(out);
    auto tm = detail::emap(table);
    for (Index i = 0; i < out.rows; ++i) {
      if (beta == T(0)) om.row(i) = alpha * tm.row(Index(ids[i]));
      else om.row(i) = beta * om.row(i) + alpha * tm.row(Index(ids[i]));
    }
  }
  /// table[ids[i], :] += alpha · src[i, :] for every i (rows equal to `skip` are left alone; -1: none).
  template <class T>
  static void scatter_add_rows(std::type_identity_t<ConstMatrixView<T>> src, const std::int64_t* ids, std::type_identity_t<T> alpha,
                               MatrixView<T> table, std::int64_t skip = -1) {
    auto tm = detail::emap(table);
    auto sm = detail::emap(src);
    for (Index i = 0; i < src.rows; ++i)
      if (ids[i] != skip) tm.row(Index(ids[i])) += alpha * sm.row(i);
  }
  /// out[i, k] = a[k, ids[i]]: a lookup in the transposed table (LoRA's A on embeddings, [r, num_embeddings]).
  template <class T>
  static void gather_cols(std::type_identity_t<ConstMatrixView<T>> a, const std::int64_t* ids, MatrixView<T> out) {
    for (Index i = 0; i < out.rows; ++i)
      for (Index k = 0; k < out.cols; ++k) out(i, k) = a(k, Index(ids[i]));
  }
  /// a[k, ids[i]] += alpha · src[i, k] (the scatter that matches gather_cols).
  template <class T>
  static void scatter_add_cols(std::type_identity_t<ConstMatrixView<T>> src, const std::int64_t* ids, std::type_identity_t<T> alpha,
                               MatrixView<T> a, std::int64_t skip = -1) {
    for (Index i = 0; i < src.rows; ++i)
      if (ids[i] != skip)
        for (Index k = 0; k < src.cols; ++k) a(k, Index(ids[i])) += alpha * src(i, k);
  }
  /// The output columns [lo, hi) whose input column ow·stride − pad + offset lies inside [0, size) (col2im's valid
  /// range in one kernel row, so that its inner loop needs no bounds test).
  static std::pair<Index, Index> valid_range(Index out, Index stride, Index pad, Index offset, Index size) {
    const auto ceil_div = [](Index v, Index d) { return v <= 0 ? -((-v) / d) : (v + d - 1) / d; };
    const Index lo = std::clamp<Index>(ceil_div(pad - offset, stride), 0, out);
    const Index hi = std::clamp<Index>(ceil_div(size + pad - offset, stride), lo, out);
    return {lo, hi};
  }
  /// cols [C·kh·kw, Ho·Wo] = the patches of one image x [C·H·W] (zero outside the padded border). The bounds test
  /// stays in the inner loop: compiled to masked vector loads it beats per-row copies of the valid range (measured
  /// on the 64×64 UNet shape), whereas col2im below gains from the valid range.
  template <class T>
  static void im2col(const Conv2dGeometry& g, const std::type_identity_t<T>* x, MatrixView<T> cols) {
    const Index ho = g.out_h(), wo = g.out_w();
    for (Index c = 0; c < g.in_channels; ++c)
      for (Index ki = 0; ki < g.kernel_h; ++ki)
        for (Index kj = 0; kj < g.kernel_w; ++kj) {
          T* row = cols.data + ((c * g.kernel_h + ki) * g.kernel_w + kj) * cols.stride;
          for (Index oh = 0; oh < ho; ++oh) {
            const Index ih = oh * g.stride_h - g.pad_h + ki * g.dilation_h;
            T* out = row + oh * wo;
            if (ih < 0 || ih >= g.in_h) {
              for (Index ow = 0; ow < wo; ++ow) out[ow] = T(0);
              continue;
            }
            const T* in = x + (c * g.in_h + ih) * g.in_w;
            for (Index ow = 0; ow < wo; ++ow) {
              const Index iw = ow * g.stride_w - g.pad_w + kj * g.dilation_w;
              out[ow] = (iw >= 0 && iw < g.in_w) ? in[iw] : T(0);
            }
          }
        }
  }
  /// dx [C·H·W] = beta · dx + the sum of the patch gradients dcols [C·kh·kw, Ho·Wo] (the adjoint of im2col).
  template <class T>
  static void col2im(const Conv2dGeometry& g, std::type_identity_t<ConstMatrixView<T>> dcols, std::type_identity_t<T> beta, T* dx) {
    const Index n = g.in_size();
    if (beta == T(0)) std::fill(dx, dx + n, T(0));
    else if (beta != T(1)) for (Index i = 0; i < n; ++i) dx[i] *= beta;
    const Index ho = g.out_h(), wo = g.out_w(), sw = g.stride_w;
    for (Index c = 0; c < g.in_channels; ++c)
      for (Index ki = 0; ki < g.kernel_h; ++ki)
        for (Index kj = 0; kj < g.kernel_w; ++kj) {
          const T* row = dcols.data + ((c * g.kernel_h + ki) * g.kernel_w + kj) * dcols.stride;
          const Index off = kj * g.dilation_w - g.pad_w;
          const auto [lo, hi] = valid_range(wo, sw, g.pad_w, kj * g.dilation_w, g.in_w);
          for (Index oh = 0; oh < ho; ++oh) {
            const Index ih = oh * g.stride_h - g.pad_h + ki * g.dilation_h;
            if (ih < 0 || ih >= g.in_h) continue;
            T* out = dx + (c * g.in_h + ih) * g.in_w;
            const T* in = row + oh * wo;
            if (sw == 1)
              for (Index ow = lo; ow < hi; ++ow) out[ow + off] += in[ow];
            else
              for (Index ow = lo; ow < hi; ++ow) out[ow * sw + off] += in[ow];
          }
        }
  }
  /// y[i, :] += alpha · v[i] for every row i (a per-channel bias on [channels, positions]).
  template <class T>
  static void add_col_vector(MatrixView<T> y, const std::type_identity_t<T>* v, std::type_identity_t<T> alpha) {
    auto ym = detail::emap(y);
    for (Index i = 0; i < y.rows; ++i) ym.row(i).array() += alpha * v[i];
  }
  /// out[i] = beta · out[i] + alpha · Σ_j x[i, j] (row sums; beta == 0 does not read out).
  template <class T>
  static void sum_cols(std::type_identity_t<ConstMatrixView<T>> x, T* out, std::type_identity_t<T> alpha, std::type_identity_t<T> beta) {
    auto xm = detail::emap(x);
    for (Index i = 0; i < x.rows; ++i) out[i] = (beta == T(0) ? T(0) : beta * out[i]) + alpha * xm.row(i).sum();
  }
  /// out = beta * out + alpha * Σ_i x[i, :]; out has x.cols elements (beta == 0 does not read out).
  template <class T>
  static void sum_rows(std::type_identity_t<ConstMatrixView<T>> x, T* out, std::type_identity_t<T> alpha, std::type_identity_t<T> beta) {
    Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>> om(out, x.cols);
    if (x.rows == 0) { if (beta == T(0)) om.setZero(); else om *= beta; return; }
    if (beta == T(0)) om.noalias() = alpha * detail::emap(x).colwise().sum();
    else om = beta * om + alpha * detail::emap(x).colwise().sum();
  }
  /// Inverted dropout: y = x * keep / (1 - p), keep ~ Bernoulli(1 - p) drawn from (seed, stream, element
  /// Index), so the same (seed, stream) gives the same mask. y may equal x.
  template <class T>
  static void dropout(std::type_identity_t<ConstMatrixView<T>> x, MatrixView<T> y, double p, std::uint64_t seed, std::uint64_t stream) {
    const T keep_scale = T(1.0 / (1.0 - p));
    for (Index i = 0; i < x.rows; ++i) {
      const T* xr = x.data + i * x.stride;
      T* yr = y.data + i * y.stride;
      for (Index j = 0; j < x.cols; ++j) {
        const bool keep = detail::uniform01(seed, stream, std::uint64_t(i * x.cols + j)) >= p;
        yr[j] = keep ? xr[j] * keep_scale : T(0);
      }
    }
  }

  // ---- row/column reductions and broadcasts (DoRA's weight norm, magnitude gradient and merge) --------

  /// out[i] = ‖x[i, :]‖₂ for every row i (out has x.rows elements).
  template <class T>
  static void row_norms(std::type_identity_t<ConstMatrixView<T>> x, T* out) {
    auto xm = detail::emap(x);
    for (Index i = 0; i < x.rows; ++i) out[i] = xm.row(i).norm();
  }
  /// out[j] = ‖x[:, j]‖₂ for every column j (out has x.cols elements); rows are summed in order.
  template <class T>
  static void col_norms(std::type_identity_t<ConstMatrixView<T>> x, T* out) {
    Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>> om(out, x.cols);
    auto xm = detail::emap(x);
    om.setZero();
    for (Index i = 0; i < x.rows; ++i) om += xm.row(i).array().square();
    om = om.sqrt();
  }
  /// out = beta * out + alpha * Σ_i a[i, :] ⊙ b[i, :] (column sums of an element-wise product; out has
  /// a.cols elements; beta == 0 does not read out).
  template <class T>
  static void sum_rows_mul(std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b, T* out,
                           std::type_identity_t<T> alpha, std::type_identity_t<T> beta) {
    Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>> om(out, a.cols);
    if (beta == T(0)) om.setZero();
    else om *= beta;
    auto am = detail::emap(a);
    auto bm = detail::emap(b);
    for (Index i = 0; i < a.rows; ++i) om += alpha * (am.row(i).array() * bm.row(i).array());
  }
  /// y[i, :] *= v[i] for every row i; v has y.rows elements.
  template <class T>
  static void scale_rows(MatrixView<T> y, const std::type_identity_t<T>* v) {
    auto ym = detail::emap(y);
    for (Index i = 0; i < y.rows; ++i) ym.row(i) *= v[i];
  }
  // ---- per-row steps of per-channel adapters on Conv2d images ([channels, positions] views) ----------------
  /// y = beta · y + diag(v) · x: row i of x scaled by v[i] (v has x.rows elements; beta == 0 does not read y).
  template <class T>
  static void add_scaled_rows(std::type_identity_t<ConstMatrixView<T>> x, const std::type_identity_t<T>* v, std::type_identity_t<T> beta,
                              MatrixView<T> y) {
    auto ym = detail::emap(y);
    auto xm = detail::emap(x);
    for (Index i = 0; i < y.rows; ++i) {
      if (beta == T(0)) ym.row(i) = v[i] * xm.row(i);
      else ym.row(i) = beta * ym.row(i) + v[i] * xm.row(i);
    }
  }
  /// out[i] = beta · out[i] + alpha · Σ_j a[i, j] · b[i, j] (row-wise dot products; beta == 0 does not read out).
  template <class T>
  static void sum_cols_mul(std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b, T* out,
                           std::type_identity_t<T> alpha, std::type_identity_t<T> beta) {
    auto am = detail::emap(a);
    auto bm = detail::emap(b);
    for (Index i = 0; i < a.rows; ++i) out[i] = (beta == T(0) ? T(0) : beta * out[i]) + alpha * am.row(i).dot(bm.row(i));
  }
  /// keep = y, then y[i, :] *= v[i], in one pass (output scaling that saves its input for backward).
  template <class T>
  static void copy_scale_rows(MatrixView<T> y, const std::type_identity_t<T>* v, MatrixView<T> keep) {
    auto ym = detail::emap(y);
    auto km = detail::emap(keep);
    for (Index i = 0; i < y.rows; ++i) {
      km.row(i) = ym.row(i);
      ym.row(i) *= v[i];
    }
  }
  /// Per row i, in one pass: q[i, :] += y[i, :] − shift[i], then y[i, :] = gain[i] · q[i, :] + offset[i]. DoRA's
  /// per-channel output step on a Conv2d image: q enters as the slot's s·B·A term and leaves as its unscaled output
  /// (running output − base bias + s·B·A term), y leaves as g ⊙ q + b. shift / offset null: zero.
  template <class T>
  static void rescale_rows(MatrixView<T> q, MatrixView<T> y, const std::type_identity_t<T>* shift, const std::type_identity_t<T>* gain,
                           const std::type_identity_t<T>* offset) {
    auto qm = detail::emap(q);
    auto ym = detail::emap(y);
    for (Index i = 0; i < q.rows; ++i) {
      const T sh = shift ? shift[i] : T(0), g = gain[i], of = offset ? offset[i] : T(0);
      qm.row(i).array() += ym.row(i).array() - sh;
      ym.row(i).array() = g * qm.row(i).array() + of;
    }
  }
  // ---- Kronecker products (LoKr's ΔW = s · kron(w1, w2) and its gradients) ------------------------------
  /// c = alpha · kron(a, b) + beta · c, or its transpose when `transposed` (beta == 0 does not read c).
  /// kron(a, b)[i·b.rows + p, j·b.cols + q] = a(i, j) · b(p, q).
  template <class T>
  static void kron(std::type_identity_t<T> alpha, std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b,
                   std::type_identity_t<T> beta, MatrixView<T> c, bool transposed) {
    for (Index i = 0; i < a.rows; ++i)
      for (Index j = 0; j < a.cols; ++j) {
        const T aij = a(i, j);
        for (Index p = 0; p < b.rows; ++p)
          for (Index q = 0; q < b.cols; ++q) {
            T& dst = transposed ? c(j * b.cols + q, i * b.rows + p) : c(i * b.rows + p, j * b.cols + q);
            const T v = alpha * (aij * b(p, q));
            dst = beta == T(0) ? v : beta * dst + v;
          }
      }
  }
  /// ∂L/∂a for c = kron(a, b): da(i, j) = Σ_{p,q} g(i·b.rows + p, j·b.cols + q) · b(p, q), stored per beta.
  template <class T>
  static void kron_grad_a(std::type_identity_t<ConstMatrixView<T>> g, std::type_identity_t<ConstMatrixView<T>> b, std::type_identity_t<T> beta,
                          MatrixView<T> da) {
    for (Index i = 0; i < da.rows; ++i)
      for (Index j = 0; j < da.cols; ++j) {
        T acc = 0;
        for (Index p = 0; p < b.rows; ++p) {
          const T* grow = g.data + (i * b.rows + p) * g.stride + j * b.cols;
          const T* brow = b.data + p * b.stride;
          for (Index q = 0; q < b.cols; ++q) acc += grow[q] * brow[q];
        }
        da(i, j) = beta == T(0) ? acc : beta * da(i, j) + acc;
      }
  }
  /// ∂L/∂b for c = kron(a, b): db(p, q) = Σ_{i,j} g(i·b.rows + p, j·b.cols + q) · a(i, j), stored per beta.
  template <class T>
  static void kron_grad_b(std::type_identity_t<ConstMatrixView<T>> g, std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<T> beta,
                          MatrixView<T> db) {
    for (Index p = 0; p < db.rows; ++p)
      for (Index q = 0; q < db.cols; ++q) db(p, q) = beta == T(0) ? T(0) : beta * db(p, q);
    for (Index i = 0; i < a.rows; ++i)
      for (Index j = 0; j < a.cols; ++j) {
        const T aij = a(i, j);
        for (Index p = 0; p < db.rows; ++p) {
          const T* grow = g.data + (i * db.rows + p) * g.stride + j * db.cols;
          T* drow = db.data + p * db.stride;
          for (Index q = 0; q < db.cols; ++q) drow[q] += aij * grow[q];
        }
      }
  }

  // ---- activations and the LSTM cell (the prompt encoders) ---------------------------------------------
  /// z = max(z, 0) in place.
  template <class T>
  static void relu_forward(MatrixView<T> z) {
    for (Index i = 0; i < z.rows; ++i)
      for (Index j = 0; j < z.cols; ++j) z(i, j) = std::max(z(i, j), T(0));
  }
  /// dz = 0 where the ReLU output z is not positive.
  template <class T>
  static void relu_backward(std::type_identity_t<ConstMatrixView<T>> z, MatrixView<T> dz) {
    for (Index i = 0; i < z.rows; ++i)
      for (Index j = 0; j < z.cols; ++j)
        if (!(z(i, j) > T(0))) dz(i, j) = T(0);
  }
  /// y = tanh(x).
  template <class T>
  static void tanh_forward(std::type_identity_t<ConstMatrixView<T>> x, MatrixView<T> y) {
    for (Index i = 0; i < x.rows; ++i)
      for (Index j = 0; j < x.cols; ++j) y(i, j) = std::tanh(x(i, j));
  }
  /// dy ⊙= 1 − y² (y: the tanh output).
  template <class T>
  static void tanh_backward(std::type_identity_t<ConstMatrixView<T>> y, MatrixView<T> dy) {
    for (Index i = 0; i < y.rows; ++i)
      for (Index j = 0; j < y.cols; ++j) dy(i, j) *= T(1) - y(i, j) * y(i, j);
  }
  /// One LSTM time step (torch.nn.LSTM's gate order i, f, g, o), rows [1, ·]: gates [1, 4h] holds x W_ihᵀ + b_ih
  /// and leaves as the activated gates; rec [1, 4h] = h_prev W_hhᵀ + b_hh; c = f ⊙ c_prev + i ⊙ g, tc = tanh(c),
  /// h = o ⊙ tc.
  template <class T>
  static void lstm_cell(MatrixView<T> gates, std::type_identity_t<ConstMatrixView<T>> rec, std::type_identity_t<ConstMatrixView<T>> cprev,
                        MatrixView<T> c, MatrixView<T> tc, MatrixView<T> h) {
    const auto sigmoid = [](T x) { return T(1) / (T(1) + std::exp(-x)); };
    const Index n = c.cols;
    for (Index j = 0; j < n; ++j) {
      const T ig = sigmoid(gates(0, j) + rec(0, j)), fg = sigmoid(gates(0, n + j) + rec(0, n + j));
      const T gg = std::tanh(gates(0, 2 * n + j) + rec(0, 2 * n + j)), og = sigmoid(gates(0, 3 * n + j) + rec(0, 3 * n + j));
      gates(0, j) = ig;
      gates(0, n + j) = fg;
      gates(0, 2 * n + j) = gg;
      gates(0, 3 * n + j) = og;
      c(0, j) = fg * cprev(0, j) + ig * gg;
      tc(0, j) = std::tanh(c(0, j));
      h(0, j) = og * tc(0, j);
    }
  }
  /// Its backward at one step: dy [1, h] the output gradient from above, dh [1, h] the one from the next step
  /// (through W_hh), dcn [1, h] carries dc_{t+1} ⊙ f_{t+1} in and dc_t ⊙ f_t out; dg [1, 4h] = the gradient of the
  /// pre-activation gates.
  template <class T>
  static void lstm_cell_backward(std::type_identity_t<ConstMatrixView<T>> gates, std::type_identity_t<ConstMatrixView<T>> tc,
                                 std::type_identity_t<ConstMatrixView<T>> cprev, std::type_identity_t<ConstMatrixView<T>> dy,
                                 std::type_identity_t<ConstMatrixView<T>> dh, MatrixView<T> dcn, MatrixView<T> dg) {
    const Index n = tc.cols;
    for (Index j = 0; j < n; ++j) {
      const T ig = gates(0, j), fg = gates(0, n + j), gg = gates(0, 2 * n + j), og = gates(0, 3 * n + j);
      const T dht = dy(0, j) + dh(0, j);
      const T dc = dcn(0, j) + dht * og * (T(1) - tc(0, j) * tc(0, j));
      dg(0, j) = dc * gg * ig * (T(1) - ig);
      dg(0, n + j) = dc * cprev(0, j) * fg * (T(1) - fg);
      dg(0, 2 * n + j) = dc * ig * (T(1) - gg * gg);
      dg(0, 3 * n + j) = dht * tc(0, j) * og * (T(1) - og);
      dcn(0, j) = dc * fg;
    }
  }

  /// y = a ⊘ b element-wise (same shapes; y may be a or b).
  template <class T>
  static void div(std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b, MatrixView<T> y) {
    if (!y.empty()) detail::emap(y).array() = detail::emap(a).array() / detail::emap(b).array();
  }

  // ---- initialisation and checks (not on the hot path) -------------------------------------------------

  /// y = numbers uniform in [lo, hi) from the next stream of `gen` (y contiguous; Generator::uniform).
  template <class T>
  static void random_uniform(Generator& gen, MatrixView<T> y, double lo, double hi) {
    if (!y.contiguous()) throw ShapeError("EigenCpu::random_uniform: the view must be contiguous");
    gen.uniform(y.data, std::size_t(y.size()), lo, hi);
  }
  /// y = numbers from N(mean, std²) from the next stream of `gen` (y contiguous; Generator::normal).
  template <class T>
  static void random_normal(Generator& gen, MatrixView<T> y, double mean, double std) {
    if (!y.contiguous()) throw ShapeError("EigenCpu::random_normal: the view must be contiguous");
    gen.normal(y.data, std::size_t(y.size()), mean, std);
  }
  /// Whether every element of x is finite (no NaN, no ±Inf).
  template <class T>
  static bool all_finite(ConstMatrixView<T> x) {
    for (Index i = 0; i < x.rows; ++i)
      for (Index j = 0; j < x.cols; ++j)
        if (!std::isfinite(double(x(i, j)))) return false;
    return true;
  }
};

}  // namespace peft
