// must not compile: a const Eigen matrix gives only a const view
#include <peft/peft.hpp>
void f(const Eigen::Matrix<float, -1, -1, Eigen::RowMajor>& m) { peft::MatrixView<float> v = m; (void)v; }
