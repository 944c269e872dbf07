// Embedding base layer and LoRA on embeddings: finite differences, PEFT's properties, real PEFT numbers,
// bad input.
#include <catch2/catch.hpp>
#include <fstream>
#include <nlohmann/json.hpp>
#include <peft/adapter/lora_embedding.hpp>

#include "gradcheck.hpp"
#include "test_util.hpp"

using namespace peft;
using namespace peft::test;

namespace {
template <class T>
using LoraEmbedding = Adapted<Embedding<T>, Lora>;

const std::vector<std::int64_t> kIds = {3, 0, 7, 3, 9, 1, 3, 11};

template <class T>
LoraEmbedding<T> make(std::uint64_t seed, LoraInit init = LoraInit::off, int r = 3) {
  Generator g(seed);
  LoraEmbedding<T> l(Embedding<T>(12, 5, g));
  LoraConfig c;
  c.r = r;
  c.lora_alpha = 6;
  c.init_lora_weights = init;
  l.add_adapter("default", c, g);
  return l;
}

template <class T, class U>
void copy_all(Adapted<Embedding<T>, Lora>& from, Adapted<Embedding<U>, Lora>& to) {
  std::vector<ParamRef<T>> p;
  std::vector<ParamRef<U>> q;
  from.visit_parameters([&](ParamRef<T> r) { p.push_back(r); });
  to.visit_parameters([&](ParamRef<U> r) { q.push_back(r); });
  for (std::size_t i = 0; i < p.size(); ++i)
    for (std::size_t k = 0; k < p[i].size; ++k) q[i].value[k] = U(p[i].value[k]);
}
}  // namespace

TEMPLATE_TEST_CASE("embedding: lookup, and the table gradient skips padding_idx", "[embedding][grad]", float, double) {
  using T = TestType;
  Generator g(1);
  Embedding<T> e(12, 5, g, /*padding_idx=*/3);
  CHECK(as_mat(e.weight()).row(3).isZero());
  e.set_requires_grad(true);
  auto ctx = e.make_context(8);
  Mat<T> y(8, 5);
  e.forward(ctx, kIds, y);
  for (int i = 0; i < 8; ++i) CHECK(y.row(i) == as_mat(e.weight()).row(kIds[std::size_t(i)]));
  const Mat<T> dy = random_mat<T>(8, 5, 2);
  as_mat(e.weight_grad()).setConstant(nan<T>());
  e.backward(ctx, dy, {}, GradMode::overwrite);
  Mat<double> expect = Mat<double>::Zero(12, 5);
  for (int i = 0; i < 8; ++i)
    if (kIds[std::size_t(i)] != 3) expect.row(kIds[std::size_t(i)]) += dy.row(i).template cast<double>();
  CHECK(max_abs_diff(as_mat(e.weight_grad()), expect) < 10 * value_tol<T>());
}

TEMPLATE_TEST_CASE("lora on embedding: backward matches finite differences", "[embedding][lora][grad]", float, double) {
  using T = TestType;
  auto l = make<T>(4);
  auto twin = make<double>(4);
  copy_all(l, twin);
  const Mat<T> dy = random_mat<T>(8, 5, 3);
  const Mat<double> dyd = dy.template cast<double>();
  auto tctx = twin.make_context(8);
  Mat<double> yd(8, 5);
  auto loss = [&] { twin.forward(tctx, kIds, yd); return dot(yd, dyd); };
  auto ctx = l.make_context(8);
  Mat<T> y(8, 5);
  l.forward(ctx, kIds, y);
  CHECK(max_abs_diff(y, (loss(), yd)) < 100 * value_tol<T>());
  auto& a = lora_adapter(l, "default");
  as_mat(a.grad_A()).setConstant(nan<T>());
  as_mat(a.grad_B()).setConstant(nan<T>());
  l.backward(ctx, dy, {}, GradMode::overwrite);
  auto& ad = lora_adapter(twin, "default");
  auto rA = check_gradient(ad.a.data(), a.grad_a.data(), a.a.size(), loss);
  auto rB = check_gradient(ad.b.data(), a.grad_b.data(), a.b.size(), loss);
  INFO(rA.str("dA") << "\n" << rB.str("dB"));
  CHECK(rA.worst < grad_tol<T>());
  CHECK(rB.worst < grad_tol<T>());
  // accumulate adds
  const Mat<T> gA = as_mat(a.grad_A());
  l.backward(ctx, dy, {}, GradMode::accumulate);
  CHECK(max_abs_diff(as_mat(a.grad_A()), Mat<T>(2 * gA)) < 10 * value_tol<T>());
}

TEMPLATE_TEST_CASE("lora on embedding: PEFT's properties", "[embedding][lora][props]", float, double) {
  using T = TestType;
  auto l = make<T>(5, LoraInit::standard);
  const auto& a = lora_adapter(l, "default");
  CHECK(as_mat(a.A()).isZero());  // PEFT's embedding init: A = 0, B ~ N(0, 1)
  CHECK(as_mat(a.B()).cwiseAbs().maxCoeff() > T(0));
  auto ctx = l.make_context(8);
  Mat<T> y(8, 5), y0(8, 5), ym(8, 5);
  l.disable_adapters();
  l.forward(ctx, kIds, y0);
  l.enable_adapters();
  l.forward(ctx, kIds, y);
  CHECK(y == y0);
  auto& am = lora_adapter(l, "default");
  Generator g(3);
  g.normal(am.a.data(), am.a.size(), 0.0, 1.0);
  l.forward(ctx, kIds, y);
  CHECK(max_abs_diff(y, y0) > 1e-3);
  const Mat<T> w0 = as_mat(l.base().weight());
  l.merge();
  l.forward(ctx, kIds, ym);
  CHECK(max_abs_diff(ym, y) < 100 * value_tol<T>());
  Mat<T> delta(12, 5);
  l.delta_weight("default", delta);
  CHECK(max_abs_diff(as_mat(l.base().weight()), Mat<T>(w0 + delta)) < 10 * value_tol<T>());
  l.unmerge();
  CHECK(max_abs_diff(as_mat(l.base().weight()), w0) < 10 * value_tol<T>());
}

TEMPLATE_TEST_CASE("lora on embedding matches Hugging Face PEFT", "[embedding][lora][reference]", float, double) {
  using T = TestType;
  std::ifstream in(std::string(PEFT_TEST_DATA_DIR) + (std::is_same_v<T, float> ? "/lora_embedding_default_f32.json" : "/lora_embedding_default_f64.json"));
  REQUIRE(in);
  const auto j = nlohmann::json::parse(in);
  auto get = [&](const std::string& n) {
    const auto& t = j.at("tensors").at(n);
    const auto data = t.at("data").template get<std::vector<double>>();
    const auto shape = t.at("shape").template get<std::vector<Index>>();
    Index rows = shape[0], cols = 1;
    for (std::size_t i = 1; i < shape.size(); ++i) cols *= shape[i];
    if (shape.size() == 3) rows = shape[0] * shape[1], cols = shape[2];
    Mat<T> m(rows, cols);
    for (std::size_t i = 0; i < data.size(); ++i) m.data()[i] = T(data[i]);
    return m;
  };
  const auto ids_d = j.at("tensors").at("ids").at("data").template get<std::vector<std::int64_t>>();
  const Mat<T> w = get("emb.weight");
  Generator g(0);
  LoraEmbedding<T> l(Embedding<T>(w.rows(), w.cols(), g), "emb");
  as_mat(l.base().weight()) = w;
  LoraConfig c;
  c.r = j.at("config").at("default").at("r");
  c.lora_alpha = j.at("config").at("default").at("lora_alpha");
  c.init_lora_weights = LoraInit::zeros;
  l.add_adapter("default", c, g);
  auto& a = lora_adapter(l, "default");
  as_mat(a.A()) = get("emb.lora_embedding_A");
  as_mat(a.B()) = get("emb.lora_embedding_B");
  const Index n = Index(ids_d.size());
  auto ctx = l.make_context(n);
  Mat<T> y(n, w.cols());
  l.forward(ctx, ids_d, y);
  const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
  CHECK(max_abs_diff(y, get("out")) < tol);
  l.backward(ctx, get("grad_out"), {}, GradMode::overwrite);
  CHECK(max_abs_diff(as_mat(a.grad_A()), get("grad.emb.lora_embedding_A")) < tol);
  CHECK(max_abs_diff(as_mat(a.grad_B()), get("grad.emb.lora_embedding_B")) < tol);
  Mat<T> delta(w.rows(), w.cols());
  l.delta_weight("default", delta);
  CHECK(max_abs_diff(delta, get("delta.emb")) < tol);
  l.merge();
  CHECK(max_abs_diff(as_mat(l.base().weight()), get("merged.emb.weight")) < tol);
  l.forward(ctx, ids_d, y);
  CHECK(max_abs_diff(y, get("merged_out")) < tol);
}

TEST_CASE("embedding: bad input gets a clear exception", "[embedding][errors]") {
  Generator g(1);
  LoraEmbedding<float> l(Embedding<float>(12, 5, g));
  l.add_adapter("default", LoraConfig{}, g);
  auto ctx = l.make_context(4);
  Mat<float> y(2, 5);
  const std::vector<std::int64_t> bad = {1, 12}, neg = {-1, 0}, ok = {1, 2};
  REQUIRE_THROWS_WITH(l.forward(ctx, bad, y), Catch::Contains("token id 12 at position 1 is out of range [0, 12)"));
  REQUIRE_THROWS_WITH(l.forward(ctx, neg, y), Catch::Contains("token id -1 at position 0"));
  l.forward(ctx, ok, y);
  Mat<float> dx(2, 12), dy(2, 5);
  dy.setRandom();
  REQUIRE_THROWS_WITH(l.backward(ctx, dy, dx), Catch::Contains("no input gradient"));
  LoraConfig c;
  c.lora_bias = true;
  REQUIRE_THROWS_WITH(l.add_adapter("b", c, g), Catch::Contains("lora_bias is not supported on an embedding"));
  c.lora_bias = false;
  c.fan_in_fan_out = true;
  REQUIRE_THROWS_WITH(l.add_adapter("f", c, g), Catch::Contains("fan_in_fan_out does not apply"));
  REQUIRE_THROWS_WITH(Embedding<float>(12, 5, g, 12), Catch::Contains("padding_idx 12 is out of range"));
}

TEST_CASE("lora on embedding: no gradient reaches padding_idx's column of A (as F.embedding)", "[embedding][lora]") {
  Generator g(1);
  LoraEmbedding<double> l(Embedding<double>(10, 4, g, /*padding_idx=*/0));
  LoraConfig c;
  c.r = 2;
  c.init_lora_weights = LoraInit::off;
  l.add_adapter("default", c, g);
  const std::vector<std::int64_t> ids = {0, 1, 0};
  auto ctx = l.make_context(3);
  Mat<double> y(3, 4);
  l.forward(ctx, ids, y);
  l.backward(ctx, random_mat<double>(3, 4, 2), {}, GradMode::overwrite);
  const auto gA = as_mat(lora_adapter(l, "default").grad_A());
  CHECK(gA.col(0).isZero());
  CHECK(gA.col(1).cwiseAbs().maxCoeff() > 0);
}
