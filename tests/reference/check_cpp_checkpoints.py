#!/usr/bin/env python3
"""C++ -> PEFT: loads the adapters that peft++'s save_pretrained wrote (test_pretrained "[.export]") with
Hugging Face PEFT's PeftModel.from_pretrained and compares PEFT's outputs and merged weights with the
C++ ones.

    PEFT_PRETRAINED_EXPORT_DIR=/tmp/pp build/tests/test_pretrained "[.export]"
    /work/venv/bin/python tests/reference/check_cpp_checkpoints.py /tmp/pp
"""

import json
import os
import sys
import warnings

import torch
from safetensors.torch import load_file

from peft import PeftModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_checkpoints import Net  # noqa: E402


def check_dir(root, make_net, run_outputs, tol=2e-5):
    """For each case under root: PeftModel.from_pretrained on make_net() with the case's base weights, then
    run_outputs(model, cpp_outputs_json) -> {name: max abs difference} for the outputs, plus every merged
    weight against merged.safetensors. Fails on a difference >= tol, a missing/unexpected-key warning or an
    empty root. Exits with the status."""
    worst = 0.0
    failed = False
    cases_seen = sorted(os.listdir(root))
    for case in cases_seen:
        d = os.path.join(root, case)
        base = make_net()
        base.load_state_dict(load_file(os.path.join(d, "base.safetensors")))
        with warnings.catch_warnings(record=True) as w:  # PEFT warns (does not fail) on missing/unexpected keys
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, os.path.join(d, "adapter"))
        load_warnings = [str(x.message) for x in w if "missing" in str(x.message).lower() or "unexpected" in str(x.message).lower()]
        model.eval()
        out = json.load(open(os.path.join(d, "cpp_outputs.json")))
        with torch.no_grad():
            errs = run_outputs(model, out)
        merged = model.merge_and_unload().state_dict()
        for k, v in load_file(os.path.join(d, "merged.safetensors")).items():
            errs["merged " + k] = (merged[k] - v).abs().max().item()
        e = max(errs.values())
        worst = max(worst, e)
        ok = e < tol and not load_warnings
        if load_warnings:
            errs["load warnings"] = load_warnings
        failed = failed or not ok
        print(f"{case:24s} max |PEFT - C++| = {e:.3g}  {'ok' if ok else 'FAIL ' + str(errs)}")
    if not cases_seen:
        print("no case found under", root)
        failed = True
    print("worst", worst)
    sys.exit(1 if failed else 0)


def max_diff(y, ref):
    return (y.reshape(-1) - torch.tensor(ref)).abs().max().item()


def mlp_and_conv_outputs(model, out):
    y_mlp, y_conv = model(torch.tensor(out["ids"]), torch.tensor(out["img"]).reshape(2, 2, 4, 4))
    return {"y_mlp": max_diff(y_mlp, out["y_mlp"]), "y_conv": max_diff(y_conv, out["y_conv"])}


if __name__ == "__main__":
    check_dir(sys.argv[1], Net, mlp_and_conv_outputs)
