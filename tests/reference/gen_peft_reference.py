#!/usr/bin/env python3
"""Generate LoRA reference data from real Hugging Face PEFT for the peft++ C++ tests.

Usage (see README.md in this directory for the venv setup and the pinned versions):

    /work/venv/bin/python tests/reference/gen_peft_reference.py [--out DIR] [--check]

Writes tests/reference/data/lora_<case>_<f32|f64>.json (or into --out).  Every case is
seeded independently (torch.manual_seed(SEED + case index)), so the output does not
depend on the order in which cases run and a rerun reproduces the files bit for bit
(given the same torch/peft versions and a CPU build of torch).

--check regenerates into memory and compares against the files on disk instead of writing.

The script is deliberately full of assertions (merged_out == out, base weights untouched
by training, an independent hand-written forward/backward matches PEFT, ...) so that it
fails loudly if PEFT's behaviour or the environment changes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import warnings

import torch
import torch.nn as nn

import peft
from peft import LoraConfig, get_peft_model

try:
    import transformers
    from transformers.pytorch_utils import Conv1D

    HAVE_TRANSFORMERS = True
except Exception:  # pragma: no cover - only hit when transformers is missing/broken
    transformers = None
    Conv1D = None
    HAVE_TRANSFORMERS = False

SEED = 1234
BATCH, IN, HID, OUT = 5, 10, 20, 6
LAYERS = ("lin0", "lin1")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "data")

DTYPES = {"f32": torch.float32, "f64": torch.float64}

ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
ADAMW_STEPS = 3

# Tolerances for the internal consistency assertions (not for the C++ tests).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------
class MLP(nn.Module):
    """lin0 -> ReLU -> lin1, with nn.Linear (weight (out,in)) or transformers Conv1D (weight (in,out))."""

    def __init__(self, conv1d: bool = False):
        super().__init__()
        if conv1d:
            self.lin0 = Conv1D(HID, IN)  # Conv1D(nf=out, nx=in): weight (in, out)
            self.lin1 = Conv1D(OUT, HID)
            # Conv1D initialises weight ~ N(0, 0.02) and bias = 0.  Zero bias would make the
            # reference weak, so re-initialise both like nn.Linear does: U(-1/sqrt(in), 1/sqrt(in)).
            with torch.no_grad():
                for lin, fan_in in ((self.lin0, IN), (self.lin1, HID)):
                    bound = 1.0 / math.sqrt(fan_in)
                    lin.weight.uniform_(-bound, bound)
                    lin.bias.uniform_(-bound, bound)
        else:
            self.lin0 = nn.Linear(IN, HID)
            self.lin1 = nn.Linear(HID, OUT)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


@contextlib.contextmanager
def default_dtype(dtype):
    """Build modules directly in `dtype` so f64 parameters are genuine doubles, not upcast floats."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# --------------------------------------------------------------------------------------
# case definitions
# --------------------------------------------------------------------------------------
def lora_cfg(**kw):
    base = dict(target_modules=list(LAYERS), init_lora_weights=False, lora_dropout=0.0)
    base.update(kw)
    return base


CASES = {
    # name: (list of (adapter_name, LoraConfig kwargs), conv1d?)
    "lora": ([("default", lora_cfg(r=4, lora_alpha=8))], False),
    "rslora": ([("default", lora_cfg(r=4, lora_alpha=8, use_rslora=True))], False),
    "lora_bias": ([("default", lora_cfg(r=4, lora_alpha=8, lora_bias=True))], False),
    "pattern": (
        [("default", lora_cfg(r=4, lora_alpha=8, rank_pattern={"lin1": 2}, alpha_pattern={"lin1": 3}))],
        False,
    ),
    "multi": (
        [
            ("a", lora_cfg(r=4, lora_alpha=8)),
            ("b", lora_cfg(r=2, lora_alpha=4, use_rslora=True)),
        ],
        False,
    ),
    "conv1d": ([("default", lora_cfg(r=4, lora_alpha=8, fan_in_fan_out=True))], True),
    "adamw": ([("default", lora_cfg(r=4, lora_alpha=8))], False),  # same model as "lora"
}
CASE_ORDER = ["lora", "rslora", "lora_bias", "pattern", "multi", "conv1d", "adamw"]
# "adamw" starts from exactly case 1's model: same seed, same construction.
CASE_SEED = {name: SEED + CASE_ORDER.index(name) for name in CASE_ORDER}
CASE_SEED["adamw"] = CASE_SEED["lora"]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def tensor_record(t: torch.Tensor):
    t = t.detach().cpu().contiguous()
    return {"shape": list(t.shape), "data": [float(v) for v in t.reshape(-1).tolist()]}


def assert_close(a, b, dtype, what, scale=1.0):
    tol = TOL[dtype]
    if not torch.allclose(a, b, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale):
        err = (a - b).abs().max().item()
        raise AssertionError(f"{what}: mismatch, max abs err {err:g}")


def lora_layer(pm, layer):
    return getattr(pm.base_model.model, layer)


def build(case: str, dtype: torch.dtype):
    """Returns (peft_model, x, G, adapters) freshly built from the case seed."""
    adapters, conv1d = CASES[case]
    torch.manual_seed(CASE_SEED[case])
    with default_dtype(dtype):
        model = MLP(conv1d=conv1d)
        model = model.double() if dtype == torch.float64 else model.float()
        x = torch.randn(BATCH, IN, dtype=dtype)
        G = torch.randn(BATCH, OUT, dtype=dtype)
        first_name, first_kw = adapters[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(model, LoraConfig(**first_kw), adapter_name=first_name)
            for name, kw in adapters[1:]:
                pm.add_adapter(name, LoraConfig(**kw))
    names = [a for a, _ in adapters]
    if len(names) > 1:
        pm.base_model.set_adapter(names)
    for layer in LAYERS:
        mod = lora_layer(pm, layer)
        assert list(mod.active_adapters) == names, (mod.active_adapters, names)
        for a in names:
            for p in list(mod.lora_A[a].parameters()) + list(mod.lora_B[a].parameters()):
                assert p.dtype == dtype, (layer, a, p.dtype)
                assert p.requires_grad, f"{layer}.{a} parameter does not require grad"
            if mod.lora_bias[a]:
                b = mod.lora_B[a].bias
                if torch.count_nonzero(b) == 0:  # make sure the LoRA bias is non-trivial
                    with torch.no_grad():
                        b.uniform_(-0.5, 0.5)
        base = mod.get_base_layer()
        assert not base.weight.requires_grad and not base.bias.requires_grad
    pm.eval()
    return pm, x, G, names


def lora_param_tensors(pm, names, prefix=""):
    out = {}
    for layer in LAYERS:
        mod = lora_layer(pm, layer)
        for a in names:
            out[f"{prefix}{layer}.lora_A.{a}"] = mod.lora_A[a].weight
            out[f"{prefix}{layer}.lora_B.{a}"] = mod.lora_B[a].weight
            if mod.lora_bias[a]:
                out[f"{prefix}{layer}.lora_B_bias.{a}"] = mod.lora_B[a].bias
    return out


def forward_with_hidden(pm, x):
    captured = {}
    h = lora_layer(pm, "lin0").register_forward_hook(lambda m, i, o: captured.__setitem__("hidden", o))
    try:
        out = pm(x)
    finally:
        h.remove()
    return out, captured["hidden"]


def manual_reference(pm, names, x, G, conv1d):
    """Independent re-implementation of the LoRA forward/backward (autograd on plain tensors)."""
    params = {}
    for layer in LAYERS:
        mod = lora_layer(pm, layer)
        base = mod.get_base_layer()
        W = base.weight.detach().clone()
        params[layer] = dict(W=W.t() if conv1d else W, b=base.bias.detach().clone(), ad={})
        for a in names:
            A = mod.lora_A[a].weight.detach().clone().requires_grad_(True)
            B = mod.lora_B[a].weight.detach().clone().requires_grad_(True)
            bb = mod.lora_B[a].bias.detach().clone().requires_grad_(True) if mod.lora_bias[a] else None
            params[layer]["ad"][a] = (A, B, bb, mod.scaling[a])
    xx = x.detach().clone().requires_grad_(True)

    def lin(layer, inp):
        p = params[layer]
        y = inp @ p["W"].t() + p["b"]
        for a in names:
            A, B, bb, s = p["ad"][a]
            z = (inp @ A.t()) @ B.t()
            if bb is not None:
                z = z + bb
            y = y + s * z
        return y

    hidden = lin("lin0", xx)
    out = lin("lin1", torch.relu(hidden))
    (out * G).sum().backward()
    grads = {"grad.x": xx.grad}
    for layer in LAYERS:
        for a, (A, B, bb, _) in params[layer]["ad"].items():
            grads[f"grad.{layer}.lora_A.{a}"] = A.grad
            grads[f"grad.{layer}.lora_B.{a}"] = B.grad
            if bb is not None:
                grads[f"grad.{layer}.lora_B_bias.{a}"] = bb.grad
    return out.detach(), hidden.detach(), grads


def describe_config(pm, names):
    cfg = {}
    for a in names:
        c = pm.peft_config[a]
        cfg[a] = {
            "r": c.r,
            "lora_alpha": c.lora_alpha,
            "use_rslora": bool(c.use_rslora),
            "lora_bias": bool(c.lora_bias),
            "fan_in_fan_out": bool(c.fan_in_fan_out),
            "rank_pattern": dict(c.rank_pattern or {}),
            "alpha_pattern": dict(c.alpha_pattern or {}),
            "target_modules": sorted(c.target_modules),
            "lora_dropout": c.lora_dropout,
            "init_lora_weights": c.init_lora_weights,
        }
    return cfg


# --------------------------------------------------------------------------------------
# record one case
# --------------------------------------------------------------------------------------
def generate(case: str, dkey: str):
    dtype = DTYPES[dkey]
    conv1d = CASES[case][1]
    pm, x, G, names = build(case, dtype)
    tensors = {}

    tensors["x"] = x.clone()
    tensors["grad_out"] = G.clone()
    for layer in LAYERS:
        base = lora_layer(pm, layer).get_base_layer()
        tensors[f"{layer}.weight"] = base.weight.detach().clone()
        tensors[f"{layer}.bias"] = base.bias.detach().clone()
    tensors.update({k: v.detach().clone() for k, v in lora_param_tensors(pm, names).items()})
    base_snapshot = {k: tensors[k].clone() for k in tensors if k.endswith((".weight", ".bias"))}

    scaling = {a: {layer: float(lora_layer(pm, layer).scaling[a]) for layer in LAYERS} for a in names}

    # forward + backward through PEFT
    xg = x.clone().requires_grad_(True)
    pm.zero_grad(set_to_none=True)
    out, hidden = forward_with_hidden(pm, xg)
    loss = (out * G).sum()
    loss.backward()
    tensors["out"] = out.detach().clone()
    tensors["hidden"] = hidden.detach().clone()
    tensors["grad.x"] = xg.grad.detach().clone()
    for k, p in lora_param_tensors(pm, names).items():
        assert p.grad is not None, f"no grad for {k}"
        tensors["grad." + k] = p.grad.detach().clone()
    for layer in LAYERS:
        base = lora_layer(pm, layer).get_base_layer()
        assert base.weight.grad is None and base.bias.grad is None, "base layer received a gradient"

    # adapters disabled
    with torch.no_grad(), pm.disable_adapter():
        tensors["base_out"] = pm(x).detach().clone()

    # delta weights
    for layer in LAYERS:
        mod = lora_layer(pm, layer)
        for a in names:
            d = mod.get_delta_weight(a).detach().clone()
            assert d.shape == mod.get_base_layer().weight.shape
            tensors[f"delta.{layer}.{a}"] = d

    # merge on a deep copy
    merged = copy.deepcopy(pm).merge_and_unload(adapter_names=list(names))
    assert not any("lora" in n for n, _ in merged.named_parameters()), "merge_and_unload left LoRA params"
    for layer in LAYERS:
        lin = getattr(merged, layer)
        assert type(lin) is (Conv1D if conv1d else nn.Linear), type(lin)
        tensors[f"merged.{layer}.weight"] = lin.weight.detach().clone()
        tensors[f"merged.{layer}.bias"] = lin.bias.detach().clone()
    with torch.no_grad():
        tensors["merged_out"] = merged(x).detach().clone()

    # ---------------- consistency assertions ----------------
    assert_close(tensors["merged_out"], tensors["out"], dtype, f"{case}/{dkey} merged_out vs out", scale=10)
    max_effect = (tensors["out"] - tensors["base_out"]).abs().max().item()
    assert max_effect > 1e-3, f"{case}/{dkey}: LoRA has no visible effect ({max_effect})"
    for layer in LAYERS:
        expect_w = tensors[f"{layer}.weight"] + sum(tensors[f"delta.{layer}.{a}"] for a in names)
        assert_close(tensors[f"merged.{layer}.weight"], expect_w, dtype, f"{case} merged {layer}.weight")
        expect_b = tensors[f"{layer}.bias"].clone()
        for a in names:
            if f"{layer}.lora_B_bias.{a}" in tensors:
                expect_b = expect_b + tensors[f"{layer}.lora_B_bias.{a}"] * scaling[a][layer]
        assert_close(tensors[f"merged.{layer}.bias"], expect_b, dtype, f"{case} merged {layer}.bias")
        for a in names:
            A, B = tensors[f"{layer}.lora_A.{a}"], tensors[f"{layer}.lora_B.{a}"]
            d = (B @ A) * scaling[a][layer]
            assert_close(tensors[f"delta.{layer}.{a}"], d.t() if conv1d else d, dtype, f"{case} delta {layer}.{a}")
            # scaling must follow the documented formula
            c = pm.peft_config[a]
            r = c.rank_pattern.get(layer, c.r) if c.rank_pattern else c.r
            alpha = c.alpha_pattern.get(layer, c.lora_alpha) if c.alpha_pattern else c.lora_alpha
            assert A.shape == (r, tensors[f"{layer}.weight"].shape[0 if conv1d else 1]), (layer, a, A.shape)
            s = alpha / math.sqrt(r) if c.use_rslora else alpha / r
            assert abs(s - scaling[a][layer]) < 1e-15, (layer, a, s, scaling[a][layer])
    if tensors.get("lin0.lora_B_bias.default") is not None:
        assert torch.count_nonzero(tensors["lin0.lora_B_bias.default"]) > 0
    m_out, m_hidden, m_grads = manual_reference(pm, names, x, G, conv1d)
    assert_close(m_out, tensors["out"], dtype, f"{case} manual out")
    assert_close(m_hidden, tensors["hidden"], dtype, f"{case} manual hidden")
    for k, g in m_grads.items():
        assert_close(g, tensors[k], dtype, f"{case} manual {k}", scale=10)
    for k, v in base_snapshot.items():
        assert torch.equal(v, tensors[k])

    record = {
        "case": case,
        "dtype": {torch.float32: "float32", torch.float64: "float64"}[dtype],
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__ if HAVE_TRANSFORMERS else None,
        "layer_type": "transformers.pytorch_utils.Conv1D" if conv1d else "torch.nn.Linear",
        "seed": CASE_SEED[case],
        "adapters": names,
        "config": describe_config(pm, names),
        "scaling": scaling,
    }

    # ---------------- AdamW training ----------------
    if case == "adamw":
        params = list(lora_param_tensors(pm, names).values())
        opt = torch.optim.AdamW(params, **ADAMW)
        losses = []
        for step in range(1, ADAMW_STEPS + 1):
            opt.zero_grad(set_to_none=True)
            o = pm(x)
            l = (o * G).sum()
            l.backward()
            losses.append(l.detach().clone())
            opt.step()
            for layer in LAYERS:
                mod = lora_layer(pm, layer)
                tensors[f"step{step}.{layer}.lora_A"] = mod.lora_A["default"].weight.detach().clone()
                tensors[f"step{step}.{layer}.lora_B"] = mod.lora_B["default"].weight.detach().clone()
        tensors["losses"] = torch.stack(losses)
        with torch.no_grad():
            tensors["trained_out"] = pm(x).detach().clone()
        # base weights must not have been touched by the optimizer
        for layer in LAYERS:
            base = lora_layer(pm, layer).get_base_layer()
            assert torch.equal(base.weight.detach(), tensors[f"{layer}.weight"]), f"{layer}.weight changed"
            assert torch.equal(base.bias.detach(), tensors[f"{layer}.bias"]), f"{layer}.bias changed"
        # ... and the LoRA params must have moved
        for layer in LAYERS:
            assert not torch.equal(tensors[f"step{ADAMW_STEPS}.{layer}.lora_A"], tensors[f"{layer}.lora_A.default"])
        # independent AdamW re-implementation (decoupled weight decay, PyTorch ordering)
        check_adamw(tensors, x, G, dtype)
        record["optimizer"] = {
            "name": "torch.optim.AdamW",
            "lr": ADAMW["lr"],
            "betas": list(ADAMW["betas"]),
            "eps": ADAMW["eps"],
            "weight_decay": ADAMW["weight_decay"],
            "amsgrad": False,
            "steps": ADAMW_STEPS,
        }

    record["tensors"] = {k: tensor_record(v) for k, v in tensors.items()}
    return record, max_effect


def check_adamw(tensors, x, G, dtype):
    b1, b2 = ADAMW["betas"]
    lr, eps, wd = ADAMW["lr"], ADAMW["eps"], ADAMW["weight_decay"]
    keys = [f"{layer}.lora_{m}" for layer in LAYERS for m in ("A", "B")]
    p = {k: tensors[k + ".default"].clone() for k in keys}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v = {k: torch.zeros_like(t) for k, t in p.items()}
    scale = {layer: 8 / 4 for layer in LAYERS}
    for step in range(1, ADAMW_STEPS + 1):
        leaves = {k: t.clone().requires_grad_(True) for k, t in p.items()}

        def lin(layer, inp):
            y = inp @ tensors[f"{layer}.weight"].t() + tensors[f"{layer}.bias"]
            return y + scale[layer] * ((inp @ leaves[f"{layer}.lora_A"].t()) @ leaves[f"{layer}.lora_B"].t())

        out = lin("lin1", torch.relu(lin("lin0", x)))
        (out * G).sum().backward()
        for k in keys:
            g = leaves[k].grad
            p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            bc1 = 1 - b1**step
            bc2 = 1 - b2**step
            denom = v[k].sqrt() / math.sqrt(bc2) + eps
            p[k] = p[k] - (lr / bc1) * m[k] / denom
            assert_close(p[k], tensors[f"step{step}.{k}"], dtype, f"adamw step{step} {k}", scale=10)


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------
def dumps(record) -> str:
    """Stable, diff-friendly JSON: one line per tensor, floats as Python repr (round-trip exact)."""
    lines = ["{"]
    head = [k for k in record if k != "tensors"]
    for k in head:
        lines.append(f"  {json.dumps(k)}: {json.dumps(record[k], sort_keys=True)},")
    lines.append('  "tensors": {')
    items = list(record["tensors"].items())
    for i, (name, t) in enumerate(items):
        sep = "," if i + 1 < len(items) else ""
        lines.append(f"    {json.dumps(name)}: {json.dumps(t, allow_nan=False)}{sep}")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="compare with existing files instead of writing")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # keep reductions deterministic across machines
    os.makedirs(args.out, exist_ok=True)
    print(f"peft {peft.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__ if HAVE_TRANSFORMERS else 'MISSING'}")
    failures = 0
    for case in CASE_ORDER:
        if CASES[case][1] and not HAVE_TRANSFORMERS:
            print(f"skip {case}: transformers is not available")
            continue
        for dkey in DTYPES:
            rec, effect = generate(case, dkey)
            text = dumps(rec)
            json.loads(text)  # sanity: valid JSON
            path = os.path.join(args.out, f"lora_{case}_{dkey}.json")
            if args.check:
                with open(path) as f:
                    same = f.read() == text
                failures += not same
                print(f"{'OK  ' if same else 'DIFF'} {path}")
            else:
                with open(path, "w") as f:
                    f.write(text)
                print(f"wrote {path} ({len(text)} bytes, max|out-base_out|={effect:.6g})")
    if failures:
        print(f"{failures} file(s) differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
