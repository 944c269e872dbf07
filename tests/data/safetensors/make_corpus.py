#!/usr/bin/env python3
"""Crafts the safetensors test corpus (Python standard library only).

  bad/*.safetensors      hostile or malformed files; bad/manifest.json maps each to the substring
                         peft::FormatError's message must contain, the class of defect, and whether
                         the reference implementation (safetensors 0.8) rejects it too.
  valid/crafted_*.safetensors   legal files the reference writer never produces (unaligned data,
                         keys out of order, empty tensors sharing an offset, null metadata, unknown
                         fields, whitespace, every dtype); valid/crafted.json holds what a reader
                         must see in them.

Usage: python3 make_corpus.py [--check-reference]
With --check-reference (needs the `safetensors` and `numpy` packages) every file is also loaded by
the reference implementation, to confirm it agrees with the manifest.
"""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BAD = os.path.join(HERE, "bad")
VALID = os.path.join(HERE, "valid")


def image(header, data=b"", length=None):
    """8-byte little-endian length, header (bytes, str or a JSON-able object), data."""
    if isinstance(header, (dict, list)):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8")
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def T(dtype, shape, offsets, **extra):
    d = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    d.update(extra)
    return d


F32x2 = struct.pack("<2f", 1.0, 2.0)
OK = {"a": T("F32", [2], [0, 8])}

# (file stem, class, bytes, expected error substring, reference rejects it too)
bad = []


def add(stem, cls, data, expect, reference_rejects=True):
    bad.append((stem, cls, data, expect, reference_rejects))


# --- truncation and the length prefix
add("empty_file", "truncated", b"", "file is 0 bytes, too short for the 8-byte header length")
add("five_bytes", "truncated", b"\x10\0\0\0\0", "file is 5 bytes, too short")
add("header_len_zero", "header length", struct.pack("<Q", 0), "header length is 0")
add("header_len_beyond_file", "header length", image("{}", length=100), "header length 100 runs past the end of the file")
add("header_len_one_past", "header length", image(OK, F32x2)[: 8 + len(json.dumps(OK, separators=(",", ":"))) - 1],
    "runs past the end of the file")
add("header_len_above_cap", "header length", image("{}", length=100_000_001), "header length 100000001 exceeds the limit of 100000000 bytes")
add("header_len_max_u64", "header length", image("{}", length=2**64 - 1), "header length 18446744073709551615 exceeds the limit")
add("truncated_data", "truncated", image(OK, F32x2[:7]),
    "tensor 'a': data_offsets [0, 8) end beyond the data section, which is 7 bytes")
add("truncated_header_json", "non-JSON", image('{"a":{"dtype":"F32","shape":[2],"data_off'), "header is not valid JSON")
# --- encoding and JSON syntax
add("not_utf8", "non-UTF-8", image(b'{"\xff":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'), "header is not valid UTF-8 at header byte 2 (file offset 10)")
add("overlong_utf8", "non-UTF-8", image(b'{"\xc0\xaf":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'), "not valid UTF-8 at header byte 2")
add("utf8_surrogate", "non-UTF-8", image(b'{"\xed\xa0\x80":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'), "not valid UTF-8 at header byte 2")
add("lone_surrogate_escape", "non-JSON", image('{"\\ud800":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'), "header is not valid JSON")
add("garbage", "non-JSON", image("hello world!"), "header is not valid JSON")
add("trailing_nul_padding", "non-JSON", image(json.dumps(OK, separators=(",", ":")) + "\0\0", F32x2), "header is not valid JSON")
add("trailing_garbage", "non-JSON", image(json.dumps(OK, separators=(",", ":")) + " x", F32x2), "header is not valid JSON")
add("json_comment", "non-JSON", image('{} // comment'), "header is not valid JSON")
add("nan_literal", "non-JSON", image('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}'), "header is not valid JSON")
add("byte_order_mark", "non-JSON", image(b"\xef\xbb\xbf{}"), "header is not valid JSON")
add("number_overflow", "non-JSON", image('{"a":{"dtype":"F32","shape":[1e999],"data_offsets":[0,0]}}'), "header is not valid JSON")
add("too_deep", "non-JSON", image('{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":' + "[" * 200 + "]" * 200 + "}}"),
    "header JSON nests deeper than 128 levels")
# --- header structure
add("header_is_array", "header structure", image("[]"), "header is a JSON array, not an object")
add("header_is_string", "header structure", image('"x"'), "header is a JSON string, not an object")
add("entry_not_object", "header structure", image('{"a":5}'), "tensor 'a': entry is a JSON number, not an object")
add("missing_dtype", "missing field", image({"a": {"shape": [2], "data_offsets": [0, 8]}}, F32x2), "tensor 'a': missing field 'dtype'")
add("missing_shape", "missing field", image({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, F32x2), "tensor 'a': missing field 'shape'")
add("missing_offsets", "missing field", image({"a": {"dtype": "F32", "shape": [2]}}, F32x2), "tensor 'a': missing field 'data_offsets'")
add("dtype_not_string", "wrong JSON type", image({"a": T(1, [2], [0, 8])}, F32x2), "tensor 'a': field 'dtype' is a JSON number, not a string")
add("shape_not_array", "wrong JSON type", image({"a": T("F32", "2", [0, 8])}, F32x2), "tensor 'a': field 'shape' is a JSON string, not an array")
add("shape_null_entry", "wrong JSON type", image({"a": T("F32", [None], [0, 8])}, F32x2), "tensor 'a': shape[0] is null, not a non-negative 64-bit integer")
add("shape_nested", "wrong JSON type", image({"a": T("F32", [[2]], [0, 8])}, F32x2), "tensor 'a': shape[0] is [2], not a non-negative")
add("offsets_not_array", "wrong JSON type", image({"a": T("F32", [2], {"0": 8})}, F32x2), "tensor 'a': field 'data_offsets' is a JSON object, not an array of two integers")
add("offsets_three", "data_offsets", image({"a": T("F32", [2], [0, 8, 8])}, F32x2), "tensor 'a': field 'data_offsets' has 3 entries, not 2")
add("offsets_one", "data_offsets", image({"a": T("F32", [2], [8])}, F32x2), "tensor 'a': field 'data_offsets' has 1 entries, not 2")
add("offsets_float", "data_offsets", image('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', F32x2), "tensor 'a': data_offsets[1] is 8.0, not a non-negative 64-bit integer")
add("offsets_negative", "data_offsets", image({"a": T("F32", [2], [-8, 0])}, F32x2), "tensor 'a': data_offsets[0] is -8, not a non-negative")
add("offsets_string", "data_offsets", image({"a": T("F32", [2], ["0", "8"])}, F32x2), "tensor 'a': data_offsets[0] is \"0\", not a non-negative")
add("offsets_descending", "data_offsets", image({"a": T("F32", [0], [8, 0])}, F32x2), "tensor 'a': data_offsets [8, 0) are descending")
# --- dtypes and shapes
add("unknown_dtype", "unknown dtype", image({"a": T("F31", [2], [0, 8])}, F32x2), "tensor 'a': unknown dtype 'F31'")
add("lowercase_dtype", "unknown dtype", image({"a": T("f32", [2], [0, 8])}, F32x2), "tensor 'a': unknown dtype 'f32'")
add("negative_dim", "shape", image({"a": T("F32", [-2], [0, 8])}, F32x2), "tensor 'a': shape[0] is -2, not a non-negative 64-bit integer")
add("fractional_dim", "shape", image('{"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,8]}}', F32x2), "tensor 'a': shape[0] is 1.5, not a non-negative")
add("float_dim", "shape", image('{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', F32x2), "tensor 'a': shape[0] is 2.0, not a non-negative")
add("dim_2_pow_64", "shape", image('{"a":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,8]}}', F32x2), "tensor 'a': shape[0] is 1.8446744073709552e+19")
add("dim_above_int64", "shape", image({"a": T("F32", [0, 2**63], [0, 0])}), "tensor 'a': shape[1] is 9223372036854775808, above 2^63 - 1", reference_rejects=False)
add("numel_overflow", "shape overflow", image({"a": T("F32", [2**40, 2**40], [0, 8])}, F32x2), "tensor 'a': shape [1099511627776, 1099511627776] overflows")
add("bytes_overflow", "shape overflow", image({"a": T("F64", [2**62], [0, 8])}, F32x2), "tensor 'a': shape [4611686018427387904] x F64 overflows")
add("subbyte_not_whole", "shape/dtype/size", image({"a": T("F4", [3], [0, 2])}, b"\0\0"), "tensor 'a': shape [3] x F4 is 12 bits, not a whole number of bytes")
add("size_mismatch", "shape/dtype/size", image({"lin0.weight": T("F32", [4, 8], [0, 96])}, b"\0" * 96),
    "tensor 'lin0.weight': data_offsets [0, 96) do not match shape [4, 8] x F32 = 128 bytes")
add("size_mismatch_dtype", "shape/dtype/size", image({"a": T("F16", [2], [0, 8])}, F32x2), "tensor 'a': data_offsets [0, 8) do not match shape [2] x F16 = 4 bytes")
add("scalar_size_mismatch", "shape/dtype/size", image({"s": T("F64", [], [0, 4])}, b"\0" * 4), "tensor 's': data_offsets [0, 4) do not match shape [] x F64 = 8 bytes")
# --- offsets against the data section
add("offset_out_of_range", "out-of-range offsets", image({"a": T("F32", [2], [0, 8]), "b": T("F32", [2], [8, 16])}, F32x2),
    "tensor 'b': data_offsets [8, 16) end beyond the data section, which is 8 bytes")
add("offset_huge", "out-of-range offsets", image({"a": T("F32", [2], [2**64 - 9, 2**64 - 1])}, F32x2), "tensor 'a': data_offsets [18446744073709551607, 18446744073709551615) end beyond the data section")
add("empty_tensor_beyond", "out-of-range offsets", image({"a": T("F32", [2], [0, 8]), "e": T("F32", [0], [64, 64])}, F32x2),
    "tensor 'e': data_offsets [64, 64) end beyond the data section")
add("overlap", "overlapping offsets", image({"a": T("F32", [2], [0, 8]), "b": T("F32", [1], [4, 8])}, F32x2), "tensors 'a' [0, 8) and 'b' [4, 8) overlap")
add("overlap_identical", "overlapping offsets", image({"a": T("F32", [2], [0, 8]), "b": T("F32", [2], [0, 8])}, F32x2), "tensors 'a' [0, 8) and 'b' [0, 8) overlap")
add("overlap_contained", "overlapping offsets", image({"a": T("F32", [4], [0, 16]), "b": T("F32", [1], [4, 8]), "c": T("F32", [0], [16, 16])}, b"\0" * 16),
    "tensors 'a' [0, 16) and 'b' [4, 8) overlap")
add("empty_inside_other", "overlapping offsets", image({"a": T("F32", [2], [0, 8]), "e": T("F32", [0], [4, 4])}, F32x2), "tensors 'a' [0, 8) and 'e' [4, 4) overlap")
add("gap_between", "gaps", image({"a": T("F32", [1], [0, 4]), "b": T("F32", [1], [8, 12])}, b"\0" * 12),
    "bytes [4, 8) of the data section (file offsets [")
add("gap_at_start", "gaps", image({"a": T("F32", [1], [4, 8])}, F32x2), "bytes [0, 4) of the data section")
add("trailing_bytes", "gaps", image({"a": T("F32", [1], [0, 4])}, F32x2), "unused trailing bytes: bytes [4, 8) of the data section")
add("no_tensors_with_data", "gaps", image({}, F32x2), "unused trailing bytes: bytes [0, 8)")
# --- metadata
add("metadata_list", "metadata", image({"__metadata__": [], "a": OK["a"]}, F32x2), "__metadata__ is a JSON array, not an object of strings")
add("metadata_string", "metadata", image({"__metadata__": "pt", "a": OK["a"]}, F32x2), "__metadata__ is a JSON string, not an object of strings")
add("metadata_number_value", "metadata", image({"__metadata__": {"format": 1}, "a": OK["a"]}, F32x2), "__metadata__: value of 'format' is a JSON number (1), not a string")
add("metadata_nested", "metadata", image({"__metadata__": {"a": {"b": "c"}}}), "__metadata__: value of 'a' is a JSON object")
add("metadata_null_value", "metadata", image({"__metadata__": {"format": None}}), "__metadata__: value of 'format' is a JSON null")
# --- duplicate keys (the reference keeps the last silently; peft++ refuses the ambiguity)
add("duplicate_tensor", "duplicate keys",
    image('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', F32x2),
    "duplicate tensor name 'a' in the header", reference_rejects=False)
add("duplicate_field", "duplicate keys", image('{"a":{"dtype":"F16","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', F32x2),
    "tensor 'a': duplicate field 'dtype'")
add("duplicate_metadata_key", "duplicate keys", image('{"__metadata__":{"format":"pt","format":"np"}}'), "__metadata__: duplicate key 'format'",
    reference_rejects=False)
add("duplicate_metadata", "duplicate keys", image('{"__metadata__":{"format":"pt"},"__metadata__":{}}'), "duplicate key '__metadata__' in the header")
add("duplicate_key_nested", "duplicate keys",
    image('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":[{"k":1,"k":2}]}}', F32x2),
    "duplicate key 'k' in the header", reference_rejects=False)
# --- error messages escape hostile names
add("control_chars_in_name", "shape/dtype/size", image({"a\u001b[2J\n": T("F32", [3], [0, 8])}, F32x2),
    "tensor 'a\\x1b[2J\\x0a': data_offsets [0, 8) do not match")


# ------------------------------------------------------------------------------------------------
# Crafted valid files and what a reader must see in them.

def f32_bits(x):
    """Bits of x rounded to float32 (round to nearest even, overflow to infinity)."""
    try:
        return struct.unpack("<I", struct.pack("<f", x))[0]
    except OverflowError:
        return 0x7F800000 if x > 0 else 0xFF800000


def f64_bits(x):
    return struct.unpack("<Q", struct.pack("<d", x))[0]


valid = {}


def add_valid(stem, header, data, tensors, metadata=None, zero_copy=None):
    """tensors: name -> (dtype, shape, [begin, end], float values or None)."""
    blob = image(header, data)
    exp = {"metadata": metadata or {}, "tensors": {}}
    for name, (dtype, shape, offs, values) in tensors.items():
        e = {"dtype": dtype, "shape": shape, "data_offsets": offs}
        if values is not None:
            e["f32_bits"] = [f32_bits(v) for v in values]
            # what read_as<double> returns: F64 as stored, narrower dtypes widened from their value
            e["f64_bits"] = [f64_bits(v if dtype == "F64" else struct.unpack("<f", struct.pack("<I", f32_bits(v)))[0])
                             for v in values]
        if zero_copy is not None and name in zero_copy:
            e["zero_copy_f32"] = zero_copy[name]
        exp["tensors"][name] = e
    valid[stem] = (blob, exp)


# F32 data that starts 2 bytes past a 4-byte boundary (header length 2 mod 4, no padding).
h = '{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"v":{"dtype":"F32","shape":[3],"data_offsets":[24,36]}}'
while (8 + len(h)) % 4 != 2:
    h += " "
w = [0.5, -1.25, 3.0, 1e-3, -0.0, 7.75]
v = [1.0, 2.0, 3.0]
add_valid("crafted_unaligned_f32", h, struct.pack("<6f", *w) + struct.pack("<3f", *v),
          {"w": ("F32", [2, 3], [0, 24], w), "v": ("F32", [3], [24, 36], v)}, zero_copy={"w": False, "v": False})

# F16, F32, F64 packed back to back: the F32 and the F64 are misaligned (header padded to 8 bytes).
hdr = {"h": T("F16", [1], [0, 2]), "f": T("F32", [3], [2, 14]), "d": T("F64", [2], [14, 30])}
hs = json.dumps(hdr, separators=(",", ":"))
hs += " " * ((8 - len(hs) % 8) % 8)
f = [1.5, -2.0, 1e30]
d = [3.141592653589793, 1e300]
add_valid("crafted_unaligned_mixed", hs, struct.pack("<e", 0.333251953125) + struct.pack("<3f", *f) + struct.pack("<2d", *d),
          {"h": ("F16", [1], [0, 2], [0.333251953125]), "f": ("F32", [3], [2, 14], f),
           "d": ("F64", [2], [14, 30], d)}, zero_copy={"h": False, "f": False, "d": False})

# Keys out of data order, unknown fields, empty tensors sharing an offset, null metadata, whitespace.
h = ('  \n{ "z" : {"dtype":"F32","shape":[1],"data_offsets":[8,12], "extra": {"ignored": [1, 2]}},\n'
     '  "__metadata__": null, "e1":{"data_offsets":[8,8],"shape":[0,4],"dtype":"F32"},'
     ' "e2":{"shape":[3,0],"dtype":"BF16","data_offsets":[8,8]}, "a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
     ' "s":{"dtype":"F32","shape":[],"data_offsets":[12,16]} }\n\t ')
add_valid("crafted_reordered", h, struct.pack("<2f", 1.0, 2.0) + struct.pack("<f", -3.0) + struct.pack("<f", 42.0),
          {"a": ("F32", [2], [0, 8], [1.0, 2.0]), "z": ("F32", [1], [8, 12], [-3.0]), "e1": ("F32", [0, 4], [8, 8], []),
           "e2": ("BF16", [3, 0], [8, 8], []), "s": ("F32", [], [12, 16], [42.0])})

# No tensors at all, only (padded) metadata; and the empty object.
add_valid("crafted_metadata_only", '{"__metadata__":{"format":"pt","k":"v \\u00e9\\n"}}   ', b"", {}, metadata={"format": "pt", "k": "v \u00e9\n"})
add_valid("crafted_empty", "{}      ", b"", {})

# One tensor of every dtype (sub-byte formats included), in the reference enum order.
dtypes = [("BOOL", 8), ("F4", 4), ("F6_E2M3", 6), ("F6_E3M2", 6), ("U8", 8), ("I8", 8), ("F8_E5M2", 8), ("F8_E4M3", 8),
          ("F8_E8M0", 8), ("F8_E4M3FNUZ", 8), ("F8_E5M2FNUZ", 8), ("I16", 16), ("U16", 16), ("F16", 16), ("BF16", 16),
          ("I32", 32), ("U32", 32), ("F32", 32), ("C64", 64), ("F64", 64), ("I64", 64), ("U64", 64)]
hdr, tens, off = {}, {}, 0
for name, bits in dtypes:
    n = 4  # 4 elements: 2 bytes of F4, 3 bytes of F6
    nb = n * bits // 8
    hdr["t_" + name] = T(name, [n], [off, off + nb])
    tens["t_" + name] = (name, [n], [off, off + nb], None)
    off += nb
hs = json.dumps(hdr, separators=(",", ":"))
hs += " " * ((8 - len(hs) % 8) % 8)
add_valid("crafted_all_dtypes", hs, bytes(range(off % 256)) * (off // 256) + bytes(range(off % 256)), tens)

# Unicode and awkward names.
names = {"é/ß.weight": 1.0, "": 2.0, "with \"quote\" and \\": 3.0, "tab\there": 4.0, "日本": 5.0}
hdr, data, tens, off = {}, b"", {}, 0
for k, val in names.items():
    hdr[k] = T("F32", [1], [off, off + 4])
    tens[k] = ("F32", [1], [off, off + 4], [val])
    data += struct.pack("<f", val)
    off += 4
hs = json.dumps(hdr, ensure_ascii=False, separators=(",", ":"))
hs += " " * ((8 - len(hs.encode()) % 8) % 8)
add_valid("crafted_names", hs, data, tens)


def main():
    check = "--check-reference" in sys.argv
    os.makedirs(BAD, exist_ok=True)
    os.makedirs(VALID, exist_ok=True)
    for fn in os.listdir(BAD):
        if fn.endswith(".safetensors"):
            os.remove(os.path.join(BAD, fn))
    stems = [b[0] for b in bad]
    assert len(stems) == len(set(stems)), "duplicate stem"
    manifest = {}
    for stem, cls, data, expect, ref in bad:
        with open(os.path.join(BAD, stem + ".safetensors"), "wb") as fh:
            fh.write(data)
        manifest[stem + ".safetensors"] = {"class": cls, "error": expect, "reference_rejects": ref}
    with open(os.path.join(BAD, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True, ensure_ascii=True)
        fh.write("\n")
    expected = {}
    for stem, (blob, exp) in valid.items():
        with open(os.path.join(VALID, stem + ".safetensors"), "wb") as fh:
            fh.write(blob)
        expected[stem + ".safetensors"] = exp
    with open(os.path.join(VALID, "crafted.json"), "w") as fh:
        json.dump(expected, fh, indent=1, sort_keys=True, ensure_ascii=True)
        fh.write("\n")
    print(f"{len(bad)} bad files in {len(set(b[1] for b in bad))} classes, {len(valid)} crafted valid files")
    if check:
        # safe_open parses and validates the header (read_metadata) without converting any tensor.
        from safetensors import safe_open

        def reference_names(path):
            with safe_open(path, framework="pt") as fh:
                return sorted(fh.keys())

        disagree = 0
        for stem, cls, data, expect, ref in bad:
            try:
                reference_names(os.path.join(BAD, stem + ".safetensors"))
                rejected = False
            except Exception as e:  # noqa: BLE001 - the reference raises several types
                rejected = True
                why = str(e)
            if rejected != ref:
                disagree += 1
                print(f"  reference {'rejects' if rejected else 'accepts'} {stem} (manifest says {ref})")
            elif rejected:
                print(f"  agree  {stem:28s} reference: {why[:90]}")
            else:
                print(f"  differ {stem:28s} reference accepts it; peft++ rejects it (documented)")
        for stem, (blob, exp) in valid.items():
            try:
                if reference_names(os.path.join(VALID, stem + ".safetensors")) != sorted(exp["tensors"]):
                    disagree += 1
                    print(f"  reference sees other tensors in {stem}")
            except Exception as e:  # noqa: BLE001
                disagree += 1
                print(f"  reference rejects valid {stem}: {e}")
        print("reference check:", "OK" if disagree == 0 else f"{disagree} disagreements")
        return 1 if disagree else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
