#!/usr/bin/env python3
"""Golden adapter checkpoints written by real Hugging Face PEFT (save_pretrained), for the checkpoint
interop tests (tests/unit/test_pretrained.cpp) and the `peft merge` command-line tests.

Usage (the venv of README.md in this directory):

    /work/venv/bin/python tests/reference/gen_checkpoints.py [--out DIR] [--check]

For every case, tests/reference/checkpoints/<case>/ holds
  adapter/adapter_config.json, adapter/adapter_model.safetensors   what PeftModel.save_pretrained writes
  base.safetensors                                                 the base model's state_dict() (float32)
  merged.safetensors                                               merge_and_unload().state_dict()
  reference.json                                                   inputs and PEFT's outputs (eval mode)

The tiny model: emb Embedding(7, 6) -> lin0 Linear(6, 5) -> relu -> lin1 Linear(5, 4), and a separate
conv Conv2d(2, 3, 3, padding=1) on a [2, 2, 4, 4] image. Every adapter parameter is perturbed with seeded
noise after get_peft_model, so no adapter is the identity (DoRA's magnitude included). The script asserts
that each adapter changes the outputs and that merge_and_unload reproduces them.

--check regenerates into a temporary directory and compares every file with the one on disk byte for byte
(safetensors files are deterministic; JSON files are compared as JSON, with target_modules and
feedforward_modules sorted, since PEFT writes those Python sets in hash order).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings

import torch
import torch.nn as nn
from safetensors.torch import save_file

import peft
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoint_gen  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 2718


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.lin0 = nn.Linear(6, 5)
        self.lin1 = nn.Linear(5, 4)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, ids, img):
        return self.lin1(torch.relu(self.lin0(self.emb(ids)))), self.conv(img)


def cases():
    return {
        "lora": LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "lin0", "lin1", "conv"], init_lora_weights=False),
        "lora_rslora_patterns": LoraConfig(
            r=3, lora_alpha=5, use_rslora=True, lora_dropout=0.1, target_modules=r".*(lin0|lin1|conv)",
            rank_pattern={"lin1": 2}, alpha_pattern={"conv": 7}, lora_bias=True, init_lora_weights=False),
        "dora": LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=["lin0", "lin1"]),
        "loha": LoHaConfig(r=2, alpha=3, target_modules=["lin0", "lin1", "conv"], init_weights=False),
        "lokr": LoKrConfig(r=2, alpha=3, target_modules=["lin0", "lin1", "conv"], init_weights=False,
                           rank_pattern={"conv": 1}),
        "ia3": IA3Config(target_modules=["lin0", "lin1", "conv"], feedforward_modules=["lin1"], init_ia3_weights=False),
    }


def tensors_json(d):
    return {k: {"shape": list(v.shape), "data": [float(x) for x in v.detach().reshape(-1).tolist()]} for k, v in sorted(d.items())}


def make_case(name, config, out_dir, index):
    torch.manual_seed(SEED + index)
    base = Net().float()
    ids = torch.tensor([0, 3, 6, 2, 3])
    img = torch.randn(2, 2, 4, 4)
    base_sd = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    with torch.no_grad():
        y0_mlp, y0_conv = base(ids, img)

    model = get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(SEED * 7 + index)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.eval()
    with torch.no_grad():
        y_mlp, y_conv = model(ids, img)
    assert (y_mlp - y0_mlp).abs().max() > 1e-2 and ((y_conv - y0_conv).abs().max() > 1e-2 or name == "dora"), name

    case_dir = os.path.join(out_dir, name)
    os.makedirs(case_dir, exist_ok=True)
    # the README model card needs Jinja2 and holds nothing checkable: skip it
    model.create_or_update_model_card = lambda *a, **k: None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(os.path.join(case_dir, "adapter"))
    save_file(base_sd, os.path.join(case_dir, "base.safetensors"), metadata={"format": "pt"})

    merged = copy.deepcopy(model).merge_and_unload()
    merged_sd = {k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()}
    assert sorted(merged_sd) == sorted(base_sd), (name, sorted(merged_sd))
    with torch.no_grad():
        m_mlp, m_conv = merged(ids, img)
    assert torch.allclose(m_mlp, y_mlp, atol=1e-5) and torch.allclose(m_conv, y_conv, atol=1e-5), name
    save_file(merged_sd, os.path.join(case_dir, "merged.safetensors"), metadata={"format": "pt"})

    ref = {
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "case": name,
        "ids": ids.tolist(),
        "tensors": tensors_json({"img": img, "y_mlp": y_mlp, "y_conv": y_conv, "base_y_mlp": y0_mlp, "base_y_conv": y0_conv}),
    }
    with open(os.path.join(case_dir, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1, sort_keys=True)
        f.write("\n")


def generate(out_dir):
    for i, (name, cfg) in enumerate(cases().items()):
        make_case(name, cfg, out_dir, i)
        print("wrote", os.path.join(out_dir, name))
    # bases the adapters do not fit, for the command-line error tests: lin0 with 3 outputs instead of 5,
    # and a base without the embedding
    torch.manual_seed(SEED - 1)
    net = Net()
    net.lin0 = nn.Linear(6, 3)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(out_dir, "mismatched_base.safetensors"),
              metadata={"format": "pt"})
    sd = {k: v.contiguous() for k, v in Net().state_dict().items() if not k.startswith("emb.")}
    save_file(sd, os.path.join(out_dir, "base_without_emb.safetensors"), metadata={"format": "pt"})



if __name__ == "__main__":
    checkpoint_gen.run(generate)
