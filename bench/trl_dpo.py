#!/usr/bin/env python3
"""Reference for one SIP step (`sipt bench sip-step`): TRL's OnlineDPOTrainer on the same model
folder. Each step: P prompts, 2 sampled completions of exactly N tokens per prompt (HF generate,
KV cache on, temperature 1.0, top-p 1.0, no top-k), a trivial reward (completion length in
characters: no model, no I/O), policy and reference log-probs, the sigmoid DPO loss, backward,
clipping to 1.0 and an AdamW step; f32 on CPU, gradient checkpointing off. Time per optimizer
step (callback from on_step_begin to on_step_end), median over the steps after warm-up.
Prints one JSON line.
"""
import argparse
import atexit
import json
import os
import random
import shutil
import statistics
import tempfile
import time
import warnings

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.utils import logging as hf_logging
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer


def length_reward(completions, **kwargs):
    """Trivial reward: longer completions (in characters) win."""
    return [float(len(c)) for c in completions]


class StepTimer(TrainerCallback):
    """Time per optimizer step, and per phase of it: sampling (`_generate`), the policy's
    log-probs (the first `_forward`), the reference's (the second), the backward pass, the
    optimizer (gradient clipping, then `optimizer.step`); `other` is what the step spent
    elsewhere (rewards, decoding, logging, zeroing)."""

    PHASES = ("sample", "policy", "reference", "backward", "optimizer")

    def __init__(self):
        self.times, self.t0 = [], None
        self.phases = []
        self.current = None
        self.forwards = 0

    def add(self, phase, seconds):
        if self.current is not None:
            self.current[phase] += seconds

    def wrap(self, obj, name, phase_of):
        """Replace `obj.name` by a timed call; `phase_of()` names the phase at call time."""
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.add(phase_of(), time.perf_counter() - t0)

        setattr(obj, name, timed)

    def forward_phase(self):
        self.forwards += 1
        return "policy" if self.forwards % 2 == 1 else "reference"

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = dict.fromkeys(self.PHASES, 0.0)
        self.forwards = 0
        self.t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.t_opt = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.add("optimizer", time.perf_counter() - self.t_opt)

    def on_step_end(self, args, state, control, **kwargs):
        total = time.perf_counter() - self.t0
        self.times.append(total)
        self.current["other"] = total - sum(self.current.values())
        self.phases.append(self.current)
        self.current = None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF-layout folder (config.json, model.safetensors, tokenizer)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (2 completions each)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; off here by default")
    a = ap.parse_args()

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(a.threads)

    tok = AutoTokenizer.from_pretrained(a.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)

    # Prompts of random tokens, exactly prompt_tokens long once re-tokenized where possible.
    rng = random.Random(1)
    total = a.prompts * (a.warmup + a.steps)
    prompts, lengths = [], []
    for _ in range(total):
        ids = [100 + rng.randrange(tok.vocab_size - 200) for _ in range(a.prompt_tokens)]
        text = tok.decode(ids)
        text = tok.decode(tok(text, add_special_tokens=False)["input_ids"][: a.prompt_tokens])
        prompts.append(text)
        lengths.append(len(tok(text, add_special_tokens=False)["input_ids"]))

    out_dir = tempfile.mkdtemp(prefix="trl-dpo-bench-")
    atexit.register(shutil.rmtree, out_dir, True)
    args = OnlineDPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=a.prompts,
        gradient_accumulation_steps=1,
        max_steps=a.warmup + a.steps,
        max_new_tokens=a.new_tokens,
        max_length=a.prompt_tokens + a.new_tokens + 64,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generation_kwargs={"min_new_tokens": a.new_tokens},
        gradient_checkpointing=a.gradient_checkpointing,
        bf16=False,
        fp16=False,
        use_cpu=True,
        max_grad_norm=1.0,
        report_to=[],
        logging_steps=10_000,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    timer = StepTimer()
    trainer = OnlineDPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
        callbacks=[timer],
    )
    timer.wrap(trainer, "_generate", lambda: "sample")
    timer.wrap(trainer, "_forward", timer.forward_phase)
    timer.wrap(trainer.accelerator, "backward", lambda: "backward")
    timer.wrap(trainer, "_clip_grad_norm", lambda: "optimizer")
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    timed = timer.times[a.warmup:]
    import trl
    import transformers

    print(json.dumps({
        "implementation": "trl-online-dpo",
        "step_seconds": statistics.median(timed),
        "step_seconds_all": timed,
        "warmup_step_seconds": timer.times[: a.warmup],
        "phase_seconds": {k: statistics.median(p[k] for p in timer.phases[a.warmup:])
                          for k in timer.PHASES + ("other",)},
        "train_wall_seconds": wall,
        "prompts": a.prompts,
        "completions_per_prompt": 2,
        "new_tokens": a.new_tokens,
        "prompt_tokens_mean": statistics.mean(lengths),
        "gradient_checkpointing": a.gradient_checkpointing,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }))


if __name__ == "__main__":
    main()
