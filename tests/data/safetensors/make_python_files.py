#!/usr/bin/env python3
"""Writes valid/py_*.safetensors with the reference writer (safetensors.torch.save_file) and
valid/python.json with what a reader must find in them: dtype, shape, data_offsets, metadata, and every
value converted to float32 and float64 *by torch* (as bit patterns, so NaN, -0 and subnormals compare
exactly).

Also writes valid/py_golden.safetensors: tensors whose values the C++ test can rebuild exactly, saved
with metadata {"format": "pt"}; peft::safetensors::serialize must reproduce it byte for byte.

Needs torch and safetensors (tested with torch 1.13, safetensors 0.8.0):
  /work/venv/bin/python tests/data/safetensors/make_python_files.py
"""
import json
import math
import os
import struct

import safetensors
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
VALID = os.path.join(HERE, "valid")


def f32_bits(t):
    return [struct.unpack("<I", struct.pack("<f", x))[0] for x in t.to(torch.float32).flatten().tolist()]


def f64_bits(t):
    return [struct.unpack("<Q", struct.pack("<d", x))[0] for x in t.to(torch.float64).flatten().tolist()]


def expect(tensors, path, metadata):
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    out = {"metadata": metadata or {}, "tensors": {}}
    for name, t in tensors.items():
        e = {"dtype": header[name]["dtype"], "shape": list(t.shape), "data_offsets": header[name]["data_offsets"]}
        if t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            e["f32_bits"] = f32_bits(t)
            e["f64_bits"] = f64_bits(t)
        out["tensors"][name] = e
    return out


def main():
    g = torch.Generator().manual_seed(1234)
    tiny = 2.0 ** -24
    files = {
        "py_f32": ({
            "w": torch.randn(4, 8, generator=g),
            "b": torch.randn(8, generator=g),
            "t3": torch.randn(2, 3, 4, generator=g),
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 5),
            "specials": torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, 1.17549435e-38, 3.4028235e38]),
        }, {"format": "pt"}),
        "py_f16": ({
            "specials": torch.tensor([0.0, -0.0, 1.0, -2.5, 65504.0, -65504.0, math.inf, -math.inf, math.nan,
                                      tiny, 1023 * tiny, 2.0 ** -14, 0.1, 1.0 / 3.0, -tiny], dtype=torch.float16),
            "rand": torch.randn(16, 16, generator=g).to(torch.float16),
        }, {"format": "pt"}),
        "py_bf16": ({
            "specials": torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, -3.0e38, math.inf, -math.inf, math.nan,
                                      2.0 ** -133, 1e-40, 2.0 ** -126, 0.1, 1.0 / 3.0], dtype=torch.bfloat16),
            "rand": torch.randn(7, 9, generator=g).to(torch.bfloat16),
        }, {"format": "pt"}),
        "py_f64": ({
            "specials": torch.tensor([0.0, -0.0, math.pi, 1.0 / 3.0, 1e300, -1e300, 1e-300, 2.0 ** -149, 2.0 ** -150,
                                      math.inf, -math.inf, math.nan, 1.0 + 2.0 ** -24, 1.0 + 3 * 2.0 ** -24],
                                     dtype=torch.float64),
            "rand": torch.randn(3, 5, generator=g, dtype=torch.float64),
        }, {"format": "pt"}),
        "py_mixed": ({
            "lin.weight": torch.randn(6, 4, generator=g),
            "lin.bias": torch.randn(6, generator=g).to(torch.float16),
            "emb": torch.randn(5, 3, generator=g).to(torch.bfloat16),
            "scale": torch.randn(2, generator=g, dtype=torch.float64),
            "ids": torch.arange(7, dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
            "bytes": torch.arange(5, dtype=torch.uint8),
        }, {"format": "pt", "note": "mixed dtypes"}),
        "py_no_metadata": ({"x": torch.ones(3)}, None),
    }
    expected = {}
    for stem, (tensors, metadata) in files.items():
        path = os.path.join(VALID, stem + ".safetensors")
        save_file(tensors, path, metadata=metadata)
        os.chmod(path, 0o644)
        expected[stem + ".safetensors"] = expect(tensors, path, metadata)

    # The golden file: values exactly representable in their dtype, rebuilt by the C++ test.
    golden = {
        "b.weight": torch.tensor([i * 0.25 - 1.0 for i in range(12)], dtype=torch.float32).reshape(3, 4),
        "a.bias": torch.tensor([1.0, -2.0, 3.5, 0.125], dtype=torch.float32),
        "half": torch.tensor([i / 8.0 for i in range(6)], dtype=torch.float16).reshape(2, 3),
        "bf": torch.tensor([-1.5, 0.0, 2.0, 1024.0, -0.0078125], dtype=torch.bfloat16),
        "dbl": torch.tensor([[math.pi, -1.0 / 3.0], [1e-300, 2.0 ** 60]], dtype=torch.float64),
        "odd/\u00e9\n\u0001\"name": torch.tensor([7.0], dtype=torch.float32),
        "empty": torch.zeros(0, 3, dtype=torch.float32),
        "scalar": torch.tensor(3.5, dtype=torch.float32),
        "ids": torch.tensor([1, -2, 3], dtype=torch.int64),
    }
    save_file(golden, os.path.join(VALID, "py_golden.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(VALID, "py_golden.safetensors"), 0o644)
    expected["py_golden.safetensors"] = expect(golden, os.path.join(VALID, "py_golden.safetensors"), {"format": "pt"})

    with open(os.path.join(VALID, "python.json"), "w") as fh:
        json.dump({"generator": f"torch {torch.__version__}, safetensors {safetensors.__version__}", "files": expected},
                  fh, indent=None, sort_keys=True, ensure_ascii=True)
        fh.write("\n")
    print(f"wrote {len(expected)} files")


if __name__ == "__main__":
    main()
