// xtensor containers and adaptors as inputs and outputs of peft++ layers, without copies.
#include <catch2/catch.hpp>
#include <peft/interop/xtensor.hpp>
#include <xtensor/xadapt.hpp>
#include <xtensor/xarray.hpp>
#include <xtensor/xtensor.hpp>

#include "test_util.hpp"

using namespace peft;
using namespace peft::test;

TEST_CASE("xtensor: containers and adaptors are viewed in place and give the same outputs as Eigen", "[interop][xtensor]") {
  Generator g(1);
  Adapted<Linear<float>, Lora> layer(Linear<float>(4, 3, true, g));
  LoraConfig cfg;
  cfg.r = 2;
  cfg.init_lora_weights = LoraInit::off;
  layer.add_adapter("default", cfg, g);
  const Mat<float> xe = random_mat<float>(5, 4, 2);
  xt::xtensor<float, 2> x = xt::zeros<float>({5, 4});
  std::copy(xe.data(), xe.data() + 20, x.data());
  xt::xtensor<float, 2> y = xt::zeros<float>({5, 3});
  auto ctx = layer.make_context(5);
  const auto xv = xview(x);
  CHECK(xv.data == x.data());
  layer.forward(ctx, xview(std::as_const(x)), xview(y));
  Mat<float> ye(5, 3);
  layer.forward(ctx, xe, ye);
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 3; ++j) CHECK(y(i, j) == ye(i, j));
  // an adaptor over a raw buffer
  std::vector<float> buf(15, 0.f);
  auto ya = xt::adapt(buf.data(), buf.size(), xt::no_ownership(), std::vector<std::size_t>{5, 3});
  layer.forward(ctx, xview(std::as_const(x)), xview(ya));
  CHECK(buf[7] == ye(2, 1));
  // a single row and 1-D vectors
  xt::xtensor<float, 1> v = xt::zeros<float>({4});
  CHECK(xview(v).rows == 1);
  CHECK(xview(v).cols == 4);
  xt::xarray<float, xt::layout_type::column_major> cm = xt::zeros<float>({3, 4});
  REQUIRE_THROWS_WITH(xview(cm), Catch::Contains("not row-major"));
  xt::xarray<float> three = xt::zeros<float>({2, 2, 2});
  REQUIRE_THROWS_WITH(xview(three), Catch::Contains("3 dimensions"));
}
