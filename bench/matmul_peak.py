#!/usr/bin/env python3
"""Machine facts for MFU and for the decode bound: fp32 and bf16 matmul GFLOP/s (best over a
few square sizes) and memory bandwidth (a large tensor copy, bytes read + written per second;
also a read-only sum). With --model DIR (an HF-layout Llama folder), also the bound on batched
decoding of that model: per step the weights are read once (4 bytes x parameters in f32, 2 in
bf16) and 2 x parameters FLOPs are done per row, so one step takes at least
max(bytes / bandwidth, FLOPs / peak). The f32 bound also counts each row reading a KV cache of
--context positions; the bf16 bound counts the weights only.
Prints one JSON line.
"""
import argparse
import json
import os
import time

import torch


def best_seconds(fn, reps, min_time=0.3):
    fn()
    best = float("inf")
    t_end = time.perf_counter() + min_time
    n = 0
    while n < reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,1024,2048,3072")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--copy-mib", type=int, default=512, help="size of the tensor copied")
    ap.add_argument("--model", help="HF-layout Llama folder: also print its decode-step bound")
    ap.add_argument("--rows", type=int, default=16, help="sequences decoded together")
    ap.add_argument("--context", type=int, default=320, help="mean KV length during decoding")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    gflops = {}
    for n in (int(s) for s in a.sizes.split(",")):
        x, y = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        s = best_seconds(lambda: torch.mm(x, y, out=out), reps=5)
        gflops[n] = 2 * n**3 / s / 1e9
    peak = max(gflops.values())
    gflops_bf16 = {}
    for n in (int(s) for s in a.sizes.split(",")):
        x, y = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
        s = best_seconds(lambda: torch.mm(x, y), reps=5)
        gflops_bf16[n] = 2 * n**3 / s / 1e9
    peak_bf16 = max(gflops_bf16.values())

    numel = a.copy_mib * 2**20 // 4
    src, dst = torch.randn(numel), torch.empty(numel)
    s = best_seconds(lambda: dst.copy_(src), reps=5)
    copy_bw = 2 * numel * 4 / s  # read + write
    s = best_seconds(lambda: src.sum(), reps=5)
    read_bw = numel * 4 / s

    out = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_gflops": {str(k): round(v, 1) for k, v in gflops.items()},
        "peak_gflops": peak,
        "copy_gb_per_s": copy_bw / 1e9,
        "read_gb_per_s": read_bw / 1e9,
        "peak_gflops_bf16": peak_bf16,
    }
    if a.model:
        cfg = json.load(open(os.path.join(a.model, "config.json")))
        d, i, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
        h, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        hd = cfg.get("head_dim") or d // h
        layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * i + 2 * d
        params = v * d + L * layer + d + (0 if cfg.get("tie_word_embeddings") else v * d)
        weight_bytes = 4 * params
        flops_row = 2 * params + 4 * L * a.context * h * hd  # matmuls + attention (QK^T and AV)
        kv_bytes_row = 2 * L * kv * hd * a.context * 4
        t_weights = weight_bytes / read_bw
        t_kv = a.rows * kv_bytes_row / read_bw
        t_flops = a.rows * flops_row / (peak * 1e9)
        step_bound = max(t_weights + t_kv, t_flops)
        out["decode_bound"] = {
            "parameters": params,
            "rows": a.rows,
            "context": a.context,
            "weight_bytes_per_step": weight_bytes,
            "kv_bytes_per_step": a.rows * kv_bytes_row,
            "gflop_per_step": a.rows * flops_row / 1e9,
            "seconds_weights_only": t_weights,
            "seconds_weights_and_kv": t_weights + t_kv,
            "seconds_flops": t_flops,
            "step_seconds_bound": step_bound,
            "tokens_per_second_bound": a.rows / step_bound,
            "tokens_per_second_bound_flops_only": a.rows / t_flops,
        }
        t_weights_bf16 = 2 * params / read_bw
        t_flops_bf16 = a.rows * flops_row / (peak_bf16 * 1e9)
        out["decode_bound_bf16"] = {
            "weight_bytes_per_step": 2 * params,
            "seconds_weights_only": t_weights_bf16,
            "seconds_flops": t_flops_bf16,
            "tokens_per_second_bound": a.rows / max(t_weights_bf16, t_flops_bf16),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
