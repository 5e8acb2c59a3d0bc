"""Reference logits from Hugging Face transformers' LlamaForCausalLM, for sipt's model test.

    python hf_logits.py MODEL_DIR OUT.safetensors PROMPT [PROMPT ...]

Writes, for each prompt i, `ids.i` (int64 token ids, from the folder's tokenizer.json) and
`logits.i` (float32, positions x vocab) computed in float32 on the CPU.
"""
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaForCausalLM


def main() -> None:
    model_dir, out, prompts = sys.argv[1], sys.argv[2], sys.argv[3:]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    tensors = {}
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
            logits = model(ids).logits[0].float().contiguous()
            tensors[f"ids.{i}"] = ids[0].to(torch.int64).contiguous()
            tensors[f"logits.{i}"] = logits
    save_file(tensors, out)


if __name__ == "__main__":
    main()
