// must not compile: the layer has no adapter kind for this config type
#include <peft/peft.hpp>
struct OtherConfig {
  OtherConfig for_module(std::string_view) const { return *this; }
};
void f(peft::Adapted<peft::Linear<float>, peft::Lora>& l, peft::Generator& g) { l.add_adapter("x", OtherConfig{}, g); }
