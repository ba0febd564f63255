"""Training recipes: each module's get_config() returns a TrainConfig (see gptjax.config)."""
