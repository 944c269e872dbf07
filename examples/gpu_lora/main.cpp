// gpu_lora — a whole LoRA fine-tuning run on the GPU, then the adapter checked on the CPU.
//
// A small GPT-2-style decoder (2 layers, d_model 64, vocabulary 32) with frozen random weights gets LoRA
// adapters on its attention q/v and MLP projections and learns a fixed next-token rule (t → 5·t + 3 mod 32)
// from random sequences. Everything of a training step runs where the model lives: forward, the causal-LM
// loss (nn::CrossEntropyLoss), backward, gradient clipping and AdamW, all with `Backend = peft::CudaBackend`
// (or EigenCpu with --cpu: the same code, one template argument apart). Then the adapter is saved in Hugging
// Face PEFT's format (save_pretrained downloads the device tensors), loaded into a CPU copy of the model
// (same seed, so the same frozen weights) and the CPU's loss on a held-out batch must equal the device's.
//
//   gpu_lora [--cpu] [--steps N] [--out DIR]
// Exit status: 0 when the loss fell below half its start and the CPU copy agrees; 1 otherwise; 77 when no
// CUDA device is present and --cpu was not given (ctest reports that as skipped).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <peft/backend/cuda.hpp>
#include <peft/io/pretrained.hpp>
#include <peft/nn/decoder.hpp>
#include <peft/nn/loss.hpp>
#include <peft/peft.hpp>
#include <peft/train.hpp>

namespace {

constexpr peft::Index kVocab = 32, kBatch = 16, kSeq = 32;

peft::nn::DecoderConfig lm_config() {
  peft::nn::DecoderConfig c;
  c.vocab_size = kVocab;
  c.max_position_embeddings = kSeq;
  c.d_model = 64;
  c.num_layers = 2;
  c.num_heads = 4;
  // GPT-2's 0.02 would cap the frozen LM head's logits near ±1.3 (ln_f's output has norm √64): too flat for a
  // deterministic rule; 0.2 lets the adapters reach confident predictions
  c.initializer_range = 0.2;
  return c;
}

template <class B>
using Proj = peft::Adapted<peft::Linear<float, B>, peft::Lora>;

/// The decoder with seed-0 frozen weights; with `adapt`, LoRA (r 16, alpha 32) on q/v and the MLP.
template <class B>
auto make_model(bool adapt) {
  peft::Generator gen(0);
  auto lm = peft::nn::make_decoder<float, Proj<B>, Proj<B>>(lm_config(), gen);
  if (adapt) {
    peft::LoraConfig lc;
    lc.r = 16;
    lc.lora_alpha = 32;
    peft::Generator lora_gen(1);
    for (auto& blk : lm.h)
      for (auto* p : {&blk.attn.q_proj, &blk.attn.v_proj, &blk.mlp.fc_in, &blk.mlp.fc_out}) p->add_adapter("default", lc, lora_gen);
  }
  return lm;
}

/// kBatch random sequences that follow t → 5·t + 3 (mod kVocab) from a random first token.
std::vector<std::int64_t> make_batch(std::uint64_t seed) {
  peft::Generator g(seed);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(kBatch * kSeq));
  std::vector<float> u(static_cast<std::size_t>(kBatch));
  g.uniform(u.data(), u.size(), 0.0, double(kVocab));
  for (peft::Index b = 0; b < kBatch; ++b) {
    std::int64_t t = std::int64_t(u[std::size_t(b)]) % kVocab;
    for (peft::Index s = 0; s < kSeq; ++s) {
      ids[std::size_t(b * kSeq + s)] = t;
      t = (5 * t + 3) % kVocab;
    }
  }
  return ids;
}

/// Loss of `lm` on `ids` (labels = ids), forward only.
template <class B, class Model>
double eval_loss(Model& lm, typename Model::Context& ctx, peft::nn::CrossEntropyLoss<float, B>& loss, typename B::template buffer<float>& logits,
                 const std::vector<std::int64_t>& ids) {
  auto lv = logits.view(kBatch * kSeq, kVocab);
  lm.forward(ctx, {.batch = kBatch, .seq = kSeq, .input_ids = ids}, lv);
  return loss.causal_lm(lv, ids, kBatch, kSeq);
}

template <class B>
int run(long steps, const std::filesystem::path& out) {
  auto lm = make_model<B>(true);
  auto params = peft::parameters<float>(lm);
  peft::print_trainable_parameters(lm);
  peft::AdamW<float, B> opt(params, {.lr = 1e-2, .weight_decay = 0.0});
  peft::nn::CrossEntropyLoss<float, B> loss(kBatch * kSeq);
  auto ctx = lm.make_context(kBatch, kSeq);
  typename B::template buffer<float> logits(std::size_t(kBatch * kSeq * kVocab)), dlogits(logits.size());
  const auto held_out = make_batch(999);
  const double start = eval_loss<B>(lm, ctx, loss, logits, held_out);
  std::printf("held-out loss before training: %.4f (ln %ld = %.4f)\n", start, long(kVocab), std::log(double(kVocab)));
  for (long step = 1; step <= steps; ++step) {
    const auto ids = make_batch(std::uint64_t(step));
    opt.zero_grad();
    auto lv = logits.view(kBatch * kSeq, kVocab);
    auto dv = dlogits.view(kBatch * kSeq, kVocab);
    lm.forward(ctx, {.batch = kBatch, .seq = kSeq, .input_ids = ids}, lv);
    const double l = loss.causal_lm(lv, ids, kBatch, kSeq, dv);
    lm.backward(ctx, dv);
    const double norm = peft::clip_grad_norm<float, B>(params, 1.0);
    opt.step();
    if (step % 50 == 0 || step == 1) std::printf("step %4ld  loss %.4f  grad norm %.3f\n", step, l, norm);
  }
  const double end = eval_loss<B>(lm, ctx, loss, logits, held_out);
  std::printf("held-out loss after %ld steps: %.4f\n", steps, end);

  peft::io::AdapterConfig cfg;
  cfg.method = lm.h[0].attn.q_proj.template adapter<peft::Lora>("default").config;
  peft::io::save_pretrained(lm, out, "default", cfg);  // device tensors downloaded, written atomically
  std::printf("adapter saved to %s\n", out.string().c_str());

  auto cpu = make_model<peft::EigenCpu>(false);  // the same frozen weights, no adapter yet
  peft::io::load_pretrained(cpu, out);
  auto cctx = cpu.make_context(kBatch, kSeq);
  peft::nn::CrossEntropyLoss<float, peft::EigenCpu> cpu_loss(kBatch * kSeq);
  peft::HostBuffer<float> cpu_logits(logits.size());
  const double on_cpu = eval_loss<peft::EigenCpu>(cpu, cctx, cpu_loss, cpu_logits, held_out);
  std::printf("held-out loss of the loaded adapter on the CPU: %.6f (device: %.6f)\n", on_cpu, end);

  bool ok = true;
  if (!(end < 0.5 * start)) {
    std::printf("FAILED: the loss did not fall below half its start\n");
    ok = false;
  }
  if (!(std::abs(on_cpu - end) <= 1e-4 * std::max(1.0, std::abs(end)))) {
    std::printf("FAILED: the CPU copy's loss differs from the device's\n");
    ok = false;
  }
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"LoRA fine-tuning of a small decoder on the GPU; the adapter checked on the CPU"};
  bool cpu = false;
  long steps = 300;
  std::string out = (std::filesystem::temp_directory_path() / "peft_gpu_lora_adapter").string();
  app.add_flag("--cpu", cpu, "run the training on the CPU backend (the same code)");
  app.add_option("--steps", steps, "AdamW steps")->check(CLI::PositiveNumber);
  app.add_option("--out", out, "directory of the saved adapter");
  CLI11_PARSE(app, argc, argv);
  try {
    if (cpu) return run<peft::EigenCpu>(steps, out);
    if (peft::cuda::device_count() == 0) {
      std::printf("gpu_lora: no CUDA device; nothing run (--cpu runs the same training on the CPU)\n");
      return 77;
    }
    std::printf("device: %s\n", peft::cuda::device_name().c_str());
    return run<peft::CudaBackend>(steps, out);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpu_lora: %s\n", e.what());
    return 1;
  }
}
