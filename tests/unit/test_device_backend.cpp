// The layers and adapters on a backend whose memory host code cannot touch (OffHost, tests/support): every
// weight adapter on Linear, Conv2d and Embedding, forward, backward, merge and unmerge, against the CPU
// backend bit for bit. A host access to a parameter or context buffer — the mistake that would break the
// CUDA backend at run time — faults here on any machine. The CUDA kernels' own index arithmetic is checked
// in test_conv2d (im2col/col2im); the kernels themselves need a GPU (tests/cuda). Also here: the 16-bit storage
// types' conversions (peft/half.hpp) against a brute-force nearest-value reference.
#include <algorithm>
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <peft/half.hpp>
#include <fstream>
#include <iterator>
#include <peft/io/pretrained.hpp>
#include <peft/io/prompt_checkpoint.hpp>

#include "backend_parity.hpp"
#include "io_test_util.hpp"
#include "off_host_backend.hpp"

using namespace peft;
using peft::test::OffHost;

TEST_CASE("off-host backend: tagged pointers round-trip and views keep their shape", "[device]") {
  test::OffHostBuffer<double> b(12);
  auto v = b.view(3, 4);
  CHECK(v.rows == 3);
  CHECK(v.cols == 4);
  CHECK(test::off_host(v.data) != nullptr);
  CHECK(reinterpret_cast<std::uintptr_t>(v.data) & test::kOffHostTag);  // not a host address
  const test::Mat<double> h = test::random_mat<double>(3, 4, 1);
  OffHost::upload<double>(h, v);
  test::Mat<double> back(3, 4);
  OffHost::download<double>(v, back);
  CHECK(test::max_abs_diff(back, h) == 0.0);
  CHECK(test::off_host<double>(nullptr) == nullptr);
}

TEST_CASE("off-host backend: Linear adapters equal the CPU backend's bit for bit", "[device]") {
  test::parity::linear_cases<OffHost, double>(0.0);
}

TEST_CASE("off-host backend: Conv2d adapters equal the CPU backend's bit for bit", "[device]") {
  test::parity::conv_cases<OffHost, double>(0.0);
}

TEST_CASE("off-host backend: Embedding adapters equal the CPU backend's bit for bit", "[device]") {
  test::parity::embedding_cases<OffHost, double>(0.0);
}

TEST_CASE("off-host backend: prompt-learning modules equal the CPU backend's bit for bit", "[device][prompt]") {
  test::parity::prompt_cases<OffHost, double>(0.0);
}

// ---- the 16-bit storage types (peft/half.hpp) -----------------------------------------------------------------

namespace {
/// The reference rounding: the nearest of all finite values of the type (found by bisection over the sorted
/// table), ties to the even bit pattern; past the largest finite value, infinity counts as the next value
/// (2^128 for bf16, 2^16 for half), as IEEE round-to-nearest does.
template <class H>
std::uint16_t nearest_bits(float f) {
  static const std::vector<std::pair<double, std::uint16_t>> table = [] {
    std::vector<std::pair<double, std::uint16_t>> t;
    const std::uint16_t inf = std::is_same_v<H, bf16> ? 0x7f80 : 0x7c00;
    for (std::uint32_t b = 0; b < inf; ++b) t.emplace_back(double(float(H::from_bits(std::uint16_t(b)))), std::uint16_t(b));
    t.emplace_back(std::is_same_v<H, bf16> ? std::ldexp(1.0, 128) : 65536.0, inf);
    return t;  // positive values, increasing with the bits
  }();
  const double a = std::abs(double(f));
  const std::uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (a >= table.back().first) return sign | table.back().second;
  const auto hi = std::lower_bound(table.begin(), table.end(), std::make_pair(a, std::uint16_t(0)));
  if (hi->first == a) return sign | hi->second;
  const auto lo = hi - 1;
  const double dl = a - lo->first, dh = hi->first - a;
  if (dl < dh) return sign | lo->second;
  if (dh < dl) return sign | hi->second;
  return sign | ((lo->second & 1) ? hi->second : lo->second);  // a tie: the even pattern
}

template <class H>
void check_rounding() {
  const std::uint16_t inf = std::is_same_v<H, bf16> ? 0x7f80 : 0x7c00;
  std::size_t mismatches = 0;
  // every finite pattern survives a round trip; every midpoint between neighbours rounds to the even one
  for (std::uint32_t b = 0; b < inf; ++b) {
    const float v = float(H::from_bits(std::uint16_t(b)));
    mismatches += H(v).bits != b;
    mismatches += H(-v).bits != (b | 0x8000u);
    if (b + 1 < inf) {
      const float mid = float((double(v) + double(float(H::from_bits(std::uint16_t(b + 1))))) / 2);
      mismatches += H(mid).bits != ((b & 1) ? b + 1 : b);
    }
  }
  CHECK(mismatches == 0);
  // random float bit patterns (every exponent, subnormals included) against the reference
  Generator g(5);
  std::vector<double> u(200000);
  g.uniform(u.data(), u.size(), 0.0, 4294967296.0);
  mismatches = 0;
  std::size_t nan_in = 0, nan_out = 0;
  for (double x : u) {
    const float f = std::bit_cast<float>(std::uint32_t(x));
    if (std::isnan(f)) {  // a NaN stays a NaN
      ++nan_in;
      nan_out += std::isnan(float(H(f)));
      continue;
    }
    mismatches += H(f).bits != nearest_bits<H>(f);
  }
  CHECK(mismatches == 0);
  CHECK(nan_in > 0);
  CHECK(nan_out == nan_in);
  CHECK(std::isinf(float(H::from_bits(inf))));
  CHECK(std::isnan(float(H(std::numeric_limits<float>::quiet_NaN()))));
}
}  // namespace

TEST_CASE("16-bit storage types: conversions from float round to nearest even", "[device][half]") {
  SECTION("bf16") { check_rounding<bf16>(); }
  SECTION("half") { check_rounding<half>(); }
  CHECK(bf16(1.0f).bits == 0x3f80);
  CHECK(half(1.0f).bits == 0x3c00);
  CHECK(half(65504.0f).bits == 0x7bff);
  CHECK(half(65519.0f).bits == 0x7bff);
  CHECK(half(65520.0f).bits == 0x7c00);                // halfway to 2^16: ties to even, infinity
  CHECK(half(std::ldexp(1.0f, -24)).bits == 0x0001);   // the smallest subnormal
  CHECK(half(std::ldexp(1.0f, -25)).bits == 0x0000);   // half of it: ties to even, zero
  CHECK(half(std::ldexp(3.0f, -26)).bits == 0x0001);   // three quarters of it
  CHECK(float(half::from_bits(0x0001)) == std::ldexp(1.0f, -24));
  CHECK(float(bf16(3.0)) == 3.0f);
  bf16 x = 1.5f;
  x *= 2.0f;
  x += 1.0f;
  CHECK(float(x) == 4.0f);
}

TEST_CASE("off-host backend: the transformer decoder equals the CPU backend's bit for bit", "[device][nn]") {
  test::parity::decoder_cases<OffHost, double>(0.0);
}

TEST_CASE("off-host backend: loss, gradient clipping and optimizers equal the CPU backend's bit for bit", "[device][train]") {
  test::parity::training_cases<OffHost, double>(0.0, true);
}

TEST_CASE("off-host backend: 16-bit parameters train through fp32 master weights in backend memory, as on the CPU", "[device][train][mixed]") {
  // AdamW and SGD over bf16 parameters: the float state and the masters live in backend memory; the
  // parameters (one of them zero from the start) equal the CPU optimizer's bit for bit, a write made outside
  // the optimizer included.
  const std::size_t n = 5;
  test::OffHostBuffer<bf16> w(n), g(n);
  std::vector<bf16> wc(n), gc(n);
  bf16* wh = test::off_host(w.data());  // the test's own look at the backend memory
  bf16* gh = test::off_host(g.data());
  for (std::size_t i = 0; i < n; ++i) wh[i] = wc[i] = bf16(0.5 * double(i) - 1.0);  // element 2 is zero
  const std::vector<ParamRef<bf16>> pd{{"w", w.data(), g.data(), n, true, false}}, pc{{"w", wc.data(), gc.data(), n, true, true}};
  AdamW<bf16, OffHost> ad(pd, {.lr = 1e-3, .amsgrad = true});
  AdamW<bf16> ac(pc, {.lr = 1e-3, .amsgrad = true});
  SGD<bf16, OffHost> sd(pd, {.lr = 1e-3, .momentum = 0.9});
  SGD<bf16> sc(pc, {.lr = 1e-3, .momentum = 0.9});
  for (int step = 0; step < 12; ++step) {
    for (std::size_t i = 0; i < n; ++i) gh[i] = gc[i] = bf16(std::cos(double(step + 3 * int(i))));
    if (step == 6) wh[1] = wc[1] = bf16(4.0);
    ad.step();
    ac.step();
    sd.step();
    sc.step();
    for (std::size_t i = 0; i < n; ++i) {
      INFO("step " << step << ", element " << i);
      REQUIRE(wh[i].bits == wc[i].bits);
    }
  }
  CHECK(float(wc[1]) > 3.9f);  // the outside write was taken up
}

TEST_CASE("optimizers and clipping refuse parameters of another backend's memory", "[device][train]") {
  Generator gc(1), gd(1);
  Linear<double> cpu(3, 2, true, gc);
  Linear<double, OffHost> dev(3, 2, true, gd);
  cpu.set_requires_grad(true);
  dev.set_requires_grad(true);
  std::vector<ParamRef<double>> pc, pd;
  cpu.visit_parameters([&](ParamRef<double> p) { pc.push_back(p); });
  dev.visit_parameters([&](ParamRef<double> p) { pd.push_back(p); });
  REQUIRE(pd.size() == 2);
  CHECK(pc[0].host_accessible);
  CHECK_FALSE(pd[0].host_accessible);
  CHECK_THROWS_WITH(AdamW<double>(pd), Catch::Contains("AdamW: parameter 'weight' is device memory") && Catch::Contains("eigen-cpu backend"));
  CHECK_THROWS_WITH((SGD<double, OffHost>(pc)), Catch::Contains("SGD: parameter 'weight' is host memory"));
  CHECK_THROWS_WITH(clip_grad_norm<double>(pd, 1.0), Catch::Contains("clip_grad_norm: parameter 'weight' is device memory"));
  CHECK_THROWS_WITH(clip_grad_value<double>(pd, 1.0), Catch::Contains("clip_grad_value: parameter 'weight' is device memory"));
  CHECK_NOTHROW(AdamW<double, OffHost>(pd));
  nn::CrossEntropyLoss<double, OffHost> loss(2);
  test::OffHostBuffer<double> logits(2 * 3);
  const std::vector<std::int64_t> three{0, 1, 2}, bad{0, 7};
  CHECK_THROWS_WITH(loss(logits.view(3, 2), three), Catch::Contains("3 rows of logits exceed the 2 reserved"));
  CHECK_THROWS_WITH(loss(logits.view(2, 3), bad), Catch::Contains("target 7 of row 1 is outside [0, 3)"));
}

TEST_CASE("CrossEntropyLoss: the loss and dlogits of the free functions; dlogits may be the logits' memory", "[device][train]") {
  const Index n = 5, V = 7;
  const test::Mat<double> logits = test::random_mat<double>(n, V, 9) * 3.0;
  const std::vector<std::int64_t> targets{1, -100, 6, 0, 3};
  test::Mat<double> want_d(n, V);
  const double want = nn::cross_entropy<double>(logits, targets, want_d);
  nn::CrossEntropyLoss<double> cpu(n);
  test::Mat<double> in_place = logits;
  CHECK(cpu(in_place, targets, in_place) == want);  // dlogits written over the logits
  CHECK(test::max_abs_diff(in_place, want_d) == 0.0);
  nn::CrossEntropyLoss<double, OffHost> dev(n);
  test::OffHostBuffer<double> d(std::size_t(n * V));
  OffHost::upload<double>(logits, d.view(n, V));
  CHECK(dev(d.view(n, V), targets, d.view(n, V)) == want);
  test::Mat<double> back(n, V);
  OffHost::download<double>(d.view(n, V), back);
  CHECK(test::max_abs_diff(back, want_d) == 0.0);
  CHECK_THROWS_WITH(nn::CrossEntropyLoss<double>(-1), Catch::Contains("max_rows = -1 is negative"));
}

TEST_CASE("off-host backend: prompt checkpoints save from and load into device memory", "[device][prompt][io]") {
  MultitaskPromptTuningConfig mt;
  mt.num_virtual_tokens = 4;
  mt.num_tasks = 3;
  mt.num_ranks = 2;
  const test::Mat<double> words = test::random_mat<double>(11, 6, 1);
  test::OffHostBuffer<double> wd(std::size_t(words.size()));
  OffHost::upload<double>(words, wd.view(11, 6));
  Generator g1(5), g2(6);
  MultitaskPromptEmbedding<double, OffHost> dev(mt, ConstMatrixView<double>(wd.view(11, 6)), g1);
  MultitaskPromptEmbedding<double> cpu(mt, words, g2);  // another seed: different numbers until loaded
  const auto values = [](auto& m) {
    std::vector<double> v;
    m.visit_parameters([&](const auto& p) {
      std::vector<double> h(p.size);
      using B = typename std::remove_cvref_t<decltype(m)>::backend_type;
      B::template download<double>(ConstMatrixView<double>(p.value, 1, Index(p.size)), MatrixView<double>(h.data(), 1, Index(p.size)));
      v.insert(v.end(), h.begin(), h.end());
    });
    return v;
  };
  REQUIRE(values(dev) != values(cpu));
  test::TempDir a("peft_device_prompt"), b("peft_device_prompt");
  io::save_prompt_pretrained(dev, a.path, {}, /*sync=*/false);  // device → file
  io::load_prompt_weights(cpu, a.path);                           // file → host
  CHECK(values(cpu) == values(dev));
  Generator g3(7);
  MultitaskPromptEmbedding<double, OffHost> dev2(mt, ConstMatrixView<double>(wd.view(11, 6)), g3);
  io::save_prompt_pretrained(cpu, b.path, {}, false);
  io::load_prompt_weights(dev2, b.path);  // file → device
  CHECK(values(dev2) == values(cpu));
}

// ---- adapter checkpoints of a device model ------------------------------------------------------------------

namespace {
template <class B>
struct IoNet {
  Adapted<Linear<double, B>, Lora, AdaLora, Vera> fc1;
  Adapted<Linear<double, B>, Lora, AdaLora, Vera> fc2;
  Adapted<Conv2d<double, B>, Lora> conv;
  Adapted<Embedding<double, B>, Lora> emb;
};
template <class B>
IoNet<B> make_io_net(std::uint64_t seed) {
  Generator g(seed);
  Conv2dGeometry geo;
  geo.in_channels = 2;
  geo.out_channels = 3;
  geo.kernel_h = geo.kernel_w = 3;
  geo.pad_h = geo.pad_w = 1;
  geo.in_h = geo.in_w = 5;
  return IoNet<B>{Adapted<Linear<double, B>, Lora, AdaLora, Vera>(Linear<double, B>(6, 5, true, g)),
                  Adapted<Linear<double, B>, Lora, AdaLora, Vera>(Linear<double, B>(5, 4, true, g)),
                  Adapted<Conv2d<double, B>, Lora>(Conv2d<double, B>(geo, true, g)),
                  Adapted<Embedding<double, B>, Lora>(Embedding<double, B>(9, 4, g))};
}
/// Every parameter of the model (base and adapters) as host values, in visiting order.
template <class M>
std::vector<double> io_values(M& m) {
  std::vector<double> v;
  for_each_layer(m, [&](auto& l, const std::string&) {
    using B = typename std::remove_cvref_t<decltype(l)>::backend_type;
    l.visit_parameters([&](const ParamRef<double>& p) {
      std::vector<double> h(p.size);
      B::template download<double>(ConstMatrixView<double>(p.value, 1, Index(p.size)), MatrixView<double>(h.data(), 1, Index(p.size)));
      v.insert(v.end(), h.begin(), h.end());
    });
  });
  return v;
}
std::string file_bytes(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}
/// Adds the adapters `kind` names to every layer that takes them (same seed: the same numbers on both backends).
template <class B>
io::AdapterConfig add_io_adapter(IoNet<B>& m, const std::string& kind) {
  Generator g(77);
  io::AdapterConfig c;
  if (kind == "lora") {
    LoraConfig lc;
    lc.r = 2;
    lc.lora_alpha = 4;
    lc.init_lora_weights = LoraInit::gaussian;  // B not zero: every tensor carries numbers
    m.fc1.add_adapter(kind, lc, g);
    m.fc2.add_adapter(kind, lc, g);
    m.conv.add_adapter(kind, lc, g);
    m.emb.add_adapter(kind, lc, g);
    c.method = lc;
    c.bias = io::BiasMode::all;
  } else if (kind == "ada") {  // saved truncated by the config's rank_pattern
    AdaLoraConfig ac;
    ac.init_r = 3;
    ac.target_r = 2;
    ac.total_step = 10;
    ac.init_lora_weights = false;
    m.fc1.add_adapter(kind, ac, g);
    m.fc2.add_adapter(kind, ac, g);
    ac.rank_pattern = {{"fc1", {true, false, true}}, {"fc2", {false, true, true}}};
    c.method = ac;
  } else {
    VeraConfig vc;
    vc.r = 2;
    vc.projections = VeraProjections<double, B>::random(2, 6, 5, 3);
    m.fc1.add_adapter(kind, vc, g);
    m.fc2.add_adapter(kind, vc, g);
    c.method = vc;
  }
  return c;
}
}  // namespace

TEST_CASE("off-host backend: adapter checkpoints save from and load into device memory", "[device][io]") {
  for (const std::string kind : {"lora", "ada", "vera"}) {
    INFO("adapter: " << kind);
    auto cpu = make_io_net<EigenCpu>(1);
    auto dev = make_io_net<OffHost>(1);
    const io::AdapterConfig cc = add_io_adapter(cpu, kind);
    const io::AdapterConfig cd = add_io_adapter(dev, kind);
    {  // trained-looking adapter values (VeRA's λ start as constants), the same on both
      auto pc = parameters<double>(cpu);
      auto pd = parameters<double>(dev);
      test::parity::randomize<OffHost>(pc, pd);
    }
    REQUIRE(io_values(cpu) == io_values(dev));
    test::TempDir a("peft_device_ckpt"), b("peft_device_ckpt");
    io::SaveOptions no_sync;
    no_sync.sync = false;
    io::save_pretrained(cpu, a.path, kind, cc, no_sync);
    io::save_pretrained(dev, b.path, kind, cd, no_sync);  // device → file
    const std::string bytes = file_bytes(a.path / io::adapter_weights_name);
    CHECK(bytes.size() > 100);
    CHECK(file_bytes(b.path / io::adapter_weights_name) == bytes);  // the same file, byte for byte
    CHECK(file_bytes(b.path / io::adapter_config_name) == file_bytes(a.path / io::adapter_config_name));

    auto cpu2 = make_io_net<EigenCpu>(2);  // other base weights: only the adapter comes from the file
    auto dev2 = make_io_net<OffHost>(2);
    io::LoadOptions lo;
    lo.seed = 5;
    io::load_pretrained(cpu2, a.path, kind, lo);
    io::load_pretrained(dev2, a.path, kind, lo);  // file → device
    const auto loaded = io_values(cpu2);
    CHECK(io_values(dev2) == loaded);
    CHECK(loaded != io_values(cpu));  // the base weights differ (seed 2): a real comparison of two models
  }
}

// ---- AdaLoRA's training machinery on a device model ---------------------------------------------------------

namespace {
template <class B>
struct AdaNet {
  Adapted<Linear<double, B>, AdaLora> fc1;
  Adapted<Linear<double, B>, AdaLora> fc2;
};
template <class B>
AdaNet<B> make_ada_net(const AdaLoraConfig& c) {
  Generator g(11);
  AdaNet<B> m{Adapted<Linear<double, B>, AdaLora>(Linear<double, B>(7, 6, true, g)), Adapted<Linear<double, B>, AdaLora>(Linear<double, B>(6, 5, true, g))};
  m.fc1.add_adapter("default", c, g);
  m.fc2.add_adapter("default", c, g);
  return m;
}
}  // namespace

TEST_CASE("off-host backend: AdaLoRA's orthogonal regulariser, rank allocator and truncation equal the CPU's bit for bit", "[device][adalora]") {
  AdaLoraConfig c;
  c.init_r = 4;
  c.target_r = 2;
  c.tinit = 1;
  c.tfinal = 2;
  c.deltaT = 1;
  c.total_step = 8;
  c.init_lora_weights = false;  // E not zero: masking changes numbers
  auto cpu = make_ada_net<EigenCpu>(c);
  auto dev = make_ada_net<OffHost>(c);
  auto pc = parameters<double>(cpu);
  auto pd = parameters<double>(dev);
  adalora::RankAllocator<double> ac(cpu, c), ad(dev, c);
  SGD<double> oc(pc, {.lr = 0.001});
  SGD<double, OffHost> od(pd, {.lr = 0.001});
  const Index n = 3;
  auto c1 = cpu.fc1.make_context(n), c2 = cpu.fc2.make_context(n);
  auto d1 = dev.fc1.make_context(n), d2 = dev.fc2.make_context(n);
  test::OffHostBuffer<double> x(n * 7), h(n * 6), y(n * 5), dy(n * 5), dh(n * 6);
  test::Mat<double> hx(n, 7), hh(n, 6), hy(n, 5), hdh(n, 6);
  int masks = 0;
  for (int step = 1; step <= c.total_step; ++step) {
    INFO("step " << step);
    const test::Mat<double> xin = test::random_mat<double>(n, 7, 200 + std::uint64_t(step)), g = test::random_mat<double>(n, 5, 300 + std::uint64_t(step));
    OffHost::upload<double>(xin, x.view(n, 7));
    OffHost::upload<double>(g, dy.view(n, 5));
    oc.zero_grad();
    od.zero_grad();
    cpu.fc1.forward(c1, xin, hh);
    cpu.fc2.forward(c2, hh, hy);
    cpu.fc2.backward(c2, g, hdh);
    cpu.fc1.backward(c1, hdh, {});
    dev.fc1.forward(d1, x.view(n, 7), h.view(n, 6));
    dev.fc2.forward(d2, h.view(n, 6), y.view(n, 5));
    dev.fc2.backward(d2, dy.view(n, 5), dh.view(n, 6));
    dev.fc1.backward(d1, dh.view(n, 6), {});
    const double rc = adalora::add_orth_reg(cpu, c.orth_reg_weight);
    const double rd = adalora::add_orth_reg(dev, c.orth_reg_weight);
    CHECK(rc > 0.0);
    CHECK(rd == rc);
    oc.step();
    od.step();
    const auto sc = ac.update_and_allocate(cpu, step);
    const auto sd = ad.update_and_allocate(dev, step);
    CHECK(sd.budget == sc.budget);
    CHECK(sd.masked == sc.masked);
    masks += sc.masked;
    CHECK(ad.rank_pattern() == ac.rank_pattern());
    CHECK(ad.scores() == ac.scores());
    const auto vc = io_values(cpu);
    CHECK(std::all_of(vc.begin(), vc.end(), [](double v) { return std::isfinite(v); }));
    CHECK(io_values(dev) == vc);
  }
  CHECK(masks >= 3);
  REQUIRE(ac.ranks().size() == 2);
  CHECK(ac.ranks()[0].second + ac.ranks()[1].second == 2 * c.target_r);  // the final budget
  const auto sdc = adalora::state_dict<double>(cpu, ac.rank_pattern());
  const auto sdd = adalora::state_dict<double>(dev, ad.rank_pattern());
  REQUIRE(sdd.size() == sdc.size());
  for (std::size_t i = 0; i < sdc.size(); ++i) {
    CHECK(sdd[i].key == sdc[i].key);
    CHECK(sdd[i].data == sdc[i].data);
  }
  CHECK(adalora::resize_by_rank_pattern(cpu, ac.rank_pattern()) == 2);
  CHECK(adalora::resize_by_rank_pattern(dev, ad.rank_pattern()) == 2);
  CHECK(io_values(dev) == io_values(cpu));
}
