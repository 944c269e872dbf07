// peft — command-line tool for Hugging Face PEFT adapter checkpoints (adapter_config.json +
// adapter_model.safetensors).
//
//   peft inspect ADAPTER_DIR
//   peft merge --base BASE.safetensors --adapter ADAPTER_DIR [--adapter DIR2 ...] --out OUT.safetensors
//   peft combine --adapter DIR:WEIGHT [--adapter DIR:WEIGHT ...] --method METHOD [--density D] [--rank R] [--exact] --out DIR
//
// `merge` is the C++ counterpart of PEFT's merge_and_unload on a saved model (and of llama.cpp's
// export-lora): OUT holds every tensor of BASE, the weights the adapters target replaced by the merged
// ones, in BASE's dtype. `combine` is PEFT's add_weighted_adapter on saved LoRA adapters (see
// peft/merge.hpp): it writes the combined adapter in PEFT's format and needs no base model. Exit codes: 0 success, 1 a file or value that cannot be used, CLI11's codes
// (> 100) for a bad command line.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <peft/adapter/adalora.hpp>
#include <peft/adapter/ia3.hpp>
#include <peft/adapter/loha.hpp>
#include <peft/adapter/lokr.hpp>
#include <peft/adapter/lora.hpp>
#include <peft/adapter/lora_conv2d.hpp>
#include <peft/adapter/lora_embedding.hpp>
#include <peft/adapter/vera.hpp>
#include <peft/io/adapter_config.hpp>
#include <peft/io/pretrained.hpp>
#include <peft/io/prompt_checkpoint.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/merge.hpp>
#include <peft/model.hpp>
#include <peft/peft.hpp>

namespace fs = std::filesystem;
namespace st = peft::safetensors;
using peft::detail::cat;

namespace {

/// The checkpoint tensor names peft++ knows, after the module path.
const char* const known_suffixes[] = {
    ".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_magnitude_vector", ".lora_embedding_A", ".lora_embedding_B",
    ".hada_w1_a",     ".hada_w1_b",     ".hada_w2_a",   ".hada_w2_b",             ".hada_t1",          ".hada_t2",
    ".lokr_w1",       ".lokr_w1_a",     ".lokr_w1_b",   ".lokr_w2",               ".lokr_w2_a",        ".lokr_w2_b",
    ".lokr_t2",       ".ia3_l",         ".base_layer.bias",
    ".lora_A",        ".lora_B",        ".lora_E",      ".ranknum",               // AdaLoRA (bare parameters)
    ".vera_lambda_b", ".vera_lambda_d"};

struct Split {
  std::string module, tensor;
};
/// "base_model.model.<module>.<tensor>" → {module, tensor}; empty module for keys of another form.
Split split_key(const std::string& key) {
  const std::string pre = peft::io::state_dict_prefix;
  if (key.rfind(pre, 0) != 0) return {};
  const std::string rest = key.substr(pre.size());
  for (const char* s : known_suffixes) {
    const std::string suf = s;
    if (rest.size() > suf.size() && rest.compare(rest.size() - suf.size(), suf.size(), suf) == 0)
      return {rest.substr(0, rest.size() - suf.size()), suf.substr(1)};
  }
  return {};
}

std::string shape_str(const std::vector<std::uint64_t>& s) {
  std::string o = "[";
  for (std::size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

std::string with_commas(std::uint64_t v) {
  std::string s = std::to_string(v), o;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (i && (s.size() - i) % 3 == 0) o += ',';
    o += s[i];
  }
  return o;
}

fs::path weights_of(const fs::path& dir) {
  if (!fs::is_directory(dir)) throw peft::FormatError(cat(dir.string(), ": not a directory (an adapter directory holds adapter_config.json and adapter_model.safetensors)"));
  const fs::path w = dir / peft::io::adapter_weights_name;
  if (!fs::exists(w)) {
    if (fs::exists(dir / "adapter_model.bin"))
      throw peft::FormatError(cat(dir.string(), ": holds adapter_model.bin (pickle), which peft cannot read; save with safe_serialization=True"));
    throw peft::FormatError(cat(dir.string(), ": no ", peft::io::adapter_weights_name));
  }
  return w;
}

// ---------------------------------------------------------------------------------------------
/// A prompt-learning adapter (PROMPT_TUNING, P_TUNING, PREFIX_TUNING, MULTITASK_PROMPT_TUNING): model-level
/// tensors (prompt_embeddings, prefix_task_cols/rows), no module paths.
int inspect_prompt(const fs::path& dir, const peft::io::PromptAdapterConfig& cfg) {
  st::File f(weights_of(dir));
  std::cout << "adapter: " << dir.string() << "\n";
  std::cout << "method:  " << cfg.peft_type() << (cfg.task_type ? " (task_type " + *cfg.task_type + ")" : std::string())
            << ", prompt learning: virtual tokens, no weight of the model changes\n";
  if (cfg.base_model_name_or_path) std::cout << "base:    " << *cfg.base_model_name_or_path << "\n";
  if (cfg.peft_version) std::cout << "written by PEFT " << *cfg.peft_version << "\n";
  std::cout << "config:\n";
  const auto j = peft::io::to_json(cfg);
  for (auto it = j.begin(); it != j.end(); ++it)
    if (!it->is_null()) std::cout << "  " << it.key() << ": " << it->dump() << "\n";
  std::uint64_t total = 0;
  std::cout << "tensors (" << f.names().size() << "):\n";
  for (const auto& k : f.names()) {
    const auto& i = f.info(k);
    std::cout << "  " << k << "  " << st::name(i.dtype) << " " << shape_str(i.shape) << "\n";
    total += i.numel();
  }
  std::cout << "total: " << f.names().size() << " tensors, " << with_commas(total) << " parameters\n";
  return 0;
}

/// merge and combine work on weights: a prompt-learning adapter has none to merge.
void refuse_prompt_learning(const fs::path& dir, const char* what) {
  fs::path p = dir;
  if (fs::is_directory(p)) p /= "adapter_config.json";
  std::ifstream in(p, std::ios::binary);
  if (!in) return;  // read_adapter_config reports it
  const auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_object() && j.contains("peft_type") && j["peft_type"].is_string() && peft::io::is_prompt_learning_type(j["peft_type"].get<std::string>()))
    throw peft::ConfigError(cat(p.string(), ": a ", j["peft_type"].get<std::string>(), " adapter is prompt learning (virtual tokens fed to the model), it has no weights to ",
                                what, "; `peft inspect` shows it"));
}

int inspect(const fs::path& dir) {
  const fs::path weights = weights_of(dir);
  const auto any = peft::io::read_any_adapter_config(dir);
  if (const auto* p = std::get_if<peft::io::PromptAdapterConfig>(&any)) return inspect_prompt(dir, *p);
  const auto& cfg = std::get<peft::io::AdapterConfig>(any);
  st::File f(weights);
  std::cout << "adapter: " << dir.string() << "\n";
  std::cout << "method:  " << cfg.peft_type() << (cfg.task_type ? " (task_type " + *cfg.task_type + ")" : std::string()) << "\n";
  if (cfg.base_model_name_or_path) std::cout << "base:    " << *cfg.base_model_name_or_path << "\n";
  if (cfg.peft_version) std::cout << "written by PEFT " << *cfg.peft_version << "\n";
  std::cout << "config:\n";
  const auto j = peft::io::to_json(cfg);
  for (auto it = j.begin(); it != j.end(); ++it)
    if (!it->is_null()) std::cout << "  " << it.key() << ": " << it->dump() << "\n";

  std::map<std::string, std::vector<std::string>> modules;
  std::vector<std::string> other;
  for (const auto& k : f.names()) {
    const Split s = split_key(k);
    if (s.module.empty()) other.push_back(k);
    else modules[s.module].push_back(k);
  }
  std::uint64_t total = 0;
  std::cout << "modules (" << modules.size() << "):\n";
  for (const auto& [m, keys] : modules) {
    std::uint64_t n = 0;
    for (const auto& k : keys) n += f.info(k).numel();
    std::cout << "  " << m << "  (" << with_commas(n) << " parameters)\n";
    for (const auto& k : keys) {
      const auto& i = f.info(k);
      std::cout << "    " << split_key(k).tensor << "  " << st::name(i.dtype) << " " << shape_str(i.shape) << "\n";
    }
    total += n;
  }
  if (!other.empty()) {
    std::cout << "other tensors (" << other.size() << "):\n";
    for (const auto& k : other) {
      const auto& i = f.info(k);
      const std::string rest = k.rfind(peft::io::state_dict_prefix, 0) == 0 ? k.substr(std::string(peft::io::state_dict_prefix).size()) : k;
      const auto dot = rest.rfind('.');
      const char* what = (k == peft::io::vera_A_key || k == peft::io::vera_B_key) ? "  (VeRA's shared projection)"
                         : (dot != std::string::npos && peft::io::detail::listed_to_save(cfg.modules_to_save, rest.substr(0, dot))) ? "  (modules_to_save)"
                                                                                                                                    : "";
      std::cout << "  " << k << "  " << st::name(i.dtype) << " " << shape_str(i.shape) << what << "\n";
      total += i.numel();
    }
  }
  std::cout << "total: " << f.names().size() << " tensors, " << with_commas(total) << " parameters\n";
  return 0;
}

// ---------------------------------------------------------------------------------------------
// merge

using Lin = peft::Adapted<peft::Linear<float>, peft::Lora, peft::Loha, peft::Lokr, peft::Ia3, peft::AdaLora, peft::Vera>;
using Conv = peft::Adapted<peft::Conv2d<float>, peft::Lora, peft::Loha, peft::Lokr, peft::Ia3>;
using Emb = peft::Adapted<peft::Embedding<float>, peft::Lora>;
/// The modules one adapter touches, over the merge's working copies of the base weights.
struct Model {
  std::vector<Lin> lin;
  std::vector<Conv> conv;
  std::vector<Emb> emb;
};

class Merger {
 public:
  explicit Merger(const fs::path& base) : base_(base) {}

  /// The working float copy of base tensor `name` (read on first use).
  std::vector<float>& work(const std::string& name, const std::string& why) {
    auto it = work_.find(name);
    if (it != work_.end()) return it->second;
    if (!base_.contains(name)) throw peft::FormatError(cat(base_.path(), ": no tensor '", name, "' (", why, ")"));
    const auto& info = base_.info(name);
    if (!st::is_convertible(info.dtype))
      throw peft::FormatError(cat(base_.path(), ": tensor '", name, "' has dtype ", st::name(info.dtype), "; only F32, F16, BF16 and F64 weights can be merged"));
    std::vector<float> v(info.numel());
    base_.read_as<float>(name, v);
    return work_.emplace(name, std::move(v)).first->second;
  }

  void apply(const fs::path& dir) {
    const fs::path weights = weights_of(dir);
    refuse_prompt_learning(dir, "merge");
    const auto cfg = peft::io::read_adapter_config(dir);
    st::File f(weights);
    bool fan_in_fan_out = false;
    if (auto* l = cfg.get_if<peft::LoraConfig>()) fan_in_fan_out = l->fan_in_fan_out;
    if (auto* l = cfg.get_if<peft::Ia3Config>()) fan_in_fan_out = l->fan_in_fan_out;
    if (auto* l = cfg.get_if<peft::AdaLoraConfig>()) fan_in_fan_out = l->fan_in_fan_out;
    if (auto* l = cfg.get_if<peft::VeraConfig>()) fan_in_fan_out = l->fan_in_fan_out;
    const bool vera = cfg.get_if<peft::VeraConfig>() != nullptr;

    std::set<std::string> modules;
    // tensors that replace the base's: bias = "all" (biases of modules without the adapter) and
    // modules_to_save (whole trained modules, e.g. a head: PEFT's merge_and_unload keeps the trained copy)
    std::vector<std::string> plain_biases;
    const std::string pre = peft::io::state_dict_prefix;
    for (const auto& k : f.names()) {
      const Split s = split_key(k);
      const bool prefixed = k.rfind(pre, 0) == 0;
      const std::string rest = prefixed ? k.substr(pre.size()) : k;
      const auto dot = rest.rfind('.');
      if (!s.module.empty() && s.tensor != "base_layer.bias") modules.insert(s.module);
      else if (s.module.empty() && cfg.bias == peft::io::BiasMode::all && k.size() > 5 && k.compare(k.size() - 5, 5, ".bias") == 0 && prefixed)
        plain_biases.push_back(k);
      else if (s.module.empty() && prefixed && dot != std::string::npos && peft::io::detail::listed_to_save(cfg.modules_to_save, rest.substr(0, dot)))
        plain_biases.push_back(k);
      else if (s.module.empty() && vera && (k == peft::io::vera_A_key || k == peft::io::vera_B_key))
        continue;  // the shared projections: read by load_pretrained
      else if (s.module.empty())
        throw peft::FormatError(cat(f.path(), ": tensor '", k, "' is not an adapter tensor peft can merge (expected base_model.model.<module>.<lora_A.weight|hada_w1_a|lokr_w1|ia3_l|lora_E|vera_lambda_b|...>",
                                    cfg.modules_to_save ? ", or a tensor of the config's modules_to_save" : "", ")"));
    }
    if (modules.empty()) throw peft::FormatError(cat(f.path(), ": holds no adapter tensors"));

    Model m;
    m.lin.reserve(modules.size());
    m.conv.reserve(modules.size());
    m.emb.reserve(modules.size());
    for (const auto& mod : modules) {
      const std::string wname = mod + ".weight", bname = mod + ".bias";
      const std::string why = cat("the adapter targets module '", mod, "'");
      auto& w = work(wname, why);
      const auto shape = base_.info(wname).shape;
      peft::MatrixView<float> bias;
      if (base_.contains(bname)) {
        auto& b = work(bname, why);
        bias = peft::MatrixView<float>(b.data(), 1, peft::Index(b.size()));
      }
      const auto d = [&](std::size_t i) { return peft::Index(shape[i]); };
      if (f.contains(std::string(peft::io::state_dict_prefix) + mod + ".lora_embedding_A")) {
        if (shape.size() != 2) throw peft::ShapeError(cat(base_.path(), ": embedding '", wname, "' has shape ", shape_str(shape), ", expected 2-D"));
        m.emb.emplace_back(peft::Embedding<float>::borrow(peft::MatrixView<float>(w.data(), d(0), d(1))), mod);
      } else if (shape.size() == 2) {
        m.lin.emplace_back(peft::Linear<float>::borrow(peft::MatrixView<float>(w.data(), d(0), d(1)), bias,
                                                       fan_in_fan_out ? peft::WeightLayout::in_out : peft::WeightLayout::out_in),
                           mod);
      } else if (shape.size() == 4) {
        peft::Conv2dGeometry g;  // only the kernel's shape matters for merging
        g.out_channels = d(0);
        g.in_channels = d(1);
        g.kernel_h = g.in_h = d(2);
        g.kernel_w = g.in_w = d(3);
        m.conv.emplace_back(peft::Conv2d<float>::borrow(g, peft::MatrixView<float>(w.data(), d(0), d(1) * d(2) * d(3)), bias), mod);
      } else {
        throw peft::ShapeError(cat(base_.path(), ": '", wname, "' has shape ", shape_str(shape),
                                   "; peft merge handles Linear (2-D), Conv2d (4-D) and Embedding weights"));
      }
    }
    peft::io::LoadOptions opt;
    opt.strict = false;
    const auto res = peft::io::load_pretrained(m, dir, "default", opt);
    std::vector<std::string> unexpected;
    for (const auto& k : res.unexpected_keys)
      if (std::find(plain_biases.begin(), plain_biases.end(), k) == plain_biases.end()) unexpected.push_back(k);
    if (!res.missing_keys.empty() || !unexpected.empty()) {
      std::string msg = cat(f.path(), " does not fit ", base_.path(), " and its config:");
      for (const auto& k : res.missing_keys) msg += "\n  missing: " + k;
      for (const auto& k : unexpected) msg += "\n  unexpected (not selected by target_modules, or of another method): " + k;
      throw peft::FormatError(msg);
    }
    // bias = "all" and modules_to_save: the trained tensors replace the base's
    for (const auto& k : plain_biases) {
      const std::string name = k.substr(std::string(peft::io::state_dict_prefix).size());
      auto& b = work(name, cat("the adapter holds '", k, "'"));
      if (f.info(k).numel() != b.size())
        throw peft::ShapeError(cat(f.path(), ": '", k, "' has shape ", shape_str(f.info(k).shape), ", the base's '", name, "' has ", b.size(), " elements"));
      f.read_as<float>(k, b);
    }
    peft::for_each_adapted_layer(m, [](auto& layer) { layer.merge(); });
    std::cerr << "merged " << cfg.peft_type() << " adapter " << dir.string() << " into " << res.adapted_modules.size() << " module(s)\n";
  }

  void write(const fs::path& out) {
    std::vector<st::TensorRef> refs;
    std::vector<std::vector<std::byte>> converted;
    converted.reserve(work_.size());
    for (const auto& name : base_.names()) {
      auto it = work_.find(name);
      if (it == work_.end()) {
        refs.push_back(base_.ref(name));  // untouched: the base's bytes as they are
        continue;
      }
      const auto& info = base_.info(name);
      const auto& v = it->second;
      std::vector<std::byte> bytes;
      switch (info.dtype) {
        case st::Dtype::F32: bytes.resize(v.size() * 4); std::memcpy(bytes.data(), v.data(), bytes.size()); break;
        case st::Dtype::F64: {
          bytes.resize(v.size() * 8);
          for (std::size_t i = 0; i < v.size(); ++i) {
            const double x = v[i];
            std::memcpy(bytes.data() + 8 * i, &x, 8);
          }
          break;
        }
        case st::Dtype::F16:
        case st::Dtype::BF16: {
          bytes.resize(v.size() * 2);
          for (std::size_t i = 0; i < v.size(); ++i) {
            const std::uint16_t h = info.dtype == st::Dtype::F16 ? st::float_to_half(v[i]) : st::float_to_bfloat16(v[i]);
            std::memcpy(bytes.data() + 2 * i, &h, 2);
          }
          break;
        }
        default: throw peft::FormatError(cat("internal: unexpected dtype of '", name, "'"));
      }
      converted.push_back(std::move(bytes));
      refs.emplace_back(name, info.dtype, info.shape, std::span<const std::byte>(converted.back()));
    }
    std::map<std::string, std::string> meta(base_.metadata().begin(), base_.metadata().end());
    st::write(out, refs, meta);
  }

 private:
  st::File base_;
  std::map<std::string, std::vector<float>> work_;
};

int merge(const fs::path& base, const std::vector<fs::path>& adapters, const fs::path& out) {
  Merger m(base);
  for (const auto& a : adapters) m.apply(a);
  m.write(out);
  std::cerr << "wrote " << out.string() << "\n";
  return 0;
}


// ---------------------------------------------------------------------------------------------
// combine: PEFT's add_weighted_adapter on saved LoRA adapters

/// One LoRA module of one adapter file, its factors flattened as peft++ holds them.
struct LoraModule {
  enum Kind { linear, conv, embedding } kind = linear;
  peft::merging::Mat A, B;  ///< A [r, in] (conv: in = C·kh·kw), B [out, r]
  std::vector<std::uint64_t> a_shape;  ///< the file's shape of A (conv kernel)
  double scaling = 1;
};

struct LoraFile {
  fs::path dir;
  peft::io::AdapterConfig config;
  std::map<std::string, LoraModule> modules;
};

peft::merging::Mat read_matrix(const st::File& f, const std::string& key, std::uint64_t rows) {
  const auto& i = f.info(key);
  if (!st::is_convertible(i.dtype)) throw peft::FormatError(cat(f.path(), ": tensor '", key, "' has dtype ", st::name(i.dtype), "; LoRA tensors must be F32, F16, BF16 or F64"));
  if (rows == 0 || i.numel() % rows) throw peft::ShapeError(cat(f.path(), ": tensor '", key, "' has shape ", shape_str(i.shape)));
  peft::merging::Mat m(peft::Index(rows), peft::Index(i.numel() / rows));
  f.read_as<double>(key, std::span<double>(m.data(), std::size_t(m.size())));
  return m;
}

LoraFile read_lora(const fs::path& dir) {
  LoraFile lf;
  lf.dir = dir;
  const fs::path weights = weights_of(dir);
  refuse_prompt_learning(dir, "combine");
  lf.config = peft::io::read_adapter_config(dir);
  const auto* cfg = lf.config.get_if<peft::LoraConfig>();
  if (!cfg) {
    const std::string type = lf.config.peft_type();
    const char* why = type == "ADALORA" ? " (PEFT's AdaLoraModel refuses add_weighted_adapter as well)"
                      : type == "VERA"  ? " (PEFT's VeraModel has no add_weighted_adapter)"
                                        : "";
    throw peft::FormatError(cat(dir.string(), ": a ", type, " adapter; peft combine combines LoRA adapters only (PEFT's add_weighted_adapter)", why));
  }
  if (cfg->use_dora) throw peft::FormatError(cat(dir.string(), ": a DoRA adapter (use_dora); DoRA adapters cannot be combined"));
  if (cfg->lora_bias) throw peft::FormatError(cat(dir.string(), ": an adapter with lora_bias; it cannot be combined"));
  st::File f(weights);
  const std::string pre = peft::io::state_dict_prefix;
  std::map<std::string, std::map<std::string, std::string>> keys;  // module -> tensor -> key
  for (const auto& k : f.names()) {
    const Split s = split_key(k);
    if (s.module.empty() || s.tensor == "base_layer.bias")
      throw peft::FormatError(cat(f.path(), ": tensor '", k, "' is not a LoRA factor (peft combine handles lora_A/lora_B/lora_embedding_A/lora_embedding_B)"));
    keys[s.module][s.tensor] = k;
  }
  for (const auto& [mod, t] : keys) {
    LoraModule m;
    const peft::LoraConfig mc = cfg->for_module(mod);
    std::string ka, kb;
    if (t.count("lora_embedding_A")) {
      m.kind = LoraModule::embedding;
      ka = t.at("lora_embedding_A");
      kb = t.count("lora_embedding_B") ? t.at("lora_embedding_B") : "";
    } else if (t.count("lora_A.weight")) {
      ka = t.at("lora_A.weight");
      kb = t.count("lora_B.weight") ? t.at("lora_B.weight") : "";
      m.kind = f.info(ka).shape.size() == 4 ? LoraModule::conv : LoraModule::linear;
    }
    if (ka.empty() || kb.empty() || t.size() != 2)
      throw peft::FormatError(cat(f.path(), ": module '", mod, "' must hold exactly lora_A and lora_B (or lora_embedding_A and lora_embedding_B); it has ", t.size(), " tensor(s)"));
    m.a_shape = f.info(ka).shape;
    const auto& bs = f.info(kb).shape;
    m.A = read_matrix(f, ka, m.a_shape.empty() ? 0 : m.a_shape[0]);
    m.B = read_matrix(f, kb, bs.empty() ? 0 : bs[0]);
    if (m.A.rows() != mc.r || m.B.cols() != mc.r)
      throw peft::ShapeError(cat(f.path(), ": module '", mod, "': '", ka, "' has shape ", shape_str(m.a_shape), " and '", kb, "' ", shape_str(bs),
                                 ", but the config gives r = ", mc.r, " for this module"));
    m.scaling = peft::LoraConfig::scaling_for(mc.lora_alpha, mc.r, mc.use_rslora);
    lf.modules.emplace(mod, std::move(m));
  }
  if (lf.modules.empty()) throw peft::FormatError(cat(f.path(), ": holds no LoRA tensors"));
  return lf;
}

std::string regex_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (std::strchr(".^$|()[]{}*+?\\", c)) o += '\\';
    o += c;
  }
  return o;
}

struct CombineArgs {
  std::vector<std::string> adapters;  // DIR:WEIGHT
  std::string method = "svd";
  std::optional<double> density, clamp;
  std::optional<int> rank;
  bool exact = false;
  std::string majority_sign = "total";
  std::uint64_t seed = 0;
  std::string out;
};

int combine(const CombineArgs& a) {
  using peft::merging::Mat;
  peft::CombineOptions opt;
  opt.type = peft::combination_from_string(a.method);
  opt.density = a.density;
  opt.svd_rank = a.rank;
  opt.svd_clamp = a.clamp;
  opt.exact = a.exact;
  opt.seed = a.seed;
  if (a.majority_sign == "total") opt.majority_sign_method = peft::MajoritySign::total;
  else if (a.majority_sign == "frequency") opt.majority_sign_method = peft::MajoritySign::frequency;
  else throw peft::ConfigError(cat("--majority-sign must be total or frequency, got '", a.majority_sign, "'"));
  if (a.exact && (a.rank || a.clamp)) throw peft::ConfigError("--exact stores the combination without loss; it takes no --rank or --clamp");

  std::vector<LoraFile> files;
  std::vector<double> weights;
  for (const auto& spec : a.adapters) {
    const auto colon = spec.rfind(':');
    std::string dir = spec;
    double w = 1.0;
    if (colon != std::string::npos) {
      const std::string ws = spec.substr(colon + 1);
      char* end = nullptr;
      w = std::strtod(ws.c_str(), &end);
      if (ws.empty() || *end != '\0' || !std::isfinite(w))
        throw peft::ConfigError(cat("--adapter '", spec, "': the weight after the last ':' must be a finite number"));
      dir = spec.substr(0, colon);
    }
    files.push_back(read_lora(dir));
    weights.push_back(w);
  }
  // PEFT's ranks: each config's r, or the largest of r and its rank_pattern values
  std::vector<int> ranks;
  for (const auto& f : files) {
    const auto* c = f.config.get_if<peft::LoraConfig>();
    int r = c->r;
    for (const auto& [k, v] : c->rank_pattern) r = std::max(r, v);
    ranks.push_back(r);
  }
  auto [type, new_rank] = a.exact ? std::pair{files.size() == 1 ? peft::Combination::linear : opt.type, 0} : peft::merging::plan(opt.type, ranks, opt);
  peft::merging::validate(type, opt);

  // target_modules: PEFT's union of lists, or "(re1)|(re2)" of regexes
  peft::io::AdapterConfig out = files[0].config;
  bool all_regex = true, all_list = true;
  for (const auto& f : files) {
    all_regex = all_regex && f.config.target_modules.regex.has_value();
    all_list = all_list && !f.config.target_modules.regex && f.config.target_modules.names;
  }
  if (all_regex) {
    std::string re;
    for (const auto& f : files) re += (re.empty() ? "(" : "|(") + *f.config.target_modules.regex + ")";
    out.target_modules = peft::io::ModuleSelector::pattern(re);
  } else if (all_list) {
    std::set<std::string> u;
    for (const auto& f : files) u.insert(f.config.target_modules.names->begin(), f.config.target_modules.names->end());
    out.target_modules = peft::io::ModuleSelector::list(std::vector<std::string>(u.begin(), u.end()));
  } else {
    throw peft::FormatError("the adapters' target_modules mix lists and regex strings (or are null); PEFT cannot combine them either");
  }

  // every module any adapter holds, combined
  std::set<std::string> modules;
  for (const auto& f : files)
    for (const auto& [m, _] : f.modules) modules.insert(m);
  struct Result {
    std::string module;
    LoraModule::Kind kind;
    std::vector<std::uint64_t> a_shape;
    Mat A, B;
  };
  std::vector<Result> results;
  std::uint64_t index = 0;
  for (const auto& mod : modules) {
    std::vector<peft::merging::Term> terms;
    const LoraModule* first = nullptr;
    for (std::size_t i = 0; i < files.size(); ++i) {
      auto it = files[i].modules.find(mod);
      if (it == files[i].modules.end()) continue;
      const LoraModule& m = it->second;
      if (first && (m.kind != first->kind || (m.kind == LoraModule::conv && !std::equal(m.a_shape.begin() + 1, m.a_shape.end(), first->a_shape.begin() + 1, first->a_shape.end()))))
        throw peft::ShapeError(cat("module '", mod, "': ", files[i].dir.string(), " holds a ", shape_str(m.a_shape), " lora_A, ", "another adapter a ", shape_str(first->a_shape)));
      if (!first) first = &m;
      terms.push_back({m.A, m.B, m.scaling, weights[i]});
    }
    Result r{mod, first->kind, first->a_shape, {}, {}};
    peft::merging::combine_terms(type, terms, new_rank, opt, ++index, cat("module '", mod, "'"), r.A, r.B);
    results.push_back(std::move(r));
  }

  auto* lc = out.get_if<peft::LoraConfig>();
  lc->rank_pattern.clear();
  lc->alpha_pattern.clear();
  if (a.exact) {
    lc->use_rslora = false;
    int rmax = 0;
    for (const auto& r : results) rmax = std::max(rmax, int(r.A.rows()));
    new_rank = rmax;
    for (const auto& r : results)
      if (r.A.rows() != rmax) {  // per-module ranks, as PEFT's rank_pattern / alpha_pattern (full-path regexes)
        lc->rank_pattern.emplace_back(regex_escape(r.module), int(r.A.rows()));
        lc->alpha_pattern.emplace_back(regex_escape(r.module), double(r.A.rows()));
      }
  }
  lc->r = new_rank;
  lc->lora_alpha = new_rank;

  std::vector<std::vector<float>> store;
  store.reserve(2 * results.size());
  std::vector<st::TensorRef> refs;
  const std::string pre = peft::io::state_dict_prefix;
  for (const auto& r : results) {
    const auto R = std::uint64_t(r.A.rows());
    store.emplace_back(r.A.data(), r.A.data() + r.A.size());
    const peft::ConstMatrixView<float> av(store.back().data(), r.A.rows(), r.A.cols());
    store.emplace_back(r.B.data(), r.B.data() + r.B.size());
    const peft::ConstMatrixView<float> bv(store.back().data(), r.B.rows(), r.B.cols());
    const auto out_dim = std::uint64_t(r.B.rows()), in_dim = std::uint64_t(r.A.cols());
    switch (r.kind) {
      case LoraModule::embedding:
        refs.emplace_back(pre + r.module + ".lora_embedding_A", av, std::vector<std::uint64_t>{R, in_dim});
        refs.emplace_back(pre + r.module + ".lora_embedding_B", bv, std::vector<std::uint64_t>{out_dim, R});
        break;
      case LoraModule::conv: {
        auto as = r.a_shape;
        as[0] = R;
        refs.emplace_back(pre + r.module + ".lora_A.weight", av, as);
        refs.emplace_back(pre + r.module + ".lora_B.weight", bv, std::vector<std::uint64_t>{out_dim, R, 1, 1});
        break;
      }
      default:
        refs.emplace_back(pre + r.module + ".lora_A.weight", av, std::vector<std::uint64_t>{R, in_dim});
        refs.emplace_back(pre + r.module + ".lora_B.weight", bv, std::vector<std::uint64_t>{out_dim, R});
    }
  }
  fs::create_directories(a.out);
  st::write(fs::path(a.out) / peft::io::adapter_weights_name, refs);
  peft::io::write_adapter_config(fs::path(a.out) / peft::io::adapter_config_name, out);
  std::cerr << "combined " << files.size() << " LoRA adapter(s) with " << peft::to_string(type) << (a.exact ? " (exact)" : "") << " into " << results.size()
            << " module(s), r = " << new_rank << "\nwrote " << a.out << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"peft: inspect, merge and combine Hugging Face PEFT adapter checkpoints (adapter_config.json + adapter_model.safetensors)"};
  app.require_subcommand(1);

  std::string inspect_dir;
  auto* ins = app.add_subcommand("inspect", "Print an adapter's method, config, per-module tensors, shapes and parameter counts");
  ins->add_option("ADAPTER_DIR", inspect_dir, "Directory with adapter_config.json and adapter_model.safetensors")->required();

  std::string base, out;
  std::vector<std::string> adapters;
  auto* mrg = app.add_subcommand("merge",
                                 "Merge adapters into a base model's weights, as PEFT's merge_and_unload: OUT holds every tensor of BASE, "
                                 "the targeted weights merged, in BASE's dtype (the merge itself is computed in float32). "
                                 "Several --adapter are merged in order, each into the result of the previous ones.");
  mrg->add_option("--base", base, "Base weights (safetensors; names as PyTorch's state_dict(), e.g. model.layers.0.q_proj.weight)")->required();
  mrg->add_option("--adapter", adapters, "Adapter directory (PEFT's save_pretrained layout); repeatable")->required();
  mrg->add_option("--out", out, "Output safetensors file (written atomically)")->required();

  CombineArgs ca;
  auto* cmb = app.add_subcommand("combine",
                                 "Combine LoRA adapters into a new one, as PEFT's add_weighted_adapter, and write it in PEFT's format "
                                 "(OUT/adapter_config.json, OUT/adapter_model.safetensors). No base model is needed.");
  cmb->add_option("--adapter", ca.adapters, "DIR:WEIGHT, a LoRA adapter directory and its weight (may be negative; default 1); repeatable")->required();
  cmb->add_option("--method", ca.method,
                  "Combination type: linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, "
                  "magnitude_prune, magnitude_prune_svd (PEFT's names)")
      ->required();
  cmb->add_option("--density", ca.density, "Fraction of entries kept by the ties, dare and magnitude_prune types");
  cmb->add_option("--rank", ca.rank, "Rank of the *_svd results (default: the largest adapter rank)");
  cmb->add_option("--clamp", ca.clamp, "PEFT's svd_clamp: a quantile for clamping the SVD factors");
  cmb->add_option("--majority-sign", ca.majority_sign, "Sign election of the ties types: total (default) or frequency");
  cmb->add_option("--seed", ca.seed, "Seed of the dare types' random masks (peft++'s generator; not torch's)");
  cmb->add_flag("--exact", ca.exact,
                "Apply the method to the delta weights and store the result without loss (an SVD factorisation of rank "
                "min(out, in, sum of ranks), or min(out, in) for the pruning types)");
  cmb->add_option("--out", ca.out, "Output adapter directory (created; files written atomically)")->required();

  CLI11_PARSE(app, argc, argv);
  peft::io::set_warning_sink([](const std::string& m) { std::cerr << "peft: warning: " << m << "\n"; });
  try {
    if (*ins) return inspect(inspect_dir);
    if (*cmb) return combine(ca);
    std::vector<fs::path> dirs(adapters.begin(), adapters.end());
    return merge(base, dirs, out);
  } catch (const std::exception& e) {
    std::cerr << "peft: error: " << e.what() << "\n";
    return 1;
  }
}
