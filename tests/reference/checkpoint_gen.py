"""The command line shared by the checkpoint generators (gen_checkpoints.py, gen_checkpoints_adalora_vera.py,
gen_combine_reference.py): write the files into --out (default tests/reference/checkpoints), or with --check
regenerate them into a temporary directory and compare with the committed ones (JSON through a
normalisation and a comparison the generator chooses, every other file byte for byte); exit 1 on a
difference."""

import argparse
import filecmp
import json
import os
import shutil
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def sort_module_lists(j, keys=("target_modules", "feedforward_modules")):
    """PEFT writes target_modules (a Python set) in hash order, which changes between runs."""
    for k in keys:
        if isinstance(j.get(k), list):
            j[k] = sorted(j[k])
    return j


def run(generate, normalized=sort_module_lists, same_json=lambda a, b: a == b):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "checkpoints"))
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.check:
        generate(args.out)
        return
    tmp = tempfile.mkdtemp()
    try:
        generate(tmp)
        bad = []
        for root, _, files in os.walk(tmp):
            for fn in files:
                new = os.path.join(root, fn)
                old = os.path.join(args.out, os.path.relpath(new, tmp))
                if fn.endswith(".json"):
                    same = os.path.exists(old) and same_json(normalized(json.load(open(old))), normalized(json.load(open(new))))
                else:
                    same = os.path.exists(old) and filecmp.cmp(old, new, shallow=False)
                if not same:
                    bad.append(old)
        if bad:
            print("differ:", *bad, sep="\n  ")
            sys.exit(1)
        print("all files equal")
    finally:
        shutil.rmtree(tmp)
