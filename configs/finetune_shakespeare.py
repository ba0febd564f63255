"""Finetune GPT-2 XL on tiny-shakespeare BPE (nanoGPT's config/finetune_shakespeare.py).

Prepare the data first: python -m gptjax.prepare shakespeare. init_from may also be a local HF
directory or nanoGPT ckpt.pt when offline (--init_from=/path/to/gpt2-xl).
"""

from gptjax.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        out_dir="out-shakespeare",
        eval_interval=5,
        eval_iters=40,
        wandb_project="shakespeare",
        wandb_run_name="ft",
        dataset="shakespeare",
        init_from="gpt2-xl",
        always_save_checkpoint=False,  # only save checkpoints if the validation loss improves
        # 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter;
        # shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters
        batch_size=1,
        gradient_accumulation_steps=32,
        max_iters=20,
        learning_rate=3e-5,  # finetune at constant LR
        decay_lr=False,
        dtype="bfloat16",
    )
