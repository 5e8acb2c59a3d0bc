#!/usr/bin/env python3
"""Log-prob scoring memory and time, side by side: `sipt bench score` (the reference pass of a
SIP step: summed log-probs of 16 continuations of 128 tokens after 256-token prefixes, no
gradient, f32, SmolLM2-135M) against HF transformers doing the same, each in a fresh process,
interleaved over --rounds. Peak memory is GNU time's maximum resident set; each side also reports
its peak right after loading the model, so the scoring's own increment can be read apart from
the libraries and the weights.

The HF side is written the way a careful user would: one forward pass with `logits_to_keep`
(only the positions that predict continuation tokens get logits, as TRL computes them), then
`log_softmax` and `gather`.

  cargo build --release -p sipt
  .venv/bin/python bench/score.py [--rounds 3] [--model /tmp/smollm2-bench]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HF = r"""
import json, resource, sys, time
import torch, transformers as tf
model_dir, rows, prefix, cont, repeats = sys.argv[1], *map(int, sys.argv[2:6])
torch.set_grad_enabled(False)
model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
g = torch.Generator().manual_seed(5)
ids = torch.randint(100, model.config.vocab_size - 100, (rows, prefix + cont), generator=g)
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    logits = model(ids, logits_to_keep=cont + 1).logits[:, :-1]
    logp = logits.float().log_softmax(-1).gather(-1, ids[:, prefix:].unsqueeze(-1)).squeeze(-1)
    total = logp.sum(-1).sum().item()
    del logits, logp
    times.append(time.perf_counter() - t0)
print(json.dumps({"implementation": "hf", "seconds": sorted(times)[len(times) // 2],
                  "peak_rss_after_load_mb": loaded,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "threads": torch.get_num_threads()}))
"""


def timed(cmd):
    try:
        p = subprocess.run(["/usr/bin/time", "-f", "SIPT_PEAK_KB %M", *cmd], capture_output=True,
                           timeout=1800)
    except subprocess.TimeoutExpired:
        sys.exit(f"{' '.join(cmd)}: no result after 1800 s (killed)")
    err = p.stderr.decode(errors="replace")
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed: {err[-2000:]}")
    peak = int([l for l in err.splitlines() if l.startswith("SIPT_PEAK_KB ")][-1].split()[1]) / 1024
    out = json.loads(p.stdout.decode().strip().splitlines()[-1])
    out["peak_rss_mb"] = peak
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="/tmp/smollm2-bench")
    ap.add_argument("--sipt", default=os.path.join(ROOT, "target/release/sipt"))
    ap.add_argument("--gguf", default=os.path.expanduser("~/.cache/sipt/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=256)
    ap.add_argument("--continuation", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.model, "config.json")):
        subprocess.run([args.sipt, "import", "gguf", args.gguf, args.model], check=True,
                       stdout=subprocess.DEVNULL, timeout=600)
    common = ["--model", args.model, "--rows", str(args.rows), "--prefix-tokens", str(args.prefix),
              "--continuation-tokens", str(args.continuation), "--repeats", str(args.repeats)]
    rows = {"chunked": [], "unchunked": [], "hf": []}
    for r in range(args.rounds):
        rows["chunked"].append(timed([args.sipt, "bench", "score", *common]))
        rows["unchunked"].append(timed([args.sipt, "bench", "score", *common, "--unchunked"]))
        rows["hf"].append(timed([sys.executable, "-c", HF, args.model, str(args.rows), str(args.prefix),
                                 str(args.continuation), str(args.repeats)]))
        for k in rows:
            print(json.dumps({"round": r, "side": k, **rows[k][-1]}), flush=True)
    med = lambda k, f: statistics.median(x[f] for x in rows[k])
    print(f"# {args.rows} x ({args.prefix} + {args.continuation}) tokens, SmolLM2-135M f32, {args.rounds} rounds (medians)")
    for k in rows:
        print(f"{k:10} {med(k, 'seconds'):.3f} s, peak {med(k, 'peak_rss_mb'):.0f} MB, "
              f"after load {med(k, 'peak_rss_after_load_mb'):.0f} MB, "
              f"scoring's increment {med(k, 'peak_rss_mb') - med(k, 'peak_rss_after_load_mb'):.0f} MB")
    per = [a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in zip(rows["chunked"], rows["hf"])]
    inc = [(a["peak_rss_mb"] - a["peak_rss_after_load_mb"]) / (b["peak_rss_mb"] - b["peak_rss_after_load_mb"])
           for a, b in zip(rows["chunked"], rows["hf"])]
    speed = [b["seconds"] / a["seconds"] for a, b in zip(rows["chunked"], rows["hf"])]
    print(f"sipt/HF peak memory: {statistics.median(per):.2f} (rounds {', '.join(f'{x:.2f}' for x in per)}); "
          f"increment over the loaded model: {statistics.median(inc):.2f} ({', '.join(f'{x:.2f}' for x in inc)}); "
          f"speed HF s / sipt s: {statistics.median(speed):.2f} ({', '.join(f'{x:.2f}' for x in speed)})")


if __name__ == "__main__":
    main()
