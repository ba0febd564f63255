"""nanoGPT's model.py in PyTorch, compact: the reference gptjax is checked against.

Same architecture, initialisation and state_dict key names as nanoGPT (`transformer.wte.weight`,
`transformer.h.0.attn.c_attn.weight`, `lm_head.weight`, ...), so a nanoGPT `ckpt.pt` loads with
`load_state_dict(strict=True)` once torch.compile's `_orig_mod.` prefix is stripped. One
deliberate difference: `forward` returns logits for every position even without targets
(nanoGPT keeps only the last one then), which is what a numerical comparison needs.

Needs torch; only crosscheck, benchmarks and tests import this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

try:
    import torch
    import torch.nn as nn
    from torch.nn import functional as F
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "gptjax.torch_ref needs PyTorch: pip install 'gptjax[interop]' (or pip install torch)"
    ) from e


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nn.LayerNorm takes bias=False only from PyTorch 2.1 on)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # torch >= 2 always has flash attention, so nanoGPT registers no `attn.bias` mask buffer.

    def forward(self, x_BxTxC):
        B, T, C = x_BxTxC.size()
        q, k, v = self.c_attn(x_BxTxC).split(self.n_embd, dim=2)
        q_BxNxTxH = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k_BxNxTxH = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v_BxNxTxH = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y_BxNxTxH = F.scaled_dot_product_attention(
            q_BxNxTxH, k_BxNxTxH, v_BxNxTxH, attn_mask=None,
            dropout_p=self.dropout if self.training else 0, is_causal=True,
        )
        y_BxTxC = y_BxNxTxH.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y_BxTxC))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()  # exact erf GELU, as nanoGPT
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: both names stay in state_dict, sharing one tensor.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 paper: scaled init of the residual projections.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas, device_type: str = "cpu"):
        """nanoGPT's AdamW: weight decay on every parameter of 2+ dimensions, none on the rest;
        the fused CUDA kernel on the GPU."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        extra = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embedding is left out by default (wte is the head too)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _final_hidden(self, idx_BxT):
        B, T = idx_BxT.size()
        assert T <= self.config.block_size, f"sequence of length {T} > block_size {self.config.block_size}"
        pos_T = torch.arange(0, T, dtype=torch.long, device=idx_BxT.device)
        x_BxTxC = self.transformer.drop(self.transformer.wte(idx_BxT) + self.transformer.wpe(pos_T))
        for block in self.transformer.h:
            x_BxTxC = block(x_BxTxC)
        return self.transformer.ln_f(x_BxTxC)

    def forward(self, idx_BxT, targets=None):
        """Returns (logits (B, T, V) for every position, mean cross-entropy or None)."""
        logits_BxTxV = self.lm_head(self._final_hidden(idx_BxT))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits_BxTxV.view(-1, logits_BxTxV.size(-1)), targets.view(-1), ignore_index=-1
            )
        return logits_BxTxV, loss

    def crop_block_size(self, block_size: int):
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @torch.no_grad()
    def generate(self, idx_BxT, max_new_tokens: int, temperature: float = 1.0, top_k=None):
        """nanoGPT's sampler (no KV cache: the whole context is re-run for every new token)."""
        for _ in range(max_new_tokens):
            idx_cond = idx_BxT[:, -self.config.block_size:]  # crop the context to block_size
            # Like nanoGPT, only the last position goes through the head.
            logits_BxV = self.lm_head(self._final_hidden(idx_cond)[:, -1, :]) / temperature
            if top_k is not None:
                v, _ = torch.topk(logits_BxV, min(top_k, logits_BxV.size(-1)))
                logits_BxV[logits_BxV < v[:, [-1]]] = -float("Inf")
            idx_next = torch.multinomial(F.softmax(logits_BxV, dim=-1), num_samples=1)
            idx_BxT = torch.cat((idx_BxT, idx_next), dim=1)
        return idx_BxT


def nanogpt_lr(it: int, cfg) -> float:
    """nanoGPT's get_lr for a TrainConfig, in plain Python: the reference gptjax's jitted schedule
    (gptjax.optim.lr_schedule) is tested against."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    decay_ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)
