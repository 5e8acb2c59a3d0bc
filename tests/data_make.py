"""Corpus shards in the formats researchers' corpora ship in, made from text files with the
real writers: Parquet with a `text` column (pyarrow, as FineWeb and DCLM; several row groups,
snappy-compressed, an `id` column beside) and JSON Lines compressed with zstd (the `zstd`
command line or Python's zstandard when present; as Dolma and RedPajama).

    python data_make.py OUT_DIR TEXT_FILE...     writes OUT_DIR/part-0.parquet, part-1.jsonl.zst
    python data_make.py bad OUT_DIR              writes the bad inputs the tests expect errors for
"""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def paragraphs(files):
    """Documents: the files' blank-line-separated paragraphs of some length."""
    docs = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for p in fh.read().split("\n\n"):
                if len(p) > 400:
                    docs.append(p.strip())
    return docs


def write_zst(path, data: bytes):
    try:
        import zstandard

        with open(path, "wb") as fh:
            fh.write(zstandard.ZstdCompressor(level=3).compress(data))
    except ImportError:
        subprocess.run(["zstd", "-q", "-f", "-o", path], input=data, check=True)


def main():
    if sys.argv[1] == "bad":
        out = sys.argv[2]
        os.makedirs(out, exist_ok=True)
        # A Parquet file cut in half, one whose text column is named otherwise, one with nulls.
        table = pa.table({"id": ["a", "b"], "text": ["x" * 500, "y" * 500]})
        pq.write_table(table, f"{out}/whole.parquet")
        with open(f"{out}/whole.parquet", "rb") as fh:
            data = fh.read()
        with open(f"{out}/cut.parquet", "wb") as fh:
            fh.write(data[: len(data) // 2])
        pq.write_table(pa.table({"id": ["a"], "content": ["z" * 500]}), f"{out}/other.parquet")
        pq.write_table(pa.table({"text": ["w" * 500, None, "v" * 500]}), f"{out}/nulls.parquet")
        # JSON Lines, zstd-compressed, cut short.
        lines = "".join(json.dumps({"text": "t" * 300}) + "\n" for _ in range(2000)).encode()
        write_zst(f"{out}/whole.jsonl.zst", lines)
        with open(f"{out}/whole.jsonl.zst", "rb") as fh:
            data = fh.read()
        with open(f"{out}/cut.jsonl.zst", "wb") as fh:
            fh.write(data[: len(data) // 2])
        return
    out, files = sys.argv[1], sys.argv[2:]
    os.makedirs(out, exist_ok=True)
    docs = paragraphs(files)
    half = len(docs) // 2
    table = pa.table({"id": [f"doc-{i}" for i in range(half)], "text": docs[:half]})
    pq.write_table(table, f"{out}/part-0.parquet", row_group_size=max(1, half // 3),
                   compression="snappy")
    lines = "".join(json.dumps({"text": d, "source": "test"}) + "\n" for d in docs[half:])
    write_zst(f"{out}/part-1.jsonl.zst", lines.encode())
    print(json.dumps({"documents": len(docs), "parquet": half, "jsonl": len(docs) - half}))


if __name__ == "__main__":
    main()
