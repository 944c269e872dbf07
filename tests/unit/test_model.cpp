// Model-level helpers over a user's plain aggregate struct (Boost.PFR), PEFT's parameter count line, and
// training: a step moves only adapter parameters; two forwards before one backward (micro-batching).
#include <catch2/catch.hpp>
#include <cstring>
#include <peft/train.hpp>
#include <sstream>
#include <tuple>

#include "gradcheck.hpp"
#include "test_util.hpp"

using namespace peft;
using namespace peft::test;

namespace {
struct Relu {
  int unused = 0;  // a non-layer field: skipped by the walkers
};
template <class T>
struct Block {
  Adapted<Linear<T>, Lora> up;
  Relu act;
  Adapted<Linear<T>, Lora> down;
};
template <class T>
struct Model {
  Block<T> block;
  std::vector<Linear<T>> extra;  // (a std::array<Linear<T>, N> field makes g++ 12 crash inside Boost.PFR 1.81's field counting)
  Linear<T> head;
};

template <class T>
Model<T> make_model(Generator& g) {
  Model<T> m{{Adapted<Linear<T>, Lora>(Linear<T>(10, 20, true, g), "block.up"), {}, Adapted<Linear<T>, Lora>(Linear<T>(20, 10, true, g), "block.down")},
             {},
             Linear<T>(10, 3, true, g)};
  m.extra.push_back(Linear<T>(10, 10, false, g));
  m.extra.push_back(Linear<T>(10, 10, false, g));
  LoraConfig cfg;
  cfg.r = 4;
  m.block.up.add_adapter("default", cfg, g);
  m.block.down.add_adapter("default", cfg, g);
  return m;
}
}  // namespace

namespace {
/// A model class as C++ code often has them: a constructor and private layers, listed by peft_fields().
class ClassModel {
 public:
  explicit ClassModel(Generator& g) : fc1_(Linear<float>(6, 5, true, g), "fc1"), fc2_(5, 2, false, g) {
    fc1_.add_adapter("default", LoraConfig{.r = 2, .lora_dropout = 0.5}, g);
  }
  auto peft_fields() { return std::tie(fc1_, act_, fc2_); }
  static constexpr std::array<std::string_view, 3> field_names{"fc1", "act", "fc2"};
  Adapted<Linear<float>, Lora>& fc1() { return fc1_; }

 private:
  Adapted<Linear<float>, Lora> fc1_;
  Relu act_;
  Linear<float> fc2_;
};
}  // namespace

TEST_CASE("model: a class with constructors and private layers lists them with peft_fields()", "[model]") {
  static_assert(!std::is_aggregate_v<ClassModel>);
  Generator g(4);
  ClassModel m(g);
  std::vector<std::string> names;
  for (const auto& p : parameters<float>(m)) names.push_back(p.name);
  CHECK(names == std::vector<std::string>{"fc1.weight", "fc1.bias", "fc1.lora_A.default.weight", "fc1.lora_B.default.weight", "fc2.weight"});
  CHECK(trainable_parameters<float>(m).size() == 2);
  std::ostringstream line;
  print_trainable_parameters(m, line);
  CHECK(line.str().find("trainable params: 22 || all params: 67") != std::string::npos);
  eval(m);
  CHECK_FALSE(m.fc1().is_training());
  train(m);
  CHECK(m.fc1().is_training());
}

TEST_CASE("model: parameters are walked through nested structs and arrays", "[model]") {
  Generator g(1);
  auto m = make_model<float>(g);
  std::vector<std::string> paths;
  for_each_layer(m, [&](auto&, const std::string& path) { paths.push_back(path); });
  CHECK(paths == std::vector<std::string>{"block.up", "block.down", "1.0", "1.1", "2"});
  const auto params = parameters<float>(m);
  std::vector<std::string> names;
  for (const auto& p : params) names.push_back(p.name);
  CHECK(names == std::vector<std::string>{"block.up.weight", "block.up.bias", "block.up.lora_A.default.weight", "block.up.lora_B.default.weight",
                                          "block.down.weight", "block.down.bias", "block.down.lora_A.default.weight",
                                          "block.down.lora_B.default.weight", "1.0.weight", "1.1.weight", "2.weight", "2.bias"});
  const auto trainable = trainable_parameters<float>(m);
  CHECK(trainable.size() == 4);
}

TEST_CASE("model: PEFT's trainable-parameter count and line", "[model]") {
  Generator g(1);
  auto m = make_model<float>(g);
  // base: 10*20+20 + 20*10+10 + 100 + 100 + 10*3+3 = 663; LoRA r=4: (10+20)*4 twice = 240
  auto c = count_parameters(m);
  CHECK(c.trainable == 240);
  CHECK(c.total == 903);
  CHECK(trainable_parameters_line(c) == "trainable params: 240 || all params: 903 || trainable%: 26.5781");
  CHECK(trainable_parameters_line({1234567, 7000000000}) == "trainable params: 1,234,567 || all params: 7,000,000,000 || trainable%: 0.0176");
  m.head.set_requires_grad(true);  // PEFT's modules_to_save: a fully trained head
  c = count_parameters(m);
  CHECK(c.trainable == 240 + 33);
  std::ostringstream os;
  print_trainable_parameters(m, os);
  CHECK(os.str() == "trainable params: 273 || all params: 903 || trainable%: 30.2326\n");
  // inactive adapters count in "all" but not in "trainable", as in PEFT
  m.block.up.add_adapter("other", LoraConfig{}, g);
  c = count_parameters(m);
  CHECK(c.total == 903 + 240);
  CHECK(c.trainable == 273);
}

TEST_CASE("model: set_adapter, merge, disable and train/eval reach every adapted layer", "[model]") {
  Generator g(1);
  auto m = make_model<double>(g);
  m.block.up.add_adapter("other", LoraConfig{}, g);
  set_adapter(m, "other");
  CHECK(m.block.up.active_adapters() == std::vector<std::string>{"other"});
  CHECK(m.block.down.active_adapters().empty());  // layers without it run none, as PEFT (no mixing of names)
  REQUIRE_THROWS_WITH(set_adapter(m, "missing"), Catch::Contains("no layer of the model has an adapter named 'missing'"));
  set_adapter(m, "default");
  merge_adapters(m);
  CHECK(m.block.up.merged());
  CHECK(m.block.down.merged());
  unmerge_adapters(m);
  CHECK_FALSE(m.block.down.merged());
  disable_adapters(m);
  CHECK_FALSE(m.block.up.adapters_enabled());
  enable_adapters(m);
  eval(m);
  CHECK_FALSE(m.block.up.is_training());
  train(m);
  CHECK(m.block.down.is_training());
}

TEMPLATE_TEST_CASE("model: an AdamW step on trainable parameters changes adapters only", "[model][train]", float, double) {
  using T = TestType;
  Generator g(2);
  auto m = make_model<T>(g);
  LoraConfig cfg;
  cfg.r = 2;
  m.block.up.add_adapter("inactive", cfg, g);
  auto all = parameters<T>(m);
  std::vector<std::vector<T>> before;
  for (auto& p : all) before.emplace_back(p.value, p.value + p.size);
  AdamW<T> opt(trainable_parameters<T>(m), AdamWOptions{.lr = 0.05});
  const Mat<T> x = random_mat<T>(6, 10, 3), target = random_mat<T>(6, 10, 4);
  auto c_up = m.block.up.make_context(6);
  auto c_down = m.block.down.make_context(6);
  for (int step = 0; step < 3; ++step) {
    zero_grad(m);
    Mat<T> h(6, 20), y(6, 10);
    m.block.up.forward(c_up, x, h);
    Mat<T> a = h.cwiseMax(T(0));
    m.block.down.forward(c_down, a, y);
    const Mat<T> dy = y - target;  // gradient of ½‖y − target‖²
    Mat<T> da(6, 20);
    m.block.down.backward(c_down, dy, da);
    Mat<T> dh = (h.array() > T(0)).select(da, T(0));
    m.block.up.backward(c_up, dh, MatrixView<T>{});
    opt.step();
  }
  for (std::size_t i = 0; i < all.size(); ++i) {
    const auto& p = all[i];
    INFO(p.name);
    const bool changed = std::memcmp(before[i].data(), p.value, p.size * sizeof(T)) != 0;
    const bool is_active_adapter = p.name.find(".default.") != std::string::npos;
    // lora_A of the active adapters moves from the first step; lora_B moves once A's... both move with Adam
    CHECK(changed == is_active_adapter);
  }
}

TEMPLATE_TEST_CASE("model: two forwards before one backward (micro-batches) accumulate like one big batch", "[model][train]", float, double) {
  using T = TestType;
  Generator g(5);
  Adapted<Linear<T>, Lora> l(Linear<T>(8, 5, true, g));
  LoraConfig cfg;
  cfg.r = 3;
  cfg.init_lora_weights = LoraInit::off;
  l.add_adapter("default", cfg, g);
  const Mat<T> x = random_mat<T>(6, 8, 1), dy = random_mat<T>(6, 5, 2);
  // one batch of 6
  auto big = l.make_context(6);
  Mat<T> y(6, 5);
  l.forward(big, x, y);
  l.backward(big, dy, MatrixView<T>{}, GradMode::overwrite);
  const Mat<T> gA = as_mat(lora_adapter(l, "default").grad_A()), gB = as_mat(lora_adapter(l, "default").grad_B());
  // two micro-batches of 3, both forwards first, then both backwards, accumulating
  auto c1 = l.make_context(3), c2 = l.make_context(3);
  const Mat<T> x1 = x.topRows(3), x2 = x.bottomRows(3), dy1 = dy.topRows(3), dy2 = dy.bottomRows(3);
  Mat<T> y1(3, 5), y2(3, 5);
  l.forward(c1, x1, y1);
  l.forward(c2, x2, y2);
  zero_grad(l);
  l.backward(c1, dy1, MatrixView<T>{}, GradMode::accumulate);
  l.backward(c2, dy2, MatrixView<T>{}, GradMode::accumulate);
  CHECK(max_abs_diff(as_mat(lora_adapter(l, "default").grad_A()), gA) < 10 * value_tol<T>());
  CHECK(max_abs_diff(as_mat(lora_adapter(l, "default").grad_B()), gB) < 10 * value_tol<T>());
}

TEST_CASE("model: set_base_requires_grad freezes and unfreezes every base weight", "[model]") {
  Generator g(1);
  auto m = make_model<float>(g);
  set_base_requires_grad(m, true);
  CHECK(count_parameters(m).trainable == count_parameters(m).total);
  set_base_requires_grad(m, false);
  CHECK(count_parameters(m).trainable == 240);  // only the two LoRA adapters
}

TEST_CASE("model: layers get different dropout masks unless seeded alike", "[model][dropout]") {
  Generator g(1);
  LoraConfig cfg;
  cfg.r = 2;
  cfg.lora_dropout = 0.5;
  cfg.init_lora_weights = LoraInit::off;
  Linear<double> base(6, 4, true, g);
  Adapted<Linear<double>, Lora> l1(base), l2(base);
  Generator ga(7);
  l1.add_adapter("default", cfg, ga);
  Generator gb(7);
  l2.add_adapter("default", cfg, gb);  // identical adapter weights...
  Generator gc(8);
  Adapted<Linear<double>, Lora> l3(base);
  l3.add_adapter("default", cfg, ga);  // ...and a third layer seeded from the same generator as l1, later
  const Mat<double> x = random_mat<double>(5, 6, 1);
  auto out = [&](Adapted<Linear<double>, Lora>& l) {
    auto ctx = l.make_context(5);
    Mat<double> y(5, 4);
    l.forward(ctx, x, y);
    return y;
  };
  CHECK(out(l1) == out(l2));  // same generator state, same masks: reproducible
  l3.adapter<Lora>("default").a = l1.adapter<Lora>("default").a;
  l3.adapter<Lora>("default").b = l1.adapter<Lora>("default").b;
  l1.set_seed(0);
  l3.set_seed(0);
  CHECK(out(l1) == out(l3));
  l3.set_seed(1);
  CHECK(out(l1) != out(l3));
}
