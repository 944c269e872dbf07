// peft++ — adapter checkpoints in Hugging Face PEFT's format: save_pretrained / load_pretrained.
//
//   peft::io::save_pretrained(model, "out", "default", cfg);      // out/adapter_config.json + out/adapter_model.safetensors
//   auto r = peft::io::load_pretrained(model, "out", "default");  // PeftModel.from_pretrained's counterpart
//
// A checkpoint holds one adapter. Its tensors are named as PEFT's get_peft_model_state_dict names them:
// `base_model.model.<module path>.<tensor>` with the adapter name removed — `lora_A.weight`, `lora_B.weight`,
// `lora_B.bias` (lora_bias), `lora_magnitude_vector` (DoRA; no `.weight`), `lora_embedding_A`,
// `lora_embedding_B`, `hada_w1_a` ... `hada_w2_b`, `lokr_w1` / `lokr_w1_a` / ... / `lokr_w2_b`, `ia3_l` —
// and shaped as PEFT's modules hold them (conv LoRA A [r, C, kh, kw] and B [O, r, 1, 1], (IA)³ [out, 1],
// [1, in] (feed-forward) or [1, C, 1, 1] (conv), ...). The module path of a layer is the one
// peft::for_each_layer reports: the layer's module_path() (give it the name the PyTorch model uses), or
// the field index path.
//
// Both files are written atomically (temporary file, fsync, rename).
#pragma once

#include <algorithm>
#include <deque>
#include <filesystem>
#include <memory>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/adapted.hpp"
#include "peft/adapter/adalora.hpp"
#include "peft/adapter/vera.hpp"
#include "peft/io/adapter_config.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/model.hpp"

namespace peft::io {

/// The file names PEFT uses.
inline constexpr const char* adapter_config_name = "adapter_config.json";
inline constexpr const char* adapter_weights_name = "adapter_model.safetensors";
/// The prefix of every key PEFT writes for a PeftModel.
inline constexpr const char* state_dict_prefix = "base_model.model.";

/// PEFT's rule for turning an in-memory parameter name into a checkpoint key: a trailing ".<adapter>" is
/// dropped (a bare nn.Parameter), otherwise ".<adapter>" is removed when it is the second-to-last component
/// (`q.lora_A.default.weight` → `q.lora_A.weight`). (DoRA's `lora_magnitude_vector.weight` additionally
/// loses `.weight`; see checkpoint_key.)
inline std::string remove_adapter_name(const std::string& key, const std::string& adapter) {
  if (key.find('.') == std::string::npos) return key;
  const std::string tail = "." + adapter;
  if (key.size() >= tail.size() && key.compare(key.size() - tail.size(), tail.size(), tail) == 0) return key.substr(0, key.size() - tail.size());
  const auto dot = key.rfind('.');
  std::string head = key.substr(0, dot);
  const std::string suffix = key.substr(dot + 1);
  if (head.size() >= tail.size() && head.compare(head.size() - tail.size(), tail.size(), tail) == 0) head.resize(head.size() - tail.size());
  return head + "." + suffix;
}

/// The checkpoint key PEFT writes for parameter `param` (as visit_parameters names it, e.g.
/// "lora_A.default.weight") of the layer at `module_path`.
inline std::string checkpoint_key(const std::string& module_path, const std::string& param, const std::string& adapter) {
  std::string k = remove_adapter_name(std::string(state_dict_prefix) + (module_path.empty() ? "" : module_path + ".") + param, adapter);
  const std::string dora = "lora_magnitude_vector.weight";
  if (k.size() >= dora.size() && k.compare(k.size() - dora.size(), dora.size(), dora) == 0) k.resize(k.size() - 7);
  return k;
}

// ---------------------------------------------------------------------------------------------
// Per kind: the tensors of one adapter, with PEFT's names (after the module path) and shapes

/// One adapter tensor as a checkpoint sees it.
template <class T>
struct AdapterTensor {
  std::string suffix;               ///< e.g. "lora_A.weight"
  MatrixView<T> view;               ///< the library's storage (contiguous)
  std::vector<std::uint64_t> shape;  ///< PEFT's shape
};

namespace detail {

template <class B>
concept ConvBase = requires(const B& b) { b.geometry().kernel_h; };
template <class B>
concept EmbeddingBase = requires(const B& b) { b.num_embeddings(); };

inline std::vector<std::uint64_t> dims(std::initializer_list<Index> d) {
  std::vector<std::uint64_t> v;
  for (Index x : d) v.push_back(std::uint64_t(x));
  return v;
}

/// The [rows, cols] view `v` of Backend's memory as a host copy, appended to `store` (which must outlive the
/// returned view). Used when saving from a device model: checkpoints are written from host memory.
template <class Backend, class T>
MatrixView<T> host_copy(ConstMatrixView<T> v, std::deque<std::vector<T>>& store) {
  auto& h = store.emplace_back(std::size_t(v.size()));
  MatrixView<T> out(h.data(), v.rows, v.cols);
  if (!v.empty()) Backend::template download<T>(v, out);
  return out;
}

}  // namespace detail

/// How one adapter kind maps to checkpoint tensors, and which config fields must agree for PEFT to rebuild
/// the same layer. Specialised per kind; adding a method means one more specialisation.
template <class Kind>
struct KindCheckpoint;

template <>
struct KindCheckpoint<Lora> {
  static constexpr const char* prefix = "lora_";
  template <class Base, class A>
  static auto tensors(const Base& base, A& a) {
    using T = typename Base::scalar;
    std::vector<AdapterTensor<T>> t;
    using detail::dims;
    if constexpr (detail::EmbeddingBase<Base>) {
      t.push_back({"lora_embedding_A", a.A(), dims({a.r, a.in})});
      t.push_back({"lora_embedding_B", a.B(), dims({a.out, a.r})});
    } else if constexpr (detail::ConvBase<Base>) {
      const auto& g = base.geometry();
      t.push_back({"lora_A.weight", a.A(), dims({a.r, g.in_channels, g.kernel_h, g.kernel_w})});
      t.push_back({"lora_B.weight", a.B(), dims({a.out, a.r, 1, 1})});
    } else {
      t.push_back({"lora_A.weight", a.A(), dims({a.r, a.in})});
      t.push_back({"lora_B.weight", a.B(), dims({a.out, a.r})});
    }
    if (a.config.lora_bias) t.push_back({"lora_B.bias", a.B_bias(), dims({a.out})});
    if (a.dora()) t.push_back({"lora_magnitude_vector", a.M(), dims({a.out})});
    return t;
  }
  /// "" when PEFT's layer built from `want` has the same structure and scaling as `a`, else the field.
  template <class A>
  static std::string mismatch(const A& a, const LoraConfig& want) {
    const auto& c = a.config;
    if (c.r != want.r) return peft::detail::cat("r = ", c.r, " but the config gives ", want.r);
    if (LoraConfig::scaling_for(c.lora_alpha, c.r, c.use_rslora) != LoraConfig::scaling_for(want.lora_alpha, want.r, want.use_rslora))
      return peft::detail::cat("scaling = ", LoraConfig::scaling_for(c.lora_alpha, c.r, c.use_rslora), " (lora_alpha ", c.lora_alpha,
                               c.use_rslora ? ", rsLoRA" : "", ") but the config gives ",
                               LoraConfig::scaling_for(want.lora_alpha, want.r, want.use_rslora));
    if (c.use_dora != want.use_dora) return peft::detail::cat("use_dora = ", c.use_dora, " but the config has ", want.use_dora);
    if (c.lora_bias != want.lora_bias) return peft::detail::cat("lora_bias = ", c.lora_bias, " but the config has ", want.lora_bias);
    if (c.fan_in_fan_out != want.fan_in_fan_out) return peft::detail::cat("fan_in_fan_out = ", c.fan_in_fan_out, " but the config has ", want.fan_in_fan_out);
    return {};
  }
};

template <>
struct KindCheckpoint<Loha> {
  static constexpr const char* prefix = "hada_";
  template <class Base, class A>
  static auto tensors(const Base&, A& a) {
    using T = typename Base::scalar;
    using detail::dims;
    return std::vector<AdapterTensor<T>>{{"hada_w1_a", a.hada_w1_a(), dims({a.rows, a.r})},
                                         {"hada_w1_b", a.hada_w1_b(), dims({a.r, a.cols})},
                                         {"hada_w2_a", a.hada_w2_a(), dims({a.rows, a.r})},
                                         {"hada_w2_b", a.hada_w2_b(), dims({a.r, a.cols})}};
  }
  template <class A>
  static std::string mismatch(const A& a, const LohaConfig& want) {
    const auto& c = a.config;
    if (c.r != want.r) return peft::detail::cat("r = ", c.r, " but the config gives ", want.r);
    if (LohaConfig::scaling_for(c.alpha, c.r) != LohaConfig::scaling_for(want.alpha, want.r))
      return peft::detail::cat("alpha = ", c.alpha, " but the config gives ", want.alpha);
    return {};
  }
};

template <>
struct KindCheckpoint<Lokr> {
  static constexpr const char* prefix = "lokr_";
  template <class Base, class A>
  static auto tensors(const Base&, A& a) {
    using T = typename Base::scalar;
    std::vector<AdapterTensor<T>> t;
    for (const auto& [name, shape] : a.layout.tensors()) {
      MatrixView<T> v = name == "lokr_w1" ? a.lokr_w1() : name == "lokr_w1_a" ? a.lokr_w1_a() : name == "lokr_w1_b" ? a.lokr_w1_b()
                      : name == "lokr_w2"   ? a.lokr_w2() : name == "lokr_w2_a" ? a.lokr_w2_a() : name == "lokr_w2_b" ? a.lokr_w2_b()
                                                                                                    : MatrixView<T>{};
      if (v.empty()) throw ConfigError(peft::detail::cat("LoKr tensor ", name, " (CP form) is not supported by peft++"));
      std::vector<std::uint64_t> s;
      for (Index d : shape) s.push_back(std::uint64_t(d));
      t.push_back({name, v, std::move(s)});
    }
    return t;
  }
  template <class A>
  static std::string mismatch(const A& a, const LokrConfig& want) {
    const auto& c = a.config;
    if (c.r != want.r) return peft::detail::cat("r = ", c.r, " but the config gives ", want.r);
    if (LokrConfig::scaling_for(c.alpha, c.r) != LokrConfig::scaling_for(want.alpha, want.r))
      return peft::detail::cat("alpha = ", c.alpha, " but the config gives ", want.alpha);
    if (c.decompose_both != want.decompose_both) return peft::detail::cat("decompose_both = ", c.decompose_both, " but the config has ", want.decompose_both);
    if (c.decompose_factor != want.decompose_factor) return peft::detail::cat("decompose_factor = ", c.decompose_factor, " but the config has ", want.decompose_factor);
    return {};
  }
};

template <>
struct KindCheckpoint<Ia3> {
  static constexpr const char* prefix = "ia3_";
  template <class Base, class A>
  static auto tensors(const Base&, A& a) {
    using T = typename Base::scalar;
    using detail::dims;
    std::vector<std::uint64_t> shape;
    if constexpr (detail::ConvBase<Base>) shape = dims({1, a.size, 1, 1});
    else shape = a.feedforward ? dims({1, a.size}) : dims({a.size, 1});
    return std::vector<AdapterTensor<T>>{{"ia3_l", a.vector(), std::move(shape)}};
  }
  template <class A>
  static std::string mismatch(const A& a, const Ia3Config& want) {
    if (a.feedforward != want.is_feedforward)
      return peft::detail::cat("the layer is ", a.feedforward ? "" : "not ", "feed-forward but the config's feedforward_modules say otherwise");
    return {};
  }
};

template <>
struct KindCheckpoint<AdaLora> {
  static constexpr const char* prefix = "lora_";
  template <class Base, class A>
  static auto tensors(const Base&, A& a) {
    using T = typename Base::scalar;
    using detail::dims;
    // PEFT's SVDLinear: bare nn.Parameters (no ".weight"); E is [r, 1]. ranknum is not saved (PEFT >= 0.14)
    return std::vector<AdapterTensor<T>>{{"lora_A", a.A(), dims({a.r, a.in})},
                                         {"lora_B", a.B(), dims({a.out, a.r})},
                                         {"lora_E", a.E(), dims({a.r, 1})}};
  }
  /// The tensors truncated to the triplets `keep` marks (PEFT's resize_state_dict_by_rank_pattern), copied
  /// into `store` (which must outlive the views).
  template <class T, class A>
  static std::vector<AdapterTensor<T>> truncated(const A& a, const std::vector<bool>& keep, std::deque<std::vector<T>>& store) {
    using detail::dims;
    const Index k = Index(std::count(keep.begin(), keep.end(), true));
    auto& va = store.emplace_back();
    auto& ve = store.emplace_back();
    auto& vb = store.emplace_back();
    adalora::detail::kept_triplets<T>(a, keep, va, vb, ve);  // (downloaded first on a device backend)
    return {{"lora_A", MatrixView<T>(va.data(), k, a.in), dims({k, a.in})},
            {"lora_B", MatrixView<T>(vb.data(), a.out, k), dims({a.out, k})},
            {"lora_E", MatrixView<T>(ve.data(), k, 1), dims({k, 1})}};
  }
  /// Whether saving adapter `a` under `want` truncates it: it still has all init_r triplets and the
  /// config's rank_pattern keeps fewer (PEFT saves a model in the middle of training that way).
  template <class A>
  static bool truncates(const A& a, const AdaLoraConfig& want) {
    return !want.rank_pattern.empty() && a.r == want.init_r && want.rank_for_module() < a.r;
  }
  template <class A>
  static std::string mismatch(const A& a, const AdaLoraConfig& want) {
    const auto& c = a.config;
    if (a.ranknum != double(want.init_r))
      return peft::detail::cat("init_r = ", a.ranknum, " (ranknum) but the config gives ", want.init_r);
    if (c.lora_alpha != want.lora_alpha) return peft::detail::cat("lora_alpha = ", c.lora_alpha, " but the config gives ", want.lora_alpha);
    if (c.fan_in_fan_out != want.fan_in_fan_out) return peft::detail::cat("fan_in_fan_out = ", c.fan_in_fan_out, " but the config has ", want.fan_in_fan_out);
    const int kept = want.rank_for_module();
    if (a.r != kept && !truncates(a, want)) {
      if (want.rank_pattern.empty())
        return peft::detail::cat("the adapter has rank ", a.r, " (truncated) but the config's rank_pattern has no entry for this module, so PEFT "
                                 "would rebuild it with init_r = ", want.init_r, "; put the allocator's rank_pattern() in the config");
      return peft::detail::cat("the adapter has rank ", a.r, " but the config's rank_pattern keeps ", kept, " of init_r = ", want.init_r, " triplets");
    }
    return {};
  }
};

template <>
struct KindCheckpoint<Vera> {
  static constexpr const char* prefix = "vera_lambda_";
  template <class Base, class A>
  static auto tensors(const Base&, A& a) {
    using T = typename Base::scalar;
    using detail::dims;
    // bare nn.Parameters: vera_lambda_b [out], vera_lambda_d [r]; the shared projections are model-level
    // entries (base_model.vera_A / base_model.vera_B), added once per checkpoint
    return std::vector<AdapterTensor<T>>{{"vera_lambda_b", a.vera_lambda_b(), dims({a.out})}, {"vera_lambda_d", a.vera_lambda_d(), dims({a.r})}};
  }
  template <class A>
  static std::string mismatch(const A& a, const VeraConfig& want) {
    const auto& c = a.config;
    if (c.r != want.r) return peft::detail::cat("r = ", c.r, " but the config gives ", want.r);
    if (c.fan_in_fan_out != want.fan_in_fan_out) return peft::detail::cat("fan_in_fan_out = ", c.fan_in_fan_out, " but the config has ", want.fan_in_fan_out);
    return {};
  }
};

/// PEFT's checkpoint keys of VeRA's shared projections (written when save_projection is true).
inline constexpr const char* vera_A_key = "base_model.vera_A";
inline constexpr const char* vera_B_key = "base_model.vera_B";

namespace detail {

template <class L>
struct adapted_traits : std::false_type {};
template <class Base, class... Kinds>
struct adapted_traits<Adapted<Base, Kinds...>> : std::true_type {
  using kinds = std::tuple<Kinds...>;
};

template <class Kinds, class F, std::size_t... I>
void for_each_kind_impl(F&& f, std::index_sequence<I...>) {
  (f(std::type_identity<std::tuple_element_t<I, Kinds>>{}), ...);
}
/// f(std::type_identity<Kind>) for every kind of an Adapted layer type.
template <class Layer, class F>
void for_each_kind(F&& f) {
  using K = typename adapted_traits<Layer>::kinds;
  for_each_kind_impl<K>(f, std::make_index_sequence<std::tuple_size_v<K>>{});
}

template <class Kind>
using kind_config_t = typename Kind::config_type;

template <class Layer, class Config>
struct has_config_impl : std::false_type {};
template <class Base, class... Kinds, class Config>
struct has_config_impl<Adapted<Base, Kinds...>, Config> : std::bool_constant<(std::is_same_v<typename Kinds::config_type, Config> || ...)> {};
/// Whether an Adapted layer type has a kind configured by Config.
template <class Layer, class Config>
inline constexpr bool has_config = has_config_impl<Layer, Config>::value;

/// The kind of adapter `name` on `layer` (asked of the layer: several kinds may share a parameter prefix,
/// e.g. LoRA's and AdaLoRA's "lora_A"); calls f(type_identity<Kind>). Returns false when the layer has no
/// adapter of that name.
template <class Layer, class F>
bool with_adapter_kind(Layer& layer, const std::string& name, F&& f) {
  if (!layer.has_adapter(name)) return false;
  bool done = false;
  for_each_kind<Layer>([&](auto k) {
    using K = typename decltype(k)::type;
    if (done) return;
    try {
      (void)layer.template adapter<K>(name);
    } catch (const AdapterError&) {
      return;  // another kind
    }
    done = true;
    f(k);
  });
  if (!done) throw AdapterError(cat("adapter '", name, "' on layer '", layer.module_path(), "': no checkpoint format for its kind"));
  return true;
}

/// The checkpoint tensors of adapter `name` on `layer` (which must have it).
template <class Layer>
auto layer_tensors(Layer& layer, const std::string& name) {
  std::vector<AdapterTensor<typename Layer::scalar>> out;
  with_adapter_kind(layer, name, [&](auto k) {
    using K = typename decltype(k)::type;
    out = KindCheckpoint<K>::tensors(layer.base(), layer.template adapter<K>(name));
  });
  return out;
}

inline std::string shape_str(const std::vector<std::uint64_t>& s) {
  std::string o = "[";
  for (std::size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

template <class M>
bool method_is(const AdapterConfig& c) {
  return std::holds_alternative<M>(c.method);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Saving

struct SaveOptions {
  bool sync = true;  ///< fsync the files and the directory (see safetensors::WriteOptions)
};

// ---------------------------------------------------------------------------------------------
// Whole modules saved beside the adapter (PEFT's modules_to_save)

/// A module trained in full beside the adapter — PEFT's `modules_to_save`, e.g. a new classification head.
/// Its tensors are saved as `base_model.model.<path>.<name>` (`base_model.model.head.weight`, `...head.bias`),
/// the keys PEFT's ModulesToSaveWrapper writes, and loaded back into the same views. Build one with
/// module_to_save(path, layer) for a Linear, Embedding or Conv2d, or add() tensors of any layer by hand.
template <class T>
struct ModuleToSave {
  std::string path;                       ///< the module path in the PyTorch model ("classifier", "score", "head")
  std::vector<AdapterTensor<T>> tensors;  ///< suffix: the tensor's name inside the module ("weight", "bias")

  /// Adds one tensor with PyTorch's shape (its element count must be the view's; the view contiguous).
  ModuleToSave& add(std::string name, MatrixView<T> view, std::vector<std::uint64_t> shape) {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;
    if (!view.contiguous() || n != std::uint64_t(view.size()))
      throw ShapeError(peft::detail::cat("ModuleToSave '", path, "': tensor '", name, "' has shape ", detail::shape_str(shape), " (", n,
                                         " elements) but its storage is ", view.contiguous() ? "" : "a non-contiguous ", "[", view.rows, ", ",
                                         view.cols, "]"));
    tensors.push_back({std::move(name), view, std::move(shape)});
    return *this;
  }
};

/// The weight (and bias, when the layer has one) of a plain Linear, Embedding or Conv2d layer as a module to
/// save, with PyTorch's shapes: Linear [out, in] ([in, out] for a Conv1D-style layout) and [out], Embedding
/// [num_embeddings, embedding_dim], Conv2d [out, in, kh, kw] and [out]. Views: nothing is copied.
template <class Layer>
ModuleToSave<typename Layer::scalar> module_to_save(std::string path, Layer& layer) {
  static_assert(!detail::adapted_traits<std::remove_cvref_t<Layer>>::value,
                "module_to_save: a module to save is a plain layer (PEFT never puts adapters on modules_to_save)");
  static_assert(std::remove_cvref_t<Layer>::backend_type::host_accessible,
                "module_to_save: a module to save is read and written through host views; for a device layer, save and load a CPU "
                "twin of it (Backend::download / upload its weight and bias)");
  ModuleToSave<typename Layer::scalar> m{std::move(path), {}};
  auto w = layer.weight();
  if constexpr (detail::ConvBase<Layer>) {
    const auto& g = layer.geometry();
    m.add("weight", w, detail::dims({g.out_channels, g.in_channels, g.kernel_h, g.kernel_w}));
  } else {
    m.add("weight", w, detail::dims({w.rows, w.cols}));
  }
  if constexpr (requires { layer.bias(); }) {
    auto b = layer.bias();
    if (!b.empty()) m.add("bias", b, {std::uint64_t(b.size())});
  }
  return m;
}

namespace detail {
template <class T>
struct StateEntry {
  std::string key;
  MatrixView<T> view;
  std::vector<std::uint64_t> shape;
  std::shared_ptr<const void> owner;  ///< keeps copied values alive (truncated AdaLoRA tensors, VeRA projections)
};

/// Collects the checkpoint tensors of one adapter (and biases per `bias`), with PEFT's keys. With `cfg`,
/// AdaLoRA adapters that still hold all init_r triplets are truncated by the config's rank_pattern (copies).
/// VeRA adds the shared projections once, sliced to the largest in/out features of the adapted layers
/// (the size PEFT gives them for these layers).
template <class T, class Model>
std::vector<StateEntry<T>> collect_state(Model& model, const std::string& adapter, BiasMode bias, std::vector<std::string>* paths = nullptr,
                                         const AdapterConfig* cfg = nullptr) {
  std::vector<StateEntry<T>> out;
  auto store = std::make_shared<std::deque<std::vector<T>>>();
  const peft::detail::VeraProjectionsBase* proj = nullptr;
  std::string proj_path;
  Index max_in = 0, max_out = 0;
  std::function<void()> emit_projections;
  for_each_layer(model, [&](auto& layer, const std::string& path) {
    using L = std::remove_cvref_t<decltype(layer)>;
    if constexpr (adapted_traits<L>::value) {
      static_assert(std::is_same_v<typename L::scalar, T>, "save_pretrained: every adapted layer of the model must have the same scalar type");
      using B = typename L::backend_type;  // a device model's tensors are downloaded into `store`
      const bool has = layer.has_adapter(adapter);
      if (has) {
        if (paths) paths->push_back(path);
        std::vector<AdapterTensor<T>> ts;
        with_adapter_kind(layer, adapter, [&](auto k) {
          using K = typename decltype(k)::type;
          auto& a = layer.template adapter<K>(adapter);
          bool done = false;
          if constexpr (std::is_same_v<K, AdaLora>) {
            if (const AdaLoraConfig* ac = cfg ? cfg->template get_if<AdaLoraConfig>() : nullptr) {
              const AdaLoraConfig want = ac->for_module(path);
              if (KindCheckpoint<AdaLora>::truncates(a, want)) {
                ts = KindCheckpoint<AdaLora>::template truncated<T>(a, want.rank_pattern.front().second, *store);
                done = true;
              }
            }
          }
          if constexpr (std::is_same_v<K, Vera>) {
            if (!proj) {
              proj = a.projections.get();
              proj_path = path;
              emit_projections = [&out, store, sp = a.projections, &max_in, &max_out] {
                const Index r = sp->r();
                auto& va = store->emplace_back(std::size_t(r * max_in));
                auto& vb = store->emplace_back(std::size_t(max_out * r));
                B::template download<T>(sp->A_sliced(max_in), MatrixView<T>(va.data(), r, max_in));  // (a copy on the CPU)
                B::template download<T>(sp->B_sliced(max_out), MatrixView<T>(vb.data(), max_out, r));
                out.push_back({vera_A_key, MatrixView<T>(va.data(), r, max_in), dims({r, max_in}), store});
                out.push_back({vera_B_key, MatrixView<T>(vb.data(), max_out, r), dims({max_out, r}), store});
              };
            } else if (a.projections.get() != proj) {
              throw ConfigError(cat("save_pretrained: the VeRA adapter '", adapter, "' of layers '", proj_path, "' and '", path,
                                    "' uses two different VeraProjections; a PEFT checkpoint holds one vera_A / vera_B pair for the whole model"));
            }
            max_in = std::max(max_in, a.in);
            max_out = std::max(max_out, a.out);
          }
          if (!done) {
            ts = KindCheckpoint<K>::tensors(layer.base(), a);
            if constexpr (!B::host_accessible)
              for (auto& t : ts) t.view = host_copy<B>(ConstMatrixView<T>(t.view), *store);
          }
        });
        for (auto& t : ts)
          out.push_back({std::string(state_dict_prefix) + (path.empty() ? "" : path + ".") + t.suffix, t.view, std::move(t.shape), store});
      }
      auto b = layer.base().bias();
      if (!b.empty() && (bias == BiasMode::all || (bias == BiasMode::lora_only && has))) {
        if constexpr (!B::host_accessible) b = host_copy<B>(ConstMatrixView<T>(b), *store);
        out.push_back({std::string(state_dict_prefix) + path + (has ? ".base_layer.bias" : ".bias"), b, {std::uint64_t(b.size())}, store});
      }
    }
  });
  if (emit_projections) emit_projections();
  return out;
}

/// PEFT's modules_to_save matching (`_set_trainable`): a module is saved when its path ends with an entry.
inline bool listed_to_save(const std::optional<std::vector<std::string>>& list, const std::string& path) {
  if (!list) return false;
  for (const auto& m : *list)
    if (path.size() >= m.size() && path.compare(path.size() - m.size(), m.size(), m) == 0) return true;
  return false;
}
}  // namespace detail

/// The state dict of adapter `adapter_name` as PEFT saves it: (checkpoint key, view into the model, PEFT's
/// shape), in model order. With `bias` all / lora_only the base biases are included as PEFT names them
/// (`<path>.base_layer.bias` for layers that hold the adapter, `<path>.bias` for other adapted layers under
/// "all"; plain layers are not visited). A VeRA adapter adds the shared projections (`base_model.vera_A`,
/// `base_model.vera_B`, copies; the entries keep them alive). T is the scalar type of the model's adapted
/// layers.
template <class T, class Model>
std::vector<detail::StateEntry<T>> adapter_state_dict(Model& model, const std::string& adapter_name, BiasMode bias = BiasMode::none) {
  return detail::collect_state<T>(model, adapter_name, bias);
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` for adapter `adapter_name` of
/// `model`, as PEFT's save_pretrained does (the directory is created if needed). `config` is written as
/// given, except that a null target_modules becomes the list of module paths that hold the adapter, so
/// PEFT rebuilds exactly those layers, and that every module of `modules` (PEFT's modules_to_save, e.g. a
/// trained head) is added to modules_to_save unless an entry already selects it.
///
/// Per method: AdaLoRA adapters are saved as PEFT saves them, truncated to the triplets the config's
/// rank_pattern keeps (adapters already truncated are saved as they are); VeRA saves the shared
/// projections (base_model.vera_A [r, max_in], base_model.vera_B [max_out, r] over the adapted layers) and
/// requires save_projection = true: peft++'s projections are not PyTorch's, so PEFT could not rebuild them.
///
/// Checks first (and writes nothing on failure): the adapter exists on some layer (AdapterError); it is of
/// the config's method and every layer that holds it is selected by target_modules and has the rank,
/// scaling and structure that `config` gives for its path (ConfigError naming the layer and the field) —
/// otherwise PEFT would build different layers when loading.
template <class Model, class U>
void save_pretrained(Model& model, const std::filesystem::path& dir, const std::string& adapter_name, AdapterConfig config,
                     const std::vector<ModuleToSave<U>>& modules, const SaveOptions& options = {}) {
  std::vector<std::string> paths, holders;
  bool any = false;
  for_each_layer(model, [&](auto& layer, const std::string& path) {
    using L = std::remove_cvref_t<decltype(layer)>;
    if constexpr (detail::adapted_traits<L>::value) {
      if (!layer.has_adapter(adapter_name)) return;
      any = true;
      holders.push_back(path);
      if (!config.target_modules.is_null() && !config.targets(path))
        throw ConfigError(peft::detail::cat("save_pretrained: layer '", path, "' holds adapter '", adapter_name,
                                            "' but the config's target_modules do not select it; PEFT would not rebuild it"));
      detail::with_adapter_kind(layer, adapter_name, [&](auto k) {
        using K = typename decltype(k)::type;
        using C = detail::kind_config_t<K>;
        const C* want = config.template get_if<C>();
        if (!want)
          throw ConfigError(peft::detail::cat("save_pretrained: adapter '", adapter_name, "' on layer '", path, "' is of kind ", K::name,
                                              " but the config's peft_type is ", config.peft_type()));
        const std::string why = KindCheckpoint<K>::mismatch(layer.template adapter<K>(adapter_name), want->for_module(path));
        if (!why.empty())
          throw ConfigError(peft::detail::cat("save_pretrained: layer '", path, "', adapter '", adapter_name, "': ", why,
                                              " for this path; PEFT would build a different layer"));
      });
    }
  });
  if (!any) throw AdapterError(peft::detail::cat("save_pretrained: no layer of the model has an adapter named '", adapter_name, "'"));
  if (const auto* v = config.template get_if<VeraConfig>(); v && !v->save_projection)
    throw ConfigError("save_pretrained: VeRA with save_projection = false would write no vera_A / vera_B; PEFT would then draw them from "
                      "projection_prng_key with PyTorch's generator, which are not peft++'s projections. Save with save_projection = true");
  for (const auto& m : modules) {
    if (m.path.empty()) throw ConfigError("save_pretrained: a module to save has an empty path (give the module path the PyTorch model uses)");
    if (m.tensors.empty()) throw ConfigError(peft::detail::cat("save_pretrained: module to save '", m.path, "' has no tensors"));
    if (std::find(holders.begin(), holders.end(), m.path) != holders.end())
      throw ConfigError(peft::detail::cat("save_pretrained: module to save '", m.path, "' is a layer that holds the adapter '", adapter_name,
                                          "'; PEFT never adapts a module of modules_to_save (it saves it whole instead)"));
    if (!detail::listed_to_save(config.modules_to_save, m.path)) {
      if (!config.modules_to_save) config.modules_to_save.emplace();
      config.modules_to_save->push_back(m.path);
    }
  }
  if (!modules.empty()) {  // PEFT never adapts a module that a modules_to_save entry matches
    AdapterConfig probe = config;
    if (probe.target_modules.is_null()) probe.target_modules = ModuleSelector::list(holders);
    for (const auto& h : holders)
      if (!probe.targets(h))
        throw ConfigError(peft::detail::cat("save_pretrained: layer '", h, "' holds adapter '", adapter_name, "' but modules_to_save (",
                                            to_json(config)["modules_to_save"].dump(), ") matches it, so PEFT would save it whole instead of adapting it"));
  }

  bool saved = false;
  auto save_as = [&]<class S>(std::type_identity<S>) {
    auto entries = detail::collect_state<S>(model, adapter_name, config.bias, &paths, &config);
    std::vector<safetensors::TensorRef> refs;
    refs.reserve(entries.size());
    std::vector<std::string> keys;
    for (const auto& e : entries) {
      refs.emplace_back(e.key, ConstMatrixView<S>(e.view), e.shape);
      keys.push_back(e.key);
    }
    for (const auto& m : modules)
      for (const auto& t : m.tensors) {
        std::string key = std::string(state_dict_prefix) + m.path + "." + t.suffix;
        if (std::find(keys.begin(), keys.end(), key) != keys.end())
          throw ConfigError(peft::detail::cat("save_pretrained: module to save '", m.path, "' writes '", key,
                                              "', which the adapter's state dict already holds (a module to save is not an adapted layer)"));
        refs.emplace_back(key, ConstMatrixView<U>(t.view), t.shape);
        keys.push_back(std::move(key));
      }
    if (config.target_modules.is_null()) config.target_modules = ModuleSelector::list(paths);
    std::filesystem::create_directories(dir);
    safetensors::WriteOptions wo;
    wo.sync = options.sync;
    safetensors::write(dir / adapter_weights_name, refs, {}, wo);
    write_adapter_config(dir / adapter_config_name, config, options.sync);
    saved = true;
  };
  // the model's scalar type is that of its adapted layers
  for_each_layer(model, [&](auto& layer, const std::string&) {
    using L = std::remove_cvref_t<decltype(layer)>;
    if constexpr (detail::adapted_traits<L>::value) {
      if (!saved && layer.has_adapter(adapter_name)) save_as(std::type_identity<typename L::scalar>{});
    }
  });
}

/// save_pretrained without modules to save.
template <class Model>
void save_pretrained(Model& model, const std::filesystem::path& dir, const std::string& adapter_name, AdapterConfig config,
                     const SaveOptions& options = {}) {
  save_pretrained(model, dir, adapter_name, std::move(config), std::vector<ModuleToSave<float>>{}, options);
}

// ---------------------------------------------------------------------------------------------
// Loading

struct LoadOptions {
  /// Missing or unexpected keys are an error (the message lists them), as PEFT's load with strict
  /// checking. false: they are returned in LoadResult (missing tensors keep their initial values).
  bool strict = true;
  /// Make the loaded adapter the active one on every layer that has it (peft::set_adapter on the model).
  bool activate = false;
  /// PEFT's `is_trainable` of from_pretrained/load_adapter. false (PEFT's default, for inference): the loaded
  /// adapter is frozen on every layer that received it and the whole model is put in eval mode (peft::eval:
  /// no dropout). true (to resume training): the adapter is trainable and no layer's mode is changed.
  bool is_trainable = false;
  /// Seed for the initial values the layers give the new adapter before the checkpoint overwrites them.
  std::uint64_t seed = 0;
  /// VeRA only: the shared projections to use when the checkpoint has none (save_projection = false), e.g.
  /// the VeraProjections the adapter was trained with in peft++. A checkpoint's own projections win.
  std::shared_ptr<const peft::detail::VeraProjectionsBase> vera_projections;
};

struct LoadResult {
  AdapterConfig config;  ///< as read; for VeRA, VeraConfig::projections is the pair the loaded layers share
  std::vector<std::string> adapted_modules;  ///< module paths that received the adapter, in model order
  std::vector<std::string> missing_keys;     ///< expected by the model, absent from the file (non-strict)
  std::vector<std::string> unexpected_keys;  ///< in the file, not used by the model (non-strict)
};

namespace detail {
inline std::string key_list(const std::vector<std::string>& keys) {
  std::string s;
  const std::size_t n = std::min<std::size_t>(keys.size(), 20);
  for (std::size_t i = 0; i < n; ++i) s += (i ? ", '" : "'") + keys[i] + "'";
  if (keys.size() > n) s += cat(" and ", keys.size() - n, " more");
  return s;
}

/// Checks that tensor `key` of `f` has PEFT's shape and a float dtype and fits `dst`.
template <class T>
void check_tensor(const safetensors::File& f, const std::string& key, MatrixView<T> dst, const std::vector<std::uint64_t>& want) {
  const auto& info = f.info(key);
  if (info.shape != want)
    throw ShapeError(cat(f.path(), ": tensor '", key, "' has shape ", shape_str(info.shape), ", the model expects ", shape_str(want)));
  if (!safetensors::is_convertible(info.dtype))
    throw FormatError(cat(f.path(), ": tensor '", key, "' has dtype ", safetensors::name(info.dtype), "; adapter tensors must be F32, F16, BF16 or F64"));
  if (!dst.contiguous() || std::uint64_t(dst.size()) != info.numel())
    throw ShapeError(cat("load_pretrained: the storage of '", key, "' is not a contiguous block of ", info.numel(), " elements"));
}
}  // namespace detail

/// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors` (written by PEFT's save_pretrained
/// or by save_pretrained above) and adds the adapter as `adapter_name` to every adapted layer of `model`
/// whose module path the config's target_modules select (PEFT's matching: exact name, ".name" suffix, or a
/// full regex match; exclude_modules, modules_to_save and layers_to_transform honoured). With a null
/// target_modules, the layers named in the file are used.
///
/// Each layer gets the config resolved for its path (rank_pattern, alpha_pattern, feedforward_modules;
/// AdaLoRA's rank_pattern gives the kept rank, with ranknum = init_r as PEFT's loader resizes the layer),
/// then its tensors are copied in after an exact shape check (ShapeError naming the key and both shapes).
/// VeRA: the shared projections come from the checkpoint (base_model.vera_A / vera_B; a file without them
/// is a FormatError unless LoadOptions::vera_projections supplies them). `modules` (PEFT's modules_to_save:
/// whole modules such as a trained head) receive `base_model.model.<path>.<tensor>`.
/// Strict (default): every tensor the new adapters and `modules` need must be in the file and every tensor
/// of the file must be used, otherwise a FormatError lists the keys by name. Nothing is added to the model
/// (and no module tensor written) when loading fails (adapters added so far are removed again).
template <class Model, class U>
LoadResult load_pretrained(Model& model, const std::filesystem::path& dir, const std::string& adapter_name,
                           const std::vector<ModuleToSave<U>>& modules, const LoadOptions& options = {}) {
  LoadResult res;
  if (!std::filesystem::exists(dir))
    throw std::system_error(std::make_error_code(std::errc::no_such_file_or_directory),
                            peft::detail::cat("load_pretrained: no adapter at '", dir.string(), "' (expected a directory with ",
                                              adapter_config_name, " and ", adapter_weights_name, ", or the path of the weights file)"));
  const std::filesystem::path weights = std::filesystem::is_directory(dir) ? dir / adapter_weights_name : dir;
  const std::filesystem::path cfg_path = std::filesystem::is_directory(dir) ? dir / adapter_config_name : dir.parent_path() / adapter_config_name;
  res.config = read_adapter_config(cfg_path);
  const AdapterConfig& config = res.config;
  safetensors::File file(weights);

  // the module paths present in the file (for a null target_modules)
  std::vector<std::string> file_paths;
  if (config.target_modules.is_null()) {
    for (const auto& k : file.names()) {
      if (k.rfind(state_dict_prefix, 0) != 0) continue;
      const std::string rest = k.substr(std::string(state_dict_prefix).size());
      for (const char* pre : {".lora_", ".hada_", ".lokr_", ".ia3_", ".vera_lambda_"}) {
        const auto pos = rest.rfind(pre);
        if (pos != std::string::npos) {
          file_paths.push_back(rest.substr(0, pos));
          break;
        }
      }
    }
  }
  auto selected = [&](const std::string& path) {
    if (!config.target_modules.is_null()) return config.targets(path);
    return std::find(file_paths.begin(), file_paths.end(), path) != file_paths.end();
  };

  struct Pending {  // a tensor to copy once everything has been checked
    std::string key;
    std::function<void()> copy;
  };
  std::vector<std::string> expected;  // keys the model needs
  std::vector<Pending> pending;
  std::vector<std::function<void()>> undo;
  Generator gen(options.seed);

  // VeRA: the shared projections, made once (for the scalar type of the first VeRA layer)
  const VeraConfig* vera = config.template get_if<VeraConfig>();
  const bool file_has_projections = file.contains(vera_A_key) || file.contains(vera_B_key);
  std::shared_ptr<const peft::detail::VeraProjectionsBase> projections;
  Index proj_in = 0, proj_out = 0;
  if (vera) {
    if (file_has_projections) {
      for (const char* k : {vera_A_key, vera_B_key}) {
        if (!file.contains(k))
          throw FormatError(peft::detail::cat(weights.string(), ": holds ", k == vera_A_key ? vera_B_key : vera_A_key, " but not '", k,
                                              "'; VeRA needs both shared projections"));
        const auto& info = file.info(k);
        if (!safetensors::is_convertible(info.dtype))
          throw FormatError(peft::detail::cat(weights.string(), ": tensor '", k, "' has dtype ", safetensors::name(info.dtype),
                                              "; adapter tensors must be F32, F16, BF16 or F64"));
        const bool is_a = k == vera_A_key;
        if (info.shape.size() != 2 || info.shape[is_a ? 0 : 1] != std::uint64_t(vera->r) || info.shape[is_a ? 1 : 0] == 0)
          throw ShapeError(peft::detail::cat(weights.string(), ": tensor '", k, "' has shape ", detail::shape_str(info.shape), "; the config's r = ",
                                             vera->r, " needs ", is_a ? "[r, max_in] = [" : "[max_out, r] = [", is_a ? std::to_string(vera->r) + ", n]" : "n, " + std::to_string(vera->r) + "]"));
        expected.push_back(k);
      }
      proj_in = Index(file.info(vera_A_key).shape[1]);
      proj_out = Index(file.info(vera_B_key).shape[0]);
      if (!vera->save_projection)
        warn(peft::detail::cat(cfg_path.string(), ": save_projection is false but ", weights.string(),
                               " holds base_model.vera_A / vera_B; peft++ uses them (PEFT would draw new ones from projection_prng_key)"));
    } else if (options.vera_projections) {
      projections = options.vera_projections;
      proj_in = projections->max_in();
      proj_out = projections->max_out();
    } else {
      throw FormatError(peft::detail::cat(
          weights.string(), ": a VeRA checkpoint without the shared projections 'base_model.vera_A' and 'base_model.vera_B' (",
          vera->save_projection ? "missing although the config says save_projection = true"
                                : "written with save_projection = false",
          "). PEFT would regenerate them from projection_prng_key = ", vera->projection_prng_key,
          " with PyTorch's random number generator, which peft++ cannot reproduce, so the projections are required: save the adapter in "
          "PEFT with save_projection=True, or pass the projections in LoadOptions::vera_projections"));
    }
  }

  try {
    for_each_layer(model, [&](auto& layer, const std::string& path) {
      using L = std::remove_cvref_t<decltype(layer)>;
      if constexpr (detail::adapted_traits<L>::value) {
        using T = typename L::scalar;
        using B = typename L::backend_type;
        auto need = [&](const std::string& key, MatrixView<T> view, std::vector<std::uint64_t> shape) {
          expected.push_back(key);
          if (!file.contains(key)) {
            res.missing_keys.push_back(key);
            return;
          }
          detail::check_tensor(file, key, view, shape);  // shape and dtype, before anything is written
          if constexpr (B::host_accessible) {
            pending.push_back({key, [&file, key, view] { file.read_as<T>(key, std::span<T>(view.data, std::size_t(view.size()))); }});
          } else {  // device memory: read (and convert) on the host now, inside the undo scope; upload at the end
            auto h = std::make_shared<std::vector<T>>(std::size_t(view.size()));
            file.read_as<T>(key, std::span<T>(*h));
            pending.push_back({key, [h, view] { B::template upload<T>(ConstMatrixView<T>(h->data(), view.rows, view.cols), view); }});
          }
        };
        const bool target = selected(path);
        if (target) {
          bool added = false;
          std::visit([&](const auto& m) {
            using C = std::remove_cvref_t<decltype(m)>;
            if constexpr (detail::has_config<L, C>) {
              C c = m;
              if constexpr (std::is_same_v<C, LoraConfig>) c.init_lora_weights = LoraInit::zeros;
              if constexpr (std::is_same_v<C, VeraConfig>) {
                using P = VeraProjections<T, typename L::base_type::backend_type>;  // VeraBank<base>::projections_type
                if (layer.in_features() > proj_in || layer.out_features() > proj_out)
                  throw ShapeError(peft::detail::cat(weights.string(), ": the VeRA projections are [r, ", proj_in, "] and [", proj_out,
                                                     ", r] but layer '", path, "' has ", layer.in_features(), " inputs and ", layer.out_features(),
                                                     " outputs; PEFT sizes them with the largest in/out features of the adapted layers"));
                if (!projections) {  // from the file, in the layer's scalar type
                  std::vector<T> a(std::size_t(vera->r * proj_in)), b(std::size_t(proj_out * vera->r));
                  file.read_as<T>(vera_A_key, std::span<T>(a));
                  file.read_as<T>(vera_B_key, std::span<T>(b));
                  projections = P::template from_tensors<T>(MatrixView<const T>(a.data(), vera->r, proj_in),
                                                            MatrixView<const T>(b.data(), proj_out, vera->r));
                }
                c.projections = projections;
              }
              layer.add_adapter(adapter_name, c, gen);
              added = true;
            }
          }, config.method);
          if (!added)
            throw ConfigError(peft::detail::cat("load_pretrained: ", config.peft_type(), " adapter '", adapter_name, "' targets layer '", path,
                                                "', whose type has no adapter kind for it"));
          undo.push_back([&layer, adapter_name] { layer.delete_adapter(adapter_name); });
          res.adapted_modules.push_back(path);
          const std::string pre = std::string(state_dict_prefix) + (path.empty() ? "" : path + ".");
          for (auto& t : detail::layer_tensors(layer, adapter_name)) need(pre + t.suffix, t.view, std::move(t.shape));
          if constexpr (detail::has_config<L, AdaLoraConfig>) {
            // checkpoints of PEFT < 0.14 also hold ranknum ([1], the initial rank): used when present
            const std::string key = pre + "ranknum";
            if (config.template get_if<AdaLoraConfig>() && file.contains(key)) {
              auto& a = layer.template adapter<AdaLora>(adapter_name);
              const auto& info = file.info(key);
              if (info.numel() != 1 || !safetensors::is_convertible(info.dtype))
                throw ShapeError(peft::detail::cat(weights.string(), ": tensor '", key, "' has shape ", detail::shape_str(info.shape), " and dtype ",
                                                   safetensors::name(info.dtype), "; ranknum is one float"));
              double v = 0;
              file.read_as<double>(key, std::span<double>(&v, 1));
              if (!std::isfinite(v) || v + 1e-5 == 0.0)
                throw FormatError(peft::detail::cat(weights.string(), ": tensor '", key, "' = ", v, " is not a usable rank"));
              expected.push_back(key);
              pending.push_back({key, [&a, v] {
                                   a.ranknum = v;
                                   a.factor = T(T(a.scaling) / (T(a.ranknum) + T(1e-5)));
                                 }});
            }
          }
        }
        auto b = layer.base().bias();
        if (!b.empty() && (config.bias == BiasMode::all || (config.bias == BiasMode::lora_only && target)))
          need(std::string(state_dict_prefix) + path + (target ? ".base_layer.bias" : ".bias"), b, {std::uint64_t(b.size())});
      }
    });
    if (res.adapted_modules.empty())
      throw ConfigError(peft::detail::cat("load_pretrained: ", cfg_path.string(), ": no layer of the model matches target_modules (",
                                          to_json(config)["target_modules"].dump(), "); adapted layers are matched by their module paths"));
    // whole modules (modules_to_save)
    for (const auto& m : modules) {
      if (m.path.empty()) throw ConfigError("load_pretrained: a module to save has an empty path (give the module path the PyTorch model uses)");
      for (const auto& t : m.tensors) {
        const std::string key = std::string(state_dict_prefix) + m.path + "." + t.suffix;
        if (std::find(expected.begin(), expected.end(), key) != expected.end())
          throw ConfigError(peft::detail::cat("load_pretrained: module to save '", m.path, "' reads '", key, "', which an adapted layer reads too"));
        expected.push_back(key);
        if (!file.contains(key)) {
          res.missing_keys.push_back(key);
          continue;
        }
        detail::check_tensor(file, key, t.view, t.shape);
        pending.push_back({key, [&file, key, view = t.view] { file.read_as<U>(key, std::span<U>(view.data, std::size_t(view.size()))); }});
      }
    }
    std::vector<std::string> sorted = expected;
    std::sort(sorted.begin(), sorted.end());
    for (const auto& k : file.names())
      if (!std::binary_search(sorted.begin(), sorted.end(), k)) res.unexpected_keys.push_back(k);
    if (options.strict && (!res.missing_keys.empty() || !res.unexpected_keys.empty())) {
      std::string msg = peft::detail::cat("load_pretrained: ", weights.string(), " does not fit the model:");
      if (!res.missing_keys.empty()) msg += peft::detail::cat(" missing keys ", detail::key_list(res.missing_keys), ";");
      if (!res.unexpected_keys.empty()) msg += peft::detail::cat(" unexpected keys ", detail::key_list(res.unexpected_keys), ";");
      if (config.modules_to_save && !config.modules_to_save->empty() && !res.unexpected_keys.empty())
        msg += peft::detail::cat(" (the config's modules_to_save lists ", to_json(config)["modules_to_save"].dump(),
                                 ": pass those modules to load_pretrained, see module_to_save)");
      msg += " (LoadOptions::strict = false loads what fits)";
      throw FormatError(msg);
    }
  } catch (...) {
    for (auto it = undo.rbegin(); it != undo.rend(); ++it) (*it)();
    throw;
  }
  try {  // (host copies from the mapped file cannot fail after the checks; a device upload can)
    for (auto& p : pending) p.copy();
  } catch (...) {
    for (auto it = undo.rbegin(); it != undo.rend(); ++it) (*it)();  // the new adapters go again (base biases may be written)
    throw;
  }
  if (auto* v = res.config.template get_if<VeraConfig>()) v->projections = projections;  // the ones the layers share
  if (options.activate) set_adapter(model, adapter_name);
  if (!options.is_trainable) {  // as PEFT's from_pretrained(is_trainable=False)
    for_each_adapted_layer(model, [&](auto& layer) {
      if (layer.has_adapter(adapter_name)) layer.set_requires_grad(adapter_name, false);
    });
    peft::eval(model);
  }
  return res;
}

/// load_pretrained without modules to save.
template <class Model>
LoadResult load_pretrained(Model& model, const std::filesystem::path& dir, const std::string& adapter_name = "default",
                           const LoadOptions& options = {}) {
  return load_pretrained(model, dir, adapter_name, std::vector<ModuleToSave<float>>{}, options);
}

}  // namespace peft::io
