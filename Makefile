# Two commands on a fresh machine:  `make train`  (the main job)  and  `make test`.
# Both create .venv and install gptjax into it on first use.
PYTHON ?= python3
VENV ?= .venv
# CPU build of PyTorch for the interop tests; set TORCH=torch to take your platform's default.
TORCH ?= torch==2.13.0
SHARED ?= ../shared
BIN := $(VENV)/bin

# Offline machines: use the local tiktoken cache and tiny-shakespeare copy when they exist.
ifneq ($(wildcard $(SHARED)/tiktoken_cache),)
export TIKTOKEN_CACHE_DIR ?= $(abspath $(SHARED)/tiktoken_cache)
endif
CORPUS := $(wildcard $(SHARED)/data/tinyshakespeare/input.txt)
TRAIN_ARGS ?= $(if $(CORPUS),--data_input=$(abspath $(CORPUS)))

.PHONY: install train test test-slow bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]" "$(TORCH)"
	touch $@

install: $(VENV)/.installed

# Train the char-level baby GPT on tiny-shakespeare (nanoGPT's CPU recipe), then sample from it.
train: $(VENV)/.installed
	$(BIN)/python -m gptjax.train shakespeare_char_cpu $(TRAIN_ARGS)
	$(BIN)/python -m gptjax.sample --out_dir=out-shakespeare-char-cpu --num_samples=2 --max_new_tokens=300

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# Long checks (full recipes, benchmarks); run deliberately.
test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow

# Removes only the virtualenv: checkpoints (out-*) and prepared data (data/) are never touched.
clean:
	rm -rf $(VENV)
