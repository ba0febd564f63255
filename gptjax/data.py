"""Datasets as nanoGPT lays them out: `train.bin`/`val.bin` of uint16 token ids, plus `meta.pkl`
for character-level vocabularies.

The writers reproduce nanoGPT's `data/*/prepare.py` byte for byte. Batches are drawn from the
(seed, split, step) alone, so a resumed run or a multi-host run reads exactly what a single
uninterrupted process would. Batches are always 3-D: `x_AxBxT` where A is the number of
gradient-accumulation micro-steps (1 without accumulation) and B the rows this host feeds.
"""

from __future__ import annotations

import functools
import os
import pickle
import queue
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SPLITS = {"train": 0, "val": 1}
GPT2_EOT = 50256
PathLike = str | os.PathLike


@functools.lru_cache(maxsize=None)
def _gpt2():
    import tiktoken

    return tiktoken.get_encoding("gpt2")


def prepare_command(dataset: str, data_dir: PathLike) -> str:
    """The shell command that writes `dataset` into `data_dir`."""
    if dataset in ("shakespeare_char", "shakespeare"):
        return f"python -m gptjax.prepare {dataset} --input PATH --out {data_dir}"
    if dataset == "openwebtext":
        return f"python -m gptjax.prepare openwebtext --out {data_dir}"
    return f"python -m gptjax.prepare text --input FILE [FILE ...] --out {data_dir}"


# ----------------------------------------------------------------------------- writing


def _write(path: Path, ids: Sequence[int] | np.ndarray | bytes) -> None:
    # write then rename, so an interrupted prepare never leaves a truncated file that looks valid
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    if isinstance(ids, bytes):
        tmp.write_bytes(ids)
    else:
        np.array(ids, dtype=np.uint16).tofile(tmp)
    os.replace(tmp, path)


def _split_text(text: str, what: str) -> tuple[str, str]:
    n = len(text)
    train, val = text[: int(n * 0.9)], text[int(n * 0.9) :]
    if not train or not val:
        raise ValueError(f"{what} has only {n} characters: too short to split 90/10 into train and val")
    return train, val


def _summary(out: Path, n_train: int, n_val: int, vocab_size: int, **extra: Any) -> dict:
    return {"out_dir": str(out), "train_tokens": n_train, "val_tokens": n_val, "vocab_size": vocab_size, **extra}


def prepare_shakespeare_char(text: str, out_dir: PathLike) -> dict:
    """Character-level ids of `text` (nanoGPT data/shakespeare_char/prepare.py): bins + meta.pkl."""
    train_text, val_text = _split_text(text, "the text")
    chars = sorted(set(text))
    if len(chars) > 2**16:
        raise ValueError(f"the text has {len(chars)} distinct characters; uint16 .bin files hold at most 65536")
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # meta first: bins without their meta would be read as GPT-2 ids by the trainer
    _write(out / "meta.pkl", pickle.dumps({"vocab_size": len(chars), "itos": itos, "stoi": stoi}))
    _write(out / "val.bin", [stoi[c] for c in val_text])
    _write(out / "train.bin", [stoi[c] for c in train_text])
    return _summary(out, len(train_text), len(val_text), len(chars), characters=len(text))


def _write_bpe(out: Path, train_ids: list[int], val_ids: list[int], **extra: Any) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    # a meta.pkl left from a character-level run would make the trainer use its tiny vocabulary
    (out / "meta.pkl").unlink(missing_ok=True)
    _write(out / "val.bin", val_ids)
    _write(out / "train.bin", train_ids)
    return _summary(out, len(train_ids), len(val_ids), _gpt2().n_vocab, **extra)


def prepare_shakespeare(text: str, out_dir: PathLike) -> dict:
    """GPT-2 BPE ids of `text` split 90/10 by characters (nanoGPT data/shakespeare/prepare.py)."""
    train_text, val_text = _split_text(text, "the text")
    enc = _gpt2()
    train_ids, val_ids = enc.encode_ordinary(train_text), enc.encode_ordinary(val_text)
    return _write_bpe(Path(out_dir), train_ids, val_ids, characters=len(text))


def prepare_text(paths: Sequence[PathLike], out_dir: PathLike, val_fraction: float = 0.1) -> dict:
    """GPT-2 BPE ids of local text files, each followed by <|endoftext|>; the last `val_fraction`
    of the token stream is val. No meta.pkl: the model uses GPT-2's vocabulary."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
    if not paths:
        raise ValueError("prepare_text needs at least one input file")
    enc, ids = _gpt2(), []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"input file {p} does not exist")
        # EOT separates documents the way openwebtext's prepare does, so windows see the boundary
        ids += enc.encode_ordinary(Path(p).read_text(encoding="utf-8")) + [enc.eot_token]
    n_train = int(len(ids) * (1.0 - val_fraction))
    if n_train == 0 or n_train == len(ids):
        raise ValueError(f"{len(ids)} tokens are too few to split with val_fraction={val_fraction}")
    return _write_bpe(Path(out_dir), ids[:n_train], ids[n_train:], files=len(paths))


def _owt_process(example: dict) -> dict:
    ids = _gpt2().encode_ordinary(example["text"])  # encode_ordinary ignores special tokens
    ids.append(_gpt2().eot_token)  # nanoGPT appends (not prepends) eot: 50256
    return {"ids": ids, "len": len(ids)}


def prepare_openwebtext(
    out_dir: PathLike, num_proc: int = 8, num_proc_load_dataset: int | None = None
) -> dict:
    """OpenWebText as nanoGPT data/openwebtext/prepare.py (~54 GB of HF cache, ~9B train tokens)."""
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ImportError(
            f"openwebtext needs HuggingFace `datasets` ({e}): pip install gptjax[openwebtext]"
        ) from e
    from tqdm import tqdm

    dataset = load_dataset("openwebtext", num_proc=num_proc_load_dataset or num_proc)
    split_dataset = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")
    tokenized = split_dataset.map(
        _owt_process, remove_columns=["text"], desc="tokenizing the splits", num_proc=num_proc
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, dset in tokenized.items():
        arr_len = np.sum(dset["len"], dtype=np.uint64)
        filename = out / f"{split}.bin"
        arr = np.memmap(filename, dtype=np.uint16, mode="w+", shape=(arr_len,))  # eot 50256 < 2**16
        total_batches, idx = 1024, 0
        for batch_idx in tqdm(range(total_batches), desc=f"writing {filename}"):
            # batch samples together for a faster write
            batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
            arr_batch = np.concatenate(batch["ids"])
            arr[idx : idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        arr.flush()
        counts[split] = int(arr_len)
    return _summary(out, counts["train"], counts["val"], _gpt2().n_vocab)


def read_shakespeare(input_path: PathLike | None = None, out_dir: PathLike | None = None) -> str:
    """tiny-shakespeare's text: from `input_path`, else `out_dir/input.txt`, else downloaded (and
    saved to `out_dir/input.txt` for next time, as nanoGPT does)."""
    if input_path is not None:
        if not Path(input_path).is_file():
            raise FileNotFoundError(
                f"--input {input_path} does not exist: pass the path to tiny-shakespeare's input.txt"
            )
        return Path(input_path).read_text(encoding="utf-8")
    cached = Path(out_dir) / "input.txt" if out_dir is not None else None
    if cached is not None and cached.is_file():
        return cached.read_text(encoding="utf-8")
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=20) as response:
            text = response.read().decode("utf-8")
    except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are all OSError
        raise ConnectionError(
            f"could not download tiny-shakespeare ({e}); pass --input PATH to a local copy of input.txt"
        ) from e
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(text, encoding="utf-8")
    return text


def ensure_dataset(dataset: str, data_dir: PathLike, input_path: PathLike | None = None) -> dict | None:
    """Make sure `data_dir` holds train.bin and val.bin, preparing the Shakespeare datasets when
    missing. Returns the prepare summary if it wrote them, else None."""
    if all((Path(data_dir) / f"{s}.bin").is_file() for s in SPLITS):
        return None
    writers = {"shakespeare_char": prepare_shakespeare_char, "shakespeare": prepare_shakespeare}
    if dataset not in writers:
        raise FileNotFoundError(
            f"{data_dir} has no train.bin/val.bin for dataset {dataset!r}: "
            f"prepare it with `{prepare_command(dataset, data_dir)}`"
        )
    try:
        text = read_shakespeare(input_path, out_dir=data_dir)
    except ConnectionError as e:
        raise ConnectionError(f"{e}, e.g. `{prepare_command(dataset, data_dir)}`") from e
    return writers[dataset](text, data_dir)


# ----------------------------------------------------------------------------- reading


class _MetaUnpickler(pickle.Unpickler):
    """nanoGPT's meta holds only dicts, str and int, which unpickle without looking up any class or
    function; every lookup is refused, so a crafted meta.pkl cannot run code."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        raise ValueError(
            f"refusing to load {self.path}: it asks for {module}.{name}; meta.pkl should hold only plain dicts/str/int"
        )


def load_meta(data_dir: PathLike) -> dict | None:
    """`data_dir/meta.pkl` (character vocabulary) loaded safely and checked, or None if absent."""
    path = Path(data_dir) / "meta.pkl"
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        try:
            meta = _MetaUnpickler(f, path).load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{path} is not a readable pickle ({e}): re-run the dataset's prepare") from e
    bad = f"{path} is inconsistent"
    if not isinstance(meta, dict) or not {"vocab_size", "itos", "stoi"} <= meta.keys():
        raise ValueError(f"{bad}: it must be a dict with vocab_size, itos and stoi; re-run the dataset's prepare")
    v, itos, stoi = meta["vocab_size"], meta["itos"], meta["stoi"]
    if not isinstance(v, int) or not isinstance(itos, dict) or not isinstance(stoi, dict) or v <= 0:
        raise ValueError(f"{bad}: vocab_size must be a positive int and itos/stoi dicts")
    if len(itos) != v or len(stoi) != v:
        raise ValueError(f"{bad}: vocab_size={v} but itos has {len(itos)} entries and stoi {len(stoi)}")
    if sorted(itos) != list(range(v)) or any(stoi.get(ch) != i for i, ch in itos.items()):
        raise ValueError(f"{bad}: itos must map 0..{v - 1} to characters and stoi be its inverse")
    return meta


class BinDataset:
    """`train.bin` and `val.bin` of `data_dir`, memory-mapped read-only once.

    nanoGPT re-creates its memmap every batch because pages it touched stay counted in the process's
    memory; those are clean, read-only page-cache pages the OS drops under pressure, so one map per
    split for the whole run is safe and saves re-opening the file each step.
    """

    def __init__(
        self, data_dir: PathLike, block_size: int, vocab_size: int | None = None, dataset: str | None = None
    ):
        self.data_dir, self.block_size = Path(data_dir), block_size
        name = dataset or self.data_dir.name
        self.splits: dict[str, np.memmap] = {}
        for split in SPLITS:
            path = self.data_dir / f"{split}.bin"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: prepare the dataset with `{prepare_command(name, data_dir)}`"
                )
            size = path.stat().st_size
            if size == 0 or size % 2:
                raise ValueError(
                    f"{path} has {size} bytes: expected a non-empty file of uint16 token ids; re-run the prepare"
                )
            if size // 2 < block_size + 1:
                raise ValueError(
                    f"{path} holds {size // 2} tokens but block_size={block_size} needs at least {block_size + 1}: "
                    "lower block_size or use more data"
                )
            self.splits[split] = data = np.memmap(path, dtype=np.uint16, mode="r")
            if vocab_size is not None:
                self._check_vocab(path, data, vocab_size)

    @staticmethod
    def _check_vocab(path: Path, data: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> None:
        # one chunked pass (32 MB at a time): an id >= vocab_size would silently index out of the embedding
        top = max(int(data[i : i + chunk].max()) for i in range(0, len(data), chunk))
        if top >= vocab_size:
            raise ValueError(
                f"{path} holds token id {top} but vocab_size={vocab_size}: the data was tokenized for a larger "
                "vocabulary; use a vocab_size above it or re-prepare the data"
            )

    def n_tokens(self, split: str) -> int:
        return len(self.splits[split])


def batch_offsets(
    seed: int, split: str, step: int, n_tokens: int, block_size: int, batch_size: int,
    process_index: int = 0, process_count: int = 1, accum_steps: int = 1, eval_index: int | None = None,
) -> np.ndarray:
    """Window starts `ix_AxB` (A = accum_steps, B = batch_size // process_count) this host reads.

    One draw of the global A x batch_size offsets from `default_rng([seed, split, step, stream])`,
    host h taking columns [h*B, (h+1)*B): the hosts' batches together are exactly the one-process
    batch. stream 0 is training; eval batch k at iteration `step` uses stream k + 1, so eval never
    reuses the training windows of that step. Offsets lie in [0, n_tokens - block_size) as nanoGPT.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {tuple(SPLITS)}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} must be a positive multiple of process_count={process_count}: "
            "every host feeds the same number of rows"
        )
    if accum_steps < 1 or (eval_index is not None and eval_index < 0):
        raise ValueError(f"accum_steps={accum_steps} must be >= 1 and eval_index={eval_index} >= 0")
    if n_tokens < block_size + 1:
        raise ValueError(f"{n_tokens} tokens are too few for block_size={block_size} (needs {block_size + 1})")
    stream = 0 if eval_index is None else eval_index + 1
    # fixed-length entropy of 32-bit words: numpy's SeedSequence pads short lists with zeros, so
    # [a, b] and [a, b, 0] would collide; out-of-range values would split into extra words
    words = [seed, SPLITS[split], step, stream]
    if not all(0 <= w < 2**32 for w in words):
        raise ValueError(f"seed={seed}, step={step} and eval_index must lie in [0, 2**32)")
    rng = np.random.default_rng(words)
    ix = rng.integers(0, n_tokens - block_size, size=(accum_steps, batch_size), dtype=np.int64)
    b = batch_size // process_count
    return ix[:, process_index * b : (process_index + 1) * b]


def get_batch(
    dataset: BinDataset, split: str, step: int, batch_size: int, block_size: int, seed: int,
    process_index: int = 0, process_count: int = 1, accum_steps: int = 1, eval_index: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(x_AxBxT, y_AxBxT) int32 with y = x shifted one token left; see `batch_offsets` for which
    windows. Always 3-D: A = accum_steps (1 without accumulation), B = batch_size // process_count."""
    if split not in dataset.splits:
        raise ValueError(f"split={split!r} is not one of {tuple(SPLITS)}")
    data = dataset.splits[split]
    ix_AxB = batch_offsets(
        seed, split, step, len(data), block_size, batch_size, process_index, process_count, accum_steps, eval_index
    )
    # one fancy-index gather of T+1 tokens per window instead of nanoGPT's per-row python loop
    w_AxBx1T = data[ix_AxB[..., None] + np.arange(block_size + 1)].astype(np.int32)
    return w_AxBx1T[..., :-1], w_AxBx1T[..., 1:]


class Prefetcher:
    """Computes `fn(step)` for step = start_step, start_step + 1, ... on a background thread, at most
    `depth` ahead, so host-side batch gathering overlaps the device step. An exception raised by `fn`
    is re-raised by `next()`."""

    def __init__(self, fn: Callable[[int], Any], start_step: int, depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        self.step = start_step  # the step the next `next()` returns
        self._fn, self._queue = fn, queue.Queue(maxsize=depth)
        self._stop, self._error = threading.Event(), None
        self._thread = threading.Thread(target=self._run, args=(start_step,), daemon=True, name="gptjax-prefetch")
        self._thread.start()

    def _run(self, step: int) -> None:
        while not self._stop.is_set():
            try:
                item = (True, self._fn(step))
            except BaseException as e:  # handed to the consumer, which re-raises it
                item = (False, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if not item[0]:
                return
            step += 1

    def next(self) -> Any:
        """The batch for `self.step`, then advances it."""
        if self._error is not None:
            raise self._error
        while True:
            if self._stop.is_set():
                raise RuntimeError("Prefetcher.next() called after close()")
            try:
                ok, value = self._queue.get(timeout=0.05)
                break
            except queue.Empty:
                continue
        if not ok:
            self._error = value
            raise value
        self.step += 1
        return value

    __next__ = next

    def __iter__(self):
        return self

    def close(self) -> None:
        """Stops the thread; a `fn` call in progress finishes first."""
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
