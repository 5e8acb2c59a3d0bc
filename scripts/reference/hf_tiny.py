"""Tiny random models of the families sipt implements, built offline with transformers' own
config classes, saved with `save_pretrained`, with their reference logits and greedy tokens.

    python hf_tiny.py FAMILY OUT_DIR [TOKENIZER_JSON | CORPUS_DIR]
    python hf_tiny.py reload MODEL_DIR OUT_DIR/reference.safetensors LOGITS.safetensors

FAMILY: llama, llama3 (rope_scaling llama3, explicit head_dim), llama-linear (linear scaling,
tied), mistral (a sliding window of 8, shorter than the prompt), qwen2 (q/k/v biases), qwen3
(q/k norms, explicit head_dim), llama-bf16-sharded and llama-f16 (weights saved in 16 bits, the
first in several shards with an index).

Writes OUT_DIR/model (config.json, weights) and OUT_DIR/reference.safetensors: `ids` (int64
prompt), `logits` (float32, positions x vocab) and `greedy` (int64, 20 new tokens, argmax
decoding), all computed in float32 on the CPU (16-bit weights: from the rounded weights). With
TOKENIZER_JSON the vocabulary is that tokenizer's and it is copied beside the weights; with
CORPUS_DIR a byte-level BPE of 512 tokens is trained on its .txt files (the `tokenizers`
package) and used so.
"""
import json
import os
import shutil
import sys

import torch
import transformers as tf
from safetensors.torch import save_file


def reload(model_dir: str, reference: str, out: str) -> None:
    """The logits of a saved model folder (one sipt wrote) for the reference's prompt."""
    from safetensors.torch import load_file

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = load_file(reference)["ids"].unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    save_file({"logits": logits.contiguous()}, out)


def train_bpe(corpus: str, out: str) -> str:
    """A byte-level BPE of 512 tokens trained on the corpus's text files; returns its path."""
    import glob

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(sorted(glob.glob(f"{corpus}/*.txt")), trainer)
    os.makedirs(out, exist_ok=True)
    path = f"{out}/tokenizer.json"
    tok.save(path)
    return path


def main() -> None:
    if sys.argv[1] == "reload":
        reload(*sys.argv[2:5])
        return
    family, out = sys.argv[1], sys.argv[2]
    tokenizer = sys.argv[3] if len(sys.argv) > 3 else None
    if tokenizer and os.path.isdir(tokenizer):
        tokenizer = train_bpe(tokenizer, out)
    vocab = 96
    if tokenizer:
        with open(tokenizer) as f:
            t = json.load(f)
        vocab = max([*t["model"]["vocab"].values(), *(a["id"] for a in t.get("added_tokens", []))]) + 1
    torch.manual_seed(0)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
    )
    dtype, shard = torch.float32, None
    if family in ("llama", "llama-bf16-sharded", "llama-f16"):
        config, cls = tf.LlamaConfig(**common, tie_word_embeddings=False), tf.LlamaForCausalLM
        if family == "llama-bf16-sharded":
            dtype, shard = torch.bfloat16, "20KB"
        elif family == "llama-f16":
            dtype = torch.float16
    elif family == "llama3":
        # Llama 3.x's scaled frequencies, with an original context short enough that the
        # tiny model's wavelengths fall in all three bands.
        config = tf.LlamaConfig(**common, head_dim=32, tie_word_embeddings=False,
                                rope_theta=500000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64})
        cls = tf.LlamaForCausalLM
    elif family == "llama-linear":
        config = tf.LlamaConfig(**common, tie_word_embeddings=True,
                                rope_scaling={"rope_type": "linear", "factor": 4.0})
        cls = tf.LlamaForCausalLM
    elif family == "mistral":
        config = tf.MistralConfig(**common, sliding_window=8, tie_word_embeddings=False)
        cls = tf.MistralForCausalLM
    elif family == "qwen2":
        config = tf.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6,
                                use_sliding_window=False)
        cls = tf.Qwen2ForCausalLM
    elif family == "qwen3":
        config = tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True,
                                rope_theta=1e6, use_sliding_window=False)
        cls = tf.Qwen3ForCausalLM
    else:
        raise SystemExit(f"unknown family {family}")
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # transformers starts biases at zero and norms at one: make both count.
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.normal_(1.0, 0.2)
    if dtype != torch.float32:
        # The reference is the f32 model of the rounded weights, as sipt loads them.
        model = model.to(dtype)
        saved = dict(max_shard_size=shard) if shard else {}
        model.save_pretrained(f"{out}/model", safe_serialization=True, **saved)
        model = model.float()
    else:
        model.save_pretrained(f"{out}/model", safe_serialization=True)
    if tokenizer:
        shutil.copy(tokenizer, f"{out}/model/tokenizer.json")
    ids = torch.randint(3, min(vocab, 96), (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        new = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                             pad_token_id=0)[0, ids.shape[1]:]
    save_file(
        {"ids": ids[0].contiguous(), "logits": logits.contiguous(), "greedy": new.contiguous()},
        f"{out}/reference.safetensors",
    )


if __name__ == "__main__":
    main()
