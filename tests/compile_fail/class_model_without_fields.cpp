// must not compile: a model class with a constructor is not an aggregate, so its layers cannot be found
// without peft_fields(); the walkers refuse it instead of finding no layer
#include <peft/peft.hpp>
class Net {
 public:
  explicit Net(peft::Generator& g) : fc_(4, 2, true, g) {}

 private:
  peft::Linear<float> fc_;
};
void f(Net& n) { (void)peft::parameters<float>(n); }
