#!/usr/bin/env python3
"""Loads fashion_transfer's checkpoints into PyTorch with Hugging Face PEFT and re-measures their test accuracy.

The same network in PyTorch (conv 1->16 3x3 p1, ReLU, maxpool 2, conv 16->32 3x3 p1, ReLU, maxpool 2,
fc 1568->128, ReLU, head 128->5) gets the cached pretrained base (safetensors, PyTorch names); each
adapter directory (adapter_model.safetensors + adapter_config.json) is loaded with
PeftModel.from_pretrained, and `full` from its model.safetensors. The accuracy on the first N test images
of classes 5-9 (N = the run's --test-limit; 0 = all 5000) must match what the C++ run reported.

Usage: check_with_peft.py BASE.safetensors OUT_DIR/small SUMMARY.json [--test-limit N] [--data-dir DIR]
Needs torch, peft, safetensors, numpy (never needed by the C++ build or tests).
"""
import argparse
import gzip
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from peft import PeftModel
from safetensors.torch import load_file


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(1568, 128)
        self.head = nn.Linear(128, 5)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(torch.relu(self.fc(x.flatten(1))))


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("small_dir")
    ap.add_argument("summary")
    ap.add_argument("--test-limit", type=int, default=0)
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    a = ap.parse_args()

    images = read_idx(os.path.join(a.data_dir, "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(a.data_dir, "t10k-labels-idx1-ubyte.gz"))
    keep = np.nonzero(labels >= 5)[0]
    if a.test_limit:
        keep = keep[: a.test_limit]
    x = torch.from_numpy(((images[keep].astype(np.float32) / 255.0 - 0.2860) / 0.3530)[:, None])
    y = torch.from_numpy(labels[keep].astype(np.int64) - 5)

    reported = {r["method"]: r["test_accuracy"] for r in json.load(open(a.summary)) if r["config"] == "small"}
    base_sd = load_file(a.base)
    ok = True
    for method in sorted(reported):
        d = os.path.join(a.small_dir, method)
        net = Net()
        if method == "full":
            net.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
            model = net
        elif method == "head":
            net.load_state_dict({k: v for k, v in base_sd.items() if not k.startswith("head.")}, strict=False)
            head = load_file(os.path.join(d, "adapter_model.safetensors"))
            net.head.load_state_dict({"weight": head["base_model.model.head.weight"], "bias": head["base_model.model.head.bias"]})
            model = net
        else:
            net.load_state_dict(base_sd)  # the pretrained head is replaced by modules_to_save
            model = PeftModel.from_pretrained(net, d)
        model.eval()
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        diff = abs(acc - reported[method])
        # a handful of images may flip between float32 implementations (ties of nearly equal logits)
        good = diff <= 2.0 / len(y) + 1e-9
        ok = ok and good
        print(f"{method:5s} PyTorch+PEFT {100 * acc:6.2f}%   peft++ {100 * reported[method]:6.2f}%   {'ok' if good else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
