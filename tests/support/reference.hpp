// Loading reference numbers produced by real Hugging Face PEFT (tests/reference/*.py) in C++ tests.
#pragma once

#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace peft::test {

inline nlohmann::json load_reference(const std::string& file) {
  std::ifstream in(std::string(PEFT_TEST_DATA_DIR) + "/" + file);
  if (!in) throw std::runtime_error("cannot open reference file " + file);
  return nlohmann::json::parse(in);
}

/// Tensor `name` as a row-major matrix: [shape[0], product of the rest] (a 1-D tensor is [1, n]), or
/// [rows, size / rows] when `rows` is given.
template <class T>
Mat<T> ref_tensor(const nlohmann::json& j, const std::string& name, Index rows = -1) {
  const auto& t = j.at("tensors").at(name);
  const auto shape = t.at("shape").get<std::vector<Index>>();
  const auto data = t.at("data").get<std::vector<double>>();
  Index total = 1;
  for (Index d : shape) total *= d;
  if (total != Index(data.size())) throw std::runtime_error("reference tensor " + name + ": shape and data disagree");
  if (rows < 0) rows = shape.size() >= 2 ? shape[0] : 1;
  Mat<T> m(rows, total / rows);
  for (std::size_t i = 0; i < data.size(); ++i) m.data()[i] = T(data[i]);
  return m;
}

/// max |a − b| / max(1, max |b|).
template <class A, class B>
double scaled_diff(const A& a, const B& b) {
  return max_abs_diff(a, b) / std::max(1.0, b.template cast<double>().cwiseAbs().maxCoeff());
}

template <class T>
constexpr double reference_tol() { return std::is_same_v<T, float> ? 2e-5 : 1e-12; }

}  // namespace peft::test
