"""gptjax's training loop against nanoGPT's in PyTorch, step for step: from the same initial
weights and on the same batches, every logged loss and the final parameters agree in float32.
This covers the whole update at once (model, loss, gradients, accumulation, clipping, AdamW's
weight-decay groups, the learning-rate schedule), with and without biases."""

import jax
import numpy as np
import pytest

import test_train
from gptjax.convert import nanogpt_state_dict
from gptjax.torch_ref import nanogpt_lr
from gptjax.train import setup
from test_train import tiny

data_dir = test_train.data_dir
compilation_cache = test_train.compilation_cache

STEPS = 30


def nanogpt_losses(cfg, params, batches):
    """nanoGPT train.py's loop (float32, CPU) from `params`, fed `batches`: the loss of each step."""
    torch = pytest.importorskip("torch")
    from gptjax import torch_ref

    model = torch_ref.GPT(torch_ref.GPTConfig(
        block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))
    model.load_state_dict(nanogpt_state_dict(params, cfg.model_config()))
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu")
    losses = []
    for it, (x_AxBxT, y_AxBxT) in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(it, cfg)
        total = 0.0
        for x_BxT, y_BxT in zip(x_AxBxT, y_AxBxT):
            _, loss = model(torch.as_tensor(x_BxT, dtype=torch.long), torch.as_tensor(y_BxT, dtype=torch.long))
            (loss / len(x_AxBxT)).backward()
            total += loss.item() / len(x_AxBxT)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, {name: p.detach().numpy() for name, p in model.named_parameters()}


@pytest.mark.parametrize("bias", [False, True])
def test_training_steps_match_nanogpt_loop(data_dir, tmp_path, bias):
    # exact GELU as nanoGPT's; warmup then cosine decay, weight decay and clipping all active
    cfg = tiny(data_dir, tmp_path, bias=bias, activation="gelu", max_iters=STEPS, warmup_iters=5,
               lr_decay_iters=STEPS, learning_rate=3e-3, min_lr=3e-4, weight_decay=0.1, grad_clip=0.5)
    run = setup(cfg)
    start = jax.device_get(run.state.params)
    batches = [run.batch("train", it) for it in range(STEPS)]
    ours, clipped = [], 0
    with jax.default_matmul_precision("highest"):
        for batch in batches:
            run.state, metrics = run.train_step(run.state, run.to_device(batch))
            ours.append(float(metrics["loss"]))
            clipped += float(metrics["grad_norm"]) > cfg.grad_clip
    run.close()
    theirs, torch_params = nanogpt_losses(cfg, start, batches)

    assert clipped > 0  # clipping took part
    assert ours[-1] < ours[0] - 0.5  # it learned: the comparison is not of a stalled run
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    final = nanogpt_state_dict(jax.device_get(run.state.params), cfg.model_config())
    for name, p in torch_params.items():
        moved = np.abs(p - final[name].numpy()).max()
        assert moved <= 1e-3 * max(np.abs(p).max(), 1e-2), name
