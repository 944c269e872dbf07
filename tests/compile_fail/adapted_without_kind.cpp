// must not compile: an Adapted layer needs at least one adapter kind
#include <peft/peft.hpp>
peft::Adapted<peft::Linear<float>> layer;
