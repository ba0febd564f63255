"""nanoGPT's PyTorch model for tests and benchmarks (the implementation is gptjax.torch_ref).

Importable as `tests.nanogpt_ref` from the repository root or as `nanogpt_ref` with tests/ on
sys.path; needs torch.
"""

from gptjax.torch_ref import GPT, MLP, Block, CausalSelfAttention, GPTConfig, LayerNorm, nanogpt_lr

__all__ = ["GPT", "GPTConfig", "LayerNorm", "CausalSelfAttention", "MLP", "Block", "nanogpt_lr"]
