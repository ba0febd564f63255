"""Evaluate the released gpt2-xl on OpenWebText (nanoGPT's config/eval_gpt2_xl.py)."""

from gptjax.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        batch_size=8,
        eval_iters=500,  # use more iterations to get a good estimate
        eval_only=True,
        wandb_log=False,
        init_from="gpt2-xl",
        gradient_accumulation_steps=1,
    )
