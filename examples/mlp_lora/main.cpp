// peft++ example: LoRA fine-tuning of an MLP that you write yourself.
//
// What this example shows
//   * A model is a plain aggregate struct of layers. peft++ walks it with Boost.PFR, so the model
//     helpers (peft::parameters, trainable_parameters, print_trainable_parameters, zero_grad, train/eval)
//     work on it with no registration. Fields that are not peft layers (our own Relu) are skipped.
//   * The training loop is yours: forward layer by layer, the loss, backward in reverse order. Each
//     layer's context (saved activations and GEMM scratch) is made once before the loop, so the loop
//     itself allocates nothing inside peft++.
//   * Phase 1, pretraining: every layer is trained (full training) on task A with AdamW.
//   * Phase 2, LoRA: the base weights are frozen, LoRA adapters (r = 4, lora_alpha = 8, PEFT's default
//     init, so the adapted model starts identical to the pretrained one) are added to fc1 and fc2, the
//     head stays trainable (PEFT's modules_to_save idea), and the model is fine-tuned on a related task B
//     with AdamW, a linear warm-up schedule and gradient clipping.
//   * A final check: the frozen base weights are bit-identical to the end of pretraining (memcmp), the
//     adapters moved, and switching the adapters off (with the pretrained head put back) gives the
//     pretrained model's task A accuracy exactly. The exit code is non-zero if a check fails or if task B
//     did not improve.
//
// The tasks: 16-dimensional Gaussian inputs labelled by a fixed random "teacher" network,
// label = argmax(relu(x W1ᵀ + b1) W2ᵀ + b2) over 4 classes. Task B's teacher is task A's with a low-rank
// change of W1 and its classes remapped: the pretrained features still help, and a low-rank update
// of the hidden layers plus a new head is enough to learn it.
//
// With --method adalora, phase 2 uses AdaLoRA instead (SVD-form adapters, init_r = 8 per layer, whose rank
// budget falls to target_r = 4 per layer on average while training): the training step adds PEFT's
// orthogonal regulariser and calls the rank allocator after each optimizer step; the example prints the
// budget as it falls and the final per-layer ranks, then truncates the adapters to their kept ranks and
// checks that the accuracy is unchanged.
//
// Usage: mlp_lora [--epochs N] [--seed N] [--method lora|adalora]     (deterministic for a given seed)
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <unistd.h>  // isatty
#include <utility>
#include <vector>

#include <peft/peft.hpp>
#include <peft/adapter/adalora.hpp>
#include <peft/train.hpp>

namespace {

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;  // peft++ is row-major
using RowVec = Eigen::RowVectorXf;
using peft::Index;

constexpr Index kIn = 16, kHidden = 128, kClasses = 4;  // the MLP: 16 → 128 → 128 → 4
constexpr Index kBatch = 64;

// ---------------------------------------------------------------------------------------------
// The model: your own struct. fc1 and fc2 can take adapters; the head is a plain Linear.

/// ReLU, written by the user (not a peft type): y = max(x, 0), dx = dy where y > 0.
struct Relu {
  void forward(const Eigen::Ref<const Mat>& x, Eigen::Ref<Mat> y) const { y = x.cwiseMax(0.0f); }
  void backward(const Eigen::Ref<const Mat>& y, const Eigen::Ref<const Mat>& dy, Eigen::Ref<Mat> dx) const {
    dx = (y.array() > 0.0f).select(dy, 0.0f);
  }
};

// fc1 and fc2 can hold LoRA or AdaLoRA adapters (the kinds are fixed at compile time, the adapters at run time).
using LoraLinear = peft::Adapted<peft::Linear<float>, peft::Lora, peft::AdaLora>;

struct Mlp {
  LoraLinear fc1;
  Relu act1;
  LoraLinear fc2;
  Relu act2;
  peft::Linear<float> head;
};

Mlp make_mlp(peft::Generator& gen) {
  // Linear(in, out, bias, gen) has PyTorch's default init. The strings are module paths, used to name
  // parameters ("fc1.weight", "fc1.lora_A.default.weight"); the head is named by its field index ("4").
  return Mlp{LoraLinear(peft::Linear<float>(kIn, kHidden, true, gen), "fc1"), Relu{},
             LoraLinear(peft::Linear<float>(kHidden, kHidden, true, gen), "fc2"), Relu{},
             peft::Linear<float>(kHidden, kClasses, true, gen)};
}

/// What a training step needs besides the model: one context per layer and the activation buffers,
/// all sized for kBatch rows. A batch of n <= kBatch rows uses their top n rows.
struct Workspace {
  LoraLinear::Context fc1, fc2;
  peft::Linear<float>::Context head;
  Mat x, h1, a1, h2, a2, logits;  // forward
  Mat dlogits, da2, dh2, da1, dh1;  // backward: gradients of the loss w.r.t. the activations
  std::vector<int> y;
};

/// Makes the contexts. Contexts made before adapters are added must be made again afterwards.
Workspace make_workspace(const Mlp& m) {
  Workspace w;
  w.fc1 = m.fc1.make_context(kBatch);
  w.fc2 = m.fc2.make_context(kBatch);
  w.head = m.head.make_context(kBatch);
  w.x.resize(kBatch, kIn);
  for (Mat* a : {&w.h1, &w.a1, &w.h2, &w.a2, &w.dh1, &w.da1, &w.dh2, &w.da2}) a->resize(kBatch, kHidden);
  w.logits.resize(kBatch, kClasses);
  w.dlogits.resize(kBatch, kClasses);
  w.y.resize(kBatch);
  return w;
}

/// Forward pass of the rows of x (at most kBatch); returns the logits. Row-major Eigen blocks convert
/// to peft's matrix views without a copy.
Mat::RowsBlockXpr forward(Mlp& m, Workspace& w, peft::ConstMatrixView<float> x) {
  const Index n = x.rows;
  m.fc1.forward(w.fc1, x, w.h1.topRows(n));
  m.act1.forward(w.h1.topRows(n), w.a1.topRows(n));
  m.fc2.forward(w.fc2, w.a1.topRows(n), w.h2.topRows(n));
  m.act2.forward(w.h2.topRows(n), w.a2.topRows(n));
  m.head.forward(w.head, w.a2.topRows(n), w.logits.topRows(n));
  return w.logits.topRows(n);
}

/// Backward pass, in reverse order, from w.dlogits. Parameter gradients accumulate (PyTorch's .grad),
/// so call peft::zero_grad(model) before each batch. Frozen weights get no gradient.
void backward(Mlp& m, Workspace& w, Index n) {
  m.head.backward(w.head, w.dlogits.topRows(n), w.da2.topRows(n));
  m.act2.backward(w.a2.topRows(n), w.da2.topRows(n), w.dh2.topRows(n));
  m.fc2.backward(w.fc2, w.dh2.topRows(n), w.da1.topRows(n));
  m.act1.backward(w.a1.topRows(n), w.da1.topRows(n), w.dh1.topRows(n));
  m.fc1.backward(w.fc1, w.dh1.topRows(n), {});  // an empty dx: no gradient w.r.t. the input data
}

/// Mean softmax cross-entropy of `logits` against `labels`; writes dLoss/dlogits into `dlogits`.
double cross_entropy(const Eigen::Ref<const Mat>& logits, const int* labels, Eigen::Ref<Mat> dlogits) {
  const Index n = logits.rows();
  double loss = 0;
  for (Index i = 0; i < n; ++i) {
    const float mx = logits.row(i).maxCoeff();
    const RowVec e = (logits.row(i).array() - mx).exp().matrix();
    const float sum = e.sum();
    loss += double(std::log(sum) + mx - logits(i, labels[i]));
    dlogits.row(i) = e / (sum * float(n));  // (softmax - onehot) / n
    dlogits(i, labels[i]) -= 1.0f / float(n);
  }
  return loss / double(n);
}

// ---------------------------------------------------------------------------------------------
// Data: a random teacher network labels Gaussian points.

struct Dataset {
  Mat x;
  std::vector<int> y;
  Index size() const { return x.rows(); }
};

struct Teacher {
  Mat w1, w2;  // [32, 16], [4, 32]
  RowVec b1, b2;

  Mat logits(const Mat& x) const {
    const Mat h = ((x * w1.transpose()).rowwise() + b1).cwiseMax(0.0f);
    return (h * w2.transpose()).rowwise() + b2;
  }
  std::vector<int> labels(const Mat& x) const {
    const Mat l = logits(x);
    std::vector<int> y(std::size_t(l.rows()));
    for (Index i = 0; i < l.rows(); ++i) l.row(i).maxCoeff(&y[std::size_t(i)]);
    return y;
  }
  /// Shifts the output biases so that the classes are about equally frequent on x.
  void balance(const Mat& x) {
    for (int it = 0; it < 50; ++it) {
      const auto y = labels(x);
      for (int c = 0; c < kClasses; ++c) {
        const double freq = (double(std::count(y.begin(), y.end(), c)) + 1.0) / double(y.size() + kClasses);
        b2(c) -= float(0.5 * std::log(freq * kClasses));
      }
    }
  }
};

Mat gaussian(peft::Generator& gen, Index rows, Index cols, double std) {
  Mat m(rows, cols);
  gen.normal(m.data(), std::size_t(m.size()), 0.0, std);
  return m;
}

Dataset make_dataset(peft::Generator& gen, const Teacher& t, Index n) {
  Dataset d{gaussian(gen, n, kIn, 1.0), {}};
  d.y = t.labels(d.x);
  return d;
}

// ---------------------------------------------------------------------------------------------
// Training and evaluation loops.

/// Fraction of correctly classified points of d (in eval mode, in kBatch chunks through the same contexts).
double accuracy(Mlp& m, Workspace& w, const Dataset& d) {
  peft::eval(m);  // eval mode switches off LoRA dropout (none here; a habit worth keeping)
  Index correct = 0;
  for (Index i = 0; i < d.size(); i += kBatch) {
    const Index n = std::min(kBatch, d.size() - i);
    const auto logits = forward(m, w, d.x.middleRows(i, n));
    for (Index r = 0; r < n; ++r) {
      Index pred;
      logits.row(r).maxCoeff(&pred);
      correct += pred == d.y[std::size_t(i + r)];
    }
  }
  peft::train(m);
  return double(correct) / double(d.size());
}

/// Fisher–Yates with std::mt19937_64 (fully specified by the standard, unlike std::shuffle), so the
/// batches are the same on every platform.
void shuffle(std::vector<Index>& order, std::mt19937_64& rng) {
  for (std::size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng() % (i + 1)]);
}

/// One epoch of mini-batch training; `optimizer_step` runs after each backward. Returns the mean loss.
template <class Step>
double train_epoch(Mlp& m, Workspace& w, const Dataset& d, std::mt19937_64& rng, Step&& optimizer_step) {
  std::vector<Index> order(std::size_t(d.size()));
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = Index(i);
  shuffle(order, rng);
  double total = 0;
  for (Index b = 0; b < d.size(); b += kBatch) {
    const Index n = std::min(kBatch, d.size() - b);
    for (Index r = 0; r < n; ++r) {  // gather the batch
      const Index src = order[std::size_t(b + r)];
      w.x.row(r) = d.x.row(src);
      w.y[std::size_t(r)] = d.y[std::size_t(src)];
    }
    peft::zero_grad(m);
    const auto logits = forward(m, w, w.x.topRows(n));
    total += cross_entropy(logits, w.y.data(), w.dlogits.topRows(n)) * double(n);
    backward(m, w, n);
    optimizer_step();
  }
  return total / double(d.size());
}

/// A text progress bar: redrawn in place with '\r' on a terminal, one line per epoch otherwise.
class ProgressBar {
 public:
  explicit ProgressBar(int epochs) : epochs_(epochs), tty_(isatty(fileno(stdout)) != 0) {}
  void update(int epoch, double loss, const char* metric, double acc) {
    constexpr int width = 20;
    const int done = epochs_ > 0 ? epoch * width / epochs_ : width;
    std::string bar(std::size_t(done), '#');
    bar.resize(width, '.');
    // On a terminal: back to the line start, redraw, clear the rest of the line (ESC [K); newline at the end.
    std::printf("%s[%s] epoch %2d/%d  loss %.4f  %s %.2f%%%s%s", tty_ ? "\r" : "", bar.c_str(), epoch, epochs_, loss, metric,
                100.0 * acc, tty_ ? "\033[K" : "", tty_ && epoch < epochs_ ? "" : "\n");
    std::fflush(stdout);
  }

 private:
  int epochs_;
  bool tty_;
};

/// Copies of every parameter of the model, by name.
using Snapshot = std::map<std::string, std::vector<float>>;
Snapshot snapshot(Mlp& m) {
  Snapshot s;
  for (const auto& p : peft::parameters<float>(m)) s[p.name].assign(p.value, p.value + p.size);
  return s;
}

double max_abs_diff(const float* a, const std::vector<float>& b) {
  double d = 0;
  for (std::size_t i = 0; i < b.size(); ++i) d = std::max(d, std::abs(double(a[i]) - double(b[i])));
  return d;
}

}  // namespace

int main(int argc, char** argv) {
  // ---- options ----------------------------------------------------------------------------------
  int epochs = 15;
  std::uint64_t seed = 0;
  std::string method = "lora";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--epochs" && i + 1 < argc) epochs = std::max(1, std::atoi(argv[++i]));
    else if (a == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--method" && i + 1 < argc && (std::string(argv[i + 1]) == "lora" || std::string(argv[i + 1]) == "adalora")) method = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--epochs N] [--seed N] [--method lora|adalora]\n", argv[0]);
      return 2;
    }
  }
  const bool ada = method == "adalora";
  std::printf("peft++ example: %s fine-tuning of a user-written MLP (%td -> %td -> %td -> %td), seed %llu\n\n", ada ? "AdaLoRA" : "LoRA", kIn, kHidden,
              kHidden, kClasses, static_cast<unsigned long long>(seed));

  // ---- data -------------------------------------------------------------------------------------
  // Every random number comes from peft::Generator (counter-based, the same on every platform).
  peft::Generator data_gen(seed);
  Teacher teacher_a{gaussian(data_gen, 32, kIn, 0.25), gaussian(data_gen, kClasses, 32, 0.25), gaussian(data_gen, 1, 32, 0.1),
                    RowVec::Zero(kClasses)};
  const Mat probe = gaussian(data_gen, 8192, kIn, 1.0);
  teacher_a.balance(probe);
  // Task B: W1 gets a rank-2 change, and the classes are remapped (class c becomes c + 1 mod 4).
  Teacher teacher_b = teacher_a;
  teacher_b.w1 += 1.0f * gaussian(data_gen, 32, 2, 1.0) * gaussian(data_gen, 2, kIn, 0.25);
  for (peft::Index c = 0; c < kClasses; ++c) teacher_b.w2.row((c + 1) % kClasses) = teacher_a.w2.row(c);
  teacher_b.w2 += gaussian(data_gen, kClasses, 32, 0.05);
  teacher_b.b2.setZero();
  teacher_b.balance(probe);

  const Dataset train_a = make_dataset(data_gen, teacher_a, 8192), test_a = make_dataset(data_gen, teacher_a, 2048);
  const Dataset train_b = make_dataset(data_gen, teacher_b, 2048), test_b = make_dataset(data_gen, teacher_b, 2048);
  std::printf("task A: %td train / %td test points; task B: %td train / %td test points (fine-tuning data is scarcer)\n", train_a.size(),
              test_a.size(), train_b.size(), test_b.size());
  std::size_t same = 0, same_remapped = 0;
  const auto a_labels = teacher_a.labels(test_b.x);
  for (std::size_t i = 0; i < a_labels.size(); ++i) {
    same += a_labels[i] == test_b.y[i];
    same_remapped += (a_labels[i] + 1) % kClasses == test_b.y[i];
  }
  std::printf("task B's label equals task A's on %.1f%% of the test points, task A's remapped (c -> c+1 mod 4) on %.1f%%\n\n",
              100.0 * double(same) / double(test_b.size()), 100.0 * double(same_remapped) / double(test_b.size()));

  peft::Generator init_gen(seed + 1);
  Mlp model = make_mlp(init_gen);
  std::mt19937_64 batch_rng(seed + 2);

  // ---- phase 1: pretraining on task A, every layer trainable -----------------------------------
  std::printf("== phase 1: pretraining on task A (full training, no adapters yet) ==\n");
  model.fc1.base().set_requires_grad(true);  // base layers are frozen by default (PEFT's base layer)
  model.fc2.base().set_requires_grad(true);
  model.head.set_requires_grad(true);
  peft::print_trainable_parameters(model);
  {
    Workspace ws = make_workspace(model);
    const auto params = peft::trainable_parameters<float>(model);
    peft::AdamWOptions opt_a;
    opt_a.lr = 2e-3;
    peft::AdamW<float> adamw(params, opt_a);

    std::printf("task A test accuracy before: %.2f%%\n", 100.0 * accuracy(model, ws, test_a));
    ProgressBar bar(epochs);
    for (int e = 1; e <= epochs; ++e) {
      const double loss = train_epoch(model, ws, train_a, batch_rng, [&] { adamw.step(); });
      bar.update(e, loss, "task A test acc", accuracy(model, ws, test_a));
    }
  }
  Workspace ws = make_workspace(model);
  const double acc_a_pretrained = accuracy(model, ws, test_a);
  const double acc_b_pretrained = accuracy(model, ws, test_b);
  std::printf("task A test accuracy after:  %.2f%%\n", 100.0 * acc_a_pretrained);
  std::printf("task B test accuracy of the pretrained model: %.2f%%\n\n", 100.0 * acc_b_pretrained);

  const Snapshot pretrained = snapshot(model);  // the end of pretraining, to check the frozen base against
  const peft::Linear<float> pretrained_head = model.head;  // PEFT's modules_to_save keeps the original too

  // ---- phase 2: LoRA fine-tuning on task B ------------------------------------------------------
  const long steps_per_epoch = long((train_b.size() + kBatch - 1) / kBatch);
  const long total_steps = steps_per_epoch * epochs;
  if (!ada)
    std::printf("== phase 2: LoRA fine-tuning on task B (base frozen, LoRA r=4 on fc1 and fc2, head trainable) ==\n");
  else
    std::printf("== phase 2: AdaLoRA fine-tuning on task B (base frozen, AdaLoRA init_r=8 -> target_r=4 on fc1 and fc2, head trainable) ==\n");
  model.fc1.base().set_requires_grad(false);  // freeze the base (frees its gradients)
  model.fc2.base().set_requires_grad(false);
  // The head stays trainable: a new task needs a new classifier (PEFT's modules_to_save).

  peft::LoraConfig lora;
  lora.r = 4;
  lora.lora_alpha = 8;  // scaling = alpha / r = 2
  // PEFT's default init: A kaiming-uniform, B = 0, so the adapted model starts identical to the pretrained one.
  peft::AdaLoraConfig adalora;  // PEFT's AdaLoraConfig names; default init E = 0: the identity at the start as well
  adalora.init_r = 8;
  adalora.target_r = 4;
  adalora.lora_alpha = 8;                                 // ΔW = 8 / (8 + 1e-5) · B diag(E) A
  adalora.total_step = int(total_steps);                  // required
  adalora.tinit = int(total_steps / 10);                  // warm-up at the full budget
  adalora.tfinal = int(total_steps / 5);                  // fine-tuning at the final ranks
  adalora.deltaT = 4;                                     // reallocate every 4 steps while the budget falls
  peft::Generator lora_gen(seed + 3);
  peft::for_each_adapted_layer(model, [&](auto& layer) {
    if (ada) layer.add_adapter("default", adalora, lora_gen);
    else layer.add_adapter("default", lora, lora_gen);
  });
  ws = make_workspace(model);  // adding adapters invalidates contexts: make them again

  peft::print_trainable_parameters(model);
  const auto params = peft::trainable_parameters<float>(model);
  for (const auto& p : params) std::printf("  trainable: %-26s %6zu\n", p.name.c_str(), p.size);
  const Snapshot adapters_init = snapshot(model);

  const double acc_b_before = accuracy(model, ws, test_b);
  std::printf("task B test accuracy before: %.2f%% (%s the pretrained model's, since %s starts at zero)\n", 100.0 * acc_b_before,
              acc_b_before == acc_b_pretrained ? "equal to" : "DIFFERENT FROM", ada ? "lora_E" : "lora_B");

  // AdaLoRA: the rank allocator (PEFT's RankAllocator + update_and_allocate) over the model's adapters
  std::optional<peft::adalora::RankAllocator<float>> alloc;
  if (ada) {
    alloc.emplace(model, adalora);
    std::printf("AdaLoRA rank budget: %d (init_r x 2 layers) -> %d (target_r x 2 layers); warm-up to step %d, final ranks from step %d of %ld\n",
                alloc->init_budget(), alloc->target_budget(), adalora.tinit, adalora.total_step - adalora.tfinal, total_steps);
  }
  auto print_ranks = [&](const char* prefix) {
    std::printf("%s", prefix);
    if (alloc->rank_pattern().empty()) std::printf(" fc1 %d, fc2 %d (nothing masked yet)", adalora.init_r, adalora.init_r);
    for (const auto& [path, r] : alloc->ranks()) std::printf(" %s %d", path.c_str(), r);
    std::printf("\n");
  };

  const double base_lr = 1e-2;
  peft::AdamWOptions opt_b;
  opt_b.lr = base_lr;
  peft::AdamW<float> adamw(params, opt_b);
  const peft::LinearWarmup schedule(total_steps / 10, total_steps);  // 10% warm-up, then linear decay to 0
  long step = 0;
  int budget = alloc ? alloc->init_budget() : 0;
  double orth_reg = 0;
  // The first epoch's loss is high: the pretrained head confidently predicts task A's classes.
  ProgressBar bar(epochs);
  for (int e = 1; e <= epochs; ++e) {
    const double loss = train_epoch(model, ws, train_b, batch_rng, [&] {
      // AdaLoRA: PEFT adds orth_reg_weight · mean ‖AAᵀ − I‖ + ‖BᵀB − I‖ to the loss; this adds its gradient
      if (ada) orth_reg = peft::adalora::add_orth_reg(model, adalora.orth_reg_weight);
      peft::apply_schedule(adamw, base_lr, schedule, step);  // lr = base_lr * schedule(step)
      peft::clip_grad_norm(params, 1.0);                     // as torch.nn.utils.clip_grad_norm_
      adamw.step();
      if (ada) budget = alloc->update_and_allocate(model, int(step)).budget;  // after the step, before zero_grad
      ++step;
    });
    bar.update(e, loss, "task B test acc", accuracy(model, ws, test_b));
    if (ada) {
      std::printf("    step %4ld  budget %2d  orth reg %.4f  ranks:", step, budget, orth_reg);
      print_ranks("");
    }
  }
  const double acc_b_after = accuracy(model, ws, test_b);
  std::printf("task B test accuracy after:  %.2f%%\n\n", 100.0 * acc_b_after);

  // ---- check: what moved and what did not -------------------------------------------------------
  std::printf("== check ==\n");
  bool ok = true;
  for (const auto& p : peft::parameters<float>(model)) {
    if (!p.trainable) {  // frozen base weights: must be bit-identical to the end of pretraining
      const auto& ref = pretrained.at(p.name);
      const bool same_bits = ref.size() == p.size && std::memcmp(ref.data(), p.value, p.size * sizeof(float)) == 0;
      std::printf("  %-26s frozen     %s\n", p.name.c_str(), same_bits ? "bit-identical to the end of pretraining" : "CHANGED");
      ok = ok && same_bits;
    } else {  // trainable (adapters and head): must have moved
      const double delta = max_abs_diff(p.value, adapters_init.at(p.name));
      std::printf("  %-26s trainable  max|delta| = %.4g\n", p.name.c_str(), delta);
      ok = ok && delta > 0;
    }
  }
  // Switching the adapters off and putting the pretrained head back gives the pretrained model again.
  peft::disable_adapters(model);
  peft::Linear<float> tuned_head = std::exchange(model.head, pretrained_head);
  const double acc_a_restored = accuracy(model, ws, test_a);
  model.head = std::move(tuned_head);
  peft::enable_adapters(model);
  std::printf("  task A with adapters disabled and the pretrained head: %.2f%% (end of pretraining: %.2f%%)\n", 100.0 * acc_a_restored,
              100.0 * acc_a_pretrained);
  ok = ok && acc_a_restored == acc_a_pretrained && acc_b_before == acc_b_pretrained;
  const bool improved = acc_b_after > acc_b_before;
  if (ada) {
    // the final allocation: keep masks per layer (PEFT's rank_pattern), then truncate the adapters to their
    // kept triplets (what PEFT saves); ranknum, hence the scale, stays that of init_r, so nothing changes
    for (const auto& [path, keep] : alloc->rank_pattern()) {
      std::printf("  %s final rank %td of %d, kept triplets: ", path.c_str(), std::count(keep.begin(), keep.end(), true), adalora.init_r);
      for (bool k : keep) std::printf("%d", int(k));
      std::printf("\n");
    }
    const auto ranks = alloc->ranks();
    int total_rank = 0;
    for (const auto& [path, r] : ranks) total_rank += r;
    const bool on_budget = total_rank == alloc->target_budget();
    std::printf("  total final rank %d = target budget %d: %s\n", total_rank, alloc->target_budget(), on_budget ? "yes" : "NO");
    peft::adalora::resize_by_rank_pattern(model, alloc->rank_pattern());
    ws = make_workspace(model);  // the ranks changed: make the contexts again
    const double acc_b_truncated = accuracy(model, ws, test_b);
    std::printf("  task B after truncating the adapters to their kept ranks: %.2f%% (before: %.2f%%)\n", 100.0 * acc_b_truncated,
                100.0 * acc_b_after);
    ok = ok && on_budget && acc_b_truncated == acc_b_after;
  }
  std::printf("  task B improved: %.2f%% -> %.2f%%\n", 100.0 * acc_b_before, 100.0 * acc_b_after);
  std::printf("%s\n", ok && improved ? (ada ? "PASS: frozen base bit-identical, adapters moved, task B improved, ranks on budget"
                                            : "PASS: frozen base bit-identical, adapters moved, task B improved")
                                     : "FAIL: see the lines above");
  return ok && improved ? 0 : 1;
}
