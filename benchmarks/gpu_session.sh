#!/usr/bin/env bash
# The GPU measurements of issue #6, for a session that is lent a GPU machine (the `device` tool),
# each part sized to fit one call (10 minutes at most):
#
#   bash benchmarks/gpu_session.sh gpt2    # GPT-2 124M, bf16, block 1024: train step vs nanoGPT
#                                          # eager and torch.compile, then sampling 500 tokens
#   bash benchmarks/gpu_session.sh small   # shakespeare_char in bf16 and float16 (loss scaling),
#                                          # and gptjax vs PyTorch logits on a random GPT-2 (float32)
#
# It uses the machine's own python3 (jax, flax, optax, orbax, torch with CUDA are installed there;
# nothing can be installed) with this checkout on PYTHONPATH, and writes each table and its JSON
# rows under $OUT (./gpu_out elsewhere). Record the tables in docs/benchmarks.md with the device
# name that env.txt shows.
set -uo pipefail
part=${1:?usage: bash benchmarks/gpu_session.sh gpt2|small}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c 'import jax, flax, optax, orbax.checkpoint as ocp, torch
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__)
print(jax.devices(), "torch cuda:", torch.cuda.is_available())'
} 2>&1 | tee "$OUT/env.txt"
# Stop at once (device time is scarce) if JAX runs on the CPU here: every row would be a CPU row.
"$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' || {
  echo "JAX sees no GPU on this machine (see env.txt): nothing to measure" >&2
  exit 3
}

bench() {  # name, then the bench arguments
  local name=$1
  shift
  "$PY" -m gptjax.bench "$@" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt"
}

case $part in
  gpt2)
    # 40 micro-batches of 12 x 1024 per step (nanoGPT's train_gpt2.py on one GPU): ~0.5M tokens
    bench gpt2_124m_bf16 gpt2_124m --dtype=bfloat16 --compare=torch --steps=3 --rounds=3 --sample=500
    ;;
  small)
    bench shakespeare_char_bf16 shakespeare_char --vocab_size=65 --dtype=bfloat16 --compare=torch --steps=20 --rounds=3
    bench shakespeare_char_fp16 shakespeare_char --vocab_size=65 --dtype=float16 --compare=torch --steps=20 --rounds=3
    ckpt=$(mktemp -d)
    "$PY" - "$ckpt" <<'EOF'
import sys
import torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768)).save_pretrained(sys.argv[1])
EOF
    "$PY" -m gptjax.crosscheck "$ckpt" --tol 1e-4 --seq 256 2>&1 | tee "$OUT/crosscheck.txt"
    ;;
  *)
    echo "unknown part '$part': give gpt2 or small" >&2
    exit 2
    ;;
esac
