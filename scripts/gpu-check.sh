#!/usr/bin/env bash
# One short check of sipt on a machine with a CUDA GPU, for docs/benchmarks.md and
# docs/scaling.md. Two halves:
#
#   scripts/gpu-check.sh --prepare   here (where sipt builds): fills .gpu/ (git-ignored) with the
#                                    release binary, SmolLM2's tokenizer and config, and a small
#                                    text corpus — about 25 MB, small enough to carry.
#   scripts/gpu-check.sh             there, from the repository root with .gpu/ carried: runs
#                                    every check below in one go and writes one JSON line per
#                                    check to $OUT/gpu-check.jsonl (or .gpu/out/).
#
# The checks: CUDA is selected; an NCCL group of world size 1 (and 2 where two GPUs exist)
# initialises and all-reduces correctly, with its bandwidth; bf16-autocast next-token training
# of a ~1.1B-parameter Llama (TinyLlama's shape) with tokens/s and MFU against the GPU's dense
# bf16 peak; rollouts of a SmolLM2-135M-shaped model (random weights: the hub is out of reach)
# in f32 and bf16, against HF generate on the same GPU when transformers is installed there;
# and the time of a SIP step. The torch there is found from SIPT_TORCH_VENV (default
# /opt/torch/.venv, as on the lent machines).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
gpu="$root/.gpu"

if [ "${1:-}" = "--prepare" ]; then
    set -e
    target="${CARGO_TARGET_DIR:-$root/target}"
    cargo build --release -p sipt
    mkdir -p "$gpu"
    cp "$target/release/sipt" "$gpu/sipt"
    assets="$(scripts/fetch-assets.sh smollm2 | tail -1)"
    tmp="$(mktemp -d)"
    "$gpu/sipt" import gguf "$assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$tmp/smol" >/dev/null
    cp "$tmp/smol/tokenizer.json" "$tmp/smol/config.json" "$gpu/"
    rm -rf "$tmp"
    # About 2 MB of text for the from-scratch model's one step (and nothing else).
    { cat "$assets"/corpora/shakespeare/*.txt | head -c 2000000 > "$gpu/corpus.txt"; } || true
    grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    du -sh "$gpu"
    echo "carry .gpu to the GPU machine and run scripts/gpu-check.sh there"
    exit 0
fi

venv="${SIPT_TORCH_VENV:-/opt/torch/.venv}"
py="$venv/bin/python"
torch_lib="$("$py" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}"
sipt="$gpu/sipt"
out="${OUT:-$gpu/out}"
mkdir -p "$out"
results="$out/gpu-check.jsonl"
: > "$results"
log="$out/gpu-check.log"
note() { echo "gpu-check: $*" | tee -a "$log"; }
record() { # name, then the command; its last JSON line goes to the results
    local name="$1"; shift
    note "$name: $*"
    local line
    if line="$("$@" 2>>"$log" | grep '^{' | tail -1)" && [ -n "$line" ]; then
        echo "{\"check\":\"$name\",\"result\":$line}" | tee -a "$results"
    else
        echo "{\"check\":\"$name\",\"failed\":true}" | tee -a "$results"
    fi
}

gpus="$(nvidia-smi -L 2>/dev/null | wc -l)"
name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
note "GPU: ${name:-none} ($gpus device(s)); torch $("$py" -c 'import torch; print(torch.__version__)')"
echo "{\"check\":\"machine\",\"gpu\":\"$name\",\"gpus\":$gpus,\"cpu\":\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\"}" >> "$results"

# 1. NCCL: a group of one, and of two where there are two GPUs.
record nccl-1 "$sipt" bench collectives --device cuda --nproc-per-node 1 --mib 256
if [ "$gpus" -ge 2 ]; then
    record nccl-2 "$sipt" bench collectives --device cuda --nproc-per-node 2 --mib 256
fi

# 2. bf16 next-token training of a 1.1B Llama (TinyLlama's shape), random tokens.
record train-1b "$sipt" bench train --device cuda --dtype bf16 --vocab 32000 --hidden 2048 \
    --layers 22 --heads 32 --kv-heads 4 --ffn 5632 --seq 2048 --batch 8 --steps 5 --warmup 2

# 3. A SmolLM2-135M-shaped model with random weights: one from-scratch step of sipt itself.
model="$out/smol-random"
cat > "$out/init.toml" <<EOF
[experiment]
name = "gpu-init"
device = "cuda"
[model]
tokenizer = "$gpu/tokenizer.json"
hidden_size = 576
layers = 30
heads = 9
kv_heads = 3
intermediate_size = 1536
max_position = 2048
rope_theta = 100000.0
[data]
train = ["$gpu/corpus.txt"]
seq_len = 256
[train]
steps = 1
batch_size = 2
eval_every = 0
[train.objective]
type = "ntp"
EOF
note "random SmolLM2-shaped model"
if "$sipt" run "$out/init.toml" --out "$out/init" >>"$log" 2>&1; then
    cp -r "$out/init/checkpoints/step-00000001" "$model"
    for dtype in f32 bf16; do
        record "rollouts-16x128-$dtype" "$sipt" bench rollouts --model "$model" --device cuda \
            --dtype "$dtype" --prefix-tokens 256 --prefixes 1 --rollouts 16 --new-tokens 128
        record "rollouts-64x128-$dtype" "$sipt" bench rollouts --model "$model" --device cuda \
            --dtype "$dtype" --prefix-tokens 256 --prefixes 4 --rollouts 16 --new-tokens 128
    done
    if "$py" -c 'import transformers' 2>/dev/null; then
        for dtype in f32 bf16; do
            record "hf-generate-16x128-$dtype" "$py" bench/hf_generate.py --model "$model" \
                --device cuda --dtype "$dtype" --prefix-tokens 256 --prefixes 1 --rollouts 16 \
                --new-tokens 128
        done
    else
        note "transformers is not installed there: no HF generate reference"
        echo '{"check":"hf-generate","skipped":"transformers not installed"}' >> "$results"
    fi
    record sip-step "$sipt" bench sip-step --model "$model" --device cuda --prompts 8 \
        --completions 4 --new-tokens 64 --prompt-tokens 128 --steps 5
else
    note "could not make the random model (see $log)"
fi

# MFU of the 1B training step against the GPU's dense bf16 peak (datasheet figures).
"$py" - "$results" "$name" <<'EOF' | tee -a "$log"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
name = sys.argv[2]
p = next((v for k, v in peak.items() if k in name), None)
for r in rows:
    if r.get("check") == "train-1b" and "result" in r:
        flops = r["result"].get("model_flops_per_second")
        tps = r["result"].get("tokens_per_second")
        mfu = flops / p if (flops and p) else None
        print(json.dumps({"check": "train-1b-mfu", "tokens_per_second": tps, "peak_flops": p, "mfu": mfu}))
EOF
note "done: $results"
