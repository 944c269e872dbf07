// Test helper (not installed): compares two LoRA adapter directories by what they compute.
//   peft_compare_lora [--deltas-only] DIR_A DIR_B [TOL]
// Same peft_type LORA, r, lora_alpha, use_rslora, rank/alpha patterns and target_modules (lists compared as
// sets: PEFT writes a Python set in hash order); the same modules; and for every module the delta weight
// scaling · B·A (conv flattened) with max|a − b| / max(1, max|b|) ≤ TOL (default 2e-5). Factors are not
// compared: an SVD determines B·A but not the signs of its singular vectors. --deltas-only skips the
// config comparison. Exit code 0 when equal.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include <Eigen/Dense>
#include <peft/io/adapter_config.hpp>
#include <peft/io/safetensors.hpp>

namespace st = peft::safetensors;
using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace {

std::map<std::string, Mat> deltas(const std::string& dir) {
  const auto cfg = peft::io::read_adapter_config(dir);
  const auto* l = cfg.get_if<peft::LoraConfig>();
  if (!l) throw std::runtime_error(dir + ": not a LoRA adapter");
  st::File f(dir + "/adapter_model.safetensors");
  std::map<std::string, Mat> out;
  const std::string pre = "base_model.model.";
  for (const auto& k : f.names()) {
    std::string mod, bkey;
    for (const auto& [a, b] : {std::pair<std::string, std::string>{".lora_A.weight", ".lora_B.weight"}, {".lora_embedding_A", ".lora_embedding_B"}})
      if (k.size() > a.size() && k.compare(k.size() - a.size(), a.size(), a) == 0) {
        mod = k.substr(pre.size(), k.size() - a.size() - pre.size());
        bkey = k.substr(0, k.size() - a.size()) + b;
      }
    if (mod.empty()) continue;
    const auto& ia = f.info(k);
    const auto& ib = f.info(bkey);
    Mat A(Eigen::Index(ia.shape[0]), Eigen::Index(ia.numel() / ia.shape[0])), B(Eigen::Index(ib.shape[0]), Eigen::Index(ib.numel() / ib.shape[0]));
    f.read_as<double>(k, std::span<double>(A.data(), std::size_t(A.size())));
    f.read_as<double>(bkey, std::span<double>(B.data(), std::size_t(B.size())));
    const auto mc = l->for_module(mod);
    out[mod] = peft::LoraConfig::scaling_for(mc.lora_alpha, mc.r, mc.use_rslora) * (B * A);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  bool deltas_only = false;
  if (argc > 1 && std::string(argv[1]) == "--deltas-only") {
    deltas_only = true;
    ++argv;
    --argc;
  }
  if (argc < 3) {
    std::cerr << "usage: peft_compare_lora [--deltas-only] DIR_A DIR_B [TOL]\n";
    return 2;
  }
  const double tol = argc > 3 ? std::atof(argv[3]) : 2e-5;
  try {
    peft::io::set_warning_sink({});
    auto ca = peft::io::read_adapter_config(argv[1]), cb = peft::io::read_adapter_config(argv[2]);
    const auto *la = ca.get_if<peft::LoraConfig>(), *lb = cb.get_if<peft::LoraConfig>();
    bool ok = la && lb;
    if (deltas_only) {
    } else if (ok && (la->r != lb->r || la->lora_alpha != lb->lora_alpha || la->use_rslora != lb->use_rslora)) {
      std::cerr << "config differs: r " << la->r << " / " << lb->r << ", lora_alpha " << la->lora_alpha << " / " << lb->lora_alpha << ", use_rslora "
                << la->use_rslora << " / " << lb->use_rslora << "\n";
      ok = false;
    }
    if (!deltas_only && ok && (la->rank_pattern != lb->rank_pattern || la->alpha_pattern != lb->alpha_pattern)) {
      std::cerr << "rank_pattern / alpha_pattern differ\n";
      ok = false;
    }
    auto sorted = [](peft::io::ModuleSelector s) {
      if (s.names) std::sort(s.names->begin(), s.names->end());
      return s;
    };
    if (!deltas_only && sorted(ca.target_modules) != sorted(cb.target_modules)) {
      std::cerr << "target_modules differ\n";
      ok = false;
    }
    const auto da = deltas(argv[1]), db = deltas(argv[2]);
    if (da.size() != db.size()) {
      std::cerr << "module count differs: " << da.size() << " / " << db.size() << "\n";
      return 1;
    }
    double worst = 0;
    for (const auto& [m, a] : da) {
      auto it = db.find(m);
      if (it == db.end() || it->second.rows() != a.rows() || it->second.cols() != a.cols()) {
        std::cerr << m << ": missing or of another shape in " << argv[2] << "\n";
        ok = false;
        continue;
      }
      const double e = (a - it->second).cwiseAbs().maxCoeff() / std::max(1.0, it->second.cwiseAbs().maxCoeff());
      worst = std::max(worst, e);
      if (!(e <= tol)) {
        std::cerr << m << ": delta weight scaled difference " << e << " > " << tol << "\n";
        ok = false;
      }
    }
    std::cout << da.size() << " modules, worst delta-weight scaled difference " << worst << (ok ? " (ok)" : " (FAIL)") << "\n";
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
}
