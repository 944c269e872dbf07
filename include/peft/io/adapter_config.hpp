// peft++ — adapter_config.json, the configuration file Hugging Face PEFT writes next to
// adapter_model.safetensors, read and written with PEFT's field names, peft_type / task_type strings and
// PEFT 0.21's defaults for missing keys.
//
//   peft::io::AdapterConfig cfg = peft::io::read_adapter_config("out/adapter_config.json");
//   if (auto* lora = cfg.get_if<peft::LoraConfig>()) ...   // the library's own config struct
//   peft::io::write_adapter_config("out/adapter_config.json", cfg);     // atomic (temp file + rename)
//
// The method's fields go to the library's config struct (LoraConfig, LohaConfig, LokrConfig, Ia3Config,
// AdaLoraConfig, VeraConfig);
// the fields PEFT shares between methods (target_modules, exclude_modules, modules_to_save,
// layers_to_transform, layers_pattern, bias, task_type, ...) live in AdapterConfig.
//
// Unknown keys are ignored with a warning (sent to a replaceable sink, stderr by default). Keys PEFT knows
// but peft++ does not implement are accepted silently when they hold PEFT's "off" value; a value that
// would change the adapter's math (use_qalora = true, layer_replication, trainable_token_indices, ...) is
// a FormatError, and an initialisation-only setting (loftq_config, eva_config, ...) gives a warning.
// Wrong JSON types and out-of-range values are a FormatError naming the file and the key.
//
// Adding a method (AdaLoRA, VeRA, ...): specialise ConfigCodec<TheConfig> (peft_type string, read, write)
// and append TheConfig to MethodConfig below. Nothing else changes.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <optional>
#include <regex>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "peft/adapter/adalora.hpp"
#include "peft/adapter/ia3.hpp"
#include "peft/adapter/loha.hpp"
#include "peft/adapter/lokr.hpp"
#include "peft/adapter/lora.hpp"
#include "peft/adapter/vera.hpp"
#include "peft/errors.hpp"
#include "peft/io/file.hpp"

namespace peft::io {

// ---------------------------------------------------------------------------------------------
// Warnings

/// Receives one human-readable warning per call (unknown keys, ignored settings, ...).
using WarningSink = std::function<void(const std::string&)>;

namespace detail {
inline WarningSink& warning_sink_storage() {
  static WarningSink sink = [](const std::string& m) { std::cerr << "peft: warning: " << m << '\n'; };
  return sink;
}
}  // namespace detail

/// Replaces the process-wide warning sink (default: one line on stderr) and returns the previous one.
/// An empty function silences warnings. Not synchronised: set it before loading from several threads.
inline WarningSink set_warning_sink(WarningSink sink) {
  WarningSink old = std::move(detail::warning_sink_storage());
  detail::warning_sink_storage() = sink ? std::move(sink) : WarningSink([](const std::string&) {});
  return old;
}
/// Sends a warning to the current sink.
inline void warn(const std::string& message) {
  if (auto& s = detail::warning_sink_storage()) s(message);
}

// ---------------------------------------------------------------------------------------------
// Module selection, as PEFT matches module names

/// PEFT's `target_modules` / `exclude_modules` / `feedforward_modules` value: null, a list of names, or a
/// regex string. A list entry `t` selects a module whose path equals `t` or ends with "." + t; a string
/// must match the whole path (Python's re.fullmatch; peft++ uses std::regex's ECMAScript grammar, which
/// agrees for the patterns PEFT users write: alternation, classes, `.*`, groups).
struct ModuleSelector {
  std::optional<std::vector<std::string>> names;  ///< list form
  std::optional<std::string> regex;               ///< string form (takes precedence if both are set)

  static ModuleSelector list(std::vector<std::string> n) { return {std::move(n), std::nullopt}; }
  static ModuleSelector pattern(std::string r) { return {std::nullopt, std::move(r)}; }

  /// PEFT's None.
  bool is_null() const noexcept { return !names && !regex; }
  /// None or an empty list (PEFT treats both as "nothing").
  bool empty() const noexcept { return !regex && (!names || names->empty()); }

  /// Whether `path` is selected (exact name, ".name" suffix, or full regex match).
  bool matches(std::string_view path) const {
    const std::string p(path);
    if (regex) return std::regex_match(p, std::regex(*regex));
    if (!names) return false;
    for (const auto& t : *names) {
      if (p == t) return true;
      if (p.size() > t.size() && p.compare(p.size() - t.size(), t.size(), t) == 0 && p[p.size() - t.size() - 1] == '.') return true;
    }
    return false;
  }
  bool operator==(const ModuleSelector&) const = default;
};

/// PEFT's `bias` (LoRA family): which base biases are trained and saved with the adapter.
enum class BiasMode { none, all, lora_only };
inline const char* to_string(BiasMode b) {
  switch (b) {
    case BiasMode::all: return "all";
    case BiasMode::lora_only: return "lora_only";
    default: return "none";
  }
}

// ---------------------------------------------------------------------------------------------
// Reading helpers

namespace detail {

using json = nlohmann::json;
using peft::detail::cat;

inline const char* type_name(const json& j) {
  switch (j.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "an integer";
    case json::value_t::number_float: return "a number";
    case json::value_t::string: return "a string";
    case json::value_t::array: return "a list";
    case json::value_t::object: return "an object";
    default: return "an unsupported value";
  }
}
inline std::string snippet(const json& j) {
  std::string s = j.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

/// Typed access to the keys of one adapter_config.json object; every error names the file and the key.
/// Keys that are read are recorded, so the caller can warn about the rest.
class ConfigReader {
 public:
  ConfigReader(const json& j, std::string file) : j_(j), file_(std::move(file)) {}

  const std::string& file() const noexcept { return file_; }
  [[noreturn]] void fail(std::string_view key, const std::string& what) const {
    throw FormatError(cat(file_, ": key '", key, "': ", what));
  }
  [[noreturn]] void wrong_type(std::string_view key, const char* expected, const json& v) const {
    fail(key, cat("expected ", expected, ", got ", type_name(v), " (", snippet(v), ")"));
  }

  /// The value of `key`, or nullptr when absent. Marks the key as known.
  const json* find(std::string_view key) {
    seen_.insert(std::string(key));
    auto it = j_.find(key);
    return it == j_.end() ? nullptr : &*it;
  }
  /// Absent or null.
  bool absent(std::string_view key) {
    const json* v = find(key);
    return v == nullptr || v->is_null();
  }

  void get(std::string_view key, bool& out) {
    const json* v = find(key);
    if (!v || v->is_null()) return;
    if (!v->is_boolean()) wrong_type(key, "true or false", *v);
    out = v->get<bool>();
  }
  void get(std::string_view key, int& out) {
    const json* v = find(key);
    if (!v || v->is_null()) return;
    out = to_int(key, *v);
  }
  void get(std::string_view key, double& out) {
    const json* v = find(key);
    if (!v || v->is_null()) return;
    out = to_double(key, *v);
  }
  void get(std::string_view key, std::optional<std::string>& out) {
    const json* v = find(key);
    if (!v || v->is_null()) return;
    if (!v->is_string()) wrong_type(key, "a string or null", *v);
    out = v->get<std::string>();
  }
  void get(std::string_view key, std::string& out) {
    const json* v = find(key);
    if (!v || v->is_null()) return;
    if (!v->is_string()) wrong_type(key, "a string", *v);
    out = v->get<std::string>();
  }
  /// null, a list of strings, or (when `allow_regex`) a regex string, which must compile.
  void get(std::string_view key, ModuleSelector& out, bool allow_regex = true) {
    const json* v = find(key);
    if (!v || v->is_null()) return;
    if (v->is_string() && allow_regex) {
      out = ModuleSelector::pattern(v->get<std::string>());
      check_regex(key, *out.regex);
      return;
    }
    out = ModuleSelector::list(string_list(key, *v, allow_regex ? "a list of module names, a regex string or null" : "a list of module names or null"));
  }
  void get(std::string_view key, std::optional<std::vector<std::string>>& out) {
    const json* v = find(key);
    if (!v || v->is_null()) return;
    out = string_list(key, *v, "a list of module names or null");
  }
  /// rank_pattern / alpha_pattern: an object of regex keys.
  template <class V>
  void get(std::string_view key, std::vector<std::pair<std::string, V>>& out) {
    const json* v = find(key);
    if (!v || v->is_null()) return;
    if (!v->is_object()) wrong_type(key, "an object (pattern -> value)", *v);
    out.clear();
    for (auto it = v->begin(); it != v->end(); ++it) {
      const std::string sub = cat(key, "['", it.key(), "']");
      check_regex(sub, "(.*\\.)?(" + it.key() + ")");
      if constexpr (std::is_same_v<V, int>) out.emplace_back(it.key(), to_int(sub, it.value()));
      else out.emplace_back(it.key(), to_double(sub, it.value()));
    }
  }

  int to_int(std::string_view key, const json& v) const {
    if (v.is_number_integer() || v.is_number_unsigned()) {
      if (v.is_number_unsigned() ? v.get<std::uint64_t>() > std::uint64_t(INT32_MAX)
                                 : (v.get<std::int64_t>() > INT32_MAX || v.get<std::int64_t>() < INT32_MIN))
        fail(key, cat("integer ", snippet(v), " is out of range"));
      return int(v.get<std::int64_t>());
    }
    wrong_type(key, "an integer", v);
  }
  double to_double(std::string_view key, const json& v) const {
    if (!v.is_number()) wrong_type(key, "a number", v);
    const double d = v.get<double>();
    if (!std::isfinite(d)) fail(key, cat("expected a finite number, got ", snippet(v)));
    return d;
  }
  std::vector<std::string> string_list(std::string_view key, const json& v, const char* expected) const {
    if (!v.is_array()) wrong_type(key, expected, v);
    std::vector<std::string> out;
    for (const auto& e : v) {
      if (!e.is_string()) fail(key, cat("expected ", expected, ", but an entry is ", type_name(e), " (", snippet(e), ")"));
      out.push_back(e.get<std::string>());
    }
    return out;
  }
  void check_regex(std::string_view key, const std::string& re) const {
    try {
      std::regex r(re);
    } catch (const std::regex_error& e) {
      fail(key, cat("invalid regular expression '", re, "': ", e.what()));
    }
    // Python's re refuses a quantifier applied to a quantifier ("multiple repeat", e.g. "a**"); std::regex
    // accepts it and then backtracks exponentially (found by fuzzing: a 17-star modules_to_save entry ran for
    // minutes). Refuse it as PEFT would. A '?' right after a quantifier makes it lazy and is allowed once.
    bool quantified = false, lazy = false, in_class = false;
    for (std::size_t i = 0; i < re.size(); ++i) {
      const char ch = re[i];
      if (ch == '\\') {  // an escaped character is an atom
        ++i;
        quantified = lazy = false;
      } else if (in_class) {
        in_class = ch != ']';
      } else if (ch == '[') {
        in_class = true;
        quantified = lazy = false;
      } else if (ch == '*' || ch == '+' || ch == '{' || (ch == '?' && (!quantified || lazy))) {
        if (quantified) fail(key, cat("invalid regular expression '", re, "': multiple repeat at position ", i, " (as Python's re)"));
        if (ch == '{') i = std::min(re.find('}', i), re.size() - 1);
        quantified = true;
      } else if (ch == '?') {  // lazy marker after a quantifier
        lazy = true;
      } else {
        quantified = lazy = false;
      }
    }
  }

  /// Keys of the object that were never looked up.
  std::vector<std::string> unread() const {
    std::vector<std::string> out;
    for (auto it = j_.begin(); it != j_.end(); ++it)
      if (!seen_.count(it.key())) out.push_back(it.key());
    return out;
  }

 private:
  const json& j_;
  std::string file_;
  std::set<std::string, std::less<>> seen_;
};

/// A number as Python's json would write the value the user typed: integral values as integers.
inline json number(double v) {
  if (std::isfinite(v) && std::floor(v) == v && std::fabs(v) < 9e15) return json(std::int64_t(v));
  return json(v);
}
template <class V>
json pattern_object(const std::vector<std::pair<std::string, V>>& p) {
  json o = json::object();
  for (const auto& [k, v] : p) o[k] = number(double(v));
  return o;
}

/// Keys PEFT's config class has that peft++ does not model. `off` is PEFT's default; another value is an
/// error (`changes_math`) or a warning (initialisation only, or bookkeeping).
struct ForeignKey {
  const char* key;
  const char* off;  ///< JSON text of the "off" value(s), "|"-separated
  bool changes_math;
};
inline bool is_off(const json& v, std::string_view offs) {
  std::size_t start = 0;
  while (start <= offs.size()) {
    const std::size_t bar = offs.find('|', start);
    const std::string_view one = offs.substr(start, bar == std::string_view::npos ? std::string_view::npos : bar - start);
    if (json::parse(one) == v) return true;
    if (bar == std::string_view::npos) break;
    start = bar + 1;
  }
  return false;
}
inline void check_foreign(ConfigReader& r, std::span<const ForeignKey> keys, const char* method) {
  for (const auto& k : keys) {
    const json* v = r.find(k.key);
    if (!v || is_off(*v, k.off)) continue;
    if (k.changes_math)
      r.fail(k.key, cat("the value ", snippet(*v), " is not supported by peft++ (", method, " supports only ", k.off,
                        " here); loading this adapter would give different results"));
    warn(cat(r.file(), ": key '", k.key, "' = ", snippet(*v), " is not used by peft++ (it only affects how PEFT initialises or trains the adapter); ignored"));
  }
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Per-method codecs

/// How one method's config struct maps to adapter_config.json. Specialised per config type.
template <class Config>
struct ConfigCodec;

template <>
struct ConfigCodec<LoraConfig> {
  static constexpr const char* peft_type = "LORA";
  static void read(detail::ConfigReader& r, LoraConfig& c) {
    using detail::ForeignKey;
    r.get("r", c.r);
    r.get("lora_alpha", c.lora_alpha);
    r.get("lora_dropout", c.lora_dropout);
    r.get("use_rslora", c.use_rslora);
    r.get("use_dora", c.use_dora);
    r.get("lora_bias", c.lora_bias);
    r.get("fan_in_fan_out", c.fan_in_fan_out);
    r.get("rank_pattern", c.rank_pattern);
    r.get("alpha_pattern", c.alpha_pattern);
    if (const auto* v = r.find("init_lora_weights"); v && !v->is_null()) {
      if (v->is_boolean()) {
        c.init_lora_weights = v->get<bool>() ? LoraInit::standard : LoraInit::off;
      } else if (v->is_string()) {
        const auto s = v->get<std::string>();
        if (s == "gaussian") {
          c.init_lora_weights = LoraInit::gaussian;
        } else if (s == "pissa" || s.rfind("pissa_niter_", 0) == 0 || s == "olora" || s == "loftq" || s == "eva" || s == "corda" ||
                   s == "orthogonal" || s == "lora_ga" || s == "kasa") {
          // valid in PEFT; only the initialisation differs (some of these also rewrite the base weights
          // before training, so the adapter then belongs to the rewritten base)
          warn(peft::detail::cat(r.file(), ": key 'init_lora_weights' = \"", s,
                                 "\" is not implemented by peft++; the adapter's tensors are loaded as saved, new adapters start with the default initialisation"));
          c.init_lora_weights = LoraInit::standard;
        } else {
          r.fail("init_lora_weights", peft::detail::cat("unknown initialisation \"", s, "\" (expected true, false or \"gaussian\")"));
        }
      } else {
        r.wrong_type("init_lora_weights", "true, false or a string", *v);
      }
    }
    static constexpr ForeignKey foreign[] = {
        {"use_qalora", "false", true},        {"layer_replication", "null", true}, {"trainable_token_indices", "null", true},
        {"target_parameters", "null", true},  {"alora_invocation_tokens", "null", true}, {"arrow_config", "null", true},
        {"use_bdlora", "null", true},         {"megatron_config", "null", true},  {"monteclora_config", "null", true},
        {"velora_config", "null", true},      {"kasa_config", "null", true},
        {"loftq_config", "{}|null", false},   {"eva_config", "null", false},     {"corda_config", "null", false},
        {"lora_ga_config", "null", false},    {"ensure_weight_tying", "false", false},
        {"megatron_core", "\"megatron.core\"|null", false}, {"qalora_group_size", "16|null", false}, {"runtime_config", "null|{}", false},
    };
    detail::check_foreign(r, foreign, "LoRA");
  }
  static void write(const LoraConfig& c, nlohmann::json& j) {
    j["r"] = c.r;
    j["lora_alpha"] = detail::number(c.lora_alpha);
    j["lora_dropout"] = c.lora_dropout;
    j["use_rslora"] = c.use_rslora;
    j["use_dora"] = c.use_dora;
    j["lora_bias"] = c.lora_bias;
    j["fan_in_fan_out"] = c.fan_in_fan_out;
    j["rank_pattern"] = detail::pattern_object(c.rank_pattern);
    j["alpha_pattern"] = detail::pattern_object(c.alpha_pattern);
    switch (c.init_lora_weights) {
      case LoraInit::gaussian: j["init_lora_weights"] = "gaussian"; break;
      case LoraInit::off: j["init_lora_weights"] = false; break;
      default: j["init_lora_weights"] = true; break;
    }
  }
};

namespace detail {
template <class C>
void read_lycoris(ConfigReader& r, C& c) {
  r.get("r", c.r);
  r.get("alpha", c.alpha);
  r.get("rank_dropout", c.rank_dropout);
  r.get("module_dropout", c.module_dropout);
  r.get("use_effective_conv2d", c.use_effective_conv2d);
  r.get("rank_pattern", c.rank_pattern);
  r.get("alpha_pattern", c.alpha_pattern);
}
template <class C>
void write_lycoris(const C& c, json& j) {
  j["r"] = c.r;
  j["alpha"] = number(c.alpha);
  j["rank_dropout"] = c.rank_dropout;
  j["module_dropout"] = c.module_dropout;
  j["use_effective_conv2d"] = c.use_effective_conv2d;
  j["rank_pattern"] = pattern_object(c.rank_pattern);
  j["alpha_pattern"] = pattern_object(c.alpha_pattern);
}
}  // namespace detail

template <>
struct ConfigCodec<LohaConfig> {
  static constexpr const char* peft_type = "LOHA";
  static void read(detail::ConfigReader& r, LohaConfig& c) {
    detail::read_lycoris(r, c);
    r.get("init_weights", c.init_weights);
  }
  static void write(const LohaConfig& c, nlohmann::json& j) {
    detail::write_lycoris(c, j);
    j["init_weights"] = c.init_weights;
  }
};

template <>
struct ConfigCodec<LokrConfig> {
  static constexpr const char* peft_type = "LOKR";
  static void read(detail::ConfigReader& r, LokrConfig& c) {
    detail::read_lycoris(r, c);
    r.get("decompose_both", c.decompose_both);
    r.get("decompose_factor", c.decompose_factor);
    r.get("rank_dropout_scale", c.rank_dropout_scale);
    if (const auto* v = r.find("init_weights"); v && !v->is_null()) {
      if (v->is_boolean()) c.init_weights = v->get<bool>() ? LokrInit::standard : LokrInit::off;
      else if (v->is_string() && v->get<std::string>() == "lycoris") c.init_weights = LokrInit::lycoris;
      else r.wrong_type("init_weights", "true, false or \"lycoris\"", *v);
    }
  }
  static void write(const LokrConfig& c, nlohmann::json& j) {
    detail::write_lycoris(c, j);
    j["decompose_both"] = c.decompose_both;
    j["decompose_factor"] = c.decompose_factor;
    j["rank_dropout_scale"] = c.rank_dropout_scale;
    if (c.init_weights == LokrInit::lycoris) j["init_weights"] = "lycoris";
    else j["init_weights"] = c.init_weights == LokrInit::standard;
  }
};

template <>
struct ConfigCodec<Ia3Config> {
  static constexpr const char* peft_type = "IA3";
  static void read(detail::ConfigReader& r, Ia3Config& c) {
    ModuleSelector ff;
    r.get("feedforward_modules", ff);
    c.feedforward_regex = ff.regex;
    c.feedforward_modules = ff.names.value_or(std::vector<std::string>{});
    r.get("fan_in_fan_out", c.fan_in_fan_out);
    r.get("init_ia3_weights", c.init_ia3_weights);
  }
  static void write(const Ia3Config& c, nlohmann::json& j) {
    if (c.feedforward_regex) j["feedforward_modules"] = *c.feedforward_regex;
    else if (c.feedforward_modules.empty()) j["feedforward_modules"] = nullptr;
    else j["feedforward_modules"] = c.feedforward_modules;
    j["fan_in_fan_out"] = c.fan_in_fan_out;
    j["init_ia3_weights"] = c.init_ia3_weights;
  }
};

/// AdaLoRA (PEFT's AdaLoraConfig, a LoraConfig subclass). rank_pattern is an object of keep masks over the
/// init_r singular triplets, keyed "<module path>.lora_E" as PEFT saves it (module paths and the in-memory
/// "<path>.lora_E.<adapter>" form are read too; keys are written in PEFT's saved form). Of the LoRA fields,
/// AdaLoRA's math uses lora_alpha, lora_dropout, fan_in_fan_out and init_lora_weights; r, use_rslora,
/// alpha_pattern and lora_bias are accepted and ignored as PEFT's AdaLoRA ignores them (a warning when they
/// are set), use_dora = true is refused as PEFT refuses it.
template <>
struct ConfigCodec<AdaLoraConfig> {
  static constexpr const char* peft_type = "ADALORA";
  static void read(detail::ConfigReader& r, AdaLoraConfig& c) {
    using detail::ForeignKey;
    r.get("target_r", c.target_r);
    r.get("init_r", c.init_r);
    r.get("tinit", c.tinit);
    r.get("tfinal", c.tfinal);
    r.get("deltaT", c.deltaT);
    r.get("beta1", c.beta1);
    r.get("beta2", c.beta2);
    r.get("orth_reg_weight", c.orth_reg_weight);
    r.get("total_step", c.total_step);
    r.get("lora_alpha", c.lora_alpha);
    r.get("lora_dropout", c.lora_dropout);
    r.get("fan_in_fan_out", c.fan_in_fan_out);
    if (const auto* v = r.find("init_lora_weights"); v && !v->is_null()) {
      // PEFT's AdaLoRA tests it for truth: any string (e.g. "gaussian") means the default initialisation
      if (v->is_boolean()) c.init_lora_weights = v->get<bool>();
      else if (v->is_string()) c.init_lora_weights = !v->get<std::string>().empty();
      else r.wrong_type("init_lora_weights", "true, false or a string", *v);
    }
    if (const auto* v = r.find("rank_pattern"); v && !v->is_null()) {
      if (!v->is_object()) r.wrong_type("rank_pattern", "an object (module -> list of booleans) or null", *v);
      c.rank_pattern.clear();
      for (auto it = v->begin(); it != v->end(); ++it) {
        const std::string sub = peft::detail::cat("rank_pattern['", it.key(), "']");
        if (!it.value().is_array()) r.wrong_type(sub, "a list of booleans (the keep mask over init_r triplets)", it.value());
        std::vector<bool> mask;
        for (const auto& e : it.value()) {
          if (e.is_boolean()) mask.push_back(e.get<bool>());
          else if ((e.is_number_integer() || e.is_number_unsigned()) && (e.get<std::int64_t>() == 0 || e.get<std::int64_t>() == 1)) mask.push_back(e.get<std::int64_t>() == 1);
          else r.fail(sub, peft::detail::cat("expected a list of booleans, but an entry is ", detail::type_name(e), " (", detail::snippet(e), ")"));
        }
        c.rank_pattern.emplace_back(it.key(), std::move(mask));
      }
    }
    // LoRA fields that PEFT's AdaLoRA does not use
    r.find("r");  // PEFT warns that r is ignored (init_r is the rank)
    bool dora = false;
    r.get("use_dora", dora);
    if (dora) r.fail("use_dora", "ADALORA does not support DoRA (PEFT refuses use_dora = true for AdaLoRA)");
    static constexpr ForeignKey foreign[] = {
        {"use_rslora", "false", false},        {"alpha_pattern", "{}|null", false},     {"lora_bias", "false", false},
        {"use_qalora", "false", true},         {"layer_replication", "null", true},     {"trainable_token_indices", "null", true},
        {"target_parameters", "null", true},   {"alora_invocation_tokens", "null", true}, {"arrow_config", "null", true},
        {"use_bdlora", "null", true},          {"megatron_config", "null", true},       {"monteclora_config", "null", true},
        {"velora_config", "null", true},       {"kasa_config", "null", true},           {"loftq_config", "{}|null", true},
        {"eva_config", "null", false},         {"corda_config", "null", false},         {"lora_ga_config", "null", false},
        {"ensure_weight_tying", "false", false}, {"megatron_core", "\"megatron.core\"|null", false},
        {"qalora_group_size", "16|null", false}, {"runtime_config", "null|{}", false},
    };
    detail::check_foreign(r, foreign, "AdaLoRA");
  }
  static void write(const AdaLoraConfig& c, nlohmann::json& j) {
    j["target_r"] = c.target_r;
    j["init_r"] = c.init_r;
    j["tinit"] = c.tinit;
    j["tfinal"] = c.tfinal;
    j["deltaT"] = c.deltaT;
    j["beta1"] = c.beta1;
    j["beta2"] = c.beta2;
    j["orth_reg_weight"] = c.orth_reg_weight;
    j["total_step"] = c.total_step > 0 ? nlohmann::json(c.total_step) : nlohmann::json(nullptr);
    j["lora_alpha"] = detail::number(c.lora_alpha);
    j["lora_dropout"] = c.lora_dropout;
    j["fan_in_fan_out"] = c.fan_in_fan_out;
    j["init_lora_weights"] = c.init_lora_weights;
    if (c.rank_pattern.empty()) {
      j["rank_pattern"] = nullptr;
    } else {
      // PEFT's saved form: "<module path>.lora_E" (its loader strips the last component to find the module)
      nlohmann::json o = nlohmann::json::object();
      for (const auto& [k, mask] : c.rank_pattern) {
        const std::string m = AdaLoraConfig::module_of_key(k);
        o[m.empty() ? std::string("lora_E") : m + ".lora_E"] = mask;
      }
      j["rank_pattern"] = std::move(o);
    }
  }
};

/// VeRA (PEFT's VeraConfig). The shared projections are not part of the file: load_pretrained takes them
/// from the checkpoint (base_model.vera_A / base_model.vera_B), save_pretrained writes them there.
/// PEFT's bias "vera_only" is AdapterConfig::bias = BiasMode::lora_only (the adapted layers' base biases).
template <>
struct ConfigCodec<VeraConfig> {
  static constexpr const char* peft_type = "VERA";
  static void read(detail::ConfigReader& r, VeraConfig& c) {
    r.get("r", c.r);
    if (const auto* v = r.find("projection_prng_key"); v && !v->is_null()) {
      if (v->is_number_unsigned()) c.projection_prng_key = v->get<std::uint64_t>();
      else if (v->is_number_integer()) c.projection_prng_key = std::uint64_t(v->get<std::int64_t>());  // torch.manual_seed wraps negatives too
      else r.wrong_type("projection_prng_key", "an integer", *v);
    }
    r.get("save_projection", c.save_projection);
    r.get("vera_dropout", c.vera_dropout);
    r.get("d_initial", c.d_initial);
    r.get("fan_in_fan_out", c.fan_in_fan_out);
    r.get("init_weights", c.init_weights);
  }
  static void write(const VeraConfig& c, nlohmann::json& j) {
    j["r"] = c.r;
    j["projection_prng_key"] = c.projection_prng_key;
    j["save_projection"] = c.save_projection;
    j["vera_dropout"] = c.vera_dropout;
    j["d_initial"] = c.d_initial;
    j["fan_in_fan_out"] = c.fan_in_fan_out;
    j["init_weights"] = c.init_weights;
  }
  /// VeraConfig::validate without the projections (a file never holds them).
  static void validate(const VeraConfig& c) {
    if (c.r <= 0) throw ConfigError(peft::detail::cat("VeraConfig: r should be a positive integer value but the value passed is ", c.r));
    if (!(c.vera_dropout >= 0.0 && c.vera_dropout < 1.0))
      throw ConfigError(peft::detail::cat("VeraConfig: vera_dropout must be in [0, 1), got ", c.vera_dropout));
  }
};

/// Every method the checkpoint code knows. Add a method here (and a ConfigCodec for it).
using MethodConfig = std::variant<LoraConfig, LohaConfig, LokrConfig, Ia3Config, AdaLoraConfig, VeraConfig>;

/// PEFT's task_type strings (or none: a plain PeftModel).
inline constexpr const char* task_types[] = {"SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"};

// ---------------------------------------------------------------------------------------------
// The whole file

/// The contents of adapter_config.json: the method's own config plus the fields PEFT shares between
/// methods. Defaults are PEFT 0.21's.
struct AdapterConfig {
  MethodConfig method = LoraConfig{};
  std::optional<std::string> task_type;               ///< one of task_types, or none
  std::optional<std::string> base_model_name_or_path;
  std::optional<std::string> revision;
  bool inference_mode = true;                         ///< PEFT writes true
  ModuleSelector target_modules;                      ///< which layers get the adapter (null: the user decides)
  ModuleSelector exclude_modules;
  std::optional<std::vector<std::string>> modules_to_save;
  std::optional<std::vector<int>> layers_to_transform;  ///< restricts list matches to these layer indices
  std::optional<std::vector<std::string>> layers_pattern;
  BiasMode bias = BiasMode::none;                     ///< LoRA, AdaLoRA and VeRA (whose "vera_only" is lora_only)
  std::optional<std::string> peft_version;            ///< as read (not written: peft++ is not PEFT)

  template <class C>
  C* get_if() noexcept { return std::get_if<C>(&method); }
  template <class C>
  const C* get_if() const noexcept { return std::get_if<C>(&method); }
  /// "LORA", "LOHA", ...
  const char* peft_type() const {
    return std::visit([](const auto& c) { return ConfigCodec<std::remove_cvref_t<decltype(c)>>::peft_type; }, method);
  }

  /// PEFT's check_target_module_exists: excluded modules and modules_to_save never match; a regex must
  /// match the whole path; a list entry matches the path or a ".entry" suffix, and then, with
  /// layers_to_transform, the first numbered path segment (after one of layers_pattern, if given) must
  /// be one of the listed layer indices.
  bool targets(std::string_view path) const {
    const std::string p(path);
    if (exclude_modules.matches(p)) return false;
    if (modules_to_save)
      for (const auto& m : *modules_to_save)
        if (std::regex_search(p, std::regex("^(|.*\\.)" + m + "($|\\..*)"))) return false;
    if (target_modules.regex) return target_modules.matches(p);
    if (!target_modules.matches(p)) return false;
    if (!layers_to_transform || layers_to_transform->empty()) return true;
    std::smatch m;
    bool found = false;
    if (!layers_pattern || layers_pattern->empty()) {
      found = std::regex_search(p, m, std::regex("^.*?\\.[^.]*\\.(\\d+)\\."));
    } else {
      for (const auto& pat : *layers_pattern)
        if ((found = std::regex_search(p, m, std::regex("^(?:|.*?\\.)" + pat + "\\.(\\d+)\\.")))) break;
    }
    if (!found) return false;
    // compare as digit strings: a path's index may be longer than any integer type (no std::stol here)
    std::string digits = m[1].str();
    digits.erase(0, std::min(digits.find_first_not_of('0'), digits.size() - 1));
    for (int i : *layers_to_transform)
      if (i >= 0 && std::to_string(i) == digits) return true;
    return false;
  }
};

namespace detail {
template <std::size_t I = 0>
bool read_method(const std::string& type, ConfigReader& r, MethodConfig& out) {
  if constexpr (I < std::variant_size_v<MethodConfig>) {
    using C = std::variant_alternative_t<I, MethodConfig>;
    if (type == ConfigCodec<C>::peft_type) {
      C c{};
      ConfigCodec<C>::read(r, c);
      try {
        if constexpr (requires { ConfigCodec<C>::validate(c); }) ConfigCodec<C>::validate(c);
        else c.validate();
      } catch (const ConfigError& e) {
        throw FormatError(cat(r.file(), ": ", e.what()));
      }
      out = std::move(c);
      return true;
    }
    return read_method<I + 1>(type, r, out);
  } else {
    return false;
  }
}
template <std::size_t I = 0>
std::string known_types() {
  if constexpr (I < std::variant_size_v<MethodConfig>) {
    using C = std::variant_alternative_t<I, MethodConfig>;
    return cat(I ? ", " : "", ConfigCodec<C>::peft_type, known_types<I + 1>());
  } else {
    return "";
  }
}
}  // namespace detail

/// Parses adapter_config.json text. `file` labels every error ("<file>: key 'r': ...").
inline AdapterConfig parse_adapter_config(std::string_view text, const std::string& file = "adapter_config.json") {
  using detail::json;
  json j;
  try {
    j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const json::exception& e) {
    throw FormatError(peft::detail::cat(file, ": not valid JSON: ", e.what()));
  }
  if (!j.is_object()) throw FormatError(peft::detail::cat(file, ": expected a JSON object, got ", detail::type_name(j)));
  detail::ConfigReader r(j, file);
  AdapterConfig c;
  const json* pt = r.find("peft_type");
  if (!pt) throw FormatError(peft::detail::cat(file, ": key 'peft_type' is missing (peft++ reads ", detail::known_types(), ")"));
  if (!pt->is_string()) r.wrong_type("peft_type", "a string", *pt);
  const std::string type = pt->get<std::string>();
  if (!detail::read_method(type, r, c.method))
    r.fail("peft_type", peft::detail::cat("\"", type, "\" is not supported by peft++ (supported: ", detail::known_types(), ")"));

  r.get("task_type", c.task_type);
  if (c.task_type) {
    bool ok = false;
    for (const char* t : task_types) ok = ok || *c.task_type == t;
    if (!ok) r.fail("task_type", peft::detail::cat("unknown task type \"", *c.task_type, "\" (expected null, SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM, TOKEN_CLS, QUESTION_ANS or FEATURE_EXTRACTION)"));
  }
  r.get("base_model_name_or_path", c.base_model_name_or_path);
  r.get("revision", c.revision);
  r.get("inference_mode", c.inference_mode);
  r.get("peft_version", c.peft_version);
  r.find("auto_mapping");
  r.get("target_modules", c.target_modules);
  r.get("exclude_modules", c.exclude_modules);
  r.get("modules_to_save", c.modules_to_save);
  if (c.modules_to_save)  // PEFT matches each entry as a regex fragment (re.match(rf"(^|.*\.){m}($|\..*)", path))
    for (const auto& m : *c.modules_to_save) r.check_regex("modules_to_save", "^(|.*\\.)" + m + "($|\\..*)");
  if (const json* v = r.find("layers_to_transform"); v && !v->is_null()) {
    if (v->is_number_integer() || v->is_number_unsigned()) {
      c.layers_to_transform = std::vector<int>{r.to_int("layers_to_transform", *v)};
    } else if (v->is_array()) {
      std::vector<int> l;
      for (const auto& e : *v) l.push_back(r.to_int("layers_to_transform", e));
      c.layers_to_transform = std::move(l);
    } else {
      r.wrong_type("layers_to_transform", "an integer, a list of integers or null", *v);
    }
  }
  if (const json* v = r.find("layers_pattern"); v && !v->is_null()) {
    if (v->is_string()) c.layers_pattern = std::vector<std::string>{v->get<std::string>()};
    else c.layers_pattern = r.string_list("layers_pattern", *v, "a string, a list of strings or null");
    for (const auto& pat : *c.layers_pattern)  // PEFT: re.match(rf"^(?:|.*\.){pattern}\.(\d+)\.", path)
      r.check_regex("layers_pattern", "^(?:|.*?\\.)" + pat + "\\.(\\d+)\\.");
  }
  if (std::holds_alternative<LoraConfig>(c.method) || std::holds_alternative<AdaLoraConfig>(c.method) || std::holds_alternative<VeraConfig>(c.method)) {
    // LoRA and AdaLoRA (a LoraConfig subclass): "lora_only"; VeRA: "vera_only" (the same rule)
    const bool vera = std::holds_alternative<VeraConfig>(c.method);
    const char* only = vera ? "vera_only" : "lora_only";
    std::string b = "none";
    r.get("bias", b);
    if (b == "none") c.bias = BiasMode::none;
    else if (b == "all") c.bias = BiasMode::all;
    else if (b == only) c.bias = BiasMode::lora_only;
    else r.fail("bias", peft::detail::cat("expected \"none\", \"all\" or \"", only, "\", got \"", b, "\""));
  }
  if (auto* ia3 = c.get_if<Ia3Config>(); ia3 && c.target_modules.names && !ia3->feedforward_regex) {
    for (const auto& f : ia3->feedforward_modules) {  // PEFT's IA3Config.__post_init__
      bool in = false;
      for (const auto& t : *c.target_modules.names) in = in || t == f;
      if (!in) r.fail("feedforward_modules", peft::detail::cat("'", f, "' is not in target_modules (PEFT requires feedforward_modules to be a subset of target_modules)"));
    }
  }
  for (const auto& k : r.unread()) warn(peft::detail::cat(file, ": unknown key '", k, "' (not a ", type, " field PEFT 0.21 writes); ignored"));
  return c;
}

/// Reads adapter_config.json (a file, or a directory that contains one).
inline AdapterConfig read_adapter_config(const std::filesystem::path& path) {
  std::filesystem::path p = path;
  if (std::filesystem::is_directory(p)) p /= "adapter_config.json";
  std::ifstream in(p, std::ios::binary);
  if (!in) throw FormatError(peft::detail::cat(p.string(), ": cannot open the adapter config"));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return parse_adapter_config(text, p.string());
}

/// The JSON object PEFT would write for `c` (keys sorted when dumped; inference_mode true).
inline nlohmann::json to_json(const AdapterConfig& c) {
  using detail::json;
  json j = json::object();
  std::visit([&](const auto& m) { ConfigCodec<std::remove_cvref_t<decltype(m)>>::write(m, j); }, c.method);
  j["peft_type"] = c.peft_type();
  j["task_type"] = c.task_type ? json(*c.task_type) : json(nullptr);
  j["base_model_name_or_path"] = c.base_model_name_or_path ? json(*c.base_model_name_or_path) : json(nullptr);
  j["revision"] = c.revision ? json(*c.revision) : json(nullptr);
  j["inference_mode"] = true;
  auto selector = [](const ModuleSelector& s) {
    if (s.regex) return json(*s.regex);
    if (s.names) return json(*s.names);
    return json(nullptr);
  };
  j["target_modules"] = selector(c.target_modules);
  // PEFT's VeraConfig has no exclude_modules: written only when set
  if (!std::holds_alternative<VeraConfig>(c.method) || !c.exclude_modules.is_null()) j["exclude_modules"] = selector(c.exclude_modules);
  j["modules_to_save"] = c.modules_to_save ? json(*c.modules_to_save) : json(nullptr);
  // PEFT's IA3Config has no layers_to_transform / layers_pattern: written only when set
  if (!std::holds_alternative<Ia3Config>(c.method) || c.layers_to_transform) j["layers_to_transform"] = c.layers_to_transform ? json(*c.layers_to_transform) : json(nullptr);
  if (!std::holds_alternative<Ia3Config>(c.method) || c.layers_pattern) j["layers_pattern"] = c.layers_pattern ? json(*c.layers_pattern) : json(nullptr);
  if (std::holds_alternative<LoraConfig>(c.method) || std::holds_alternative<AdaLoraConfig>(c.method)) j["bias"] = to_string(c.bias);
  if (std::holds_alternative<VeraConfig>(c.method)) j["bias"] = c.bias == BiasMode::lora_only ? "vera_only" : to_string(c.bias);
  return j;
}

/// The file's text: PEFT's layout (2-space indent, keys sorted, trailing newline-free as json.dumps).
inline std::string format_adapter_config(const AdapterConfig& c) { return to_json(c).dump(2); }

/// Writes adapter_config.json atomically (temporary file, fsync, rename). `path` is the file, or a
/// directory (created if missing) that receives adapter_config.json.
inline void write_adapter_config(const std::filesystem::path& path, const AdapterConfig& c, bool sync = true) {
  std::filesystem::path p = path;
  if (std::filesystem::is_directory(p) || (!p.has_extension() && !std::filesystem::exists(p))) {
    std::filesystem::create_directories(p);
    p /= "adapter_config.json";
  }
  const std::string text = format_adapter_config(c);
  AtomicFile f(p, sync);
  f.write(std::as_bytes(std::span<const char>(text.data(), text.size())));
  f.commit();
}

}  // namespace peft::io
