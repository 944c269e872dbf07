#!/usr/bin/env python3
"""Summarise bench_adapters JSON (Google Benchmark, run with --benchmark_repetitions=N and
--benchmark_report_aggregates_only=true).

usage: bench_adapters_table.py FILE.json [--metric cpu|real] [--stat median|min]
Prints one Markdown row per (layer, adapter, pass): peft++ and hand-written times, peft/hand, and the
adapter's cost over the base layer alone (peft adapter / peft base), all from the same run.
"""
import argparse
import json
import re

ap = argparse.ArgumentParser()
ap.add_argument("file")
ap.add_argument("--metric", choices=["cpu", "real"], default="cpu")
ap.add_argument("--stat", default="median")
a = ap.parse_args()

key = "cpu_time" if a.metric == "cpu" else "real_time"
scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}  # -> milliseconds
t, cv = {}, {}
for b in json.load(open(a.file))["benchmarks"]:
    if b.get("run_type") != "aggregate":
        continue
    if b["aggregate_name"] == a.stat:
        t[b["run_name"]] = b[key] * scale[b["time_unit"]]
    if b["aggregate_name"] == "cv":
        cv[b["run_name"]] = b[key]

rows = []
for name in t:
    m = re.match(r"BM_(\w+?)_(\w+?)_Peft_(Fwd|FwdBwd)$", name)
    if not m or m.group(2) == "Base":
        continue
    layer, kind, pas = m.groups()
    hand = t.get(f"BM_{layer}_{kind}_Hand_{pas}")
    base = t.get(f"BM_{layer}_Base_Peft_{pas}")
    rows.append((layer, kind, pas, t[name], hand, base, cv.get(name, 0.0), cv.get(f"BM_{layer}_{kind}_Hand_{pas}", 0.0)))

print(f"| layer | adapter | pass | peft++ ({a.stat}, ms) | hand ({a.stat}, ms) | peft / hand | adapter / base | cv peft, hand |")
print("|---|---|---|---|---|---|---|---|")
for layer, kind, pas, p, h, b, cp, ch in rows:
    ratio = f"{p / h:.3f}" if h else "—"
    over = f"{p / b:.3f}" if b else "—"
    hs = f"{h:.2f}" if h else "—"
    print(f"| {layer} | {kind} | {pas} | {p:.2f} | {hs} | {ratio} | {over} | {cp:.1%}, {ch:.1%} |")
