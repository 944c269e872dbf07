#!/usr/bin/env python3
"""Generate AdaLoRA reference data from real Hugging Face PEFT (0.21.2).

Two kinds of files:

* adalora_linear_{f32,f64}.json -- one adapted nn.Linear(10 -> 8) ("lin"), AdaLoRA init_r=4,
  lora_alpha=8, init_lora_weights=False (so E != 0): PEFT's tensors, the output and every gradient of
  <out, grad_out>, the orthogonal regulariser (AdaLoraModel.forward's term) and the gradients of
  <out, grad_out> + regulariser, the delta weight, the disabled output, the merged weight and output.

* adalora_alloc_f64.json -- a training run of a two-layer model (fc1: 6 -> 5, tanh, fc2: 5 -> 3) with
  AdaLoRA on both layers (init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12,
  orth_reg_weight=0.3, default init: E = 0). Every step: loss = mean((y - target)^2) + the
  regulariser (computed by AdaLoraModel.forward), backward, a plain SGD step on lora_A/E/B (ranknum
  is left alone; see docs/methods/adalora.md), model.base_model.update_and_allocate(step), zero_grad.
  Recorded per step: the loss terms, budget_schedule(step), the triplet scores and threshold of a
  mask (when one happens), every E after allocation, the EMAs of E, and config.rank_pattern. At the
  end: get_peft_model_state_dict (truncated to the kept ranks) and the saved rank_pattern.

Usage: /work/venv/bin/python tests/reference/gen_adalora_reference.py [--out DIR] [--check]
--check regenerates in memory and compares with the files on disk byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import types
import warnings

import torch
import torch.nn as nn

import peft
from peft import AdaLoraConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.adalora.layer import RankAllocator

SEED = 2024
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "data")


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def rec(t: torch.Tensor):
    t = t.detach().cpu().contiguous()
    return {"shape": list(t.shape), "data": [float(v) for v in t.reshape(-1).tolist()]}


def dumps(record) -> str:
    """Stable JSON: one line per tensor / per step."""
    lines = ["{"]
    keys = list(record)
    for i, k in enumerate(keys):
        sep = "," if i + 1 < len(keys) else ""
        v = record[k]
        if isinstance(v, dict) and k == "tensors":
            lines.append('  "tensors": {')
            items = list(v.items())
            for j, (name, t) in enumerate(items):
                s2 = "," if j + 1 < len(items) else ""
                lines.append(f"    {json.dumps(name)}: {json.dumps(t, allow_nan=False)}{s2}")
            lines.append("  }" + sep)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            lines.append(f"  {json.dumps(k)}: [")
            for j, e in enumerate(v):
                s2 = "," if j + 1 < len(v) else ""
                lines.append(f"    {json.dumps(e, sort_keys=True, allow_nan=False)}{s2}")
            lines.append("  ]" + sep)
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}{sep}")
    lines.append("}")
    return "\n".join(lines) + "\n"


class Out(types.SimpleNamespace):
    """A model output with a `loss`, so AdaLoraModel.forward adds the orthogonal regulariser."""


# ------------------------------------------------------------------------------------------------
# one layer
# ------------------------------------------------------------------------------------------------
class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 8)

    def forward(self, x, grad_out=None):
        y = self.lin(x)
        loss = (y * grad_out).sum() if grad_out is not None else None
        return Out(loss=loss, logits=y)


def gen_linear(dtype, tag):
    torch.manual_seed(SEED)
    with default_dtype(dtype):
        model = OneLinear()
        cfg = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10, orth_reg_weight=0.3,
                            init_lora_weights=False, target_modules=["lin"])
        pm = get_peft_model(model, cfg)
        layer = pm.base_model.model.lin
        x = torch.randn(5, 10)
        grad_out = torch.randn(5, 8)
        x_req = x.clone().requires_grad_(True)
    t = {}
    for n in ("lin.base_layer.weight", "lin.base_layer.bias"):
        t[n.replace("base_layer.", "")] = rec(dict(pm.base_model.model.named_parameters())[n])
    params = {k: layer.__getattr__(k)["default"] for k in ("lora_A", "lora_B", "lora_E")}
    for k, p in params.items():
        t[f"lin.{k}"] = rec(p)
    t["x"] = rec(x)
    t["grad_out"] = rec(grad_out)
    trainable = [n.replace("base_model.model.", "").replace(".default", "") for n, p in pm.named_parameters()
                 if p.requires_grad and "lora_" in n]
    # plain: <out, grad_out> through the inner model (no regulariser)
    out = pm.base_model.model(x_req, grad_out)
    out.loss.backward()
    t["out"] = rec(out.logits)
    t["grad.x"] = rec(x_req.grad)
    for k, p in params.items():
        t[f"grad.lin.{k}"] = rec(p.grad)
        p.grad = None
    # with the regulariser: AdaLoraModel.forward adds orth_reg_weight * mean ||.||_F
    out2 = pm.base_model(x, grad_out)
    reg = (out2.loss - (out2.logits * grad_out).sum()).item()
    out2.loss.backward()
    for k, p in params.items():
        t[f"grad_total.lin.{k}"] = rec(p.grad)
        p.grad = None
    # the regulariser by hand, to pin down its form (Frobenius norms, not squared; mean over A and B)
    A, B = params["lora_A"].detach(), params["lora_B"].detach()
    eye = torch.eye(4, dtype=dtype)
    hand = 0.3 * (torch.linalg.norm(A @ A.T - eye) + torch.linalg.norm(B.T @ B - eye)).item() / 2
    assert abs(hand - reg) < (1e-5 if dtype == torch.float32 else 1e-12), (hand, reg)
    with torch.no_grad():
        t["delta.lin"] = rec(layer.get_delta_weight("default"))
        with pm.disable_adapter():
            t["base_out"] = rec(pm.base_model.model(x).logits)
        pm.base_model.merge_adapter()
        t["merged.lin.weight"] = rec(layer.base_layer.weight)
        t["merged.lin.bias"] = rec(layer.base_layer.bias)
        t["merged_out"] = rec(pm.base_model.model(x).logits)
        assert torch.allclose(t_tensor(t["merged_out"], dtype), t_tensor(t["out"], dtype), atol=1e-5)
    return {
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "layer": "lin",
        "config": {"init_r": 4, "target_r": 2, "lora_alpha": 8, "total_step": 10, "orth_reg_weight": 0.3,
                   "init_lora_weights": False},
        "scaling": layer.scaling["default"],
        "ranknum": float(layer.ranknum["default"].item()),
        "orth_reg": reg,
        "trainable": trainable,
        "tensors": t,
    }


def t_tensor(r, dtype):
    return torch.tensor(r["data"], dtype=dtype).reshape(r["shape"])


# ------------------------------------------------------------------------------------------------
# the allocator on a training run
# ------------------------------------------------------------------------------------------------
class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x, target=None):
        y = self.fc2(torch.tanh(self.fc1(x)))
        loss = ((y - target) ** 2).mean() if target is not None else None
        return Out(loss=loss, logits=y)


ALLOC = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12, orth_reg_weight=0.3,
             beta1=0.85, beta2=0.85, lora_alpha=8)
STEPS = 14
LR = 0.5


def gen_alloc():
    dtype = torch.float64
    torch.manual_seed(SEED + 1)
    with default_dtype(dtype):
        model = TwoLayer()
        cfg = AdaLoraConfig(target_modules=["fc1", "fc2"], **ALLOC)
        pm = get_peft_model(model, cfg)
        x = torch.randn(8, 6)
        target = torch.randn(8, 3)
    inner = pm.base_model.model
    layers = {"fc1": inner.fc1, "fc2": inner.fc2}
    alloc = pm.base_model.rankallocator
    t = {}
    for name, l in layers.items():
        t[f"{name}.weight"] = rec(l.base_layer.weight)
        t[f"{name}.bias"] = rec(l.base_layer.bias)
        for k in ("lora_A", "lora_B", "lora_E"):
            t[f"{name}.{k}"] = rec(l.__getattr__(k)["default"])
    t["x"] = rec(x)
    t["target"] = rec(target)
    adapter_params = [l.__getattr__(k)["default"] for l in layers.values() for k in ("lora_A", "lora_E", "lora_B")]

    # capture the triplet scores of every mask_to_budget (PEFT calls _combine_ipt once per layer, in
    # named_parameters order: fc1, fc2)
    captured = []
    orig_combine = RankAllocator._combine_ipt

    def combine(self, ipt_E, ipt_AB):
        s = orig_combine(self, ipt_E, ipt_AB)
        captured.append(s.detach().clone())
        return s

    RankAllocator._combine_ipt = combine
    steps = []
    try:
        for step in range(STEPS):
            out = pm.base_model(x, target)
            task = ((out.logits - target) ** 2).mean().item()
            reg = out.loss.item() - task
            out.loss.backward()
            with torch.no_grad():
                for p in adapter_params:
                    p -= LR * p.grad
            budget, mask_ind = alloc.budget_schedule(step)
            captured.clear()
            pm.base_model.update_and_allocate(step)
            e = {}
            for name, l in layers.items():
                e[name] = [float(v) for v in l.lora_E["default"].detach().view(-1).tolist()]
            entry = {"step": step, "loss": task, "orth_reg": reg, "budget": budget, "mask": bool(mask_ind), "E": e}
            if captured:
                assert len(captured) == 2
                entry["scores"] = {"fc1": [float(v) for v in captured[0].tolist()],
                                   "fc2": [float(v) for v in captured[1].tolist()]}
                k = alloc.init_bgt - (alloc.target_bgt if step >= ALLOC["total_step"] - ALLOC["tfinal"] else budget)
                entry["k"] = k
                entry["threshold"] = torch.kthvalue(torch.cat(captured), k=k)[0].item()
            ema = {}
            for name in layers:
                key = f"{name}.lora_E.default"
                if key in alloc.exp_avg_ipt:
                    ema[name] = {"ipt": [float(v) for v in alloc.exp_avg_ipt[key].view(-1).tolist()],
                                 "unc": [float(v) for v in alloc.exp_avg_unc[key].view(-1).tolist()]}
            entry["ema_E"] = ema
            rp = pm.peft_config["default"].rank_pattern
            if rp:
                entry["rank_pattern"] = {k.split(".")[0]: [bool(b) for b in v] for k, v in rp.items()}
            steps.append(entry)
            pm.zero_grad()
            for p in adapter_params:
                p.grad = None
    finally:
        RankAllocator._combine_ipt = orig_combine

    sd = get_peft_model_state_dict(pm)
    saved = {k: rec(v) for k, v in sd.items()}
    saved_pattern = {k: [bool(b) for b in v] for k, v in pm.peft_config["default"].rank_pattern.items()}
    return {
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "dtype": "float64",
        "config": ALLOC,
        "steps_run": STEPS,
        "lr": LR,
        "init_budget": alloc.init_bgt,
        "target_budget": alloc.target_bgt,
        "saved_rank_pattern": saved_pattern,
        "state_dict": saved,
        "tensors": t,
        "steps": steps,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    files = {
        "adalora_linear_f32.json": gen_linear(torch.float32, "f32"),
        "adalora_linear_f64.json": gen_linear(torch.float64, "f64"),
        "adalora_alloc_f64.json": gen_alloc(),
    }
    bad = 0
    for name, record in files.items():
        text = dumps(record)
        path = os.path.join(args.out, name)
        if args.check:
            with open(path) as f:
                if f.read() != text:
                    print(f"DIFFERS: {name}")
                    bad += 1
        else:
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {path} ({len(text)} bytes)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
