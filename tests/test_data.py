"""gptjax.data and gptjax.prepare: nanoGPT-identical files, deterministic host-sharded batches,
loud errors on bad data, a safe meta.pkl reader and the background prefetcher."""

import os
import pickle
import sys
import threading
import types
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from gptjax import data, prepare

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CORPUS = SHARED / "data/tinyshakespeare/input.txt"
TIKTOKEN_CACHE = SHARED / "tiktoken_cache"
needs_corpus = pytest.mark.skipif(not CORPUS.is_file(), reason=f"{CORPUS} absent")


@pytest.fixture
def gpt2_offline(monkeypatch):
    if not TIKTOKEN_CACHE.is_dir():
        pytest.skip(f"{TIKTOKEN_CACHE} absent")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    import tiktoken

    return tiktoken.get_encoding("gpt2")


# nanoGPT's data/shakespeare_char/prepare.py and data/shakespeare/prepare.py, with the download
# and the prints removed and the output folder made a parameter.
def nanogpt_shakespeare_char(data, out):
    chars = sorted(list(set(data)))
    vocab_size = len(chars)
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}

    def encode(s):
        return [stoi[c] for c in s]

    n = len(data)
    train_data = data[: int(n * 0.9)]
    val_data = data[int(n * 0.9) :]
    train_ids = np.array(encode(train_data), dtype=np.uint16)
    val_ids = np.array(encode(val_data), dtype=np.uint16)
    train_ids.tofile(os.path.join(out, "train.bin"))
    val_ids.tofile(os.path.join(out, "val.bin"))
    meta = {"vocab_size": vocab_size, "itos": itos, "stoi": stoi}
    with open(os.path.join(out, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)


def nanogpt_shakespeare(data, out, enc):
    n = len(data)
    train_data = data[: int(n * 0.9)]
    val_data = data[int(n * 0.9) :]
    train_ids = np.array(enc.encode_ordinary(train_data), dtype=np.uint16)
    val_ids = np.array(enc.encode_ordinary(val_data), dtype=np.uint16)
    train_ids.tofile(os.path.join(out, "train.bin"))
    val_ids.tofile(os.path.join(out, "val.bin"))


def same_files(a, b, names):
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


@needs_corpus
def test_shakespeare_char_is_byte_identical_to_nanogpt(tmp_path):
    text = CORPUS.read_text()[:20_000]
    (tmp_path / "ref").mkdir()
    nanogpt_shakespeare_char(text, tmp_path / "ref")
    prepare.prepare_shakespeare_char(text, tmp_path / "ours")
    assert same_files(tmp_path / "ref", tmp_path / "ours", ["train.bin", "val.bin", "meta.pkl"])
    with open(tmp_path / "ref/meta.pkl", "rb") as f:
        assert data.load_meta(tmp_path / "ours") == pickle.load(f)


@needs_corpus
def test_shakespeare_char_full_corpus_matches_nanogpt_published_counts(tmp_path):
    summary = prepare.prepare_shakespeare_char(CORPUS.read_text(), tmp_path)
    (tmp_path / "ref").mkdir()
    nanogpt_shakespeare_char(CORPUS.read_text(), tmp_path / "ref")
    assert same_files(tmp_path / "ref", tmp_path, ["train.bin", "val.bin", "meta.pkl"])
    assert (summary["train_tokens"], summary["val_tokens"], summary["vocab_size"]) == (1_003_854, 111_540, 65)
    assert (tmp_path / "train.bin").stat().st_size == 2 * 1_003_854
    assert data.load_meta(tmp_path)["vocab_size"] == 65
    ds = data.BinDataset(tmp_path, block_size=256, vocab_size=65)
    assert (ds.n_tokens("train"), ds.n_tokens("val")) == (1_003_854, 111_540)


@needs_corpus
def test_shakespeare_bpe_is_byte_identical_to_nanogpt(tmp_path, gpt2_offline):
    text = CORPUS.read_text()[:20_000]
    (tmp_path / "ref").mkdir()
    nanogpt_shakespeare(text, tmp_path / "ref", gpt2_offline)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours/meta.pkl").write_bytes(b"stale")  # from an earlier char-level run
    prepare.prepare_shakespeare(text, tmp_path / "ours")
    assert same_files(tmp_path / "ref", tmp_path / "ours", ["train.bin", "val.bin"])
    assert not (tmp_path / "ours/meta.pkl").exists() and data.load_meta(tmp_path / "ours") is None


@needs_corpus
def test_shakespeare_bpe_full_corpus_matches_nanogpt_published_counts(tmp_path, gpt2_offline):
    summary = prepare.prepare_shakespeare(CORPUS.read_text(), tmp_path)
    assert (summary["train_tokens"], summary["val_tokens"]) == (301_966, 36_059)
    assert data.BinDataset(tmp_path, 1024, vocab_size=50257).n_tokens("val") == 36_059


def test_prepare_text_joins_files_with_eot_and_splits_tokens(tmp_path, gpt2_offline):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Hello world, this is the first document. " * 30)
    b.write_text("And a second one, rather different in content! " * 20)
    summary = prepare.prepare_text([a, b], tmp_path / "out", val_fraction=0.25)
    enc = gpt2_offline
    want = enc.encode_ordinary(a.read_text()) + [50256] + enc.encode_ordinary(b.read_text()) + [50256]
    train = np.fromfile(tmp_path / "out/train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "out/val.bin", dtype=np.uint16)
    assert np.concatenate([train, val]).tolist() == want
    assert len(train) == int(len(want) * 0.75) == summary["train_tokens"]
    with pytest.raises(ValueError, match="val_fraction"):
        prepare.prepare_text([a], tmp_path / "x", val_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare.prepare_text([tmp_path / "nope.txt"], tmp_path / "x")


# ----------------------------------------------------------------------------- batches


def write_bin(d, ids):
    d.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        np.asarray(ids, dtype=np.uint16).tofile(d / f"{split}.bin")
    return d


@pytest.fixture
def random_ds(tmp_path):
    ids = np.random.default_rng(0).integers(0, 100, size=5000)
    return data.BinDataset(write_bin(tmp_path / "rand", ids), block_size=16, vocab_size=100), ids


def test_batch_windows_match_nanogpt_gather(random_ds):
    ds, ids = random_ds
    x, y = data.get_batch(ds, "train", 3, batch_size=8, block_size=16, seed=1337)
    assert x.shape == y.shape == (1, 8, 16) and x.dtype == y.dtype == np.int32
    ix = data.batch_offsets(1337, "train", 3, len(ids), 16, 8)
    assert ix.shape == (1, 8) and ((0 <= ix) & (ix < len(ids) - 16)).all()
    # nanoGPT: x = data[i:i+block_size], y = data[i+1:i+1+block_size]
    assert np.array_equal(x[0], np.stack([ids[i : i + 16] for i in ix[0]]))
    assert np.array_equal(y[0], np.stack([ids[i + 1 : i + 17] for i in ix[0]]))


def test_batches_are_a_function_of_seed_split_step(random_ds):
    ds, _ = random_ds
    kw = dict(batch_size=8, block_size=16)
    x0, _ = data.get_batch(ds, "train", 5, seed=1, **kw)
    assert np.array_equal(x0, data.get_batch(ds, "train", 5, seed=1, **kw)[0])
    for other in (dict(split="train", step=6, seed=1), dict(split="train", step=5, seed=2),
                  dict(split="val", step=5, seed=1), dict(split="train", step=5, seed=1, eval_index=0)):
        assert not np.array_equal(x0, data.get_batch(ds, **other, **kw)[0]), other
    e0 = data.get_batch(ds, "val", 5, seed=1, eval_index=0, **kw)[0]
    assert np.array_equal(e0, data.get_batch(ds, "val", 5, seed=1, eval_index=0, **kw)[0])
    assert not np.array_equal(e0, data.get_batch(ds, "val", 5, seed=1, eval_index=1, **kw)[0])


@pytest.mark.parametrize("accum", [1, 3])
def test_host_slices_concatenate_to_the_one_host_batch(random_ds, accum):
    ds, _ = random_ds
    kw = dict(split="train", step=7, batch_size=8, block_size=16, seed=3, accum_steps=accum)
    x1, y1 = data.get_batch(ds, **kw)
    parts = [data.get_batch(ds, process_index=h, process_count=2, **kw) for h in range(2)]
    assert parts[0][0].shape == (accum, 4, 16)
    assert np.array_equal(np.concatenate([p[0] for p in parts], axis=1), x1)
    assert np.array_equal(np.concatenate([p[1] for p in parts], axis=1), y1)
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        data.get_batch(ds, process_index=0, process_count=3, **kw)


def test_accumulation_splits_the_same_draw_as_one_big_batch(random_ds):
    ds, _ = random_ds
    x3, y3 = data.get_batch(ds, "train", 2, batch_size=4, block_size=16, seed=0, accum_steps=3)
    x1, y1 = data.get_batch(ds, "train", 2, batch_size=12, block_size=16, seed=0)
    assert np.array_equal(x3.reshape(1, 12, 16), x1) and np.array_equal(y3.reshape(1, 12, 16), y1)
    assert np.array_equal(y3[..., :-1], x3[..., 1:])


def test_offsets_reach_the_last_window(tmp_path):
    # 18 tokens, block 16: the only starts are 0 and 1 (nanoGPT's randint(len - block_size))
    ds = data.BinDataset(write_bin(tmp_path, np.arange(18)), block_size=16)
    x, y = data.get_batch(ds, "train", 0, batch_size=64, block_size=16, seed=0)
    assert set(x[0, :, 0].tolist()) == {0, 1}
    assert np.array_equal(y, x + 1) and y.max() == 17


# ----------------------------------------------------------------------------- errors


def test_missing_bin_names_the_prepare_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m gptjax.prepare shakespeare_char --input PATH"):
        data.BinDataset(tmp_path / "shakespeare_char", block_size=8)


def test_empty_and_too_short_bins_are_refused(tmp_path):
    write_bin(tmp_path / "e", [])
    with pytest.raises(ValueError, match="0 bytes"):
        data.BinDataset(tmp_path / "e", block_size=8)
    write_bin(tmp_path / "s", np.arange(8))
    with pytest.raises(ValueError, match="holds 8 tokens but block_size=8 needs at least 9"):
        data.BinDataset(tmp_path / "s", block_size=8)
    data.BinDataset(write_bin(tmp_path / "ok", np.arange(9)), block_size=8)


def test_token_beyond_vocab_is_refused(tmp_path):
    ids = np.arange(40) % 10
    ids[33] = 64
    write_bin(tmp_path, ids)
    with pytest.raises(ValueError, match="token id 64 but vocab_size=64"):
        data.BinDataset(tmp_path, block_size=8, vocab_size=64)
    data.BinDataset(tmp_path, block_size=8, vocab_size=65)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > marker",))


def test_malicious_meta_is_refused_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 1, "itos": {0: "a"}, "x": _Exploit()}))
    with pytest.raises(ValueError, match=r"refusing to load .*meta.pkl: it asks for (os|posix)\.system"):
        data.load_meta(tmp_path)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize(
    "meta, msg",
    [
        ({"vocab_size": 3, "itos": {0: "a", 1: "b"}, "stoi": {"a": 0, "b": 1}}, "vocab_size=3 but itos has 2"),
        ({"vocab_size": 2, "itos": {0: "a", 1: "b"}, "stoi": {"a": 1, "b": 0}}, "stoi be its inverse"),
        ({"vocab_size": 2, "itos": {0: "a", 1: "b"}}, "must be a dict with vocab_size, itos and stoi"),
        ([1, 2], "must be a dict"),
    ],
)
def test_inconsistent_meta_is_refused(tmp_path, meta, msg):
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    with pytest.raises(ValueError, match=msg):
        data.load_meta(tmp_path)


def test_offline_download_says_to_pass_input(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match="could not download tiny-shakespeare .*pass --input PATH"):
        prepare.read_shakespeare(out_dir=tmp_path)
    with pytest.raises(ConnectionError, match=r"gptjax.prepare shakespeare_char --input PATH --out .*sc.*"
                                              r"or to gptjax.train --data_input=PATH"):
        prepare.ensure_dataset("shakespeare_char", tmp_path / "sc")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare.read_shakespeare(tmp_path / "missing.txt")


def test_ensure_dataset_prepares_shakespeare_from_local_input_only_when_missing(tmp_path):
    d = tmp_path / "shakespeare_char"
    d.mkdir()
    (d / "input.txt").write_text("To be, or not to be: that is the question.\n" * 20)
    summary = prepare.ensure_dataset("shakespeare_char", d)
    assert summary["vocab_size"] == len(set((d / "input.txt").read_text()))
    before = (d / "train.bin").stat().st_mtime_ns
    assert prepare.ensure_dataset("shakespeare_char", d) is None
    assert (d / "train.bin").stat().st_mtime_ns == before
    with pytest.raises(FileNotFoundError, match="python -m gptjax.prepare openwebtext --out"):
        prepare.ensure_dataset("openwebtext", tmp_path / "owt")


class _FakeSplit:
    """The slice of HF `datasets` that nanoGPT's openwebtext prepare uses, over a few documents."""

    def __init__(self, rows, interrupt_at=None):
        self.rows, self.interrupt_at = rows, interrupt_at

    def __getitem__(self, column):
        return [row[column] for row in self.rows]

    def train_test_split(self, test_size, seed, shuffle):
        return _FakeSplits(train=_FakeSplit(self.rows[2:]), test=_FakeSplit(self.rows[:2], self.interrupt_at))

    def map(self, fn, remove_columns, desc, num_proc):
        return _FakeSplit([fn(row) for row in self.rows], self.interrupt_at)

    def shard(self, num_shards, index, contiguous):
        if index == self.interrupt_at:
            raise KeyboardInterrupt
        per = -(-len(self.rows) // num_shards)
        return _FakeSplit(self.rows[index * per:(index + 1) * per])

    def with_format(self, kind):
        return _FakeSplit([{k: np.asarray(v, np.uint16) for k, v in row.items()} for row in self.rows] or
                          [{"ids": np.zeros(0, np.uint16)}])


class _FakeSplits(dict):
    def map(self, fn, **kw):
        return _FakeSplits({k: v.map(fn, **kw) for k, v in self.items()})


def test_openwebtext_is_nanogpts_token_stream_and_never_half_written(tmp_path, monkeypatch):
    from gptjax.prepare import gpt2_encoding

    docs = [f"document {i}: " + "to be or not to be " * (i % 7 + 1) for i in range(2000)]
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, num_proc: {"train": _FakeSplit([{"text": d} for d in docs])}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    summary = prepare.prepare_openwebtext(tmp_path / "owt", num_proc=1)
    bpe = gpt2_encoding()
    stream = lambda texts: np.array([t for d in texts for t in bpe.encode_ordinary(d) + [bpe.eot_token]], np.uint16)
    assert np.array_equal(np.fromfile(tmp_path / "owt" / "val.bin", np.uint16), stream(docs[:2]))
    assert np.array_equal(np.fromfile(tmp_path / "owt" / "train.bin", np.uint16), stream(docs[2:]))
    assert summary["vocab_size"] == 50257

    # Ctrl-C a quarter of the way through val.bin (written second): no val.bin, nor a leftover temporary
    fake.load_dataset = lambda name, num_proc: {"train": _FakeSplit([{"text": d} for d in docs], interrupt_at=256)}
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_openwebtext(tmp_path / "cut", num_proc=1)
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["train.bin"]
    with pytest.raises(FileNotFoundError, match="has train.bin but no val.bin: .* prepare it again with"):
        prepare.ensure_dataset("openwebtext", tmp_path / "cut")


def test_openwebtext_without_datasets_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install gptjax\[openwebtext\]"):
        prepare.prepare_openwebtext(tmp_path)


# ----------------------------------------------------------------------------- prefetcher


def test_prefetcher_yields_in_order_and_runs_ahead():
    calls = []

    def fn(step):
        calls.append(step)
        return np.full((2,), step)

    pf = data.Prefetcher(fn, start_step=10, depth=2)
    try:
        assert [int(pf.next()[0]) for _ in range(5)] == [10, 11, 12, 13, 14]
        assert pf.step == 15
        deadline = time.time() + 5
        while len(calls) < 7 and time.time() < deadline:  # depth 2 ahead of the consumer
            time.sleep(0.01)
        assert calls[:7] == list(range(10, 17))
    finally:
        pf.close()
    assert not pf._thread.is_alive()
    with pytest.raises(RuntimeError, match="after close"):
        pf.next()


def test_prefetcher_reraises_the_worker_exception():
    def fn(step):
        if step == 2:
            raise ValueError("bad step 2")
        return step

    with data.Prefetcher(fn, start_step=0) as pf:
        assert (pf.next(), pf.next()) == (0, 1)
        for _ in range(2):
            with pytest.raises(ValueError, match="bad step 2"):
                pf.next()


def test_prefetcher_close_unblocks_a_full_queue():
    pf = data.Prefetcher(lambda s: s, start_step=0, depth=1)
    time.sleep(0.1)
    t = threading.Thread(target=pf.close)
    t.start()
    t.join(timeout=5)
    assert not t.is_alive() and not pf._thread.is_alive()


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_char_dataset(tmp_path, capsys):
    src = tmp_path / "input.txt"
    src.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 10)
    assert prepare.main(["shakespeare_char", "--input", str(src), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "vocab size:" in out and "train has" in out and "val has" in out
    assert data.load_meta(tmp_path / "o")["vocab_size"] == len(set(src.read_text()))


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert prepare.main(["shakespeare_char", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.txt" in err and err.count("\n") == 1
    assert prepare.main(["text", "--out", str(tmp_path)]) == 2
    assert "needs --input" in capsys.readouterr().err
