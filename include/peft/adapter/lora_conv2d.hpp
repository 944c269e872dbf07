// peft++ — LoRA and DoRA on Conv2d layers, as PEFT's lora.Conv2d:
//
//   A: a conv C → r with the base's kernel, stride, padding (and dilation), weight [r, C·kh·kw]
//   B: a 1×1 conv r → O, weight [O, r] (bias [O] with lora_bias)
//   y_n += s · B · (A · cols(dropout(x)_n))      ΔW = s · B A  ([O, C·kh·kw], the base kernel's layout)
//
// DoRA (use_dora), as PEFT's DoraConv2dLayer: m [O] (checkpoint shape (1, O, 1, 1)), the norm per output
// channel over (C, kh, kw) — the row norms of W + s·B·A viewed as [O, C·kh·kw] — detached, and per channel
// (broadcast over positions) the rule of LoRA's Linear DoRA:
//   y ← y + (g − 1) ⊙ (y − b) + g ⊙ s·B·A·cols(x)           (no dropout, or eval mode)
//   y ← y + (g − 1) ⊙ conv(xd, W) + g ⊙ s·B·A·cols(xd)     (dropout active, xd = dropout(x))
//
// PEFT builds lora_A without the base's dilation, which fails for dilated convolutions; peft++ uses the
// base's dilation, so LoRA works there and merges exactly.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "peft/adapter/lora.hpp"
#include "peft/layer/conv2d.hpp"

namespace peft {

template <class T, class Backend>
class LoraBank<Conv2d<T, Backend>> {
 public:
  using base_type = Conv2d<T, Backend>;
  using adapter_type = LoraAdapter<T, Backend>;
  using Scratch = typename Backend::template GemmScratch<T>;
  template <class U>
  using buffer = typename Backend::template buffer<U>;
  using Ops = detail::LoraWeightOps<T, Backend>;

  struct Context {
    struct Slot {
      buffer<T> t;    ///< A · cols(x_n) for every image, [batch, r·Ho·Wo]
      buffer<T> xd;   ///< dropout(x), [batch, C·H·W] (only with lora_dropout > 0)
      buffer<T> dxd;  ///< gradient w.r.t. dropout(x) (only with lora_dropout > 0)
      // DoRA only:
      buffer<T> q;                 ///< [batch, O·P]: base term + s·lora; dm = Σ dy ⊙ q / norm per channel
      buffer<T> norm, scale, scale_m1;  ///< [O]: ‖W + s·B·A‖ per channel (detached), g = m / norm, g − 1
      buffer<T> scale_x, scale_m1_x;    ///< [O·P]: g and g − 1 repeated over the positions (batch-wide path only)
      bool dropped = false;
      std::uint64_t stream = 0;
    };
    std::vector<Slot> slots;
    std::vector<int> ran;
    Conv2dGeometry geo;  ///< the base's geometry when the context was made
    buffer<T> cols, dcols, g;  ///< one image: [C·kh·kw, Ho·Wo], [C·kh·kw, Ho·Wo], [r_max, Ho·Wo]
    // DoRA only (empty without DoRA adapters):
    buffer<T> work0, work1;  ///< [batch, O·P]: the scaled LoRA term in forward; running output gradients in backward
    buffer<T> wblock;        ///< a block of W + s·B·A for the norm
    buffer<T> vec;           ///< [O·P]: the magnitude gradient before the per-channel sum
    buffer<T> base_grad;     ///< [batch, O·P]: (Π g) ⊙ dy, the gradient of the base output (see base_output_grad)
    buffer<T> prod;          ///< [O]: Π g over the DoRA slots without dropout
    bool base_grad_given = false;
    bool folded = false;  ///< the last forward added s·B·A of every slot that ran to the base's product (image_fold)
  };

  std::size_t size() const noexcept { return adapters_.size(); }
  adapter_type& at(int slot) { return adapters_[std::size_t(slot)]; }
  const adapter_type& at(int slot) const { return adapters_[std::size_t(slot)]; }

  int add(const base_type& base, const LoraConfig& cfg, Generator& gen, std::string_view name) {
    cfg.validate();
    if (cfg.fan_in_fan_out) throw ConfigError(detail::cat("LoRA adapter '", name, "': fan_in_fan_out does not apply to a Conv2d layer"));
    if (cfg.lora_bias && !base.has_bias()) throw ConfigError(detail::cat("LoRA adapter '", name, "': lora_bias needs a base layer with a bias"));
    const auto& geo = base.geometry();
    adapter_type a = adapter_type::shaped(cfg, geo.patch(), geo.out_channels);
    const double bound_a = 1.0 / std::sqrt(double(a.in));  // kaiming-uniform(a=√5): fan_in = C·kh·kw
    switch (cfg.init_lora_weights) {
      case LoraInit::standard: Backend::random_uniform(gen, flat(a.a), -bound_a, bound_a); break;
      case LoraInit::gaussian: Backend::random_normal(gen, flat(a.a), 0.0, 1.0 / double(a.r)); break;
      case LoraInit::off: {
        const double bound_b = 1.0 / std::sqrt(double(a.r));  // nn.Conv2d default of the 1×1 conv r → O
        Backend::random_uniform(gen, flat(a.a), -bound_a, bound_a);
        Backend::random_uniform(gen, flat(a.b), -bound_b, bound_b);
        if (cfg.lora_bias) Backend::random_uniform(gen, flat(a.bias), -bound_b, bound_b);
        break;
      }
      case LoraInit::zeros: break;
    }
    if (cfg.use_dora) Ops::init_magnitude(a, false, base.weight());  // m = ‖W + s·B·A‖ per output channel
    adapters_.push_back(std::move(a));
    if (cfg.use_dora) bind_base(const_cast<base_type&>(base));
    return int(adapters_.size() - 1);
  }
  void remove(int slot) { adapters_.erase(adapters_.begin() + slot); }

  /// DoRA reads the base weight and bias; Adapted binds its base before every forward and backward.
  void bind_base(base_type& base) noexcept {
    base_ = &base;
    self_ = this;
  }

  void make_context(Context& ctx, Scratch& scratch, Index max_batch, const base_type& base) const {
    ctx.slots.resize(adapters_.size());
    ctx.ran.reserve(adapters_.size());
    ctx.geo = base.geometry();
    const auto& geo = ctx.geo;
    const Index k = geo.patch(), p = geo.positions(), o = geo.out_channels;
    Index r_max = 0;
    bool any_dora = false;
    for (std::size_t i = 0; i < adapters_.size(); ++i) {
      const auto& a = adapters_[i];
      auto& s = ctx.slots[i];
      r_max = std::max<Index>(r_max, a.r);
      s.t.resize(std::size_t(max_batch * a.r * p));
      if (a.config.lora_dropout > 0) {
        s.xd.resize(std::size_t(max_batch * geo.in_size()));
        s.dxd.resize(std::size_t(max_batch * geo.in_size()));
      }
      scratch.reserve_gemm(a.r, p, k);
      scratch.reserve_gemm(o, p, a.r);
      scratch.reserve_gemm(a.r, p, o);
      scratch.reserve_gemm(o, a.r, p);
      scratch.reserve_gemm(a.r, k, p);
      scratch.reserve_gemm(k, p, a.r);
      scratch.reserve_gemm(o, k, a.r);  // image_fold: W += s·B·A
      if (a.dora()) {
        any_dora = true;
        s.q.resize(std::size_t(max_batch * o * p));
        for (auto* v : {&s.norm, &s.scale, &s.scale_m1}) v->resize(std::size_t(o));
        s.scale_x.resize(std::size_t(o * p));
        s.scale_m1_x.resize(std::size_t(o * p));
        Ops::reserve_norm(a, false, scratch);
        scratch.reserve_gemm(o, p, k);  // conv(xd, W)
        scratch.reserve_gemm(k, p, o);  // Wᵀ · d_n
        scratch.reserve_gemm(o, k, p);  // dW
      }
    }
    if (!adapters_.empty()) {
      ctx.cols.resize(std::size_t(k * p));
      ctx.dcols.resize(std::size_t(k * p));
      ctx.g.resize(std::size_t(r_max * p));
    }
    if (any_dora) {
      ctx.work0.resize(std::size_t(max_batch * o * p));
      ctx.work1.resize(std::size_t(max_batch * o * p));
      ctx.wblock.resize(std::size_t(std::min(Ops::norm_block_rows, o) * k));
      ctx.vec.resize(std::size_t(o * p));
      ctx.base_grad.resize(std::size_t(max_batch * o * p));
      ctx.prod.resize(std::size_t(o));
    }
  }

  /// As LoRA's Linear bank: the gradient of the base output, (Π g) ⊙ dy, for the base's own backward
  /// (saves the correction through W); dy unchanged when no DoRA slot without dropout ran, or when the
  /// base is trainable with a bias.
  ConstMatrixView<T> base_output_grad(Context& ctx, ConstMatrixView<T> dy) {
    ctx.base_grad_given = false;
    int scaled = 0;
    for (int slot : ctx.ran) scaled += adapters_[std::size_t(slot)].dora() && !ctx.slots[std::size_t(slot)].dropped;
    if (scaled == 0) return dy;
    const base_type& base = bound_base("backward");
    if (base.requires_grad() && base.has_bias()) return dy;
    const Index o = ctx.geo.out_channels, p = ctx.geo.positions();
    auto prod = ctx.prod.view(1, o);
    Backend::fill(prod, T(1));
    for (int slot : ctx.ran)
      if (adapters_[std::size_t(slot)].dora() && !ctx.slots[std::size_t(slot)].dropped)
        Backend::mul(ConstMatrixView<T>(ctx.slots[std::size_t(slot)].scale.view(1, o)), prod);
    auto g = ctx.base_grad.view(dy.rows, dy.cols);
    for (Index n = 0; n < dy.rows; ++n) Backend::add_scaled_rows(base_type::image(dy, n, o, p), prod.data, T(0), base_type::image(g, n, o, p));
    ctx.base_grad_given = true;
    return g;
  }

  /// y += Σ_{slot in active} s · B·A·cols(dropout(x)) (+ s·b_B), in order; DoRA slots as in the file comment.
  void forward(Context& ctx, Scratch& scratch, const std::vector<int>& active, ConstMatrixView<T> x, MatrixView<T> y, bool dropout_on,
               std::uint64_t seed, std::uint64_t stream0) const {
    ctx.ran.assign(active.begin(), active.end());
    if (active.empty()) return;  // no LoRA adapter on this layer (another kind's only): the buffers are empty
    const auto& geo = ctx.geo;
    const Index k = geo.patch(), p = geo.positions(), o = geo.out_channels;
    auto cols = ctx.cols.view(k, p);
    for (int slot : active) {
      const auto& a = adapters_[std::size_t(slot)];
      auto& s = ctx.slots[std::size_t(slot)];
      ConstMatrixView<T> xin = x;
      s.dropped = dropout_on && a.config.lora_dropout > 0;
      if (s.dropped) {
        s.stream = stream0 + std::uint64_t(slot);
        auto xd = s.xd.view(x.rows, x.cols);
        Backend::dropout(x, xd, a.config.lora_dropout, seed, s.stream);
        xin = xd;
      }
      // plain LoRA adds s·B·t straight into y; DoRA collects it (and the dropout base term) first
      const base_type* base = a.dora() ? &bound_base("forward") : nullptr;
      MatrixView<T> lora = a.dora() ? ctx.work0.view(x.rows, o * p) : y;
      for (Index n = 0; n < x.rows; ++n) {
        Backend::im2col(geo, xin.data + n * xin.stride, cols);
        auto t = MatrixView<T>(s.t.data() + n * a.r * p, a.r, p);
        Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), a.A(), ConstMatrixView<T>(cols), T(0), t);
        auto ln = base_type::image(lora, n, o, p);
        Backend::template gemm<Trans::no, Trans::no>(scratch, a.scaling, a.B(), ConstMatrixView<T>(t), a.dora() ? T(0) : T(1), ln);
        if (a.config.lora_bias) Backend::add_col_vector(ln, a.bias.data(), a.scaling);
        if (a.dora() && s.dropped)  // conv(dropout(x), W), without the bias
          Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), base->weight(), ConstMatrixView<T>(cols), T(0),
                                                       base_type::image(s.q.view(x.rows, o * p), n, o, p));
      }
      if (a.dora()) dora_forward(ctx, s, scratch, a, *base, y);
    }
  }

  // ---- on the base's columns (Adapted<Conv2d, ...>: one im2col per image for the base and every slot) ----------
  // The same math as forward/backward above, image by image: a slot with dropout active makes its own columns of
  // dropout(x) in this context's buffers; a DoRA slot's terms are per image too (its gains depend on the weights
  // only), applied to the running output of image n when the slot's turn comes.

  bool image_ready(const std::vector<int>&) const { return true; }
  /// Before the base's pass over the images: the slots that run, dropout(x) for those with dropout active, and the
  /// DoRA gains.
  void image_begin(Context& ctx, Scratch& scratch, const std::vector<int>& active, ConstMatrixView<T> x, bool dropout_on, std::uint64_t seed,
                   std::uint64_t stream0) const {
    ctx.ran.assign(active.begin(), active.end());
    ctx.folded = false;
    for (int slot : active) {
      const auto& a = adapters_[std::size_t(slot)];
      auto& s = ctx.slots[std::size_t(slot)];
      s.dropped = dropout_on && a.config.lora_dropout > 0;
      if (s.dropped) {
        s.stream = stream0 + std::uint64_t(slot);
        Backend::dropout(x, s.xd.view(x.rows, x.cols), a.config.lora_dropout, seed, s.stream);
      }
      if (a.dora()) dora_gains(ctx, s, scratch, a, bound_base("forward"));
    }
  }
  /// Whether the slots that run can join the base's product as s·B·A (no DoRA, no dropout active, no lora_bias), and
  /// whether that pays: folding costs O·(C·kh·kw)·r once, running per image batch·Ho·Wo·r·(C·kh·kw + O).
  bool image_can_fold(const Context& ctx, Index batch) const {
    const Index k = ctx.geo.patch(), p = ctx.geo.positions(), o = ctx.geo.out_channels;
    if (double(batch) * double(p) * double(k + o) < double(o) * double(k)) return false;
    return std::none_of(ctx.ran.begin(), ctx.ran.end(), [&](int slot) {
      const auto& a = adapters_[std::size_t(slot)];
      return a.dora() || a.config.lora_bias || ctx.slots[std::size_t(slot)].dropped;
    });
  }
  /// w += s·B·A for every slot that runs (w: the base weight of this forward's product).
  void image_fold(Context& ctx, Scratch& scratch, MatrixView<T> w) const {
    for (int slot : ctx.ran) {
      const auto& a = adapters_[std::size_t(slot)];
      Backend::template gemm<Trans::no, Trans::no>(scratch, a.scaling, a.B(), a.A(), T(1), w);
    }
    ctx.folded = true;
  }
  /// Image n: y_n += s · B · (A · cols) (+ s·b_B) for every slot, cols the base's columns of x_n; DoRA slots as
  /// in the file comment, on image n.
  void image_forward(Context& ctx, Scratch& scratch, Index n, ConstMatrixView<T> cols, MatrixView<T> yn) const {
    if (ctx.folded) return;  // in the base's product already
    const Index o = ctx.geo.out_channels, p = ctx.geo.positions();
    for (int slot : ctx.ran) {
      const auto& a = adapters_[std::size_t(slot)];
      auto& s = ctx.slots[std::size_t(slot)];
      const auto c = slot_columns(ctx, s, n, cols);
      auto t = MatrixView<T>(s.t.data() + n * a.r * p, a.r, p);
      Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), a.A(), c, T(0), t);
      if (!a.dora()) {
        Backend::template gemm<Trans::no, Trans::no>(scratch, a.scaling, a.B(), ConstMatrixView<T>(t), T(1), yn);
        if (a.config.lora_bias) Backend::add_col_vector(yn, a.bias.data(), a.scaling);
        continue;
      }
      const base_type& base = bound_base("forward");
      auto qn = MatrixView<T>(s.q.data() + n * o * p, o, p);
      if (!s.dropped) {
        // q = s·B·t, then in one pass per channel: q += y − b (the running output minus the base bias) and
        // y = g ⊙ q + b (DoRA refuses lora_bias, as PEFT)
        Backend::template gemm<Trans::no, Trans::no>(scratch, a.scaling, a.B(), ConstMatrixView<T>(t), T(0), qn);
        const T* b = base.has_bias() ? base.bias().data : nullptr;
        Backend::rescale_rows(qn, yn, b, s.scale.data(), b);
        continue;
      }
      auto ln = MatrixView<T>(ctx.work0.data() + n * o * p, o, p);
      Backend::template gemm<Trans::no, Trans::no>(scratch, a.scaling, a.B(), ConstMatrixView<T>(t), T(0), ln);
      if (a.config.lora_bias) Backend::add_col_vector(ln, a.bias.data(), a.scaling);
      Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), base.weight(), c, T(0), qn);  // conv(dropout(x), W), no bias
      Backend::add_scaled_rows(ConstMatrixView<T>(qn), s.scale_m1.data(), T(1), yn);
      Backend::add_scaled_rows(ConstMatrixView<T>(ln), s.scale.data(), T(1), yn);
      Backend::axpby(T(1), ConstMatrixView<T>(ln), T(1), qn);
    }
  }
  /// Whether image_backward needs the base's columns (a trainable slot without dropout ran).
  bool image_needs_columns(const Context& ctx) const {
    return std::any_of(ctx.ran.begin(), ctx.ran.end(), [&](int slot) {
      return adapters_[std::size_t(slot)].requires_grad && !ctx.slots[std::size_t(slot)].dropped;
    });
  }
  /// Image n of backward, the slots last first with the running-output gradient d_n (as backward above): the
  /// parameter gradients (per `mode` on the first image processed), and the input gradient added to the base's
  /// dcols (a slot with dropout: col2im into d(dropout(x)), masked in image_end).
  void image_backward(Context& ctx, Scratch& scratch, Index n, bool first, ConstMatrixView<T> cols, ConstMatrixView<T> dyn,
                      MatrixView<T> dcols, GradMode mode) {
    const Index k = ctx.geo.patch(), p = ctx.geo.positions(), o = ctx.geo.out_channels;
    const T b = first && mode == GradMode::overwrite ? T(0) : T(1);
    if (ctx.folded) {  // the base's dcols used W + Σ s·B·A; only the parameter gradients are left (t made again here)
      for (int slot : ctx.ran) {
        auto& a = adapters_[std::size_t(slot)];
        if (!a.requires_grad) continue;
        auto t = MatrixView<T>(ctx.slots[std::size_t(slot)].t.data() + n * a.r * p, a.r, p);
        auto g = ctx.g.view(a.r, p);
        Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), a.A(), cols, T(0), t);
        Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), a.B(), dyn, T(0), g);
        Backend::template gemm<Trans::no, Trans::yes>(scratch, a.scaling, dyn, ConstMatrixView<T>(t), b, a.grad_B());
        Backend::template gemm<Trans::no, Trans::yes>(scratch, a.scaling, ConstMatrixView<T>(g), cols, b, a.grad_A());
      }
      return;
    }
    ConstMatrixView<T> d = dyn;  // gradient w.r.t. image n of the running output after the slot being processed
    MatrixView<T> d_buf;         // where d lives once a DoRA slot without dropout has scaled it
    for (auto it = ctx.ran.rbegin(); it != ctx.ran.rend(); ++it) {
      const int slot = *it;
      auto& a = adapters_[std::size_t(slot)];
      auto& s = ctx.slots[std::size_t(slot)];
      ConstMatrixView<T> dl = d;  // upstream gradient of this slot's s·B·A branch
      MatrixView<T> gd;
      if (a.dora()) {
        gd = MatrixView<T>((d_buf.data == ctx.work0.data() + n * o * p ? ctx.work1 : ctx.work0).data() + n * o * p, o, p);
        Backend::add_scaled_rows(d, s.scale.data(), T(0), gd);  // g ⊙ d
        dl = gd;
        if (a.requires_grad) {  // dm_c += Σ_p d ⊙ q / norm_c
          Backend::sum_cols_mul(d, ConstMatrixView<T>(s.q.data() + n * o * p, o, p), ctx.vec.data(), T(1), T(0));
          auto v = ctx.vec.view(1, o);
          Backend::div(ConstMatrixView<T>(v), ConstMatrixView<T>(s.norm.view(1, o)), v);
          Backend::axpby(T(1), ConstMatrixView<T>(v), b, a.grad_M());
        }
      }
      base_type* base = a.dora() ? &bound_base("backward") : nullptr;
      const bool base_term = a.dora() && s.dropped;  // (g − 1) ⊙ conv(dropout(x), W)
      const bool need_c = a.requires_grad || (base_term && base->requires_grad());
      const auto c = need_c ? slot_columns(ctx, s, n, cols) : ConstMatrixView<T>{};
      auto g = ctx.g.view(a.r, p);
      Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), a.B(), dl, T(0), g);  // g = Bᵀ dl_n
      if (a.requires_grad) {
        const auto t = ConstMatrixView<T>(s.t.data() + n * a.r * p, a.r, p);
        Backend::template gemm<Trans::no, Trans::yes>(scratch, a.scaling, dl, t, b, a.grad_B());
        Backend::template gemm<Trans::no, Trans::yes>(scratch, a.scaling, ConstMatrixView<T>(g), c, b, a.grad_A());
        if (a.config.lora_bias) Backend::sum_cols(dl, a.grad_bias.data(), a.scaling, b);
      }
      if (!s.dropped) {
        if (!dcols.empty()) Backend::template gemm<Trans::yes, Trans::no>(scratch, a.scaling, a.A(), ConstMatrixView<T>(g), T(1), dcols);
      } else {
        auto own = ctx.dcols.view(k, p);
        if (!dcols.empty()) Backend::template gemm<Trans::yes, Trans::no>(scratch, a.scaling, a.A(), ConstMatrixView<T>(g), T(0), own);
        if (base_term) {  // into d(dropout(x)) and, for a trainable base, dW
          Backend::add_scaled_rows(d, s.scale_m1.data(), T(0), gd);
          if (!dcols.empty()) Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), ConstMatrixView<T>(base->weight()), ConstMatrixView<T>(gd), T(1), own);
          if (base->requires_grad()) Backend::template gemm<Trans::no, Trans::yes>(scratch, T(1), ConstMatrixView<T>(gd), c, T(1), base->weight_grad());
        }
        if (!dcols.empty()) Backend::col2im(ctx.geo, ConstMatrixView<T>(own), T(0), s.dxd.data() + n * ctx.geo.in_size());
      }
      if (a.dora() && !s.dropped) {  // the gradient reaching the earlier output is g ⊙ d
        d = gd;
        d_buf = gd;
      }
    }
    if (d_buf.data && !ctx.base_grad_given) {
      // the base fed an output that DoRA rescaled: add (d − dy_n) through W (the bias is not rescaled)
      base_type& base = bound_base("backward");
      Backend::axpby(T(-1), dyn, T(1), d_buf);
      if (!dcols.empty()) Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), ConstMatrixView<T>(base.weight()), ConstMatrixView<T>(d_buf), T(1), dcols);
      if (base.requires_grad()) Backend::template gemm<Trans::no, Trans::yes>(scratch, T(1), ConstMatrixView<T>(d_buf), cols, T(1), base.weight_grad());
    }
  }
  /// After the base's pass: dx += dropout mask ⊙ d(dropout(x)) for the slots with dropout.
  void image_end(Context& ctx, Scratch&, MatrixView<T> dx, Index, GradMode, std::uint64_t seed) {
    if (dx.empty()) return;
    for (int slot : ctx.ran) {
      auto& s = ctx.slots[std::size_t(slot)];
      if (!s.dropped) continue;
      auto dxd = s.dxd.view(dx.rows, dx.cols);
      Backend::dropout(ConstMatrixView<T>(dxd), dxd, adapters_[std::size_t(slot)].config.lora_dropout, seed, s.stream);  // the same mask
      Backend::axpby(T(1), ConstMatrixView<T>(dxd), T(1), dx);
    }
  }

  /// Backward of the slots that ran, last first, with the running-output gradient d (as LoRA's Linear bank).
  void backward(Context& ctx, Scratch& scratch, ConstMatrixView<T> x, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode mode, std::uint64_t seed) {
    const auto& geo = ctx.geo;
    const Index k = geo.patch(), p = geo.positions(), o = geo.out_channels, m = dy.rows;
    const T beta = mode == GradMode::accumulate ? T(1) : T(0);
    if (ctx.ran.empty()) return;
    auto cols = ctx.cols.view(k, p);
    auto dcols = ctx.dcols.view(k, p);
    ConstMatrixView<T> d = dy;  // gradient w.r.t. the running output after the slot being processed
    MatrixView<T> d_buf;        // the work buffer d lives in once a DoRA slot without dropout has scaled it
    for (auto it = ctx.ran.rbegin(); it != ctx.ran.rend(); ++it) {
      const int slot = *it;
      auto& a = adapters_[std::size_t(slot)];
      auto& s = ctx.slots[std::size_t(slot)];
      ConstMatrixView<T> dl = d;  // upstream gradient of this slot's s·B·A branch
      MatrixView<T> gd;
      if (a.dora()) {
        gd = (d_buf.data == ctx.work0.data() ? ctx.work1 : ctx.work0).view(m, o * p);
        Backend::add_scaled_cols(d, s.scale_x.data(), T(0), gd);  // g ⊙ d
        dl = gd;
        if (a.requires_grad) {  // dm_c = Σ_{n, p} d ⊙ q / norm_c
          Backend::sum_rows_mul(d, ConstMatrixView<T>(s.q.view(m, o * p)), ctx.vec.data(), T(1), T(0));
          auto per_channel = ctx.vec.view(o, p);
          Backend::sum_cols(ConstMatrixView<T>(per_channel), ctx.vec.data(), T(1), T(0));  // in place: row c reads before element c is written
          auto v = ctx.vec.view(1, o);
          Backend::div(ConstMatrixView<T>(v), ConstMatrixView<T>(s.norm.view(1, o)), v);
          Backend::axpby(T(1), ConstMatrixView<T>(v), beta, a.grad_M());
        }
      }
      auto g = ctx.g.view(a.r, p);
      ConstMatrixView<T> xin = s.dropped ? ConstMatrixView<T>(s.xd.view(x.rows, x.cols)) : x;
      MatrixView<T> dxin = s.dropped ? s.dxd.view(x.rows, x.cols) : dx;
      for (Index n = 0; n < m; ++n) {
        const auto dln = base_type::image(dl, n, o, p);
        Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), a.B(), dln, T(0), g);  // g = Bᵀ dl_n
        if (a.requires_grad) {
          const T b = n == 0 ? beta : T(1);
          const auto t = ConstMatrixView<T>(s.t.data() + n * a.r * p, a.r, p);
          Backend::template gemm<Trans::no, Trans::yes>(scratch, a.scaling, dln, t, b, a.grad_B());
          Backend::im2col(geo, xin.data + n * xin.stride, cols);
          Backend::template gemm<Trans::no, Trans::yes>(scratch, a.scaling, ConstMatrixView<T>(g), ConstMatrixView<T>(cols), b, a.grad_A());
          if (a.config.lora_bias) Backend::sum_cols(dln, a.grad_bias.data(), a.scaling, b);
        }
        if (dx.empty()) continue;
        Backend::template gemm<Trans::yes, Trans::no>(scratch, a.scaling, a.A(), ConstMatrixView<T>(g), T(0), dcols);
        Backend::col2im(geo, ConstMatrixView<T>(dcols), s.dropped ? T(0) : T(1), dxin.data + n * dxin.stride);
      }
      if (a.dora() && !s.dropped) {
        // y_k = y_{k-1} + (g − 1) ⊙ (y_{k-1} − b) + …: the gradient reaching the earlier output is g ⊙ d
        d = gd;
        d_buf = gd;
      }
      if (a.dora() && s.dropped) {
        // the base term (g − 1) ⊙ conv(dropout(x), W): into d(dropout(x)) and, for a trainable base, dW
        Backend::add_scaled_cols(d, s.scale_m1_x.data(), T(0), gd);
        base_type& base = bound_base("backward");
        conv_input_and_weight_grad(ctx, scratch, base, ConstMatrixView<T>(gd), xin, dx.empty() ? MatrixView<T>{} : dxin);
      }
      if (s.dropped && !dx.empty()) {
        Backend::dropout(ConstMatrixView<T>(dxin), dxin, a.config.lora_dropout, seed, s.stream);  // the same mask
        Backend::axpby(T(1), ConstMatrixView<T>(dxin), T(1), dx);
      }
    }
    if (d_buf.data && !ctx.base_grad_given) {
      // The base (and what ran before) fed an output that DoRA rescaled: its gradient is d, not the dy the base
      // layer's backward used. Add the difference through W (the bias is not rescaled: its gradient stays dy).
      Backend::axpby(T(-1), dy, T(1), d_buf);  // d − dy
      conv_input_and_weight_grad(ctx, scratch, bound_base("backward"), ConstMatrixView<T>(d_buf), x, dx);
    }
  }

  void apply_delta(int slot, base_type& base, T sign) {
    if (adapters_[std::size_t(slot)].dora()) bind_base(base);
    Ops::apply(adapters_, slot, false, base.weight(), base.bias(), sign, merge_counter_);
  }
  void merge_preview(int slot, Scratch& scratch, MatrixView<T> w) const { Ops::preview(adapters_, slot, false, scratch, w); }
  /// out = sign · s · B A + beta · out, [O, C·kh·kw] (the plain LoRA delta for DoRA too, as PEFT).
  void write_delta(int slot, Scratch& scratch, MatrixView<T> out, T sign, T beta) const {
    Ops::write_delta(adapters_[std::size_t(slot)], false, scratch, out, sign, beta);
  }

  /// lora_A.<name>.weight, lora_B.<name>.weight (+ lora_B.<name>.bias), and for DoRA
  /// lora_magnitude_vector.<name>.weight (PEFT's in-memory names).
  template <class F>
  void visit_parameters(int slot, std::string_view name, F&& f) {
    auto& a = adapters_[std::size_t(slot)];
    const std::string n(name);
    f(ParamRef<T>{"lora_A." + n + ".weight", a.a.data(), a.grad_a.data(), a.a.size(), a.requires_grad, Backend::host_accessible});
    f(ParamRef<T>{"lora_B." + n + ".weight", a.b.data(), a.grad_b.data(), a.b.size(), a.requires_grad, Backend::host_accessible});
    if (a.config.lora_bias) f(ParamRef<T>{"lora_B." + n + ".bias", a.bias.data(), a.grad_bias.data(), a.bias.size(), a.requires_grad, Backend::host_accessible});
    if (a.dora())
      f(ParamRef<T>{"lora_magnitude_vector." + n + ".weight", a.magnitude.data(), a.grad_magnitude.data(), a.magnitude.size(),
                    a.requires_grad, Backend::host_accessible});
  }
  void set_requires_grad(int slot, bool on) { adapters_[std::size_t(slot)].requires_grad = on; }
  void zero_grad(int slot) {
    auto& a = adapters_[std::size_t(slot)];
    a.grad_a.zero();
    a.grad_b.zero();
    a.grad_bias.zero();
    a.grad_magnitude.zero();
  }

 private:
  base_type& bound_base(const char* where) const {
    if (base_ == nullptr || self_ != this)
      throw StateError(detail::cat("LoRA (DoRA) on Conv2d ", where, ": the adapter's bank was copied or moved outside its Adapted layer"));
    return *base_;
  }

  /// The columns slot s reads for image n: the base's, or (dropout active) its own im2col of dropout(x)_n.
  ConstMatrixView<T> slot_columns(Context& ctx, typename Context::Slot& s, Index n, ConstMatrixView<T> cols) const {
    if (!s.dropped) return cols;
    auto own = ctx.cols.view(ctx.geo.patch(), ctx.geo.positions());
    Backend::im2col(ctx.geo, s.xd.data() + n * ctx.geo.in_size(), own);
    return own;
  }

  /// A DoRA slot's norm ‖W + s·B·A‖ per channel and gains g, g − 1.
  void dora_gains(Context& ctx, typename Context::Slot& s, Scratch& scratch, const adapter_type& a, const base_type& base) const {
    Ops::gains(a, false, base.weight(), scratch, ctx.wblock.data(), s.norm.data(), s.scale.data(), s.scale_m1.data());
  }
  /// The gains repeated over the positions, for the batch-wide path (forward / backward).
  void expand_gains(Context& ctx, typename Context::Slot& s) const {
    const Index o = ctx.geo.out_channels, p = ctx.geo.positions();
    for (auto [out, v] : {std::pair{&s.scale_x, &s.scale}, std::pair{&s.scale_m1_x, &s.scale_m1}}) {  // out[c, :] = v[c]
      auto e = out->view(o, p);
      Backend::fill(e, T(0));
      Backend::add_col_vector(e, v->data(), T(1));
    }
  }

  /// One DoRA slot's forward, after the loop over images left s·lora in ctx.work0 (and conv(xd, W) in q when
  /// dropped): norm, gains, q, and y += (g − 1) ⊙ base term + g ⊙ s·lora.
  void dora_forward(Context& ctx, typename Context::Slot& s, Scratch& scratch, const adapter_type& a, const base_type& base,
                    MatrixView<T> y) const {
    const Index m = y.rows, o = ctx.geo.out_channels, p = ctx.geo.positions();
    dora_gains(ctx, s, scratch, a, base);
    expand_gains(ctx, s);
    auto q = s.q.view(m, o * p);
    if (!s.dropped) {
      // PEFT passes the running result: the base output and every slot before this one, minus the base bias
      Backend::copy(ConstMatrixView<T>(y), q);
      if (base.has_bias())
        for (Index n = 0; n < m; ++n) Backend::add_col_vector(base_type::image(q, n, o, p), base.bias().data, T(-1));
    }
    const auto lora = ConstMatrixView<T>(ctx.work0.view(m, o * p));
    Backend::add_scaled_cols(ConstMatrixView<T>(q), s.scale_m1_x.data(), T(1), y);
    Backend::add_scaled_cols(lora, s.scale_x.data(), T(1), y);
    Backend::axpby(T(1), lora, T(1), q);
  }

  /// For a gradient gy [batch, O·P] of conv(x, W) (no bias): dx += conv input gradient (if dx is not
  /// empty) and dW += Σ_n gy_n cols(x_n)ᵀ (if the base is trainable).
  void conv_input_and_weight_grad(Context& ctx, Scratch& scratch, base_type& base, ConstMatrixView<T> gy, ConstMatrixView<T> x,
                                  MatrixView<T> dx) const {
    const auto& geo = ctx.geo;
    const Index k = geo.patch(), p = geo.positions(), o = geo.out_channels;
    auto cols = ctx.cols.view(k, p);
    auto dcols = ctx.dcols.view(k, p);
    for (Index n = 0; n < gy.rows; ++n) {
      const auto gn = base_type::image(gy, n, o, p);
      if (!dx.empty()) {
        Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), ConstMatrixView<T>(base.weight()), gn, T(0), dcols);
        Backend::col2im(geo, ConstMatrixView<T>(dcols), T(1), dx.data + n * dx.stride);
      }
      if (base.requires_grad()) {
        Backend::im2col(geo, x.data + n * x.stride, cols);
        Backend::template gemm<Trans::no, Trans::yes>(scratch, T(1), gn, ConstMatrixView<T>(cols), T(1), base.weight_grad());
      }
    }
  }

  std::vector<adapter_type> adapters_;
  base_type* base_ = nullptr;   ///< the adapted layer's base (DoRA); see bind_base
  const void* self_ = nullptr;  ///< this bank's address when base_ was set
  std::uint64_t merge_counter_ = 0;
};

}  // namespace peft
