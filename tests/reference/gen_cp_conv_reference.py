#!/usr/bin/env python3
"""Reference data for the CP ("effective conv2d") forms of LoHa and LoKr, from real Hugging Face PEFT.

PEFT builds these when `use_effective_conv2d=True` on a Conv2d whose kernel is not 1x1 (for LoKr only
when w2 is low rank): LoHa's `hada_t1`/`hada_t2` [r, r, kh, kw] with `hada_w*_a` [r, out] and
`hada_w*_b` [r, in]; LoKr's `lokr_t2` [r, r, kh, kw] with `lokr_w2_a` [r, out_k] and `lokr_w2_b` [r, in_n].

Usage (same venv as the other generators, see README.md in this directory):

    /work/venv/bin/python tests/reference/gen_cp_conv_reference.py [--out DIR] [--check] [--only SUBSTR]

Writes tests/reference/data/{loha,lokr}_conv2d_cp*_{f32,f64}.json in the layout of
gen_adapters_reference.py (whose formatting helpers it imports, so the files are written the same way):
config, scaling, trainable names, and the tensors x, grad_out, conv.weight, conv.bias, the adapter
tensors (state-dict names), out, grad.x, grad.<adapter tensor>, base_out, delta.conv,
merged.conv.weight, merged.conv.bias, merged_out.

LoHa: PEFT 0.21.2's HadaWeightCP.backward returns wrong gradients for hada_w1_a and hada_w2_a (it builds
each from the other factor's core). `grad.*` holds what PEFT returns; `grad_exact.conv.hada_w1_a` and
`grad_exact.conv.hada_w2_a` the true gradients (autograd through the einsum formula). The script asserts
the discrepancy, so it fails (and needs updating) once PEFT fixes it.

Deterministic: case i is seeded with torch.manual_seed(SEED + i) (f32 and f64 use the same seed, the f64
model is built with torch.set_default_dtype(float64)), torch.set_num_threads(1); --check regenerates in
memory and byte-compares. The script fails loudly unless: an independent forward from the recorded
tensors (plain einsum/conv2d, written out below) reproduces out, grad.x, every correct gradient, delta and
the merged weight; merged_out ~= out; base_out is the plain conv; the adapter has a visible effect; the
base gets no gradient; scaling = alpha / r; the adapter tensors have PEFT's CP shapes.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import peft
from peft import LoHaConfig, LoKrConfig, get_peft_model, get_peft_model_state_dict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_adapters_reference as gar  # noqa: E402  (formatting helpers: one JSON layout for all files)

SEED = 8642
DEFAULT_OUT = os.path.join(HERE, "data")
MAX_FILE_BYTES = 80_000

# name: Conv2d geometry and input shape (NCHW); "k", "s", "p", "d" are (h, w) pairs
BASES = {
    "c3o4k3": dict(cin=3, cout=4, k=(3, 3), s=(1, 1), p=(1, 1), d=(1, 1), x_shape=(2, 3, 5, 5)),
    # non-square kernel, stride 2, padding, dilation along w
    "c4o5k32s2": dict(cin=4, cout=5, k=(3, 2), s=(2, 2), p=(1, 1), d=(1, 2), x_shape=(2, 4, 7, 6)),
    # LoKr: factorization(10) = (2, 5), factorization(6) = (2, 3); at r=2 w2 is low rank (2 < 5/2) -> CP
    "c6o10k3": dict(cin=6, cout=10, k=(3, 3), s=(1, 1), p=(1, 1), d=(1, 1), x_shape=(2, 6, 4, 4)),
    # LoKr: factorization(9) = (3, 3), factorization(8) = (2, 4); at r=1 with decompose_both both blocks
    # are low rank (1 < 3/2, 1 < 4/2)
    "c8o9k23s2": dict(cin=8, cout=9, k=(2, 3), s=(2, 2), p=(1, 1), d=(1, 1), x_shape=(2, 8, 5, 5)),
}

COMMON = dict(rank_dropout=0.0, module_dropout=0.0, init_weights=False, use_effective_conv2d=True)
CASES = [
    dict(name="loha_conv2d_cp", method="loha", base="c3o4k3", kw=dict(r=3, alpha=60)),  # s = 20: a delta of visible size
    dict(name="loha_conv2d_cp_s2", method="loha", base="c4o5k32s2", kw=dict(r=2, alpha=40)),
    dict(name="lokr_conv2d_cp", method="lokr", base="c6o10k3", kw=dict(r=2, alpha=4)),
    dict(name="lokr_conv2d_cp_both", method="lokr", base="c8o9k23s2", kw=dict(r=1, alpha=2, decompose_both=True)),
]
EXPECTED_SHAPES = {  # PEFT's tensors for each case (asserted)
    "loha_conv2d_cp": {"hada_w1_a": [3, 4], "hada_w1_b": [3, 3], "hada_w2_a": [3, 4], "hada_w2_b": [3, 3],
                       "hada_t1": [3, 3, 3, 3], "hada_t2": [3, 3, 3, 3]},
    "loha_conv2d_cp_s2": {"hada_w1_a": [2, 5], "hada_w1_b": [2, 4], "hada_w2_a": [2, 5], "hada_w2_b": [2, 4],
                          "hada_t1": [2, 2, 3, 2], "hada_t2": [2, 2, 3, 2]},
    "lokr_conv2d_cp": {"lokr_w1": [2, 2], "lokr_w2_a": [2, 5], "lokr_w2_b": [2, 3], "lokr_t2": [2, 2, 3, 3]},
    "lokr_conv2d_cp_both": {"lokr_w1_a": [3, 1], "lokr_w1_b": [1, 2], "lokr_w2_a": [1, 3], "lokr_w2_b": [1, 4],
                            "lokr_t2": [1, 1, 2, 3]},
}
for _i, _c in enumerate(CASES):
    _c["seed"] = SEED + _i
L = "conv"


class OneConv(nn.Module):
    def __init__(self, b):
        super().__init__()
        self.conv = nn.Conv2d(b["cin"], b["cout"], b["k"], stride=b["s"], padding=b["p"], dilation=b["d"], bias=True)

    def forward(self, x):
        return self.conv(x)


def make_config(case):
    cls = LoHaConfig if case["method"] == "loha" else LoKrConfig
    return cls(target_modules=[L], **COMMON, **case["kw"])


def conv(b, x, w, bias=None):
    return F.conv2d(x, w, bias, stride=b["s"], padding=b["p"], dilation=b["d"])


def cp(t, a, bm):
    """W[o, c, y, x] = sum_{i,j} t[i, j, y, x] * a[i, o] * b[j, c] (written out independently of PEFT)."""
    return torch.einsum("ijyx,io,jc->ocyx", t, a, bm)


def manual_delta(case, P, s, wshape):
    if case["method"] == "loha":
        k1 = cp(P[f"{L}.hada_t1"], P[f"{L}.hada_w1_a"], P[f"{L}.hada_w1_b"])
        k2 = cp(P[f"{L}.hada_t2"], P[f"{L}.hada_w2_a"], P[f"{L}.hada_w2_b"])
        return s * k1 * k2
    w1 = P[f"{L}.lokr_w1"] if f"{L}.lokr_w1" in P else P[f"{L}.lokr_w1_a"] @ P[f"{L}.lokr_w1_b"]
    w2 = cp(P[f"{L}.lokr_t2"], P[f"{L}.lokr_w2_a"], P[f"{L}.lokr_w2_b"])  # (out_k, in_n, kh, kw)
    # Kronecker product written out: dW[i*out_k + p, j*in_n + q, y, x] = s * w1[i, j] * w2[p, q, y, x]
    d = torch.einsum("ij,pqyx->ipjqyx", w1, w2)
    return s * d.reshape(wshape)


def generate(case, dkey):
    dtype = gar.DTYPES[dkey]
    b = BASES[case["base"]]
    name = f"{case['name']}/{dkey}"
    torch.manual_seed(case["seed"])
    with gar.default_dtype(dtype):
        model = OneConv(b)
        model = model.double() if dtype == torch.float64 else model.float()
        x = torch.randn(*b["x_shape"], dtype=dtype)
        with torch.no_grad():
            out_shape = tuple(model(x).shape)
        G = torch.randn(*out_shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(model, make_config(case))
    pm.eval()
    layer = pm.base_model.model.conv
    base = layer.get_base_layer()
    assert type(base) is nn.Conv2d
    scaling = float(layer.scaling["default"])
    cfg = pm.peft_config["default"]
    assert scaling == cfg.alpha / cfg.r, (scaling, cfg.alpha, cfg.r)

    T = {"x": x.clone(), "grad_out": G.clone(), f"{L}.weight": base.weight.detach().clone(),
         f"{L}.bias": base.bias.detach().clone()}
    base_snapshot = {k: T[k].clone() for k in (f"{L}.weight", f"{L}.bias")}
    sd = {gar.strip_key(k): v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
    trainable = {gar.param_to_sd_name(n): p for n, p in pm.named_parameters() if p.requires_grad}
    assert set(trainable) == set(sd), (sorted(trainable), sorted(sd))
    shapes = {k.split(".", 1)[1]: list(v.shape) for k, v in sd.items()}
    assert shapes == EXPECTED_SHAPES[case["name"]], (name, shapes)
    for k in sorted(sd):
        assert sd[k].dtype == dtype
        T[k] = sd[k]

    pm.zero_grad(set_to_none=True)
    xin = x.clone().requires_grad_(True)
    out = pm(xin)
    (out * G).sum().backward()
    T["out"] = out.detach().clone()
    T["grad.x"] = xin.grad.detach().clone()
    for k in sorted(trainable):
        assert trainable[k].grad is not None, f"{name}: no grad for {k}"
        T["grad." + k] = trainable[k].grad.detach().clone()
    for p in base.parameters():
        assert p.grad is None, f"{name}: the base layer received a gradient"
    with torch.no_grad(), pm.disable_adapter():
        T["base_out"] = pm(x).detach().clone()
    with torch.no_grad():
        T[f"delta.{L}"] = layer.get_delta_weight("default").detach().clone()
    merged = copy.deepcopy(pm).merge_and_unload()
    T[f"merged.{L}.weight"] = merged.conv.weight.detach().clone()
    T[f"merged.{L}.bias"] = merged.conv.bias.detach().clone()
    with torch.no_grad():
        T["merged_out"] = merged(x).detach().clone()

    # ---- consistency checks ----
    gar.assert_close(T["merged_out"], T["out"], dtype, f"{name} merged_out vs out", scale=20)
    effect = (T["out"] - T["base_out"]).abs().max().item()
    assert effect > 1e-3, f"{name}: adapter has no visible effect ({effect})"
    gar.assert_close(T["base_out"], conv(b, x, T[f"{L}.weight"], T[f"{L}.bias"]), dtype, f"{name} base_out")
    for k, v in base_snapshot.items():
        assert torch.equal(v, dict(base.named_parameters())[k.split(".", 1)[1]].detach()), f"{name}: base {k} changed"

    P = {k: T[k].clone().requires_grad_(True) for k in sd}
    xm = x.clone().requires_grad_(True)
    wshape = T[f"{L}.weight"].shape
    delta = manual_delta(case, P, scaling, wshape)
    mo = conv(b, xm, T[f"{L}.weight"], T[f"{L}.bias"]) + conv(b, xm, delta)
    gar.assert_close(mo.detach(), T["out"], dtype, f"{name} manual out", scale=10)
    (mo * G).sum().backward()
    gar.assert_close(xm.grad, T["grad.x"], dtype, f"{name} manual grad.x", scale=10)
    notes = []
    bad = {f"{L}.hada_w1_a", f"{L}.hada_w2_a"} if case["method"] == "loha" else set()
    for k in sorted(trainable):
        if k in bad:  # PEFT 0.21.2's HadaWeightCP.backward bug, see the docstring
            err = (P[k].grad - T["grad." + k]).abs().max().item()
            assert err > 1e-3, f"{name}: PEFT's LoHa CP gradient for {k} is now exact ({err}); update the script"
            T["grad_exact." + k] = P[k].grad.detach().clone()
        else:
            gar.assert_close(P[k].grad, T["grad." + k], dtype, f"{name} manual grad.{k}", scale=10)
    if bad:
        notes.append(
            f"grad.{L}.hada_w1_a and grad.{L}.hada_w2_a are what PEFT's loss.backward() returns and are WRONG: "
            "HadaWeightCP.backward (peft/tuners/loha/layer.py) builds grad_w1a from einsum(t2, w2b) instead of "
            "einsum(t1, w1b) and grad_w2a from einsum(t1, w1b) instead of einsum(t2, w2b). grad_exact.* hold the "
            "true gradients of the same forward (autograd through the einsum formula).")
    with torch.no_grad():
        gar.assert_close(delta, T[f"delta.{L}"], dtype, f"{name} manual delta", scale=10)
        gar.assert_close(T[f"{L}.weight"] + delta, T[f"merged.{L}.weight"], dtype, f"{name} manual merged weight",
                         scale=10)
        assert torch.equal(T[f"merged.{L}.bias"], T[f"{L}.bias"]), f"{name}: merge changed the bias"

    record = {
        "case": case["name"],
        "method": case["method"],
        "base": "conv2d_" + case["base"],
        "variant": "cp",
        "dtype": gar.DTYPE_NAME[dtype],
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "transformers_version": gar.TRANSFORMERS_VERSION,
        "layer": L,
        "layer_type": "torch.nn.Conv2d",
        "base_layer": {"kind": "conv2d", "in_channels": b["cin"], "out_channels": b["cout"],
                       "kernel_size": list(b["k"]), "stride": list(b["s"]), "padding": list(b["p"]),
                       "dilation": list(b["d"]), "groups": 1, "x_shape": list(b["x_shape"])},
        "seed": case["seed"],
        "adapters": ["default"],
        "config": {"default": gar.describe_config(case["method"], cfg)},
        "scaling": {"default": {L: scaling}},
        "trainable": sorted(trainable),
    }
    if notes:
        record["notes"] = notes
    record["tensors"] = {k: gar.tensor_record(v) for k, v in T.items()}
    return record, effect


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="compare with existing files instead of writing")
    ap.add_argument("--only", default=None, help="only cases whose file name contains this substring")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    print(f"peft {peft.__version__}, torch {torch.__version__}")
    failures = 0
    for case in CASES:
        for dkey in gar.DTYPES:
            fname = f"{case['name']}_{dkey}.json"
            if args.only and args.only not in fname:
                continue
            rec, effect = generate(case, dkey)
            text = gar.dumps(rec)
            assert len(text) < MAX_FILE_BYTES, f"{fname}: {len(text)} bytes, over the {MAX_FILE_BYTES} limit"
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
                print(f"wrote {path} ({len(text)} bytes, max|out-base_out|={effect:.4g})")
    if failures:
        print(f"{failures} file(s) differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
