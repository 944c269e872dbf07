#include <cmath>
#include <cstdio>
#include <peft/peft.hpp>

float other_tu_output();

int main() {
  peft::Generator gen(7);
  peft::Adapted<peft::Linear<float>, peft::Lora> layer(peft::Linear<float>(4, 2, true, gen));
  layer.add_adapter("default", peft::LoraConfig{}, gen);
  float x[4] = {1, 2, 3, 4}, y[2];
  auto ctx = layer.make_context(1);
  layer.forward(ctx, peft::view(x, 1, 4), peft::view(y, 1, 2));
  const float o = other_tu_output();
  std::printf("consumer: y = [%g, %g], other = %g, %s\n", y[0], y[1], o, peft::trainable_parameters_line(peft::count_parameters(layer)).c_str());
  return std::isfinite(y[0]) && std::isfinite(o) ? 0 : 1;
}
