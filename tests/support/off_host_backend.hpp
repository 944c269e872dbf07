// OffHost: a test backend whose buffers behave like device memory. Each buffer pointer it hands out has bit
// 62 flipped, which makes it a non-canonical x86-64 address: host code that dereferences it faults at once
// (SIGSEGV), while pointer arithmetic, comparisons and views work as with any pointer. Every backend
// operation takes the tag off and runs EigenCpu's, so results equal the CPU backend's bit for bit.
//
// The layers and adapters must reach parameter and context memory only through backend operations (the
// rule the CUDA backend depends on). Running them on OffHost checks that rule on any machine: a stray host
// loop over a buffer, a Generator filling device memory, or an index read from the host crash the test.
// What OffHost cannot check are the CUDA kernels themselves (tests/cuda on a GPU does).
#pragma once

#include <cstdint>
#include <peft/backend/eigen_cpu.hpp>
#include <peft/buffer.hpp>
#include <peft/nn/kernels.hpp>
#include <peft/train/kernels.hpp>
#include <span>
#include <vector>

namespace peft::test {

constexpr std::uintptr_t kOffHostTag = std::uintptr_t(1) << 62;

template <class T>
T* off_host(T* p) noexcept {  // tags and untags (an involution); nullptr stays nullptr
  return p ? reinterpret_cast<T*>(reinterpret_cast<std::uintptr_t>(p) ^ kOffHostTag) : p;
}
template <class T>
MatrixView<T> on_host(MatrixView<T> v) noexcept {
  v.data = off_host(v.data);
  return v;
}

/// HostBuffer memory behind tagged pointers; no element access.
template <class T>
class OffHostBuffer {
 public:
  OffHostBuffer() = default;
  explicit OffHostBuffer(std::size_t n) : b_(n) {}
  void resize(std::size_t n) { b_.resize(n); }
  void zero() noexcept { b_.zero(); }
  T* data() noexcept { return off_host(b_.data()); }
  const T* data() const noexcept { return off_host(b_.data()); }
  std::size_t size() const noexcept { return b_.size(); }
  bool empty() const noexcept { return b_.empty(); }
  MatrixView<T> view(Index rows, Index cols) { return on_host(b_.view(rows, cols)); }  // (tags: on_host is its own inverse)
  ConstMatrixView<T> view(Index rows, Index cols) const { return on_host(b_.view(rows, cols)); }
  void swap(OffHostBuffer& o) noexcept { std::swap(b_, o.b_); }

 private:
  HostBuffer<T> b_;
};

struct OffHost {
  static constexpr const char* name = "off-host (test)";
  static constexpr bool host_accessible = false;
  template <class T>
  using buffer = OffHostBuffer<T>;
  template <class T>
  using GemmScratch = EigenCpu::GemmScratch<T>;

  struct IndexStage {
    std::vector<std::int64_t> copy;
    void reserve(Index n) {
      if (Index(copy.size()) < n) copy.resize(std::size_t(n));
    }
    const std::int64_t* stage(std::span<const std::int64_t> ids) {
      if (ids.size() > copy.size()) throw ShapeError("OffHost::IndexStage: more ids than reserved");
      std::copy(ids.begin(), ids.end(), copy.begin());
      return staged();
    }
    const std::int64_t* staged() const noexcept { return off_host(copy.data()); }
  };

  template <class T>
  using CV = std::type_identity_t<ConstMatrixView<T>>;
  template <class T>
  using V = std::type_identity_t<T>;
  template <class T>
  static const T* u(const T* p) noexcept { return off_host(p); }
  template <class T>
  static T* u(T* p) noexcept { return off_host(p); }

  template <class T>
  static void upload(CV<T> host, MatrixView<T> device) { EigenCpu::copy<T>(host, on_host(device)); }
  template <class T>
  static void download(CV<T> device, MatrixView<T> host) { EigenCpu::copy<T>(on_host(device), host); }

  template <Trans TA, Trans TB, class T>
  static void gemm(GemmScratch<T>& s, V<T> alpha, CV<T> a, CV<T> b, V<T> beta, std::type_identity_t<MatrixView<T>> c) {
    EigenCpu::gemm<TA, TB, T>(s, alpha, on_host(a), on_host(b), beta, on_host(c));
  }
  template <class T> static void scale(MatrixView<T> y, V<T> beta) { EigenCpu::scale<T>(on_host(y), beta); }
  template <class T> static void fill(MatrixView<T> y, V<T> v) { EigenCpu::fill<T>(on_host(y), v); }
  template <class T> static void copy(CV<T> x, MatrixView<T> y) { EigenCpu::copy<T>(on_host(x), on_host(y)); }
  template <class T> static void axpby(V<T> a, CV<T> x, V<T> b, MatrixView<T> y) { EigenCpu::axpby<T>(a, on_host(x), b, on_host(y)); }
  template <class T> static void add_row_vector(MatrixView<T> y, const V<T>* v, V<T> a) { EigenCpu::add_row_vector<T>(on_host(y), u(v), a); }
  template <class T> static void add_col_vector(MatrixView<T> y, const V<T>* v, V<T> a) { EigenCpu::add_col_vector<T>(on_host(y), u(v), a); }
  template <class T> static void scale_cols(MatrixView<T> y, const V<T>* v) { EigenCpu::scale_cols<T>(on_host(y), u(v)); }
  template <class T> static void scale_rows(MatrixView<T> y, const V<T>* v) { EigenCpu::scale_rows<T>(on_host(y), u(v)); }
  template <class T> static void add_scaled_cols(CV<T> x, const V<T>* v, V<T> b, MatrixView<T> y) {
    EigenCpu::add_scaled_cols<T>(on_host(x), u(v), b, on_host(y));
  }
  template <class T> static void add_scaled_rows(CV<T> x, const V<T>* v, V<T> b, MatrixView<T> y) {
    EigenCpu::add_scaled_rows<T>(on_host(x), u(v), b, on_host(y));
  }
  template <class T> static void mul(CV<T> a, MatrixView<T> y) { EigenCpu::mul<T>(on_host(a), on_host(y)); }
  template <class T> static void div(CV<T> a, CV<T> b, MatrixView<T> y) { EigenCpu::div<T>(on_host(a), on_host(b), on_host(y)); }
  template <class T> static void sum_cols(CV<T> x, T* out, V<T> a, V<T> b) { EigenCpu::sum_cols<T>(on_host(x), u(out), a, b); }
  template <class T> static void sum_rows(CV<T> x, T* out, V<T> a, V<T> b) { EigenCpu::sum_rows<T>(on_host(x), u(out), a, b); }
  template <class T> static void sum_rows_mul(CV<T> x, CV<T> y, T* out, V<T> a, V<T> b) {
    EigenCpu::sum_rows_mul<T>(on_host(x), on_host(y), u(out), a, b);
  }
  template <class T> static void sum_cols_mul(CV<T> x, CV<T> y, T* out, V<T> a, V<T> b) {
    EigenCpu::sum_cols_mul<T>(on_host(x), on_host(y), u(out), a, b);
  }
  template <class T> static void row_norms(CV<T> x, T* out) { EigenCpu::row_norms<T>(on_host(x), u(out)); }
  template <class T> static void col_norms(CV<T> x, T* out) { EigenCpu::col_norms<T>(on_host(x), u(out)); }
  template <class T> static void copy_scale_rows(MatrixView<T> y, const V<T>* v, MatrixView<T> keep) {
    EigenCpu::copy_scale_rows<T>(on_host(y), u(v), on_host(keep));
  }
  template <class T> static void rescale_rows(MatrixView<T> q, MatrixView<T> y, const V<T>* sh, const V<T>* g, const V<T>* of) {
    EigenCpu::rescale_rows<T>(on_host(q), on_host(y), u(sh), u(g), u(of));
  }
  template <class T> static void dropout(CV<T> x, MatrixView<T> y, double p, std::uint64_t seed, std::uint64_t stream) {
    EigenCpu::dropout<T>(on_host(x), on_host(y), p, seed, stream);
  }
  template <class T> static void gather_rows(CV<T> t, const std::int64_t* ids, V<T> a, V<T> b, MatrixView<T> out) {
    EigenCpu::gather_rows<T>(on_host(t), u(ids), a, b, on_host(out));
  }
  template <class T> static void scatter_add_rows(CV<T> src, const std::int64_t* ids, V<T> a, MatrixView<T> t, std::int64_t skip = -1) {
    EigenCpu::scatter_add_rows<T>(on_host(src), u(ids), a, on_host(t), skip);
  }
  template <class T> static void gather_cols(CV<T> a, const std::int64_t* ids, MatrixView<T> out) {
    EigenCpu::gather_cols<T>(on_host(a), u(ids), on_host(out));
  }
  template <class T> static void scatter_add_cols(CV<T> src, const std::int64_t* ids, V<T> al, MatrixView<T> a, std::int64_t skip = -1) {
    EigenCpu::scatter_add_cols<T>(on_host(src), u(ids), al, on_host(a), skip);
  }
  template <class T> static void im2col(const Conv2dGeometry& g, const V<T>* x, MatrixView<T> cols) {
    EigenCpu::im2col<T>(g, u(x), on_host(cols));
  }
  template <class T> static void col2im(const Conv2dGeometry& g, CV<T> dcols, V<T> beta, T* dx) {
    EigenCpu::col2im<T>(g, on_host(dcols), beta, u(dx));
  }
  template <class T> static void kron(V<T> alpha, CV<T> a, CV<T> b, V<T> beta, MatrixView<T> c, bool transposed) {
    EigenCpu::kron<T>(alpha, on_host(a), on_host(b), beta, on_host(c), transposed);
  }
  template <class T> static void kron_grad_a(CV<T> g, CV<T> b, V<T> beta, MatrixView<T> da) {
    EigenCpu::kron_grad_a<T>(on_host(g), on_host(b), beta, on_host(da));
  }
  template <class T> static void kron_grad_b(CV<T> g, CV<T> a, V<T> beta, MatrixView<T> db) {
    EigenCpu::kron_grad_b<T>(on_host(g), on_host(a), beta, on_host(db));
  }
  template <class T> static void relu_forward(MatrixView<T> z) { EigenCpu::relu_forward<T>(on_host(z)); }
  template <class T> static void relu_backward(CV<T> z, MatrixView<T> dz) { EigenCpu::relu_backward<T>(on_host(z), on_host(dz)); }
  template <class T> static void tanh_forward(CV<T> x, MatrixView<T> y) { EigenCpu::tanh_forward<T>(on_host(x), on_host(y)); }
  template <class T> static void tanh_backward(CV<T> y, MatrixView<T> dy) { EigenCpu::tanh_backward<T>(on_host(y), on_host(dy)); }
  template <class T>
  static void lstm_cell(MatrixView<T> gates, CV<T> rec, CV<T> cprev, MatrixView<T> c, MatrixView<T> tc, MatrixView<T> h) {
    EigenCpu::lstm_cell<T>(on_host(gates), on_host(rec), on_host(cprev), on_host(c), on_host(tc), on_host(h));
  }
  template <class T>
  static void lstm_cell_backward(CV<T> gates, CV<T> tc, CV<T> cprev, CV<T> dy, CV<T> dh, MatrixView<T> dcn, MatrixView<T> dg) {
    EigenCpu::lstm_cell_backward<T>(on_host(gates), on_host(tc), on_host(cprev), on_host(dy), on_host(dh), on_host(dcn), on_host(dg));
  }
  template <class T> static void random_uniform(Generator& gen, MatrixView<T> y, double lo, double hi) {
    EigenCpu::random_uniform<T>(gen, on_host(y), lo, hi);
  }
  template <class T> static void random_normal(Generator& gen, MatrixView<T> y, double mean, double sd) {
    EigenCpu::random_normal<T>(gen, on_host(y), mean, sd);
  }
  template <class T> static bool all_finite(ConstMatrixView<T> x) { return EigenCpu::all_finite<T>(on_host(x)); }
};

}  // namespace peft::test

/// The transformer kernels on OffHost: EigenCpu's, on untagged pointers.
template <>
struct peft::nn::NnKernels<peft::test::OffHost> {
  using K = NnKernels<EigenCpu>;
  template <class T>
  static const T* u(const T* p) noexcept { return test::off_host(p); }
  template <class T>
  static T* u(T* p) noexcept { return test::off_host(p); }
  template <class T>
  static void layer_norm_forward(ConstMatrixView<T> x, const T* gamma, const T* beta, double eps, MatrixView<T> y, compute_type_t<T>* mean,
                                 compute_type_t<T>* rstd) {
    K::layer_norm_forward<T>(test::on_host(x), u(gamma), u(beta), eps, test::on_host(y), u(mean), u(rstd));
  }
  template <class T>
  static void layer_norm_backward(ConstMatrixView<T> x, ConstMatrixView<T> dy, const T* gamma, const compute_type_t<T>* mean,
                                  const compute_type_t<T>* rstd, MatrixView<T> dx,
                                  T beta_dx, T* dgamma, T* dbeta, T beta_p) {
    K::layer_norm_backward<T>(test::on_host(x), test::on_host(dy), u(gamma), u(mean), u(rstd), test::on_host(dx), beta_dx, u(dgamma), u(dbeta),
                              beta_p);
  }
  template <class T>
  static void gelu_forward(ConstMatrixView<T> x, MatrixView<T> y, GeluApproximate a) { K::gelu_forward<T>(test::on_host(x), test::on_host(y), a); }
  template <class T>
  static void gelu_backward(ConstMatrixView<T> x, ConstMatrixView<T> dy, MatrixView<T> dx, T beta, GeluApproximate a) {
    K::gelu_backward<T>(test::on_host(x), test::on_host(dy), test::on_host(dx), beta, a);
  }
  template <class T>
  static void masked_causal_softmax(MatrixView<T> scores, Index past, const std::int64_t* mask) {
    K::masked_causal_softmax<T>(test::on_host(scores), past, u(mask));
  }
  template <class T>
  static void softmax_backward(ConstMatrixView<T> p, MatrixView<T> dp, T scale) { K::softmax_backward<T>(test::on_host(p), test::on_host(dp), scale); }
};

/// The training kernels on OffHost: EigenCpu's, on untagged pointers.
template <>
struct peft::TrainKernels<peft::test::OffHost> {
  using K = TrainKernels<EigenCpu>;
  template <class T>
  static T* u(T* p) noexcept { return test::off_host(p); }
  template <class T, class S>
  static void adam_update(T* value, const T* grad, S* master, S* m, S* v, S* vmax, std::size_t n, const AdamStepScalars& s) {
    K::adam_update<T, S>(u(value), u(grad), u(master), u(m), u(v), u(vmax), n, s);
  }
  template <class T, class S>
  static void sgd_update(T* value, const T* grad, S* master, S* buf, std::size_t n, const SgdStepScalars& s) {
    K::sgd_update<T, S>(u(value), u(grad), u(master), u(buf), n, s);
  }
  template <class T>
  static double grad_norm(std::span<const ParamRef<T>> params, double norm_type) {
    std::vector<ParamRef<T>> host(params.begin(), params.end());
    for (auto& p : host) p.grad = u(p.grad);
    return K::grad_norm<T>(host, norm_type);
  }
  template <class T>
  static void scale(T* g, std::size_t n, double coef) { K::scale<T>(u(g), n, coef); }
  template <class T>
  static void clamp(T* g, std::size_t n, double lo, double hi) { K::clamp<T>(u(g), n, lo, hi); }
  template <class T>
  static void cross_entropy_rows(ConstMatrixView<T> logits, const std::int64_t* targets, std::int64_t ignore_index, double inv_count,
                                 MatrixView<T> dlogits, double* row_loss) {
    K::cross_entropy_rows<T>(test::on_host(logits), u(targets), ignore_index, inv_count, test::on_host(dlogits), u(row_loss));
  }
};
