#!/usr/bin/env python3
"""Reference for `sipt bench train`: the same Llama-architecture model and training step in
PyTorch (eager, or torch.compile with --compile), printing the same JSON line.

Model: token embedding (tied with the output head), per layer RMSNorm -> attention (q/k/v/o
projections without biases, rotate-half RoPE with theta 1e4, grouped-query attention through
scaled_dot_product_attention(is_causal=True, enable_gqa=True)) -> residual -> RMSNorm -> SwiGLU
MLP -> residual; final RMSNorm; logits = hidden @ embedding^T; mean next-token cross-entropy.
Step: forward, backward, global-norm clipping to 1.0, AdamW (betas 0.9/0.95, eps 1e-8,
weight decay 0.1 on matrices only, lr 1e-4), zero grads. Random tokens, f32, CPU by default.
"""
import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(dtype) * self.weight


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, d, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.q_proj = nn.Linear(d, heads * self.hd, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(heads * self.hd, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.heads * self.hd))


class Mlp(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d, heads, kv_heads, ffn, eps):
        super().__init__()
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = Attention(d, heads, kv_heads)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = Mlp(d, ffn)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, vocab, d, layers, heads, kv_heads, ffn, max_pos, eps=1e-5, theta=1e4):
        super().__init__()
        self.vocab = vocab
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, heads, kv_heads, ffn, eps) for _ in range(layers))
        self.norm = RMSNorm(d, eps)
        hd = d // heads
        inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        # Same initialisation as sipt: normal(0.02), residual outputs scaled by depth.
        std, out_std = 0.02, 0.02 / math.sqrt(2 * layers)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                nn.init.normal_(p, 0.0, s)

    def forward(self, ids):
        b, t = ids.shape
        pos = torch.arange(t, device=ids.device).unsqueeze(0).expand(b, t).reshape(-1)
        cos = self.cos.index_select(0, pos).view(b, 1, t, -1)
        sin = self.sin.index_select(0, pos).view(b, 1, t, -1)
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x) @ self.embed_tokens.weight.t()

    def ntp_loss(self, tokens):
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, self.vocab), tokens[:, 1:].reshape(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (sipt: libtorch's default)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model and its loss")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--phases", action="store_true", help="also time forward / backward / clip / optimizer separately")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    model = Llama(a.vocab, a.hidden, a.layers, a.heads, a.kv_heads, a.ffn, a.seq + 1).to(dev)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
    )
    loss_fn = model.ntp_loss
    if a.compile:
        loss_fn = torch.compile(model.ntp_loss)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times, phases = [], {"forward": [], "backward": [], "clip": [], "optimizer": []}
    compile_seconds = None
    t_start = time.perf_counter()
    for i in range(a.warmup + a.steps):
        ids = torch.randint(a.vocab, (a.batch, a.seq + 1), device=dev)
        sync()
        t0 = time.perf_counter()
        loss = loss_fn(ids)
        sync(); t1 = time.perf_counter()
        loss.backward()
        sync(); t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        sync(); t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(); t4 = time.perf_counter()
        if i == 0:
            compile_seconds = t4 - t_start
        if i >= a.warmup:
            times.append(t4 - t0)
            for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k].append(v)
    step = statistics.median(times)
    tokens = a.batch * a.seq
    flops_per_token = 6.0 * params + 6.0 * a.layers * a.seq * a.hidden
    out = {
        "implementation": "torch.compile" if a.compile else "torch-eager",
        "parameters": params,
        "step_seconds": step,
        "tokens_per_second": tokens / step,
        "model_flops_per_second": flops_per_token * tokens / step,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "first_step_seconds": compile_seconds,
    }
    if a.phases:
        out["phase_seconds"] = {k: statistics.median(v) for k, v in phases.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
