// peft++ — combining LoRA adapters into a new one: Hugging Face PEFT's `add_weighted_adapter`
// (LoraModel.add_weighted_adapter and peft/utils/merge_utils.py, PEFT 0.21), plus an exact option.
//
//   peft::CombineOptions opt;
//   opt.type = peft::Combination::ties;  opt.density = 0.5;
//   peft::add_weighted_adapter(model, {"a", "b"}, {1.0, 0.7}, "ab", opt);   // a model struct or one Adapted layer
//
// What each combination type computes on one layer, with adapters i = 1..k present on it (A_i [r_i, in],
// B_i [out, r_i], scaling s_i, user weight w_i), exactly as PEFT 0.21 does:
//
//   cat                A = [w_1 s_1 A_1; ...; w_k s_k A_k] (rows), B = [B_1 ... B_k] (columns), zero-padded to the
//                      new rank Σ r_i (ranks over the whole model). B·A = Σ w_i s_i B_i A_i: exact.
//   linear, ties, dare_linear, dare_ties, magnitude_prune
//                      A and B are combined *separately*, as if they were task vectors: A = merge(A_i, a_i),
//                      B = merge(B_i, b_i) with a_i = sgn(w_i s_i)·√|w_i s_i| and b_i = √|w_i s_i|. So B·A has
//                      cross terms B_i A_j (PEFT's documented "rough approximation"); all ranks must be equal.
//   svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
//                      ΔW_i = s_i B_i A_i ([out, in]); D = merge(ΔW_i, w_i); D = U S Vᵀ; B = U_R S_R, A = V_Rᵀ
//                      with R = svd_rank, or the largest adapter rank. svd_clamp (a quantile) clamps U_R S_R and
//                      V_Rᵀ to [-q, q] where q is that quantile of their concatenated (signed) entries; since
//                      that quantile depends on the SVD's signs, clamped results equal PEFT's only when the
//                      signs agree (the test aligns them; see below).
//   where merge() is merge_utils: task_arithmetic Σ w_i t_i; magnitude_prune keeps the int(density·n)
//   largest |t_i| of each task tensor then sums; ties prunes the same way, elects a sign per entry from the
//   *unweighted* pruned tensors (total: sign of Σ t_i; frequency: sign of Σ sgn t_i; 0 counts as +), and
//   averages the weighted entries that have the elected sign; dare_* drop entries at random with
//   probability 1 − density and rescale the survivors by 1 / density, then sum (dare_linear) or do ties'
//   election and disjoint mean (dare_ties). density ≥ 1 prunes nothing.
//
// The new adapter's config is the first listed adapter's, with r = lora_alpha = the new rank and no
// patterns, so its scaling is 1 — or √r when that config uses rsLoRA (PEFT's quirk, reproduced: the
// combined adapter's output is then √r times the combination above). With a single adapter PEFT always
// uses `linear`, whatever the type; so does this.
//
// exact = true: the type's arithmetic is applied to the delta weights themselves (as the *_svd types do;
// linear, cat and svd all mean D = Σ w_i s_i B_i A_i), and D is stored without loss as a truncated SVD
// factorisation B = U_R S_R, A = V_Rᵀ of rank R = min(out, in, Σ r_i) for linear/cat/svd (D has at most
// that rank) and R = min(out, in) for the pruning types (pruning destroys low rank), with r = lora_alpha = R
// and use_rslora off, so the new adapter's ΔW is D up to rounding.
//
// Numerics: everything is computed in double (PEFT computes in the adapters' dtype, float32), then stored
// in the layer's scalar type. SVDs use Eigen's BDCSVD in double; singular values are in decreasing order
// and each left singular vector's sign is chosen so that its entry of largest magnitude is positive (PEFT
// uses LAPACK's signs, so factors can differ from PEFT's by the sign of a column of B and the matching row
// of A; B·A does not). When the R-th and (R+1)-th singular values are equal the truncation is not unique,
// in PEFT either. magnitude pruning breaks ties in |t| by the lower flat index (torch.topk's tie order is
// unspecified).
//
// Randomness: the dare_* types drop entries with peft++'s counter-based generator (CombineOptions::seed),
// not torch.bernoulli, so the masks differ from PEFT's; the same seed gives the same result. With
// density ≥ 1 nothing is dropped and the results equal PEFT's.
//
// Differences from PEFT, by design: a new name that already exists is an AdapterError (PEFT silently
// returns); DoRA adapters and lora_bias are refused (PEFT would combine A and B and keep a freshly
// initialised magnitude / bias); a missing density for a pruning type is a ConfigError (PEFT fails with a
// TypeError); an SVD rank larger than min(out, in) is a ConfigError (PEFT fails or saves inconsistent shapes).
#pragma once

#include <Eigen/Dense>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "peft/adapted.hpp"
#include "peft/adapter/lora.hpp"
#include "peft/errors.hpp"
#include "peft/model.hpp"
#include "peft/rng.hpp"

namespace peft {

/// PEFT's combination_type values.
enum class Combination {
  linear,
  cat,
  svd,
  ties,
  ties_svd,
  dare_linear,
  dare_ties,
  dare_linear_svd,
  dare_ties_svd,
  magnitude_prune,
  magnitude_prune_svd,
};
inline constexpr Combination all_combinations[] = {Combination::linear,          Combination::cat,           Combination::svd,
                                                   Combination::ties,            Combination::ties_svd,      Combination::dare_linear,
                                                   Combination::dare_ties,       Combination::dare_linear_svd, Combination::dare_ties_svd,
                                                   Combination::magnitude_prune, Combination::magnitude_prune_svd};

inline const char* to_string(Combination c) {
  switch (c) {
    case Combination::linear: return "linear";
    case Combination::cat: return "cat";
    case Combination::svd: return "svd";
    case Combination::ties: return "ties";
    case Combination::ties_svd: return "ties_svd";
    case Combination::dare_linear: return "dare_linear";
    case Combination::dare_ties: return "dare_ties";
    case Combination::dare_linear_svd: return "dare_linear_svd";
    case Combination::dare_ties_svd: return "dare_ties_svd";
    case Combination::magnitude_prune: return "magnitude_prune";
    case Combination::magnitude_prune_svd: return "magnitude_prune_svd";
  }
  return "?";
}
/// Parses PEFT's spelling; ConfigError listing the valid names otherwise.
inline Combination combination_from_string(std::string_view s) {
  std::string all;
  for (Combination c : all_combinations) {
    if (s == to_string(c)) return c;
    all += (all.empty() ? "" : ", ") + std::string(to_string(c));
  }
  throw ConfigError(detail::cat("unknown combination type '", s, "' (expected one of ", all, ")"));
}

/// PEFT's majority_sign_method.
enum class MajoritySign { total, frequency };

struct CombineOptions {
  Combination type = Combination::svd;  ///< PEFT's default
  std::optional<int> svd_rank;          ///< rank of the *_svd results (default: the largest adapter rank)
  std::optional<double> svd_clamp;      ///< quantile for clamping the SVD factors (PEFT's svd_clamp)
  std::optional<double> density;        ///< fraction kept by the pruning types, in [0, 1] ((0, 1] for dare_*)
  MajoritySign majority_sign_method = MajoritySign::total;
  bool exact = false;                   ///< combine the delta weights and store them without loss (see the file comment)
  std::uint64_t seed = 0;               ///< DARE's random masks
  /// The rank PEFT takes for each listed adapter (its config's max(r, rank_pattern values)). Empty: the
  /// largest rank the adapter has on any layer, which is the same unless a config value is used by no layer.
  std::vector<int> adapter_ranks;
};

/// What add_weighted_adapter did.
struct CombineResult {
  Combination type = Combination::linear;  ///< the type used (linear when a single adapter was given)
  int rank = 0;                            ///< the new adapter's rank (its config r; exact: the largest per-layer rank)
  LoraConfig config;                       ///< the new adapter's config (r, lora_alpha as PEFT writes them)
  std::vector<std::string> modules;        ///< module paths of the layers that received it, in model order
  std::vector<std::pair<std::string, int>> layer_ranks;  ///< exact: the rank of each layer (path, R)
};

namespace merging {

/// Row-major dense matrix: the flat order is PyTorch's (row-major) order, which the pruning masks index.
using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Whether a type prunes (needs `density`).
inline bool prunes(Combination c) { return c != Combination::linear && c != Combination::cat && c != Combination::svd; }
inline bool is_svd(Combination c) {
  return c == Combination::svd || c == Combination::ties_svd || c == Combination::dare_linear_svd || c == Combination::dare_ties_svd ||
         c == Combination::magnitude_prune_svd;
}
inline bool is_dare(Combination c) {
  return c == Combination::dare_linear || c == Combination::dare_ties || c == Combination::dare_linear_svd || c == Combination::dare_ties_svd;
}
inline bool is_ties(Combination c) {
  return c == Combination::ties || c == Combination::ties_svd || c == Combination::dare_ties || c == Combination::dare_ties_svd;
}

/// merge_utils.magnitude_based_pruning: keeps the int(density · n) entries of largest magnitude (ties in
/// magnitude: the lower index first), zeroes the rest. density ≥ 1 keeps everything.
inline void prune_magnitude(std::span<double> t, double density) {
  if (density >= 1) return;
  const std::size_t n = t.size();
  const auto k = std::size_t(density * double(n));  // Python's int(): truncation
  if (k >= n) return;
  std::vector<std::size_t> idx(n);
  std::iota(idx.begin(), idx.end(), std::size_t(0));
  auto larger = [&](std::size_t a, std::size_t b) {
    const double x = std::abs(t[a]), y = std::abs(t[b]);
    return x > y || (x == y && a < b);
  };
  if (k > 0) std::nth_element(idx.begin(), idx.begin() + std::ptrdiff_t(k - 1), idx.end(), larger);
  std::vector<char> keep(n, 0);
  if (k > 0) {
    const std::size_t kth = idx[k - 1];
    for (std::size_t i = 0; i < n; ++i) keep[i] = !larger(kth, i);  // i is at least as large as the k-th
  }
  for (std::size_t i = 0; i < n; ++i)
    if (!keep[i]) t[i] = 0;
}

/// merge_utils.random_pruning with rescale: keeps each entry with probability `density` (a counter-based
/// draw from (seed, stream, index)) and divides the kept ones by density. density ≥ 1 keeps everything.
inline void prune_random(std::span<double> t, double density, std::uint64_t seed, std::uint64_t stream) {
  if (density >= 1) return;
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = detail::uniform01(seed, stream, i) < density ? t[i] / density : 0.0;
}

/// One of merge_utils' task-vector merges over k tensors of equal size (`tasks`, modified: pruned in
/// place), with one weight each. `stream` distinguishes the random masks of different calls.
inline std::vector<double> merge_tasks(Combination type, std::vector<std::vector<double>>& tasks, std::span<const double> w,
                                       const CombineOptions& opt, std::uint64_t stream) {
  const std::size_t k = tasks.size(), n = k ? tasks[0].size() : 0;
  const double density = opt.density.value_or(1.0);
  if (prunes(type)) {
    for (std::size_t i = 0; i < k; ++i) {
      if (is_dare(type)) prune_random(tasks[i], density, opt.seed, detail::mix64(stream * 131 + i));
      else prune_magnitude(tasks[i], density);
    }
  }
  std::vector<double> out(n, 0.0);
  if (!is_ties(type)) {  // task_arithmetic, magnitude_prune, dare_linear: Σ w_i t_i
    for (std::size_t i = 0; i < k; ++i)
      for (std::size_t j = 0; j < n; ++j) out[j] += w[i] * tasks[i][j];
    return out;
  }
  // ties / dare_ties: elect a sign per entry from the unweighted tensors, then the mean of the weighted
  // entries that agree with it (entries equal to 0 have sign 0 and never agree)
  auto sgn = [](double v) { return double((v > 0) - (v < 0)); };
  for (std::size_t j = 0; j < n; ++j) {
    double mag = 0;
    for (std::size_t i = 0; i < k; ++i) mag += opt.majority_sign_method == MajoritySign::total ? tasks[i][j] : sgn(tasks[i][j]);
    const double major = mag >= 0 ? 1.0 : -1.0;
    double sum = 0, count = 0;
    for (std::size_t i = 0; i < k; ++i)
      if (sgn(tasks[i][j]) == major) {
        sum += w[i] * tasks[i][j];
        count += 1;
      }
    out[j] = sum / std::max(count, 1.0);
  }
  return out;
}

/// The type applied to delta weights: the *_svd types and exact mode (linear and cat mean task arithmetic).
inline Combination delta_type(Combination c) {
  switch (c) {
    case Combination::linear:
    case Combination::cat:
    case Combination::svd: return Combination::linear;
    case Combination::ties_svd: return Combination::ties;
    case Combination::dare_linear_svd: return Combination::dare_linear;
    case Combination::dare_ties_svd: return Combination::dare_ties;
    case Combination::magnitude_prune_svd: return Combination::magnitude_prune;
    default: return c;
  }
}

/// torch.quantile(v, q) (linear interpolation between the order statistics).
inline double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double pos = q * double(v.size() - 1);
  const auto lo = std::size_t(std::floor(pos));
  const std::size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - double(lo)) * (v[hi] - v[lo]);
}

/// PEFT's svd_clamp: q = the `quantile` of the concatenated (signed) entries of B = U_R S_R and A = V_Rᵀ;
/// both are clamped to [-q, q]. The signed quantile depends on the SVD's sign convention (flipping a
/// column of B and a row of A changes it), so PEFT's clamped factors depend on LAPACK's signs.
inline void clamp_factors(Mat& A, Mat& B, double q) {
  std::vector<double> dist(std::size_t(B.size() + A.size()));
  std::copy(B.data(), B.data() + B.size(), dist.begin());
  std::copy(A.data(), A.data() + A.size(), dist.begin() + B.size());
  const double hi = quantile(std::move(dist), q), lo = -hi;
  B = B.cwiseMax(lo).cwiseMin(hi);
  A = A.cwiseMax(lo).cwiseMin(hi);
}

/// D ≈ B·A with B = U_R S_R [out, R], A = V_Rᵀ [R, in] (largest singular values first; each column of U
/// signed so that its largest-magnitude entry is positive). Optional clamp as PEFT's svd_clamp.
inline void svd_factor(const Mat& d, int rank, std::optional<double> clamp, Mat& A, Mat& B) {
  Eigen::BDCSVD<Eigen::MatrixXd> svd(Eigen::MatrixXd(d), Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::MatrixXd& U = svd.matrixU();
  const Eigen::MatrixXd& V = svd.matrixV();
  const Eigen::VectorXd& S = svd.singularValues();
  B.resize(d.rows(), rank);
  A.resize(rank, d.cols());
  for (int c = 0; c < rank; ++c) {
    Eigen::Index at = 0;
    U.col(c).cwiseAbs().maxCoeff(&at);
    const double sign = U(at, c) < 0 ? -1.0 : 1.0;
    B.col(c) = sign * S(c) * U.col(c);
    A.row(c) = sign * V.col(c).transpose();
  }
  if (clamp) clamp_factors(A, B, *clamp);
}

/// One adapter's factors on one layer, in double: A [r, in], B [out, r], its scaling and the user's weight.
struct Term {
  Mat A, B;
  double scaling = 1, weight = 1;
  int rank() const { return int(A.rows()); }
};

/// The combination of `terms` (the listed adapters present on one layer, in the listed order) as PEFT
/// computes it for one module: the new A [R, in] and B [out, R]. `new_rank` is the model-wide rank PEFT
/// allocates (cat pads to it; *_svd truncate to it; ignored by exact mode, which returns its own R).
/// `where` names the layer in errors.
inline void combine_terms(Combination type, const std::vector<Term>& terms, int new_rank, const CombineOptions& opt, std::uint64_t stream,
                          const std::string& where, Mat& A, Mat& B) {
  if (terms.empty()) throw AdapterError(detail::cat(where, ": none of the adapters to combine is on this layer"));
  const Eigen::Index in = terms[0].A.cols(), out = terms[0].B.rows();
  for (const auto& t : terms)
    if (t.A.cols() != in || t.B.rows() != out || t.B.cols() != t.A.rows())
      throw ShapeError(detail::cat(where, ": adapters of different shapes cannot be combined (A [", t.A.rows(), ", ", t.A.cols(), "], B [", t.B.rows(),
                                   ", ", t.B.cols(), "]; expected [r, ", in, "] and [", out, ", r])"));
  std::vector<double> w;
  for (const auto& t : terms) w.push_back(t.weight);

  if (opt.exact || is_svd(type)) {
    const Combination dt = delta_type(type);
    std::vector<std::vector<double>> deltas;
    int rank_sum = 0;
    for (const auto& t : terms) {
      Mat d = t.scaling * (t.B * t.A);
      deltas.emplace_back(d.data(), d.data() + d.size());
      rank_sum += t.rank();
    }
    const std::vector<double> merged = merge_tasks(dt, deltas, w, opt, stream);
    const Mat D = Eigen::Map<const Mat>(merged.data(), out, in);
    const int full = int(std::min(out, in));
    int R = new_rank;
    if (opt.exact) R = prunes(dt) ? full : std::min(full, rank_sum);
    if (R > full)
      throw ConfigError(detail::cat(where, ": the SVD rank ", R, " is larger than min(out, in) = ", full,
                                    " of this layer (PEFT's svd would fail or save inconsistent shapes); pass a smaller svd_rank"));
    svd_factor(D, R, opt.exact ? std::nullopt : opt.svd_clamp, A, B);
    return;
  }
  if (type == Combination::cat) {
    A = Mat::Zero(new_rank, in);
    B = Mat::Zero(out, new_rank);
    Eigen::Index row = 0;
    for (const auto& t : terms) {
      if (row + t.rank() > new_rank)
        throw ConfigError(detail::cat(where, ": the concatenated rank exceeds the new rank ", new_rank, " (an adapter has a larger rank here than its config's r)"));
      A.middleRows(row, t.rank()) = (t.weight * t.scaling) * t.A;
      B.middleCols(row, t.rank()) = t.B;
      row += t.rank();
    }
    return;
  }
  // linear, ties, dare_linear, dare_ties, magnitude_prune: A and B merged separately
  for (const auto& t : terms)
    if (t.rank() != terms[0].rank())
      throw ConfigError(detail::cat(where, ": combination type ", to_string(type), " needs adapters of equal rank, got ", terms[0].rank(), " and ", t.rank(),
                                    " (use cat or an svd type)"));
  std::vector<double> wa, wb;
  for (const auto& t : terms) {
    const double ws = t.weight * t.scaling;
    const double sign = ws >= 0 ? 1.0 : -1.0;
    wa.push_back(std::sqrt(std::abs(ws)) * sign);
    wb.push_back(std::sqrt(std::abs(ws)));
  }
  std::vector<std::vector<double>> as, bs;
  for (const auto& t : terms) {
    as.emplace_back(t.A.data(), t.A.data() + t.A.size());
    bs.emplace_back(t.B.data(), t.B.data() + t.B.size());
  }
  const auto a = merge_tasks(type, as, wa, opt, stream * 2);
  const auto b = merge_tasks(type, bs, wb, opt, stream * 2 + 1);
  A = Eigen::Map<const Mat>(a.data(), terms[0].rank(), in);
  B = Eigen::Map<const Mat>(b.data(), out, terms[0].rank());
}

/// Checks the options for `type` (density given and in range, clamp in [0, 1], svd_rank positive).
inline void validate(Combination type, const CombineOptions& opt) {
  if (prunes(type) || (opt.exact && prunes(delta_type(type)))) {
    if (!opt.density)
      throw ConfigError(detail::cat("add_weighted_adapter: combination type ", to_string(type), " needs a density (the fraction of entries kept, in [0, 1])"));
    const double d = *opt.density;
    if (!(d >= 0) || !std::isfinite(d)) throw ConfigError(detail::cat("add_weighted_adapter: density must be >= 0, got ", d));
    if (is_dare(type) && d == 0)
      throw ConfigError("add_weighted_adapter: density 0 with a dare type drops everything and divides by 0 (PEFT returns NaN); use a density > 0");
  }
  if (opt.svd_clamp && !(*opt.svd_clamp >= 0 && *opt.svd_clamp <= 1))
    throw ConfigError(detail::cat("add_weighted_adapter: svd_clamp is a quantile in [0, 1], got ", *opt.svd_clamp));
  if (opt.svd_rank && *opt.svd_rank <= 0) throw ConfigError(detail::cat("add_weighted_adapter: svd_rank must be positive, got ", *opt.svd_rank));
}

/// PEFT's _check_add_weighted_adapter: the type actually used and the new rank, from the adapters' ranks.
inline std::pair<Combination, int> plan(Combination type, std::span<const int> ranks, const CombineOptions& opt) {
  if (ranks.size() == 1) type = Combination::linear;
  int rank = 0;
  if (type == Combination::cat) {
    for (int r : ranks) rank += r;
  } else if (is_svd(type)) {
    rank = opt.svd_rank ? *opt.svd_rank : *std::max_element(ranks.begin(), ranks.end());
  } else {
    for (int r : ranks)
      if (r != ranks[0])
        throw ConfigError(detail::cat("add_weighted_adapter: all adapters must have the same r value when using combination type ", to_string(type),
                                      " (got ", ranks[0], " and ", r, "); use cat or an svd type"));
    rank = ranks[0];
  }
  return {type, rank};
}

}  // namespace merging

namespace detail {
template <class L>
struct is_adapted : std::false_type {};
template <class Base, class... Kinds>
struct is_adapted<Adapted<Base, Kinds...>> : std::true_type {
  static constexpr bool has_lora = (std::is_same_v<Kinds, Lora> || ...);
};

template <class Visit>
CombineResult add_weighted_adapter_impl(Visit&& visit, const std::vector<std::string>& adapters, const std::vector<double>& weights,
                                        const std::string& new_name, const CombineOptions& opt) {
  using merging::Mat;
  if (adapters.empty()) throw AdapterError("add_weighted_adapter: no adapters to combine");
  if (weights.size() != adapters.size())
    throw ConfigError(cat("add_weighted_adapter: ", adapters.size(), " adapters but ", weights.size(), " weights"));
  for (double w : weights)
    if (!std::isfinite(w)) throw ConfigError(cat("add_weighted_adapter: weights must be finite, got ", w));
  if (!opt.adapter_ranks.empty() && opt.adapter_ranks.size() != adapters.size())
    throw ConfigError(cat("add_weighted_adapter: adapter_ranks has ", opt.adapter_ranks.size(), " entries for ", adapters.size(), " adapters"));

  // pass 1: the adapters exist, are LoRA, not DoRA, no lora_bias; their ranks; the template config
  std::vector<int> ranks(adapters.size(), 0);
  std::optional<LoraConfig> first;
  bool name_taken = false;
  visit([&](auto& layer, const std::string& path) {
    using L = std::remove_cvref_t<decltype(layer)>;
    if constexpr (is_adapted<L>::value) {
      name_taken = name_taken || layer.has_adapter(new_name);
      for (std::size_t i = 0; i < adapters.size(); ++i) {
        if (!layer.has_adapter(adapters[i])) continue;
        if constexpr (!is_adapted<L>::has_lora) {
          throw AdapterError(cat("add_weighted_adapter: adapter '", adapters[i], "' on layer '", path, "' is not a LoRA adapter (only LoRA adapters can be combined)"));
        } else {
          const auto* a = [&]() -> const LoraAdapter<typename L::scalar, typename L::backend_type>* {
            try {
              return &layer.template adapter<Lora>(adapters[i]);
            } catch (const AdapterError&) {
              throw AdapterError(cat("add_weighted_adapter: adapter '", adapters[i], "' on layer '", path, "' is not a LoRA adapter (only LoRA adapters can be combined)"));
            }
          }();
          if (a->dora()) throw ConfigError(cat("add_weighted_adapter: adapter '", adapters[i], "' on layer '", path, "' uses DoRA, which cannot be combined"));
          if (a->config.lora_bias)
            throw ConfigError(cat("add_weighted_adapter: adapter '", adapters[i], "' on layer '", path, "' has lora_bias, which cannot be combined"));
          ranks[i] = std::max(ranks[i], a->r);
          if (i == 0 && !first) first = a->config;
        }
      }
    }
  });
  if (name_taken) throw AdapterError(cat("add_weighted_adapter: an adapter named '", new_name, "' already exists"));
  for (std::size_t i = 0; i < adapters.size(); ++i)
    if (ranks[i] == 0) throw AdapterError(cat("add_weighted_adapter: adapter '", adapters[i], "' does not exist on any layer"));
  if (!opt.adapter_ranks.empty()) ranks = opt.adapter_ranks;

  CombineResult res;
  // exact mode combines delta weights: any ranks, and the rank comes from each layer
  // (plain variables, not a structured binding: lambdas below capture them, which clang before 16 refuses)
  const std::pair<Combination, int> chosen =
      opt.exact ? std::pair{adapters.size() == 1 ? Combination::linear : opt.type, 0} : merging::plan(opt.type, ranks, opt);
  const Combination type = chosen.first;
  const int new_rank = chosen.second;
  merging::validate(type, opt);
  res.type = type;
  res.rank = new_rank;
  LoraConfig cfg = *first;
  cfg.r = new_rank;
  cfg.lora_alpha = new_rank;
  cfg.rank_pattern.clear();
  cfg.alpha_pattern.clear();
  if (opt.exact) cfg.use_rslora = false;
  cfg.init_lora_weights = LoraInit::zeros;

  // pass 2: compute every layer's factors (nothing is changed yet)
  struct Done {
    Mat A, B;
  };
  std::vector<Done> done;
  std::uint64_t layer_index = 0;
  visit([&](auto& layer, const std::string& path) {
    using L = std::remove_cvref_t<decltype(layer)>;
    if constexpr (is_adapted<L>::value && is_adapted<L>::has_lora) {
      std::vector<merging::Term> terms;
      for (std::size_t i = 0; i < adapters.size(); ++i) {
        if (!layer.has_adapter(adapters[i])) continue;
        const auto& a = layer.template adapter<Lora>(adapters[i]);
        merging::Term t;
        t.A = Eigen::Map<const Eigen::Matrix<typename L::scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(a.a.data(), a.r, a.in).template cast<double>();
        t.B = Eigen::Map<const Eigen::Matrix<typename L::scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(a.b.data(), a.out, a.r).template cast<double>();
        t.scaling = double(a.scaling);
        t.weight = weights[i];
        terms.push_back(std::move(t));
      }
      ++layer_index;
      if (terms.empty()) return;
      Done d;
      merging::combine_terms(type, terms, new_rank, opt, layer_index, cat("add_weighted_adapter: layer '", path, "'"), d.A, d.B);
      done.push_back(std::move(d));
    }
  });

  // pass 3: add the adapters (undone on failure)
  std::size_t k = 0;
  std::vector<std::function<void()>> undo;
  Generator gen(0);
  int max_rank = 0;
  try {
    visit([&](auto& layer, const std::string& path) {
      using L = std::remove_cvref_t<decltype(layer)>;
      if constexpr (is_adapted<L>::value && is_adapted<L>::has_lora) {
        bool any = false;
        for (const auto& n : adapters) any = any || layer.has_adapter(n);
        if (!any) return;
        const Done& d = done[k++];
        LoraConfig c = cfg;
        for (const auto& n : adapters)
          if (layer.has_adapter(n)) {
            c.fan_in_fan_out = layer.template adapter<Lora>(n).config.fan_in_fan_out;
            break;
          }
        c.r = int(d.A.rows());
        if (opt.exact) c.lora_alpha = c.r;
        max_rank = std::max(max_rank, c.r);
        layer.add_adapter(new_name, c, gen);
        undo.push_back([&layer, new_name] { layer.delete_adapter(new_name); });
        auto& a = layer.template adapter<Lora>(new_name);
        using S = typename L::scalar;
        for (Eigen::Index i = 0; i < d.A.size(); ++i) a.a.data()[i] = S(d.A.data()[i]);
        for (Eigen::Index i = 0; i < d.B.size(); ++i) a.b.data()[i] = S(d.B.data()[i]);
        res.modules.push_back(path);
        res.layer_ranks.emplace_back(path, c.r);
      }
    });
  } catch (...) {
    for (auto it = undo.rbegin(); it != undo.rend(); ++it) (*it)();
    throw;
  }
  if (opt.exact) {
    res.rank = max_rank;
    cfg.r = max_rank;
    cfg.lora_alpha = max_rank;
  }
  cfg.init_lora_weights = first->init_lora_weights;
  res.config = cfg;
  return res;
}
}  // namespace detail

/// PEFT's add_weighted_adapter: adds adapter `new_name` to every LoRA-capable layer of `target` (a model
/// struct walked with for_each_layer, or a single Adapted layer) that holds at least one of `adapters`,
/// combining them with `weights` as `options.type` prescribes (see the file comment). The new adapter is
/// added inactive and frozen, as PEFT does. Throws (and changes nothing) on unknown or non-LoRA adapters,
/// DoRA or lora_bias adapters, ranks the type cannot combine, bad options, or a name already in use.
template <class Target>
CombineResult add_weighted_adapter(Target& target, const std::vector<std::string>& adapters, const std::vector<double>& weights,
                                   const std::string& new_name, const CombineOptions& options = {}) {
  if constexpr (detail::is_adapted<Target>::value) {
    return detail::add_weighted_adapter_impl([&](auto&& f) { f(target, target.module_path()); }, adapters, weights, new_name, options);
  } else {
    return detail::add_weighted_adapter_impl([&](auto&& f) { for_each_layer(target, f); }, adapters, weights, new_name, options);
  }
}

}  // namespace peft
