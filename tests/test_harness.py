"""gptjax as an lm-evaluation-harness model, against lm-eval's own `hf` backend on the same weights.

Offline: the tasks are YAML files written here over small jsonl files (lm-eval's hub tasks would
download), in the three shapes lm-eval has: multiple choice like HellaSwag, rolling loglikelihood
over documents longer than the model's context, and greedy generation until a stop string.
"""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402

from gptjax import harness  # noqa: E402
from gptjax import eval as eval_cli  # noqa: E402
from gptjax.model import GPT  # noqa: E402

from test_train import tiny  # noqa: E402

BATCH = 3
CONTEXT = 64  # the HF model's n_positions: rolling documents are longer, so they take several windows
WORDS = "the a cat dog sat ran on under mat tree house quickly slowly big small red".split()


@pytest.fixture(autouse=True)
def _datasets_offline(tmp_path_factory, monkeypatch):
    """lm-eval reads the jsonl files through `datasets`, whose cache must not be the user's."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "datasets_cache"))


def _task_yaml(name: str, output_type: str, data: Path, body: str, train: Path | None = None) -> str:
    files = f"    test: {data}\n" + (f"    train: {train}\n" if train else "")
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{files}test_split: test\n"
            + ("training_split: train\n" if train else "") + f"output_type: {output_type}\n{body}")


MC = 'doc_to_text: "{{ctx}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "{{endings}}"\n' \
     "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
ROLLING = 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n' \
          "  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
GEN = ('doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n", "."]\n'
       "  do_sample: false\n  max_gen_toks: 12\nmetric_list:\n  - metric: exact_match\n")


def write_tasks(root: Path, sentence, prefix: str) -> Path:
    """Three tasks named PREFIX_mc, PREFIX_rolling and PREFIX_gen in `root`; `sentence(n)` makes text."""
    root.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(0)

    def jsonl(name, rows):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return root / name

    mc = [{"ctx": sentence(rnd.randint(3, 9)), "endings": [" " + sentence(rnd.randint(1, 5)) for _ in range(4)],
           "label": rnd.randint(0, 3)} for _ in range(10)]
    docs = [{"text": sentence(rnd.randint(70, 150))} for _ in range(3)]
    qa = [{"question": sentence(rnd.randint(2, 8)) + ":", "answer": " " + sentence(2)} for _ in range(5)]
    (root / "mc.yaml").write_text(_task_yaml(f"{prefix}_mc", "multiple_choice", jsonl("mc.jsonl", mc[2:]), MC,
                                             train=jsonl("mc_train.jsonl", mc[:2])))
    (root / "rolling.yaml").write_text(_task_yaml(f"{prefix}_rolling", "loglikelihood_rolling",
                                                  jsonl("docs.jsonl", docs), ROLLING))
    (root / "gen.yaml").write_text(_task_yaml(f"{prefix}_gen", "generate_until", jsonl("qa.jsonl", qa), GEN))
    return root


def words(rnd):
    return lambda n: " ".join(rnd.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A randomly initialised transformers GPT-2 (wide init, so its choices are not near-ties) with
    GPT-2's tokenizer files taken from the local tiktoken cache."""
    from gptjax import export
    from gptjax.model import GPTConfig

    path = tmp_path_factory.mktemp("hf_gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=CONTEXT, vocab_size=50257,
                                     initializer_range=0.1)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    for name, content in export._gpt2_tokenizer(GPTConfig(block_size=CONTEXT)).items():
        (path / name).write_bytes(content)
    return path


@pytest.fixture(scope="module")
def hf_lm(hf_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=BATCH)


@pytest.fixture(scope="module")
def gptjax_lm(hf_dir):
    return harness.GPTJaxLM.from_weights(str(hf_dir), batch_size=BATCH)


@pytest.fixture(scope="module")
def both(hf_lm, gptjax_lm, tmp_path_factory):
    """The three tasks (one few-shot) through lm-eval's hf backend and through gptjax's."""
    import lm_eval

    tasks_dir = write_tasks(tmp_path_factory.mktemp("tasks"), words(random.Random(1)), "bpe")
    names = ["bpe_mc", "bpe_rolling", "bpe_gen"]
    manager = harness.task_manager(names, str(tasks_dir))
    theirs = lm_eval.simple_evaluate(model=hf_lm, tasks=names, num_fewshot=1, task_manager=manager, log_samples=True,
                                     bootstrap_iters=0)
    ours = harness.evaluate(gptjax_lm, names, manager, num_fewshot=1,
                            log_samples=True, bootstrap_iters=0)
    return theirs, ours


def _responses(results, task):
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_loglikelihoods_equal_the_hf_backends(both, gptjax_lm):
    theirs, ours = both
    for task in ("bpe_mc", "bpe_rolling"):
        a = np.array([[r[0][0] if task == "bpe_mc" else r[0] for r in resp] for resp in _responses(theirs, task)],
                     dtype=np.float64).reshape(-1)
        b = np.array([[r[0][0] if task == "bpe_mc" else r[0] for r in resp] for resp in _responses(ours, task)],
                     dtype=np.float64).reshape(-1)
        assert len(a) == len(b) > 0 and np.all(a < 0)
        np.testing.assert_allclose(b, a, rtol=1e-4, err_msg=task)
    greedy = [[r[0][1] for r in resp] for resp in _responses(theirs, "bpe_mc")]
    assert greedy == [[r[0][1] for r in resp] for resp in _responses(ours, "bpe_mc")]
    # the documents are longer than the context: each takes several windows
    assert all(len(gptjax_lm.tok_encode(s["doc"]["text"])) > CONTEXT for s in ours["samples"]["bpe_rolling"])


def test_generations_and_metrics_equal_the_hf_backends(both):
    theirs, ours = both
    assert _responses(ours, "bpe_gen") == _responses(theirs, "bpe_gen")
    assert any(r[0][0] for r in _responses(ours, "bpe_gen"))  # not all empty
    for task in ("bpe_mc", "bpe_rolling", "bpe_gen"):
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    assert ours["configs"]["bpe_mc"]["num_fewshot"] == 1


def test_lm_eval_finds_gptjax_by_name(hf_dir, both, tmp_path_factory):
    """lm-eval's own entry, simple_evaluate(model="gptjax", model_args="init_from=..."), is the same model."""
    import lm_eval

    _, ours = both
    tasks_dir = write_tasks(tmp_path_factory.mktemp("tasks_by_name"), words(random.Random(1)), "bpe")
    results = lm_eval.simple_evaluate(model="gptjax", model_args=f"init_from={hf_dir}", batch_size=BATCH,
                                      tasks=["bpe_mc"], num_fewshot=1, bootstrap_iters=0,
                                      task_manager=harness.task_manager(["bpe_mc"], str(tasks_dir)))
    assert results["results"]["bpe_mc"]["acc,none"] == ours["results"]["bpe_mc"]["acc,none"]
    assert results["config"]["batch_size"] == BATCH
    with pytest.raises(ValueError, match="gptjax model_args take init_from=PATH"):
        harness.GPTJaxLM.create_from_arg_string(f"pretrained={hf_dir}")


def test_generate_until_honours_until_and_max_gen_toks(gptjax_lm, hf_lm):
    """Stop strings taken from the model's own greedy text cut it there, as in the hf backend; with
    none, max_gen_toks tokens are generated; unequal contexts share a batch."""
    ours, hf = gptjax_lm, hf_lm
    contexts = ["The cat sat on", "A dog ran quickly under the big red", "tree"]
    free = ours.generate_until([Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 10}), i)
                                for i, c in enumerate(contexts)])
    assert all(len(ours.tok_encode(text)) >= 9 for text in free)  # 10 tokens (a re-encoding may merge two)
    stops = [text[len(text) // 2:][:3] for text in free]  # a piece of each row's own continuation
    requests = [Instance("generate_until", {}, (c, {"until": [s], "max_gen_toks": 10}), i)
                for i, (c, s) in enumerate(zip(contexts, stops))]
    cut = ours.generate_until(requests)
    for text, whole, stop in zip(cut, free, stops):
        assert stop not in text and whole.startswith(text) and len(text) < len(whole)
    assert cut == hf.generate_until(requests)
    # sampled: reproducible for a seed, and not the greedy text
    sampled = [Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 10, "do_sample": True,
                                                   "temperature": 1.5}), i) for i, c in enumerate(contexts)]
    draws = [harness.GPTJaxLM(ours.params, ours.cfg, None, batch_size=BATCH, seed=seed).generate_until(sampled)
             for seed in (7, 7, 8)]
    assert draws[0] == draws[1] != draws[2] and draws[0] != free


def _log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_scores_count_each_continuation_token_once_whatever_its_length(gptjax_lm):
    """Continuations from 1 token to most of the window, windows shorter than the positions the
    head is applied at, contexts cropped to the model's, and one continuation that is the model's
    own greedy choice: each score and is_greedy is the full forward's."""
    lm = gptjax_lm
    rnd = np.random.default_rng(5)
    shapes = [(3, 1), (2, 5), (40, 1), (1, 17), (20, 30), (60, 20), (10, 40), (5, 3)]  # (context, continuation)
    requests = [(rnd.integers(0, 50257, c).tolist(), rnd.integers(0, 50257, n).tolist()) for c, n in shapes]
    windows = [(ctx + cont)[-(CONTEXT + 1):] for ctx, cont in requests]
    padded_BxT = np.zeros((len(windows), CONTEXT), np.int32)  # right padding: causal, so it changes nothing
    for b, w in enumerate(windows):
        padded_BxT[b, : len(w) - 1] = w[:-1]
    logits_BxTxV = np.asarray(jax.jit(GPT(lm.cfg).apply)({"params": lm.params}, padded_BxT))
    ctx = requests[2][0]  # its greedy next token, as a one-token continuation
    requests.append((ctx, [int(logits_BxTxV[2, len(ctx) - 1].argmax())]))
    windows.append(ctx + requests[-1][1])
    logits_BxTxV = np.concatenate([logits_BxTxV, logits_BxTxV[2:3]])
    ours = lm._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in requests])
    for (_, cont), w, logits_TxV, (logp, greedy) in zip(requests, windows, logits_BxTxV, ours):
        rows = np.arange(len(w) - 1 - len(cont), len(w) - 1)
        assert logp == pytest.approx(_log_softmax(logits_TxV)[rows, np.asarray(cont)].sum(), rel=1e-5)
        assert greedy == bool((logits_TxV[rows].argmax(-1) == np.asarray(cont)).all())
    assert ours[-1][1] is True
    assert lm._loglikelihood_tokens([(None, *requests[-1])], greedy=False)[0][1] is False  # rolling: not asked


def test_generation_prefills_only_as_far_as_the_longest_prompt(gptjax_lm, monkeypatch):
    """Short prompts are padded to a short window (at most a quarter longer), not to the context
    the model leaves for them: the prefill is one forward over that window."""
    widths = []
    real = harness.generate_stream

    def spy(params, cfg, prompt_BxT, *args, **kwargs):
        widths.append(prompt_BxT.shape[1])
        return real(params, cfg, prompt_BxT, *args, **kwargs)

    monkeypatch.setattr(harness, "generate_stream", spy)
    gptjax_lm.generate_until([Instance("generate_until", {}, ("The cat sat on", {"until": [], "max_gen_toks": 5}), 0)])
    long = words(random.Random(4))(40)
    gptjax_lm.generate_until([Instance("generate_until", {}, (long, {"until": [], "max_gen_toks": 5}), 0)])
    n_long = len(gptjax_lm.tok_encode(long))
    assert widths[0] == harness.MIN_LENGTH
    assert n_long <= widths[1] <= min(n_long * 5 // 4, CONTEXT - 5)


def test_rolling_windows_cover_a_long_document_once(gptjax_lm):
    """A document of ~3 contexts scores as the sum of its tokens' log-probabilities, each predicted
    once with as much context as fits: the same number as the plain model's windows by hand."""
    lm = gptjax_lm
    text = words(random.Random(3))(200)
    tokens = lm.tok_encode(text)
    assert len(tokens) > 2 * CONTEXT
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    model = GPT(lm.cfg)
    seq = [harness.GPT2_EOT] + tokens
    expected, predicted = 0.0, 0
    while predicted < len(tokens):  # window predicting tokens predicted..end-1 with the last CONTEXT tokens
        end = min(predicted + CONTEXT, len(tokens))
        start = max(0, end - CONTEXT)
        logp = _log_softmax(model.apply({"params": lm.params}, np.asarray([seq[start:end]]))[0])
        for pos in range(predicted, end):
            expected += logp[pos - start, tokens[pos]]
        predicted = end
    assert total == pytest.approx(expected, rel=1e-5)


def test_a_char_level_run_evaluates_in_training_and_from_the_command_line(char_data, tmp_path, capsys):
    """Trained by the tests with --eval_tasks: the task metrics are logged at each eval beside the
    losses (metrics.jsonl and TensorBoard alike), and python -m gptjax.eval on the run's final
    weights gives the same numbers and lm-eval's own files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gptjax import train

    meta = pickle.loads((char_data / "meta.pkl").read_bytes())
    letters = [c for c in "abcdefghilmnorstuw" if c in meta["stoi"]]
    rnd = random.Random(2)
    tasks_dir = write_tasks(tmp_path / "tasks", lambda n: " ".join(
        "".join(rnd.choice(letters) for _ in range(rnd.randint(1, 4))) for _ in range(n)), "char")
    out = tmp_path / "run"
    cfg = tiny(char_data, out, block_size=32, max_iters=20, eval_interval=10, eval_tasks="char_mc,char_rolling",
               eval_tasks_limit=4, eval_tasks_include_path=str(tasks_dir))
    train.train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    task_records = [r for r in records if "char_mc/acc" in r]
    assert [r["iter"] for r in task_records] == [0, 10, 20]
    assert all(0 <= r["char_mc/acc"] <= 1 and r["char_rolling/bits_per_byte"] > 0 for r in task_records)
    assert task_records[0]["char_rolling/bits_per_byte"] > task_records[-1]["char_rolling/bits_per_byte"]

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    for tag in ("loss", "val_loss", "lr", "char_mc/acc_norm", "char_rolling/word_perplexity"):
        logged = {r["iter"]: r[tag] for r in records if tag in r}
        read = {e.step: e.value for e in events.Scalars(tag)}
        assert read.keys() == logged.keys() and len(read) > 1, tag
        np.testing.assert_allclose([read[k] for k in logged], list(logged.values()), rtol=1e-6, err_msg=tag)

    results = tmp_path / "results"
    assert eval_cli.main([f"--out_dir={out}", "--tasks=char_mc,char_rolling,char_gen", "--limit=4",
                          f"--include_path={tasks_dir}", f"--output_path={results}", "--log_samples"]) == 0
    printed = capsys.readouterr().out
    assert "char_mc" in printed and "acc_norm" in printed and "bits_per_byte" in printed
    (written,) = results.rglob("results_*.json")
    final = json.loads(written.read_text())["results"]
    for name, value in task_records[-1].items():
        if name != "iter":
            task, metric = name.split("/")
            assert final[task][f"{metric},none"] == pytest.approx(value, rel=1e-6), name
    assert {p.name.split("_2")[0] for p in results.rglob("samples_*.jsonl")} == {
        "samples_char_mc", "samples_char_rolling", "samples_char_gen"}


def test_bad_input_is_named(hf_dir, gptjax_lm, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown lm-eval task 'hellaswg' \(did you mean hellaswag"):
        harness.task_manager(["hellaswg"])
    with pytest.raises(FileNotFoundError, match="not a directory of task YAML"):
        harness.task_manager(["x"], str(tmp_path / "nowhere"))
    lm = gptjax_lm
    with pytest.raises(ValueError, match=f"max_gen_toks={CONTEXT} leaves no room"):
        lm.generate_until([Instance("generate_until", {}, ("Hi", {"until": [], "max_gen_toks": CONTEXT}), 0)])
    with pytest.raises(ValueError, match="repetition_penalty are not supported"):
        lm.generate_until([Instance("generate_until", {}, ("Hi", {"until": [], "repetition_penalty": 1.2}), 0)])
    with pytest.raises(SystemExit):
        eval_cli.main([f"--init_from={hf_dir}", "--tasks=x", "--log_samples"])
    assert "--log_samples needs --output_path" in capsys.readouterr().err
    meta = {"vocab_size": 3, "stoi": {"a": 0, "b": 1, "\n": 2}, "itos": {0: "a", 1: "b", 2: "\n"}}
    with pytest.raises(ValueError, match=r"character 'c' .* remove it from the task's text"):
        harness.GPTJaxLM(lm.params, lm.cfg, meta).tok_encode("abc")


def test_without_lm_eval_the_commands_say_what_to_install(monkeypatch, capsys, tmp_path):
    import importlib.util

    from gptjax import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert eval_cli.main(["--init_from=gpt2", "--tasks=hellaswag"]) == 2
    assert "pip install 'gptjax[eval]'" in capsys.readouterr().err
    assert train.main([f"--out_dir={tmp_path}", "--eval_tasks=hellaswag"]) == 2
    assert "eval_tasks='hellaswag' needs lm-evaluation-harness: pip install 'gptjax[eval]'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_benchmark_against_lm_evals_hf_backend_agrees_and_writes_its_table(tmp_path):
    """benchmarks/eval_vs_lm_eval.py on a one-layer model: it stops if the backends' metrics differ."""
    out = tmp_path / "table.md"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_vs_lm_eval.py"
    subprocess.run([sys.executable, str(script), "--rounds", "1", "--n_layer", "1", "--n_embd", "64",
                    "--examples", "4", "1", "2", "--out", str(out)], check=True, capture_output=True, timeout=600)
    table = out.read_text()
    assert all(f"| shakespeare_{kind} |" in table for kind in ("mc", "rolling", "gen")) and "Host:" in table

