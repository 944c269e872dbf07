#!/usr/bin/env python3
"""Generate Prefix Tuning, P-Tuning and MultiTask Prompt Tuning reference numbers from real Hugging Face PEFT
(PeftModelForCausalLM) on the small decoder of gen_transformer_reference.py (same weights, same layout).

The decoder and its transformers-like wrapper come from gen_transformer_reference.py and
gen_prompt_tuning_reference.py; the wrapper here additionally accepts `past_key_values` (the DynamicCache PEFT
builds for prefix tuning) and feeds it to the hand-written attention as per-layer past keys/values.

Cases (each in prompt_methods_{f32,f64}.json, tensor names prefixed by the case):
  * "prefix":      PrefixTuningConfig(num_virtual_tokens=3), no projection
  * "prefix_proj": PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=6)
  * "ptune_mlp":   PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type="MLP",
                   encoder_hidden_size=5)
  * "ptune_lstm":  PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type="LSTM",
                   encoder_hidden_size=4, encoder_num_layers=2)
  * "mpt_random_t<k>", "mpt_text_t<k>": MultitaskPromptTuningConfig(num_virtual_tokens=3, num_tasks=3,
                   num_ranks=2, init RANDOM / TEXT "ab"), batch task ids [k, (k+1) mod 3]
  * "mpt_source.*", "mpt_average_source_tasks.*", "mpt_exact_source_task.*", "mpt_only_source_shared.*": the
                   source-task initialisations (see source_cases)
For each case: "<case>.param.<name>" (the trainable parameters after PEFT's init, names inside
prompt_encoder.default), "<case>.logits" ([batch * seq, vocab] for prefix tuning, [batch * (nvt + seq), vocab]
otherwise), "<case>.loss", "<case>.grad.<name>" (the gradient of the loss w.r.t. each trainable parameter) and
"<case>.prompt_embeddings" (get_prompt_embedding_to_save). Prefix tuning also records
"<case>.past.<l>.key|value" ([batch, heads, nvt, head_dim], what get_prompt hands the model); the P-tuning and
MPT cases record "<case>.prompts" (get_prompt: [batch, nvt, d]) and MPT "<case>.task_ids". The base weights are
"w.<param>"; ids, mask and labels as in transformer_prompt_*.json.

Usage: /work/venv/bin/python tests/reference/gen_prompt_methods_reference.py [--out DIR] [--check]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import types

import torch
import transformers

import peft
from safetensors.torch import save_file

from peft import MultitaskPromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig, get_peft_model

import gen_prompt_tuning_reference as gp
import gen_transformer_reference as gt

SEED = 7170
NVT = 3
CASES = [
    dict(name="prefix", kind="prefix", kw=dict(prefix_projection=False)),
    dict(name="prefix_proj", kind="prefix", kw=dict(prefix_projection=True, encoder_hidden_size=6)),
    dict(name="ptune_mlp", kind="ptune", kw=dict(encoder_reparameterization_type="MLP", encoder_hidden_size=5)),
    dict(name="ptune_lstm", kind="ptune", kw=dict(encoder_reparameterization_type="LSTM", encoder_hidden_size=4, encoder_num_layers=2)),
]
for k in range(3):
    CASES.append(dict(name=f"mpt_random_t{k}", kind="mpt", task=k, kw=dict(num_tasks=3, num_ranks=2, prompt_tuning_init="RANDOM")))
    CASES.append(dict(name=f"mpt_text_t{k}", kind="mpt", task=k,
                      kw=dict(num_tasks=3, num_ranks=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="ab",
                              tokenizer_name_or_path="stub")))


class WrappedPast(gp.Wrapped):
    """The wrapper of gen_prompt_tuning_reference.py, also taking PEFT's past_key_values (a transformers Cache)."""

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None, past_key_values=None, **kwargs):
        past = None
        if past_key_values is not None:
            legacy = past_key_values.to_legacy_cache() if hasattr(past_key_values, "to_legacy_cache") else past_key_values
            past = [(k, v) for k, v in legacy]
            self.seen_past = past
        logits = self.decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, past=past, mask=attention_mask)
        loss = None if labels is None else gt.causal_lm_loss(logits, labels)
        return types.SimpleNamespace(logits=logits, loss=loss)


def make_config(case):
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=NVT, **case["kw"])
    if case["kind"] == "prefix":
        return PrefixTuningConfig(**kw)
    if case["kind"] == "ptune":
        return PromptEncoderConfig(**kw)
    return MultitaskPromptTuningConfig(**kw)


SOURCE_INITS = ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"]


def source_cases(dtype, weights, T):
    """The source-task inits: a 3-task source prompt saved as PEFT saves it (prompt_embeddings,
    prefix_task_cols, prefix_task_rows in a safetensors file), then a new adapter initialised from it:
    "mpt_source.<name>" the saved tensors, "mpt_<init>.param.<name>" the new adapter's tensors after init
    (num_tasks 1 for AVERAGE / EXACT, whose loaded factors have one task; 3 for ONLY_SOURCE_SHARED;
    prompt_tuning_init_task 1)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "source.safetensors")
        for j, init in enumerate([None] + SOURCE_INITS):
            torch.manual_seed(SEED + 100 + j)
            dec = gt.Decoder().to(dtype)
            kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=NVT, num_ranks=2, prompt_tuning_init_task=1)
            if init is None:
                kw.update(num_tasks=3)
            else:
                kw.update(num_tasks=3 if init == "ONLY_SOURCE_SHARED" else 1, prompt_tuning_init=init,
                          prompt_tuning_init_state_dict_path=path)
            pm = get_peft_model(WrappedPast(dec), MultitaskPromptTuningConfig(**kw))
            pm.to(dtype)
            enc = pm.prompt_encoder["default"]
            if init is None:
                sd = {"prompt_embeddings": enc.embedding.weight.detach().clone(),
                      "prefix_task_cols": enc.prefix_task_cols.detach().clone(),
                      "prefix_task_rows": enc.prefix_task_rows.detach().clone()}
                save_file(sd, path)
                for k, v in sd.items():
                    T[f"mpt_source.{k}"] = v
            else:
                exact = {"embedding.weight": sd["prompt_embeddings"]}
                if init == "AVERAGE_SOURCE_TASKS":
                    exact.update(prefix_task_cols=sd["prefix_task_cols"].mean(0, keepdim=True),
                                 prefix_task_rows=sd["prefix_task_rows"].mean(0, keepdim=True))
                elif init == "EXACT_SOURCE_TASK":
                    exact.update(prefix_task_cols=sd["prefix_task_cols"][1:2], prefix_task_rows=sd["prefix_task_rows"][1:2])
                for k, p in enc.named_parameters():
                    v = p.detach().clone()
                    if k in exact:
                        # PEFT builds the encoder in float32 and loads the source into it before the model's .to(dtype):
                        # its values are the float32 rounding of the exact ones; record the exact ones (as for TEXT)
                        assert torch.equal(v, exact[k].to(torch.float32).to(dtype)), (init, k)
                        v = exact[k]
                    T[f"mpt_{init.lower()}.param.{k}"] = v


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
    transformers.AutoTokenizer.from_pretrained = lambda *a, **k: gp.StubTokenizer()
    try:
        for i, case in enumerate(CASES):
            torch.manual_seed(SEED + i)
            dec = gt.Decoder().to(dtype)
            with torch.no_grad():
                for name, p in dec.named_parameters():
                    p.copy_(torch.tensor(weights[name], dtype=torch.float64).to(dtype))
            wrapped = WrappedPast(dec)
            pm = get_peft_model(wrapped, make_config(case))
            pm.to(dtype)
            enc = pm.prompt_encoder["default"]
            if case["kind"] == "mpt" and case["kw"]["prompt_tuning_init"] == "TEXT":
                # PEFT copies the TEXT rows as float32; use the exact rows (a no-op in float32), as for prompt tuning
                init_ids = gp.StubTokenizer()("ab")["input_ids"]
                rows = dec.wte.weight.detach()[torch.tensor((init_ids * NVT)[:NVT])]
                assert torch.equal(enc.embedding.weight.detach(), rows.to(torch.float32).to(dtype))
                with torch.no_grad():
                    enc.embedding.weight.copy_(rows)
            n = case["name"]
            params = {k: p for k, p in enc.named_parameters() if p.requires_grad}
            trainable = sorted(k for k, p in pm.named_parameters() if p.requires_grad)
            assert trainable == sorted(f"prompt_encoder.default.{k}" for k in params), trainable
            for k, p in params.items():
                T[f"{n}.param.{k}"] = p.detach().clone()
            kwargs = {}
            if case["kind"] == "mpt":
                task_ids = torch.tensor([case["task"], (case["task"] + 1) % 3], dtype=torch.int64)
                T[f"{n}.task_ids"] = task_ids
                kwargs["task_ids"] = task_ids
            out = pm(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
            out.loss.backward()
            T[f"{n}.logits"] = out.logits.reshape(-1, gt.VOCAB)
            T[f"{n}.loss"] = out.loss.reshape(1)
            for k, p in params.items():
                T[f"{n}.grad.{k}"] = p.grad.detach().clone()
            T[f"{n}.prompt_embeddings"] = pm.get_prompt_embedding_to_save("default")
            if case["kind"] == "prefix":
                assert out.logits.shape == (gt.BATCH, gt.SEQ, gt.VOCAB)
                for l, (k, v) in enumerate(wrapped.seen_past):
                    assert k.shape == (gt.BATCH, gt.HEADS, NVT, gt.HD)
                    T[f"{n}.past.{l}.key"] = k.detach().clone()
                    T[f"{n}.past.{l}.value"] = v.detach().clone()
            else:
                assert out.logits.shape == (gt.BATCH, NVT + gt.SEQ, gt.VOCAB)
                with torch.no_grad():
                    T[f"{n}.prompts"] = pm.get_prompt(gt.BATCH, task_ids=kwargs.get("task_ids"))
        source_cases(dtype, weights, T)
    finally:
        transformers.AutoTokenizer.from_pretrained = orig
    return {
        "case": "prompt_methods",
        "dtype": "float32" if dtype == torch.float32 else "float64",
        "torch_version": torch.__version__,
        "peft_version": peft.__version__,
        "transformers_version": transformers.__version__,
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
        path = os.path.join(args.out, f"prompt_methods_{dkey}.json")
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
