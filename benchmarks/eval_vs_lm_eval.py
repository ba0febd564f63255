"""gptjax as an lm-evaluation-harness model against lm-eval's own `hf` backend: the same weights,
the same tasks, seconds per task side by side.

    python benchmarks/eval_vs_lm_eval.py [--rounds 3] [--n_layer 12 --n_embd 768] [--batch_size 16] \
        [--out docs/bench/eval_vs_lm_eval.md]

A transformers GPT-2 of the given size with random weights (GPT-2 124M's shape by default; speed
does not depend on the weights, and none are downloaded) and GPT-2's tokenizer, from the local
tiktoken files, is evaluated by both backends on three local tasks written from tiny-shakespeare,
one of each kind lm-eval has: multiple choice (a passage and four candidate next lines),
perplexity of documents longer than the context (rolling windows), and greedy generation of up to
32 tokens until a newline. Each round runs every task through both backends in alternating order,
each timed around lm-eval's `simple_evaluate`; gptjax's first round includes its compilation. The
task's metrics must agree between the backends (to 1e-4). Prints a markdown table and writes it
to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from peers import ROOT, host, publish

CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TASKS = {  # name: (output type, lm-eval's task body, the metric compared)
    "shakespeare_mc": ("multiple_choice", 'doc_to_text: "{{ctx}}"\ndoc_to_target: "{{label}}"\n'
                       'doc_to_choice: "{{endings}}"\nmetric_list:\n  - metric: acc\n', "acc,none"),
    "shakespeare_rolling": ("loglikelihood_rolling", 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                            "metric_list:\n  - metric: word_perplexity\n", "word_perplexity,none"),
    "shakespeare_gen": ("generate_until", 'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
                        'generation_kwargs:\n  until: ["\\n"]\n  do_sample: false\n  max_gen_toks: 32\n'
                        "metric_list:\n  - metric: exact_match\n", "exact_match,none"),
}


def write_tasks(root: Path, corpus: Path, n_mc: int, n_docs: int, n_gen: int) -> None:
    """The three tasks' YAML files and their jsonl data in `root`, drawn from `corpus`."""
    text = corpus.read_text()
    lines = [line for line in text.split("\n") if len(line.split()) >= 4]
    rnd = random.Random(0)
    mc, docs, gen = [], [], []
    for _ in range(n_mc):
        i = rnd.randrange(len(lines) - 4)
        endings = [" " + lines[rnd.randrange(len(lines))] for _ in range(3)] + [" " + lines[i + 3]]
        mc.append({"ctx": " ".join(lines[i:i + 3]), "endings": endings, "label": 3})
    for _ in range(n_docs):
        i = rnd.randrange(len(text) - 8000)
        docs.append({"text": text[i:i + 8000]})
    for _ in range(n_gen):
        i = rnd.randrange(len(lines) - 4)
        gen.append({"prompt": "\n".join(lines[i:i + 3]) + "\n", "answer": lines[i + 3]})
    for (name, (output_type, body, _)), rows in zip(TASKS.items(), (mc, docs, gen)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: {output_type}\n{body}")


def random_gpt2(path: Path, n_layer: int, n_embd: int) -> None:
    """A transformers GPT-2 with random weights and GPT-2's tokenizer files, saved in `path`."""
    import torch
    import transformers

    from gptjax.export import _gpt2_tokenizer
    from gptjax.model import GPTConfig

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 64, n_positions=1024)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    for name, content in _gpt2_tokenizer(GPTConfig(block_size=1024)).items():
        (path / name).write_bytes(content)


def table(rows: list[dict], rounds: int, command: str) -> str:
    versions = host(("jax", "jaxlib", "flax", "torch", "transformers", "lm_eval"))
    lines = [f"Host: {versions}; {time.strftime('%Y-%m-%d')}; command: {command}", "",
             "| task | requests | hf: round 1 s | hf: later rounds s | gptjax: round 1 s (compiling) | "
             "gptjax: later rounds s | hf / gptjax, later rounds | metric (hf / gptjax) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hf, ours = r["seconds"]["hf"], r["seconds"]["gptjax"]
        later = (lambda s: float(np.median(s[1:]))) if rounds > 1 else (lambda s: s[0])
        lines.append(f"| {r['task']} | {r['requests']} | {hf[0]:.2f} | {later(hf):.2f} | {ours[0]:.2f} | "
                     f"{later(ours):.2f} | **{later(hf) / later(ours):.2f}x** | {r['metric']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--batch_size", type=int, default=16, help="rows per forward, for both backends")
    parser.add_argument("--examples", type=int, nargs=3, default=(40, 4, 16), metavar=("MC", "DOCS", "GEN"),
                        help="multiple-choice examples, documents, generation prompts")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="the text the tasks are drawn from")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "eval_vs_lm_eval.md")
    args = parser.parse_args()
    if not args.corpus.is_file():
        raise FileNotFoundError(f"no corpus at {args.corpus}: pass --corpus=PATH (any text file, e.g. "
                                "tiny-shakespeare's input.txt)")
    shared_tiktoken = ROOT.parent / "shared" / "tiktoken_cache"
    if "TIKTOKEN_CACHE_DIR" not in os.environ and shared_tiktoken.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(shared_tiktoken)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        os.environ.update(HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(work / "datasets"))
        import lm_eval
        import torch
        from lm_eval.models.huggingface import HFLM

        from gptjax import harness
        from gptjax.sampling_bench import alternating_runs

        torch.set_num_threads(os.cpu_count() or 1)
        write_tasks(work, args.corpus, *args.examples)
        random_gpt2(work / "gpt2", args.n_layer, args.n_embd)
        weights = str(work / "gpt2")
        backends = {"hf": HFLM(pretrained=weights, device="cpu", dtype="float32", batch_size=args.batch_size),
                    "gptjax": harness.GPTJaxLM.from_weights(weights, batch_size=args.batch_size)}
        manager = harness.task_manager(list(TASKS), str(work))
        rows = []
        for task, (_, _, metric) in TASKS.items():
            results = {}

            def evaluate(name, task=task):
                results[name] = lm_eval.simple_evaluate(model=backends[name], tasks=[task], task_manager=manager,
                                                        bootstrap_iters=0, log_samples=True, verbosity="ERROR")

            seconds = alternating_runs({name: functools.partial(evaluate, name) for name in backends}, args.rounds,
                                       lambda name, k: print(f"round {k + 1}: {task}, {name}", file=sys.stderr))
            values = {name: float(result["results"][task][metric]) for name, result in results.items()}
            requests = sum(len(sample["resps"]) for sample in results["gptjax"]["samples"][task])
            if not np.isclose(values["gptjax"], values["hf"], rtol=1e-4):
                raise AssertionError(f"{task}: {metric} differs, hf {values['hf']} vs gptjax {values['gptjax']}")
            rows.append(dict(task=task, requests=requests, seconds=seconds,
                             metric=f"{metric.split(',')[0]} {values['hf']:.6g} / {values['gptjax']:.6g}"))
    command = (f"python benchmarks/eval_vs_lm_eval.py --rounds {args.rounds} --n_layer {args.n_layer} "
               f"--n_embd {args.n_embd} --batch_size {args.batch_size}")
    publish(table(rows, args.rounds, command), args.out)


if __name__ == "__main__":
    main()
