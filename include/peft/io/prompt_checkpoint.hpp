// peft++ — prompt-learning checkpoints in Hugging Face PEFT's format: adapter_config.json and
// adapter_model.safetensors for Prompt Tuning (PROMPT_TUNING), P-Tuning (P_TUNING), Prefix Tuning
// (PREFIX_TUNING) and Multitask Prompt Tuning (MULTITASK_PROMPT_TUNING).
//
//   peft::io::save_prompt_pretrained(prompt_module, "out", cfg);                 // as PeftModel.save_pretrained
//   auto enc = peft::io::load_p_tuning<float>("out");                            // as PeftModel.from_pretrained
//   peft::io::load_prompt_pretrained(existing_module, "out");                    // into a module you built
//
// Tensors, as PEFT 0.21's get_peft_model_state_dict / set_peft_model_state_dict name them (no prefix, no
// adapter name):
//   prompt_embeddings   [total_virtual_tokens, token_dim] (prompt tuning, P-tuning, multitask) or
//                       [num_virtual_tokens, num_layers * 2 * token_dim] (prefix tuning). For P-tuning and
//                       prefix tuning with projection this is the ENCODER OUTPUT (get_prompt_embedding_to_save),
//                       not the encoder's input table: the reparameterisation is not saved.
//   prefix_task_cols    [num_tasks, total_virtual_tokens, num_ranks] (multitask only)
//   prefix_task_rows    [num_tasks, num_ranks, token_dim]            (multitask only)
// Loading puts prompt_embeddings into the module's table, as PEFT does; a P-tuning or prefix-projection
// module is therefore loaded in inference mode (a table, no encoder), which is what
// PeftModel.from_pretrained builds by default. Both files are written atomically (temp file + rename).
#pragma once

#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "peft/errors.hpp"
#include "peft/io/adapter_config.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/prompt/multitask_prompt_tuning.hpp"
#include "peft/prompt/p_tuning.hpp"
#include "peft/prompt/prefix_tuning.hpp"
#include "peft/prompt/prompt_tuning.hpp"
#include "peft/rng.hpp"

namespace peft::io {

/// The prompt-learning methods' configs (the library's structs).
using PromptMethodConfig = std::variant<PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig, MultitaskPromptTuningConfig>;

/// adapter_config.json of a prompt-learning adapter: the method's config plus PEFT's PromptLearningConfig
/// fields that the library's structs do not hold. Defaults are PEFT 0.21's.
struct PromptAdapterConfig {
  PromptMethodConfig method = PromptTuningConfig{};
  std::optional<std::string> task_type;  ///< one of task_types, or none
  std::optional<std::string> base_model_name_or_path;
  std::optional<std::string> revision;
  std::optional<std::string> peft_version;  ///< as read (not written)
  bool inference_mode = true;               ///< PEFT writes true
  std::optional<std::vector<std::string>> modules_to_save;
  /// The base model's attention heads and layers, as PEFT records them for every prompt method (the
  /// prefix-tuning struct holds its own; these are used for the other methods). 0: null.
  Index num_attention_heads = 0;
  Index num_layers = 0;
  std::optional<std::string> tokenizer_name_or_path;              ///< prompt tuning and multitask (TEXT init)
  std::optional<std::string> prompt_tuning_init_state_dict_path;  ///< multitask (source-task inits)

  template <class C>
  C* get_if() noexcept { return std::get_if<C>(&method); }
  template <class C>
  const C* get_if() const noexcept { return std::get_if<C>(&method); }
  const char* peft_type() const;
};

namespace detail {

template <class C>
struct PromptType;
template <>
struct PromptType<PromptTuningConfig> { static constexpr const char* name = "PROMPT_TUNING"; };
template <>
struct PromptType<PromptEncoderConfig> { static constexpr const char* name = "P_TUNING"; };
template <>
struct PromptType<PrefixTuningConfig> { static constexpr const char* name = "PREFIX_TUNING"; };
template <>
struct PromptType<MultitaskPromptTuningConfig> { static constexpr const char* name = "MULTITASK_PROMPT_TUNING"; };

inline void get_index(ConfigReader& r, std::string_view key, Index& out) {
  int v = int(out);
  r.get(key, v);
  out = v;
}

/// An enum written as PEFT's string; `names[i]` is the string of enumerator i.
template <class E, std::size_t N>
void get_enum(ConfigReader& r, std::string_view key, E& out, const char* const (&names)[N]) {
  const json* v = r.find(key);
  if (!v || v->is_null()) return;
  std::string expected;
  for (std::size_t i = 0; i < N; ++i) expected += cat(i ? ", " : "", "\"", names[i], "\"");
  if (!v->is_string()) r.wrong_type(key, cat("one of ", expected).c_str(), *v);
  const std::string s = v->get<std::string>();
  for (std::size_t i = 0; i < N; ++i)
    if (s == names[i]) {
      out = E(i);
      return;
    }
  r.fail(key, cat("unknown value \"", s, "\" (expected one of ", expected, ")"));
}

inline constexpr const char* prompt_tuning_inits[] = {"RANDOM", "TEXT", "SAMPLE_VOCAB"};
inline constexpr const char* encoder_types[] = {"MLP", "LSTM"};
inline constexpr const char* multitask_inits[] = {"RANDOM", "TEXT", "AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"};

inline json opt_string(const std::optional<std::string>& s) { return s ? json(*s) : json(nullptr); }
inline json opt_index(Index v) { return v > 0 ? json(std::int64_t(v)) : json(nullptr); }

template <class C>
void read_common_prompt(ConfigReader& r, C& c) {
  get_index(r, "num_virtual_tokens", c.num_virtual_tokens);
  get_index(r, "token_dim", c.token_dim);
  get_index(r, "num_transformer_submodules", c.num_transformer_submodules);
}

inline void read_prompt_method(const std::string& type, ConfigReader& r, PromptAdapterConfig& a) {
  if (type == "PROMPT_TUNING" || type == "MULTITASK_PROMPT_TUNING") {
    std::string text;
    r.get("prompt_tuning_init_text", text);
    r.get("tokenizer_name_or_path", a.tokenizer_name_or_path);
    r.find("tokenizer_kwargs");  // how PEFT calls the tokenizer for TEXT; nothing to do without one
    if (type == "PROMPT_TUNING") {
      PromptTuningConfig c;
      read_common_prompt(r, c);
      get_enum(r, "prompt_tuning_init", c.prompt_tuning_init, prompt_tuning_inits);
      c.prompt_tuning_init_text = text;
      a.method = c;
    } else {
      MultitaskPromptTuningConfig c;
      read_common_prompt(r, c);
      get_enum(r, "prompt_tuning_init", c.prompt_tuning_init, multitask_inits);
      c.prompt_tuning_init_text = text;
      get_index(r, "num_tasks", c.num_tasks);
      get_index(r, "num_ranks", c.num_ranks);
      get_index(r, "prompt_tuning_init_task", c.prompt_tuning_init_task);
      r.get("prompt_tuning_init_state_dict_path", a.prompt_tuning_init_state_dict_path);
      a.method = c;
    }
  } else if (type == "P_TUNING") {
    PromptEncoderConfig c;
    read_common_prompt(r, c);
    get_enum(r, "encoder_reparameterization_type", c.encoder_reparameterization_type, encoder_types);
    get_index(r, "encoder_hidden_size", c.encoder_hidden_size);
    get_index(r, "encoder_num_layers", c.encoder_num_layers);
    r.get("encoder_dropout", c.encoder_dropout);
    a.method = c;
  } else {  // PREFIX_TUNING
    PrefixTuningConfig c;
    get_index(r, "num_virtual_tokens", c.num_virtual_tokens);
    get_index(r, "token_dim", c.token_dim);
    Index subs = 1;
    get_index(r, "num_transformer_submodules", subs);
    if (subs != 1)
      r.fail("num_transformer_submodules", cat(subs, " (an encoder-decoder model) is not supported by peft++'s prefix tuning, which serves one decoder"));
    get_index(r, "num_layers", c.num_layers);
    get_index(r, "num_attention_heads", c.num_attention_heads);
    r.get("prefix_projection", c.prefix_projection);
    get_index(r, "encoder_hidden_size", c.encoder_hidden_size);
    if (const json* v = r.find("init_weights"); v && !v->is_null()) {
      if (!v->is_string() || v->get<std::string>() != "zero") r.wrong_type("init_weights", "\"zero\" or null", *v);
      c.init_weights_zero = true;
    }
    a.method = c;
  }
}

}  // namespace detail

inline const char* PromptAdapterConfig::peft_type() const {
  return std::visit([](const auto& c) { return detail::PromptType<std::remove_cvref_t<decltype(c)>>::name; }, method);
}

/// Whether `peft_type` names a prompt-learning method peft++ reads.
inline bool is_prompt_learning_type(std::string_view peft_type) {
  return peft_type == "PROMPT_TUNING" || peft_type == "P_TUNING" || peft_type == "PREFIX_TUNING" || peft_type == "MULTITASK_PROMPT_TUNING";
}

/// Parses the adapter_config.json text of a prompt-learning adapter. Unknown keys give a warning; wrong
/// types, unknown enum strings and invalid values (the library's validate()) are a FormatError naming
/// `file` and the key; another peft_type is a FormatError naming it.
inline PromptAdapterConfig parse_prompt_config(std::string_view text, const std::string& file = "adapter_config.json") {
  using detail::json;
  json j;
  try {
    j = json::parse(text.begin(), text.end(), nullptr, true, false);
  } catch (const json::exception& e) {
    throw FormatError(peft::detail::cat(file, ": not valid JSON: ", e.what()));
  }
  if (!j.is_object()) throw FormatError(peft::detail::cat(file, ": expected a JSON object, got ", detail::type_name(j)));
  detail::ConfigReader r(j, file);
  const json* pt = r.find("peft_type");
  const char* supported = "PROMPT_TUNING, P_TUNING, PREFIX_TUNING, MULTITASK_PROMPT_TUNING";
  if (!pt) throw FormatError(peft::detail::cat(file, ": key 'peft_type' is missing (expected one of ", supported, ")"));
  if (!pt->is_string()) r.wrong_type("peft_type", "a string", *pt);
  const std::string type = pt->get<std::string>();
  if (!is_prompt_learning_type(type))
    r.fail("peft_type", peft::detail::cat("\"", type, "\" is not a prompt-learning method (expected one of ", supported, ")"));
  PromptAdapterConfig c;
  detail::read_prompt_method(type, r, c);
  r.get("task_type", c.task_type);
  if (c.task_type) {
    bool ok = false;
    for (const char* t : task_types) ok = ok || *c.task_type == t;
    if (!ok) r.fail("task_type", peft::detail::cat("unknown task type \"", *c.task_type, "\""));
  }
  r.get("base_model_name_or_path", c.base_model_name_or_path);
  r.get("revision", c.revision);
  r.get("inference_mode", c.inference_mode);
  r.get("peft_version", c.peft_version);
  r.find("auto_mapping");
  r.get("modules_to_save", c.modules_to_save);
  if (!std::holds_alternative<PrefixTuningConfig>(c.method)) {
    detail::get_index(r, "num_attention_heads", c.num_attention_heads);
    detail::get_index(r, "num_layers", c.num_layers);
  }
  std::visit([&](auto& m) {
    m.inference_mode = c.inference_mode;
    try {
      m.validate();
    } catch (const ConfigError& e) {
      throw FormatError(peft::detail::cat(file, ": ", e.what()));
    }
  }, c.method);
  for (const auto& k : r.unread()) warn(peft::detail::cat(file, ": unknown key '", k, "' (not a ", type, " field PEFT 0.21 writes); ignored"));
  return c;
}

/// Reads a prompt-learning adapter_config.json (a file, or a directory that contains one).
inline PromptAdapterConfig read_prompt_config(const std::filesystem::path& path) {
  std::filesystem::path p = path;
  if (std::filesystem::is_directory(p)) p /= "adapter_config.json";
  std::ifstream in(p, std::ios::binary);
  if (!in) throw FormatError(peft::detail::cat(p.string(), ": cannot open the adapter config"));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return parse_prompt_config(text, p.string());
}

/// Either kind of adapter_config.json (a file or a directory holding one): prompt-learning methods as
/// PromptAdapterConfig, the layer-adapter methods as AdapterConfig (parse_adapter_config).
using AnyAdapterConfig = std::variant<AdapterConfig, PromptAdapterConfig>;
inline AnyAdapterConfig read_any_adapter_config(const std::filesystem::path& path) {
  std::filesystem::path p = path;
  if (std::filesystem::is_directory(p)) p /= "adapter_config.json";
  std::ifstream in(p, std::ios::binary);
  if (!in) throw FormatError(peft::detail::cat(p.string(), ": cannot open the adapter config"));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_object() && j.contains("peft_type") && j["peft_type"].is_string() && is_prompt_learning_type(j["peft_type"].get<std::string>()))
    return parse_prompt_config(text, p.string());
  return parse_adapter_config(text, p.string());
}

/// The JSON object PEFT 0.21 writes for `c` (the same keys as PEFT's to_dict; inference_mode true;
/// encoder_hidden_size resolved to token_dim when 0, as PEFT resolves it before saving).
inline nlohmann::json to_json(const PromptAdapterConfig& c) {
  using detail::json;
  using detail::opt_index;
  using detail::opt_string;
  json j = json::object();
  j["peft_type"] = c.peft_type();
  j["task_type"] = opt_string(c.task_type);
  j["base_model_name_or_path"] = opt_string(c.base_model_name_or_path);
  j["revision"] = opt_string(c.revision);
  j["inference_mode"] = true;
  j["auto_mapping"] = nullptr;
  j["modules_to_save"] = c.modules_to_save ? json(*c.modules_to_save) : json(nullptr);
  j["num_attention_heads"] = opt_index(c.num_attention_heads);
  j["num_layers"] = opt_index(c.num_layers);
  std::visit([&](const auto& m) {
    using C = std::remove_cvref_t<decltype(m)>;
    j["num_virtual_tokens"] = m.num_virtual_tokens;
    j["token_dim"] = opt_index(m.token_dim);
    if constexpr (std::is_same_v<C, PrefixTuningConfig>) {
      j["num_transformer_submodules"] = 1;
      j["num_attention_heads"] = opt_index(m.num_attention_heads);
      j["num_layers"] = opt_index(m.num_layers);
      j["prefix_projection"] = m.prefix_projection;
      j["encoder_hidden_size"] = m.hidden();
      j["init_weights"] = m.init_weights_zero ? json("zero") : json(nullptr);
    } else {
      j["num_transformer_submodules"] = m.num_transformer_submodules;
    }
    if constexpr (std::is_same_v<C, PromptEncoderConfig>) {
      j["encoder_reparameterization_type"] = detail::encoder_types[int(m.encoder_reparameterization_type)];
      j["encoder_hidden_size"] = m.hidden();
      j["encoder_num_layers"] = m.encoder_num_layers;
      j["encoder_dropout"] = m.encoder_dropout;  // a float, as PEFT writes it (0.0)
    }
    if constexpr (std::is_same_v<C, PromptTuningConfig> || std::is_same_v<C, MultitaskPromptTuningConfig>) {
      if constexpr (std::is_same_v<C, PromptTuningConfig>) j["prompt_tuning_init"] = detail::prompt_tuning_inits[int(m.prompt_tuning_init)];
      else j["prompt_tuning_init"] = detail::multitask_inits[int(m.prompt_tuning_init)];
      j["prompt_tuning_init_text"] = m.prompt_tuning_init_text.empty() ? json(nullptr) : json(m.prompt_tuning_init_text);
      j["tokenizer_name_or_path"] = opt_string(c.tokenizer_name_or_path);
      j["tokenizer_kwargs"] = nullptr;
    }
    if constexpr (std::is_same_v<C, MultitaskPromptTuningConfig>) {
      j["num_tasks"] = m.num_tasks;
      j["num_ranks"] = m.num_ranks;
      j["prompt_tuning_init_task"] = m.prompt_tuning_init_task;
      j["prompt_tuning_init_state_dict_path"] = opt_string(c.prompt_tuning_init_state_dict_path);
    }
  }, c.method);
  return j;
}

/// Writes adapter_config.json atomically; `path` is the file or a directory (created if missing).
inline void write_prompt_config(const std::filesystem::path& path, const PromptAdapterConfig& c, bool sync = true) {
  std::filesystem::path p = path;
  if (std::filesystem::is_directory(p) || (!p.has_extension() && !std::filesystem::exists(p))) {
    std::filesystem::create_directories(p);
    p /= "adapter_config.json";
  }
  const std::string text = to_json(c).dump(2);
  AtomicFile f(p, sync);
  f.write(std::as_bytes(std::span<const char>(text.data(), text.size())));
  f.commit();
}

// ---------------------------------------------------------------------------------------------
// Tensors

namespace detail {

template <class M>
struct PromptModuleTraits;
template <class T, class B>
struct PromptModuleTraits<PromptEmbedding<T, B>> { using config = PromptTuningConfig; using scalar = T; using backend = B; };
template <class T, class B>
struct PromptModuleTraits<PromptEncoder<T, B>> { using config = PromptEncoderConfig; using scalar = T; using backend = B; };
template <class T, class B>
struct PromptModuleTraits<PrefixEncoder<T, B>> { using config = PrefixTuningConfig; using scalar = T; using backend = B; };
template <class T, class B>
struct PromptModuleTraits<MultitaskPromptEmbedding<T, B>> { using config = MultitaskPromptTuningConfig; using scalar = T; using backend = B; };

/// The shape of prompt_embeddings for a module's config.
template <class C>
std::vector<std::uint64_t> prompt_embeddings_shape(const C& c) {
  if constexpr (std::is_same_v<C, PrefixTuningConfig>) return {std::uint64_t(c.num_virtual_tokens), std::uint64_t(c.prefix_dim())};
  else return {std::uint64_t(c.total_virtual_tokens()), std::uint64_t(c.token_dim)};
}

/// A view of the backend's memory (device memory on a GPU) as a host vector, row-major.
template <class Backend, class T>
std::vector<T> to_vector(ConstMatrixView<T> v) {
  std::vector<T> out(std::size_t(v.rows * v.cols));
  Backend::template download<T>(v, MatrixView<T>(out.data(), v.rows, v.cols));
  return out;
}
/// dst (the backend's memory) = the host values `src` (row-major, dst's shape).
template <class Backend, class T>
void from_vector(const std::vector<T>& src, std::size_t offset, MatrixView<T> dst) {
  Backend::template upload<T>(ConstMatrixView<T>(src.data() + offset, dst.rows, dst.cols), dst);
}

}  // namespace detail

/// The tensors PEFT's get_peft_model_state_dict gives for `m` (as it saves a trainable model: the encoder
/// output for P-tuning and prefix projection), by name, row-major.
template <class Module>
std::vector<std::pair<std::string, std::pair<std::vector<std::uint64_t>, std::vector<typename detail::PromptModuleTraits<Module>::scalar>>>>
prompt_state_dict(const Module& m) {
  using Tr = detail::PromptModuleTraits<Module>;
  using T = typename Tr::scalar;
  using C = typename Tr::config;
  using B = typename Tr::backend;
  const C& c = m.config();
  std::vector<std::pair<std::string, std::pair<std::vector<std::uint64_t>, std::vector<T>>>> out;
  std::vector<T> pe;
  if constexpr (std::is_same_v<C, PromptTuningConfig> || std::is_same_v<C, MultitaskPromptTuningConfig>) pe = detail::to_vector<B, T>(m.prompt_embeddings());
  else pe = m.prompt_embeddings();
  out.push_back({"prompt_embeddings", {detail::prompt_embeddings_shape(c), std::move(pe)}});
  if constexpr (std::is_same_v<C, MultitaskPromptTuningConfig>) {
    auto& mm = const_cast<Module&>(m);  // task_cols/task_rows have no const overloads; only read here
    const Index K = m.num_tasks(), n = m.num_virtual_tokens(), r = m.num_ranks(), d = m.token_dim();
    std::vector<T> cols, rows;
    for (Index k = 0; k < K; ++k) {
      auto a = detail::to_vector<B, T>(ConstMatrixView<T>(mm.task_cols(k)));
      auto b = detail::to_vector<B, T>(ConstMatrixView<T>(mm.task_rows(k)));
      cols.insert(cols.end(), a.begin(), a.end());
      rows.insert(rows.end(), b.begin(), b.end());
    }
    out.push_back({"prefix_task_cols", {{std::uint64_t(K), std::uint64_t(n), std::uint64_t(r)}, std::move(cols)}});
    out.push_back({"prefix_task_rows", {{std::uint64_t(K), std::uint64_t(r), std::uint64_t(d)}, std::move(rows)}});
  }
  return out;
}

/// Saves `m` as PeftModel.save_pretrained does: dir/adapter_config.json (`config`, whose method is
/// replaced by the module's config) and dir/adapter_model.safetensors (prompt_state_dict, F32 for float
/// modules, F64 for double). Both atomic; the directory is created if needed.
template <class Module>
void save_prompt_pretrained(const Module& m, const std::filesystem::path& dir, PromptAdapterConfig config = {}, bool sync = true) {
  using T = typename detail::PromptModuleTraits<Module>::scalar;
  config.method = m.config();
  std::filesystem::create_directories(dir);
  const auto sd = prompt_state_dict(m);
  std::vector<safetensors::TensorRef> refs;
  for (const auto& [name, st] : sd) {
    const auto& [shape, values] = st;
    refs.emplace_back(name, ConstMatrixView<T>(values.data(), 1, Index(values.size())), shape);
  }
  safetensors::WriteOptions wo;
  wo.sync = sync;
  safetensors::write(dir / "adapter_model.safetensors", std::span<const safetensors::TensorRef>(refs), {}, wo);
  write_prompt_config(dir / "adapter_config.json", config, sync);
}

/// Loads dir/adapter_model.safetensors into `m` as set_peft_model_state_dict does (prompt_embeddings into
/// the table; for multitask also prefix_task_cols / prefix_task_rows). Strict: a missing or unexpected
/// tensor is a FormatError naming it and the file, a wrong shape a ShapeError naming the tensor, the shape
/// found and the one expected. A P-tuning or prefix-projection module must be in inference mode (the file
/// holds the encoder's output, not its input): ConfigError otherwise.
template <class Module>
void load_prompt_weights(Module& m, const std::filesystem::path& dir) {
  using Tr = detail::PromptModuleTraits<Module>;
  using T = typename Tr::scalar;
  using C = typename Tr::config;
  using B = typename Tr::backend;
  const C& c = m.config();
  if constexpr (std::is_same_v<C, PromptEncoderConfig>) {
    if (!c.inference_mode)
      throw ConfigError("load_prompt_weights: a P-tuning checkpoint holds the prompt encoder's output; load it into a module built with inference_mode = true");
  } else if constexpr (std::is_same_v<C, PrefixTuningConfig>) {
    if (c.projects())
      throw ConfigError("load_prompt_weights: a prefix-tuning checkpoint holds the projection's output; load it into a module built with inference_mode = true");
  }
  const std::filesystem::path file = std::filesystem::is_directory(dir) ? dir / "adapter_model.safetensors" : dir;
  safetensors::File f(file);
  std::vector<std::string> want{"prompt_embeddings"};
  if constexpr (std::is_same_v<C, MultitaskPromptTuningConfig>) want = {"prefix_task_cols", "prefix_task_rows", "prompt_embeddings"};
  for (const auto& w : want)
    if (!f.contains(w)) throw FormatError(peft::detail::cat(file.string(), ": tensor '", w, "' is missing (a ", detail::PromptType<C>::name, " checkpoint holds it)"));
  for (const auto& n : f.names()) {
    bool known = false;
    for (const auto& w : want) known = known || n == w;
    if (!known) throw FormatError(peft::detail::cat(file.string(), ": unexpected tensor '", n, "' (a ", detail::PromptType<C>::name, " checkpoint holds only ",
                                                    want.size() == 1 ? "prompt_embeddings" : "prompt_embeddings, prefix_task_cols and prefix_task_rows", ")"));
  }
  auto check = [&](const std::string& name, const std::vector<std::uint64_t>& shape) {
    const auto& got = f.info(name).shape;
    if (got != shape)
      throw ShapeError(peft::detail::cat(file.string(), ": tensor '", name, "' has shape ", safetensors::detail::shape_string(got), ", the module expects ",
                                         safetensors::detail::shape_string(shape)));
    std::vector<T> v(std::size_t(f.info(name).numel()));
    f.read_as<T>(name, v);
    return v;
  };
  const auto pe = check("prompt_embeddings", detail::prompt_embeddings_shape(c));
  detail::from_vector<B>(pe, 0, m.weight());
  if constexpr (std::is_same_v<C, MultitaskPromptTuningConfig>) {
    const Index K = m.num_tasks(), n = m.num_virtual_tokens(), r = m.num_ranks(), d = m.token_dim();
    const auto cols = check("prefix_task_cols", {std::uint64_t(K), std::uint64_t(n), std::uint64_t(r)});
    const auto rows = check("prefix_task_rows", {std::uint64_t(K), std::uint64_t(r), std::uint64_t(d)});
    for (Index k = 0; k < K; ++k) {
      detail::from_vector<B>(cols, std::size_t(k * n * r), m.task_cols(k));
      detail::from_vector<B>(rows, std::size_t(k * r * d), m.task_rows(k));
    }
  }
}

/// Reads dir's config, checks it is `C`'s method (FormatError naming the file, the peft_type found and the
/// one expected) and returns the library config in inference mode, as PeftModel.from_pretrained builds it.
template <class C>
C read_prompt_method_config(const std::filesystem::path& dir, PromptAdapterConfig* full = nullptr) {
  PromptAdapterConfig pc;
  const std::filesystem::path cfg = std::filesystem::is_directory(dir) ? dir / "adapter_config.json" : dir;
  {
    std::ifstream in(cfg, std::ios::binary);
    if (!in) throw FormatError(peft::detail::cat(cfg.string(), ": cannot open the adapter config"));
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_object() && j.contains("peft_type") && j["peft_type"].is_string()) {
      const std::string t = j["peft_type"].get<std::string>();
      if (t != detail::PromptType<C>::name)
        throw FormatError(peft::detail::cat(cfg.string(), ": key 'peft_type': the checkpoint is \"", t, "\", expected \"", detail::PromptType<C>::name, "\""));
    }
    pc = parse_prompt_config(text, cfg.string());
  }
  C c = std::get<C>(pc.method);
  c.inference_mode = true;
  if (full) *full = pc;
  return c;
}

/// PeftModel.from_pretrained for each method: the module built from dir's config in inference mode, its
/// tensors loaded. `word_embeddings` (prompt tuning, multitask) may be empty: token_dim is in the file.
template <class T, class Backend = EigenCpu>
PromptEmbedding<T, Backend> load_prompt_tuning(const std::filesystem::path& dir) {
  Generator gen(0);
  PromptEmbedding<T, Backend> m(read_prompt_method_config<PromptTuningConfig>(dir), ConstMatrixView<T>{}, gen);
  load_prompt_weights(m, dir);
  return m;
}
template <class T, class Backend = EigenCpu>
PromptEncoder<T, Backend> load_p_tuning(const std::filesystem::path& dir) {
  Generator gen(0);
  PromptEncoder<T, Backend> m(read_prompt_method_config<PromptEncoderConfig>(dir), gen);
  load_prompt_weights(m, dir);
  return m;
}
template <class T, class Backend = EigenCpu>
PrefixEncoder<T, Backend> load_prefix_tuning(const std::filesystem::path& dir) {
  Generator gen(0);
  PrefixEncoder<T, Backend> m(read_prompt_method_config<PrefixTuningConfig>(dir), gen);
  load_prompt_weights(m, dir);
  return m;
}
template <class T, class Backend = EigenCpu>
MultitaskPromptEmbedding<T, Backend> load_multitask_prompt_tuning(const std::filesystem::path& dir) {
  Generator gen(0);
  auto c = read_prompt_method_config<MultitaskPromptTuningConfig>(dir);
  c.prompt_tuning_init = MultitaskPromptTuningInit::random;  // the tensors come from the file, not from a source task
  MultitaskPromptEmbedding<T, Backend> m(c, ConstMatrixView<T>{}, gen);
  load_prompt_weights(m, dir);
  return m;
}

}  // namespace peft::io
