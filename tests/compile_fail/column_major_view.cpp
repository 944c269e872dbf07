// must not compile: peft views are row-major; a column-major Eigen matrix is rejected
#include <peft/peft.hpp>
void f(Eigen::MatrixXf& m) { peft::MatrixView<float> v = m; (void)v; }
