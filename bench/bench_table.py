#!/usr/bin/env python3
"""Summarise bench_lora JSON (Google Benchmark, --benchmark_report_aggregates_only=true).

usage: bench_table.py FILE.json [--metric cpu|real] [--peak 93] [--peak2 146] [--markdown]
Prints median times, peft/handwritten ratios, LoRA-forward / base-forward ratios and base GFLOP/s
as a percentage of the single-core fp32 FMA peak.
"""
import argparse
import json
import re
from collections import defaultdict

ap = argparse.ArgumentParser()
ap.add_argument("file")
ap.add_argument("--metric", choices=["cpu", "real"], default="cpu")
ap.add_argument("--peak", type=float, default=93.0, help="peak GFLOP/s quoted in the brief")
ap.add_argument("--peak2", type=float, default=0.0, help="measured peak GFLOP/s (optional second column)")
ap.add_argument("--markdown", action="store_true")
ap.add_argument("--stat", default="median", help="aggregate to use: median or min")
a = ap.parse_args()

data = json.load(open(a.file))
unit_scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}  # -> microseconds
key = "cpu_time" if a.metric == "cpu" else "real_time"

med, cv, ctr = {}, {}, {}
for b in data["benchmarks"]:
    if b.get("run_type") != "aggregate":
        continue
    name = b["run_name"]
    if b["aggregate_name"] == a.stat:
        med[name] = b[key] * unit_scale[b["time_unit"]]
        ctr[name] = b
    elif b["aggregate_name"] == "cv":
        cv[name] = b[key]  # cv is a fraction, unit-free

reps = {b["run_name"]: b.get("repetitions") for b in data["benchmarks"] if b.get("run_type") == "aggregate"}

def row(cells, widths):
    if a.markdown:
        return "| " + " | ".join(str(c) for c in cells) + " |"
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))

def sep(widths):
    return "|" + "|".join("-" * (w + 2) for w in widths) + "|" if a.markdown else ""

def fmt_t(us):
    return f"{us/1000:.3f} ms" if us >= 1000 else f"{us:.1f} us"

pat = re.compile(r"BM_(Peft|Handwritten)_(Fwd|FwdBwd)_M(\d+)_D(\d+)_r(\d+)$")
cases = sorted({(int(m.group(3)), int(m.group(4)), int(m.group(5))) for n in med if (m := pat.match(n))},
               key=lambda c: (c[1], c[0], c[2]))

print(f"metric: {a.stat} {a.metric} time over {max(v or 0 for v in reps.values())} repetitions; cv = coefficient of variation\n")
hdr = ["M", "D", "r", "peft fwd", "hand fwd", "peft/hand fwd", "peft fwd+bwd", "hand fwd+bwd", "peft/hand f+b",
       "LoRA fwd/base fwd", "cv max", "allocs/it (peft)", "mallocs/it peft, hand"]
w = [5, 5, 3, 11, 11, 13, 12, 12, 13, 17, 6, 16, 20]
print(row(hdr, w))
if a.markdown:
    print(sep(w))
worst = defaultdict(float)
for (m, d, r) in cases:
    s = f"M{m}_D{d}_r{r}"
    pf, hf, pb, hb = (med.get(f"BM_{k}_{s}") for k in ("Peft_Fwd", "Handwritten_Fwd", "Peft_FwdBwd", "Handwritten_FwdBwd"))
    base = med.get(f"BM_Base_Fwd_M{m}_D{d}")
    cvs = [cv.get(f"BM_{k}_{s}", 0) for k in ("Peft_Fwd", "Handwritten_Fwd", "Peft_FwdBwd", "Handwritten_FwdBwd")]
    al = max(ctr[f"BM_{k}_{s}"].get("allocs_per_iter", 0) for k in ("Peft_Fwd", "Peft_FwdBwd"))
    mp = max(ctr[f"BM_{k}_{s}"].get("mallocs_per_iter", 0) for k in ("Peft_Fwd", "Peft_FwdBwd"))
    mh = max(ctr[f"BM_{k}_{s}"].get("mallocs_per_iter", 0) for k in ("Handwritten_Fwd", "Handwritten_FwdBwd"))
    print(row([m, d, r, fmt_t(pf), fmt_t(hf), f"{pf/hf:.3f}", fmt_t(pb), fmt_t(hb), f"{pb/hb:.3f}",
               f"{pf/base:.3f}" if base else "-", f"{max(cvs)*100:.1f}%", f"{al:g}", f"{mp:g}, {mh:g}"], w))
    worst["fwd"] = max(worst["fwd"], pf / hf)
    worst["fwdbwd"] = max(worst["fwdbwd"], pb / hb)

print()
hdr = ["M", "D", "peft base", "GFLOP/s", f"% of {a.peak:g}"] + ([f"% of {a.peak2:g}"] if a.peak2 else []) + \
      ["cblas+bias", "GFLOP/s", "Eigen+bias", "GFLOP/s", "mallocs/it peft, blas, eigen"]
w = [5, 5, 11, 8, 8] + ([8] if a.peak2 else []) + [11, 8, 11, 8, 26]
print(row(hdr, w))
if a.markdown:
    print(sep(w))
bases = sorted({(int(m.group(1)), int(m.group(2))) for n in med if (m := re.match(r"BM_Base_Fwd_M(\d+)_D(\d+)$", n))},
               key=lambda c: (c[1], c[0]))
for (m, d) in bases:
    fl = 2.0 * m * d * d
    t = med[f"BM_Base_Fwd_M{m}_D{d}"]
    g = fl / (t * 1e-6) / 1e9
    tb = med.get(f"BM_BaseBlas_Fwd_M{m}_D{d}")
    te = med.get(f"BM_BaseEigen_Fwd_M{m}_D{d}")
    mal = [ctr.get(f"BM_{k}_Fwd_M{m}_D{d}", {}).get("mallocs_per_iter", "-") for k in ("Base", "BaseBlas", "BaseEigen")]
    cells = [m, d, fmt_t(t), f"{g:.1f}", f"{100*g/a.peak:.0f}%"] + ([f"{100*g/a.peak2:.0f}%"] if a.peak2 else [])
    cells += [fmt_t(tb) if tb else "-", f"{fl/(tb*1e-6)/1e9:.1f}" if tb else "-",
              fmt_t(te) if te else "-", f"{fl/(te*1e-6)/1e9:.1f}" if te else "-", ", ".join(f"{x:g}" if x != "-" else x for x in mal)]
    print(row(cells, w))

print(f"\nworst peft/hand: fwd {worst['fwd']:.3f}, fwd+bwd {worst['fwdbwd']:.3f}")
