// peft — command-line tool for Hugging Face PEFT adapter checkpoints (adapter_config.json +
// adapter_model.safetensors).
//
//   peft inspect ADAPTER_DIR
//   peft merge --base BASE.safetensors --adapter ADAPTER_DIR [--adapter DIR2 ...] --out OUT.safetensors
//
// `merge` is the C++ counterpart of PEFT's merge_and_unload on a saved model (and of llama.cpp's
// export-lora): OUT holds every tensor of BASE, the weights the adapters target replaced by the merged
// ones, in BASE's dtype. Exit codes: 0 success, 1 a file or value that cannot be used, CLI11's codes
// (> 100) for a bad command line.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <peft/adapter/ia3.hpp>
#include <peft/adapter/loha.hpp>
#include <peft/adapter/lokr.hpp>
#include <peft/adapter/lora.hpp>
#include <peft/adapter/lora_conv2d.hpp>
#include <peft/adapter/lora_embedding.hpp>
#include <peft/io/adapter_config.hpp>
#include <peft/io/pretrained.hpp>
#include <peft/io/safetensors.hpp>
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
    ".lokr_t2",       ".ia3_l",         ".base_layer.bias"};

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
int inspect(const fs::path& dir) {
  const fs::path weights = weights_of(dir);
  const auto cfg = peft::io::read_adapter_config(dir);
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
      std::cout << "  " << k << "  " << st::name(i.dtype) << " " << shape_str(i.shape) << "\n";
      total += i.numel();
    }
  }
  std::cout << "total: " << f.names().size() << " tensors, " << with_commas(total) << " parameters\n";
  return 0;
}

// ---------------------------------------------------------------------------------------------
// merge

using Lin = peft::Adapted<peft::Linear<float>, peft::Lora, peft::Loha, peft::Lokr, peft::Ia3>;
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
    const auto cfg = peft::io::read_adapter_config(dir);
    st::File f(weights);
    bool fan_in_fan_out = false;
    if (auto* l = cfg.get_if<peft::LoraConfig>()) fan_in_fan_out = l->fan_in_fan_out;
    if (auto* l = cfg.get_if<peft::Ia3Config>()) fan_in_fan_out = l->fan_in_fan_out;

    std::set<std::string> modules;
    std::vector<std::string> plain_biases;  // bias = "all": biases of modules without the adapter
    for (const auto& k : f.names()) {
      const Split s = split_key(k);
      if (!s.module.empty() && s.tensor != "base_layer.bias") modules.insert(s.module);
      else if (s.module.empty() && cfg.bias == peft::io::BiasMode::all && k.size() > 5 && k.compare(k.size() - 5, 5, ".bias") == 0 &&
               k.rfind(peft::io::state_dict_prefix, 0) == 0)
        plain_biases.push_back(k);
      else if (s.module.empty())
        throw peft::FormatError(cat(f.path(), ": tensor '", k, "' is not an adapter tensor peft can merge (expected base_model.model.<module>.<lora_A.weight|hada_w1_a|lokr_w1|ia3_l|...>)"));
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
    // bias = "all": trained biases of other modules replace the base's
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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"peft: inspect and merge Hugging Face PEFT adapter checkpoints (adapter_config.json + adapter_model.safetensors)"};
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

  CLI11_PARSE(app, argc, argv);
  peft::io::set_warning_sink([](const std::string& m) { std::cerr << "peft: warning: " << m << "\n"; });
  try {
    if (*ins) return inspect(inspect_dir);
    std::vector<fs::path> dirs(adapters.begin(), adapters.end());
    return merge(base, dirs, out);
  } catch (const std::exception& e) {
    std::cerr << "peft: error: " << e.what() << "\n";
    return 1;
  }
}
