"""gptjax: nanoGPT as a JAX/Flax library. Modules are imported on use (no JAX work at import):
model, convert, crosscheck, config, data, prepare, optim, step, sharding, checkpoint, train,
generate, sample, bench, plot."""

__version__ = "0.1.0"
