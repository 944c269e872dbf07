// A generic finite-difference check for any peft++ layer (base or adapted): every trainable parameter's
// gradient and the input gradient, in overwrite mode (gradients pre-filled with NaN, so an unassigned entry
// fails) and in accumulate mode (pre-filled with known values, which must be added to).
//
// `layer` (float or double) is checked against central differences taken on `twin`, a double layer of the
// same structure; the twin's parameters are first set to the layer's (rounded) values.
#pragma once

#include <catch2/catch.hpp>
#include <vector>

#include "gradcheck.hpp"
#include "test_util.hpp"

namespace peft::test {

template <class L>
std::vector<ParamRef<typename L::scalar>> params_of(L& l) {
  std::vector<ParamRef<typename L::scalar>> out;
  l.visit_parameters([&](ParamRef<typename L::scalar> p) { out.push_back(std::move(p)); });
  return out;
}

template <class L>
void reseed(L& l) {
  if constexpr (requires { l.set_seed(0); }) l.set_seed(1234);
}

template <class L, class D>
void check_layer_gradients(L& layer, D& twin, Index batch, std::uint64_t seed = 1) {
  using T = typename L::scalar;
  auto p = params_of(layer);
  auto q = params_of(twin);
  REQUIRE(p.size() == q.size());
  for (std::size_t i = 0; i < p.size(); ++i) {
    REQUIRE(p[i].size == q[i].size);
    for (std::size_t k = 0; k < p[i].size; ++k) q[i].value[k] = double(p[i].value[k]);
  }
  const Mat<T> x = random_mat<T>(batch, layer.in_features(), seed);
  const Mat<T> dy = random_mat<T>(batch, layer.out_features(), seed + 1);
  Mat<double> xd = x.template cast<double>();
  const Mat<double> dyd = dy.template cast<double>();
  auto tctx = twin.make_context(batch);
  Mat<double> yd(batch, twin.out_features());
  auto loss = [&]() -> double {
    reseed(twin);
    twin.forward(tctx, xd, yd);
    return dot(yd, dyd);
  };

  auto ctx = layer.make_context(batch);
  Mat<T> y(batch, layer.out_features());
  reseed(layer);
  layer.forward(ctx, x, y);
  loss();
  CHECK(max_abs_diff(y, yd) < 100 * value_tol<T>());

  for (auto& r : p)
    if (r.trainable)
      for (std::size_t k = 0; k < r.size; ++k) r.grad[k] = nan<T>();
  Mat<T> dx = filled<T>(batch, layer.in_features(), nan<T>());
  layer.backward(ctx, dy, dx, GradMode::overwrite, GradMode::overwrite);
  std::vector<std::vector<T>> first;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (!p[i].trainable) continue;
    first.emplace_back(p[i].grad, p[i].grad + p[i].size);
    const auto rep = check_gradient(q[i].value, p[i].grad, p[i].size, loss);
    INFO(rep.str(p[i].name));
    CHECK(rep.worst < grad_tol<T>());
  }
  const auto rx = check_gradient(xd.data(), dx.data(), std::size_t(xd.size()), loss);
  INFO(rx.str("dx"));
  CHECK(rx.worst < grad_tol<T>());

  // accumulate mode adds to what is there, for parameters and (on request) for dx
  for (auto& r : p)
    if (r.trainable)
      for (std::size_t k = 0; k < r.size; ++k) r.grad[k] = T(1.5);
  Mat<T> dx2 = filled<T>(batch, layer.in_features(), T(9));
  layer.backward(ctx, dy, dx2, GradMode::accumulate, GradMode::accumulate);
  std::size_t t = 0;
  for (auto& r : p) {
    if (!r.trainable) continue;
    double worst = 0;
    for (std::size_t k = 0; k < r.size; ++k) worst = std::max(worst, std::abs(double(r.grad[k]) - (1.5 + double(first[t][k]))));
    INFO("accumulate " << r.name);
    CHECK(worst < 1e3 * value_tol<T>());
    ++t;
  }
  CHECK(max_abs_diff(dx2, (dx.array() + T(9)).matrix()) < 1e3 * value_tol<T>());
}

}  // namespace peft::test
