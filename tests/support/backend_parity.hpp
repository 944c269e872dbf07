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
#include <peft/nn/decoder.hpp>
#include <peft/nn/loss.hpp>
#include <peft/train/optim.hpp>
#include <peft/prompt/multitask_prompt_tuning.hpp>
#include <peft/prompt/p_tuning.hpp>
#include <peft/prompt/prefix_tuning.hpp>
#include <peft/prompt/prompt_tuning.hpp>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace peft::test::parity {

template <class T, class B>
struct Tag {
  using scalar = T;
  using backend = B;
};

/// The [rows, cols] block at p (Dev memory) as a host double matrix (T: float, double, bf16 or half; element by
/// element, so that Eigen never sees the 16-bit storage types).
template <class Dev, class T>
Mat<double> fetch(const T* p, Index rows, Index cols) {
  std::vector<T> h(std::size_t(rows * cols));
  Dev::template download<T>(ConstMatrixView<T>(p, rows, cols), MatrixView<T>(h.data(), rows, cols));
  Mat<double> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = double(h[std::size_t(i)]);
  return m;
}
template <class Dev, class T>
void put(const Mat<double>& m, T* p) {
  std::vector<T> h(std::size_t(m.size()));
  for (Index i = 0; i < m.size(); ++i) h[std::size_t(i)] = T(m.data()[i]);
  Dev::template upload<T>(ConstMatrixView<T>(h.data(), Index(m.rows()), Index(m.cols())), MatrixView<T>(p, Index(m.rows()), Index(m.cols())));
}
/// m rounded to T and back (the values both sides start from).
template <class T>
Mat<double> rounded(Mat<double> m) {
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = double(T(m.data()[i]));
  return m;
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

/// Compares every parameter's values (and, with `grads`, its gradient) of the two sides.
template <class Dev, class G>
void compare_params(const std::vector<ParamRef<double>>& pc, const std::vector<ParamRef<G>>& pd, double tol, const char* when, bool grads) {
  REQUIRE(pc.size() == pd.size());
  for (std::size_t i = 0; i < pc.size(); ++i) {
    INFO(when << ": " << pc[i].name);
    REQUIRE(pc[i].name == pd[i].name);
    REQUIRE(pc[i].size == pd[i].size);
    const Index n = Index(pc[i].size);
    CHECK(rel(fetch<Dev>(pd[i].value, 1, n), Mat<double>(Eigen::Map<const Mat<double>>(pc[i].value, 1, n))) <= tol);
    if (!grads || !pc[i].grad) continue;
    INFO("gradient");
    REQUIRE(pd[i].grad != nullptr);
    CHECK(rel(fetch<Dev>(pd[i].grad, 1, n), Mat<double>(Eigen::Map<const Mat<double>>(pc[i].grad, 1, n))) <= tol);
  }
}
/// Sets every trainable tensor to the same random values on both sides (rounded to G).
template <class Dev, class G>
void randomize(const std::vector<ParamRef<double>>& pc, const std::vector<ParamRef<G>>& pd) {
  for (std::size_t i = 0; i < pc.size(); ++i) {
    if (!pc[i].trainable) continue;
    const Mat<double> r = rounded<G>(random_mat<double>(1, Index(pc[i].size), 100 + i));
    Eigen::Map<Mat<double>>(pc[i].value, 1, Index(pc[i].size)) = r;
    put<Dev>(r, pd[i].value);
  }
}

template <class Dev, class CpuL, class DevL>
void check(CpuL& cpu, DevL& dev, const Input& in, Index out_cols, double tol) {
  using G = typename DevL::scalar;
  auto pc = params(cpu), pd = params(dev);
  const auto check_params = [&](const char* when) { compare_params<Dev>(pc, pd, tol, when, false); };
  check_params("initial");
  randomize<Dev>(pc, pd);

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
    const Mat<double> dy = rounded<G>(random_mat<double>(n, out_cols, mode == GradMode::overwrite ? 5 : 6));
    put<Dev>(dy, dyd.data());
    if (in_cols) {
      cpu.backward(cc, dy, dx, mode, mode);
      dev.backward(dc, ConstMatrixView<G>(dyd.view(n, out_cols)), dxd.view(n, in_cols), mode, mode);
      CHECK(rel(fetch<Dev>(dxd.data(), n, in_cols), dx) <= tol);
    } else {
      cpu.backward(cc, dy, {}, mode, mode);
      dev.backward(dc, ConstMatrixView<G>(dyd.view(n, out_cols)), {}, mode, mode);
    }
    compare_params<Dev>(pc, pd, tol, "after backward", true);
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

/// Adds one adapter of each kind, "l" (LoRA), "h" (LoHa), "k" (LoKr), "i" ((IA)³), all active.
inline auto adds_four(LoraConfig l, LohaConfig h, LokrConfig k, Ia3Config i) {
  return [=](auto& layer, Generator& g) {
    layer.add_adapter("l", l, g);
    layer.add_adapter("h", h, g);
    layer.add_adapter("k", k, g);
    layer.add_adapter("i", i, g);
    layer.set_adapter(std::vector<std::string>{"l", "h", "k", "i"});
  };
}

template <class Dev, class G>
void linear_cases(double tol) {
  const Index in = 24, out = 20;
  const Input x{rounded<G>(random_mat<double>(9, in, 1)), {}};
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
  run<Dev, G, LinMixed>("lora + loha + lokr + ia3 (feed-forward), all active", base, adds_four(plain, loha, lokr, ff), x, out, tol);
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
  const Input x{rounded<G>(random_mat<double>(3, geo.in_size(), 2)), {}};
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
  run<Dev, G, ConvMixed>("lora + loha + lokr + ia3 (output), all active", base, adds_four(drop, loha, lokr, ia3), x, out, tol);
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

// ---- prompt-learning modules -------------------------------------------------------------------------------

/// One module on both backends: make(Tag<T, B>, gen) builds it; step(module, Tag<T, B>, mode) runs a forward and
/// a backward (upstream gradients from fixed seeds) and returns the forward output as a host matrix. Compares
/// the seeded parameters, then (after randomize) two steps' outputs and gradients (overwrite, accumulate).
template <class Dev, class G, class Make, class Step>
void prompt_run(const char* name, Make make, Step step, double tol) {
  INFO("case: " << name << " (" << Dev::name << ")");
  Generator gc(21), gd(21);
  auto cpu = make(Tag<double, EigenCpu>{}, gc);
  auto dev = make(Tag<G, Dev>{}, gd);
  auto pc = params(cpu);
  auto pd = params(dev);
  compare_params<Dev>(pc, pd, tol, "initial", false);
  randomize<Dev>(pc, pd);
  for (auto mode : {GradMode::overwrite, GradMode::accumulate}) {
    INFO((mode == GradMode::overwrite ? "overwrite" : "accumulate"));
    const Mat<double> yc = step(cpu, Tag<double, EigenCpu>{}, mode), yd = step(dev, Tag<G, Dev>{}, mode);
    CHECK(rel(yd, yc) <= tol);
    compare_params<Dev>(pc, pd, tol, "after backward", true);
  }
}

/// A host matrix on backend B (scalar T): its buffer.
template <class T, class B>
typename B::template buffer<T> on(const Mat<double>& h) {
  typename B::template buffer<T> b(std::size_t(h.size()));
  put<B>(h, b.data());
  return b;
}
template <class T, class B>
Mat<double> back(ConstMatrixView<T> v) {
  return fetch<B>(v.data, v.rows, v.cols);
}

template <class Dev, class G>
void prompt_cases(double tol) {
  const Index nv = 4, d = 6, batch = 3, seq = 2, vocab = 11;
  const Mat<double> words = rounded<G>(random_mat<double>(vocab, d, 40));
  const Mat<double> tokens = rounded<G>(random_mat<double>(batch * seq, d, 41));
  const auto upstream = [](Index rows, Index cols, GradMode mode) {
    return rounded<G>(random_mat<double>(rows, cols, mode == GradMode::overwrite ? 42 : 43));
  };

  // prompt tuning (TEXT init gathers rows of the word embeddings), through prepend and its backward
  PromptTuningConfig pt;
  pt.num_virtual_tokens = nv;
  pt.prompt_tuning_init = PromptTuningInit::text;
  pt.init_token_ids = {3, 7, 1};
  const auto make_pt = [&](auto tag, Generator& g) {
    using T = typename decltype(tag)::scalar;
    using B = typename decltype(tag)::backend;
    auto w = on<T, B>(words);
    auto m = PromptEmbedding<T, B>(pt, ConstMatrixView<T>(w.data(), vocab, d), g);
    return m;
  };
  prompt_run<Dev, G>("prompt tuning (text init), prepend", make_pt,
                     [&](auto& m, auto tag, GradMode mode) {
                       using T = typename decltype(tag)::scalar;
                       using B = typename decltype(tag)::backend;
                       auto ctx = m.make_context(batch);
                       auto tok = on<T, B>(tokens);
                       typename B::template buffer<T> in(std::size_t(batch * (nv + seq) * d));
                       auto iv = in.view(batch * (nv + seq), d);
                       m.prepend(ctx, ConstMatrixView<T>(tok.data(), batch * seq, d), batch, seq, iv);
                       auto dg = on<T, B>(upstream(batch * (nv + seq), d, mode));
                       m.backward_from_inputs_embeds(ctx, ConstMatrixView<T>(dg.data(), batch * (nv + seq), d), seq, mode);
                       return back<T, B>(ConstMatrixView<T>(iv));
                     },
                     tol);

  // P-tuning: the MLP encoder, and the two-layer bidirectional LSTM with dropout between its layers
  for (auto type : {PromptEncoderReparameterizationType::mlp, PromptEncoderReparameterizationType::lstm}) {
    PromptEncoderConfig pe;
    pe.num_virtual_tokens = nv;
    pe.token_dim = d;
    pe.encoder_hidden_size = 5;
    pe.encoder_reparameterization_type = type;
    pe.encoder_dropout = 0.3;
    prompt_run<Dev, G>(type == PromptEncoderReparameterizationType::mlp ? "p-tuning, MLP encoder" : "p-tuning, LSTM encoder (2 layers, dropout)",
                       [&](auto tag, Generator& g) { return PromptEncoder<typename decltype(tag)::scalar, typename decltype(tag)::backend>(pe, g); },
                       [&](auto& m, auto tag, GradMode mode) {
                         using T = typename decltype(tag)::scalar;
                         using B = typename decltype(tag)::backend;
                         auto ctx = m.make_context(batch);
                         ctx.dropout_seed = 9;
                         typename B::template buffer<T> pr(std::size_t(batch * nv * d));
                         auto pv = pr.view(batch * nv, d);
                         m.forward(ctx, batch, pv);
                         auto dg = on<T, B>(upstream(batch * nv, d, mode));
                         m.backward(ctx, ConstMatrixView<T>(dg.data(), batch * nv, d), mode);
                         Mat<double> out = back<T, B>(ConstMatrixView<T>(pv));
                         const auto eval = m.prompt_embeddings();  // the eval-mode encoder output, on the host
                         Mat<double> both(out.rows() + nv, d);
                         both.topRows(out.rows()) = out;
                         for (Index i = 0; i < nv * d; ++i) both.data()[out.size() + i] = double(eval[std::size_t(i)]);
                         return both;
                       },
                       tol);
  }

  // prefix tuning with the projection: the past keys/values laid out per layer and head, and their backward
  PrefixTuningConfig px;
  px.num_virtual_tokens = nv;
  px.token_dim = d;
  px.num_layers = 2;
  px.num_attention_heads = 3;
  px.prefix_projection = true;
  px.encoder_hidden_size = 5;
  prompt_run<Dev, G>("prefix tuning with projection",
                     [&](auto tag, Generator& g) { return PrefixEncoder<typename decltype(tag)::scalar, typename decltype(tag)::backend>(px, g); },
                     [&](auto& m, auto tag, GradMode mode) {
                       using T = typename decltype(tag)::scalar;
                       using B = typename decltype(tag)::backend;
                       auto ctx = m.make_context(batch);
                       m.forward(ctx, batch);
                       const auto past = m.past_key_value_grads(ctx);
                       Mat<double> out(0, 2);
                       std::uint64_t seed = mode == GradMode::overwrite ? 50 : 60;
                       for (std::size_t l = 0; l < past.size(); ++l) {
                         const auto kv = m.past_key_values(ctx)[l];
                         for (auto [src, dst] : {std::pair{kv.key, past[l].key}, std::pair{kv.value, past[l].value}}) {
                           const Mat<double> v = back<T, B>(src);
                           Mat<double> grown(out.rows() + v.size(), 2);  // every layer's keys and values, flattened
                           grown << out, Eigen::Map<const Eigen::VectorXd>(v.data(), v.size()), Eigen::VectorXd::Zero(v.size());
                           out = grown;
                           put<B>(rounded<T>(random_mat<double>(dst.rows, dst.cols, seed++)), dst.data);
                         }
                       }
                       m.backward(ctx, mode);
                       return out;
                     },
                     tol);

  // multitask prompt tuning: per-row task prompts E ⊙ (C_k R_k)
  MultitaskPromptTuningConfig mt;
  mt.num_virtual_tokens = nv;
  mt.num_tasks = 3;
  mt.num_ranks = 2;
  const std::vector<std::int64_t> tasks{2, 0, 2};
  prompt_run<Dev, G>("multitask prompt tuning",
                     [&](auto tag, Generator& g) {
                       using T = typename decltype(tag)::scalar;
                       using B = typename decltype(tag)::backend;
                       auto w = on<T, B>(words);
                       return MultitaskPromptEmbedding<T, B>(mt, ConstMatrixView<T>(w.data(), vocab, d), g);
                     },
                     [&](auto& m, auto tag, GradMode mode) {
                       using T = typename decltype(tag)::scalar;
                       using B = typename decltype(tag)::backend;
                       auto ctx = m.make_context(batch);
                       typename B::template buffer<T> pr(std::size_t(batch * nv * d));
                       auto pv = pr.view(batch * nv, d);
                       m.forward(ctx, tasks, pv);
                       auto dg = on<T, B>(upstream(batch * nv, d, mode));
                       m.backward(ctx, ConstMatrixView<T>(dg.data(), batch * nv, d), mode);
                       return back<T, B>(ConstMatrixView<T>(pv));
                     },
                     tol);
}

// ---- the transformer blocks ---------------------------------------------------------------------------------

/// A two-layer GPT-2-style decoder (LayerNorm, attention with a padding mask, GELU MLP, LM head), every
/// parameter trainable, on both backends: logits and every gradient over two steps.
/// The small decoder both the decoder and training cases run.
inline nn::DecoderConfig small_decoder_config() {
  nn::DecoderConfig cfg;
  cfg.vocab_size = 13;
  cfg.max_position_embeddings = 10;
  cfg.d_model = 16;
  cfg.num_layers = 2;
  cfg.num_heads = 2;
  cfg.d_ff = 24;
  return cfg;
}
/// A decoder of scalar T on backend B with every parameter trainable.
template <class T, class B>
auto trainable_decoder(const nn::DecoderConfig& cfg, Generator& g) {
  auto m = nn::make_decoder<T, Linear<T, B>, Linear<T, B>>(cfg, g);
  for_each_layer(m, [](auto& l, const std::string&) { l.set_requires_grad(true); });
  return m;
}

template <class Dev, class G>
void decoder_cases(double tol) {
  nn::DecoderConfig cfg = small_decoder_config();
  const Index batch = 2, seq = 4;
  const std::vector<std::int64_t> ids{3, 1, 4, 1, 5, 9, 2, 6}, mask{1, 1, 1, 1, 0, 1, 1, 1};  // row 1: a padded first token
  for (auto act : {nn::GeluApproximate::tanh, nn::GeluApproximate::none}) {
    cfg.activation = act;
    INFO("case: decoder, GELU " << (act == nn::GeluApproximate::tanh ? "tanh" : "exact") << " (" << Dev::name << ")");
    Generator gc(31), gd(31);
    auto cpu = trainable_decoder<double, EigenCpu>(cfg, gc);
    auto dev = trainable_decoder<G, Dev>(cfg, gd);
    auto pc = parameters<double>(cpu);
    auto pd = parameters<G>(dev);
    compare_params<Dev>(pc, pd, tol, "initial", false);
    randomize<Dev>(pc, pd);
    auto cc = cpu.make_context(batch, seq);
    auto dc = dev.make_context(batch, seq);
    const Index rows = batch * seq, V = cfg.vocab_size;
    Mat<double> logits(rows, V);
    typename Dev::template buffer<G> ld(std::size_t(rows * V)), dld(std::size_t(rows * V));
    for (auto mode : {GradMode::overwrite, GradMode::accumulate}) {
      INFO((mode == GradMode::overwrite ? "overwrite" : "accumulate"));
      cpu.forward(cc, nn::DecoderInput<double>{batch, seq, TokenIds(ids), {}, {}, mask}, logits);
      dev.forward(dc, nn::DecoderInput<G>{batch, seq, TokenIds(ids), {}, {}, mask}, ld.view(rows, V));
      CHECK(rel(fetch<Dev>(ld.data(), rows, V), logits) <= tol);
      const Mat<double> dl = rounded<G>(random_mat<double>(rows, V, mode == GradMode::overwrite ? 70 : 71));
      put<Dev>(dl, dld.data());
      cpu.backward(cc, dl, {}, mode);
      dev.backward(dc, ConstMatrixView<G>(dld.view(rows, V)), {}, mode);
      compare_params<Dev>(pc, pd, tol, "after backward", true);
    }
  }
}

// ---- a training loop: loss, gradient clipping and the optimizers on the device ------------------------------

/// The decoder above trained for three steps on both backends: zero_grad, forward, the causal-LM loss
/// (nn::causal_lm_loss on the CPU, CrossEntropyLoss<G, Dev> on Dev: the loss value and dlogits), backward,
/// clip_grad_norm (and on the first step the ∞- and 3-norms unclipped, on the last clip_grad_value), then an
/// optimizer step; every parameter and gradient compared after each step. Optimizers: AdamW with AMSGrad,
/// Adam with an L2 penalty, SGD with Nesterov momentum and weight decay. `adam`: whether to run the Adam
/// variants (their first steps move each weight by about ±lr whatever the gradient's size, so a gradient
/// near zero whose sign differs between float and double moves a weight by 2·lr: compare them in double).
template <class Dev, class G>
void training_cases(double tol, bool adam) {
  const nn::DecoderConfig cfg = small_decoder_config();
  const Index batch = 2, seq = 4, rows = batch * seq, V = cfg.vocab_size;
  const std::vector<std::int64_t> ids{3, 1, 4, 1, 5, 9, 2, 6}, mask{1, 1, 1, 1, 0, 1, 1, 1};
  const std::vector<std::int64_t> labels{3, 1, -100, 1, 5, 9, 2, 6};  // one ignored label
  auto close = [&](double d, double c) { return std::abs(d - c) <= tol * std::max(1.0, std::abs(c)); };
  for (int which = adam ? 0 : 2; which < 3; ++which) {
    INFO("case: training loop with " << (which == 0 ? "AdamW (amsgrad)" : which == 1 ? "Adam (L2 penalty)" : "SGD (nesterov)") << " ("
                                     << Dev::name << ")");
    Generator gc(37), gd(37);
    auto cpu = trainable_decoder<double, EigenCpu>(cfg, gc);
    auto dev = trainable_decoder<G, Dev>(cfg, gd);
    auto pc = parameters<double>(cpu);
    auto pd = parameters<G>(dev);
    compare_params<Dev>(pc, pd, tol, "initial", false);
    auto cc = cpu.make_context(batch, seq);
    auto dc = dev.make_context(batch, seq);
    Mat<double> logits(rows, V), dl(rows, V);
    typename Dev::template buffer<G> ld(std::size_t(rows * V)), dld(std::size_t(rows * V));
    nn::CrossEntropyLoss<G, Dev> loss_dev(rows);
    auto train = [&](auto& opt_c, auto& opt_d) {
      for (int step = 0; step < 3; ++step) {
        INFO("step " << step);
        opt_c.zero_grad();
        opt_d.zero_grad();
        cpu.forward(cc, nn::DecoderInput<double>{batch, seq, TokenIds(ids), {}, {}, mask}, logits);
        dev.forward(dc, nn::DecoderInput<G>{batch, seq, TokenIds(ids), {}, {}, mask}, ld.view(rows, V));
        const double lc = nn::causal_lm_loss<double>(logits, labels, batch, seq, dl);
        const double lv = loss_dev.causal_lm(ld.view(rows, V), labels, batch, seq, dld.view(rows, V));
        CHECK(std::isfinite(lc));
        CHECK(close(lv, lc));
        CHECK(rel(fetch<Dev>(dld.data(), rows, V), dl) <= tol);
        cpu.backward(cc, dl, {}, GradMode::accumulate);  // onto the gradients zero_grad cleared
        dev.backward(dc, ConstMatrixView<G>(dld.view(rows, V)), {}, GradMode::accumulate);
        compare_params<Dev>(pc, pd, tol, "after backward", true);
        if (step == 0) {
          for (double p : {std::numeric_limits<double>::infinity(), 3.0, 1.0}) {
            INFO("norm type " << p);
            const double nc = clip_grad_norm<double>(pc, 1e30, p);  // no clipping
            CHECK(nc > 0.0);
            CHECK(close(clip_grad_norm<G, Dev>(pd, 1e30, p), nc));
          }
        }
        const double nc = clip_grad_norm<double>(pc, 0.5);
        const double nd = clip_grad_norm<G, Dev>(pd, 0.5);
        CHECK(nc > 0.5);  // the clip acts
        CHECK(close(nd, nc));
        if (step == 2) {
          clip_grad_value<double>(pc, 0.01);
          clip_grad_value<G, Dev>(pd, 0.01);
        }
        compare_params<Dev>(pc, pd, tol, "after clipping", true);
        opt_c.step();
        opt_d.step();
        compare_params<Dev>(pc, pd, tol, "after the optimizer step", true);
      }
    };
    if (which == 0) {
      AdamWOptions o;
      o.lr = 1e-2;
      o.amsgrad = true;
      AdamW<double> oc(pc, o);
      AdamW<G, Dev> od(pd, o);
      train(oc, od);
    } else if (which == 1) {
      AdamOptions o;
      o.lr = 1e-2;
      o.weight_decay = 0.1;
      Adam<double> oc(pc, o);
      Adam<G, Dev> od(pd, o);
      train(oc, od);
    } else {
      SGDOptions o;
      o.lr = 0.05;
      o.momentum = 0.9;
      o.nesterov = true;
      o.weight_decay = 1e-2;
      SGD<double> oc(pc, o);
      SGD<G, Dev> od(pd, o);
      train(oc, od);
    }
  }
}

}  // namespace peft::test::parity
