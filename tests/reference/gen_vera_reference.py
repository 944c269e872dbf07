#!/usr/bin/env python3
"""Generate VeRA reference data from real Hugging Face PEFT for the cases the single-layer file
(gen_adapters_reference.py, vera_linear_default_*.json) does not cover:

* ``vera_shared``: two nn.Linear layers of different sizes in one model, sharing one pair of
  projections: lin0 (10 -> 8) and lin1 (6 -> 12), so vera_A is (r, 10) and vera_B is (12, r), and
  lin0 slices the rows of vera_B while lin1 slices the columns of vera_A. init_weights=False (random
  lambdas), r=4, projection_prng_key=3.
* ``vera_conv1d``: a transformers Conv1D (weight stored [in, out], fan_in_fan_out=True) 7 -> 9 beside an
  nn.Linear 5 -> 4 (PEFT switches fan_in_fan_out per layer), r=3.
* ``vera_init``: the default init (init_weights=True) with d_initial=0.25 on two layers: lambda_b = 0,
  lambda_d = 0.25, the output is the base output exactly.

Each file also records the checkpoint keys and shapes PEFT writes (get_peft_model_state_dict, the dict
save_pretrained stores in adapter_model.safetensors) with save_projection=True.

Usage (the venv of README.md):

    /work/venv/bin/python tests/reference/gen_vera_reference.py [--out DIR] [--check]

Writes tests/reference/data/vera_{shared,conv1d,init}_{f32,f64}.json. --check regenerates in memory and
compares byte for byte. The script asserts, and fails loudly otherwise, that: the projections are
torch's uniform(+-sqrt(6/fan_in)) drawn from torch.Generator().manual_seed(projection_prng_key), A first
(A: fan_in = max_in, B: fan_in = r); every layer references the same projection tensors; a hand-written
forward (plain torch ops, sliced projections) reproduces the output and, via autograd, every gradient;
the projections get no gradient; get_delta_weight = diag(lb) B_s diag(ld) A_s (transposed for Conv1D);
merged weights = W + delta; merged_out ~= out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import warnings

import torch
import torch.nn as nn

import peft
from peft import VeraConfig, get_peft_model, get_peft_model_state_dict
from transformers.pytorch_utils import Conv1D

from gen_adapters_reference import TRANSFORMERS_VERSION, dumps, tensor_record

SEED = 9100
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "data")
DTYPES = {"f32": torch.float32, "f64": torch.float64}
DTYPE_NAME = {torch.float32: "float32", torch.float64: "float64"}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}

# layer name -> (kind, in, out, batch)
CASES = [
    dict(case="shared", layers={"lin0": ("linear", 10, 8, 5), "lin1": ("linear", 6, 12, 3)},
         cfg=dict(r=4, init_weights=False, projection_prng_key=3)),
    dict(case="conv1d", layers={"c_attn": ("conv1d", 7, 9, 4), "lin": ("linear", 5, 4, 2)},
         cfg=dict(r=3, init_weights=False, projection_prng_key=0, fan_in_fan_out=True)),
    dict(case="init", layers={"lin0": ("linear", 10, 8, 5), "lin1": ("linear", 6, 12, 3)},
         cfg=dict(r=4, init_weights=True, d_initial=0.25, projection_prng_key=0)),
]
for _i, _c in enumerate(CASES):
    _c["name"] = f"vera_{_c['case']}"
    _c["seed"] = SEED + _i


class Layers(nn.Module):
    """Independent layers, each with its own input; forward returns one output per layer."""

    def __init__(self, layers):
        super().__init__()
        self.names = list(layers)
        for n, (kind, i, o, _) in layers.items():
            setattr(self, n, nn.Linear(i, o, bias=True) if kind == "linear" else Conv1D(o, i))

    def forward(self, xs):
        return [getattr(self, n)(x) for n, x in zip(self.names, xs)]


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def assert_close(a, b, dtype, what, scale=1.0):
    tol = TOL[dtype]
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if not torch.allclose(a, b, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale):
        raise AssertionError(f"{what}: mismatch, max abs err {(a - b).abs().max().item():g}")


def weight_out_in(layer):
    """The weight as [out, in] whatever the layer type stores."""
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


def generate(case, dkey):
    dtype = DTYPES[dkey]
    torch.manual_seed(case["seed"])
    with default_dtype(dtype):
        model = Layers(case["layers"])
        model = model.double() if dtype == torch.float64 else model.float()
        with torch.no_grad():  # Conv1D starts with a zero bias: make it visible
            for n in model.names:
                getattr(model, n).bias.uniform_(-0.5, 0.5)
        xs = [torch.randn(b, i, dtype=dtype) for (_, i, _, b) in case["layers"].values()]
        Gs = [torch.randn(b, o, dtype=dtype) for (_, _, o, b) in case["layers"].values()]
        cfg = VeraConfig(target_modules=list(case["layers"]), save_projection=True, vera_dropout=0.0, **case["cfg"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fan_in_fan_out switched per layer
            pm = get_peft_model(model, cfg)
    vm = pm.base_model
    r = case["cfg"]["r"]
    max_in = max(i for (_, i, _, _) in case["layers"].values())
    max_out = max(o for (_, _, o, _) in case["layers"].values())
    A, B = vm.vera_A["default"], vm.vera_B["default"]
    assert tuple(A.shape) == (r, max_in) and tuple(B.shape) == (max_out, r), (A.shape, B.shape)
    # the projections: kaiming-uniform with gain sqrt(2) from a generator seeded with the key, A first, drawn
    # in the default dtype (so the f32 and f64 files hold different projections for the same key)
    gen = torch.Generator(device="cpu").manual_seed(case["cfg"]["projection_prng_key"])
    def bound(fan):  # sqrt(3) * gain / sqrt(fan), gain = sqrt(2), in PEFT's order of operations
        return math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan))

    ea = torch.empty(r, max_in, dtype=dtype).uniform_(-bound(max_in), bound(max_in), generator=gen)
    eb = torch.empty(max_out, r, dtype=dtype).uniform_(-bound(r), bound(r), generator=gen)
    assert torch.equal(A, ea) and torch.equal(B, eb), "projection init rule changed"
    layers = {n: getattr(vm.model, n) for n in case["layers"]}
    for n, l in layers.items():
        assert l.vera_A["default"] is A and l.vera_B["default"] is B, f"{n} does not share the projections"
        assert l.fan_in_fan_out == (case["layers"][n][0] == "conv1d")

    if not case["cfg"]["init_weights"]:
        for l in layers.values():
            lb = l.vera_lambda_b["default"]
            assert torch.equal(lb.detach(), torch.ones_like(lb)), "init_weights=False: lambda_b should be ones"
            with torch.no_grad():
                lb.copy_(torch.randn_like(lb))
    else:
        for l in layers.values():
            assert torch.equal(l.vera_lambda_b["default"].detach(), torch.zeros_like(l.vera_lambda_b["default"]))
            assert torch.all(l.vera_lambda_d["default"].detach() == case["cfg"]["d_initial"])
    pm.eval()

    sd = get_peft_model_state_dict(pm)
    ckpt = {k: list(v.shape) for k, v in sorted(sd.items())}
    expect_keys = {"base_model.vera_A", "base_model.vera_B"}
    for n in case["layers"]:
        expect_keys |= {f"base_model.model.{n}.vera_lambda_b", f"base_model.model.{n}.vera_lambda_d"}
    assert set(ckpt) == expect_keys, sorted(ckpt)
    trainable = sorted(n for n, p in pm.named_parameters() if p.requires_grad)

    T = {"vera_A": A.detach().clone(), "vera_B": B.detach().clone()}
    for n, l in layers.items():
        base = l.get_base_layer()
        T[f"{n}.weight"] = base.weight.detach().clone()
        T[f"{n}.bias"] = base.bias.detach().clone()
        T[f"{n}.vera_lambda_b"] = l.vera_lambda_b["default"].detach().clone()
        T[f"{n}.vera_lambda_d"] = l.vera_lambda_d["default"].detach().clone()
    snap = {k: v.clone() for k, v in T.items()}

    pm.zero_grad(set_to_none=True)
    xin = [x.clone().requires_grad_(True) for x in xs]
    outs = pm(xin)
    sum((o * g).sum() for o, g in zip(outs, Gs)).backward()
    assert A.grad is None and B.grad is None and not A.requires_grad and not B.requires_grad
    with torch.no_grad(), pm.disable_adapter():
        base_outs = pm(xs)
    merged = copy.deepcopy(pm).merge_and_unload()
    with torch.no_grad():
        merged_outs = merged(xs)

    for k, (n, l) in enumerate(layers.items()):
        kind, i, o, _ = case["layers"][n]
        base = l.get_base_layer()
        assert base.weight.grad is None and base.bias.grad is None
        T[f"{n}.x"] = xs[k].clone()
        T[f"{n}.grad_out"] = Gs[k].clone()
        T[f"{n}.out"] = outs[k].detach().clone()
        T[f"{n}.grad.x"] = xin[k].grad.detach().clone()
        T[f"{n}.grad.vera_lambda_b"] = l.vera_lambda_b["default"].grad.detach().clone()
        T[f"{n}.grad.vera_lambda_d"] = l.vera_lambda_d["default"].grad.detach().clone()
        T[f"{n}.base_out"] = base_outs[k].detach().clone()
        with torch.no_grad():
            T[f"{n}.delta"] = l.get_delta_weight("default").detach().clone()
        ml = getattr(merged, n)
        assert type(ml) is type(base)
        T[f"{n}.merged.weight"] = ml.weight.detach().clone()
        T[f"{n}.merged.bias"] = ml.bias.detach().clone()
        T[f"{n}.merged_out"] = merged_outs[k].detach().clone()

        # ---- independent checks from the recorded tensors ----
        what = f"{case['name']}/{dkey}/{n}"
        lb = T[f"{n}.vera_lambda_b"].clone().requires_grad_(True)
        ld = T[f"{n}.vera_lambda_d"].clone().requires_grad_(True)
        x = xs[k].clone().requires_grad_(True)
        As, Bs = T["vera_A"][:, :i], T["vera_B"][:o, :]
        W = weight_out_in(base).detach()
        y = x @ W.t() + T[f"{n}.bias"] + lb * ((ld * (x @ As.t())) @ Bs.t())
        assert_close(y.detach(), T[f"{n}.out"], dtype, f"{what} manual out", 10)
        (y * Gs[k]).sum().backward()
        assert_close(x.grad, T[f"{n}.grad.x"], dtype, f"{what} manual grad.x", 10)
        assert_close(lb.grad, T[f"{n}.grad.vera_lambda_b"], dtype, f"{what} manual grad lambda_b", 10)
        assert_close(ld.grad, T[f"{n}.grad.vera_lambda_d"], dtype, f"{what} manual grad lambda_d", 10)
        with torch.no_grad():
            d = (lb[:, None] * Bs) @ (ld[:, None] * As)  # [out, in]
            if kind == "conv1d":
                d = d.t()
            assert_close(d, T[f"{n}.delta"], dtype, f"{what} manual delta", 10)
            assert_close(T[f"{n}.weight"] + d, T[f"{n}.merged.weight"], dtype, f"{what} merged weight", 10)
            assert torch.equal(T[f"{n}.bias"], T[f"{n}.merged.bias"])
            assert_close(T[f"{n}.merged_out"], T[f"{n}.out"], dtype, f"{what} merged_out", 20)
            eff = (T[f"{n}.out"] - T[f"{n}.base_out"]).abs().max().item()
            if case["cfg"]["init_weights"]:
                assert torch.equal(T[f"{n}.out"], T[f"{n}.base_out"]), f"{what}: default init is not the identity"
            else:
                assert eff > 1e-3, f"{what}: VeRA has no visible effect ({eff})"
    for k, v in snap.items():
        cur = T[k]
        assert torch.equal(v, cur), f"{k} changed"

    cfgd = pm.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, (set, frozenset)) else v) for k, v in cfgd.items()
              if k in ("r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "fan_in_fan_out",
                       "bias", "init_weights", "target_modules")}
    config["peft_type"] = str(cfgd["peft_type"].value if hasattr(cfgd["peft_type"], "value") else cfgd["peft_type"])
    record = {
        "case": case["name"],
        "method": "vera",
        "dtype": DTYPE_NAME[dtype],
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "transformers_version": TRANSFORMERS_VERSION,
        "seed": case["seed"],
        "layers": [{"name": n, "type": "transformers.Conv1D" if kind == "conv1d" else "torch.nn.Linear",
                    "in_features": i, "out_features": o, "batch": b, "fan_in_fan_out": kind == "conv1d"}
                   for n, (kind, i, o, b) in case["layers"].items()],
        "config": {"default": config},
        "projection_shapes": {"vera_A": [r, max_in], "vera_B": [max_out, r]},
        "checkpoint_keys": ckpt,
        "trainable": trainable,
        "tensors": {k: tensor_record(v) for k, v in T.items()},
    }
    return record


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    failures = 0
    for case in CASES:
        for dkey in DTYPES:
            fname = f"{case['name']}_{dkey}.json"
            text = dumps(generate(case, dkey))
            assert len(text) < 60_000, f"{fname}: {len(text)} bytes"
            path = os.path.join(args.out, fname)
            if args.check:
                try:
                    with open(path) as f:
                        same = f.read() == text
                except FileNotFoundError:
                    same = False
                failures += not same
                print(f"{'OK  ' if same else 'DIFF'} {path}")
            else:
                with open(path, "w") as f:
                    f.write(text)
                print(f"wrote {path} ({len(text)} bytes)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
