"""The modern recipe's pieces in PyTorch, as modded-nanogpt and nanochat write them: the reference
gptjax's options are checked against (tests only; needs torch).

`GPT(cfg)` is a gptjax GPTConfig's model: rotary embeddings (split halves, no wpe), RMSNorm
without parameters (F.rms_norm), QK-norm, ReLU², an untied lm_head, tanh logit soft-capping; the
GPT-2 pieces otherwise. `load_params` fills it from gptjax parameters, Dense kernels transposed
to nn.Linear's (out, in). `muon_update` is modded-nanogpt's Muon step on one matrix.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


def rotary(x_BxNxTxH, positions_T, theta: float):
    H = x_BxNxTxH.size(-1)
    inv_freq = 1.0 / (theta ** (torch.arange(0, H, 2, dtype=torch.float32) / H))
    angles_TxH2 = torch.outer(positions_T.float(), inv_freq)
    cos, sin = angles_TxH2.cos(), angles_TxH2.sin()
    x1, x2 = x_BxNxTxH[..., : H // 2], x_BxNxTxH[..., H // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Norm(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.norm == "layernorm":
            self.weight = nn.Parameter(torch.ones(cfg.n_embd))
            self.bias = nn.Parameter(torch.zeros(cfg.n_embd)) if cfg.bias else None

    def forward(self, x):
        if self.cfg.norm == "rmsnorm":
            return F.rms_norm(x, (x.size(-1),), eps=self.cfg.layer_norm_eps)
        return F.layer_norm(x, (x.size(-1),), self.weight, self.bias, self.cfg.layer_norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x_BxTxC, positions_T):
        cfg = self.cfg
        B, T, C = x_BxTxC.size()
        q, k, v = (a.view(B, T, cfg.n_head, C // cfg.n_head).transpose(1, 2)
                   for a in self.c_attn(x_BxTxC).split(C, dim=2))
        if cfg.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),), eps=cfg.layer_norm_eps), F.rms_norm(k, (k.size(-1),), eps=cfg.layer_norm_eps)
        if cfg.pos_embedding == "rotary":
            q, k = rotary(q, positions_T, cfg.rope_theta), rotary(k, positions_T, cfg.rope_theta)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        h = self.c_fc(x)
        if self.cfg.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh" if self.cfg.activation == "gelu_tanh" else "none")
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = Norm(cfg), Attention(cfg), Norm(cfg), MLP(cfg)

    def forward(self, x, positions_T):
        x = x + self.attn(self.ln_1(x), positions_T)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_embedding == "learned" else None
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = Norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx_BxT):
        """Float32 logits (B, T, V) for every position."""
        positions_T = torch.arange(idx_BxT.size(1))
        x = self.wte(idx_BxT)
        if self.wpe is not None:
            x = x + self.wpe(positions_T)
        for block in self.h:
            x = block(x, positions_T)
        x = self.ln_f(x)
        logits = x @ (self.wte.weight.T if self.lm_head is None else self.lm_head.weight.T)
        if self.cfg.logit_softcap:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return logits


def load_params(model: GPT, params) -> GPT:
    """Copy gptjax parameters (GPT-2's per-layer layout) into `model`."""

    def put(module_param, value, dense=False):
        value = np.array(value, np.float32)
        module_param.data.copy_(torch.from_numpy(np.ascontiguousarray(value.T) if dense else value))

    put(model.wte.weight, params["wte"]["embedding"])
    if model.wpe is not None:
        put(model.wpe.weight, params["wpe"]["embedding"])
    if model.lm_head is not None:
        put(model.lm_head.weight, params["lm_head"], dense=True)
    norms = [(model.ln_f, params.get("ln_f", {}))]
    for i, block in enumerate(model.h):
        p = params[f"h_{i}"]
        norms += [(block.ln_1, p.get("ln_1", {})), (block.ln_2, p.get("ln_2", {}))]
        for linear, q in ((block.attn.c_attn, p["attn"]["c_attn"]), (block.attn.c_proj, p["attn"]["c_proj"]),
                          (block.mlp.c_fc, p["mlp"]["c_fc"]), (block.mlp.c_proj, p["mlp"]["c_proj"])):
            put(linear.weight, q["kernel"], dense=True)
            if linear.bias is not None:
                put(linear.bias, q["bias"])
    for norm, q in norms:
        if model.cfg.norm == "layernorm":
            put(norm.weight, q["scale"])
            if norm.bias is not None:
                put(norm.bias, q["bias"])
    return model


def zeropower_via_newtonschulz5(G, steps: int = 5, eps: float = 1e-7):
    """modded-nanogpt's quintic Newton-Schulz (same coefficients), here in float32 rather than bf16."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.float()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


def muon_update(grad_OxI, momentum_OxI, step: int, beta: float = 0.95, bias_correction: bool = True):
    """One Muon update of an nn.Linear weight (out, in) as modded-nanogpt's `muon_update`:
    momentum.lerp_(grad, 1 - beta); Nesterov grad.lerp_(momentum, beta); Newton-Schulz; scale
    sqrt(max(1, out/in)). With bias_correction, the two Nesterov terms are divided by
    1 - beta^(step+1) and 1 - beta^step (optax's scale_by_muon, step counted from 1); without,
    exactly modded-nanogpt's. Updates momentum in place; returns the update (before -lr)."""
    momentum_OxI.lerp_(grad_OxI, 1 - beta)
    if bias_correction:
        nesterov = beta * momentum_OxI / (1 - beta ** (step + 1)) + (1 - beta) * grad_OxI / (1 - beta ** step)
    else:
        nesterov = grad_OxI.lerp(momentum_OxI, beta)
    update = zeropower_via_newtonschulz5(nesterov)
    return update * max(1, grad_OxI.size(-2) / grad_OxI.size(-1)) ** 0.5
