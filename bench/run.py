#!/usr/bin/env python3
"""The whole side-by-side comparison of sipt against the references a user would otherwise pick
(see docs/benchmarks.md). Every pair is measured in this one run, interleaved A, B, A, B over
several rounds; the summary gives medians over rounds and the median of the per-round ratios.

  training  : `sipt bench train`     vs bench/torch_train.py (eager) and --compile, at two sizes
  rollouts  : `sipt bench rollouts`  vs bench/hf_generate.py, 1 prefix x 16 and 4 prefixes x 4
  SIP step  : `sipt bench sip-step`  vs bench/trl_dpo.py (skipped on the sipt side if the
              subcommand does not exist yet; the TRL reference is then measured alone)
  machine   : bench/matmul_peak.py   (fp32 matmul peak for MFU, bandwidth and the decode bound)

Run it through bench/run.sh (which builds sipt first). The machine is shared: before each round
it waits (up to --max-wait-min in all) for the 1-minute load to fall below --max-load and for no
compiler or model server to be running, and records the load it measured under.
"""
import argparse
import atexit
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = re.compile(r"^(cargo|rustc|cc1plus|cc1|ld|rust-lld|nvcc)$")


def load1():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _cpu_ticks():
    ticks = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open(f"/proc/{pid}/stat").read()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            ticks[pid] = (comm, int(fields[11]) + int(fields[12]))
        except (OSError, ValueError, IndexError):
            continue
    return ticks


def heavy_processes(window=2.0):
    """Other processes that would steal the two cores over a short window: a compiler using more
    than 5% of a core, or anything else (a model server, a test run) using more than 20%.
    Returns them and the cores that all other processes used together."""
    me = str(os.getpid())
    before = _cpu_ticks()
    time.sleep(window)
    after = _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    found, total = [], 0.0
    for pid, (comm, t) in after.items():
        if pid == me:
            continue
        used = (t - before.get(pid, (comm, t))[1]) / hz / window
        total += used
        if (HEAVY.match(comm) and used > 0.05) or used > 0.2:
            found.append(f"{pid}:{comm}({used:.0%})")
    return found, total


def busy_cpu_seconds():
    """CPU seconds spent busy by the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Quiet:
    """Waits for a quiet machine, within one budget for the whole run. The first wait also asks
    for a low 1-minute load; later ones look only at what other processes use right now (the load
    average still counts our own previous runs)."""

    def __init__(self, max_load, max_wait_s):
        self.max_load, self.deadline = max_load, time.time() + max_wait_s
        self.notes, self.first = [], True

    def wait(self, label):
        while True:
            l, (heavy, others) = load1(), heavy_processes()
            ok = not heavy and others < 0.3 and (l < self.max_load or not self.first)
            state = f"load {l:.2f}, others {others:.2f} cores, busy: {' '.join(heavy) or '-'}"
            if ok:
                self.notes.append((label, state, "quiet"))
                break
            if time.time() >= self.deadline:
                print(f"  [{label}] measuring anyway: {state}", flush=True)
                self.notes.append((label, state, "NOT quiet"))
                break
            print(f"  [{label}] waiting: {state}", flush=True)
            time.sleep(min(30, max(1, self.deadline - time.time())))
        self.first = False


# The longest any one measured command may take (TRL's 4 steps take about a minute here).
RUN_TIMEOUT_S = 1800


def run_json(cmd, log, label):
    print(f"  $ OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} " + shlex.join(cmd), flush=True)
    t0, b0, c0 = time.time(), busy_cpu_seconds(), children_cpu_seconds()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"    FAILED: no result after {RUN_TIMEOUT_S}s (killed): {shlex.join(cmd)}", flush=True)
        return None
    wall = time.time() - t0
    # Cores that other processes used, on average, while this one ran.
    others = max(0.0, (busy_cpu_seconds() - b0) - (children_cpu_seconds() - c0)) / wall
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        print(f"    FAILED ({p.returncode}) after {wall:.0f}s:\n{p.stderr[-2000:]}", flush=True)
        return None
    out = json.loads(lines[-1])
    out["_label"], out["_cmd"], out["_wall_s"], out["_others_cores"] = label, shlex.join(cmd), wall, others
    print(f"    {wall:.0f}s, other processes used {others:.2f} cores meanwhile", flush=True)
    log.write(json.dumps(out) + "\n")
    log.flush()
    return out


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec=".0f"):
    return "n/a" if x is None else format(x, spec)


def machine_facts():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    flags = open("/proc/cpuinfo").read()
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "avx512f": " avx512f " in flags,
        "kernel": platform.release(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def sip_step_help(sipt):
    try:
        p = subprocess.run([sipt, "bench", "sip-step", "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dpo-rounds", type=int, default=2, help="rounds of the SIP-step pair (TRL is slow)")
    ap.add_argument("--sipt", default=os.path.join(ROOT, "target/release/sipt"))
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv/bin/python"))
    ap.add_argument("--model-dir", default="/tmp/smollm2-bench", help="SmolLM2-135M in HF layout (imported if missing)")
    ap.add_argument("--gguf", default=os.path.expanduser("~/.cache/sipt/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--compile-warmup", type=int, default=3)
    ap.add_argument("--max-load", type=float, default=0.7)
    ap.add_argument("--max-wait-min", type=float, default=25)
    ap.add_argument("--only", default="train,rollouts,dpo", help="comma list of: train, rollouts, dpo")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="intra-op threads for every process (sipt gets OMP_NUM_THREADS); default: all "
                         "cores, libtorch's default. On a machine shared with other jobs, 1 thread avoids "
                         "OpenMP barrier stalls that hit both sides")
    ap.add_argument("--bf16", action="store_true",
                    help="also measure bf16 weights for rollouts (sipt and HF) and sipt's SIP step "
                         "with bf16 sampling")
    ap.add_argument("--out", default=None, help="JSON-lines log of every run (default: /tmp/sipt-bench-<time>.jsonl)")
    a = ap.parse_args()
    only = set(a.only.split(","))

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_path = a.out or f"/tmp/sipt-bench-{stamp}.jsonl"
    log = open(log_path, "w")
    py = a.python
    # A private copy, so that a rebuild by someone else during the run cannot swap the binary.
    sipt = f"/tmp/sipt-bench-{stamp}.bin"
    shutil.copy2(a.sipt, sipt)
    atexit.register(lambda: os.path.exists(sipt) and os.remove(sipt))
    threads = a.threads
    os.environ["OMP_NUM_THREADS"] = str(threads)  # sipt (libtorch's default is the core count)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    torch_version = subprocess.run([py, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True, timeout=300).stdout.strip()
    facts = machine_facts()
    facts["torch"] = torch_version
    facts["threads"] = threads
    print(f"machine: {json.dumps(facts)}")
    print(f"log: {log_path}", flush=True)
    log.write(json.dumps({"_label": "machine", **facts}) + "\n")

    if ("rollouts" in only or "dpo" in only) and not os.path.exists(os.path.join(a.model_dir, "config.json")):
        subprocess.run([sipt, "import", "gguf", a.gguf, a.model_dir], check=True, timeout=600)

    quiet = Quiet(a.max_load, a.max_wait_min * 60)
    t_begin = time.time()
    # The two training configurations: "tiny" (5.0M parameters, 16 x 256 tokens a step) and
    # "small" (twice the width: 15.8M parameters, 8 x 256 tokens a step).
    train_shapes = {
        "tiny": ["--vocab", "8192", "--hidden", "256", "--layers", "4", "--heads", "8",
                 "--kv-heads", "4", "--ffn", "688", "--seq", "256", "--batch", "16"],
        "small": ["--vocab", "8192", "--hidden", "512", "--layers", "4", "--heads", "8",
                  "--kv-heads", "4", "--ffn", "1376", "--seq", "256", "--batch", "8"],
    }
    train_cmds = {
        name: ([sipt, "bench", "train", *shape, "--steps", str(a.train_steps), "--warmup", "3"],
               [py, "bench/torch_train.py", *shape, "--steps", str(a.train_steps), "--threads", str(threads)])
        for name, shape in train_shapes.items()
    }
    settings = [(1, 16), (4, 4)]
    SHORT = 16  # new tokens of the short rollout runs (see below)

    def rollout_cmds(p, k, new_tokens=128):
        s = [sipt, "bench", "rollouts", "--model", a.model_dir, "--prefix-tokens", "256", "--prefixes", str(p),
             "--rollouts", str(k), "--new-tokens", str(new_tokens), "--repeats", "1"]
        h = [py, "bench/hf_generate.py", "--model", a.model_dir, "--prefix-tokens", "256", "--prefixes", str(p),
             "--rollouts", str(k), "--new-tokens", str(new_tokens), "--repeats", "1", "--threads", str(threads)]
        return s, h

    R = {}  # label -> list of results (one per round)

    def add(label, r):
        R.setdefault(label, []).append(r)

    peak_cmd = [py, "bench/matmul_peak.py", "--threads", str(threads)]
    if os.path.exists(os.path.join(a.model_dir, "config.json")):
        peak_cmd += ["--model", a.model_dir, "--rows", "16", "--context", "320"]

    for rnd in range(1, a.rounds + 1):
        print(f"\n== round {rnd}/{a.rounds}", flush=True)
        quiet.wait(f"round {rnd}")
        add("peak", run_json(peak_cmd, log, "peak"))
        if "train" in only:
            for name, (train_cmd, torch_cmd) in train_cmds.items():
                tag = "train" if name == "tiny" else f"train-{name}"
                add(f"{tag}/sipt", run_json(train_cmd, log, f"{tag}/sipt"))
                add(f"{tag}/eager", run_json(torch_cmd + ["--warmup", "3"], log, f"{tag}/eager"))
                add(f"{tag}/compile", run_json(torch_cmd + ["--warmup", str(a.compile_warmup), "--compile"],
                                               log, f"{tag}/compile"))
        if "rollouts" in only:
            for p, k in settings:
                s, h = rollout_cmds(p, k)
                add(f"roll/{p}x{k}/sipt", run_json(s, log, f"roll/{p}x{k}/sipt"))
                add(f"roll/{p}x{k}/hf", run_json(h, log, f"roll/{p}x{k}/hf"))
                if a.bf16:
                    add(f"roll/{p}x{k}/sipt-bf16", run_json(s + ["--dtype", "bf16"], log, f"roll/{p}x{k}/sipt-bf16"))
                    add(f"roll/{p}x{k}/hf-bf16", run_json(h + ["--dtype", "bf16"], log, f"roll/{p}x{k}/hf-bf16"))
                # 16 new tokens: subtracted from the 128-token run, it leaves the time of 112 decode
                # steps, without the prefill and the one-off repacking of the weights.
                s16, _ = rollout_cmds(p, k, new_tokens=SHORT)
                add(f"roll/{p}x{k}/sipt-short", run_json(s16, log, f"roll/{p}x{k}/sipt-short"))
                if a.bf16:
                    add(f"roll/{p}x{k}/sipt-bf16-short",
                        run_json(s16 + ["--dtype", "bf16"], log, f"roll/{p}x{k}/sipt-bf16-short"))

    dpo_help = sip_step_help(sipt) if "dpo" in only else None
    if "dpo" in only:
        trl_cmd = [py, "bench/trl_dpo.py", "--model", a.model_dir, "--prompts", "4", "--prompt-tokens", "64",
                   "--new-tokens", "64", "--steps", "3", "--warmup", "1", "--threads", str(threads)]
        sip_cmd = None
        if dpo_help is not None:
            sip_cmd = [sipt, "bench", "sip-step"]
            wanted = [("--model", a.model_dir), ("--prompts", "4"), ("--prompt-tokens", "64"),
                      ("--completions", "2"), ("--rollouts", "2"), ("--new-tokens", "64"),
                      ("--steps", "5"), ("--warmup", "1"), ("--repeats", "5")]
            for flag, value in wanted:
                if re.search(re.escape(flag) + r"\b", dpo_help):
                    sip_cmd += [flag, value]
        else:
            print("\n== SIP step: `sipt bench sip-step` is not in this build: sipt side SKIPPED, "
                  "TRL reference measured alone", flush=True)
        rounds = a.dpo_rounds if sip_cmd else 1
        for rnd in range(1, rounds + 1):
            print(f"\n== SIP step round {rnd}/{rounds}", flush=True)
            quiet.wait(f"dpo round {rnd}")
            if sip_cmd:
                add("dpo/sipt", run_json(sip_cmd, log, "dpo/sipt"))
                if a.bf16:
                    add("dpo/sipt-bf16", run_json(sip_cmd + ["--sample-dtype", "bf16"], log, "dpo/sipt-bf16"))
            add("dpo/trl", run_json(trl_cmd, log, "dpo/trl"))

    # ---------------------------------------------------------------- summary
    def vals(label, key):
        return [r.get(key) if r else None for r in R.get(label, [])]

    def per_round(num, den, key, invert=False):
        out = []
        for x, y in zip(vals(num, key), vals(den, key)):
            if x and y:
                out.append(y / x if invert else x / y)
        return out

    def ratios(num, den, key, invert=False):
        return med(per_round(num, den, key, invert))

    def ratio_cell(num, den, key, target, invert=False, suffix="x"):
        """Median ratio, the per-round ratios, and whether the target (a minimum) is met."""
        rounds = per_round(num, den, key, invert)
        if not rounds:
            return "n/a", "-"
        m = med(rounds)
        each = ", ".join(f"{r:.2f}" for r in rounds)
        verdict = "-" if target is None else (f">= {target}{suffix}: " + ("**met**" if m >= target else "missed"))
        return f"{m:.2f}{suffix} ({each})", verdict

    peak = med(vals("peak", "peak_gflops"))
    bounds = [r["decode_bound"] for r in R.get("peak", []) if r and "decode_bound" in r]
    print(f"\n== summary ({a.rounds} rounds, medians; wall {time.time() - t_begin:.0f}s; "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {facts['nproc']} x {facts['cpu']}; torch {torch_version}; "
          f"{threads} thread(s))")
    print("before each round: " + "; ".join(f"{l}: {n} ({v})" for l, v, n in quiet.notes))
    others = [r["_others_cores"] for rs in R.values() for r in rs if r]
    if others:
        print(f"cores used by other processes during the runs: median {med(others):.2f}, max {max(others):.2f}")
    print(f"fp32 matmul peak: {fmt(peak, '.1f')} GFLOP/s; read bandwidth "
          f"{fmt(med(vals('peak', 'read_gb_per_s')), '.1f')} GB/s; copy "
          f"{fmt(med(vals('peak', 'copy_gb_per_s')), '.1f')} GB/s")
    print("\n| benchmark | sipt | reference | ratio sipt/ref (median of rounds) | target |")
    print("|---|---|---|---|---|")
    if "train" in only:
        for shape in train_cmds:
            tag = "train" if shape == "tiny" else f"train-{shape}"
            s_tps = med(vals(f"{tag}/sipt", "tokens_per_second"))
            for ref, name in ((f"{tag}/eager", "PyTorch eager"), (f"{tag}/compile", "torch.compile")):
                r_tps = med(vals(ref, "tokens_per_second"))
                mfu_s = med(vals(f"{tag}/sipt", "model_flops_per_second"))
                mfu_r = med(vals(ref, "model_flops_per_second"))
                mfu = lambda f: "n/a" if not (f and peak) else f"{f / (peak * 1e9):.2f}"
                cell, verdict = ratio_cell(f"{tag}/sipt", ref, "tokens_per_second",
                                           1.15 if ref.endswith("/eager") else 1.0)
                print(f"| NTP training ({shape}) tok/s vs {name} (MFU sipt {mfu(mfu_s)}, ref {mfu(mfu_r)}) | "
                      f"{fmt(s_tps)} | {fmt(r_tps)} | {cell} | {verdict} |")
            mfu_s = med(vals(f"{tag}/sipt", "model_flops_per_second"))
            if mfu_s and peak:
                m = mfu_s / (peak * 1e9)
                print(f"| NTP training ({shape}) MFU (of the measured fp32 matmul peak) | {m:.2f} | - | - | "
                      f">= 0.70: {'**met**' if m >= 0.70 else 'missed'} |")
    if "rollouts" in only:
        for p, k in settings:
            base = f"roll/{p}x{k}"
            s = med(vals(f"{base}/sipt", "generated_tokens_per_second"))
            h = med(vals(f"{base}/hf", "generated_tokens_per_second"))
            key = "generated_tokens_per_second"
            cell, verdict = ratio_cell(f"{base}/sipt", f"{base}/hf", key, 3.5)
            print(f"| rollouts tok/s, {p} prefix(es) x {k}, 256-token prefix, 128 new, f32 vs HF f32 | "
                  f"{fmt(s)} | {fmt(h)} | {cell} | {verdict} |")
            if a.bf16:
                sb = med(vals(f"{base}/sipt-bf16", key))
                hb = med(vals(f"{base}/hf-bf16", key))
                cell, _ = ratio_cell(f"{base}/sipt-bf16", f"{base}/hf", key, None)
                print(f"| rollouts tok/s, {p} x {k}, sipt bf16 weights vs HF f32 | {fmt(sb)} | {fmt(h)} | {cell} | - |")
                cell, verdict = ratio_cell(f"{base}/sipt-bf16", f"{base}/hf-bf16", key, 4.0)
                print(f"| rollouts tok/s, {p} x {k}, sipt bf16 vs HF bf16 | {fmt(sb)} | {fmt(hb)} | {cell} | {verdict} |")
    if "dpo" in only:
        s = med(vals("dpo/sipt", "step_seconds"))
        t = med(vals("dpo/trl", "step_seconds"))
        cell, verdict = ratio_cell("dpo/sipt", "dpo/trl", "step_seconds", 3.0, invert=True, suffix="x faster")
        print(f"| SIP step s/step, 4 prompts x 2 x 64 tokens, f32 (lower is better) | "
              f"{fmt(s, '.2f') if R.get('dpo/sipt') else 'skipped'} | {fmt(t, '.2f')} | {cell} | {verdict} |")
        if a.bf16 and R.get("dpo/sipt-bf16"):
            sb = med(vals("dpo/sipt-bf16", "step_seconds"))
            cell, _ = ratio_cell("dpo/sipt-bf16", "dpo/trl", "step_seconds", None, invert=True, suffix="x faster")
            print(f"| SIP step s/step, sipt sampling with bf16 weights vs TRL | {fmt(sb, '.2f')} | {fmt(t, '.2f')} | "
                  f"{cell} | - |")
        # Where each side's step goes (medians over rounds of each run's median per phase).
        sides = [("sipt f32", "dpo/sipt"), ("sipt bf16 sampling", "dpo/sipt-bf16"), ("TRL", "dpo/trl")]
        sides = [(n, l) for n, l in sides if any(r and r.get("phase_seconds") for r in R.get(l, []))]
        if sides:
            phases = ["sample", "policy", "reference", "backward", "optimizer"]
            print("\nSIP step phases, seconds (sample: rollouts; policy / reference: log-probs; backward; "
                  "optimizer: clip + AdamW; other: the rest of the step):")
            print("| phase | " + " | ".join(n for n, _ in sides) + " |")
            print("|---|" + "---|" * len(sides))
            for ph in phases + ["other"]:
                cells = []
                for _, l in sides:
                    if ph == "other":
                        xs = [r["step_seconds"] - sum(r["phase_seconds"].get(q, 0.0) for q in phases)
                              for r in R[l] if r and r.get("phase_seconds")]
                    else:
                        xs = [r["phase_seconds"].get(ph) for r in R[l] if r and r.get("phase_seconds")]
                    cells.append(fmt(med(xs), ".2f"))
                print(f"| {ph} | " + " | ".join(cells) + " |")

    if "rollouts" in only and bounds and peak:
        print("\nDecoding against the machine bound (16 rows, weights read once per step; bound = "
              "max(bytes/read bandwidth, FLOPs/matmul peak)):")
        b = {k: med([x[k] for x in bounds]) for k in bounds[0]}
        print(f"  per step: {b['weight_bytes_per_step'] / 1e6:.0f} MB weights + {b['kv_bytes_per_step'] / 1e6:.0f} MB "
              f"KV (context {b['context']}), {b['gflop_per_step']:.2f} GFLOP -> bound {b['tokens_per_second_bound']:.0f}"
              f" tok/s (weights only: {16 / b['seconds_weights_only']:.0f}; FLOPs only: "
              f"{b['tokens_per_second_bound_flops_only']:.0f})")
        b16 = [r["decode_bound_bf16"] for r in R.get("peak", []) if r and "decode_bound_bf16" in r]
        b16 = {k: med([x[k] for x in b16]) for k in b16[0]} if b16 else None
        if b16:
            print(f"  bf16 weights: {b16['weight_bytes_per_step'] / 1e6:.0f} MB per step, bf16 matmul peak "
                  f"{med([r['peak_gflops_bf16'] for r in R['peak'] if r]):.0f} GFLOP/s -> bound "
                  f"{b16['tokens_per_second_bound']:.0f} tok/s (weights and FLOPs only, no KV)")
        for p, k in settings:
            for kind, bound in (("", b), ("-bf16", b16)):
                base = f"roll/{p}x{k}/sipt{kind}"
                full = med(vals(base, "seconds"))
                short = med(vals(f"{base}-short", "seconds"))
                if full and short and bound:
                    # Per-step time from the two runs' difference; the 16-token run's remainder
                    # after 15 such steps is the prefill and the repacking.
                    step = (full - short) / (128 - SHORT)
                    decode_tps = p * k / step
                    print(f"  sipt{kind or ' f32'} {p}x{k}: prefill + repacking {short - (SHORT - 1) * step:.2f}s, "
                          f"decoding {decode_tps:.0f} tok/s = {decode_tps / bound['tokens_per_second_bound']:.0%} "
                          f"of the bound (>= 45%: "
                          f"{'met' if decode_tps / bound['tokens_per_second_bound'] >= 0.45 else 'missed'})")
    print(f"\nall runs (commands and JSON): {log_path}")


if __name__ == "__main__":
    main()
