#!/usr/bin/env python3
"""C++ -> PEFT for AdaLoRA and VeRA: loads the adapters that peft++'s save_pretrained wrote
(test_pretrained_more "[.export]": adalora, vera with a modules_to_save head, adalora_truncated (truncated on
save by a rank_pattern), vera_cpp_projections) with Hugging Face PEFT's PeftModel.from_pretrained and compares
PEFT's outputs and merge_and_unload() weights with the C++ ones (max abs difference < 2e-5). A missing or
unexpected key warning is a failure.

    PEFT_PRETRAINED_EXPORT_DIR=/tmp/pm build/tests/test_pretrained_more "[.export]"
    /work/venv/bin/python tests/reference/check_cpp_checkpoints_more.py /tmp/pm
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_cpp_checkpoints import check_dir, max_diff  # noqa: E402
from gen_checkpoints_adalora_vera import Net  # noqa: E402


def outputs(model, out):
    return {"y": max_diff(model(torch.tensor(out["x"]).reshape(out["x_shape"])), out["y"])}


if __name__ == "__main__":
    check_dir(sys.argv[1], Net, outputs)
