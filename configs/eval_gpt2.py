"""Evaluate the released gpt2 (124M) on OpenWebText (nanoGPT's config/eval_gpt2.py)."""

from gptjax.config import TrainConfig


def eval_config(init_from: str) -> TrainConfig:
    """nanoGPT's eval_gpt2* settings for one released model."""
    return TrainConfig(
        batch_size=8,
        eval_iters=500,  # use more iterations to get a good estimate
        eval_only=True,
        wandb_log=False,
        init_from=init_from,
        gradient_accumulation_steps=1,
    )


def get_config() -> TrainConfig:
    return eval_config("gpt2")
