// Prompt-learning checkpoints (PROMPT_TUNING, P_TUNING, PREFIX_TUNING, MULTITASK_PROMPT_TUNING) against the
// golden files real PEFT 0.21.2 wrote (tests/reference/gen_prompt_checkpoints.py): load them and compare the
// prompts / prefixes with what PeftModel.from_pretrained produced, save the same trainable modules from C++
// and compare with PEFT's adapter_model.safetensors, round-trip the configs, and reject bad files precisely.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <peft/io/prompt_checkpoint.hpp>
#include <string>
#include <vector>

#include "io_test_util.hpp"

using namespace peft;
using namespace peft::test;
namespace fs = std::filesystem;
namespace st = peft::safetensors;
using nlohmann::json;

namespace {

fs::path case_dir(const std::string& name) { return fs::path(golden_checkpoints()) / ("prompt_" + name); }

template <class T>
double max_diff(ConstMatrixView<T> a, const st::File& f, const std::string& name) {
  const auto& info = f.info(name);
  REQUIRE(info.numel() == std::uint64_t(a.rows * a.cols));
  std::vector<double> ref(std::size_t(info.numel()));
  f.read_as<double>(name, ref);
  double m = 0;
  for (Index i = 0; i < a.rows; ++i)
    for (Index k = 0; k < a.cols; ++k) m = std::max(m, std::fabs(double(a(i, k)) - ref[std::size_t(i * a.cols + k)]));
  return m;
}

json peft_json(const fs::path& dir) {
  json j = json::parse(read_text(dir / "adapter_config.json"));
  j.erase("peft_version");  // PEFT's own version: peft++ does not write it
  return j;
}

/// Copies params.safetensors (PEFT's trainable prompt-encoder parameters) into `m` by name.
template <class Module>
void copy_params(Module& m, const fs::path& dir) {
  const st::File f(dir / "params.safetensors");
  int n = 0;
  m.visit_parameters([&](auto p) {
    INFO("parameter " << p.name);
    REQUIRE(f.contains(p.name));
    REQUIRE(f.info(p.name).numel() == std::uint64_t(p.size));
    std::vector<float> v(p.size);
    f.read_as<float>(p.name, v);
    for (std::size_t i = 0; i < p.size; ++i) p.value[i] = v[i];
    ++n;
  });
  CHECK(std::size_t(n) == f.names().size());
}

/// C++ save of `m` equals PEFT's file: same tensor names, shapes, dtype F32 and values within `tol`.
template <class Module>
void check_saved_like_peft(const Module& m, const fs::path& peft_dir, io::PromptAdapterConfig cfg, double tol) {
  TempDir tmp("peft_prompt_ckpt");
  io::save_prompt_pretrained(m, tmp.path, cfg, /*sync=*/false);
  const st::File ours(tmp / "adapter_model.safetensors"), theirs(peft_dir / "adapter_model.safetensors");
  REQUIRE(ours.names() == theirs.names());
  for (const auto& n : ours.names()) {
    INFO("tensor " << n);
    CHECK(ours.info(n).shape == theirs.info(n).shape);
    CHECK(ours.info(n).dtype == theirs.info(n).dtype);
    std::vector<double> a(std::size_t(ours.info(n).numel())), b(a.size());
    ours.read_as<double>(n, a);
    theirs.read_as<double>(n, b);
    double d = 0;
    for (std::size_t i = 0; i < a.size(); ++i) d = std::max(d, std::fabs(a[i] - b[i]));
    CHECK(d <= tol);
  }
  CHECK(ours.metadata().at("format") == "pt");
  // the config C++ writes is PEFT's, key for key
  CHECK(json::parse(read_text(tmp / "adapter_config.json")) == peft_json(peft_dir));
}

template <class C>
C trainable_config(const fs::path& dir) {
  C c = io::read_prompt_method_config<C>(dir);
  c.inference_mode = false;
  return c;
}

}  // namespace

TEST_CASE("prompt checkpoint: PEFT's prompt tuning loads and gives PEFT's prompt", "[prompt_checkpoint]") {
  const auto dir = case_dir("prompt_tuning");
  const st::File exp(dir / "expected.safetensors");
  auto m = io::load_prompt_tuning<float>(dir);
  CHECK(m.config().inference_mode);
  REQUIRE(m.num_virtual_tokens() == 4);
  REQUIRE(m.token_dim() == 16);
  auto ctx = m.make_context(1);
  std::vector<float> out(4 * 16);
  m.forward(ctx, 1, MatrixView<float>(out.data(), 4, 16));
  CHECK(max_diff<float>(ConstMatrixView<float>(out.data(), 4, 16), exp, "prompt") == 0.0);
  auto md = io::load_prompt_tuning<double>(dir);  // F32 file into a double module
  CHECK(max_diff<double>(md.weight(), exp, "prompt") == 0.0);
}

TEST_CASE("prompt checkpoint: PEFT's P-tuning (MLP and LSTM) loads and gives PEFT's prompt", "[prompt_checkpoint]") {
  for (const char* name : {"p_tuning_mlp", "p_tuning_lstm"}) {
    INFO(name);
    const auto dir = case_dir(name);
    const st::File exp(dir / "expected.safetensors");
    auto m = io::load_p_tuning<float>(dir);
    CHECK_FALSE(m.has_encoder());
    CHECK(m.is_lstm() == (std::string(name) == "p_tuning_lstm"));
    auto ctx = m.make_context(2);
    std::vector<float> out(2 * 3 * 16);
    m.forward(ctx, 2, MatrixView<float>(out.data(), 6, 16));
    CHECK(max_diff<float>(ConstMatrixView<float>(out.data(), 3, 16), exp, "prompt") == 0.0);
    CHECK(max_diff<float>(ConstMatrixView<float>(out.data() + 48, 3, 16), exp, "prompt") == 0.0);
  }
}

TEST_CASE("prompt checkpoint: PEFT's prefix tuning loads and gives PEFT's past keys and values", "[prompt_checkpoint]") {
  for (const char* name : {"prefix_tuning", "prefix_tuning_proj"}) {
    INFO(name);
    const auto dir = case_dir(name);
    const st::File exp(dir / "expected.safetensors");
    auto m = io::load_prefix_tuning<float>(dir);
    CHECK_FALSE(m.config().projects());
    CHECK(m.config().prefix_projection == (std::string(name) == "prefix_tuning_proj"));
    auto ctx = m.make_context(1);
    m.forward(ctx, 1);
    const auto past = m.past_key_values(ctx);
    REQUIRE(past.size() == 2);
    for (std::size_t l = 0; l < 2; ++l) {
      INFO("layer " << l);
      CHECK(past[l].past_len == 3);
      CHECK(max_diff<float>(past[l].key, exp, "past." + std::to_string(l) + ".key") <= 1e-7);
      CHECK(max_diff<float>(past[l].value, exp, "past." + std::to_string(l) + ".value") <= 1e-7);
    }
  }
}

TEST_CASE("prompt checkpoint: PEFT's multitask prompt tuning loads and gives PEFT's per-task prompts", "[prompt_checkpoint]") {
  const auto dir = case_dir("multitask_prompt_tuning");
  const st::File exp(dir / "expected.safetensors");
  auto m = io::load_multitask_prompt_tuning<float>(dir);
  REQUIRE(m.num_tasks() == 3);
  REQUIRE(m.num_ranks() == 2);
  auto ctx = m.make_context(3);
  const std::vector<std::int64_t> tasks{2, 0, 1};
  std::vector<float> out(3 * 3 * 16);
  m.forward(ctx, tasks, MatrixView<float>(out.data(), 9, 16));
  for (int b = 0; b < 3; ++b) {
    INFO("batch row " << b);
    CHECK(max_diff<float>(ConstMatrixView<float>(out.data() + b * 48, 3, 16), exp, "prompt.task" + std::to_string(tasks[std::size_t(b)])) <= 1e-6);
  }
}

TEST_CASE("prompt checkpoint: C++ save of PEFT's trainable modules equals PEFT's save_pretrained", "[prompt_checkpoint]") {
  Generator gen(5);
  SECTION("prompt tuning") {
    const auto dir = case_dir("prompt_tuning");
    io::PromptAdapterConfig full;
    (void)io::read_prompt_method_config<PromptTuningConfig>(dir, &full);
    PromptEmbedding<float> m(trainable_config<PromptTuningConfig>(dir), ConstMatrixView<float>{}, gen);
    copy_params(m, dir);
    check_saved_like_peft(m, dir, full, 0.0);
  }
  SECTION("P-tuning MLP and LSTM: the encoder's output is saved") {
    for (const char* name : {"p_tuning_mlp", "p_tuning_lstm"}) {
      INFO(name);
      const auto dir = case_dir(name);
      io::PromptAdapterConfig full;
      (void)io::read_prompt_method_config<PromptEncoderConfig>(dir, &full);
      PromptEncoder<float> m(trainable_config<PromptEncoderConfig>(dir), gen);
      REQUIRE(m.has_encoder());
      copy_params(m, dir);
      check_saved_like_peft(m, dir, full, 2e-6);
      // and the saved table differs from the encoder's input (the test would notice a table-only save)
      const st::File theirs(dir / "adapter_model.safetensors");
      CHECK(max_diff<float>(m.weight(), theirs, "prompt_embeddings") > 1e-2);
    }
  }
  SECTION("prefix tuning with and without projection") {
    for (const char* name : {"prefix_tuning", "prefix_tuning_proj"}) {
      INFO(name);
      const auto dir = case_dir(name);
      io::PromptAdapterConfig full;
      (void)io::read_prompt_method_config<PrefixTuningConfig>(dir, &full);
      PrefixEncoder<float> m(trainable_config<PrefixTuningConfig>(dir), gen);
      copy_params(m, dir);
      check_saved_like_peft(m, dir, full, 2e-6);
    }
  }
  SECTION("multitask prompt tuning") {
    const auto dir = case_dir("multitask_prompt_tuning");
    io::PromptAdapterConfig full;
    (void)io::read_prompt_method_config<MultitaskPromptTuningConfig>(dir, &full);
    MultitaskPromptEmbedding<float> m(trainable_config<MultitaskPromptTuningConfig>(dir), ConstMatrixView<float>{}, gen);
    copy_params(m, dir);
    check_saved_like_peft(m, dir, full, 0.0);
  }
}

TEST_CASE("prompt checkpoint: C++ save then load round trip (float and double)", "[prompt_checkpoint]") {
  Generator gen(11);
  TempDir tmp("peft_prompt_rt");
  MultitaskPromptTuningConfig c;
  c.num_virtual_tokens = 2;
  c.token_dim = 5;
  c.num_tasks = 2;
  c.num_ranks = 3;
  MultitaskPromptEmbedding<double> m(c, ConstMatrixView<double>{}, gen);
  io::save_prompt_pretrained(m, tmp.path, {}, false);
  CHECK(st::File(tmp / "adapter_model.safetensors").info("prefix_task_cols").dtype == st::Dtype::F64);
  auto back = io::load_multitask_prompt_tuning<double>(tmp.path);
  CHECK(back.weight().rows == 2);
  for (Index k = 0; k < 2; ++k) {
    auto a = m.task_cols(k), b = back.task_cols(k);
    auto ra = m.task_rows(k), rb = back.task_rows(k);
    for (Index i = 0; i < a.rows; ++i)
      for (Index j = 0; j < a.cols; ++j) CHECK(a(i, j) == b(i, j));
    for (Index i = 0; i < ra.rows; ++i)
      for (Index j = 0; j < ra.cols; ++j) CHECK(ra(i, j) == rb(i, j));
  }
  for (Index i = 0; i < 2; ++i)
    for (Index j = 0; j < 5; ++j) CHECK(m.weight()(i, j) == back.weight()(i, j));
}

TEST_CASE("prompt checkpoint: adapter_config.json round trip with PEFT's fields and defaults", "[prompt_checkpoint]") {
  for (const char* name : {"prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix_tuning", "prefix_tuning_proj", "multitask_prompt_tuning"}) {
    INFO(name);
    const auto dir = case_dir(name);
    CaptureWarnings w;
    const auto c = io::read_prompt_config(dir);
    CHECK(w.got.empty());
    CHECK(c.peft_version == std::optional<std::string>("0.21.2"));
    CHECK(c.task_type == std::optional<std::string>("CAUSAL_LM"));
    CHECK(io::to_json(c) == peft_json(dir));
    TempDir tmp("peft_prompt_cfg");
    io::write_prompt_config(tmp.path, c, false);
    CHECK(io::to_json(io::read_prompt_config(tmp.path)) == io::to_json(c));
  }
  const auto pt = io::read_prompt_config(case_dir("p_tuning_lstm"));
  const auto* e = pt.get_if<PromptEncoderConfig>();
  REQUIRE(e);
  CHECK(e->encoder_reparameterization_type == PromptEncoderReparameterizationType::lstm);
  CHECK(e->encoder_hidden_size == 4);
  CHECK(e->encoder_num_layers == 2);
  CHECK(e->num_virtual_tokens == 3);
  CHECK(e->token_dim == 16);
  const auto mpt = io::read_prompt_config(case_dir("multitask_prompt_tuning"));
  REQUIRE(mpt.get_if<MultitaskPromptTuningConfig>());
  CHECK(mpt.get_if<MultitaskPromptTuningConfig>()->num_tasks == 3);
  CHECK(mpt.num_layers == 2);
  CHECK(mpt.num_attention_heads == 2);

  SECTION("read_any_adapter_config dispatches on peft_type") {
    const auto any = io::read_any_adapter_config(case_dir("prefix_tuning"));
    REQUIRE(std::holds_alternative<io::PromptAdapterConfig>(any));
    CHECK(std::get<io::PromptAdapterConfig>(any).peft_type() == std::string("PREFIX_TUNING"));
    TempDir tmp("peft_prompt_any");
    write_text(tmp / "adapter_config.json", R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"]})");
    const auto lora = io::read_any_adapter_config(tmp.path);
    REQUIRE(std::holds_alternative<io::AdapterConfig>(lora));
    CHECK(std::get<io::AdapterConfig>(lora).peft_type() == std::string("LORA"));
  }
  SECTION("missing keys take PEFT's defaults") {
    const auto c = io::parse_prompt_config(R"({"peft_type": "P_TUNING", "num_virtual_tokens": 4, "token_dim": 8})");
    const auto& p = std::get<PromptEncoderConfig>(c.method);
    CHECK(p.encoder_reparameterization_type == PromptEncoderReparameterizationType::mlp);
    CHECK(p.encoder_num_layers == 2);
    CHECK(p.encoder_dropout == 0.0);
    CHECK(p.hidden() == 8);
    CHECK(p.num_transformer_submodules == 1);
    const auto m = io::parse_prompt_config(R"({"peft_type": "MULTITASK_PROMPT_TUNING", "num_virtual_tokens": 4, "token_dim": 8})");
    const auto& q = std::get<MultitaskPromptTuningConfig>(m.method);
    CHECK(q.num_tasks == 1);
    CHECK(q.num_ranks == 1);
    CHECK(q.prompt_tuning_init == MultitaskPromptTuningInit::random);
    const auto t = io::parse_prompt_config(R"({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "prompt_tuning_init": "TEXT",
                                               "prompt_tuning_init_text": "hello", "tokenizer_name_or_path": "gpt2"})");
    CHECK(std::get<PromptTuningConfig>(t.method).prompt_tuning_init == PromptTuningInit::text);
    CHECK(std::get<PromptTuningConfig>(t.method).prompt_tuning_init_text == "hello");
    CHECK(t.tokenizer_name_or_path == std::optional<std::string>("gpt2"));
  }
  SECTION("unknown keys give a warning") {
    CaptureWarnings w;
    (void)io::parse_prompt_config(R"({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "token_dim": 8, "frobnicate": 1})", "cfg.json");
    REQUIRE(w.got.size() == 1);
    CHECK(w.got[0].find("frobnicate") != std::string::npos);
  }
}

TEST_CASE("prompt checkpoint: bad input gives precise errors", "[prompt_checkpoint]") {
  TempDir tmp("peft_prompt_bad");
  const auto copy_case = [&](const std::string& name) {
    const fs::path d = tmp / name;
    fs::create_directories(d);
    fs::copy_file(case_dir(name) / "adapter_config.json", d / "adapter_config.json");
    fs::copy_file(case_dir(name) / "adapter_model.safetensors", d / "adapter_model.safetensors");
    return d;
  };
  SECTION("wrong peft_type for the loader") {
    require_throws_with<FormatError>([&] { (void)io::load_p_tuning<float>(case_dir("prompt_tuning")); },
                                     {"adapter_config.json", "peft_type", "\"PROMPT_TUNING\"", "expected \"P_TUNING\""});
    require_throws_with<FormatError>([&] { (void)io::parse_prompt_config(R"({"peft_type": "LORA", "r": 8})", "x.json"); },
                                     {"x.json", "peft_type", "\"LORA\" is not a prompt-learning method"});
    require_throws_with<FormatError>([&] { (void)io::parse_prompt_config(R"({"num_virtual_tokens": 3})", "x.json"); }, {"x.json", "'peft_type' is missing"});
  }
  SECTION("wrong values and types in the config") {
    require_throws_with<FormatError>(
        [&] { (void)io::parse_prompt_config(R"({"peft_type": "P_TUNING", "num_virtual_tokens": 3, "token_dim": 8, "encoder_reparameterization_type": "GRU"})", "x.json"); },
        {"x.json", "encoder_reparameterization_type", "\"GRU\"", "\"MLP\", \"LSTM\""});
    require_throws_with<FormatError>(
        [&] { (void)io::parse_prompt_config(R"({"peft_type": "MULTITASK_PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 8, "num_tasks": "three"})", "x.json"); },
        {"x.json", "num_tasks", "\"three\""});
    require_throws_with<FormatError>([&] { (void)io::parse_prompt_config(R"({"peft_type": "PROMPT_TUNING", "token_dim": 8})", "x.json"); },
                                     {"x.json", "num_virtual_tokens must be positive"});
    require_throws_with<FormatError>(
        [&] { (void)io::parse_prompt_config(R"({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "token_dim": 8, "num_layers": 2, "num_attention_heads": 3})", "x.json"); },
        {"x.json", "token_dim 8 is not a multiple of num_attention_heads 3"});
    require_throws_with<FormatError>(
        [&] { (void)io::parse_prompt_config(R"({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "token_dim": 8, "num_layers": 2, "num_attention_heads": 2, "init_weights": "gaussian"})", "x.json"); },
        {"x.json", "init_weights", "\"gaussian\""});
    require_throws_with<FormatError>([&] { (void)io::parse_prompt_config("{not json", "x.json"); }, {"x.json", "not valid JSON"});
  }
  SECTION("a tensor of the wrong shape") {
    const auto d = copy_case("prompt_tuning");
    std::vector<float> v(5 * 16, 0.5f);
    st::write(d / "adapter_model.safetensors", {st::TensorRef("prompt_embeddings", ConstMatrixView<float>(v.data(), 5, 16))});
    require_throws_with<ShapeError>([&] { (void)io::load_prompt_tuning<float>(d); },
                                    {"adapter_model.safetensors", "'prompt_embeddings'", "[5, 16]", "expects [4, 16]"});
  }
  SECTION("a missing tensor and an unexpected one") {
    const auto d = copy_case("multitask_prompt_tuning");
    const st::File src(case_dir("multitask_prompt_tuning") / "adapter_model.safetensors");
    st::write(d / "adapter_model.safetensors", {src.ref("prompt_embeddings"), src.ref("prefix_task_cols")});
    require_throws_with<FormatError>([&] { (void)io::load_multitask_prompt_tuning<float>(d); },
                                     {"adapter_model.safetensors", "'prefix_task_rows' is missing", "MULTITASK_PROMPT_TUNING"});
    const auto e = copy_case("p_tuning_mlp");
    const st::File src2(case_dir("p_tuning_mlp") / "adapter_model.safetensors");
    std::vector<float> extra(4, 1.f);
    st::write(e / "adapter_model.safetensors", {src2.ref("prompt_embeddings"), st::TensorRef("mlp_head.0.weight", ConstMatrixView<float>(extra.data(), 2, 2))});
    require_throws_with<FormatError>([&] { (void)io::load_p_tuning<float>(e); }, {"unexpected tensor 'mlp_head.0.weight'", "P_TUNING"});
  }
  SECTION("task factors of the wrong shape") {
    const auto d = copy_case("multitask_prompt_tuning");
    const st::File src(case_dir("multitask_prompt_tuning") / "adapter_model.safetensors");
    std::vector<float> rows(2 * 2 * 16, 0.f);
    st::write(d / "adapter_model.safetensors",
              {src.ref("prompt_embeddings"), src.ref("prefix_task_cols"),
               st::TensorRef("prefix_task_rows", ConstMatrixView<float>(rows.data(), 4, 16), {2, 2, 16})});
    require_throws_with<ShapeError>([&] { (void)io::load_multitask_prompt_tuning<float>(d); }, {"'prefix_task_rows'", "[2, 2, 16]", "expects [3, 2, 16]"});
  }
  SECTION("a trainable encoder cannot take the saved encoder output") {
    Generator gen(1);
    PromptEncoder<float> m(trainable_config<PromptEncoderConfig>(case_dir("p_tuning_mlp")), gen);
    require_throws_with<ConfigError>([&] { io::load_prompt_weights(m, case_dir("p_tuning_mlp")); }, {"inference_mode = true"});
  }
}
