// peft++ — the transformer feed-forward block: y = fc_out(gelu(fc_in(x))), with fc_in/fc_out any linear layer
// type (Linear, or Adapted<Linear, Kinds...> for adapters on the MLP).
#pragma once

#include <array>
#include <string>
#include <string_view>

#include "peft/nn/activation.hpp"
#include "peft/nn/attention.hpp"

namespace peft::nn {

/// fc_in: d_model → d_ff, GELU, fc_out: d_ff → d_model (GPT-2's c_fc / c_proj). An aggregate walked by the
/// model helpers (parameter paths "fc_in.weight", ...). Make one with `make_mlp_block`.
template <class Proj>
struct MlpBlock {
  using scalar = typename Proj::scalar;
  using T = scalar;
  using backend_type = typename Proj::backend_type;
  using Backend = backend_type;
  using Buffer = typename Backend::template buffer<T>;
  static constexpr std::array<std::string_view, 3> field_names{"fc_in", "act", "fc_out"};

  Proj fc_in;
  Gelu<T, Backend> act;
  Proj fc_out;

  struct Context {
    typename Proj::Context fc_in, fc_out;
    typename Gelu<T, Backend>::Context act;
    Index max_batch = 0, rows = 0;
    bool has_forward = false;
    Buffer h, a, da, dh;  // [max_batch, d_ff]
  };

  Index d_model() const noexcept { return fc_in.in_features(); }
  Index d_ff() const noexcept { return fc_in.out_features(); }

  Context make_context(Index max_batch) const {
    if (fc_out.in_features() != d_ff() || fc_out.out_features() != d_model())
      throw ShapeError(detail::cat("MlpBlock: fc_in maps ", d_model(), " -> ", d_ff(), " but fc_out maps ", fc_out.in_features(), " -> ",
                                   fc_out.out_features(), "; expected ", d_ff(), " -> ", d_model()));
    if (max_batch <= 0) throw ShapeError(detail::cat("MlpBlock::make_context: max_batch must be positive, got ", max_batch));
    Context c;
    c.max_batch = max_batch;
    c.fc_in = fc_in.make_context(max_batch);
    c.fc_out = fc_out.make_context(max_batch);
    c.act = act.make_context(max_batch);
    for (Buffer* b : {&c.h, &c.a, &c.da, &c.dh}) b->resize(std::size_t(max_batch * d_ff()));
    return c;
  }

  /// requires: x [rows, d_model], rows <= max_batch, y [rows, d_model] not overlapping x. ensures: y assigned.
  void forward(Context& ctx, ConstMatrixView<T> x, MatrixView<T> y) {
    if (x.rows > ctx.max_batch) throw ShapeError(detail::cat("MlpBlock.forward: ", x.rows, " rows exceed the context's max_batch ", ctx.max_batch));
    const Index n = x.rows;
    auto h = MatrixView<T>(ctx.h.data(), n, d_ff()), a = MatrixView<T>(ctx.a.data(), n, d_ff());
    fc_in.forward(ctx.fc_in, x, h);
    act.forward(ctx.act, h, a);
    fc_out.forward(ctx.fc_out, a, y);
    ctx.rows = n;
    ctx.has_forward = true;
  }
  /// dx ([rows, d_model] or empty) per `input`; trainable parameters per `params`.
  void backward(Context& ctx, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode params = GradMode::accumulate,
                GradMode input = GradMode::overwrite) {
    if (!ctx.has_forward) throw StateError("MlpBlock.backward: the context holds no forward pass");
    const Index n = ctx.rows;
    auto da = MatrixView<T>(ctx.da.data(), n, d_ff()), dh = MatrixView<T>(ctx.dh.data(), n, d_ff());
    fc_out.backward(ctx.fc_out, dy, da, params, GradMode::overwrite);
    act.backward(ctx.act, da, dh, GradMode::overwrite);
    fc_in.backward(ctx.fc_in, dh, dx, params, input);
  }
};

/// An MLP block with PyTorch-initialised layers (with bias); adapted layers get the module paths
/// "<path>.fc_in" and "<path>.fc_out".
template <class Proj>
MlpBlock<Proj> make_mlp_block(Index d_model, Index d_ff, Generator& gen, GeluApproximate act = GeluApproximate::tanh,
                              const std::string& path = {}) {
  using T = typename Proj::scalar;
  using B = typename Proj::backend_type;
  return MlpBlock<Proj>{impl::make_projection<Proj>(d_model, d_ff, true, gen, impl::join_path(path, "fc_in")), Gelu<T, B>(act),
                        impl::make_projection<Proj>(d_ff, d_model, true, gen, impl::join_path(path, "fc_out"))};
}

}  // namespace peft::nn
