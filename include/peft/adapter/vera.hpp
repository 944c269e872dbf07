// peft++ — VeRA, vector-based random matrix adaptation (Kopiczko et al. 2024), as Hugging Face PEFT 0.21
// implements it (peft/tuners/vera/{config,layer,model}.py), on Linear layers (PEFT supports Linear and
// transformers' Conv1D only; here a Linear with WeightLayout::in_out is the Conv1D case).
//
// One pair of frozen random projections is shared by every adapted layer of a model:
//
//   vera_A: [r, max_in]      vera_B: [max_out, r]       (max over the adapted layers)
//
// and a layer with `in` inputs and `out` outputs uses the slices A_s = vera_A[:, :in], B_s = vera_B[:out, :]
// (views, no copy). Per layer and adapter the only trainable tensors are λ_b [out] and λ_d [r]:
//
//   y  = base(x) + λ_b ⊙ ( (λ_d ⊙ (dropout(x) A_sᵀ)) B_sᵀ )
//   ΔW = diag(λ_b) B_s diag(λ_d) A_s            [out, in]; transposed ([in, out]) for fan_in_fan_out
//
// The projections live in a `VeraProjections<T>` held by std::shared_ptr: every adapter that uses them
// holds a reference, none a copy. PyTorch's seeded kaiming-uniform cannot be reproduced bit for bit, so
// either draw them with peft++'s own seeded generator (same distribution, other numbers) or load PEFT's
// (`base_model.vera_A`, `base_model.vera_B` of a checkpoint written with save_projection=True).
// See docs/methods/vera.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <regex>
#include <string>
#include <string_view>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/backend/eigen_cpu.hpp"
#include "peft/grad_mode.hpp"
#include "peft/layer/linear.hpp"
#include "peft/param.hpp"
#include "peft/rng.hpp"

namespace peft {

/// PEFT's `bias` option ("none", "all", "vera_only"): which base biases are trained beside the adapter.
enum class VeraBias { none, all, vera_only };

namespace detail {
template <class T>
constexpr const char* vera_scalar_name() noexcept {
  if constexpr (std::is_same_v<T, float>) return "float";
  else if constexpr (std::is_same_v<T, double>) return "double";
  else return "another scalar type";
}

/// The scalar-independent face of VeraProjections<T, Backend>, so that one VeraConfig type can carry
/// projections of any scalar type. The bank checks the concrete type once, when an adapter is added.
class VeraProjectionsBase {
 public:
  virtual ~VeraProjectionsBase() = default;
  virtual int r() const noexcept = 0;
  virtual Index max_in() const noexcept = 0;
  virtual Index max_out() const noexcept = 0;
  virtual const char* scalar_name() const noexcept = 0;
};
}  // namespace detail

/// VeRA's shared frozen projections: vera_A [r, max_in] and vera_B [max_out, r]. Create them once per
/// model (per scalar type) and put the same pointer in the VeraConfig of every layer; adapters keep a
/// reference (shared ownership), never a copy.
template <class T, class Backend = EigenCpu>
class VeraProjections final : public detail::VeraProjectionsBase {
 public:
  template <class U>
  using buffer = typename Backend::template buffer<U>;

  /// PEFT's checkpoint keys for the projections (written when save_projection is true).
  static constexpr const char* checkpoint_key_A = "base_model.vera_A";
  static constexpr const char* checkpoint_key_B = "base_model.vera_B";

  /// The uniform bound of PEFT's `_kaiming_init` for a tensor whose second dimension is `fan_in`:
  /// √3 · gain / √fan_in with gain = √2, in PEFT's order of operations.
  static double kaiming_bound(Index fan_in) { return std::sqrt(3.0) * (std::sqrt(2.0) / std::sqrt(double(fan_in))); }

  /// peft++'s seeded init with PEFT's distribution: vera_A ~ U(±√(6/max_in)), then vera_B ~ U(±√(6/r)), from
  /// one generator seeded with `projection_prng_key`. NOT bit-identical to PEFT's (PyTorch's generator):
  /// to reproduce a PEFT model, load its projections with from_tensors().
  static std::shared_ptr<VeraProjections> random(int r, Index max_in, Index max_out, std::uint64_t projection_prng_key) {
    auto p = shaped(r, max_in, max_out, "VeraProjections::random");
    Generator gen(projection_prng_key);
    const double ba = kaiming_bound(max_in), bb = kaiming_bound(r);
    Backend::random_uniform(gen, flat(p->a_), -ba, ba);
    Backend::random_uniform(gen, flat(p->b_), -bb, bb);
    return p;
  }

  /// Projections copied from tensors, e.g. PEFT's checkpoint entries `base_model.vera_A` ([r, max_in])
  /// and `base_model.vera_B` ([max_out, r]). Any scalar type converts (a float checkpoint for a double
  /// model). ShapeError when a view is empty or the ranks disagree.
  template <class U>
  static std::shared_ptr<VeraProjections> from_tensors(MatrixView<const U> vera_A, MatrixView<const U> vera_B) {
    check_pair(vera_A, vera_B, "VeraProjections::from_tensors");
    auto p = shaped(int(vera_A.rows), vera_A.cols, vera_B.rows, "VeraProjections::from_tensors");
    p->assign(vera_A, vera_B);
    return p;
  }
  static std::shared_ptr<VeraProjections> from_tensors(ConstMatrixView<T> vera_A, ConstMatrixView<T> vera_B) {
    return from_tensors<T>(vera_A, vera_B);
  }

  /// Overwrites the projections in place (every adapter that shares them sees the new values), as
  /// loading a PEFT state dict into a model does. The shapes must be the current ones. Do not load while
  /// an adapter using them is merged: its unmerge would subtract a different ΔW.
  template <class U>
  void load(MatrixView<const U> vera_A, MatrixView<const U> vera_B) {
    check_pair(vera_A, vera_B, "VeraProjections::load");
    require_shape(vera_A, r_, max_in_, checkpoint_key_A);
    require_shape(vera_B, max_out_, r_, checkpoint_key_B);
    assign(vera_A, vera_B);
  }
  void load(ConstMatrixView<T> vera_A, ConstMatrixView<T> vera_B) { load<T>(vera_A, vera_B); }

  int r() const noexcept override { return r_; }
  Index max_in() const noexcept override { return max_in_; }
  Index max_out() const noexcept override { return max_out_; }
  const char* scalar_name() const noexcept override { return detail::vera_scalar_name<T>(); }

  /// vera_A [r, max_in] and vera_B [max_out, r].
  ConstMatrixView<T> A() const { return a_.view(r_, max_in_); }
  ConstMatrixView<T> B() const { return b_.view(max_out_, r_); }
  /// The slices a layer uses (PEFT's vera_A[:, :in] and vera_B[:out, :]): views into the shared storage.
  ConstMatrixView<T> A_sliced(Index in) const { return ConstMatrixView<T>(a_.data(), r_, in, max_in_); }
  ConstMatrixView<T> B_sliced(Index out) const { return B().row_block(0, out); }

 private:
  struct Tag {};

 public:
  explicit VeraProjections(Tag) {}  // use random() or from_tensors()

 private:
  static std::shared_ptr<VeraProjections> shaped(int r, Index max_in, Index max_out, const char* where) {
    if (r <= 0) throw ConfigError(detail::cat(where, ": r must be a positive integer, got ", r));
    if (max_in <= 0 || max_out <= 0)
      throw ShapeError(detail::cat(where, ": the largest in and out features must be positive, got max_in = ", max_in, ", max_out = ", max_out));
    auto p = std::make_shared<VeraProjections>(Tag{});
    p->r_ = r;
    p->max_in_ = max_in;
    p->max_out_ = max_out;
    p->a_.resize(std::size_t(r * max_in));
    p->b_.resize(std::size_t(max_out * r));
    return p;
  }
  template <class U>
  static void check_pair(MatrixView<const U> a, MatrixView<const U> b, const char* where) {
    if (a.empty()) throw ShapeError(detail::cat(where, ": vera_A is empty ([", a.rows, ", ", a.cols, "]); expected [r, max_in]"));
    if (b.empty()) throw ShapeError(detail::cat(where, ": vera_B is empty ([", b.rows, ", ", b.cols, "]); expected [max_out, r]"));
    if (a.rows != b.cols)
      throw ShapeError(detail::cat(where, ": vera_A is [", a.rows, ", ", a.cols, "] and vera_B is [", b.rows, ", ", b.cols,
                                   "]; vera_A's rows and vera_B's columns are the rank r and must be equal"));
  }
  /// a_ = a, b_ = b (host tensors of any scalar type; converted on the host, then uploaded).
  template <class U>
  void assign(MatrixView<const U> a, MatrixView<const U> b) {
    const auto put = [](MatrixView<const U> src, MatrixView<T> dst) {
      std::vector<T> host(std::size_t(src.size()));
      for (Index i = 0; i < src.rows; ++i)
        for (Index j = 0; j < src.cols; ++j) host[std::size_t(i * src.cols + j)] = T(src(i, j));
      Backend::template upload<T>(ConstMatrixView<T>(host.data(), src.rows, src.cols), dst);
    };
    put(a, MatrixView<T>(a_.data(), a.rows, a.cols, max_in_));
    put(b, MatrixView<T>(b_.data(), b.rows, b.cols, r_));
  }

  int r_ = 0;
  Index max_in_ = 0, max_out_ = 0;
  buffer<T> a_, b_;
};

/// VeRA's configuration with PEFT's names and defaults (`VeraConfig`), plus the projections to use.
struct VeraConfig {
  int r = 256;
  /// PEFT's `target_modules` (list form): a module path matches when it equals an entry or ends with
  /// "." + entry. peft++ layers get adapters by add_adapter, so this only feeds `targets()` (and tools that
  /// size the projections over a model); empty means "every layer given an adapter".
  std::vector<std::string> target_modules;
  /// PEFT's `target_modules` (string form): a regex that must match the whole module path.
  std::optional<std::string> target_regex;
  /// Seed of peft++'s own projection init (VeraProjections::random). The numbers differ from PEFT's
  /// (PyTorch's generator), so a PEFT model is reproduced by loading its saved projections.
  std::uint64_t projection_prng_key = 0;
  /// Whether checkpoints carry base_model.vera_A / vera_B. Always keep true for checkpoints meant for
  /// PEFT or from PEFT: without them the projections cannot be rebuilt outside PyTorch.
  bool save_projection = true;
  double vera_dropout = 0.0;
  /// Initial value of every λ_d entry (default init).
  double d_initial = 0.1;
  bool fan_in_fan_out = false;
  /// Only VeraBias::none is supported (training base biases is full fine-tuning of the base layer here).
  VeraBias bias = VeraBias::none;
  /// true (default): λ_b = 0, λ_d = d_initial (the identity); false: λ_b = 1, λ_d ~ N(0, 1) (PEFT's).
  bool init_weights = true;
  /// The shared projections: VeraProjections<T, Backend> of the layer's scalar type and backend, with
  /// rank r, max_in ≥ the layer's in_features and max_out ≥ its out_features. Required.
  std::shared_ptr<const detail::VeraProjectionsBase> projections;

  /// PEFT's target matching for the module at `path`.
  bool targets(std::string_view path) const {
    const std::string p(path);
    if (target_regex) return std::regex_match(p, std::regex(*target_regex));
    if (target_modules.empty()) return true;
    for (const auto& m : target_modules)
      if (p == m || (p.size() > m.size() && p.compare(p.size() - m.size(), m.size(), m) == 0 && p[p.size() - m.size() - 1] == '.'))
        return true;
    return false;
  }
  VeraConfig for_module(std::string_view) const { return *this; }

  /// Throws ConfigError naming the field for out-of-range values.
  void validate() const {
    if (r <= 0) throw ConfigError(detail::cat("VeraConfig: r should be a positive integer value but the value passed is ", r));
    if (!(vera_dropout >= 0.0 && vera_dropout < 1.0)) throw ConfigError(detail::cat("VeraConfig: vera_dropout must be in [0, 1), got ", vera_dropout));
    if (!std::isfinite(d_initial)) throw ConfigError(detail::cat("VeraConfig: d_initial must be finite, got ", d_initial));
    if (bias != VeraBias::none)
      throw ConfigError("VeraConfig: bias = 'all' / 'vera_only' (training base-layer biases) is not supported; use bias = none, "
                        "or base().set_requires_grad(true) to train the whole base layer");
    if (!projections)
      throw ConfigError("VeraConfig: projections is not set; create the shared projections once per model, e.g. "
                        "VeraProjections<float>::random(r, max_in, max_out, projection_prng_key) or ::from_tensors(vera_A, vera_B)");
  }
};

/// One VeRA adapter on one Linear layer: λ_b, λ_d, their gradients and a reference to the shared projections.
template <class T, class Backend>
struct VeraAdapter {
  template <class U>
  using buffer = typename Backend::template buffer<U>;

  VeraConfig config;
  int r = 0;
  Index in = 0, out = 0;
  std::shared_ptr<const VeraProjections<T, Backend>> projections;
  buffer<T> lambda_b, lambda_d;            ///< [out], [r]
  buffer<T> grad_lambda_b, grad_lambda_d;  ///< same shapes
  bool requires_grad = false;

  MatrixView<T> vera_lambda_b() { return lambda_b.view(1, out); }
  MatrixView<T> vera_lambda_d() { return lambda_d.view(1, r); }
  ConstMatrixView<T> vera_lambda_b() const { return lambda_b.view(1, out); }
  ConstMatrixView<T> vera_lambda_d() const { return lambda_d.view(1, r); }
  MatrixView<T> grad_vera_lambda_b() { return grad_lambda_b.view(1, out); }
  MatrixView<T> grad_vera_lambda_d() { return grad_lambda_d.view(1, r); }
  /// The slices of the shared projections this layer uses: A_s [r, in], B_s [out, r] (views, strided A).
  ConstMatrixView<T> A() const { return projections->A_sliced(in); }
  ConstMatrixView<T> B() const { return projections->B_sliced(out); }
};

template <class Base>
class VeraBank;

/// The VeRA adapter kind: `peft::Adapted<peft::Linear<float>, peft::Vera>` (or beside other kinds).
struct Vera {
  using config_type = VeraConfig;
  static constexpr const char* name = "vera";
  template <class Base>
  using bank = VeraBank<Base>;
};

/// VeRA adapters of one Linear layer, one slot per named adapter. An *additive* bank driven by Adapted.
template <class T, class Backend>
class VeraBank<Linear<T, Backend>> {
 public:
  using base_type = Linear<T, Backend>;
  using adapter_type = VeraAdapter<T, Backend>;
  using projections_type = VeraProjections<T, Backend>;
  using Scratch = typename Backend::template GemmScratch<T>;
  template <class U>
  using buffer = typename Backend::template buffer<U>;
  static constexpr std::uint64_t stream_tag = 0x56655241;  // "VeRA": dropout streams disjoint from LoRA's

  struct Context {
    struct Slot {
      buffer<T> t;    ///< dropout(x) A_sᵀ, [batch, r]
      buffer<T> u;    ///< λ_d ⊙ t, [batch, r]
      buffer<T> g;    ///< dy diag(λ_b) B_s, [batch, r] (backward)
      buffer<T> xd;   ///< dropout(x) [batch, in] (only with vera_dropout > 0)
      buffer<T> dxd;  ///< its gradient (only with vera_dropout > 0)
      bool dropped = false;
      std::uint64_t stream = 0;
    };
    std::vector<Slot> slots;
    std::vector<int> ran;  ///< slots that ran in the last forward (capacity = slots.size())
    buffer<T> bl;          ///< diag(λ_b) B_s, [out, r_max]
    buffer<T> p;           ///< dyᵀ u ⊙ B_s, [out, r_max] (λ_b's gradient, reduced over r)
  };

  std::size_t size() const noexcept { return adapters_.size(); }
  adapter_type& at(int slot) { return adapters_[std::size_t(slot)]; }
  const adapter_type& at(int slot) const { return adapters_[std::size_t(slot)]; }

  int add(const base_type& base, const VeraConfig& cfg, Generator& gen, std::string_view name) {
    cfg.validate();
    if (cfg.fan_in_fan_out != (base.layout() == WeightLayout::in_out))
      throw ConfigError(detail::cat("VeRA adapter '", name, "': fan_in_fan_out = ", cfg.fan_in_fan_out ? "true" : "false",
                                    " does not match the base weight layout (", base.layout() == WeightLayout::in_out ? "[in, out]" : "[out, in]",
                                    "); PEFT sets fan_in_fan_out = true exactly for Conv1D-style [in, out] weights"));
    auto proj = std::dynamic_pointer_cast<const projections_type>(cfg.projections);
    if (!proj)
      throw ConfigError(detail::cat("VeRA adapter '", name, "': the projections hold ", cfg.projections->scalar_name(),
                                    " values (or another backend) but the layer computes in ",
                                    detail::vera_scalar_name<T>(), "; make VeraProjections of the layer's scalar type"));
    const Index in = base.in_features(), out = base.out_features();
    // PEFT's VeraLayer.update_layer checks, with its wording
    const char* tmpl = " or greater is required; the shared projections are smaller than this layer (size them with the largest in/out features of the adapted layers)";
    if (proj->max_in() < in)
      throw ShapeError(detail::cat("VeRA adapter '", name, "': vera_A has a size of ", proj->max_in(), " but ", in, tmpl));
    if (proj->max_out() < out)
      throw ShapeError(detail::cat("VeRA adapter '", name, "': vera_B has a size of ", proj->max_out(), " but ", out, tmpl));
    if (proj->r() != cfg.r)
      throw ShapeError(detail::cat("VeRA adapter '", name, "': the projections have rank ", proj->r(), " but the config has r = ", cfg.r,
                                   "; vera_A is [r, max_in] and vera_B [max_out, r] with the adapter's r (as in PEFT)"));
    adapter_type a;
    a.config = cfg;
    a.r = cfg.r;
    a.in = in;
    a.out = out;
    a.projections = std::move(proj);
    a.lambda_b.resize(std::size_t(out));
    a.lambda_d.resize(std::size_t(a.r));
    a.grad_lambda_b.resize(std::size_t(out));
    a.grad_lambda_d.resize(std::size_t(a.r));
    if (cfg.init_weights) {  // PEFT's reset_vera_parameters: λ_d = d_initial, λ_b = 0
      Backend::fill(flat(a.lambda_d), T(cfg.d_initial));
    } else {  // PEFT's update_layer without reset: λ_b = 1, λ_d ~ N(0, 1)
      Backend::fill(flat(a.lambda_b), T(1));
      Backend::random_normal(gen, flat(a.lambda_d), 0.0, 1.0);
    }
    adapters_.push_back(std::move(a));
    return int(adapters_.size() - 1);
  }
  void remove(int slot) { adapters_.erase(adapters_.begin() + slot); }

  void make_context(Context& ctx, Scratch& scratch, Index max_batch) const {
    ctx.slots.resize(adapters_.size());
    ctx.ran.reserve(adapters_.size());
    Index out = 0, r_max = 0;
    for (std::size_t i = 0; i < adapters_.size(); ++i) {
      const auto& a = adapters_[i];
      auto& s = ctx.slots[i];
      for (auto* b : {&s.t, &s.u, &s.g}) b->resize(std::size_t(max_batch * a.r));
      if (a.config.vera_dropout > 0) {
        s.xd.resize(std::size_t(max_batch * a.in));
        s.dxd.resize(std::size_t(max_batch * a.in));
      }
      scratch.reserve_gemm(max_batch, a.r, a.in);   // t = xd A_sᵀ
      scratch.reserve_gemm(max_batch, a.out, a.r);  // y += u (λ_b B_s)ᵀ
      scratch.reserve_gemm(max_batch, a.r, a.out);  // g = dy (λ_b B_s)
      scratch.reserve_gemm(a.out, a.r, max_batch);  // dyᵀ u
      scratch.reserve_gemm(max_batch, a.in, a.r);   // dx += (λ_d ⊙ g) A_s
      out = a.out;
      r_max = std::max<Index>(r_max, a.r);
    }
    ctx.bl.resize(std::size_t(out * r_max));
    ctx.p.resize(std::size_t(out * r_max));
  }

  /// y += Σ_{slot in active} λ_b ⊙ ((λ_d ⊙ (dropout(x) A_sᵀ)) B_sᵀ), computed as u (diag(λ_b) B_s)ᵀ.
  void forward(Context& ctx, Scratch& scratch, const std::vector<int>& active, ConstMatrixView<T> x, MatrixView<T> y, bool dropout_on,
               std::uint64_t seed, std::uint64_t stream0) const {
    ctx.ran.assign(active.begin(), active.end());
    const Index m = x.rows;
    for (int slot : active) {
      const auto& a = adapters_[std::size_t(slot)];
      auto& s = ctx.slots[std::size_t(slot)];
      ConstMatrixView<T> xin = x;
      s.dropped = dropout_on && a.config.vera_dropout > 0;
      if (s.dropped) {
        s.stream = stream0 + (stream_tag << 32) + std::uint64_t(slot);
        auto xd = s.xd.view(m, a.in);
        Backend::dropout(x, xd, a.config.vera_dropout, seed, s.stream);
        xin = xd;
      }
      auto t = s.t.view(m, a.r);
      auto u = s.u.view(m, a.r);
      Backend::template gemm<Trans::no, Trans::yes>(scratch, T(1), xin, a.A(), T(0), t);
      Backend::add_scaled_cols(ConstMatrixView<T>(t), a.lambda_d.data(), T(0), u);
      auto bl = scaled_b(ctx, a);
      Backend::template gemm<Trans::no, Trans::yes>(scratch, T(1), ConstMatrixView<T>(u), ConstMatrixView<T>(bl), T(1), y);
    }
  }

  /// Backward of the slots that ran: g = dy diag(λ_b) B_s; dλ_d = Σ_rows g ⊙ t; dλ_b[o] = Σ_k (dyᵀ u)[o, k] B_s[o, k];
  /// dx += (λ_d ⊙ g) A_s (through the dropout mask). The projections get no gradient.
  void backward(Context& ctx, Scratch& scratch, ConstMatrixView<T>, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode mode, std::uint64_t seed) {
    const Index m = dy.rows;
    const T beta = mode == GradMode::accumulate ? T(1) : T(0);
    for (int slot : ctx.ran) {
      auto& a = adapters_[std::size_t(slot)];
      auto& s = ctx.slots[std::size_t(slot)];
      auto g = s.g.view(m, a.r);
      auto bl = scaled_b(ctx, a);
      Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), dy, ConstMatrixView<T>(bl), T(0), g);
      if (a.requires_grad) {
        Backend::sum_rows_mul(ConstMatrixView<T>(g), ConstMatrixView<T>(s.t.view(m, a.r)), a.grad_lambda_d.data(), T(1), beta);
        auto p = ctx.p.view(a.out, a.r);
        Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), dy, ConstMatrixView<T>(s.u.view(m, a.r)), T(0), p);
        Backend::mul(a.B(), p);
        Backend::sum_cols(ConstMatrixView<T>(p), a.grad_lambda_b.data(), T(1), beta);
      }
      if (dx.empty()) continue;
      Backend::scale_cols(g, a.lambda_d.data());
      if (!s.dropped) {
        Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), ConstMatrixView<T>(g), a.A(), T(1), dx);
      } else {
        auto dxd = s.dxd.view(m, a.in);
        Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), ConstMatrixView<T>(g), a.A(), T(0), dxd);
        Backend::dropout(ConstMatrixView<T>(dxd), dxd, a.config.vera_dropout, seed, s.stream);  // the same mask, recomputed
        Backend::axpby(T(1), ConstMatrixView<T>(dxd), T(1), dx);
      }
    }
  }

  /// W ± ΔW in the base layout; the bias is unchanged (as in PEFT).
  void apply_delta(int slot, base_type& base, T sign) const {
    Scratch scratch;
    write_delta(slot, scratch, base.weight(), sign, T(1));
  }
  void merge_preview(int slot, Scratch& scratch, MatrixView<T> w) const { write_delta(slot, scratch, w, T(1), T(1)); }

  /// out = sign · ΔW + beta · out, ΔW = diag(λ_b) B_s diag(λ_d) A_s ([out, in], or [in, out] for
  /// fan_in_fan_out). Allocates one [out, r] temporary (merge time, not the hot path).
  void write_delta(int slot, Scratch& scratch, MatrixView<T> out, T sign, T beta) const {
    const auto& a = adapters_[std::size_t(slot)];
    const bool t = a.config.fan_in_fan_out;
    require_shape(out, t ? a.in : a.out, t ? a.out : a.in, "VeRA write_delta: out");
    buffer<T> tmp(std::size_t(a.out * a.r));
    auto bl = tmp.view(a.out, a.r);
    Backend::copy(a.B(), bl);
    Backend::scale_rows(bl, a.lambda_b.data());
    Backend::scale_cols(bl, a.lambda_d.data());
    if (!t) {
      scratch.reserve_gemm(a.out, a.in, a.r);
      Backend::template gemm<Trans::no, Trans::no>(scratch, sign, ConstMatrixView<T>(bl), a.A(), beta, out);
    } else {
      scratch.reserve_gemm(a.in, a.out, a.r);
      Backend::template gemm<Trans::yes, Trans::yes>(scratch, sign, a.A(), ConstMatrixView<T>(bl), beta, out);
    }
  }

  /// Visits vera_lambda_b.<name> and vera_lambda_d.<name> (PEFT's names; bare Parameters, no ".weight").
  /// The projections are frozen buffers shared by the model, not parameters of the layer (as in PEFT).
  template <class F>
  void visit_parameters(int slot, std::string_view name, F&& f) {
    auto& a = adapters_[std::size_t(slot)];
    const std::string n(name);
    f(ParamRef<T>{"vera_lambda_b." + n, a.lambda_b.data(), a.grad_lambda_b.data(), a.lambda_b.size(), a.requires_grad, Backend::host_accessible});
    f(ParamRef<T>{"vera_lambda_d." + n, a.lambda_d.data(), a.grad_lambda_d.data(), a.lambda_d.size(), a.requires_grad, Backend::host_accessible});
  }
  void set_requires_grad(int slot, bool on) { adapters_[std::size_t(slot)].requires_grad = on; }
  void zero_grad(int slot) {
    auto& a = adapters_[std::size_t(slot)];
    a.grad_lambda_b.zero();
    a.grad_lambda_d.zero();
  }

 private:
  /// ctx.bl ← diag(λ_b) B_s ([out, r]).
  static MatrixView<T> scaled_b(Context& ctx, const adapter_type& a) {
    auto bl = ctx.bl.view(a.out, a.r);
    Backend::copy(a.B(), bl);
    Backend::scale_rows(bl, a.lambda_b.data());
    return bl;
  }

  std::vector<adapter_type> adapters_;
};

/// The VeRA adapter `name` of an adapted layer (λ_b, λ_d, their gradients, the projections).
template <class Layer>
auto& vera_adapter(Layer& layer, const std::string& name) {
  return layer.template adapter<Vera>(name);
}

}  // namespace peft
