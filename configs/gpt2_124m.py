"""GPT-2 (124M) on OpenWebText (nanoGPT's config/train_gpt2.py).

~0.5M tokens per step: 12 batch * 1024 block * 40 accumulation = 491,520. nanoGPT spreads the 40
micro-batches over 8 GPUs (5 each); here batch_size is global, so on 8 devices use
--batch_size=96 --gradient_accumulation_steps=5 for the same tokens per step.
"""

from gptjax.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        out_dir="out-gpt2-124m",
        wandb_project="owt",
        wandb_run_name="gpt2-124M",
        dataset="openwebtext",
        batch_size=12,
        block_size=1024,
        gradient_accumulation_steps=40,
        n_layer=12,
        n_head=12,
        n_embd=768,
        dropout=0.0,
        bias=False,
        max_iters=600000,
        lr_decay_iters=600000,
        learning_rate=6e-4,
        min_lr=6e-5,
        warmup_iters=2000,
        weight_decay=1e-1,
        beta2=0.95,
        grad_clip=1.0,
        eval_interval=1000,
        eval_iters=200,
        log_interval=10,
        dtype="bfloat16",
    )
