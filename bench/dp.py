#!/usr/bin/env python3
"""Data-parallel scaling on one machine (docs/benchmarks.md, docs/scaling.md): the same
experiment as 1 rank x 1 thread and as 2 ranks x 1 thread each (`sipt run --nproc-per-node 2`,
c10d Gloo over loopback), for next-token training and for SIP steps. Measured side by side,
interleaved 1, 2, 1, 2 over the rounds, each on a quiet machine (bench/run.py's rule).

Per run it reads the job's own metrics.jsonl (rank 0's rows are the job's): the step time
(`time/step`, which includes waiting for the other rank), the gradient all-reduce time
(`time/all_reduce`) and, for SIP, the time joining the ranks' shares (`time/gather`); the first
`--warmup` steps and the last (which writes a checkpoint) are left out. It prints the median
over rounds of each figure and of the per-round throughput ratio (2 ranks over 1).

  python3 bench/dp.py [--rounds 3] [--sipt target/release/sipt]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, Quiet, machine_facts  # noqa: E402

# The quickstart's model and data, short runs, one thread per rank, no periodic evaluation.
COMMON = [
    "experiment.threads=1",
    'experiment.device="cpu"',
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "train.log_every=1000",
]
WORKLOADS = {
    "ntp": {
        "sets": ['train.objective={ type = "ntp" }', "train.batch_size=16", "train.steps=10"],
        "unit": "tokens/s",
        "per_step": lambda row: row["tokens_step"],
    },
    "sip": {
        "sets": ["train.batch_size=16", "train.steps=6"],
        "unit": "prefixes/s",
        "per_step": lambda row: 16.0,
    },
    # The quickstart's own batch: the costs every rank repeats (the optimizer step, repacking
    # the weights for decoding) weigh more.
    "sip-8": {
        "sets": ["train.batch_size=8", "train.steps=6"],
        "unit": "prefixes/s",
        "per_step": lambda row: 8.0,
    },
}


def run_once(sipt, workload, ranks, warmup):
    spec = WORKLOADS[workload]
    out = tempfile.mkdtemp(prefix=f"sipt-dp-{workload}-{ranks}-")
    cmd = [sipt, "run", "experiments/quickstart.toml", "--out", out]
    for s in COMMON + spec["sets"]:
        cmd += ["--set", s]
    if ranks > 1:
        cmd += ["--nproc-per-node", str(ranks)]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        print(f"    FAILED: no result after 1800 s (killed): {' '.join(cmd)}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        return None
    wall = time.time() - t0
    if p.returncode != 0:
        print(f"    FAILED ({p.returncode}):\n{p.stderr[-2000:]}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        return None
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    shutil.rmtree(out, ignore_errors=True)
    previous = 0.0
    for r in rows:
        r["tokens_step"] = r["tokens"] - previous
        previous = r["tokens"]
    timed = rows[warmup:-1]
    step = statistics.mean(r["time/step"] for r in timed)
    result = {
        "workload": workload,
        "ranks": ranks,
        "wall_s": wall,
        "step_s": step,
        "throughput": statistics.mean(spec["per_step"](r) for r in timed) / step,
        "all_reduce_s": statistics.mean(r.get("time/all_reduce", 0.0) for r in timed),
        "gather_s": statistics.mean(r.get("time/gather", 0.0) for r in timed),
        "steps_timed": len(timed),
    }
    print(
        f"    {workload} x{ranks}: {result['throughput']:.1f} {spec['unit']}, "
        f"step {step * 1e3:.0f} ms, all-reduce {result['all_reduce_s'] * 1e3:.1f} ms, "
        f"gather {result['gather_s'] * 1e3:.1f} ms ({wall:.0f} s)",
        flush=True,
    )
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    ap.add_argument("--sipt", default=os.path.join(target, "release/sipt"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", choices=sorted(WORKLOADS), action="append")
    ap.add_argument("--max-load", type=float, default=0.5)
    ap.add_argument("--max-wait-min", type=float, default=10)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    workloads = args.only or sorted(WORKLOADS)
    quiet = Quiet(args.max_load, args.max_wait_min * 60)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60).stdout.strip()
    facts = machine_facts()
    print(f"machine: {facts}, commit {commit}", flush=True)
    results = []
    for rnd in range(args.rounds):
        for w in workloads:
            for ranks in (1, 2):
                quiet.wait(f"round {rnd + 1} {w} x{ranks}")
                r = run_once(args.sipt, w, ranks, args.warmup)
                if r:
                    r["round"] = rnd
                    results.append(r)
    print("\nmedians over rounds (2 ranks x 1 thread against 1 rank x 1 thread):")
    print("| workload | 1 rank | 2 ranks | ratio (median of rounds) | all-reduce / step | gather / step |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for w in workloads:
        unit = WORKLOADS[w]["unit"]
        one = [r for r in results if r["workload"] == w and r["ranks"] == 1]
        two = [r for r in results if r["workload"] == w and r["ranks"] == 2]
        ratios = []
        for rnd in range(args.rounds):
            a = [r for r in one if r["round"] == rnd]
            b = [r for r in two if r["round"] == rnd]
            if a and b:
                ratios.append(b[0]["throughput"] / a[0]["throughput"])
        med = lambda xs: statistics.median(xs) if xs else float("nan")
        s = {
            "one": med([r["throughput"] for r in one]),
            "two": med([r["throughput"] for r in two]),
            "ratio": med(ratios),
            "ratios": ratios,
            "all_reduce_ms": 1e3 * med([r["all_reduce_s"] for r in two]),
            "gather_ms": 1e3 * med([r["gather_s"] for r in two]),
            "step_ms_two": 1e3 * med([r["step_s"] for r in two]),
        }
        summary[w] = s
        print(
            f"| {w} | {s['one']:.1f} {unit} | {s['two']:.1f} {unit} | {s['ratio']:.2f}x "
            f"({', '.join(f'{x:.2f}' for x in ratios)}) | {s['all_reduce_ms']:.1f} ms of {s['step_ms_two']:.0f} ms "
            f"| {s['gather_ms']:.1f} ms |"
        )
    print(f"\nquiet checks: {[n for n in quiet.notes if n[2] != 'quiet'] or 'all quiet'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": facts, "commit": commit, "results": results, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
