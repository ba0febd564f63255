"""Write a dataset's train.bin/val.bin of uint16 token ids (and meta.pkl for characters) byte for
byte as nanoGPT's data/*/prepare.py scripts; `gptjax.data` reads them.

    python -m gptjax.prepare shakespeare_char [--input input.txt] [--out data/shakespeare_char]
    python -m gptjax.prepare shakespeare      [--input input.txt] [--out data/shakespeare]
    python -m gptjax.prepare text --input a.txt b.txt [--out data/text] [--val-fraction 0.1]
    python -m gptjax.prepare openwebtext [--out data/openwebtext] [--num-proc 8]

Without --input the Shakespeare datasets reuse OUT/input.txt or download it there.
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import sys
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptjax import paths

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SPLITS = {"train": 0, "val": 1}
GPT2_EOT = 50256
PathLike = str | os.PathLike


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """tiktoken's GPT-2 BPE: downloaded once, or from TIKTOKEN_CACHE_DIR's cache when offline."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # requests' and blobfile's errors: no GPT-2 files without a network or cache
        raise gpt2_files_missing(err) from err


def gpt2_files_missing(err: BaseException) -> ConnectionError:
    """The error for GPT-2's BPE files (tiktoken's download) not being reachable."""
    return ConnectionError(f"could not read GPT-2's tokenizer files ({type(err).__name__}); when offline, set "
                           "TIKTOKEN_CACHE_DIR to a tiktoken cache that holds them")


def prepare_command(dataset: str, data_dir: PathLike) -> str:
    """The shell command that writes `dataset` into `data_dir`."""
    if dataset in ("shakespeare_char", "shakespeare"):
        return f"python -m gptjax.prepare {dataset} --input PATH --out {data_dir}"
    if dataset == "openwebtext":
        return f"python -m gptjax.prepare openwebtext --out {data_dir}"
    return f"python -m gptjax.prepare text --input FILE [FILE ...] --out {data_dir}"


def write_file(path: Path, ids: Sequence[int] | np.ndarray | bytes) -> None:
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
    write_file(out / "meta.pkl", pickle.dumps({"vocab_size": len(chars), "itos": itos, "stoi": stoi}))
    write_file(out / "val.bin", [stoi[c] for c in val_text])
    write_file(out / "train.bin", [stoi[c] for c in train_text])
    return _summary(out, len(train_text), len(val_text), len(chars), characters=len(text))


def _write_bpe(out: Path, train_ids: list[int], val_ids: list[int], **extra: Any) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    # a meta.pkl left from a character-level run would make the trainer use its tiny vocabulary
    (out / "meta.pkl").unlink(missing_ok=True)
    write_file(out / "val.bin", val_ids)
    write_file(out / "train.bin", train_ids)
    return _summary(out, len(train_ids), len(val_ids), gpt2_encoding().n_vocab, **extra)


def prepare_shakespeare(text: str, out_dir: PathLike) -> dict:
    """GPT-2 BPE ids of `text` split 90/10 by characters (nanoGPT data/shakespeare/prepare.py)."""
    train_text, val_text = _split_text(text, "the text")
    enc = gpt2_encoding()
    train_ids, val_ids = enc.encode_ordinary(train_text), enc.encode_ordinary(val_text)
    return _write_bpe(Path(out_dir), train_ids, val_ids, characters=len(text))


def prepare_text(paths: Sequence[PathLike], out_dir: PathLike, val_fraction: float = 0.1) -> dict:
    """GPT-2 BPE ids of local text files, each followed by <|endoftext|>; the last `val_fraction`
    of the token stream is val. No meta.pkl: the model uses GPT-2's vocabulary."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
    if not paths:
        raise ValueError("prepare_text needs at least one input file")
    enc, ids = gpt2_encoding(), []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"input file {p} does not exist")
        # EOT separates documents the way openwebtext's prepare does, so windows see the boundary
        ids += enc.encode_ordinary(read_text(p)) + [enc.eot_token]
    n_train = int(len(ids) * (1.0 - val_fraction))
    if n_train == 0 or n_train == len(ids):
        raise ValueError(f"{len(ids)} tokens are too few to split with val_fraction={val_fraction}")
    return _write_bpe(Path(out_dir), ids[:n_train], ids[n_train:], files=len(paths))


def _owt_process(example: dict) -> dict:
    ids = gpt2_encoding().encode_ordinary(example["text"])  # encode_ordinary ignores special tokens
    ids.append(gpt2_encoding().eot_token)  # nanoGPT appends (not prepends) eot: 50256
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
    (out / "meta.pkl").unlink(missing_ok=True)  # as _write_bpe: no character vocabulary for BPE ids
    counts = {}
    for split, dset in tokenized.items():
        arr_len = np.sum(dset["len"], dtype=np.uint64)
        filename = out / f"{split}.bin"
        # filled under a temporary name and renamed when complete, as write_file: an interrupted
        # prepare must not leave a full-size file whose unwritten tail reads as token 0
        tmp = filename.with_name(f"{filename.name}.tmp{os.getpid()}")
        try:
            arr = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(arr_len,))  # eot 50256 < 2**16
            total_batches, idx = 1024, 0
            for batch_idx in tqdm(range(total_batches), desc=f"writing {filename}"):
                # batch samples together for a faster write
                batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
                arr_batch = np.concatenate(batch["ids"])
                arr[idx : idx + len(arr_batch)] = arr_batch
                idx += len(arr_batch)
            arr.flush()
            del arr
            os.replace(tmp, filename)
        finally:
            tmp.unlink(missing_ok=True)
        counts[split] = int(arr_len)
    return _summary(out, counts["train"], counts["val"], gpt2_encoding().n_vocab)


def read_text(path: PathLike) -> str:
    """A UTF-8 text file, its decoding failure naming the file and the byte."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8") from None


def read_shakespeare(input_path: PathLike | None = None, out_dir: PathLike | None = None) -> str:
    """tiny-shakespeare's text: from `input_path`, else `out_dir/input.txt`, else downloaded (and
    saved to `out_dir/input.txt` for next time, as nanoGPT does)."""
    if input_path is not None:
        if not Path(input_path).is_file():
            raise FileNotFoundError(
                f"--input {input_path} does not exist: pass the path to tiny-shakespeare's input.txt"
            )
        return read_text(input_path)
    cached = Path(out_dir) / "input.txt" if out_dir is not None else None
    if cached is not None and cached.is_file():
        return read_text(cached)
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
    where = paths.resolve(data_dir)
    if where.exists() and not where.is_dir():
        raise NotADirectoryError(f"data_dir {data_dir} is a file: pass the directory that holds train.bin and val.bin")
    present = [s for s in SPLITS if (where / f"{s}.bin").is_file()]
    if len(present) == len(SPLITS):
        return None
    if paths.is_remote(data_dir):  # prepared on a disk: the writers memory-map and rename
        raise FileNotFoundError(
            f"{data_dir} has no {' and '.join(f'{s}.bin' for s in SPLITS if s not in present)}: prepare the "
            f"dataset on a local disk (`{prepare_command(dataset, 'DIR')}`), then copy it to the bucket with "
            f"`gcloud storage cp DIR/* {str(data_dir).rstrip('/')}/`")
    if present:  # a damaged dataset: preparing again would overwrite the split that is there
        missing = [f"{s}.bin" for s in SPLITS if s not in present]
        raise FileNotFoundError(f"{data_dir} has {present[0]}.bin but no {', '.join(missing)}: the dataset is "
                                f"incomplete; prepare it again with `{prepare_command(dataset, data_dir)}`")
    writers = {"shakespeare_char": prepare_shakespeare_char, "shakespeare": prepare_shakespeare}
    if dataset not in writers:
        raise FileNotFoundError(
            f"{data_dir} has no train.bin/val.bin for dataset {dataset!r}: "
            f"prepare it with `{prepare_command(dataset, data_dir)}`"
        )
    try:
        text = read_shakespeare(input_path, out_dir=data_dir)
    except ConnectionError as e:
        raise ConnectionError(f"{e}, e.g. `{prepare_command(dataset, data_dir)}`, or to gptjax.train "
                              "--data_input=PATH") from e
    return writers[dataset](text, data_dir)


# ----------------------------------------------------------------------------- command line


DATASETS = ("shakespeare_char", "shakespeare", "openwebtext", "text")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gptjax.prepare", description=__doc__.split("\n")[0])
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--input", nargs="+", default=None, help="local text file(s); one input.txt for Shakespeare")
    p.add_argument("--out", default=None, help="output directory (default data/<dataset>)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="text: share of tokens kept for val")
    p.add_argument("--num-proc", type=int, default=8, help="openwebtext: tokenizer worker processes")
    return p


def prepare(dataset: str, out_dir: str, inputs: list[str] | None, val_fraction: float = 0.1, num_proc: int = 8) -> dict:
    """Run the writer for `dataset`; returns its summary (token counts, vocab size)."""
    if paths.is_url(out_dir):  # the writers memory-map and rename, which a bucket cannot do
        raise ValueError(f"--out={out_dir}: prepare writes a local directory; prepare into DIR, then copy it "
                         f"to the bucket with `gcloud storage cp DIR/* {str(out_dir).rstrip('/')}/`")
    if dataset in ("shakespeare_char", "shakespeare"):
        if inputs is not None and len(inputs) != 1:
            raise ValueError(f"{dataset} takes one --input (tiny-shakespeare's input.txt), got {len(inputs)}")
        text = read_shakespeare(inputs[0] if inputs else None, out_dir=out_dir)
        writer = prepare_shakespeare_char if dataset == "shakespeare_char" else prepare_shakespeare
        return writer(text, out_dir)
    if dataset == "text":
        if not inputs:
            raise ValueError("text needs --input FILE [FILE ...]: the local text files to tokenize")
        return prepare_text(inputs, out_dir, val_fraction=val_fraction)
    if inputs:
        raise ValueError("openwebtext is read from the HuggingFace hub: drop --input")
    return prepare_openwebtext(out_dir, num_proc=num_proc)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out_dir = args.out or str(Path("data") / args.dataset)
    try:
        summary = prepare(args.dataset, out_dir, args.input, args.val_fraction, args.num_proc)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "characters" in summary:
        print(f"length of dataset in characters: {summary['characters']:,}")
    print(f"vocab size: {summary['vocab_size']:,}")
    for split in ("train", "val"):
        path = Path(out_dir) / f"{split}.bin"
        print(f"{split} has {summary[f'{split}_tokens']:,} tokens -> {path} ({path.stat().st_size:,} bytes)")
    if (Path(out_dir) / "meta.pkl").is_file():
        print(f"vocabulary -> {Path(out_dir) / 'meta.pkl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
