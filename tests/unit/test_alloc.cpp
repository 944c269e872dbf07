// The hot path allocates nothing: after make_context, forward and backward of Linear and of LoRA layers
// make no heap allocation — counted at operator new, at malloc (glibc interposition, which also sees
// OpenBLAS), and by Eigen's own no-malloc mode — over a grid of batch sizes, ranks and widths, with the
// build's real compiler flags.
#define EIGEN_RUNTIME_NO_MALLOC
#include <stdexcept>
#define eigen_assert(x) \
  if (!(x)) throw std::runtime_error("eigen_assert failed: " #x)

#include <catch2/catch.hpp>
#include <atomic>
#include <cstdlib>
#include <new>

#include "test_util.hpp"
#include <peft/nn/decoder.hpp>
#include <peft/nn/loss.hpp>
#include <peft/prompt/prompt_tuning.hpp>

namespace {
std::atomic<long> g_news{0}, g_mallocs{0};
std::atomic<bool> g_count_malloc{false};
}  // namespace

#pragma GCC diagnostic ignored "-Wmismatched-new-delete"  // operator new is malloc-based here
void* operator new(std::size_t n) {
  ++g_news;
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

#if defined(__GLIBC__)
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void* malloc(std::size_t n) {
  if (g_count_malloc.load(std::memory_order_relaxed)) ++g_mallocs;
  return __libc_malloc(n);
}
void* calloc(std::size_t a, std::size_t b) {
  if (g_count_malloc.load(std::memory_order_relaxed)) ++g_mallocs;
  return __libc_calloc(a, b);
}
void* realloc(void* p, std::size_t n) {
  if (g_count_malloc.load(std::memory_order_relaxed)) ++g_mallocs;
  return __libc_realloc(p, n);
}
void* aligned_alloc(std::size_t al, std::size_t n) {
  if (g_count_malloc.load(std::memory_order_relaxed)) ++g_mallocs;
  return __libc_memalign(al, n);
}
int posix_memalign(void** out, std::size_t al, std::size_t n) {
  if (g_count_malloc.load(std::memory_order_relaxed)) ++g_mallocs;
  *out = __libc_memalign(al, n);
  return *out ? 0 : ENOMEM;
}
}
#define PEFT_COUNTS_MALLOC 1
#endif

using namespace peft;
using namespace peft::test;

namespace {
struct Counted {
  long news, mallocs;
};
template <class F>
Counted count_allocations(F&& f) {
  const long n0 = g_news, m0 = g_mallocs;
  Eigen::internal::set_is_malloc_allowed(false);
  g_count_malloc = true;
  try {
    f();
  } catch (...) {
    g_count_malloc = false;
    Eigen::internal::set_is_malloc_allowed(true);
    throw;
  }
  g_count_malloc = false;
  Eigen::internal::set_is_malloc_allowed(true);
  return {g_news - n0, g_mallocs - m0};
}
}  // namespace

TEST_CASE("the counters see allocations (the test can fail)", "[alloc]") {
  const auto c = count_allocations([] { ::operator delete(::operator new(64)); });  // a call, not a new-expression: never elided
  CHECK(c.news == 1);
#ifdef PEFT_COUNTS_MALLOC
  const auto m = count_allocations([] { std::free(std::malloc(100)); });
  CHECK(m.mallocs == 1);
#endif
  Eigen::MatrixXf big;
  REQUIRE_THROWS_WITH(count_allocations([&] { big.resize(300, 300); }), Catch::Contains("eigen_assert"));
}

TEMPLATE_TEST_CASE("forward and backward allocate nothing after make_context", "[alloc]", float, double) {
  using T = TestType;
#if defined(PEFT_WITH_OPENBLAS)
  // OpenBLAS's threaded driver mallocs a few job structures per multi-threaded call (measured: 3 per
  // GEMM at 512 x 64 x 64 with 2 threads); single-threaded it allocates nothing after its first call.
  // peft++'s own code allocates nothing either way (the operator-new count below).
  openblas_set_num_threads(1);
#endif
  for (peft::Index d : {64, 1024}) {
    for (peft::Index m : {1, 32, 512}) {
      for (int r : {8, 64}) {
        for (double p : {0.0, 0.1}) {
          CAPTURE(d, m, r, p);
          Generator g(1);
          Adapted<Linear<T>, Lora> layer(Linear<T>(d, d, true, g));
          LoraConfig cfg;
          cfg.r = r;
          cfg.lora_dropout = p;
          cfg.init_lora_weights = LoraInit::off;
          layer.add_adapter("a", cfg, g);
          layer.add_adapter("b", cfg, g);
          layer.set_adapter(std::vector<std::string>{"a", "b"});
          const Mat<T> x = random_mat<T>(m, d, 2), dy = random_mat<T>(m, d, 3);
          Mat<T> y(m, d), dx(m, d);
          auto ctx = layer.make_context(m);
          layer.forward(ctx, x, y);  // warm-up: first calls into OpenBLAS set up its buffer pool
          layer.backward(ctx, dy, dx);
          const auto c = count_allocations([&] {
            for (int it = 0; it < 2; ++it) {
              layer.forward(ctx, x, y);
              layer.backward(ctx, dy, dx, GradMode::accumulate);
            }
          });
          CHECK(c.news == 0);
          CHECK(c.mallocs == 0);
          if (d == 64 && r == 8 && p == 0.0) {  // the frozen base layer alone, full fine-tuning on
            layer.base().set_requires_grad(true);
            auto bctx = layer.base().make_context(m);
            layer.base().forward(bctx, x, y);
            const auto cb = count_allocations([&] {
              layer.base().forward(bctx, x, y);
              layer.base().backward(bctx, dy, dx);
            });
            CHECK(cb.news == 0);
            CHECK(cb.mallocs == 0);
          }
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("loha and lokr: forward and backward allocate nothing after make_context", "[loha][lokr][alloc]", float, double) {
  using T = TestType;
  // sizes below OpenBLAS's threshold in at least one dimension (its threaded driver mallocs per call)
  for (peft::Index batch : {1, 16, 48}) {
    for (double dropout : {0.0, 0.3}) {
      CAPTURE(batch, dropout);
      Generator g(3);
      Adapted<Linear<T>, Lora, Loha, Lokr> l(Linear<T>(40, 36, true, g));
      LoraConfig lc;
      lc.r = 4;
      lc.lora_dropout = dropout;
      LohaConfig hc;
      hc.r = 4;
      hc.init_weights = false;
      hc.rank_dropout = dropout;
      hc.module_dropout = dropout / 2;
      LokrConfig kc;
      kc.r = 2;
      kc.decompose_both = true;
      kc.init_weights = LokrInit::off;
      kc.rank_dropout = dropout;
      kc.module_dropout = dropout / 2;
      LokrConfig kf;  // full blocks
      l.add_adapter("lora", lc, g);
      l.add_adapter("loha", hc, g);
      l.add_adapter("lokr", kc, g);
      l.add_adapter("lokr_full", kf, g);
      l.add_adapter("loha2", hc, g);
      l.set_adapter(std::vector<std::string>{"lora", "loha", "lokr", "lokr_full", "loha2"});
      l.set_seed(1);
      const Mat<T> x = random_mat<T>(batch, 40, 1), dy = random_mat<T>(batch, 36, 2);
      Mat<T> y(batch, 36), dx(batch, 40);
      auto ctx = l.make_context(batch);
      l.forward(ctx, x, y);  // warm-up (first calls into libraries)
      l.backward(ctx, dy, dx, GradMode::overwrite);
      const auto c = count_allocations([&] {
        for (int i = 0; i < 3; ++i) {
          l.forward(ctx, x, y);
          l.backward(ctx, dy, dx, GradMode::accumulate);
          l.backward(ctx, dy, MatrixView<T>{}, GradMode::overwrite);
        }
      });
      CHECK(c.news == 0);
      CHECK(c.mallocs == 0);
    }
  }
}

TEMPLATE_TEST_CASE("conv2d and embedding layers with adapters allocate nothing after make_context", "[conv2d][embedding][alloc]", float, double) {
  using T = TestType;
  for (peft::Index batch : {1, 5}) {
    for (double dropout : {0.0, 0.3}) {
      for (bool trainable_base : {false, true}) {
        CAPTURE(batch, dropout, trainable_base);
        Generator g(5);
        Conv2dGeometry geo;
        geo.in_channels = 3;
        geo.out_channels = 70;  // two DoRA norm blocks
        geo.kernel_h = geo.kernel_w = 3;
        geo.pad_h = geo.pad_w = 1;
        geo.in_h = geo.in_w = 8;
        Adapted<Conv2d<T>, Lora, Loha, Lokr> c(Conv2d<T>(geo, true, g));
        LoraConfig lc;
        lc.r = 4;
        lc.lora_dropout = dropout;
        lc.init_lora_weights = LoraInit::off;
        LoraConfig dc = lc;
        dc.use_dora = true;
        LohaConfig hc;
        hc.r = 4;
        hc.init_weights = false;
        LokrConfig kc;
        kc.r = 2;
        c.add_adapter("lora", lc, g);
        c.add_adapter("dora", dc, g);
        c.add_adapter("loha", hc, g);
        c.add_adapter("lokr", kc, g);
        c.add_adapter("dora2", dc, g);
        c.set_adapter(std::vector<std::string>{"dora", "lora", "loha", "lokr", "dora2"});
        c.base().set_requires_grad(trainable_base);
        const Mat<T> x = random_mat<T>(batch, geo.in_size(), 1), dy = random_mat<T>(batch, geo.out_size(), 2);
        Mat<T> y(batch, geo.out_size()), dx(batch, geo.in_size());
        auto ctx = c.make_context(batch);
        c.forward(ctx, x, y);
        c.backward(ctx, dy, dx, GradMode::overwrite);
        const auto cc = count_allocations([&] {
          for (int i = 0; i < 2; ++i) {
            c.forward(ctx, x, y);
            c.backward(ctx, dy, dx, GradMode::accumulate);
            c.backward(ctx, dy, MatrixView<T>{}, GradMode::overwrite);
          }
        });
        CHECK(cc.news == 0);
        CHECK(cc.mallocs == 0);

        Adapted<Embedding<T>, Lora> e(Embedding<T>(50, 70, g, 3));
        LoraConfig ec;
        ec.r = 4;
        ec.init_lora_weights = LoraInit::off;
        e.add_adapter("lora", ec, g);
        ec.use_dora = true;
        e.add_adapter("dora", ec, g);
        e.set_adapter(std::vector<std::string>{"dora", "lora"});
        e.base().set_requires_grad(trainable_base);
        const std::vector<std::int64_t> ids = {1, 3, 49, 7, 1};
        const std::span<const std::int64_t> idv(ids.data(), std::size_t(batch));
        Mat<T> ye(batch, 70);
        const Mat<T> dye = random_mat<T>(batch, 70, 3);
        auto ectx = e.make_context(batch);
        e.forward(ectx, idv, ye);
        e.backward(ectx, dye, {}, GradMode::overwrite);
        const auto ce = count_allocations([&] {
          for (int i = 0; i < 2; ++i) {
            e.forward(ectx, idv, ye);
            e.backward(ectx, dye, {}, GradMode::accumulate);
          }
        });
        CHECK(ce.news == 0);
        CHECK(ce.mallocs == 0);
      }
    }
  }
}

TEMPLATE_TEST_CASE("cp-form loha and lokr on conv2d allocate nothing after make_context", "[loha][lokr][conv2d][cp][alloc]", float, double) {
  using T = TestType;
  for (peft::Index batch : {1, 3}) {
    for (double dropout : {0.0, 0.3}) {
      CAPTURE(batch, dropout);
      Generator g(7);
      Conv2dGeometry geo;
      geo.in_channels = 9;  // factorization (3, 3)
      geo.out_channels = 10;  // factorization (2, 5)
      geo.kernel_h = 3;
      geo.kernel_w = 2;
      geo.stride_h = geo.stride_w = 2;
      geo.pad_h = geo.pad_w = 1;
      geo.in_h = geo.in_w = 9;
      Adapted<Conv2d<T>, Loha, Lokr> c(Conv2d<T>(geo, true, g));
      LohaConfig hc;  // CP: hada_t1/hada_t2
      hc.r = 4;
      hc.init_weights = false;
      hc.use_effective_conv2d = true;
      hc.rank_dropout = dropout;
      hc.module_dropout = dropout / 2;
      LohaConfig hf = hc;  // the flat form beside it
      hf.use_effective_conv2d = false;
      LokrConfig kc;  // CP w2 (lokr_t2), full w1
      kc.r = 2;
      kc.init_weights = LokrInit::off;
      kc.use_effective_conv2d = true;
      kc.rank_dropout = dropout;
      kc.rank_dropout_scale = true;
      LokrConfig kb = kc;  // CP w2 and low-rank w1
      kb.r = 1;
      kb.decompose_both = true;
      c.add_adapter("loha_cp", hc, g);
      c.add_adapter("loha_flat", hf, g);
      c.add_adapter("lokr_cp", kc, g);
      c.add_adapter("lokr_cp_both", kb, g);
      c.set_adapter(std::vector<std::string>{"loha_cp", "loha_flat", "lokr_cp", "lokr_cp_both"});
      REQUIRE(c.template adapter<Loha>("loha_cp").cp);
      REQUIRE(c.template adapter<Lokr>("lokr_cp").cp());
      REQUIRE(c.template adapter<Lokr>("lokr_cp_both").cp());
      REQUIRE(!c.template adapter<Lokr>("lokr_cp_both").layout.full_w1);
      const Mat<T> x = random_mat<T>(batch, geo.in_size(), 1), dy = random_mat<T>(batch, geo.out_size(), 2);
      Mat<T> y(batch, geo.out_size()), dx(batch, geo.in_size());
      auto ctx = c.make_context(batch);
      c.forward(ctx, x, y);
      c.backward(ctx, dy, dx, GradMode::overwrite);
      const auto cc = count_allocations([&] {
        for (int i = 0; i < 3; ++i) {
          c.set_seed(std::uint64_t(i));
          c.forward(ctx, x, y);
          c.backward(ctx, dy, dx, GradMode::accumulate);
          c.backward(ctx, dy, MatrixView<T>{}, GradMode::overwrite);
        }
      });
      CHECK(cc.news == 0);
      CHECK(cc.mallocs == 0);
    }
  }
}

TEMPLATE_TEST_CASE("transformer decoder (LoRA on q/v, past keys/values, mask) allocates nothing after make_context", "[nn][alloc]", float, double) {
  using T = TestType;
  nn::DecoderConfig cfg;
  cfg.vocab_size = 50;
  cfg.max_position_embeddings = 40;
  cfg.d_model = 32;
  cfg.num_layers = 2;
  cfg.num_heads = 4;
  for (bool full : {false, true}) {
    CAPTURE(full);
    Generator g(9);
    auto m = nn::make_decoder<T, Adapted<Linear<T>, Lora>>(cfg, g);
    LoraConfig lc;
    lc.r = 4;
    lc.lora_dropout = 0.1;
    for (auto& b : m.h) for (auto* a : {&b.attn.q_proj, &b.attn.v_proj}) a->add_adapter("default", lc, g);
    if (full) set_base_requires_grad(m, true);
    const peft::Index batch = 3, seq = 7, past = 4, rows = batch * seq;
    auto ctx = m.make_context(batch, 16, past);  // a larger max_seq than used
    std::vector<std::int64_t> ids(static_cast<std::size_t>(rows)), mask(static_cast<std::size_t>(batch * (past + seq)), 1);
    for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = std::int64_t(i * 7 % 50);
    mask[3] = mask[past + seq + 1] = 0;
    std::vector<Mat<T>> kv, gkv;
    for (int i = 0; i < 4; ++i) {
      kv.push_back(random_mat<T>(batch * 4 * past, 8, std::uint64_t(i)));
      gkv.push_back(Mat<T>(batch * 4 * past, 8));
    }
    const std::vector<nn::PastKeyValue<T>> pkv{{kv[0], kv[1], past}, {kv[2], kv[3], past}};
    const std::vector<nn::PastKeyValueGrad<T>> pg{{gkv[0], gkv[1]}, {gkv[2], gkv[3], GradMode::accumulate}};
    const Mat<T> emb = random_mat<T>(rows, 32, 5);
    Mat<T> logits(rows, 50), dl(rows, 50), demb(rows, 32);
    const nn::DecoderInput<T> in{batch, seq, ids, {}, pkv, mask};
    const nn::DecoderInput<T> in_emb{batch, seq, {}, emb, pkv, mask};
    m.forward(ctx, in, logits);  // warm-up
    nn::causal_lm_loss<T>(logits, ids, batch, seq, dl);
    m.backward(ctx, dl, {demb, pg});
    const auto c = count_allocations([&] {
      for (int i = 0; i < 2; ++i) {
        m.forward(ctx, in, logits);
        nn::causal_lm_loss<T>(logits, ids, batch, seq, dl);
        m.backward(ctx, dl, {demb, pg}, GradMode::accumulate);
        m.forward(ctx, in_emb, logits);
        m.backward(ctx, dl, {demb, {}}, GradMode::overwrite, GradMode::accumulate);
      }
    });
    CHECK(c.news == 0);
    CHECK(c.mallocs == 0);

    // prompt tuning: the prompts prepended to the token embeddings, backward into the table
    PromptTuningConfig pc;
    pc.num_virtual_tokens = 5;
    pc.prompt_tuning_init = PromptTuningInit::text;
    pc.init_token_ids = {3, 4};
    PromptEmbedding<T> pe(pc, m.wte.weight(), g);
    auto pctx = pe.make_context(batch);
    auto ectx = m.wte.make_context(rows);
    auto pdctx = m.make_context(batch, 5 + seq);
    Mat<T> tok(rows, 32), pin(batch * (5 + seq), 32), dpin(batch * (5 + seq), 32), pl(batch * (5 + seq), 50);
    const nn::DecoderInput<T> pinput{batch, 5 + seq, {}, pin};
    m.wte.forward(ectx, ids, tok);
    pe.prepend(pctx, tok, batch, seq, pin);
    m.forward(pdctx, pinput, pl);
    m.backward(pdctx, pl, {dpin, {}});
    pe.backward_from_inputs_embeds(pctx, dpin, seq);
    const auto cp = count_allocations([&] {
      m.wte.forward(ectx, ids, tok);
      pe.prepend(pctx, tok, batch, seq, pin);
      m.forward(pdctx, pinput, pl);
      m.backward(pdctx, pl, {dpin, {}}, GradMode::overwrite);
      pe.backward_from_inputs_embeds(pctx, dpin, seq, GradMode::overwrite);
    });
    CHECK(cp.news == 0);
    CHECK(cp.mallocs == 0);
  }
}
