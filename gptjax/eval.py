"""Downstream evaluation with EleutherAI's lm-evaluation-harness, on gptjax's forward and KV cache.

    python -m gptjax.eval --init_from=gpt2 --tasks=hellaswag
    python -m gptjax.eval --out_dir=out-shakespeare-char --tasks=my_task --include_path=my_tasks/
    python -m gptjax.eval --init_from=path/ckpt.pt --tasks=arc_easy,piqa --num_fewshot=5 --output_path=results/

The options are lm_eval's own; the results and (with --log_samples) samples files written under
--output_path and the table printed are lm-eval's. init_from takes what training takes: a GPT-2
name or Hugging Face directory, a nanoGPT ckpt.pt, or a gptjax run (also as --out_dir).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Sequence

from gptjax import perf
from gptjax.config import DTYPES, auto_dtype

INSTALL = "pip install 'gptjax[eval]' (lm-eval)"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gptjax.eval", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--init_from", help="a GPT-2 name, a Hugging Face directory, a nanoGPT ckpt.pt or a gptjax run")
    source.add_argument("--out_dir", help="a gptjax run (or nanoGPT's out_dir with its ckpt.pt)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--num_fewshot", type=int, default=None, help="examples in each prompt (default: the task's)")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task; below 1, a fraction of them (for quick checks only)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_gen_toks", type=int, default=256, help="generate_until's default token limit")
    p.add_argument("--include_path", default=None, help="a directory of task YAML files of your own")
    p.add_argument("--output_path", default=None, help="where lm-eval writes its results (and samples) files")
    p.add_argument("--log_samples", action="store_true", help="also write every request and response")
    p.add_argument("--seed", type=int, default=1234, help="for tasks that sample")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype (auto: bfloat16 on an accelerator, float32 on CPU)")
    args = p.parse_args(argv)
    if args.log_samples and not args.output_path:
        p.error("--log_samples needs --output_path, where lm-eval writes the samples")
    if args.limit is not None:
        args.limit = int(args.limit) if args.limit >= 1 else args.limit
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("lm_eval") is None:
        print(f"error: gptjax.eval runs lm-evaluation-harness, which is not installed: {INSTALL}", file=sys.stderr)
        return 2
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import make_table

    from gptjax import harness

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        manager = harness.task_manager(tasks, args.include_path)
        lm = harness.GPTJaxLM.from_weights(args.init_from or args.out_dir,
                                           dtype=auto_dtype() if args.dtype == "auto" else args.dtype,
                                           batch_size=args.batch_size, max_gen_toks=args.max_gen_toks, seed=args.seed)
        tracker = EvaluationTracker(output_path=args.output_path)
        results = harness.evaluate(lm, tasks, manager, args.num_fewshot, args.limit, args.log_samples,
                                   evaluation_tracker=tracker, source=args.init_from or args.out_dir)
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    samples = results.pop("samples", None) if args.log_samples else None
    if args.output_path:
        tracker.save_results_aggregated(results=results, samples=samples)
        for task_name in results["configs"] if samples else ():
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    print(f"gptjax ({args.init_from or args.out_dir}), limit: {args.limit}, num_fewshot: {args.num_fewshot}, "
          f"batch_size: {args.batch_size}")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    return 0


if __name__ == "__main__":
    perf.enable_compilation_cache()
    sys.exit(main())
