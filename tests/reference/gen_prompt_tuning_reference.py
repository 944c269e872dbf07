#!/usr/bin/env python3
"""Generate Prompt Tuning reference numbers from real Hugging Face PEFT (PeftModelForCausalLM with a
PromptTuningConfig) on the small decoder of gen_transformer_reference.py (same weights, same layout).

The decoder is wrapped in a minimal transformers-like module (a PretrainedConfig, `prepare_inputs_for_generation`,
and a forward taking input_ids / inputs_embeds / attention_mask / labels that returns logits and transformers'
causal-LM loss), so PEFT runs its own prompt-tuning path: PromptEmbedding init (TEXT: the tokenised init text
repeated or truncated to num_virtual_tokens, rows of the word embeddings), prompts prepended to inputs_embeds,
num_virtual_tokens ones prepended to attention_mask and -100 to labels.

PEFT copies the TEXT rows as float32 whatever the model's dtype; peft++ keeps the model's scalar type, so
the float64 file uses the exact rows (the script asserts PEFT's table equals their float32 rounding first).

TEXT init needs a tokenizer: AutoTokenizer.from_pretrained is replaced by a stub that maps each character of the
text to (byte value mod vocab) (no network, no files); PEFT's own code does the rest.

Cases (each in transformer_prompt_{f32,f64}.json, tensor names prefixed by the case):
  * "text_short": num_virtual_tokens 3, init text "ab" (2 ids, repeated and truncated: a b a)
  * "text_long":  num_virtual_tokens 3, init text "hello" (5 ids, truncated to 3)
  * "random":     num_virtual_tokens 3, RANDOM init (torch's nn.Embedding N(0, 1) from a seed)
For each: "<case>.init_ids" (the ids PEFT used, from the stub tokenizer; empty for random),
"<case>.prompt" (the embedding table after init), "<case>.logits" ([batch * (nvt + seq), vocab], PEFT's output
with the virtual-token rows), "<case>.loss", "<case>.grad.prompt" (gradient of the loss w.r.t. the table) and
"<case>.prompt_embeddings" (get_prompt_embedding_to_save, what save_pretrained writes). The base weights are
"w.<param>" as in transformer_*.json; ids, attention mask and labels as "ids", "mask", "labels"
([batch, seq] without the virtual tokens).

Usage: /work/venv/bin/python tests/reference/gen_prompt_tuning_reference.py [--out DIR] [--check]
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import PretrainedConfig

import peft
from peft import PromptTuningConfig, get_peft_model

import gen_transformer_reference as gt

SEED = 6160
CASES = [
    dict(name="text_short", nvt=3, init="TEXT", text="ab"),
    dict(name="text_long", nvt=3, init="TEXT", text="hello"),
    dict(name="random", nvt=3, init="RANDOM", text=None),
]


class StubTokenizer:
    def __call__(self, text):
        return {"input_ids": [ord(c) % gt.VOCAB for c in text]}


class Wrapped(nn.Module):
    """The hand-written decoder with the surface PeftModelForCausalLM expects."""

    def __init__(self, dec):
        super().__init__()
        self.decoder = dec
        self.config = PretrainedConfig(vocab_size=gt.VOCAB, hidden_size=gt.D, num_hidden_layers=gt.LAYERS,
                                       num_attention_heads=gt.HEADS)
        self.config.model_type = "peftpp-test"

    @property
    def device(self):
        return torch.device("cpu")

    def prepare_inputs_for_generation(self, *args, **kwargs):  # pragma: no cover (not used)
        raise NotImplementedError

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None, **kwargs):
        logits = self.decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, mask=attention_mask)
        loss = None if labels is None else gt.causal_lm_loss(logits, labels)
        return types.SimpleNamespace(logits=logits, loss=loss)


def generate(dkey):
    dtype = gt.DTYPES[dkey]
    weights, ids, _ = gt.rounded_weights()
    mask = torch.ones(gt.BATCH, gt.SEQ, dtype=torch.int64)
    mask[1, 3:] = 0
    labels = ids.clone()
    labels[1, 3:] = -100
    T = {}
    for name in weights:
        T[f"w.{name}"] = torch.tensor(weights[name], dtype=torch.float64).to(dtype)
    T["ids"], T["mask"], T["labels"] = ids, mask, labels
    orig = transformers.AutoTokenizer.from_pretrained
    transformers.AutoTokenizer.from_pretrained = lambda *a, **k: StubTokenizer()
    try:
        for i, case in enumerate(CASES):
            torch.manual_seed(SEED + i)
            dec = gt.Decoder().to(dtype)
            with torch.no_grad():
                for name, p in dec.named_parameters():
                    p.copy_(torch.tensor(weights[name], dtype=torch.float64).to(dtype))
            kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=case["nvt"], prompt_tuning_init=case["init"])
            if case["init"] == "TEXT":
                kw.update(prompt_tuning_init_text=case["text"], tokenizer_name_or_path="stub")
            cfg = PromptTuningConfig(**kw)
            pm = get_peft_model(Wrapped(dec), cfg)
            pm.to(dtype)  # PEFT keeps the prompt table in float32; the float64 case runs everything in float64
            enc = pm.prompt_encoder["default"]
            trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
            assert trainable == ["prompt_encoder.default.embedding.weight"], trainable
            init_ids = StubTokenizer()(case["text"])["input_ids"] if case["text"] else []
            if init_ids:
                reps = (init_ids * case["nvt"])[: case["nvt"]]
                rows = dec.wte.weight.detach()[torch.tensor(reps)]
                # PEFT copies the rows as float32 whatever the model's dtype; peft++ keeps the model's scalar
                # type, so the float64 case sets the exact rows (a no-op for float32)
                assert torch.equal(enc.embedding.weight.detach(), rows.to(torch.float32).to(enc.embedding.weight.dtype))
                with torch.no_grad():
                    enc.embedding.weight.copy_(rows)
            n = case["name"]
            T[f"{n}.init_ids"] = torch.tensor(init_ids, dtype=torch.int64)
            T[f"{n}.prompt"] = enc.embedding.weight.detach().clone()
            out = pm(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            T[f"{n}.logits"] = out.logits.reshape(-1, gt.VOCAB)
            T[f"{n}.loss"] = out.loss.reshape(1)
            T[f"{n}.grad.prompt"] = enc.embedding.weight.grad.detach().clone()
            T[f"{n}.prompt_embeddings"] = pm.get_prompt_embedding_to_save("default")
            assert out.logits.shape == (gt.BATCH, case["nvt"] + gt.SEQ, gt.VOCAB)
    finally:
        transformers.AutoTokenizer.from_pretrained = orig
    return {
        "case": "prompt_tuning",
        "dtype": "float32" if dtype == torch.float32 else "float64",
        "torch_version": torch.__version__,
        "peft_version": peft.__version__,
        "seed": SEED,
        "cases": CASES,
        "tensors": {k: gt.record(v, dtype) for k, v in T.items()},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=gt.DEFAULT_OUT)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bad = 0
    for dkey in gt.DTYPES:
        text = gt.dumps(generate(dkey))
        path = os.path.join(args.out, f"transformer_prompt_{dkey}.json")
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
