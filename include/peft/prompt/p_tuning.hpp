// peft++ — P-Tuning (Liu et al., 2021, "GPT Understands, Too") with Hugging Face PEFT's semantics
// (PromptEncoderConfig, tuners/p_tuning's PromptEncoder, PeftModelForCausalLM's prompt path): virtual-token
// embeddings passed through a prompt encoder (an MLP, or a bidirectional LSTM followed by an MLP head) and
// prepended to the input embeddings of a frozen model.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "peft/backend/eigen_cpu.hpp"
#include "peft/errors.hpp"
#include "peft/grad_mode.hpp"
#include "peft/layer/linear.hpp"
#include "peft/param.hpp"
#include "peft/rng.hpp"
#include "peft/view.hpp"

namespace peft {

/// PEFT's PromptEncoderReparameterizationType.
enum class PromptEncoderReparameterizationType {
  mlp,   ///< "MLP" (default): Linear(d, h) ReLU Linear(h, h) ReLU Linear(h, d)
  lstm,  ///< "LSTM": bidirectional LSTM(d → h, encoder_num_layers layers), then Linear(2h, 2h) ReLU Linear(2h, d)
};

/// PEFT's PromptEncoderConfig (the fields P-tuning reads).
struct PromptEncoderConfig {
  Index num_virtual_tokens = 0;  ///< required
  Index token_dim = 0;           ///< the model's hidden size (required)
  Index num_transformer_submodules = 1;
  PromptEncoderReparameterizationType encoder_reparameterization_type = PromptEncoderReparameterizationType::mlp;
  Index encoder_hidden_size = 0;  ///< 0: token_dim (PEFT's default)
  Index encoder_num_layers = 2;   ///< LSTM layers; PEFT ignores it for MLP (always 3 Linears)
  double encoder_dropout = 0.0;   ///< the LSTM's dropout between its layers (training only)
  bool inference_mode = false;    ///< PEFT: only the table (the exported prompt_embeddings), frozen, no encoder

  Index total_virtual_tokens() const noexcept { return num_virtual_tokens * num_transformer_submodules; }
  Index hidden() const noexcept { return encoder_hidden_size > 0 ? encoder_hidden_size : token_dim; }
  void validate() const {
    if (num_virtual_tokens <= 0 || num_transformer_submodules <= 0)
      throw ConfigError(detail::cat("PromptEncoderConfig: num_virtual_tokens (", num_virtual_tokens, ") and num_transformer_submodules (",
                                    num_transformer_submodules, ") must be positive"));
    if (token_dim <= 0) throw ConfigError(detail::cat("PromptEncoderConfig: token_dim must be positive (the model's hidden size), got ", token_dim));
    if (encoder_hidden_size < 0) throw ConfigError(detail::cat("PromptEncoderConfig: encoder_hidden_size must be >= 0, got ", encoder_hidden_size));
    if (encoder_reparameterization_type == PromptEncoderReparameterizationType::lstm && encoder_num_layers <= 0)
      throw ConfigError(detail::cat("PromptEncoderConfig: encoder_num_layers must be positive for LSTM, got ", encoder_num_layers));
    if (!(encoder_dropout >= 0.0 && encoder_dropout < 1.0))
      throw ConfigError(detail::cat("PromptEncoderConfig: encoder_dropout must be in [0, 1), got ", encoder_dropout));
  }
};

/// PEFT's PromptEncoder: `embedding.weight` [T, token_dim] (T = total virtual tokens, N(0, 1)), then
///   MLP:  mlp_head.0 Linear(d, h), ReLU, mlp_head.2 Linear(h, h), ReLU, mlp_head.4 Linear(h, d)
///   LSTM: lstm_head = torch.nn.LSTM(d, h, encoder_num_layers, dropout, bidirectional, batch_first) over the T
///         virtual tokens as one sequence, then mlp_head.0 Linear(2h, 2h), ReLU, mlp_head.2 Linear(2h, d).
/// The output [T, d] is the same for every batch row (PEFT runs the encoder on one row and repeats it).
template <class T, class Backend = EigenCpu>
class PromptEncoder {
 public:
  using scalar = T;
  using backend_type = Backend;
  using Buffer = typename Backend::template buffer<T>;
  using Lin = Linear<T, Backend>;

  struct Direction {  // one direction of one LSTM layer: activations for backward
    typename Lin::Context ih, hh;
    Buffer gates;        // [T, 4h]: pre-activation x W_ihᵀ + b_ih, then the activated gates i f g o
    Buffer c, tc, hprev, cprev;  // [T, h]
    Buffer dgates;       // [T, 4h]
    Buffer rec, dh;      // [1, 4h], [1, h]
  };
  struct Context {
    Index max_batch = 0, batch = 0;
    bool has_forward = false;
    bool training = true;             ///< applies encoder_dropout between LSTM layers
    std::uint64_t dropout_seed = 0;   ///< the masks come from (dropout_seed, dropout_step · layers + layer)
    std::uint64_t dropout_step = 0;   ///< incremented by every forward
    std::vector<typename Lin::Context> mlp;
    std::vector<Buffer> z, dz;        // per MLP Linear: its output (ReLU applied in place for hidden ones), gradient
    std::vector<Direction> dirs;      // [layer · 2 + direction]
    std::vector<Buffer> y, dy, mask, x, dx;  // per LSTM layer: output [T, 2h]; next layer's (dropped-out) input, mask
    Buffer out, dout;                 // [T, d]
  };

  PromptEncoder() = default;

  /// ensures: PEFT's init: the table N(0, 1); every Linear PyTorch's default (uniform ±1/√fan_in); every LSTM
  /// weight and bias uniform ±1/√h (torch.nn.LSTM's reset_parameters). Trainable unless inference_mode.
  PromptEncoder(const PromptEncoderConfig& config, Generator& gen) : config_(config) {
    config.validate();
    const Index n = config.total_virtual_tokens(), d = config.token_dim, h = config.hidden();
    weight_.resize(std::size_t(n * d));
    Backend::random_normal(gen, flat(weight_), 0.0, 1.0);
    if (!config.inference_mode) {
      if (is_lstm()) {
        const double k = 1.0 / std::sqrt(double(h));
        for (Index l = 0; l < config.encoder_num_layers; ++l)
          for (int dir = 0; dir < 2; ++dir) {
            Lin ih(l == 0 ? d : 2 * h, 4 * h, true, gen), hh(h, 4 * h, true, gen);
            for (Lin* p : {&ih, &hh}) {
              Backend::random_uniform(gen, p->weight(), -k, k);
              Backend::random_uniform(gen, p->bias(), -k, k);
            }
            w_ih_.push_back(std::move(ih));
            w_hh_.push_back(std::move(hh));
          }
        mlp_.emplace_back(2 * h, 2 * h, true, gen);
        mlp_.emplace_back(2 * h, d, true, gen);
      } else {
        mlp_.emplace_back(d, h, true, gen);
        mlp_.emplace_back(h, h, true, gen);
        mlp_.emplace_back(h, d, true, gen);
      }
    }
    set_requires_grad(!config.inference_mode);
  }

  const PromptEncoderConfig& config() const noexcept { return config_; }
  Index num_virtual_tokens() const noexcept { return config_.total_virtual_tokens(); }
  Index token_dim() const noexcept { return config_.token_dim; }
  bool is_lstm() const noexcept { return config_.encoder_reparameterization_type == PromptEncoderReparameterizationType::lstm; }
  bool has_encoder() const noexcept { return !config_.inference_mode; }
  MatrixView<T> weight() { return weight_.view(num_virtual_tokens(), token_dim()); }
  ConstMatrixView<T> weight() const { return weight_.view(num_virtual_tokens(), token_dim()); }
  MatrixView<T> weight_grad() { return requires_grad_ ? grad_.view(num_virtual_tokens(), token_dim()) : MatrixView<T>{}; }
  std::vector<Lin>& mlp_head() { return mlp_; }

  void set_requires_grad(bool on) {
    requires_grad_ = on;
    if (on) grad_.resize(weight_.size());
    else grad_ = {};
    for (auto* v : {&mlp_, &w_ih_, &w_hh_})
      for (auto& l : *v) l.set_requires_grad(on);
  }
  bool requires_grad() const noexcept { return requires_grad_; }

  Context make_context(Index max_batch) const {
    if (max_batch <= 0) throw ShapeError(detail::cat("PromptEncoder::make_context: max_batch must be positive, got ", max_batch));
    Context c;
    c.max_batch = max_batch;
    const Index n = num_virtual_tokens(), d = token_dim(), h = config_.hidden();
    c.out.resize(std::size_t(n * d));
    c.dout.resize(std::size_t(n * d));
    for (const auto& l : mlp_) {
      c.mlp.push_back(l.make_context(n));
      c.z.emplace_back();
      c.z.back().resize(std::size_t(n * l.out_features()));
      c.dz.emplace_back();
      c.dz.back().resize(std::size_t(n * l.in_features()));
    }
    if (has_encoder() && is_lstm()) {
      const Index L = config_.encoder_num_layers;
      c.dirs.resize(std::size_t(2 * L));
      for (Index k = 0; k < 2 * L; ++k) {
        auto& D = c.dirs[std::size_t(k)];
        D.ih = w_ih_[std::size_t(k)].make_context(n);
        D.hh = w_hh_[std::size_t(k)].make_context(n);
        for (Buffer* b : {&D.gates, &D.dgates}) b->resize(std::size_t(n * 4 * h));
        for (Buffer* b : {&D.c, &D.tc, &D.hprev, &D.cprev}) b->resize(std::size_t(n * h));
        D.rec.resize(std::size_t(4 * h));
        D.dh.resize(std::size_t(h));
      }
      for (auto* v : {&c.y, &c.dy, &c.mask, &c.x, &c.dx}) {
        v->resize(std::size_t(L));
        for (auto& b : *v) b.resize(std::size_t(n * 2 * h));
      }
    }
    return c;
  }

  /// The encoder output for one row ([T, d], what PEFT prepends to every row): written to ctx and returned.
  ConstMatrixView<T> encode(Context& ctx) const {
    if (ctx.max_batch == 0) throw StateError("PromptEncoder.forward: the context was not made by make_context");
    const Index n = num_virtual_tokens(), d = token_dim();
    auto out = MatrixView<T>(ctx.out.data(), n, d);
    if (!has_encoder()) {
      Backend::copy(weight(), out);
      return out;
    }
    ConstMatrixView<T> x = weight();
    if (is_lstm()) x = lstm_forward(ctx, x);
    for (std::size_t k = 0; k < mlp_.size(); ++k) {
      const bool last = k + 1 == mlp_.size();
      auto z = last ? out : MatrixView<T>(ctx.z[k].data(), n, mlp_[k].out_features());
      mlp_[k].forward(ctx.mlp[k], x, z);
      if (!last) Backend::relu_forward(z);
      x = z;
    }
    ++ctx.dropout_step;
    return out;
  }

  /// prompts [batch · T, d]: every row block the encoder output.
  void forward(Context& ctx, Index batch, MatrixView<T> prompts) const {
    check_batch(ctx, batch, "PromptEncoder.forward");
    require_shape(prompts, batch * num_virtual_tokens(), token_dim(), "PromptEncoder.forward: prompts [batch * num_virtual_tokens, token_dim]");
    const auto out = encode(ctx);
    for (Index b = 0; b < batch; ++b) Backend::copy(out, prompts.row_block(b * num_virtual_tokens(), num_virtual_tokens()));
    ctx.batch = batch;
    ctx.has_forward = true;
  }

  /// The decoder input with the prompts prepended, as PromptEmbedding::prepend: for every batch row b, rows
  /// [b · (T + seq), b · (T + seq) + T) the encoder output, then token_embeds rows [b · seq, (b + 1) · seq).
  void prepend(Context& ctx, ConstMatrixView<T> token_embeds, Index batch, Index seq, MatrixView<T> inputs_embeds) const {
    check_batch(ctx, batch, "PromptEncoder.prepend");
    const Index nv = num_virtual_tokens(), L = nv + seq;
    require_shape(token_embeds, batch * seq, token_dim(), "PromptEncoder.prepend: token_embeds [batch * seq, token_dim]");
    require_shape(inputs_embeds, batch * L, token_dim(), "PromptEncoder.prepend: inputs_embeds [batch * (num_virtual_tokens + seq), token_dim]");
    const auto out = encode(ctx);
    for (Index b = 0; b < batch; ++b) {
      Backend::copy(out, inputs_embeds.row_block(b * L, nv));
      Backend::copy(token_embeds.row_block(b * seq, seq), inputs_embeds.row_block(b * L + nv, seq));
    }
    ctx.batch = batch;
    ctx.has_forward = true;
  }

  /// Backward from d prompts [batch · T, d] (summed over the batch) into every trainable parameter per `params`.
  void backward(Context& ctx, ConstMatrixView<T> dprompts, GradMode params = GradMode::accumulate) {
    if (!ctx.has_forward) throw StateError("PromptEncoder.backward: the context holds no forward pass");
    require_shape(dprompts, ctx.batch * num_virtual_tokens(), token_dim(), "PromptEncoder.backward: dprompts [batch * num_virtual_tokens, token_dim]");
    backward_rows(ctx, dprompts, num_virtual_tokens(), params);
  }
  /// The same from the gradient of the prepended inputs_embeds ([batch · (T + seq), d]); token rows ignored.
  void backward_from_inputs_embeds(Context& ctx, ConstMatrixView<T> d_inputs_embeds, Index seq, GradMode params = GradMode::accumulate) {
    if (!ctx.has_forward) throw StateError("PromptEncoder.backward: the context holds no forward pass");
    require_shape(d_inputs_embeds, ctx.batch * (num_virtual_tokens() + seq), token_dim(),
                  "PromptEncoder.backward_from_inputs_embeds: d_inputs_embeds [batch * (num_virtual_tokens + seq), token_dim]");
    backward_rows(ctx, d_inputs_embeds, num_virtual_tokens() + seq, params);
  }

  /// PEFT's padding: mask_out [batch, T + seq] = ones then `mask` (all ones when empty); labels -100 × T then labels.
  void prepend_mask(std::span<const std::int64_t> mask, Index batch, Index seq, std::span<std::int64_t> mask_out) const {
    prepend_rows(mask, batch, seq, 1, mask_out, "prepend_mask");
  }
  void prepend_labels(std::span<const std::int64_t> labels, Index batch, Index seq, std::span<std::int64_t> labels_out) const {
    if (labels.empty()) throw ShapeError("PromptEncoder.prepend_labels: labels are empty");
    prepend_rows(labels, batch, seq, -100, labels_out, "prepend_labels");
  }

  /// What PEFT saves as `prompt_embeddings` ([T, d]): the encoder output (in evaluation mode: no dropout).
  /// Load it into an inference_mode encoder. Allocates (not a hot-path call).
  std::vector<T> prompt_embeddings() const {
    auto ctx = make_context(1);
    ctx.training = false;
    const auto out = encode(ctx);
    std::vector<T> host(std::size_t(out.size()));
    Backend::template download<T>(out, MatrixView<T>(host.data(), out.rows, out.cols));
    return host;
  }

  /// PEFT's names inside prompt_encoder.<adapter>: "embedding.weight", "mlp_head.<i>.weight|bias",
  /// "lstm_head.weight_ih_l<k>[_reverse]", "lstm_head.bias_ih_l<k>[_reverse]", "..._hh_...".
  template <class F>
  void visit_parameters(F&& f) {
    f(ParamRef<T>{"embedding.weight", weight_.data(), requires_grad_ ? grad_.data() : nullptr, weight_.size(), requires_grad_, Backend::host_accessible});
    for (std::size_t k = 0; k < w_ih_.size(); ++k) {
      const std::string suffix = "_l" + std::to_string(k / 2) + (k % 2 ? "_reverse" : "");
      w_ih_[k].visit_parameters([&](ParamRef<T> p) { p.name = "lstm_head." + p.name + "_ih" + suffix; f(p); });
      w_hh_[k].visit_parameters([&](ParamRef<T> p) { p.name = "lstm_head." + p.name + "_hh" + suffix; f(p); });
    }
    for (std::size_t k = 0; k < mlp_.size(); ++k)
      mlp_[k].visit_parameters([&](ParamRef<T> p) { p.name = "mlp_head." + std::to_string(2 * k) + "." + p.name; f(p); });
  }
  void zero_grad() {
    grad_.zero();
    for (auto* v : {&mlp_, &w_ih_, &w_hh_})
      for (auto& l : *v) l.zero_grad();
  }

 private:
  void check_batch(const Context& ctx, Index batch, const char* where) const {
    if (ctx.max_batch == 0) throw StateError(detail::cat(where, ": the context was not made by make_context"));
    if (batch <= 0 || batch > ctx.max_batch)
      throw ShapeError(detail::cat(where, ": batch ", batch, " must be positive and at most the context's max_batch ", ctx.max_batch));
  }
  void prepend_rows(std::span<const std::int64_t> in, Index batch, Index seq, std::int64_t fill, std::span<std::int64_t> out, const char* what) const {
    const Index nv = num_virtual_tokens();
    if (!in.empty() && Index(in.size()) != batch * seq)
      throw ShapeError(detail::cat("PromptEncoder.", what, ": ", in.size(), " entries, expected batch * seq = ", batch * seq));
    if (Index(out.size()) != batch * (nv + seq))
      throw ShapeError(detail::cat("PromptEncoder.", what, ": the output has ", out.size(), " entries, expected batch * (num_virtual_tokens + seq) = ",
                                   batch * (nv + seq)));
    for (Index b = 0; b < batch; ++b)
      for (Index j = 0; j < nv + seq; ++j)
        out[std::size_t(b * (nv + seq) + j)] = j < nv ? fill : (in.empty() ? 1 : in[std::size_t(b * seq + j - nv)]);
  }

  /// The bidirectional LSTM over the T rows of x; returns the last layer's output [T, 2h] (forward direction
  /// in columns [0, h), reverse in [h, 2h)).
  ConstMatrixView<T> lstm_forward(Context& ctx, ConstMatrixView<T> x) const {
    const Index n = num_virtual_tokens(), h = config_.hidden(), L = config_.encoder_num_layers;
    const double p = ctx.training ? config_.encoder_dropout : 0.0;
    for (Index l = 0; l < L; ++l) {
      auto y = MatrixView<T>(ctx.y[std::size_t(l)].data(), n, 2 * h);
      for (int dir = 0; dir < 2; ++dir) {
        const std::size_t k = std::size_t(2 * l + dir);
        auto& D = ctx.dirs[k];
        auto gates = MatrixView<T>(D.gates.data(), n, 4 * h);
        auto c = MatrixView<T>(D.c.data(), n, h), tc = MatrixView<T>(D.tc.data(), n, h);
        auto hprev = MatrixView<T>(D.hprev.data(), n, h), cprev = MatrixView<T>(D.cprev.data(), n, h);
        auto rec = MatrixView<T>(D.rec.data(), 1, 4 * h);
        w_ih_[k].forward(D.ih, x, gates);
        auto yd = y.col_block(dir * h, h);  // this direction's half of the layer output
        for (Index s = 0; s < n; ++s) {
          const Index t = dir == 0 ? s : n - 1 - s, prev = dir == 0 ? t - 1 : t + 1;
          auto hp = hprev.row_block(t, 1), cp = cprev.row_block(t, 1);
          if (s == 0) {
            Backend::fill(hp, T(0));
            Backend::fill(cp, T(0));
          } else {
            Backend::copy(ConstMatrixView<T>(yd.row_block(prev, 1)), hp);
            Backend::copy(ConstMatrixView<T>(c.row_block(prev, 1)), cp);
          }
          w_hh_[k].forward_into(D.hh, hp, rec);
          Backend::lstm_cell(gates.row_block(t, 1), ConstMatrixView<T>(rec), ConstMatrixView<T>(cp), c.row_block(t, 1), tc.row_block(t, 1),
                             yd.row_block(t, 1));
        }
      }
      if (p > 0.0 && l + 1 < L) {  // torch.nn.LSTM's dropout on every layer's output but the last
        auto mask = MatrixView<T>(ctx.mask[std::size_t(l)].data(), n, 2 * h), xd = MatrixView<T>(ctx.x[std::size_t(l)].data(), n, 2 * h);
        Backend::fill(mask, T(1));
        Backend::dropout(ConstMatrixView<T>(mask), mask, p, ctx.dropout_seed, ctx.dropout_step * std::uint64_t(L) + std::uint64_t(l));
        Backend::copy(ConstMatrixView<T>(y), xd);
        Backend::mul(ConstMatrixView<T>(mask), xd);
        x = xd;
      } else {
        if (l + 1 < L) Backend::fill(MatrixView<T>(ctx.mask[std::size_t(l)].data(), n, 2 * h), T(1));
        x = y;
      }
    }
    return x;
  }

  /// Backward of the LSTM from dy of the last layer (ctx.dy[L-1]) into its weights and the table gradient.
  void lstm_backward(Context& ctx, GradMode params) {
    const Index n = num_virtual_tokens(), h = config_.hidden(), L = config_.encoder_num_layers;
    for (Index l = L; l-- > 0;) {
      auto dy = MatrixView<T>(ctx.dy[std::size_t(l)].data(), n, 2 * h);
      MatrixView<T> dx = l == 0 ? weight_grad() : MatrixView<T>(ctx.dx[std::size_t(l)].data(), n, 2 * h);
      for (int dir = 0; dir < 2; ++dir) {
        const std::size_t k = std::size_t(2 * l + dir);
        auto& D = ctx.dirs[k];
        auto gates = MatrixView<T>(D.gates.data(), n, 4 * h), dg = MatrixView<T>(D.dgates.data(), n, 4 * h);
        auto tc = MatrixView<T>(D.tc.data(), n, h), cprev = MatrixView<T>(D.cprev.data(), n, h);
        auto dh = MatrixView<T>(D.dh.data(), 1, h);
        Backend::fill(dh, T(0));
        // dc_{t+1} ⊙ f_{t+1}, carried in rec's first h entries (rec is free during backward)
        auto dcn = MatrixView<T>(D.rec.data(), 1, h);
        Backend::fill(dcn, T(0));
        const auto dyd = ConstMatrixView<T>(dy.col_block(dir * h, h));
        for (Index s = n; s-- > 0;) {
          const Index t = dir == 0 ? s : n - 1 - s;
          Backend::lstm_cell_backward(ConstMatrixView<T>(gates.row_block(t, 1)), ConstMatrixView<T>(tc.row_block(t, 1)),
                                      ConstMatrixView<T>(cprev.row_block(t, 1)), dyd.row_block(t, 1), ConstMatrixView<T>(dh), dcn, dg.row_block(t, 1));
          w_hh_[k].backward_input(D.hh, dg.row_block(t, 1), dh, T(0));
        }
        if (requires_grad_) {
          const T beta = params == GradMode::accumulate ? T(1) : T(0);
          w_hh_[k].backward_params(D.hh, MatrixView<T>(D.hprev.data(), n, h), dg, beta);
        }
        // dx: the first direction writes (per params for the table, overwrite inside), the second adds
        const GradMode xmode = dir == 1 ? GradMode::accumulate : (l == 0 ? params : GradMode::overwrite);
        w_ih_[k].backward(D.ih, dg, dx, params, xmode);
      }
      if (l > 0) {  // through the dropout mask into the previous layer's output
        auto dprev = MatrixView<T>(ctx.dy[std::size_t(l - 1)].data(), n, 2 * h), mask = MatrixView<T>(ctx.mask[std::size_t(l - 1)].data(), n, 2 * h);
        Backend::copy(ConstMatrixView<T>(dx), dprev);
        Backend::mul(ConstMatrixView<T>(mask), dprev);
      }
    }
  }

  void backward_rows(Context& ctx, ConstMatrixView<T> d, Index period, GradMode params) {
    if (!requires_grad_) return;
    const Index n = num_virtual_tokens(), dm = token_dim();
    auto dout = MatrixView<T>(ctx.dout.data(), n, dm);
    Backend::fill(dout, T(0));
    for (Index b = 0; b < ctx.batch; ++b) Backend::axpby(T(1), d.row_block(b * period, n), T(1), dout);
    if (!has_encoder()) {  // inference mode is frozen; kept for completeness
      Backend::axpby(T(1), ConstMatrixView<T>(dout), params == GradMode::accumulate ? T(1) : T(0), weight_grad());
      return;
    }
    ConstMatrixView<T> g = dout;
    const Index h = config_.hidden();
    for (std::size_t k = mlp_.size(); k-- > 0;) {
      const bool first = k == 0;
      MatrixView<T> dx;
      if (!first) dx = MatrixView<T>(ctx.dz[k].data(), n, mlp_[k].in_features());
      else if (is_lstm()) dx = MatrixView<T>(ctx.dy[std::size_t(config_.encoder_num_layers - 1)].data(), n, 2 * h);
      else dx = weight_grad();
      mlp_[k].backward(ctx.mlp[k], g, dx, params, first && !is_lstm() ? params : GradMode::overwrite);
      if (!first) {  // through the ReLU of the previous Linear's output
        Backend::relu_backward(ConstMatrixView<T>(ctx.z[k - 1].data(), n, mlp_[k].in_features()), dx);
      }
      g = dx;
    }
    if (is_lstm()) lstm_backward(ctx, params);
  }

  PromptEncoderConfig config_;
  Buffer weight_, grad_;
  std::vector<Lin> mlp_, w_ih_, w_hh_;  // w_ih_/w_hh_: [layer · 2 + direction]
  bool requires_grad_ = false;
};

}  // namespace peft
