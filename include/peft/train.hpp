// peft++ — training kit: optimizers, gradient clipping and learning-rate schedules.
#pragma once

#include "peft/train/optim.hpp"     // IWYU pragma: export
#include "peft/train/schedule.hpp"  // IWYU pragma: export
