#!/usr/bin/env python3
"""Checks that files written by peft::safetensors::write load in Python's safetensors (by hand; the C++
test suite does not need Python):

  PEFT_SAFETENSORS_EXPORT_DIR=/tmp/st build/tests/test_safetensors "[.export]"
  /work/venv/bin/python tests/data/safetensors/check_cpp_output.py /tmp/st
"""
import json
import math
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))


def main(d):
    exp = json.load(open(os.path.join(d, "cpp_written.json")))
    path = os.path.join(d, "cpp_written.safetensors")
    got = load_file(path)
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()
    assert meta == exp["metadata"], (meta, exp["metadata"])
    assert sorted(got) == sorted(exp["tensors"]), (sorted(got), sorted(exp["tensors"]))
    for name, e in exp["tensors"].items():
        t = got[name]
        assert list(t.shape) == e["shape"], (name, t.shape, e["shape"])
        if e["dtype"] in ("float16_bits", "bfloat16_bits"):
            want_dtype = torch.float16 if e["dtype"] == "float16_bits" else torch.bfloat16
            assert t.dtype == want_dtype, (name, t.dtype)
            bits = t.view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).flatten().tolist()
            assert bits == e["values"], name
        else:
            assert str(t.dtype) == "torch." + e["dtype"], (name, t.dtype)
            vals = t.flatten().tolist()
            assert len(vals) == len(e["values"]), name
            for a, b in zip(vals, e["values"]):
                assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (name, a, b)
        print(f"  ok {name!r:45} {str(t.dtype):15} {list(t.shape)}")
    print(f"metadata ok: {meta}")
    golden = open(os.path.join(d, "cpp_golden.safetensors"), "rb").read()
    ref = open(os.path.join(HERE, "valid", "py_golden.safetensors"), "rb").read()
    assert golden == ref, "cpp_golden.safetensors differs from py_golden.safetensors"
    load_file(os.path.join(d, "cpp_golden.safetensors"))
    print(f"cpp_golden.safetensors == py_golden.safetensors ({len(ref)} bytes)")
    print("all C++-written files load in safetensors", __import__("safetensors").__version__, "/ torch", torch.__version__)


if __name__ == "__main__":
    main(sys.argv[1])
