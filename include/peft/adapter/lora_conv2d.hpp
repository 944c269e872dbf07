// peft++ — LoRA on Conv2d layers, as PEFT's lora.Conv2d:
//
//   A: a conv C → r with the base's kernel, stride, padding (and dilation), weight [r, C·kh·kw]
//   B: a 1×1 conv r → O, weight [O, r] (bias [O] with lora_bias)
//   y_n += s · B · (A · cols(dropout(x)_n))      ΔW = s · B A  ([O, C·kh·kw], the base kernel's layout)
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

  struct Context {
    struct Slot {
      buffer<T> t;    ///< A · cols(x_n) for every image, [batch, r·Ho·Wo]
      buffer<T> xd;   ///< dropout(x), [batch, C·H·W] (only with lora_dropout > 0)
      buffer<T> dxd;  ///< gradient w.r.t. dropout(x) (only with lora_dropout > 0)
      bool dropped = false;
      std::uint64_t stream = 0;
    };
    std::vector<Slot> slots;
    std::vector<int> ran;
    Conv2dGeometry geo;  ///< the base's geometry when the context was made
    buffer<T> cols, dcols, g;  ///< one image: [C·kh·kw, Ho·Wo], [C·kh·kw, Ho·Wo], [r_max, Ho·Wo]
  };

  std::size_t size() const noexcept { return adapters_.size(); }
  adapter_type& at(int slot) { return adapters_[std::size_t(slot)]; }
  const adapter_type& at(int slot) const { return adapters_[std::size_t(slot)]; }

  int add(const base_type& base, const LoraConfig& cfg, Generator& gen, std::string_view name) {
    cfg.validate();
    if (cfg.use_dora) throw ConfigError(detail::cat("LoRA adapter '", name, "': use_dora (DoRA) is not implemented on a Conv2d layer yet"));
    if (cfg.fan_in_fan_out) throw ConfigError(detail::cat("LoRA adapter '", name, "': fan_in_fan_out does not apply to a Conv2d layer"));
    if (cfg.lora_bias && !base.has_bias()) throw ConfigError(detail::cat("LoRA adapter '", name, "': lora_bias needs a base layer with a bias"));
    const auto& geo = base.geometry();
    adapter_type a = adapter_type::shaped(cfg, geo.patch(), geo.out_channels);
    const double bound_a = 1.0 / std::sqrt(double(a.in));  // kaiming-uniform(a=√5): fan_in = C·kh·kw
    switch (cfg.init_lora_weights) {
      case LoraInit::standard: gen.uniform(a.a.data(), a.a.size(), -bound_a, bound_a); break;
      case LoraInit::gaussian: gen.normal(a.a.data(), a.a.size(), 0.0, 1.0 / double(a.r)); break;
      case LoraInit::off: {
        const double bound_b = 1.0 / std::sqrt(double(a.r));  // nn.Conv2d default of the 1×1 conv r → O
        gen.uniform(a.a.data(), a.a.size(), -bound_a, bound_a);
        gen.uniform(a.b.data(), a.b.size(), -bound_b, bound_b);
        if (cfg.lora_bias) gen.uniform(a.bias.data(), a.bias.size(), -bound_b, bound_b);
        break;
      }
      case LoraInit::zeros: break;
    }
    adapters_.push_back(std::move(a));
    return int(adapters_.size() - 1);
  }
  void remove(int slot) { adapters_.erase(adapters_.begin() + slot); }

  void make_context(Context& ctx, Scratch& scratch, Index max_batch, const base_type& base) const {
    ctx.slots.resize(adapters_.size());
    ctx.ran.reserve(adapters_.size());
    ctx.geo = base.geometry();
    const auto& geo = ctx.geo;
    const Index k = geo.patch(), p = geo.positions(), o = geo.out_channels;
    Index r_max = 0;
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
    }
    if (!adapters_.empty()) {
      ctx.cols.resize(std::size_t(k * p));
      ctx.dcols.resize(std::size_t(k * p));
      ctx.g.resize(std::size_t(r_max * p));
    }
  }

  void forward(Context& ctx, Scratch& scratch, const std::vector<int>& active, ConstMatrixView<T> x, MatrixView<T> y, bool dropout_on,
               std::uint64_t seed, std::uint64_t stream0) const {
    ctx.ran.assign(active.begin(), active.end());
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
      for (Index n = 0; n < x.rows; ++n) {
        Backend::im2col(geo, xin.data + n * xin.stride, cols);
        auto t = MatrixView<T>(s.t.data() + n * a.r * p, a.r, p);
        Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), a.A(), ConstMatrixView<T>(cols), T(0), t);
        auto yn = base_type::image(y, n, o, p);
        Backend::template gemm<Trans::no, Trans::no>(scratch, a.scaling, a.B(), ConstMatrixView<T>(t), T(1), yn);
        if (a.config.lora_bias) Backend::add_col_vector(yn, a.bias.data(), a.scaling);
      }
    }
  }

  void backward(Context& ctx, Scratch& scratch, ConstMatrixView<T> x, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode mode, std::uint64_t seed) {
    const auto& geo = ctx.geo;
    const Index k = geo.patch(), p = geo.positions(), o = geo.out_channels;
    const T beta = mode == GradMode::accumulate ? T(1) : T(0);
    auto cols = ctx.cols.view(k, p);
    auto dcols = ctx.dcols.view(k, p);
    for (int slot : ctx.ran) {
      auto& a = adapters_[std::size_t(slot)];
      auto& s = ctx.slots[std::size_t(slot)];
      auto g = ctx.g.view(a.r, p);
      ConstMatrixView<T> xin = s.dropped ? ConstMatrixView<T>(s.xd.view(x.rows, x.cols)) : x;
      MatrixView<T> dxin = s.dropped ? s.dxd.view(x.rows, x.cols) : dx;
      for (Index n = 0; n < dy.rows; ++n) {
        const auto dyn = base_type::image(dy, n, o, p);
        Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), a.B(), dyn, T(0), g);  // g = Bᵀ dy_n
        if (a.requires_grad) {
          const T b = n == 0 ? beta : T(1);
          const auto t = ConstMatrixView<T>(s.t.data() + n * a.r * p, a.r, p);
          Backend::template gemm<Trans::no, Trans::yes>(scratch, a.scaling, dyn, t, b, a.grad_B());
          Backend::im2col(geo, xin.data + n * xin.stride, cols);
          Backend::template gemm<Trans::no, Trans::yes>(scratch, a.scaling, ConstMatrixView<T>(g), ConstMatrixView<T>(cols), b, a.grad_A());
          if (a.config.lora_bias) Backend::sum_cols(dyn, a.grad_bias.data(), a.scaling, b);
        }
        if (dx.empty()) continue;
        Backend::template gemm<Trans::yes, Trans::no>(scratch, a.scaling, a.A(), ConstMatrixView<T>(g), T(0), dcols);
        Backend::col2im(geo, ConstMatrixView<T>(dcols), s.dropped ? T(0) : T(1), dxin.data + n * dxin.stride);
      }
      if (s.dropped && !dx.empty()) {
        Backend::dropout(ConstMatrixView<T>(dxin), dxin, a.config.lora_dropout, seed, s.stream);  // the same mask
        Backend::axpby(T(1), ConstMatrixView<T>(dxin), T(1), dx);
      }
    }
  }

  void apply_delta(int slot, base_type& base, T sign) const {
    const auto& a = adapters_[std::size_t(slot)];
    Scratch scratch;
    write_delta(slot, scratch, base.weight(), sign, T(1));
    if (a.config.lora_bias) Backend::axpby(sign * a.scaling, ConstMatrixView<T>(a.bias.view(1, a.out)), T(1), base.bias());
  }
  void merge_preview(int slot, Scratch& scratch, MatrixView<T> w) const { write_delta(slot, scratch, w, T(1), T(1)); }
  /// out = sign · s · B A + beta · out, [O, C·kh·kw].
  void write_delta(int slot, Scratch& scratch, MatrixView<T> out, T sign, T beta) const {
    const auto& a = adapters_[std::size_t(slot)];
    scratch.reserve_gemm(a.out, a.in, a.r);
    Backend::template gemm<Trans::no, Trans::no>(scratch, sign * a.scaling, a.B(), a.A(), beta, out);
  }

  template <class F>
  void visit_parameters(int slot, std::string_view name, F&& f) {
    auto& a = adapters_[std::size_t(slot)];
    const std::string n(name);
    f(ParamRef<T>{"lora_A." + n + ".weight", a.a.data(), a.grad_a.data(), a.a.size(), a.requires_grad});
    f(ParamRef<T>{"lora_B." + n + ".weight", a.b.data(), a.grad_b.data(), a.b.size(), a.requires_grad});
    if (a.config.lora_bias) f(ParamRef<T>{"lora_B." + n + ".bias", a.bias.data(), a.grad_bias.data(), a.bias.size(), a.requires_grad});
  }
  void set_requires_grad(int slot, bool on) { adapters_[std::size_t(slot)].requires_grad = on; }
  void zero_grad(int slot) {
    auto& a = adapters_[std::size_t(slot)];
    a.grad_a.zero();
    a.grad_b.zero();
    a.grad_bias.zero();
  }

 private:
  std::vector<adapter_type> adapters_;
};

}  // namespace peft
