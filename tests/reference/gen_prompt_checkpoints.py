#!/usr/bin/env python3
"""Golden prompt-learning checkpoints written by real Hugging Face PEFT (save_pretrained), for
tests/unit/test_prompt_checkpoint.cpp.

The base model is the small decoder of gen_transformer_reference.py wrapped as in gen_prompt_tuning_reference.py
(float32). For every case a directory tests/reference/checkpoints/prompt_<case>/ holds:
  * adapter_config.json, adapter_model.safetensors: exactly what PeftModel.save_pretrained wrote (model in eval
    mode, so the LSTM of P-tuning runs without dropout);
  * params.safetensors: the trainable prompt-encoder parameters before saving, under their names inside
    prompt_encoder.default (embedding.weight, mlp_head.0.weight, lstm_head.weight_ih_l0, transform.0.weight,
    prefix_task_cols, ...), so C++ can rebuild the same trainable module and save it;
  * expected.safetensors: what PeftModel.from_pretrained(dir) then produces: "prompt" (get_prompt(1)[0]:
    [total_virtual_tokens, token_dim]) for prompt tuning and P-tuning, "prompt.task<k>" for multitask prompt
    tuning (task id k), and for prefix tuning "past.<l>.key" / "past.<l>.value" ([heads, nvt, head_dim] of batch
    row 0, what get_prompt hands the attention of layer l).

Usage: /work/venv/bin/python tests/reference/gen_prompt_checkpoints.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

from peft import (MultitaskPromptTuningConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
                  get_peft_model)
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_prompt_methods_reference as gm  # noqa: E402
import gen_transformer_reference as gt  # noqa: E402

SEED = 6161
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "checkpoints")

CASES = {
    "prompt_tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "p_tuning_mlp": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_reparameterization_type="MLP",
                                                encoder_hidden_size=5),
    "p_tuning_lstm": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_reparameterization_type="LSTM",
                                                 encoder_hidden_size=4, encoder_num_layers=2),
    "prefix_tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix_tuning_proj": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                                     encoder_hidden_size=6),
    "multitask_prompt_tuning": lambda: MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_tasks=3,
                                                                   num_ranks=2),
}


def base():
    torch.manual_seed(SEED)
    return gm.WrappedPast(gt.Decoder().float())


def generate(out_root):
    for i, (name, make) in enumerate(CASES.items()):
        out = os.path.join(out_root, f"prompt_{name}")
        shutil.rmtree(out, ignore_errors=True)
        torch.manual_seed(SEED + 1 + i)
        pm = get_peft_model(base(), make())
        pm.eval()
        enc = pm.prompt_encoder["default"]
        params = {k: p.detach().clone().contiguous() for k, p in enc.named_parameters()}
        pm.create_or_update_model_card = lambda *a, **k: None  # the README card needs Jinja2; nothing to check in it
        pm.save_pretrained(out)
        save_file(params, os.path.join(out, "params.safetensors"))

        loaded = PeftModel.from_pretrained(base(), out)
        loaded.eval()
        exp = {}
        with torch.no_grad():
            if name.startswith("multitask"):
                for k in range(3):
                    exp[f"prompt.task{k}"] = loaded.get_prompt(1, task_ids=torch.tensor([k]))[0].contiguous()
            elif name.startswith("prefix"):
                past = loaded.get_prompt(1)
                legacy = past.to_legacy_cache() if hasattr(past, "to_legacy_cache") else past
                for l, (k, v) in enumerate(legacy):
                    exp[f"past.{l}.key"] = k[0].contiguous()
                    exp[f"past.{l}.value"] = v[0].contiguous()
            else:
                exp["prompt"] = loaded.get_prompt(1)[0].contiguous()
        save_file({k: v.float() for k, v in exp.items()}, os.path.join(out, "expected.safetensors"))
        print("wrote", out, sorted(exp))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    generate(a.out)


if __name__ == "__main__":
    main()
