#!/usr/bin/python3
"""Reference numbers for peft++'s training kit (include/peft/train/), computed with real PyTorch.

Writes tests/reference/data/optim_reference.json, read by tests/unit/test_optim.cpp.

How to run (from the repository root):

    /usr/bin/python3 tests/reference/gen_optim_reference.py

or, where a Python with Hugging Face transformers exists (for the learning-rate schedules):

    /work/venv/bin/python tests/reference/gen_optim_reference.py

Versions used for the committed file: Python 3.11.2, Debian's python3-torch 1.13.1 (CPU;
torch.__version__ reports "1.13.0a0") and transformers 4.49.0, run with /work/venv/bin/python (a
venv that sees the system torch). Running it with /usr/bin/python3, without transformers, gave a
file with identical numbers (only meta.schedule_source differs). The versions are also recorded under "meta"
in the JSON file.

What it computes:
  * three small parameter tensors (10, 7 and 4 elements) and a fixed sequence of 5 gradients for
    each (drawn once from a seeded generator in float64, with a per-step scale so that AMSGrad's
    running maximum matters);
  * for each optimizer configuration (torch.optim.AdamW, Adam and SGD, always with foreach=False,
    i.e. the single-tensor code path), the parameters after each of the 5 steps, run once in
    torch.float64 and once in torch.float32 (the float32 run starts from the float64 values
    rounded to float32, which is what the C++ test does too);
  * torch.nn.utils.clip_grad_norm_ results (total norm and clipped gradients) for the 2-norm,
    1-norm and inf-norm, with clipping active and inactive, in both dtypes;
  * clip_grad_value_ results;
  * the learning-rate multipliers of transformers' get_linear_schedule_with_warmup,
    get_cosine_schedule_with_warmup and get_constant_schedule_with_warmup at steps 0..15.
    When `import transformers` fails, the multipliers come from LambdaLR with lambdas that
    re-state transformers' lr_lambda formulas (see _fallback_schedules); "meta.schedule_source"
    then says "fallback-lambdas" instead of "transformers <version>";
  * one AdamW run driven by a linear warmup schedule through LambdaLR, as a Trainer would.

All floats are written with Python's repr (shortest round-trip form, full precision).
"""

import json
import math
import os
import re
import sys

import torch

SEED = 20240611
SIZES = [10, 7, 4]
NUM_STEPS = 5
GRAD_SCALES = [2.0, 0.5, 1.0, 0.1, 1.5]  # step 4's small gradients make AMSGrad's max differ

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data", "optim_reference.json")


def make_inputs():
    """Initial parameters and per-step gradients, in float64."""
    gen = torch.Generator().manual_seed(SEED)
    params = [torch.randn(n, generator=gen, dtype=torch.float64) for n in SIZES]
    grads = []
    for s in range(NUM_STEPS):
        grads.append([GRAD_SCALES[s] * torch.randn(n, generator=gen, dtype=torch.float64)
                      for n in SIZES])
    return params, grads


def to_list(t):
    return [float(x) for x in t.detach().to(torch.float64).reshape(-1).tolist()]


OPTIM_CONFIGS = [
    # name, class, options (peft names), torch kwargs
    ("adamw_default", "AdamW", dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False)),
    ("adamw_wd", "AdamW", dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False)),
    ("adamw_amsgrad", "AdamW", dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True)),
    ("adamw_betas_eps", "AdamW", dict(lr=0.02, beta1=0.8, beta2=0.95, eps=1e-3, weight_decay=0.0, amsgrad=False)),
    ("adam_plain", "Adam", dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False)),
    ("adam_l2", "Adam", dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False)),
    ("adam_l2_amsgrad", "Adam", dict(lr=0.05, beta1=0.85, beta2=0.99, eps=1e-6, weight_decay=0.1, amsgrad=True)),
    ("sgd_plain", "SGD", dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)),
    ("sgd_momentum", "SGD", dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False)),
    ("sgd_dampening", "SGD", dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.0, nesterov=False)),
    ("sgd_nesterov", "SGD", dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True)),
    ("sgd_weight_decay", "SGD", dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.05, nesterov=False)),
    ("sgd_momentum_wd", "SGD", dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=0.05, nesterov=False)),
    ("sgd_nesterov_wd", "SGD", dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.05, nesterov=True)),
]


def make_torch_optimizer(kind, opts, params):
    if kind in ("AdamW", "Adam"):
        cls = torch.optim.AdamW if kind == "AdamW" else torch.optim.Adam
        return cls(params, lr=opts["lr"], betas=(opts["beta1"], opts["beta2"]), eps=opts["eps"],
                   weight_decay=opts["weight_decay"], amsgrad=opts["amsgrad"], foreach=False)
    if kind == "SGD":
        return torch.optim.SGD(params, lr=opts["lr"], momentum=opts["momentum"],
                               dampening=opts["dampening"], weight_decay=opts["weight_decay"],
                               nesterov=opts["nesterov"], foreach=False)
    raise ValueError(kind)


def run_optimizer(kind, opts, init, grads, dtype, schedule=None):
    params = [torch.nn.Parameter(p.clone().to(dtype)) for p in init]
    opt = make_torch_optimizer(kind, opts, params)
    sched = None
    if schedule is not None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    trajectory = []
    lrs = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone().to(dtype)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
        trajectory.append([to_list(p) for p in params])
    return trajectory, lrs


CLIP_CONFIGS = [
    ("l2_active", 1.0, 2.0),
    ("l2_inactive", 100.0, 2.0),
    ("l1_active", 2.0, 1.0),
    ("l3_active", 1.5, 3.0),
    ("inf_active", 0.5, "inf"),
    ("inf_inactive", 100.0, "inf"),
]

CLIP_VALUE_CONFIGS = [("value_0_5", 0.5), ("value_large", 100.0)]


def run_clip(grads64, max_norm, norm_type, dtype):
    params = [torch.nn.Parameter(torch.zeros(g.numel(), dtype=dtype)) for g in grads64]
    for p, g in zip(params, grads64):
        p.grad = g.clone().to(dtype)
    nt = math.inf if norm_type == "inf" else norm_type
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=nt)
    return float(total), [to_list(p.grad) for p in params]


def run_clip_value(grads64, clip_value, dtype):
    params = [torch.nn.Parameter(torch.zeros(g.numel(), dtype=dtype)) for g in grads64]
    for p, g in zip(params, grads64):
        p.grad = g.clone().to(dtype)
    torch.nn.utils.clip_grad_value_(params, clip_value)
    return [to_list(p.grad) for p in params]


# (name, kind, arguments) — arguments use peft's names: warmup, total, cycles.
SCHEDULE_CONFIGS = [
    ("linear_w3_t10", "linear", dict(warmup=3, total=10)),
    ("linear_w0_t8", "linear", dict(warmup=0, total=8)),
    ("linear_w5_t5", "linear", dict(warmup=5, total=5)),
    ("cosine_w3_t10", "cosine", dict(warmup=3, total=10, cycles=0.5)),
    ("cosine_w2_t12_c1_5", "cosine", dict(warmup=2, total=12, cycles=1.5)),
    ("cosine_w0_t7_c2", "cosine", dict(warmup=0, total=7, cycles=2.0)),
    ("constant_w4", "constant", dict(warmup=4)),
    ("constant_w0", "constant", dict(warmup=0)),
]
SCHEDULE_STEPS = list(range(0, 16))


def _fallback_schedules():
    """transformers' lr_lambda formulas (transformers/optimization.py), re-stated for when
    transformers is not importable. Same arithmetic, same order of operations."""

    def linear(warmup, total):
        def f(step):
            if step < warmup:
                return float(step) / float(max(1, warmup))
            return max(0.0, float(total - step) / float(max(1, total - warmup)))
        return f

    def cosine(warmup, total, cycles):
        def f(step):
            if step < warmup:
                return float(step) / float(max(1, warmup))
            progress = float(step - warmup) / float(max(1, total - warmup))
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * progress)))
        return f

    def constant(warmup):
        def f(step):
            if step < warmup:
                return float(step) / float(max(1.0, warmup))
            return 1.0
        return f

    return linear, cosine, constant


def schedule_lambda(kind, args):
    """The lr_lambda of the schedule, taken from a real LambdaLR built by transformers when possible."""
    try:
        import transformers  # noqa: F401
        from transformers import (get_constant_schedule_with_warmup,
                                  get_cosine_schedule_with_warmup,
                                  get_linear_schedule_with_warmup)
    except Exception:  # transformers missing or broken
        linear, cosine, constant = _fallback_schedules()
        if kind == "linear":
            return linear(args["warmup"], args["total"])
        if kind == "cosine":
            return cosine(args["warmup"], args["total"], args["cycles"])
        return constant(args["warmup"])
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if kind == "linear":
        s = get_linear_schedule_with_warmup(dummy, args["warmup"], args["total"])
    elif kind == "cosine":
        s = get_cosine_schedule_with_warmup(dummy, args["warmup"], args["total"], num_cycles=args["cycles"])
    else:
        s = get_constant_schedule_with_warmup(dummy, args["warmup"])
    return s.lr_lambdas[0]


def schedule_source():
    try:
        import transformers
        return "transformers " + transformers.__version__
    except Exception:
        return "fallback-lambdas"


def main():
    torch.set_num_threads(1)
    init, grads = make_inputs()
    data = {
        "meta": {
            "generator": "tests/reference/gen_optim_reference.py",
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "schedule_source": schedule_source(),
            "seed": SEED,
            "note": "optimizers run with foreach=False; float32 runs start from float64 values rounded to float32",
        },
        "sizes": SIZES,
        "init": [to_list(p) for p in init],
        "grads": [[to_list(g) for g in step] for step in grads],
        "optimizers": [],
        "clip_grad_norm": [],
        "clip_grad_value": [],
        "schedules": [],
        "scheduled_adamw": None,
    }
    for name, kind, opts in OPTIM_CONFIGS:
        entry = {"name": name, "kind": kind, "options": opts}
        for label, dtype in (("float64", torch.float64), ("float32", torch.float32)):
            entry[label], _ = run_optimizer(kind, opts, init, grads, dtype)
        data["optimizers"].append(entry)

    clip_grads = grads[0]
    for name, max_norm, norm_type in CLIP_CONFIGS:
        entry = {"name": name, "max_norm": max_norm, "norm_type": norm_type}
        for label, dtype in (("float64", torch.float64), ("float32", torch.float32)):
            total, clipped = run_clip(clip_grads, max_norm, norm_type, dtype)
            entry[label] = {"total_norm": total, "grads": clipped}
        data["clip_grad_norm"].append(entry)
    for name, clip_value in CLIP_VALUE_CONFIGS:
        entry = {"name": name, "clip_value": clip_value}
        for label, dtype in (("float64", torch.float64), ("float32", torch.float32)):
            entry[label] = run_clip_value(clip_grads, clip_value, dtype)
        data["clip_grad_value"].append(entry)

    for name, kind, args in SCHEDULE_CONFIGS:
        f = schedule_lambda(kind, args)
        data["schedules"].append({"name": name, "kind": kind, "args": args, "steps": SCHEDULE_STEPS,
                                  "multipliers": [float(f(s)) for s in SCHEDULE_STEPS]})

    # AdamW driven by a linear warmup schedule, stepped as a Trainer does: LambdaLR sets lr for
    # step 0 at construction, and scheduler.step() follows each optimizer.step().
    sched_opts = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=False)
    sched_args = dict(warmup=2, total=5)
    entry = {"name": "adamw_linear_w2_t5", "options": sched_opts, "schedule": sched_args}
    for label, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        traj, lrs = run_optimizer("AdamW", sched_opts, init, grads, dtype,
                                  schedule=schedule_lambda("linear", sched_args))
        entry[label] = traj
        entry["lrs"] = lrs
    data["scheduled_adamw"] = entry

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    text = json.dumps(data, indent=1)
    # Put each innermost list of numbers on one line (floats keep their repr).
    text = re.sub(r"\[\s*([-+0-9.eE]+(?:,\s*[-+0-9.eE]+)*)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    with open(OUT, "w") as f:
        f.write(text)
        f.write("\n")
    print("wrote", OUT, "schedules from", data["meta"]["schedule_source"])


if __name__ == "__main__":
    main()
