// Test helper (not installed): compares two safetensors files tensor by tensor.
//   peft_compare_safetensors A B [TOL]
// Same tensor names, dtypes and shapes; for float tensors max|a − b| / max(1, max|b|) ≤ TOL (default 2e-5),
// other dtypes byte for byte. Prints the worst difference; exit code 0 when equal, 1 otherwise.
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include <peft/io/safetensors.hpp>

namespace st = peft::safetensors;

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " A.safetensors B.safetensors [TOL]\n";
    return 2;
  }
  const double tol = argc > 3 ? std::atof(argv[3]) : 2e-5;
  try {
    st::File a(argv[1]), b(argv[2]);
    bool ok = true;
    if (a.names() != b.names()) {
      std::cerr << "tensor names differ\n";
      return 1;
    }
    double worst = 0;
    for (const auto& n : a.names()) {
      const auto &ia = a.info(n), &ib = b.info(n);
      if (ia.dtype != ib.dtype || ia.shape != ib.shape) {
        std::cerr << n << ": dtype or shape differs\n";
        ok = false;
        continue;
      }
      if (!st::is_convertible(ia.dtype)) {
        const auto x = a.bytes(n), y = b.bytes(n);
        if (!std::equal(x.begin(), x.end(), y.begin(), y.end())) {
          std::cerr << n << ": bytes differ\n";
          ok = false;
        }
        continue;
      }
      std::vector<double> x(ia.numel()), y(ib.numel());
      a.read_as<double>(n, x);
      b.read_as<double>(n, y);
      double d = 0, m = 1;
      for (std::size_t i = 0; i < x.size(); ++i) {
        d = std::max(d, std::abs(x[i] - y[i]));
        m = std::max(m, std::abs(y[i]));
      }
      const double e = d / m;
      worst = std::max(worst, e);
      if (!(e <= tol)) {
        std::cerr << n << ": scaled difference " << e << " > " << tol << "\n";
        ok = false;
      }
    }
    std::cout << a.names().size() << " tensors, worst scaled difference " << worst << (ok ? " (ok)" : " (FAIL)") << "\n";
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
