#!/usr/bin/env python3
"""Reference for `sipt bench rollouts`: Hugging Face transformers `generate` on the same model
folder. P prefixes of L random token ids, K sampled rollouts of exactly N new tokens each
(do_sample, temperature 1.0, top-p 1.0, no top-k, num_return_sequences=K, min_new_tokens =
max_new_tokens = N), f32. Prints one JSON line like sipt's.

`generate` prefills each prefix once per returned sequence (it expands the input K times before
the prefill); that is what a user gets from it, so that is what is timed.
"""
import argparse
import json
import os
import random
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF-layout folder (config.json, model.safetensors)")
    ap.add_argument("--prefix-tokens", type=int, default=256)
    ap.add_argument("--prefixes", type=int, default=1)
    ap.add_argument("--rollouts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (after a short warm-up run)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="weights' type")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (scripts/gpu-check.sh)")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(
        a.model, dtype=torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    model.to(a.device).eval()
    vocab = model.config.vocab_size
    rng = random.Random(1)
    ids = torch.tensor(
        [[100 + rng.randrange(vocab - 200) for _ in range(a.prefix_tokens)] for _ in range(a.prefixes)]
    ).to(a.device)
    mask = torch.ones_like(ids)
    eos = model.config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)

    def run(new_tokens, seed):
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                num_return_sequences=a.rollouts,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=pad,
            )
        assert out.shape == (a.prefixes * a.rollouts, a.prefix_tokens + new_tokens), out.shape
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    run(4, 0)  # warm-up: allocations, first-call overheads (a short run: the full one is long)
    times = []
    for i in range(a.repeats):
        t0 = time.perf_counter()
        run(a.new_tokens, i + 1)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    generated = a.prefixes * a.rollouts * a.new_tokens
    print(json.dumps({
        "implementation": "hf-generate",
        "seconds": seconds,
        "generated_tokens_per_second": generated / seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "device": a.device,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }))


if __name__ == "__main__":
    main()
