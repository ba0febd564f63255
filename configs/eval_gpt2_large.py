"""Evaluate the released gpt2-large on OpenWebText (nanoGPT's config/eval_gpt2_large.py)."""

import dataclasses
from pathlib import Path

from gptjax.config import TrainConfig, load_config_file


def get_config() -> TrainConfig:
    base = load_config_file(str(Path(__file__).with_name("eval_gpt2.py")))
    return dataclasses.replace(base, init_from="gpt2-large")
