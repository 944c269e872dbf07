#!/usr/bin/env python3
"""Golden AdaLoRA and VeRA checkpoints written by real Hugging Face PEFT (save_pretrained), for the
checkpoint interop tests (tests/unit/test_pretrained_more.cpp) and the `peft merge` command-line tests.

Usage (the venv of README.md in this directory):

    /work/venv/bin/python tests/reference/gen_checkpoints_adalora_vera.py [--out DIR] [--check]

The tiny model: lin0 Linear(6, 5) -> relu -> lin1 Linear(5, 4) -> relu -> head Linear(4, 3), input x [5, 6].

Cases under tests/reference/checkpoints/<case>/ (the layout of gen_checkpoints.py):
  adapter/adapter_config.json, adapter/adapter_model.safetensors   what PeftModel.save_pretrained writes
  base.safetensors                                                 the base model's state_dict() (float32)
  merged.safetensors                                               merge_and_unload().state_dict()
  reference.json                                                   x and PEFT's outputs (eval mode)

  adalora             AdaLoRA on lin0 and lin1 (init_r 4, target_r 2, lora_alpha 6, lora_dropout 0.1), trained
                      for total_step = 6 SGD steps with PEFT's update_and_allocate, so the saved config holds
                      the final rank_pattern and the saved tensors are truncated to the kept ranks (PEFT's
                      resize_state_dict_by_rank_pattern). The reference outputs and merged weights are those of
                      PeftModel.from_pretrained on the saved files (the resized layers, ranknum = init_r); the
                      script asserts they equal the trained model's (masked triplets have E = 0).
  vera                VeRA on lin0 and lin1 (r 3, projection_prng_key 11, d_initial 0.2) with save_projection
                      (base_model.vera_A [3, 6], base_model.vera_B [5, 3]: the largest in/out features; lin1
                      uses slices) and modules_to_save=["head"] (base_model.model.head.weight / .bias).
  vera_no_projection  adapter/ only: VeRA written with save_projection=False (no projections; loading must fail).

Every trainable parameter is perturbed with seeded noise before the outputs are taken, so no adapter is the
identity. --check regenerates into a temporary directory and compares with the files on disk (safetensors
byte for byte, JSON as JSON with target_modules sorted).
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
from peft import AdaLoraConfig, PeftModel, VeraConfig, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoint_gen  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 4711


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(6, 5)
        self.lin1 = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def tensors_json(d):
    return {k: {"shape": list(v.shape), "data": [float(x) for x in v.detach().reshape(-1).tolist()]} for k, v in sorted(d.items())}


def perturb(model, gen, scale=0.3):
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def save_adapter(model, path):
    model.create_or_update_model_card = lambda *a, **k: None  # needs Jinja2, holds nothing checkable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)


def write_case(case_dir, base_sd, merged_sd, x, y, y0, extra=None):
    save_file(base_sd, os.path.join(case_dir, "base.safetensors"), metadata={"format": "pt"})
    save_file(merged_sd, os.path.join(case_dir, "merged.safetensors"), metadata={"format": "pt"})
    ref = {
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "case": os.path.basename(case_dir),
        "tensors": tensors_json({"x": x, "y": y, "base_y": y0}),
    }
    if extra:
        ref.update(extra)
    with open(os.path.join(case_dir, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1, sort_keys=True)
        f.write("\n")


def state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def make_adalora(out_dir):
    torch.manual_seed(SEED)
    base = Net().float()
    x = torch.randn(5, 6)
    base_sd = state(base)
    with torch.no_grad():
        y0 = base(x)
    total = 6
    cfg = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, lora_dropout=0.1, tinit=1, tfinal=1, deltaT=1, beta1=0.8, beta2=0.9,
                        total_step=total, target_modules=["lin0", "lin1"])
    model = get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(SEED + 1)
    perturb(model, gen)
    g = torch.randn(5, 3, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    model.train()
    for step in range(total):
        loss = (model(x) * g).sum()
        loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        y_trained = model(x)
    rp = model.peft_config["default"].rank_pattern
    kept = {k.replace(".default", ""): sum(v) for k, v in rp.items()}  # PEFT's saved key form "<module>.lora_E"
    assert any(v < 4 for v in kept.values()), kept  # some layer was truncated

    case_dir = os.path.join(out_dir, "adalora")
    os.makedirs(case_dir, exist_ok=True)
    save_adapter(model, os.path.join(case_dir, "adapter"))

    # PEFT's own loader on the saved files: the layers resized to the kept ranks
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(case_dir, "adapter"))
    loaded.eval()
    for name, mod in loaded.named_modules():
        if hasattr(mod, "lora_E") and "default" in getattr(mod, "lora_E", {}):
            assert mod.lora_E["default"].shape[0] == mod.r["default"]
            assert float(mod.ranknum["default"]) == 4.0, (name, mod.ranknum["default"])
    with torch.no_grad():
        y = loaded(x)
    assert (y - y0).abs().max() > 1e-2
    assert torch.allclose(y, y_trained, atol=1e-5), (y - y_trained).abs().max()
    merged = copy.deepcopy(loaded).merge_and_unload()
    merged_sd = state(merged)
    assert sorted(merged_sd) == sorted(base_sd)
    with torch.no_grad():
        assert torch.allclose(merged(x), y, atol=1e-5)
    write_case(case_dir, base_sd, merged_sd, x, y, y0, {"kept_ranks": {k: int(v) for k, v in sorted(kept.items())}})


def make_vera(out_dir):
    torch.manual_seed(SEED + 10)
    base = Net().float()
    x = torch.randn(5, 6)
    base_sd = state(base)
    with torch.no_grad():
        y0 = base(x)
    cfg = VeraConfig(r=3, target_modules=["lin0", "lin1"], projection_prng_key=11, d_initial=0.2, modules_to_save=["head"])
    model = get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(SEED + 11)
    perturb(model, gen)
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert (y - y0).abs().max() > 1e-2

    case_dir = os.path.join(out_dir, "vera")
    os.makedirs(case_dir, exist_ok=True)
    save_adapter(model, os.path.join(case_dir, "adapter"))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(case_dir, "adapter"))
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), y, atol=1e-6)
    merged = copy.deepcopy(model).merge_and_unload()
    merged_sd = state(merged)
    assert sorted(merged_sd) == sorted(base_sd), sorted(merged_sd)
    with torch.no_grad():
        assert torch.allclose(merged(x), y, atol=1e-5)
    write_case(case_dir, base_sd, merged_sd, x, y, y0)

    # without the projections
    torch.manual_seed(SEED + 20)
    cfg = VeraConfig(r=2, target_modules=["lin0"], save_projection=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(Net().float(), cfg)
    perturb(model, torch.Generator().manual_seed(SEED + 21))
    save_adapter(model, os.path.join(out_dir, "vera_no_projection", "adapter"))


def generate(out_dir):
    make_adalora(out_dir)
    print("wrote", os.path.join(out_dir, "adalora"))
    make_vera(out_dir)
    print("wrote", os.path.join(out_dir, "vera"), "and", os.path.join(out_dir, "vera_no_projection"))



if __name__ == "__main__":
    checkpoint_gen.run(generate, lambda j: checkpoint_gen.sort_module_lists(j, ("target_modules",)))
