"""The modern recipe on nanoGPT's CPU task (tiny-shakespeare characters, same data and validation
split as shakespeare_char_cpu): rotary positions, RMSNorm, QK-norm, ReLU², an untied head,
zero-initialised projections, tanh soft-capped logits and Muon for the block matrices, sized and
scheduled to reach nanoGPT's CPU-recipe validation loss (1.88) in a fraction of its wall clock
(docs/benchmarks.md).

    python -m gptjax.train shakespeare_char_cpu_modern
"""

import dataclasses
from pathlib import Path

from gptjax.config import TrainConfig, load_config_file


def get_config() -> TrainConfig:
    return dataclasses.replace(
        load_config_file(str(Path(__file__).with_name("shakespeare_char_cpu.py"))),
        out_dir="out-shakespeare-char-cpu-modern",
        # model
        pos_embedding="rotary",
        norm="rmsnorm",
        qk_norm=True,
        activation="relu2",
        tie_embeddings=False,
        zero_init_proj=True,
        logit_softcap=15.0,
        scan_layers=True,  # the block matrices stacked: Muon orthogonalises each kind in one batch
        # optimizer: Muon for the block matrices, AdamW for the rest
        optimizer="muon",
        muon_lr=0.035,
        learning_rate=8e-3,
        embedding_lr=0.05,
        head_lr=8e-3,
        beta1=0.8,
        weight_decay=0.0,
        grad_clip=0.0,
        # schedule
        max_iters=350,
        lr_decay_iters=350,
        warmup_iters=20,
        min_lr=8e-4,
        eval_interval=350,
        eval_iters=20,
    )
