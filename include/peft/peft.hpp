// peft++ — umbrella header for the CPU build. Never includes CUDA headers.
#pragma once

#include "peft/version.hpp"
#include "peft/errors.hpp"
#include "peft/view.hpp"
#include "peft/buffer.hpp"
#include "peft/rng.hpp"
#include "peft/grad_mode.hpp"
#include "peft/param.hpp"
#include "peft/backend/eigen_cpu.hpp"
#include "peft/layer/linear.hpp"
#include "peft/layer/embedding.hpp"
#include "peft/adapter/lora.hpp"
#include "peft/adapter/ia3.hpp"
#include "peft/adapter/lora_embedding.hpp"
#include "peft/adapted.hpp"
#include "peft/model.hpp"
