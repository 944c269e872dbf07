// peft++ example: a small byte-level language model on Debian's fortunes, adapted with LoRA and the
// prompt-learning methods (prompt tuning, P-tuning, prefix tuning, multitask prompt tuning).
//
// What this example does
//   * Data: every category file of the fortunes package (/usr/share/games/fortunes/<category>, quotes separated
//     by lines holding only `%`). Each category's quotes are shuffled with a fixed seed and 10% are held out.
//     Tokens are bytes (0-255) plus two special tokens: 256 ends a quote, 257 separates a quote from its label.
//   * Pretraining: a GPT-2-like decoder (peft::nn::Decoder: d_model 128, 4 layers, 4 heads, context 128,
//     about 0.88M parameters) trained from scratch with AdamW on random 128-token windows of the training
//     quotes of all categories, batch 16, a fixed number of steps. The result is cached in --cache-dir as
//     safetensors (PyTorch-like parameter names) together with the recipe; a later run with the same recipe
//     loads it.
//   * Domain adaptation: the frozen LM is adapted to one category's text (default startrek) by each method of
//     the method table for a fixed number of steps (--domain-steps; --seconds adds an optional wall-clock cap),
//     and the held-out bits per byte on that category is compared with the unadapted LM. All methods are
//     evaluated on the same windows of 128 - 16 tokens (16 = the virtual tokens of the prompt methods).
//   * Classification (PEFT's twitter_complaints recipe in miniature): a quote truncated to 96 bytes, the
//     separator, then the category word; training teaches the LM to produce the word, prediction is the
//     candidate word with the highest log-likelihood. A 4-way task (computers, songs-poems, science,
//     politics) and a 2-way task (computers vs songs-poems), both balanced (the majority baseline is chance),
//     --cls-steps steps each. Multitask prompt tuning learns both tasks in one run (two tasks sharing one
//     prompt, a task id per batch row, 2 x --cls-steps steps).
//   * A final table (held-out bpb, accuracies, trainable parameters, steps and seconds) and --json.
//
// Methods (one setup function each, in the `methods` table): LoRA r 8 on q_proj/v_proj of every attention
// (Adapted<Linear, Lora>), prompt tuning (PEFT's TEXT and RANDOM init, 16 virtual tokens), P-tuning (16
// virtual tokens through PEFT's MLP or LSTM prompt encoder, PEFT's defaults: encoder_hidden_size = d_model,
// 2 LSTM layers, no dropout), prefix tuning (16 virtual tokens per layer with prefix_projection, fed as past
// keys/values), multitask prompt tuning (16 virtual tokens, rank 1, TEXT init) and full fine-tuning
// (classification only).
//
// Checks (exit code 1 when one fails): every loss finite, each method lowers its loss on a fixed probe set of
// training batches by at least --min-probe-drop nats, the frozen base weights bit-identical after every
// method but full fine-tuning.
//
// Usage: fortunes_lm [--quick] [--category startrek] [--pretrain-steps N] [--domain-steps N] [--cls-steps N]
//                    [--seconds S] [--cache-dir DIR] [--json PATH] ...   (fortunes_lm --help lists every option)
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdlib>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <peft/io/safetensors.hpp>
#include <peft/nn/decoder.hpp>
#include <peft/nn/loss.hpp>
#include <peft/peft.hpp>
#include <peft/prompt/multitask_prompt_tuning.hpp>
#include <peft/prompt/p_tuning.hpp>
#include <peft/prompt/prefix_tuning.hpp>
#include <peft/prompt/prompt_tuning.hpp>
#include <peft/train.hpp>

namespace {

namespace fs = std::filesystem;
namespace st = peft::safetensors;
using peft::Index;
using Clock = std::chrono::steady_clock;

constexpr std::int64_t kEnd = 256;  // ends a quote
constexpr std::int64_t kSep = 257;  // separates a quote from its label word
constexpr Index kVocab = 258;
constexpr Index kContext = 128;
constexpr Index kVirtual = 16;                 // virtual tokens of the prompt methods
constexpr Index kEvalSeq = kContext - kVirtual;  // every method is evaluated on windows of this length
constexpr std::size_t kQuoteBytes = 96;        // classification: quote truncated to this many bytes
long g_warmup = 10;                            // warm-up steps of the adaptation runs (4 in --quick)
bool g_train_on_probe = false;                 // --quick: train on the probe batches (an optimisation sanity check)

using Proj = peft::Adapted<peft::Linear<float>, peft::Lora>;
using LM = peft::nn::Decoder<float, Proj, peft::Linear<float>>;

struct Options {
  std::string data_dir = "/usr/share/games/fortunes";
  std::string category = "startrek";
  std::string cache_dir = "fortunes_cache";
  std::string json;
  bool quick = false;
  bool skip_if_no_data = false;
  long pretrain_steps = 1200;
  Index batch = 16;
  double pretrain_lr = 2e-3;
  long domain_steps = 200;  // AdamW steps of each domain-adaptation run
  long cls_steps = 200;     // AdamW steps of each classification run (multitask prompt tuning: twice, one joint run)
  double seconds = 0;       // optional wall-clock cap of each run (0: none)
  double min_probe_drop = 1e-3;  // each run must lower its probe loss by at least this many nats
  double lora_lr = 1e-2;
  double prompt_lr = 3e-2;
  double ptuning_lr = 1e-3;       // P-tuning with the MLP encoder
  double ptuning_lstm_lr = 1e-2;  // P-tuning with the LSTM encoder (1e-3 and 3e-4 left its held-out bpb above the unadapted LM's)
  double mpt_lr = 3e-2;
  double full_lr = 5e-4;
  double prefix_lr = 3e-3;
  int seed = 0;
  std::vector<std::string> methods;  // empty: all
  bool no_classify = false;
  bool no_domain = false;
  std::vector<std::string> lr_given;  // the --*-lr options given on the command line (--quick uses them instead of its own rates)
};

// ---------------------------------------------------------------------------------------------- data

struct Category {
  std::string name;
  std::vector<std::string> train, test;
};

std::vector<std::string> read_quotes(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read fortune file " + file.string() + ": " + std::strerror(errno));
  std::vector<std::string> quotes;
  std::string line, cur;
  auto flush = [&] {
    while (!cur.empty() && (cur.back() == '\n' || cur.back() == ' ' || cur.back() == '\t')) cur.pop_back();
    if (!cur.empty()) quotes.push_back(cur);
    cur.clear();
  };
  while (std::getline(in, line)) {
    if (line == "%") flush();
    else cur += line + "\n";
  }
  if (in.bad()) throw std::runtime_error("error reading fortune file " + file.string());
  flush();
  if (quotes.empty()) throw std::runtime_error("fortune file " + file.string() + " holds no quotes");
  return quotes;
}

std::uint64_t fnv1a(std::string_view s) {
  std::uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

/// Every category file of `dir` (regular files without the .dat / .u8 companions), each split 90/10.
std::vector<Category> load_corpus(const fs::path& dir, int seed) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw std::runtime_error("fortunes directory " + dir.string() + " does not exist (apt-get install fortunes fortunes-min)");
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir)) {
    const auto p = e.path();
    if (e.is_symlink() || !e.is_regular_file() || p.has_extension()) continue;
    files.push_back(p);
  }
  std::sort(files.begin(), files.end());
  if (files.empty()) throw std::runtime_error("fortunes directory " + dir.string() + " holds no category files");
  std::vector<Category> cats;
  for (const auto& f : files) {
    Category c{f.filename().string(), {}, {}};
    auto q = read_quotes(f);
    std::mt19937_64 rng(fnv1a(c.name) ^ std::uint64_t(seed));
    std::shuffle(q.begin(), q.end(), rng);
    const std::size_t n_test = std::max<std::size_t>(1, q.size() / 10);
    c.test.assign(q.end() - std::ptrdiff_t(n_test), q.end());
    c.train.assign(q.begin(), q.end() - std::ptrdiff_t(n_test));
    cats.push_back(std::move(c));
  }
  return cats;
}

const Category& find_category(const std::vector<Category>& cats, const std::string& name, const fs::path& dir) {
  for (const auto& c : cats)
    if (c.name == name) return c;
  throw std::runtime_error("category '" + name + "': no fortune file " + (dir / name).string());
}

void append_tokens(std::vector<std::int64_t>& out, std::string_view s) {
  for (unsigned char c : s) out.push_back(c);
}
std::vector<std::int64_t> stream_of(const std::vector<std::string>& quotes) {
  std::vector<std::int64_t> s;
  for (const auto& q : quotes) {
    append_tokens(s, q);
    s.push_back(kEnd);
  }
  return s;
}

// ---------------------------------------------------------------------------------------------- progress

class Progress {
 public:
  Progress(std::string label, double total) : label_(std::move(label)), total_(total), tty_(isatty(fileno(stderr)) != 0) {}
  void update(double done, const std::string& extra) {
    if (!tty_) return;
    const int width = 30;
    const int fill = int(std::clamp(done / total_, 0.0, 1.0) * width);
    std::fprintf(stderr, "\r  %-26s [%s%s] %3d%%  %s   ", label_.c_str(), std::string(std::size_t(fill), '#').c_str(),
                 std::string(std::size_t(width - fill), '.').c_str(), int(100 * std::clamp(done / total_, 0.0, 1.0)), extra.c_str());
    std::fflush(stderr);
  }
  ~Progress() {
    if (tty_) std::fprintf(stderr, "\r%*s\r", 100, "");
  }

 private:
  std::string label_;
  double total_;
  bool tty_;
};

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

// ---------------------------------------------------------------------------------------------- model

peft::nn::DecoderConfig lm_config() {
  return peft::nn::DecoderConfig{.vocab_size = kVocab, .max_position_embeddings = kContext, .d_model = 128, .num_layers = 4, .num_heads = 4};
}

/// The LM, optionally with one prompt method in front (a prompt-tuning table, a P-tuning prompt encoder, a
/// multitask prompt or per-layer prefixes), with its contexts and buffers (allocated once).
struct Model {
  explicit Model(LM l) : lm(std::move(l)) {}
  LM lm;
  std::optional<peft::PromptEmbedding<float>> prompt;            // prompt tuning
  std::optional<peft::PromptEncoder<float>> penc;                // P-tuning
  std::optional<peft::MultitaskPromptEmbedding<float>> mpt;      // multitask prompt tuning
  std::optional<peft::PrefixEncoder<float>> prefix;              // prefix tuning
  LM::Context ctx;
  peft::Embedding<float>::Context ectx;
  peft::PromptEmbedding<float>::Context pctx;
  peft::PromptEncoder<float>::Context pe_ctx;
  peft::MultitaskPromptEmbedding<float>::Context mpt_ctx;
  peft::PrefixEncoder<float>::Context xctx;
  std::vector<float> logits, dlogits, tok, emb, demb;
  std::vector<std::int64_t> labels_p, task0;
  Index max_batch = 0;
  Index b = 0, s = 0;  // shape of the last forward (s without the virtual tokens)

  Index past() const { return prefix ? prefix->num_virtual_tokens() : 0; }
  /// Virtual tokens prepended to the input embeddings (0 for prefix tuning, whose prefixes are past keys/values).
  Index nv() const {
    if (prompt) return prompt->num_virtual_tokens();
    if (penc) return penc->num_virtual_tokens();
    if (mpt) return mpt->num_virtual_tokens();
    return 0;
  }
  bool soft_prompt() const { return prompt || penc || mpt; }

  /// After the adapters / prompt are in place: contexts for batches of up to max_batch rows.
  void prepare(Index mb) {
    max_batch = mb;
    ctx = lm.make_context(mb, kContext, past());
    if (prefix) xctx = prefix->make_context(mb);
    ectx = lm.wte.make_context(mb * kContext);
    if (prompt) pctx = prompt->make_context(mb);
    if (penc) pe_ctx = penc->make_context(mb);
    if (mpt) mpt_ctx = mpt->make_context(mb);
    const auto rows = std::size_t(mb * kContext), d = std::size_t(lm.d_model());
    logits.assign(rows * std::size_t(kVocab), 0.f);
    dlogits.assign(rows * std::size_t(kVocab), 0.f);
    tok.assign(rows * d, 0.f);
    emb.assign(rows * d, 0.f);
    demb.assign(rows * d, 0.f);
    labels_p.assign(rows, -100);
    task0.assign(std::size_t(mb), 0);
  }

  Index total_seq() const { return nv() + s; }
  peft::MatrixView<float> logits_view() { return peft::MatrixView<float>(logits.data(), b * total_seq(), kVocab); }

  /// Forward of `batch` rows of `seq` tokens (ids must stay alive until backward). `task_ids` (one per row)
  /// are read by multitask prompt tuning only; empty means task 0 for every row.
  void forward(std::span<const std::int64_t> ids, Index batch, Index seq, std::span<const std::int64_t> task_ids = {}) {
    b = batch;
    s = seq;
    if (prefix) {  // per-layer key/value prefixes; the text takes positions past_len ... (PEFT's layout)
      prefix->forward(xctx, batch);
      lm.forward(ctx, {.batch = batch, .seq = seq, .input_ids = ids, .past_key_values = prefix->past_key_values(xctx)}, logits_view());
      return;
    }
    if (!soft_prompt()) {
      lm.forward(ctx, {.batch = batch, .seq = seq, .input_ids = ids}, logits_view());
      return;
    }
    const Index d = lm.d_model(), T = nv() + seq;
    auto tv = peft::MatrixView<float>(tok.data(), batch * seq, d);
    auto ev = peft::MatrixView<float>(emb.data(), batch * T, d);
    lm.wte.forward(ectx, ids, tv);
    if (prompt) prompt->prepend(pctx, tv, batch, seq, ev);
    else if (penc) penc->prepend(pe_ctx, tv, batch, seq, ev);
    else {
      if (task_ids.empty()) task_ids = std::span<const std::int64_t>(task0.data(), std::size_t(batch));
      mpt->prepend(mpt_ctx, tv, task_ids, seq, ev);
    }
    lm.forward(ctx, {.batch = batch, .seq = T, .inputs_embeds = ev}, logits_view());
  }

  /// Mean causal-LM loss of the last forward against `labels` (batch · seq, -100 = ignored); with
  /// `backward`, the gradients of every trainable parameter are accumulated.
  double loss(std::span<const std::int64_t> labels, bool backward) {
    const Index T = total_seq();
    std::span<const std::int64_t> lp = labels;
    if (soft_prompt()) {
      auto out = std::span<std::int64_t>(labels_p.data(), std::size_t(b * T));
      if (prompt) prompt->prepend_labels(labels, b, s, out);
      else if (penc) penc->prepend_labels(labels, b, s, out);
      else mpt->prepend_labels(labels, b, s, out);
      lp = out;
    }
    auto dl = backward ? peft::MatrixView<float>(dlogits.data(), b * T, kVocab) : peft::MatrixView<float>{};
    const double l = peft::nn::causal_lm_loss<float>(logits_view(), lp, b, T, dl);
    if (!backward) return l;
    if (soft_prompt()) {
      auto dv = peft::MatrixView<float>(demb.data(), b * T, lm.d_model());
      lm.backward(ctx, dl, {.inputs_embeds = dv});
      if (prompt) prompt->backward_from_inputs_embeds(pctx, dv, s);
      else if (penc) penc->backward_from_inputs_embeds(pe_ctx, dv, s);
      else mpt->backward_from_inputs_embeds(mpt_ctx, dv, s);
    } else if (prefix) {
      lm.backward(ctx, dl, {.past_key_values = prefix->past_key_value_grads(xctx)});
      prefix->backward(xctx);
    } else {
      lm.backward(ctx, dl);
    }
    return l;
  }

  /// log p(token at text position pos of row r | what precedes it), from the last forward (pos >= 1).
  double log_prob(Index r, Index pos, std::int64_t token) const {
    const float* row = logits.data() + std::size_t((r * total_seq() + nv() + pos - 1) * kVocab);
    double mx = row[0];
    for (Index j = 1; j < kVocab; ++j) mx = std::max(mx, double(row[j]));
    double sum = 0;
    for (Index j = 0; j < kVocab; ++j) sum += std::exp(double(row[j]) - mx);
    return double(row[token]) - mx - std::log(sum);
  }

  std::vector<peft::ParamRef<float>> trainable() {
    auto p = peft::trainable_parameters<float>(lm);
    auto add = [&](peft::ParamRef<float> r) {
      if (r.trainable) {
        r.name = "prompt_encoder.default." + r.name;
        p.push_back(r);
      }
    };
    if (prompt) prompt->visit_parameters(add);
    if (penc) penc->visit_parameters(add);
    if (mpt) mpt->visit_parameters(add);
    if (prefix) prefix->visit_parameters(add);
    return p;
  }
  std::uint64_t adapter_params() {
    std::uint64_t n = 0;
    for (const auto& r : trainable()) n += r.size;
    return n;
  }
  void zero_grad() {
    peft::zero_grad(lm);
    if (prompt) prompt->zero_grad();
    if (penc) penc->zero_grad();
    if (mpt) mpt->zero_grad();
    if (prefix) prefix->zero_grad();
  }
};

Model fresh_model(int seed) {
  peft::Generator gen{std::uint64_t(seed)};
  return Model(peft::nn::make_decoder<float, Proj>(lm_config(), gen));
}

// ---------------------------------------------------------------------------------------------- batches

struct Batch {
  std::vector<std::int64_t> ids, labels;
  std::vector<std::int64_t> task_ids;  // one per row (multitask prompt tuning); empty: task 0
  Index b = 0, s = 0;
};

/// `b` random windows of `s` tokens of `stream`; every token is a target.
void sample_windows(const std::vector<std::int64_t>& stream, Index b, Index s, std::mt19937_64& rng, Batch& out) {
  out.b = b;
  out.s = s;
  out.task_ids.clear();
  out.ids.resize(std::size_t(b * s));
  std::uniform_int_distribution<std::size_t> pick(0, stream.size() - std::size_t(s));
  for (Index i = 0; i < b; ++i) {
    const std::size_t at = pick(rng);
    std::copy_n(stream.begin() + std::ptrdiff_t(at), s, out.ids.begin() + std::ptrdiff_t(i * s));
  }
  out.labels = out.ids;
}

/// One classification row: quote (at most kQuoteBytes), separator, the label word, end. Only the word and
/// the end token are targets.
void append_example(Batch& bt, std::string_view quote, std::string_view word, Index s) {
  std::vector<std::int64_t> ids, lab;
  append_tokens(ids, quote.substr(0, std::min(quote.size(), kQuoteBytes)));
  ids.push_back(kSep);
  lab.assign(ids.size(), -100);
  const std::size_t w0 = ids.size();
  append_tokens(ids, word);
  ids.push_back(kEnd);
  for (std::size_t i = w0; i < ids.size(); ++i) lab.push_back(ids[i]);
  if (Index(ids.size()) > s) throw std::logic_error("classification row longer than the sequence length");
  while (Index(ids.size()) < s) {
    ids.push_back(kEnd);
    lab.push_back(-100);
  }
  bt.ids.insert(bt.ids.end(), ids.begin(), ids.end());
  bt.labels.insert(bt.labels.end(), lab.begin(), lab.end());
}

Index row_length(std::string_view quote, std::string_view word) { return Index(std::min(quote.size(), kQuoteBytes) + word.size() + 2); }

struct ClsTask {
  std::string name;
  std::vector<std::string> words;                        // label words = category names
  std::vector<std::vector<std::string>> train;           // per class
  std::vector<std::pair<std::string, int>> test;         // balanced
  double majority = 0;
};

ClsTask make_task(const std::string& name, const std::vector<Category>& cats, const std::vector<std::string>& names, const fs::path& dir,
                  std::size_t max_test_per_class) {
  ClsTask t{name, names, {}, {}, 0};
  std::size_t m = max_test_per_class;
  for (const auto& n : names) m = std::min(m, find_category(cats, n, dir).test.size());
  for (std::size_t k = 0; k < names.size(); ++k) {
    const auto& c = find_category(cats, names[k], dir);
    t.train.push_back(c.train);
    for (std::size_t i = 0; i < m; ++i) t.test.emplace_back(c.test[i], int(k));
  }
  std::vector<int> count(names.size(), 0);
  for (const auto& [q, k] : t.test) ++count[std::size_t(k)];
  t.majority = double(*std::max_element(count.begin(), count.end())) / double(t.test.size());
  return t;
}

/// `b` classification rows; row i belongs to tasks[i % tasks.size()] (its index is the row's task id), with a
/// class drawn uniformly.
void sample_cls(const std::vector<const ClsTask*>& tasks, Index b, std::mt19937_64& rng, Batch& out) {
  struct Pick {
    const std::string* quote;
    const std::string* word;
  };
  std::vector<Pick> rows;
  Index s = 1;
  out.task_ids.clear();
  for (Index i = 0; i < b; ++i) {
    const std::size_t ti = std::size_t(i) % tasks.size();
    const ClsTask& t = *tasks[ti];
    const std::size_t k = std::size_t(rng() % t.words.size());
    const auto& pool = t.train[k];
    const std::string* q = &pool[rng() % pool.size()];
    rows.push_back({q, &t.words[k]});
    out.task_ids.push_back(std::int64_t(ti));
    s = std::max(s, row_length(*q, t.words[k]));
  }
  out.ids.clear();
  out.labels.clear();
  out.b = b;
  out.s = s;
  for (const auto& r : rows) append_example(out, *r.quote, *r.word, s);
}
void sample_cls(const ClsTask& t, Index b, std::mt19937_64& rng, Batch& out) { sample_cls(std::vector<const ClsTask*>{&t}, b, rng, out); }

// ---------------------------------------------------------------------------------------------- evaluation

struct Bpb {
  double bits = 0;
  double tokens = 0;
  double value() const { return tokens > 0 ? bits / tokens : std::nan(""); }
};

/// Bits per byte (end tokens count as bytes) over non-overlapping windows of kEvalSeq tokens of `stream`
/// (at most max_windows of them, evenly spread).
double eval_bpb(Model& m, const std::vector<std::int64_t>& stream, std::size_t max_windows) {
  const std::size_t n_all = stream.size() / std::size_t(kEvalSeq);
  const std::size_t n = std::min(n_all, max_windows);
  if (n == 0) throw std::runtime_error("held-out text shorter than one evaluation window");
  Bpb acc;
  Batch bt;
  for (std::size_t w0 = 0; w0 < n; w0 += std::size_t(m.max_batch)) {
    const Index b = Index(std::min<std::size_t>(std::size_t(m.max_batch), n - w0));
    bt.ids.clear();
    for (Index i = 0; i < b; ++i) {
      const std::size_t at = (w0 + std::size_t(i)) * n_all / n * std::size_t(kEvalSeq);
      bt.ids.insert(bt.ids.end(), stream.begin() + std::ptrdiff_t(at), stream.begin() + std::ptrdiff_t(at + std::size_t(kEvalSeq)));
    }
    bt.labels = bt.ids;
    m.forward(bt.ids, b, kEvalSeq);
    const double count = double(b * (kEvalSeq - 1));
    acc.bits += m.loss(bt.labels, false) * count / std::log(2.0);
    acc.tokens += count;
  }
  return acc.value();
}

/// Accuracy of the word with the highest log-likelihood (sum over its bytes and the end token); every row
/// carries `task_id` (multitask prompt tuning).
double eval_accuracy(Model& m, const ClsTask& t, std::int64_t task_id = 0) {
  const Index K = Index(t.words.size());
  const Index per = std::max<Index>(1, m.max_batch / K);
  std::size_t correct = 0;
  Batch bt;
  for (std::size_t e0 = 0; e0 < t.test.size(); e0 += std::size_t(per)) {
    const std::size_t e1 = std::min(t.test.size(), e0 + std::size_t(per));
    Index s = 1;
    for (std::size_t e = e0; e < e1; ++e)
      for (const auto& w : t.words) s = std::max(s, row_length(t.test[e].first, w));
    bt.ids.clear();
    bt.labels.clear();
    for (std::size_t e = e0; e < e1; ++e)
      for (const auto& w : t.words) append_example(bt, t.test[e].first, w, s);
    const Index b = Index(e1 - e0) * K;
    bt.task_ids.assign(std::size_t(b), task_id);
    m.forward(bt.ids, b, s, bt.task_ids);
    for (std::size_t e = e0; e < e1; ++e) {
      int best = -1;
      double best_ll = -INFINITY;
      for (Index k = 0; k < K; ++k) {
        const Index r = Index(e - e0) * K + k;
        double ll = 0;
        for (Index p = 1; p < s; ++p) {
          const std::int64_t lab = bt.labels[std::size_t(r * s + p)];
          if (lab != -100) ll += m.log_prob(r, p, lab);
        }
        if (ll > best_ll) {
          best_ll = ll;
          best = int(k);
        }
      }
      correct += best == t.test[e].second;
    }
  }
  return double(correct) / double(t.test.size());
}

// ---------------------------------------------------------------------------------------------- training

struct TrainResult {
  long steps = 0;
  double seconds = 0;
  double first_loss = NAN, last_loss = NAN;  // mean over the first / last 10 steps
  double probe_before = NAN, probe_after = NAN;
  bool finite = true;
};

/// AdamW on the model's trainable parameters for `max_steps` steps (stopped early when `seconds` > 0 have
/// passed), batches from `sample`. `cosine`: linear warm-up over 5% of the steps then cosine decay (pretraining);
/// otherwise a warm-up of g_warmup steps and a constant rate. Gradients clipped to norm 1.
TrainResult train(Model& m, const std::function<void(Batch&)>& sample, double lr, double wd, double seconds, long max_steps, bool cosine,
                  const std::string& label, const std::vector<Batch>& probe) {
  TrainResult r;
  auto probe_loss = [&] {
    double s = 0;
    for (const auto& p : probe) {
      m.forward(p.ids, p.b, p.s, p.task_ids);
      s += m.loss(p.labels, false);
    }
    return s / double(probe.size());
  };
  r.probe_before = probe_loss();
  auto params = m.trainable();
  peft::AdamW<float> opt(params, {.lr = lr, .weight_decay = wd});
  std::optional<peft::CosineWarmup> sched;
  if (cosine) sched.emplace(std::max(1L, max_steps / 20), max_steps);
  Progress bar(label, double(max_steps));
  Batch bt;
  std::vector<double> losses;
  const auto t0 = Clock::now();
  for (long step = 0; step < max_steps; ++step) {
    const double el = std::chrono::duration<double>(Clock::now() - t0).count();
    if (seconds > 0 && el >= seconds) break;
    if (sched) peft::apply_schedule(opt, lr, *sched, step);
    else opt.set_lr(lr * std::min(1.0, double(step + 1) / double(g_warmup)));
    const Batch* cur = &bt;
    if (g_train_on_probe && !probe.empty()) cur = &probe[std::size_t(step) % probe.size()];
    else sample(bt);
    m.zero_grad();
    m.forward(cur->ids, cur->b, cur->s, cur->task_ids);
    const double l = m.loss(cur->labels, true);
    if (!std::isfinite(l)) r.finite = false;
    losses.push_back(l);
    peft::clip_grad_norm(std::span<const peft::ParamRef<float>>(params), 1.0);
    opt.step();
    r.steps = step + 1;
    if (step % 5 == 0) bar.update(double(step), "step " + std::to_string(step) + "  loss " + fmt("%.3f", l) + "  " + fmt("%.0f s", el));
  }
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  const std::size_t k = std::min<std::size_t>(10, losses.size());
  if (k > 0) {
    r.first_loss = std::accumulate(losses.begin(), losses.begin() + std::ptrdiff_t(k), 0.0) / double(k);
    r.last_loss = std::accumulate(losses.end() - std::ptrdiff_t(k), losses.end(), 0.0) / double(k);
  }
  r.probe_after = probe_loss();
  if (!std::isfinite(r.probe_before) || !std::isfinite(r.probe_after)) r.finite = false;
  return r;
}

// ---------------------------------------------------------------------------------------------- the cached base

std::string pretrain_recipe(const Options& o, const std::vector<Category>& cats) {
  std::size_t bytes = 0, quotes = 0;
  for (const auto& c : cats) {
    for (const auto& q : c.train) bytes += q.size();
    quotes += c.train.size() + c.test.size();
  }
  std::ostringstream s;
  s << "fortunes_lm v1; vocab " << kVocab << " d_model 128 layers 4 heads 4 context " << kContext << "; data " << cats.size() << " categories "
    << quotes << " quotes " << bytes << " train bytes; split seed " << o.seed << "; AdamW lr " << o.pretrain_lr << " wd 0.01 cosine; batch "
    << o.batch << "x" << kContext << "; steps " << o.pretrain_steps << "; init seed " << o.seed;
  return s.str();
}

fs::path cache_path(const Options& o, const std::string& recipe) {
  char h[17];
  std::snprintf(h, sizeof h, "%016llx", static_cast<unsigned long long>(fnv1a(recipe)));
  return fs::path(o.cache_dir) / (std::string("fortunes_lm_") + h + ".safetensors");
}

void save_lm(LM& lm, const fs::path& p, const std::map<std::string, std::string>& md) {
  std::vector<st::TensorRef> ts;
  for (const auto& prm : peft::parameters<float>(lm))
    ts.emplace_back(prm.name, st::Dtype::F32, std::vector<std::uint64_t>{prm.size},
                    std::span<const std::byte>(reinterpret_cast<const std::byte*>(prm.value), prm.size * sizeof(float)));
  fs::create_directories(p.parent_path().empty() ? fs::path(".") : p.parent_path());
  st::write(p, ts, md);
}

void load_lm(LM& lm, const st::File& f) {
  for (const auto& prm : peft::parameters<float>(lm)) {
    if (prm.name.find("lora_") != std::string::npos) continue;
    if (!f.contains(prm.name)) throw std::runtime_error(f.path() + ": tensor '" + prm.name + "' is missing");
    if (f.info(prm.name).numel() != prm.size)
      throw std::runtime_error(f.path() + ": tensor '" + prm.name + "' has " + std::to_string(f.info(prm.name).numel()) + " values, expected " +
                               std::to_string(prm.size));
    f.read_as<float>(prm.name, std::span<float>(prm.value, prm.size));
  }
}

// ---------------------------------------------------------------------------------------------- methods

struct Setup {
  std::vector<std::int64_t> init_text;  // PEFT's TEXT init, tokenised
  peft::Generator* gen = nullptr;
  Index num_tasks = 1;                  // multitask prompt tuning
};

void setup_lora(Model& m, const Setup& s) {
  peft::LoraConfig lc;
  lc.r = 8;
  lc.lora_alpha = 16;
  for (auto& blk : m.lm.h)
    for (auto* p : {&blk.attn.q_proj, &blk.attn.v_proj}) p->add_adapter("default", lc, *s.gen);
}
void setup_prompt(Model& m, const Setup& s, peft::PromptTuningInit init) {
  peft::PromptTuningConfig pc;
  pc.num_virtual_tokens = kVirtual;
  pc.prompt_tuning_init = init;
  if (init == peft::PromptTuningInit::text) pc.init_token_ids = s.init_text;
  m.prompt.emplace(pc, m.lm.wte.weight(), *s.gen);
}
/// PEFT's PromptEncoderConfig defaults: encoder_hidden_size = token_dim, encoder_num_layers 2, dropout 0.
void setup_ptuning(Model& m, const Setup& s, peft::PromptEncoderReparameterizationType type) {
  peft::PromptEncoderConfig pc;
  pc.num_virtual_tokens = kVirtual;
  pc.token_dim = m.lm.d_model();
  pc.encoder_reparameterization_type = type;
  m.penc.emplace(pc, *s.gen);
}
/// PEFT's MultitaskPromptTuningConfig defaults (num_ranks 1) with the TEXT init of prompt tuning.
void setup_mpt(Model& m, const Setup& s) {
  peft::MultitaskPromptTuningConfig pc;
  pc.num_virtual_tokens = kVirtual;
  pc.prompt_tuning_init = peft::MultitaskPromptTuningInit::text;
  pc.init_token_ids = s.init_text;
  pc.num_tasks = s.num_tasks;
  pc.num_ranks = 1;
  m.mpt.emplace(pc, m.lm.wte.weight(), *s.gen);
}
void setup_full(Model& m, const Setup&) { peft::set_base_requires_grad(m.lm, true); }
void setup_prefix(Model& m, const Setup& s) {
  peft::PrefixTuningConfig pc;
  pc.num_virtual_tokens = kVirtual;
  pc.prefix_projection = true;  // embedding -> Linear -> tanh -> Linear (hidden 128)
  m.prefix.emplace(pc, m.lm.config, *s.gen);
}

struct Method {
  std::string key;  // for --methods
  std::string name;
  std::function<void(Model&, const Setup&)> setup;
  double Options::*lr;
  std::string lr_option;  // its command-line option
  double quick_lr;  // --quick: 16 steps on one probe batch of a barely pretrained LM
  bool domain;      // domain adaptation run
  bool classify;    // classification runs
  bool frozen_base;
  bool multitask;   // classification: both tasks in one run, task id per row
  std::string note;
};

std::vector<Method> methods() {
  using RT = peft::PromptEncoderReparameterizationType;
  return {
      {"lora", "LoRA r8 q/v", setup_lora, &Options::lora_lr, "--lora-lr", 1e-3, true, true, true, false, "r 8, alpha 16 on q_proj and v_proj of the 4 attentions"},
      {"prompt-text", "prompt tuning TEXT", [](Model& m, const Setup& s) { setup_prompt(m, s, peft::PromptTuningInit::text); }, &Options::prompt_lr, "--prompt-lr", 3e-3,
       true, true, true, false, "16 virtual tokens from the embeddings of a text"},
      {"prompt-random", "prompt tuning RANDOM", [](Model& m, const Setup& s) { setup_prompt(m, s, peft::PromptTuningInit::random); }, &Options::prompt_lr,
       "--prompt-lr", 3e-3, true, false, true, false, "16 virtual tokens drawn from N(0, 1)"},
      {"ptuning-mlp", "P-tuning MLP", [](Model& m, const Setup& s) { setup_ptuning(m, s, RT::mlp); }, &Options::ptuning_lr, "--ptuning-lr", 3e-4, true, true, true, false,
       "16 virtual tokens through PEFT's MLP encoder (hidden 128)"},
      {"ptuning-lstm", "P-tuning LSTM", [](Model& m, const Setup& s) { setup_ptuning(m, s, RT::lstm); }, &Options::ptuning_lstm_lr, "--ptuning-lstm-lr", 3e-4, true, true, true,
       false, "16 virtual tokens through PEFT's bidirectional LSTM (2 layers, hidden 128) and MLP head"},
      {"prefix", "prefix tuning", setup_prefix, &Options::prefix_lr, "--prefix-lr", 3e-4, true, true, true, false,
       "16 virtual tokens per layer, with prefix_projection (hidden 128)"},
      {"mpt", "multitask prompt tuning", setup_mpt, &Options::mpt_lr, "--mpt-lr", 3e-2, true, true, true, true,
       "16 virtual tokens, rank 1, TEXT init; classification: the 4-way (task 0) and 2-way (task 1) tasks share one prompt"},
      {"full", "full fine-tuning", setup_full, &Options::full_lr, "--full-lr", 1e-4, false, true, false, false, "every weight trains"},
  };
}

/// A fresh model with the cached base loaded; true when every base parameter equals `f`'s bit for bit.
bool base_identical(LM& lm, const st::File& f) {
  std::vector<float> buf;
  for (const auto& prm : peft::parameters<float>(lm)) {
    if (prm.name.find("lora_") != std::string::npos) continue;
    buf.resize(prm.size);
    f.read_as<float>(prm.name, std::span<float>(buf.data(), buf.size()));
    if (std::memcmp(buf.data(), prm.value, prm.size * sizeof(float)) != 0) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------- main program

struct Row {
  std::string method;
  std::optional<double> bpb, acc4, acc2;
  std::uint64_t trainable = 0;
  std::optional<double> t_domain, t_acc4, t_acc2;  // seconds; multitask: t_acc4 is the joint run
  long steps_domain = 0, steps_acc4 = 0, steps_acc2 = 0;
  bool joint = false;  // one classification run for both tasks
  double lr = 0;
  std::string note;
};

std::string load_average() {
  double la[3];
  if (getloadavg(la, 3) != 3) return "unknown";
  return fmt("%.2f", la[0]) + " " + fmt("%.2f", la[1]) + " " + fmt("%.2f", la[2]);
}

int run(const Options& o) {
  const fs::path dir(o.data_dir);
  if (o.skip_if_no_data && !fs::is_directory(dir)) {
    std::cout << "fortunes_lm: " << dir << " not found; skipped (apt-get install fortunes fortunes-min)\n";
    return 77;
  }
  const auto run_t0 = Clock::now();
  const std::string load_start = load_average();
  const auto cats = load_corpus(dir, o.seed);
  const Category& target = find_category(cats, o.category, dir);
  const std::vector<std::string> four = {"computers", "songs-poems", "science", "politics"};
  const std::size_t max_test = o.quick ? 4 : 1000;
  ClsTask task4 = make_task("4-way", cats, four, dir, max_test);
  ClsTask task2 = make_task("2-way", cats, {"computers", "songs-poems"}, dir, max_test);

  std::vector<std::int64_t> all_train, all_test;
  std::size_t n_quotes = 0;
  for (const auto& c : cats) {
    auto a = stream_of(c.train), b = stream_of(c.test);
    all_train.insert(all_train.end(), a.begin(), a.end());
    all_test.insert(all_test.end(), b.begin(), b.end());
    n_quotes += c.train.size() + c.test.size();
  }
  const auto target_train = stream_of(target.train), target_test = stream_of(target.test);
  std::cout << "fortunes_lm: " << cats.size() << " categories, " << n_quotes << " quotes, " << all_train.size() << " training tokens, "
            << all_test.size() << " held-out tokens (10% of each category's quotes); load average at start " << load_start << "\n";
  bool ok = true;
  nlohmann::json js;
  js["quick"] = o.quick;
  js["load_average_start"] = load_start;

  // ---- pretraining (or the cached base)
  const std::string recipe = pretrain_recipe(o, cats);
  const fs::path cache = cache_path(o, recipe);
  const std::size_t eval_windows = o.quick ? 8 : 256;
  double pretrain_seconds = NAN;
  long pretrain_steps = o.pretrain_steps;
  bool from_cache = false;
  {
    std::optional<st::File> f;
    if (fs::exists(cache)) {
      try {
        st::File c(cache);
        const auto it = c.metadata().find("recipe");
        if (it != c.metadata().end() && it->second == recipe) f.emplace(std::move(c));
      } catch (const std::exception& e) {
        std::cout << "  the cached LM " << cache << " is unreadable (" << e.what() << "); pretraining again\n";
      }
    }
    if (f) {
      from_cache = true;
      const auto it = f->metadata().find("pretrain_seconds");
      if (it != f->metadata().end()) pretrain_seconds = std::stod(it->second);
      std::cout << "pretraining: loaded the cached LM " << cache.string() << " (" << recipe << ")\n";
    } else {
      std::cout << "pretraining: " << recipe << "\n";
      Model m = fresh_model(o.seed);
      peft::set_base_requires_grad(m.lm, true);
      m.prepare(o.batch);
      std::mt19937_64 rng(std::uint64_t(o.seed) + 1);
      std::vector<Batch> probe(2);
      std::mt19937_64 prng(99);
      for (auto& p : probe) sample_windows(all_train, o.batch, kContext, prng, p);
      const auto r = train(
          m, [&](Batch& b) { sample_windows(all_train, o.batch, kContext, rng, b); }, o.pretrain_lr, 0.01, 0, o.pretrain_steps, true, "pretraining",
          probe);
      pretrain_seconds = r.seconds;
      std::cout << "  " << r.steps << " steps of " << o.batch << "x" << kContext << " tokens in " << fmt("%.1f", r.seconds) << " s ("
                << fmt("%.0f", double(r.steps * o.batch * kContext) / r.seconds) << " tokens/s); training loss " << fmt("%.3f", r.first_loss)
                << " -> " << fmt("%.3f", r.last_loss) << "; load average " << load_average() << "\n";
      if (!r.finite || !(r.last_loss < r.first_loss)) {
        std::cout << "  CHECK FAILED: pretraining loss not finite or not falling\n";
        ok = false;
      }
      save_lm(m.lm, cache, {{"recipe", recipe}, {"pretrain_seconds", fmt("%.3f", r.seconds)}, {"producer", "peft++ fortunes_lm"}});
      std::cout << "  cached in " << cache.string() << "\n";
    }
  }
  g_train_on_probe = o.quick;  // after pretraining
  st::File base(cache);
  Model unadapted = fresh_model(o.seed);
  load_lm(unadapted.lm, base);
  unadapted.prepare(o.batch);
  const double heldout_all = eval_bpb(unadapted, all_test, eval_windows);
  const double bpb0 = eval_bpb(unadapted, target_test, o.quick ? 4 : 1000);
  const double acc4_0 = eval_accuracy(unadapted, task4), acc2_0 = eval_accuracy(unadapted, task2);
  std::cout << "  held-out bpb, all categories (" << eval_windows << " windows of " << kEvalSeq << "): " << fmt("%.3f", heldout_all) << "; on "
            << o.category << ": " << fmt("%.3f", bpb0) << "\n";
  const auto pc = peft::count_parameters(unadapted.lm);
  js["pretraining"] = {{"recipe", recipe},  {"steps", pretrain_steps},        {"seconds", pretrain_seconds},
                       {"from_cache", from_cache}, {"parameters", pc.total}, {"heldout_bpb_all", heldout_all}};

  std::vector<Row> rows;
  rows.push_back({"unadapted LM", bpb0, acc4_0, acc2_0, 0, {}, {}, {}, 0, 0, 0, false, 0, "zero-shot: the pretrained LM as it is"});
  rows.push_back({"majority baseline", {}, task4.majority, task2.majority, 0, {}, {}, {}, 0, 0, 0, false, 0, "balanced test sets"});

  // ---- the method table
  const Index ab = o.quick ? std::min<Index>(o.batch, 4) : o.batch;  // batch of the adaptation runs (--quick: 4)
  std::vector<std::int64_t> domain_text;  // TEXT init for domain adaptation: the start of the category's first training quote
  append_tokens(domain_text, std::string_view(target.train.front()).substr(0, std::size_t(kVirtual)));
  std::vector<std::int64_t> task_text;    // TEXT init for classification: the label words
  for (const auto& w : four) append_tokens(task_text, w + " ");
  const double seconds = o.quick ? 0 : o.seconds;

  const std::size_t n_probe = o.quick ? 1 : 2;  // --quick trains on its single probe batch
  std::vector<Batch> dprobe(n_probe);
  {
    std::mt19937_64 prng(7);
    for (auto& p : dprobe) sample_windows(target_train, ab, kEvalSeq, prng, p);
  }
  auto cls_probe = [&](const std::vector<const ClsTask*>& ts) {
    std::vector<Batch> p(n_probe);
    std::mt19937_64 prng(11);
    for (auto& b : p) sample_cls(ts, ab, prng, b);
    return p;
  };
  const auto probe4 = cls_probe({&task4}), probe2 = cls_probe({&task2}), probe_joint = cls_probe({&task4, &task2});

  auto check = [&](const Method& me, const std::string& what, const TrainResult& r, Model& m) {
    const bool finite = r.finite;
    const double drop = r.probe_before - r.probe_after;
    const bool lowered = drop >= o.min_probe_drop;
    const bool frozen = !me.frozen_base || base_identical(m.lm, base);
    if (!finite || !lowered || !frozen) {
      ok = false;
      std::cout << "  CHECK FAILED (" << me.name << ", " << what << "):" << (finite ? "" : " non-finite loss;")
                << (lowered ? "" : " probe loss lowered by " + fmt("%.5f", drop) + " nats, less than " + fmt("%.5f", o.min_probe_drop) + ";")
                << (frozen ? "" : " frozen base changed;") << "\n";
    }
    std::cout << "  checks (" << what << "): losses " << (finite ? "finite" : "NOT finite") << "; probe loss " << fmt("%.4f", r.probe_before) << " -> "
              << fmt("%.4f", r.probe_after) << " (drop " << fmt("%.4f", drop) << ", required " << fmt("%.4f", o.min_probe_drop) << ")"
              << (me.frozen_base ? std::string("; base ") + (frozen ? "bit-identical" : "CHANGED") : std::string()) << "\n";
    return nlohmann::json{{"steps", r.steps},
                          {"seconds", r.seconds},
                          {"probe_loss_before", r.probe_before},
                          {"probe_loss_after", r.probe_after},
                          {"loss_finite", finite},
                          {"base_bit_identical", me.frozen_base ? nlohmann::json(frozen) : nlohmann::json(nullptr)}};
  };

  const auto table = methods();
  for (std::size_t mi = 0; mi < table.size(); ++mi) {
    const Method& me = table[mi];
    // fixed seeds per method and run, so that --methods, --no-domain and --no-classify repeat the same runs
    const int mseed = o.seed + 100 + 10 * int(mi);
    if (!o.methods.empty() && std::find(o.methods.begin(), o.methods.end(), me.key) == o.methods.end()) continue;
    Row row;
    row.method = me.name;
    const bool lr_given = std::find(o.lr_given.begin(), o.lr_given.end(), me.lr_option) != o.lr_given.end();
    row.lr = o.quick && !lr_given ? me.quick_lr : o.*me.lr;
    row.note = me.note;
    row.joint = me.multitask;
    nlohmann::json mj;
    mj["lr"] = row.lr;
    mj["note"] = me.note;
    // --quick: domain adaptation for LoRA only. On the 30-step base context barely matters, so virtual tokens and
    // prefixes cannot lower the domain loss clearly within 16 steps (measured drops below 1e-3 nats); their code
    // path is the same in the classification runs.
    const bool run_domain = me.domain && !o.no_domain && (!o.quick || me.key == "lora");
    // --quick skips prompt tuning RANDOM: its N(0, 1) rows are ~50x this LM's embeddings, so 16 steps move its
    // probe loss by only ~3e-4 nats (measured); its path is prompt tuning TEXT's with another init.
    const bool run_classify = (me.classify || (o.quick && me.key != "prompt-random")) && !o.no_classify;
    if (run_domain) {
      peft::Generator gen{std::uint64_t(mseed + 1)};
      Model m = fresh_model(o.seed);
      load_lm(m.lm, base);
      me.setup(m, {domain_text, &gen, 1});
      m.prepare(ab);
      row.trainable = m.adapter_params();
      std::mt19937_64 rng{std::uint64_t(mseed + 1)};
      const auto r = train(
          m, [&](Batch& b) { sample_windows(target_train, ab, kEvalSeq, rng, b); }, row.lr, 0.0, seconds, o.domain_steps, false,
          me.name + " / " + o.category, dprobe);
      row.bpb = eval_bpb(m, target_test, o.quick ? 4 : 1000);
      row.t_domain = r.seconds;
      row.steps_domain = r.steps;
      std::cout << me.name << " on " << o.category << ": " << r.steps << " steps in " << fmt("%.1f", r.seconds) << " s, held-out bpb "
                << fmt("%.3f", *row.bpb) << " (unadapted " << fmt("%.3f", bpb0) << ")\n";
      mj["domain"] = check(me, "domain adaptation", r, m);
      mj["domain"]["heldout_bpb"] = *row.bpb;
      mj["domain"]["trainable_parameters"] = row.trainable;
    }
    if (run_classify && me.multitask) {
      // both tasks in one run: rows alternate between task 0 (4-way) and task 1 (2-way), one shared prompt
      peft::Generator gen{std::uint64_t(mseed + 2)};
      Model m = fresh_model(o.seed);
      load_lm(m.lm, base);
      me.setup(m, {task_text, &gen, 2});
      m.prepare(ab);
      const std::uint64_t tp = m.adapter_params();
      if (row.trainable == 0) row.trainable = tp;
      std::mt19937_64 rng{std::uint64_t(mseed + 2)};
      const std::vector<const ClsTask*> both = {&task4, &task2};
      const auto r = train(
          m, [&](Batch& b) { sample_cls(both, ab, rng, b); }, row.lr, 0.0, seconds, 2 * o.cls_steps, false, me.name + " / 4-way + 2-way",
          probe_joint);
      row.acc4 = eval_accuracy(m, task4, 0);
      row.acc2 = eval_accuracy(m, task2, 1);
      row.t_acc4 = r.seconds;
      row.steps_acc4 = r.steps;
      std::cout << me.name << ", 4-way (task 0) + 2-way (task 1) classification in one run: " << r.steps << " steps in " << fmt("%.1f", r.seconds)
                << " s, accuracy " << fmt("%.1f", 100 * *row.acc4) << "% (4-way, " << task4.test.size() << " held-out quotes), "
                << fmt("%.1f", 100 * *row.acc2) << "% (2-way, " << task2.test.size() << ")\n";
      mj["classify_joint"] = check(me, "joint classification", r, m);
      mj["classify_joint"]["accuracy_4way"] = *row.acc4;
      mj["classify_joint"]["accuracy_2way"] = *row.acc2;
      mj["classify_joint"]["trainable_parameters"] = tp;
    } else if (run_classify) {
      // --quick: the 4-way task only (the 2-way runs take the same code path; multitask prompt tuning covers both tasks)
      const std::vector<const ClsTask*> cls_tasks = o.quick ? std::vector<const ClsTask*>{&task4} : std::vector<const ClsTask*>{&task4, &task2};
      for (const ClsTask* t : cls_tasks) {
        const int tseed = mseed + (t == &task4 ? 2 : 3);
        peft::Generator gen{std::uint64_t(tseed)};
        Model m = fresh_model(o.seed);
        load_lm(m.lm, base);
        me.setup(m, {task_text, &gen, 1});
        m.prepare(ab);
        const std::uint64_t tp = m.adapter_params();
        if (row.trainable == 0) row.trainable = tp;
        std::mt19937_64 rng{std::uint64_t(tseed)};
        const auto r = train(
            m, [&](Batch& b) { sample_cls(*t, ab, rng, b); }, row.lr, me.frozen_base ? 0.0 : 0.01, seconds, o.cls_steps, false,
            me.name + " / " + t->name, t == &task4 ? probe4 : probe2);
        const double acc = eval_accuracy(m, *t);
        if (t == &task4) {
          row.acc4 = acc;
          row.t_acc4 = r.seconds;
          row.steps_acc4 = r.steps;
        } else {
          row.acc2 = acc;
          row.t_acc2 = r.seconds;
          row.steps_acc2 = r.steps;
        }
        std::cout << me.name << ", " << t->name << " classification: " << r.steps << " steps in " << fmt("%.1f", r.seconds) << " s, accuracy "
                  << fmt("%.1f", 100 * acc) << "% on " << t->test.size() << " held-out quotes\n";
        auto& slot = t == &task4 ? mj["classify_4way"] : mj["classify_2way"];
        slot = check(me, t->name + " classification", r, m);
        slot["accuracy"] = acc;
        slot["trainable_parameters"] = tp;
      }
    }
    mj["trainable_parameters"] = row.trainable;
    js["methods"][me.name] = mj;
    rows.push_back(row);
  }

  // ---- the table
  auto opt = [](const std::optional<double>& v, const char* f, double scale = 1) { return v ? fmt(f, *v * scale) : std::string("-"); };
  auto steps = [](long n) { return n > 0 ? std::to_string(n) : std::string("-"); };
  const double total_seconds = std::chrono::duration<double>(Clock::now() - run_t0).count();
  const std::string load_end = load_average();
  std::cout << "\nfortunes_lm results (" << (o.quick ? "QUICK mode: tiny budgets, numbers meaningless" : "full run") << "; pretrained LM: "
            << pc.total << " parameters, " << pretrain_steps << " steps" << (std::isfinite(pretrain_seconds) ? ", " + fmt("%.0f", pretrain_seconds) + " s" : "")
            << (from_cache ? ", from the cache" : "") << "; " << o.domain_steps << " domain / " << o.cls_steps << " classification steps per run"
            << (seconds > 0 ? ", capped at " + fmt("%.0f", seconds) + " s" : "") << ")\n";
  std::printf("| %-24s | %-7s | %-12s | %-8s | %-8s | %-10s | %-24s | %-20s |\n", "method", "lr", ("bpb " + o.category).c_str(), "4-way", "2-way",
              "trainable", "steps (dom / 4w / 2w)", "train s (dom/4w/2w)");
  std::printf("|%s|%s|%s|%s|%s|%s|%s|%s|\n", std::string(26, '-').c_str(), std::string(9, '-').c_str(), std::string(14, '-').c_str(),
              std::string(10, '-').c_str(), std::string(10, '-').c_str(), std::string(12, '-').c_str(), std::string(26, '-').c_str(),
              std::string(22, '-').c_str());
  for (const auto& r : rows) {
    std::string st, t;
    if (r.joint) {
      st = steps(r.steps_domain) + " / " + steps(r.steps_acc4) + " joint";
      t = opt(r.t_domain, "%.0f") + " / " + opt(r.t_acc4, "%.0f") + " joint";
    } else {
      st = steps(r.steps_domain) + " / " + steps(r.steps_acc4) + " / " + steps(r.steps_acc2);
      t = opt(r.t_domain, "%.0f") + " / " + opt(r.t_acc4, "%.0f") + " / " + opt(r.t_acc2, "%.0f");
    }
    std::printf("| %-24s | %-7s | %-12s | %-8s | %-8s | %-10s | %-24s | %-20s |\n", r.method.c_str(), r.lr > 0 ? fmt("%.0e", r.lr).c_str() : "-",
                opt(r.bpb, "%.3f").c_str(), opt(r.acc4, "%.1f%%", 100).c_str(), opt(r.acc2, "%.1f%%", 100).c_str(),
                r.trainable ? std::to_string(r.trainable).c_str() : "-", st.c_str(), t.c_str());
  }
  std::cout << "(bpb: held-out bits per byte on " << o.category << ", windows of " << kEvalSeq << " tokens; accuracy on balanced held-out sets of "
            << task4.test.size() << " / " << task2.test.size() << " quotes; trainable: of the domain-adaptation configuration, "
            << "multitask prompt tuning's classification prompt has two tasks' factors)\n";
  std::cout << "wall time " << fmt("%.0f", total_seconds) << " s; load average at start " << load_start << ", at the end " << load_end << "\n";

  js["category"] = o.category;
  js["domain_steps"] = o.domain_steps;
  js["cls_steps"] = o.cls_steps;
  js["seconds_cap"] = seconds;
  js["min_probe_drop"] = o.min_probe_drop;
  js["heldout_bpb_unadapted"] = bpb0;
  js["majority_4way"] = task4.majority;
  js["majority_2way"] = task2.majority;
  js["accuracy_unadapted_4way"] = acc4_0;
  js["accuracy_unadapted_2way"] = acc2_0;
  js["wall_seconds"] = total_seconds;
  js["load_average_end"] = load_end;
  js["checks_passed"] = ok;
  if (!o.json.empty()) {
    const fs::path jp(o.json);
    if (jp.has_parent_path()) fs::create_directories(jp.parent_path());
    std::ofstream out(jp);
    if (!out) throw std::runtime_error("cannot write " + o.json);
    out << js.dump(2) << "\n";
  }
  std::cout << (ok ? "all checks passed" : "SOME CHECKS FAILED") << "\n";
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::cout << std::unitbuf;  // progress lines appear as they happen, also when redirected
  Options o;
  long steps_both = 0;
  CLI::App app{"peft++ example: a byte-level LM on Debian's fortunes, adapted with LoRA and the prompt-learning methods (domain adaptation and "
               "classification)"};
  app.add_option("--data-dir", o.data_dir, "directory of the fortune files");
  app.add_option("--category", o.category, "category for domain adaptation");
  app.add_option("--cache-dir", o.cache_dir, "where the pretrained LM is cached (safetensors)");
  app.add_option("--json", o.json, "write a JSON summary here");
  app.add_flag("--quick", o.quick, "tiny budgets (a sanity run for the test suite)");
  app.add_flag("--skip-if-no-data", o.skip_if_no_data, "exit 77 when the fortunes directory is missing");
  app.add_option("--pretrain-steps", o.pretrain_steps, "AdamW steps of pretraining")->check(CLI::PositiveNumber);
  app.add_option("--batch", o.batch, "sequences per batch")->check(CLI::PositiveNumber);
  app.add_option("--pretrain-lr", o.pretrain_lr, "pretraining learning rate (cosine schedule)")->check(CLI::PositiveNumber);
  app.add_option("--domain-steps", o.domain_steps, "AdamW steps of each domain-adaptation run")->check(CLI::PositiveNumber);
  app.add_option("--cls-steps", o.cls_steps, "AdamW steps of each classification run (multitask prompt tuning: twice as many, one run for both tasks)")
      ->check(CLI::PositiveNumber);
  app.add_option("--steps", steps_both, "set both --domain-steps and --cls-steps")->check(CLI::PositiveNumber);
  app.add_option("--seconds", o.seconds, "optional wall-clock cap of each adaptation and classification run (0: none)")->check(CLI::NonNegativeNumber);
  app.add_option("--min-probe-drop", o.min_probe_drop, "check: each run must lower its probe loss by at least this many nats")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--lora-lr", o.lora_lr, "LoRA learning rate")->check(CLI::PositiveNumber);
  app.add_option("--prompt-lr", o.prompt_lr, "prompt-tuning learning rate")->check(CLI::PositiveNumber);
  app.add_option("--ptuning-lr", o.ptuning_lr, "P-tuning learning rate (MLP encoder)")->check(CLI::PositiveNumber);
  app.add_option("--ptuning-lstm-lr", o.ptuning_lstm_lr, "P-tuning learning rate (LSTM encoder)")->check(CLI::PositiveNumber);
  app.add_option("--mpt-lr", o.mpt_lr, "multitask prompt tuning learning rate")->check(CLI::PositiveNumber);
  app.add_option("--full-lr", o.full_lr, "full fine-tuning learning rate")->check(CLI::PositiveNumber);
  app.add_option("--prefix-lr", o.prefix_lr, "prefix-tuning learning rate")->check(CLI::PositiveNumber);
  app.add_option("--seed", o.seed, "seed of the split, the init and the batches");
  app.add_option("--methods", o.methods, "run only these methods (lora, prompt-text, prompt-random, ptuning-mlp, ptuning-lstm, prefix, mpt, full)")
      ->delimiter(',');
  app.add_flag("--no-classify", o.no_classify, "skip the classification runs");
  app.add_flag("--no-domain", o.no_domain, "skip the domain-adaptation runs");
  CLI11_PARSE(app, argc, argv);
  for (const char* name : {"--lora-lr", "--prompt-lr", "--ptuning-lr", "--ptuning-lstm-lr", "--mpt-lr", "--full-lr", "--prefix-lr"})
    if (app.count(name) > 0) o.lr_given.push_back(name);
  if (steps_both > 0) o.domain_steps = o.cls_steps = steps_both;
  {
    std::vector<std::string> keys;
    for (const auto& m : methods()) keys.push_back(m.key);
    for (const auto& k : o.methods)
      if (std::find(keys.begin(), keys.end(), k) == keys.end()) {
        std::cerr << "fortunes_lm: unknown method '" << k << "' in --methods (known: lora, prompt-text, prompt-random, ptuning-mlp, ptuning-lstm, "
                  << "prefix, mpt, full)\n";
        return 2;
      }
  }
  if (o.quick) {
    // a barely pretrained LM, then a few steps per method on its two fixed probe batches, at each method's
    // quick rate (Method::quick_lr): an optimisation sanity check with a clear margin
    o.pretrain_steps = std::min(o.pretrain_steps, 30L);
    o.batch = std::min<Index>(o.batch, 8);
    o.domain_steps = o.cls_steps = 16;
    g_warmup = 4;
    if (app.count("--min-probe-drop") == 0) o.min_probe_drop = 5e-4;  // measured drops: 2e-3 to 0.3 nats
  }
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::cerr << "fortunes_lm: " << e.what() << "\n";
    return 1;
  }
}
