// peft++ — model-level helpers for a user's model written as a plain aggregate struct of layers,
// walked with Boost.PFR (no registration, no macros):
//
//   struct Mlp { peft::Adapted<peft::Linear<float>, peft::Lora> fc1; Relu act; peft::Linear<float> fc2; };
//   peft::print_trainable_parameters(model);   // PEFT's line
//   auto params = peft::parameters(model);     // for an optimizer
//
// A field is a *layer* when it has `visit_parameters`; aggregates (nested structs), std::array and
// std::vector of layers are walked recursively; every other field (activations, ints, ...) is skipped.
// A class that is not an aggregate (constructors, private members) lists its layers itself with a member
//   auto peft_fields() { return std::tie(fc1, act, fc2); }
// (and may name them with field_names as below); a model that is neither is a compile-time error.
// Boost 1.81's PFR has no field names, so parameter names are prefixed with the field index path
// ("0.lora_A.default.weight", "2.1.weight"), or with the layer's module_path() when it has one. An
// aggregate may name its fields with `static constexpr std::array<std::string_view, N> field_names`
// (the transformer blocks in peft/nn/ do: "h.0.attn.q_proj.weight").
#pragma once

#include <array>
#include <boost/pfr.hpp>
#include <cstdint>
#include <iostream>
#include <locale>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "peft/param.hpp"

namespace peft {

namespace detail {

struct AnyParamVisitor {
  template <class P>
  void operator()(P&&) const {}
};

template <class L>
concept LayerLike = requires(L& l) { l.visit_parameters(AnyParamVisitor{}); };

template <class L>
concept AdaptedLike = LayerLike<L> && requires(L& l, const std::string& s) {
  l.set_adapter(s);
  l.merge();
  l.unmerge();
  l.module_path();
};

template <class L>
concept TrainToggle = requires(L& l) { l.train(true); };

template <class T>
struct is_std_array : std::false_type {};
template <class T, std::size_t N>
struct is_std_array<std::array<T, N>> : std::true_type {};
template <class T>
struct is_std_vector : std::false_type {};
template <class T, class A>
struct is_std_vector<std::vector<T, A>> : std::true_type {};

/// A class that lists its layers: `peft_fields()` returns a tuple of references (std::tie).
template <class U>
concept ListsFields = requires(U& u) { std::tuple_size<std::remove_cvref_t<decltype(u.peft_fields())>>::value; };

/// The number of fields the walker sees in U: peft_fields()'s, else the aggregate's.
template <class U>
constexpr std::size_t field_count() {
  if constexpr (ListsFields<U>) return std::tuple_size_v<std::remove_cvref_t<decltype(std::declval<U&>().peft_fields())>>;
  else return boost::pfr::tuple_size_v<U>;
}

/// The name of field i of U in parameter paths: U::field_names[i] when U declares a
/// `static constexpr std::array<std::string_view, N> field_names` (PFR 1.81 has no field names), else "i".
template <class U>
std::string field_name(std::size_t i) {
  if constexpr (requires { U::field_names[0]; }) {
    static_assert(std::size(U::field_names) == field_count<U>(), "field_names must name every field of the aggregate (or of peft_fields()), in order");
    return std::string(U::field_names[i]);
  } else {
    return std::to_string(i);
  }
}

/// What for_each_layer can walk: a layer, a std::array/std::vector, a class with peft_fields(), an aggregate.
template <class U>
concept Walkable = LayerLike<U> || is_std_array<U>::value || is_std_vector<U>::value || ListsFields<U> ||
                   (std::is_class_v<U> && std::is_aggregate_v<U>);

template <class F>
struct LayerWalker {
  F& f;
  template <class X>
  void walk(X& x, const std::string& path) {
    using U = std::remove_cv_t<X>;
    if constexpr (LayerLike<U>) {
      f(x, path);
    } else if constexpr (is_std_array<U>::value || is_std_vector<U>::value) {
      for (std::size_t i = 0; i < x.size(); ++i) walk(x[i], path.empty() ? std::to_string(i) : path + "." + std::to_string(i));
    } else if constexpr (ListsFields<U>) {
      auto fields = x.peft_fields();
      std::size_t i = 0;
      std::apply([&](auto&... field) { (walk_field<U>(field, path, i++), ...); }, fields);
    } else if constexpr (std::is_class_v<U> && std::is_aggregate_v<U>) {
      boost::pfr::for_each_field(x, [&](auto& field, std::size_t i) { walk_field<U>(field, path, i); });
    }
  }
  template <class U, class Field>
  void walk_field(Field& field, const std::string& path, std::size_t i) {
    const std::string name = field_name<U>(i);
    walk(field, path.empty() ? name : path + "." + name);
  }
};

inline std::string with_thousands(std::uint64_t v) {
  std::string s = std::to_string(v), out;
  int n = 0;
  for (auto it = s.rbegin(); it != s.rend(); ++it, ++n) {
    if (n && n % 3 == 0) out.insert(out.begin(), ',');
    out.insert(out.begin(), *it);
  }
  return out;
}

}  // namespace detail

/// Calls `f(layer, path)` for every layer in `model` (a layer, an aggregate of layers, or a container of
/// them), in declaration order. `path` is the layer's module_path() when it has a non-empty one, else the
/// field index path.
template <class Model, class F>
void for_each_layer(Model& model, F&& f) {
  static_assert(detail::Walkable<std::remove_cv_t<Model>>,
                "peft: the model must be a layer, an aggregate struct of layers (no constructors, no private "
                "members), a std::array/std::vector of them, or a class that lists its layers with a member "
                "`auto peft_fields() { return std::tie(layer1, layer2, ...); }`");
  auto g = [&](auto& layer, const std::string& index_path) {
    if constexpr (detail::AdaptedLike<std::remove_cvref_t<decltype(layer)>>) {
      if (!layer.module_path().empty()) return f(layer, layer.module_path());
    }
    f(layer, index_path);
  };
  detail::LayerWalker<decltype(g)> w{g};
  w.walk(model, "");
}

/// Calls `f(layer)` for every Adapted layer (layers with adapters) in `model`.
template <class Model, class F>
void for_each_adapted_layer(Model& model, F&& f) {
  for_each_layer(model, [&](auto& layer, const std::string&) {
    if constexpr (detail::AdaptedLike<std::remove_cvref_t<decltype(layer)>>) f(layer);
  });
}

/// Every parameter of the model, named "<layer path>.<param name>", frozen ones included (trainable ==
/// false). Optimizers update only trainable ones.
template <class T, class Model>
std::vector<ParamRef<T>> parameters(Model& model) {
  std::vector<ParamRef<T>> out;
  for_each_layer(model, [&](auto& layer, const std::string& path) {
    layer.visit_parameters([&](ParamRef<T> p) {
      p.name = path.empty() ? p.name : path + "." + p.name;
      out.push_back(std::move(p));
    });
  });
  return out;
}
/// Only the trainable parameters.
template <class T, class Model>
std::vector<ParamRef<T>> trainable_parameters(Model& model) {
  auto all = parameters<T>(model);
  std::erase_if(all, [](const ParamRef<T>& p) { return !p.trainable; });
  return all;
}

struct ParameterCount {
  std::uint64_t trainable = 0;
  std::uint64_t total = 0;
};

/// PEFT's get_nb_trainable_parameters: every parameter counts in `total` (base and adapters, active or
/// not); those that receive gradients count in `trainable`.
template <class Model>
ParameterCount count_parameters(Model& model) {
  ParameterCount c;
  for_each_layer(model, [&](auto& layer, const std::string&) {
    layer.visit_parameters([&](const auto& p) {
      c.total += p.size;
      if (p.trainable) c.trainable += p.size;
    });
  });
  return c;
}

/// PEFT's print_trainable_parameters line: "trainable params: 1,234 || all params: 5,678 || trainable%: 21.7325".
inline std::string trainable_parameters_line(ParameterCount c) {
  std::ostringstream os;
  os.imbue(std::locale::classic());
  os.setf(std::ios::fixed);
  os.precision(4);
  os << "trainable params: " << detail::with_thousands(c.trainable) << " || all params: " << detail::with_thousands(c.total)
     << " || trainable%: " << (c.total ? 100.0 * double(c.trainable) / double(c.total) : 0.0);
  return os.str();
}
template <class Model>
void print_trainable_parameters(Model& model, std::ostream& os = std::cout) {
  os << trainable_parameters_line(count_parameters(model)) << '\n';
}

/// Sets every parameter gradient of the model to zero.
template <class Model>
void zero_grad(Model& model) {
  for_each_layer(model, [](auto& layer, const std::string&) { layer.zero_grad(); });
}

/// Activates adapter `name` on every adapted layer that has it; throws AdapterError if none has it.
/// As PEFT's PeftModel.set_adapter: merged adapters are unmerged first; layers without that adapter run
/// none (their active set becomes empty), so adapters of different names never mix.
template <class Model>
void set_adapter(Model& model, const std::string& name, bool inference_mode = false) {
  bool found = false;
  for_each_adapted_layer(model, [&](auto& layer) { found = found || layer.has_adapter(name); });
  if (!found) throw AdapterError(detail::cat("set_adapter: no layer of the model has an adapter named '", name, "'"));
  for_each_adapted_layer(model, [&](auto& layer) {
    layer.unmerge();
    if (layer.has_adapter(name)) layer.set_adapter(name, inference_mode);
    else layer.set_adapter(std::vector<std::string>{}, inference_mode);
  });
}

/// Freezes (false) or unfreezes (true) the base weights of every layer: plain layers and the base layer
/// inside every adapted layer. Adapter parameters are not touched.
template <class Model>
void set_base_requires_grad(Model& model, bool on) {
  for_each_layer(model, [&](auto& layer, const std::string&) {
    if constexpr (detail::AdaptedLike<std::remove_cvref_t<decltype(layer)>>) layer.base().set_requires_grad(on);
    else layer.set_requires_grad(on);
  });
}

/// Train or eval mode on every layer that has one (dropout).
template <class Model>
void train(Model& model, bool on = true) {
  for_each_layer(model, [&](auto& layer, const std::string&) {
    if constexpr (detail::TrainToggle<std::remove_cvref_t<decltype(layer)>>) layer.train(on);
  });
}
template <class Model>
void eval(Model& model) { train(model, false); }

/// Merge / unmerge / disable / enable on every adapted layer.
template <class Model>
void merge_adapters(Model& model) { for_each_adapted_layer(model, [](auto& l) { l.merge(); }); }
template <class Model>
void unmerge_adapters(Model& model) { for_each_adapted_layer(model, [](auto& l) { l.unmerge(); }); }
template <class Model>
void disable_adapters(Model& model) { for_each_adapted_layer(model, [](auto& l) { l.disable_adapters(); }); }
template <class Model>
void enable_adapters(Model& model) { for_each_adapted_layer(model, [](auto& l) { l.enable_adapters(); }); }

}  // namespace peft
