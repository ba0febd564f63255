"""The Colab notebook runs top to bottom on CPU with tiny sizes, and is committed clean.

The run injects a cell after the `parameters` cell (as papermill does) and executes the notebook in
a kernel started from this very interpreter, through a throwaway kernelspec on JUPYTER_PATH, so it
works on a machine where only `pip install -e .[test]` ran (no `ipykernel install`).
"""

import importlib.util
import json
import os
import pickle
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "shakespeare_char_tpu.ipynb"
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
KERNEL = "gptjax-notebook-test"
PROMPT = "ROMEO:"
NEW_TOKENS = 120


def _tagged(nb, tag):
    return [i for i, cell in enumerate(nb.cells) if tag in cell.get("metadata", {}).get("tags", [])]


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")


def _kernelspec(root: Path) -> Path:
    """A kernelspec running ipykernel under sys.executable, whatever kernels the machine has."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "gptjax test kernel", "language": "python",
    }))
    return root


def _has_torch_and_transformers() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def _random_gpt2_dir(path: Path) -> Path:
    """A randomly initialised GPT-2-shaped HF directory with GPT-2's real vocabulary (for tiktoken)."""
    import jax

    from gptjax.convert import save_hf
    from gptjax.model import GPTConfig, init_params

    cfg = GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, activation="gelu_tanh")
    return save_hf(init_params(cfg, jax.random.PRNGKey(3)), cfg, path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    if CORPUS.is_file():
        return CORPUS
    # no shared copy (fresh CI machine): a small stand-in with the same kind of text, never a download
    lines = ["ROMEO:", "But, soft! what light through yonder window breaks?", "",
             "JULIET:", "O Romeo, Romeo! wherefore art thou Romeo?", ""]
    path = tmp_path_factory.mktemp("corpus") / "input.txt"
    path.write_text("\n".join(lines * 400))
    return path


def _execute(work: Path, params: dict, hub_online: bool = False):
    """The notebook run with `params` injected after its parameters cell; with hub_online, the hub
    section once more, "online" against a local GPT-2-shaped directory (weights.load and
    transformers both take one), so its code runs here without a network."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (at,) = _tagged(nb, "parameters")
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()),
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(at + 1, injected)
    if hub_online:
        nb.cells.append(nbformat.v4.new_code_cell(
            f"online, pretrained = True, {str(_random_gpt2_dir(work / 'gpt2-random'))!r}"))
        (hub_at,) = _tagged(nb, "pretrained")
        nb.cells.append(nbformat.v4.new_code_cell(nb.cells[hub_at].source, metadata={"tags": ["hub-online"]}))

    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               JUPYTER_PATH=str(_kernelspec(work / "jupyter")),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", env["JUPYTER_PATH"])  # read by the kernelspec lookup in this process
        client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300, startup_timeout=120,
                                         resources={"metadata": {"path": str(work)}})
        client.execute(env=env)  # raises CellExecutionError naming the cell if any cell fails
    return nb


@pytest.fixture(scope="module")
def executed(tmp_path_factory, corpus):
    """(executed notebook, work dir, injected overrides)."""
    work = tmp_path_factory.mktemp("notebook")
    overrides = dict(
        n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_iters=20, eval_interval=10,
        eval_iters=2, log_interval=1, dropout=0.0, warmup_iters=5, lr_decay_iters=20,
        out_dir=str(work / "out"), data_dir=str(work / "data"), data_input=str(corpus),
    )
    params = {"overrides": overrides, "prompt": PROMPT, "num_samples": 2, "max_new_tokens": NEW_TOKENS,
              "online": False}
    return _execute(work, params, hub_online=_has_torch_and_transformers()), work, overrides


def test_notebook_trains_saves_and_samples(executed, corpus):
    nb, work, overrides = executed
    out = Path(overrides["out_dir"])
    assert (out / "checkpoints").is_dir()
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()], "no checkpoint step saved"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 10, 20]
    assert len([r for r in records if "loss" in r]) == overrides["max_iters"]
    assert (out / "loss.png").stat().st_size > 1000
    assert {"config.json", "model.safetensors"} <= {p.name for p in (out / "hf").iterdir()}

    (sample_at,) = _tagged(nb, "sample")
    printed = _stdout(nb.cells[sample_at])
    samples = [s.removeprefix("\n").removesuffix("\n") for s in printed.split("---------- sample ")[1:]]
    assert len(samples) == 2, printed
    vocab = set(pickle.loads((Path(overrides["data_dir"]) / "meta.pkl").read_bytes())["stoi"])
    for s in samples:
        text = s.split(" ----------\n", 1)[1]
        assert text.startswith(PROMPT)
        assert len(text) == len(PROMPT) + NEW_TOKENS  # one character per sampled token
        assert set(text) <= vocab and text[len(PROMPT):].strip()


def test_notebook_checks_the_export_and_skips_the_hub_offline(executed):
    nb, _, _ = executed
    printed = "".join(_stdout(c) for c in nb.cells if c.cell_type == "code")
    if _has_torch_and_transformers():
        assert "Hugging Face GPT2LMHeadModel vs gptjax, float32 logits: max relative difference" in printed
    else:
        assert "skipped the PyTorch check of the export" in printed
    assert "offline: skipped loading 'gpt2'" in printed
    assert "cpu: 1 x cpu" in printed and "mesh {'data': 1, 'fsdp': 1}: 8 sequences per device" in printed


def test_notebook_pretrained_section_matches_transformers(executed):
    if not _has_torch_and_transformers():
        pytest.skip("needs torch and transformers")
    nb, _, _ = executed
    (at,) = _tagged(nb, "hub-online")
    printed = _stdout(nb.cells[at])
    assert "n_layer=2 n_embd=32 vocab=50257" in printed
    # the cell raises when the logits differ by more than the relative tolerance 1e-4
    assert "vs transformers, float32 logits: max relative difference" in printed
    sample = printed.split("(tolerance 1e-04)\n", 1)[1]
    assert sample.startswith("To be, or not to be,") and len(sample.strip()) > len("To be, or not to be,")


@pytest.mark.slow
def test_notebook_runs_the_modern_recipe(tmp_path, corpus):
    """The modern recipe's model trains, checkpoints and samples in the notebook; its export to
    GPT-2's format is skipped with the reason."""
    overrides = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_iters=10, eval_interval=10,
                     eval_iters=2, warmup_iters=2, lr_decay_iters=10, out_dir=str(tmp_path / "out"),
                     data_dir=str(tmp_path / "data"), data_input=str(corpus))
    nb = _execute(tmp_path, {"config_name": "shakespeare_char_cpu_modern", "overrides": overrides, "prompt": PROMPT,
                             "num_samples": 1, "max_new_tokens": 20, "online": False})
    printed = "".join(_stdout(c) for c in nb.cells if c.cell_type == "code")
    assert "no Hugging Face export: GPT-2's format cannot hold pos_embedding='rotary'" in printed
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir() if p.name.isdigit()] == ["10"]
    (sample_at,) = _tagged(nb, "sample")
    assert _stdout(nb.cells[sample_at]).count(PROMPT) == 1


def test_committed_notebook_is_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "clear the outputs before committing"
    assert len(_tagged(nb, "parameters")) == 1 and len(_tagged(nb, "sample")) == 1
    # the notebook drives the library: no model or training code defined inside it
    for cell in code:
        lines = cell.source.splitlines()
        assert not [ln for ln in lines if ln.lstrip().startswith(("def ", "class ", "@"))], cell.source
