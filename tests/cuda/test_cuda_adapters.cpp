// Every weight adapter on Linear, Conv2d and Embedding, every prompt-learning module and the transformer decoder
// on the CUDA backend against the CPU backend, and the backend operations those layers add (token-id gather/scatter, im2col/col2im,
// Kronecker products, per-channel row steps) against EigenCpu.
//
// The layer cases are tests/support/backend_parity.hpp's (the same list the OffHost test runs bit for bit on
// the CPU): seeded initial parameters, two train steps (forward, backward: dx and every gradient, overwrite
// then accumulate, dropout from the same seed), eval forward, merge (safe_merge), merged forward, unmerge.
// Tolerances (max |gpu − cpu| / max(1, max |cpu|) per tensor): GPU double 1e-11, GPU float 5e-5 (inputs and
// parameters are rounded to float; sums run over up to ~60 terms; the CPU reference is double). Backend
// operations in double: 1e-12.
//
// Without a CUDA device every test prints "SKIPPED: no CUDA device" and returns (ctest: skipped).
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <unistd.h>
#include <peft/backend/cuda.hpp>
#include <peft/io/pretrained.hpp>
#include <vector>

#include "backend_parity.hpp"
#include "gpu_skip.hpp"
#include "test_util.hpp"

using namespace peft;
using peft::test::Mat;
using peft::test::random_mat;
using Gpu = CudaBackend;
namespace st = peft::safetensors;

namespace {

/// A host matrix and its device copy.
struct Twin {
  Mat<double> h;
  DeviceBuffer<double> d;
  explicit Twin(Mat<double> m) : h(std::move(m)), d(std::size_t(h.size())) { Gpu::upload<double>(h, d.view(h.rows(), h.cols())); }
  MatrixView<double> hv() { return {h.data(), Index(h.rows()), Index(h.cols())}; }
  MatrixView<double> dv() { return d.view(h.rows(), h.cols()); }
  double err() const {
    Mat<double> g(h.rows(), h.cols());
    Gpu::download<double>(d.view(h.rows(), h.cols()), g);
    return test::max_abs_diff(g, h) / std::max(1.0, h.cwiseAbs().maxCoeff());
  }
};
constexpr double kOpTol = 1e-12;

}  // namespace

TEST_CASE("cuda: token-id gather and scatter match EigenCpu (repeated ids, padding id, many id ranges)", "[cuda]") {
  PEFT_REQUIRE_GPU();
  const Index vocab = 5003, dim = 300, n = 2000, r = 16;
  std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
  const Mat<double> u = random_mat<double>(1, n, 3);
  for (Index i = 0; i < n; ++i)  // 97 distinct ids spread over the table, each about 20 times
    ids[std::size_t(i)] = std::int64_t(std::floor((u(0, i) + 1.0) * 48.5)) * 51 % vocab;
  ids[5] = ids[17] = 0;
  Gpu::IndexStage stage;
  stage.reserve(n);
  const std::int64_t* dids = stage.stage(ids);
  Twin table(random_mat<double>(vocab, dim, 1)), out(random_mat<double>(n, dim, 2)), src(random_mat<double>(n, dim, 3));
  for (double beta : {0.0, 0.5}) {
    EigenCpu::gather_rows<double>(table.hv(), ids.data(), 1.5, beta, out.hv());
    Gpu::gather_rows<double>(table.dv(), dids, 1.5, beta, out.dv());
    CHECK(out.err() < kOpTol);
  }
  for (std::int64_t skip : {std::int64_t(-1), std::int64_t(0)}) {
    EigenCpu::scatter_add_rows<double>(src.hv(), ids.data(), -0.75, table.hv(), skip);
    Gpu::scatter_add_rows<double>(src.dv(), dids, -0.75, table.dv(), skip);
    CHECK(table.err() < kOpTol);
  }
  Twin a(random_mat<double>(r, vocab, 4)), t(random_mat<double>(n, r, 5)), gsrc(random_mat<double>(n, r, 6));
  EigenCpu::gather_cols<double>(a.hv(), ids.data(), t.hv());
  Gpu::gather_cols<double>(a.dv(), dids, t.dv());
  CHECK(t.err() < kOpTol);
  for (std::int64_t skip : {std::int64_t(-1), std::int64_t(0)}) {
    EigenCpu::scatter_add_cols<double>(gsrc.hv(), ids.data(), 2.0, a.hv(), skip);
    Gpu::scatter_add_cols<double>(gsrc.dv(), dids, 2.0, a.dv(), skip);
    CHECK(a.err() < kOpTol);
  }
  // the staged copy is independent of the host ids once stage() returns
  std::vector<std::int64_t> host_ids = ids;
  dids = stage.stage(host_ids);
  std::fill(host_ids.begin(), host_ids.end(), std::int64_t(1));
  EigenCpu::gather_rows<double>(table.hv(), ids.data(), 1.0, 0.0, out.hv());
  Gpu::gather_rows<double>(table.dv(), dids, 1.0, 0.0, out.dv());
  CHECK(out.err() < kOpTol);
}

TEST_CASE("cuda: im2col and col2im match EigenCpu (stride, padding, dilation)", "[cuda]") {
  PEFT_REQUIRE_GPU();
  for (int variant = 0; variant < 3; ++variant) {
    Conv2dGeometry geo;
    geo.in_channels = 3;
    geo.out_channels = 4;
    geo.kernel_h = variant == 0 ? 3 : 2;
    geo.kernel_w = 3;
    geo.stride_h = variant == 1 ? 2 : 1;
    geo.stride_w = variant == 2 ? 3 : 1;
    geo.pad_h = variant == 2 ? 0 : 1;
    geo.pad_w = 2;
    geo.dilation_h = variant == 2 ? 2 : 1;
    geo.dilation_w = variant == 1 ? 2 : 1;
    geo.in_h = 11;
    geo.in_w = 9;
    INFO("variant " << variant);
    Twin x(random_mat<double>(1, geo.in_size(), 1)), cols(random_mat<double>(geo.patch(), geo.positions(), 2));
    EigenCpu::im2col<double>(geo, x.h.data(), cols.hv());
    Gpu::im2col<double>(geo, x.d.data(), cols.dv());
    CHECK(cols.err() < kOpTol);
    for (double beta : {0.0, 1.0, 0.5}) {
      EigenCpu::col2im<double>(geo, cols.hv(), beta, x.h.data());
      Gpu::col2im<double>(geo, cols.dv(), beta, x.d.data());
      CHECK(x.err() < kOpTol);
    }
  }
}

TEST_CASE("cuda: Kronecker products and per-channel row steps match EigenCpu", "[cuda]") {
  PEFT_REQUIRE_GPU();
  Twin a(random_mat<double>(4, 3, 1)), b(random_mat<double>(17, 23, 2));
  for (bool transposed : {false, true}) {
    Twin c(random_mat<double>(transposed ? 69 : 68, transposed ? 68 : 69, 3));
    for (double beta : {0.0, 0.5}) {
      EigenCpu::kron<double>(1.25, a.hv(), b.hv(), beta, c.hv(), transposed);
      Gpu::kron<double>(1.25, a.dv(), b.dv(), beta, c.dv(), transposed);
      CHECK(c.err() < kOpTol);
    }
  }
  Twin g(random_mat<double>(68, 69, 4)), da(random_mat<double>(4, 3, 5)), db(random_mat<double>(17, 23, 6));
  for (double beta : {0.0, 1.0}) {
    EigenCpu::kron_grad_a<double>(g.hv(), b.hv(), beta, da.hv());
    Gpu::kron_grad_a<double>(g.dv(), b.dv(), beta, da.dv());
    CHECK(da.err() < kOpTol);
    EigenCpu::kron_grad_b<double>(g.hv(), a.hv(), beta, db.hv());
    Gpu::kron_grad_b<double>(g.dv(), a.dv(), beta, db.dv());
    CHECK(db.err() < kOpTol);
  }
  const Index rows = 37, cols = 150;
  Twin x(random_mat<double>(rows, cols, 7)), y(random_mat<double>(rows, cols, 8)), q(random_mat<double>(rows, cols, 9));
  Twin v(random_mat<double>(1, rows, 10)), w(random_mat<double>(1, rows, 11)), o(random_mat<double>(1, rows, 12)), out(random_mat<double>(1, rows, 13));
  for (double beta : {0.0, 0.5}) {
    EigenCpu::add_scaled_rows<double>(x.hv(), v.h.data(), beta, y.hv());
    Gpu::add_scaled_rows<double>(x.dv(), v.d.data(), beta, y.dv());
    CHECK(y.err() < kOpTol);
    EigenCpu::sum_cols_mul<double>(x.hv(), y.hv(), out.h.data(), 2.0, beta);
    Gpu::sum_cols_mul<double>(x.dv(), y.dv(), out.d.data(), 2.0, beta);
    CHECK(out.err() < kOpTol);
  }
  EigenCpu::copy_scale_rows<double>(y.hv(), v.h.data(), q.hv());
  Gpu::copy_scale_rows<double>(y.dv(), v.d.data(), q.dv());
  CHECK(y.err() < kOpTol);
  CHECK(q.err() < kOpTol);
  EigenCpu::rescale_rows<double>(q.hv(), y.hv(), v.h.data(), w.h.data(), o.h.data());
  Gpu::rescale_rows<double>(q.dv(), y.dv(), v.d.data(), w.d.data(), o.d.data());
  CHECK(q.err() < kOpTol);
  CHECK(y.err() < kOpTol);
  EigenCpu::rescale_rows<double>(q.hv(), y.hv(), nullptr, w.h.data(), nullptr);
  Gpu::rescale_rows<double>(q.dv(), y.dv(), nullptr, w.d.data(), nullptr);
  CHECK(q.err() < kOpTol);
  CHECK(y.err() < kOpTol);
}

TEST_CASE("cuda: activations and the LSTM cell match EigenCpu", "[cuda]") {
  PEFT_REQUIRE_GPU();
  const Index h = 37;
  Twin z(random_mat<double>(9, 50, 1)), dz(random_mat<double>(9, 50, 2)), t(random_mat<double>(9, 50, 3));
  EigenCpu::relu_forward<double>(z.hv());
  Gpu::relu_forward<double>(z.dv());
  CHECK(z.err() < kOpTol);
  EigenCpu::relu_backward<double>(z.hv(), dz.hv());
  Gpu::relu_backward<double>(z.dv(), dz.dv());
  CHECK(dz.err() < kOpTol);
  EigenCpu::tanh_forward<double>(dz.hv(), t.hv());
  Gpu::tanh_forward<double>(dz.dv(), t.dv());
  CHECK(t.err() < kOpTol);
  EigenCpu::tanh_backward<double>(t.hv(), z.hv());
  Gpu::tanh_backward<double>(t.dv(), z.dv());
  CHECK(z.err() < kOpTol);
  Twin gates(random_mat<double>(1, 4 * h, 4)), rec(random_mat<double>(1, 4 * h, 5)), cprev(random_mat<double>(1, h, 6));
  Twin c(random_mat<double>(1, h, 7)), tc(random_mat<double>(1, h, 8)), hh(random_mat<double>(1, h, 9));
  EigenCpu::lstm_cell<double>(gates.hv(), rec.hv(), cprev.hv(), c.hv(), tc.hv(), hh.hv());
  Gpu::lstm_cell<double>(gates.dv(), rec.dv(), cprev.dv(), c.dv(), tc.dv(), hh.dv());
  for (auto* x : {&gates, &c, &tc, &hh}) CHECK(x->err() < kOpTol);
  Twin dy(random_mat<double>(1, h, 10)), dh(random_mat<double>(1, h, 11)), dcn(random_mat<double>(1, h, 12)), dg(random_mat<double>(1, 4 * h, 13));
  EigenCpu::lstm_cell_backward<double>(gates.hv(), tc.hv(), cprev.hv(), dy.hv(), dh.hv(), dcn.hv(), dg.hv());
  Gpu::lstm_cell_backward<double>(gates.dv(), tc.dv(), cprev.dv(), dy.dv(), dh.dv(), dcn.dv(), dg.dv());
  CHECK(dcn.err() < kOpTol);
  CHECK(dg.err() < kOpTol);
}

TEST_CASE("cuda: Linear adapters, CPU double vs GPU double and float", "[cuda]") {
  PEFT_REQUIRE_GPU();
  test::parity::linear_cases<Gpu, double>(1e-11);
  test::parity::linear_cases<Gpu, float>(5e-5);
}

TEST_CASE("cuda: Conv2d adapters, CPU double vs GPU double and float", "[cuda]") {
  PEFT_REQUIRE_GPU();
  test::parity::conv_cases<Gpu, double>(1e-11);
  test::parity::conv_cases<Gpu, float>(5e-5);
}

TEST_CASE("cuda: Embedding adapters, CPU double vs GPU double and float", "[cuda]") {
  PEFT_REQUIRE_GPU();
  test::parity::embedding_cases<Gpu, double>(1e-11);
  test::parity::embedding_cases<Gpu, float>(5e-5);
}

TEST_CASE("cuda: prompt-learning modules, CPU double vs GPU double and float", "[cuda]") {
  PEFT_REQUIRE_GPU();
  test::parity::prompt_cases<Gpu, double>(1e-11);
  test::parity::prompt_cases<Gpu, float>(5e-5);
}

TEST_CASE("cuda: the transformer decoder (LayerNorm, masked attention, GELU), CPU double vs GPU double and float", "[cuda]") {
  PEFT_REQUIRE_GPU();
  test::parity::decoder_cases<Gpu, double>(1e-11);
  test::parity::decoder_cases<Gpu, float>(5e-5);
}

TEST_CASE("cuda: a training loop (causal-LM loss, gradient clipping, AdamW, Adam, SGD), CPU double vs GPU double and float", "[cuda][train]") {
  PEFT_REQUIRE_GPU();
  test::parity::training_cases<Gpu, double>(1e-11, true);
  test::parity::training_cases<Gpu, float>(5e-5, false);  // SGD only: see training_cases
}

TEST_CASE("cuda: loss, clipping and optimizer steps make no device allocation after the first step", "[cuda][train][alloc]") {
  PEFT_REQUIRE_GPU();
  Generator g(5);
  Adapted<Linear<float, Gpu>, Lora> layer(Linear<float, Gpu>(32, 11, true, g));
  layer.add_adapter("default", LoraConfig{.r = 4, .lora_alpha = 8}, g);
  std::vector<ParamRef<float>> params;
  layer.visit_parameters([&](ParamRef<float> p) { params.push_back(p); });
  AdamW<float, Gpu> opt(params);
  nn::CrossEntropyLoss<float, Gpu> loss(16);
  const Index n = 16;
  auto ctx = layer.make_context(n);
  DeviceBuffer<float> x(std::size_t(n * 32)), y(std::size_t(n * 11)), dy(std::size_t(n * 11));
  Gpu::random_uniform<float>(g, x.view(n, 32), -1.0, 1.0);
  std::vector<std::int64_t> targets(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) targets[std::size_t(i)] = i % 11;
  std::uint64_t before = 0;
  double first = 0, last = 0;
  for (int step = 0; step < 5; ++step) {
    if (step == 1) before = cuda::allocation_count();
    opt.zero_grad();
    layer.forward(ctx, x.view(n, 32), y.view(n, 11));
    last = loss(y.view(n, 11), targets, dy.view(n, 11));
    if (step == 0) first = last;
    layer.backward(ctx, dy.view(n, 11), {});
    clip_grad_norm<float, Gpu>(params, 1.0);
    opt.step();
  }
  CHECK(cuda::allocation_count() == before);
  CHECK(last < first);  // the loss goes down
}

// Adapter checkpoints of 16-bit device models: LoRA saved from a bf16 (half) GPU model is written as BF16
// (F16), bit for bit; it loads back into a fresh GPU model of the same type exactly, and into a float CPU model
// as the exact widening of every value.
template <class H>
void half_checkpoint_case(st::Dtype dtype) {
  struct GpuNet { Adapted<Linear<H, Gpu>, Lora> fc; };
  struct CpuNet { Adapted<Linear<float>, Lora> fc; };
  LoraConfig lc;
  lc.r = 4;
  lc.lora_alpha = 8;
  Generator g(3), g2(4), g3(5);
  GpuNet m{Adapted<Linear<H, Gpu>, Lora>(Linear<H, Gpu>(12, 6, true, g), "fc")};
  m.fc.add_adapter("default", lc, g);
  auto pm = parameters<H>(m);
  for (std::size_t i = 0; i < pm.size(); ++i)  // non-zero B, so that every tensor carries information
    if (pm[i].trainable) Gpu::random_uniform<H>(g, MatrixView<H>(pm[i].value, 1, Index(pm[i].size)), -1.0, 1.0);
  io::AdapterConfig ac;
  ac.method = lc;
  struct Dir {  // removed with everything in it
    std::filesystem::path path = std::filesystem::temp_directory_path() / ("peft_cuda_half_ckpt_" + std::to_string(::getpid()));
    Dir() { std::filesystem::create_directories(path); }
    ~Dir() { std::error_code ec; std::filesystem::remove_all(path, ec); }
  } dir;
  io::save_pretrained(m, dir.path, "default", ac);
  const st::File f(dir.path / io::adapter_weights_name);
  for (const auto& n : f.names()) CHECK(f.info(n).dtype == dtype);

  GpuNet back{Adapted<Linear<H, Gpu>, Lora>(Linear<H, Gpu>(12, 6, true, g2), "fc")};
  CpuNet cpu{Adapted<Linear<float>, Lora>(Linear<float>(12, 6, true, g3), "fc")};
  io::load_pretrained(back, dir.path);
  io::load_pretrained(cpu, dir.path);
  const auto pb = parameters<H>(back);
  const auto pc = parameters<float>(cpu);
  REQUIRE(pb.size() == pm.size());
  REQUIRE(pc.size() == pm.size());
  for (std::size_t i = 0; i < pm.size(); ++i) {
    if (!pm[i].trainable) continue;
    INFO(pm[i].name);
    const Index n = Index(pm[i].size);
    std::vector<H> a(pm[i].size), b(pm[i].size);
    Gpu::download<H>(ConstMatrixView<H>(pm[i].value, 1, n), MatrixView<H>(a.data(), 1, n));
    Gpu::download<H>(ConstMatrixView<H>(pb[i].value, 1, n), MatrixView<H>(b.data(), 1, n));
    for (std::size_t k = 0; k < a.size(); ++k) {
      CHECK(b[k].bits == a[k].bits);
      CHECK(pc[i].value[k] == float(a[k]));
    }
  }
}

TEST_CASE("cuda: adapter checkpoints of bf16 and half models (BF16/F16 files, loaded back exactly)", "[cuda][half][io]") {
  PEFT_REQUIRE_GPU();
  SECTION("bf16") { half_checkpoint_case<bf16>(st::Dtype::BF16); }
  SECTION("half") { half_checkpoint_case<half>(st::Dtype::F16); }
}

// LayerNorm with 16-bit storage saves its per-row statistics in float: a row of mean ≈ 100 (bf16 would round
// the saved mean by up to 0.25, a quarter of the row's spread) and a constant row with eps = 1e-12 (rstd = 1e6
// overflows half, and 0 · inf made dγ NaN) give CPU double's y, dγ and dβ to the storage type's tolerance.
template <class H>
void layer_norm_stats_case(double tol) {
  namespace pa = test::parity;
  const Index d = 48, rows = 2;
  nn::LayerNorm<double> cpu(d, 1e-12);
  nn::LayerNorm<H, Gpu> gpu(d, 1e-12);
  cpu.set_requires_grad(true);
  gpu.set_requires_grad(true);
  Mat<double> x = random_mat<double>(rows, d, 7);
  x.row(0).array() = x.row(0).array() * 2.0 + 100.0;
  x.row(1).setConstant(3.0);
  x = pa::rounded<H>(x);
  const Mat<double> dy = pa::rounded<H>(random_mat<double>(rows, d, 8));
  DeviceBuffer<H> xd(std::size_t(rows * d)), yd(std::size_t(rows * d)), dyd(std::size_t(rows * d));
  pa::put<Gpu>(x, xd.data());
  pa::put<Gpu>(dy, dyd.data());
  auto cc = cpu.make_context(rows);
  auto cg = gpu.make_context(rows);
  Mat<double> y(rows, d);
  cpu.forward(cc, x, y);
  gpu.forward(cg, xd.view(rows, d), yd.view(rows, d));
  cpu.backward(cc, dy, {}, GradMode::overwrite);
  gpu.backward(cg, dyd.view(rows, d), {}, GradMode::overwrite);
  CHECK(pa::rel(pa::fetch<Gpu>(yd.data(), rows, d), y) <= tol);
  const Mat<double> dg = pa::fetch<Gpu>(gpu.weight_grad().data, 1, d), db = pa::fetch<Gpu>(gpu.bias_grad().data, 1, d);
  CHECK(dg.allFinite());
  CHECK(pa::rel(dg, Mat<double>(Eigen::Map<const Mat<double>>(cpu.weight_grad().data, 1, d))) <= tol);
  CHECK(pa::rel(db, Mat<double>(Eigen::Map<const Mat<double>>(cpu.bias_grad().data, 1, d))) <= tol);
}

TEST_CASE("cuda: LayerNorm with 16-bit storage keeps its statistics in float", "[cuda][half][nn]") {
  PEFT_REQUIRE_GPU();
  SECTION("bf16") { layer_norm_stats_case<bf16>(3e-2); }
  SECTION("half") { layer_norm_stats_case<half>(8e-3); }
}

// 16-bit parameters: AdamW (AMSGrad) and SGD (momentum) with fp32 master weights on the GPU against the same
// optimizers on the CPU (the master arithmetic in float on both; the GPU may contract multiply-adds into FMAs,
// so a parameter may round to the neighbouring 16-bit value: at most one unit in the last place apart). Small
// updates accumulate (element 0 leaves 1.0 although every step is below half its unit in the last place), and
// a parameter written outside the optimizer is taken up at the next step.
template <class H>
void master_weight_case(double ulp) {
  const std::size_t n = 64;
  DeviceBuffer<H> w(n), g(n);
  std::vector<H> wc(n), gc(n), wd(n);
  for (std::size_t i = 0; i < n; ++i) wc[i] = H(i == 0 ? 1.0 : std::sin(0.37 * double(i)) * 4.0);
  Gpu::upload<H>(ConstMatrixView<H>(wc.data(), 1, Index(n)), w.view(1, Index(n)));
  const std::vector<ParamRef<H>> pd{{"w", w.data(), g.data(), n, true, false}}, pc{{"w", wc.data(), gc.data(), n, true, true}};
  AdamW<H, Gpu> ad(pd, {.lr = 1e-4, .amsgrad = true});
  AdamW<H> ac(pc, {.lr = 1e-4, .amsgrad = true});
  SGD<H, Gpu> sd(pd, {.lr = 1e-5, .momentum = 0.9});
  SGD<H> sc(pc, {.lr = 1e-5, .momentum = 0.9});
  for (int step = 0; step < 60; ++step) {
    for (std::size_t i = 0; i < n; ++i) gc[i] = H(0.2 + 0.3 * std::cos(double(step) + double(i)));
    Gpu::upload<H>(ConstMatrixView<H>(gc.data(), 1, Index(n)), g.view(1, Index(n)));
    if (step == 30) {
      wc[5] = H(-3.0);
      Gpu::upload<H>(ConstMatrixView<H>(wc.data() + 5, 1, 1), MatrixView<H>(w.data() + 5, 1, 1));
    }
    ad.step();
    ac.step();
    sd.step();
    sc.step();
    Gpu::download<H>(ConstMatrixView<H>(w.data(), 1, Index(n)), MatrixView<H>(wd.data(), 1, Index(n)));
    for (std::size_t i = 0; i < n; ++i) {
      INFO("step " << step << ", element " << i << ": GPU " << float(wd[i]) << ", CPU " << float(wc[i]));
      REQUIRE(std::abs(float(wd[i]) - float(wc[i])) <= ulp * std::max(std::abs(float(wc[i])), 1e-3f));
    }
  }
  CHECK(float(wd[0]) < 1.0f);
  CHECK(std::abs(float(wd[5]) + 3.0f) < 0.1f);
}

TEST_CASE("cuda: 16-bit parameters train through fp32 master weights (AdamW, SGD), GPU vs CPU", "[cuda][train][half]") {
  PEFT_REQUIRE_GPU();
  SECTION("bf16") { master_weight_case<bf16>(1.0 / 128); }
  SECTION("half") { master_weight_case<half>(1.0 / 1024); }
}

// 16-bit storage with fp32 accumulation: the same cases in bf16 and half against CPU double. Tolerances (first
// estimates, to be confirmed on a GPU): a few unit roundoffs of the storage type per stored intermediate —
// bf16 (u = 2^-9) 3e-2, half (u = 2^-11) 8e-3.
TEST_CASE("cuda: bf16 and half storage, every layer case and prompt module vs CPU double", "[cuda][half]") {
  PEFT_REQUIRE_GPU();
  SECTION("bf16") {
    test::parity::linear_cases<Gpu, bf16>(3e-2);
    test::parity::conv_cases<Gpu, bf16>(3e-2);
    test::parity::embedding_cases<Gpu, bf16>(3e-2);
    test::parity::prompt_cases<Gpu, bf16>(3e-2);
    test::parity::decoder_cases<Gpu, bf16>(3e-2);
  }
  SECTION("half") {
    test::parity::linear_cases<Gpu, half>(8e-3);
    test::parity::conv_cases<Gpu, half>(8e-3);
    test::parity::embedding_cases<Gpu, half>(8e-3);
    test::parity::prompt_cases<Gpu, half>(8e-3);
    test::parity::decoder_cases<Gpu, half>(8e-3);
  }
}

TEST_CASE("cuda: Conv2d and Embedding forward and backward make no device allocation", "[cuda][alloc]") {
  PEFT_REQUIRE_GPU();
  Conv2dGeometry geo;
  geo.in_channels = 8;
  geo.out_channels = 16;
  geo.kernel_h = geo.kernel_w = 3;
  geo.pad_h = geo.pad_w = 1;
  geo.in_h = geo.in_w = 12;
  Generator g(5);
  Adapted<Conv2d<float, Gpu>, Lora, Loha, Lokr, Ia3> conv(Conv2d<float, Gpu>(geo, true, g));
  LoraConfig lora;
  lora.r = 4;
  lora.lora_dropout = 0.1;
  LohaConfig loha;
  loha.r = 2;
  loha.rank_dropout = 0.2;
  LokrConfig lokr;
  lokr.r = 2;
  lokr.rank_dropout = 0.2;
  conv.add_adapter("l", lora, g);
  conv.add_adapter("h", loha, g);
  conv.add_adapter("k", lokr, g);
  conv.add_adapter("i", Ia3Config{}, g);
  conv.set_adapter(std::vector<std::string>{"l", "h", "k", "i"});
  Adapted<Embedding<float, Gpu>, Lora> emb(Embedding<float, Gpu>(1000, 64, g, std::int64_t(0)));
  LoraConfig el;
  el.r = 8;
  el.use_dora = true;
  emb.add_adapter("a", el, g);
  emb.base().set_requires_grad(true);

  const Index batch = 6, n = 50;
  DeviceBuffer<float> x(std::size_t(batch * geo.in_size())), y(std::size_t(batch * geo.out_size())), dx(std::size_t(batch * geo.in_size()));
  DeviceBuffer<float> ey(std::size_t(n * 64));
  std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) ids[std::size_t(i)] = (i * 37) % 1000;
  auto cc = conv.make_context(batch);
  auto ec = emb.make_context(n);
  auto step = [&](Index m) {
    conv.forward(cc, x.view(m, geo.in_size()), y.view(m, geo.out_size()));
    conv.backward(cc, y.view(m, geo.out_size()), dx.view(m, geo.in_size()), GradMode::accumulate);
    emb.forward(ec, TokenIds(ids.data(), std::size_t(m)), ey.view(m, 64));
    emb.backward(ec, ey.view(m, 64), {}, GradMode::accumulate);
  };
  const auto count0 = cuda::allocation_count();
  for (Index m : {batch, Index(1)}) step(m);  // warm-up (lazy module loading)
  cuda::synchronize();
  const auto free0 = cuda::mem_info().free;
  for (int it = 0; it < 3; ++it)
    for (Index m : {batch, Index(1)}) step(m);
  cuda::synchronize();
  CHECK(cuda::allocation_count() == count0);
  const auto free1 = cuda::mem_info().free;  // nothing else allocated (a cuBLAS workspace would be MiBs)
  INFO("free device memory " << free0 << " -> " << free1);
  CHECK(free1 + (std::size_t(4) << 20) >= free0);
}
