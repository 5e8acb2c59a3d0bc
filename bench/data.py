#!/usr/bin/env python3
"""Corpus preparation side by side: `sipt data prepare` against HF `datasets` + `tokenizers`,
on corpora made here by repeating the real corpora (Shakespeare and the Brown corpus, from
scripts/fetch-assets.sh) into Parquet shards (pyarrow, snappy, a `text` column as FineWeb ships
it) and zstd-compressed JSON Lines shards (as Dolma ships it), half of each, at two sizes, with
SmolLM2's real tokenizer (imported from the GGUF asset).

For each size and side, in one run, interleaved over --rounds: wall time, throughput (MB of
document text per second) and peak resident memory (GNU time's maximum resident set size). sipt
tokenizes into a fresh shard folder every round; the reference runs the usual
`load_dataset(...)` + `Dataset.map(batched=True)` with `Tokenizer.encode_batch`, into a fresh
cache folder every round. Memory should not grow with the corpus: compare the two sizes.

  .venv/bin/pip install datasets==5.2.0 pyarrow==26.0.1 zstandard==0.25.0
  cargo build --release -p sipt
  .venv/bin/python bench/data.py [--sizes-mb 250 1000] [--rounds 2]
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REFERENCE = r"""
import sys, glob, time
from datasets import load_dataset, disable_progress_bars
from tokenizers import Tokenizer
disable_progress_bars()
corpus, tokenizer, cache = sys.argv[1:4]
tok = Tokenizer.from_file(tokenizer)
def encode(batch):
    return {"ids": [e.ids for e in tok.encode_batch(batch["text"], add_special_tokens=False)]}
docs = 0
for kind, pattern in (("parquet", "*.parquet"), ("json", "*.jsonl.zst")):
    files = sorted(glob.glob(f"{corpus}/{pattern}"))
    if not files:
        continue
    ds = load_dataset(kind, data_files=files, split="train", cache_dir=cache)
    out = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names)
    docs += len(out)
print(docs)
"""


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def measure(cmd, env=None):
    """Wall seconds, peak resident MB and stdout of one command. The peak comes from GNU time
    (`%M`): a child forked from this Python would count this process's memory in its own
    maxrss until it execs."""
    started = time.perf_counter()
    try:
        p = subprocess.run(["/usr/bin/time", "-f", "SIPT_PEAK_KB %M", *cmd], capture_output=True, env=env,
                           timeout=3600)
    except subprocess.TimeoutExpired:
        sys.exit(f"{' '.join(cmd)}: no result after 3600 s (killed)")
    wall = time.perf_counter() - started
    err = p.stderr.decode(errors="replace")
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed: {err[-2000:]}")
    peak = [l for l in err.splitlines() if l.startswith("SIPT_PEAK_KB ")][-1]
    return wall, int(peak.split()[1]) / 1024.0, p.stdout.decode()


def documents(assets):
    """Documents of the real corpora: Brown files whole, Shakespeare cut into scenes."""
    docs = []
    for sub in ("corpora/shakespeare", "corpora/brown"):
        d = os.path.join(assets, sub)
        for name in sorted(os.listdir(d)):
            text = open(os.path.join(d, name), encoding="utf-8", errors="replace").read()
            parts = text.split("\n\n\n") if "shakespeare" in sub else [text]
            docs.extend(p.strip() for p in parts if len(p.strip()) > 200)
    return docs


def make_corpus(out, docs, size_mb):
    """Repeat the documents into shards (about 64 MB of text each, at least four shards) until
    `size_mb`, alternately Parquet and zstd JSON Lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    os.makedirs(out, exist_ok=True)
    target = size_mb * 1_000_000
    shard_mb = max(1, min(64, size_mb // 4))
    written, shard, i = 0, 0, 0
    while written < target:
        batch, size = [], 0
        while size < shard_mb * 1_000_000 and written + size < target:
            d = docs[i % len(docs)]
            # A repeat is marked so that no two documents are the same text.
            d = f"[{i // len(docs)}] {d}"
            batch.append(d)
            size += len(d.encode())
            i += 1
        if shard % 2 == 0:
            pq.write_table(pa.table({"id": [str(k) for k in range(len(batch))], "text": batch}),
                           f"{out}/part-{shard:03d}.parquet", compression="snappy")
        else:
            lines = "".join(json.dumps({"text": d}) + "\n" for d in batch).encode()
            with open(f"{out}/part-{shard:03d}.jsonl.zst", "wb") as fh:
                fh.write(zstandard.ZstdCompressor(level=3).compress(lines))
        written += size
        shard += 1
    return written, len(os.listdir(out)), i


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[250, 1000])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sipt", default=os.path.join(ROOT, "target/release/sipt"))
    ap.add_argument("--work", default=None, help="folder for the corpora (default: a temporary one)")
    args = ap.parse_args()
    assets = os.environ.get("SIPT_ASSETS", os.path.expanduser("~/.cache/sipt/assets"))
    work = args.work or tempfile.mkdtemp(prefix="sipt-bench-data-")
    model = os.path.join(work, "smollm2")
    if not os.path.exists(os.path.join(model, "tokenizer.json")):
        subprocess.run([args.sipt, "import", "gguf",
                        os.path.join(assets, "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), model],
                       check=True, stdout=subprocess.DEVNULL, timeout=600)
    tokenizer = os.path.join(model, "tokenizer.json")
    docs = documents(assets)
    script = os.path.join(work, "reference.py")
    with open(script, "w") as fh:
        fh.write(REFERENCE)
    print(f"# machine: {cpu_name()}, {os.cpu_count()} cores; sipt {args.sipt}")
    results = {}
    for size in args.sizes_mb:
        corpus = os.path.join(work, f"corpus-{size}")
        if not os.path.isdir(corpus):
            text_bytes, shards, n = make_corpus(corpus, docs, size)
        else:
            text_bytes, shards, n = size * 1_000_000, len(os.listdir(corpus)), None
        exp = os.path.join(work, f"prepare-{size}.toml")
        with open(exp, "w") as fh:
            fh.write(f'[model]\npath = "{model}"\n\n[data]\ntrain = ["{corpus}"]\n')
        print(f"# corpus {size} MB: {shards} shards, {text_bytes / 1e6:.0f} MB of text, {n} documents")
        for r in range(args.rounds):
            shards_dir = os.path.join(work, "shards")
            shutil.rmtree(shards_dir, ignore_errors=True)
            env = dict(os.environ, SIPT_SHARDS=shards_dir)
            wall, rss, out = measure([args.sipt, "data", "prepare", "--json", exp], env)
            figures = json.loads(out.strip().splitlines()[-1])
            row = {"side": "sipt", "size_mb": size, "round": r, "seconds": wall,
                   "mb_per_s": figures["text_mb"] / wall, "peak_rss_mb": rss,
                   "documents": figures["documents"], "tokens": figures["tokens"]}
            print(json.dumps(row), flush=True)
            results.setdefault((size, "sipt"), []).append(row)
            cache = os.path.join(work, "hf-cache")
            shutil.rmtree(cache, ignore_errors=True)
            wall, rss, out = measure([sys.executable, script, corpus, tokenizer, cache])
            row = {"side": "hf-datasets", "size_mb": size, "round": r, "seconds": wall,
                   "mb_per_s": figures["text_mb"] / wall, "peak_rss_mb": rss,
                   "documents": int(out.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            results.setdefault((size, "hf"), []).append(row)
            shutil.rmtree(cache, ignore_errors=True)
    print("# summary (medians over rounds; ratio = HF seconds / sipt seconds, per round)")
    for size in args.sizes_mb:
        s, h = results[(size, "sipt")], results[(size, "hf")]
        ratios = [b["seconds"] / a["seconds"] for a, b in zip(s, h)]
        med = lambda rows, k: statistics.median(x[k] for x in rows)
        print(f"{size} MB: sipt {med(s, 'mb_per_s'):.2f} MB/s, peak {med(s, 'peak_rss_mb'):.0f} MB; "
              f"HF {med(h, 'mb_per_s'):.2f} MB/s, peak {med(h, 'peak_rss_mb'):.0f} MB; "
              f"ratio {statistics.median(ratios):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
