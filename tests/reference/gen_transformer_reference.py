#!/usr/bin/env python3
"""Generate reference numbers for peft++'s transformer building blocks (include/peft/nn/) from PyTorch,
and for LoRA on their q/v projections from real Hugging Face PEFT.

The model is written here by hand with plain torch modules, in the exact layout of peft::nn::Decoder
(GPT-2-like, pre-LN, separate q/k/v/o projections, untied LM head, GELU tanh):

    wte (vocab, d)    wpe (max_pos, d)
    h.<i>.ln_1        h.<i>.attn.{q_proj,k_proj,v_proj,o_proj}   (nn.Linear d -> d, bias)
    h.<i>.ln_2        h.<i>.mlp.fc_in (d -> d_ff), GELU(tanh), h.<i>.mlp.fc_out (d_ff -> d)
    ln_f              lm_head (d -> vocab, no bias)

    x = wte(ids) (or inputs_embeds) + wpe(past_len + s)
    per block: a = x + attn(ln_1(x)); x = a + mlp(ln_2(a))
    attn: K = cat(past_key, k), V = cat(past_value, v) per head; key j is visible to query s when
          j <= past_len + s and attention_mask[b, j] == 1; softmax(q K^T / sqrt(head_dim)) V; o_proj
    logits = lm_head(ln_f(x))
    loss = cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100)     (transformers' causal LM loss)

Sizes: vocab 11, max_pos 8, d_model 16, 2 layers, 2 heads (head_dim 8), d_ff 32, batch 2, seq 5,
past_len 3 (past keys/values [batch, heads, past_len, head_dim] per layer, requires_grad).
attention_mask [2, 3 + 5]: row 0 all ones; row 1 masks past position 1 and the last two tokens (right
padding). labels = input_ids with -100 where the mask is 0 (row 1, tokens 3 and 4).

Weights are drawn from torch.manual_seed(SEED) and rounded to 4 decimals, so the float32 and float64
files hold the same weights (the float32 model uses their float32 rounding, as the C++ test does).

Scenarios recorded in each file (prefix of the tensor names):
  * "w.<param>"            the weights (PyTorch names, as peft::parameters() names them in C++)
  * "ids", "mask", "labels", "past.<l>.key|value"
  * "full.logits", "full.loss", "full.grad.<param>" for every parameter (all trainable),
    "full.grad.past.<l>.key|value", "full.inputs_embeds" = wte(ids) and "full.grad.inputs_embeds"
    (the gradient w.r.t. the looked-up token embeddings, i.e. what inputs_embeds would receive)
  * "nopast.logits", "nopast.loss": the same ids with no past and no mask (positions from 0)
  * "lora.*": the model frozen, then real PEFT get_peft_model with LoraConfig(r=2, lora_alpha=4,
    target_modules=["q_proj", "v_proj"], init_lora_weights=False): "lora.w.<peft param>" (lora_A/lora_B,
    names without the "base_model.model." prefix), "lora.logits", "lora.loss", "lora.grad.<lora param>",
    "lora.grad.past.<l>.key|value" (past and mask as above)

Usage (the venv of README.md):

    /work/venv/bin/python tests/reference/gen_transformer_reference.py [--out DIR] [--check]

Writes tests/reference/data/transformer_{f32,f64}.json. --check regenerates in memory and compares
byte for byte. The script asserts that the hand-written attention agrees with an independent per-head
loop implementation, and that PEFT's LoRA model with the adapters disabled reproduces the base logits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import peft
from peft import LoraConfig, get_peft_model

SEED = 5150
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "data")
DTYPES = {"f32": torch.float32, "f64": torch.float64}

VOCAB, MAX_POS, D, LAYERS, HEADS, D_FF = 11, 8, 16, 2, 2, 32
BATCH, SEQ, PAST = 2, 5, 3
HD = D // HEADS
EPS = 1e-5


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, past=None, mask=None):
        b, s, _ = x.shape
        split = lambda t: t.view(b, s, HEADS, HD).transpose(1, 2)  # [b, heads, s, hd]
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        p = 0
        if past is not None:
            p = past[0].shape[2]
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        L = p + s
        scores = q @ k.transpose(-1, -2) / math.sqrt(HD)
        allowed = torch.arange(L)[None, :] <= (p + torch.arange(s))[:, None]  # [s, L] causal
        allowed = allowed[None, None].expand(b, 1, s, L)
        if mask is not None:
            allowed = allowed & (mask[:, None, None, :] != 0)
        scores = scores.masked_fill(~allowed, float("-inf"))
        att = torch.softmax(scores, dim=-1)
        out = (att @ v).transpose(1, 2).reshape(b, s, D)
        return self.o_proj(out)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(D, D_FF)
        self.act = nn.GELU(approximate="tanh")
        self.fc_out = nn.Linear(D_FF, D)

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(D, eps=EPS)
        self.attn = Attention()
        self.ln_2 = nn.LayerNorm(D, eps=EPS)
        self.mlp = Mlp()

    def forward(self, x, past=None, mask=None):
        a = x + self.attn(self.ln_1(x), past, mask)
        return a + self.mlp(self.ln_2(a))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.wpe = nn.Embedding(MAX_POS, D)
        self.h = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D, eps=EPS)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, input_ids=None, inputs_embeds=None, past=None, mask=None):
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        b, s, _ = inputs_embeds.shape
        p = 0 if past is None else past[0][0].shape[2]
        x = inputs_embeds + self.wpe(torch.arange(p, p + s))[None]
        for i, blk in enumerate(self.h):
            x = blk(x, None if past is None else past[i], mask)
        return self.lm_head(self.ln_f(x))


def causal_lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)


def reference_attention(attn, x, past, mask):
    """An independent per-(batch, head, query) loop, to check the vectorised Attention above."""
    b, s, _ = x.shape
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    p = 0 if past is None else past[0].shape[2]
    out = torch.zeros(b, s, D, dtype=x.dtype)
    for bi in range(b):
        for h in range(HEADS):
            cols = slice(h * HD, (h + 1) * HD)
            keys = [past[0][bi, h, j] for j in range(p)] + [k[bi, j, cols] for j in range(s)]
            vals = [past[1][bi, h, j] for j in range(p)] + [v[bi, j, cols] for j in range(s)]
            for si in range(s):
                vis = [j for j in range(p + si + 1) if mask is None or mask[bi, j] != 0]
                sc = torch.stack([q[bi, si, cols] @ keys[j] / math.sqrt(HD) for j in vis])
                w = torch.softmax(sc, dim=0)
                out[bi, si, cols] = sum(w[n] * vals[j] for n, j in enumerate(vis))
    return attn.o_proj(out)


def rounded_weights():
    """Deterministic weights, rounded to 4 decimals: the same numbers for float32 and float64."""
    g = torch.Generator().manual_seed(SEED)
    model = Decoder()
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            t = 1 + 0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        elif name.endswith("bias"):
            t = 0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        elif name in ("wte.weight", "wpe.weight"):
            t = 0.8 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        else:
            t = torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(p.shape[1])
        out[name] = np.round(t.numpy(), 4)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    past = [[np.round(torch.randn(BATCH, HEADS, PAST, HD, generator=g, dtype=torch.float64).numpy(), 4) for _ in range(2)]
            for _ in range(LAYERS)]
    return out, ids, past


def record(t, dtype):
    t = t.detach().cpu().contiguous() if isinstance(t, torch.Tensor) else torch.as_tensor(t)
    if t.dtype in (torch.int64, torch.int32, torch.bool):
        data = [int(v) for v in t.reshape(-1).tolist()]
    elif dtype == torch.float32:
        data = [float(str(np.float32(v))) for v in t.reshape(-1).tolist()]  # shortest float32 repr
    else:
        data = [float(v) for v in t.reshape(-1).tolist()]
    return {"shape": list(t.shape), "data": data}


def generate(dkey):
    dtype = DTYPES[dkey]
    torch.manual_seed(SEED)
    weights, ids, past_np = rounded_weights()
    model = Decoder().to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.tensor(weights[name], dtype=torch.float64).to(dtype))
    mask = torch.ones(BATCH, PAST + SEQ, dtype=torch.int64)
    mask[1, 1] = 0
    mask[1, PAST + 3:] = 0
    labels = ids.clone()
    labels[1, 3:] = -100
    T = {}
    for name in weights:
        T[f"w.{name}"] = torch.tensor(weights[name], dtype=torch.float64).to(dtype)
    T["ids"] = ids
    T["mask"] = mask
    T["labels"] = labels

    def make_past():
        return [tuple(torch.tensor(past_np[l][i], dtype=torch.float64).to(dtype).requires_grad_(True) for i in range(2))
                for l in range(LAYERS)]

    for l in range(LAYERS):
        T[f"past.{l}.key"] = torch.tensor(past_np[l][0]).to(dtype)
        T[f"past.{l}.value"] = torch.tensor(past_np[l][1]).to(dtype)

    # the vectorised attention agrees with the loop implementation (with past and mask)
    with torch.no_grad():
        x = torch.randn(BATCH, SEQ, D, dtype=dtype)
        pst = make_past()[0]
        a = model.h[0].attn(x, pst, mask)
        b = reference_attention(model.h[0].attn, x, pst, mask)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert torch.allclose(a, b, atol=tol, rtol=tol), f"attention self-check: {(a - b).abs().max()}"

    # full: every parameter trainable, ids + past + mask
    past = make_past()
    emb = model.wte(ids)
    emb.retain_grad()
    logits = model(inputs_embeds=emb, past=past, mask=mask)
    with torch.no_grad():  # the ids path gives the same logits
        assert torch.equal(logits, model(input_ids=ids, past=[tuple(t.detach() for t in pk) for pk in past], mask=mask))
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    T["full.logits"] = logits.reshape(BATCH * SEQ, VOCAB)
    T["full.loss"] = loss.reshape(1)
    for name, p in model.named_parameters():
        T[f"full.grad.{name}"] = p.grad.detach().clone()  # model.zero_grad() below zeroes .grad in place
    for l in range(LAYERS):
        T[f"full.grad.past.{l}.key"] = past[l][0].grad
        T[f"full.grad.past.{l}.value"] = past[l][1].grad
    T["full.inputs_embeds"] = emb.reshape(BATCH * SEQ, D)
    T["full.grad.inputs_embeds"] = emb.grad.reshape(BATCH * SEQ, D)

    # no past, no mask
    with torch.no_grad():
        logits0 = model(input_ids=ids)
        T["nopast.logits"] = logits0.reshape(BATCH * SEQ, VOCAB)
        T["nopast.loss"] = causal_lm_loss(logits0, labels).reshape(1)

    # LoRA on q/v with real PEFT
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(SEED + 1)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_dropout=0.0)
    pm = get_peft_model(model, cfg)
    lora_params = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert lora_params and all("lora_" in n for n, _ in lora_params), [n for n, _ in lora_params]
    past = make_past()
    logits_l = pm(input_ids=ids, past=past, mask=mask)
    with torch.no_grad(), pm.disable_adapter():
        base = pm(input_ids=ids, past=[tuple(t.detach() for t in pk) for pk in past], mask=mask)
        assert torch.allclose(base, logits), "PEFT with adapters disabled must give the base logits"
    assert (logits_l - logits).abs().max() > 1e-3, "the LoRA adapters must change the logits"
    loss_l = causal_lm_loss(logits_l, labels)
    loss_l.backward()
    T["lora.logits"] = logits_l.reshape(BATCH * SEQ, VOCAB)
    T["lora.loss"] = loss_l.reshape(1)
    for n, p in lora_params:
        short = n.removeprefix("base_model.model.")
        T[f"lora.w.{short}"] = p
        T[f"lora.grad.{short}"] = p.grad
    for l in range(LAYERS):
        T[f"lora.grad.past.{l}.key"] = past[l][0].grad
        T[f"lora.grad.past.{l}.value"] = past[l][1].grad

    rec = {
        "case": "transformer",
        "dtype": "float32" if dtype == torch.float32 else "float64",
        "torch_version": torch.__version__,
        "peft_version": peft.__version__,
        "seed": SEED,
        "sizes": {"vocab": VOCAB, "max_pos": MAX_POS, "d_model": D, "layers": LAYERS, "heads": HEADS, "d_ff": D_FF,
                  "batch": BATCH, "seq": SEQ, "past_len": PAST, "layer_norm_eps": EPS, "activation": "gelu_tanh"},
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "tensors": {k: record(v, dtype) for k, v in T.items()},
    }
    return rec


def dumps(rec) -> str:
    lines = ["{"]
    keys = list(rec)
    for i, k in enumerate(keys):
        sep = "," if i + 1 < len(keys) else ""
        if k == "tensors":
            lines.append('  "tensors": {')
            items = list(rec[k].items())
            for j, (name, t) in enumerate(items):
                lines.append(f"    {json.dumps(name)}: {json.dumps(t, allow_nan=False)}" + ("," if j + 1 < len(items) else ""))
            lines.append("  }" + sep)
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(rec[k], sort_keys=True)}{sep}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bad = 0
    for dkey in DTYPES:
        text = dumps(generate(dkey))
        path = os.path.join(args.out, f"transformer_{dkey}.json")
        if args.check:
            with open(path) as f:
                same = f.read() == text
            print(f"{path}: {'ok' if same else 'DIFFERS'}")
            bad += not same
        else:
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {path} ({len(text)} bytes)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
