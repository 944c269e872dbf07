// Several adapter kinds on one Conv2d layer, which run image by image on the base's im2col columns (one im2col
// per image for the base and every adapter; one dcols and one col2im per image in backward): gradients against
// finite differences with LoRA (with and without dropout), DoRA (input gradient), LoHa (flat and CP, rank dropout)
// and LoKr active together, and the forward against one convolution with the summed delta weights. When every
// adapter that runs can (no DoRA, no dropout active on LoRA), they join the base's product as W + Σ ΔW: the
// finite-difference cases without DoRA and dropout run that path.
#include <catch2/catch.hpp>

#include <peft/peft.hpp>
#include <string>
#include <vector>

#include "layer_check.hpp"
#include "test_util.hpp"

using namespace peft;
using namespace peft::test;

namespace {

template <class T>
using Mixed = Adapted<Conv2d<T>, Lora, Loha, Lokr>;

Conv2dGeometry geo(Index c, Index o, Index k, Index stride, Index pad, Index dil, Index h, Index w) {
  Conv2dGeometry g;
  g.in_channels = c;
  g.out_channels = o;
  g.kernel_h = g.kernel_w = k;
  g.stride_h = g.stride_w = stride;
  g.pad_h = g.pad_w = pad;
  g.dilation_h = g.dilation_w = dil;
  g.in_h = h;
  g.in_w = w;
  return g;
}

/// Every trainable parameter N(0, 0.3²) (magnitudes around 1), so that no adapter is the identity.
template <class L>
void scramble(L& l, std::uint64_t seed) {
  Generator g(seed);
  l.visit_parameters([&](ParamRef<typename L::scalar> p) {
    if (!p.trainable) return;
    std::vector<double> v(p.size);
    g.normal(v.data(), v.size(), 0.0, 0.3);
    const bool around_one = p.name.find("magnitude") != std::string::npos;
    for (std::size_t i = 0; i < p.size; ++i) p.value[i] = typename L::scalar(v[i] + (around_one ? 1.0 : 0.0));
  });
}

template <class T>
Mixed<T> make_layer(const Conv2dGeometry& g, bool dora, bool dropout) {
  Generator gen(5);
  Mixed<T> l(Conv2d<T>(g, true, gen), "conv");
  LoraConfig a;
  a.r = 3;
  a.lora_alpha = 6;
  a.init_lora_weights = LoraInit::off;
  a.use_dora = dora;
  a.lora_dropout = dropout ? 0.3 : 0.0;
  l.add_adapter("a", a, gen);
  LoraConfig b;
  b.r = 2;
  b.lora_alpha = 3;
  b.init_lora_weights = LoraInit::off;
  l.add_adapter("b", b, gen);
  LohaConfig h;
  h.r = 2;
  h.alpha = 3;
  h.init_weights = false;
  l.add_adapter("h", h, gen);
  LohaConfig hc = h;
  hc.use_effective_conv2d = true;
  hc.rank_dropout = dropout ? 0.25 : 0.0;
  l.add_adapter("hc", hc, gen);
  LokrConfig k;
  k.r = 2;
  k.alpha = 4;
  l.add_adapter("k", k, gen);
  l.set_adapter(std::vector<std::string>{"a", "b", "h", "hc", "k"});
  scramble(l, 11);
  return l;
}

const std::vector<Conv2dGeometry> kGeos = {geo(3, 4, 3, 1, 1, 1, 5, 6), geo(2, 3, 3, 2, 2, 2, 7, 6)};

}  // namespace

TEMPLATE_TEST_CASE("conv2d with LoRA, DoRA, LoHa and LoKr on shared columns: backward matches finite differences",
                   "[conv2d][shared]", float, double) {
  using T = TestType;
  for (const auto& g : kGeos) {
    for (int variant = 0; variant < 4; ++variant) {
      const bool dora = variant % 2 == 1, dropout = variant >= 2;
      CAPTURE(g.kernel_h, g.stride_h, g.pad_h, g.dilation_h, dora, dropout);
      auto l = make_layer<T>(g, dora, dropout);
      auto twin = make_layer<double>(g, dora, dropout);
      if (dora) {
        // DoRA's backward treats the norm ‖W + s·B·A‖ as a constant (PEFT), which finite differences of this
        // layer do not: keep DoRA's own parameters frozen (its input gradient is exact; test_dora checks the rest)
        l.set_requires_grad("a", false);
        twin.set_requires_grad("a", false);
      }
      check_layer_gradients(l, twin, 3, 21);
      if (dora) continue;
      // full fine-tuning of the base too (its weight gradient from the same columns)
      l.base().set_requires_grad(true);
      twin.base().set_requires_grad(true);
      check_layer_gradients(l, twin, 2, 23);
    }
  }
}

TEST_CASE("conv2d with several adapter kinds on shared columns: forward equals one convolution with the summed deltas",
          "[conv2d][shared]") {
  for (const auto& g : kGeos) {
    auto l = make_layer<double>(g, false, false);
    l.eval();
    Generator gen(2);
    Conv2d<double> merged(g, true, gen);
    Mat<double> w = as_mat(ConstMatrixView<double>(l.base().weight()));
    Mat<double> d(w.rows(), w.cols());
    for (const char* name : {"a", "b", "h", "hc", "k"}) {
      l.delta_weight(name, d);
      w += d;
    }
    as_mat(merged.weight()) = w;
    as_mat(merged.bias()) = as_mat(ConstMatrixView<double>(l.base().bias()));
    const Mat<double> x = random_mat<double>(3, g.in_size(), 4);
    Mat<double> y(3, g.out_size()), ym(3, g.out_size());
    auto ctx = l.make_context(3);
    auto mctx = merged.make_context(3);
    l.forward(ctx, x, y);
    merged.forward(mctx, x, ym);
    CHECK(max_abs_diff(y, ym) < 1e-12);
    CHECK(ctx.folded);  // every adapter joined the base's product (W + Σ ΔW)
  }
}

TEST_CASE("conv2d adapters fold into the base's product only when every one that runs can", "[conv2d][shared]") {
  const auto g = kGeos[0];
  const Mat<double> x = random_mat<double>(2, g.in_size(), 6);
  Mat<double> y(2, g.out_size());
  for (int variant = 0; variant < 4; ++variant) {
    const bool dora = variant % 2 == 1, dropout = variant >= 2;
    CAPTURE(dora, dropout);
    auto l = make_layer<double>(g, dora, dropout);
    auto ctx = l.make_context(2);
    l.train();
    l.forward(ctx, x, y);
    CHECK(ctx.image_wise);
    CHECK(ctx.folded == (!dora && !dropout));  // DoRA rescales per channel; dropout changes LoRA's input
    l.eval();
    l.forward(ctx, x, y);
    CHECK(ctx.folded == !dora);
    l.set_adapter(std::vector<std::string>{"h", "k"});  // LoHa and LoKr alone always fold
    l.forward(ctx, x, y);
    CHECK(ctx.folded);
    CHECK(ctx.weff.size() == std::size_t(g.out_channels * g.patch()));  // the folded weight's buffer
  }
  // a layer whose kinds cannot fold ((IA)³ only scales) holds no weight-sized buffer in its contexts
  Generator gen(3);
  Adapted<Conv2d<double>, Ia3> ia3(Conv2d<double>(g, true, gen));
  ia3.add_adapter("i", Ia3Config{}, gen);
  auto ictx = ia3.make_context(2);
  CHECK(ictx.weff.size() == 0);
  ia3.forward(ictx, x, y);
  CHECK(!ictx.folded);
}
