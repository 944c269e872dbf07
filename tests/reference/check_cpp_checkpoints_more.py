#!/usr/bin/env python3
"""C++ -> PEFT for AdaLoRA and VeRA: loads the adapters that peft++'s save_pretrained wrote
(test_pretrained_more "[.export]": adalora, vera with a modules_to_save head, adalora_truncated (truncated on
save by a rank_pattern), vera_cpp_projections) with Hugging Face PEFT's PeftModel.from_pretrained and compares
PEFT's outputs and merge_and_unload() weights with the C++ ones (max abs difference < 2e-5). A missing or
unexpected key warning is a failure.

    PEFT_PRETRAINED_EXPORT_DIR=/tmp/pm build/tests/test_pretrained_more "[.export]"
    /work/venv/bin/python tests/reference/check_cpp_checkpoints_more.py /tmp/pm
"""

import json
import os
import sys
import warnings

import torch
from safetensors.torch import load_file

from peft import PeftModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_checkpoints_adalora_vera import Net  # noqa: E402


def main(root):
    worst = 0.0
    failed = False
    cases_seen = sorted(os.listdir(root))
    for case in cases_seen:
        d = os.path.join(root, case)
        base = Net()
        base.load_state_dict(load_file(os.path.join(d, "base.safetensors")))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, os.path.join(d, "adapter"))
        load_warnings = [str(x.message) for x in w if "missing" in str(x.message).lower() or "unexpected" in str(x.message).lower()]
        model.eval()
        out = json.load(open(os.path.join(d, "cpp_outputs.json")))
        x = torch.tensor(out["x"]).reshape(out["x_shape"])
        with torch.no_grad():
            y = model(x)
        errs = {"y": (y.reshape(-1) - torch.tensor(out["y"])).abs().max().item()}
        merged = model.merge_and_unload().state_dict()
        for k, v in load_file(os.path.join(d, "merged.safetensors")).items():
            errs["merged " + k] = (merged[k] - v).abs().max().item()
        e = max(errs.values())
        worst = max(worst, e)
        ok = e < 2e-5 and not load_warnings
        if load_warnings:
            errs["load warnings"] = load_warnings
        failed = failed or not ok
        print(f"{case:24s} max |PEFT - C++| = {e:.3g}  {'ok' if ok else 'FAIL ' + str(errs)}")
    if not cases_seen:
        print("no case found under", root)
        failed = True
    print("worst", worst)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv[1])
