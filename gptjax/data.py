"""Reading datasets as nanoGPT lays them out (`gptjax.prepare` writes them): `train.bin`/`val.bin`
of uint16 token ids, plus `meta.pkl` for character-level vocabularies.

Batches are drawn from the (seed, split, step) alone, so a resumed run or a multi-host run reads
exactly what a single uninterrupted process would. Batches are always 3-D: `x_AxBxT` where A is
the number of gradient-accumulation micro-steps (1 without accumulation) and B the rows this host
feeds.
"""

from __future__ import annotations

import pickle
import queue
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gptjax import paths
from gptjax.prepare import SPLITS, PathLike, prepare_command

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
    path = paths.resolve(data_dir) / "meta.pkl"
    if not path.is_file():
        return None
    with path.open("rb") as f:
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
    """`train.bin` and `val.bin` of `data_dir`, memory-mapped read-only once. A gs:// data_dir is
    copied to this host's disk first (paths.local_copy: once, checked, resumable) and the copy
    mapped: random windows of a bucket object would each be a ranged request.

    nanoGPT re-creates its memmap every batch because pages it touched stay counted in the process's
    memory; those are clean, read-only page-cache pages the OS drops under pressure, so one map per
    split for the whole run is safe and saves re-opening the file each step.
    """

    def __init__(
        self, data_dir: PathLike, block_size: int, vocab_size: int | None = None, dataset: str | None = None
    ):
        self.data_dir, self.block_size = paths.resolve(data_dir), block_size
        name = dataset or self.data_dir.name
        self.splits: dict[str, np.memmap] = {}
        for split in SPLITS:
            path = self.data_dir / f"{split}.bin"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: prepare the dataset with `{prepare_command(name, data_dir)}`"
                )
            if not isinstance(path, Path):
                path = paths.local_copy(str(path), f"{split}.bin")
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
