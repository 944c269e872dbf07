#!/usr/bin/env python3
"""By-hand check that adapters written by `peft combine` load in Hugging Face PEFT (no missing/unexpected
keys) and give the outputs of PEFT's own add_weighted_adapter.

    /work/venv/bin/python tests/reference/check_cpp_combine.py BUILD/tools/peft_cli/combined

(the directory the cli.combine.* ctests write to, or the one of the `python` ctests,
BUILD/tests/python/cpp_combine). 'exact' (linear, --exact) is compared with PEFT's cat, which is the exact
linear combination too. Exits with 1 if any case differs or warns about missing/unexpected keys.
"""
import json, os, sys, warnings, torch
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gen_combine_reference import Net
from safetensors.torch import load_file
from peft import PeftModel
R = os.path.join(HERE, "checkpoints", "combine")
O = sys.argv[1]
ref = json.load(open(R + "/reference.json"))
ids = torch.tensor(ref["ids"]); img = torch.tensor(ref["tensors"]["img"]["data"]).reshape(2, 2, 4, 4)
failed = []
for case, refcase in [("exact", "cat"), ("svd", "svd"), ("ties", "ties"), ("rslora_svd", "rslora_svd"), ("cat_ranks", "cat_ranks")]:
    base = Net(); base.load_state_dict(load_file(R + "/base.safetensors"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = PeftModel.from_pretrained(base, O + "/" + case).eval()
        bad = [str(x.message) for x in w if "missing" in str(x.message).lower() or "unexpected" in str(x.message).lower()]
    with torch.no_grad():
        y, yc = m(ids, img)
    o = ref["cases"][refcase]["outputs"]
    d = max((y - torch.tensor(o["y_mlp"]["data"]).reshape(y.shape)).abs().max().item(), (yc - torch.tensor(o["y_conv"]["data"]).reshape(yc.shape)).abs().max().item())
    scale = max(1.0, y.abs().max().item(), yc.abs().max().item())
    print(f"{case}: PEFT with the peft++-combined adapter vs PEFT's own combination ({refcase}): scaled max difference {d / scale:.2e}; load warnings: {bad}")
    if not (d / scale < 2e-5) or bad:
        failed.append(case)
print("FAILED: " + ", ".join(failed) if failed else "all cases agree")
sys.exit(1 if failed else 0)
