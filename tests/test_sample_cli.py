"""python -m gptjax.sample: the streamed text is exactly the decoding of one `generate` call, for
a character vocabulary (resume) and GPT-2 BPE (a Hugging Face directory); bad input is one line."""

import pickle

import jax
import numpy as np
import pytest

from gptjax import checkpoint, sample
from gptjax.generate import generate
from gptjax.model import GPTConfig
from test_generate import spread_params

CHARS = "\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-&$3"  # 65, shakespeare_char's size
CFG = GPTConfig(block_size=16, vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def char_params():
    return spread_params(CFG, seed=4)


@pytest.fixture
def char_run(tmp_path, monkeypatch, char_params):
    """An out_dir whose checkpoint loads as the tiny char model (checkpoint format is not under
    test here) and whose data_dir has a real meta.pkl read by gptjax.data.load_meta."""
    stoi = {ch: i for i, ch in enumerate(CHARS)}
    meta = {"vocab_size": len(CHARS), "itos": {i: ch for ch, i in stoi.items()}, "stoi": stoi}
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    (tmp_path / "checkpoints").mkdir()  # what makes a directory a run's
    run = {"dataset": "shakespeare_char", "data_dir": str(tmp_path)}
    saved = {"iter_num": 10, "best_val_loss": 2.0, "run": run}
    monkeypatch.setattr(checkpoint, "load_inference", lambda out_dir: (char_params, CFG, saved))
    return tmp_path, meta


def split_samples(text):
    parts = text.split("\n" + sample.SEPARATOR + "\n")
    assert parts[-1] == ""
    return parts[:-1]


def test_char_streaming_equals_one_call(char_run, char_params, capsys):
    out_dir, meta = char_run
    argv = ["--out_dir", str(out_dir), "--start=To be", "--num_samples=2", "--max_new_tokens", "70",
            "--top_k=20", "--seed", "3"]
    assert sample.main(argv) == 0
    samples = split_samples(capsys.readouterr().out)
    assert len(samples) == 2 and samples[0] != samples[1]
    ids = [[meta["stoi"][c] for c in "To be"]]
    for k, text in enumerate(samples):  # 70 tokens: 3 chunks, and past block_size 16
        key = jax.random.fold_in(jax.random.PRNGKey(3), k)
        tokens = np.asarray(generate(char_params, CFG, ids, key, 70, temperature=0.8, top_k=20))[0]
        assert text == "To be" + "".join(meta["itos"][int(i)] for i in tokens)


def test_long_prompt_is_cropped_with_a_warning(char_run, char_params, capsys):
    out_dir, meta = char_run
    start = "now is the winter of our discontent"  # 35 characters > block_size 16
    assert sample.main(["--out_dir", str(out_dir), "--start", start, "--num_samples=1",
                        "--max_new_tokens=5", "--temperature=0"]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "last 16 tokens" in captured.err
    ids = [[meta["stoi"][c] for c in start[-16:]]]  # nanoGPT: only the last block_size tokens count
    tokens = np.asarray(generate(char_params, CFG, ids, jax.random.PRNGKey(0), 5, temperature=0))[0]
    assert split_samples(captured.out) == [start + "".join(meta["itos"][int(i)] for i in tokens)]


def test_bpe_decoder_holds_back_split_characters():
    tok = sample.Tokenizer(None)
    text = "héllo wörld 日本語 🙂 <|endoftext|> ok"
    ids = tok.encode(text)
    assert tok.bpe.decode(ids) == text and len(ids) > len(text.split())
    decode = tok.stream_decoder()
    pieces = [decode(ids[i : i + 1]) for i in range(len(ids))] + [decode([], final=True)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # no piece ever showed half a character


def test_hf_directory_gpt2_bpe(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    convert = pytest.importorskip("gptjax.convert")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path)
    argv = ["--init_from", str(tmp_path), "--start", "Olá, mundo", "--num_samples=1",
            "--max_new_tokens=40", "--temperature=1.0", "--top_k=50000", "--seed=5"]
    assert sample.main(argv) == 0
    (text,) = split_samples(capsys.readouterr().out)
    params, cfg = convert.load_hf(tmp_path)
    tok = sample.Tokenizer(None)
    ids = tok.encode("Olá, mundo")
    key = jax.random.fold_in(jax.random.PRNGKey(5), 0)
    tokens = np.asarray(generate(params, cfg, [ids], key, 40, temperature=1.0, top_k=50000))[0]
    assert tokens.max() < 50257 and len(set(tokens.tolist())) > 20
    assert text == tok.bpe.decode(ids + tokens.tolist())  # tiktoken's replacement chars included


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--start=to bé"], "character 'é' (U+00E9)"),
        (["--top_k=0"], "--top_k=0 must be >= 1"),
        (["--top_k=66"], "--top_k=66 is more than the 65 tokens"),
        (["--top_p=0"], "--top_p=0.0 must be in (0, 1]"),
        (["--top_p", "1.5"], "--top_p=1.5 must be in (0, 1]"),
        (["--start="], "prompt (--start) is empty"),
        (["--temperature=-1"], "--temperature=-1.0 must be a number >= 0"),
        (["--temperature=nan"], "--temperature=nan must be a number >= 0"),
        (["--start=FILE:/nonexistent/prompt.txt"], "not a file"),
        (["--num_samples=0"], "at least 1"),
    ],
)
def test_bad_input_is_one_line(char_run, capsys, argv, message):
    out_dir, _ = char_run
    assert sample.main(["--out_dir", str(out_dir), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err


def test_missing_checkpoint(tmp_path, capsys):
    assert sample.main(["--out_dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sample.main(["--out_dir", str(tmp_path)]) == 2  # exists, holds no checkpoint
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "checkpoint" in err


def test_file_prompt(char_run, char_params, tmp_path, capsys):
    out_dir, meta = char_run
    (tmp_path / "p.txt").write_text("ab\ncd")
    assert sample.main(["--out_dir", str(out_dir), f"--start=FILE:{tmp_path / 'p.txt'}", "--num_samples=1",
                        "--max_new_tokens=3", "--temperature=0"]) == 0
    assert split_samples(capsys.readouterr().out)[0].startswith("ab\ncd")


def test_file_prompt_that_is_not_utf8_names_the_file(char_run, tmp_path, capsys):
    out_dir, _ = char_run
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert sample.main(["--out_dir", str(out_dir), f"--start=FILE:{tmp_path / 'latin1.txt'}"]) == 2
    err = capsys.readouterr().err
    assert "latin1.txt' is not UTF-8 text" in err and "save it as UTF-8" in err


def test_resume_after_real_training_uses_the_char_vocabulary(tmp_path, monkeypatch, capsys):
    """The README's main job end to end: train with the default data_dir (data/<dataset>), then
    `python -m gptjax.sample --out_dir=...` must decode with the run's meta.pkl, not GPT-2 BPE."""
    from pathlib import Path

    from gptjax import data, prepare
    from gptjax.config import parse_args
    from gptjax.train import train

    monkeypatch.chdir(tmp_path)
    corpus = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"
    text = corpus.read_text()[:20000] if corpus.is_file() else "to be or not to be, that is the question\n" * 500
    prepare.prepare_shakespeare_char(text, tmp_path / "data" / "shakespeare_char")
    cfg = parse_args(["shakespeare_char_cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16",
                      "--batch_size=4", "--max_iters=4", "--eval_interval=4", "--eval_iters=1",
                      "--always_save_checkpoint=True", "--out_dir=out"])
    train(cfg)
    capsys.readouterr()
    assert sample.main(["--out_dir=out", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=20"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("ROMEO:")
    meta = data.load_meta(tmp_path / "data" / "shakespeare_char")
    generated = printed.split("\n---------------")[0][len("ROMEO:"):]
    assert len(generated) == 20 and set(generated) <= set(meta["stoi"])

    # the run keeps its own vocabulary: data/ prepared again from another text changes nothing
    assert data.load_meta("out") == meta
    prepare.prepare_shakespeare_char("a few other characters: xyz\n" * 100, tmp_path / "data" / "shakespeare_char")
    assert sample.main(["--out_dir=out", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=20"]) == 0
    assert capsys.readouterr().out == printed  # same seed, same vocabulary: the same sample
    # a run from before that copy: data/'s meta.pkl must be the model's
    (tmp_path / "out" / "meta.pkl").unlink()
    assert sample.main(["--out_dir=out", "--num_samples=1", "--max_new_tokens=5"]) == 2
    err = capsys.readouterr().err
    assert "characters but the model in out was trained on" in err and "prepared again" in err
    (tmp_path / "data" / "shakespeare_char" / "meta.pkl").unlink()
    assert sample.main(["--out_dir=out", "--num_samples=1", "--max_new_tokens=5"]) == 2
    assert "meta.pkl" in capsys.readouterr().err
