// Conv2d base layer (im2col + GEMM) and LoRA on Conv2d: against a direct convolution, finite differences,
// PEFT's properties, real PEFT numbers, bad input.
#include <catch2/catch.hpp>

#include "../../src/cuda/conv_index.hpp"
#include "conv_ref.hpp"
#include "layer_check.hpp"
#include "reference.hpp"

using namespace peft;
using namespace peft::test;

namespace {
template <class T>
using LoraConv = Adapted<Conv2d<T>, Lora>;

const std::vector<Conv2dGeometry> kGeometries = {geo(3, 4, 3, 1, 1, 1, 6, 6), geo(3, 4, 3, 2, 0, 1, 7, 7), geo(2, 3, 3, 1, 2, 2, 5, 6),
                                                 geo(4, 2, 1, 1, 0, 1, 3, 3), geo(2, 5, 2, 2, 1, 1, 5, 4)};
}  // namespace

TEST_CASE("conv2d: forward equals the direct convolution", "[conv2d]") {
  for (const auto& g : kGeometries) {
    CAPTURE(g.in_channels, g.out_channels, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h, g.in_h, g.in_w);
    Generator gen(1);
    Conv2d<double> conv(g, true, gen);
    const Mat<double> x = random_mat<double>(3, g.in_size(), 2);
    Mat<double> y(3, g.out_size());
    auto ctx = conv.make_context(3);
    conv.forward(ctx, x, y);
    const Mat<double> expect = direct_conv(g, x, as_mat(ConstMatrixView<double>(conv.weight())), as_mat(ConstMatrixView<double>(conv.bias())));
    CHECK(max_abs_diff(y, expect) < 1e-12);
  }
}

TEMPLATE_TEST_CASE("conv2d and lora on conv2d: backward matches finite differences", "[conv2d][lora][grad]", float, double) {
  using T = TestType;
  for (const auto& g : kGeometries) {
    CAPTURE(g.in_channels, g.out_channels, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h, g.in_h, g.in_w);
    for (int variant = 0; variant < 3; ++variant) {
      CAPTURE(variant);
      auto build = [&](auto tag) {
        using U = decltype(tag);
        Generator gen(3);
        LoraConv<U> l(Conv2d<U>(g, true, gen));
        LoraConfig c;
        c.r = 3;
        c.lora_alpha = 6;
        c.init_lora_weights = LoraInit::off;
        c.lora_bias = variant == 1;
        c.lora_dropout = variant == 2 ? 0.3 : 0.0;
        l.add_adapter("default", c, gen);
        if (variant == 0) l.base().set_requires_grad(true);  // full fine-tuning of the conv too
        if (variant == 2) {
          LoraConfig c2;
          c2.r = 2;
          c2.use_rslora = true;
          c2.init_lora_weights = LoraInit::off;
          l.add_adapter("second", c2, gen);
          l.set_adapter(std::vector<std::string>{"default", "second"});
        }
        return l;
      };
      auto l = build(T{});
      auto twin = build(double{});
      check_layer_gradients(l, twin, 2);
    }
  }
}

TEMPLATE_TEST_CASE("lora on conv2d: PEFT's properties", "[conv2d][lora][props]", float, double) {
  using T = TestType;
  const auto g = kGeometries[1];
  Generator gen(4);
  Conv2d<T> base(g, true, gen);
  const Mat<T> x = random_mat<T>(2, g.in_size(), 5);
  Mat<T> y0(2, g.out_size()), y(2, g.out_size()), ym(2, g.out_size());
  auto bctx = base.make_context(2);
  base.forward(bctx, x, y0);
  LoraConv<T> l(base);
  l.add_adapter("default", LoraConfig{}, gen);  // default init: B = 0
  auto ctx = l.make_context(2);
  l.forward(ctx, x, y);
  CHECK(y == y0);
  auto& a = lora_adapter(l, "default");
  gen.normal(a.b.data(), a.b.size(), 0.0, 0.5);
  l.forward(ctx, x, y);
  CHECK(max_abs_diff(y, y0) > 1e-3);
  const Mat<T> w0 = as_mat(l.base().weight());
  l.merge();
  l.forward(ctx, x, ym);
  CHECK(max_abs_diff(ym, y) < 100 * value_tol<T>());
  l.unmerge();
  CHECK(max_abs_diff(as_mat(l.base().weight()), w0) < 10 * value_tol<T>());
  l.disable_adapters();
  l.forward(ctx, x, ym);
  CHECK(max_abs_diff(ym, y0) < 10 * value_tol<T>());  // the weight went through merge and unmerge: rounding only
}

TEMPLATE_TEST_CASE("lora on conv2d matches Hugging Face PEFT", "[conv2d][lora][reference]", float, double) {
  using T = TestType;
  struct RefCase {
    const char* file;
    Conv2dGeometry g;
    bool rslora;
  };
  const std::string sfx = std::is_same_v<T, float> ? "_f32.json" : "_f64.json";
  for (const RefCase& rc : {RefCase{"lora_conv2d_default", geo(3, 4, 3, 1, 1, 1, 6, 6), false}, RefCase{"lora_conv2d_s2_default", geo(3, 4, 3, 2, 0, 1, 7, 7), false},
                           RefCase{"lora_conv2d_rslora", geo(3, 4, 3, 1, 1, 1, 6, 6), true}}) {
    INFO(rc.file);
    const auto j = load_reference(rc.file + sfx);
    Generator gen(0);
    LoraConv<T> l(Conv2d<T>(rc.g, true, gen), "conv");
    as_mat(l.base().weight()) = ref_tensor<T>(j, "conv.weight");
    as_mat(l.base().bias()) = ref_tensor<T>(j, "conv.bias");
    LoraConfig c;
    c.r = j.at("config").at("default").at("r");
    c.lora_alpha = j.at("config").at("default").at("lora_alpha");
    c.use_rslora = rc.rslora;
    c.init_lora_weights = LoraInit::zeros;
    l.add_adapter("default", c, gen);
    auto& a = lora_adapter(l, "default");
    CHECK(double(a.scaling) == Approx(j.at("scaling").at("default").at("conv").template get<double>()));
    as_mat(a.A()) = ref_tensor<T>(j, "conv.lora_A.weight");
    as_mat(a.B()) = ref_tensor<T>(j, "conv.lora_B.weight");
    const Mat<T> x = ref_tensor<T>(j, "x"), dy = ref_tensor<T>(j, "grad_out");
    auto ctx = l.make_context(x.rows());
    Mat<T> y(x.rows(), rc.g.out_size()), dx(x.rows(), rc.g.in_size());
    l.forward(ctx, x, y);
    CHECK(scaled_diff(y, ref_tensor<T>(j, "out")) < reference_tol<T>());
    l.backward(ctx, dy, dx, GradMode::overwrite);
    CHECK(scaled_diff(dx, ref_tensor<T>(j, "grad.x")) < reference_tol<T>());
    CHECK(scaled_diff(as_mat(a.grad_A()), ref_tensor<T>(j, "grad.conv.lora_A.weight")) < reference_tol<T>());
    CHECK(scaled_diff(as_mat(a.grad_B()), ref_tensor<T>(j, "grad.conv.lora_B.weight")) < reference_tol<T>());
    Mat<T> delta(rc.g.out_channels, rc.g.patch());
    l.delta_weight("default", delta);
    CHECK(scaled_diff(delta, ref_tensor<T>(j, "delta.conv")) < reference_tol<T>());
    l.disable_adapters();
    l.forward(ctx, x, y);
    CHECK(scaled_diff(y, ref_tensor<T>(j, "base_out")) < reference_tol<T>());
    l.enable_adapters();
    l.merge();
    CHECK(scaled_diff(as_mat(l.base().weight()), ref_tensor<T>(j, "merged.conv.weight")) < reference_tol<T>());
    l.forward(ctx, x, y);
    CHECK(scaled_diff(y, ref_tensor<T>(j, "merged_out")) < reference_tol<T>());
  }
}

TEST_CASE("conv2d: bad input gets a clear exception", "[conv2d][errors]") {
  Generator gen(1);
  REQUIRE_THROWS_WITH(Conv2d<float>(geo(3, 4, 7, 1, 0, 1, 5, 5), true, gen), Catch::Contains("does not fit a 5x5 input"));
  REQUIRE_THROWS_WITH(Conv2d<float>(geo(3, 4, 3, 0, 0, 1, 5, 5), true, gen), Catch::Contains("stride must be positive"));
  LoraConv<float> l(Conv2d<float>(geo(3, 4, 3, 1, 1, 1, 6, 6), true, gen));
  l.add_adapter("default", LoraConfig{}, gen);
  auto ctx = l.make_context(2);
  Mat<float> x(2, 3 * 5 * 5), y(2, 4 * 6 * 6);
  REQUIRE_THROWS_WITH(l.forward(ctx, x, y), Catch::Contains("the layer expects C·H·W = 3·6·6 = 108"));
  Mat<float> x2(2, 108), y2(2, 100);
  REQUIRE_THROWS_WITH(l.forward(ctx, x2, y2), Catch::Contains("O·Ho·Wo = 4·6·6"));
  LoraConfig c;
  c.fan_in_fan_out = true;
  REQUIRE_THROWS_WITH(l.add_adapter("f", c, gen), Catch::Contains("fan_in_fan_out does not apply to a Conv2d"));
  l.base().set_input_size(8, 8);
  auto ctx2 = l.make_context(2);
  Mat<float> x3(2, 3 * 8 * 8), y3(2, 4 * 8 * 8);
  l.forward(ctx2, x3, y3);  // a new input size works after make_context
  REQUIRE_THROWS_WITH(l.forward(ctx, x3, y3), Catch::Contains("another input size"));
}

TEST_CASE("conv2d: a context made for another geometry is refused even when the sizes agree", "[conv2d][errors]") {
  Generator gen(1);
  LoraConv<float> l(Conv2d<float>(geo(3, 4, 3, 1, 1, 1, 8, 16), true, gen));
  l.add_adapter("default", LoraConfig{}, gen);
  auto ctx = l.make_context(1);
  l.base().set_input_size(16, 8);  // same C·H·W and Ho·Wo, transposed
  Mat<float> x(1, 3 * 16 * 8), y(1, 4 * 16 * 8);
  REQUIRE_THROWS_WITH(l.forward(ctx, x, y), Catch::Contains("another input size"));
}

// The CUDA backend's im2col and col2im kernels compute one element each with these functions
// (src/cuda/conv_index.hpp); here they run on the host against EigenCpu, so their indexing is checked on
// machines without a GPU.
TEST_CASE("conv2d: the CUDA kernels' per-element im2col/col2im arithmetic equals EigenCpu's", "[conv2d][cuda-index]") {
  using peft::cuda::detail::ConvShape;
  for (int variant = 0; variant < 4; ++variant) {
    Conv2dGeometry g;
    g.in_channels = 3;
    g.out_channels = 2;
    g.kernel_h = variant == 0 ? 3 : 2;
    g.kernel_w = variant == 3 ? 1 : 3;
    g.stride_h = variant == 1 ? 2 : 1;
    g.stride_w = variant == 2 ? 3 : (variant == 3 ? 2 : 1);
    g.pad_h = variant == 2 ? 0 : 1;
    g.pad_w = variant == 3 ? 0 : 2;
    g.dilation_h = variant == 2 ? 2 : 1;
    g.dilation_w = variant == 1 ? 2 : 1;
    g.in_h = 9;
    g.in_w = 8;
    INFO("variant " << variant);
    const ConvShape s = ConvShape::of(g);
    const test::Mat<double> x = test::random_mat<double>(1, g.in_size(), 1);
    test::Mat<double> cols(g.patch(), g.positions()), cols_k(g.patch(), g.positions());
    EigenCpu::im2col<double>(g, x.data(), cols);
    for (Index r = 0; r < g.patch(); ++r)
      for (Index p = 0; p < g.positions(); ++p) cols_k(r, p) = peft::cuda::detail::im2col_at(s, x.data(), r, p);
    CHECK(test::max_abs_diff(cols_k, cols) == 0.0);
    for (double beta : {0.0, 0.5}) {
      const test::Mat<double> dcols = test::random_mat<double>(g.patch(), g.positions(), 2);
      test::Mat<double> dx = test::random_mat<double>(1, g.in_size(), 3), dx_k = dx;
      EigenCpu::col2im<double>(g, dcols, beta, dx.data());
      for (Index c = 0; c < g.in_channels; ++c)
        for (Index hw = 0; hw < g.in_h * g.in_w; ++hw) {
          double& o = dx_k(0, c * g.in_h * g.in_w + hw);
          o = peft::cuda::detail::col2im_at(s, dcols.data(), Index(dcols.cols()), c, hw / g.in_w, hw % g.in_w, beta == 0.0 ? 0.0 : beta * o);
        }
      CHECK(test::max_abs_diff(dx_k, dx) < 1e-14);  // the same terms in the same order
    }
  }
}
