"""Write a dataset's train.bin/val.bin (and meta.pkl for characters), as nanoGPT's prepare scripts.

    python -m gptjax.prepare shakespeare_char [--input input.txt] [--out data/shakespeare_char]
    python -m gptjax.prepare shakespeare      [--input input.txt] [--out data/shakespeare]
    python -m gptjax.prepare text --input a.txt b.txt [--out data/text] [--val-fraction 0.1]
    python -m gptjax.prepare openwebtext [--out data/openwebtext] [--num-proc 8]

Without --input the Shakespeare datasets reuse OUT/input.txt or download it there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptjax import data

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
    if dataset in ("shakespeare_char", "shakespeare"):
        if inputs is not None and len(inputs) != 1:
            raise ValueError(f"{dataset} takes one --input (tiny-shakespeare's input.txt), got {len(inputs)}")
        text = data.read_shakespeare(inputs[0] if inputs else None, out_dir=out_dir)
        writer = data.prepare_shakespeare_char if dataset == "shakespeare_char" else data.prepare_shakespeare
        return writer(text, out_dir)
    if dataset == "text":
        if not inputs:
            raise ValueError("text needs --input FILE [FILE ...]: the local text files to tokenize")
        return data.prepare_text(inputs, out_dir, val_fraction=val_fraction)
    if inputs:
        raise ValueError("openwebtext is read from the HuggingFace hub: drop --input")
    return data.prepare_openwebtext(out_dir, num_proc=num_proc)


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
