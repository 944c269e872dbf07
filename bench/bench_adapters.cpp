// peft++ — every weight adapter against the same math written by hand, and against the frozen base layer
// alone, on a Linear layer and on a Conv2d layer of the size of a diffusion UNet block.
//
//   BM_<Layer>_<Kind>_<Pass>   three legs timed in every iteration, in rotating order:
//       peft      Adapted<Base, Kind>::forward (+ backward)
//       hand      the same math by hand with Eigen (below), buffers preallocated
//       base      the frozen base layer alone through peft++
//   counters: peft_ms, hand_ms, base_ms (medians over the iterations), peft_over_hand and peft_over_base
//   (medians of the per-iteration ratios), max_rel_diff (see below)
//   Layer: Linear (M = 512 tokens, D = 1024 in = out) or Conv (N = 1, 320 → 320 channels, 64×64, 3×3, pad 1)
//   Kind:  lora, dora, loha, lokr, ia3, vera, adalora (Linear); lora, dora, loha, lokr, ia3 (Conv)
//   Pass:  Fwd (forward) or FwdBwd (forward + backward: dx and the adapter's parameter gradients; the base is
//          frozen, as in PEFT training)
// Rank 16 for every low-rank method (LoKr: PEFT's factorisation of 1024 / 320 with r = 16).
//
// The hand-written code is what a careful user writes for PEFT's formulas with Eigen: row-major maps,
// .noalias() products, buffers made once, the im2col columns of an image computed once per pass and reused
// by the base and the adapter. It computes exactly what PEFT computes (LoHa and LoKr materialise ΔW and run
// it as a second product, as PEFT does). Counter `max_rel_diff`: the largest |peft − hand| over the forward
// output relative to its largest |value|, so a wrong hand-written version shows.
//
// bench/bench_adapters_table.py turns the JSON output into the table of docs/benchmarks.md (medians over
// the repetitions of each counter).
//
// Run single-threaded:
//   OPENBLAS_NUM_THREADS=1 bench_adapters --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//       --benchmark_out=adapters.json --benchmark_out_format=json
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "peft/peft.hpp"

namespace {

using peft::Index;
using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Map = Eigen::Map<RowMat>;
using CMap = Eigen::Map<const RowMat>;
using RowVec = Eigen::RowVectorXf;

constexpr int kRank = 16;
constexpr Index kM = 512, kD = 1024;                           // Linear
constexpr Index kN = 1, kC = 320, kHW = 64, kK = 3;            // Conv: the UNet block
constexpr Index kPatch = kC * kK * kK, kPos = kHW * kHW;       // 2880, 4096

CMap cmap(peft::ConstMatrixView<float> v) { return CMap(v.data, v.rows, v.cols); }

RowMat randn(Index r, Index c, std::uint64_t seed, double std = 1.0) {
  RowMat m(r, c);
  peft::Generator(seed).normal(m.data(), std::size_t(m.size()), 0.0, std);
  return m;
}

/// Fills every trainable adapter parameter with N(0, 0.05²) so that no adapter is the identity.
template <class L>
void scramble(L& l) {
  peft::Generator g(99);
  l.visit_parameters([&](peft::ParamRef<float> p) {
    if (p.trainable) g.normal(p.value, p.size, 0.0, 0.05);
  });
  l.visit_parameters([&](peft::ParamRef<float> p) {  // DoRA magnitude, IA3 vector: around 1
    if (p.trainable && (p.name.find("magnitude") != std::string::npos || p.name.find("ia3_l") != std::string::npos))
      for (std::size_t i = 0; i < p.size; ++i) p.value[i] += 1.0f;
  });
}

double rel_diff(const RowMat& a, const RowMat& b) {
  return double((a - b).cwiseAbs().maxCoeff()) / std::max(1e-30, double(b.cwiseAbs().maxCoeff()));
}

// ---------------------------------------------------------------------------------------------------
// Layers

peft::Conv2dGeometry unet_geometry() {
  peft::Conv2dGeometry g;
  g.in_channels = kC;
  g.out_channels = kC;
  g.kernel_h = g.kernel_w = kK;
  g.pad_h = g.pad_w = 1;
  g.in_h = g.in_w = kHW;
  return g;
}

/// A hand-written im2col for the 3×3, stride 1, pad 1 UNet convolution: cols [C·9, H·W].
void im2col(const float* x, float* cols) {
  for (Index c = 0; c < kC; ++c)
    for (Index ki = 0; ki < kK; ++ki)
      for (Index kj = 0; kj < kK; ++kj) {
        float* out = cols + ((c * kK + ki) * kK + kj) * kPos;
        const float* xc = x + c * kPos;
        for (Index i = 0; i < kHW; ++i) {
          const Index ii = i + ki - 1;
          float* row = out + i * kHW;
          if (ii < 0 || ii >= kHW) {
            std::fill(row, row + kHW, 0.0f);
            continue;
          }
          for (Index j = 0; j < kHW; ++j) {
            const Index jj = j + kj - 1;
            row[j] = (jj < 0 || jj >= kHW) ? 0.0f : xc[ii * kHW + jj];
          }
        }
      }
}
/// dx += col2im(dcols).
void col2im(const float* dcols, float* dx) {
  for (Index c = 0; c < kC; ++c)
    for (Index ki = 0; ki < kK; ++ki)
      for (Index kj = 0; kj < kK; ++kj) {
        const float* in = dcols + ((c * kK + ki) * kK + kj) * kPos;
        float* xc = dx + c * kPos;
        for (Index i = 0; i < kHW; ++i) {
          const Index ii = i + ki - 1;
          if (ii < 0 || ii >= kHW) continue;
          for (Index j = 0; j < kHW; ++j) {
            const Index jj = j + kj - 1;
            if (jj >= 0 && jj < kHW) xc[ii * kHW + jj] += in[i * kHW + j];
          }
        }
      }
}

// ---------------------------------------------------------------------------------------------------
// peft++ side: one problem per (layer, kind), built once and kept.

enum class Kind { base, lora, dora, loha, lokr, ia3, vera, adalora };
const char* kind_name(Kind k) {
  switch (k) {
    case Kind::base: return "Base";
    case Kind::lora: return "lora";
    case Kind::dora: return "dora";
    case Kind::loha: return "loha";
    case Kind::lokr: return "lokr";
    case Kind::ia3: return "ia3";
    case Kind::vera: return "vera";
    case Kind::adalora: return "adalora";
  }
  return "?";
}

template <class Base>
using AllKinds = peft::Adapted<Base, peft::Lora, peft::Loha, peft::Lokr, peft::Ia3>;

template <class Base>
struct PeftProblem {
  // one Adapted type per layer holding every kind it supports; only the benchmarked adapter is added
  using Layer = std::conditional_t<std::is_same_v<Base, peft::Linear<float>>,
                                   peft::Adapted<Base, peft::Lora, peft::Loha, peft::Lokr, peft::Ia3, peft::Vera, peft::AdaLora>,
                                   AllKinds<Base>>;
  std::unique_ptr<Layer> layer;
  typename Layer::Context ctx;
  RowMat x, y, dy, dx;
  std::shared_ptr<peft::VeraProjections<float>> proj;
};

template <class Base>
Base make_base(peft::Generator& g) {
  if constexpr (std::is_same_v<Base, peft::Linear<float>>) return peft::Linear<float>(kD, kD, true, g);
  else return peft::Conv2d<float>(unet_geometry(), true, g);
}

template <class Base>
PeftProblem<Base>& peft_problem(Kind kind) {
  static std::map<Kind, std::unique_ptr<PeftProblem<Base>>> cache;
  auto& slot = cache[kind];
  if (slot) return *slot;
  slot = std::make_unique<PeftProblem<Base>>();
  auto& p = *slot;
  peft::Generator g(7);
  p.layer = std::make_unique<typename PeftProblem<Base>::Layer>(make_base<Base>(g), "layer");
  auto& l = *p.layer;
  switch (kind) {
    case Kind::base: break;
    case Kind::lora:
    case Kind::dora: {
      peft::LoraConfig c;
      c.r = kRank;
      c.lora_alpha = 2 * kRank;
      c.use_dora = kind == Kind::dora;
      l.add_adapter("a", c, g);
      break;
    }
    case Kind::loha: {
      peft::LohaConfig c;
      c.r = kRank;
      c.alpha = 2 * kRank;
      l.add_adapter("a", c, g);
      break;
    }
    case Kind::lokr: {
      peft::LokrConfig c;
      c.r = kRank;
      c.alpha = 2 * kRank;
      l.add_adapter("a", c, g);
      break;
    }
    case Kind::ia3: l.add_adapter("a", peft::Ia3Config{}, g); break;
    case Kind::vera:
      if constexpr (std::is_same_v<Base, peft::Linear<float>>) {
        peft::VeraConfig c;
        c.r = kRank;
        p.proj = peft::VeraProjections<float>::random(kRank, kD, kD, 0);
        c.projections = p.proj;
        l.add_adapter("a", c, g);
      }
      break;
    case Kind::adalora:
      if constexpr (std::is_same_v<Base, peft::Linear<float>>) {
        peft::AdaLoraConfig c;
        c.init_r = kRank;
        c.target_r = kRank / 2;
        c.total_step = 1000;
        l.add_adapter("a", c, g);
      }
      break;
  }
  scramble(l);
  const Index rows = std::is_same_v<Base, peft::Linear<float>> ? kM : kN;
  const Index in = l.in_features(), out = l.out_features();
  p.x = randn(rows, in, 1);
  p.dy = randn(rows, out, 2);
  p.y.resize(rows, out);
  p.dx.resize(rows, in);
  p.ctx = l.make_context(rows);
  l.forward(p.ctx, p.x, p.y);  // warm-up
  return p;
}

// ---------------------------------------------------------------------------------------------------
// Hand-written side. Each struct copies the parameters out of the peft++ problem (same numbers), owns its
// buffers, and has fwd() and bwd().

struct HandLinear {
  RowMat x, W, y, dy, dx;
  RowVec b;
  explicit HandLinear(PeftProblem<peft::Linear<float>>& p)
      : x(p.x), W(cmap(p.layer->base().weight())), y(kM, kD), dy(p.dy), dx(kM, kD), b(cmap(p.layer->base().bias())) {}
  void base_fwd() {
    y.noalias() = x * W.transpose();
    y.rowwise() += b;
  }
};

struct HandLinearLora : HandLinear {
  RowMat A, B, t, g, dA, dB;
  float s;
  explicit HandLinearLora(PeftProblem<peft::Linear<float>>& p) : HandLinear(p) {
    auto& a = peft::lora_adapter(*p.layer, "a");
    A = cmap(a.A());
    B = cmap(a.B());
    s = a.scaling;
    t.resize(kM, kRank);
    g.resize(kM, kRank);
    dA.resize(kRank, kD);
    dB.resize(kD, kRank);
  }
  void fwd() {
    base_fwd();
    t.noalias() = x * A.transpose();
    y.noalias() += s * t * B.transpose();
  }
  void bwd() {
    dx.noalias() = dy * W;
    g.noalias() = dy * B;
    dB.noalias() = s * dy.transpose() * t;
    dA.noalias() = s * g.transpose() * x;
    dx.noalias() += s * g * A;
  }
};

struct HandLinearDora : HandLinearLora {
  RowMat V, u, gd;
  RowVec m, norm, gain, dm;
  explicit HandLinearDora(PeftProblem<peft::Linear<float>>& p) : HandLinearLora(p) {
    m = cmap(peft::lora_adapter(*p.layer, "a").M());
    V.resize(kD, kD);
    u.resize(kM, kD);
    gd.resize(kM, kD);
  }
  void fwd() {  // y = g ⊙ (x Wᵀ + s x Aᵀ Bᵀ) + b,  g = m / ‖W + s B A‖_row (detached)
    V = W;
    V.noalias() += s * B * A;
    norm = V.rowwise().norm().transpose();
    gain = m.cwiseQuotient(norm);
    u.noalias() = x * W.transpose();
    t.noalias() = x * A.transpose();
    u.noalias() += s * t * B.transpose();
    y = u.array().rowwise() * gain.array();
    y.rowwise() += b;
  }
  void bwd() {
    dm = (dy.cwiseProduct(u)).colwise().sum().cwiseQuotient(norm);
    gd = dy.array().rowwise() * gain.array();
    g.noalias() = gd * B;
    dB.noalias() = s * gd.transpose() * t;
    dA.noalias() = s * g.transpose() * x;
    dx.noalias() = gd * W;
    dx.noalias() += s * g * A;
  }
};

/// LoHa and LoKr: PEFT materialises ΔW and runs it as a second product.
struct HandLinearDelta : HandLinear {
  RowMat delta, G;
  explicit HandLinearDelta(PeftProblem<peft::Linear<float>>& p) : HandLinear(p), delta(kD, kD), G(kD, kD) {}
  void apply() { y.noalias() += x * delta.transpose(); }
  void input_and_delta_grad() {
    dx.noalias() = dy * W;
    dx.noalias() += dy * delta;
    G.noalias() = dy.transpose() * x;
  }
};

struct HandLinearLoha : HandLinearDelta {
  RowMat w1a, w1b, w2a, w2b, P1, P2, H, d1a, d1b, d2a, d2b;
  float s;
  explicit HandLinearLoha(PeftProblem<peft::Linear<float>>& p) : HandLinearDelta(p) {
    auto& a = p.layer->template adapter<peft::Loha>("a");
    w1a = cmap(a.hada_w1_a());
    w1b = cmap(a.hada_w1_b());
    w2a = cmap(a.hada_w2_a());
    w2b = cmap(a.hada_w2_b());
    s = a.scaling;
    P1.resize(kD, kD);
    P2.resize(kD, kD);
    H.resize(kD, kD);
  }
  void fwd() {  // ΔW = s (w1a w1b) ⊙ (w2a w2b)
    base_fwd();
    P1.noalias() = w1a * w1b;
    P2.noalias() = w2a * w2b;
    delta = s * P1.cwiseProduct(P2);
    apply();
  }
  void bwd() {
    input_and_delta_grad();
    H = s * G.cwiseProduct(P2);
    d1a.noalias() = H * w1b.transpose();
    d1b.noalias() = w1a.transpose() * H;
    H = s * G.cwiseProduct(P1);
    d2a.noalias() = H * w2b.transpose();
    d2b.noalias() = w2a.transpose() * H;
  }
};

/// kron(a, b) into c (c[i·br + p, j·bc + q] = alpha · a(i, j) · b(p, q)).
void kron(float alpha, const RowMat& a, const RowMat& b, RowMat& c) {
  for (Index i = 0; i < a.rows(); ++i)
    for (Index j = 0; j < a.cols(); ++j) c.block(i * b.rows(), j * b.cols(), b.rows(), b.cols()) = (alpha * a(i, j)) * b;
}

/// LoKr's factors as PEFT forms them (w1 full or w1_a·w1_b; w2 full or w2_a·w2_b), ΔW = s·kron(w1, w2), and
/// the gradients from G = ∂L/∂ΔW; shared by the Linear and Conv hand-written versions.
struct LokrFactors {
  RowMat w1, w2, w2a, w2b, d1, d2;
  bool w2_lowrank = false;
  float s = 1;
  template <class Layer>
  explicit LokrFactors(Layer& layer) {
    auto& a = layer.template adapter<peft::Lokr>("a");
    w1 = a.lokr_w1().empty() ? RowMat(cmap(a.lokr_w1_a()) * cmap(a.lokr_w1_b())) : RowMat(cmap(a.lokr_w1()));
    w2_lowrank = a.lokr_w2().empty();
    if (w2_lowrank) {
      w2a = cmap(a.lokr_w2_a());
      w2b = cmap(a.lokr_w2_b());
      w2.resize(w2a.rows(), w2b.cols());
    } else {
      w2 = cmap(a.lokr_w2());
    }
    s = a.scaling;
    d1.resize(w1.rows(), w1.cols());
    d2.resize(w2.rows(), w2.cols());
  }
  void delta(RowMat& out) {
    if (w2_lowrank) w2.noalias() = w2a * w2b;
    kron(s, w1, w2, out);
  }
  void grads(const RowMat& G) {
    const Index br = w2.rows(), bc = w2.cols();
    for (Index i = 0; i < w1.rows(); ++i)
      for (Index j = 0; j < w1.cols(); ++j) d1(i, j) = s * G.block(i * br, j * bc, br, bc).cwiseProduct(w2).sum();
    d2.setZero();
    for (Index i = 0; i < w1.rows(); ++i)
      for (Index j = 0; j < w1.cols(); ++j) d2 += (s * w1(i, j)) * G.block(i * br, j * bc, br, bc);
    if (w2_lowrank) {
      RowMat da = d2 * w2b.transpose(), db = w2a.transpose() * d2;
      benchmark::DoNotOptimize(da.data());
      benchmark::DoNotOptimize(db.data());
    }
  }
};

struct HandLokr : HandLinearDelta {
  LokrFactors f;
  explicit HandLokr(PeftProblem<peft::Linear<float>>& p) : HandLinearDelta(p), f(*p.layer) {}
  void fwd() {
    base_fwd();
    f.delta(delta);
    apply();
  }
  void bwd() {
    input_and_delta_grad();
    f.grads(G);
  }
};

struct HandLinearIa3 : HandLinear {
  RowMat pre;
  RowVec l, dl;
  explicit HandLinearIa3(PeftProblem<peft::Linear<float>>& p) : HandLinear(p), pre(kM, kD) {
    l = cmap(p.layer->template adapter<peft::Ia3>("a").vector());
  }
  void fwd() {  // y = (x Wᵀ + b) ⊙ l
    pre.noalias() = x * W.transpose();
    pre.rowwise() += b;
    y = pre.array().rowwise() * l.array();
  }
  void bwd() {
    dl = dy.cwiseProduct(pre).colwise().sum();
    y = dy.array().rowwise() * l.array();  // (y as scratch)
    dx.noalias() = y * W;
  }
};

/// VeRA and AdaLoRA: a low-rank product with a diagonal in the middle (and λ_b on the output for VeRA).
struct HandLinearDiag : HandLinear {
  RowMat A, B, h, u, v, du, dA, dB;
  RowVec mid, outscale, dmid, dout;
  float f = 1;
  bool vera = false;
  void fwd() {
    base_fwd();
    h.noalias() = x * A.transpose();
    u = h.array().rowwise() * mid.array();
    if (vera) {
      v.noalias() = u * B.transpose();
      y += (v.array().rowwise() * outscale.array()).matrix();
    } else {
      y.noalias() += f * u * B.transpose();
    }
  }
  void bwd() {
    dx.noalias() = dy * W;
    if (vera) {
      dout = dy.cwiseProduct(v).colwise().sum();
      v = dy.array().rowwise() * outscale.array();  // dv (v as scratch)
      du.noalias() = v * B;
    } else {
      du.noalias() = f * dy * B;
      dB.noalias() = f * dy.transpose() * u;
    }
    dmid = du.cwiseProduct(h).colwise().sum();
    du = du.array().rowwise() * mid.array();  // dh
    if (!vera) dA.noalias() = du.transpose() * x;
    dx.noalias() += du * A;
  }
  explicit HandLinearDiag(PeftProblem<peft::Linear<float>>& p, bool is_vera) : HandLinear(p), vera(is_vera) {
    if (vera) {
      auto& a = p.layer->template adapter<peft::Vera>("a");
      A = cmap(p.proj->A()).leftCols(kD);
      B = cmap(p.proj->B()).topRows(kD);
      mid = cmap(a.vera_lambda_d());
      outscale = cmap(a.vera_lambda_b());
    } else {
      auto& a = p.layer->template adapter<peft::AdaLora>("a");
      A = cmap(a.A());
      B = cmap(a.B());
      mid = cmap(a.E()).transpose();
      f = a.factor;
    }
    h.resize(kM, kRank);
    u.resize(kM, kRank);
    v.resize(kM, kD);
  }
};

// ---- Conv: one image; the columns made once per pass -------------------------------------------------

struct HandConv {
  RowMat x, W, y, dy, dx, cols, dcols;
  RowVec b;
  explicit HandConv(PeftProblem<peft::Conv2d<float>>& p)
      : x(p.x), W(cmap(p.layer->base().weight())), y(kC, kPos), dy(Map(p.dy.data(), kC, kPos)), dx(kN, kC * kPos), cols(kPatch, kPos),
        dcols(kPatch, kPos), b(cmap(p.layer->base().bias())) {}
  void base_fwd() {
    im2col(x.data(), cols.data());
    y.noalias() = W * cols;
    y.colwise() += b.transpose();
  }
  void input_grad_from_dcols() {
    dx.setZero();
    col2im(dcols.data(), dx.data());
  }
};

struct HandConvLora : HandConv {
  RowMat A, B, t, g, dA, dB;
  float s;
  explicit HandConvLora(PeftProblem<peft::Conv2d<float>>& p) : HandConv(p) {
    auto& a = peft::lora_adapter(*p.layer, "a");
    A = cmap(a.A());
    B = cmap(a.B());
    s = a.scaling;
    t.resize(kRank, kPos);
    g.resize(kRank, kPos);
  }
  void fwd() {
    base_fwd();
    t.noalias() = A * cols;
    y.noalias() += s * B * t;
  }
  void bwd() {  // cols still hold x's columns from fwd()
    g.noalias() = B.transpose() * dy;
    dB.noalias() = s * dy * t.transpose();
    dA.noalias() = s * g * cols.transpose();
    dcols.noalias() = W.transpose() * dy;
    dcols.noalias() += s * A.transpose() * g;
    input_grad_from_dcols();
  }
};

struct HandConvDora : HandConvLora {
  RowMat V, u, gd;
  Eigen::VectorXf m, norm, gain;
  RowVec dm;
  explicit HandConvDora(PeftProblem<peft::Conv2d<float>>& p) : HandConvLora(p) {
    m = cmap(peft::lora_adapter(*p.layer, "a").M()).transpose();
    u.resize(kC, kPos);
    gd.resize(kC, kPos);
  }
  void fwd() {  // per channel: y = g ⊙ (conv(x, W) + s B A cols) + b
    V = W;
    V.noalias() += s * B * A;
    norm = V.rowwise().norm();
    gain = m.cwiseQuotient(norm);
    im2col(x.data(), cols.data());
    u.noalias() = W * cols;
    t.noalias() = A * cols;
    u.noalias() += s * B * t;
    y = u.array().colwise() * gain.array();
    y.colwise() += b.transpose();
  }
  void bwd() {
    dm = dy.cwiseProduct(u).rowwise().sum().cwiseQuotient(norm).transpose();
    gd = dy.array().colwise() * gain.array();
    g.noalias() = B.transpose() * gd;
    dB.noalias() = s * gd * t.transpose();
    dA.noalias() = s * g * cols.transpose();
    dcols.noalias() = W.transpose() * gd;
    dcols.noalias() += s * A.transpose() * g;
    input_grad_from_dcols();
  }
};

struct HandConvDelta : HandConv {
  RowMat delta, G;
  explicit HandConvDelta(PeftProblem<peft::Conv2d<float>>& p) : HandConv(p), delta(kC, kPatch), G(kC, kPatch) {}
  void apply() { y.noalias() += delta * cols; }
  void grads() {
    G.noalias() = dy * cols.transpose();
    dcols.noalias() = W.transpose() * dy;
    dcols.noalias() += delta.transpose() * dy;
    input_grad_from_dcols();
  }
};

struct HandConvLoha : HandConvDelta {
  RowMat w1a, w1b, w2a, w2b, P1, P2, H, d1a, d1b, d2a, d2b;
  float s;
  explicit HandConvLoha(PeftProblem<peft::Conv2d<float>>& p) : HandConvDelta(p) {
    auto& a = p.layer->template adapter<peft::Loha>("a");
    w1a = cmap(a.hada_w1_a());
    w1b = cmap(a.hada_w1_b());
    w2a = cmap(a.hada_w2_a());
    w2b = cmap(a.hada_w2_b());
    s = a.scaling;
  }
  void fwd() {
    base_fwd();
    P1.noalias() = w1a * w1b;
    P2.noalias() = w2a * w2b;
    delta = s * P1.cwiseProduct(P2);
    apply();
  }
  void bwd() {
    grads();
    H = s * G.cwiseProduct(P2);
    d1a.noalias() = H * w1b.transpose();
    d1b.noalias() = w1a.transpose() * H;
    H = s * G.cwiseProduct(P1);
    d2a.noalias() = H * w2b.transpose();
    d2b.noalias() = w2a.transpose() * H;
  }
};

struct HandConvLokr : HandConvDelta {
  LokrFactors f;
  explicit HandConvLokr(PeftProblem<peft::Conv2d<float>>& p) : HandConvDelta(p), f(*p.layer) {}
  void fwd() {
    base_fwd();
    f.delta(delta);
    apply();
  }
  void bwd() {
    grads();
    f.grads(G);
  }
};

struct HandConvIa3 : HandConv {
  RowMat pre;
  Eigen::VectorXf l;
  RowVec dl;
  explicit HandConvIa3(PeftProblem<peft::Conv2d<float>>& p) : HandConv(p), pre(kC, kPos) {
    l = cmap(p.layer->template adapter<peft::Ia3>("a").vector()).transpose();
  }
  void fwd() {
    im2col(x.data(), cols.data());
    pre.noalias() = W * cols;
    pre.colwise() += b.transpose();
    y = pre.array().colwise() * l.array();
  }
  void bwd() {
    dl = dy.cwiseProduct(pre).rowwise().sum().transpose();
    y = dy.array().colwise() * l.array();
    dcols.noalias() = W.transpose() * y;
    input_grad_from_dcols();
  }
};

/// The three legs of one case, timed in the same iteration: peft++ with the adapter, the hand-written code,
/// and peft++'s frozen base layer alone. The order of the legs rotates from one iteration to the next, and
/// the ratios are taken per iteration and summarised by their median, so that the slow drifts of a shared
/// machine (frequency, neighbours) cancel out of the ratios instead of landing on one side.
/// The six orders of the three legs, cycled: each leg runs first, second and third equally often and after each of
/// the other two equally often, so the cache state a leg inherits from the one before it (the Conv legs' buffers are
/// tens of MB) does not favour one side. (A plain rotation 0-1-2, 1-2-0, 2-0-1 always runs the peft++ leg right after
/// the base leg and the hand-written one right after peft++.)
constexpr int kOrders[6][3] = {{0, 1, 2}, {1, 2, 0}, {2, 0, 1}, {0, 2, 1}, {2, 1, 0}, {1, 0, 2}};

template <class Base, class H>
void BM_Case(benchmark::State& state, Kind kind, bool backward) {
  auto& p = peft_problem<Base>(kind);
  auto& b = peft_problem<Base>(Kind::base);
  static std::map<Kind, std::unique_ptr<H>> cache;
  auto& hp = cache[kind];
  if (!hp) {
    if constexpr (std::is_constructible_v<H, PeftProblem<Base>&, bool>) hp = std::make_unique<H>(p, kind == Kind::vera);
    else hp = std::make_unique<H>(p);
  }
  auto& h = *hp;
  h.fwd();
  p.layer->forward(p.ctx, p.x, p.y);
  const double diff = rel_diff(Map(h.y.data(), p.y.rows(), p.y.cols()), p.y);
  auto run_peft = [&](PeftProblem<Base>& q) {
    q.layer->forward(q.ctx, q.x, q.y);
    if (backward) q.layer->backward(q.ctx, q.dy, q.dx, peft::GradMode::overwrite);
    benchmark::DoNotOptimize(q.y.data());
    benchmark::ClobberMemory();
  };
  auto run_hand = [&] {
    h.fwd();
    if (backward) h.bwd();
    benchmark::DoNotOptimize(h.y.data());
    benchmark::ClobberMemory();
  };
  using clock = std::chrono::steady_clock;
  std::vector<double> tp, th, tb;
  std::size_t it = 0;
  for (auto _ : state) {
    double t[3];
    for (int k = 0; k < 3; ++k) {
      const int leg = kOrders[it % 6][k];
      const auto t0 = clock::now();
      if (leg == 0) run_peft(p);
      else if (leg == 1) run_hand();
      else run_peft(b);
      t[leg] = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
    }
    tp.push_back(t[0]);
    th.push_back(t[1]);
    tb.push_back(t[2]);
    ++it;
  }
  auto median = [](std::vector<double> v) {
    if (v.empty()) return 0.0;
    std::nth_element(v.begin(), v.begin() + std::ptrdiff_t(v.size() / 2), v.end());
    return v[v.size() / 2];
  };
  std::vector<double> rh(tp.size()), rb(tp.size());
  for (std::size_t i = 0; i < tp.size(); ++i) {
    rh[i] = tp[i] / th[i];
    rb[i] = tp[i] / tb[i];
  }
  state.counters["peft_ms"] = median(tp);
  state.counters["hand_ms"] = median(th);
  state.counters["base_ms"] = median(tb);
  state.counters["peft_over_hand"] = median(rh);
  state.counters["peft_over_base"] = median(rb);
  state.counters["max_rel_diff"] = diff;
}

double min_of(const std::vector<double>& v) { return v.empty() ? 0.0 : *std::min_element(v.begin(), v.end()); }
double max_of(const std::vector<double>& v) { return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end()); }

template <class Base, class H>
void add_case(const char* layer, Kind kind) {
  for (bool bwd : {false, true}) {
    const std::string name = std::string("BM_") + layer + "_" + kind_name(kind) + "_" + (bwd ? "FwdBwd" : "Fwd");
    benchmark::RegisterBenchmark(name.c_str(), BM_Case<Base, H>, kind, bwd)
        ->Unit(benchmark::kMillisecond)
        ->ComputeStatistics("min", min_of)
        ->ComputeStatistics("max", max_of)
        ->MinTime(std::string(layer) == "Conv" ? 4.0 : 1.0);  // a Conv iteration (three legs) takes 0.25-1 s
  }
}

const bool registered = [] {
  using L = peft::Linear<float>;
  using C = peft::Conv2d<float>;
  add_case<L, HandLinearLora>("Linear", Kind::lora);
  add_case<L, HandLinearDora>("Linear", Kind::dora);
  add_case<L, HandLinearLoha>("Linear", Kind::loha);
  add_case<L, HandLokr>("Linear", Kind::lokr);
  add_case<L, HandLinearIa3>("Linear", Kind::ia3);
  add_case<L, HandLinearDiag>("Linear", Kind::vera);
  add_case<L, HandLinearDiag>("Linear", Kind::adalora);
  add_case<C, HandConvLora>("Conv", Kind::lora);
  add_case<C, HandConvDora>("Conv", Kind::dora);
  add_case<C, HandConvLoha>("Conv", Kind::loha);
  add_case<C, HandConvLokr>("Conv", Kind::lokr);
  add_case<C, HandConvIa3>("Conv", Kind::ia3);
  return true;
}();

}  // namespace

BENCHMARK_MAIN();
