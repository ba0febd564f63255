"""A baby GPT on tiny-shakespeare characters (nanoGPT's config/train_shakespeare_char.py)."""

from gptjax.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        out_dir="out-shakespeare-char",
        eval_interval=250,  # keep frequent because we'll overfit
        eval_iters=200,
        log_interval=10,  # don't print too often
        always_save_checkpoint=False,  # only save when val improves
        wandb_project="shakespeare-char",
        wandb_run_name="mini-gpt",
        dataset="shakespeare_char",
        gradient_accumulation_steps=1,
        batch_size=64,
        block_size=256,  # context of up to 256 previous characters
        n_layer=6,
        n_head=6,
        n_embd=384,
        dropout=0.2,
        learning_rate=1e-3,  # with baby networks can afford to go a bit higher
        max_iters=5000,
        lr_decay_iters=5000,  # make equal to max_iters usually
        min_lr=1e-4,  # learning_rate / 10 usually
        beta2=0.99,  # make a bit bigger because number of tokens per iter is small
        warmup_iters=100,
    )
