// Checkpoint interop with Hugging Face PEFT for AdaLoRA and VeRA, and modules_to_save: adapter_config.json
// (PEFT's names and defaults, bad values), golden checkpoints written by real PEFT
// (tests/reference/checkpoints/{adalora,vera,vera_no_projection}, from gen_checkpoints_adalora_vera.py):
// outputs, merged weights and the files saved again equal PEFT's; C++ round trips (float and double);
// bad input (wrong shapes, missing projections, wrong peft_type) rejected with precise exceptions.
#include <catch2/catch.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <peft/io/adapter_config.hpp>
#include <peft/io/pretrained.hpp>
#include <peft/model.hpp>
#include <unistd.h>

#include "io_test_util.hpp"
#include "reference.hpp"

using namespace peft;
using namespace peft::test;
namespace fs = std::filesystem;
namespace st = peft::safetensors;
using nlohmann::json;

namespace {

std::string golden() { return golden_checkpoints(); }
io::AdapterConfig parse(const std::string& text) { return io::parse_adapter_config(text, "cfg.json"); }

// ---- the golden model: lin0 Linear(6, 5) -> relu -> lin1 Linear(5, 4) -> relu -> head Linear(4, 3)
// Lora sits beside AdaLora in the layer type on purpose: both name their tensors lora_A / lora_B.
template <class T>
using ALin = Adapted<Linear<T>, Lora, AdaLora, Vera>;
template <class T>
struct Net {
  ALin<T> lin0;
  ALin<T> lin1;
  Linear<T> head;
};

template <class T>
Net<T> make_net(std::uint64_t seed = 1) {
  Generator g(seed);
  return Net<T>{ALin<T>(Linear<T>(6, 5, true, g), "lin0"), ALin<T>(Linear<T>(5, 4, true, g), "lin1"), Linear<T>(4, 3, true, g)};
}

/// The golden model with the base weights of `base` (a PyTorch state_dict() file).
Net<float> make_net(const st::File& base) {
  Net<float> n = make_net<float>();
  auto copy = [&](const std::string& key, MatrixView<float> dst) {
    auto src = base.tensor_f32(key);
    REQUIRE(src.size() == dst.size());
    as_mat(dst) = Eigen::Map<const Mat<float>>(src.data, dst.rows, dst.cols);
  };
  copy("lin0.weight", n.lin0.base().weight());
  copy("lin0.bias", n.lin0.base().bias());
  copy("lin1.weight", n.lin1.base().weight());
  copy("lin1.bias", n.lin1.base().bias());
  copy("head.weight", n.head.weight());
  copy("head.bias", n.head.bias());
  return n;
}

template <class T>
Mat<T> run(Net<T>& n, const Mat<T>& x) {
  const Index b = x.rows();
  Mat<T> h0(b, 5), h1(b, 4), y(b, 3);
  auto c0 = n.lin0.make_context(b);
  n.lin0.forward(c0, x, h0);
  h0 = h0.cwiseMax(T(0));
  auto c1 = n.lin1.make_context(b);
  n.lin1.forward(c1, h0, h1);
  h1 = h1.cwiseMax(T(0));
  auto ch = n.head.make_context(b);
  n.head.forward(ch, h1, y);
  return y;
}

template <class T>
std::vector<io::ModuleToSave<T>> head_of(Net<T>& n) {
  return {io::module_to_save("head", n.head)};
}

/// Every key, shape, dtype and value of `mine` equals `theirs`, and their metadata.
void same_file(const fs::path& mine_path, const fs::path& theirs_path) {
  st::File mine(mine_path), theirs(theirs_path);
  CHECK(mine.names() == theirs.names());
  for (const auto& k : theirs.names()) {
    CAPTURE(k);
    REQUIRE(mine.contains(k));
    CHECK(mine.info(k).shape == theirs.info(k).shape);
    CHECK(mine.info(k).dtype == theirs.info(k).dtype);
    const auto a = mine.tensor_f32(k), b = theirs.tensor_f32(k);
    CHECK(std::equal(a.data, a.data + a.size(), b.data));
  }
  CHECK(mine.metadata() == theirs.metadata());
}

/// Every key peft++ writes is in PEFT's file with the same value (target_modules compared as a set).
void config_subset(const fs::path& mine_path, const fs::path& theirs_path) {
  const json jm = json::parse(read_text(mine_path)), jt = json::parse(read_text(theirs_path));
  for (auto it = jm.begin(); it != jm.end(); ++it) {
    CAPTURE(it.key());
    REQUIRE(jt.contains(it.key()));
    if ((it.key() == "target_modules" || it.key() == "modules_to_save") && it->is_array()) {
      auto a = it->get<std::vector<std::string>>(), b = jt.at(it.key()).get<std::vector<std::string>>();
      std::sort(a.begin(), a.end());
      std::sort(b.begin(), b.end());
      CHECK(a == b);
    } else {
      CHECK(*it == jt.at(it.key()));
    }
  }
}

/// An adapter dir: the config text and the tensors of `src` (edited by `edit`).
void make_dir(const fs::path& dir, const std::string& cfg, const st::File& src,
              const std::function<void(std::vector<st::TensorRef>&, std::deque<std::vector<float>>&)>& edit = {}) {
  std::vector<st::TensorRef> refs;
  std::deque<std::vector<float>> store;
  for (const auto& k : src.names()) refs.push_back(src.ref(k));
  if (edit) edit(refs, store);
  fs::create_directories(dir);
  st::write(dir / "adapter_model.safetensors", refs);
  write_text(dir / "adapter_config.json", cfg);
}
void drop(std::vector<st::TensorRef>& refs, const std::string& key) {
  refs.erase(std::remove_if(refs.begin(), refs.end(), [&](const st::TensorRef& r) { return r.name == key; }), refs.end());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// adapter_config.json

TEST_CASE("adapter_config: ADALORA and VERA as PEFT writes them", "[pretrained_more][config]") {
  CaptureWarnings w;
  {
    const auto c = io::read_adapter_config(golden() + "/adalora/adapter");
    CHECK(std::string(c.peft_type()) == "ADALORA");
    const auto* a = c.get_if<AdaLoraConfig>();
    REQUIRE(a);
    CHECK(a->init_r == 4);
    CHECK(a->target_r == 2);
    CHECK(a->tinit == 1);
    CHECK(a->tfinal == 1);
    CHECK(a->deltaT == 1);
    CHECK(a->beta1 == 0.8);
    CHECK(a->beta2 == 0.9);
    CHECK(a->total_step == 6);
    CHECK(a->lora_alpha == 6);
    CHECK(a->lora_dropout == 0.1);
    CHECK(a->orth_reg_weight == 0.5);
    REQUIRE(a->rank_pattern.size() == 2);
    for (const auto& [k, mask] : a->rank_pattern) {
      CAPTURE(k);
      CHECK(mask.size() == 4);
      CHECK((AdaLoraConfig::module_of_key(k) == "lin0" || AdaLoraConfig::module_of_key(k) == "lin1"));
    }
    CHECK(c.bias == io::BiasMode::none);
    CHECK(c.targets("lin0"));
    CHECK(!c.targets("head"));
  }
  {
    const auto c = io::read_adapter_config(golden() + "/vera/adapter");
    CHECK(std::string(c.peft_type()) == "VERA");
    const auto* v = c.get_if<VeraConfig>();
    REQUIRE(v);
    CHECK(v->r == 3);
    CHECK(v->projection_prng_key == 11);
    CHECK(v->save_projection);
    CHECK(v->d_initial == 0.2);
    CHECK(v->vera_dropout == 0.0);
    CHECK(!v->projections);  // never in a file
    REQUIRE(c.modules_to_save);
    CHECK(*c.modules_to_save == std::vector<std::string>{"head"});
    CHECK(!c.targets("head"));
  }
  {
    const auto c = io::read_adapter_config(golden() + "/vera_no_projection/adapter");
    CHECK(!c.get_if<VeraConfig>()->save_projection);
  }
  CHECK(w.got.empty());
}

TEST_CASE("adapter_config: ADALORA and VERA defaults, write and read back", "[pretrained_more][config]") {
  CaptureWarnings w;
  // missing keys take PEFT 0.21's defaults (total_step has none: PEFT requires it)
  auto a = parse(R"({"peft_type": "ADALORA", "total_step": 10})");
  const auto& ac = *a.get_if<AdaLoraConfig>();
  CHECK(ac.init_r == 12);
  CHECK(ac.target_r == 8);
  CHECK(ac.tinit == 0);
  CHECK(ac.tfinal == 0);
  CHECK(ac.deltaT == 1);
  CHECK(ac.beta1 == 0.85);
  CHECK(ac.beta2 == 0.85);
  CHECK(ac.orth_reg_weight == 0.5);
  CHECK(ac.lora_alpha == 8);
  CHECK(ac.lora_dropout == 0.0);
  CHECK(ac.init_lora_weights);
  CHECK(ac.rank_pattern.empty());
  auto v = parse(R"({"peft_type": "VERA"})");
  const auto& vc = *v.get_if<VeraConfig>();
  CHECK(vc.r == 256);
  CHECK(vc.projection_prng_key == 0);
  CHECK(vc.save_projection);
  CHECK(vc.d_initial == 0.1);
  CHECK(vc.init_weights);
  CHECK(w.got.empty());

  // write and read back: every field, PEFT's key form for rank_pattern, bias "vera_only"
  AdaLoraConfig a2;
  a2.init_r = 3;
  a2.target_r = 1;
  a2.total_step = 20;
  a2.tinit = 2;
  a2.tfinal = 3;
  a2.deltaT = 2;
  a2.beta1 = 0.7;
  a2.beta2 = 0.6;
  a2.orth_reg_weight = 0.25;
  a2.lora_alpha = 5.5;
  a2.lora_dropout = 0.05;
  a2.fan_in_fan_out = true;
  a2.init_lora_weights = false;
  a2.rank_pattern = {{"blocks.0.fc", {true, false, true}}, {"blocks.1.fc.lora_E.default", {false, false, true}}};
  io::AdapterConfig c;
  c.method = a2;
  c.bias = io::BiasMode::lora_only;
  c.target_modules = io::ModuleSelector::list({"fc"});
  const json j = io::to_json(c);
  CHECK(j.at("rank_pattern") == json::parse(R"({"blocks.0.fc.lora_E": [true, false, true], "blocks.1.fc.lora_E": [false, false, true]})"));
  CHECK(j.at("bias") == "lora_only");
  CHECK(j.at("total_step") == 20);
  CHECK(j.at("lora_alpha") == 5.5);
  CHECK(!j.contains("r"));  // PEFT's AdaLoRA ignores r: not written
  auto back = parse(io::format_adapter_config(c));
  const auto& ab = *back.get_if<AdaLoraConfig>();
  CHECK(ab.init_r == 3);
  CHECK(ab.target_r == 1);
  CHECK(ab.tinit == 2);
  CHECK(ab.tfinal == 3);
  CHECK(ab.deltaT == 2);
  CHECK(ab.beta1 == 0.7);
  CHECK(ab.beta2 == 0.6);
  CHECK(ab.orth_reg_weight == 0.25);
  CHECK(ab.lora_alpha == 5.5);
  CHECK(ab.lora_dropout == 0.05);
  CHECK(ab.fan_in_fan_out);
  CHECK(!ab.init_lora_weights);
  CHECK(back.bias == io::BiasMode::lora_only);
  REQUIRE(ab.rank_pattern.size() == 2);
  CHECK(ab.for_module("blocks.0.fc").rank_for_module() == 2);
  CHECK(ab.for_module("blocks.1.fc").rank_for_module() == 1);

  VeraConfig v2;
  v2.r = 7;
  v2.projection_prng_key = 123456789012ull;
  v2.save_projection = true;
  v2.vera_dropout = 0.1;
  v2.d_initial = 0.3;
  v2.init_weights = false;
  io::AdapterConfig cv;
  cv.method = v2;
  cv.bias = io::BiasMode::lora_only;
  cv.modules_to_save = std::vector<std::string>{"classifier"};
  const json jv = io::to_json(cv);
  CHECK(jv.at("bias") == "vera_only");
  CHECK(jv.at("projection_prng_key") == 123456789012ull);
  auto vb = parse(io::format_adapter_config(cv));
  const auto& vbc = *vb.get_if<VeraConfig>();
  CHECK(vbc.r == 7);
  CHECK(vbc.projection_prng_key == 123456789012ull);
  CHECK(vbc.vera_dropout == 0.1);
  CHECK(vbc.d_initial == 0.3);
  CHECK(!vbc.init_weights);
  CHECK(vb.bias == io::BiasMode::lora_only);
  CHECK(vb.modules_to_save == std::vector<std::string>{"classifier"});
  CHECK(w.got.empty());
}

TEST_CASE("adapter_config: bad ADALORA and VERA files are rejected naming the key", "[pretrained_more][config]") {
  CaptureWarnings w;
  require_throws_with<FormatError>([] { parse(R"({"peft_type": "ADALORA"})"); }, {"cfg.json", "total_step"});
  require_throws_with<FormatError>([] { parse(R"({"peft_type": "ADALORA", "total_step": 10, "use_dora": true})"); }, {"'use_dora'", "DoRA"});
  require_throws_with<FormatError>([] { parse(R"({"peft_type": "ADALORA", "total_step": 10, "rank_pattern": [1, 2]})"); }, {"'rank_pattern'", "an object"});
  require_throws_with<FormatError>([] { parse(R"({"peft_type": "ADALORA", "total_step": 10, "init_r": 3, "target_r": 1, "rank_pattern": {"a.lora_E": [true, "x", true]}})"); },
                                   {"rank_pattern['a.lora_E']", "booleans"});
  require_throws_with<FormatError>([] { parse(R"({"peft_type": "ADALORA", "total_step": 10, "init_r": 3, "target_r": 1, "rank_pattern": {"a.lora_E": [true, false]}})"); },
                                   {"cfg.json", "rank_pattern['a.lora_E'] has 2 entries; it must have init_r = 3"});
  require_throws_with<FormatError>([] { parse(R"({"peft_type": "ADALORA", "total_step": 10, "target_r": 20})"); }, {"target_r (20) must not exceed init_r (12)"});
  require_throws_with<FormatError>([] { parse(R"({"peft_type": "ADALORA", "total_step": 10, "use_qalora": true})"); }, {"'use_qalora'"});
  require_throws_with<FormatError>([] { parse(R"({"peft_type": "ADALORA", "total_step": 10, "bias": "vera_only"})"); }, {"'bias'", "lora_only"});
  require_throws_with<FormatError>([] { parse(R"({"peft_type": "VERA", "r": 0})"); }, {"cfg.json", "r should be a positive integer"});
  require_throws_with<FormatError>([] { parse(R"({"peft_type": "VERA", "bias": "lora_only"})"); }, {"'bias'", "vera_only"});
  require_throws_with<FormatError>([] { parse(R"({"peft_type": "VERA", "projection_prng_key": "seven"})"); }, {"'projection_prng_key'", "an integer"});
  require_throws_with<FormatError>([] { parse(R"({"peft_type": "VERA", "save_projection": 1})"); }, {"'save_projection'", "true or false"});
  require_throws_with<FormatError>([] { parse(R"({"peft_type": "OFT"})"); }, {"\"OFT\" is not supported", "ADALORA", "VERA"});
  CHECK(w.got.empty());
  // settings PEFT's AdaLoRA ignores: a warning, not an error
  parse(R"({"peft_type": "ADALORA", "total_step": 10, "use_rslora": true, "r": 16})");
  REQUIRE(w.got.size() == 1);
  CHECK(w.got[0].find("'use_rslora'") != std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Golden checkpoints from PEFT

TEST_CASE("pretrained: PEFT's AdaLoRA checkpoint with a truncating rank_pattern", "[pretrained_more][reference]") {
  CaptureWarnings w;
  const double tol = reference_tol<float>();
  const std::string dir = golden() + "/adalora";
  const json ref = json::parse(read_text(dir + "/reference.json"));
  const Mat<float> x = ref_tensor<float>(ref, "x");
  st::File base(dir + "/base.safetensors");
  Net<float> n = make_net(base);
  CHECK(scaled_diff(run(n, x), ref_tensor<float>(ref, "base_y")) < tol);
  auto res = io::load_pretrained(n, dir + "/adapter");
  CHECK(res.adapted_modules == std::vector<std::string>{"lin0", "lin1"});
  // the kept ranks (truncated by PEFT's rank_pattern), ranknum = init_r
  for (auto* l : {&n.lin0, &n.lin1}) {
    const auto& a = l->adapter<AdaLora>("default");
    CAPTURE(l->module_path());
    CHECK(a.r == ref.at("kept_ranks").at(l->module_path() + ".lora_E").get<int>());
    CHECK(a.ranknum == 4.0);
    CHECK(a.scaling == 6.0);
  }
  CHECK((n.lin0.adapter<AdaLora>("default").r < 4 || n.lin1.adapter<AdaLora>("default").r < 4));
  eval(n);  // lora_dropout 0.1
  const double e = scaled_diff(run(n, x), ref_tensor<float>(ref, "y"));
  CAPTURE(e);
  CHECK(e < tol);

  // saved again: PEFT's keys, shapes and values; config equal where peft++ writes it
  TempDir d;
  io::save_pretrained(n, d.path, "default", res.config);
  same_file(d.path / "adapter_model.safetensors", dir + "/adapter/adapter_model.safetensors");
  config_subset(d.path / "adapter_config.json", dir + "/adapter/adapter_config.json");

  // merged: PEFT's merge_and_unload
  merge_adapters(n);
  st::File merged(dir + "/merged.safetensors");
  for (auto [key, w_] : {std::pair{"lin0.weight", ConstMatrixView<float>(n.lin0.base().weight())},
                         std::pair{"lin1.weight", ConstMatrixView<float>(n.lin1.base().weight())},
                         std::pair{"lin0.bias", ConstMatrixView<float>(n.lin0.base().bias())}}) {
    CAPTURE(key);
    auto r = merged.tensor_f32(key);
    REQUIRE(r.size() == w_.size());
    const double em = scaled_diff(as_mat(w_), Eigen::Map<const Mat<float>>(r.data, w_.rows, w_.cols));
    CAPTURE(em);
    CHECK(em < tol);
  }
  CHECK(w.got.empty());
}

TEST_CASE("pretrained: PEFT's VeRA checkpoint with shared projections and a module to save", "[pretrained_more][reference]") {
  CaptureWarnings w;
  const double tol = reference_tol<float>();
  const std::string dir = golden() + "/vera";
  const json ref = json::parse(read_text(dir + "/reference.json"));
  const Mat<float> x = ref_tensor<float>(ref, "x");
  st::File base(dir + "/base.safetensors");
  Net<float> n = make_net(base);
  CHECK(scaled_diff(run(n, x), ref_tensor<float>(ref, "base_y")) < tol);

  SECTION("without the head registered, strict loading names the head's keys") {
    require_throws_with<FormatError>([&] { io::load_pretrained(n, dir + "/adapter"); },
                                     {"unexpected keys", "'base_model.model.head.weight'", "'base_model.model.head.bias'", "module_to_save"});
    CHECK(!n.lin0.has_adapter("default"));  // nothing added
    io::LoadOptions lax;
    lax.strict = false;
    auto res = io::load_pretrained(n, dir + "/adapter", "default", lax);
    auto unexpected = res.unexpected_keys;
    std::sort(unexpected.begin(), unexpected.end());
    CHECK(unexpected == std::vector<std::string>{"base_model.model.head.bias", "base_model.model.head.weight"});
    CHECK(res.missing_keys.empty());
  }
  SECTION("with the head") {
    auto res = io::load_pretrained(n, dir + "/adapter", "default", head_of(n));
    CHECK(res.adapted_modules == std::vector<std::string>{"lin0", "lin1"});
    const auto& a0 = n.lin0.adapter<Vera>("default");
    const auto& a1 = n.lin1.adapter<Vera>("default");
    CHECK(a0.projections == a1.projections);  // one shared pair
    CHECK(res.config.get_if<VeraConfig>()->projections == a0.projections);  // returned for reuse
    CHECK(a0.projections->max_in() == 6);
    CHECK(a0.projections->max_out() == 5);
    CHECK(a0.projections->r() == 3);
    const double e = scaled_diff(run(n, x), ref_tensor<float>(ref, "y"));
    CAPTURE(e);
    CHECK(e < tol);

    TempDir d;
    io::save_pretrained(n, d.path, "default", res.config, head_of(n));
    same_file(d.path / "adapter_model.safetensors", dir + "/adapter/adapter_model.safetensors");
    config_subset(d.path / "adapter_config.json", dir + "/adapter/adapter_config.json");

    merge_adapters(n);
    st::File merged(dir + "/merged.safetensors");
    for (auto [key, w_] : {std::pair{"lin0.weight", ConstMatrixView<float>(n.lin0.base().weight())},
                           std::pair{"lin1.weight", ConstMatrixView<float>(n.lin1.base().weight())},
                           std::pair{"head.weight", ConstMatrixView<float>(n.head.weight())},
                           std::pair{"head.bias", ConstMatrixView<float>(n.head.bias())}}) {
      CAPTURE(key);
      auto r = merged.tensor_f32(key);
      REQUIRE(r.size() == w_.size());
      const double em = scaled_diff(as_mat(w_), Eigen::Map<const Mat<float>>(r.data, w_.rows, w_.cols));
      CAPTURE(em);
      CHECK(em < tol);
    }
  }
  CHECK(w.got.empty());
}

TEST_CASE("pretrained: a VeRA checkpoint without projections cannot be loaded", "[pretrained_more][reference][hostile]") {
  CaptureWarnings w;
  const std::string dir = golden() + "/vera_no_projection/adapter";
  Net<float> n = make_net<float>();
  require_throws_with<FormatError>([&] { io::load_pretrained(n, dir); },
                                   {"adapter_model.safetensors", "without the shared projections", "save_projection = false",
                                    "PyTorch's random number generator", "cannot reproduce", "projections are required"});
  CHECK(!n.lin0.has_adapter("default"));
  // the caller may supply projections (e.g. the ones a peft++ model was trained with)
  io::LoadOptions o;
  o.vera_projections = VeraProjections<float>::random(2, 6, 5, 3);
  auto res = io::load_pretrained(n, dir, "default", o);
  CHECK(res.adapted_modules == std::vector<std::string>{"lin0"});
  CHECK(n.lin0.adapter<Vera>("default").projections.get() == o.vera_projections.get());
  // a file that holds only one of the two
  TempDir d;
  st::File src(golden() + "/vera/adapter/adapter_model.safetensors");
  make_dir(d.path, read_text(golden() + "/vera/adapter/adapter_config.json"), src, [](auto& refs, auto&) { drop(refs, "base_model.vera_B"); });
  Net<float> n2 = make_net<float>();
  require_throws_with<FormatError>([&] { io::load_pretrained(n2, d.path, "default", head_of(n2)); }, {"holds base_model.vera_A but not 'base_model.vera_B'"});
}

// ---------------------------------------------------------------------------------------------
// C++ round trips

TEST_CASE("pretrained: AdaLoRA round trip, truncated on save as PEFT does, float and double", "[pretrained_more]") {
  auto roundtrip = [](auto tag) {
    using T = decltype(tag);
    Net<T> m = make_net<T>(5);
    AdaLoraConfig c;
    c.init_r = 4;
    c.target_r = 2;
    c.total_step = 10;
    c.lora_alpha = 3;
    Generator g(11);
    m.lin0.add_adapter("task", c, g);
    m.lin1.add_adapter("task", c, g);
    for (auto& p : parameters<T>(m))
      if (p.name.find(".task") != std::string::npos) g.uniform(p.value, p.size, -0.5, 0.5);
    // the allocator's final pattern: masked triplets have E = 0
    const adalora::RankPattern pattern = {{"lin0", {true, false, true, true}}, {"lin1", {false, false, true, false}}};
    for (auto* l : {&m.lin0, &m.lin1}) {
      auto& a = l->template adapter<AdaLora>("task");
      const auto& keep = l->module_path() == "lin0" ? pattern[0].second : pattern[1].second;
      for (int i = 0; i < 4; ++i)
        if (!keep[std::size_t(i)]) a.e[std::size_t(i)] = T(0);
    }
    const Mat<T> x = random_mat<T>(3, 6, 2);
    const Mat<T> y = run(m, x);
    io::AdapterConfig cfg;
    c.rank_pattern = pattern;
    cfg.method = c;
    cfg.target_modules = io::ModuleSelector::list({"lin0", "lin1"});
    TempDir d;
    io::save_pretrained(m, d.path, "task", cfg, head_of(m));
    {
      st::File f(d.path / "adapter_model.safetensors");
      CHECK(f.info("base_model.model.lin0.lora_A").shape == std::vector<std::uint64_t>{3, 6});
      CHECK(f.info("base_model.model.lin0.lora_E").shape == std::vector<std::uint64_t>{3, 1});
      CHECK(f.info("base_model.model.lin1.lora_B").shape == std::vector<std::uint64_t>{4, 1});
      CHECK(f.info("base_model.model.head.weight").shape == std::vector<std::uint64_t>{3, 4});
      CHECK(f.info("base_model.model.head.bias").shape == std::vector<std::uint64_t>{3});
      CHECK(f.names().size() == 8);
      // lin0 keeps triplets 0, 2, 3: row 1 of A is gone
      const auto a = f.tensor_f64("base_model.model.lin0.lora_A");
      const auto& src = m.lin0.template adapter<AdaLora>("task");
      CHECK(a(1, 0) == double(src.a[std::size_t(2 * 6)]));
    }
    const auto j = json::parse(read_text(d.path / "adapter_config.json"));
    CHECK(j.at("rank_pattern").contains("lin0.lora_E"));
    CHECK(j.at("modules_to_save") == json::array({"head"}));
    // the live model was not changed by saving
    CHECK(m.lin0.template adapter<AdaLora>("task").r == 4);

    Net<T> m2 = make_net<T>(5);
    m2.head.weight()(0, 0) = T(42);
    auto res = io::load_pretrained(m2, d.path, "task", head_of(m2));
    CHECK(m2.lin0.template adapter<AdaLora>("task").r == 3);
    CHECK(m2.lin1.template adapter<AdaLora>("task").r == 1);
    CHECK(m2.lin1.template adapter<AdaLora>("task").ranknum == 4.0);
    CHECK(m2.head.weight()(0, 0) == m.head.weight()(0, 0));
    const Mat<T> y2 = run(m2, x);
    CHECK(max_abs_diff(y, y2) < (std::is_same_v<T, float> ? 1e-6 : 1e-14));

    // truncating first (resize_by_rank_pattern) and then saving writes the same file
    CHECK(adalora::resize_by_rank_pattern(m, pattern, "task") == 2);
    TempDir d2;
    io::save_pretrained(m, d2.path, "task", cfg, head_of(m));
    CHECK(read_text(d.path / "adapter_model.safetensors") == read_text(d2.path / "adapter_model.safetensors"));
    // ... but without the pattern in the config PEFT would rebuild init_r triplets: refused
    io::AdapterConfig bad = cfg;
    bad.template get_if<AdaLoraConfig>()->rank_pattern.clear();
    TempDir d3;
    require_throws_with<ConfigError>([&] { io::save_pretrained(m, d3.path, "task", bad); },
                                     {"layer 'lin0'", "rank 3 (truncated)", "no entry for this module"});
    CHECK(fs::is_empty(d3.path));
  };
  roundtrip(float{});
  roundtrip(double{});
}

TEST_CASE("pretrained: an AdaLoRA layer whose rank_pattern keeps nothing (PEFT allows r = 0)", "[pretrained_more]") {
  Net<float> m = make_net<float>(5);
  AdaLoraConfig c;
  c.init_r = 3;
  c.target_r = 1;
  c.total_step = 10;
  Generator g(2);
  m.lin0.add_adapter("default", c, g);
  m.lin1.add_adapter("default", c, g);
  for (auto& p : parameters<float>(m))
    if (p.name.find(".default") != std::string::npos) g.uniform(p.value, p.size, -0.5, 0.5);
  c.rank_pattern = {{"lin0", {true, true, false}}, {"lin1", {false, false, false}}};
  m.lin0.adapter<AdaLora>("default").e[2] = 0.0f;
  for (int i = 0; i < 3; ++i) m.lin1.adapter<AdaLora>("default").e[std::size_t(i)] = 0.0f;
  const Mat<float> x = random_mat<float>(2, 6, 4);
  const Mat<float> y = run(m, x);
  io::AdapterConfig cfg;
  cfg.method = c;
  TempDir d;
  io::save_pretrained(m, d.path, "default", cfg);
  st::File f(d.path / "adapter_model.safetensors");
  CHECK(f.info("base_model.model.lin1.lora_A").shape == std::vector<std::uint64_t>{0, 5});
  CHECK(f.info("base_model.model.lin1.lora_B").shape == std::vector<std::uint64_t>{4, 0});
  CHECK(f.info("base_model.model.lin1.lora_E").shape == std::vector<std::uint64_t>{0, 1});
  Net<float> m2 = make_net<float>(5);
  io::load_pretrained(m2, d.path);
  CHECK(m2.lin1.adapter<AdaLora>("default").r == 0);
  CHECK(max_abs_diff(y, run(m2, x)) < 1e-6);
  merge_adapters(m2);
  CHECK(max_abs_diff(y, run(m2, x)) < 1e-5);
}

TEST_CASE("pretrained: VeRA round trip with projections sized for the adapted layers, float and double", "[pretrained_more]") {
  auto roundtrip = [](auto tag) {
    using T = decltype(tag);
    Net<T> m = make_net<T>(7);
    VeraConfig c;
    c.r = 4;
    c.d_initial = 0.5;
    // larger than the layers need: PEFT sizes them with the largest adapted in/out (6, 5), so the file holds that
    const auto proj = VeraProjections<T>::random(4, 9, 8, 21);
    c.projections = proj;
    Generator g(13);
    m.lin0.add_adapter("default", c, g);
    m.lin1.add_adapter("default", c, g);
    for (auto& p : parameters<T>(m))
      if (p.name.find("vera_lambda") != std::string::npos) g.uniform(p.value, p.size, -0.8, 0.8);
    const Mat<T> x = random_mat<T>(4, 6, 3);
    const Mat<T> y = run(m, x);
    io::AdapterConfig cfg;
    cfg.method = c;  // target_modules null: the adapted paths
    TempDir d;
    io::save_pretrained(m, d.path, "default", cfg);
    {
      st::File f(d.path / "adapter_model.safetensors");
      CHECK(f.names() == std::vector<std::string>{"base_model.model.lin0.vera_lambda_b", "base_model.model.lin0.vera_lambda_d",
                                                  "base_model.model.lin1.vera_lambda_b", "base_model.model.lin1.vera_lambda_d",
                                                  "base_model.vera_A", "base_model.vera_B"});
      CHECK(f.info("base_model.vera_A").shape == std::vector<std::uint64_t>{4, 6});
      CHECK(f.info("base_model.vera_B").shape == std::vector<std::uint64_t>{5, 4});
      CHECK(f.info("base_model.model.lin1.vera_lambda_b").shape == std::vector<std::uint64_t>{4});
      CHECK(f.info("base_model.model.lin1.vera_lambda_d").shape == std::vector<std::uint64_t>{4});
      const auto a = f.tensor_f64("base_model.vera_A");
      CHECK(a(3, 5) == double(proj->A()(3, 5)));
      CHECK(f.tensor_f64("base_model.vera_B")(4, 3) == double(proj->B()(4, 3)));
    }
    const auto j = json::parse(read_text(d.path / "adapter_config.json"));
    CHECK(j.at("peft_type") == "VERA");
    CHECK(j.at("target_modules") == json::array({"lin0", "lin1"}));
    Net<T> m2 = make_net<T>(7);
    io::load_pretrained(m2, d.path);
    CHECK(max_abs_diff(y, run(m2, x)) < (std::is_same_v<T, float> ? 1e-6 : 1e-14));
    CHECK(m2.lin0.template adapter<Vera>("default").projections->max_in() == 6);
  };
  roundtrip(float{});
  roundtrip(double{});
}

// ---------------------------------------------------------------------------------------------
// Refusals

TEST_CASE("pretrained: AdaLoRA and VeRA saves PEFT could not rebuild are refused", "[pretrained_more]") {
  Net<float> m = make_net<float>();
  Generator g(3);
  VeraConfig v;
  v.r = 2;
  v.projections = VeraProjections<float>::random(2, 6, 5, 1);
  m.lin0.add_adapter("default", v, g);
  VeraConfig v_other = v;
  v_other.projections = VeraProjections<float>::random(2, 6, 5, 2);
  m.lin1.add_adapter("default", v_other, g);
  io::AdapterConfig c;
  c.method = v;
  TempDir d;
  require_throws_with<ConfigError>([&] { io::save_pretrained(m, d.path, "default", c); }, {"'lin0' and 'lin1'", "two different VeraProjections"});
  m.lin1.delete_adapter("default");
  v.save_projection = false;
  c.method = v;
  require_throws_with<ConfigError>([&] { io::save_pretrained(m, d.path, "default", c); }, {"save_projection = false", "PyTorch's generator"});
  v.save_projection = true;
  v.r = 3;
  c.method = v;
  require_throws_with<ConfigError>([&] { io::save_pretrained(m, d.path, "default", c); }, {"layer 'lin0'", "r = 2 but the config gives 3"});
  AdaLoraConfig a;
  a.total_step = 5;
  c.method = a;
  require_throws_with<ConfigError>([&] { io::save_pretrained(m, d.path, "default", c); }, {"kind vera", "peft_type is ADALORA"});
  m.lin1.add_adapter("ada", a, g);
  AdaLoraConfig a2 = a;
  a2.init_r = 6;
  a2.target_r = 2;
  c.method = a2;
  require_throws_with<ConfigError>([&] { io::save_pretrained(m, d.path, "ada", c); }, {"layer 'lin1'", "init_r = 12 (ranknum) but the config gives 6"});
  a2 = a;
  a2.lora_alpha = 2;
  c.method = a2;
  require_throws_with<ConfigError>([&] { io::save_pretrained(m, d.path, "ada", c); }, {"lora_alpha = 8 but the config gives 2"});
  // modules to save that are adapted layers, or whose keys the adapter already writes
  c.method = a;
  require_throws_with<ConfigError>([&] { io::save_pretrained(m, d.path, "ada", c, std::vector{io::module_to_save("lin1", m.lin1.base())}); },
                                   {"module to save 'lin1' is a layer that holds the adapter"});
  c.bias = io::BiasMode::all;  // also writes base_model.model.lin0.bias (an adapted layer without "ada")
  io::ModuleToSave<float> clash{"lin0", {}};
  clash.add("bias", m.lin0.base().bias(), {5});
  require_throws_with<ConfigError>([&] { io::save_pretrained(m, d.path, "ada", c, std::vector{clash}); }, {"'base_model.model.lin0.bias'", "already holds"});
  require_throws_with<ShapeError>([&] { io::ModuleToSave<float>{"x", {}}.add("weight", m.head.weight(), {4, 4}); }, {"'x'", "'weight'", "[4, 4]", "[3, 4]"});
  CHECK(fs::is_empty(d.path));
}

TEST_CASE("pretrained: hostile AdaLoRA and VeRA checkpoints are rejected precisely", "[pretrained_more][hostile]") {
  CaptureWarnings w;
  const std::string ada = golden() + "/adalora/adapter", ver = golden() + "/vera/adapter";
  st::File ada_w(ada + "/adapter_model.safetensors"), ver_w(ver + "/adapter_model.safetensors");
  const std::string ada_cfg = read_text(ada + "/adapter_config.json"), ver_cfg = read_text(ver + "/adapter_config.json");
  json ada_j = json::parse(ada_cfg), ver_j = json::parse(ver_cfg);
  Net<float> n = make_net<float>();
  auto unchanged = [&] {
    CHECK(!n.lin0.has_adapter("default"));
    CHECK(!n.lin1.has_adapter("default"));
  };

  SECTION("AdaLoRA: a rank_pattern that keeps another rank than the tensors have") {
    TempDir d;
    json j = ada_j;
    auto& rp = j.at("rank_pattern");
    for (auto it = rp.begin(); it != rp.end(); ++it) *it = json::array({true, true, true, true});
    make_dir(d.path, j.dump(), ada_w);
    require_throws_with<ShapeError>([&] { io::load_pretrained(n, d.path); }, {"adapter_model.safetensors", ".lora_A' has shape [", "the model expects [4, "});
    unchanged();
  }
  SECTION("AdaLoRA: lora_E flattened to 1-D") {
    TempDir d;
    make_dir(d.path, ada_cfg, ada_w, [](auto& refs, auto&) {
      for (auto& r : refs)
        if (r.name == "base_model.model.lin1.lora_E") r.shape = {r.shape[0]};
    });
    require_throws_with<ShapeError>([&] { io::load_pretrained(n, d.path); }, {"'base_model.model.lin1.lora_E' has shape [", "the model expects [", ", 1]"});
    unchanged();
  }
  SECTION("AdaLoRA: a missing lora_B") {
    TempDir d;
    make_dir(d.path, ada_cfg, ada_w, [](auto& refs, auto&) { drop(refs, "base_model.model.lin0.lora_B"); });
    require_throws_with<FormatError>([&] { io::load_pretrained(n, d.path); }, {"missing keys 'base_model.model.lin0.lora_B'"});
    unchanged();
  }
  SECTION("AdaLoRA: an old checkpoint with ranknum") {
    TempDir d;
    make_dir(d.path, ada_cfg, ada_w, [](auto& refs, auto& store) {
      store.push_back({2.0f});
      refs.emplace_back("base_model.model.lin0.ranknum", ConstMatrixView<float>(store.back().data(), 1, 1), std::vector<std::uint64_t>{1});
    });
    auto res = io::load_pretrained(n, d.path);
    CHECK(res.unexpected_keys.empty());
    const auto& a = n.lin0.adapter<AdaLora>("default");
    CHECK(a.ranknum == 2.0);
    CHECK(a.factor == float(6.0f / (2.0f + 1e-5f)));
    CHECK(n.lin1.adapter<AdaLora>("default").ranknum == 4.0);
  }
  SECTION("wrong peft_type: LoRA tensors under an ADALORA config") {
    TempDir d;
    st::File lora(golden() + "/lora/adapter/adapter_model.safetensors");
    make_dir(d.path, ada_cfg, lora);
    CHECK_THROWS_AS(io::load_pretrained(n, d.path), FormatError);
    try {
      io::load_pretrained(n, d.path);
    } catch (const FormatError& e) {
      const std::string m = e.what();
      CAPTURE(m);
      CHECK(m.find("missing keys 'base_model.model.lin0.lora_A'") != std::string::npos);
      CHECK(m.find("unexpected keys") != std::string::npos);
      CHECK(m.find("lora_A.weight'") != std::string::npos);
    }
    unchanged();
  }
  SECTION("wrong peft_type: a model without the kind") {
    struct OnlyLora {
      Adapted<Linear<float>, Lora> lin0;
    };
    Generator g(1);
    OnlyLora o{Adapted<Linear<float>, Lora>(Linear<float>(6, 5, true, g), "lin0")};
    require_throws_with<ConfigError>([&] { io::load_pretrained(o, ada); }, {"ADALORA adapter 'default' targets layer 'lin0'", "no adapter kind for it"});
    require_throws_with<ConfigError>([&] { io::load_pretrained(o, ver); }, {"VERA adapter", "no adapter kind for it"});
    CHECK(!o.lin0.has_adapter("default"));
  }
  SECTION("VeRA: projections of another rank than the config") {
    TempDir d;
    json j = ver_j;
    j["r"] = 2;
    make_dir(d.path, j.dump(), ver_w);
    require_throws_with<ShapeError>([&] { io::load_pretrained(n, d.path, "default", head_of(n)); },
                                    {"tensor 'base_model.vera_A' has shape [3, 6]", "r = 2"});
    unchanged();
  }
  SECTION("VeRA: projections too small for a layer") {
    TempDir d;
    make_dir(d.path, ver_cfg, ver_w, [](auto& refs, auto& store) {
      drop(refs, "base_model.vera_A");
      store.push_back(std::vector<float>(12, 0.1f));
      refs.emplace_back("base_model.vera_A", ConstMatrixView<float>(store.back().data(), 3, 4));
    });
    require_throws_with<ShapeError>([&] { io::load_pretrained(n, d.path, "default", head_of(n)); },
                                    {"the VeRA projections are [r, 4] and [5, r]", "layer 'lin0' has 6 inputs"});
    unchanged();
  }
  SECTION("VeRA: a lambda of the wrong length") {
    TempDir d;
    make_dir(d.path, ver_cfg, ver_w, [](auto& refs, auto& store) {
      drop(refs, "base_model.model.lin1.vera_lambda_b");
      store.push_back(std::vector<float>(5, 0.1f));
      refs.emplace_back("base_model.model.lin1.vera_lambda_b", ConstMatrixView<float>(store.back().data(), 1, 5), std::vector<std::uint64_t>{5});
    });
    require_throws_with<ShapeError>([&] { io::load_pretrained(n, d.path, "default", head_of(n)); },
                                    {"'base_model.model.lin1.vera_lambda_b' has shape [5], the model expects [4]"});
    unchanged();
  }
  SECTION("a module to save whose shape does not fit") {
    struct Wide {
      ALin<float> lin0, lin1;
      Linear<float> head;
    };
    Generator g(1);
    Wide wd{ALin<float>(Linear<float>(6, 5, true, g), "lin0"), ALin<float>(Linear<float>(5, 4, true, g), "lin1"), Linear<float>(4, 2, true, g)};
    require_throws_with<ShapeError>([&] { io::load_pretrained(wd, ver, "default", std::vector{io::module_to_save("head", wd.head)}); },
                                    {"'base_model.model.head.weight' has shape [3, 4], the model expects [2, 4]"});
    CHECK(!wd.lin0.has_adapter("default"));
  }
}

// ---------------------------------------------------------------------------------------------
// C++ -> PEFT (optional ctest label `python`): adapters written by peft++ for check_cpp_checkpoints_more.py

namespace {
/// Three normalised gradient steps (largest change 0.02 per tensor) of every trainable parameter whose name
/// contains `tag`, on the loss <gm, y> for a fixed random gm; the head is trained too when `head` is set.
void train_steps(Net<float>& n, const Mat<float>& x, const std::string& tag, bool head) {
  const Index b = x.rows();
  Generator g(77);
  Mat<float> gm(b, 3);
  g.normal(gm.data(), std::size_t(gm.size()), 0.0, 1.0);
  n.head.set_requires_grad(head);
  std::size_t moved = 0;
  for (int step = 0; step < 3; ++step) {
    Mat<float> h0(b, 5), r0(b, 5), h1(b, 4), r1(b, 4), y(b, 3), dr1(b, 4), dr0(b, 5);
    auto c0 = n.lin0.make_context(b);
    n.lin0.forward(c0, x, h0);
    r0 = h0.cwiseMax(0.0f);
    auto c1 = n.lin1.make_context(b);
    n.lin1.forward(c1, r0, h1);
    r1 = h1.cwiseMax(0.0f);
    auto ch = n.head.make_context(b);
    n.head.forward(ch, r1, y);
    n.head.backward(ch, gm, dr1, GradMode::overwrite);
    dr1 = (h1.array() > 0.0f).select(dr1, 0.0f);
    n.lin1.backward(c1, dr1, dr0, GradMode::overwrite);
    dr0 = (h0.array() > 0.0f).select(dr0, 0.0f);
    n.lin0.backward(c0, dr0, MatrixView<float>{}, GradMode::overwrite);
    for (auto& p : parameters<float>(n))
      if ((p.name.find(tag) != std::string::npos || (head && p.name.rfind("2.", 0) == 0)) && p.trainable && p.grad) {
        float gmax = 0.0f;
        for (std::size_t i = 0; i < p.size; ++i) gmax = std::max(gmax, std::fabs(p.grad[i]));
        if (gmax == 0.0f || !std::isfinite(gmax)) continue;
        for (std::size_t i = 0; i < p.size; ++i) p.value[i] -= 0.02f * p.grad[i] / gmax;
        ++moved;
      }
  }
  CHECK(moved > 0);
  n.head.set_requires_grad(false);
}

void export_case(const fs::path& d, Net<float>& n, const Mat<float>& x, const std::string& base_file) {
  const Mat<float> y = run(n, x);
  fs::create_directories(d);
  fs::copy_file(base_file, d / "base.safetensors", fs::copy_options::overwrite_existing);
  merge_adapters(n);
  st::write(d / "merged.safetensors", {{"lin0.weight", ConstMatrixView<float>(n.lin0.base().weight())},
                                       {"lin1.weight", ConstMatrixView<float>(n.lin1.base().weight())},
                                       {"head.weight", ConstMatrixView<float>(n.head.weight())},
                                       {"lin0.bias", ConstMatrixView<float>(n.lin0.base().bias()), {5}},
                                       {"lin1.bias", ConstMatrixView<float>(n.lin1.base().bias()), {4}},
                                       {"head.bias", ConstMatrixView<float>(n.head.bias()), {3}}});
  json j;
  j["x"] = std::vector<float>(x.data(), x.data() + x.size());
  j["x_shape"] = {x.rows(), x.cols()};
  j["y"] = std::vector<float>(y.data(), y.data() + y.size());
  write_text(d / "cpp_outputs.json", j.dump());
}
}  // namespace

TEST_CASE("pretrained: export C++-written AdaLoRA and VeRA adapters for PEFT", "[.export]") {
  const char* out = std::getenv("PEFT_PRETRAINED_EXPORT_DIR");
  REQUIRE(out);
  const fs::path root(out);
  for (const std::string cs : {"adalora", "vera"}) {
    CAPTURE(cs);
    const std::string dir = golden() + "/" + cs;
    const json ref = json::parse(read_text(dir + "/reference.json"));
    const Mat<float> x = ref_tensor<float>(ref, "x");
    st::File base(dir + "/base.safetensors");
    Net<float> n = make_net(base);
    const bool vera = cs == "vera";
    auto res = vera ? io::load_pretrained(n, dir + "/adapter", "cpp", head_of(n)) : io::load_pretrained(n, dir + "/adapter", "cpp");
    Generator g(99);
    for (auto& p : parameters<float>(n))
      if (p.name.find(".cpp") != std::string::npos) {
        std::vector<float> noise(p.size);
        g.normal(noise.data(), noise.size(), 0.0, 0.2);
        for (std::size_t i = 0; i < p.size; ++i) p.value[i] += noise[i];
      }
    eval(n);
    train_steps(n, x, ".cpp", vera);
    if (vera) io::save_pretrained(n, root / cs / "adapter", "cpp", res.config, head_of(n));
    else io::save_pretrained(n, root / cs / "adapter", "cpp", res.config);
    export_case(root / cs, n, x, dir + "/base.safetensors");
  }
  // written from scratch in C++: AdaLoRA at init_r truncated on save by a rank_pattern (with a head), VeRA with
  // peft++'s own projections, larger than the layers need (saved at PEFT's size)
  {
    const std::string dir = golden() + "/adalora";
    st::File base(dir + "/base.safetensors");
    Net<float> n = make_net(base);
    const Mat<float> x = random_mat<float>(4, 6, 8);
    AdaLoraConfig c;
    c.init_r = 5;
    c.target_r = 2;
    c.total_step = 50;
    c.lora_alpha = 4;
    Generator g(5);
    n.lin0.add_adapter("default", c, g);
    n.lin1.add_adapter("default", c, g);
    for (auto& p : parameters<float>(n))
      if (p.name.find(".default") != std::string::npos) g.uniform(p.value, p.size, -0.6, 0.6);
    c.rank_pattern = {{"lin0", {true, true, false, true, false}}, {"lin1", {false, true, false, false, true}}};
    for (auto* l : {&n.lin0, &n.lin1}) {
      auto& a = l->adapter<AdaLora>("default");
      const auto& keep = l->module_path() == "lin0" ? c.rank_pattern[0].second : c.rank_pattern[1].second;
      for (int i = 0; i < 5; ++i)
        if (!keep[std::size_t(i)]) a.e[std::size_t(i)] = 0.0f;
    }
    g.uniform(n.head.weight().data, std::size_t(n.head.weight().size()), -1.0, 1.0);
    io::AdapterConfig cfg;
    cfg.method = c;
    io::save_pretrained(n, root / "adalora_truncated" / "adapter", "default", cfg, head_of(n));
    export_case(root / "adalora_truncated", n, x, dir + "/base.safetensors");
  }
  {
    const std::string dir = golden() + "/vera";
    st::File base(dir + "/base.safetensors");
    Net<float> n = make_net(base);
    const Mat<float> x = random_mat<float>(4, 6, 9);
    VeraConfig c;
    c.r = 5;
    c.projections = VeraProjections<float>::random(5, 11, 7, 3);
    Generator g(6);
    n.lin0.add_adapter("default", c, g);
    n.lin1.add_adapter("default", c, g);
    for (auto& p : parameters<float>(n))
      if (p.name.find("vera_lambda") != std::string::npos) g.uniform(p.value, p.size, -0.9, 0.9);
    io::AdapterConfig cfg;
    cfg.method = c;
    cfg.target_modules = io::ModuleSelector::list({"lin0", "lin1"});
    io::save_pretrained(n, root / "vera_cpp_projections" / "adapter", "default", cfg);
    export_case(root / "vera_cpp_projections", n, x, dir + "/base.safetensors");
  }
}
