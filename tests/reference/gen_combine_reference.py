#!/usr/bin/env python3
"""Reference results of Hugging Face PEFT's LoraModel.add_weighted_adapter, for tests/unit/test_combine.cpp
and the `peft combine` command-line tests.

Usage (the venv of README.md in this directory):

    /work/venv/bin/python tests/reference/gen_combine_reference.py [--out DIR] [--check]

Writes tests/reference/checkpoints/combine/:
  base.safetensors                       the base model's state_dict() (float32)
  adapters/<name>/adapter_config.json,   the source LoRA adapters, each saved alone by save_pretrained
  adapters/<name>/adapter_model.safetensors
  combined/<case>/adapter_config.json,   PEFT's combined adapter for each case (save_pretrained)
  combined/<case>/adapter_model.safetensors
  reference.json                         per case: the call's arguments, the combined adapter's r / lora_alpha,
                                         per module its A, B and delta weight (get_delta_weight, with the new
                                         adapter's scaling, in the base weight's layout; conv flattened in C++), and the model's outputs with it active (eval)

The model is the one of gen_checkpoints.py: emb Embedding(7, 6) -> lin0 Linear(6, 5) -> relu ->
lin1 Linear(5, 4), and conv Conv2d(2, 3, 3, padding=1) on a [2, 2, 4, 4] image. Source adapters (all with
init_lora_weights=False and seeded noise, so none is the identity):
  t1 r=3 alpha=6, t2 r=3 alpha=3, t3 r=3 alpha=4        (equal ranks: every combination type)
  m2 r=2 alpha=2, m4 r=4 alpha=8 (lin0, lin1, emb only) (different ranks: cat and svd)
  rs1 r=2 alpha=4 rsLoRA, rs2 r=2 alpha=2 rsLoRA        (the rsLoRA quirk: the new scaling is sqrt(r))
(Adapter names must not be substrings of "lora_", or PEFT may reinitialise them when loading.)
DARE cases use density 1 (torch.bernoulli's masks cannot be reproduced outside torch).

--check regenerates into a temporary directory and compares every file (JSON as JSON, with
target_modules sorted; numbers to 1e-6 relative, as the SVD may differ in the last bits between runs).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import warnings

import torch
import torch.nn as nn
from safetensors.torch import save_file

import peft
from peft import LoraConfig, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoint_gen  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 4242


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.lin0 = nn.Linear(6, 5)
        self.lin1 = nn.Linear(5, 4)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, ids, img):
        return self.lin1(torch.relu(self.lin0(self.emb(ids)))), self.conv(img)


ALL = ["emb", "lin0", "lin1", "conv"]
ADAPTERS = {
    "t1": LoraConfig(r=3, lora_alpha=6, target_modules=ALL, init_lora_weights=False),
    "t2": LoraConfig(r=3, lora_alpha=3, target_modules=ALL, init_lora_weights=False),
    "t3": LoraConfig(r=3, lora_alpha=4, target_modules=ALL, init_lora_weights=False),
    "m2": LoraConfig(r=2, lora_alpha=2, target_modules=["emb", "lin0", "lin1"], init_lora_weights=False),
    "m4": LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "lin0", "lin1"], init_lora_weights=False),
    "rs1": LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=ALL, init_lora_weights=False),
    "rs2": LoraConfig(r=2, lora_alpha=2, use_rslora=True, target_modules=ALL, init_lora_weights=False),
}

ABC = (["t1", "t2", "t3"], [1.0, 0.6, -0.4])
# name -> (adapters, weights, kwargs)
CASES = {
    "linear": (*ABC, dict(combination_type="linear")),
    "cat": (*ABC, dict(combination_type="cat")),
    "svd": (*ABC, dict(combination_type="svd")),
    "svd_rank2": (*ABC, dict(combination_type="svd", svd_rank=2)),
    "svd_rank2_clamp": (*ABC, dict(combination_type="svd", svd_rank=2, svd_clamp=0.9)),
    "ties": (*ABC, dict(combination_type="ties", density=0.5)),
    "ties_frequency": (*ABC, dict(combination_type="ties", density=0.7, majority_sign_method="frequency")),
    "ties_svd": (*ABC, dict(combination_type="ties_svd", density=0.5)),
    "dare_linear": (*ABC, dict(combination_type="dare_linear", density=1.0)),
    "dare_ties": (*ABC, dict(combination_type="dare_ties", density=1.0)),
    "dare_linear_svd": (*ABC, dict(combination_type="dare_linear_svd", density=1.0)),
    "dare_ties_svd": (*ABC, dict(combination_type="dare_ties_svd", density=1.0, majority_sign_method="frequency")),
    "magnitude_prune": (*ABC, dict(combination_type="magnitude_prune", density=0.6)),
    "magnitude_prune_svd": (*ABC, dict(combination_type="magnitude_prune_svd", density=0.6)),
    "ties_two": (["t1", "t3"], [0.8, 1.3], dict(combination_type="ties", density=0.4)),
    "cat_ranks": (["m2", "m4"], [0.7, -1.1], dict(combination_type="cat")),
    "svd_ranks": (["m2", "m4"], [0.7, -1.1], dict(combination_type="svd", svd_rank=3)),
    "single_svd": (["t2"], [2.5], dict(combination_type="svd")),  # one adapter: PEFT uses linear
    "rslora_linear": (["rs1", "rs2"], [1.0, 0.5], dict(combination_type="linear")),
    "rslora_svd": (["rs1", "rs2"], [1.0, 0.5], dict(combination_type="svd")),
}


def tensors_json(d):
    return {k: {"shape": list(v.shape), "data": [float(x) for x in v.detach().reshape(-1).tolist()]} for k, v in sorted(d.items())}


def lora_layers(model):
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            out[name.replace("base_model.model.", "")] = m
    return out


def factors(layer, name):
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.lora_embedding_A[name], layer.lora_embedding_B[name]


def generate(out_dir):
    torch.manual_seed(SEED)
    base = Net().float()
    ids = torch.tensor([0, 3, 6, 2, 3])
    img = torch.randn(2, 2, 4, 4)
    root = os.path.join(out_dir, "combine")
    os.makedirs(root, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}, os.path.join(root, "base.safetensors"),
              metadata={"format": "pt"})

    names = list(ADAPTERS)
    model = get_peft_model(copy.deepcopy(base), ADAPTERS[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, ADAPTERS[n])
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for pn, p in sorted(model.named_parameters()):
            if "lora_" in pn:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.eval()
    model.create_or_update_model_card = lambda *a, **k: None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(os.path.join(root, "adapters"), selected_adapters=names)
    # save_pretrained puts the first adapter ("t1"), not being "default", in adapters/a as well
    for n in names:
        assert os.path.exists(os.path.join(root, "adapters", n, "adapter_model.safetensors")), n

    ref = {"peft_version": peft.__version__, "torch_version": torch.__version__, "ids": ids.tolist(),
           "tensors": tensors_json({"img": img}), "cases": {}}
    layers = lora_layers(model)
    for case, (adapters, weights, kw) in CASES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_weighted_adapter(adapters, weights, case, **kw)
        cfg = model.peft_config[case]
        model.set_adapter(case)
        with torch.no_grad():
            y_mlp, y_conv = model(ids, img)
        mods = {}
        for path, layer in sorted(layers.items()):
            if case not in layer.lora_A and case not in layer.lora_embedding_A:
                continue
            A, B = factors(layer, case)
            with torch.no_grad():
                d = layer.get_delta_weight(case)
            mods[path] = tensors_json({"A": A, "B": B, "delta": d})
        entry = {"adapters": adapters, "weights": weights, "kwargs": kw, "r": cfg.r, "lora_alpha": cfg.lora_alpha,
                 "use_rslora": cfg.use_rslora, "scaling": {p: l.scaling[case] for p, l in sorted(layers.items()) if case in l.scaling},
                 "modules": mods, "outputs": tensors_json({"y_mlp": y_mlp, "y_conv": y_conv})}
        ref["cases"][case] = entry
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(os.path.join(root, "combined"), selected_adapters=[case])
        print("case", case, "r =", cfg.r)
    with open(os.path.join(root, "reference.json"), "w") as f:
        json.dump(ref, f, indent=None, sort_keys=True)
        f.write("\n")
    print("wrote", root)


def normalized(j):
    if isinstance(j, dict):
        return {k: (sorted(v) if k == "target_modules" and isinstance(v, list) else normalized(v)) for k, v in j.items()}
    if isinstance(j, list):
        return [normalized(v) for v in j]
    return j


def close(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
    return a == b


if __name__ == "__main__":
    checkpoint_gen.run(generate, normalized, close)
