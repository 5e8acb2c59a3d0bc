"""Tiny random models of the families sipt implements, built offline with transformers' own
config classes, saved with `save_pretrained`, with their reference logits and greedy tokens.

    python hf_tiny.py FAMILY OUT_DIR        (FAMILY: llama, qwen2)
    python hf_tiny.py reload MODEL_DIR OUT_DIR/reference.safetensors LOGITS.safetensors

Writes OUT_DIR/model (config.json, model.safetensors) and OUT_DIR/reference.safetensors:
`ids` (int64 prompt), `logits` (float32, positions x vocab) and `greedy` (int64, 20 new tokens,
argmax decoding), all computed in float32 on the CPU.
"""
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


def main() -> None:
    if sys.argv[1] == "reload":
        reload(*sys.argv[2:5])
        return
    family, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
    )
    if family == "llama":
        config, cls = tf.LlamaConfig(**common, tie_word_embeddings=False), tf.LlamaForCausalLM
    elif family == "qwen2":
        config = tf.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6,
                                use_sliding_window=False)
        cls = tf.Qwen2ForCausalLM
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
    model.save_pretrained(f"{out}/model", safe_serialization=True)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(1))
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
