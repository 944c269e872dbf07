#!/usr/bin/env python3
"""Generate reference data for the non-Linear-LoRA adapter methods from real Hugging Face PEFT.

Covers LoHa, LoKr, (IA)^3, DoRA, plain LoRA on Embedding / Conv2d, and VeRA, each on a model with
exactly one adapted layer, so a C++ test can load a single layer from the file.

Usage (same venv as gen_peft_reference.py, see README.md in this directory):

    /work/venv/bin/python tests/reference/gen_adapters_reference.py [--out DIR] [--check] [--only SUBSTR]

Writes tests/reference/data/<method>_<base>_<case>_<f32|f64>.json plus lokr_factorization.json.
Every case is seeded on its own (torch.manual_seed(SEED + case index)); f32 and f64 files of a case
use the same seed but different numbers (the f64 model is built with torch.set_default_dtype(float64)).

--check regenerates in memory and compares with the files on disk byte for byte instead of writing.

The script asserts, and fails loudly otherwise, that: merged_out ~= out; the merged weights follow
the documented formula of each method; an independent hand-written forward (plain torch ops) using
the recorded tensors reproduces `out` and, via autograd, every recorded gradient; the adapter has a
visible effect; the base weights get no gradient and are unchanged; the per-layer scaling follows
the documented formula; and every LoKr shape in lokr_factorization.json matches a re-implementation
of PEFT's rule.
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
import torch.nn.functional as F

import peft
from peft import (
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    VeraConfig,
    get_peft_model,
    get_peft_model_state_dict,
)
from peft.tuners.lokr.layer import factorization

try:
    import transformers

    TRANSFORMERS_VERSION = transformers.__version__
except Exception:  # pragma: no cover
    TRANSFORMERS_VERSION = None

SEED = 4321
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "data")
DTYPES = {"f32": torch.float32, "f64": torch.float64}
DTYPE_NAME = {torch.float32: "float32", torch.float64: "float64"}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
MAX_FILE_BYTES = 60_000
MAX_TOTAL_BYTES = 3_000_000

# --------------------------------------------------------------------------------------
# base models: one adapted layer each
# --------------------------------------------------------------------------------------
EMB_IDS = [[3, 7, 3, 0, 11], [7, 5, 9, 3, 3]]  # repeated ids within and across rows; ids 0 and 11 (edges)

BASES = {
    # name: layer attribute, constructor kwargs, input shape
    "linear": dict(layer="lin", kind="linear", in_features=10, out_features=8, x_shape=(5, 10)),
    # bigger Linear so that LoKr's low-rank branches trigger at r=4 (see README)
    "linear81": dict(layer="lin", kind="linear", in_features=81, out_features=6, x_shape=(2, 81)),
    "embedding": dict(layer="emb", kind="embedding", num_embeddings=12, embedding_dim=8, ids=EMB_IDS),
    "conv2d": dict(layer="conv", kind="conv2d", in_channels=3, out_channels=4, kernel_size=3, stride=1, padding=1,
                   x_shape=(2, 3, 6, 6)),
    "conv2d_s2": dict(layer="conv", kind="conv2d", in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=0,
                      x_shape=(2, 3, 7, 7)),
    # wider channels so that LoKr's low-rank / CP (effective conv) branch for w2 triggers (at r=2)
    "conv2d_wide": dict(layer="conv", kind="conv2d", in_channels=5, out_channels=6, kernel_size=3, stride=1,
                        padding=1, x_shape=(2, 5, 4, 4)),
}


class OneLayer(nn.Module):
    def __init__(self, base: str):
        super().__init__()
        b = BASES[base]
        self.layer_name = b["layer"]
        if b["kind"] == "linear":
            mod = nn.Linear(b["in_features"], b["out_features"], bias=True)
        elif b["kind"] == "embedding":
            mod = nn.Embedding(b["num_embeddings"], b["embedding_dim"])
        else:
            mod = nn.Conv2d(b["in_channels"], b["out_channels"], b["kernel_size"], stride=b["stride"],
                            padding=b["padding"], bias=True)
        setattr(self, self.layer_name, mod)

    def forward(self, x):
        return getattr(self, self.layer_name)(x)


def base_layer_info(base: str):
    b = BASES[base]
    info = {k: v for k, v in b.items() if k not in ("ids",)}
    info["x_shape"] = list(b["x_shape"]) if "x_shape" in b else [len(EMB_IDS), len(EMB_IDS[0])]
    if b["kind"] == "conv2d":
        info.update(kernel_size=[b["kernel_size"]] * 2, stride=[b["stride"]] * 2, padding=[b["padding"]] * 2,
                    dilation=[1, 1], groups=1)
    return info


LAYER_TYPE = {"linear": "torch.nn.Linear", "embedding": "torch.nn.Embedding", "conv2d": "torch.nn.Conv2d"}

# --------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------
LYCORIS_COMMON = dict(rank_dropout=0.0, module_dropout=0.0, init_weights=False)


def C(method, base, case, **kw):
    return dict(method=method, base=base, case=case, kw=kw)


CASES = [
    # ---- LoHa ----
    C("loha", "linear", "default", r=4, alpha=8),
    C("loha", "conv2d", "default", r=4, alpha=8),
    C("loha", "conv2d_s2", "default", r=4, alpha=8),
    C("loha", "conv2d", "effective", r=4, alpha=8, use_effective_conv2d=True),
    # ---- LoKr ----
    C("lokr", "linear", "default", r=4, alpha=8),  # 10->8: every block is a full matrix at r=4
    C("lokr", "linear81", "default", r=4, alpha=8),  # w1 full (2,9), w2 = w2_a (3,4) @ w2_b (4,9)
    C("lokr", "linear81", "decompose_both", r=4, alpha=8, decompose_both=True),  # w1 also low rank
    C("lokr", "linear81", "factor2", r=4, alpha=8, decompose_factor=2),  # factorization(81,2)=(1,81)
    C("lokr", "conv2d", "default", r=4, alpha=8),  # w1 (2,1), full 4-D w2 (2,3,3,3)
    C("lokr", "conv2d", "effective", r=4, alpha=8, use_effective_conv2d=True),  # same tensors: w2 full
    C("lokr", "conv2d_wide", "lowrank", r=2, alpha=4),  # w2_a (3,2), w2_b (2,45)
    C("lokr", "conv2d_wide", "effective", r=2, alpha=4, use_effective_conv2d=True),  # lokr_t2 (2,2,3,3)
    # ---- IA3 ----
    C("ia3", "linear", "default"),
    C("ia3", "linear", "ff", feedforward=True),
    C("ia3", "conv2d", "default"),
    C("ia3", "conv2d", "ff", feedforward=True),
    # ---- DoRA ----
    C("dora", "linear", "default", r=4, lora_alpha=8),
    C("dora", "embedding", "default", r=4, lora_alpha=8),
    C("dora", "conv2d", "default", r=4, lora_alpha=8),
    # ---- plain LoRA ----
    C("lora", "embedding", "default", r=4, lora_alpha=8),
    C("lora", "conv2d", "default", r=4, lora_alpha=8),
    C("lora", "conv2d_s2", "default", r=4, lora_alpha=8),
    C("lora", "conv2d", "rslora", r=4, lora_alpha=8, use_rslora=True),
    # ---- VeRA ----
    C("vera", "linear", "default", r=4),
]
for _i, _c in enumerate(CASES):
    _c["name"] = f"{_c['method']}_{_c['base']}_{_c['case']}"
    _c["seed"] = SEED + _i
assert len({c["name"] for c in CASES}) == len(CASES)


def make_config(case):
    m, kw, layer = case["method"], dict(case["kw"]), BASES[case["base"]]["layer"]
    if m == "loha":
        return LoHaConfig(target_modules=[layer], **LYCORIS_COMMON, **kw)
    if m == "lokr":
        return LoKrConfig(target_modules=[layer], **LYCORIS_COMMON, **kw)
    if m == "ia3":
        ff = kw.pop("feedforward", False)
        return IA3Config(target_modules=[layer], feedforward_modules=[layer] if ff else [], init_ia3_weights=False,
                         **kw)
    if m in ("lora", "dora"):
        return LoraConfig(target_modules=[layer], init_lora_weights=False, lora_dropout=0.0, use_dora=(m == "dora"),
                          **kw)
    if m == "vera":
        return VeraConfig(target_modules=[layer], init_weights=False, save_projection=True, projection_prng_key=0,
                          vera_dropout=0.0, **kw)
    raise ValueError(m)


CONFIG_FIELDS = {
    "loha": ["r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights", "rank_pattern",
             "alpha_pattern", "target_modules"],
    "lokr": ["r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "decompose_both",
             "decompose_factor", "rank_dropout_scale", "init_weights", "rank_pattern", "alpha_pattern",
             "target_modules"],
    "ia3": ["target_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights"],
    "lora": ["r", "lora_alpha", "use_rslora", "use_dora", "lora_dropout", "lora_bias", "fan_in_fan_out",
             "init_lora_weights", "rank_pattern", "alpha_pattern", "target_modules"],
    "vera": ["r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "fan_in_fan_out", "bias",
             "init_weights", "target_modules"],
}
CONFIG_FIELDS["dora"] = CONFIG_FIELDS["lora"]


def describe_config(method, cfg):
    d = cfg.to_dict()
    out = {"peft_type": str(d["peft_type"].value if hasattr(d["peft_type"], "value") else d["peft_type"])}
    for k in CONFIG_FIELDS[method]:
        v = d[k]
        if isinstance(v, (set, frozenset)):
            v = sorted(v)
        elif isinstance(v, dict):
            v = dict(v)
        out[k] = v
    return out


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def tensor_record(t: torch.Tensor):
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.int64, torch.int32):
        data = [int(v) for v in t.reshape(-1).tolist()]
    else:
        data = [float(v) for v in t.reshape(-1).tolist()]
    return {"shape": list(t.shape), "data": data}


def assert_close(a, b, dtype, what, scale=1.0):
    tol = TOL[dtype]
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if not torch.allclose(a, b, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale):
        err = (a - b).abs().max().item()
        raise AssertionError(f"{what}: mismatch, max abs err {err:g}")


def strip_key(k: str) -> str:
    """PEFT state-dict key (adapter name already removed) -> name used in the JSON files."""
    for p in ("base_model.model.", "base_model."):
        if k.startswith(p):
            return k[len(p):]
    return k


def param_to_sd_name(n: str, adapter: str = "default") -> str:
    """named_parameters() name -> the stripped state-dict name (mirrors PEFT's adapter-name removal)."""
    n = n.replace(f".{adapter}.", ".")
    if n.endswith(f".{adapter}"):
        n = n[: -len(adapter) - 1]
    n = n.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")  # DoRA's legacy key
    return strip_key(n)


def tuner_layer(pm, case):
    return getattr(pm.base_model.model, BASES[case["base"]]["layer"])


# --------------------------------------------------------------------------------------
# independent re-implementation of every method's forward (plain torch ops)
# --------------------------------------------------------------------------------------
def base_forward(case, T, x, W=None, b=None):
    bb = BASES[case["base"]]
    L = bb["layer"]
    W = T[f"{L}.weight"] if W is None else W
    b = T.get(f"{L}.bias") if b is None else b
    if bb["kind"] == "linear":
        return x @ W.t() + b
    if bb["kind"] == "embedding":
        return W[x]
    return F.conv2d(x, W, b, stride=bb["stride"], padding=bb["padding"])


def conv_or_linear(case, x, W):
    """Apply a delta weight the way LyCORIS layers do (no bias)."""
    bb = BASES[case["base"]]
    if bb["kind"] == "linear":
        return x @ W.t()
    return F.conv2d(x, W, None, stride=bb["stride"], padding=bb["padding"])


def manual_delta(case, T, P, s):
    """Delta weight in the base weight's layout from the adapter tensors P (name -> tensor)."""
    m, bb = case["method"], BASES[case["base"]]
    L = bb["layer"]
    wshape = T[f"{L}.weight"].shape
    if m == "loha":
        if f"{L}.hada_t1" in P:
            # K[o,i,y,x] = sum_{p,q} t[p,q,y,x] * w_a[p,o] * w_b[q,i]
            k1 = torch.einsum("pqyx,po,qi->oiyx", P[f"{L}.hada_t1"], P[f"{L}.hada_w1_a"], P[f"{L}.hada_w1_b"])
            k2 = torch.einsum("pqyx,po,qi->oiyx", P[f"{L}.hada_t2"], P[f"{L}.hada_w2_a"], P[f"{L}.hada_w2_b"])
            return s * k1 * k2
        w1 = P[f"{L}.hada_w1_a"] @ P[f"{L}.hada_w1_b"]
        w2 = P[f"{L}.hada_w2_a"] @ P[f"{L}.hada_w2_b"]
        return (s * w1 * w2).reshape(wshape)
    if m == "lokr":
        w1 = P[f"{L}.lokr_w1"] if f"{L}.lokr_w1" in P else P[f"{L}.lokr_w1_a"] @ P[f"{L}.lokr_w1_b"]
        if f"{L}.lokr_w2" in P:
            w2 = P[f"{L}.lokr_w2"]
        elif f"{L}.lokr_t2" in P:
            w2 = torch.einsum("pqyx,po,qi->oiyx", P[f"{L}.lokr_t2"], P[f"{L}.lokr_w2_a"], P[f"{L}.lokr_w2_b"])
        else:
            w2 = P[f"{L}.lokr_w2_a"] @ P[f"{L}.lokr_w2_b"]
        out_l, in_m = w1.shape
        out_k = w2.shape[0]
        in_n = wshape[1] // in_m
        w2 = w2.reshape(out_k, in_n, *wshape[2:])  # flattened conv w2 (out_k, in_n*kh*kw) -> 4-D
        # Kronecker product written out: dW[i*out_k+p, j*in_n+q, ...] = s * w1[i,j] * w2[p,q,...]
        d = torch.einsum("ij,pq...->ipjq...", w1, w2)
        return s * d.reshape(wshape)
    if m in ("lora", "dora"):
        if bb["kind"] == "embedding":
            A, B = P[f"{L}.lora_embedding_A"], P[f"{L}.lora_embedding_B"]  # (r,num), (dim,r)
            return s * (B @ A).t()  # (num, dim)
        A, B = P[f"{L}.lora_A.weight"], P[f"{L}.lora_B.weight"]
        r = A.shape[0]
        return s * (B.reshape(B.shape[0], r) @ A.reshape(r, -1)).reshape(wshape)
    if m == "vera":
        A, B = P["vera_A"], P["vera_B"]
        lb, ld = P[f"{L}.vera_lambda_b"], P[f"{L}.vera_lambda_d"]
        out_f, in_f = wshape
        return (lb[:, None] * B[:out_f, :]) @ (ld[:, None] * A[:, :in_f])
    raise ValueError(m)


def dora_norm(case, T, P, s):
    """||W + s*B@A|| per output channel (per embedding *column* for Embedding), detached."""
    bb = BASES[case["base"]]
    L = bb["layer"]
    W = T[f"{L}.weight"]
    Wd = (W + manual_delta(case, T, P, s)).detach()
    if bb["kind"] == "linear":
        return Wd.norm(dim=1)
    if bb["kind"] == "embedding":
        return Wd.norm(dim=0)  # over the vocabulary
    return Wd.reshape(Wd.shape[0], -1).norm(dim=1).reshape(1, -1, 1, 1)


def manual_forward(case, T, P, x, s, is_ff=False):
    m, bb = case["method"], BASES[case["base"]]
    L = bb["layer"]
    if m in ("loha", "lokr", "vera"):
        if m == "vera":  # factored form, as PEFT's forward computes it
            A, B = P["vera_A"], P["vera_B"]
            lb, ld = P[f"{L}.vera_lambda_b"], P[f"{L}.vera_lambda_d"]
            out_f, in_f = T[f"{L}.weight"].shape
            return base_forward(case, T, x) + lb * ((ld * (x @ A[:, :in_f].t())) @ B[:out_f, :].t())
        return base_forward(case, T, x) + conv_or_linear(case, x, manual_delta(case, T, P, s))
    if m == "ia3":
        l = P[f"{L}.ia3_l"]
        if bb["kind"] == "linear":
            lv = l.reshape(-1)
            return base_forward(case, T, x * lv) if is_ff else base_forward(case, T, x) * lv
        return base_forward(case, T, x * l) if is_ff else base_forward(case, T, x) * l  # l: (1,C,1,1)
    if m == "lora":
        if bb["kind"] == "embedding":
            A, B = P[f"{L}.lora_embedding_A"], P[f"{L}.lora_embedding_B"]
            return base_forward(case, T, x) + s * (A.t()[x] @ B.t())
        A, B = P[f"{L}.lora_A.weight"], P[f"{L}.lora_B.weight"]
        h = F.conv2d(x, A, None, stride=bb["stride"], padding=bb["padding"])
        return base_forward(case, T, x) + s * F.conv2d(h, B)
    if m == "dora":
        g = P[f"{L}.lora_magnitude_vector"] / dora_norm(case, T, P, s)
        W, b = T[f"{L}.weight"], T.get(f"{L}.bias")
        if bb["kind"] == "linear":
            A, B = P[f"{L}.lora_A.weight"], P[f"{L}.lora_B.weight"]
            return g * (x @ W.t() + s * (x @ A.t()) @ B.t()) + b
        if bb["kind"] == "embedding":
            A, B = P[f"{L}.lora_embedding_A"], P[f"{L}.lora_embedding_B"]
            return g * (W[x] + s * (A.t()[x] @ B.t()))
        A, B = P[f"{L}.lora_A.weight"], P[f"{L}.lora_B.weight"]
        lora = F.conv2d(F.conv2d(x, A, None, stride=bb["stride"], padding=bb["padding"]), B)
        base = F.conv2d(x, W, None, stride=bb["stride"], padding=bb["padding"])
        return g * (base + s * lora) + b.reshape(1, -1, 1, 1)
    raise ValueError(m)


def manual_merge(case, T, P, s, is_ff=False):
    """Expected (merged weight, merged bias)."""
    m, bb = case["method"], BASES[case["base"]]
    L = bb["layer"]
    W, b = T[f"{L}.weight"], T.get(f"{L}.bias")
    if m == "ia3":
        l = P[f"{L}.ia3_l"]
        if bb["kind"] == "linear":
            return (W * l, b) if is_ff else (W * l, b * l.reshape(-1))  # l (1,in) or (out,1)
        if is_ff:
            return W * l, b  # (1,in,1,1) broadcasts over the in-channel axis
        return W * l.transpose(0, 1), b * l.reshape(-1)
    d = manual_delta(case, T, P, s)
    if m == "dora":
        g = P[f"{L}.lora_magnitude_vector"] / dora_norm(case, T, P, s)
        if bb["kind"] == "embedding":
            return g.reshape(1, -1) * (W + d), b
        return g.reshape(-1, *([1] * (W.dim() - 1))) * (W + d), b
    return W + d, b


# --------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------
def build(case, dtype):
    bb = BASES[case["base"]]
    torch.manual_seed(case["seed"])
    with default_dtype(dtype):
        model = OneLayer(case["base"])
        model = model.double() if dtype == torch.float64 else model.float()
        if bb["kind"] == "embedding":
            x = torch.tensor(EMB_IDS, dtype=torch.int64)
            out_shape = (*x.shape, bb["embedding_dim"])
        else:
            x = torch.randn(*bb["x_shape"], dtype=dtype)
            with torch.no_grad():
                out_shape = tuple(model(x).shape)
        G = torch.randn(*out_shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(model, make_config(case))
    layer = tuner_layer(pm, case)
    extra = {}
    # ---- post-creation tweaks so that nothing is an identity ----
    if case["method"] == "dora":
        dl = layer.lora_magnitude_vector["default"]
        extra["init_magnitude"] = dl.weight.detach().clone()
        mult = torch.empty_like(dl.weight).uniform_(0.5, 1.5)
        with torch.no_grad():
            dl.weight.mul_(mult)
    if case["method"] == "vera":
        lb = layer.vera_lambda_b["default"]
        assert torch.equal(lb.detach(), torch.ones_like(lb)), "VeRA init_weights=False: lambda_b should be ones"
        with torch.no_grad():
            lb.copy_(torch.randn_like(lb))
    pm.eval()
    return pm, x, G, extra


def generate(case, dkey):
    dtype = DTYPES[dkey]
    m, bb = case["method"], BASES[case["base"]]
    L = bb["layer"]
    pm, x, G, extra = build(case, dtype)
    layer = tuner_layer(pm, case)
    base = layer.get_base_layer()
    assert type(base) is {"linear": nn.Linear, "embedding": nn.Embedding, "conv2d": nn.Conv2d}[bb["kind"]]
    is_ff = bool(getattr(layer, "is_feedforward", False))
    if m == "ia3":
        assert is_ff == bool(case["kw"].get("feedforward", False))
    scaling = None
    if hasattr(layer, "scaling") and "default" in getattr(layer, "scaling", {}):
        scaling = float(layer.scaling["default"])

    T = {}  # ordered: everything that goes into the file
    T["ids" if bb["kind"] == "embedding" else "x"] = x.clone()
    T["grad_out"] = G.clone()
    T[f"{L}.weight"] = base.weight.detach().clone()
    if getattr(base, "bias", None) is not None:
        T[f"{L}.bias"] = base.bias.detach().clone()
    base_snapshot = {k: v.clone() for k, v in T.items() if k.startswith(f"{L}.")}
    for p in base.parameters():
        assert not p.requires_grad, "base layer parameter is trainable"

    # adapter tensors under their (stripped) state-dict names
    sd = {strip_key(k): v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
    trainable = {param_to_sd_name(n): p for n, p in pm.named_parameters() if p.requires_grad}
    assert set(trainable) <= set(sd), (sorted(trainable), sorted(sd))
    for k, v in sd.items():
        assert v.dtype == dtype, (k, v.dtype)
        if k not in trainable:
            assert m == "vera" and k in ("vera_A", "vera_B"), f"unexpected non-trainable state-dict entry {k}"
    if m == "dora":
        T[f"init.{L}.lora_magnitude_vector"] = extra["init_magnitude"]
    for k in sorted(sd):
        T[k] = sd[k]
    if m == "vera":
        out_f, in_f = base.weight.shape
        T["vera_A_sliced"] = layer.vera_A["default"][:, :in_f].detach().clone()
        T["vera_B_sliced"] = layer.vera_B["default"][:out_f, :].detach().clone()
        assert torch.equal(T["vera_A"], layer.vera_A["default"]) and torch.equal(T["vera_B"], layer.vera_B["default"])

    # ---- forward + backward through PEFT ----
    captured_norms = []
    if m == "dora":
        dl = layer.lora_magnitude_vector["default"]
        orig_norm_fn = dl.get_weight_norm

        def recording_norm(*a, **k):
            r = orig_norm_fn(*a, **k)
            captured_norms.append(r.detach().clone())
            return r

        dl.get_weight_norm = recording_norm
    pm.zero_grad(set_to_none=True)
    xin = x if bb["kind"] == "embedding" else x.clone().requires_grad_(True)
    out = pm(xin)
    (out * G).sum().backward()
    if m == "dora":
        del dl.get_weight_norm  # drop the instance attribute again (class method visible)
        assert len(captured_norms) == 1, len(captured_norms)
        T[f"weight_norm.{L}"] = captured_norms[0]
    T["out"] = out.detach().clone()
    if bb["kind"] != "embedding":
        T["grad.x"] = xin.grad.detach().clone()
    for k in sorted(trainable):
        p = trainable[k]
        assert p.grad is not None, f"no grad for {k}"
        T["grad." + k] = p.grad.detach().clone()
    for p in base.parameters():
        assert p.grad is None, "base layer received a gradient"

    with torch.no_grad(), pm.disable_adapter():
        T["base_out"] = pm(x).detach().clone()

    if hasattr(layer, "get_delta_weight"):
        with torch.no_grad():
            d = layer.get_delta_weight("default").detach().clone()
        assert d.shape == base.weight.shape, (d.shape, base.weight.shape)
        T[f"delta.{L}"] = d
    else:
        assert m == "ia3"

    merged = copy.deepcopy(pm).merge_and_unload()
    ml = getattr(merged, L)
    assert type(ml) is type(base), type(ml)
    T[f"merged.{L}.weight"] = ml.weight.detach().clone()
    if getattr(ml, "bias", None) is not None:
        T[f"merged.{L}.bias"] = ml.bias.detach().clone()
    with torch.no_grad():
        T["merged_out"] = merged(x).detach().clone()

    if m == "ia3":  # merge + unmerge on a copy: division by (l + 1e-8) is not exact
        cp = copy.deepcopy(pm)
        cl = tuner_layer(cp, case)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cl.merge()
            cl.unmerge()
        T[f"unmerged.{L}.weight"] = cl.get_base_layer().weight.detach().clone()
        T[f"unmerged.{L}.bias"] = cl.get_base_layer().bias.detach().clone()
        for part in ("weight", "bias"):
            u, o = T[f"unmerged.{L}.{part}"], T[f"{L}.{part}"]
            assert torch.allclose(u, o, rtol=1e-4, atol=1e-5), f"{case['name']}: ia3 unmerge far off"
            if dtype == torch.float64 and (part == "weight" or not is_ff):  # +1e-8 in the divisor shows in f64
                assert not torch.equal(u, o), f"{case['name']}: ia3 unmerge unexpectedly exact"

    # ---------------- consistency assertions ----------------
    name = f"{case['name']}/{dkey}"
    assert_close(T["merged_out"], T["out"], dtype, f"{name} merged_out vs out", scale=20)
    effect = (T["out"] - T["base_out"]).abs().max().item()
    assert effect > 1e-3, f"{name}: adapter has no visible effect ({effect})"
    assert_close(T["base_out"], base_forward(case, T, x), dtype, f"{name} base_out")
    for k, v in base_snapshot.items():
        cur = dict(base.named_parameters())[k.split(".", 1)[1]].detach()
        assert torch.equal(v, cur), f"{name}: base {k} changed"

    # scaling formula
    cfg = pm.peft_config["default"]
    if m in ("loha", "lokr"):
        assert scaling == cfg.alpha / cfg.r, (scaling, cfg.alpha, cfg.r)
    elif m in ("lora", "dora"):
        expect = cfg.lora_alpha / math.sqrt(cfg.r) if cfg.use_rslora else cfg.lora_alpha / cfg.r
        assert scaling == expect, (scaling, expect)
    else:
        assert scaling is None

    # independent forward / backward / merge from the recorded tensors
    P = {k: T[k].clone().requires_grad_(k in trainable) for k in sd}
    xm = x if bb["kind"] == "embedding" else x.clone().requires_grad_(True)
    mo = manual_forward(case, T, P, xm, scaling, is_ff)
    assert_close(mo.detach(), T["out"], dtype, f"{name} manual out", scale=10)
    (mo * G).sum().backward()
    if bb["kind"] != "embedding":
        assert_close(xm.grad, T["grad.x"], dtype, f"{name} manual grad.x", scale=10)
    notes = []
    # PEFT 0.21.2 bug: HadaWeightCP.backward (LoHa, use_effective_conv2d) computes grad_w1a with
    # temp = einsum(t2, w2b) instead of einsum(t1, w1b) (and grad_w2a with t1/w1b instead of t2/w2b),
    # see peft/tuners/loha/layer.py HadaWeightCP.backward.  The forward and the other four gradients are right.
    cp_bad = {f"{L}.hada_w1_a", f"{L}.hada_w2_a"} if (m == "loha" and f"{L}.hada_t1" in sd) else set()
    for k in trainable:
        if k in cp_bad:
            err = (P[k].grad - T["grad." + k]).abs().max().item()
            assert err > 1e-3, f"{name}: PEFT's LoHa CP gradient for {k} is now exact ({err}); update the script"
            T["grad_exact." + k] = P[k].grad.detach().clone()
            continue
        assert_close(P[k].grad, T["grad." + k], dtype, f"{name} manual grad.{k}", scale=10)
    if cp_bad:
        notes.append(
            "grad.{0}.hada_w1_a and grad.{0}.hada_w2_a are what PEFT's loss.backward() returns and are WRONG: "
            "HadaWeightCP.backward (peft/tuners/loha/layer.py) builds grad_w1a from einsum(t2, w2b) instead of "
            "einsum(t1, w1b) and grad_w2a from einsum(t1, w1b) instead of einsum(t2, w2b). grad_exact.* hold the "
            "true gradients of the same forward (autograd through the einsum formula).".format(L))
    with torch.no_grad():
        if f"delta.{L}" in T:
            assert_close(manual_delta(case, T, P, scaling), T[f"delta.{L}"], dtype, f"{name} manual delta", scale=10)
        mw, mb = manual_merge(case, T, P, scaling, is_ff)
        assert_close(mw, T[f"merged.{L}.weight"], dtype, f"{name} manual merged weight", scale=10)
        if mb is not None:
            assert_close(mb, T[f"merged.{L}.bias"], dtype, f"{name} manual merged bias", scale=10)
        if m == "dora":
            assert_close(dora_norm(case, T, P, scaling), T[f"weight_norm.{L}"], dtype, f"{name} dora norm")
            assert_close(T[f"init.{L}.lora_magnitude_vector"], T[f"weight_norm.{L}"].reshape(
                T[f"init.{L}.lora_magnitude_vector"].shape), dtype, f"{name} dora init magnitude = norm")
            assert not torch.allclose(T[f"init.{L}.lora_magnitude_vector"], T[f"{L}.lora_magnitude_vector"])

    record = {
        "case": case["name"],
        "method": m,
        "base": case["base"],
        "variant": case["case"],
        "dtype": DTYPE_NAME[dtype],
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "transformers_version": TRANSFORMERS_VERSION,
        "layer": L,
        "layer_type": LAYER_TYPE[bb["kind"]],
        "base_layer": base_layer_info(case["base"]),
        "seed": case["seed"],
        "adapters": ["default"],
        "config": {"default": describe_config(m, cfg)},
    }
    if scaling is not None:
        record["scaling"] = {"default": {L: scaling}}
    if m == "ia3":
        record["is_feedforward"] = {L: is_ff}
    record["trainable"] = sorted(trainable)
    if notes:
        record["notes"] = notes
    record["tensors"] = {k: tensor_record(v) for k, v in T.items()}
    return record, effect


# --------------------------------------------------------------------------------------
# LoKr factorization / shape table
# --------------------------------------------------------------------------------------
FACT_DIMS = [1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 30, 64, 96, 100, 128, 256, 320, 512, 768, 1000, 1024, 1280, 4096,
             11008]
FACT_FACTORS = [-1, 2, 4, 8, 16]
LOKR_LINEAR_SHAPES = [  # (out, in, r, decompose_factor)
    (8, 10, 4, -1), (8, 10, 1, -1), (6, 81, 4, -1), (6, 81, 4, 2), (20, 27, 4, -1), (64, 64, 2, -1),
    (64, 64, 4, -1), (64, 64, 8, -1), (100, 1000, 4, -1), (320, 128, 3, -1), (768, 768, 4, -1), (768, 768, 8, -1),
    (768, 768, 16, -1), (768, 768, 8, 4), (768, 768, 8, 16), (1024, 1024, 16, -1), (4096, 4096, 8, -1),
    (4096, 4096, 32, -1), (4096, 4096, 64, -1), (11008, 4096, 8, -1), (4096, 11008, 16, -1), (4096, 11008, 16, 8),
]
LOKR_CONV_SHAPES = [  # (out, in, k, r)
    (4, 3, 3, 4), (4, 3, 3, 1), (6, 5, 3, 2), (64, 32, 3, 4), (320, 320, 3, 8), (1280, 640, 3, 16), (128, 64, 1, 4),
]


def lokr_rule(out, inn, r, decompose_both, factor, kernel=None, effective=False):
    """Re-implementation of PEFT's LoKr shape rule (documented in README); checked against PEFT."""
    out_l, out_k = factorization(out, factor)
    in_m, in_n = factorization(inn, factor)
    t = {}
    if decompose_both and r < max(out_l, in_m) / 2:
        t["lokr_w1_a"], t["lokr_w1_b"] = [out_l, r], [r, in_m]
    else:
        t["lokr_w1"] = [out_l, in_m]
    full_w2 = not (r < max(out_k, in_n) / 2)
    if kernel is None:
        if full_w2:
            t["lokr_w2"] = [out_k, in_n]
        else:
            t["lokr_w2_a"], t["lokr_w2_b"] = [out_k, r], [r, in_n]
    else:
        effective = effective and kernel != 1
        if full_w2:
            t["lokr_w2"] = [out_k, in_n, kernel, kernel]
        elif effective:
            t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"] = [r, r, kernel, kernel], [r, out_k], [r, in_n]
        else:
            t["lokr_w2_a"], t["lokr_w2_b"] = [out_k, r], [r, in_n * kernel * kernel]
    return t


def peft_lokr_shapes(base_layer, r, **kw):
    from peft.tuners.lokr.layer import Conv2d as LoKrConv2d
    from peft.tuners.lokr.layer import Linear as LoKrLinear

    cfg = LoKrConfig(r=r, alpha=r, init_weights=False, **kw)
    cls = LoKrLinear if isinstance(base_layer, nn.Linear) else LoKrConv2d
    lay = cls(base_layer, "default", config=cfg, r=r, alpha=r)
    out = {}
    for n in lay.adapter_layer_names:
        pd = getattr(lay, n)
        if "default" in pd:
            out[n] = list(pd["default"].shape)
    return out


def generate_factorization():
    facts = []
    for f in FACT_FACTORS:
        for d in FACT_DIMS:
            mm, nn_ = factorization(d, f)
            assert mm * nn_ == d
            facts.append({"dimension": d, "factor": f, "result": [mm, nn_]})
    shapes = []
    torch.manual_seed(SEED)
    for out, inn, r, fac in LOKR_LINEAR_SHAPES:
        for both in (False, True):
            lin = nn.Linear(inn, out, bias=False, device="meta")
            got = peft_lokr_shapes(lin, r, decompose_both=both, decompose_factor=fac)
            exp = lokr_rule(out, inn, r, both, fac)
            assert got == exp, (out, inn, r, both, fac, got, exp)
            shapes.append({"layer": "linear", "out": out, "in": inn, "r": r, "decompose_both": both,
                           "decompose_factor": fac, "out_factors": list(factorization(out, fac)),
                           "in_factors": list(factorization(inn, fac)), "tensors": got})
    for out, inn, k, r in LOKR_CONV_SHAPES:
        for eff in (False, True):
            for both in (False, True):
                conv = nn.Conv2d(inn, out, k, bias=False, device="meta")
                got = peft_lokr_shapes(conv, r, decompose_both=both, use_effective_conv2d=eff)
                exp = lokr_rule(out, inn, r, both, -1, kernel=k, effective=eff)
                assert got == exp, (out, inn, k, r, eff, both, got, exp)
                shapes.append({"layer": "conv2d", "out": out, "in": inn, "kernel": [k, k], "r": r,
                               "decompose_both": both, "decompose_factor": -1, "use_effective_conv2d": eff,
                               "out_factors": list(factorization(out)), "in_factors": list(factorization(inn)),
                               "tensors": got})
    return {
        "case": "lokr_factorization",
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "source": "peft.tuners.lokr.layer.factorization and LoKrLayer.update_layer/create_adapter_parameters",
        "dimensions": FACT_DIMS,
        "factors": FACT_FACTORS,
        "factorization": facts,
        "shapes": shapes,
    }


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------
def dumps(record) -> str:
    """Stable, diff-friendly JSON: one line per tensor (or list entry), floats as Python repr."""
    lines = ["{"]
    keys = list(record)
    for i, k in enumerate(keys):
        sep = "," if i + 1 < len(keys) else ""
        v = record[k]
        if k == "tensors":
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
                lines.append(f"    {json.dumps(e, sort_keys=True)}{s2}")
            lines.append("  ]" + sep)
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}{sep}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="compare with existing files instead of writing")
    ap.add_argument("--only", default=None, help="only cases whose file name contains this substring")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    print(f"peft {peft.__version__}, torch {torch.__version__}, transformers {TRANSFORMERS_VERSION}")
    jobs = []
    for case in CASES:
        for dkey in DTYPES:
            jobs.append((f"{case['name']}_{dkey}.json", case, dkey))
    jobs.append(("lokr_factorization.json", None, None))
    failures, total = 0, 0
    for fname, case, dkey in jobs:
        if args.only and args.only not in fname:
            continue
        if case is None:
            rec, info = generate_factorization(), ""
        else:
            rec, effect = generate(case, dkey)
            info = f", max|out-base_out|={effect:.4g}"
        text = dumps(rec)
        json.loads(text)
        assert len(text) < MAX_FILE_BYTES, f"{fname}: {len(text)} bytes, over the {MAX_FILE_BYTES} limit"
        total += len(text)
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
            print(f"wrote {path} ({len(text)} bytes{info})")
    assert total < MAX_TOTAL_BYTES, f"total {total} bytes"
    print(f"total {total} bytes")
    if failures:
        print(f"{failures} file(s) differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
