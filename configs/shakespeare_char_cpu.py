"""nanoGPT's CPU recipe for tiny-shakespeare characters: minutes on a laptop CPU.

nanoGPT README: --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64
--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
--dropout=0.0 on top of config/train_shakespeare_char.py.
"""

import dataclasses
from pathlib import Path

from gptjax.config import TrainConfig, load_config_file


def get_config() -> TrainConfig:
    return dataclasses.replace(
        load_config_file(str(Path(__file__).with_name("shakespeare_char.py"))),
        out_dir="out-shakespeare-char-cpu",
        eval_iters=20,
        log_interval=1,
        block_size=64,
        batch_size=12,
        n_layer=4,
        n_head=4,
        n_embd=128,
        max_iters=2000,
        lr_decay_iters=2000,
        dropout=0.0,
    )
