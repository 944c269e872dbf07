#!/usr/bin/env python3
"""Summarise bench_adapters JSON (Google Benchmark, run with --benchmark_repetitions=N and
--benchmark_report_aggregates_only=true).

usage: bench_adapters_table.py FILE.json [--stat median|min|mean]
Prints one Markdown row per (layer, adapter, pass) from the counters of the same benchmark, whose three
legs (peft++ with the adapter, hand-written, peft++'s base layer alone) run in the same iterations:
times in ms and the per-iteration ratios peft/hand and peft/base, each summarised over the repetitions by
--stat (default: median); the spread column gives the smallest and largest peft/hand over the repetitions.
"""
import argparse
import json
import re

ap = argparse.ArgumentParser()
ap.add_argument("file")
ap.add_argument("--stat", default="median")
a = ap.parse_args()

data = json.load(open(a.file))
agg, reps = {}, {}
for b in data["benchmarks"]:
    name = b.get("run_name", b["name"])
    if b.get("run_type") == "aggregate":
        agg.setdefault(name, {})[b["aggregate_name"]] = b
    else:
        reps.setdefault(name, []).append(b)

print(f"| layer | adapter | pass | peft++ (ms) | hand (ms) | base (ms) | peft / hand | peft / base | peft / hand range | reps |")
print("|---|---|---|---:|---:|---:|---:|---:|---|---:|")
worst = 0.0
for name, by_stat in agg.items():
    m = re.match(r"BM_(\w+?)_(\w+?)_(Fwd|FwdBwd)(/|$)", name)
    if not m or a.stat not in by_stat:
        continue
    layer, kind, pas = m.groups()[:3]
    s = by_stat[a.stat]
    lo = by_stat.get("min", {}).get("peft_over_hand")
    hi = by_stat.get("max", {}).get("peft_over_hand")
    n = by_stat[a.stat].get("repetitions", len(reps.get(name, [])))
    rng = f"{lo:.3f}–{hi:.3f}" if lo is not None and hi is not None else (f"≥ {lo:.3f}" if lo is not None else "—")
    worst = max(worst, s["peft_over_hand"])
    print(f"| {layer} | {kind} | {pas} | {s['peft_ms']:.2f} | {s['hand_ms']:.2f} | {s['base_ms']:.2f} | "
          f"{s['peft_over_hand']:.3f} | {s['peft_over_base']:.3f} | {rng} | {n} |")
print(f"\nlargest {a.stat} peft / hand: {worst:.3f}")
