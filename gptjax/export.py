"""Export a model for nanoGPT's own scripts or for Hugging Face transformers, with its vocabulary.

    python -m gptjax.export out-shakespeare-char --to=nanogpt out-nano [--nanogpt=PATH/TO/nanoGPT]
    python -m gptjax.export out-shakespeare-char --to=hf hf-shakespeare-char

SOURCE is anything init_from takes: a gptjax run's out_dir, a nanoGPT ckpt.pt, an HF directory or
a GPT-2 name. `--to=nanogpt` writes DEST/ckpt.pt, which nanoGPT's sample.py samples
(`--out_dir=DEST`) and its train.py resumes (`--init_from=resume --out_dir=DEST`): the model, the
run's iter_num, best_val_loss and config (with `dataset`), and the optimizer as torch's AdamW state
(a gptjax AdamW run's own moments, else a fresh optimizer). A character-level model's meta.pkl goes
beside it, and with `--nanogpt` also to PATH/data/<dataset>/meta.pkl, where nanoGPT's sample.py
looks for it. `--to=hf` writes config.json, model.safetensors and a tokenizer (GPT-2's BPE files,
or the character vocabulary as tokenizer.json plus meta.pkl). Nothing existing is overwritten.
SOURCE and DEST may be gs:// URLs; a bucket DEST is written from a local staging directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
import sys
from pathlib import Path
from typing import Sequence

from gptjax import convert, data, paths, prepare, weights

GPT2_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"  # tiktoken's gpt2 source


def to_nanogpt(source, dest, nanogpt_dir=None, dataset: str | None = None,
               allow_numerics_change: bool = False) -> dict:
    """Write DEST/ckpt.pt (and meta.pkl) from `source`; returns what was written and how."""
    w = weights.load(source)
    final = paths.resolve(dest)
    _refuse_existing([final / "ckpt.pt"])
    dataset = dataset or w.run.get("dataset")
    if w.meta is not None and not dataset:
        raise ValueError(f"{source} has a character vocabulary but names no dataset: pass --dataset=NAME "
                         "(nanoGPT's sample.py reads data/NAME/meta.pkl)")
    nanogpt_meta = None
    if nanogpt_dir is not None and w.meta is not None:
        if not Path(nanogpt_dir).is_dir():
            raise FileNotFoundError(f"--nanogpt={nanogpt_dir} is not a directory: pass your nanoGPT clone")
        nanogpt_meta = Path(nanogpt_dir) / "data" / dataset / "meta.pkl"
        there = data.load_meta(nanogpt_meta.parent)
        if there is not None and there["stoi"] != w.meta["stoi"]:
            raise ValueError(f"{nanogpt_meta} is another vocabulary than the model's; it is left as it is: move it "
                             "away, or pass --dataset=ANOTHER_NAME")
        if there is not None:
            nanogpt_meta = None  # the clone has this vocabulary already: its file stays untouched
    optimizer, how = _nanogpt_optimizer(w)
    config = {**w.run, **({"dataset": dataset} if dataset else {})}
    with paths.staged(dest) as local:  # torch.save writes a local file; a bucket gets it once complete
        convert.save_nanogpt(w.params, w.cfg, local / "ckpt.pt", allow_numerics_change=allow_numerics_change,
                             extra={"iter_num": w.iter_num, "best_val_loss": w.best_val_loss, "config": config,
                                    "optimizer": optimizer})
        written = [final / "ckpt.pt"]
        if w.meta is not None:
            for path in filter(None, (local / "meta.pkl", nanogpt_meta)):
                path.parent.mkdir(parents=True, exist_ok=True)
                prepare.write_file(path, pickle.dumps(w.meta))
            written += [final / "meta.pkl"] + ([nanogpt_meta] if nanogpt_meta else [])
    return {"written": written, "optimizer": how, "source": w.describe(), "dataset": dataset}


def _nanogpt_optimizer(w: weights.Weights) -> tuple[dict, str]:
    """(torch AdamW state dict, how it was made) for the weights `w`."""
    if w.kind == "gptjax" and w.run.get("optimizer", "adamw") == "adamw":
        updates, mu, nu = _adam_moments(w)
        state = convert.nanogpt_optimizer_state(w.cfg, w.run["learning_rate"], (w.run["beta1"], w.run["beta2"]),
                                                w.run["weight_decay"], (updates, mu, nu))
        return state, f"the run's AdamW moments ({updates} updates)"
    why = "the run trained with Muon" if w.kind == "gptjax" else f"a {w.kind} checkpoint has no gptjax optimizer"
    return convert.nanogpt_optimizer_state(w.cfg), f"a fresh AdamW ({why})"


def _adam_moments(w: weights.Weights):
    """(updates applied, mu, nu) of a gptjax AdamW run's checkpoint at w.iter_num."""
    import jax
    import optax

    from gptjax import checkpoint, config as config_lib
    from gptjax.optim import make_optimizer

    step_dir = checkpoint.checkpoint_dir(w.path) / str(w.iter_num)
    optimizer = make_optimizer(config_lib.from_dict(w.run, source=f"the run config of checkpoint {step_dir}"))
    abstract = jax.eval_shape(optimizer.init, w.params)
    opt_state = checkpoint.restore_part(w.path, w.iter_num, "opt_state", abstract)
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
    return int(adam.count), adam.mu, adam.nu


def to_hf(source, dest) -> dict:
    """Write an HF GPT-2 directory with its tokenizer at DEST from `source`."""
    w = weights.load(source)
    final = paths.resolve(dest)
    _refuse_existing([final / name for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.json")])
    if w.meta is None:
        tokenizer, kind = _gpt2_tokenizer(w.cfg), "GPT-2 BPE"
    elif importlib.util.find_spec("tokenizers") is not None:
        tokenizer, kind = _char_tokenizer(w.meta, w.cfg.block_size), "characters (tokenizer.json and meta.pkl)"
    else:
        tokenizer, kind = {}, ("characters, in meta.pkl only: pip install tokenizers (it comes with transformers) "
                               "for an HF tokenizer")
    with paths.staged(dest) as local:
        convert.save_hf(w.params, w.cfg, local)
        for name, content in tokenizer.items():
            (local / name).write_bytes(content)
        if w.meta is not None:
            prepare.write_file(local / "meta.pkl", pickle.dumps(w.meta))
    return {"written": sorted(final.iterdir(), key=str), "source": w.describe(), "tokenizer": kind}


def _gpt2_tokenizer(cfg) -> dict[str, bytes]:
    """GPT-2's tokenizer files as transformers' GPT2Tokenizer reads them: tiktoken's own GPT-2
    sources (encoder.json is vocab.json, vocab.bpe is merges.txt), from its cache when offline."""
    import tiktoken.load

    try:
        vocab, merges = (tiktoken.load.read_file_cached(GPT2_FILES + name) for name in ("encoder.json", "vocab.bpe"))
    except Exception as err:  # requests' and blobfile's errors: no GPT-2 files without a network or cache
        raise prepare.gpt2_files_missing(err) from err
    eot = "<|endoftext|>"
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
              "model_max_length": cfg.block_size, "add_prefix_space": False}
    return {"vocab.json": vocab, "merges.txt": merges, "tokenizer_config.json": _json(config)}


def _char_tokenizer(meta: dict, block_size: int) -> dict[str, bytes]:
    """The character vocabulary as a `tokenizers` word-level model over single characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=meta["stoi"], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character a word
    tok.decoder = decoders.Fuse()  # joined without spaces
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size}
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": _json(config)}


def _json(payload: dict) -> bytes:
    return (json.dumps(payload, indent=2) + "\n").encode()


def _refuse_existing(paths: list[Path]) -> None:
    if there := [str(p) for p in paths if p.exists()]:
        raise FileExistsError(f"{', '.join(there)} already exists; the export overwrites nothing: pass another "
                              "destination or move it away")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptjax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a gptjax out_dir, a nanoGPT ckpt.pt, an HF directory or a GPT-2 name")
    p.add_argument("--to", required=True, choices=("nanogpt", "hf"))
    p.add_argument("dest", help="the directory to write (nanogpt: DEST/ckpt.pt, nanoGPT's out_dir)")
    p.add_argument("--nanogpt", default=None, help="your nanoGPT clone: its data/<dataset>/ gets the meta.pkl")
    p.add_argument("--dataset", default=None, help="config['dataset'] of the nanoGPT checkpoint (default: the run's)")
    p.add_argument("--allow_numerics_change", action="store_true",
                   help="export a tanh-GELU or other-eps model to nanoGPT, which runs exact GELU and eps 1e-5")
    args = p.parse_args(argv)
    try:
        if args.to == "nanogpt":
            done = to_nanogpt(args.source, args.dest, args.nanogpt, args.dataset, args.allow_numerics_change)
        else:
            if args.nanogpt or args.dataset or args.allow_numerics_change:
                raise ValueError("--nanogpt, --dataset and --allow_numerics_change are for --to=nanogpt")
            done = to_hf(args.source, args.dest)
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {done['source']}:")
    for path in done["written"]:
        print(f"  {path}")
    if args.to == "nanogpt":
        print(f"optimizer state: {done['optimizer']}")
        where = (f"{Path(args.nanogpt) / 'data' / done['dataset']}" if args.nanogpt
                 else f"data/{done['dataset']} of the clone (copy {Path(args.dest) / 'meta.pkl'} there, or pass --nanogpt)")
        if any(path.name == "meta.pkl" for path in done["written"]):
            print(f"nanoGPT's sample.py reads the character vocabulary from {where}")
        print(f"in nanoGPT: python sample.py --out_dir={paths.absolute(args.dest)}  "
              f"(train.py: --init_from=resume --out_dir={paths.absolute(args.dest)})")
    else:
        print(f"tokenizer: {done['tokenizer']}")
        print(f"transformers: GPT2LMHeadModel.from_pretrained({str(paths.absolute(args.dest))!r}), and "
              "AutoTokenizer's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
