// The layers and adapters on a backend whose memory host code cannot touch (OffHost, tests/support): every
// weight adapter on Linear, Conv2d and Embedding, forward, backward, merge and unmerge, against the CPU
// backend bit for bit. A host access to a parameter or context buffer — the mistake that would break the
// CUDA backend at run time — faults here on any machine. The CUDA kernels' own index arithmetic is checked
// in test_conv2d (im2col/col2im); the kernels themselves need a GPU (tests/cuda).
#include <catch2/catch.hpp>

#include "backend_parity.hpp"
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
