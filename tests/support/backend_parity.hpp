// The same seeded layer on the CPU backend (double) and on another backend `Dev` (scalar G), compared through
// every step a training loop and a deployment take: the seeded initial parameters, then (after every trainable
// parameter is set to the same random values on both) two train-mode steps of forward and backward (gradients
// overwritten, then accumulated; dropout masks from the same seed), the eval forward, merge (safe_merge on
// `Dev`), the merged forward, unmerge. Each tensor is compared as max |dev − cpu| / max(1, max |cpu|) <= tol.
//
// Used with the OffHost test backend (tests/unit/test_device_backend.cpp, tol 0: the same operations bit for
// bit, on memory host code cannot touch) and with the CUDA backend (tests/cuda/test_cuda_adapters.cpp).
//
// The cases: every weight adapter on Linear, Conv2d and Embedding where the method supports that layer,
// with the options that take another code path (dropout, DoRA, feed-forward (IA)³, CP/effective-conv
// LoHa/LoKr, folded Conv2d deltas, several adapters of one or several kinds).
#pragma once

#include <catch2/catch.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace peft::test::parity {

template <class T, class B>
struct Tag {
  using scalar = T;
  using backend = B;
};

/// The [rows, cols] block at p (Dev memory) as a host double matrix.
template <class Dev, class T>
Mat<double> fetch(const T* p, Index rows, Index cols) {
  Mat<T> m(rows, cols);
  Dev::template download<T>(ConstMatrixView<T>(p, rows, cols), m);
  return m.template cast<double>();
}
template <class Dev, class T>
void put(const Mat<double>& h, T* p) {
  const Mat<T> c = h.template cast<T>();
  Dev::template upload<T>(c, MatrixView<T>(p, h.rows(), h.cols()));
}
inline double rel(const Mat<double>& dev, const Mat<double>& cpu) {
  if (cpu.size() == 0) return 0.0;
  return max_abs_diff(dev, cpu) / std::max(1.0, cpu.cwiseAbs().maxCoeff());
}
template <class L>
auto params(L& l) {
  std::vector<ParamRef<typename L::scalar>> v;
  l.visit_parameters([&](const auto& p) { v.push_back(p); });
  return v;
}

/// A layer's input: dense rows (Linear, Conv2d) or token ids (Embedding).
struct Input {
  Mat<double> x;
  std::vector<std::int64_t> ids;
  Index rows() const { return ids.empty() ? Index(x.rows()) : Index(ids.size()); }
};

template <class Dev, class CpuL, class DevL>
void check(CpuL& cpu, DevL& dev, const Input& in, Index out_cols, double tol) {
  using G = typename DevL::scalar;
  auto pc = params(cpu), pd = params(dev);
  REQUIRE(pc.size() == pd.size());
  const auto host = [](const auto& p) { return Mat<double>(Eigen::Map<const Mat<double>>(p.value, 1, Index(p.size))); };
  const auto check_params = [&](const char* when) {
    for (std::size_t i = 0; i < pc.size(); ++i) {
      INFO(when << ": " << pc[i].name);
      REQUIRE(pc[i].name == pd[i].name);
      REQUIRE(pc[i].size == pd[i].size);
      CHECK(rel(fetch<Dev>(pd[i].value, 1, Index(pd[i].size)), host(pc[i])) <= tol);
    }
  };
  check_params("initial");
  for (std::size_t i = 0; i < pc.size(); ++i) {  // every trainable tensor the same random values on both
    if (!pc[i].trainable) continue;
    const Mat<double> r = random_mat<double>(1, Index(pc[i].size), 100 + i).template cast<G>().template cast<double>();
    Eigen::Map<Mat<double>>(pc[i].value, 1, Index(pc[i].size)) = r;
    put<Dev>(r, pd[i].value);
  }

  const Index n = in.rows(), in_cols = in.ids.empty() ? Index(in.x.cols()) : 0;
  typename Dev::template buffer<G> xd(std::size_t(std::max<Index>(1, n * in_cols))), yd(std::size_t(n * out_cols)),
      dyd(std::size_t(n * out_cols)), dxd(std::size_t(std::max<Index>(1, n * in_cols)));
  if (in_cols) put<Dev>(in.x, xd.data());
  Mat<double> y(n, out_cols), dx(n, std::max<Index>(in_cols, 1));
  auto cc = cpu.make_context(n + 3);
  auto dc = dev.make_context(n + 3);
  const auto forward = [&] {
    if constexpr (std::is_same_v<typename CpuL::input_type, TokenIds>) {
      cpu.forward(cc, TokenIds(in.ids), y);
      dev.forward(dc, TokenIds(in.ids), yd.view(n, out_cols));
    } else {
      cpu.forward(cc, in.x, y);
      dev.forward(dc, ConstMatrixView<G>(xd.view(n, in_cols)), yd.view(n, out_cols));
    }
    CHECK(rel(fetch<Dev>(yd.data(), n, out_cols), y) <= tol);
  };
  cpu.train();
  dev.train();
  cpu.set_seed(7);
  dev.set_seed(7);
  for (auto mode : {GradMode::overwrite, GradMode::accumulate}) {
    INFO("train step, " << (mode == GradMode::overwrite ? "overwrite" : "accumulate"));
    forward();
    const Mat<double> dy = random_mat<double>(n, out_cols, mode == GradMode::overwrite ? 5 : 6).template cast<G>().template cast<double>();
    put<Dev>(dy, dyd.data());
    if (in_cols) {
      cpu.backward(cc, dy, dx, mode, mode);
      dev.backward(dc, ConstMatrixView<G>(dyd.view(n, out_cols)), dxd.view(n, in_cols), mode, mode);
      CHECK(rel(fetch<Dev>(dxd.data(), n, in_cols), dx) <= tol);
    } else {
      cpu.backward(cc, dy, {}, mode, mode);
      dev.backward(dc, ConstMatrixView<G>(dyd.view(n, out_cols)), {}, mode, mode);
    }
    for (std::size_t i = 0; i < pc.size(); ++i) {
      if (!pc[i].grad) continue;
      INFO("gradient of " << pc[i].name);
      REQUIRE(pd[i].grad != nullptr);
      CHECK(rel(fetch<Dev>(pd[i].grad, 1, Index(pd[i].size)), Mat<double>(Eigen::Map<const Mat<double>>(pc[i].grad, 1, Index(pc[i].size)))) <=
            tol);
    }
  }
  cpu.eval();
  dev.eval();
  {
    INFO("eval forward");
    forward();
  }
  const Mat<double> y_eval = y;
  cpu.merge();
  dev.merge(std::nullopt, true);
  check_params("merged");
  {
    INFO("merged forward");
    forward();
    CHECK(rel(y, y_eval) < 1e-9);  // merging does not change the output (the CPU's own check)
  }
  cpu.unmerge();
  dev.unmerge();
  check_params("unmerged");
  INFO("unmerged forward");
  forward();
}

/// One case: Layer<T, B> is the adapted layer type, make_base(Tag<T, B>, gen) its base, setup(layer, gen) adds
/// the adapters (the same calls on both backends).
template <class Dev, class G, template <class, class> class Layer, class MakeBase, class Setup>
void run(const char* name, MakeBase make_base, Setup setup, const Input& in, Index out_cols, double tol) {
  INFO("case: " << name << " (" << Dev::name << ")");
  Generator gc(11), gd(11);
  Layer<double, EigenCpu> cpu(make_base(Tag<double, EigenCpu>{}, gc));
  Layer<G, Dev> dev(make_base(Tag<G, Dev>{}, gd));
  setup(cpu, gc);
  setup(dev, gd);
  check<Dev>(cpu, dev, in, out_cols, tol);
}

template <class T, class B> using LinLora = Adapted<Linear<T, B>, Lora>;
template <class T, class B> using LinIa3 = Adapted<Linear<T, B>, Ia3>;
template <class T, class B> using LinLoha = Adapted<Linear<T, B>, Loha>;
template <class T, class B> using LinLokr = Adapted<Linear<T, B>, Lokr>;
template <class T, class B> using LinVera = Adapted<Linear<T, B>, Vera>;
template <class T, class B> using LinAdaLora = Adapted<Linear<T, B>, AdaLora>;
template <class T, class B> using LinMixed = Adapted<Linear<T, B>, Lora, Loha, Lokr, Ia3>;
template <class T, class B> using ConvLora = Adapted<Conv2d<T, B>, Lora>;
template <class T, class B> using ConvIa3 = Adapted<Conv2d<T, B>, Ia3>;
template <class T, class B> using ConvLoha = Adapted<Conv2d<T, B>, Loha>;
template <class T, class B> using ConvLokr = Adapted<Conv2d<T, B>, Lokr>;
template <class T, class B> using ConvMixed = Adapted<Conv2d<T, B>, Lora, Loha, Lokr, Ia3>;
template <class T, class B> using EmbLora = Adapted<Embedding<T, B>, Lora>;
template <class T, class B> using EmbIa3 = Adapted<Embedding<T, B>, Ia3>;

/// Adds `cfg` as "a" (and, when `second` is given, that as "b", both active).
template <class Cfg, class Cfg2 = Cfg>
auto adds(Cfg cfg, std::optional<Cfg2> second = std::nullopt) {
  return [cfg, second](auto& layer, Generator& g) {
    layer.add_adapter("a", cfg, g);
    if (second) {
      layer.add_adapter("b", *second, g);
      layer.set_adapter(std::vector<std::string>{"a", "b"});
    }
  };
}

template <class Dev, class G>
void linear_cases(double tol) {
  const Index in = 24, out = 20;
  const Input x{random_mat<double>(9, in, 1).template cast<G>().template cast<double>(), {}};
  const auto base = [&](auto tag, Generator& g) {
    using Tg = decltype(tag);
    return Linear<typename Tg::scalar, typename Tg::backend>(in, out, true, g);
  };
  const auto base_t = [&](auto tag, Generator& g) {  // the [in, out] layout (fan_in_fan_out)
    using Tg = decltype(tag);
    return Linear<typename Tg::scalar, typename Tg::backend>(in, out, true, g, WeightLayout::in_out);
  };
  LoraConfig lora;
  lora.r = 4;
  lora.lora_alpha = 8;
  lora.lora_dropout = 0.25;
  lora.lora_bias = true;
  run<Dev, G, LinLora>("lora, dropout, lora_bias", base, adds(lora), x, out, tol);
  LoraConfig dora;
  dora.r = 3;
  dora.use_dora = true;
  dora.use_rslora = true;
  dora.lora_dropout = 0.2;
  LoraConfig plain;
  plain.r = 2;
  run<Dev, G, LinLora>("dora + lora", base, adds(dora, std::optional<LoraConfig>(plain)), x, out, tol);
  LoraConfig fif = lora;
  fif.fan_in_fan_out = true;
  fif.lora_bias = false;
  run<Dev, G, LinLora>("lora, fan_in_fan_out", base_t, adds(fif), x, out, tol);
  Ia3Config ia3;
  run<Dev, G, LinIa3>("ia3 (output)", base, adds(ia3, std::optional<Ia3Config>(ia3)), x, out, tol);
  Ia3Config ff;
  ff.is_feedforward = true;
  run<Dev, G, LinIa3>("ia3 (feed-forward)", base, adds(ff), x, out, tol);
  Ia3Config ff_t = ff;
  ff_t.fan_in_fan_out = true;
  run<Dev, G, LinIa3>("ia3 (feed-forward), fan_in_fan_out", base_t, adds(ff_t), x, out, tol);
  LohaConfig loha;
  loha.r = 3;
  loha.alpha = 5;
  loha.rank_dropout = 0.3;
  run<Dev, G, LinLoha>("loha, rank_dropout", base, adds(loha), x, out, tol);
  LokrConfig lokr;
  lokr.r = 2;
  lokr.alpha = 3;
  lokr.decompose_both = true;
  lokr.decompose_factor = 4;
  run<Dev, G, LinLokr>("lokr, decompose_both", base, adds(lokr), x, out, tol);
  LokrConfig lokr_full;
  lokr_full.r = 64;  // larger than the blocks: full w1, w2
  lokr_full.rank_dropout = 0.2;
  run<Dev, G, LinLokr>("lokr, full blocks, rank_dropout", base, adds(lokr_full), x, out, tol);
  run<Dev, G, LinVera>("vera", base,
                       [&](auto& layer, Generator& g) {
                         using L = std::remove_cvref_t<decltype(layer)>;
                         VeraConfig v;
                         v.r = 5;
                         v.vera_dropout = 0.1;
                         v.projections = VeraProjections<typename L::scalar, typename L::backend_type>::random(5, in, out, 3);
                         layer.add_adapter("a", v, g);
                       },
                       x, out, tol);
  AdaLoraConfig ada;
  ada.init_r = 6;
  ada.target_r = 4;
  ada.total_step = 100;
  ada.lora_dropout = 0.1;
  run<Dev, G, LinAdaLora>("adalora", base, adds(ada), x, out, tol);
  run<Dev, G, LinMixed>("lora + loha + lokr + ia3 (feed-forward), all active", base,
                        [&](auto& layer, Generator& g) {
                          layer.add_adapter("l", plain, g);
                          layer.add_adapter("h", loha, g);
                          layer.add_adapter("k", lokr, g);
                          layer.add_adapter("i", ff, g);
                          layer.set_adapter(std::vector<std::string>{"l", "h", "k", "i"});
                        },
                        x, out, tol);
}

template <class Dev, class G>
void conv_cases(double tol) {
  Conv2dGeometry geo;
  geo.in_channels = 3;
  geo.out_channels = 5;
  geo.kernel_h = 3;
  geo.kernel_w = 2;
  geo.stride_h = 2;
  geo.pad_h = 1;
  geo.pad_w = 1;
  geo.dilation_w = 2;
  geo.in_h = 7;
  geo.in_w = 6;
  const Input x{random_mat<double>(3, geo.in_size(), 2).template cast<G>().template cast<double>(), {}};
  const Index out = geo.out_size();
  const auto base = [&](auto tag, Generator& g) {
    using Tg = decltype(tag);
    return Conv2d<typename Tg::scalar, typename Tg::backend>(geo, true, g);
  };
  LoraConfig lora;
  lora.r = 3;
  lora.lora_alpha = 6;
  run<Dev, G, ConvLora>("lora (folded delta)", base, adds(lora), x, out, tol);
  LoraConfig drop = lora;
  drop.lora_dropout = 0.3;
  drop.lora_bias = true;
  run<Dev, G, ConvLora>("lora, dropout, lora_bias", base, adds(drop), x, out, tol);
  LoraConfig dora = lora;
  dora.use_dora = true;
  run<Dev, G, ConvLora>("dora + lora", base, adds(dora, std::optional<LoraConfig>(lora)), x, out, tol);
  Ia3Config ia3;
  run<Dev, G, ConvIa3>("ia3 (output)", base, adds(ia3), x, out, tol);
  Ia3Config ff;
  ff.is_feedforward = true;
  run<Dev, G, ConvIa3>("ia3 (feed-forward)", base, adds(ff, std::optional<Ia3Config>(ff)), x, out, tol);
  LohaConfig loha;
  loha.r = 2;
  loha.alpha = 3;
  run<Dev, G, ConvLoha>("loha", base, adds(loha), x, out, tol);
  LohaConfig cp = loha;
  cp.use_effective_conv2d = true;
  run<Dev, G, ConvLoha>("loha, effective conv2d (CP)", base, adds(cp), x, out, tol);
  LokrConfig lokr;
  lokr.r = 2;
  lokr.use_effective_conv2d = true;
  lokr.decompose_both = true;
  run<Dev, G, ConvLokr>("lokr, effective conv2d, decompose_both", base, adds(lokr), x, out, tol);
  run<Dev, G, ConvMixed>("lora + loha + lokr + ia3 (output), all active", base,
                         [&](auto& layer, Generator& g) {
                           layer.add_adapter("l", drop, g);
                           layer.add_adapter("h", loha, g);
                           layer.add_adapter("k", lokr, g);
                           layer.add_adapter("i", ia3, g);
                           layer.set_adapter(std::vector<std::string>{"l", "h", "k", "i"});
                         },
                         x, out, tol);
}

template <class Dev, class G>
void embedding_cases(double tol) {
  const Index vocab = 30, dim = 12;
  // repeated ids (scatter order) and the padding id 0
  const Input ids{{}, {3, 0, 7, 3, 29, 3, 11, 0, 7, 15}};
  const auto base = [&](auto tag, Generator& g) {
    using Tg = decltype(tag);
    auto e = Embedding<typename Tg::scalar, typename Tg::backend>(vocab, dim, g, std::int64_t(0));
    e.set_requires_grad(true);  // the table's gradient too (scatter_add_rows)
    return e;
  };
  LoraConfig lora;
  lora.r = 4;
  lora.lora_alpha = 8;
  run<Dev, G, EmbLora>("lora", base, adds(lora), ids, dim, tol);
  LoraConfig dora = lora;
  dora.use_dora = true;
  run<Dev, G, EmbLora>("dora + lora", base, adds(dora, std::optional<LoraConfig>(lora)), ids, dim, tol);
  Ia3Config ia3;
  run<Dev, G, EmbIa3>("ia3 (output)", base, adds(ia3), ids, dim, tol);
}

}  // namespace peft::test::parity
