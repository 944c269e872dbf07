// peft++ flagship example: parameter-efficient transfer learning on Fashion-MNIST, measured.
//
// What it does
//   1. Pretraining: a small CNN written from peft++ layers (conv 1→16 3×3 → ReLU → maxpool 2 → conv 16→32
//      3×3 → ReLU → maxpool 2 → fc 1568→128 → ReLU → head 128→5) is trained in full on classes 0–4 of
//      Fashion-MNIST (AdamW, lr 1e-3). The pretrained base is cached on disk (safetensors, --cache-dir),
//      so later runs skip this phase.
//   2. Transfer: from the same pretrained base, the network learns classes 5–9 with a new head that is
//      always trained (PEFT's modules_to_save), by each method: head only, full fine-tuning, LoRA, LoHa,
//      LoKr, (IA)³ and DoRA, adapters on conv1, conv2 and fc; AdaLoRA on fc only (the library's AdaLoRA is
//      for Linear layers; the convolutions stay frozen), its rank budget falling from 1.5 r to r.
//   3. Memory: a larger configuration, an MLP 784→4096×4→10 (53.6M parameters, so that the weights
//      dominate as in an LLM), takes 10 AdamW steps under full fine-tuning and under LoRA.
//   Every run (pretraining, each method, each memory run) is its own process: the program re-executes
//   itself (/proc/self/exe) with a hidden --worker option, so each run's peak resident memory (VmHWM of
//   the worker, read before it writes its checkpoint) is its own. The parent prints a table like PEFT's
//   README tables, writes a JSON summary (--json), learning curves (CSV, and a PNG if gnuplot is on PATH)
//   and checks what must hold (accuracy above chance, frozen base bit-identical, checkpoints re-read
//   bit-identical); the exit code is non-zero when a check fails.
//
// check_with_peft.py (beside this file) loads the checkpoints into PyTorch with Hugging Face PEFT and
// re-measures their accuracy; docs/results.md has the measured table.
//
// The training loop is the user's, as in examples/mlp_lora: contexts (saved activations and GEMM scratch)
// are made once, so forward, backward and the optimizer step allocate nothing.
//
// Usage: fashion_transfer [--quick] [--methods head,full,lora,...] [--rank R] [--epochs N] [--json PATH] ...
//        fashion_transfer --help
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <peft/adapter/adalora.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/peft.hpp>
#include <peft/train.hpp>

#include "fashion_mnist.hpp"

extern char** environ;

namespace {

namespace fs = std::filesystem;
namespace st = peft::safetensors;
using json = nlohmann::json;
using peft::Index;
using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;  // peft++ is row-major
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// =============================================================================================
// Options

struct Options {
  int epochs = 6;           ///< transfer epochs
  int pretrain_epochs = 5;  ///< pretraining epochs
  int rank = 4;             ///< adapter rank (LoRA, DoRA, LoHa, LoKr; AdaLoRA's target_r); see docs/results.md for why 4
  std::uint64_t seed = 0;
  std::string methods = "head,full,lora,loha,lokr,ia3,dora,adalora";
  bool quick = false;
  std::string json_path, curves_path, cache_dir, data_dir = "/usr/share/datasets/fashion-mnist", out_dir = "fashion_transfer_out";
  int jobs = std::clamp(int(std::thread::hardware_concurrency()), 1, 8);
  bool skip_large = false;
  bool skip_if_no_data = false;
  int batch = 64;
  double lr = 1e-3;
  // reduced runs (--quick sets them; 0 = everything)
  std::size_t pretrain_limit = 0, train_limit = 0, test_limit = 0;
  int large_steps = 10;
  int large_rank = 8;
  // hidden: worker mode
  std::string worker, worker_out, status_file;
};

std::string default_cache_dir() {
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return (fs::path(x) / "peft++").string();
  if (const char* h = std::getenv("HOME"); h && *h) return (fs::path(h) / ".cache" / "peft++").string();
  return "fashion_cache";
}

// =============================================================================================
// The methods. Each is applied to the same pretrained base; the new head is trained in all of them.

struct MethodInfo {
  const char* name;
  const char* what;
};
// To add a method: one entry here and one branch in apply_method().
constexpr MethodInfo kMethods[] = {
    {"head", "new head only (base frozen)"},
    {"full", "full fine-tuning of every layer"},
    {"lora", "LoRA on conv1, conv2, fc + head"},
    {"loha", "LoHa on conv1, conv2, fc + head"},
    {"lokr", "LoKr on conv1, conv2, fc + head"},
    {"ia3", "(IA)3 on conv1, conv2, fc + head"},
    {"dora", "DoRA on conv1, conv2, fc + head"},
    {"adalora", "AdaLoRA on fc only (Linear; convs frozen) + head"},
};
const MethodInfo* find_method(const std::string& name) {
  for (const auto& m : kMethods)
    if (name == m.name) return &m;
  return nullptr;
}

// =============================================================================================
// The network: your own struct of peft++ layers. Adapted layers take adapters of any kind listed; only
// the kinds a method adds run (the others cost an empty loop).

/// ReLU, written by the user (not a peft type): y = max(x, 0), dx = dy where y > 0.
struct Relu {
  void forward(const Eigen::Ref<const Mat>& x, Eigen::Ref<Mat> y) const { y = x.cwiseMax(0.0f); }
  void backward(const Eigen::Ref<const Mat>& y, const Eigen::Ref<const Mat>& dy, Eigen::Ref<Mat> dx) const {
    dx = (y.array() > 0.0f).select(dy, 0.0f);
  }
};

// Lora first: DoRA (Lora with use_dora) must come before the other additive kinds.
using Conv = peft::Adapted<peft::Conv2d<float>, peft::Lora, peft::Loha, peft::Lokr, peft::Ia3>;
using Fc = peft::Adapted<peft::Linear<float>, peft::Lora, peft::Loha, peft::Lokr, peft::Ia3, peft::AdaLora>;  // AdaLoRA: Linear only
using Pool = peft::MaxPool2d<float>;
using Head = peft::Linear<float>;

constexpr Index kClasses = 5;
constexpr Index kC1 = 16, kC2 = 32, kHidden = 128, kFlat = kC2 * 7 * 7;  // 1568

struct Net {
  Conv conv1;  // 1→16, 3×3, padding 1: [1·28·28] → [16·28·28]
  Relu relu1;
  Pool pool1;  // → [16·14·14]
  Conv conv2;  // 16→32, 3×3, padding 1 → [32·14·14]
  Relu relu2;
  Pool pool2;  // → [32·7·7] = 1568
  Fc fc;       // 1568 → 128
  Relu relu3;
  Head head;   // 128 → 5
};

peft::Conv2dGeometry conv3x3(Index in_c, Index out_c, Index hw) {
  peft::Conv2dGeometry g;
  g.in_channels = in_c;
  g.out_channels = out_c;
  g.kernel_h = g.kernel_w = 3;
  g.pad_h = g.pad_w = 1;
  g.in_h = g.in_w = hw;
  return g;
}

/// PyTorch's default initialisation for every layer, drawn in declaration order from `gen`.
Net make_net(peft::Generator& gen) {
  return Net{Conv(peft::Conv2d<float>(conv3x3(1, kC1, 28), true, gen), "conv1"), Relu{}, Pool(kC1, 28, 28, 2),
             Conv(peft::Conv2d<float>(conv3x3(kC1, kC2, 14), true, gen), "conv2"), Relu{}, Pool(kC2, 14, 14, 2),
             Fc(peft::Linear<float>(kFlat, kHidden, true, gen), "fc"), Relu{}, Head(kHidden, kClasses, true, gen)};
}

/// Contexts and activation buffers for batches of up to `batch` rows, made once per run.
struct Workspace {
  Conv::Context c1, c2;
  Fc::Context fc;
  Head::Context head;
  Pool::Context p1, p2;
  Mat x, h1, a1, q1, h2, a2, q2, h3, a3, logits;  // forward: layer outputs (h), ReLU (a), pooled (q)
  Mat dlogits, da3, dh3, dq2, da2, dh2, dq1, da1, dh1;
  std::vector<int> y;
  bool grad_fc = true, grad_conv2 = true, grad_conv1 = true;  // how far down backward must go
};

template <class L>
bool has_trainable(L& layer) {
  bool any = false;
  layer.visit_parameters([&](const peft::ParamRef<float>& p) { any = any || p.trainable; });
  return any;
}

Workspace make_workspace(Net& m, Index batch) {
  Workspace w;
  w.c1 = m.conv1.make_context(batch);
  w.c2 = m.conv2.make_context(batch);
  w.fc = m.fc.make_context(batch);
  w.head = m.head.make_context(batch);
  w.p1 = m.pool1.make_context(batch);
  w.p2 = m.pool2.make_context(batch);
  w.x.resize(batch, 28 * 28);
  for (Mat* a : {&w.h1, &w.a1, &w.da1, &w.dh1}) a->resize(batch, m.conv1.out_features());
  for (Mat* a : {&w.q1, &w.dq1}) a->resize(batch, m.pool1.out_features());
  for (Mat* a : {&w.h2, &w.a2, &w.da2, &w.dh2}) a->resize(batch, m.conv2.out_features());
  for (Mat* a : {&w.q2, &w.dq2}) a->resize(batch, m.pool2.out_features());
  for (Mat* a : {&w.h3, &w.a3, &w.da3, &w.dh3}) a->resize(batch, kHidden);
  w.logits.resize(batch, kClasses);
  w.dlogits.resize(batch, kClasses);
  w.y.resize(std::size_t(batch));
  // backward stops below the lowest layer with trainable parameters (head only: at the head)
  w.grad_conv1 = has_trainable(m.conv1);
  w.grad_conv2 = w.grad_conv1 || has_trainable(m.conv2);
  w.grad_fc = w.grad_conv2 || has_trainable(m.fc);
  return w;
}

/// Forward of the top n rows of w.x; returns the logits.
Mat::RowsBlockXpr forward(Net& m, Workspace& w, Index n) {
  m.conv1.forward(w.c1, w.x.topRows(n), w.h1.topRows(n));
  m.relu1.forward(w.h1.topRows(n), w.a1.topRows(n));
  m.pool1.forward(w.p1, w.a1.topRows(n), w.q1.topRows(n));
  m.conv2.forward(w.c2, w.q1.topRows(n), w.h2.topRows(n));
  m.relu2.forward(w.h2.topRows(n), w.a2.topRows(n));
  m.pool2.forward(w.p2, w.a2.topRows(n), w.q2.topRows(n));
  m.fc.forward(w.fc, w.q2.topRows(n), w.h3.topRows(n));
  m.relu3.forward(w.h3.topRows(n), w.a3.topRows(n));
  m.head.forward(w.head, w.a3.topRows(n), w.logits.topRows(n));
  return w.logits.topRows(n);
}

/// Backward from w.dlogits, in reverse order, as far down as there are trainable parameters. Parameter
/// gradients accumulate (PyTorch's .grad); zero them before each batch.
void backward(Net& m, Workspace& w, Index n) {
  m.head.backward(w.head, w.dlogits.topRows(n), w.grad_fc ? peft::MatrixView<float>(w.da3.topRows(n)) : peft::MatrixView<float>{});
  if (!w.grad_fc) return;
  m.relu3.backward(w.a3.topRows(n), w.da3.topRows(n), w.dh3.topRows(n));
  m.fc.backward(w.fc, w.dh3.topRows(n), w.grad_conv2 ? peft::MatrixView<float>(w.dq2.topRows(n)) : peft::MatrixView<float>{});
  if (!w.grad_conv2) return;
  m.pool2.backward(w.p2, w.dq2.topRows(n), w.da2.topRows(n));
  m.relu2.backward(w.a2.topRows(n), w.da2.topRows(n), w.dh2.topRows(n));
  m.conv2.backward(w.c2, w.dh2.topRows(n), w.grad_conv1 ? peft::MatrixView<float>(w.dq1.topRows(n)) : peft::MatrixView<float>{});
  if (!w.grad_conv1) return;
  m.pool1.backward(w.p1, w.dq1.topRows(n), w.da1.topRows(n));
  m.relu1.backward(w.a1.topRows(n), w.da1.topRows(n), w.dh1.topRows(n));
  m.conv1.backward(w.c1, w.dh1.topRows(n), {});  // no gradient w.r.t. the images
}

/// Zeroes every gradient (the layers directly: no model walk, so nothing is allocated per batch).
void zero_grad(Net& m) {
  m.conv1.zero_grad();
  m.conv2.zero_grad();
  m.fc.zero_grad();
  m.head.zero_grad();
}

/// Mean softmax cross-entropy; writes dLoss/dlogits. Allocation-free.
template <class L, class D>
double cross_entropy(const L& logits, const int* labels, D&& dlogits) {
  const Index n = logits.rows(), k = logits.cols();
  double loss = 0;
  for (Index i = 0; i < n; ++i) {
    const float mx = logits.row(i).maxCoeff();
    float sum = 0;
    for (Index j = 0; j < k; ++j) sum += (dlogits(i, j) = std::exp(logits(i, j) - mx));
    loss += double(std::log(sum) + mx - logits(i, labels[i]));
    for (Index j = 0; j < k; ++j) dlogits(i, j) /= sum * float(n);  // (softmax - onehot) / n
    dlogits(i, labels[i]) -= 1.0f / float(n);
  }
  return loss / double(n);
}

// =============================================================================================
// Data: images as bytes, converted per batch to normalised floats (Fashion-MNIST's mean and std).

constexpr float kMean = 0.2860f, kStd = 0.3530f;

struct Split {
  fashion::Dataset d;
  int label_offset = 0;  ///< classes 5–9 are learned as 0–4
  int label(std::size_t i) const { return d.labels[i] - label_offset; }
};

void load_row(const std::uint8_t* px, float* out) {
  for (int k = 0; k < fashion::kPixels; ++k) out[k] = (float(px[k]) * (1.0f / 255.0f) - kMean) * (1.0f / kStd);
}

Split load_classes(const Options& o, const char* split, int first_class, std::size_t limit) {
  Split s;
  s.d = fashion::load_split(o.data_dir, split, [&](int c) { return c >= first_class && c < first_class + kClasses; }, limit);
  s.label_offset = first_class;
  if (s.d.size() == 0) throw std::runtime_error(std::string("no images of classes ") + std::to_string(first_class) + "-" +
                                                std::to_string(first_class + kClasses - 1) + " in the " + split + " split");
  return s;
}

// =============================================================================================
// Progress. A worker reports where it is in a small status file (one fixed-size record, rewritten in
// place); the parent reads the files of the runs in flight and draws one progress bar per phase on a
// terminal, or prints a plain line per finished epoch otherwise. Without a status file (a worker started
// by hand) the worker prints its epochs itself.

struct Status {
  int epoch = 0, epochs = 0;           ///< epochs done (or steps, for the large configuration)
  double within = 0;                   ///< fraction of the current epoch done
  double loss = std::nan(""), acc = std::nan("");  ///< of the last finished epoch
};

class StatusWriter {
 public:
  /// `path`: the status record (rewritten in place); `path` + ".epochs": one line per finished epoch.
  StatusWriter(const std::string& path, std::string name) : name_(std::move(name)), t0_(Clock::now()) {
    if (path.empty()) return;
    f_ = std::fopen(path.c_str(), "w");
    log_ = std::fopen((path + ".epochs").c_str(), "w");
  }
  StatusWriter(const StatusWriter&) = delete;
  StatusWriter& operator=(const StatusWriter&) = delete;
  ~StatusWriter() {
    if (f_) std::fclose(f_);
    if (log_) std::fclose(log_);
  }
  /// Within an epoch: rewritten at most every 0.2 s.
  void batch(const Status& s) {
    if (!f_ || Clock::now() - last_ < std::chrono::milliseconds(200)) return;
    write(s);
  }
  /// At the end of an epoch (or step): always.
  void epoch_done(const Status& s) {
    const std::string line = epoch_line(name_, s, seconds_since(t0_));
    if (f_) {
      write(s);
      std::fputs((line + "\n").c_str(), log_);
      std::fflush(log_);
    } else {
      std::printf("%s\n", line.c_str());
      std::fflush(stdout);
    }
  }
  static std::string pct(double a) {
    char b[16];
    std::snprintf(b, sizeof b, "%.2f%%", 100 * a);
    return b;
  }
  static std::string epoch_line(const std::string& name, const Status& s, double seconds) {
    char b[160];
    std::snprintf(b, sizeof b, "  %-10s %s %2d/%d  loss %.4f%s%s  %6.1f s", name.c_str(), std::isnan(s.acc) ? "step " : "epoch", s.epoch, s.epochs, s.loss,
                  std::isnan(s.acc) ? "" : "  test acc ", std::isnan(s.acc) ? "" : pct(s.acc).c_str(), seconds);
    return b;
  }

 private:
  void write(const Status& s) {
    last_ = Clock::now();
    char rec[128];
    const int n = std::snprintf(rec, sizeof rec, "%d %d %.4f %.6g %.6g", s.epoch, s.epochs, s.within, s.loss, s.acc);
    std::memset(rec + n, ' ', sizeof rec - std::size_t(n) - 1);
    rec[sizeof rec - 1] = '\n';
    std::rewind(f_);
    std::fwrite(rec, 1, sizeof rec, f_);
    std::fflush(f_);
  }
  std::FILE* f_ = nullptr;
  std::FILE* log_ = nullptr;
  std::string name_;
  Clock::time_point t0_, last_{};
};

/// Reads a status record; nullopt while there is none (or it is being rewritten).
std::optional<Status> read_status(const fs::path& p) {
  std::ifstream f(p);
  Status s;
  std::string loss, acc;
  if (!(f >> s.epoch >> s.epochs >> s.within >> loss >> acc)) return std::nullopt;
  s.loss = std::strtod(loss.c_str(), nullptr);
  s.acc = std::strtod(acc.c_str(), nullptr);
  return s;
}

// =============================================================================================
// Training and evaluation loops.

double accuracy(Net& m, Workspace& w, const Split& s, Index batch) {
  peft::eval(m);
  std::size_t correct = 0;
  for (std::size_t i = 0; i < s.d.size(); i += std::size_t(batch)) {
    const Index n = Index(std::min<std::size_t>(std::size_t(batch), s.d.size() - i));
    for (Index r = 0; r < n; ++r) load_row(s.d.image(i + std::size_t(r)), w.x.row(r).data());
    const auto logits = forward(m, w, n);
    for (Index r = 0; r < n; ++r) {
      Index pred;
      logits.row(r).maxCoeff(&pred);
      correct += pred == s.label(i + std::size_t(r));
    }
  }
  peft::train(m);
  return double(correct) / double(s.d.size());
}

/// Fisher–Yates with std::mt19937_64 (fully specified by the standard), so batches are the same everywhere.
void shuffle(std::vector<std::size_t>& order, std::mt19937_64& rng) {
  for (std::size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng() % (i + 1)]);
}

struct CurvePoint {
  int epoch;
  double loss, acc;
};

/// The head's input (fc → ReLU) for every image of s, in eval mode.
Mat head_inputs(Net& m, Workspace& w, const Split& s, Index batch) {
  peft::eval(m);
  Mat f(Index(s.d.size()), kHidden);
  for (std::size_t i = 0; i < s.d.size(); i += std::size_t(batch)) {
    const Index n = Index(std::min<std::size_t>(std::size_t(batch), s.d.size() - i));
    for (Index r = 0; r < n; ++r) load_row(s.d.image(i + std::size_t(r)), w.x.row(r).data());
    forward(m, w, n);
    f.middleRows(Index(i), n) = w.a3.topRows(n);
  }
  peft::train(m);
  return f;
}

/// `epochs` epochs of AdamW on `train`, evaluating on `test` after each; returns the learning curve
/// (epoch 0 = before training). Optional hooks (AdaLoRA's): `after_backward` runs after each backward and
/// before the optimizer step, and returns a term added to the batch's loss (the orthogonal regulariser,
/// which adds its own gradient); `after_step` runs after each optimizer step (the rank allocator).
std::vector<CurvePoint> fit(Net& m, const Split& train, const Split& test, const Options& o, int epochs, std::uint64_t shuffle_seed,
                            const std::string& phase, const std::function<double()>& after_backward = {},
                            const std::function<void()>& after_step = {}) {
  StatusWriter status(o.status_file, phase);
  Workspace w = make_workspace(m, o.batch);
  const auto params = peft::trainable_parameters<float>(m);
  peft::AdamWOptions opt;
  opt.lr = o.lr;
  peft::AdamW<float> adamw(params, opt);
  std::mt19937_64 rng(shuffle_seed);
  std::vector<std::size_t> order(train.d.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;

  // When only the head trains (base frozen, no adapters), the head's inputs never change: they are
  // computed once, and each epoch runs the head alone on them. Same batches, same updates, a fraction
  // of the time.
  const bool head_only = !w.grad_fc;
  Mat ftrain, ftest;
  if (head_only) {
    ftrain = head_inputs(m, w, train, o.batch);
    ftest = head_inputs(m, w, test, o.batch);
  }
  auto evaluate = [&] {
    if (!head_only) return accuracy(m, w, test, o.batch);
    std::size_t correct = 0;
    for (Index i = 0; i < ftest.rows(); i += o.batch) {
      const Index n = std::min<Index>(o.batch, ftest.rows() - i);
      m.head.forward(w.head, ftest.middleRows(i, n), w.logits.topRows(n));
      for (Index r = 0; r < n; ++r) {
        Index pred;
        w.logits.row(r).maxCoeff(&pred);
        correct += pred == test.label(std::size_t(i + r));
      }
    }
    return double(correct) / double(ftest.rows());
  };

  std::vector<CurvePoint> curve{{0, std::nan(""), evaluate()}};
  for (int e = 1; e <= epochs; ++e) {
    shuffle(order, rng);
    double total = 0;
    for (std::size_t start = 0; start < order.size(); start += std::size_t(o.batch)) {
      const Index n = Index(std::min<std::size_t>(std::size_t(o.batch), order.size() - start));
      for (Index r = 0; r < n; ++r) {
        const std::size_t src = order[start + std::size_t(r)];
        if (head_only) w.a3.row(r) = ftrain.row(Index(src));
        else load_row(train.d.image(src), w.x.row(r).data());
        w.y[std::size_t(r)] = train.label(src);
      }
      zero_grad(m);
      if (head_only) {
        m.head.forward(w.head, w.a3.topRows(n), w.logits.topRows(n));
        total += cross_entropy(w.logits.topRows(n), w.y.data(), w.dlogits.topRows(n)) * double(n);
        m.head.backward(w.head, w.dlogits.topRows(n), {});
      } else {
        const auto logits = forward(m, w, n);
        total += cross_entropy(logits, w.y.data(), w.dlogits.topRows(n)) * double(n);
        backward(m, w, n);
      }
      if (after_backward) total += after_backward() * double(n);
      adamw.step();
      if (after_step) after_step();
      status.batch({e - 1, epochs, double(start + std::size_t(n)) / double(order.size()), total / double(start + std::size_t(n)), curve.back().acc});
    }
    const double loss = total / double(order.size());
    const double acc = evaluate();
    curve.push_back({e, loss, acc});
    status.epoch_done({e, epochs, 0.0, loss, acc});
  }
  return curve;
}

// =============================================================================================
// Files: the pretrained base (cache), checkpoints, peak RSS.

/// Peak resident set size of this process (VmHWM), in bytes. After exec, a process's VmHWM is its own
/// (unlike getrusage's ru_maxrss, which also remembers the parent's memory at fork time).
std::uint64_t peak_rss_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  return 0;
}

/// User + system CPU time of this process so far.
double cpu_seconds_self() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + 1e-6 * double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

std::uint64_t fnv1a(const std::string& s) {
  std::uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

/// Everything that determines the pretrained base; stored in the cache file and compared on load.
std::string pretrain_recipe(const Options& o) {
  std::ostringstream r;
  r << "peft++ fashion_transfer base v1; net conv1(1,16,3,p1) relu pool2 conv2(16,32,3,p1) relu pool2 fc(1568,128) relu head(128,5); "
    << "classes 0-4; epochs " << o.pretrain_epochs << "; batch " << o.batch << "; AdamW lr " << o.lr << " wd 0.01; seed " << o.seed
    << "; train limit " << o.pretrain_limit << "; normalise (x/255-" << kMean << ")/" << kStd;
  return r.str();
}
fs::path base_cache_path(const Options& o) {
  char h[32];
  std::snprintf(h, sizeof h, "%016llx", static_cast<unsigned long long>(fnv1a(pretrain_recipe(o))));
  return fs::path(o.cache_dir) / (std::string("fashion_cnn_base_") + h + ".safetensors");
}

/// The network's state dict with PyTorch's names and shapes (Conv2d weights [O, C, kh, kw]).
std::vector<st::TensorRef> model_tensors(Net& m, const std::string& prefix = "") {
  auto w4 = [](const auto& conv) {
    const auto& g = conv.base().geometry();
    return std::vector<std::uint64_t>{std::uint64_t(g.out_channels), std::uint64_t(g.in_channels), std::uint64_t(g.kernel_h), std::uint64_t(g.kernel_w)};
  };
  auto vec = [](peft::ConstMatrixView<float> v) { return std::vector<std::uint64_t>{std::uint64_t(v.size())}; };
  const Net& c = m;
  return {{prefix + "conv1.weight", c.conv1.base().weight(), w4(c.conv1)},
          {prefix + "conv1.bias", c.conv1.base().bias(), vec(c.conv1.base().bias())},
          {prefix + "conv2.weight", c.conv2.base().weight(), w4(c.conv2)},
          {prefix + "conv2.bias", c.conv2.base().bias(), vec(c.conv2.base().bias())},
          {prefix + "fc.weight", c.fc.base().weight()},
          {prefix + "fc.bias", c.fc.base().bias(), vec(c.fc.base().bias())},
          {prefix + "head.weight", c.head.weight()},
          {prefix + "head.bias", c.head.bias(), vec(c.head.bias())}};
}

/// Copies the cached base into the network (all but the head, which is new for classes 5–9).
void load_base(Net& m, const st::File& f) {
  auto load = [&](const std::string& name, peft::MatrixView<float> v) {
    if (!f.contains(name)) throw std::runtime_error(f.path() + ": tensor '" + name + "' is missing");
    if (f.info(name).numel() != std::uint64_t(v.size()))
      throw std::runtime_error(f.path() + ": tensor '" + name + "' has " + std::to_string(f.info(name).numel()) + " values, the network expects " +
                               std::to_string(v.size()));
    f.read_as<float>(name, std::span<float>(v.data, std::size_t(v.size())));
  };
  load("conv1.weight", m.conv1.base().weight());
  load("conv1.bias", m.conv1.base().bias());
  load("conv2.weight", m.conv2.base().weight());
  load("conv2.bias", m.conv2.base().bias());
  load("fc.weight", m.fc.base().weight());
  load("fc.bias", m.fc.base().bias());
}

/// Opens the cached base if it exists and was made by the current recipe.
std::optional<st::File> open_base(const Options& o, std::string* why = nullptr) {
  const fs::path p = base_cache_path(o);
  if (!fs::exists(p)) {
    if (why) *why = "no cached base at " + p.string();
    return std::nullopt;
  }
  try {
    st::File f(p);
    const auto& md = f.metadata();
    const auto it = md.find("recipe");
    if (it == md.end() || it->second != pretrain_recipe(o)) {
      if (why) *why = p.string() + " was made by another recipe";
      return std::nullopt;
    }
    return f;
  } catch (const std::exception& e) {
    if (why) *why = std::string("the cached base is unreadable (") + e.what() + ")";
    return std::nullopt;
  }
}

/// The PyTorch / Hugging Face PEFT shape of adapter tensor `t` (adapter name already stripped) on `layer`.
template <class L>
std::vector<std::uint64_t> peft_shape(L& layer, const std::string& t, std::size_t size) {
  using U = std::uint64_t;
  constexpr bool conv = std::is_same_v<typename L::base_type, peft::Conv2d<float>>;
  const auto w = layer.base().weight();  // [out, in] or [O, C·kh·kw]
  const U rows = U(w.rows), cols = U(w.cols), n = U(size);
  if (t.rfind("lokr_", 0) == 0) {
    auto& a = layer.template adapter<peft::Lokr>("default");
    auto view_of = [&](const std::string& name) {
      if (name == "lokr_w1") return a.lokr_w1();
      if (name == "lokr_w1_a") return a.lokr_w1_a();
      if (name == "lokr_w1_b") return a.lokr_w1_b();
      if (name == "lokr_w2") return a.lokr_w2();
      if (name == "lokr_w2_a") return a.lokr_w2_a();
      return a.lokr_w2_b();
    };
    if (conv && t == "lokr_w2") return {U(a.layout.out_k), U(a.layout.in_n), U(a.layout.kh), U(a.layout.kw)};
    const auto v = view_of(t);
    return {U(v.rows), U(v.cols)};
  }
  if (t == "hada_w1_a" || t == "hada_w2_a") return {rows, n / rows};
  if (t == "hada_w1_b" || t == "hada_w2_b") return {n / cols, cols};
  if constexpr (conv) {
    const auto& g = layer.base().geometry();
    if (t == "lora_A.weight") return {n / cols, U(g.in_channels), U(g.kernel_h), U(g.kernel_w)};
    if (t == "lora_B.weight") return {rows, n / rows, 1, 1};
    if (t == "lora_magnitude_vector" || t == "ia3_l") return {1, rows, 1, 1};
  } else {
    if (t == "lora_A.weight") return {n / cols, cols};
    if (t == "lora_B.weight") return {rows, n / rows};
    if (t == "lora_magnitude_vector") return {rows};
    if (t == "ia3_l") return n == rows ? std::vector<U>{rows, 1} : std::vector<U>{1, cols};  // output or input (feed-forward) scaling
  }
  throw std::runtime_error("no PEFT shape known for adapter tensor '" + t + "'");
}

struct Checkpoint {
  fs::path file;
  std::uint64_t bytes = 0;
  bool reread_ok = false;
  std::string detail;
};

/// Saves the run's checkpoint into `dir` and re-reads it. For `full`, the whole fine-tuned model
/// (model.safetensors, PyTorch names). Otherwise Hugging Face PEFT's adapter format: adapter_model.safetensors
/// with PEFT's keys (base_model.model.<module>.<tensor>, adapter name stripped, the head as modules_to_save)
/// and a minimal adapter_config.json. (When the library's save_pretrained lands, this function is the one
/// place to switch.)
/// `adalora`: AdaLoRA's tensors on fc, already truncated to the kept ranks (adalora::state_dict: PEFT's keys,
/// lora_A [r', in], lora_B [out, r'], lora_E [r', 1]); they replace fc's untruncated parameters.
Checkpoint save_checkpoint(const fs::path& dir, Net& m, const std::string& method, const json& adapter_config,
                           const std::vector<peft::adalora::NamedTensor<float>>& adalora = {}) {
  fs::create_directories(dir);
  std::vector<st::TensorRef> tensors;
  Checkpoint c;
  if (method == "full") {
    tensors = model_tensors(m);
    c.file = dir / "model.safetensors";
  } else {
    auto collect = [&](auto& layer) {
      const std::string prefix = "base_model.model." + layer.module_path() + ".";
      layer.visit_parameters([&](const peft::ParamRef<float>& p) {
        if (!p.trainable || p.name == "weight" || p.name == "bias") return;
        std::string t = p.name;  // "lora_A.default.weight" -> "lora_A.weight", "hada_w1_a.default" -> "hada_w1_a"
        if (const auto k = t.find(".default"); k != std::string::npos) t.erase(k, 8);
        if (t == "lora_magnitude_vector.weight") t = "lora_magnitude_vector";  // PEFT saves DoRA's m without ".weight"
        tensors.emplace_back(prefix + t, peft::ConstMatrixView<float>(p.value, 1, Index(p.size)), peft_shape(layer, t, p.size));
      });
    };
    collect(m.conv1);
    collect(m.conv2);
    if (method == "adalora") {
      for (const auto& t : adalora) {
        std::vector<std::uint64_t> shape(t.shape.begin(), t.shape.end());
        tensors.emplace_back(t.key, peft::ConstMatrixView<float>(t.data.data(), 1, Index(t.data.size())), shape);
      }
    } else {
      collect(m.fc);
    }
    const Net& cm = m;
    tensors.emplace_back("base_model.model.head.weight", cm.head.weight());  // modules_to_save
    tensors.emplace_back("base_model.model.head.bias", cm.head.bias(), std::vector<std::uint64_t>{std::uint64_t(kClasses)});
    c.file = dir / "adapter_model.safetensors";
    if (!adapter_config.is_null()) std::ofstream(dir / "adapter_config.json") << adapter_config.dump(2) << "\n";
  }
  st::write(c.file, tensors, {{"producer", "peft++ fashion_transfer"}});
  c.bytes = fs::file_size(c.file);
  // re-read: every tensor present, same shape, bit-identical
  try {
    st::File f(c.file);
    c.reread_ok = f.names().size() == tensors.size();
    for (const auto& t : tensors) {
      const auto b = f.bytes(t.name);
      const bool same = f.info(t.name).shape == t.shape && b.size() == t.byte_size() && t.rows == 1 && std::memcmp(b.data(), t.data, b.size()) == 0;
      if (!same) c.detail += " '" + t.name + "' differs";
      c.reread_ok = c.reread_ok && same;
    }
  } catch (const std::exception& e) {
    c.reread_ok = false;
    c.detail = e.what();
  }
  return c;
}

// =============================================================================================
// Workers: one run each, in its own process; each writes a JSON result.

struct Checks {
  json list = json::array();
  void add(const std::string& name, bool ok, const std::string& detail = "") { list.push_back({{"name", name}, {"ok", ok}, {"detail", detail}}); }
};

json curve_json(const std::vector<CurvePoint>& c) {
  json a = json::array();
  for (const auto& p : c) a.push_back({{"epoch", p.epoch}, {"loss", std::isnan(p.loss) ? json(nullptr) : json(p.loss)}, {"acc", p.acc}});
  return a;
}

json worker_pretrain(const Options& o) {
  const auto t0 = Clock::now();
  const Split train = load_classes(o, "train", 0, o.pretrain_limit), test = load_classes(o, "t10k", 0, o.test_limit);
  std::printf("  pretraining on %zu images of classes 0-4 (test: %zu images)\n", train.d.size(), test.d.size());
  peft::Generator init(o.seed + 1);
  Net net = make_net(init);
  peft::set_base_requires_grad(net, true);  // full training: every layer
  const auto curve = fit(net, train, test, o, o.pretrain_epochs, o.seed + 2, "pretrain");
  const std::uint64_t rss = peak_rss_bytes();
  const double acc = curve.back().acc;
  Checks checks;
  checks.add("pretrain: test accuracy above chance", acc > 0.4, std::to_string(acc));
  const fs::path p = base_cache_path(o);
  fs::create_directories(p.parent_path());
  st::write(p, model_tensors(net),
            {{"recipe", pretrain_recipe(o)}, {"test_accuracy", std::to_string(acc)}, {"test_images", std::to_string(test.d.size())}, {"seconds", std::to_string(seconds_since(t0))}, {"cpu_seconds", std::to_string(cpu_seconds_self())},
             {"curve", curve_json(curve).dump()}});
  return {{"test_accuracy", acc}, {"peak_rss_bytes", rss}, {"curve", curve_json(curve)}, {"checks", checks.list}, {"cache", p.string()},
          {"trainable_params", peft::count_parameters(net).trainable}, {"total_params", peft::count_parameters(net).total}};
}

/// AdaLoRA's recipe (the library has AdaLoRA on Linear layers only, so it adapts fc; the convolutions stay
/// frozen). target_r = --rank, the rank LoRA uses, so the saved (truncated) adapter is the size of LoRA's on
/// fc; init_r = 1.5 × target_r (rounded up), the ratio of PEFT's defaults 12 → 8, so a third of the rank
/// budget is given up during training. lora_alpha = 2 init_r: the factor lora_alpha / init_r is 2, LoRA's
/// alpha / r. Schedule over the run's `total_steps` optimizer steps: the first 10% at the full budget
/// (tinit), the last 20% at the final ranks (tfinal), reallocation every 10 steps in between (deltaT).
/// PEFT's other defaults: beta1 = beta2 = 0.85, orth_reg_weight = 0.5, E = 0 and A, B ~ N(0, 0.02²).
peft::AdaLoraConfig adalora_config(const Options& o, int total_steps) {
  peft::AdaLoraConfig c;
  c.target_r = o.rank;
  c.init_r = (3 * o.rank + 1) / 2;
  c.lora_alpha = 2.0 * c.init_r;
  c.total_step = total_steps;
  c.tinit = total_steps / 10;
  c.tfinal = std::max(1, total_steps / 5);
  c.deltaT = 10;
  return c;
}

/// Adds the method's adapters (or unfreezes what it trains); returns PEFT's adapter_config.json (null for
/// head and full) and a note for the table. `total_steps`: the run's optimizer steps (AdaLoRA's schedule).
std::pair<json, std::string> apply_method(Net& net, const std::string& method, const Options& o, int total_steps) {
  peft::Generator gen(o.seed + 3);
  net.head.set_requires_grad(true);  // the new head is always trained (modules_to_save)
  json cfg;
  std::string note;
  json targets = json::array({"conv1", "conv2", "fc"});
  const json common = {{"base_model_name_or_path", nullptr}, {"inference_mode", true}, {"modules_to_save", {"head"}}, {"task_type", nullptr},
                       {"peft_version", "0.21.2"}, {"revision", nullptr}};
  if (method == "head") {
  } else if (method == "full") {
    net.conv1.base().set_requires_grad(true);
    net.conv2.base().set_requires_grad(true);
    net.fc.base().set_requires_grad(true);
  } else if (method == "lora" || method == "dora") {
    peft::LoraConfig c;
    c.r = o.rank;
    c.lora_alpha = 2.0 * o.rank;
    c.use_dora = method == "dora";
    bool convs = true;
    try {
      net.conv1.add_adapter("default", c, gen);
    } catch (const peft::ConfigError& e) {
      if (!c.use_dora) throw;
      convs = false;  // DoRA on Conv2d not in the library yet: DoRA on fc only (a valid PEFT config: target_modules = ["fc"])
      note = "DoRA on fc only: the library's Conv2d has no DoRA yet (" + std::string(e.what()) + ")";
      targets = json::array({"fc"});
    }
    if (convs) net.conv2.add_adapter("default", c, gen);
    net.fc.add_adapter("default", c, gen);
    cfg = {{"peft_type", "LORA"}, {"r", c.r}, {"lora_alpha", c.lora_alpha}, {"lora_dropout", 0.0}, {"use_dora", c.use_dora}, {"use_rslora", false},
           {"bias", "none"}, {"fan_in_fan_out", false}, {"init_lora_weights", true}, {"lora_bias", false}, {"rank_pattern", json::object()},
           {"alpha_pattern", json::object()}, {"target_modules", targets}};
  } else if (method == "loha") {
    peft::LohaConfig c;
    c.r = o.rank;
    c.alpha = 2.0 * o.rank;
    for (auto* l : {&net.conv1, &net.conv2}) l->add_adapter("default", c, gen);
    net.fc.add_adapter("default", c, gen);
    cfg = {{"peft_type", "LOHA"}, {"r", c.r}, {"alpha", c.alpha}, {"rank_dropout", 0.0}, {"module_dropout", 0.0}, {"use_effective_conv2d", false},
           {"init_weights", true}, {"rank_pattern", json::object()}, {"alpha_pattern", json::object()}, {"target_modules", targets}};
  } else if (method == "lokr") {
    peft::LokrConfig c;
    c.r = o.rank;
    c.alpha = 2.0 * o.rank;
    for (auto* l : {&net.conv1, &net.conv2}) l->add_adapter("default", c, gen);
    net.fc.add_adapter("default", c, gen);
    cfg = {{"peft_type", "LOKR"}, {"r", c.r}, {"alpha", c.alpha}, {"rank_dropout", 0.0}, {"module_dropout", 0.0}, {"use_effective_conv2d", false},
           {"decompose_both", false}, {"decompose_factor", -1}, {"rank_dropout_scale", false}, {"init_weights", true},
           {"rank_pattern", json::object()}, {"alpha_pattern", json::object()}, {"target_modules", targets}};
  } else if (method == "ia3") {
    peft::Ia3Config c;  // output scaling on every layer (feedforward_modules empty), vectors start at one
    for (auto* l : {&net.conv1, &net.conv2}) l->add_adapter("default", c, gen);
    net.fc.add_adapter("default", c, gen);
    cfg = {{"peft_type", "IA3"}, {"feedforward_modules", json::array()}, {"init_ia3_weights", true}, {"fan_in_fan_out", false},
           {"target_modules", targets}};
  } else if (method == "adalora") {
    const peft::AdaLoraConfig c = adalora_config(o, total_steps);
    net.fc.add_adapter("default", c, gen);  // AdaLoRA on Linear only: conv1 and conv2 stay frozen
    targets = json::array({"fc"});
    note = "AdaLoRA on fc only (the library's AdaLoRA is for Linear layers; conv1, conv2 frozen): init_r " + std::to_string(c.init_r) +
           " -> target_r " + std::to_string(c.target_r) + ", alpha " + std::to_string(int(c.lora_alpha)) + ", tinit " + std::to_string(c.tinit) +
           ", tfinal " + std::to_string(c.tfinal) + ", deltaT " + std::to_string(c.deltaT) + " of " + std::to_string(c.total_step) +
           " steps; trainable = the init_r adapter, the checkpoint holds the kept ranks";
    // rank_pattern is filled in after training (worker_small), as PEFT's save_pretrained writes it
    cfg = {{"peft_type", "ADALORA"}, {"r", 8}, {"init_r", c.init_r}, {"target_r", c.target_r}, {"tinit", c.tinit}, {"tfinal", c.tfinal},
           {"deltaT", c.deltaT}, {"beta1", c.beta1}, {"beta2", c.beta2}, {"orth_reg_weight", c.orth_reg_weight}, {"total_step", c.total_step},
           {"lora_alpha", c.lora_alpha}, {"lora_dropout", 0.0}, {"fan_in_fan_out", false}, {"bias", "none"}, {"init_lora_weights", true},
           {"use_dora", false}, {"use_rslora", false}, {"lora_bias", false}, {"rank_pattern", nullptr}, {"alpha_pattern", json::object()},
           {"target_modules", targets}};
  } else {
    throw std::runtime_error("unknown method '" + method + "'");
  }
  if (!cfg.is_null()) cfg.update(common);
  return {cfg, note};
}

/// Compares the base layers' weights with the cached pretrained base, bit for bit.
bool base_unchanged(Net& net, const st::File& f, std::string& detail) {
  bool same = true;
  for (const auto& t : model_tensors(net)) {
    if (t.name.rfind("head.", 0) == 0) continue;  // the head is new
    const auto b = f.bytes(t.name);
    if (b.size() != t.byte_size() || std::memcmp(b.data(), t.data, b.size()) != 0) {
      same = false;
      detail += " " + t.name;
    }
  }
  return same;
}

json worker_small(const Options& o, const std::string& method) {
  std::string why;
  auto base = open_base(o, &why);
  if (!base) throw std::runtime_error("the pretrained base is missing: " + why);
  const Split train = load_classes(o, "train", 5, o.train_limit), test = load_classes(o, "t10k", 5, o.test_limit);

  peft::Generator init(o.seed + 1);
  Net net = make_net(init);
  load_base(net, *base);
  peft::Generator head_gen(o.seed + 4);
  net.head = Head(kHidden, kClasses, true, head_gen);  // a new head for classes 5–9, the same in every run
  const int steps_per_epoch = int((train.d.size() + std::size_t(o.batch) - 1) / std::size_t(o.batch));
  auto [adapter_config, note] = apply_method(net, method, o, steps_per_epoch * o.epochs);

  std::map<std::string, std::vector<float>> initial;  // trainable values before training, to check they move
  for (const auto& p : peft::trainable_parameters<float>(net)) initial[p.name].assign(p.value, p.value + p.size);
  const auto count = peft::count_parameters(net);

  // AdaLoRA: PEFT's orthogonal regulariser on the loss each step, the rank allocator after each optimizer step
  std::optional<peft::adalora::RankAllocator<float>> alloc;
  std::function<double()> after_backward;
  std::function<void()> after_step;
  int ada_step = 0;
  if (method == "adalora") {
    const double orth_reg_weight = adapter_config["orth_reg_weight"];
    alloc.emplace(net, adalora_config(o, steps_per_epoch * o.epochs));
    after_backward = [&net, orth_reg_weight] { return peft::adalora::add_orth_reg(net, orth_reg_weight); };
    after_step = [&] { alloc->update_and_allocate(net, ada_step++); };
  }

  const auto curve = fit(net, train, test, o, o.epochs, o.seed + 5, method, after_backward, after_step);
  const std::uint64_t rss = peak_rss_bytes();  // before the checkpoint's file I/O
  const double acc = curve.back().acc;

  Checks checks;
  checks.add(method + ": test accuracy above chance (0.2)", acc > 0.4, std::to_string(acc));
  if (method != "full") {
    std::string d;
    checks.add(method + ": frozen base bit-identical to the pretrained base", base_unchanged(net, *base, d), d);
  }
  std::size_t still = 0;
  for (const auto& p : peft::trainable_parameters<float>(net)) {
    const auto& v = initial.at(p.name);
    still += std::memcmp(v.data(), p.value, p.size * sizeof(float)) == 0;
  }
  checks.add(method + ": every trainable tensor moved", still == 0, std::to_string(still) + " unchanged");
  std::vector<peft::adalora::NamedTensor<float>> ada_tensors;
  if (alloc) {
    // The final allocation's keep masks (PEFT's rank_pattern); the checkpoint holds only the kept triplets.
    peft::adalora::RankPattern pattern = alloc->rank_pattern();
    const int init_r = adapter_config["init_r"];
    if (pattern.empty()) pattern.emplace_back("fc", std::vector<bool>(std::size_t(init_r), true));  // never masked (a tiny run)
    int kept = 0;
    json rp = json::object();
    for (const auto& [path, keep] : pattern) {
      kept += int(std::count(keep.begin(), keep.end(), true));
      rp[path + ".lora_E"] = keep;  // PEFT's saved form: "<module>.lora_E", the adapter name stripped
    }
    adapter_config["rank_pattern"] = rp;
    note += "; final rank " + std::to_string(kept) + " of " + std::to_string(init_r);
    checks.add(method + ": final rank = target budget", alloc->rank_pattern().empty() || kept == alloc->target_budget(),
               std::to_string(kept) + " vs " + std::to_string(alloc->target_budget()));
    ada_tensors = peft::adalora::state_dict<float>(net, pattern);
    // truncating to the kept ranks (what a loader does) must not change a single prediction
    peft::adalora::resize_by_rank_pattern(net, pattern);
    Workspace w = make_workspace(net, o.batch);
    const double acc_truncated = accuracy(net, w, test, o.batch);
    checks.add(method + ": truncated to the kept ranks, same test accuracy", acc_truncated == acc,
               std::to_string(acc_truncated) + " vs " + std::to_string(acc));
  }
  const Checkpoint ck = save_checkpoint(fs::path(o.out_dir) / "small" / method, net, method, adapter_config, ada_tensors);
  checks.add(method + ": checkpoint written and re-read bit-identical", ck.reread_ok, ck.file.string() + ck.detail);

  return {{"test_accuracy", acc}, {"trainable_params", count.trainable}, {"total_params", count.total}, {"peak_rss_bytes", rss},
          {"checkpoint_bytes", ck.bytes}, {"checkpoint", ck.file.string()}, {"note", note}, {"curve", curve_json(curve)}, {"checks", checks.list}};
}

// ---- the large configuration: an MLP of 53.6M parameters, memory of 10 AdamW steps ----------------

using BigLayer = peft::Adapted<peft::Linear<float>, peft::Lora>;
constexpr Index kBigIn = 784, kBigWidth = 4096, kBigOut = 10;

struct BigMlp {
  BigLayer fc0;
  BigLayer fc1;
  BigLayer fc2;
  BigLayer fc3;
  Relu relu;  // the same ReLU after every hidden layer
  Head head;
};

json worker_large(const Options& o, const std::string& method) {
  peft::Generator gen(o.seed + 11);
  BigMlp m{BigLayer(peft::Linear<float>(kBigIn, kBigWidth, true, gen), "fc0"), BigLayer(peft::Linear<float>(kBigWidth, kBigWidth, true, gen), "fc1"),
           BigLayer(peft::Linear<float>(kBigWidth, kBigWidth, true, gen), "fc2"), BigLayer(peft::Linear<float>(kBigWidth, kBigWidth, true, gen), "fc3"),
           Relu{}, Head(kBigWidth, kBigOut, true, gen)};
  BigLayer* layers[4] = {&m.fc0, &m.fc1, &m.fc2, &m.fc3};
  m.head.set_requires_grad(true);
  json cfg;
  if (method == "full") {
    for (auto* l : layers) l->base().set_requires_grad(true);
  } else {
    peft::LoraConfig c;
    c.r = o.large_rank;
    c.lora_alpha = 2.0 * o.large_rank;
    peft::Generator lg(o.seed + 12);
    for (auto* l : layers) l->add_adapter("default", c, lg);
    cfg = {{"peft_type", "LORA"}, {"r", c.r}, {"lora_alpha", c.lora_alpha}, {"target_modules", {"fc0", "fc1", "fc2", "fc3"}},
           {"modules_to_save", {"head"}}, {"use_dora", false}, {"bias", "none"}, {"task_type", nullptr}, {"base_model_name_or_path", nullptr}};
  }
  const auto count = peft::count_parameters(m);
  const Index b = o.batch;
  // random data (the memory of a step does not depend on the values): x ~ N(0, 1), labels uniform
  Mat x(b, kBigIn);
  peft::Generator dg(o.seed + 13);
  dg.normal(x.data(), std::size_t(x.size()), 0.0, 1.0);
  std::vector<int> y(static_cast<std::size_t>(b));
  std::mt19937_64 rng(o.seed + 14);
  for (auto& v : y) v = int(rng() % kBigOut);

  BigLayer::Context ctx[4];
  for (int i = 0; i < 4; ++i) ctx[i] = layers[i]->make_context(b);
  auto hctx = m.head.make_context(b);
  Mat h[4], a[4], dh[4], da[4];
  for (int i = 0; i < 4; ++i) {
    h[i].resize(b, kBigWidth), a[i].resize(b, kBigWidth), dh[i].resize(b, kBigWidth), da[i].resize(b, kBigWidth);
  }
  Mat logits(b, kBigOut), dlogits(b, kBigOut);
  const auto params = peft::trainable_parameters<float>(m);
  peft::AdamW<float> adamw(params, peft::AdamWOptions{});
  double loss = 0;
  StatusWriter status(o.status_file, method);
  for (int step = 0; step < o.large_steps; ++step) {
    for (auto* l : layers) l->zero_grad();
    m.head.zero_grad();
    for (int i = 0; i < 4; ++i) {
      layers[i]->forward(ctx[i], i == 0 ? peft::ConstMatrixView<float>(x) : peft::ConstMatrixView<float>(a[i - 1]), h[i]);
      m.relu.forward(h[i], a[i]);
    }
    m.head.forward(hctx, a[3], logits);
    loss = cross_entropy(logits, y.data(), dlogits);
    m.head.backward(hctx, dlogits, da[3]);
    for (int i = 3; i >= 0; --i) {
      m.relu.backward(a[i], da[i], dh[i]);
      layers[i]->backward(ctx[i], dh[i], i == 0 ? peft::MatrixView<float>{} : peft::MatrixView<float>(da[i - 1]));
    }
    adamw.step();
    status.epoch_done({step + 1, o.large_steps, 0.0, loss, std::nan("")});
  }
  const std::uint64_t rss = peak_rss_bytes();  // before the checkpoint's file I/O

  // checkpoint: the whole model for full (then deleted: 214 MB), the adapter + head for LoRA
  const fs::path dir = fs::path(o.out_dir) / "large" / method;
  fs::create_directories(dir);
  std::vector<st::TensorRef> tensors;
  const BigMlp& cm = m;
  const BigLayer* clayers[4] = {&cm.fc0, &cm.fc1, &cm.fc2, &cm.fc3};
  for (int i = 0; i < 4; ++i) {
    const std::string name = "fc" + std::to_string(i);
    if (method == "full") {
      tensors.emplace_back(name + ".weight", clayers[i]->base().weight());
      tensors.emplace_back(name + ".bias", clayers[i]->base().bias(), std::vector<std::uint64_t>{std::uint64_t(kBigWidth)});
    } else {
      const auto& ad = clayers[i]->adapter<peft::Lora>("default");
      tensors.emplace_back("base_model.model." + name + ".lora_A.weight", ad.a.view(ad.r, ad.in));
      tensors.emplace_back("base_model.model." + name + ".lora_B.weight", ad.b.view(ad.out, ad.r));
    }
  }
  const std::string hp = method == "full" ? "head." : "base_model.model.head.";
  tensors.emplace_back(hp + "weight", cm.head.weight());
  tensors.emplace_back(hp + "bias", cm.head.bias(), std::vector<std::uint64_t>{std::uint64_t(kBigOut)});
  const fs::path file = dir / (method == "full" ? "model.safetensors" : "adapter_model.safetensors");
  st::WriteOptions wo;
  wo.sync = false;
  st::write(file, tensors, {{"producer", "peft++ fashion_transfer (large configuration)"}}, wo);
  if (!cfg.is_null()) std::ofstream(dir / "adapter_config.json") << cfg.dump(2) << "\n";
  const std::uint64_t bytes = fs::file_size(file);
  Checks checks;
  {
    st::File f(file);
    bool same = f.names().size() == tensors.size();
    for (const auto& t : tensors) same = same && std::memcmp(f.bytes(t.name).data(), t.data, t.byte_size()) == 0;
    checks.add("large " + method + ": checkpoint written and re-read bit-identical", same, file.string());
  }
  if (method == "full") fs::remove(file);  // 214 MB: its size is what counts
  checks.add("large " + method + ": loss is finite", std::isfinite(loss), std::to_string(loss));
  return {{"test_accuracy", nullptr}, {"trainable_params", count.trainable}, {"total_params", count.total}, {"peak_rss_bytes", rss},
          {"checkpoint_bytes", bytes}, {"checkpoint", file.string()}, {"checks", checks.list}};
}

int run_worker(const Options& o) {
  json r;
  const auto colon = o.worker.find(':');
  const std::string kind = o.worker.substr(0, colon), method = colon == std::string::npos ? "" : o.worker.substr(colon + 1);
  if (kind == "pretrain") r = worker_pretrain(o);
  else if (kind == "small") r = worker_small(o, method);
  else if (kind == "large") r = worker_large(o, method);
  else throw std::runtime_error("unknown worker task '" + o.worker + "'");
  std::ofstream(o.worker_out) << r.dump() << "\n";
  return 0;
}

// =============================================================================================
// The parent: runs the workers, one process each, and reports.

struct Run {
  std::string config, method, task;
  json result;
  double seconds = 0;      ///< wall time of the worker process
  double cpu_seconds = 0;  ///< its user + system CPU time (what it would take alone on an idle core)
  bool ok = false;
};

std::vector<std::string> worker_args(const Options& o, const std::string& task, const fs::path& out, const fs::path& status) {
  return {"fashion_transfer", "--worker", task, "--worker-out", out.string(), "--status-file", status.string(), "--epochs", std::to_string(o.epochs),
          "--pretrain-epochs", std::to_string(o.pretrain_epochs), "--rank", std::to_string(o.rank), "--seed", std::to_string(o.seed),
          "--cache-dir", o.cache_dir, "--data-dir", o.data_dir, "--out-dir", o.out_dir, "--batch", std::to_string(o.batch),
          "--lr", json(o.lr).dump(), "--pretrain-limit", std::to_string(o.pretrain_limit), "--train-limit", std::to_string(o.train_limit),
          "--test-limit", std::to_string(o.test_limit), "--large-steps", std::to_string(o.large_steps), "--large-rank", std::to_string(o.large_rank)};
}

/// Runs `runs` (one phase) as worker processes, at most `jobs` at a time, and shows their progress: one bar
/// for the phase on a terminal, a line per finished epoch otherwise. Fills result, seconds and ok.
void run_workers(const Options& o, const std::string& phase, std::vector<Run*> runs, const fs::path& work) {
  struct Live {
    Run* run;
    fs::path out, status;
    Clock::time_point t0;
    int reported = 0;  ///< epochs already printed (plain output)
  };
  const bool tty = isatty(fileno(stdout)) != 0;
  const auto t0 = Clock::now();
  std::map<pid_t, Live> live;
  std::size_t next = 0, done = 0;
  auto start = [&](Run* r) {
    const fs::path out = work / (r->config + "_" + r->method + ".json"), status = work / (r->config + "_" + r->method + ".status");
    fs::remove(out);
    fs::remove(status);
    auto args = worker_args(o, r->task, out, status);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid;
    const int err = posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv.data(), environ);
    if (err != 0) throw std::runtime_error(std::string("cannot start a worker process: ") + std::strerror(err));
    live[pid] = {r, out, status, Clock::now()};
  };
  auto clear_line = [&] {
    if (tty) std::printf("\r\033[K");
  };
  auto draw = [&] {
    double frac = double(done);
    std::string running;
    for (auto& [pid, l] : live) {
      const auto s = read_status(l.status);
      if (!s) continue;
      if (s->epochs > 0) frac += std::min(1.0, (s->epoch + s->within) / s->epochs);
      if (!tty) {  // plain output: the new lines of the worker's epoch log
        std::ifstream log(l.status.string() + ".epochs");
        std::string line;
        for (int i = 0; std::getline(log, line); ++i) {
          if (log.eof()) break;  // a line still being written (no newline yet)
          if (i >= l.reported) {
            std::printf("%s\n", line.c_str());
            l.reported = i + 1;
          }
        }
        continue;
      }
      char b[96];
      std::snprintf(b, sizeof b, "%s%s %d/%d", running.empty() ? "" : " | ", l.run->method.c_str(), s->epoch + (s->within > 0), s->epochs);
      running += b;
      if (!std::isnan(s->acc)) running += " " + StatusWriter::pct(s->acc);
    }
    if (!tty) {
      std::fflush(stdout);
      return;
    }
    constexpr int width = 24;
    const double f = runs.empty() ? 1.0 : frac / double(runs.size());
    std::string bar(std::size_t(f * width), '#');
    bar.resize(width, '.');
    std::printf("\r  %-9s [%s] %3.0f%%  %5.0f s  %s\033[K", phase.c_str(), bar.c_str(), 100 * f, seconds_since(t0), running.c_str());
    std::fflush(stdout);
  };
  while (next < runs.size() || !live.empty()) {
    while (next < runs.size() && int(live.size()) < std::max(1, o.jobs)) start(runs[next++]);
    int status = 0;
    rusage ru{};
    const pid_t pid = wait4(-1, &status, WNOHANG, &ru);  // the finished worker's own CPU time
    if (pid < 0) throw std::runtime_error(std::string("wait4: ") + std::strerror(errno));
    if (pid == 0) {  // nothing finished: show progress, look again shortly
      draw();
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      continue;
    }
    const auto it = live.find(pid);
    if (it == live.end()) continue;
    draw();  // the last epochs' lines (plain output)
    Run* r = it->second.run;
    r->seconds = seconds_since(it->second.t0);
    r->cpu_seconds = double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + 1e-6 * double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
    r->ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    clear_line();
    if (r->ok) {
      std::ifstream in(it->second.out);
      try {
        r->result = json::parse(in);
      } catch (const std::exception& e) {
        r->ok = false;
        std::fprintf(stderr, "fashion_transfer: the %s/%s worker's result is unreadable: %s\n", r->config.c_str(), r->method.c_str(), e.what());
      }
    } else {
      std::fflush(stdout);
      std::fprintf(stderr, "fashion_transfer: the %s/%s worker failed (%s %d)\n", r->config.c_str(), r->method.c_str(),
                   WIFEXITED(status) ? "exit code" : "signal", WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
    }
    if (r->ok) {
      const json& acc = r->result["test_accuracy"];
      std::printf("  %-10s done in %6.1f s (CPU %.1f s)%s%s\n", r->method.c_str(), r->seconds, r->cpu_seconds, acc.is_null() ? "" : ", test accuracy ",
                  acc.is_null() ? "" : StatusWriter::pct(acc.get<double>()).c_str());
    }
    ++done;
    live.erase(it);
    std::fflush(stdout);
  }
  clear_line();
  std::fflush(stdout);
}

/// The 1-minute load average (other processes share the cores: wall times depend on it).
std::string load_average() {
  std::ifstream f("/proc/loadavg");
  std::string a;
  f >> a;
  return a.empty() ? "?" : a;
}

std::string human_bytes(double b) {
  char s[32];
  if (b >= 1e9) std::snprintf(s, sizeof s, "%.2f GB", b / 1e9);
  else if (b >= 1e6) std::snprintf(s, sizeof s, "%.1f MB", b / 1e6);
  else if (b >= 1e3) std::snprintf(s, sizeof s, "%.1f KB", b / 1e3);
  else std::snprintf(s, sizeof s, "%.0f B", b);
  return s;
}
std::string with_commas(std::uint64_t v) {
  std::string s = std::to_string(v), out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (i && (s.size() - i) % 3 == 0) out += ',';
    out += s[i];
  }
  return out;
}

bool on_path(const std::string& exe) {
  const char* path = std::getenv("PATH");
  if (!path) return false;
  std::stringstream ss(path);
  std::string dir;
  while (std::getline(ss, dir, ':'))
    if (!dir.empty() && access((fs::path(dir) / exe).c_str(), X_OK) == 0) return true;
  return false;
}

/// Writes the learning curves as CSV and, when gnuplot is on PATH, as a PNG next to it.
void write_curves(const fs::path& csv, const json& pretrain_curve, const std::vector<Run>& runs) {
  if (csv.has_parent_path()) fs::create_directories(csv.parent_path());
  std::ofstream f(csv);
  f << "phase,method,epoch,train_loss,test_accuracy\n";
  auto rows = [&](const std::string& phase, const std::string& method, const json& curve) {
    for (const auto& p : curve)
      f << phase << ',' << method << ',' << p["epoch"].get<int>() << ',' << (p["loss"].is_null() ? std::string("") : json(p["loss"]).dump()) << ','
        << p["acc"].get<double>() << '\n';
  };
  if (pretrain_curve.is_array()) rows("pretrain", "full", pretrain_curve);
  std::vector<std::string> methods;
  for (const auto& r : runs)
    if (r.ok && r.config == "small" && r.result.contains("curve")) {
      rows("transfer", r.method, r.result["curve"]);
      methods.push_back(r.method);
    }
  f.close();
  if (methods.empty() || !on_path("gnuplot")) return;
  fs::path png = csv;
  png.replace_extension(".png");
  fs::path gp = csv;
  gp.replace_extension(".gp");
  std::ofstream g(gp);
  g << "set terminal pngcairo size 900,560\nset output '" << png.string() << "'\nset datafile separator ','\n"
    << "set title 'Fashion-MNIST transfer to classes 5-9 (peft++)'\nset xlabel 'epoch'\nset ylabel 'test accuracy'\n"
    << "set key bottom right\nset grid\nset yrange [0.8:1]\nset xrange [0.8:*]\nplot ";
  for (std::size_t i = 0; i < methods.size(); ++i)
    g << (i ? ", " : "") << "'" << csv.string() << "' using 3:((strcol(1) eq 'transfer' && strcol(2) eq '" << methods[i]
      << "') ? $5 : 1/0) with linespoints title '" << methods[i] << "'";
  g << "\n";
  g.close();
  const std::string cmd = "gnuplot '" + gp.string() + "' >/dev/null 2>&1";
  // (the plot starts at epoch 1, at 80%: before training, the new head gives about chance, 20%)
  if (std::system(cmd.c_str()) == 0) std::printf("learning curves: %s, %s\n", csv.c_str(), png.c_str());
  else std::printf("learning curves: %s (gnuplot failed; no PNG)\n", csv.c_str());
}

int run_parent(Options& o, const std::vector<std::string>& methods) {
  const auto t0 = Clock::now();
  // the data, checked early (headers only) so that a missing or wrong file is reported before anything runs
  try {
    fashion::check_split(o.data_dir, "train");
    fashion::check_split(o.data_dir, "t10k");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fashion_transfer: Fashion-MNIST: %s\n", e.what());
    // --skip-if-no-data (the ctest): a machine without the dataset skips (77); a present but bad file still fails
    const bool missing = !fs::exists(fashion::find_file(o.data_dir, "train-images-idx3-ubyte"));
    return o.skip_if_no_data && missing ? 77 : 1;
  }
  std::printf("peft++ fashion_transfer%s: Fashion-MNIST from %s, rank %d, seed %llu, batch %d, AdamW lr %g\n", o.quick ? " (--quick)" : "",
              o.data_dir.c_str(), o.rank, static_cast<unsigned long long>(o.seed), o.batch, o.lr);
  const fs::path work = fs::path(o.out_dir) / "work";
  fs::create_directories(work);

  bool ok = true;
  // ---- phase 1: the pretrained base ----
  json pretrain_curve;
  double pretrain_acc = 0, pretrain_seconds = 0, pretrain_cpu = 0;
  const std::string load_start = load_average();
  std::uint64_t pretrain_rss = 0;
  bool pretrain_cached = false;
  std::string why;
  if (auto f = open_base(o, &why)) {
    pretrain_cached = true;
    const auto& md = f->metadata();
    pretrain_acc = std::stod(md.at("test_accuracy"));
    pretrain_seconds = std::stod(md.at("seconds"));
    if (md.count("cpu_seconds")) pretrain_cpu = std::stod(md.at("cpu_seconds"));
    pretrain_curve = json::parse(md.at("curve"));
    std::printf("\n== pretraining: cached base %s (classes 0-4 test accuracy %.2f%%) ==\n", base_cache_path(o).c_str(), 100 * pretrain_acc);
  } else {
    std::printf("\n== pretraining on classes 0-4, full training, %d epochs (%s) ==\n", o.pretrain_epochs, why.c_str());
    std::fflush(stdout);
    Run pre{"base", "pretrain", "pretrain", {}, 0, false};
    run_workers(o, "pretrain", {&pre}, work);
    if (!pre.ok) {
      std::fprintf(stderr, "fashion_transfer: pretraining failed\n");
      return 1;
    }
    pretrain_acc = pre.result["test_accuracy"];
    pretrain_seconds = pre.seconds;
    pretrain_cpu = pre.cpu_seconds;
    pretrain_rss = pre.result["peak_rss_bytes"];
    pretrain_curve = pre.result["curve"];
    for (const auto& c : pre.result["checks"])
      if (!c["ok"].get<bool>()) {
        ok = false;
        std::printf("CHECK FAILED: %s (%s)\n", c["name"].get<std::string>().c_str(), c["detail"].get<std::string>().c_str());
      }
  }

  // ---- phase 2: transfer to classes 5–9, one worker per method; phase 3: the large configuration ----
  std::vector<Run> runs;
  for (const auto& m : methods) runs.push_back({"small", m, "small:" + m, {}, 0, false});
  if (!o.skip_large)
    for (const char* m : {"full", "lora"}) runs.push_back({"large", m, std::string("large:") + m, {}, 0, false});
  std::vector<Run*> small, large;
  for (auto& r : runs) (r.config == "small" ? small : large).push_back(&r);
  std::printf("\n== transfer to classes 5-9: %d epochs per method from the pretrained base, %d run%s at a time ==\n", o.epochs, o.jobs,
              o.jobs > 1 ? "s" : "");
  std::fflush(stdout);
  run_workers(o, "transfer", small, work);
  if (!large.empty()) {
    std::printf("\n== memory: MLP 784-4096x4-10 (53.6M parameters), %d AdamW steps, full fine-tuning vs LoRA r=%d ==\n", o.large_steps, o.large_rank);
    std::fflush(stdout);
    run_workers(o, "memory", large, work);
  }

  // ---- report ----
  std::printf("\n== results (%s) ==\n\n", o.quick ? "--quick: reduced data and epochs, not the reference numbers" : "Fashion-MNIST, classes 5-9");
  std::printf("| config | method | test acc | trainable params | trainable %% | peak RSS | checkpoint | wall time | CPU time |\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
  std::vector<std::string> notes;
  json summary = json::array();
  for (const auto& r : runs) {
    if (!r.ok) {
      ok = false;
      std::printf("| %s | %s | failed | | | | | %.1f s | |\n", r.config.c_str(), r.method.c_str(), r.seconds);
      continue;
    }
    const json& j = r.result;
    const std::uint64_t tr = j["trainable_params"], tot = j["total_params"], rss = j["peak_rss_bytes"], ck = j["checkpoint_bytes"];
    char acc[16] = "-";
    if (!j["test_accuracy"].is_null()) std::snprintf(acc, sizeof acc, "%.2f%%", 100 * j["test_accuracy"].get<double>());
    const std::string note = j.value("note", "");
    if (!note.empty()) notes.push_back(r.method + ": " + note);
    std::printf("| %s | %s%s | %s | %s | %.2f%% | %s | %s | %.1f s | %.1f s |\n", r.config.c_str(), r.method.c_str(), note.empty() ? "" : "*", acc,
                with_commas(tr).c_str(), 100.0 * double(tr) / double(tot), human_bytes(double(rss)).c_str(), human_bytes(double(ck)).c_str(), r.seconds,
                r.cpu_seconds);
    summary.push_back({{"config", r.config}, {"method", r.method}, {"test_accuracy", j["test_accuracy"]}, {"trainable_params", tr},
                       {"total_params", tot}, {"peak_rss_bytes", rss}, {"checkpoint_bytes", ck}, {"seconds", r.seconds}});
    for (const auto& c : j["checks"])
      if (!c["ok"].get<bool>()) {
        ok = false;
        std::printf("CHECK FAILED: %s (%s)\n", c["name"].get<std::string>().c_str(), c["detail"].get<std::string>().c_str());
      }
  }
  std::printf("\npretraining (classes 0-4, full training, %d epochs): test acc %.2f%%, %s%.1f s%s\n", o.pretrain_epochs, 100 * pretrain_acc,
              pretrain_cached ? "cached (it took " : "", pretrain_seconds, pretrain_cached ? ")" : "");
  if (pretrain_rss) std::printf("  peak RSS of the pretraining process: %s\n", human_bytes(double(pretrain_rss)).c_str());
  for (const auto& n : notes) std::printf("* %s\n", n.c_str());
  std::printf("small: CNN 206,277 parameters + adapters; trainable %% = trainable / all (base + adapters), as PEFT's print_trainable_parameters.\n"
              "large: MLP 784-4096x4-10 (53.6M parameters), %d AdamW steps at batch %d on random data, LoRA r=%d on the four hidden layers + head.\n"
              "peak RSS: VmHWM of each run's own process, read after training, before its checkpoint is written.\n"
              "checkpoint: adapter_model.safetensors (PEFT's keys, with the head as modules_to_save); full: the whole model.\n",
              o.large_steps, o.batch, o.large_rank);

  // ---- targets (the issue's), from what was measured ----
  auto find = [&](const std::string& config, const std::string& method) -> const json* {
    for (const auto& r : runs)
      if (r.ok && r.config == config && r.method == method) return &r.result;
    return nullptr;
  };
  std::printf("\ntargets:\n");
  auto target = [](const char* what, bool met, const std::string& detail) { std::printf("  [%s] %s: %s\n", met ? "met" : "NOT met", what, detail.c_str()); };
  char d[256];
  if (const json *lo = find("small", "lora"), *fu = find("small", "full"), *he = find("small", "head"); lo && fu) {
    const double la = (*lo)["test_accuracy"], fa = (*fu)["test_accuracy"];
    std::snprintf(d, sizeof d, "%.2f%% vs %.2f%% = %.3f x", 100 * la, 100 * fa, la / fa);
    target("LoRA accuracy >= 0.97 x full fine-tuning's", la >= 0.97 * fa, d);
    if (he) {
      std::snprintf(d, sizeof d, "%.2f%% vs %.2f%%", 100 * la, 100 * (*he)["test_accuracy"].get<double>());
      target("LoRA accuracy clearly above head-only", la > (*he)["test_accuracy"].get<double>() + 0.01, d);
    }
    const double frac = double((*lo)["trainable_params"].get<std::uint64_t>()) / double((*lo)["total_params"].get<std::uint64_t>());
    std::snprintf(d, sizeof d, "%.2f%%", 100 * frac);
    target("LoRA trainable parameters <= 5%", frac <= 0.05, d);
    const double cf = double((*lo)["checkpoint_bytes"].get<std::uint64_t>()) / double((*fu)["checkpoint_bytes"].get<std::uint64_t>());
    std::snprintf(d, sizeof d, "%s vs %s = %.2f%%", human_bytes(double((*lo)["checkpoint_bytes"].get<std::uint64_t>())).c_str(),
                  human_bytes(double((*fu)["checkpoint_bytes"].get<std::uint64_t>())).c_str(), 100 * cf);
    target("LoRA checkpoint <= 5% of the full model's", cf <= 0.05, d);
  }
  if (const json *ad = find("small", "adalora"), *fu = find("small", "full"); ad && fu) {  // informative: not one of the targets
    const double aa = (*ad)["test_accuracy"], fa = (*fu)["test_accuracy"];
    std::snprintf(d, sizeof d, "%.2f%% vs %.2f%% = %.3f x", 100 * aa, 100 * fa, aa / fa);
    target("AdaLoRA (fc only) accuracy >= 0.97 x full fine-tuning's", aa >= 0.97 * fa, d);
    const double cf = double((*ad)["checkpoint_bytes"].get<std::uint64_t>()) / double((*fu)["checkpoint_bytes"].get<std::uint64_t>());
    std::snprintf(d, sizeof d, "%s vs %s = %.2f%%", human_bytes(double((*ad)["checkpoint_bytes"].get<std::uint64_t>())).c_str(),
                  human_bytes(double((*fu)["checkpoint_bytes"].get<std::uint64_t>())).c_str(), 100 * cf);
    target("AdaLoRA checkpoint (kept ranks) <= 5% of the full model's", cf <= 0.05, d);
  }
  if (const json *lo = find("large", "lora"), *fu = find("large", "full"); lo && fu) {
    const double ratio = double((*lo)["peak_rss_bytes"].get<std::uint64_t>()) / double((*fu)["peak_rss_bytes"].get<std::uint64_t>());
    std::snprintf(d, sizeof d, "%s vs %s = %.3f", human_bytes(double((*lo)["peak_rss_bytes"].get<std::uint64_t>())).c_str(),
                  human_bytes(double((*fu)["peak_rss_bytes"].get<std::uint64_t>())).c_str(), ratio);
    target("large: LoRA peak RSS <= 0.35 x full fine-tuning's", ratio <= 0.35, d);
    if (!(ratio < 1.0)) {
      ok = false;
      std::printf("CHECK FAILED: large: LoRA's peak RSS is not below full fine-tuning's\n");
    }
  }
  const double total = seconds_since(t0) + (pretrain_cached ? pretrain_seconds : 0.0);
  double cpu = pretrain_cpu;
  for (const auto& r : runs) cpu += r.cpu_seconds;
  const long cores = sysconf(_SC_NPROCESSORS_ONLN);
  std::snprintf(d, sizeof d, "%.1f s wall (%s; %ld cores, load average %s at the start, %s at the end)", total,
                pretrain_cached ? "pretraining time taken from the cache" : "pretraining included", cores, load_start.c_str(), load_average().c_str());
  target(o.quick ? "--quick run under 2 minutes" : "whole run under 10 minutes", total < (o.quick ? 120.0 : 600.0), d);
  std::printf("        CPU time of all runs: %.1f s, i.e. about %.0f s of wall time on %ld otherwise idle cores\n", cpu, cpu / double(std::max(1, std::min<int>(int(cores), o.jobs))), cores);

  if (!o.json_path.empty()) {
    if (fs::path(o.json_path).has_parent_path()) fs::create_directories(fs::path(o.json_path).parent_path());
    std::ofstream(o.json_path) << summary.dump(2) << "\n";
    std::printf("\nJSON summary: %s\n", o.json_path.c_str());
  }
  write_curves(o.curves_path.empty() ? fs::path(o.out_dir) / "curves.csv" : fs::path(o.curves_path), pretrain_curve, runs);
  std::printf("%s\n", ok ? "all checks passed" : "SOME CHECKS FAILED (see above)");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"peft++ flagship example: parameter-efficient transfer learning on Fashion-MNIST (pretraining on classes 0-4, transfer to 5-9 "
               "with each adapter method), with a memory comparison on a 53.6M-parameter MLP."};
  app.option_defaults()->always_capture_default();
  app.add_option("--epochs", o.epochs, "transfer epochs per method")->check(CLI::PositiveNumber);
  app.add_option("--pretrain-epochs", o.pretrain_epochs, "pretraining epochs (classes 0-4)")->check(CLI::PositiveNumber);
  app.add_option("--rank", o.rank, "adapter rank r of LoRA, DoRA, LoHa and LoKr (alpha = 2r); AdaLoRA's target_r (init_r = 1.5 r)")->check(CLI::PositiveNumber);
  app.add_option("--seed", o.seed, "seed of every random number (initialisation, batches)");
  app.add_option("--methods", o.methods, "comma-separated methods: head,full,lora,loha,lokr,ia3,dora,adalora");
  app.add_flag("--quick", o.quick, "a reduced run (subsets, 1 pretraining and 2 transfer epochs, 3 large steps) for smoke tests");
  app.add_option("--json", o.json_path, "write a JSON summary (one object per run) to this file");
  app.add_option("--curves", o.curves_path, "learning curves CSV (default <out-dir>/curves.csv; a PNG beside it if gnuplot is installed)");
  app.add_option("--cache-dir", o.cache_dir, "where the pretrained base is cached (default $XDG_CACHE_HOME/peft++ or ~/.cache/peft++)");
  app.add_option("--data-dir", o.data_dir, "directory of the Fashion-MNIST IDX files (.gz or not)");
  app.add_option("--out-dir", o.out_dir, "checkpoints, curves and worker results");
  app.add_option("--jobs", o.jobs, "runs at a time, each its own single-threaded process (default: the number of CPUs, at most 8)")->check(CLI::PositiveNumber);
  app.add_flag("--skip-large", o.skip_large, "skip the large memory configuration");
  app.add_option("--batch", o.batch, "batch size")->check(CLI::PositiveNumber);
  app.add_option("--lr", o.lr, "AdamW learning rate (pretraining and transfer)")->check(CLI::PositiveNumber);
  app.add_option("--large-steps", o.large_steps, "AdamW steps of the large configuration")->check(CLI::PositiveNumber);
  app.add_option("--large-rank", o.large_rank, "LoRA rank of the large configuration")->check(CLI::PositiveNumber);
  // reduced data (set by --quick) and the worker protocol: not for users
  app.add_option("--pretrain-limit", o.pretrain_limit)->group("");
  app.add_option("--train-limit", o.train_limit)->group("");
  app.add_option("--test-limit", o.test_limit)->group("");
  app.add_flag("--skip-if-no-data", o.skip_if_no_data)->group("");
  app.add_option("--worker", o.worker)->group("");
  app.add_option("--worker-out", o.worker_out)->group("");
  app.add_option("--status-file", o.status_file)->group("");
  CLI11_PARSE(app, argc, argv);

  if (o.quick) {  // reduced defaults, unless given explicitly
    if (app.count("--epochs") == 0) o.epochs = 2;
    if (app.count("--pretrain-epochs") == 0) o.pretrain_epochs = 1;
    if (app.count("--pretrain-limit") == 0) o.pretrain_limit = 6000;
    if (app.count("--train-limit") == 0) o.train_limit = 4000;
    if (app.count("--test-limit") == 0) o.test_limit = 1000;
    if (app.count("--large-steps") == 0) o.large_steps = 3;
  }
  if (o.cache_dir.empty()) o.cache_dir = default_cache_dir();

  try {
    if (!o.worker.empty()) return run_worker(o);
    std::vector<std::string> methods;
    std::set<std::string> seen;
    std::stringstream ss(o.methods);
    for (std::string m; std::getline(ss, m, ',');) {
      if (m.empty()) continue;
      if (!find_method(m)) {
        std::fprintf(stderr, "fashion_transfer: unknown method '%s'; available: head, full, lora, loha, lokr, ia3, dora, adalora\n", m.c_str());
        return 2;
      }
      if (seen.insert(m).second) methods.push_back(m);
    }
    return run_parent(o, methods);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fashion_transfer%s: %s\n", o.worker.empty() ? "" : (" (" + o.worker + ")").c_str(), e.what());
    return 1;
  }
}
